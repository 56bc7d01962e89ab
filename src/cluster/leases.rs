//! Environment leases: which node runs an environment's actor.
//!
//! **Choice: a row lease, renewed by the node heartbeat.** The lease is two columns of the
//! environment's row, `owner_node` and `lease_epoch`; it holds while the owner's heartbeat in the
//! nodes table is younger than `cluster.dead_after_seconds`. One heartbeat renews every lease of
//! a node (one `UPDATE`, however many environments it runs). An advisory lock on a dedicated
//! connection was the alternative; it was not chosen because a lock gives no fencing token (a
//! paused holder whose session the server has not yet noticed is dead still "holds" it, and its
//! late writes cannot be told apart), it ties every lease to the health of one TCP connection,
//! and PgBouncer in transaction mode breaks it.
//!
//! **Fencing.** A claim bumps `lease_epoch` in the same row the owner writes; every write of an
//! environment actor names the epoch it holds ([`crate::store::environments::Lease`]) and is
//! refused when it no longer matches. PostgreSQL orders the two updates of one row, so once a
//! claim committed no write of the old owner lands.
//!
//! **Self-fencing.** Others may claim a node's environments once its stored heartbeat is older
//! than the dead-after deadline. A node stops its own actors earlier: when its last heartbeat the
//! store took *began* more than `dead_after - heartbeat` ago by its monotonic clock
//! ([`LeaseGuard`]), so it has stopped acting before anyone else may start (as long as the
//! nodes' wall clocks agree to within one heartbeat: run NTP).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::signals::Signals;

/// Whether this node may still act on its leases (see the module docs), by its monotonic clock:
/// unaffected by wall-clock steps and by the application clock that tests move.
#[derive(Debug, Clone)]
pub struct LeaseGuard {
    base: Instant,
    /// Milliseconds after `base` at which the last heartbeat that reached the store began.
    last_renewal_ms: Arc<AtomicU64>,
    valid_for: Duration,
}

impl LeaseGuard {
    /// A guard renewed now, valid for `valid_for` after each renewal.
    pub fn new(valid_for: Duration) -> Self {
        Self {
            base: Instant::now(),
            last_renewal_ms: Arc::new(AtomicU64::new(0)),
            valid_for,
        }
    }

    /// A heartbeat that began at `started` reached the store.
    pub fn renewed(&self, started: Instant) {
        let ms = started.saturating_duration_since(self.base).as_millis() as u64;
        self.last_renewal_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// Whether the last renewal is recent enough that no other node may have claimed this
    /// node's environments yet.
    pub fn valid(&self) -> bool {
        let last = self.base + Duration::from_millis(self.last_renewal_ms.load(Ordering::Acquire));
        last.elapsed() < self.valid_for
    }
}

/// Lease counts since start, for `/metrics`.
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// Environments this node claimed (new ones it created are not counted).
    pub claimed: AtomicU64,
    /// Leases this node lost: taken over by another node, refused by fencing, or dropped by
    /// self-fencing.
    pub lost: AtomicU64,
    /// Leases handed back on a graceful shutdown.
    pub released: AtomicU64,
}

/// This node's part in the cluster, as the environment actors and the front end need it.
#[derive(Debug)]
pub struct Membership {
    /// This node's id (`nodes.id`, the `owner_node` of the environments it runs).
    pub node: Arc<str>,
    /// Self-fencing (see [`LeaseGuard`]).
    pub guard: LeaseGuard,
    pub stats: LeaseStats,
    /// Signals to and from the other nodes.
    pub signals: Arc<Signals>,
    /// Set when a graceful shutdown begins: no more claims.
    draining: AtomicBool,
    /// `cluster.dead_after_seconds`: a node silent this long is dead and its leases claimable.
    pub dead_after: chrono::Duration,
    /// `cluster.heartbeat_seconds`.
    pub heartbeat: Duration,
}

impl Membership {
    pub fn new(
        node: &str,
        signals: Arc<Signals>,
        heartbeat: Duration,
        dead_after: Duration,
    ) -> Self {
        // Stop acting one heartbeat before the others may claim (at least one heartbeat).
        let valid_for = dead_after.saturating_sub(heartbeat).max(heartbeat);
        Self {
            node: Arc::from(node),
            guard: LeaseGuard::new(valid_for),
            stats: LeaseStats::default(),
            signals,
            draining: AtomicBool::new(false),
            dead_after: chrono::Duration::from_std(dead_after).unwrap_or(chrono::Duration::MAX),
            heartbeat,
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Who may claim what now (`now` by the application clock).
    pub fn claim_scope(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> crate::store::leases::ClaimScope<'_> {
        crate::store::leases::ClaimScope {
            node: &self.node,
            live_since: crate::clock::to_db(now - self.dead_after),
        }
    }

    /// Count a lost lease.
    pub fn lost(&self, environment_id: &str, why: &str) {
        self.stats.lost.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            environment = environment_id,
            why,
            "environment lease lost; its actor stops here"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_expires_without_renewal_and_a_renewal_extends_it() {
        let guard = LeaseGuard::new(Duration::from_millis(0));
        assert!(!guard.valid(), "zero validity is never valid");
        let guard = LeaseGuard::new(Duration::from_secs(3600));
        assert!(guard.valid());
        // A renewal that began before the last one does not move it back.
        let earlier = guard.base;
        guard.renewed(Instant::now());
        let last = guard.last_renewal_ms.load(Ordering::Acquire);
        guard.renewed(earlier);
        assert_eq!(guard.last_renewal_ms.load(Ordering::Acquire), last);
    }

    #[test]
    fn validity_is_one_heartbeat_short_of_the_deadline() {
        let m = Membership::new(
            "n",
            Signals::detached("n"),
            Duration::from_secs(5),
            Duration::from_secs(30),
        );
        assert_eq!(m.guard.valid_for, Duration::from_secs(25));
        let m = Membership::new(
            "n",
            Signals::detached("n"),
            Duration::from_secs(5),
            Duration::from_secs(6),
        );
        assert_eq!(m.guard.valid_for, Duration::from_secs(5));
    }
}
