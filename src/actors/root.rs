//! The root supervisor: starts the sessions and environments supervisors and restarts either one
//! within the restart policy (their children die with them and come back on demand). Past the
//! limit a supervisor stays down, `/health/ready` turns 503 and ops see the failure.

use std::sync::{Arc, RwLock};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::directory::{ChildRestarts, Directory, Pending, RestartDecision, RestartPolicy};
use super::environment::actor::EnvDeps;
use super::environment::{
    self, EnvRegistry, EnvironmentsArgs, EnvironmentsMsg, EnvironmentsSupervisor,
};
use super::session::{self, SessionsArgs, SessionsMsg, SessionsSupervisor};

pub const ROOT_ID: &str = "root";

/// The current incarnation of a supervisor, swapped by the root when it restarts one. The lock is
/// only held to clone or replace the reference.
pub type Slot<M> = Arc<RwLock<Option<ActorRef<M>>>>;

pub fn read_slot<M: ractor::Message>(slot: &Slot<M>) -> Option<ActorRef<M>> {
    slot.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn write_slot<M: ractor::Message>(slot: &Slot<M>, value: Option<ActorRef<M>>) {
    *slot.write().unwrap_or_else(|e| e.into_inner()) = value;
}

/// The root takes no messages; it only supervises.
pub enum RootMsg {}

pub struct RootSupervisor;

pub struct RootArgs {
    pub directory: Directory,
    pub policy: RestartPolicy,
    pub session_idle: std::time::Duration,
    pub sessions: Slot<SessionsMsg>,
    pub environments: Slot<EnvironmentsMsg>,
    pub sessions_pending: Pending,
    pub environments_pending: Pending,
    pub env_deps: Arc<EnvDeps>,
    pub env_registry: EnvRegistry,
}

pub struct RootState {
    args: RootArgs,
    restarts: ChildRestarts,
}

impl RootState {
    async fn start_sessions(&self, root: ActorCell) -> Result<(), ActorProcessingErr> {
        let a = &self.args;
        a.sessions_pending.reset();
        let (actor, _) = Actor::spawn_linked(
            None,
            SessionsSupervisor,
            SessionsArgs {
                directory: a.directory.clone(),
                policy: a.policy,
                idle_after: a.session_idle,
                pending: a.sessions_pending.clone(),
            },
            root,
        )
        .await?;
        a.directory.started(
            "supervisor",
            session::SUPERVISOR_ID,
            Some(ROOT_ID),
            None,
            a.policy,
            a.sessions_pending.clone(),
        );
        write_slot(&a.sessions, Some(actor));
        Ok(())
    }

    async fn start_environments(&self, root: ActorCell) -> Result<(), ActorProcessingErr> {
        let a = &self.args;
        a.environments_pending.reset();
        let (actor, _) = Actor::spawn_linked(
            None,
            EnvironmentsSupervisor,
            EnvironmentsArgs {
                pending: a.environments_pending.clone(),
                directory: a.directory.clone(),
                policy: a.policy,
                deps: a.env_deps.clone(),
                registry: a.env_registry.clone(),
            },
            root,
        )
        .await?;
        a.directory.started(
            "supervisor",
            environment::SUPERVISOR_ID,
            Some(ROOT_ID),
            None,
            a.policy,
            a.environments_pending.clone(),
        );
        write_slot(&a.environments, Some(actor));
        Ok(())
    }
}

impl Actor for RootSupervisor {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RootArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        args.directory
            .started("root", ROOT_ID, None, None, args.policy, Pending::default());
        let state = RootState {
            restarts: ChildRestarts::new(args.policy),
            args,
        };
        state.start_sessions(myself.get_cell()).await?;
        state.start_environments(myself.get_cell()).await?;
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {}
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let SupervisionEvent::ActorFailed(cell, error) = event else {
            // Started/terminated children and group changes need nothing from the root; the
            // override matters because ractor's default would stop the root here.
            return Ok(());
        };
        let failed = cell.get_id();
        let is = |slot_id: Option<ractor::ActorId>| slot_id == Some(failed);
        let sessions_id = read_slot(&state.args.sessions).map(|a| a.get_id());
        let environments_id = read_slot(&state.args.environments).map(|a| a.get_id());
        let id = if is(sessions_id) {
            session::SUPERVISOR_ID
        } else if is(environments_id) {
            environment::SUPERVISOR_ID
        } else {
            return Ok(());
        };
        let text = error.to_string();
        let directory = state.args.directory.clone();
        // Its children were stopped with it.
        directory.remove_descendants(id);
        match state.restarts.failed(&directory, id, id, &text) {
            RestartDecision::Restart(n) => {
                tracing::warn!(actor = id, restart = n, error = %text, "supervisor failed; restarting");
                if id == session::SUPERVISOR_ID {
                    state.start_sessions(myself.get_cell()).await?;
                } else {
                    state.start_environments(myself.get_cell()).await?;
                }
            }
            RestartDecision::GiveUp => {
                tracing::error!(actor = id, error = %text, "supervisor failed past its restart limit; leaving it down");
                if id == session::SUPERVISOR_ID {
                    write_slot(&state.args.sessions, None);
                } else {
                    write_slot(&state.args.environments, None);
                }
            }
        }
        Ok(())
    }
}
