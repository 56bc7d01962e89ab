//! HTTP front-end benchmark: the real server on 127.0.0.1:0 (SQLite, and PostgreSQL when
//! `DEVPOCKET_TEST_DATABASE_URL` is set), real HTTP clients. Prints numbers; asserts only that the
//! answers are right, never how fast they came.
//!
//! `cargo bench --bench http` (release build). Knobs: `BENCH_REQUESTS` (per route and round,
//! default 20000), `BENCH_ROUNDS` (default 3), `BENCH_CONCURRENCY` (default 16),
//! `BENCH_LOGINS` (default 32).
//!
//! Requests/s of `GET /health/live`, `/api/v1/auth/me` and `/api/v1/environments` (a user with
//! none) are measured in interleaved rounds and printed with the ratios to `/health/live` of the
//! same round, then their medians: issue 12 asks `/environments ÷ /health/live ≥ 0.5`. The load
//! comes from minimal HTTP/1.1 keep-alive clients ([`RawClient`], one request in flight per
//! connection, like `wrk -c16`): `reqwest` clients in the same process cost several times the
//! server's own CPU per request and capped `/health/live` well below what `wrk` measures against
//! the same build. Client and server still share the process and its cores, so the absolute
//! numbers are lower than `wrk`'s against a separate server; the ratios are what to compare.
//!
//! Where a request's CPU went (perf under `wrk -t2 -c16`, release build, SQLite, issue 12):
//! before, `GET /api/v1/environments` made two hops to tokio's blocking pool (the pool's
//! `SELECT 1` check on every checkout, then the query), and the futex wake-ups and context
//! switches on both sides of those hops were about half of all samples; the SQLite work itself was
//! under 10 %. Now the checkout checks only connections idle for 30 s, and the two reads of the
//! request path (the session check, when not cached, and the list) run inline on the async thread
//! with plain `query_only` connections (`store::Db::read_sqlite`).

#[path = "../support/mod.rs"]
mod support;

mod report;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use reqwest::StatusCode;
use serde_json::json;
use support::{Backend, PASSWORD, TestServer, postgres_configured};

use report::{Latencies, knob, line};

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let requests = knob("BENCH_REQUESTS", 20_000);
        let rounds = knob("BENCH_ROUNDS", 3).max(1);
        let concurrency = knob("BENCH_CONCURRENCY", 16).max(1);
        let logins = knob("BENCH_LOGINS", 32);
        println!(
            "# http: {requests} requests per route and round, {rounds} rounds, {concurrency} \
             concurrent keep-alive connections; {} cores",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        let mut backends = vec![Backend::Sqlite];
        if postgres_configured() {
            backends.push(Backend::Postgres);
        }
        for backend in backends {
            run(backend, requests, rounds, concurrency, logins).await;
        }
    });
}

/// The routes measured, and whether they need the bearer token.
const ROUTES: [(&str, bool); 3] = [
    ("/health/live", false),
    ("/api/v1/auth/me", true),
    ("/api/v1/environments", true),
];

async fn run(backend: Backend, requests: usize, rounds: usize, concurrency: usize, logins: usize) {
    println!("\n## {backend:?}");
    // Rate limits off: the test configuration's 100,000 per minute is less than one run sends.
    let s = Arc::new(TestServer::start_with(backend, |c| c.rate_limit.enabled = false).await);
    let me = s.register("bench").await;
    let addr = s
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();

    // rates[route][round], requests/s
    let mut rates = vec![Vec::new(); ROUTES.len()];
    for round in 1..=rounds {
        for (i, (route, authed)) in ROUTES.iter().enumerate() {
            let token = authed.then_some(me.access.as_str());
            let (rate, samples) = measure(&addr, route, token, requests, concurrency).await;
            rates[i].push(rate);
            line(
                &format!("round {round}: GET {route}"),
                format!(
                    "{rate:>9.0} req/s  {:>5.2}× live  {}",
                    rate / rates[0][round - 1],
                    Latencies::new(samples).summary()
                ),
            );
        }
    }
    let medians: Vec<f64> = rates.iter().map(|r| median(r)).collect();
    for (i, (route, _)) in ROUTES.iter().enumerate() {
        line(
            &format!("median: GET {route}"),
            format!("{:>9.0} req/s", medians[i]),
        );
    }
    let ratio = |i: usize| {
        let per_round: Vec<f64> = rates[i].iter().zip(&rates[0]).map(|(r, l)| r / l).collect();
        median(&per_round)
    };
    line(
        "ratio /auth/me ÷ /health/live (median)",
        format!("{:>9.2}", ratio(1)),
    );
    line(
        "ratio /environments ÷ /health/live (median)",
        format!("{:>9.2}  (goal ≥ 0.50)", ratio(2)),
    );

    // Logins are argon2id at OWASP parameters, run off the async threads on a bounded pool.
    let started = Instant::now();
    let mut tasks = Vec::new();
    let per_task = logins.div_ceil(4);
    for _ in 0..4 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            for _ in 0..per_task {
                let t = Instant::now();
                let (status, body) = s.login("bench", PASSWORD).await;
                samples.push(t.elapsed());
                assert_eq!(status, StatusCode::OK, "{body}");
            }
            samples
        }));
    }
    let mut samples: Vec<Duration> = Vec::new();
    for t in tasks {
        samples.extend(t.await.expect("login task"));
    }
    let n = samples.len();
    line(
        "POST /api/v1/auth/login (4 concurrent)",
        format!(
            "{:>9.1} /s     {}",
            n as f64 / started.elapsed().as_secs_f64(),
            Latencies::new(samples).summary()
        ),
    );

    // Create → running on the local provider, end to end.
    let t = Instant::now();
    let env = s.create_env(&me, "bench-env", "ubuntu").await;
    let id = env["id"].as_str().expect("id").to_string();
    s.wait_status(&me, &id, "running").await;
    line(
        "environment create → running (local)",
        format!("{:>9.1} ms", report::ms(t.elapsed())),
    );
    let (status, _) = s
        .post(
            &format!("/api/v1/environments/{id}/stop"),
            me.token(),
            json!({}),
        )
        .await;
    assert!(status.is_success());
    if let Ok(s) = Arc::try_unwrap(s) {
        s.stop().await;
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// `requests` GETs of `route` over `concurrency` keep-alive connections: requests/s and each
/// request's latency. Every answer must be a 200.
async fn measure(
    addr: &str,
    route: &str,
    token: Option<&str>,
    requests: usize,
    concurrency: usize,
) -> (f64, Vec<Duration>) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        clients.push(RawClient::connect(addr, route, token).await);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut client in clients {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < requests {
                let t = Instant::now();
                let status = client.get().await;
                samples.push(t.elapsed());
                assert_eq!(status, 200, "{}", client.route);
            }
            samples
        }));
    }
    let mut samples = Vec::with_capacity(requests);
    for t in tasks {
        samples.extend(t.await.expect("client"));
    }
    let rate = samples.len() as f64 / started.elapsed().as_secs_f64();
    (rate, samples)
}

/// A minimal HTTP/1.1 client on one keep-alive connection that sends the same GET again and
/// again (what `wrk` does): no connection pool, no header map, no per-request allocation beyond
/// the body it reads. Bounded: a response head of at most 64 lines and a body of at most 1 MiB.
struct RawClient {
    route: String,
    request: Vec<u8>,
    stream: BufReader<TcpStream>,
    line: String,
    body: Vec<u8>,
}

impl RawClient {
    async fn connect(addr: &str, route: &str, token: Option<&str>) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let auth = token
            .map(|t| format!("authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!("GET {route} HTTP/1.1\r\nhost: {addr}\r\n{auth}\r\n").into_bytes();
        Self {
            route: route.to_string(),
            request,
            stream: BufReader::new(stream),
            line: String::new(),
            body: Vec::new(),
        }
    }

    /// Send the request and read the whole response; its status.
    async fn get(&mut self) -> u16 {
        self.stream
            .get_mut()
            .write_all(&self.request)
            .await
            .expect("send");
        let mut status = 0;
        let mut length = 0usize;
        for i in 0..64 {
            self.line.clear();
            let n = self.stream.read_line(&mut self.line).await.expect("head");
            assert!(n > 0, "connection closed mid-response");
            let line = self.line.trim_end();
            if line.is_empty() {
                break;
            }
            if i == 0 {
                status = line
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .expect("status line");
            } else if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().expect("content-length");
            }
        }
        assert!(length <= 1 << 20, "body of {length} bytes");
        self.body.resize(length, 0);
        self.stream.read_exact(&mut self.body).await.expect("body");
        status
    }
}
