//! The OpenAPI 3.1 document, generated from the route table (so every route that exists is in
//! it, and nothing else) plus the schemas of the bodies it names.

use std::sync::LazyLock;

use serde_json::{Map, Value, json};

use super::router::{Access, ROUTER};
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
            "code": string(),
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
        "ActorTree": object(&["actors"], json!({
            "actors": { "type": "array", "items": { "$ref": "#/components/schemas/Actor" } },
            "live_by_kind": { "type": "object" }, "restarts_by_kind": { "type": "object" } })),
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
        "MetricsSample": object(&["cpu_usage", "memory_usage", "disk_usage", "network_in", "network_out", "uptime", "timestamp"], json!({
            "cpu_usage": { "type": "number" }, "memory_usage": { "type": "number" }, "disk_usage": { "type": "number" },
            "network_in": { "type": "integer" }, "network_out": { "type": "integer" }, "uptime": { "type": "integer" },
            "timestamp": string() })),
        "Logs": object(&["environment_id", "environment_name", "logs", "total_lines", "has_more"], json!({
            "environment_id": string(), "environment_name": string(),
            "logs": { "type": "array", "items": object(&["timestamp", "level", "message", "source"], json!({
                "timestamp": string(), "level": string(), "message": string(), "source": string() })) },
            "total_lines": { "type": "integer" }, "has_more": { "type": "boolean" } })),
        "Template": object(&["name", "display_name", "user_data"], json!({
            "name": string(), "display_name": string(), "description": string(), "category": string(),
            "tags": { "type": "array", "items": string() }, "default_resources": { "type": "object" },
            "environment_variables": { "type": "object" }, "installed_tools": { "type": "array", "items": string() },
            "status": string(), "version": string(), "documentation_url": nullable_string(), "icon_url": nullable_string(),
            "docker": { "type": "boolean" }, "local_setup": { "type": "array", "items": string() },
            "user_data": { "type": "string", "description": "minijinja template of a #cloud-config document" } })),
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
        "Readiness": object(&["status", "checks"], json!({ "status": string(), "checks": { "type": "object" } })),
        "Info": object(&["name", "version", "features", "plans"], json!({
            "name": string(), "version": string(), "features": { "type": "object" }, "plans": { "type": "object" } })),
    })
}

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": {
        "schema": { "$ref": "#/components/schemas/Error" } } } })
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
    if route.body.is_some() || !route.query.is_empty() {
        responses.insert("422".into(), error_response("Validation error"));
    }
    if route.access != Access::Public {
        responses.insert(
            "401".into(),
            error_response("Missing, invalid or expired token"),
        );
    }
    if route.access == Access::Admin {
        responses.insert("403".into(), error_response("Not on the admin plan"));
    }
    if route.rate != super::limits::RateClass::Exempt {
        responses.insert(
            "429".into(),
            error_response("Rate limited; see Retry-After"),
        );
    }
    // Route-specific answers last: their descriptions are the more precise.
    for (code, description) in route.errors {
        responses.insert(code.to_string(), error_response(description));
    }
    let mut op = json!({
        "summary": route.summary,
        "tags": [route.tag],
        "operationId": format!("{}_{}", route.method.as_str().to_lowercase(),
            route.path.trim_start_matches('/').replace(['/', '-', '.'], "_").replace(['{', '}'], "")),
        "parameters": parameters,
        "responses": responses,
    });
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

fn build() -> Value {
    let schemas = schemas();
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
            "description": "DevPocket Server: accounts, development environments and terminals for the mobile app. Paths also match with a trailing slash.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" },
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
            ["200", "401", "409", "422", "429", "503"]
        );
        assert_eq!(
            answers("/api/v1/users/me/google", "delete"),
            ["200", "401", "409", "429"]
        );
        assert_eq!(
            answers("/api/v1/auth/google", "post"),
            ["200", "401", "403", "409", "422", "423", "429", "503"]
        );
        let unlink = &doc["paths"]["/api/v1/users/me/google"]["delete"]["responses"]["409"];
        assert!(
            unlink["description"]
                .as_str()
                .is_some_and(|d| d.contains("last_sign_in_method"))
        );
    }
}
