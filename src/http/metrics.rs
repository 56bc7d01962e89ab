//! Prometheus metrics: requests by route, method and status; latency by route; connections the
//! front end closed on its own, by reason; live actors and restarts by kind (read from the actor
//! directory at scrape time); environment leases held, claimed, lost and handed back (read from
//! the node's lease counts at scrape time).

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::actors::directory::Directory;
use crate::cluster::leases::LeaseStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    connections_closed: Family<ReasonLabels, Counter>,
    actors_live: Family<KindLabels, Gauge>,
    actor_restarts: Family<KindLabels, Counter>,
    leases_held: Gauge,
    leases_claimed: Counter,
    leases_lost: Counter,
    leases_released: Counter,
    ssh_connections: Gauge,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let latency =
            Family::<RouteLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        let connections_closed = Family::<ReasonLabels, Counter>::default();
        let actors_live = Family::<KindLabels, Gauge>::default();
        let actor_restarts = Family::<KindLabels, Counter>::default();
        let mut registry = Registry::with_prefix("devpocket");
        registry.register(
            "http_requests",
            "HTTP requests by method, route pattern and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route pattern",
            latency.clone(),
        );
        registry.register(
            "http_connections_closed",
            "Connections closed by the front end: per_ip_cap, head_timeout, keep_alive_timeout",
            connections_closed.clone(),
        );
        registry.register("actors_live", "Running actors by kind", actors_live.clone());
        registry.register(
            "actor_restarts",
            "Actor restarts granted by supervisors, by kind",
            actor_restarts.clone(),
        );
        let (leases_held, leases_claimed, leases_lost, leases_released) = (
            Gauge::default(),
            Counter::default(),
            Counter::default(),
            Counter::default(),
        );
        registry.register(
            "leases_held",
            "Environment leases this node holds (its environment actors)",
            leases_held.clone(),
        );
        registry.register(
            "leases_claimed",
            "Environment leases this node claimed (unowned, or of a dead node)",
            leases_claimed.clone(),
        );
        registry.register(
            "leases_lost",
            "Environment leases this node lost (taken over, fenced, or dropped by self-fencing)",
            leases_lost.clone(),
        );
        registry.register(
            "leases_released",
            "Environment leases this node handed back on a graceful shutdown",
            leases_released.clone(),
        );
        let ssh_connections = Gauge::default();
        registry.register(
            "ssh_connections",
            "SSH connections to environments (each shared by an environment's terminals and metrics sampler)",
            ssh_connections.clone(),
        );
        Self {
            ssh_connections,
            leases_held,
            leases_claimed,
            leases_lost,
            leases_released,
            registry: Mutex::new(registry),
            requests,
            latency,
            connections_closed,
            actors_live,
            actor_restarts,
        }
    }

    /// `route` is the matched pattern (bounded cardinality), never the raw path.
    pub fn observe(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_string(),
                route: route.to_string(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// The front end closed a connection on its own; `reason` is one of a fixed few.
    pub fn connection_closed(&self, reason: &'static str) {
        self.connections_closed
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// The text exposition, with actor figures refreshed from the directory, lease figures
    /// from the node's counts (`held`: the environment actors it runs) and `ssh_connections`
    /// from the shared SSH connections ([`crate::ssh::pool::SshPool::connections`]).
    pub fn render(
        &self,
        directory: &Directory,
        leases: &LeaseStats,
        held: usize,
        ssh_connections: usize,
    ) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        self.leases_held.set(held as i64);
        self.ssh_connections.set(ssh_connections as i64);
        for (counter, total) in [
            (&self.leases_claimed, leases.claimed.load(Relaxed)),
            (&self.leases_lost, leases.lost.load(Relaxed)),
            (&self.leases_released, leases.released.load(Relaxed)),
        ] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        self.actors_live.clear();
        for (kind, live) in directory.live_by_kind() {
            self.actors_live
                .get_or_create(&KindLabels { kind: kind.into() })
                .set(live);
        }
        for (kind, total) in directory.restarts_by_kind() {
            let counter = self
                .actor_restarts
                .get_or_create(&KindLabels { kind: kind.into() });
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}
