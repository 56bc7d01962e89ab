//! The terminals table: one row per live terminal on any node (who holds it, which tmux session
//! its PTY attaches to, its size, whether a WebSocket holds it), so the terminals list covers
//! every node, a resume that lands on another node finds what it resumes, and
//! `terminals.max_terminals_per_session` holds over all nodes. Rows of nodes whose heartbeat is
//! older than `live_since` are ignored by readers; they go with their node's row (`ON DELETE
//! CASCADE`: a restarted node's old terminals are gone, a long-dead node is pruned).

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};

use super::schema::{nodes, terminals};
use super::{DbConn, StoreResult};
use crate::db_run;

/// One live terminal.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = terminals)]
#[diesel(check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct TerminalRow {
    pub id: String,
    /// The node whose process holds its SSH connection and WebSocket.
    pub node_id: String,
    pub environment_id: String,
    pub user_id: String,
    /// The login session that holds it.
    pub session_id: String,
    /// The tmux session its PTY attaches to (see `actors::terminal::tmux_session`).
    pub tmux_session: String,
    pub cols: i32,
    pub rows: i32,
    /// A WebSocket holds it (otherwise it is within its grace period).
    pub attached: bool,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

/// Register a new terminal within `max` per login session: in one transaction serialised per
/// user over all nodes (PostgreSQL: the user's advisory lock; SQLite: `BEGIN IMMEDIATE`), count
/// the session's attached terminals on other live nodes (detached ones there expire by
/// themselves and never count against a refusal, as on one node), add `local_held` (the
/// session's terminals on this node, the new one not included) and write `row` if the sum is
/// below `max`. `Ok(Err(held))`: refused, `held` terminals held.
pub async fn insert_within(
    conn: &mut DbConn,
    row: &TerminalRow,
    local_held: usize,
    max: usize,
    live_since: NaiveDateTime,
) -> StoreResult<Result<(), usize>> {
    macro_rules! body {
        ($c:ident) => {{
            let remote: i64 = terminals::table
                .inner_join(nodes::table)
                .filter(terminals::session_id.eq(&row.session_id))
                .filter(terminals::attached.eq(true))
                .filter(terminals::node_id.ne(&row.node_id))
                .filter(nodes::heartbeat_at.ge(live_since))
                .count()
                .get_result($c)
                .await?;
            let held = local_held + remote.max(0) as usize;
            if held >= max {
                return Ok(Err(held));
            }
            diesel::insert_into(terminals::table)
                .values(row)
                .execute($c)
                .await?;
            Ok(Ok(()))
        }};
    }
    let result: Result<Result<(), usize>, diesel::result::Error> =
        crate::serialised!(conn, super::slots::user_lock_key(&row.user_id), |c| {
            body!(c)
        });
    Ok(result?)
}

/// Write a terminal without any check (tests and drills simulate other nodes' terminals).
pub async fn insert(conn: &mut DbConn, row: &TerminalRow) -> StoreResult<()> {
    db_run!(conn: {
        diesel::insert_into(terminals::table).values(row).execute(conn).await?;
    });
    Ok(())
}

/// Record a terminal's state (attach, detach, resize).
pub async fn update_state(
    conn: &mut DbConn,
    id: &str,
    attached: bool,
    cols: i32,
    rows: i32,
    now: NaiveDateTime,
) -> StoreResult<()> {
    db_run!(conn: {
        diesel::update(terminals::table.find(id))
            .set((
                terminals::attached.eq(attached),
                terminals::cols.eq(cols),
                terminals::rows.eq(rows),
                terminals::updated_at.eq(now),
            ))
            .execute(conn)
            .await?;
    });
    Ok(())
}

/// Forget a terminal (it ended); a no-op when it is gone already.
pub async fn delete(conn: &mut DbConn, id: &str) -> StoreResult<()> {
    db_run!(conn: {
        diesel::delete(terminals::table.find(id)).execute(conn).await?;
    });
    Ok(())
}

/// A terminal by id, whatever node holds it, alive or dead (a resume after a node died finds
/// its terminals until the node's row is pruned or the node restarts).
pub async fn get(conn: &mut DbConn, id: &str) -> StoreResult<Option<TerminalRow>> {
    Ok(db_run!(conn: {
        terminals::table
            .find(id)
            .select(TerminalRow::as_select())
            .first(conn)
            .await
            .optional()?
    }))
}

/// The terminals of `environment_id` held by live nodes other than `node_id`, by id.
pub async fn of_environment_elsewhere(
    conn: &mut DbConn,
    environment_id: &str,
    node_id: &str,
    live_since: NaiveDateTime,
) -> StoreResult<Vec<TerminalRow>> {
    Ok(db_run!(conn: {
        terminals::table
            .inner_join(nodes::table)
            .filter(terminals::environment_id.eq(environment_id))
            .filter(terminals::node_id.ne(node_id))
            .filter(nodes::heartbeat_at.ge(live_since))
            .order(terminals::id.asc())
            .select(TerminalRow::as_select())
            .load(conn)
            .await?
    }))
}
