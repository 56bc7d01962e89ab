//! The supervision tree (ractor): root → sessions supervisor → UserSession actors → their
//! terminal actors, and root → environments supervisor → environment actors. [`Actors`] is the
//! front end's handle: it forwards messages into the tree and never blocks on it.

pub mod directory;
pub mod environment;
pub mod leases;
pub mod relay;
pub mod remote;
pub mod root;
pub mod session;
pub mod terminal;

use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use ractor::{Actor, ActorRef};
use tokio::task::JoinHandle;

use directory::{ActorStatus, Directory, Pending, RestartPolicy};
use environment::actor::{EnvDeps, EnvMsg, EnvUpdate};
use environment::command::{Command, CommandError, Reply};
use environment::{EnvRegistry, EnvironmentsMsg};
use root::{ROOT_ID, RootArgs, RootMsg, RootSupervisor, Slot, read_slot};
use session::SessionsMsg;

/// How long a graceful shutdown waits for each environment actor to stop.
const ACTOR_STOP_WAIT: StdDuration = StdDuration::from_secs(5);
/// How long a fault-injection request waits for the supervisor's answer.
const CRASH_REPLY_TIMEOUT: StdDuration = StdDuration::from_secs(5);
/// How long a request waits for an environment actor to take a command.
const COMMAND_TIMEOUT: StdDuration = StdDuration::from_secs(10);
/// How long a create may take: validation, key generation (queued behind other creates on a busy
/// machine) and the insert. Generous, because a caller that gave up would not learn that its
/// environment was made after all.
const CREATE_TIMEOUT: StdDuration = StdDuration::from_secs(60);
/// Ended session ids kept for slow WebSocket streams before they lag; a stream that lags checks
/// its session in the store instead, so nothing is missed, only looked up.
const SESSION_ENDS_CAPACITY: usize = 256;

/// What the configured provider offers, as plain data for the front end (`GET /sizes`, `/info`).
#[derive(Debug, Clone)]
pub struct Catalog {
    pub kind: crate::config::ProviderKind,
    pub sizes: Vec<crate::provider::Size>,
    pub capabilities: crate::provider::Capabilities,
}

/// Send a request to an actor within its mailbox bound and wait (bounded) for the answer.
async fn call_actor<M: ractor::Message, T: Send + 'static>(
    actor: &ActorRef<M>,
    pending: &Pending,
    msg: impl FnOnce(ractor::RpcReplyPort<T>) -> M,
) -> Result<T, EnvUnavailable> {
    call_actor_within(actor, pending, COMMAND_TIMEOUT, msg).await
}

async fn call_actor_within<M: ractor::Message, T: Send + 'static>(
    actor: &ActorRef<M>,
    pending: &Pending,
    timeout: StdDuration,
    msg: impl FnOnce(ractor::RpcReplyPort<T>) -> M,
) -> Result<T, EnvUnavailable> {
    if !pending.admit() {
        return Err(EnvUnavailable);
    }
    match actor.call(msg, Some(timeout)).await {
        Ok(ractor::rpc::CallResult::Success(value)) => Ok(value),
        Ok(_) => Err(EnvUnavailable),
        Err(_) => {
            pending.handled(); // never delivered
            Err(EnvUnavailable)
        }
    }
}

/// An environment actor could not be reached (restarting after a failure, or busy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvUnavailable;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashOutcome {
    Crashed,
    NotFound,
    /// The root has no supervisor above it; crashing it would stop the tree.
    NotAllowed,
}

#[derive(Clone)]
pub struct Actors {
    inner: Arc<Inner>,
}

struct Inner {
    root: ActorRef<RootMsg>,
    root_task: Mutex<Option<JoinHandle<()>>>,
    sessions: Slot<SessionsMsg>,
    environments: Slot<EnvironmentsMsg>,
    sessions_pending: Pending,
    environments_pending: Pending,
    directory: Directory,
    env_registry: EnvRegistry,
    env_deps: Arc<EnvDeps>,
    /// Every session id [`Actors::stop_sessions`] ends, for the streams that are not actors
    /// (the logs and events WebSockets).
    session_ends: tokio::sync::broadcast::Sender<Arc<str>>,
    /// Feeds of environments other nodes run (see [`relay`]).
    remote_feeds: relay::RemoteFeeds,
    /// The cluster loops (leases, carried commands, relay): a stop signal and the task each.
    loops: Mutex<Vec<(tokio::sync::oneshot::Sender<()>, JoinHandle<()>)>>,
    /// `true` once this node drains: the logs and events streams close with "reconnect".
    draining: tokio::sync::watch::Sender<bool>,
}

impl Actors {
    pub async fn start(
        directory: Directory,
        policy: RestartPolicy,
        session_idle: StdDuration,
        env_deps: Arc<EnvDeps>,
    ) -> anyhow::Result<Self> {
        let env_registry: EnvRegistry = Arc::default();
        let sessions: Slot<SessionsMsg> = Arc::default();
        let environments: Slot<EnvironmentsMsg> = Arc::default();
        let sessions_pending = Pending::default();
        let environments_pending = Pending::default();
        let (root, task) = Actor::spawn(
            None,
            RootSupervisor,
            RootArgs {
                directory: directory.clone(),
                policy,
                session_idle,
                sessions: sessions.clone(),
                environments: environments.clone(),
                sessions_pending: sessions_pending.clone(),
                environments_pending: environments_pending.clone(),
                env_deps: env_deps.clone(),
                env_registry: env_registry.clone(),
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("starting the supervision tree: {e}"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                root_task: Mutex::new(Some(task)),
                sessions,
                environments,
                sessions_pending,
                environments_pending,
                directory,
                env_registry,
                env_deps,
                session_ends: tokio::sync::broadcast::channel(SESSION_ENDS_CAPACITY).0,
                remote_feeds: relay::RemoteFeeds::default(),
                loops: Mutex::new(Vec::new()),
                draining: tokio::sync::watch::channel(false).0,
            }),
        })
    }

    fn environment(&self, environment_id: &str) -> Option<(ActorRef<EnvMsg>, Pending)> {
        self.inner
            .env_registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(environment_id)
            .cloned()
    }

    async fn call_environment<T: Send + 'static>(
        &self,
        environment_id: &str,
        msg: impl FnOnce(ractor::RpcReplyPort<T>) -> EnvMsg,
    ) -> Result<T, EnvUnavailable> {
        let (actor, pending) = self.environment(environment_id).ok_or(EnvUnavailable)?;
        call_actor(&actor, &pending, msg).await
    }

    /// The live actor of an environment, started if it is down (`None`: terminated or gone).
    async fn ensure_environment(
        &self,
        environment_id: &str,
    ) -> Result<Option<environment::EnvHandle>, CommandError> {
        if let Some(handle) = self.environment(environment_id) {
            return Ok(Some(handle));
        }
        let sup = read_slot(&self.inner.environments).ok_or(CommandError::Busy)?;
        let environment_id = environment_id.to_string();
        call_actor(&sup, &self.inner.environments_pending, |reply| {
            EnvironmentsMsg::Ensure {
                environment_id,
                reply,
            }
        })
        .await
        .map_err(|_| CommandError::Busy)
    }

    /// Carry out a command (see [`environment::command`]): the one way the front end changes
    /// environments. Ownership is the caller's to check first.
    pub async fn dispatch(&self, command: Command) -> Result<Reply, CommandError> {
        match command {
            Command::Create(new) => {
                // A draining node hands its leases back: a new environment belongs elsewhere.
                if self.inner.env_deps.cluster.is_draining() {
                    return Err(CommandError::Busy);
                }
                let sup = read_slot(&self.inner.environments).ok_or(CommandError::Busy)?;
                let new = Box::new(new);
                call_actor_within(
                    &sup,
                    &self.inner.environments_pending,
                    CREATE_TIMEOUT,
                    |reply| EnvironmentsMsg::Create { new, reply },
                )
                .await
                .map_err(|_| CommandError::Busy)?
            }
            Command::DeleteAllForUser { user_id } => self.delete_all_for_user(&user_id).await,
            command => {
                let Some(id) = command.environment_id().map(str::to_string) else {
                    return Err(CommandError::Busy);
                };
                match self.route(&id).await? {
                    remote::Route::Local => self.dispatch_here(command).await,
                    remote::Route::Remote(node) => self.send_remote(&node, &id, command).await,
                }
            }
        }
    }

    /// Carry out a command on this node, never forwarding it: the environment's actor runs here
    /// (started if it is down and this node holds its lease), or the command is refused as busy.
    pub(crate) async fn dispatch_here(&self, command: Command) -> Result<Reply, CommandError> {
        match command {
            Command::Create(_) | Command::DeleteAllForUser { .. } => {
                Box::pin(self.dispatch(command)).await
            }
            command => {
                let Some(id) = command.environment_id().map(str::to_string) else {
                    return Err(CommandError::Busy);
                };
                let Some((actor, pending)) = self.ensure_environment(&id).await? else {
                    // Terminated, or its lease is another node's (a command carried here just
                    // as the lease moved): the store says which.
                    return self.without_actor(&id, &command).await;
                };
                let verb = command.verb();
                match call_actor(&actor, &pending, |reply| EnvMsg::Command { command, reply }).await
                {
                    Ok(reply) => reply,
                    // It may have just ended (terminated actors stop themselves): the store says.
                    Err(EnvUnavailable) => self.unreachable_environment(&id, verb).await,
                }
            }
        }
    }

    /// No actor here for a command's environment: terminated (the terminated answer) or not
    /// leased to this node (busy: the caller retries and reaches the owner).
    async fn without_actor(&self, id: &str, command: &Command) -> Result<Reply, CommandError> {
        let mut conn = self.inner.env_deps.db.get().await?;
        match crate::store::environments::get(&mut conn, id).await? {
            Some(row) if !row.status.is_final() => Err(CommandError::Busy),
            _ => command.when_terminated(),
        }
    }

    /// Start the actor of an environment this node now holds.
    fn tell_adopt(&self, environment_id: &str) {
        if let Some(sup) = read_slot(&self.inner.environments) {
            self.inner.environments_pending.sent();
            if sup
                .cast(EnvironmentsMsg::Adopt(environment_id.to_string()))
                .is_err()
            {
                self.inner.environments_pending.handled();
            }
        }
    }

    /// Stop every environment actor of this node and wait for them (bounded by
    /// [`ACTOR_STOP_WAIT`]); a graceful shutdown does this before handing the leases back.
    pub async fn stop_environment_actors(&self) {
        let actors: Vec<ActorRef<EnvMsg>> = self
            .inner
            .env_registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|(actor, _)| actor.clone())
            .collect();
        let stops = actors
            .iter()
            .map(|actor| actor.stop_and_wait(Some("node draining".into()), Some(ACTOR_STOP_WAIT)));
        futures_util::future::join_all(stops).await;
    }

    /// An environment's actor did not take a command: terminated meanwhile (409, as for any
    /// command on a terminated environment) or busy/restarting (503).
    async fn unreachable_environment(
        &self,
        id: &str,
        verb: &'static str,
    ) -> Result<Reply, CommandError> {
        let mut conn = self.inner.env_deps.db.get().await?;
        match crate::store::environments::get(&mut conn, id).await? {
            Some(row) if row.status.is_final() => {
                Err(CommandError::InvalidState(environment::machine::Rejected {
                    status: row.status,
                    verb,
                }))
            }
            _ => Err(CommandError::Busy),
        }
    }

    /// Delete every live environment of a user and wait, bounded by
    /// `environments.delete_wait_seconds`, until each reports `terminated` (its instance released).
    async fn delete_all_for_user(&self, user_id: &str) -> Result<Reply, CommandError> {
        let deps = &self.inner.env_deps;
        let ids = {
            let mut conn = deps.db.get().await?;
            crate::store::environments::live_ids_for_user(&mut conn, user_id).await?
        };
        let limit = StdDuration::from_secs(deps.config.environments.delete_wait_seconds);
        let mut waits: Vec<futures_util::future::BoxFuture<'_, Result<(), CommandError>>> =
            Vec::with_capacity(ids.len());
        for id in &ids {
            if let remote::Route::Remote(node) = self.route(id).await? {
                // Another node runs it: ask it to delete, then follow the store.
                match self
                    .send_remote(
                        &node,
                        id,
                        Command::Delete {
                            environment_id: id.clone(),
                        },
                    )
                    .await
                {
                    Ok(_) | Err(CommandError::Remote(_)) => {}
                    Err(e) => return Err(e),
                }
                waits.push(Box::pin(self.wait_terminated(id.clone(), limit)));
                continue;
            }
            let Some((actor, pending)) = self.ensure_environment(id).await? else {
                continue; // terminated meanwhile
            };
            let (done, wait) = tokio::sync::oneshot::channel();
            pending.sent();
            if actor.cast(EnvMsg::DeleteAndWait { done }).is_err() {
                pending.handled();
                return Err(CommandError::Busy);
            }
            let id = id.clone();
            waits.push(Box::pin(async move {
                match wait.await {
                    Ok(result) => result,
                    // The actor restarted meanwhile (its successor resumes the delete from the
                    // store): follow the store instead.
                    Err(_) => self.wait_terminated(id, limit).await,
                }
            }));
        }
        let all = futures_util::future::join_all(waits);
        let results = tokio::time::timeout(limit, all).await.map_err(|_| {
            CommandError::Pending(
                "Your environments are still being deleted; try again in a minute".into(),
            )
        })?;
        for result in results {
            result?;
        }
        Ok(Reply::AllDeleted(ids.len()))
    }

    /// Follow an environment another node deletes, through the store (woken by its signals),
    /// until it is terminated (`Ok`), in `error` (the delete failed) or `limit` passed.
    async fn wait_terminated(&self, id: String, limit: StdDuration) -> Result<(), CommandError> {
        use crate::cluster::signals::{self, Heard, Topic};
        let deps = &self.inner.env_deps;
        let mut heard = deps.cluster.signals.subscribe(Topic::Environment);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            {
                let mut conn = deps.db.get().await?;
                match crate::store::environments::get(&mut conn, &id).await? {
                    None => return Ok(()),
                    Some(row) if row.status.is_final() => return Ok(()),
                    Some(row) if row.status == environment::machine::Status::Error => {
                        return Err(CommandError::Pending(format!(
                            "An environment could not be deleted: {}",
                            row.error_message.unwrap_or_default()
                        )));
                    }
                    Some(_) => {}
                }
            }
            let woken = tokio::time::timeout_at(deadline, async {
                loop {
                    match signals::next(&mut heard).await {
                        Some(Heard::Signal { payload, .. })
                            if payload.split(' ').next() == Some(id.as_str()) =>
                        {
                            return;
                        }
                        Some(Heard::Signal { .. }) => {}
                        Some(Heard::Resync) | None => return,
                    }
                }
            })
            .await;
            if woken.is_err() {
                return Err(CommandError::Pending(
                    "Your environments are still being deleted; try again in a minute".into(),
                ));
            }
        }
    }

    /// How to reach a running environment over SSH (for a terminal), from its actor.
    pub async fn ssh_target(
        &self,
        environment_id: &str,
    ) -> Result<anyhow::Result<crate::ssh::SshTarget>, EnvUnavailable> {
        if self.environment(environment_id).is_some() {
            return self
                .call_environment(environment_id, |reply| EnvMsg::SshTarget { reply })
                .await;
        }
        // Run by another node (or by none right now): the row has all it takes.
        let deps = &self.inner.env_deps;
        let row = async {
            let mut conn = deps.db.get().await.ok()?;
            crate::store::environments::get(&mut conn, environment_id)
                .await
                .ok()
                .flatten()
        }
        .await
        .filter(|row| !row.status.is_final())
        .ok_or(EnvUnavailable)?;
        Ok(crate::ssh::target::ssh_target(
            &row,
            deps.provider.as_ref(),
            &deps.sealer,
            StdDuration::from_secs(deps.config.provider.ssh_connect_timeout_seconds),
        ))
    }

    /// The SSH connections this node shares per environment (terminals, metrics sampler).
    pub fn ssh_pool(&self) -> Arc<crate::ssh::pool::SshPool> {
        self.inner.env_deps.ssh.clone()
    }

    /// What the configured provider offers (sizes, capabilities, defaults): data, not a handle.
    pub fn catalog(&self) -> Catalog {
        let provider = &self.inner.env_deps.provider;
        Catalog {
            kind: provider.kind(),
            sizes: provider.sizes(),
            capabilities: provider.capabilities(),
        }
    }

    /// The provider's regions (Contabo: its data centers, asked live).
    pub async fn regions(&self) -> Result<Vec<crate::provider::Region>, CommandError> {
        Ok(self.inner.env_deps.provider.regions().await?)
    }

    /// A live feed of one environment's updates (its actor is started if it is down).
    pub async fn subscribe(
        &self,
        environment_id: &str,
    ) -> Result<tokio::sync::broadcast::Receiver<EnvUpdate>, EnvUnavailable> {
        // The actor's own feed where it runs here (or this node holds the lease and starts it);
        // else the feed relayed from the node that runs it.
        if let Ok(remote::Route::Remote(_)) = self.route(environment_id).await {
            return self
                .remote_feed(environment_id)
                .await
                .map_err(|_| EnvUnavailable);
        }
        let Ok(Some((actor, pending))) = self.ensure_environment(environment_id).await else {
            return Err(EnvUnavailable);
        };
        call_actor(&actor, &pending, |reply| EnvMsg::Subscribe { reply }).await
    }

    /// Whether this node is draining, as a watch the streams select on.
    pub fn draining(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.draining.subscribe()
    }

    /// Stop what the provider runs itself (the local provider's SSH server).
    pub async fn shutdown_provider(&self) {
        self.inner.env_deps.provider.shutdown().await;
    }

    /// Every environment status change (filter by user).
    pub fn status_feed(&self) -> tokio::sync::broadcast::Receiver<EnvUpdate> {
        self.inner.env_deps.bus.subscribe()
    }

    pub fn directory(&self) -> &Directory {
        &self.inner.directory
    }

    fn send_sessions(&self, msg: SessionsMsg) {
        if let Some(sup) = read_slot(&self.inner.sessions) {
            self.inner.sessions_pending.sent();
            if sup.cast(msg).is_err() {
                self.inner.sessions_pending.handled();
            }
        }
    }

    /// A login session was used: its actor is started if needed and told. A hint: dropped when
    /// the supervisor's mailbox is full (the next use tells it again).
    pub fn touch_session(&self, session_id: &str, user_id: &str) {
        let Some(sup) = read_slot(&self.inner.sessions) else {
            return;
        };
        if !self.inner.sessions_pending.admit() {
            tracing::debug!("sessions supervisor busy; touch dropped");
            return;
        }
        let touch = SessionsMsg::Touch {
            session_id: session_id.to_string(),
            user_id: user_id.to_string(),
        };
        if sup.cast(touch).is_err() {
            self.inner.sessions_pending.handled();
        }
    }

    /// Open or resume a terminal in a login session (its session actor owns the terminal).
    pub async fn open_terminal(
        &self,
        session_id: &str,
        user_id: &str,
        request: session::TerminalRequest,
    ) -> Result<crate::actors::terminal::Attachment, session::OpenError> {
        let Some(sup) = read_slot(&self.inner.sessions) else {
            return Err(session::OpenError::Busy);
        };
        if !self.inner.sessions_pending.admit() {
            return Err(session::OpenError::Busy);
        }
        let (session_id, user_id) = (session_id.to_string(), user_id.to_string());
        match sup
            .call(
                |reply| SessionsMsg::OpenTerminal {
                    session_id,
                    user_id,
                    request: Box::new(request),
                    reply,
                },
                Some(StdDuration::from_secs(40)),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(result)) => result,
            Ok(_) => Err(session::OpenError::Failed(anyhow::anyhow!(
                "the session did not answer"
            ))),
            Err(_) => {
                self.inner.sessions_pending.handled(); // never delivered
                Err(session::OpenError::Busy)
            }
        }
    }

    /// Stop the actors of these login sessions (they were revoked or logged out), which closes
    /// their terminals, and tell the logs and events streams (see [`Actors::session_ends`]).
    pub fn stop_sessions(&self, session_ids: Vec<String>, reason: &str) {
        if session_ids.is_empty() {
            return;
        }
        for id in &session_ids {
            // No receiver (no stream open) is not an error.
            let _ = self.inner.session_ends.send(Arc::from(id.as_str()));
        }
        self.send_sessions(SessionsMsg::Stop {
            session_ids,
            reason: reason.to_string(),
        });
    }

    /// Ids of sessions ended from now on. A stream subscribes first and then checks that its
    /// session is still live, so an end between the two is not missed.
    pub fn session_ends(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.inner.session_ends.subscribe()
    }

    /// Fault injection: make the actor with this directory id panic.
    pub async fn crash(&self, id: &str) -> CrashOutcome {
        let message = format!("fault injection: crash requested for {id}");
        if id == ROOT_ID {
            return CrashOutcome::NotAllowed;
        }
        if id == session::SUPERVISOR_ID {
            return match read_slot(&self.inner.sessions) {
                Some(sup) if sup.cast(SessionsMsg::CrashSelf(message)).is_ok() => {
                    self.inner.sessions_pending.sent();
                    CrashOutcome::Crashed
                }
                _ => CrashOutcome::NotFound,
            };
        }
        if id == environment::SUPERVISOR_ID {
            return match read_slot(&self.inner.environments) {
                Some(sup) if sup.cast(EnvironmentsMsg::CrashSelf(message)).is_ok() => {
                    self.inner.environments_pending.sent();
                    CrashOutcome::Crashed
                }
                _ => CrashOutcome::NotFound,
            };
        }
        if let Some(environment_id) = id.strip_prefix("environment:") {
            let Some(sup) = read_slot(&self.inner.environments) else {
                return CrashOutcome::NotFound;
            };
            self.inner.environments_pending.sent();
            let environment_id = environment_id.to_string();
            let reply = sup
                .call(
                    |reply| EnvironmentsMsg::Crash {
                        environment_id,
                        reply,
                    },
                    Some(CRASH_REPLY_TIMEOUT),
                )
                .await;
            return match reply {
                Ok(ractor::rpc::CallResult::Success(true)) => CrashOutcome::Crashed,
                _ => CrashOutcome::NotFound,
            };
        }
        let Some(session_id) = id.strip_prefix("session:") else {
            return CrashOutcome::NotFound;
        };
        let Some(sup) = read_slot(&self.inner.sessions) else {
            return CrashOutcome::NotFound;
        };
        self.inner.sessions_pending.sent();
        let session_id = session_id.to_string();
        let reply = sup
            .call(
                |reply| SessionsMsg::Crash {
                    session_id,
                    message,
                    reply,
                },
                Some(CRASH_REPLY_TIMEOUT),
            )
            .await;
        match reply {
            Ok(ractor::rpc::CallResult::Success(true)) => CrashOutcome::Crashed,
            _ => CrashOutcome::NotFound,
        }
    }

    /// Names of tree parts that are not running (for readiness).
    pub fn unhealthy(&self) -> Vec<&'static str> {
        let mut down = Vec::new();
        if self.inner.root.get_status() != ractor::ActorStatus::Running {
            down.push(ROOT_ID);
        }
        for id in [session::SUPERVISOR_ID, environment::SUPERVISOR_ID] {
            if self.inner.directory.status_of(id) != Some(ActorStatus::Running) {
                down.push(id);
            }
        }
        down
    }

    /// Stop the whole tree and wait for it.
    pub async fn shutdown(&self) {
        self.stop_cluster_loops().await;
        self.inner.root.stop(Some("server shutting down".into()));
        let task = self
            .inner
            .root_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
        self.inner.directory.remove(ROOT_ID);
        self.inner.directory.remove_descendants(ROOT_ID);
    }
}
