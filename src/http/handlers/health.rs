//! Health, info, metrics and the OpenAPI document: no authentication.

use http::{Response, StatusCode};
use serde_json::json;

use crate::app::AppState;
use crate::error::{ApiResult, ErrorCode};
use crate::http::{Body, Ctx, json, ok, openapi, text};
use crate::store::users::Plan;

pub const SERVICE: &str = "DevPocket API";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub async fn health(app: AppState, _ctx: Ctx) -> ApiResult<Response<Body>> {
    ok(&json!({
        "status": "healthy",
        "service": SERVICE,
        "version": VERSION,
        "environment": app.config.server.environment,
        "timestamp": app.clock.now(),
    }))
}

pub async fn live(_app: AppState, _ctx: Ctx) -> ApiResult<Response<Body>> {
    ok(&json!({ "status": "alive" }))
}

pub async fn ready(app: AppState, _ctx: Ctx) -> ApiResult<Response<Body>> {
    let mut checks = serde_json::Map::new();
    let mut failing = Vec::new();
    match app.db.ping().await {
        Ok(()) => {
            checks.insert("database".into(), json!("healthy"));
        }
        Err(e) => {
            tracing::warn!(error = %e, "readiness: database check failed");
            checks.insert("database".into(), json!("unhealthy"));
            failing.push("database");
        }
    }
    if app.node.heartbeat_healthy() {
        checks.insert("node".into(), json!("healthy"));
    } else {
        checks.insert(
            "node".into(),
            json!("heartbeat not stored within cluster.dead_after_seconds"),
        );
        failing.push("node");
    }
    if app.node.membership().is_draining() {
        checks.insert("draining".into(), json!("this node is shutting down"));
        failing.push("draining");
    }
    let down = app.actors.unhealthy();
    if down.is_empty() {
        checks.insert("actors".into(), json!("healthy"));
    } else {
        checks.insert("actors".into(), json!(format!("down: {}", down.join(", "))));
        failing.push("actors");
    }
    if failing.is_empty() {
        return ok(&json!({ "status": "ready", "checks": checks }));
    }
    Ok(json(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({
            "status": "not_ready",
            "detail": format!("Failing checks: {}", failing.join(", ")),
            "code": "not_ready",
            "checks": checks,
        }),
    ))
}

pub async fn info(app: AppState, _ctx: Ctx) -> ApiResult<Response<Body>> {
    let plans: serde_json::Map<String, serde_json::Value> = Plan::ALL
        .iter()
        .map(|p| {
            (
                p.as_str().to_string(),
                json!({ "max_environments": p.max_environments() }),
            )
        })
        .collect();
    ok(&json!({
        "name": SERVICE,
        "version": VERSION,
        "environment": app.config.server.environment,
        "features": {
            "google_oauth": app.google.is_some(),
            "registration": app.config.registration_open(),
            "provider": app.config.provider.kind.as_str(),
            "database": app.db.backend(),
            "refresh_token_rotation": true,
        },
        "plans": plans,
    }))
}

pub async fn metrics(app: AppState, _ctx: Ctx) -> ApiResult<Response<Body>> {
    Ok(text(
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        app.metrics.render(
            app.actors.directory(),
            &app.node.membership().stats,
            app.actors.local_environment_ids().len(),
            app.actors.ssh_pool().connections(),
        ),
    ))
}

pub async fn openapi(_app: AppState, _ctx: Ctx) -> ApiResult<Response<Body>> {
    ok(&*openapi::DOCUMENT)
}

/// WebSocket routes are upgraded before handlers run; this answers only if that did not happen.
pub async fn not_a_websocket(_app: AppState, _ctx: Ctx) -> ApiResult<Response<Body>> {
    Err(crate::error::ApiError::bad_request(
        ErrorCode::WebsocketRequired,
        "This endpoint speaks WebSocket only",
    ))
}
