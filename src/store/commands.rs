//! Commands carried between nodes (`environment_commands`): the node a request reached writes
//! the command for the environment's owner, which takes it at most once (`pending → running`,
//! never after `expires_at`) and writes the answer (`done`). A caller whose wait ran out cancels
//! a command not yet taken (`pending → expired`), so it never runs late behind the caller's back.
//! See [`crate::actors::remote`].

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::{environment_commands, environment_leases};
use super::{DbConn, StoreResult};
use crate::db_run;

/// The states of a carried command.
pub mod state {
    pub const PENDING: &str = "pending";
    pub const RUNNING: &str = "running";
    pub const DONE: &str = "done";
    pub const EXPIRED: &str = "expired";
    /// The node that took it died before answering: whether it ran is unknown (look at the
    /// environment).
    pub const LOST: &str = "lost";
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = environment_commands)]
#[diesel(check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct CommandRow {
    /// A UUID: what a caller whose wait ran out is told to look up.
    pub id: String,
    pub environment_id: String,
    /// Who sent it (lookups are checked against it).
    pub user_id: String,
    /// The node that owned the environment's lease when the command was written; once taken,
    /// the node that runs it.
    pub target_node: String,
    /// The command (JSON of [`crate::actors::environment::command::Command`]).
    pub command: String,
    /// One of [`state`].
    pub state: String,
    /// The outcome (JSON of [`crate::actors::remote::Outcome`]), once `done`.
    pub reply: Option<String>,
    pub created_at: NaiveDateTime,
    pub expires_at: NaiveDateTime,
    pub answered_at: Option<NaiveDateTime>,
}

pub async fn insert(conn: &mut DbConn, row: &CommandRow) -> StoreResult<()> {
    db_run!(conn: {
        diesel::insert_into(environment_commands::table).values(row).execute(conn).await?;
    });
    Ok(())
}

/// Take a pending command to run it on `node` (`pending → running`) unless it expired at
/// `now`: at most one taker ever gets the row.
pub async fn take(
    conn: &mut DbConn,
    id: &str,
    node: &str,
    now: NaiveDateTime,
) -> StoreResult<Option<CommandRow>> {
    Ok(db_run!(conn: {
        diesel::update(
            environment_commands::table
                .filter(environment_commands::id.eq(id))
                .filter(environment_commands::state.eq(state::PENDING))
                .filter(environment_commands::expires_at.gt(now)),
        )
        .set((
            environment_commands::state.eq(state::RUNNING),
            environment_commands::target_node.eq(node),
        ))
        .returning(CommandRow::as_returning())
        .get_result(conn)
        .await
        .optional()?
    }))
}

/// Write the outcome of a command this node took.
pub async fn answer(
    conn: &mut DbConn,
    id: &str,
    reply: &str,
    now: NaiveDateTime,
) -> StoreResult<()> {
    db_run!(conn: {
        diesel::update(environment_commands::table.find(id))
            .set((
                environment_commands::state.eq(state::DONE),
                environment_commands::reply.eq(Some(reply)),
                environment_commands::answered_at.eq(Some(now)),
            ))
            .execute(conn)
            .await?;
    });
    Ok(())
}

/// Cancel a command nobody took yet (`pending → expired`); `false` when it was taken.
pub async fn cancel(conn: &mut DbConn, id: &str, now: NaiveDateTime) -> StoreResult<bool> {
    let n = db_run!(conn: {
        diesel::update(
            environment_commands::table
                .filter(environment_commands::id.eq(id))
                .filter(environment_commands::state.eq(state::PENDING)),
        )
        .set((
            environment_commands::state.eq(state::EXPIRED),
            environment_commands::answered_at.eq(Some(now)),
        ))
        .execute(conn)
        .await?
    });
    Ok(n == 1)
}

pub async fn get(conn: &mut DbConn, id: &str) -> StoreResult<Option<CommandRow>> {
    Ok(db_run!(conn: {
        environment_commands::table
            .find(id)
            .select(CommandRow::as_select())
            .first(conn)
            .await
            .optional()?
    }))
}

/// Ids of pending, unexpired commands for environments whose lease `node` holds (signals may
/// have been lost, or the command was written for an owner that died since). Oldest first, at
/// most `limit`.
pub async fn pending_for(
    conn: &mut DbConn,
    node: &str,
    now: NaiveDateTime,
    limit: i64,
) -> StoreResult<Vec<String>> {
    Ok(db_run!(conn: {
        environment_commands::table
            .inner_join(
                environment_leases::table
                    .on(environment_leases::environment_id.eq(environment_commands::environment_id)),
            )
            .filter(environment_leases::owner_node.eq(node))
            .filter(environment_commands::state.eq(state::PENDING))
            .filter(environment_commands::expires_at.gt(now))
            .order(environment_commands::created_at.asc())
            .limit(limit)
            .select(environment_commands::id)
            .load(conn)
            .await?
    }))
}

/// Mark `lost` the running commands of nodes that are dead (no heartbeat since `live_since`):
/// their caller's lookup then says so instead of `running` forever. Returns how many.
pub async fn mark_lost(
    conn: &mut DbConn,
    live_since: NaiveDateTime,
    now: NaiveDateTime,
) -> StoreResult<usize> {
    use super::schema::nodes;
    Ok(db_run!(conn: {
        let alive: Vec<String> = nodes::table
            .filter(nodes::heartbeat_at.ge(live_since))
            .select(nodes::id)
            .load(conn)
            .await?;
        diesel::update(
            environment_commands::table
                .filter(environment_commands::state.eq(state::RUNNING))
                .filter(diesel::dsl::not(environment_commands::target_node.eq_any(&alive))),
        )
        .set((
            environment_commands::state.eq(state::LOST),
            environment_commands::answered_at.eq(Some(now)),
        ))
        .execute(conn)
        .await?
    }))
}

/// Delete commands created before `before` (answered, expired or never taken).
pub async fn prune(conn: &mut DbConn, before: NaiveDateTime) -> StoreResult<usize> {
    Ok(db_run!(conn: {
        diesel::delete(environment_commands::table.filter(environment_commands::created_at.lt(before)))
            .execute(conn)
            .await?
    }))
}
