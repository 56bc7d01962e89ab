//! Connection slots: one row per open WebSocket, so `terminals.max_connections_per_user` holds over
//! every node of a cluster. A slot is taken in one transaction that serialises the user's takes on
//! every node (PostgreSQL: a transaction-scoped advisory lock on a hash of the user id; SQLite:
//! `BEGIN IMMEDIATE`), counting only the slots of live nodes (this node's, and those of nodes whose
//! heartbeat is at or after `live_since`). Rows hang off the nodes table (`ON DELETE CASCADE`): a
//! node's leftover slots go when it restarts, leaves or is pruned.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use sha2::{Digest, Sha256};

use super::schema::{connection_slots, nodes};
use super::{DbConn, StoreResult};
use crate::db_run;

/// One open WebSocket of a user on a node.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = connection_slots)]
#[diesel(check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct SlotRow {
    pub id: String,
    pub node_id: String,
    pub user_id: String,
    /// `terminal`, `logs` or `events`.
    pub kind: String,
    pub opened_at: NaiveDateTime,
}

/// The PostgreSQL advisory-lock key that serialises one user's slot and terminal takes over all
/// nodes: the first 8 bytes of SHA-256 over a prefix and the user id (a collision only makes two
/// users wait for each other a moment).
pub fn user_lock_key(user_id: &str) -> i64 {
    let digest = Sha256::digest(format!("devpocket-user-limits:{user_id}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// Take a slot: in one serialised transaction, count `row.user_id`'s slots on live nodes (this
/// node, `row.node_id`, always counts) and write `row` if fewer than `limit`. `Ok(false)`: at the
/// limit, nothing written.
pub async fn take(
    conn: &mut DbConn,
    row: &SlotRow,
    limit: usize,
    live_since: NaiveDateTime,
) -> StoreResult<bool> {
    macro_rules! body {
        ($c:ident) => {{
            let held: i64 = connection_slots::table
                .inner_join(nodes::table)
                .filter(connection_slots::user_id.eq(&row.user_id))
                .filter(
                    nodes::id
                        .eq(&row.node_id)
                        .or(nodes::heartbeat_at.ge(live_since)),
                )
                .count()
                .get_result($c)
                .await?;
            if held >= limit as i64 {
                return Ok(false);
            }
            diesel::insert_into(connection_slots::table)
                .values(row)
                .execute($c)
                .await?;
            Ok(true)
        }};
    }
    let taken: Result<bool, diesel::result::Error> =
        crate::serialised!(conn, super::slots::user_lock_key(&row.user_id), |c| {
            body!(c)
        });
    Ok(taken?)
}

/// Give a slot back (a no-op when it is gone already).
pub async fn release(conn: &mut DbConn, id: &str) -> StoreResult<()> {
    db_run!(conn: {
        diesel::delete(connection_slots::table.find(id)).execute(conn).await?;
    });
    Ok(())
}

/// Write a slot without any check (tests and drills simulate other nodes' connections with it).
pub async fn insert(conn: &mut DbConn, row: &SlotRow) -> StoreResult<()> {
    db_run!(conn: {
        diesel::insert_into(connection_slots::table).values(row).execute(conn).await?;
    });
    Ok(())
}

/// The slots of `user_id` on `node_id`.
pub async fn of_user_on_node(
    conn: &mut DbConn,
    user_id: &str,
    node_id: &str,
) -> StoreResult<Vec<SlotRow>> {
    Ok(db_run!(conn: {
        connection_slots::table
            .filter(connection_slots::user_id.eq(user_id))
            .filter(connection_slots::node_id.eq(node_id))
            .select(SlotRow::as_select())
            .load(conn)
            .await?
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_are_stable_and_differ_per_user() {
        assert_eq!(user_lock_key("u1"), user_lock_key("u1"));
        assert_ne!(user_lock_key("u1"), user_lock_key("u2"));
    }
}
