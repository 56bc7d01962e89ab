//! Creating an environment: what `Command::Create` does in the environments supervisor (in a task
//! of its own, so the supervisor keeps serving). It checks what only the provider and the store
//! know (template, region, size), makes the environment's keys off the async threads, seals the
//! private halves, and writes the row through [`store::insert_checked`], which checks the plan
//! limit and the name in the same transaction. The caller then starts the environment's actor.

use serde_json::{Value, json};

use super::actor::EnvDeps;
use super::command::{CommandError, NewEnvironment};
use super::machine::Status;
use crate::clock::db_now;
use crate::config::ProviderKind;
use crate::error::FieldError;
use crate::provider::Provider;
use crate::store::environments::{self as store, CreateRefusal, Environment, NewEvent};
use crate::store::templates as template_store;
use crate::templates::Template;

/// Contabo's regions (shared/contabo/NOTES.md §2.6).
const CONTABO_REGIONS: [&str; 9] = [
    "EU",
    "US-central",
    "US-east",
    "US-west",
    "SIN",
    "UK",
    "AUS",
    "JPN",
    "IND",
];

/// Whether the configured provider has this region.
pub fn valid_region(provider: &dyn Provider, region: &str) -> bool {
    match provider.kind() {
        ProviderKind::Local => region == crate::provider::local::REGION,
        ProviderKind::Contabo => CONTABO_REGIONS.contains(&region),
    }
}

/// `{cpu, memory, storage}` of a size, or the template's defaults when the size has none.
fn resources(provider: &dyn Provider, size: &str, template: &Template) -> Value {
    match provider.sizes().into_iter().find(|s| s.slug == size) {
        Some(s) if s.memory_mb > 0 => json!({
            "cpu": s.vcpus.to_string(),
            "memory": format!("{}Gi", s.memory_mb / 1024),
            "storage": if s.disk_gb > 0 { format!("{}Gi", s.disk_gb) } else { "shared".into() },
        }),
        _ => serde_json::to_value(&template.default_resources).unwrap_or(Value::Null),
    }
}

async fn template(deps: &EnvDeps, id: &str) -> Result<Option<Template>, CommandError> {
    let mut conn = deps.db.get().await?;
    let Some(row) = template_store::get(&mut conn, &id.trim().to_lowercase()).await? else {
        return Ok(None);
    };
    Ok(serde_json::from_str(&row.definition).ok())
}

/// The key material of a new environment, made on a blocking thread (key generation and the
/// SHA-512-crypt hash of the `dev` password take milliseconds of CPU).
struct Keys {
    user_public: String,
    user_private: String,
    host: crate::provider::HostKey,
    password_hash: String,
}

/// Creates generating keys at once: one per core, so a burst of creates queues here instead of
/// starving every other request of CPU.
fn keygen_slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        tokio::sync::Semaphore::new(cores)
    })
}

async fn make_keys(deps: &EnvDeps, password: Option<String>) -> Result<Keys, CommandError> {
    let _slot = keygen_slots()
        .acquire()
        .await
        .map_err(|e| anyhow::anyhow!("key generation closed: {e}"))?;
    let provider = deps.provider.clone();
    let made = tokio::task::spawn_blocking(move || -> anyhow::Result<Keys> {
        let user_key = crate::ssh::keys::generate_ed25519();
        let host = provider.new_host_key()?;
        let password = password.unwrap_or_else(crate::secrets::random_token::<18>);
        Ok(Keys {
            user_public: crate::ssh::keys::public_to_openssh(user_key.public_key()),
            user_private: crate::ssh::keys::private_to_openssh(&user_key)?,
            host,
            password_hash: crate::templates::hash_password(&password)
                .map_err(|e| anyhow::anyhow!(e.to_string()))?,
        })
    })
    .await
    .map_err(|e| anyhow::anyhow!("key generation did not finish: {e}"))??;
    Ok(made)
}

/// Validate against the provider and the store, then insert (plan limit and name checked in the
/// insert's transaction). Returns the stored row; the caller starts its actor.
pub async fn create(deps: &EnvDeps, new: NewEnvironment) -> Result<Environment, CommandError> {
    let provider = deps.provider.as_ref();
    let mut errors = Vec::new();
    let template = template(deps, &new.template).await?;
    if template.is_none() {
        errors.push(FieldError::new(
            "template",
            "unknown",
            format!("Unknown template '{}'", new.template),
        ));
    }
    let region = new.region.unwrap_or_else(|| provider.default_region());
    let size = new.size.unwrap_or_else(|| provider.default_size());
    if !provider.sizes().iter().any(|s| s.slug == size) {
        errors.push(FieldError::new(
            "size",
            "unknown",
            format!("Unknown size '{size}' (see /api/v1/sizes)"),
        ));
    }
    if !valid_region(provider, &region) {
        errors.push(FieldError::new(
            "region",
            "unknown",
            format!("Unknown region '{region}' (see /api/v1/regions)"),
        ));
    }
    let Some(template) = template.filter(|_| errors.is_empty()) else {
        return Err(CommandError::Invalid(errors));
    };

    // A cheap look first, so a refused create (a double-tap) costs no key generation; the insert
    // checks again in its transaction, which is what holds.
    {
        let mut conn = deps.db.get().await?;
        if let Some(refusal) = store::precheck(&mut conn, &new.user_id, &new.name).await? {
            return Err(refused(refusal, new.name));
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    let keys = make_keys(deps, new.user_password).await?;
    let seal = |secret: &str| deps.sealer.seal(secret.as_bytes(), &id);
    let now = db_now(deps.clock.as_ref());
    let env = Environment {
        id: id.clone(),
        user_id: new.user_id,
        name: new.name,
        template: template.id().to_string(),
        provider: provider.kind().as_str().to_string(),
        status: Status::Creating,
        status_version: 1,
        progress: 0,
        phase: None,
        message: Some("Environment requested".into()),
        error_message: None,
        resources: resources(provider, &size, &template).to_string(),
        region,
        size,
        environment_variables: serde_json::to_string(&new.environment_variables)
            .map_err(anyhow::Error::from)?,
        display_name: format!("devpocket-{id}"),
        operation_id: None,
        create_attempts: 0,
        instance_id: None,
        ip_address: None,
        ssh_port: None,
        ssh_user: provider.ssh_user(),
        ssh_public_key: keys.user_public,
        ssh_private_key: seal(&keys.user_private)?,
        host_public_key: keys.host.public,
        host_private_key: keys.host.private.as_deref().map(seal).transpose()?,
        dev_password_hash: Some(keys.password_hash),
        installation_completed: false,
        created_at: now,
        updated_at: now,
        last_accessed: None,
    };
    let event = NewEvent {
        environment_id: id,
        occurred_at: now,
        kind: "status".into(),
        level: "info".into(),
        source: "server".into(),
        message: "Environment requested".into(),
        status: Some(Status::Creating),
        status_version: Some(1),
        progress: Some(0),
    };
    let mut conn = deps.db.get().await?;
    match store::insert_checked(&mut conn, &env, &event, &deps.cluster.node).await? {
        Ok(()) => Ok(env),
        Err(refusal) => Err(refused(refusal, env.name)),
    }
}

fn refused(refusal: CreateRefusal, name: String) -> CommandError {
    match refusal {
        CreateRefusal::PlanLimit { plan, limit } => CommandError::PlanLimit { plan, limit },
        CreateRefusal::NameTaken => CommandError::NameTaken(name),
        CreateRefusal::NoUser => CommandError::NotFound("User"),
    }
}
