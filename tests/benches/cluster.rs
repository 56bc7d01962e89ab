//! Cluster benchmark: three real nodes (child processes of the built binary) on one PostgreSQL
//! database with the Contabo simulator, driven by real HTTP clients (the harness of
//! `tests/cluster_nodes.rs`). Prints numbers; asserts only that the answers are right, never how
//! fast they came.
//!
//! - requests/s of an authenticated `GET /api/v1/environments` through one node, then
//!   round-robin through three (same number of concurrent clients);
//! - failover: SIGKILL of the node that owns a running environment, until another node runs it
//!   (its actor in that node's tree) and reports it `running`.
//!
//! `cargo bench --bench cluster` (release build); needs `DEVPOCKET_TEST_DATABASE_URL`. Knobs:
//! `BENCH_REQUESTS` (per measurement, default 20000), `BENCH_CONCURRENCY` (default 16).

#[path = "../support/mod.rs"]
mod support;

mod report;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use support::nodes::{Cluster, ClusterSetup, POLL};

use report::{Latencies, knob, line};

fn main() {
    if !support::postgres_configured() {
        eprintln!(
            "cluster bench skipped: set {} (nodes share one PostgreSQL database)",
            support::PG_ENV
        );
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let requests = knob("BENCH_REQUESTS", 20_000);
        let concurrency = knob("BENCH_CONCURRENCY", 16).max(1);
        println!(
            "# cluster: 3 nodes on one PostgreSQL, {requests} requests per measurement, \
             {concurrency} concurrent clients; {} cores (nodes, database and clients share them)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        run(requests, concurrency).await;
    });
}

async fn run(requests: usize, concurrency: usize) {
    let mut c = Cluster::start(ClusterSetup::default(), |_| {}).await;
    let admin = c.admin("bench").await;

    let bases: Vec<String> = (0..c.len()).map(|i| c.base(i).to_string()).collect();
    for (label, targets) in [
        ("GET /api/v1/environments, one node", vec![bases[0].clone()]),
        (
            "GET /api/v1/environments, 3 nodes round-robin",
            bases.clone(),
        ),
    ] {
        let (rate, samples) =
            throughput(&c.http, &targets, &admin.access, requests, concurrency).await;
        line(
            label,
            format!("{rate:>9.0} req/s  {}", Latencies::new(samples).summary()),
        );
    }

    // Failover: a running environment owned by node 0; node 0 killed.
    let env = c.create_env(0, &admin, "failover").await;
    c.wait_status(0, &admin, &env, "running", c.provision_bound())
        .await;
    let owner = c
        .wait_single_owners(&admin, std::slice::from_ref(&env), c.dead_bound())
        .await[&env];
    let killed = Instant::now();
    c.kill(owner);
    // Resuming a running environment reconnects to its machine: no provisioning to wait for.
    let bound = c.failover_bound() + Duration::from_secs(30);
    let deadline = Instant::now() + bound;
    let mut last = String::new();
    let took = loop {
        if Instant::now() >= deadline {
            break None;
        }
        if let Some(took) = failed_over(&c, &admin, &env, killed, &mut last).await {
            break Some(took);
        }
        tokio::time::sleep(POLL).await;
    };
    match took {
        Some(took) => line(
            "failover: SIGKILL of the owner → running elsewhere",
            format!(
                "{:>9.0} ms  (dead after {} s, heartbeat {} s)",
                report::ms(took),
                c.config(0).cluster.dead_after_seconds,
                c.config(0).cluster.heartbeat_seconds
            ),
        ),
        None => line(
            "failover: SIGKILL of the owner → running elsewhere",
            format!("not within {bound:?} (last: {last})"),
        ),
    }
}

/// Whether `env` now runs on an answering node and is reported `running` there; the time since
/// `killed` if so.
async fn failed_over(
    c: &Cluster,
    admin: &support::Session,
    env: &str,
    killed: Instant,
    last: &mut String,
) -> Option<Duration> {
    let owners = c.owners(admin).await;
    let Some([owner]) = owners.get(env).map(Vec::as_slice) else {
        *last = format!("owners {owners:?}");
        return None;
    };
    let seen = c.env(*owner, admin, env).await;
    if seen["status"] == "running" {
        Some(killed.elapsed())
    } else {
        *last = format!("on node-{owner}: {}", seen["status"]);
        None
    }
}

/// `requests` authenticated GETs spread over `targets` (request k to target k mod n) by
/// `concurrency` clients; the rate and every latency.
async fn throughput(
    http: &reqwest::Client,
    targets: &[String],
    token: &str,
    requests: usize,
    concurrency: usize,
) -> (f64, Vec<Duration>) {
    let next = Arc::new(AtomicUsize::new(0));
    let targets = Arc::new(targets.to_vec());
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        let (http, targets, next, token) = (
            http.clone(),
            targets.clone(),
            next.clone(),
            token.to_string(),
        );
        clients.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= requests {
                    return samples;
                }
                let url = format!("{}/api/v1/environments", targets[k % targets.len()]);
                let t = Instant::now();
                let resp = http
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("request");
                let status = resp.status();
                let _ = resp.bytes().await;
                samples.push(t.elapsed());
                assert_eq!(status, StatusCode::OK, "{url}");
            }
        }));
    }
    let mut samples = Vec::with_capacity(requests);
    for client in clients {
        samples.extend(client.await.expect("client"));
    }
    (requests as f64 / started.elapsed().as_secs_f64(), samples)
}
