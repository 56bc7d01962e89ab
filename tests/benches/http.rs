//! HTTP front-end benchmark: the real server on 127.0.0.1:0 (SQLite, and PostgreSQL when
//! `DEVPOCKET_TEST_DATABASE_URL` is set), real HTTP clients. Prints numbers; asserts only that the
//! answers are right, never how fast they came.
//!
//! `cargo bench --bench http` (release build). Knobs: `BENCH_REQUESTS` (per route, default
//! 20000), `BENCH_CONCURRENCY` (default 16), `BENCH_LOGINS` (default 32).

#[path = "../support/mod.rs"]
mod support;

mod report;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
        let concurrency = knob("BENCH_CONCURRENCY", 16).max(1);
        let logins = knob("BENCH_LOGINS", 32);
        println!(
            "# http: {requests} requests per route, {concurrency} concurrent clients; {} cores",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        let mut backends = vec![Backend::Sqlite];
        if postgres_configured() {
            backends.push(Backend::Postgres);
        }
        for backend in backends {
            run(backend, requests, concurrency, logins).await;
        }
    });
}

async fn run(backend: Backend, requests: usize, concurrency: usize, logins: usize) {
    println!("\n## {backend:?}");
    let s = Arc::new(TestServer::start(backend).await);
    let me = s.register("bench").await;
    let token = Arc::new(me.access.clone());

    for (route, authed) in [
        ("/health/live", false),
        ("/api/v1/auth/me", true),
        ("/api/v1/environments", true),
    ] {
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut clients = Vec::new();
        for _ in 0..concurrency {
            let (s, token, next) = (s.clone(), token.clone(), next.clone());
            clients.push(tokio::spawn(async move {
                let mut samples = Vec::new();
                loop {
                    if next.fetch_add(1, Ordering::Relaxed) >= requests {
                        return samples;
                    }
                    let t = Instant::now();
                    let (status, _) = s.get(route, authed.then_some(token.as_str())).await;
                    samples.push(t.elapsed());
                    assert_eq!(status, StatusCode::OK, "{route}");
                }
            }));
        }
        let mut samples = Vec::with_capacity(requests);
        for c in clients {
            samples.extend(c.await.expect("client"));
        }
        let elapsed = started.elapsed();
        line(
            &format!("GET {route}"),
            format!(
                "{:>9.0} req/s  {}",
                requests as f64 / elapsed.as_secs_f64(),
                Latencies::new(samples).summary()
            ),
        );
    }

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
