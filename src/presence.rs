//! This node's terminals and WebSockets as the other nodes see them (issue 11, items 6 and 8):
//! registered in the store so that the terminals list covers every node, a resume that lands on
//! another node finds the tmux session it resumes, and the per-user WebSocket cap
//! (`terminals.max_connections_per_user`) and the per-session terminal cap
//! (`terminals.max_terminals_per_session`) hold over all nodes. On SQLite there is one node; the
//! same rows then only mirror what this process holds.
//!
//! Liveness is the nodes table's: a node is alive while its heartbeat is within
//! `cluster.dead_after_seconds`; rows of dead nodes are ignored by readers and go with the node's
//! row (a restarted node's leftovers are deleted when it joins again). Rate limits (governor) are
//! not here: they stay per node.
//!
//! Writes never block a terminal: a terminal's row is updated by one task per terminal that
//! writes the latest state it was given (attach, detach, resize; never per keystroke) and
//! deletes the row when the terminal ends. A WebSocket's slot is queued for deletion the moment
//! its guard drops, whatever way the connection ended (panics and aborts included), and deleted
//! by a task spawned then; a take on this node first finishes every deletion queued before it,
//! so a client that reconnects as soon as its connection closed is not counted twice. A row that
//! could not be deleted (the database was unreachable for a moment) stays queued and is deleted
//! on the next take or registration, so a hiccup does not hold a user's slot until the node
//! restarts.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, NaiveDateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;

use crate::actors::terminal::TerminalSnapshot;
use crate::clock::{SharedClock, db_now, from_db, to_db};
use crate::store::terminals::{self, TerminalRow};
use crate::store::{Db, StoreResult, slots};

/// Rows queued for deletion (given back, or whose deletion failed and waits for another try);
/// past this many the rest wait for the node's restart (which deletes all its rows) — a database
/// down that long has bigger consequences.
const MAX_QUEUED: usize = 10_000;

/// The store side of this node's terminals and WebSockets.
pub struct Presence {
    db: Db,
    clock: SharedClock,
    node_id: String,
    dead_after: Duration,
    /// Rows to delete: given back, or whose deletion failed (see [`MAX_QUEUED`]); never locked
    /// across an `.await`.
    queued: Mutex<Queued>,
    /// Held while queued rows are being deleted, so that a take waits for deletions in flight
    /// (a slot given back a moment ago) before it counts.
    deleting: tokio::sync::Mutex<()>,
}

/// Ids of rows to delete.
#[derive(Default)]
struct Queued {
    slots: Vec<String>,
    terminals: Vec<String>,
}

impl Queued {
    fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.terminals.is_empty()
    }
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence")
            .field("node_id", &self.node_id)
            .finish()
    }
}

impl Presence {
    /// `node_id` is this node's id; a node silent for `dead_after` is dead.
    pub fn new(db: Db, clock: SharedClock, node_id: String, dead_after: Duration) -> Self {
        Self {
            db,
            clock,
            node_id,
            dead_after,
            queued: Mutex::default(),
            deleting: tokio::sync::Mutex::new(()),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.queued.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a row for deletion (see [`MAX_QUEUED`]).
    fn enqueue(&self, pick: impl FnOnce(&mut Queued) -> &mut Vec<String>, id: String) {
        let mut queued = self.queue();
        let list = pick(&mut queued);
        if list.len() < MAX_QUEUED {
            list.push(id);
        }
    }

    /// A pooled connection on which the queued rows have been deleted (given back, or whose
    /// deletion failed before; those that fail again stay queued). A deletion in flight on
    /// another task finishes first. The lock is taken before the connection, so a pool of one
    /// connection cannot deadlock on it.
    ///
    /// With nothing queued (the common case) the lock is only passed through, so takes and
    /// registrations do not queue behind each other's pool waits.
    async fn settled_conn(&self) -> StoreResult<crate::store::DbConn> {
        let _one_at_a_time = self.deleting.lock().await;
        if self.queue().is_empty() {
            drop(_one_at_a_time);
            return self.db.get().await;
        }
        let mut conn = self.db.get().await?;
        self.delete_queued_on(&mut conn).await;
        Ok(conn)
    }

    /// Delete the queued rows now, unless another task just did (a burst of closes queues many
    /// and spawns a task each; the first deletes them all).
    async fn delete_queued(&self) -> StoreResult<()> {
        let _one_at_a_time = self.deleting.lock().await;
        if self.queue().is_empty() {
            return Ok(());
        }
        let mut conn = self.db.get().await?;
        self.delete_queued_on(&mut conn).await;
        Ok(())
    }

    /// Delete the queued rows; the caller holds `deleting`.
    async fn delete_queued_on(&self, conn: &mut crate::store::DbConn) {
        let Queued {
            slots: slot_ids,
            terminals: terminal_ids,
        } = std::mem::take(&mut *self.queue());
        for id in slot_ids {
            if let Err(e) = slots::release(conn, &id).await {
                tracing::warn!(slot = %id, error = %e, "could not give a connection slot back; retried with the next one taken");
                self.enqueue(|l| &mut l.slots, id);
            }
        }
        for id in terminal_ids {
            if terminals::delete(conn, &id).await.is_err() {
                self.enqueue(|l| &mut l.terminals, id);
            }
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Heartbeats at or after this (store time) are alive.
    pub fn live_since(&self) -> NaiveDateTime {
        to_db(self.clock.now() - self.dead_after)
    }

    /// Take one of `user_id`'s WebSocket slots (`kind`: `terminal`, `logs` or `events`) if the
    /// user holds fewer than `limit` over all live nodes; `Ok(None)` at the limit. The slot is
    /// given back when the returned guard drops.
    pub async fn take_slot(
        self: &Arc<Self>,
        user_id: &str,
        kind: &str,
        limit: usize,
    ) -> StoreResult<Option<SlotGuard>> {
        let row = slots::SlotRow {
            id: uuid::Uuid::new_v4().to_string(),
            node_id: self.node_id.clone(),
            user_id: user_id.to_string(),
            kind: kind.to_string(),
            opened_at: db_now(self.clock.as_ref()),
        };
        let mut conn = self.settled_conn().await?;
        let taken = slots::take(&mut conn, &row, limit, self.live_since()).await?;
        Ok(taken.then(|| SlotGuard {
            presence: self.clone(),
            id: row.id,
        }))
    }

    /// A terminal by id on any node, alive or dead.
    pub async fn terminal(&self, terminal_id: &str) -> StoreResult<Option<TerminalRow>> {
        let mut conn = self.db.get().await?;
        terminals::get(&mut conn, terminal_id).await
    }

    /// The terminals of an environment held by other live nodes.
    pub async fn terminals_elsewhere(&self, environment_id: &str) -> StoreResult<Vec<TerminalRow>> {
        let mut conn = self.db.get().await?;
        terminals::of_environment_elsewhere(
            &mut conn,
            environment_id,
            &self.node_id,
            self.live_since(),
        )
        .await
    }

    /// What a new terminal of this node registers as (see [`Registration::register`]).
    pub fn registration(self: &Arc<Self>, terminal: NewTerminal, size: (u32, u32)) -> Registration {
        let now = db_now(self.clock.as_ref());
        Registration {
            presence: self.clone(),
            row: TerminalRow {
                id: terminal.terminal_id,
                node_id: self.node_id.clone(),
                environment_id: terminal.environment_id,
                user_id: terminal.user_id,
                session_id: terminal.session_id,
                tmux_session: terminal.tmux_session,
                cols: clamp_i32(size.0),
                rows: clamp_i32(size.1),
                attached: true,
                created_at: now,
                updated_at: now,
            },
        }
    }
}

fn clamp_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Who a new terminal belongs to and what it attaches to.
#[derive(Debug, Clone)]
pub struct NewTerminal {
    pub terminal_id: String,
    pub environment_id: String,
    pub user_id: String,
    pub session_id: String,
    pub tmux_session: String,
}

/// A WebSocket's slot in the store; given back when dropped (queued at once, deleted by a
/// spawned task; see the module doc).
pub struct SlotGuard {
    presence: Arc<Presence>,
    id: String,
}

impl SlotGuard {
    /// Give the slot back now: returns once the store no longer counts it, on any node (or once
    /// its deletion failed and was queued to be retried).
    /// The deletion runs on a task of its own: a caller that stops waiting (a bounded close)
    /// does not stop it.
    pub async fn release(mut self) {
        self.presence
            .enqueue(|l| &mut l.slots, std::mem::take(&mut self.id));
        let _ = tokio::spawn(delete_queued(self.presence.clone())).await;
    }
}

/// [`Presence::delete_queued`], logging a failure (the rows stay queued).
async fn delete_queued(presence: Arc<Presence>) {
    if let Err(e) = presence.delete_queued().await {
        tracing::warn!(error = %e, "could not give a connection slot back; retried with the next one taken");
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if self.id.is_empty() {
            return; // released
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime (the process is ending): the node's row takes the slot with it.
            return;
        };
        // Queued before the connection's task goes on (the client may already be reconnecting):
        // a take on this node deletes it, or waits for the task below, before counting.
        self.presence
            .enqueue(|l| &mut l.slots, std::mem::take(&mut self.id));
        runtime.spawn(delete_queued(self.presence.clone()));
    }
}

/// A terminal about to start on this node, not yet in the store.
pub struct Registration {
    presence: Arc<Presence>,
    row: TerminalRow,
}

impl Registration {
    /// Write the terminal's row if its login session holds fewer than `max` terminals over all
    /// live nodes (`local_held`: the session's terminals on this node, this one not included; see
    /// [`terminals::insert_within`]). `Ok(Err(held))`: refused. The record deletes the row when
    /// dropped (the terminal ended, or never started).
    pub async fn register(
        self,
        local_held: usize,
        max: usize,
    ) -> StoreResult<Result<TerminalRecord, usize>> {
        let Registration { presence, row } = self;
        let mut conn = presence.settled_conn().await?;
        if let Err(held) =
            terminals::insert_within(&mut conn, &row, local_held, max, presence.live_since())
                .await?
        {
            return Ok(Err(held));
        }
        drop(conn);
        let initial = TerminalState {
            attached: row.attached,
            cols: row.cols.max(1) as u32,
            rows: row.rows.max(1) as u32,
        };
        let (tx, rx) = watch::channel(initial);
        tokio::spawn(write_loop(presence, row.id, rx));
        Ok(Ok(TerminalRecord { tx }))
    }
}

/// What the store keeps of a terminal's changing state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalState {
    pub attached: bool,
    pub cols: u32,
    pub rows: u32,
}

/// A live terminal's link to its row: [`TerminalRecord::publish`] its state; dropping it deletes
/// the row.
#[derive(Debug)]
pub struct TerminalRecord {
    tx: watch::Sender<TerminalState>,
}

impl TerminalRecord {
    /// The terminal's state now; written to the store only when it changed (and only the latest
    /// of a burst). Never waits.
    pub fn publish(&self, state: TerminalState) {
        self.tx.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
    }
}

/// Write each new state of one terminal, in order, then delete its row when the record drops.
/// The writes are boxed: this task rests for the terminal's whole life waiting for a change, and
/// a store query's future (pool, connection, statement) would otherwise be part of its size.
async fn write_loop(
    presence: Arc<Presence>,
    terminal_id: String,
    mut states: watch::Receiver<TerminalState>,
) {
    while states.changed().await.is_ok() {
        let state = *states.borrow_and_update();
        let now = db_now(presence.clock.as_ref());
        let result = Box::pin(async {
            let mut conn = presence.db.get().await?;
            terminals::update_state(
                &mut conn,
                &terminal_id,
                state.attached,
                clamp_i32(state.cols),
                clamp_i32(state.rows),
                now,
            )
            .await
        })
        .await;
        if let Err(e) = result {
            tracing::warn!(terminal = %terminal_id, error = %e, "could not record a terminal's state");
        }
    }
    let result = Box::pin(async {
        let mut conn = presence.db.get().await?;
        terminals::delete(&mut conn, &terminal_id).await
    })
    .await;
    if let Err(e) = result {
        tracing::warn!(terminal = %terminal_id, error = %e, "could not remove an ended terminal's row; retried with the next terminal registered");
        presence.enqueue(|l| &mut l.terminals, terminal_id);
    }
}

/// One entry of `GET /api/v1/environments/{id}/terminals`: a terminal on any live node. The
/// fields only the holding node knows (`screen`, `cursor`, `alternate_screen`, `offset`) are
/// null for a terminal of another node.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ListedTerminal {
    pub terminal_id: String,
    /// The id of the node that holds it (`GET /api/v1/admin/actors` lists the nodes).
    pub node: String,
    pub cols: u16,
    pub rows: u16,
    /// Whether a WebSocket holds it (otherwise it is within its grace period).
    pub attached: bool,
    pub created_at: DateTime<Utc>,
    /// The visible screen as plain text; null on another node, or while the screen is above
    /// `terminals.screen_max_cells`.
    pub screen: Option<String>,
    /// Zero-based `[row, col]` of the cursor; null on another node.
    pub cursor: Option<[u16; 2]>,
    /// Whether a full-screen program has the alternate screen; null on another node.
    pub alternate_screen: Option<bool>,
    /// Output bytes since it started; null on another node (a resume there gets a new terminal).
    pub offset: Option<u64>,
}

impl ListedTerminal {
    /// A terminal of this node (`node`), with what its screen shows.
    pub fn here(snapshot: TerminalSnapshot, node: &str) -> Self {
        Self {
            terminal_id: snapshot.terminal_id,
            node: node.to_string(),
            cols: snapshot.cols,
            rows: snapshot.rows,
            attached: snapshot.attached,
            created_at: snapshot.created_at,
            screen: snapshot.screen,
            cursor: Some(snapshot.cursor),
            alternate_screen: Some(snapshot.alternate_screen),
            offset: Some(snapshot.offset),
        }
    }

    /// A terminal of another node, from its row.
    pub fn elsewhere(row: TerminalRow) -> Self {
        let dim = |n: i32| u16::try_from(n.max(1)).unwrap_or(u16::MAX);
        Self {
            terminal_id: row.id,
            node: row.node_id,
            cols: dim(row.cols),
            rows: dim(row.rows),
            attached: row.attached,
            created_at: from_db(row.created_at),
            screen: None,
            cursor: None,
            alternate_screen: None,
            offset: None,
        }
    }
}
