//! `/api/v1/environments`: queries read the store; every command is a message to the
//! environment's actor. Another user's environment does not exist (404) on every route.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::actors::environment::machine::{Event, Status};
use crate::app::{App, AppState};
use crate::clock::{db_now, from_db};
use crate::error::{ApiError, ApiResult, FieldError};
use crate::http::{Body, Ctx, json, ok};
use crate::store::environments::{self as store, Environment};
use crate::store::templates as template_store;

pub const NAME_MAX: usize = 50;
/// Variables per environment, and the longest name and value accepted.
pub const MAX_VARIABLES: usize = 50;
pub const VARIABLE_NAME_MAX: usize = 64;
pub const VARIABLE_VALUE_MAX: usize = 4096;
pub const SNAPSHOT_NAME_MAX: usize = 50;
pub const LOG_LINES_DEFAULT: i64 = 100;
pub const LOG_LINES_MAX: i64 = 1000;
/// How long a recover waits for a restarted actor to come up.
const RECOVER_SPAWN_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize)]
pub struct EnvironmentResponse {
    pub id: String,
    pub name: String,
    pub template: String,
    pub status: String,
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
            status: e.status.clone(),
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

fn seal(app: &App, env_id: &str, secret: &str) -> ApiResult<String> {
    Ok(app.sealer.seal(secret.as_bytes(), env_id)?)
}

async fn template_exists(app: &App, id: &str) -> ApiResult<Option<crate::templates::Template>> {
    let mut conn = app.db.get().await?;
    let Some(row) = template_store::get(&mut conn, &id.trim().to_lowercase()).await? else {
        return Ok(None);
    };
    Ok(serde_json::from_str(&row.definition).ok())
}

fn resources(app: &App, size: &str, template: &crate::templates::Template) -> Value {
    match app.provider.sizes().into_iter().find(|s| s.slug == size) {
        Some(s) if s.memory_mb > 0 => json!({
            "cpu": s.vcpus.to_string(),
            "memory": format!("{}Gi", s.memory_mb / 1024),
            "storage": if s.disk_gb > 0 { format!("{}Gi", s.disk_gb) } else { "shared".into() },
        }),
        _ => serde_json::to_value(&template.default_resources).unwrap_or(Value::Null),
    }
}

pub async fn create(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let user = ctx.user()?.user.clone();
    let req: CreateRequest = ctx.json()?;
    let mut errors = Vec::new();
    let name = check_name(&req.name, &mut errors);
    let variables = req.environment_variables.unwrap_or_default();
    check_variables(&variables, &mut errors);
    let template = template_exists(&app, &req.template).await?;
    if template.is_none() {
        errors.push(FieldError::new(
            "template",
            "unknown",
            format!("Unknown template '{}'", req.template),
        ));
    }
    let provider = app.provider.clone();
    let region = req.region.unwrap_or_else(|| provider.default_region());
    let size = req.size.unwrap_or_else(|| provider.default_size());
    if !provider.sizes().iter().any(|s| s.slug == size) {
        errors.push(FieldError::new(
            "size",
            "unknown",
            format!("Unknown size '{size}' (see /api/v1/sizes)"),
        ));
    }
    if !valid_region(&app, &region) {
        errors.push(FieldError::new(
            "region",
            "unknown",
            format!("Unknown region '{region}' (see /api/v1/regions)"),
        ));
    }
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
    let Some(template) = template else {
        return Err(ApiError::validation(vec![]));
    };

    let mut conn = app.db.get().await?;
    let plan = user.plan();
    let active = store::count_active(&mut conn, &user.id).await?;
    if active >= i64::from(plan.max_environments()) {
        return Err(ApiError::forbidden(
            "plan_limit",
            format!(
                "Environment limit reached: the {} plan allows {} environment(s)",
                plan.as_str(),
                plan.max_environments()
            ),
        ));
    }
    if store::name_in_use(&mut conn, &user.id, &name, "").await? {
        return Err(ApiError::conflict(
            "name_taken",
            format!("You already have an environment named '{name}'"),
        ));
    }

    let id = uuid::Uuid::new_v4().to_string();
    let user_key = crate::ssh::keys::generate_ed25519();
    let host = provider
        .new_host_key()
        .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?;
    let password = match req.user_password {
        Some(pw) => pw,
        None => crate::secrets::random_token::<18>(),
    };
    let password_hash = crate::templates::hash_password(&password)
        .map_err(|e| ApiError::internal(anyhow::anyhow!(e.to_string())))?;
    let now = db_now(app.clock.as_ref());
    let env = Environment {
        id: id.clone(),
        user_id: user.id.clone(),
        name,
        template: template.id().to_string(),
        provider: provider.kind().as_str().to_string(),
        status: Status::Creating.as_str().into(),
        status_version: 1,
        progress: 0,
        phase: None,
        message: Some("Environment requested".into()),
        error_message: None,
        resources: resources(&app, &size, &template).to_string(),
        region,
        size,
        environment_variables: serde_json::to_string(&variables).unwrap_or_else(|_| "{}".into()),
        display_name: format!("devpocket-{id}"),
        operation_id: None,
        create_attempts: 0,
        instance_id: None,
        ip_address: None,
        ssh_port: None,
        ssh_user: provider.ssh_user(),
        ssh_public_key: crate::ssh::keys::public_to_openssh(user_key.public_key()),
        ssh_private_key: seal(&app, &id, &crate::ssh::keys::private_to_openssh(&user_key)?)?,
        host_public_key: host.public,
        host_private_key: match &host.private {
            Some(private) => Some(seal(&app, &id, private)?),
            None => None,
        },
        dev_password_hash: Some(password_hash),
        installation_completed: false,
        created_at: now,
        updated_at: now,
        last_accessed: None,
    };
    store::insert(&mut conn, &env).await?;
    store::add_event(
        &mut conn,
        &store::NewEvent {
            environment_id: id.clone(),
            occurred_at: now,
            kind: "status".into(),
            level: "info".into(),
            source: "server".into(),
            message: "Environment requested".into(),
            status: Some("creating".into()),
            status_version: Some(1),
        },
    )
    .await?;
    app.actors.spawn_environment(&id);
    app.audit(
        &ctx.audit(),
        "environment_created",
        Some(&user.id),
        Some(&ctx.user()?.session.id),
        json!({ "environment_id": id, "template": env.template, "provider": env.provider }),
    )
    .await;
    Ok(json(StatusCode::CREATED, &EnvironmentResponse::from(&env)))
}

fn valid_region(app: &App, region: &str) -> bool {
    use crate::config::ProviderKind;
    match app.provider.kind() {
        ProviderKind::Local => region == crate::provider::local::REGION,
        // Contabo's region enum (NOTES §2.6).
        ProviderKind::Contabo => [
            "EU",
            "US-central",
            "US-east",
            "US-west",
            "SIN",
            "UK",
            "AUS",
            "JPN",
            "IND",
        ]
        .contains(&region),
    }
}

pub async fn list(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let user = ctx.user()?;
    let q: ListQuery = ctx.query()?;
    let status = q.status.or(q.status_filter).filter(|s| !s.is_empty());
    if let Some(s) = &status
        && s.parse::<Status>().is_err()
    {
        return Err(ApiError::validation(vec![FieldError::new(
            "status",
            "unknown",
            format!("Unknown status '{s}'"),
        )]));
    }
    let mut conn = app.db.get().await?;
    let envs = store::list_for_user(&mut conn, &user.user.id, status.as_deref()).await?;
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
    let mut conn = app.db.get().await?;
    if let Some(name) = &name
        && store::name_in_use(&mut conn, &env.user_id, name, &env.id).await?
    {
        return Err(ApiError::conflict(
            "name_taken",
            format!("You already have an environment named '{name}'"),
        ));
    }
    let vars = req
        .environment_variables
        .map(|v| serde_json::to_string(&v).unwrap_or_else(|_| "{}".into()));
    let updated = store::update_settings(
        &mut conn,
        &env.id,
        name.as_deref(),
        vars.as_deref(),
        db_now(app.clock.as_ref()),
    )
    .await?;
    if app.actors.environment_running(&env.id) {
        // Let the actor pick up the new settings for what it does next.
        let _ = app.actors.reload(&env.id).await;
    }
    ok(&EnvironmentResponse::from(&updated))
}

/// Send a command and answer 202 `{message, status}`, 409 when the state does not allow it.
async fn command(
    app: &App,
    ctx: &Ctx,
    env: &Environment,
    event: Event,
) -> ApiResult<Response<Body>> {
    let verb = event.verb();
    match app.actors.command(&env.id, event).await {
        Ok(Ok(status)) => {
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
        Ok(Err(rejected)) => Err(ApiError::conflict("invalid_state", rejected.to_string())),
        Err(_) if env.status == "terminated" => Err(ApiError::conflict(
            "invalid_state",
            format!("Cannot {verb} environment in terminated state"),
        )),
        Err(_) => Err(ApiError::unavailable(
            "environment_busy",
            "The environment is busy or restarting; try again in a moment",
        )
        .with_retry_after(2)),
    }
}

pub async fn delete(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    command(&app, &ctx, &env, Event::Delete).await
}

pub async fn start(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    command(&app, &ctx, &env, Event::Start).await
}

pub async fn stop(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    command(&app, &ctx, &env, Event::Stop).await
}

pub async fn restart(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    command(&app, &ctx, &env, Event::Restart).await
}

pub async fn recover(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    if env.status == "error" && !app.actors.environment_running(&env.id) {
        // Its actor was given up on: start it again (a fresh restart record), then recover.
        app.actors.spawn_environment(&env.id);
        let deadline = tokio::time::Instant::now() + RECOVER_SPAWN_WAIT;
        while !app.actors.environment_running(&env.id) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    command(&app, &ctx, &env, Event::Recover).await
}

fn require_snapshots(app: &App) -> ApiResult<()> {
    if app.provider.capabilities().snapshots {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unsupported_by_provider",
            "This provider cannot take snapshots",
        ))
    }
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
    require_snapshots(&app)?;
    let resp = command(&app, &ctx, &env, Event::Snapshot { name: name.clone() }).await?;
    if resp.status() == StatusCode::ACCEPTED {
        return Ok(json(
            StatusCode::CREATED,
            &json!({ "message": "Snapshot requested", "status": "snapshotting", "name": name }),
        ));
    }
    Ok(resp)
}

pub async fn snapshots(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    require_snapshots(&app)?;
    let Some(instance) = env
        .instance_id
        .as_deref()
        .filter(|_| env.status != "terminated")
    else {
        return ok(&json!({ "environment_id": env.id, "snapshots": [] }));
    };
    let list = app
        .provider
        .list_snapshots(instance)
        .await
        .map_err(provider_error)?;
    ok(&json!({ "environment_id": env.id, "snapshots": list }))
}

pub async fn restore(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let env = owned(&app, &ctx).await?;
    require_snapshots(&app)?;
    let snapshot_id = ctx.param("snapshot_id").to_string();
    let instance = env
        .instance_id
        .as_deref()
        .ok_or_else(|| ApiError::not_found("Snapshot not found"))?;
    let list = app
        .provider
        .list_snapshots(instance)
        .await
        .map_err(provider_error)?;
    if !list.iter().any(|s| s.id == snapshot_id) {
        return Err(ApiError::not_found("Snapshot not found"));
    }
    command(&app, &ctx, &env, Event::RestoreSnapshot { snapshot_id }).await
}

pub async fn resize(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let _env = owned(&app, &ctx).await?;
    let req: ResizeRequest = ctx.json()?;
    if !app.provider.sizes().iter().any(|s| s.slug == req.size) {
        return Err(ApiError::validation(vec![FieldError::new(
            "size",
            "unknown",
            format!("Unknown size '{}'", req.size),
        )]));
    }
    if !app.provider.capabilities().resize {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unsupported_by_provider",
            format!(
                "The {} provider cannot resize an environment",
                app.provider.kind().as_str()
            ),
        ));
    }
    Err(ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "unsupported_by_provider",
        "Resize is not supported",
    ))
}

fn provider_error(e: crate::provider::ProviderError) -> ApiError {
    use crate::provider::ProviderError as P;
    match e {
        P::NotFound => ApiError::not_found("Not found at the provider"),
        P::Unsupported => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unsupported_by_provider",
            "Not supported by this provider",
        ),
        P::Rejected { status, message } => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "provider_refused",
            format!("The provider refused ({status}): {message}"),
        ),
        other => ApiError::unavailable(
            "provider_unavailable",
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
    let since = app.clock.now() - chrono::Duration::hours(hours);
    // No actor (terminated, or restarting): no samples to show.
    let (current, samples) = app.actors.metrics(&env.id, since).await.unwrap_or_default();
    ok(&json!({ "environment_id": env.id, "current": current, "samples": samples }))
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
                    ApiError::bad_request("invalid_since", "since must be an RFC 3339 time")
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
    ok(&app.provider.regions().await.map_err(provider_error)?)
}

pub async fn sizes(app: AppState, _ctx: Ctx) -> ApiResult<Response<Body>> {
    ok(&app.provider.sizes())
}

/// Delete every live environment of a user and wait (bounded) until they are terminated.
pub async fn delete_all_for_user(app: &App, user_id: &str, wait: Duration) -> ApiResult<bool> {
    let envs = {
        let mut conn = app.db.get().await?;
        store::list_for_user(&mut conn, user_id, None).await?
    };
    let live: Vec<String> = envs
        .into_iter()
        .filter(|e| e.status != "terminated")
        .map(|e| e.id)
        .collect();
    for id in &live {
        if !app.actors.environment_running(id) {
            app.actors.spawn_environment(id);
        }
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut pending = live;
    while !pending.is_empty() && tokio::time::Instant::now() < deadline {
        let mut still = Vec::new();
        for id in pending {
            let mut conn = app.db.get().await?;
            let status = store::get(&mut conn, &id).await?.map(|e| e.status);
            match status.as_deref() {
                None | Some("terminated") => {}
                Some("deleting") => still.push(id),
                Some(_) => {
                    let _ = app.actors.command(&id, Event::Delete).await;
                    still.push(id);
                }
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(pending.is_empty())
}
