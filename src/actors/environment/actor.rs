//! The Environment actor: the only code that changes an environment. It loads its row on start,
//! runs the state machine, persists every transition (monotonic `status_version` + an event row),
//! publishes it, and carries out the machine's effects in tasks it owns, which report back as
//! messages. After a crash or a server restart it resumes from the persisted state.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use super::machine::{Effect, Event, Machine, Rejected, Status};
use super::metrics::{self, Sample};
use crate::actors::directory::Pending;
use crate::clock::{db_now, from_db};
use crate::config::Config;
use crate::provider::{InstanceSpec, InstanceState, Provider, ProviderError};
use crate::secrets::Sealer;
use crate::ssh::client::{SshClient, SshTarget};
use crate::store::environments::{self as store, Environment, NewEvent, StatusChange};
use crate::store::{Db, templates as template_store};

/// Updates kept for slow subscribers of one environment before they lag (and are told so).
pub const ENV_FEED_CAPACITY: usize = 256;
/// Installation log lines stored per environment; later lines are still streamed live.
const MAX_STORED_LOG_LINES: usize = 5000;
/// Lines buffered between the SSH reader and the log writer.
const LOG_LINE_BUFFER: usize = 256;
/// Waits between attempts when the provider is unavailable or an answer was lost.
const RETRY_WAIT: Duration = Duration::from_millis(500);
/// Longest wait for the installation log to be delivered after installation ended.
const LOG_DRAIN_MAX: Duration = Duration::from_secs(5);
/// The log counts as delivered when no line came for this long.
const LOG_QUIET: Duration = Duration::from_millis(300);
/// Largest metrics command output read.
const METRICS_OUTPUT_LIMIT: usize = 64 * 1024;

/// What subscribers (logs and events WebSockets, terminals) receive.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EnvUpdate {
    EnvironmentStatus {
        environment_id: String,
        #[serde(skip)]
        user_id: String,
        status: Status,
        status_version: i64,
        progress: u8,
        message: Option<String>,
        timestamp: DateTime<Utc>,
    },
    InstallationLog {
        environment_id: String,
        data: String,
        timestamp: DateTime<Utc>,
    },
    InstallationComplete {
        environment_id: String,
        status: Status,
        installation_status: String,
        message: String,
    },
    InstallationError {
        environment_id: String,
        error: String,
        is_critical: bool,
    },
}

/// Everything an environment actor needs from the application.
pub struct EnvDeps {
    pub db: Db,
    pub clock: crate::clock::SharedClock,
    pub provider: Arc<dyn Provider>,
    pub sealer: Sealer,
    pub config: Config,
    /// Every status change of every environment (the events WebSocket filters by user).
    pub bus: broadcast::Sender<EnvUpdate>,
}

pub enum EnvMsg {
    /// A user's command; answered with the new status or why it is not allowed.
    Command {
        event: Event,
        reply: RpcReplyPort<Result<Status, Rejected>>,
    },
    /// The result of an effect, tagged with the epoch it was started in.
    Outcome { epoch: u64, event: Event },
    /// A metrics sample from the sampler.
    Sample(Sample),
    /// Metrics since a time: the latest sample and those since.
    Metrics {
        since: DateTime<Utc>,
        reply: RpcReplyPort<(Option<Sample>, Vec<Sample>)>,
    },
    /// A feed of this environment's updates.
    Subscribe {
        reply: RpcReplyPort<broadcast::Receiver<EnvUpdate>>,
    },
    /// Settings changed in the store (name, variables): reload them.
    Reload { reply: RpcReplyPort<()> },
    /// Fault injection: panic in the handler.
    Crash(String),
}

pub struct EnvironmentActor;

pub struct EnvArgs {
    pub environment_id: String,
    pub deps: Arc<EnvDeps>,
    pub pending: Pending,
    pub directory: crate::actors::directory::Directory,
    pub directory_id: String,
}

pub struct EnvState {
    args: EnvArgs,
    row: Environment,
    machine: Machine,
    /// Bumped when the status changes; outcomes of older epochs are stale.
    epoch: u64,
    phase_tasks: Vec<JoinHandle<()>>,
    metrics_task: Option<JoinHandle<()>>,
    samples: VecDeque<Sample>,
    max_samples: usize,
    feed: broadcast::Sender<EnvUpdate>,
}

impl Drop for EnvState {
    fn drop(&mut self) {
        for task in self.phase_tasks.drain(..) {
            task.abort();
        }
        if let Some(task) = self.metrics_task.take() {
            task.abort();
        }
    }
}

fn machine_from_row(row: &Environment) -> Machine {
    Machine {
        status: row.status.parse().unwrap_or(Status::Error),
        phase: row.phase.as_deref().and_then(|p| p.parse().ok()),
        progress: row.progress.clamp(0, 100) as u8,
        has_instance: row.instance_id.is_some(),
        error: row.error_message.clone(),
    }
}

/// A short human line for a status change.
fn describe(m: &Machine, event: &Event) -> String {
    match (m.status, event) {
        (Status::Error, Event::Failed { message }) => message.clone(),
        (Status::Provisioning, Event::InstanceCreated { instance_id }) => {
            format!("Instance {instance_id} ordered; provisioning")
        }
        (Status::Installing, Event::InstanceReady { ip }) => {
            format!("Instance up at {ip}; installing the development stack")
        }
        (Status::Running, Event::InstallComplete) => "Environment ready".into(),
        (status, _) => format!("Environment {status}"),
    }
}

impl EnvState {
    fn id(&self) -> &str {
        &self.args.environment_id
    }

    fn deps(&self) -> &Arc<EnvDeps> {
        &self.args.deps
    }

    fn publish(&self, update: EnvUpdate) {
        let _ = self.feed.send(update.clone());
        if matches!(update, EnvUpdate::EnvironmentStatus { .. }) {
            let _ = self.deps().bus.send(update);
        }
    }

    /// Apply an event: step the machine, persist, publish, run effects.
    async fn apply(
        &mut self,
        myself: &ActorRef<EnvMsg>,
        event: Event,
    ) -> Result<Result<Status, Rejected>, ActorProcessingErr> {
        let (next, effects) = match self.machine.step(&event) {
            Ok(step) => step,
            Err(rejected) => return Ok(Err(rejected)),
        };
        // Effects persisted these before reporting; keep the cached row in step.
        match &event {
            Event::InstanceCreated { instance_id } => {
                self.row.instance_id = Some(instance_id.clone());
            }
            Event::InstanceReady { ip } => {
                let (_, port) = self.deps().provider.ssh_endpoint(ip);
                self.row.ip_address = Some(ip.clone());
                self.row.ssh_port = Some(i32::from(port));
            }
            _ => {}
        }
        let status_changed = next.status != self.machine.status;
        let progress_changed = next.progress != self.machine.progress;
        if status_changed || progress_changed || next != self.machine {
            self.persist(&next, &event).await?;
        }
        self.machine = next;
        if status_changed {
            self.epoch += 1;
            for task in self.phase_tasks.drain(..) {
                task.abort();
            }
            self.args
                .directory
                .set_phase(&self.args.directory_id, Some(self.machine.status.as_str()));
        }
        for effect in effects {
            self.run(myself, effect);
        }
        if self.machine.status.is_final() {
            myself.stop(Some("terminated".into()));
        }
        Ok(Ok(self.machine.status))
    }

    async fn persist(&mut self, next: &Machine, event: &Event) -> Result<(), ActorProcessingErr> {
        let now = db_now(self.deps().clock.as_ref());
        let message = describe(next, event);
        let change = StatusChange {
            status: next.status.as_str().to_string(),
            progress: i32::from(next.progress),
            phase: next.phase.map(|p| p.as_str().to_string()),
            message: Some(message.clone()),
            error_message: next.error.clone(),
            installation_completed: self.row.installation_completed
                || (next.status == Status::Running && self.machine.status == Status::Installing),
            updated_at: now,
        };
        let status_changed = next.status != self.machine.status;
        let mut conn = self.deps().db.get().await?;
        let version = if status_changed {
            let level = if next.status == Status::Error {
                "error"
            } else {
                "info"
            };
            let row = NewEvent {
                environment_id: self.id().to_string(),
                occurred_at: now,
                kind: "status".into(),
                level: level.into(),
                source: "server".into(),
                message: message.clone(),
                status: Some(next.status.as_str().into()),
                status_version: None,
            };
            store::record_transition(&mut conn, self.id(), &change, row).await?
        } else {
            // Progress within a phase: no new version, no event row.
            store::update_progress(&mut conn, self.id(), &change).await?;
            self.row.status_version
        };
        self.row.status = change.status.clone();
        self.row.status_version = version;
        self.row.progress = change.progress;
        self.row.phase = change.phase.clone();
        self.row.message = change.message.clone();
        self.row.error_message = change.error_message.clone();
        self.row.installation_completed = change.installation_completed;
        self.publish(EnvUpdate::EnvironmentStatus {
            environment_id: self.id().to_string(),
            user_id: self.row.user_id.clone(),
            status: next.status,
            status_version: version,
            progress: next.progress,
            message: Some(message),
            timestamp: from_db(now),
        });
        Ok(())
    }

    fn task_ctx(&self, myself: &ActorRef<EnvMsg>) -> TaskCtx {
        TaskCtx {
            myself: myself.clone(),
            epoch: self.epoch,
            deps: self.deps().clone(),
            row: self.row.clone(),
            feed: self.feed.clone(),
        }
    }

    fn run(&mut self, myself: &ActorRef<EnvMsg>, effect: Effect) {
        let ctx = self.task_ctx(myself);
        match effect {
            Effect::StartMetrics => {
                if let Some(old) = self.metrics_task.take() {
                    old.abort();
                }
                self.metrics_task = Some(tokio::spawn(ctx.sample_metrics()));
            }
            Effect::StopMetrics => {
                if let Some(task) = self.metrics_task.take() {
                    task.abort();
                }
            }
            effect => self.phase_tasks.push(tokio::spawn(ctx.execute(effect))),
        }
    }

    fn add_sample(&mut self, sample: Sample) {
        self.samples.push_back(sample);
        while self.samples.len() > self.max_samples {
            self.samples.pop_front();
        }
    }
}

/// How to reach an environment over SSH: its address, its own key (unsealed) and the pinned host
/// key. Shared by the environment actor and terminals.
pub fn ssh_target(
    row: &Environment,
    provider: &dyn Provider,
    sealer: &Sealer,
    connect_timeout: Duration,
) -> Result<SshTarget, String> {
    let ip = row
        .ip_address
        .clone()
        .ok_or_else(|| "the environment has no address yet".to_string())?;
    let (host, port) = provider.ssh_endpoint(&ip);
    let private = sealer
        .open(&row.ssh_private_key, &row.id)
        .map_err(|e| format!("cannot unseal environment secret: {e}"))
        .and_then(|b| String::from_utf8(b).map_err(|e| e.to_string()))?;
    let key = crate::ssh::keys::parse_private(&private).map_err(|e| e.to_string())?;
    let host_key =
        crate::ssh::keys::parse_public(&row.host_public_key).map_err(|e| e.to_string())?;
    Ok(SshTarget {
        host,
        port,
        user: row.ssh_user.clone(),
        key: Arc::new(key),
        host_key,
        connect_timeout,
    })
}

/// A task that is aborted when its handle is dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// After installation ended: wait for the log follower to start delivering (it may have been
/// slower to open than the status command), then until it has been quiet for a moment.
async fn settle(mut seen: tokio::sync::watch::Receiver<usize>) {
    let give_up = tokio::time::Instant::now() + LOG_DRAIN_MAX;
    let _ = tokio::time::timeout_at(give_up, seen.wait_for(|n| *n > 0)).await;
    loop {
        match tokio::time::timeout(LOG_QUIET, seen.changed()).await {
            Ok(Ok(())) if tokio::time::Instant::now() < give_up => continue,
            _ => return,
        }
    }
}

/// What an effect task carries: a snapshot of the row and a way to report back.
struct TaskCtx {
    myself: ActorRef<EnvMsg>,
    epoch: u64,
    deps: Arc<EnvDeps>,
    row: Environment,
    feed: broadcast::Sender<EnvUpdate>,
}

impl TaskCtx {
    fn report(&self, event: Event) {
        let _ = self.myself.cast(EnvMsg::Outcome {
            epoch: self.epoch,
            event,
        });
    }

    fn fail(&self, message: impl Into<String>) {
        self.report(Event::Failed {
            message: message.into(),
        });
    }

    fn provider(&self) -> &dyn Provider {
        self.deps.provider.as_ref()
    }

    async fn execute(self, effect: Effect) {
        let result = match effect {
            Effect::EnsureInstance => self.ensure_instance().await,
            Effect::AwaitInstance => self.await_instance().await,
            Effect::WatchInstallation => self.watch_installation().await,
            Effect::ProviderStart => self.power("start").await,
            Effect::ProviderStop => self.power("stop").await,
            Effect::ProviderRestart => self.power("restart").await,
            Effect::CreateSnapshot { name } => self.snapshot(&name).await,
            Effect::RestoreSnapshot { snapshot_id } => self.restore(&snapshot_id).await,
            Effect::DeleteInstance => self.delete().await,
            Effect::StartMetrics | Effect::StopMetrics => Ok(()),
        };
        if let Err(message) = result {
            self.fail(message);
        }
    }

    fn open(&self, sealed: &str) -> Result<String, String> {
        self.deps
            .sealer
            .open(sealed, &self.row.id)
            .map_err(|e| format!("cannot unseal environment secret: {e}"))
            .and_then(|b| String::from_utf8(b).map_err(|e| e.to_string()))
    }

    async fn spec(&self, operation_id: &str) -> Result<InstanceSpec, String> {
        let variables: BTreeMap<String, String> =
            serde_json::from_str(&self.row.environment_variables).unwrap_or_default();
        let user_data = self.user_data(&variables).await?;
        Ok(InstanceSpec {
            environment_id: self.row.id.clone(),
            display_name: self.row.display_name.clone(),
            operation_id: operation_id.to_string(),
            region: self.row.region.clone(),
            size: self.row.size.clone(),
            user_data,
            ssh_public_key: self.row.ssh_public_key.clone(),
            environment_variables: variables,
        })
    }

    async fn template(&self) -> Result<crate::templates::Template, String> {
        let mut conn = self.deps.db.get().await.map_err(|e| e.to_string())?;
        let row = template_store::get(&mut conn, &self.row.template)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("template {} no longer exists", self.row.template))?;
        serde_json::from_str(&row.definition).map_err(|e| format!("template {}: {e}", row.id))
    }

    async fn user_data(&self, variables: &BTreeMap<String, String>) -> Result<String, String> {
        let Some(sealed_host_key) = &self.row.host_private_key else {
            // Providers that do not install a host key (local) do not use user-data either.
            return Ok(String::new());
        };
        let template = self.template().await?;
        let vars = crate::templates::RenderVars {
            environment_id: self.row.id.clone(),
            environment_name: self.row.name.clone(),
            hostname: format!("devpocket-{}", &self.row.id[..8.min(self.row.id.len())]),
            dev_password_hash: self.row.dev_password_hash.clone().unwrap_or_default(),
            ssh_authorized_key: self.row.ssh_public_key.clone(),
            host_key_private: self.open(sealed_host_key)?,
            host_key_public: self.row.host_public_key.clone(),
            environment_variables: variables.clone(),
        };
        crate::templates::render(&template, &vars).map_err(|e| e.to_string())
    }

    async fn with_conn<T>(
        &self,
        f: impl AsyncFnOnce(&mut crate::store::DbConn) -> crate::store::StoreResult<T>,
    ) -> Result<T, String> {
        let mut conn = self.deps.db.get().await.map_err(|e| e.to_string())?;
        f(&mut conn).await.map_err(|e| e.to_string())
    }

    /// Reconcile first, then create; never two instances for one environment.
    async fn ensure_instance(&self) -> Result<(), String> {
        let cfg = &self.deps.config.provider;
        let mut last_operation = self.row.operation_id.clone();
        let mut attempts = self.row.create_attempts.max(0) as u32;
        loop {
            if let Some(op) = &last_operation {
                // An earlier attempt (before a crash, a timeout or a 5xx) may have gone through.
                let spec = self.spec(op).await?;
                match self.provider().find_instance(&spec).await {
                    Ok(Some(instance_id)) => return self.adopt(&instance_id).await,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(environment = %self.row.id, error = %e, "reconcile failed; retrying");
                        tokio::time::sleep(RETRY_WAIT).await;
                        continue;
                    }
                }
            }
            if attempts >= cfg.max_create_attempts {
                return Err(format!(
                    "the provider did not create the instance after {attempts} attempt(s)"
                ));
            }
            let operation_id = uuid::Uuid::new_v4().to_string();
            let now = db_now(self.deps.clock.as_ref());
            let env_id = self.row.id.clone();
            let op = operation_id.clone();
            // Stored before the call, so a crash after it still knows what to look for.
            self.with_conn(async |c| store::begin_create(c, &env_id, &op, now).await)
                .await?;
            attempts += 1;
            last_operation = Some(operation_id.clone());
            let spec = self.spec(&operation_id).await?;
            match self.provider().create_instance(&spec).await {
                Ok(instance_id) => return self.adopt(&instance_id).await,
                Err(ProviderError::Ambiguous(why) | ProviderError::Unavailable(why)) => {
                    tracing::warn!(environment = %self.row.id, error = %why, "create outcome unknown; reconciling before any retry");
                    tokio::time::sleep(RETRY_WAIT).await;
                }
                Err(e) => return Err(format!("the provider refused to create the instance: {e}")),
            }
        }
    }

    async fn adopt(&self, instance_id: &str) -> Result<(), String> {
        let now = db_now(self.deps.clock.as_ref());
        let env_id = self.row.id.clone();
        let id = instance_id.to_string();
        self.with_conn(async |c| store::set_instance(c, &env_id, &id, now).await)
            .await?;
        self.report(Event::InstanceCreated {
            instance_id: instance_id.to_string(),
        });
        Ok(())
    }

    fn instance_id(&self) -> Result<String, String> {
        self.row
            .instance_id
            .clone()
            .ok_or_else(|| "the environment has no instance".to_string())
    }

    /// Poll until the instance is running with an address.
    async fn await_instance(&self) -> Result<(), String> {
        let cfg = &self.deps.config.provider;
        let instance_id = self.instance_id()?;
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(cfg.provision_timeout_seconds);
        let mut wait = Duration::from_millis(cfg.poll_initial_ms);
        let mut started = false;
        loop {
            match self.provider().instance_state(&instance_id).await {
                Ok(InstanceState::Running { ip }) => {
                    let (_, port) = self.provider().ssh_endpoint(&ip);
                    let now = db_now(self.deps.clock.as_ref());
                    let env_id = self.row.id.clone();
                    let addr = ip.clone();
                    self.with_conn(async |c| {
                        store::set_address(c, &env_id, &addr, i32::from(port), now).await
                    })
                    .await?;
                    self.report(Event::InstanceReady { ip });
                    return Ok(());
                }
                Ok(InstanceState::Failed { message }) => {
                    return Err(format!("the instance failed: {message}"));
                }
                Ok(InstanceState::Gone) => return Err("the instance disappeared".into()),
                Ok(InstanceState::Stopped) if !started => {
                    started = true;
                    let _ = self.provider().start(&instance_id).await;
                }
                Ok(InstanceState::Stopped | InstanceState::Pending { .. }) => {}
                Err(ProviderError::Rejected { status, message }) => {
                    return Err(format!("the provider refused ({status}): {message}"));
                }
                Err(e) => {
                    tracing::debug!(environment = %self.row.id, error = %e, "poll failed; will poll again")
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the instance did not come up within {} s",
                    cfg.provision_timeout_seconds
                ));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(cfg.poll_max_ms));
        }
    }

    async fn ssh_target(&self) -> Result<SshTarget, String> {
        ssh_target(
            &self.row,
            self.provider(),
            &self.deps.sealer,
            Duration::from_secs(self.deps.config.provider.ssh_connect_timeout_seconds),
        )
    }

    /// Connect, retrying until the deadline (sshd comes up a little after the instance).
    async fn connect(&self, deadline: tokio::time::Instant) -> Result<SshClient, String> {
        let target = self.ssh_target().await?;
        let mut wait = Duration::from_millis(self.deps.config.provider.poll_initial_ms);
        loop {
            match SshClient::connect(&target).await {
                Ok(client) => return Ok(client),
                Err(e @ crate::ssh::client::SshError::HostKeyMismatch { .. }) => {
                    return Err(format!("refusing the environment's SSH server: {e}"));
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(format!("cannot reach the environment over SSH: {e}"));
                }
                Err(e) => {
                    tracing::debug!(environment = %self.row.id, error = %e, "SSH not ready; retrying")
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(self.deps.config.provider.poll_max_ms));
        }
    }

    /// Follow installation over SSH: stream the log, report progress markers, end with the
    /// installation's own verdict.
    async fn watch_installation(&self) -> Result<(), String> {
        let cfg = &self.deps.config.provider;
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(cfg.install_timeout_seconds);
        let client = self.connect(deadline).await?;
        let template = self.template().await.ok();
        let local_setup = template.map(|t| t.local_setup).unwrap_or_default();
        let plan = self.provider().install_plan(&local_setup);
        let (tx, rx) = mpsc::channel::<String>(LOG_LINE_BUFFER);
        let (seen_tx, seen) = tokio::sync::watch::channel(0usize);
        // Both tasks die with this one (an aborted watch must not leave a `tail -F` running).
        let writer = AbortOnDrop(tokio::spawn(self.log_writer(rx, seen_tx)));
        let log_client = client.clone();
        let log_command = plan.log_command.clone();
        let mut log_task = AbortOnDrop(tokio::spawn(async move {
            log_client.exec_lines(&log_command, tx).await
        }));
        let too_slow = || {
            format!(
                "installation did not finish within {} s",
                cfg.install_timeout_seconds
            )
        };
        let verdict = match &plan.status_command {
            Some(status_command) => {
                let status =
                    tokio::time::timeout_at(deadline, client.exec(status_command, 4096)).await;
                let status = match status {
                    Ok(Ok(out)) => out.status,
                    Ok(Err(e)) => {
                        return Err(format!("lost the environment while installing: {e}"));
                    }
                    Err(_) => return Err(too_slow()),
                };
                // The log follower (tail -F) never ends by itself: let it deliver what the log
                // holds, then stop it.
                settle(seen).await;
                log_task.0.abort();
                status
            }
            None => match tokio::time::timeout_at(deadline, &mut log_task.0).await {
                Ok(Ok(Ok(status))) => status,
                Ok(Ok(Err(e))) => {
                    return Err(format!("lost the environment while installing: {e}"));
                }
                Ok(Err(_)) => None,
                Err(_) => return Err(too_slow()),
            },
        };
        drop(log_task);
        // Let the writer store what was read before the verdict is published.
        let _ = (&mut { writer }.0).await;
        client.disconnect().await;
        let env_id = self.row.id.clone();
        match verdict {
            Some(0) | Some(2) => {
                let message = if verdict == Some(2) {
                    "Installation finished with recoverable errors"
                } else {
                    "Installation finished"
                };
                self.log_event("installation_complete", "info", message)
                    .await;
                let _ = self.feed.send(EnvUpdate::InstallationComplete {
                    environment_id: env_id,
                    status: Status::Running,
                    installation_status: "completed".into(),
                    message: message.into(),
                });
                self.report(Event::InstallComplete);
                Ok(())
            }
            other => {
                let error = match other {
                    Some(code) => format!("installation failed (exit status {code})"),
                    None => "installation ended without an exit status".to_string(),
                };
                self.log_event("installation_error", "error", &error).await;
                let _ = self.feed.send(EnvUpdate::InstallationError {
                    environment_id: env_id,
                    error: error.clone(),
                    is_critical: true,
                });
                Err(error)
            }
        }
    }

    /// Store (up to a bound) and publish installation lines; report progress markers.
    fn log_writer(
        &self,
        mut rx: mpsc::Receiver<String>,
        seen: tokio::sync::watch::Sender<usize>,
    ) -> impl Future<Output = ()> + use<> {
        let deps = self.deps.clone();
        let env_id = self.row.id.clone();
        let feed = self.feed.clone();
        let myself = self.myself.clone();
        let epoch = self.epoch;
        let mut best = self.row.progress.clamp(0, 100) as u8;
        let source = match deps.provider.kind() {
            crate::config::ProviderKind::Contabo => "cloud-init",
            crate::config::ProviderKind::Local => "local-setup",
        };
        async move {
            let mut stored = 0usize;
            while let Some(line) = rx.recv().await {
                let now = deps.clock.now();
                if let Some((percent, _)) = crate::templates::parse_progress(&line)
                    && percent > best
                {
                    best = percent;
                    let _ = myself.cast(EnvMsg::Outcome {
                        epoch,
                        event: Event::InstallProgress { percent },
                    });
                }
                if stored < MAX_STORED_LOG_LINES {
                    stored += 1;
                    let row = NewEvent {
                        environment_id: env_id.clone(),
                        occurred_at: crate::clock::to_db(now),
                        kind: "installation_log".into(),
                        level: "info".into(),
                        source: source.into(),
                        message: line.clone(),
                        status: None,
                        status_version: None,
                    };
                    if let Ok(mut conn) = deps.db.get().await
                        && let Err(e) = store::add_event(&mut conn, &row).await
                    {
                        tracing::warn!(environment = %env_id, error = %e, "could not store a log line");
                    }
                }
                seen.send_modify(|n| *n += 1);
                let _ = feed.send(EnvUpdate::InstallationLog {
                    environment_id: env_id.clone(),
                    data: line,
                    timestamp: now,
                });
            }
        }
    }

    async fn log_event(&self, kind: &str, level: &str, message: &str) {
        let row = NewEvent {
            environment_id: self.row.id.clone(),
            occurred_at: db_now(self.deps.clock.as_ref()),
            kind: kind.into(),
            level: level.into(),
            source: "server".into(),
            message: message.into(),
            status: None,
            status_version: None,
        };
        if let Ok(mut conn) = self.deps.db.get().await {
            let _ = store::add_event(&mut conn, &row).await;
        }
    }

    /// A power action, then wait for the instance to show its result.
    async fn power(&self, action: &str) -> Result<(), String> {
        let instance_id = self.instance_id()?;
        let provider = self.provider();
        let call = match action {
            "start" => provider.start(&instance_id).await,
            "stop" => provider.stop(&instance_id).await,
            _ => provider.restart(&instance_id).await,
        };
        call.map_err(|e| format!("{action} failed: {e}"))?;
        let want_running = action != "stop";
        let cfg = &self.deps.config.provider;
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(cfg.provision_timeout_seconds);
        let mut wait = Duration::from_millis(cfg.poll_initial_ms);
        loop {
            match provider.instance_state(&instance_id).await {
                Ok(InstanceState::Running { .. }) if want_running => break,
                Ok(InstanceState::Stopped) if !want_running => break,
                Ok(InstanceState::Failed { message }) => {
                    return Err(format!("{action} failed: {message}"));
                }
                Ok(InstanceState::Gone) => return Err("the instance disappeared".into()),
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("{action} did not complete in time"));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(cfg.poll_max_ms));
        }
        self.report(Event::ActionDone);
        Ok(())
    }

    async fn snapshot(&self, name: &str) -> Result<(), String> {
        let instance_id = self.instance_id()?;
        let snap = self
            .provider()
            .create_snapshot(&instance_id, name)
            .await
            .map_err(|e| format!("snapshot failed: {e}"))?;
        self.log_event(
            "info",
            "info",
            &format!("Snapshot {} ({}) created", snap.name, snap.id),
        )
        .await;
        self.report(Event::ActionDone);
        Ok(())
    }

    async fn restore(&self, snapshot_id: &str) -> Result<(), String> {
        let instance_id = self.instance_id()?;
        self.provider()
            .restore_snapshot(&instance_id, snapshot_id)
            .await
            .map_err(|e| format!("restore failed: {e}"))?;
        self.log_event("info", "info", &format!("Snapshot {snapshot_id} restored"))
            .await;
        self.report(Event::ActionDone);
        Ok(())
    }

    async fn delete(&self) -> Result<(), String> {
        let mut instance = self.row.instance_id.clone();
        if instance.is_none()
            && let Some(op) = &self.row.operation_id
        {
            // A create may have gone through unseen: find it before declaring nothing to delete.
            let spec = self.spec(op).await?;
            instance = self
                .provider()
                .find_instance(&spec)
                .await
                .map_err(|e| format!("cannot check for an instance to delete: {e}"))?;
        }
        if let Some(instance_id) = instance {
            let mut tries = 0;
            loop {
                match self.provider().delete(&instance_id).await {
                    Ok(()) | Err(ProviderError::NotFound) => break,
                    Err(ProviderError::Ambiguous(_) | ProviderError::Unavailable(_))
                        if tries < 5 =>
                    {
                        tries += 1;
                        tokio::time::sleep(RETRY_WAIT * tries).await;
                    }
                    Err(e) => return Err(format!("delete failed: {e}")),
                }
            }
        }
        self.report(Event::Deleted);
        Ok(())
    }

    /// Sample metrics over SSH at the configured interval while running.
    async fn sample_metrics(self) {
        let interval = Duration::from_secs(self.deps.config.environments.metrics_interval_seconds);
        let mut client: Option<SshClient> = None;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                let deadline = tokio::time::Instant::now() + interval;
                client = self.connect(deadline).await.ok();
            }
            let Some(c) = &client else { continue };
            match c.exec(metrics::COMMAND, METRICS_OUTPUT_LIMIT).await {
                Ok(out) => {
                    let text = String::from_utf8_lossy(&out.stdout);
                    if let Some(sample) = metrics::parse(&text, self.deps.clock.now()) {
                        let _ = self.myself.cast(EnvMsg::Sample(sample));
                    }
                }
                Err(e) => {
                    tracing::debug!(environment = %self.row.id, error = %e, "metrics sample failed");
                    client = None;
                }
            }
        }
    }
}

impl Actor for EnvironmentActor {
    type Msg = EnvMsg;
    type State = EnvState;
    type Arguments = EnvArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: EnvArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut conn = args.deps.db.get().await?;
        let row = store::get(&mut conn, &args.environment_id)
            .await?
            .ok_or("environment row not found")?;
        drop(conn);
        let machine = machine_from_row(&row);
        let env_cfg = &args.deps.config.environments;
        let max_samples = ((env_cfg.metrics_retention_hours * 3600)
            / env_cfg.metrics_interval_seconds.max(1))
        .clamp(1, 20_000) as usize;
        args.directory
            .set_phase(&args.directory_id, Some(machine.status.as_str()));
        let (feed, _) = broadcast::channel(ENV_FEED_CAPACITY);
        let mut state = EnvState {
            row,
            machine,
            epoch: 0,
            phase_tasks: Vec::new(),
            metrics_task: None,
            samples: VecDeque::new(),
            max_samples,
            feed,
            args,
        };
        // Resume: re-attach provider state and re-enter the persisted phase.
        let ctx = state.task_ctx(&myself);
        if let Ok(spec) = ctx
            .spec(state.row.operation_id.as_deref().unwrap_or(""))
            .await
            && let Err(e) = state.deps().provider.attach(&spec).await
        {
            tracing::warn!(environment = %state.id(), error = %e, "could not re-attach to the provider");
        }
        let status = state.machine.status;
        if status == Status::Snapshotting {
            let _ = myself.cast(EnvMsg::Outcome {
                epoch: 0,
                event: Event::Failed {
                    message: "a snapshot was interrupted by a restart; recover to continue".into(),
                },
            });
        }
        for effect in Machine::entry_effects(status, state.machine.has_instance) {
            state.run(&myself, effect);
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.args.pending.handled();
        match msg {
            EnvMsg::Command { event, reply } => {
                let result = state.apply(&myself, event).await?;
                let _ = reply.send(result);
            }
            EnvMsg::Outcome { epoch, event } => {
                if epoch != state.epoch {
                    tracing::debug!(environment = %state.id(), ?event, "stale outcome ignored");
                    return Ok(());
                }
                if let Err(rejected) = state.apply(&myself, event).await? {
                    tracing::debug!(environment = %state.id(), %rejected, "outcome not applicable");
                }
            }
            EnvMsg::Sample(sample) => state.add_sample(sample),
            EnvMsg::Metrics { since, reply } => {
                let current = state.samples.back().cloned();
                let samples = state
                    .samples
                    .iter()
                    .filter(|s| s.timestamp >= since)
                    .cloned()
                    .collect();
                let _ = reply.send((current, samples));
            }
            EnvMsg::Subscribe { reply } => {
                let _ = reply.send(state.feed.subscribe());
            }
            EnvMsg::Reload { reply } => {
                let mut conn = state.deps().db.get().await?;
                if let Some(row) = store::get(&mut conn, state.id()).await? {
                    state.row.name = row.name;
                    state.row.environment_variables = row.environment_variables;
                }
                drop(conn);
                let ctx = state.task_ctx(&myself);
                let op = state.row.operation_id.clone().unwrap_or_default();
                if let Ok(spec) = ctx.spec(&op).await {
                    let _ = state.deps().provider.attach(&spec).await;
                }
                let _ = reply.send(());
            }
            EnvMsg::Crash(message) => panic!("{message}"),
        }
        Ok(())
    }
}
