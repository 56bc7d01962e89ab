//! The sessions supervisor and its children, one UserSession actor per login session.
//!
//! A UserSession is the live side of a login: it starts on login (or on first use after a server
//! restart), stops on logout, revocation, password change or when idle, and will own the session's
//! WebSocket connections and terminals. The supervisor restarts a failed session actor within the
//! restart policy and leaves it down past it, recording the failure for ops.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration as StdDuration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::time::Instant;

use super::directory::{
    ChildExit, ChildRestarts, Directory, Pending, RestartDecision, RestartPolicy, child_exit,
};
use crate::actors::terminal::{Attachment, Stats, TerminalActor, TerminalArgs, TerminalMsg};

/// Why a terminal could not be opened or resumed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("this session has ended")]
    SessionEnded,
    /// The session holds this many terminals already, over all nodes
    /// (`terminals.max_terminals_per_session`).
    #[error(
        "too many open terminals in this session ({0}); close some or let detached ones expire"
    )]
    TooMany(usize),
    /// A mailbox on the way is full, or the session is restarting: try again shortly.
    #[error("the server is busy; try again shortly")]
    Busy,
    /// Connecting to the environment or starting the terminal failed.
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

/// What a WebSocket asks for when it opens a terminal.
pub struct TerminalRequest {
    /// Resume this terminal (if it still exists in this session).
    pub terminal_id: Option<String>,
    /// The store says `terminal_id` is this user's terminal on this environment held by another
    /// node (alive or dead): if it is not in this session here, the new terminal says it moved
    /// nodes (`args.tmux_session` is then that terminal's tmux session).
    pub moved: bool,
    /// The new terminal's row for the store, written (within `max_terminals` over all nodes)
    /// before the terminal starts. `None`: not registered (no store).
    pub registration: Option<crate::presence::Registration>,
    /// The last output offset the client has.
    pub offset: Option<u64>,
    /// Everything to start a new terminal with, if one is needed.
    pub args: TerminalArgs,
    /// Terminals (attached or in their grace period) this session may hold at once; each holds
    /// an SSH connection and an output ring.
    pub max_terminals: usize,
    /// This node's terminal slots (`terminals.max_terminals_per_node`): a new terminal takes one
    /// for its lifetime; none left is an immediate [`OpenError::Busy`].
    pub node_slots: Arc<tokio::sync::Semaphore>,
    /// The size the client asked for (`cols` and `rows` both given): applied on resume too.
    pub size: Option<(u32, u32)>,
}

/// A terminal of this session.
struct HeldTerminal {
    actor: ActorRef<TerminalMsg>,
    environment_id: String,
    stats: Arc<Stats>,
    /// Start order: the newest detached terminal is re-attached, the oldest evicted.
    seq: u64,
}

pub const SUPERVISOR_ID: &str = "sessions";
const SESSION_KIND: &str = "session";

pub fn actor_id(session_id: &str) -> String {
    format!("{SESSION_KIND}:{session_id}")
}

// ---------------------------------------------------------------- the UserSession actor

pub enum SessionMsg {
    /// The session was used (any authenticated request or connection).
    Touch,
    /// Attach a WebSocket to a terminal of this session, creating the terminal if needed.
    OpenTerminal {
        request: Box<TerminalRequest>,
        reply: RpcReplyPort<Result<Attachment, OpenError>>,
    },
    /// A terminal started on a task is up (`Some`) or failed to start (`None`).
    TerminalStarted {
        terminal_id: String,
        environment_id: String,
        actor: Option<ActorRef<TerminalMsg>>,
        stats: Arc<Stats>,
    },
    /// The session ended (logout, revocation, password change): close its terminals, then stop.
    Shutdown(String),
    /// This node is draining (a graceful shutdown): close the terminals with 1012 "reconnect"
    /// (the app reconnects, through the load balancer, to another node and resumes), then stop.
    Drain,
    /// Stop now, whether or not the terminals have finished closing.
    ForceStop,
    /// Timer tick: stop if idle for too long.
    IdleCheck,
    /// Fault injection (ops drills and tests): panic inside the handler.
    Crash(String),
}

pub struct UserSession;

pub struct SessionArgs {
    pub session_id: String,
    pub user_id: String,
    pub idle_after: StdDuration,
    pub pending: Pending,
    pub directory: Directory,
}

pub struct SessionState {
    args: SessionArgs,
    last_activity: Instant,
    terminals: HashMap<String, HeldTerminal>,
    /// Counts terminal starts (for [`HeldTerminal::seq`]).
    started: u64,
    /// Terminals being started on a task, counted against the session's bound.
    opening: usize,
    /// Shutting down: stop once the last terminal has closed.
    closing: Option<String>,
}

/// How long a shutting-down session waits for its terminals to close their WebSockets.
const SHUTDOWN_GRACE: StdDuration = StdDuration::from_secs(2);

/// How long a new terminal waits for the node slot of the session's terminal it evicted (that
/// terminal stops at once; its slot returns when it has). Past it: 1013, as at capacity.
const EVICTED_SLOT_WAIT: StdDuration = StdDuration::from_secs(5);

/// How long attaching to a terminal may take (connecting SSH included).
const ATTACH_TIMEOUT: StdDuration = StdDuration::from_secs(30);

/// The WebSocket close code a draining node ends terminals with: 1012 "Service Restart" (the
/// IANA WebSocket close code registry; RFC 6455 §7.4): the client should reconnect, and lands on
/// another node.
pub const DRAIN_CLOSE_CODE: u16 = 1012;
/// The close reason with [`DRAIN_CLOSE_CODE`].
pub const DRAIN_CLOSE_REASON: &str = "Server restarting; reconnect";

impl SessionState {
    /// Close every terminal's WebSocket with `code`/`text`, then stop (at once when nothing is
    /// open, else when they have closed or after [`SHUTDOWN_GRACE`]).
    fn close_terminals(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        code: u16,
        text: &str,
        reason: String,
    ) {
        for HeldTerminal {
            actor: terminal, ..
        } in self.terminals.values()
        {
            let _ = terminal.cast(TerminalMsg::Close {
                code,
                reason: text.into(),
            });
        }
        if self.terminals.is_empty() && self.opening == 0 {
            myself.stop(Some(reason));
        } else {
            self.closing = Some(reason);
            myself.send_after(SHUTDOWN_GRACE, || SessionMsg::ForceStop);
        }
    }

    /// Attach to an existing terminal or start a new one. Slow work (connecting SSH, waiting for
    /// the terminal to answer) runs on a task so this session keeps serving its other messages —
    /// a logout is never held up by an unreachable environment.
    fn open_terminal(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        request: Box<TerminalRequest>,
        reply: RpcReplyPort<Result<Attachment, OpenError>>,
    ) {
        if self.closing.is_some() {
            let _ = reply.send(Err(OpenError::SessionEnded));
            return;
        }
        let env_id = request.args.environment.id.clone();
        let size = request.size;
        let existing = request
            .terminal_id
            .as_ref()
            .and_then(|id| self.terminals.get(id))
            .filter(|t| t.environment_id == env_id)
            .map(|t| t.actor.clone());
        if let Some(actor) = existing {
            tokio::spawn(async move {
                let _ = reply.send(attach(&actor, request.offset, size, false, Resumed::No).await);
            });
            return;
        }
        // The app reconnects without a terminal id: give it back this session's newest detached
        // terminal on the environment, repainted (it has nothing on its screen), instead of
        // piling up terminals that wait out their grace period.
        if request.terminal_id.is_none()
            && let Some(actor) = self.newest_detached(&env_id)
        {
            tokio::spawn(async move {
                let _ = reply.send(attach(&actor, None, size, true, Resumed::No).await);
            });
            return;
        }
        // At the cap: the oldest detached terminal makes room (nobody is refused because of
        // their own abandoned terminals); only attached ones count against a refusal.
        let evicted = self.terminals.len() + self.opening >= request.max_terminals
            && self.evict_oldest_detached();
        let held = self.terminals.len() + self.opening;
        if held >= request.max_terminals {
            let _ = reply.send(Err(OpenError::TooMany(held)));
            return;
        }
        let node_slots = request.node_slots.clone();
        let slot = match node_slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            // The evicted terminal's slot comes back once it has stopped: taken on the task.
            Err(_) if evicted => None,
            Err(_) => {
                tracing::warn!(
                    "terminal refused: this node is at terminals.max_terminals_per_node"
                );
                let _ = reply.send(Err(OpenError::Busy));
                return;
            }
        };
        // The session's terminals on this node besides the new one (the store adds other nodes').
        let local_held = held;
        self.opening += 1;
        let resumed = match (&request.terminal_id, request.moved) {
            (None, _) => Resumed::No,
            (Some(_), true) => Resumed::Moved,
            (Some(_), false) => Resumed::Ended,
        };
        let (registration, max_terminals) = (request.registration, request.max_terminals);
        let mut args = request.args;
        let stats = args.stats.clone();
        let terminal_id = args.terminal_id.clone();
        let directory = args.directory.clone();
        let directory_id = args.directory_id.clone();
        directory.started(
            "terminal",
            &directory_id,
            Some(&actor_id(&self.args.session_id)),
            Some(&self.args.user_id),
            RestartPolicy {
                limit: 0,
                window: chrono::Duration::seconds(1),
            },
            Pending::default(),
        );
        directory.set_phase(&directory_id, Some("connecting"));
        let session = myself.clone();
        tokio::spawn(async move {
            // The store decides the session's cap over all nodes, and lists the terminal.
            if let Some(registration) = registration {
                let refusal = match registration.register(local_held, max_terminals).await {
                    Ok(Ok(record)) => {
                        args.record = Some(record);
                        None
                    }
                    Ok(Err(held)) => Some(OpenError::TooMany(held)),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot register a terminal in the store");
                        Some(OpenError::Failed(anyhow::anyhow!(
                            "the server cannot record the terminal right now; try again"
                        )))
                    }
                };
                if let Some(refusal) = refusal {
                    directory.remove(&directory_id);
                    let _ = session.cast(SessionMsg::TerminalStarted {
                        terminal_id,
                        environment_id: env_id,
                        actor: None,
                        stats,
                    });
                    let _ = reply.send(Err(refusal));
                    return;
                }
            }
            let slot = match slot {
                Some(slot) => Ok(slot),
                None => tokio::time::timeout(EVICTED_SLOT_WAIT, node_slots.acquire_owned())
                    .await
                    .map_err(|_| ())
                    .and_then(|r| r.map_err(|_| ())),
            };
            let spawned = match slot {
                Ok(slot) => {
                    args.slot = Some(slot);
                    Actor::spawn_linked(None, TerminalActor, args, session.get_cell())
                        .await
                        .map_err(Some)
                }
                Err(()) => {
                    tracing::warn!(
                        "terminal refused: this node is at terminals.max_terminals_per_node"
                    );
                    Err(None)
                }
            };
            let actor = match spawned {
                Ok((actor, _)) => actor,
                Err(e) => {
                    directory.remove(&directory_id);
                    let _ = session.cast(SessionMsg::TerminalStarted {
                        terminal_id,
                        environment_id: env_id,
                        actor: None,
                        stats,
                    });
                    // The terminal's own reason, not ractor's wrapper ("Actor panicked during
                    // startup"): the client sees it.
                    let reason = match e {
                        Some(ractor::SpawnErr::StartupFailed(inner)) => inner.to_string(),
                        Some(other) => other.to_string(),
                        None => {
                            let _ = reply.send(Err(OpenError::Busy));
                            return;
                        }
                    };
                    let _ = reply.send(Err(OpenError::Failed(anyhow::anyhow!("{reason}"))));
                    return;
                }
            };
            // Taken by this open from birth: until its attach lands it must not look detached,
            // or a parallel open of the same session (a double tap) would be handed this
            // terminal too and one of the two replaced (4000). A failed attach detaches it
            // (the terminal casts `Detached` when nobody takes its answer).
            stats.attached.store(true, Ordering::Relaxed);
            let registered = session.cast(SessionMsg::TerminalStarted {
                terminal_id,
                environment_id: env_id,
                actor: Some(actor.clone()),
                stats,
            });
            if registered.is_err() {
                // The session ended while the terminal was starting.
                actor.stop(Some("session ended".into()));
                directory.remove(&directory_id);
                let _ = reply.send(Err(OpenError::SessionEnded));
                return;
            }
            // A new terminal streams from its very first byte (tmux's first screen).
            let _ = reply.send(attach(&actor, Some(0), None, false, resumed).await);
        });
    }

    /// A terminal started off the handler reports in (or failed to start).
    /// This session's most recently started terminal on `environment_id` that no WebSocket holds.
    fn newest_detached(&self, environment_id: &str) -> Option<ActorRef<TerminalMsg>> {
        self.terminals
            .values()
            .filter(|t| t.environment_id == environment_id)
            .filter(|t| !t.stats.attached.load(Ordering::Relaxed))
            .max_by_key(|t| t.seq)
            .map(|t| t.actor.clone())
    }

    /// Close the oldest terminal no WebSocket holds (its grace period cut short); `true` if
    /// there was one.
    fn evict_oldest_detached(&mut self) -> bool {
        let oldest = self
            .terminals
            .iter()
            .filter(|(_, t)| !t.stats.attached.load(Ordering::Relaxed))
            .min_by_key(|(_, t)| t.seq)
            .map(|(id, _)| id.clone());
        if let Some(held) = oldest.and_then(|id| self.terminals.remove(&id)) {
            tracing::debug!(session = %self.args.session_id, "evicting the oldest detached terminal");
            held.actor
                .stop(Some("evicted: the session opened a newer terminal".into()));
            return true;
        }
        false
    }

    fn terminal_started(
        &mut self,
        terminal_id: String,
        environment_id: String,
        actor: Option<ActorRef<TerminalMsg>>,
        stats: Arc<Stats>,
    ) {
        self.opening = self.opening.saturating_sub(1);
        let Some(actor) = actor else {
            return;
        };
        if matches!(
            actor.get_status(),
            ractor::ActorStatus::Stopping | ractor::ActorStatus::Stopped
        ) {
            // It ended before it was registered; its supervision event found nothing to remove.
            self.args
                .directory
                .remove(&crate::terminal::directory_id(&terminal_id));
            return;
        }
        self.started += 1;
        let held = HeldTerminal {
            actor,
            environment_id,
            stats,
            seq: self.started,
        };
        self.terminals.insert(terminal_id, held);
    }
}

/// Whether a new terminal stands in for one the client asked to resume, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resumed {
    /// Not a stand-in (a fresh open, or the resumed terminal itself).
    No,
    /// The asked-for terminal is unknown, has ended, or is not the client's to resume.
    Ended,
    /// The asked-for terminal is this user's on another node.
    Moved,
}

/// The `info` a stand-in terminal opens with (the tmux session, and so the shell, is the same).
const ENDED_NOTICE: &str = "That terminal has ended; this is a new one (your tmux session is kept)";
/// The `info` of a terminal that stands in for one of another node: it streams from its first
/// byte, tmux's full redraw of the screen.
pub const MOVED_NOTICE: &str = "Your connection reached another server node: this is a new terminal on the same tmux session (your shell is as you left it); the screen was repainted";

/// Attach a WebSocket to a terminal actor (waiting for it, within a bound): from `offset`
/// (`None`: from now), at `size` if given, with a full repaint when asked (a client with an
/// empty screen), opening with the notice of a stand-in (`resumed`).
async fn attach(
    actor: &ActorRef<TerminalMsg>,
    offset: Option<u64>,
    size: Option<(u32, u32)>,
    repaint: bool,
    resumed: Resumed,
) -> Result<Attachment, OpenError> {
    let reply = actor
        .call(
            |reply| TerminalMsg::Attach {
                offset,
                size,
                repaint,
                reply,
            },
            Some(ATTACH_TIMEOUT),
        )
        .await;
    match reply {
        Ok(ractor::rpc::CallResult::Success(mut attachment)) => {
            let notice = match resumed {
                Resumed::No => None,
                Resumed::Ended => Some(ENDED_NOTICE),
                Resumed::Moved => Some(MOVED_NOTICE),
            };
            if let (Some(notice), None) = (notice, &attachment.notice) {
                attachment.notice = Some(crate::terminal::protocol::ServerFrame::info(notice));
            }
            Ok(attachment)
        }
        _ => Err(OpenError::Failed(anyhow::anyhow!(
            "the terminal did not answer"
        ))),
    }
}

impl Actor for UserSession {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SessionArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Check a few times per idle period; the task ends by itself when the actor stops.
        let every = (args.idle_after / 4).max(StdDuration::from_millis(10));
        myself.send_interval(every, || SessionMsg::IdleCheck);
        Ok(SessionState {
            args,
            last_activity: Instant::now(),
            terminals: HashMap::new(),
            started: 0,
            opening: 0,
            closing: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SessionMsg::Touch => {
                state.args.pending.handled();
                state.last_activity = Instant::now();
            }
            SessionMsg::OpenTerminal { request, reply } => {
                state.args.pending.handled();
                state.last_activity = Instant::now();
                state.open_terminal(&myself, request, reply);
            }
            SessionMsg::TerminalStarted {
                terminal_id,
                environment_id,
                actor,
                stats,
            } => {
                let closing = state.closing.is_some();
                if let (true, Some(actor)) = (closing, &actor) {
                    // Started while the session was shutting down: close it like the others.
                    let _ = actor.cast(TerminalMsg::Close {
                        code: 1008,
                        reason: "Session ended".into(),
                    });
                }
                state.terminal_started(terminal_id, environment_id, actor, stats);
                if closing && state.terminals.is_empty() && state.opening == 0 {
                    myself.stop(state.closing.take());
                }
            }
            SessionMsg::Shutdown(reason) => {
                state.args.pending.handled();
                // Terminals first, so each WebSocket gets 1008 "Session ended"; then stop.
                state.close_terminals(&myself, 1008, "Session ended", reason);
            }
            SessionMsg::Drain => {
                state.args.pending.handled();
                state.close_terminals(
                    &myself,
                    DRAIN_CLOSE_CODE,
                    DRAIN_CLOSE_REASON,
                    "node draining".into(),
                );
            }
            SessionMsg::ForceStop => {
                myself.stop(state.closing.take());
            }
            SessionMsg::IdleCheck => {
                // Open terminals keep a session alive.
                if state.terminals.is_empty()
                    && state.opening == 0
                    && state.last_activity.elapsed() >= state.args.idle_after
                {
                    tracing::debug!(session = %state.args.session_id, "session actor idle; stopping");
                    myself.stop(Some("idle".into()));
                }
            }
            SessionMsg::Crash(message) => {
                state.args.pending.handled();
                panic!("{message}");
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Terminals are not restarted blindly: the client is told (its WebSocket closes) and may
        // reconnect. Overridden also because ractor's default would stop the session here.
        let Some((id, exit)) = child_exit(event) else {
            return Ok(());
        };
        let failure = match exit {
            ChildExit::Failed(error) => Some(error),
            ChildExit::Stopped(_) => None,
        };
        let gone: Vec<String> = state
            .terminals
            .iter()
            .filter(|(_, t)| t.actor.get_id() == id)
            .map(|(tid, _)| tid.clone())
            .collect();
        for terminal_id in gone {
            state.terminals.remove(&terminal_id);
            let directory_id = crate::terminal::directory_id(&terminal_id);
            match &failure {
                Some(error) => {
                    tracing::warn!(terminal = %terminal_id, error, "terminal actor failed; not restarted");
                    state.args.directory.failed(&directory_id, error, true);
                    state.args.directory.remove(&directory_id);
                }
                None => state.args.directory.remove(&directory_id),
            }
        }
        if state.terminals.is_empty() && state.opening == 0 && state.closing.is_some() {
            myself.stop(state.closing.take());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- the sessions supervisor

pub enum SessionsMsg {
    /// A session was used: make sure its actor runs and tell it.
    Touch { session_id: String, user_id: String },
    /// Stop these sessions' actors (logout, revocation, password change, account deletion).
    Stop {
        session_ids: Vec<String>,
        reason: String,
    },
    /// This node is draining: every session closes its terminals with "reconnect".
    Drain,
    /// Open (or resume) a terminal in this session.
    OpenTerminal {
        session_id: String,
        user_id: String,
        request: Box<TerminalRequest>,
        reply: RpcReplyPort<Result<Attachment, OpenError>>,
    },
    /// Fault injection: make one session actor panic. Replies whether it existed.
    Crash {
        session_id: String,
        message: String,
        reply: RpcReplyPort<bool>,
    },
    /// Fault injection: make the supervisor itself panic.
    CrashSelf(String),
}

pub struct SessionsSupervisor;

pub struct SessionsArgs {
    pub directory: Directory,
    pub policy: RestartPolicy,
    pub idle_after: StdDuration,
    pub pending: Pending,
}

struct Child {
    actor: ActorRef<SessionMsg>,
    user_id: String,
    pending: Pending,
}

pub struct SessionsState {
    args: SessionsArgs,
    children: HashMap<String, Child>,
    by_actor: HashMap<ActorId, String>,
    restarts: ChildRestarts,
}

impl SessionsState {
    async fn spawn_child(
        &mut self,
        myself: &ActorRef<SessionsMsg>,
        session_id: &str,
        user_id: &str,
    ) -> Result<(), ActorProcessingErr> {
        let pending = Pending::default();
        let (actor, _) = Actor::spawn_linked(
            None,
            UserSession,
            SessionArgs {
                session_id: session_id.to_string(),
                user_id: user_id.to_string(),
                idle_after: self.args.idle_after,
                pending: pending.clone(),
                directory: self.args.directory.clone(),
            },
            myself.get_cell(),
        )
        .await?;
        let id = actor_id(session_id);
        self.args.directory.started(
            SESSION_KIND,
            &id,
            Some(SUPERVISOR_ID),
            Some(user_id),
            self.args.policy,
            pending.clone(),
        );
        self.by_actor.insert(actor.get_id(), session_id.to_string());
        self.children.insert(
            session_id.to_string(),
            Child {
                actor,
                user_id: user_id.to_string(),
                pending,
            },
        );
        Ok(())
    }

    fn forget(&mut self, actor: ActorId) -> Option<(String, Child)> {
        let session_id = self.by_actor.remove(&actor)?;
        let child = self.children.remove(&session_id)?;
        Some((session_id, child))
    }
}

impl Actor for SessionsSupervisor {
    type Msg = SessionsMsg;
    type State = SessionsState;
    type Arguments = SessionsArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: SessionsArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SessionsState {
            restarts: ChildRestarts::new(args.policy),
            args,
            children: HashMap::new(),
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
            SessionsMsg::Touch {
                session_id,
                user_id,
            } => {
                if let Some(child) = state.children.get(&session_id) {
                    // A hint: dropped if the session's mailbox is full.
                    if child.pending.admit() && child.actor.cast(SessionMsg::Touch).is_err() {
                        child.pending.handled();
                    }
                    return Ok(());
                }
                let now = state.args.directory.now();
                if state.restarts.is_down(&session_id, now) {
                    // Given up on within this window: stays down (ops can see why).
                    return Ok(());
                }
                state.spawn_child(&myself, &session_id, &user_id).await?;
            }
            SessionsMsg::Stop {
                session_ids,
                reason,
            } => {
                for session_id in session_ids {
                    state.restarts.forget(&session_id);
                    if let Some(child) = state.children.get(&session_id) {
                        child.pending.sent();
                        if child
                            .actor
                            .cast(SessionMsg::Shutdown(reason.clone()))
                            .is_err()
                        {
                            child.actor.stop(Some(reason.clone()));
                        }
                    } else {
                        state.args.directory.remove(&actor_id(&session_id));
                    }
                }
            }
            SessionsMsg::Drain => {
                for child in state.children.values() {
                    child.pending.sent();
                    if child.actor.cast(SessionMsg::Drain).is_err() {
                        child.pending.handled();
                    }
                }
            }
            SessionsMsg::OpenTerminal {
                session_id,
                user_id,
                request,
                reply,
            } => {
                if !state.children.contains_key(&session_id) {
                    let now = state.args.directory.now();
                    if state.restarts.is_down(&session_id, now) {
                        let _ = reply.send(Err(OpenError::Failed(anyhow::anyhow!(
                            "this session is down after repeated failures"
                        ))));
                        return Ok(());
                    }
                    state.spawn_child(&myself, &session_id, &user_id).await?;
                }
                match state.children.get(&session_id) {
                    Some(child) if !child.pending.admit() => {
                        let _ = reply.send(Err(OpenError::Busy));
                    }
                    Some(child) => {
                        let _ = child
                            .actor
                            .cast(SessionMsg::OpenTerminal { request, reply });
                    }
                    None => {
                        let _ = reply.send(Err(OpenError::Busy));
                    }
                }
            }
            SessionsMsg::Crash {
                session_id,
                message,
                reply,
            } => {
                let found = match state.children.get(&session_id) {
                    Some(child) => {
                        child.pending.sent();
                        child.actor.cast(SessionMsg::Crash(message)).is_ok()
                    }
                    None => false,
                };
                let _ = reply.send(found);
            }
            SessionsMsg::CrashSelf(message) => panic!("{message}"),
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
        let Some((session_id, child)) = state.forget(actor) else {
            return Ok(());
        };
        let id = actor_id(&session_id);
        match exit {
            ChildExit::Failed(error) => {
                let directory = state.args.directory.clone();
                match state.restarts.failed(&directory, &session_id, &id, &error) {
                    RestartDecision::Restart(n) => {
                        tracing::warn!(actor = %id, restart = n, error = %error, "session actor failed; restarting");
                        state
                            .spawn_child(&myself, &session_id, &child.user_id)
                            .await?;
                    }
                    RestartDecision::GiveUp => {
                        tracing::error!(actor = %id, error = %error, "session actor failed past its restart limit; leaving it down");
                    }
                }
            }
            ChildExit::Stopped(reason) => {
                tracing::debug!(session = %session_id, reason = ?reason, "session actor stopped");
                state.args.directory.remove(&id);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use chrono::Duration;

    fn directory_has(directory: &Directory, id: &str) -> bool {
        directory
            .tree()
            .iter()
            .any(|n| n.children.iter().any(|c| c.id == id))
            || directory.tree().iter().any(|n| n.id == id)
    }

    #[tokio::test(start_paused = true)]
    async fn idle_session_actors_stop_and_come_back_on_use() {
        let directory = Directory::new(ManualClock::starting_now());
        let idle = StdDuration::from_secs(30 * 60);
        let (sup, _) = Actor::spawn(
            None,
            SessionsSupervisor,
            SessionsArgs {
                directory: directory.clone(),
                policy: RestartPolicy {
                    limit: 3,
                    window: Duration::seconds(60),
                },
                idle_after: idle,
                pending: Pending::default(),
            },
        )
        .await
        .expect("spawn");
        directory.started(
            "supervisor",
            SUPERVISOR_ID,
            None,
            None,
            RestartPolicy {
                limit: 3,
                window: Duration::seconds(60),
            },
            Pending::default(),
        );
        let touch = || SessionsMsg::Touch {
            session_id: "s1".into(),
            user_id: "u1".into(),
        };
        sup.cast(touch()).expect("cast");
        while !directory_has(&directory, "session:s1") {
            tokio::task::yield_now().await;
        }
        // Use within the idle period keeps it alive.
        tokio::time::sleep(idle / 2).await;
        sup.cast(touch()).expect("cast");
        tokio::time::sleep(idle / 2 + StdDuration::from_secs(60)).await;
        assert!(directory_has(&directory, "session:s1"), "touched recently");
        // Past the idle period without use it stops by itself...
        tokio::time::sleep(idle + StdDuration::from_secs(60 * 10)).await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(
            !directory_has(&directory, "session:s1"),
            "idle actor stopped"
        );
        // ...and the next use starts it again.
        sup.cast(touch()).expect("cast");
        while !directory_has(&directory, "session:s1") {
            tokio::task::yield_now().await;
        }
        sup.stop(None);
    }
}
