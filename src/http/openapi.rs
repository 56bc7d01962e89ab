//! The OpenAPI 3.1 document, generated from the route table (so every route that exists is in
//! it, and nothing else) plus the schemas of the bodies it names.

use std::sync::LazyLock;

use serde_json::{Map, Value, json};

use super::limits::RateClass;
use super::router::{Access, ROUTER, Route};
use crate::error::ErrorCode;
use crate::http::handlers::health::{SERVICE, VERSION};

pub static DOCUMENT: LazyLock<Value> = LazyLock::new(build);

fn string() -> Value {
    json!({ "type": "string" })
}

fn nullable_string() -> Value {
    json!({ "type": ["string", "null"] })
}

fn object(required: &[&str], properties: Value) -> Value {
    json!({ "type": "object", "required": required, "properties": properties })
}

fn schemas() -> Value {
    let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    let user = object(
        &[
            "id",
            "username",
            "email",
            "is_active",
            "is_verified",
            "subscription_plan",
            "created_at",
        ],
        json!({
            "id": { "type": "string", "format": "uuid" },
            "username": string(),
            "email": { "type": "string", "format": "email" },
            "full_name": nullable_string(),
            "avatar_url": nullable_string(),
            "is_active": { "type": "boolean" },
            "is_verified": { "type": "boolean" },
            "subscription_plan": { "type": "string", "enum": ["free", "starter", "pro", "admin"] },
            "preferred_region": nullable_string(),
            "created_at": { "type": "string", "format": "date-time" },
            "last_login": { "type": ["string", "null"], "format": "date-time" },
        }),
    );
    json!({
        "Error": object(&["detail", "code"], json!({
            "detail": string(),
            "code": { "type": "string", "enum": codes },
            "errors": { "type": "array", "items": object(&["field", "message", "code"], json!({
                "field": string(), "message": string(), "code": string() })) },
            "retry_after": { "type": "integer" },
        })),
        "Message": object(&["message"], json!({ "message": string() })),
        "UserResponse": user,
        "ProfileResponse": { "allOf": [ { "$ref": "#/components/schemas/UserResponse" }, object(&[], json!({
            "active_sessions": { "type": "integer" },
            "plan_limits": object(&[], json!({ "max_environments": { "type": "integer" } })),
        })) ] },
        "AuthResponse": object(&["access_token", "refresh_token", "token_type", "expires_in", "user"], json!({
            "access_token": string(),
            "refresh_token": string(),
            "token_type": { "const": "bearer" },
            "expires_in": { "type": "integer", "description": "seconds" },
            "user": { "$ref": "#/components/schemas/UserResponse" },
        })),
        "RegisterRequest": object(&["username", "email", "password"], json!({
            "username": { "type": "string", "minLength": 3, "maxLength": 30, "pattern": "^[A-Za-z0-9_-]+$" },
            "email": { "type": "string", "format": "email" },
            "password": { "type": "string", "minLength": 8, "maxLength": 128, "description": "lower + upper case letters and a digit" },
            "full_name": nullable_string(),
        })),
        "LoginRequest": object(&["username_or_email", "password"], json!({
            "username_or_email": string(), "password": string() })),
        "GoogleRequest": object(&[], json!({
            "id_token": { "type": "string", "description": "Google ID token (also accepted as `token`)" },
            "token": string() })),
        "RefreshRequest": object(&["refresh_token"], json!({ "refresh_token": string() })),
        "ProfileUpdate": object(&[], json!({
            "full_name": nullable_string(), "username": string(), "avatar_url": nullable_string() })),
        "PasswordChange": object(&["new_password"], json!({
            "current_password": { "type": "string", "description": "required when the account has a password" },
            "new_password": string() })),
        "DeleteAccountRequest": object(&[], json!({
            "password": { "type": "string", "description": "required when the account has a password" } })),
        "SessionList": object(&["sessions", "total"], json!({
            "sessions": { "type": "array", "items": object(&["id", "created_at", "last_used_at", "current"], json!({
                "id": string(), "user_agent": nullable_string(), "ip_address": nullable_string(),
                "created_at": string(), "last_used_at": string(), "expires_at": string(),
                "current": { "type": "boolean" } })) },
            "total": { "type": "integer" } })),
        "RevokedCount": object(&["message", "revoked"], json!({ "message": string(), "revoked": { "type": "integer" } })),
        "ActorTree": object(&["actors", "node", "nodes"], json!({
            "node": string(),
            "nodes": { "type": "array", "items": { "$ref": "#/components/schemas/Node" } },
            "actors": { "type": "array", "items": { "$ref": "#/components/schemas/Actor" } },
            "live_by_kind": { "type": "object" }, "restarts_by_kind": { "type": "object" } })),
        "Node": object(&["id", "address", "provider", "version", "started_at", "heartbeat_at", "heartbeat_age_seconds", "alive", "draining", "this_node"], json!({
            "id": string(), "address": string(), "provider": string(), "version": string(),
            "started_at": string(), "heartbeat_at": string(),
            "heartbeat_age_seconds": { "type": "integer" }, "alive": { "type": "boolean" },
            "draining": { "type": "boolean" }, "this_node": { "type": "boolean" } })),
        "Actor": object(&["kind", "id", "status", "restarts", "restart_limit", "uptime_seconds", "children"], json!({
            "kind": string(), "id": string(), "owner": nullable_string(),
            "status": { "type": "string", "enum": ["starting", "running", "restarting", "failed"] }, "phase": nullable_string(),
            "restarts": { "type": "integer" }, "restart_limit": { "type": "integer" },
            "restart_window_seconds": { "type": "integer" },
            "last_failure": nullable_string(), "last_failure_at": nullable_string(),
            "uptime_seconds": { "type": "integer" }, "mailbox_depth": { "type": "integer" },
            "children": { "type": "array", "items": { "$ref": "#/components/schemas/Actor" } } })),
        "AuditPage": object(&["items", "total", "limit", "offset", "has_more"], json!({
            "items": { "type": "array", "items": object(&["id", "timestamp", "event"], json!({
                "id": { "type": "integer" }, "timestamp": string(), "event": string(),
                "user_id": nullable_string(), "session_id": nullable_string(),
                "ip_address": nullable_string(), "request_id": nullable_string(),
                "detail": { "type": ["object", "null"] } })) },
            "total": { "type": "integer" }, "limit": { "type": "integer" },
            "offset": { "type": "integer" }, "has_more": { "type": "boolean" } })),
        "EnvironmentResponse": object(&["id", "name", "template", "status", "status_version", "progress"], json!({
            "id": string(), "name": string(), "template": string(),
            "status": { "type": "string", "enum": ["creating", "provisioning", "installing", "running", "stopping", "stopped", "starting", "restarting", "snapshotting", "error", "deleting", "terminated"] },
            "status_version": { "type": "integer" }, "progress": { "type": "integer", "minimum": 0, "maximum": 100 },
            "message": nullable_string(), "error_message": nullable_string(),
            "region": string(), "size": string(),
            "resources": object(&[], json!({ "cpu": string(), "memory": string(), "storage": string() })),
            "environment_variables": { "type": "object", "additionalProperties": { "type": "string" } },
            "instance_id": nullable_string(), "ip_address": nullable_string(), "ssh_port": { "type": ["integer", "null"] },
            "installation_completed": { "type": "boolean" },
            "created_at": string(), "updated_at": string(), "last_accessed": nullable_string() })),
        "EnvironmentList": { "type": "array", "items": { "$ref": "#/components/schemas/EnvironmentResponse" } },
        "CreateEnvironment": object(&["name", "template"], json!({
            "name": { "type": "string", "minLength": 1, "maxLength": 50, "pattern": "^[a-z0-9_][a-z0-9_-]*$", "description": "lower-cased; not starting or ending with '-'" },
            "template": { "type": "string", "description": "template id (see /api/v1/templates)" },
            "region": string(), "size": string(),
            "environment_variables": { "type": "object", "additionalProperties": { "type": "string" } },
            "user_password": { "type": "string", "description": "password of the `dev` user (stored only as a crypt hash)" } })),
        "UpdateEnvironment": object(&[], json!({
            "name": string(), "environment_variables": { "type": "object", "additionalProperties": { "type": "string" } } })),
        "CommandAccepted": object(&["message", "status"], json!({ "message": string(), "status": string() })),
        "SnapshotRequest": object(&["name"], json!({ "name": { "type": "string", "minLength": 1, "maxLength": 50 } })),
        "SnapshotList": object(&["environment_id", "snapshots"], json!({ "environment_id": string(),
            "snapshots": { "type": "array", "items": object(&["id", "name", "created_at"], json!({
                "id": string(), "name": string(), "description": nullable_string(), "created_at": string() })) } })),
        "ResizeRequest": object(&["size"], json!({ "size": string() })),
        "Metrics": object(&["environment_id", "samples"], json!({ "environment_id": string(),
            "current": { "oneOf": [ { "$ref": "#/components/schemas/MetricsSample" }, { "type": "null" } ] },
            "samples": { "type": "array", "items": { "$ref": "#/components/schemas/MetricsSample" } } })),
        "Terminals": { "type": "array", "description": "the environment's live terminals on every live node, by terminal_id; another node's come from the store, with screen, cursor, alternate_screen and offset null", "items": object(&["terminal_id", "node", "cols", "rows", "attached", "created_at", "screen", "cursor", "alternate_screen", "offset"], json!({
            "terminal_id": string(),
            "node": { "type": "string", "description": "id of the node that holds it (the nodes list of GET /api/v1/admin/actors)" },
            "cols": { "type": "integer" }, "rows": { "type": "integer" },
            "attached": { "type": "boolean", "description": "a WebSocket holds it (otherwise within its grace period)" },
            "created_at": string(),
            "screen": { "type": ["string", "null"], "description": "visible rows as plain text, trailing blanks trimmed; null on another node, or when the screen is above terminals.screen_max_cells" },
            "cursor": { "type": ["array", "null"], "items": { "type": "integer" }, "description": "zero-based [row, col]; null on another node" },
            "alternate_screen": { "type": ["boolean", "null"], "description": "a full-screen program (editor, pager) is showing; null on another node" },
            "offset": { "type": ["integer", "null"], "description": "output bytes since it started: where a resume continues; null on another node (a resume there gets a new terminal on the same tmux session)" } })) },
        "CarriedCommand": object(&["command_id", "environment_id", "command", "state", "created_at", "expires_at", "answered_at", "outcome"], json!({
            "command_id": string(), "environment_id": string(),
            "command": { "type": "string", "description": "the verb: start, stop, restart, delete, ..." },
            "state": { "type": "string", "enum": ["pending", "running", "done", "expired", "lost"], "description": "expired: cancelled unrun when the caller's wait ran out (it never runs later); lost: the node running it died before answering (look at the environment)" },
            "created_at": string(), "expires_at": string(),
            "answered_at": { "type": ["string", "null"] },
            "outcome": { "type": ["object", "null"], "description": "once done: {\"outcome\": \"accepted\", \"status\": ...}, {\"outcome\": \"environment\", ...}, {\"outcome\": \"snapshots\", ...} or {\"outcome\": \"error\", \"status\": <HTTP status>, \"code\", \"detail\", \"errors\"}" } })),
        "MetricsSample": object(&["cpu_usage", "memory_usage", "disk_usage", "network_in", "network_out", "uptime", "timestamp"], json!({
            "cpu_usage": { "type": "number" }, "memory_usage": { "type": "number" }, "disk_usage": { "type": "number" },
            "network_in": { "type": "integer" }, "network_out": { "type": "integer" }, "uptime": { "type": "integer" },
            "timestamp": string() })),
        "Logs": object(&["environment_id", "environment_name", "logs", "total_lines", "has_more"], json!({
            "environment_id": string(), "environment_name": string(),
            "logs": { "type": "array", "items": object(&["timestamp", "level", "message", "source"], json!({
                "timestamp": string(), "level": string(), "message": string(), "source": string() })) },
            "total_lines": { "type": "integer" }, "has_more": { "type": "boolean" } })),
        "Port": object(&["port", "url", "visibility"], json!({
            "port": { "type": "integer", "minimum": 1, "maximum": 65535 },
            "url": { "type": "string", "description": "host-based preview URL, {port}--{environment_id}.<server.preview_domain>" },
            "path_url": { "type": "string", "description": "/preview/{environment_id}/{port}/ on the API's origin (only when server.preview_path_based is on)" },
            "visibility": { "type": "string", "enum": ["private", "public"] } })),
        "PortList": { "type": "array", "items": { "$ref": "#/components/schemas/Port" } },
        "PortVisibility": object(&["visibility"], json!({ "visibility": { "type": "string", "enum": ["private", "public"] } })),
        "PreviewOpen": object(&["url", "port", "visibility", "expires_in"], json!({
            "url": { "type": "string", "description": "the preview URL with ?devpocket_preview_code=<one-time code>; visiting it sets the preview cookie and redirects (303) to the URL without the code" },
            "port": { "type": "integer" }, "visibility": { "type": "string", "enum": ["private", "public"] },
            "expires_in": { "type": "integer", "description": "seconds the code may wait to be visited" } })),
        // What the API answers: `api_view` (never the user-data), plus `builtin` and
        // `customized` on GET.
        "Template": object(&["id", "name", "display_name", "description", "category", "tags",
                "default_resources", "environment_variables", "installed_tools", "status", "version",
                "documentation_url", "icon_url"], json!({
            "id": string(), "name": string(), "display_name": string(), "description": string(), "category": string(),
            "tags": { "type": "array", "items": string() }, "default_resources": { "type": "object" },
            "environment_variables": { "type": "object", "additionalProperties": string() },
            "installed_tools": { "type": "array", "items": string() },
            "status": string(), "version": string(), "documentation_url": nullable_string(), "icon_url": nullable_string(),
            "builtin": { "type": "boolean", "description": "shipped with the server" },
            "customized": { "type": "boolean", "description": "an admin's override of a built-in template" } })),
        // What an admin posts: the template file's fields (templates/README.md); unknown fields
        // are refused.
        "TemplateInput": {
            "type": "object",
            "additionalProperties": false,
            "required": ["name", "display_name", "description", "category", "default_resources", "version", "user_data"],
            "properties": {
                "name": { "type": "string", "description": "id: lower-case letters, digits and '-'" },
                "display_name": string(), "description": string(), "category": string(),
                "tags": { "type": "array", "items": string() },
                "default_resources": { "type": "object", "additionalProperties": false,
                    "required": ["cpu", "memory", "storage"],
                    "properties": { "cpu": { "type": ["string", "number"] }, "memory": { "type": ["string", "number"] },
                        "storage": { "type": ["string", "number"] } } },
                "environment_variables": { "type": "object", "additionalProperties": string() },
                "installed_tools": { "type": "array", "items": string() },
                "status": string(), "version": string(),
                "documentation_url": nullable_string(), "icon_url": nullable_string(),
                "docker": { "type": "boolean" }, "local_setup": { "type": "array", "items": string() },
                "user_data": { "type": "string", "description": "minijinja template of a #cloud-config document (bounded: RENDER_FUEL instructions, 16 KiB rendered)" } } },
        "TemplateList": { "type": "array", "items": { "$ref": "#/components/schemas/Template" } },
        "RegionList": { "type": "array", "items": object(&["slug", "name", "available"], json!({
            "slug": string(), "name": string(), "available": { "type": "boolean" }, "features": { "type": "array", "items": string() } })) },
        "SizeList": { "type": "array", "items": object(&["slug", "name", "vcpus", "memory_mb", "disk_gb", "price_monthly", "tier"], json!({
            "slug": string(), "name": string(), "vcpus": { "type": "integer" }, "memory_mb": { "type": "integer" },
            "disk_gb": { "type": "integer" }, "price_monthly": { "type": "number" }, "tier": string() })) },
        "Health": object(&["status", "service", "version"], json!({
            "status": string(), "service": string(), "version": string(),
            "environment": string(), "timestamp": string() })),
        "Liveness": object(&["status"], json!({ "status": { "const": "alive" } })),
        "Readiness": object(&["status", "checks"], json!({ "status": string(), "checks": { "type": "object" },
            "detail": string(), "code": string() })),
        "Info": object(&["name", "version", "features", "plans"], json!({
            "name": string(), "version": string(), "features": { "type": "object" }, "plans": { "type": "object" } })),
    })
}

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": {
        "schema": { "$ref": "#/components/schemas/Error" } } } })
}

/// Every error status `route` can answer, with a description: those of the front end (what every
/// route shares, then what its access, rate class, body, query and path parameters add), then
/// those of its handler.
pub fn error_statuses(route: &Route) -> Vec<(u16, &'static str)> {
    let mut out: Vec<(u16, &'static str)> = Vec::new();
    if route.websocket.is_some() {
        // Refusals after the upgrade are close frames (1008 + reason); before it, only these.
        out.push((400, "Not a WebSocket upgrade (websocket_required)"));
    } else {
        // Every route's body is read (and bounded) before its handler runs.
        out.push((
            400,
            "Malformed request: body not valid JSON or unreadable; or a handler's refusal (see code)",
        ));
        out.push((
            408,
            "The request body did not arrive in time (body_timeout)",
        ));
        out.push((413, "Request body too large (payload_too_large)"));
    }
    out.push((
        503,
        "Unavailable: database, connection cap or a busy resource (see code; Retry-After when known)",
    ));
    if route.rate != RateClass::Exempt {
        out.push((429, "Rate limited; see Retry-After"));
    }
    if route.websocket.is_none() {
        if route.access != Access::Public {
            out.push((401, "Missing, invalid or expired token"));
        }
        if route.access == Access::Admin {
            out.push((403, "Not on the admin plan (admin_required)"));
        }
        if route.body.is_some() || !route.query.is_empty() {
            out.push((422, "Validation error (errors names the fields)"));
        }
        if route.path.contains('{') {
            out.push((404, "Not found"));
        }
    }
    let method = route.method.as_str();
    let env_command = [
        (403, "Plan limit reached (plan_limit)"),
        (404, "Environment not found"),
        (409, "Name taken, or not possible in the current status"),
        (422, "Validation error, or not supported by the provider"),
    ];
    let provider = [
        (404, "Not found at the provider"),
        (
            422,
            "Not supported by the provider (unsupported_by_provider)",
        ),
        (502, "The provider refused (provider_refused)"),
    ];
    let handler: &[(u16, &'static str)] = match (method, route.path) {
        ("POST", "/api/v1/auth/login") => &[
            (401, "Wrong username, e-mail or password"),
            (403, "Account disabled (account_disabled)"),
            (423, "Account locked after failed attempts (account_locked)"),
        ],
        ("POST", "/api/v1/auth/refresh") => &[(401, "Invalid, expired or reused refresh token")],
        ("DELETE", "/api/v1/users/me") => &[
            (400, "`wrong_password`: the password is incorrect"),
            (423, "Locked after failed attempts (account_locked)"),
        ],
        ("PUT", "/api/v1/users/me") => &[(400, "`username_taken`")],
        ("POST", "/api/v1/auth/register") => &[
            (400, "`email_taken` or `username_taken`"),
            (403, "Registration closed (registration_closed)"),
        ],
        ("GET", "/api/v1/environments/{environment_id}/logs") => {
            &[(400, "`invalid_since`: since is not an RFC 3339 time")]
        }
        ("POST", "/api/v1/admin/actors/{actor_id}/crash") => &[
            (400, "`not_supervised`: that actor cannot be crashed"),
            (
                403,
                "Not on the admin plan, or fault injection is off (fault_injection_disabled)",
            ),
        ],
        ("POST", "/api/v1/environments") => &env_command,
        (
            _,
            "/api/v1/environments/{environment_id}"
            | "/api/v1/environments/{environment_id}/start"
            | "/api/v1/environments/{environment_id}/stop"
            | "/api/v1/environments/{environment_id}/restart"
            | "/api/v1/environments/{environment_id}/recover"
            | "/api/v1/environments/{environment_id}/snapshot"
            | "/api/v1/environments/{environment_id}/snapshots/{snapshot_id}/restore"
            | "/api/v1/environments/{environment_id}/resize",
        ) if method != "GET" => &env_command,
        ("GET", "/api/v1/environments/{environment_id}/snapshots") => &provider,
        ("POST", "/api/v1/templates") => &[(409, "Template id taken (template_exists)")],
        ("DELETE", "/api/v1/templates/{template_id}") => &[(
            409,
            "A built-in template cannot be deleted (builtin_template)",
        )],
        _ => &[],
    };
    // The handler's answers: those declared in the route table (`Route::errors`) win, then those
    // known here; either replaces the generic description of the same status.
    // Whether an entry already has a handler's description.
    let mut specific = vec![false; out.len()];
    for &(status, description) in route.errors.iter().chain(handler) {
        match out.iter().position(|(s, _)| *s == status) {
            Some(i) if !specific[i] => {
                out[i].1 = description;
                specific[i] = true;
            }
            Some(_) => {}
            None => {
                out.push((status, description));
                specific.push(true);
            }
        }
    }
    out.sort_by_key(|(s, _)| *s);
    out
}

fn operation(route: &super::router::Route, schemas: &Value) -> Value {
    let mut parameters: Vec<Value> = route
        .path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
        .collect();
    parameters.extend(route.query.iter().map(|(name, description)| {
        json!({ "name": name, "in": "query", "required": false, "description": description,
                "schema": { "type": "string" } })
    }));
    let (status, shape) = route.ok;
    let ok = if schemas.get(shape).is_some() {
        json!({ "description": shape, "content": { "application/json": {
            "schema": { "$ref": format!("#/components/schemas/{shape}") } } } })
    } else {
        json!({ "description": shape })
    };
    let mut responses = Map::new();
    responses.insert(status.to_string(), ok);
    for (status, description) in error_statuses(route) {
        let answer = if route.path == "/health/ready" && status == 503 {
            json!({ "description": description, "content": { "application/json": {
                "schema": { "$ref": "#/components/schemas/Readiness" } } } })
        } else {
            error_response(description)
        };
        responses.entry(status.to_string()).or_insert(answer);
    }
    let mut op = json!({
        "summary": route.summary,
        "tags": [route.tag],
        "operationId": format!("{}_{}", route.method.as_str().to_lowercase(),
            route.path.trim_start_matches('/').replace(['/', '-', '.'], "_").replace(['{', '}'], "")),
        "parameters": parameters,
        "responses": responses,
    });
    if route.streamed_body {
        op["requestBody"] = json!({ "required": true, "content": { "application/octet-stream": {
            "schema": { "type": "string", "format": "binary" } } } });
    }
    if let Some(body) = route.body {
        op["requestBody"] = json!({ "required": true, "content": { "application/json": {
            "schema": { "$ref": format!("#/components/schemas/{body}") } } } });
    }
    if route.websocket.is_some() {
        // Authenticated on the socket by `?token=`; refusals are close frames (1008 + reason).
        op["security"] = json!([{ "token": [] }]);
        op["x-websocket"] = json!(true);
    } else if route.access != Access::Public {
        op["security"] = json!([{ "bearer": [] }]);
    }
    op
}

/// The file API's shapes (`/environments/{id}/files`).
fn file_schemas() -> Value {
    let entry = object(
        &["name", "path", "type", "size", "mode", "modified"],
        json!({
            "name": string(),
            "path": { "type": "string", "description": "relative to the environment's home (\"\" is the home)" },
            "type": { "type": "string", "enum": ["file", "directory", "symlink", "other"] },
            "size": { "type": "integer", "description": "bytes" },
            "mode": { "type": "string", "description": "permission bits in octal, e.g. 0644" },
            "modified": { "type": ["string", "null"], "format": "date-time" },
            "etag": { "type": "string", "description": "files only: the ETag for If-Match (size and modification time)" },
        }),
    );
    json!({
        "FileEntry": entry,
        "DirectoryListing": object(&["path", "type", "entries", "offset", "limit", "total", "truncated"], json!({
            "path": string(),
            "type": { "const": "directory" },
            "entries": { "type": "array", "items": { "$ref": "#/components/schemas/FileEntry" } },
            "offset": { "type": "integer" },
            "limit": { "type": "integer" },
            "total": { "type": "integer", "description": "entries read (sorted by name, then paged)" },
            "truncated": { "type": "boolean", "description": "the directory has more than files.max_list_entries entries; only that many were read" },
        })),
        "MkdirRequest": object(&["path"], json!({
            "path": { "type": "string", "description": "relative to the environment's home" },
            "parents": { "type": "boolean", "description": "create missing parents too; an existing directory is then 200" },
        })),
        "MoveRequest": object(&["from", "to"], json!({
            "from": string(),
            "to": { "type": "string", "description": "must not exist" },
        })),
    })
}

fn build() -> Value {
    let mut schemas = schemas();
    if let (Some(all), Value::Object(files)) = (schemas.as_object_mut(), file_schemas()) {
        all.extend(files);
    }
    let mut paths = Map::new();
    for route in ROUTER.routes() {
        let entry = paths
            .entry(route.path.to_string())
            .or_insert_with(|| json!({}));
        entry[route.method.as_str().to_lowercase()] = operation(route, &schemas);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": SERVICE,
            "version": VERSION,
            "description": "DevPocket Server: accounts, development environments and terminals for the mobile app. Paths also match with a trailing slash.\n\nPort previews are not API routes: a request whose Host is {port}--{environment_id}.<server.preview_domain> (or, only when server.preview_path_based is on, whose path starts /preview/{environment_id}/{port}/) is proxied to that port inside the environment over SSH — HTTP with streaming bodies (server-sent events included) and WebSocket upgrades, the app's own response headers, Host and X-Forwarded-For/-Host/-Proto (and -Prefix) set. A private port needs the devpocket_preview cookie (from the one-time URL of POST .../ports/{port}/open; ended by logout); a public one answers anyone. Open streams and WebSockets re-check their access every 5 seconds and are closed once it ends (logout, a port made private). The proxy's own answers are small HTML pages: 401 private or expired link, 404 no such preview, 429 over server.preview_per_minute, 502 nothing listening (or not the environment's port), 503 environment not running, 504 no response head in time.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": "access token (login, register, refresh). Refused (401) as soon as its session ends: at once on the node that ended it (logout, a revoked session, a password change, account deletion), and on every other node, or after a change through the devpocket CLI, within auth.session_cache_seconds (default 2 s), the time a node trusts the session and account it read" },
                "token": { "type": "apiKey", "in": "query", "name": "token", "description": "access token, for WebSockets" },
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_and_every_reference_resolves() {
        let doc = &*DOCUMENT;
        for route in ROUTER.routes() {
            let op = &doc["paths"][route.path][route.method.as_str().to_lowercase()];
            assert!(op.is_object(), "{} {} missing", route.method, route.path);
        }
        let text = doc.to_string();
        for piece in text.split("#/components/schemas/").skip(1) {
            let name: String = piece.chars().take_while(|c| c.is_alphanumeric()).collect();
            assert!(
                doc["components"]["schemas"][&name].is_object(),
                "dangling ref {name}"
            );
        }
    }

    #[test]
    fn every_route_documents_the_statuses_it_can_answer() {
        let doc = &*DOCUMENT;
        for route in ROUTER.routes() {
            let op = &doc["paths"][route.path][route.method.as_str().to_lowercase()];
            let name = format!("{} {}", route.method, route.path);
            let has = |status: &str| op["responses"][status].is_object();
            assert!(has(&route.ok.0.to_string()), "{name}: success");
            assert!(has("503"), "{name}: 503");
            if route.websocket.is_some() {
                assert!(has("400"), "{name}: 400 websocket_required");
                continue;
            }
            for status in ["400", "408", "413"] {
                assert!(has(status), "{name}: {status} (every body is read)");
            }
            if route.access != Access::Public {
                assert!(has("401"), "{name}: authenticated routes document 401");
            }
            if route.access == Access::Admin {
                assert!(has("403"), "{name}: admin routes document 403");
            }
            if route.body.is_some() || !route.query.is_empty() {
                assert!(has("422"), "{name}: a body or query documents 422");
            }
            if route.path.contains('{') {
                assert!(has("404"), "{name}: path parameters document 404");
            }
            if route.rate != RateClass::Exempt {
                assert!(has("429"), "{name}: rate-limited routes document 429");
            }
            for (status, answer) in op["responses"].as_object().expect("responses") {
                if status.starts_with('4') || status.starts_with('5') {
                    assert!(
                        answer["content"]["application/json"]["schema"]["$ref"].is_string(),
                        "{name} {status}: error answers have a schema"
                    );
                }
            }
        }
    }

    #[test]
    fn template_schemas_match_what_is_served_and_accepted() {
        let schemas = &DOCUMENT["components"]["schemas"];
        let view = crate::templates::builtin()[0].api_view();
        for field in schemas["Template"]["required"]
            .as_array()
            .expect("required")
        {
            let field = field.as_str().expect("name");
            assert!(
                view.get(field).is_some(),
                "Template.{field} is required but not served"
            );
        }
        assert!(view.get("user_data").is_none());
        let input = serde_json::to_value(&crate::templates::builtin()[0]).expect("template");
        for field in input.as_object().expect("object").keys() {
            assert!(
                schemas["TemplateInput"]["properties"][field].is_object(),
                "TemplateInput lacks {field}"
            );
        }
    }

    #[test]
    fn google_routes_document_every_answer() {
        let doc = &*DOCUMENT;
        let answers = |path: &str, method: &str| -> Vec<String> {
            doc["paths"][path][method]["responses"]
                .as_object()
                .map(|r| r.keys().cloned().collect())
                .unwrap_or_default()
        };
        assert_eq!(
            answers("/api/v1/users/me/google", "post"),
            [
                "200", "400", "401", "408", "409", "413", "422", "429", "503"
            ]
        );
        assert_eq!(
            answers("/api/v1/users/me/google", "delete"),
            ["200", "400", "401", "408", "409", "413", "429", "503"]
        );
        assert_eq!(
            answers("/api/v1/auth/google", "post"),
            [
                "200", "400", "401", "403", "408", "409", "413", "422", "423", "429", "503"
            ]
        );
        let unlink = &doc["paths"]["/api/v1/users/me/google"]["delete"]["responses"]["409"];
        assert!(
            unlink["description"]
                .as_str()
                .is_some_and(|d| d.contains("last_sign_in_method"))
        );
    }
}
