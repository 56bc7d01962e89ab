//! The nodes table: every `devpocket serve` process on this database, its heartbeat and the
//! fingerprints of its keys. Joining is checked and written in one transaction that serialises
//! joins (PostgreSQL: a transaction-scoped advisory lock; SQLite: `BEGIN IMMEDIATE`), so two nodes
//! starting at once cannot both miss each other.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};

use super::schema::nodes;
use super::{DbConn, StoreResult};
use crate::db_run;

/// Advisory-lock key that serialises node joins on PostgreSQL (any constant the rest of the
/// schema does not use).
const JOIN_LOCK_KEY: i64 = 0x6465_7670_6f63_6b01; // "devpock" + 1

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = nodes)]
#[diesel(check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct NodeRow {
    pub id: String,
    pub address: String,
    pub provider: String,
    pub version: String,
    pub started_at: NaiveDateTime,
    pub heartbeat_at: NaiveDateTime,
    pub draining: bool,
    /// Space-separated key fingerprints, current first.
    pub jwt_keys: String,
    pub seal_keys: String,
}

impl NodeRow {
    /// The access-token key fingerprints.
    pub fn jwt_fingerprints(&self) -> impl Iterator<Item = &str> {
        self.jwt_keys.split_whitespace()
    }

    /// The sealing key fingerprints.
    pub fn seal_fingerprints(&self) -> impl Iterator<Item = &str> {
        self.seal_keys.split_whitespace()
    }
}

/// In one serialised transaction: read the nodes alive at `live_since` (others than `row`),
/// ask `admit` whether `row` may join them, and if so write `row` (replacing a leftover row of
/// the same id, a crashed earlier run of this node). Returns `admit`'s refusal, if any.
pub async fn join(
    conn: &mut DbConn,
    row: &NodeRow,
    live_since: NaiveDateTime,
    admit: impl Fn(&[NodeRow]) -> Result<(), String> + Send + Sync,
) -> StoreResult<Result<(), String>> {
    macro_rules! body {
        ($c:ident) => {{
            let live: Vec<NodeRow> = nodes::table
                .filter(nodes::heartbeat_at.ge(live_since))
                .filter(nodes::id.ne(&row.id))
                .select(NodeRow::as_select())
                .load($c)
                .await?;
            if let Err(refusal) = admit(&live) {
                return Ok(Err(refusal));
            }
            diesel::delete(nodes::table.find(&row.id))
                .execute($c)
                .await?;
            diesel::insert_into(nodes::table)
                .values(row)
                .execute($c)
                .await?;
            Ok(Ok(()))
        }};
    }
    let result: Result<Result<(), String>, diesel::result::Error> =
        crate::serialised!(conn, JOIN_LOCK_KEY, |c| { body!(c) });
    Ok(result?)
}

/// Record a heartbeat; false when the row is gone (another node pruned it as dead).
pub async fn heartbeat(conn: &mut DbConn, id: &str, now: NaiveDateTime) -> StoreResult<bool> {
    let n = db_run!(conn: {
        diesel::update(nodes::table.find(id))
            .set(nodes::heartbeat_at.eq(now))
            .execute(conn)
            .await?
    });
    Ok(n == 1)
}

/// Write `row` again (after it was pruned while this node could not heartbeat).
pub async fn reinsert(conn: &mut DbConn, row: &NodeRow) -> StoreResult<()> {
    db_run!(conn: {
        diesel::delete(nodes::table.find(&row.id)).execute(conn).await?;
        diesel::insert_into(nodes::table).values(row).execute(conn).await?;
    });
    Ok(())
}

/// Mark a node as draining (its graceful shutdown has begun).
pub async fn set_draining(conn: &mut DbConn, id: &str) -> StoreResult<()> {
    db_run!(conn: {
        diesel::update(nodes::table.find(id))
            .set(nodes::draining.eq(true))
            .execute(conn)
            .await?;
    });
    Ok(())
}

/// Remove a node's row (graceful shutdown).
pub async fn remove(conn: &mut DbConn, id: &str) -> StoreResult<()> {
    db_run!(conn: {
        diesel::delete(nodes::table.find(id)).execute(conn).await?;
    });
    Ok(())
}

/// Delete the rows of nodes silent since before `before`; returns how many.
pub async fn prune(conn: &mut DbConn, before: NaiveDateTime) -> StoreResult<usize> {
    Ok(db_run!(conn: {
        diesel::delete(nodes::table.filter(nodes::heartbeat_at.lt(before)))
            .execute(conn)
            .await?
    }))
}

/// Every node row (live and dead), oldest start first. The table is small: rows of dead nodes
/// are pruned after [`crate::cluster::DEAD_NODE_RETENTION`].
pub async fn list(conn: &mut DbConn) -> StoreResult<Vec<NodeRow>> {
    Ok(db_run!(conn: {
        nodes::table
            .order((nodes::started_at.asc(), nodes::id.asc()))
            .select(NodeRow::as_select())
            .load(conn)
            .await?
    }))
}
