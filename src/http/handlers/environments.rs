//! `/api/v1/environments`: queries (list, get, logs, metrics) read the store; every command is
//! decoded here, sent as one [`Command`] through [`crate::actors::Actors::dispatch`], and its
//! [`Reply`] or [`CommandError`] encoded. Another user's environment does not exist (404) on
//! every route.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::actors::environment::command::{Command, CommandError, NewEnvironment, Reply};
use crate::actors::environment::machine::Status;
use crate::actors::environment::metrics::Sample;
use crate::app::{App, AppState};
use crate::clock::from_db;
use crate::error::{ApiError, ApiResult, ErrorCode, FieldError};
use crate::http::{Body, Ctx, json, ok};
use crate::store::environments::{self as store, Environment};

pub const NAME_MAX: usize = 50;
/// Variables per environment, and the longest name and value accepted.
pub const MAX_VARIABLES: usize = 50;
pub const VARIABLE_NAME_MAX: usize = 64;
pub const VARIABLE_VALUE_MAX: usize = 4096;
pub const SNAPSHOT_NAME_MAX: usize = 50;
pub const LOG_LINES_DEFAULT: i64 = 100;
pub const LOG_LINES_MAX: i64 = 1000;
/// Metrics samples answered at most (a week at one a minute is 10,080).
const METRICS_SAMPLES_MAX: i64 = 20_000;

#[derive(Debug, Serialize)]
pub struct EnvironmentResponse {
    pub id: String,
    pub name: String,
    pub template: String,
    pub status: Status,
    pub status_version: i64,
    pub progress: i32,
    pub message: Option<String>,
    pub error_message: Option<String>,
    pub region: String,
    pub size: String,
    pub resources: Value,
    pub environment_variables: Value,
    pub instance_id: Option<String>,
    pub ip_address: Option<String>,
    pub ssh_port: Option<i32>,
    pub installation_completed: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_accessed: Option<DateTime<Utc>>,
}

impl From<&Environment> for EnvironmentResponse {
    fn from(e: &Environment) -> Self {
        Self {
            id: e.id.clone(),
            name: e.name.clone(),
            template: e.template.clone(),
            status: e.status,
            status_version: e.status_version,
            progress: e.progress,
            message: e.message.clone(),
            error_message: e.error_message.clone(),
            region: e.region.clone(),
            size: e.size.clone(),
            resources: serde_json::from_str(&e.resources).unwrap_or(Value::Null),
            environment_variables: serde_json::from_str(&e.environment_variables)
                .unwrap_or_else(|_| json!({})),
            instance_id: e.instance_id.clone(),
            ip_address: e.ip_address.clone(),
            ssh_port: e.ssh_port,
            installation_completed: e.installation_completed,
            created_at: from_db(e.created_at),
            updated_at: from_db(e.updated_at),
            last_accessed: e.last_accessed.map(from_db),
        }
    }
}

#[derive(Deserialize)]
pub struct CreateRequest {
    name: String,
    template: String,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    size: Option<String>,
    #[serde(default)]
    environment_variables: Option<BTreeMap<String, String>>,
    #[serde(default)]
    user_password: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRequest {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    environment_variables: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
pub struct ListQuery {
    status: Option<String>,
    status_filter: Option<String>,
}

#[derive(Deserialize)]
pub struct SnapshotRequest {
    name: String,
}

#[derive(Deserialize)]
pub struct ResizeRequest {
    size: String,
}

#[derive(Deserialize, Default)]
pub struct MetricsQuery {
    hours: Option<i64>,
}

#[derive(Deserialize, Default)]
pub struct LogsQuery {
    lines: Option<i64>,
    since: Option<String>,
}

/// Lower-case it, then: 1-50 of [a-z0-9-_], not starting or ending with '-'.
pub fn check_name(raw: &str, errors: &mut Vec<FieldError>) -> String {
    let name = raw.trim().to_lowercase();
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if name.is_empty() || name.chars().count() > NAME_MAX {
        errors.push(FieldError::new(
            "name",
            "length",
            format!("Name must be 1-{NAME_MAX} characters"),
        ));
    } else if !ok_chars {
        errors.push(FieldError::new(
            "name",
            "pattern",
            "Name may contain only a-z, 0-9, '-' and '_'",
        ));
    } else if name.starts_with('-') || name.ends_with('-') {
        errors.push(FieldError::new(
            "name",
            "pattern",
            "Name must not start or end with '-'",
        ));
    }
    name
}

pub fn check_variables(vars: &BTreeMap<String, String>, errors: &mut Vec<FieldError>) {
    if vars.len() > MAX_VARIABLES {
        errors.push(FieldError::new(
            "environment_variables",
            "too_many",
            format!("At most {MAX_VARIABLES} variables"),
        ));
    }
    for (name, value) in vars {
        let valid_name = name.len() <= VARIABLE_NAME_MAX
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            errors.push(FieldError::new(
                format!("environment_variables.{name}"),
                "name",
                "Variable names are letters, digits and '_', not starting with a digit (at most 64)",
            ));
        }
        if value.len() > VARIABLE_VALUE_MAX || value.contains('\0') {
            errors.push(FieldError::new(
                format!("environment_variables.{name}"),
                "value",
                format!("Values are at most {VARIABLE_VALUE_MAX} bytes, without NUL"),
            ));
        }
    }
}

/// The environment if the caller owns it; 404 otherwise (never reveal it exists).
pub async fn owned(app: &App, ctx: &Ctx) -> ApiResult<Environment> {
    let user = ctx.user()?;
    let id = ctx.param("environment_id");
    let mut conn = app.db.get().await?;
    store::get_owned(&mut conn, id, &user.user.id)
        .await?
        .ok_or_else(|| ApiError::not_found("Environment not found"))
}

/// How a command's failure reads to the client (API.md's codes).
impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        let detail = e.to_string();
        match e {
            CommandError::Invalid(errors) => ApiError::validation(errors),
            CommandError::PlanLimit { .. } => ApiError::forbidden(ErrorCode::PlanLimit, detail),
            CommandError::NameTaken(_) => ApiError::conflict(ErrorCode::NameTaken, detail),
            CommandError::InvalidState(_) => ApiError::conflict(ErrorCode::InvalidState, detail),
            CommandError::NotFound(_) => ApiError::not_found(detail),
            CommandError::Unsupported(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::UnsupportedByProvider,
                detail,
            ),
            CommandError::Busy => {
                ApiError::unavailable(ErrorCode::EnvironmentBusy, detail).with_retry_after(2)
            }
            CommandError::Pending(_) => ApiError::conflict(ErrorCode::EnvironmentsPending, detail),
            CommandError::Remote(remote) => {
                let status = StatusCode::from_u16(remote.status)
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let code = ErrorCode::ALL
                    .iter()
                    .copied()
                    .find(|c| c.as_str() == remote.code)
                    .unwrap_or(ErrorCode::InternalError);
                let mut api = ApiError::new(status, code, remote.detail);
                api.errors = remote.errors;
                api.retry_after = remote.retry_after;
                api
            }
            CommandError::Timeout { .. } => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                ErrorCode::CommandTimeout,
                detail,
            ),
            CommandError::Provider(e) => provider_error(e),
            CommandError::Store(e) => ApiError::from(e),
            CommandError::Internal(e) => ApiError::internal(e),
        }
    }
}

pub async fn create(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let auth = ctx.user()?;
    let req: CreateRequest = ctx.json()?;
    let mut errors = Vec::new();
    let name = check_name(&req.name, &mut errors);
    let variables = req.environment_variables.unwrap_or_default();
    check_variables(&variables, &mut errors);
    if let Some(pw) = &req.user_password {
        let len = pw.chars().count();
        if !(8..=128).contains(&len) {
            errors.push(FieldError::new(
                "user_password",
                "length",
                "Password must be 8-128 characters",
            ));
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let new = NewEnvironment {
        user_id: auth.user.id.clone(),
        name,
        template: req.template,
        region: req.region,
        size: req.size,
        environment_variables: variables,
        user_password: req.user_password,
    };
    let Reply::Environment(env) = app.actors.dispatch(Command::Create(new)).await? else {
        return Err(ApiError::internal(anyhow::anyhow!(
            "create answered something else"
        )));
    };
    app.audit(
        &ctx.audit(),
        "environment_created",
        Some(&auth.user.id),
        Some(&auth.session.id),
        json!({ "environment_id": env.id, "template": env.template, "provider": env.provider }),
    )
    .await;
    Ok(json(
        StatusCode::CREATED,
        &EnvironmentResponse::from(env.as_ref()),
    ))
}

pub async fn list(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let user = ctx.user()?;
    let q: ListQuery = ctx.query()?;
    let status = match q.status.or(q.status_filter).filter(|s| !s.is_empty()) {
        Some(s) => Some(s.parse::<Status>().map_err(|_| {
            ApiError::validation(vec![FieldError::new(
                "status",
                "unknown",
                format!("Unknown status '{s}'"),
            )])
        })?),
        None => None,
    };
    let envs = store::list_for_user_in(&app.db, &user.user.id, status).await?;
    let list: Vec<EnvironmentResponse> = envs.iter().map(EnvironmentResponse::from).collect();
    ok(&list)
}

pub async fn get(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    ok(&EnvironmentResponse::from(&owned(&app, &ctx).await?))
}

pub async fn update(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    let req: UpdateRequest = ctx.json()?;
    let mut errors = Vec::new();
    let name = req.name.as_deref().map(|n| check_name(n, &mut errors));
    if let Some(vars) = &req.environment_variables {
        check_variables(vars, &mut errors);
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let command = Command::Update {
        environment_id: env.id.clone(),
        name,
        environment_variables: req.environment_variables,
    };
    match app.actors.dispatch(command).await? {
        Reply::Environment(updated) => ok(&EnvironmentResponse::from(updated.as_ref())),
        _ => Err(ApiError::internal(anyhow::anyhow!(
            "update answered something else"
        ))),
    }
}

/// Send an action and answer 202 `{message, status}` (409 when the state does not allow it).
async fn action(
    app: &App,
    ctx: &Ctx,
    env: &Environment,
    command: Command,
) -> ApiResult<Response<Body>> {
    let verb = command.verb();
    let Reply::Accepted(status) = app.actors.dispatch(command).await? else {
        return Err(ApiError::internal(anyhow::anyhow!(
            "{verb} answered something else"
        )));
    };
    app.audit(
        &ctx.audit(),
        &format!("environment_{verb}"),
        Some(&env.user_id),
        ctx.auth.as_ref().map(|a| a.session.id.as_str()),
        json!({ "environment_id": env.id }),
    )
    .await;
    Ok(json(
        StatusCode::ACCEPTED,
        &json!({ "message": format!("Environment {verb} requested"), "status": status }),
    ))
}

pub async fn delete(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    let environment_id = env.id.clone();
    action(&app, &ctx, &env, Command::Delete { environment_id }).await
}

pub async fn start(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    let environment_id = env.id.clone();
    action(&app, &ctx, &env, Command::Start { environment_id }).await
}

pub async fn stop(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    let environment_id = env.id.clone();
    action(&app, &ctx, &env, Command::Stop { environment_id }).await
}

pub async fn restart(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    let environment_id = env.id.clone();
    action(&app, &ctx, &env, Command::Restart { environment_id }).await
}

pub async fn recover(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    let environment_id = env.id.clone();
    action(&app, &ctx, &env, Command::Recover { environment_id }).await
}

pub async fn snapshot(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    let req: SnapshotRequest = ctx.json()?;
    let name = req.name.trim().to_string();
    if name.is_empty() || name.chars().count() > SNAPSHOT_NAME_MAX {
        return Err(ApiError::validation(vec![FieldError::new(
            "name",
            "length",
            format!("Name must be 1-{SNAPSHOT_NAME_MAX} characters"),
        )]));
    }
    let command = Command::Snapshot {
        environment_id: env.id.clone(),
        name: name.clone(),
    };
    action(&app, &ctx, &env, command).await?;
    Ok(json(
        StatusCode::CREATED,
        &json!({ "message": "Snapshot requested", "status": Status::Snapshotting, "name": name }),
    ))
}

pub async fn snapshots(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    let command = Command::ListSnapshots {
        environment_id: env.id.clone(),
    };
    match app.actors.dispatch(command).await? {
        Reply::Snapshots(list) => ok(&json!({ "environment_id": env.id, "snapshots": list })),
        _ => Err(ApiError::internal(anyhow::anyhow!(
            "list snapshots answered something else"
        ))),
    }
}

pub async fn restore(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    let command = Command::RestoreSnapshot {
        environment_id: env.id.clone(),
        snapshot_id: ctx.param("snapshot_id").to_string(),
    };
    action(&app, &ctx, &env, command).await
}

pub async fn resize(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    let req: ResizeRequest = ctx.json()?;
    let command = Command::Resize {
        environment_id: env.id.clone(),
        size: req.size,
    };
    action(&app, &ctx, &env, command).await
}

fn provider_error(e: crate::provider::ProviderError) -> ApiError {
    use crate::provider::ProviderError as P;
    match e {
        P::NotFound => ApiError::not_found("Not found at the provider"),
        P::Unsupported => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::UnsupportedByProvider,
            "Not supported by this provider",
        ),
        P::Rejected { status, message } => ApiError::new(
            StatusCode::BAD_GATEWAY,
            ErrorCode::ProviderRefused,
            format!("The provider refused ({status}): {message}"),
        ),
        other => ApiError::unavailable(
            ErrorCode::ProviderUnavailable,
            format!("The provider is unavailable: {other}"),
        ),
    }
}

pub async fn metrics(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    let q: MetricsQuery = ctx.query()?;
    let hours = q.hours.unwrap_or(1);
    if !(1..=168).contains(&hours) {
        return Err(ApiError::validation(vec![FieldError::new(
            "hours",
            "range",
            "hours must be 1-168",
        )]));
    }
    let since = crate::clock::to_db(app.clock.now() - chrono::Duration::hours(hours));
    let mut conn = app.db.get().await?;
    let (current, samples) = store::samples(&mut conn, &env.id, since, METRICS_SAMPLES_MAX).await?;
    let current = current.map(Sample::from);
    let samples: Vec<Sample> = samples.into_iter().map(Sample::from).collect();
    ok(&json!({ "environment_id": env.id, "current": current, "samples": samples }))
}

/// How long one terminal may take to report its screen for the list (a busy terminal answers
/// between two output batches; one that does not is left out rather than hold the request).
const TERMINAL_SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// `GET /environments/{id}/terminals`: a JSON array of the environment's live terminals on every
/// live node (attached or within their grace period, from any of the owner's sessions), by id,
/// each with its `node` and size. This node's come with a plain-text snapshot of the screen from
/// the server-side model (`screen` is null while the screen is larger than
/// `terminals.screen_max_cells`); other nodes' come from the store, with `screen`, `cursor`,
/// `alternate_screen` and `offset` null. Shape in [`crate::presence::ListedTerminal`].
pub async fn terminals(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    use crate::presence::ListedTerminal;
    let env = owned(&app, &ctx).await?;
    let elsewhere = app.presence.terminals_elsewhere(&env.id).await?;
    let here = crate::actors::terminal::snapshots(&env.id, TERMINAL_SNAPSHOT_WAIT).await;
    let node = app.presence.node_id();
    let mut list: Vec<ListedTerminal> = here
        .into_iter()
        .map(|snapshot| ListedTerminal::here(snapshot, node))
        .chain(elsewhere.into_iter().map(ListedTerminal::elsewhere))
        .collect();
    list.sort_by(|a, b| a.terminal_id.cmp(&b.terminal_id));
    ok(&list)
}

/// `GET /api/v1/commands/{command_id}`: a command carried to the node that runs its environment
/// (the id a 504 `command_timeout` names): its state (`pending`, `running`, `done`, `expired`:
/// cancelled unrun, `lost`: its node died before answering) and, once done, its outcome as the owner answered it (see
/// [`crate::actors::remote::Outcome`]). 404 for an unknown id or another user's command; kept for
/// an hour ([`crate::actors::remote::COMMAND_RETENTION`]).
pub async fn command(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let user = ctx.user()?;
    let id = ctx.param("command_id");
    let row = app
        .actors
        .carried_command(id, &user.user.id)
        .await?
        .ok_or_else(|| ApiError::not_found("Command not found"))?;
    let verb = serde_json::from_str::<crate::actors::environment::command::Command>(&row.command)
        .map(|c| c.verb())
        .unwrap_or("unknown");
    let outcome = row
        .reply
        .as_deref()
        .and_then(|r| serde_json::from_str::<Value>(r).ok());
    ok(&serde_json::json!({
        "command_id": row.id,
        "environment_id": row.environment_id,
        "command": verb,
        "state": row.state,
        "created_at": crate::clock::from_db(row.created_at),
        "expires_at": crate::clock::from_db(row.expires_at),
        "answered_at": row.answered_at.map(crate::clock::from_db),
        "outcome": outcome,
    }))
}

pub async fn logs(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    let q: LogsQuery = ctx.query()?;
    let lines = q.lines.unwrap_or(LOG_LINES_DEFAULT);
    if !(1..=LOG_LINES_MAX).contains(&lines) {
        return Err(ApiError::validation(vec![FieldError::new(
            "lines",
            "range",
            format!("lines must be 1-{LOG_LINES_MAX}"),
        )]));
    }
    let since = match q.since.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(
            DateTime::parse_from_rfc3339(s)
                .map_err(|_| {
                    ApiError::bad_request(ErrorCode::InvalidSince, "since must be an RFC 3339 time")
                })?
                .with_timezone(&Utc),
        ),
        None => None,
    };
    let mut conn = app.db.get().await?;
    let (events, total) =
        store::events(&mut conn, &env.id, since.map(crate::clock::to_db), lines).await?;
    let logs: Vec<Value> = events
        .iter()
        .map(|e| {
            json!({
                "timestamp": from_db(e.occurred_at),
                "level": e.level,
                "message": e.message,
                "source": e.source,
                "kind": e.kind,
            })
        })
        .collect();
    ok(&json!({
        "environment_id": env.id,
        "environment_name": env.name,
        "logs": logs,
        "total_lines": total,
        "has_more": total > logs.len() as i64,
    }))
}

pub async fn regions(app: AppState, _ctx: Ctx) -> ApiResult<Response<Body>> {
    ok(&app.actors.regions().await?)
}

pub async fn sizes(app: AppState, _ctx: Ctx) -> ApiResult<Response<Body>> {
    ok(&app.actors.catalog().sizes)
}
