//! `/api/v1/environments/{id}/ports`: the TCP ports listening inside an environment (sampled over
//! SSH from `/proc/net/tcp{,6}`, only the sockets of the SSH account's own uid — on the local
//! provider, the environment's own account, never this server's sockets), each with its preview
//! URL and visibility; opening a private preview in a browser (a one-time code); making a port
//! public or private again. The proxy itself is [`crate::http::preview`]. Another user's
//! environment does not exist (404), as on every environment route.

use std::time::Duration;

use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::environments::owned;
use crate::actors::environment::machine::Status;
use crate::app::{App, AppState};
use crate::clock::db_now;
use crate::error::{ApiError, ApiResult, ErrorCode, FieldError};
use crate::http::preview::{self, CODE_PARAM, CODE_TTL};
use crate::http::{Body, Ctx, json, ok};
use crate::ssh::listeners;
use crate::store::environments::Environment;
use crate::store::previews::{self, Grant, KIND_CODE, PRIVATE, PUBLIC};

/// Bytes of `/proc/net/tcp{,6}` read from an environment (150 bytes a socket: thousands).
const PROC_NET_MAX: usize = 4 * 1024 * 1024;
/// Ports listed at most (the rest are left out; nobody previews thousands of servers).
const PORTS_MAX: usize = 1000;
/// What the environment runs to list its sockets: both tables, then its own uid.
const LIST_COMMAND: &str =
    "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null; echo \"devpocket-uid $(id -u)\"";

/// One port of `GET …/ports`.
#[derive(Debug, Serialize)]
pub struct PortResponse {
    pub port: u16,
    /// Where a browser opens it (host-based; a private port needs `POST …/open` first).
    pub url: String,
    /// The same on the API's origin, when path-based previews are enabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_url: Option<String>,
    /// `private` (the owner only) or `public` (anyone with the URL).
    pub visibility: &'static str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisibilityRequest {
    visibility: String,
}

/// The `{port}` of the path: 1-65535, else 422.
fn port_param(ctx: &Ctx) -> ApiResult<u16> {
    preview::parse_port(ctx.param("port")).ok_or_else(|| {
        ApiError::validation(vec![FieldError::new(
            "port",
            "range",
            "port must be a number from 1 to 65535",
        )])
    })
}

fn require_running(env: &Environment) -> ApiResult<()> {
    if env.status == Status::Running {
        return Ok(());
    }
    Err(ApiError::conflict(
        ErrorCode::EnvironmentNotRunning,
        format!(
            "Environment is {}; ports can be previewed while it is running",
            env.status
        ),
    ))
}

fn port_response(app: &App, ctx: &Ctx, env_id: &str, port: u16, public: bool) -> PortResponse {
    let server = &app.config.server;
    PortResponse {
        port,
        url: preview::preview_url(server, &ctx.headers, env_id, port, false),
        path_url: server
            .preview_path_based
            .then(|| preview::preview_url(server, &ctx.headers, env_id, port, true)),
        visibility: if public { PUBLIC } else { PRIVATE },
    }
}

fn unreachable(detail: String) -> ApiError {
    ApiError::unavailable(ErrorCode::EnvironmentUnreachable, detail)
}

/// The listening ports of a running environment, sampled now over SSH.
async fn sample_ports(app: &App, env: &Environment) -> ApiResult<Vec<u16>> {
    let timeout = Duration::from_secs(app.config.server.preview_response_timeout_seconds);
    let client = app
        .previews
        .client(app, &env.id)
        .await
        .map_err(|e| unreachable(format!("The environment cannot be reached: {e}")))?;
    let output = match tokio::time::timeout(timeout, client.exec(LIST_COMMAND, PROC_NET_MAX)).await
    {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => {
            app.previews.forget(&env.id);
            return Err(unreachable(format!("Listing the ports failed: {e}")));
        }
        Err(_) => return Err(unreachable("Listing the ports timed out".into())),
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let uid = text
        .lines()
        .find_map(|l| l.strip_prefix("devpocket-uid "))
        .and_then(|u| u.trim().parse::<u32>().ok())
        .ok_or_else(|| unreachable("The environment did not say who it is".into()))?;
    // Root on a VPS owns every server it starts; an account sees its own sockets only.
    let owner = (uid != 0).then_some(uid);
    // On this host (the local provider) this server's own sockets are never an environment's.
    let own = if env.provider == crate::config::ProviderKind::Local.as_str() {
        listeners::own_socket_inodes()
    } else {
        Default::default()
    };
    let mut ports = listeners::listening_ports(&listeners::parse(&text), owner, &own);
    ports.truncate(PORTS_MAX);
    Ok(ports)
}

pub async fn list(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    require_running(&env)?;
    let ports = sample_ports(&app, &env).await?;
    let mut conn = app.db.get().await?;
    let public = previews::public_ports(&mut conn, &env.id).await?;
    drop(conn);
    let list: Vec<PortResponse> = ports
        .into_iter()
        .map(|p| port_response(&app, &ctx, &env.id, p, public.contains(&i32::from(p))))
        .collect();
    ok(&list)
}

/// A URL with a one-time code (valid [`CODE_TTL`]) that signs the caller's browser in to a
/// private preview; the cookie it sets belongs to this login session.
pub async fn open(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    let port = port_param(&ctx)?;
    let auth = ctx.user()?;
    let now = db_now(app.clock.as_ref());
    let code = crate::secrets::random_token::<32>();
    let grant = Grant {
        token_hash: crate::auth::tokens::hash_refresh_token(&code),
        kind: KIND_CODE.to_string(),
        session_id: auth.session.id.clone(),
        user_id: auth.user.id.clone(),
        environment_id: env.id.clone(),
        port: i32::from(port),
        expires_at: now + CODE_TTL,
        created_at: now,
    };
    let mut conn = app.db.get().await?;
    previews::insert_grant(&mut conn, &grant, now).await?;
    let public = previews::is_public(&mut conn, &env.id, i32::from(port)).await?;
    drop(conn);
    let path_based = app.config.server.preview_path_based
        && ctx
            .query
            .split('&')
            .any(|p| p == "path_based=true" || p == "path_based=1");
    let base = preview::preview_url(&app.config.server, &ctx.headers, &env.id, port, path_based);
    app.audit(
        &ctx.audit(),
        "preview_opened",
        Some(&auth.user.id),
        Some(&auth.session.id),
        json!({ "environment_id": env.id, "port": port, "visibility": if public { PUBLIC } else { PRIVATE } }),
    )
    .await;
    ok(&json!({
        "url": format!("{base}?{CODE_PARAM}={code}"),
        "port": port,
        "visibility": if public { PUBLIC } else { PRIVATE },
        "expires_in": CODE_TTL.num_seconds(),
    }))
}

/// Make a port public (anyone with the URL) or private again (the owner's browser only; public
/// visitors are refused from their next request on).
pub async fn set_visibility(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    let port = port_param(&ctx)?;
    let req: VisibilityRequest = ctx.json()?;
    let visibility = match req.visibility.as_str() {
        PUBLIC => PUBLIC,
        PRIVATE => PRIVATE,
        _ => {
            return Err(ApiError::validation(vec![FieldError::new(
                "visibility",
                "enum",
                "visibility must be \"public\" or \"private\"",
            )]));
        }
    };
    let auth = ctx.user()?;
    let now = db_now(app.clock.as_ref());
    let mut conn = app.db.get().await?;
    let before =
        previews::set_visibility(&mut conn, &env.id, i32::from(port), visibility, now).await?;
    drop(conn);
    app.audit(
        &ctx.audit(),
        "preview_visibility_changed",
        Some(&auth.user.id),
        Some(&auth.session.id),
        json!({ "environment_id": env.id, "port": port, "from": before, "to": visibility }),
    )
    .await;
    Ok(json(
        StatusCode::OK,
        &port_response(&app, &ctx, &env.id, port, visibility == PUBLIC),
    ))
}
