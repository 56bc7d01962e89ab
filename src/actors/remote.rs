//! Commands that reach the owner: a command for an environment whose lease another live node
//! holds is written to the store for that node (`environment_commands`, see
//! [`crate::store::commands`]), signalled with `NOTIFY` ([`Topic::Command`]), taken at most once
//! by the owner, run there exactly as a local command and answered through the store
//! ([`Topic::Reply`]). The caller waits up to [`REMOTE_COMMAND_WAIT`]; past it a command nobody
//! took is cancelled (it never runs late), and the caller answers 504 with the command id to look
//! up (`GET /api/v1/commands/{command_id}`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Actors;
use super::environment::command::{Command, CommandError, Reply};
use super::environment::machine::Status;
use crate::clock::{db_now, to_db};
use crate::cluster::signals::{self, Heard, Topic};
use crate::error::FieldError;
use crate::provider::SnapshotInfo;
use crate::store::commands::{self as store, CommandRow};
use crate::store::environments as environments_store;

/// How long a caller waits for another node to answer a command; the command expires then (the
/// owner never takes it later). As long as a local command may wait for its actor.
pub const REMOTE_COMMAND_WAIT: Duration = Duration::from_secs(10);
/// Commands kept after they were written, for lookups by id.
pub const COMMAND_RETENTION: chrono::Duration = chrono::Duration::hours(1);
/// Pending commands one scan takes (after lost signals, or for environments just claimed).
const PENDING_SCAN_LIMIT: i64 = 256;
/// Carried commands this node runs at once; one over it waits in the store for the next scan
/// (a heartbeat later) rather than queue in memory.
pub const CARRIED_AT_ONCE: usize = 256;

type Permits = std::sync::Arc<tokio::sync::Semaphore>;

/// Run a carried command on a task if a permit is free (else the next scan finds it).
fn spawn_carried(actors: &Actors, permits: &Permits, id: String) {
    let Ok(permit) = permits.clone().try_acquire_owned() else {
        tracing::debug!(command = %id, "carried commands at capacity; left for the next scan");
        return;
    };
    let actors = actors.clone();
    tokio::spawn(async move {
        actors.run_carried(&id).await;
        drop(permit);
    });
}

/// A command's outcome as it travels back from the owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The environment as stored (the caller reads it back from the store).
    Environment {
        environment_id: String,
    },
    Accepted {
        status: Status,
    },
    Snapshots {
        snapshots: Vec<SnapshotInfo>,
    },
    AllDeleted {
        count: usize,
    },
    /// The error exactly as the owner's HTTP layer would have answered it.
    Error(RemoteError),
}

/// An error answered on another node, as its HTTP answer (status, stable code, detail, field
/// errors, Retry-After).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteError {
    pub status: u16,
    pub code: String,
    pub detail: String,
    pub errors: Vec<FieldError>,
    pub retry_after: Option<u64>,
}

impl From<CommandError> for RemoteError {
    fn from(e: CommandError) -> Self {
        let api = crate::error::ApiError::from(e);
        if let Some(source) = &api.source {
            tracing::error!(error = %source, "a command from another node failed");
        }
        Self {
            status: api.status.as_u16(),
            code: api.code.as_str().to_string(),
            detail: api.detail,
            errors: api.errors,
            retry_after: api.retry_after,
        }
    }
}

impl Outcome {
    fn of(result: Result<Reply, CommandError>) -> Self {
        match result {
            Ok(Reply::Environment(env)) => Outcome::Environment {
                environment_id: env.id,
            },
            Ok(Reply::Accepted(status)) => Outcome::Accepted { status },
            Ok(Reply::Snapshots(snapshots)) => Outcome::Snapshots { snapshots },
            Ok(Reply::AllDeleted(count)) => Outcome::AllDeleted { count },
            Err(e) => Outcome::Error(e.into()),
        }
    }
}

/// Where a command for an environment runs.
pub(super) enum Route {
    /// Here: this node holds the lease (or just claimed it), or the environment is terminated
    /// or gone (answered here too).
    Local,
    /// On this live node.
    Remote(String),
}

impl Actors {
    /// Where a command for `environment_id` runs (see [`Route`]).
    pub(super) async fn route(&self, environment_id: &str) -> Result<Route, CommandError> {
        if self.environment(environment_id).is_some() {
            return Ok(Route::Local);
        }
        let deps = &self.inner.env_deps;
        let owner = {
            let mut conn = deps.db.get().await?;
            crate::store::leases::owner_of(&mut conn, environment_id).await?
        };
        let Some((status, owner, _)) = owner else {
            return Ok(Route::Local);
        };
        if status.is_final() || owner.as_deref() == Some(&*deps.cluster.node) {
            return Ok(Route::Local);
        }
        // Unowned, or its owner is dead: take it here rather than wait for a reconcile.
        if self.claim_now(environment_id).await? {
            self.tell_adopt(environment_id);
            return Ok(Route::Local);
        }
        let mut conn = deps.db.get().await?;
        match crate::store::leases::owner_of(&mut conn, environment_id).await? {
            Some((_, Some(owner), _)) if owner != *deps.cluster.node => Ok(Route::Remote(owner)),
            Some((_, Some(_), _)) | None => Ok(Route::Local),
            // Handed back meanwhile and not claimable here (this node is draining).
            Some((_, None, _)) => Err(CommandError::Busy),
        }
    }

    /// Carry `command` to `node`, which holds its environment's lease, and wait for the answer
    /// (see the module docs).
    pub(super) async fn send_remote(
        &self,
        node: &str,
        environment_id: &str,
        command: Command,
    ) -> Result<Reply, CommandError> {
        let deps = &self.inner.env_deps;
        let signals = &deps.cluster.signals;
        let now = deps.clock.now();
        let user_id = {
            let mut conn = deps.db.get().await?;
            match crate::store::leases::owner_of(&mut conn, environment_id).await? {
                Some((_, _, user_id)) => user_id,
                None => return Err(CommandError::NotFound("Environment")),
            }
        };
        let row = CommandRow {
            id: uuid::Uuid::new_v4().to_string(),
            environment_id: environment_id.to_string(),
            user_id,
            target_node: node.to_string(),
            command: serde_json::to_string(&command).map_err(anyhow::Error::from)?,
            state: store::state::PENDING.to_string(),
            reply: None,
            created_at: to_db(now),
            expires_at: to_db(
                now + chrono::Duration::from_std(REMOTE_COMMAND_WAIT).unwrap_or_default(),
            ),
            answered_at: None,
        };
        // Listen before writing, so the answer cannot pass unheard.
        let mut replies = signals.subscribe(Topic::Reply);
        {
            let mut conn = deps.db.get().await?;
            store::insert(&mut conn, &row).await?;
        }
        signals
            .publish(Topic::Command, &format!("{node} {}", row.id))
            .await?;
        let deadline = tokio::time::Instant::now() + REMOTE_COMMAND_WAIT;
        loop {
            {
                let mut conn = deps.db.get().await?;
                if let Some(done) = store::get(&mut conn, &row.id).await?
                    && done.state == store::state::DONE
                {
                    drop(conn);
                    return self.outcome_reply(&done).await;
                }
            }
            // Wait for a reply signal (ours or any: the store decides), or the deadline.
            let heard = tokio::time::timeout_at(deadline, async {
                loop {
                    match signals::next(&mut replies).await {
                        Some(Heard::Signal { payload, .. }) if *payload == *row.id => return true,
                        Some(Heard::Resync) => return true,
                        None => return false, // shutting down
                        Some(_) => {}
                    }
                }
            })
            .await;
            match heard {
                Ok(true) => {}
                Ok(false) | Err(_) => return Err(self.give_up(&row.id).await),
            }
        }
    }

    /// The caller's wait ran out: cancel the command if nobody took it, and say what happened.
    async fn give_up(&self, command_id: &str) -> CommandError {
        let deps = &self.inner.env_deps;
        let cancelled = match deps.db.get().await {
            Ok(mut conn) => store::cancel(&mut conn, command_id, db_now(deps.clock.as_ref())).await,
            Err(e) => Err(e),
        };
        CommandError::Timeout {
            command_id: command_id.to_string(),
            ran: !matches!(cancelled, Ok(true)),
        }
    }

    /// The reply a done command stands for.
    async fn outcome_reply(&self, row: &CommandRow) -> Result<Reply, CommandError> {
        let outcome: Outcome = serde_json::from_str(row.reply.as_deref().unwrap_or("null"))
            .map_err(|e| anyhow::anyhow!("command {} answered unreadably: {e}", row.id))?;
        match outcome {
            Outcome::Environment { environment_id } => {
                let mut conn = self.inner.env_deps.db.get().await?;
                environments_store::get(&mut conn, &environment_id)
                    .await?
                    .map(|env| Reply::Environment(Box::new(env)))
                    .ok_or(CommandError::NotFound("Environment"))
            }
            Outcome::Accepted { status } => Ok(Reply::Accepted(status)),
            Outcome::Snapshots { snapshots } => Ok(Reply::Snapshots(snapshots)),
            Outcome::AllDeleted { count } => Ok(Reply::AllDeleted(count)),
            Outcome::Error(e) => Err(CommandError::Remote(e)),
        }
    }

    /// Take and run one command carried here (at most once: [`store::take`]), answer it and
    /// signal the answer.
    async fn run_carried(&self, command_id: &str) {
        let deps = &self.inner.env_deps;
        let taken = match deps.db.get().await {
            Ok(mut conn) => {
                let now = db_now(deps.clock.as_ref());
                store::take(&mut conn, command_id, &deps.cluster.node, now).await
            }
            Err(e) => Err(e),
        };
        let row = match taken {
            Ok(Some(row)) => row,
            Ok(None) => return, // taken by another, cancelled or expired
            Err(e) => {
                tracing::warn!(command = command_id, error = %e, "could not take a carried command");
                return;
            }
        };
        let outcome = match serde_json::from_str::<Command>(&row.command) {
            Ok(command) => Outcome::of(self.dispatch_here(command).await),
            Err(e) => Outcome::of(Err(CommandError::Internal(anyhow::anyhow!(
                "unreadable carried command: {e}"
            )))),
        };
        let reply = match serde_json::to_string(&outcome) {
            Ok(reply) => reply,
            Err(e) => {
                tracing::error!(command = command_id, error = %e, "could not encode an outcome");
                return;
            }
        };
        let answered = match deps.db.get().await {
            Ok(mut conn) => {
                store::answer(&mut conn, command_id, &reply, db_now(deps.clock.as_ref())).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = answered {
            tracing::warn!(command = command_id, error = %e, "could not answer a carried command");
            return;
        }
        if let Err(e) = deps.cluster.signals.publish(Topic::Reply, command_id).await {
            tracing::warn!(command = command_id, error = %e, "could not signal an answer; the caller finds it in the store");
        }
    }

    /// Run the pending commands for environments this node holds (after lost signals, or for
    /// environments it just claimed), and prune old ones.
    async fn scan_carried(&self, permits: &Permits) {
        let deps = &self.inner.env_deps;
        let now = deps.clock.now();
        let ids = match deps.db.get().await {
            Ok(mut conn) => {
                if let Err(e) = store::prune(&mut conn, to_db(now - COMMAND_RETENTION)).await {
                    tracing::warn!(error = %e, "could not prune carried commands");
                }
                let scope = deps.cluster.claim_scope(now);
                if let Err(e) = store::mark_lost(&mut conn, scope.live_since, to_db(now)).await {
                    tracing::warn!(error = %e, "could not mark the commands of dead nodes");
                }
                store::pending_for(
                    &mut conn,
                    &deps.cluster.node,
                    to_db(now),
                    PENDING_SCAN_LIMIT,
                )
                .await
            }
            Err(e) => Err(e),
        };
        match ids {
            Ok(ids) => {
                for id in ids {
                    spawn_carried(self, permits, id);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not scan carried commands"),
        }
    }

    /// A command carried here, as the command lookup shows it (`None`: unknown, or not
    /// `user_id`'s).
    pub async fn carried_command(
        &self,
        command_id: &str,
        user_id: &str,
    ) -> crate::store::StoreResult<Option<CommandRow>> {
        let mut conn = self.inner.env_deps.db.get().await?;
        Ok(store::get(&mut conn, command_id)
            .await?
            .filter(|row| row.user_id == user_id))
    }
}

/// Run commands carried to this node: at once on a signal naming it, and every heartbeat (and
/// after lost signals) from the store. Ends when `stop` fires.
pub async fn command_loop(actors: Actors, mut stop: tokio::sync::oneshot::Receiver<()>) {
    let cluster = actors.inner.env_deps.cluster.clone();
    let mut heard = cluster.signals.subscribe(Topic::Command);
    let permits: Permits = std::sync::Arc::new(tokio::sync::Semaphore::new(CARRIED_AT_ONCE));
    let mut ticks = tokio::time::interval(cluster.heartbeat);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = ticks.tick() => actors.scan_carried(&permits).await,
            heard_one = signals::next(&mut heard) => match heard_one {
                Some(Heard::Signal { payload, .. }) => {
                    let Some((target, id)) = payload.split_once(' ') else { continue };
                    if target == &*cluster.node {
                        spawn_carried(&actors, &permits, id.to_string());
                    }
                }
                Some(Heard::Resync) => actors.scan_carried(&permits).await,
                None => return,
            },
        }
    }
}
