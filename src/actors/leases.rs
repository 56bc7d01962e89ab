//! The lease reconciler: every heartbeat (and at once when a node hands its leases back) this
//! node compares the actors it runs with the leases the store shows it holding, stops the actors
//! of leases it lost, claims unowned environments up to its fair share and starts their actors.
//! See [`crate::cluster::leases`] for the lease itself.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use super::Actors;
use super::environment::EnvironmentsMsg;
use super::root::read_slot;
use crate::cluster::signals::{self, Heard, Topic};
use crate::store::leases as store;

/// Environments one reconcile claims at most: a node that just started next to a store of
/// thousands takes them over a few heartbeats instead of starting every actor at once.
pub const CLAIM_BATCH: i64 = 256;

impl Actors {
    /// Ids of the environments whose actors run on this node.
    pub fn local_environment_ids(&self) -> Vec<String> {
        self.inner
            .env_registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn tell_environments(&self, msg: EnvironmentsMsg) {
        if let Some(sup) = read_slot(&self.inner.environments) {
            self.inner.environments_pending.sent();
            if sup.cast(msg).is_err() {
                self.inner.environments_pending.handled();
            }
        }
    }

    /// One reconcile (see the module docs). Failures are logged; the next heartbeat retries.
    pub async fn reconcile_leases(&self) {
        if let Err(e) = self.try_reconcile_leases().await {
            tracing::warn!(error = %e, "lease reconcile failed");
        }
    }

    async fn try_reconcile_leases(&self) -> crate::store::StoreResult<()> {
        let deps = &self.inner.env_deps;
        let cluster = &deps.cluster;
        let local = self.local_environment_ids();
        if !cluster.guard.valid() {
            // Self-fencing: others may claim these any moment; stop acting now.
            for id in local {
                cluster.lost(&id, "no heartbeat of this node reached the store in time");
                self.tell_environments(EnvironmentsMsg::Release(id));
            }
            return Ok(());
        }
        let mut conn = deps.db.get().await?;
        let held: HashSet<String> = store::owned_ids(&mut conn, &cluster.node)
            .await?
            .into_iter()
            .collect();
        for id in &local {
            if !held.contains(id) {
                cluster.lost(id, "another node holds the lease");
                self.tell_environments(EnvironmentsMsg::Release(id.clone()));
            }
        }
        let mut adopt: Vec<String> = held.into_iter().filter(|id| !local.contains(id)).collect();
        if !cluster.is_draining() {
            let scope = cluster.claim_scope(deps.clock.now());
            let claimed = store::claim(&mut conn, &scope, CLAIM_BATCH).await?;
            if !claimed.is_empty() {
                cluster
                    .stats
                    .claimed
                    .fetch_add(claimed.len() as u64, Ordering::Relaxed);
                tracing::info!(count = claimed.len(), "claimed unowned environments");
            }
            adopt.extend(claimed);
        }
        drop(conn);
        for id in adopt {
            self.tell_environments(EnvironmentsMsg::Adopt(id));
        }
        Ok(())
    }

    /// Claim one environment for this node if it has no live owner (a command for it arrived
    /// here) and start its actor; `true` when this node holds it now.
    pub(super) async fn claim_now(&self, environment_id: &str) -> crate::store::StoreResult<bool> {
        let deps = &self.inner.env_deps;
        let cluster = &deps.cluster;
        if cluster.is_draining() || !cluster.guard.valid() {
            return Ok(false);
        }
        let scope = cluster.claim_scope(deps.clock.now());
        let mut conn = deps.db.get().await?;
        let claimed = store::claim_one(&mut conn, &scope, environment_id).await?;
        Ok(claimed.is_some_and(|lease| {
            cluster.stats.claimed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(environment = %lease.environment_id, epoch = lease.epoch, "claimed an unowned environment for a command");
            true
        }))
    }

    /// A graceful shutdown: stop every environment actor, then hand every lease back (owner
    /// cleared, epoch bumped) and tell the other nodes, which claim them at once instead of
    /// waiting for this node's heartbeat to expire. Returns how many were handed back.
    pub async fn hand_back_leases(&self) -> usize {
        let deps = &self.inner.env_deps;
        let cluster = &deps.cluster;
        cluster.start_draining();
        self.stop_environment_actors().await;
        let released = match deps.db.get().await {
            Ok(mut conn) => store::release_all(&mut conn, &cluster.node).await,
            Err(e) => Err(e),
        };
        match released {
            Ok(n) => {
                cluster
                    .stats
                    .released
                    .fetch_add(n as u64, Ordering::Relaxed);
                if let Err(e) = cluster.signals.publish(Topic::Lease, &n.to_string()).await {
                    tracing::warn!(error = %e, "could not tell the other nodes about the handed-back leases");
                }
                tracing::info!(count = n, "environment leases handed back");
                n
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not hand the leases back; they expire with this node's heartbeat");
                0
            }
        }
    }
}

/// Reconcile leases every `cluster.heartbeat_seconds`, and at once when another node hands its
/// leases back (or signals may have been lost). Ends when `stop` fires.
pub async fn lease_loop(actors: Actors, mut stop: tokio::sync::oneshot::Receiver<()>) {
    let cluster = actors.inner.env_deps.cluster.clone();
    let mut heard = cluster.signals.subscribe(Topic::Lease);
    let mut ticks = tokio::time::interval(cluster.heartbeat);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = ticks.tick() => {}
            heard_one = signals::next(&mut heard) => match heard_one {
                Some(Heard::Signal { node, .. }) if *node == *cluster.node => continue,
                Some(_) => {}
                None => return,
            },
        }
        actors.reconcile_leases().await;
    }
}

impl Actors {
    /// Start the cluster loops: the lease reconciler, the runner of carried commands and the
    /// relay of other nodes' environment changes. Stopped by [`Actors::shutdown`].
    pub fn start_cluster_loops(&self) {
        let mut loops = self.inner.loops.lock().unwrap_or_else(|e| e.into_inner());
        let (tx, rx) = tokio::sync::oneshot::channel();
        loops.push((tx, tokio::spawn(lease_loop(self.clone(), rx))));
        let (tx, rx) = tokio::sync::oneshot::channel();
        loops.push((
            tx,
            tokio::spawn(super::remote::command_loop(self.clone(), rx)),
        ));
        let (tx, rx) = tokio::sync::oneshot::channel();
        loops.push((tx, tokio::spawn(super::relay::relay_loop(self.clone(), rx))));
    }

    /// Stop the cluster loops and wait for them.
    pub(super) async fn stop_cluster_loops(&self) {
        let loops: Vec<_> = self
            .inner
            .loops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for (stop, task) in loops {
            let _ = stop.send(());
            let _ = task.await;
        }
    }

    /// A graceful shutdown's first steps (SIGTERM): stop claiming, close every terminal and
    /// stream with "reconnect" (1012) so the app reconnects through the load balancer to another
    /// node, and hand every lease back so the other nodes take the environments over at once.
    /// Returns the leases handed back.
    pub async fn drain(&self) -> usize {
        self.inner.env_deps.cluster.start_draining();
        self.inner.draining.send_replace(true);
        self.send_sessions(super::session::SessionsMsg::Drain);
        self.hand_back_leases().await
    }
}
