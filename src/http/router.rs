//! The route table: one entry per method and path, with what it needs (access, rate class) and
//! what it documents (summary, body, answers). Matching tolerates a trailing slash. The OpenAPI
//! document is generated from this same table, so it cannot drift from what exists.

use std::sync::LazyLock;

use futures_util::future::BoxFuture;
use http::{Method, Response};

use super::handlers::{admin, auth, environments as env, files, health, ports, templates, users};
use super::limits::RateClass;
use super::{Body, Ctx};
use crate::app::AppState;
use crate::error::ApiResult;

pub type Handler = fn(AppState, Ctx) -> BoxFuture<'static, ApiResult<Response<Body>>>;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    /// A valid access token of a live session.
    User,
    /// As `User`, on the admin plan.
    Admin,
}

pub struct Route {
    pub method: Method,
    /// matchit pattern, `{name}` for a parameter.
    pub path: &'static str,
    pub handler: Handler,
    pub access: Access,
    pub rate: RateClass,
    pub tag: &'static str,
    pub summary: &'static str,
    /// Name of the request body schema in the OpenAPI components, if it takes one.
    pub body: Option<&'static str>,
    /// Query parameters: (name, description).
    pub query: &'static [(&'static str, &'static str)],
    /// Success status and the response schema name (or a description).
    pub ok: (u16, &'static str),
    /// Route-specific error answers: (status, description naming the `code`s). The generic ones
    /// (422 for a body or query, 401 for a token, 403 admin, 429 rate) are added by the OpenAPI
    /// generator from the other fields.
    pub errors: &'static [(u16, &'static str)],
    /// A WebSocket endpoint: upgraded, authenticated by `?token=`.
    pub websocket: Option<super::ws::WsKind>,
    /// The body is not read up to `server.max_body_bytes` but handed to the handler unread
    /// (`Ctx::stream`), which bounds it itself (file uploads).
    pub streamed_body: bool,
}

macro_rules! handler {
    ($f:path) => {
        |app, ctx| Box::pin($f(app, ctx))
    };
}

#[allow(clippy::too_many_arguments)]
fn route(
    method: Method,
    path: &'static str,
    handler: Handler,
    access: Access,
    rate: RateClass,
    tag: &'static str,
    summary: &'static str,
    body: Option<&'static str>,
    ok: (u16, &'static str),
) -> Route {
    Route {
        method,
        path,
        handler,
        access,
        rate,
        tag,
        summary,
        body,
        query: &[],
        ok,
        errors: &[],
        websocket: None,
        streamed_body: false,
    }
}

fn websocket(
    path: &'static str,
    kind: super::ws::WsKind,
    summary: &'static str,
    query: &'static [(&'static str, &'static str)],
) -> Route {
    Route {
        query,
        websocket: Some(kind),
        ..route(
            Method::GET,
            path,
            handler!(health::not_a_websocket),
            Access::Public,
            RateClass::Api,
            "websockets",
            summary,
            None,
            (101, "Switching Protocols (WebSocket)"),
        )
    }
}

fn routes() -> Vec<Route> {
    use Access::*;
    use RateClass::*;
    let get = Method::GET;
    let post = Method::POST;
    let put = Method::PUT;
    let delete = Method::DELETE;
    let mut all = vec![
        route(
            get.clone(),
            "/health",
            handler!(health::health),
            Public,
            Exempt,
            "health",
            "Service health",
            None,
            (200, "Health"),
        ),
        route(
            get.clone(),
            "/health/live",
            handler!(health::live),
            Public,
            Exempt,
            "health",
            "Liveness probe",
            None,
            (200, "Liveness"),
        ),
        route(
            get.clone(),
            "/health/ready",
            handler!(health::ready),
            Public,
            Exempt,
            "health",
            "Readiness probe (database, this node's heartbeat, supervisors): 503 names the failing check",
            None,
            (200, "Readiness"),
        ),
        route(
            get.clone(),
            "/metrics",
            handler!(health::metrics),
            Public,
            Exempt,
            "health",
            "Prometheus metrics (text exposition)",
            None,
            (200, "text/plain"),
        ),
        route(
            get.clone(),
            "/api/v1/info",
            handler!(health::info),
            Public,
            Api,
            "health",
            "Server name, version, features and plan limits",
            None,
            (200, "Info"),
        ),
        route(
            get.clone(),
            "/api/v1/openapi.json",
            handler!(health::openapi),
            Public,
            Api,
            "health",
            "This OpenAPI document",
            None,
            (200, "OpenAPI document"),
        ),
        route(
            post.clone(),
            "/api/v1/auth/register",
            handler!(auth::register),
            Public,
            Credentials,
            "auth",
            "Create an account; answers with tokens",
            Some("RegisterRequest"),
            (201, "AuthResponse"),
        ),
        route(
            post.clone(),
            "/api/v1/auth/login",
            handler!(auth::login),
            Public,
            Credentials,
            "auth",
            "Sign in with username or e-mail and password",
            Some("LoginRequest"),
            (200, "AuthResponse"),
        ),
        Route {
            errors: &[
                (
                    401,
                    "Invalid Google token, or (`unauthorized`) its e-mail is not verified by Google and it matches no linked account",
                ),
                (
                    403,
                    "`account_disabled`, or `registration_closed` when a new account would be created",
                ),
                (
                    409,
                    "`google_already_linked`: the verified account with this e-mail is linked to a different Google account; `google_linked_elsewhere`: linked to another account meanwhile",
                ),
                (
                    423,
                    "`account_locked` (with Retry-After), checked before anything is linked or claimed",
                ),
                (
                    503,
                    "`google_not_configured`, or `google_unavailable` when Google's keys cannot be fetched",
                ),
            ],
            ..route(
                post.clone(),
                "/api/v1/auth/google",
                handler!(auth::google),
                Public,
                Credentials,
                "auth",
                "Sign in with a Google ID token. Matches by Google id, else by the e-mail when Google verified it: an account whose e-mail we verified is linked; one whose e-mail we never verified is claimed (its password removed, every session revoked, e-mail marked verified, audited as account_claimed); else a new account is created",
                Some("GoogleRequest"),
                (200, "AuthResponse"),
            )
        },
        route(
            post.clone(),
            "/api/v1/auth/refresh",
            handler!(auth::refresh),
            Public,
            Credentials,
            "auth",
            "Rotate a refresh token; reuse of a spent one ends the session",
            Some("RefreshRequest"),
            (200, "AuthResponse"),
        ),
        route(
            post.clone(),
            "/api/v1/auth/logout",
            handler!(auth::logout),
            User,
            Api,
            "auth",
            "End this session at once",
            None,
            (200, "Message"),
        ),
        route(
            get.clone(),
            "/api/v1/auth/me",
            handler!(auth::me),
            User,
            Api,
            "auth",
            "The signed-in user",
            None,
            (200, "UserResponse"),
        ),
        route(
            get.clone(),
            "/api/v1/users/me",
            handler!(users::profile),
            User,
            Api,
            "users",
            "Profile with session counts",
            None,
            (200, "ProfileResponse"),
        ),
        route(
            put.clone(),
            "/api/v1/users/me",
            handler!(users::update_profile),
            User,
            Api,
            "users",
            "Change full name, username or avatar",
            Some("ProfileUpdate"),
            (200, "UserResponse"),
        ),
        route(
            delete.clone(),
            "/api/v1/users/me",
            handler!(users::delete_account),
            User,
            Api,
            "users",
            "Delete the account (password required)",
            Some("DeleteAccountRequest"),
            (200, "Message"),
        ),
        Route {
            errors: &[
                (400, "`wrong_password`: current_password is incorrect"),
                (409, "`invalid_state`: the password was changed meanwhile"),
                (423, "`account_locked`: too many wrong current passwords"),
                (503, "`auth_busy`: the password hashing queue is full"),
            ],
            ..route(
                post.clone(),
                "/api/v1/users/me/password",
                handler!(users::change_password),
                User,
                Api,
                "users",
                "Change the password (current_password required), or set one on an account that has none (a Google account); every other session ends",
                Some("PasswordChange"),
                (200, "Message"),
            )
        },
        Route {
            errors: &[
                (401, "Invalid Google token (or the session has ended)"),
                (
                    409,
                    "`google_linked_elsewhere`: that Google account is linked to another account; `google_already_linked`: this account has a different one (unlink it first)",
                ),
                (
                    503,
                    "`google_not_configured`, or `google_unavailable` when Google's keys cannot be fetched",
                ),
            ],
            ..route(
                post.clone(),
                "/api/v1/users/me/google",
                handler!(users::link_google),
                User,
                Api,
                "users",
                "Link a Google account (by ID token) to this account; the e-mail is marked verified when it is the account's and Google verified it. Linking the same one again answers 200",
                Some("GoogleRequest"),
                (200, "UserResponse"),
            )
        },
        Route {
            errors: &[(
                409,
                "`last_sign_in_method`: the account has no password, so unlinking would leave no way to sign in (set a password first); `google_not_linked`: none is linked",
            )],
            ..route(
                delete.clone(),
                "/api/v1/users/me/google",
                handler!(users::unlink_google),
                User,
                Api,
                "users",
                "Unlink the Google account",
                None,
                (200, "UserResponse"),
            )
        },
        route(
            get.clone(),
            "/api/v1/users/me/sessions",
            handler!(users::list_sessions),
            User,
            Api,
            "users",
            "Live login sessions",
            None,
            (200, "SessionList"),
        ),
        route(
            delete.clone(),
            "/api/v1/users/me/sessions/{session_id}",
            handler!(users::revoke_session),
            User,
            Api,
            "users",
            "Revoke one session",
            None,
            (200, "Message"),
        ),
        Route {
            query: &[(
                "keep_current",
                "true to keep the calling session alive (default false)",
            )],
            ..route(
                post.clone(),
                "/api/v1/users/me/sessions/revoke-all",
                handler!(users::revoke_all),
                User,
                Api,
                "users",
                "Revoke every session (log out everywhere)",
                None,
                (200, "RevokedCount"),
            )
        },
        Route {
            query: &[
                (
                    "status",
                    "only environments in this status (also status_filter)",
                ),
                ("status_filter", "alias of status"),
            ],
            ..route(
                get.clone(),
                "/api/v1/environments",
                handler!(env::list),
                User,
                Api,
                "environments",
                "Your environments",
                None,
                (200, "EnvironmentList"),
            )
        },
        route(
            post.clone(),
            "/api/v1/environments",
            handler!(env::create),
            User,
            Api,
            "environments",
            "Create an environment (provisioning continues in its actor)",
            Some("CreateEnvironment"),
            (201, "EnvironmentResponse"),
        ),
        route(
            get.clone(),
            "/api/v1/environments/{environment_id}",
            handler!(env::get),
            User,
            Api,
            "environments",
            "One environment",
            None,
            (200, "EnvironmentResponse"),
        ),
        route(
            put.clone(),
            "/api/v1/environments/{environment_id}",
            handler!(env::update),
            User,
            Api,
            "environments",
            "Rename or change variables",
            Some("UpdateEnvironment"),
            (200, "EnvironmentResponse"),
        ),
        route(
            delete.clone(),
            "/api/v1/environments/{environment_id}",
            handler!(env::delete),
            User,
            Api,
            "environments",
            "Delete: deleting, then terminated (the row stays)",
            None,
            (202, "CommandAccepted"),
        ),
        route(
            post.clone(),
            "/api/v1/environments/{environment_id}/start",
            handler!(env::start),
            User,
            Api,
            "environments",
            "Start a stopped environment",
            None,
            (202, "CommandAccepted"),
        ),
        route(
            post.clone(),
            "/api/v1/environments/{environment_id}/stop",
            handler!(env::stop),
            User,
            Api,
            "environments",
            "Stop a running environment",
            None,
            (202, "CommandAccepted"),
        ),
        route(
            post.clone(),
            "/api/v1/environments/{environment_id}/restart",
            handler!(env::restart),
            User,
            Api,
            "environments",
            "Restart",
            None,
            (202, "CommandAccepted"),
        ),
        route(
            post.clone(),
            "/api/v1/environments/{environment_id}/recover",
            handler!(env::recover),
            User,
            Api,
            "environments",
            "Resume an environment in error from the phase that failed",
            None,
            (202, "CommandAccepted"),
        ),
        route(
            post.clone(),
            "/api/v1/environments/{environment_id}/snapshot",
            handler!(env::snapshot),
            User,
            Api,
            "environments",
            "Take a snapshot",
            Some("SnapshotRequest"),
            (201, "CommandAccepted"),
        ),
        route(
            get.clone(),
            "/api/v1/environments/{environment_id}/snapshots",
            handler!(env::snapshots),
            User,
            Api,
            "environments",
            "Snapshots at the provider",
            None,
            (200, "SnapshotList"),
        ),
        route(
            post.clone(),
            "/api/v1/environments/{environment_id}/snapshots/{snapshot_id}/restore",
            handler!(env::restore),
            User,
            Api,
            "environments",
            "Roll back to a snapshot",
            None,
            (202, "CommandAccepted"),
        ),
        route(
            post.clone(),
            "/api/v1/environments/{environment_id}/resize",
            handler!(env::resize),
            User,
            Api,
            "environments",
            "Change size (422 unsupported_by_provider where the provider cannot)",
            Some("ResizeRequest"),
            (202, "CommandAccepted"),
        ),
        route(
            get.clone(),
            "/api/v1/commands/{command_id}",
            handler!(env::command),
            User,
            Api,
            "environments",
            "A command carried to the node that runs its environment: its state and outcome (the id a 504 command_timeout names)",
            None,
            (200, "CarriedCommand"),
        ),
        route(
            get.clone(),
            "/api/v1/environments/{environment_id}/terminals",
            handler!(env::terminals),
            User,
            Api,
            "environments",
            "Live terminals on every node, each with its node and size (this node's with a plain-text snapshot of the screen)",
            None,
            (200, "Terminals"),
        ),
        Route {
            query: &[("hours", "1-168 (default 1)")],
            ..route(
                get.clone(),
                "/api/v1/environments/{environment_id}/metrics",
                handler!(env::metrics),
                User,
                Api,
                "environments",
                "CPU, memory, disk, network sampled from the environment",
                None,
                (200, "Metrics"),
            )
        },
        Route {
            query: &[
                ("lines", "1-1000 (default 100)"),
                ("since", "RFC 3339 time"),
            ],
            ..route(
                get.clone(),
                "/api/v1/environments/{environment_id}/logs",
                handler!(env::logs),
                User,
                Api,
                "environments",
                "Status changes and installation output",
                None,
                (200, "Logs"),
            )
        },
        Route {
            errors: &[
                (409, "`environment_not_running`"),
                (
                    503,
                    "`environment_unreachable`: the ports could not be sampled over SSH",
                ),
            ],
            ..route(
                get.clone(),
                "/api/v1/environments/{environment_id}/ports",
                handler!(ports::list),
                User,
                Api,
                "previews",
                "TCP ports listening inside the environment (its own account's sockets, sampled over SSH), each with its preview URL and visibility",
                None,
                (200, "PortList"),
            )
        },
        Route {
            query: &[(
                "path_based",
                "true: a path-based URL on the API's origin (only when server.preview_path_based is on)",
            )],
            errors: &[(422, "`validation_error`: port is not 1-65535")],
            ..route(
                post.clone(),
                "/api/v1/environments/{environment_id}/ports/{port}/open",
                handler!(ports::open),
                User,
                Api,
                "previews",
                "A preview URL with a one-time code (2 minutes): visiting it sets a cookie for that preview's host (HttpOnly, SameSite=Lax) valid server.preview_cookie_hours or until this session ends",
                None,
                (200, "PreviewOpen"),
            )
        },
        Route {
            errors: &[(
                422,
                "`validation_error`: port is not 1-65535 or visibility is not public/private",
            )],
            ..route(
                put.clone(),
                "/api/v1/environments/{environment_id}/ports/{port}",
                handler!(ports::set_visibility),
                User,
                Api,
                "previews",
                "Make a port public (anyone with its URL) or private (the owner's browser only)",
                Some("PortVisibility"),
                (200, "Port"),
            )
        },
        Route {
            query: &[("category", "only this category")],
            ..route(
                get.clone(),
                "/api/v1/templates",
                handler!(templates::list),
                Public,
                Api,
                "templates",
                "Environment templates",
                None,
                (200, "TemplateList"),
            )
        },
        route(
            post.clone(),
            "/api/v1/templates",
            handler!(templates::create),
            Admin,
            Api,
            "templates",
            "Add a template (validated)",
            Some("TemplateInput"),
            (201, "Template"),
        ),
        route(
            get.clone(),
            "/api/v1/templates/{template_id}",
            handler!(templates::get),
            Public,
            Api,
            "templates",
            "One template",
            None,
            (200, "Template"),
        ),
        route(
            put.clone(),
            "/api/v1/templates/{template_id}",
            handler!(templates::replace),
            Admin,
            Api,
            "templates",
            "Replace a template (built-ins are restored at start)",
            Some("TemplateInput"),
            (200, "Template"),
        ),
        route(
            delete.clone(),
            "/api/v1/templates/{template_id}",
            handler!(templates::delete),
            Admin,
            Api,
            "templates",
            "Remove an admin-added template",
            None,
            (200, "Message"),
        ),
        route(
            get.clone(),
            "/api/v1/regions",
            handler!(env::regions),
            Public,
            Api,
            "environments",
            "Regions of the configured provider",
            None,
            (200, "RegionList"),
        ),
        route(
            get.clone(),
            "/api/v1/sizes",
            handler!(env::sizes),
            Public,
            Api,
            "environments",
            "Sizes of the configured provider",
            None,
            (200, "SizeList"),
        ),
        websocket(
            "/api/v1/ws/terminal/{environment_id}",
            super::ws::WsKind::Terminal,
            "Terminal WebSocket (JSON text frames: input/resize/ping/ack → welcome/output/pong/error/info/exit); resumable",
            &[
                ("token", "access token"),
                (
                    "terminal_id",
                    "resume this terminal (one of another node: a new terminal on the same tmux session, with an info frame)",
                ),
                ("offset", "last output offset received"),
                ("cols", "terminal width"),
                ("rows", "terminal height"),
            ],
        ),
        websocket(
            "/api/v1/ws/logs/{environment_id}",
            super::ws::WsKind::Logs,
            "Environment log WebSocket: history, then live events",
            &[
                ("token", "access token"),
                ("follow", "false: close after the history"),
            ],
        ),
        websocket(
            "/api/v1/ws/events",
            super::ws::WsKind::Events,
            "Status changes of all your environments, live",
            &[("token", "access token")],
        ),
        route(
            get.clone(),
            "/api/v1/admin/actors",
            handler!(admin::actors),
            Admin,
            Api,
            "admin",
            "The live supervision tree of this node, and every node on the database with its heartbeat",
            None,
            (200, "ActorTree"),
        ),
        route(
            post.clone(),
            "/api/v1/admin/actors/{actor_id}/crash",
            handler!(admin::crash),
            Admin,
            Api,
            "admin",
            "Fault injection: make an actor panic (ops.fault_injection only)",
            None,
            (202, "Message"),
        ),
        Route {
            query: &[
                ("event", "only this event (e.g. login_failed)"),
                ("user_id", "only events about this user"),
                ("since", "RFC 3339 time, inclusive"),
                ("until", "RFC 3339 time, exclusive"),
                ("limit", "page size, 1-500 (default 50)"),
                ("offset", "events to skip (default 0)"),
            ],
            ..route(
                get,
                "/api/v1/admin/audit",
                handler!(admin::audit),
                Admin,
                Api,
                "admin",
                "Audit events, newest first",
                None,
                (200, "AuditPage"),
            )
        },
    ];
    all.extend(file_routes());
    all
}

/// `/api/v1/environments/{id}/files`: the file API (issue 13), over SFTP as the environment's
/// own account (see `handlers::files`).
fn file_routes() -> Vec<Route> {
    use Access::*;
    use RateClass::*;
    const FILES: &str = "/api/v1/environments/{environment_id}/files";
    const NOT_RUNNING: (u16, &str) = (
        409,
        "`environment_not_running`; `file_exists`, `is_a_directory`, `not_a_directory`, `directory_not_empty` or `file_operation_failed` (the environment refused: e.g. its disk is full)",
    );
    const PATH: (u16, &str) = (
        422,
        "`invalid_path`: empty, not UTF-8, with a NUL byte, too long, or outside the environment's home (`..` above it, an absolute path elsewhere); `validation_error` for a bad query or body",
    );
    const DENIED: (u16, &str) = (
        403,
        "`file_access_denied`: the environment's own account may not do this (the operating system refused it: e.g. a symlink to a place it cannot read)",
    );
    const UNREACHABLE: (u16, &str) = (
        503,
        "`environment_unreachable` (with Retry-After): SSH or SFTP to the environment failed; `environment_busy`",
    );
    const BUSY: (u16, &str) = (
        429,
        "`rate_limited`, or `too_many_file_operations` (with Retry-After): the caller already runs `files.max_operations_per_user` file operations (downloads count until sent)",
    );
    vec![
        Route {
            query: &[
                (
                    "path",
                    "file or directory, relative to the environment's home (default: the home); an absolute path must lie inside it",
                ),
                ("offset", "directory listing: entries to skip (default 0)"),
                (
                    "limit",
                    "directory listing: entries per page, 1-1000 (default 200)",
                ),
            ],
            errors: &[
                DENIED,
                (404, "`not_found`: the environment, or nothing at `path`"),
                NOT_RUNNING,
                (
                    412,
                    "`precondition_failed`: `If-Match` names another version",
                ),
                (
                    416,
                    "`range_not_satisfiable` (with `Content-Range: bytes */size`)",
                ),
                PATH,
                UNREACHABLE,
                BUSY,
            ],
            ..route(
                Method::GET,
                FILES,
                handler!(files::get),
                User,
                Api,
                "files",
                "A directory's listing (DirectoryListing, sorted by name, paged; at most `files.max_list_entries` are read) or a file's bytes: streamed, with `ETag`, `Last-Modified`, a content type guessed from its name, `Range` (one range: 206 with `Content-Range`) and `If-None-Match` (304)",
                None,
                (200, "DirectoryListing"),
            )
        },
        Route {
            query: &[("path", "the file, relative to the environment's home")],
            errors: &[
                DENIED,
                (
                    404,
                    "`not_found`: the environment, or the directory the file goes in",
                ),
                NOT_RUNNING,
                (
                    412,
                    "`precondition_failed`: `If-Match` does not name the current version (or there is none), or `If-None-Match: *` and the file exists",
                ),
                (
                    413,
                    "`payload_too_large`: over `files.max_upload_bytes` (nothing is left behind)",
                ),
                PATH,
                UNREACHABLE,
                BUSY,
            ],
            streamed_body: true,
            ..route(
                Method::PUT,
                FILES,
                handler!(files::put),
                User,
                Api,
                "files",
                "Upload a file (raw bytes, any content type): streamed into a temporary file next to it with bounded memory and renamed over `path` at the end, so readers never see half a file. The one route exempt from `server.max_body_bytes`; its limit is `files.max_upload_bytes`. `If-Match: <etag>` replaces only that version; `If-None-Match: *` creates only. 201 when created, 200 when replaced; audited (file_written)",
                None,
                (201, "FileEntry"),
            )
        },
        Route {
            query: &[(
                "path",
                "the file or empty directory, relative to the environment's home",
            )],
            errors: &[
                DENIED,
                (404, "`not_found`: the environment, or nothing at `path`"),
                NOT_RUNNING,
                (
                    412,
                    "`precondition_failed`: `If-Match` does not name the current version",
                ),
                PATH,
                UNREACHABLE,
                BUSY,
            ],
            ..route(
                Method::DELETE,
                FILES,
                handler!(files::delete),
                User,
                Api,
                "files",
                "Delete a file, a symlink (not what it points to) or an empty directory; audited (file_deleted)",
                None,
                (200, "Message"),
            )
        },
        Route {
            errors: &[
                DENIED,
                (404, "`not_found`: the environment, or the parent directory"),
                NOT_RUNNING,
                PATH,
                UNREACHABLE,
                BUSY,
            ],
            ..route(
                Method::POST,
                "/api/v1/environments/{environment_id}/files/mkdir",
                handler!(files::mkdir),
                User,
                Api,
                "files",
                "Create a directory (its parent must exist); audited (directory_created)",
                Some("MkdirRequest"),
                (201, "FileEntry"),
            )
        },
        Route {
            errors: &[
                DENIED,
                (
                    404,
                    "`not_found`: the environment, `from`, or the directory `to` goes in",
                ),
                NOT_RUNNING,
                PATH,
                UNREACHABLE,
                BUSY,
            ],
            ..route(
                Method::POST,
                "/api/v1/environments/{environment_id}/files/move",
                handler!(files::move_file),
                User,
                Api,
                "files",
                "Move or rename a file or directory; `to` must not exist (409 file_exists); audited (file_moved)",
                Some("MoveRequest"),
                (200, "FileEntry"),
            )
        },
    ]
}

pub enum RouteMatch<'a> {
    Found(&'a Route, Vec<(String, String)>),
    /// The path exists for other methods (their list, for `Allow`).
    MethodNotAllowed(String),
    NotFound,
}

pub struct Router {
    routes: Vec<Route>,
    paths: matchit::Router<Vec<usize>>,
}

pub static ROUTER: LazyLock<Router> = LazyLock::new(|| Router::new(routes()));

impl Router {
    fn new(routes: Vec<Route>) -> Self {
        let mut by_path: Vec<(&'static str, Vec<usize>)> = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            match by_path.iter_mut().find(|(p, _)| *p == r.path) {
                Some((_, v)) => v.push(i),
                None => by_path.push((r.path, vec![i])),
            }
        }
        let mut paths = matchit::Router::new();
        for (path, indices) in by_path {
            if let Err(e) = paths.insert(path, indices) {
                panic!("route table is inconsistent at {path}: {e}");
            }
        }
        Self { routes, paths }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn find(&self, method: &Method, path: &str) -> RouteMatch<'_> {
        let path = if path.len() > 1 {
            path.trim_end_matches('/')
        } else {
            path
        };
        let Ok(found) = self.paths.at(path) else {
            return RouteMatch::NotFound;
        };
        let params: Vec<(String, String)> = found
            .params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let wanted = if method == Method::HEAD {
            &Method::GET
        } else {
            method
        };
        match found
            .value
            .iter()
            .map(|&i| &self.routes[i])
            .find(|r| r.method == *wanted)
        {
            Some(route) => RouteMatch::Found(route, params),
            None => RouteMatch::MethodNotAllowed(
                found
                    .value
                    .iter()
                    .map(|&i| self.routes[i].method.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_slash_params_and_methods() {
        let r = &*ROUTER;
        assert!(matches!(
            r.find(&Method::GET, "/api/v1/users/me/"),
            RouteMatch::Found(..)
        ));
        match r.find(&Method::DELETE, "/api/v1/users/me/sessions/abc") {
            RouteMatch::Found(route, params) => {
                assert_eq!(route.path, "/api/v1/users/me/sessions/{session_id}");
                assert_eq!(params, vec![("session_id".to_string(), "abc".to_string())]);
            }
            _ => panic!("no match"),
        }
        match r.find(&Method::PATCH, "/api/v1/users/me") {
            RouteMatch::MethodNotAllowed(allow) => assert_eq!(allow, "GET, PUT, DELETE"),
            _ => panic!("expected 405"),
        }
        assert!(matches!(
            r.find(&Method::GET, "/nope"),
            RouteMatch::NotFound
        ));
        assert!(matches!(r.find(&Method::GET, "/"), RouteMatch::NotFound));
    }
}
