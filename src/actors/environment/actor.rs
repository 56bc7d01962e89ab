//! The Environment actor: the only code that changes an environment. It loads its row on start,
//! runs the state machine, persists every transition (monotonic `status_version` + an event row),
//! publishes it on its feed ([`super::feed`]), and carries out the machine's effects in tasks it
//! owns ([`super::effects`]), which report back as messages. Every command for one environment
//! ([`super::command::Command`]) is a message here, so checks and changes on one environment never
//! race. After a crash or a server restart it resumes from the persisted state.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

use super::command::{Command, CommandError, Reply};
use super::effects::TaskCtx;
pub use super::feed::{ENV_FEED_CAPACITY, EnvUpdate};
use super::machine::{Effect, Event, Machine, Rejected, Status};
use crate::actors::directory::Pending;
use crate::clock::{db_now, from_db};
use crate::config::Config;
use crate::protocol::{EnvironmentStatus, StreamFrame};
use crate::provider::Provider;
use crate::secrets::Sealer;
use crate::ssh::client::SshTarget;
use crate::store::Db;
use crate::store::StoreError;
use crate::store::environments::{self as store, Environment, Lease, NewEvent, StatusChange};

/// Everything an environment actor needs from the application.
pub struct EnvDeps {
    pub db: Db,
    pub clock: crate::clock::SharedClock,
    pub provider: Arc<dyn Provider>,
    pub sealer: Sealer,
    pub config: Config,
    /// Every status change of every environment (the events WebSocket filters by user).
    pub bus: broadcast::Sender<EnvUpdate>,
    /// This node's leases and signals: an actor runs only under its environment's lease.
    pub cluster: Arc<crate::cluster::leases::Membership>,
    /// SSH connections shared by each environment's terminals and metrics sampler.
    pub ssh: Arc<crate::ssh::pool::SshPool>,
}

/// Why an event was not applied.
#[derive(Debug)]
pub enum Refused {
    /// The state machine does not allow it now.
    Rejected(Rejected),
    /// This node no longer holds the environment's lease: the actor stops; the command should
    /// be sent again (it reaches the new owner).
    LeaseLost,
}

impl From<Refused> for CommandError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Rejected(rejected) => CommandError::InvalidState(rejected),
            Refused::LeaseLost => CommandError::Busy,
        }
    }
}

/// The answer to a command.
pub type CommandReply = RpcReplyPort<Result<Reply, CommandError>>;

pub enum EnvMsg {
    /// A command for this environment (never `Create` or `DeleteAllForUser`).
    Command {
        command: Command,
        reply: CommandReply,
    },
    /// A restore whose snapshot was found at the provider: apply it now.
    RestoreChecked {
        snapshot_id: String,
        reply: CommandReply,
    },
    /// Delete (unless already deleting) and answer once `terminated` is persisted — or with an
    /// error if the delete fails (account deletion waits on this instead of polling).
    DeleteAndWait {
        done: oneshot::Sender<Result<(), CommandError>>,
    },
    /// The result of an effect, tagged with the epoch it was started in.
    Outcome { epoch: u64, event: Event },
    /// A feed of this environment's updates.
    Subscribe {
        reply: RpcReplyPort<broadcast::Receiver<EnvUpdate>>,
    },
    /// How a terminal reaches this environment over SSH (address, unsealed key, pinned host key),
    /// or why it cannot yet.
    SshTarget {
        reply: RpcReplyPort<anyhow::Result<SshTarget>>,
    },
    /// Fault injection: panic in the handler.
    Crash(String),
}

/// Signal a change of environment `id` to every node (see [`EnvState::signal`]).
pub(super) async fn signal_change(deps: &EnvDeps, id: &str, what: &str) {
    let payload = format!("{id} {what}");
    if let Err(e) = deps
        .cluster
        .signals
        .publish(crate::cluster::signals::Topic::Environment, &payload)
        .await
    {
        tracing::debug!(environment = id, error = %e, "could not signal a change to the other nodes");
    }
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
    /// The lease this actor runs under; every write names it.
    lease: Lease,
    machine: Machine,
    /// Bumped when the status changes; outcomes of older epochs are stale.
    epoch: u64,
    phase_tasks: Vec<JoinHandle<()>>,
    metrics_task: Option<JoinHandle<()>>,
    feed: broadcast::Sender<EnvUpdate>,
    /// Account deletions waiting for `terminated` (answered with an error if the delete fails).
    delete_waiters: Vec<oneshot::Sender<Result<(), CommandError>>>,
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
        status: row.status,
        phase: row.phase,
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

    /// To this environment's subscribers, and status changes to the all-environments bus too
    /// (no subscriber is fine: the change is persisted).
    fn publish(&self, frame: StreamFrame) {
        let update = EnvUpdate {
            owner: self.row.user_id.clone(),
            frame,
        };
        let _ = self.feed.send(update.clone());
        if update.frame.as_status().is_some() {
            let _ = self.deps().bus.send(update);
        }
    }

    /// This node lost the environment's lease: stop here (another node's actor takes over).
    fn lease_lost(&mut self, myself: &ActorRef<EnvMsg>, why: &str) -> Refused {
        self.deps().cluster.lost(self.id(), why);
        for task in self.phase_tasks.drain(..) {
            task.abort();
        }
        if let Some(task) = self.metrics_task.take() {
            task.abort();
        }
        myself.stop(Some(format!("lease lost: {why}")));
        Refused::LeaseLost
    }

    /// Tell the other nodes this environment changed (`what`: `status <version>` or `event`);
    /// they read the change from the store (see [`crate::actors::relay`]). A failure is logged:
    /// the change is stored, and their streams catch up at the next change.
    async fn signal(&self, what: &str) {
        signal_change(self.deps(), self.id(), what).await;
    }

    /// Apply an event: step the machine, persist, publish, run effects.
    async fn apply(
        &mut self,
        myself: &ActorRef<EnvMsg>,
        event: Event,
    ) -> Result<Result<Status, Refused>, ActorProcessingErr> {
        let (next, effects) = match self.machine.step(&event) {
            Ok(step) => step,
            Err(rejected) => return Ok(Err(Refused::Rejected(rejected))),
        };
        if !self.deps().cluster.guard.valid() {
            return Ok(Err(self.lease_lost(
                myself,
                "no heartbeat of this node reached the store in time",
            )));
        }
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
        if (status_changed || progress_changed || next != self.machine)
            && !self.persist(&next, &event).await?
        {
            return Ok(Err(
                self.lease_lost(myself, "another node holds the lease (fenced)")
            ));
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
        self.settle_delete_waiters();
        if self.machine.status.is_final() {
            myself.stop(Some("terminated".into()));
        }
        Ok(Ok(self.machine.status))
    }

    /// Persist and publish a step; `false` when the write was fenced (the lease is lost).
    async fn persist(&mut self, next: &Machine, event: &Event) -> Result<bool, ActorProcessingErr> {
        let now = db_now(self.deps().clock.as_ref());
        let message = describe(next, event);
        let change = StatusChange {
            status: next.status,
            progress: i32::from(next.progress),
            phase: next.phase,
            message: Some(message.clone()),
            error_message: next.error.clone(),
            installation_completed: self.row.installation_completed
                || (next.status == Status::Running && self.machine.status == Status::Installing),
            updated_at: now,
        };
        let status_changed = next.status != self.machine.status;
        let mut conn = self.deps().db.get().await?;
        let written = if status_changed {
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
                status: Some(next.status),
                status_version: None,
                progress: None,
            };
            store::record_transition(&mut conn, &self.lease, &change, row).await
        } else {
            // Progress within a phase: no new version, no event row.
            store::update_progress(&mut conn, &self.lease, &change)
                .await
                .map(|_| self.row.status_version)
        };
        let version = match written {
            Ok(version) => version,
            Err(StoreError::Fenced(_)) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        drop(conn);
        self.signal(&format!("status {version}")).await;
        self.row.status = change.status;
        self.row.status_version = version;
        self.row.progress = change.progress;
        self.row.phase = change.phase;
        self.row.message = change.message.clone();
        self.row.error_message = change.error_message.clone();
        self.row.installation_completed = change.installation_completed;
        self.publish(StreamFrame::EnvironmentStatus(EnvironmentStatus {
            environment_id: self.id().to_string(),
            status: next.status,
            status_version: version,
            progress: next.progress,
            message: Some(message),
            timestamp: from_db(now),
        }));
        Ok(true)
    }

    fn task_ctx(&self, myself: &ActorRef<EnvMsg>) -> TaskCtx {
        TaskCtx {
            myself: myself.clone(),
            epoch: self.epoch,
            deps: self.deps().clone(),
            row: self.row.clone(),
            lease: self.lease.clone(),
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

    /// A command for this environment: plain actions step the machine; the rest have their own
    /// handling (provider calls that may be slow run in tasks that answer the caller).
    async fn command(
        &mut self,
        myself: &ActorRef<EnvMsg>,
        command: Command,
        reply: CommandReply,
    ) -> Result<(), ActorProcessingErr> {
        let provider = self.deps().provider.clone();
        match command {
            Command::Update {
                name,
                environment_variables,
                ..
            } => {
                let result = self.update(myself, name, environment_variables).await;
                let _ = reply.send(result);
            }
            Command::Snapshot { .. }
            | Command::ListSnapshots { .. }
            | Command::RestoreSnapshot { .. }
                if !provider.capabilities().snapshots =>
            {
                let _ = reply.send(Err(CommandError::Unsupported(
                    "This provider cannot take snapshots".into(),
                )));
            }
            Command::ListSnapshots { .. } => {
                let instance = self.row.instance_id.clone();
                tokio::spawn(async move {
                    let result = match instance {
                        Some(id) => provider.list_snapshots(&id).await.map(Reply::Snapshots),
                        None => Ok(Reply::Snapshots(Vec::new())),
                    };
                    let _ = reply.send(result.map_err(CommandError::from));
                });
            }
            Command::RestoreSnapshot { snapshot_id, .. } => {
                let Some(instance) = self.row.instance_id.clone() else {
                    let _ = reply.send(Err(CommandError::NotFound("Snapshot")));
                    return Ok(());
                };
                let me = myself.clone();
                let pending = self.args.pending.clone();
                tokio::spawn(async move {
                    match provider.list_snapshots(&instance).await {
                        Ok(list) if list.iter().any(|s| s.id == snapshot_id) => {
                            pending.sent();
                            if let Err(e) = me.cast(EnvMsg::RestoreChecked { snapshot_id, reply }) {
                                pending.handled();
                                tracing::debug!(error = %e, "environment stopped before the restore");
                            }
                        }
                        Ok(_) => {
                            let _ = reply.send(Err(CommandError::NotFound("Snapshot")));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e.into()));
                        }
                    }
                });
            }
            Command::Resize { size, .. } => {
                let result = if !provider.sizes().iter().any(|s| s.slug == size) {
                    Err(CommandError::Invalid(vec![crate::error::FieldError::new(
                        "size",
                        "unknown",
                        format!("Unknown size '{size}'"),
                    )]))
                } else {
                    Err(CommandError::Unsupported(format!(
                        "The {} provider cannot resize an environment",
                        provider.kind().as_str()
                    )))
                };
                let _ = reply.send(result);
            }
            command => {
                let result = match command.machine_event() {
                    Some(event) => self
                        .apply(myself, event)
                        .await?
                        .map(Reply::Accepted)
                        .map_err(CommandError::from),
                    None => Err(CommandError::Internal(anyhow::anyhow!(
                        "command {} does not go to an environment actor",
                        command.verb()
                    ))),
                };
                let _ = reply.send(result);
            }
        }
        Ok(())
    }

    /// Rename and/or replace the variables; a name taken by another live environment of the user
    /// is refused by the store's unique index in the same statement.
    async fn update(
        &mut self,
        myself: &ActorRef<EnvMsg>,
        name: Option<String>,
        variables: Option<std::collections::BTreeMap<String, String>>,
    ) -> Result<Reply, CommandError> {
        let variables = variables
            .map(|v| serde_json::to_string(&v))
            .transpose()
            .map_err(anyhow::Error::from)?;
        let now = db_now(self.deps().clock.as_ref());
        let mut conn = self.deps().db.get().await?;
        let updated = match store::update_settings(
            &mut conn,
            &self.lease,
            name.as_deref(),
            variables.as_deref(),
            now,
        )
        .await
        {
            Ok(Some(updated)) => updated,
            Ok(None) => return Err(CommandError::NameTaken(name.unwrap_or_default())),
            Err(StoreError::Fenced(_)) => {
                return Err(self
                    .lease_lost(myself, "another node holds the lease (fenced)")
                    .into());
            }
            Err(e) => return Err(e.into()),
        };
        drop(conn);
        self.row.name = updated.name.clone();
        self.row.environment_variables = updated.environment_variables.clone();
        self.row.updated_at = updated.updated_at;
        // Let the provider pick up the new settings for what it does next.
        let ctx = self.task_ctx(myself);
        let op = self.row.operation_id.clone().unwrap_or_default();
        match ctx.spec(&op).await {
            Ok(spec) => {
                if let Err(e) = self.deps().provider.attach(&spec).await {
                    tracing::warn!(environment = %self.id(), error = %e, "provider did not take the new settings");
                }
            }
            Err(e) => {
                tracing::warn!(environment = %self.id(), error = %e, "cannot describe the environment to its provider")
            }
        }
        Ok(Reply::Environment(Box::new(updated)))
    }

    /// Account deletion: delete, and answer `done` once terminated.
    async fn delete_and_wait(
        &mut self,
        myself: &ActorRef<EnvMsg>,
        done: oneshot::Sender<Result<(), CommandError>>,
    ) -> Result<(), ActorProcessingErr> {
        if self.machine.status == Status::Deleting {
            self.delete_waiters.push(done);
            return Ok(());
        }
        match self.apply(myself, Event::Delete).await? {
            Ok(Status::Terminated) => {
                let _ = done.send(Ok(()));
            }
            Ok(_) => self.delete_waiters.push(done),
            Err(refused) => {
                let _ = done.send(Err(refused.into()));
            }
        }
        Ok(())
    }

    /// Answer waiting account deletions when the delete ended (terminated) or failed (error).
    fn settle_delete_waiters(&mut self) {
        let outcome = match self.machine.status {
            Status::Terminated => Ok(()),
            Status::Error => Err(self
                .machine
                .error
                .clone()
                .unwrap_or_else(|| "the delete failed".into())),
            _ => return,
        };
        for waiter in self.delete_waiters.drain(..) {
            let _ = waiter.send(outcome.clone().map_err(|e| {
                CommandError::Pending(format!("An environment could not be deleted: {e}"))
            }));
        }
    }

    fn ssh_target(&self) -> anyhow::Result<SshTarget> {
        crate::ssh::target::ssh_target(
            &self.row,
            self.deps().provider.as_ref(),
            &self.deps().sealer,
            std::time::Duration::from_secs(self.deps().config.provider.ssh_connect_timeout_seconds),
        )
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
        let lease = crate::store::leases::lease_of(
            &mut conn,
            &args.environment_id,
            &args.deps.cluster.node,
        )
        .await?
        .ok_or("this node does not hold the environment's lease")?;
        drop(conn);
        let machine = machine_from_row(&row);
        args.directory
            .set_phase(&args.directory_id, Some(machine.status.as_str()));
        let (feed, _) = broadcast::channel(ENV_FEED_CAPACITY);
        let mut state = EnvState {
            row,
            lease,
            machine,
            epoch: 0,
            phase_tasks: Vec::new(),
            metrics_task: None,
            feed,
            delete_waiters: Vec::new(),
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
            state.args.pending.sent();
            if myself
                .cast(EnvMsg::Outcome {
                    epoch: 0,
                    event: Event::Failed {
                        message: "a snapshot was interrupted by a restart; recover to continue"
                            .into(),
                    },
                })
                .is_err()
            {
                state.args.pending.handled();
            }
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
            EnvMsg::Command { command, reply } => state.command(&myself, command, reply).await?,
            EnvMsg::RestoreChecked { snapshot_id, reply } => {
                let result = state
                    .apply(&myself, Event::RestoreSnapshot { snapshot_id })
                    .await?
                    .map(Reply::Accepted)
                    .map_err(CommandError::from);
                let _ = reply.send(result);
            }
            EnvMsg::DeleteAndWait { done } => state.delete_and_wait(&myself, done).await?,
            EnvMsg::Outcome { epoch, event } => {
                if epoch != state.epoch {
                    tracing::debug!(environment = %state.id(), ?event, "stale outcome ignored");
                    return Ok(());
                }
                if let Err(refused) = state.apply(&myself, event).await? {
                    tracing::debug!(environment = %state.id(), ?refused, "outcome not applicable");
                }
            }
            EnvMsg::Subscribe { reply } => {
                let _ = reply.send(state.feed.subscribe());
            }
            EnvMsg::SshTarget { reply } => {
                let _ = reply.send(state.ssh_target());
            }
            EnvMsg::Crash(message) => panic!("{message}"),
        }
        Ok(())
    }
}
