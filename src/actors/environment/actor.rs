//! The Environment actor: the only code that changes an environment. It loads its row on start,
//! runs the state machine, persists every transition (monotonic `status_version` + an event row),
//! publishes it, and carries out the machine's effects in tasks it owns, which report back as
//! messages. After a crash or a server restart it resumes from the persisted state.

use std::collections::VecDeque;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::effects::TaskCtx;
pub use super::feed::{ENV_FEED_CAPACITY, EnvUpdate};
use super::machine::{Effect, Event, Machine, Rejected, Status};
use super::metrics::Sample;
use crate::actors::directory::Pending;
use crate::clock::{db_now, from_db};
use crate::config::Config;
use crate::provider::Provider;
use crate::secrets::Sealer;
use crate::store::Db;
use crate::store::environments::{self as store, Environment, NewEvent, StatusChange};

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
