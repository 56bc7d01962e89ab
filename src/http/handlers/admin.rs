//! `/api/v1/admin`: the live supervision tree, fault injection, the audit trail. Admin plan only.

use chrono::{DateTime, Utc};
use http::{Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::message;
use crate::actors::CrashOutcome;
use crate::app::AppState;
use crate::clock::{from_db, to_db};
use crate::error::{ApiError, ApiResult, ErrorCode, FieldError};
use crate::http::{Body, Ctx, json, ok};
use crate::store::audit::{self, AuditFilter};

/// Page size of the audit listing when none is asked for, and the most allowed.
const AUDIT_DEFAULT_LIMIT: i64 = 50;
const AUDIT_MAX_LIMIT: i64 = 500;

/// The supervision tree of this node, every node on the database (`nodes`: id, address,
/// provider, version, started_at, heartbeat_at, heartbeat_age_seconds, alive, draining,
/// this_node, environments_owned) and this node's lease counts since start (`leases`: held,
/// claimed, lost, released, valid). 503 when the store cannot list the nodes.
pub async fn actors(app: AppState, _ctx: Ctx) -> ApiResult<Response<Body>> {
    use std::sync::atomic::Ordering::Relaxed;
    let directory = app.actors.directory();
    let nodes = app.node.list().await?;
    let cluster = app.node.membership();
    let held = nodes
        .iter()
        .find(|n| n.this_node)
        .map_or(0, |n| n.environments_owned);
    ok(&json!({
        "node": app.node.id,
        "nodes": nodes,
        "leases": {
            "held": held,
            "claimed": cluster.stats.claimed.load(Relaxed),
            "lost": cluster.stats.lost.load(Relaxed),
            "released": cluster.stats.released.load(Relaxed),
            "valid": cluster.guard.valid(),
        },
        "actors": directory.tree(),
        "live_by_kind": directory.live_by_kind(),
        "restarts_by_kind": directory.restarts_by_kind(),
        "generated_at": app.clock.now(),
    }))
}

pub async fn crash(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    if !app.config.ops.fault_injection {
        return Err(ApiError::forbidden(
            ErrorCode::FaultInjectionDisabled,
            "Fault injection is disabled (ops.fault_injection = false)",
        ));
    }
    let target = ctx.param("actor_id").to_string();
    match app.actors.crash(&target).await {
        CrashOutcome::Crashed => {
            let auth = ctx.user()?;
            app.audit(
                &ctx.audit(),
                "actor_crash_injected",
                Some(&auth.user.id),
                Some(&auth.session.id),
                json!({ "actor": target }),
            )
            .await;
            Ok(json(
                StatusCode::ACCEPTED,
                &message(format!("Crash injected into {target}")),
            ))
        }
        CrashOutcome::NotFound => Err(ApiError::not_found("No such actor")),
        CrashOutcome::NotAllowed => Err(ApiError::bad_request(
            ErrorCode::NotSupervised,
            "The root supervisor has no supervisor; crashing it would stop the server",
        )),
    }
}

#[derive(Deserialize, Default)]
pub struct AuditQuery {
    event: Option<String>,
    user_id: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
}

fn parse_time(
    field: &str,
    value: Option<&str>,
    errors: &mut Vec<FieldError>,
) -> Option<DateTime<Utc>> {
    let value = value?;
    match DateTime::parse_from_rfc3339(value) {
        Ok(t) => Some(t.with_timezone(&Utc)),
        Err(_) => {
            errors.push(FieldError::new(
                field,
                "datetime",
                "Must be an RFC 3339 time",
            ));
            None
        }
    }
}

pub async fn audit(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let q: AuditQuery = ctx.query()?;
    let mut errors = Vec::new();
    let since = parse_time("since", q.since.as_deref(), &mut errors);
    let until = parse_time("until", q.until.as_deref(), &mut errors);
    let limit = q.limit.unwrap_or(AUDIT_DEFAULT_LIMIT);
    if !(1..=AUDIT_MAX_LIMIT).contains(&limit) {
        errors.push(FieldError::new(
            "limit",
            "range",
            format!("Must be 1-{AUDIT_MAX_LIMIT}"),
        ));
    }
    let offset = q.offset.unwrap_or(0);
    if offset < 0 {
        errors.push(FieldError::new("offset", "range", "Must not be negative"));
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let filter = AuditFilter {
        event: q.event.filter(|s| !s.is_empty()),
        user_id: q.user_id.filter(|s| !s.is_empty()),
        since: since.map(to_db),
        until: until.map(to_db),
        limit,
        offset,
    };
    let mut conn = app.db.get().await?;
    let (events, total) = audit::query(&mut conn, &filter).await?;
    let items: Vec<serde_json::Value> = events
        .into_iter()
        .map(|e| {
            json!({
                "id": e.id,
                "timestamp": from_db(e.occurred_at),
                "event": e.event,
                "user_id": e.user_id,
                "session_id": e.session_id,
                "ip_address": e.ip_address,
                "request_id": e.request_id,
                "detail": e.detail.and_then(|d| serde_json::from_str::<serde_json::Value>(&d).ok()),
            })
        })
        .collect();
    ok(&json!({
        "items": items,
        "total": total,
        "limit": limit,
        "offset": offset,
        "has_more": offset + (items.len() as i64) < total,
    }))
}
