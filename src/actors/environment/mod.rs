//! The environments supervisor and its children, one [`actor::EnvironmentActor`] per environment.
//!
//! It starts an actor for every environment that is not terminated when the server starts, and
//! for each new one. A failed actor is restarted with exponential backoff within the restart
//! policy; past it the environment is put in `error` (recoverable with `POST /recover`) and its
//! actor stays down. Actors that end normally (terminated) are forgotten.

pub mod actor;
pub mod command;
pub mod create;
pub mod effects;
pub mod feed;
pub mod machine;
pub mod metrics;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use self::actor::{CommandReply, EnvArgs, EnvDeps, EnvMsg, EnvUpdate, EnvironmentActor};
use self::command::{NewEnvironment, Reply};
use self::machine::{Event, Machine};
use super::directory::{
    ChildExit, ChildRestarts, Directory, Pending, RestartDecision, RestartPolicy, child_exit,
};
use crate::clock::{db_now, from_db};
use crate::protocol::{EnvironmentStatus, StreamFrame};
use crate::store::environments::Environment;
use crate::store::environments::{self as store, NewEvent, StatusChange};

pub const SUPERVISOR_ID: &str = "environments";
const KIND: &str = "environment";

pub fn actor_id(environment_id: &str) -> String {
    format!("{KIND}:{environment_id}")
}

/// Live environment actors by environment id, for the front end to message directly. Written
/// only by the supervisor; the lock is held just to clone or replace a reference.
pub type EnvRegistry = Arc<RwLock<HashMap<String, EnvHandle>>>;

/// A live environment actor and the count of front-end messages waiting in its mailbox.
pub type EnvHandle = (ActorRef<EnvMsg>, Pending);

pub enum EnvironmentsMsg {
    /// Start the actor of this environment (new, resumed, or recovered after giving up).
    Spawn(String),
    /// Make sure the environment has a live actor (starting it with a clean restart record if it
    /// is down) and answer it; `None` when the environment is terminated or gone. Spawning is
    /// idempotent: never two actors for one environment.
    Ensure {
        environment_id: String,
        reply: RpcReplyPort<Option<EnvHandle>>,
    },
    /// `Command::Create`: validated and inserted by a task, which reports back with `Created`.
    Create {
        new: Box<NewEnvironment>,
        reply: CommandReply,
    },
    /// The create task stored the row: start the actor, then answer the caller.
    Created {
        environment: Box<Environment>,
        reply: CommandReply,
    },
    /// Scheduled restart after a backoff.
    Respawn(String),
    /// This node holds (or just claimed) the environment's lease: start its actor unless one
    /// runs or it was given up on within the restart window.
    Adopt(String),
    /// This node no longer holds the environment's lease: stop its actor (no writes).
    Release(String),
    /// Fault injection: make one environment actor panic. Replies whether it existed.
    Crash {
        environment_id: String,
        reply: RpcReplyPort<bool>,
    },
    /// Fault injection: make the supervisor itself panic.
    CrashSelf(String),
}

pub struct EnvironmentsSupervisor;

pub struct EnvironmentsArgs {
    pub pending: Pending,
    pub directory: Directory,
    pub policy: RestartPolicy,
    pub deps: Arc<EnvDeps>,
    pub registry: EnvRegistry,
}

pub struct EnvironmentsState {
    args: EnvironmentsArgs,
    by_actor: HashMap<ActorId, (String, String)>, // actor → (environment id, owner)
    restarts: ChildRestarts,
}

impl EnvironmentsState {
    async fn spawn(
        &mut self,
        myself: &ActorRef<EnvironmentsMsg>,
        environment_id: &str,
    ) -> Result<(), ActorProcessingErr> {
        // A draining node hands its leases back: an actor started now (by the lease reconciler
        // or a command arriving meanwhile) would run on after the hand-back, beside the new
        // owner's.
        if self.registry_has(environment_id) || self.args.deps.cluster.is_draining() {
            return Ok(());
        }
        let node = self.args.deps.cluster.node.clone();
        let owner = {
            let mut conn = self.args.deps.db.get().await?;
            // Only under this node's lease: another node's environment is left to it.
            if crate::store::leases::lease_of(&mut conn, environment_id, &node)
                .await?
                .is_none()
            {
                return Ok(());
            }
            match store::get(&mut conn, environment_id).await? {
                Some(row) if !row.status.is_final() => row.user_id,
                _ => return Ok(()),
            }
        };
        let pending = Pending::default();
        let id = actor_id(environment_id);
        // In the directory before it starts, so the actor can record its phase from pre_start.
        self.args.directory.starting(
            KIND,
            &id,
            Some(SUPERVISOR_ID),
            Some(&owner),
            self.args.policy,
            pending.clone(),
        );
        let spawned = Actor::spawn_linked(
            None,
            EnvironmentActor,
            EnvArgs {
                environment_id: environment_id.to_string(),
                deps: self.args.deps.clone(),
                pending: pending.clone(),
                directory: self.args.directory.clone(),
                directory_id: id.clone(),
            },
            myself.get_cell(),
        )
        .await;
        let actor = match spawned {
            Ok((actor, _)) => actor,
            Err(e) => {
                // pre_start failed (e.g. the database was unreachable): count it like a crash.
                tracing::error!(environment = environment_id, error = %e, "environment actor failed to start");
                return self
                    .failed(myself, environment_id, &owner, &e.to_string())
                    .await;
            }
        };
        self.args.directory.started(
            KIND,
            &id,
            Some(SUPERVISOR_ID),
            Some(&owner),
            self.args.policy,
            pending.clone(),
        );
        self.by_actor
            .insert(actor.get_id(), (environment_id.to_string(), owner));
        self.args
            .registry
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(environment_id.to_string(), (actor, pending));
        Ok(())
    }

    fn live(&self, environment_id: &str) -> Option<EnvHandle> {
        self.args
            .registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(environment_id)
            .cloned()
    }

    fn registry_has(&self, environment_id: &str) -> bool {
        self.args
            .registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(environment_id)
    }

    fn forget(&mut self, actor: ActorId) -> Option<(String, String)> {
        let (env_id, owner) = self.by_actor.remove(&actor)?;
        self.args
            .registry
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&env_id);
        Some((env_id, owner))
    }

    async fn failed(
        &mut self,
        myself: &ActorRef<EnvironmentsMsg>,
        environment_id: &str,
        owner: &str,
        error: &str,
    ) -> Result<(), ActorProcessingErr> {
        let id = actor_id(environment_id);
        let policy = self.args.policy;
        if !self.args.directory.has(&id) {
            // Failed while loading, before it was listed: list it so the failure shows.
            self.args.directory.started(
                KIND,
                &id,
                Some(SUPERVISOR_ID),
                Some(owner),
                policy,
                Pending::default(),
            );
        }
        let directory = self.args.directory.clone();
        match self.restarts.failed(&directory, environment_id, &id, error) {
            RestartDecision::Restart(n) => {
                let base = self.args.deps.config.environments.restart_backoff_ms.max(1);
                let delay = Duration::from_millis(base.saturating_mul(1 << (n - 1).min(10)));
                tracing::warn!(actor = %id, restart = n, delay_ms = delay.as_millis() as u64, error, "environment actor failed; restarting after backoff");
                self.args.directory.set_phase(&id, Some("restarting"));
                let env_id = environment_id.to_string();
                myself.send_after(delay, move || EnvironmentsMsg::Respawn(env_id));
            }
            RestartDecision::GiveUp => {
                tracing::error!(actor = %id, error, "environment actor failed past its restart limit; environment set to error");
                let message = format!(
                    "The environment's actor failed {} times within {} s ({error}); recover to retry",
                    policy.limit + 1,
                    policy.window.num_seconds()
                );
                if let Err(e) = self.mark_error(environment_id, &message).await {
                    tracing::error!(environment = environment_id, error = %e, "could not record the failure");
                }
            }
        }
        Ok(())
    }

    /// The actor is down for good: persist `error` on its behalf (keeping the failed phase).
    async fn mark_error(&self, environment_id: &str, message: &str) -> anyhow::Result<()> {
        let deps = &self.args.deps;
        let mut conn = deps.db.get().await?;
        let Some(row) = store::get(&mut conn, environment_id).await? else {
            return Ok(());
        };
        let Some(lease) =
            crate::store::leases::lease_of(&mut conn, environment_id, &deps.cluster.node).await?
        else {
            return Ok(()); // another node runs it now
        };
        let machine = Machine {
            status: row.status,
            phase: row.phase,
            progress: row.progress.clamp(0, 100) as u8,
            has_instance: row.instance_id.is_some(),
            error: row.error_message.clone(),
        };
        let Ok((next, _)) = machine.step(&Event::Failed {
            message: message.to_string(),
        }) else {
            return Ok(()); // already in error (or terminated)
        };
        let now = db_now(deps.clock.as_ref());
        let change = StatusChange {
            status: next.status,
            progress: i32::from(next.progress),
            phase: next.phase,
            message: Some(message.to_string()),
            error_message: Some(message.to_string()),
            installation_completed: row.installation_completed,
            updated_at: now,
        };
        let event = NewEvent {
            environment_id: environment_id.to_string(),
            occurred_at: now,
            kind: "status".into(),
            level: "error".into(),
            source: "supervisor".into(),
            message: message.to_string(),
            status: Some(change.status),
            status_version: None,
            progress: None,
        };
        let version = match store::record_transition(&mut conn, &lease, &change, event).await {
            Ok(version) => version,
            Err(crate::store::StoreError::Fenced(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let status = EnvironmentStatus {
            environment_id: environment_id.to_string(),
            status: next.status,
            status_version: version,
            progress: next.progress,
            message: Some(message.to_string()),
            timestamp: from_db(now),
        };
        actor::signal_change(deps, environment_id, &format!("status {version}")).await;
        // No subscriber is fine: the change is persisted.
        let _ = deps.bus.send(EnvUpdate {
            owner: row.user_id,
            frame: StreamFrame::EnvironmentStatus(status),
        });
        Ok(())
    }
}

impl Actor for EnvironmentsSupervisor {
    type Msg = EnvironmentsMsg;
    type State = EnvironmentsState;
    type Arguments = EnvironmentsArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: EnvironmentsArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Every environment not in a final state whose lease this node holds gets its actor back
        // (the lease reconciler adopts claimed ones later).
        let ids = {
            let mut conn = args.deps.db.get().await?;
            crate::store::leases::owned_ids(&mut conn, &args.deps.cluster.node).await?
        };
        args.registry
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        for id in ids {
            args.pending.sent();
            let _ = myself.cast(EnvironmentsMsg::Spawn(id));
        }
        Ok(EnvironmentsState {
            restarts: ChildRestarts::new(args.policy),
            args,
            by_actor: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.args.pending.handled();
        match msg {
            EnvironmentsMsg::Spawn(environment_id) => {
                // An explicit spawn (create, recover) starts from a clean restart record.
                state.restarts.forget(&environment_id);
                state.spawn(&myself, &environment_id).await?;
            }
            EnvironmentsMsg::Respawn(environment_id) => {
                state.spawn(&myself, &environment_id).await?;
            }
            EnvironmentsMsg::Adopt(environment_id) => {
                let now = state.args.directory.now();
                if !state.restarts.is_down(&environment_id, now) {
                    state.spawn(&myself, &environment_id).await?;
                }
            }
            EnvironmentsMsg::Release(environment_id) => {
                if let Some((actor, _)) = state.live(&environment_id) {
                    actor.stop(Some("lease lost".into()));
                }
            }
            EnvironmentsMsg::Ensure {
                environment_id,
                reply,
            } => {
                if !state.registry_has(&environment_id) {
                    state.restarts.forget(&environment_id);
                    state.spawn(&myself, &environment_id).await?;
                }
                let _ = reply.send(state.live(&environment_id));
            }
            EnvironmentsMsg::Create { new, reply } => {
                let deps = state.args.deps.clone();
                let pending = state.args.pending.clone();
                tokio::spawn(async move {
                    match create::create(&deps, *new).await {
                        Ok(environment) => {
                            pending.sent();
                            let created = EnvironmentsMsg::Created {
                                environment: Box::new(environment),
                                reply,
                            };
                            if let Err(e) = myself.cast(created) {
                                pending.handled();
                                tracing::error!(error = %e, "environment stored but the supervisor is gone; it starts with the next server start");
                            }
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                });
            }
            EnvironmentsMsg::Created { environment, reply } => {
                state.restarts.forget(&environment.id);
                state.spawn(&myself, &environment.id).await?;
                let _ = reply.send(Ok(Reply::Environment(environment)));
            }
            EnvironmentsMsg::Crash {
                environment_id,
                reply,
            } => {
                let target = state
                    .args
                    .registry
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&environment_id)
                    .cloned();
                let found = match target {
                    Some((actor, pending)) => {
                        pending.sent();
                        actor
                            .cast(EnvMsg::Crash(format!(
                                "fault injection: crash requested for {}",
                                actor_id(&environment_id)
                            )))
                            .is_ok()
                    }
                    None => false,
                };
                let _ = reply.send(found);
            }
            EnvironmentsMsg::CrashSelf(message) => panic!("{message}"),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let Some((actor, exit)) = child_exit(event) else {
            return Ok(());
        };
        let Some((env_id, owner)) = state.forget(actor) else {
            return Ok(());
        };
        match exit {
            ChildExit::Failed(error) => state.failed(&myself, &env_id, &owner, &error).await?,
            ChildExit::Stopped(reason) => {
                tracing::debug!(environment = %env_id, ?reason, "environment actor stopped");
                state.restarts.forget(&env_id);
                state.args.directory.remove(&actor_id(&env_id));
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state
            .args
            .registry
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        Ok(())
    }
}
