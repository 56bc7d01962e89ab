//! Environment leases (`environment_leases`): one row per environment naming the node whose
//! actor runs it (`owner_node`, `NULL` when unowned) and an epoch bumped by every claim and
//! hand-back. See [`crate::cluster::leases`] for why a row lease, and how it is renewed.
//!
//! **Fencing.** Every write of an environment actor runs in a transaction that first updates its
//! lease row *only if* it still names the writer's node and epoch ([`under_lease!`]); that update
//! locks the row until the write commits. A claim updates the same row, so PostgreSQL orders the
//! two: a claim that committed first makes the writer's check match nothing (after waiting on the
//! lock, PostgreSQL re-evaluates the condition on the new row version: READ COMMITTED, "UPDATE"
//! in the manual's concurrency chapter), and the write is refused with
//! [`super::StoreError::Fenced`] — the epoch is the fencing token of Kleppmann's "How to do
//! distributed locking" (2016).

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};

use super::schema::{environment_leases, environments, nodes};
use super::{DbConn, StoreResult};
use crate::actors::environment::machine::Status;
use crate::db_run;

/// An environment lease as its owner holds it: every write of the environment's actor names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub environment_id: String,
    pub node: String,
    pub epoch: i64,
}

/// Run `$body` (a block using connection `$c`, evaluating to `T`, `?` on diesel errors) in a
/// transaction that first checks and locks `$lease`'s row; evaluates to `StoreResult<T>`, with
/// [`super::StoreError::Fenced`] when the lease is no longer held.
macro_rules! under_lease {
    ($conn:ident, $lease:expr, |$c:ident| $body:block) => {{
        let lease: &$crate::store::leases::Lease = $lease;
        let result: Result<Option<_>, diesel::result::Error> = $crate::db_run!($conn: {
            $conn
                .transaction(async |$c| {
                    use $crate::store::schema::environment_leases as el;
                    $crate::store::BoundLocks::bound_locks($c).await?;
                    let held = diesel::update(
                        el::table
                            .filter(el::environment_id.eq(&lease.environment_id))
                            .filter(el::owner_node.eq(&lease.node))
                            .filter(el::epoch.eq(lease.epoch)),
                    )
                    .set(el::epoch.eq(lease.epoch))
                    .execute($c)
                    .await?;
                    if held != 1 {
                        return Ok(None);
                    }
                    Ok(Some($body))
                })
                .await
        });
        match result {
            Ok(Some(value)) => Ok(value),
            Ok(None) => Err($crate::store::StoreError::Fenced(lease.environment_id.clone())),
            Err(e) => Err($crate::store::StoreError::from(e)),
        }
    }};
}
pub(crate) use under_lease;

/// The lease `node` holds on an environment, if it does.
pub async fn lease_of(conn: &mut DbConn, id: &str, node: &str) -> StoreResult<Option<Lease>> {
    let epoch: Option<i64> = db_run!(conn: {
        environment_leases::table
            .filter(environment_leases::environment_id.eq(id))
            .filter(environment_leases::owner_node.eq(node))
            .select(environment_leases::epoch)
            .first(conn)
            .await
            .optional()?
    });
    Ok(epoch.map(|epoch| Lease {
        environment_id: id.to_string(),
        node: node.to_string(),
        epoch,
    }))
}

/// Ids of every environment that is not terminated and whose lease `node` holds.
pub async fn owned_ids(conn: &mut DbConn, node: &str) -> StoreResult<Vec<String>> {
    Ok(db_run!(conn: {
        environment_leases::table
            .inner_join(environments::table)
            .filter(environments::status.ne(Status::Terminated))
            .filter(environment_leases::owner_node.eq(node))
            .select(environments::id)
            .load(conn)
            .await?
    }))
}

/// Advisory-lock key that serialises lease claims on PostgreSQL (claims are a few per heartbeat
/// per node, so one lock costs nothing and rules out two claimers judging the same orphan).
const CLAIM_LOCK_KEY: i64 = 0x6465_7670_6f63_6b02; // "devpock" + 2

/// Who may claim what, as [`claim`] and [`claim_one`] judge it.
#[derive(Debug, Clone)]
pub struct ClaimScope<'a> {
    /// The claiming node.
    pub node: &'a str,
    /// Nodes with a heartbeat at or after this are alive (their leases hold).
    pub live_since: NaiveDateTime,
}

/// Claim unowned environments (no owner, or an owner whose heartbeat is older than
/// `scope.live_since`) for `scope.node`, up to its fair share — ⌈live environments / live nodes
/// that are not draining⌉, less what it holds — and at most `limit`, oldest first. Each claim
/// bumps the epoch (fencing the previous owner). Serialised across nodes (PostgreSQL: a
/// transaction-scoped advisory lock; SQLite: `BEGIN IMMEDIATE`). Returns the claimed ids.
pub async fn claim(
    conn: &mut DbConn,
    scope: &ClaimScope<'_>,
    limit: i64,
) -> StoreResult<Vec<String>> {
    let (node, live_since) = (scope.node, scope.live_since);
    macro_rules! body {
        ($c:ident) => {{
            let alive: Vec<(String, bool)> = nodes::table
                .filter(nodes::heartbeat_at.ge(live_since))
                .select((nodes::id, nodes::draining))
                .load($c)
                .await?;
            // The claimer counts as alive whatever its row says (never claim from oneself).
            let alive_ids: Vec<&str> = alive
                .iter()
                .map(|(id, _)| id.as_str())
                .chain(std::iter::once(node))
                .collect();
            let serving = alive
                .iter()
                .filter(|(_, draining)| !draining)
                .count()
                .max(1) as i64;
            let total: i64 = environments::table
                .filter(environments::status.ne(Status::Terminated))
                .count()
                .get_result($c)
                .await?;
            let mine: i64 = environment_leases::table
                .inner_join(environments::table)
                .filter(environments::status.ne(Status::Terminated))
                .filter(environment_leases::owner_node.eq(node))
                .count()
                .get_result($c)
                .await?;
            let share = (total + serving - 1) / serving;
            let room = (share - mine).min(limit);
            if room <= 0 {
                return Ok(Vec::new());
            }
            let orphans: Vec<String> = environment_leases::table
                .inner_join(environments::table)
                .filter(environments::status.ne(Status::Terminated))
                .filter(
                    environment_leases::owner_node
                        .is_null()
                        .or(diesel::dsl::not(
                            environment_leases::owner_node.eq_any(&alive_ids),
                        )),
                )
                .order((environments::created_at.asc(), environments::id.asc()))
                .limit(room)
                .select(environments::id)
                .load($c)
                .await?;
            if !orphans.is_empty() {
                diesel::update(
                    environment_leases::table
                        .filter(environment_leases::environment_id.eq_any(&orphans)),
                )
                .set((
                    environment_leases::owner_node.eq(Some(node)),
                    environment_leases::epoch.eq(environment_leases::epoch + 1),
                ))
                .execute($c)
                .await?;
            }
            Ok(orphans)
        }};
    }
    let claimed: Result<Vec<String>, diesel::result::Error> =
        crate::serialised!(conn, CLAIM_LOCK_KEY, |c| { body!(c) });
    Ok(claimed?)
}

/// Claim one environment for `scope.node` if it is unowned (see [`claim`]; no fair-share
/// limit: a command for it arrived here). Returns the lease now held, `None` when a live node
/// holds it (or it is terminated, or gone).
pub async fn claim_one(
    conn: &mut DbConn,
    scope: &ClaimScope<'_>,
    id: &str,
) -> StoreResult<Option<Lease>> {
    let (node, live_since) = (scope.node, scope.live_since);
    macro_rules! body {
        ($c:ident) => {{
            let mut alive: Vec<String> = nodes::table
                .filter(nodes::heartbeat_at.ge(live_since))
                .select(nodes::id)
                .load($c)
                .await?;
            alive.push(node.to_string());
            let live: i64 = environments::table
                .filter(environments::id.eq(id))
                .filter(environments::status.ne(Status::Terminated))
                .count()
                .get_result($c)
                .await?;
            if live == 0 {
                return Ok(None);
            }
            diesel::update(
                environment_leases::table
                    .filter(environment_leases::environment_id.eq(id))
                    .filter(
                        environment_leases::owner_node
                            .is_null()
                            .or(diesel::dsl::not(
                                environment_leases::owner_node.eq_any(&alive),
                            )),
                    ),
            )
            .set((
                environment_leases::owner_node.eq(Some(node)),
                environment_leases::epoch.eq(environment_leases::epoch + 1),
            ))
            .returning(environment_leases::epoch)
            .get_result::<i64>($c)
            .await
            .optional()
        }};
    }
    let claimed: Result<Option<i64>, diesel::result::Error> =
        crate::serialised!(conn, CLAIM_LOCK_KEY, |c| { body!(c) });
    Ok(claimed?.map(|epoch| Lease {
        environment_id: id.to_string(),
        node: node.to_string(),
        epoch,
    }))
}

/// Hand back every lease `node` holds (a graceful shutdown): the owner is cleared and the epoch
/// bumped, so a late write of this node is refused and any live node may claim them at once.
/// Returns how many.
pub async fn release_all(conn: &mut DbConn, node: &str) -> StoreResult<usize> {
    Ok(db_run!(conn: {
        diesel::update(environment_leases::table.filter(environment_leases::owner_node.eq(node)))
            .set((
                environment_leases::owner_node.eq(None::<String>),
                environment_leases::epoch.eq(environment_leases::epoch + 1),
            ))
            .execute(conn)
            .await?
    }))
}

/// An environment's status, the node holding its lease and the user it belongs to, for routing
/// a command: `None` when the environment does not exist.
pub async fn owner_of(
    conn: &mut DbConn,
    id: &str,
) -> StoreResult<Option<(Status, Option<String>, String)>> {
    Ok(db_run!(conn: {
        environments::table
            .left_join(environment_leases::table)
            .filter(environments::id.eq(id))
            .select((
                environments::status,
                environment_leases::owner_node.nullable(),
                environments::user_id,
            ))
            .first::<(Status, Option<String>, String)>(conn)
            .await
            .optional()?
    }))
}

/// How many live environments each node holds, for the ops view (`(node id, count)`).
pub async fn held_by_node(conn: &mut DbConn) -> StoreResult<Vec<(String, i64)>> {
    let rows: Vec<(Option<String>, i64)> = db_run!(conn: {
        environment_leases::table
            .inner_join(environments::table)
            .filter(environments::status.ne(Status::Terminated))
            .filter(environment_leases::owner_node.is_not_null())
            .group_by(environment_leases::owner_node)
            .select((environment_leases::owner_node, diesel::dsl::count_star()))
            .load(conn)
            .await?
    });
    Ok(rows
        .into_iter()
        .filter_map(|(node, n)| node.map(|node| (node, n)))
        .collect())
}
