//! Several nodes on one database: the nodes table (registration, heartbeat on the server's clock,
//! deregistration), shared keys with rotation across nodes, and the nodes that must refuse to
//! join (keys sharing nothing with the cluster's, the single-node local provider).

mod support;

use std::time::Duration;

use base64::Engine;
use devpocket::app::{RunningServer, start_on};
use devpocket::clock::{Clock, ManualClock};
use devpocket::config::{Config, ProviderKind, Secret};
use reqwest::StatusCode;
use serde_json::Value;
use support::{Backend, Scratch, TestDb, TestServer, test_config};
use tokio::net::TcpListener;

on_both_backends!(
    a_claimed_lease_fences_the_old_owner_and_commands_follow_it,
    a_logs_stream_keeps_following_an_environment_that_moves_to_its_node,
    a_draining_node_starts_no_environment_actor,
    nodes_register_heartbeat_and_leave,
    readiness_fails_without_the_database,
    sealed_values_and_tokens_survive_a_key_rotation,
);

/// The nodes of the ops view, polled until `check` holds (bounded by the dead-after deadline
/// plus a few heartbeats).
async fn wait_nodes(
    s: &TestServer,
    admin: &support::Session,
    what: &str,
    check: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(s.config.cluster.dead_after_seconds + 10);
    loop {
        let (status, body) = s.get("/api/v1/admin/actors", admin.token()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let nodes = body["nodes"].as_array().cloned().unwrap_or_default();
        if check(&nodes) {
            return nodes;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn nodes_register_heartbeat_and_leave(backend: Backend) {
    let s = TestServer::start_with(backend, |c| {
        c.cluster.heartbeat_seconds = 1;
        c.cluster.dead_after_seconds = 2;
        c.cluster.address = "node-a".into();
    })
    .await;
    let admin = s.admin("ada").await;
    let (status, body) = s.get("/api/v1/admin/actors", admin.token()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let me = body["node"].as_str().expect("node id").to_string();
    let nodes = body["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 1, "{body}");
    let node = &nodes[0];
    assert_eq!(node["id"], me.as_str());
    assert_eq!(
        (node["address"].as_str(), node["alive"].as_bool()),
        (Some("node-a"), Some(true))
    );
    assert_eq!(node["this_node"], true);
    assert_eq!(node["provider"], "local");
    // The id is the data dir's: a restart is the same node.
    let on_disk = std::fs::read_to_string(s.data_dir().join("node.id")).expect("node.id");
    assert_eq!(on_disk.trim(), me);

    // Time passes beyond the deadline: the node is silent by the clock until its next heartbeat,
    // which is stored at the new time.
    s.clock.advance(chrono::Duration::seconds(60));
    let moved = s.clock.now();
    let nodes = wait_nodes(&s, &admin, "a heartbeat at the new time", |nodes| {
        nodes.iter().any(|n| {
            n["id"] == me.as_str()
                && n["alive"] == true
                && n["heartbeat_at"]
                    .as_str()
                    .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
                    .is_some_and(|t| t >= moved - chrono::Duration::seconds(1))
        })
    })
    .await;
    assert_eq!(nodes.len(), 1);
    let (status, ready) = s.get("/health/ready", None).await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["checks"]["node"], "healthy");

    let data = s.data_dir();
    let mut s = s.restart().await;
    let (_, body) = s.get("/api/v1/admin/actors", admin.token()).await;
    let nodes = body["nodes"].as_array().expect("nodes");
    assert_eq!(
        nodes.len(),
        1,
        "the restarted node is the same node: {body}"
    );
    assert_eq!(nodes[0]["id"], me.as_str());
    s.server.take().expect("running").stop().await;
    // Graceful shutdown removes the row and releases the data dir.
    let db = open(&s.db.url).await;
    let mut conn = db.get().await.expect("conn");
    let rows = devpocket::store::nodes::list(&mut conn)
        .await
        .expect("list");
    assert!(rows.is_empty(), "{rows:?}");
    assert!(data.join("node.id").exists());
}

async fn readiness_fails_without_the_database(backend: Backend) {
    let s = TestServer::start(backend).await;
    let (status, body) = s.get("/health/ready", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    s.running().app.db.close();
    let (status, body) = s.get("/health/ready", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "not_ready");
    assert_eq!(body["checks"]["database"], "unhealthy", "{body}");
    s.stop().await;
}

/// Wait until the environment's actor has resumed it after a restart (running in the ops tree).
async fn resumed(s: &TestServer, env: &str) {
    let ops = match s.login("ops", support::PASSWORD).await {
        (StatusCode::OK, body) => support::Session::from_auth(&body),
        _ => s.admin("ops").await,
    };
    s.wait_actor(&ops, &format!("environment:{env}"), |n| {
        n["status"] == "running"
    })
    .await;
}

/// The sealed SSH key of an environment, as stored.
async fn sealed_key_of(s: &TestServer, id: &str) -> String {
    let mut conn = s.running().app.db.get().await.expect("conn");
    devpocket::store::environments::get(&mut conn, id)
        .await
        .expect("query")
        .expect("environment")
        .ssh_private_key
}

/// Configured keys rotate on a restart: the environment sealed under the old key still opens a
/// terminal and the old access token still works; what is made afterwards names the new keys.
async fn sealed_values_and_tokens_survive_a_key_rotation(backend: Backend) {
    let (j1, j2) = ("a".repeat(40), "b".repeat(40));
    let (s1, s2) = (b64(1), b64(2));
    let mut s = TestServer::start_with(backend, |c| {
        c.auth.secret_key = Secret::new(j1.clone());
        c.secrets.seal_key = Secret::new(s1.clone());
    })
    .await;
    let me = s.register("rita").await;
    s.make_plan("rita", devpocket::store::users::Plan::Pro)
        .await;
    let old_env = support::terminal::running_env(&s, &me, "before").await;
    let old_kid = devpocket::secrets::key_id("seal", &[1; 32]);
    let sealed = sealed_key_of(&s, &old_env).await;
    assert!(
        sealed.starts_with(&format!("sealed:v2:{old_kid}:")),
        "{sealed}"
    );

    s.config.auth.secret_key = Secret::new(j2.clone());
    s.config.auth.previous_secret_keys = vec![Secret::new(j1.clone())];
    s.config.secrets.seal_key = Secret::new(s2.clone());
    s.config.secrets.previous_seal_keys = vec![Secret::new(s1.clone())];
    let s = s.restart().await;
    let (status, body) = s.get("/api/v1/auth/me", me.token()).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the old token still verifies: {body}"
    );
    resumed(&s, &old_env).await;
    let (mut ws, _) = support::terminal::open_terminal(&s, &me, &old_env, "").await;
    support::terminal::input(&mut ws, "echo still-$((6*7))\r").await;
    support::terminal::read_until(&mut ws, "still-42").await;
    drop(ws);

    let new_env = support::terminal::running_env(&s, &me, "after").await;
    let new_kid = devpocket::secrets::key_id("seal", &[2; 32]);
    let sealed = sealed_key_of(&s, &new_env).await;
    assert!(
        sealed.starts_with(&format!("sealed:v2:{new_kid}:")),
        "{sealed}"
    );
    let (status, body) = s.login("rita", support::PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let token = body["access_token"].as_str().expect("token");
    assert_eq!(kid(token), devpocket::secrets::key_id("jwt", j2.as_bytes()));
    s.stop().await;
}

async fn open(url: &str) -> devpocket::store::Db {
    let url = devpocket::store::DbUrl::parse(url).expect("url");
    devpocket::store::Db::connect(&url, 2, Duration::from_secs(5))
        .await
        .expect("connect")
}

fn b64(byte: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

/// A node configuration for a cluster test: Contabo provider (never called here), its own data
/// dir, the given keys.
fn node_config(scratch: &Scratch, name: &str, db: &TestDb, jwt: &[&str], seal: &[&str]) -> Config {
    let mut c = test_config(&scratch.path().join(name).join("data"), &db.url);
    c.cluster.address = name.into();
    c.provider.kind = ProviderKind::Contabo;
    c.contabo.api_url = "http://127.0.0.1:9".into();
    c.contabo.auth_url = "http://127.0.0.1:9/token".into();
    c.contabo.client_id = "id".into();
    c.contabo.client_secret = Secret::new("secret");
    c.contabo.username = "user@example.com".into();
    c.contabo.password = Secret::new("password");
    c.auth.secret_key = Secret::new(jwt[0]);
    c.auth.previous_secret_keys = jwt[1..].iter().map(|k| Secret::new(*k)).collect();
    c.secrets.seal_key = Secret::new(seal[0]);
    c.secrets.previous_seal_keys = seal[1..].iter().map(|k| Secret::new(*k)).collect();
    c
}

async fn start(
    config: Config,
    clock: &std::sync::Arc<ManualClock>,
) -> anyhow::Result<RunningServer> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    start_on(listener, config, clock.clone()).await
}

async fn me(http: &reqwest::Client, server: &RunningServer, token: &str) -> StatusCode {
    http.get(format!("{}/api/v1/auth/me", server.url()))
        .bearer_auth(token)
        .send()
        .await
        .expect("request")
        .status()
}

async fn register(http: &reqwest::Client, server: &RunningServer, name: &str) -> String {
    let resp = http
        .post(format!("{}/api/v1/auth/register", server.url()))
        .json(&serde_json::json!({ "username": name, "email": format!("{name}@example.com"), "password": support::PASSWORD }))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let body: Value = resp.json().await.expect("json");
    body["access_token"].as_str().expect("token").to_string()
}

fn kid(token: &str) -> String {
    let header = token.split('.').next().expect("header");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .expect("base64");
    let header: Value = serde_json::from_slice(&bytes).expect("json");
    header["kid"].as_str().expect("kid").to_string()
}

/// A rolling rotation across nodes on one PostgreSQL database: a node with the new key current
/// and the old one previous joins and accepts the old tokens, and signs with the new key id; a
/// node whose keys share nothing with the live nodes', or that runs the local provider, refuses
/// to start and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_across_nodes_and_strangers_are_refused() {
    if !support::postgres_configured() {
        eprintln!("skipped: set {} to run on PostgreSQL", support::PG_ENV);
        return;
    }
    let scratch = Scratch::new();
    let db = TestDb::create(Backend::Postgres, scratch.path()).await;
    let clock = ManualClock::starting_now();
    let http = reqwest::Client::new();
    let (j1, j2, j3) = ("1".repeat(40), "2".repeat(40), "3".repeat(40));
    let (s1, s2) = (b64(1), b64(2));

    let a = start(node_config(&scratch, "a", &db, &[&j1], &[&s1]), &clock)
        .await
        .expect("node a starts");
    let old_token = register(&http, &a, "olga").await;

    // Rolling rotation, step one: node b signs with j2 and still accepts j1.
    let b = start(
        node_config(&scratch, "b", &db, &[&j2, &j1], &[&s2, &s1]),
        &clock,
    )
    .await
    .expect("node b joins");
    assert_eq!(me(&http, &b, &old_token).await, StatusCode::OK);
    let new_token = register(&http, &b, "nina").await;
    assert_ne!(kid(&new_token), kid(&old_token));
    assert_eq!(me(&http, &b, &new_token).await, StatusCode::OK);
    let nodes = b.app.node.list().await.expect("nodes");
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert!(nodes.iter().all(|n| n.alive));

    // Keys that share nothing with a live node's: refused, naming the setting.
    let err = start(node_config(&scratch, "c", &db, &[&j3], &[&s1]), &clock)
        .await
        .err()
        .expect("node c is refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("share no key") && text.contains("auth.secret_key"),
        "{text}"
    );
    let err = start(node_config(&scratch, "c", &db, &[&j1], &[&b64(9)]), &clock)
        .await
        .err()
        .expect("node c is refused");
    assert!(format!("{err:#}").contains("secrets.seal_key"), "{err:#}");

    // The local provider never joins a cluster.
    let mut local = node_config(&scratch, "d", &db, &[&j1], &[&s1]);
    local.provider.kind = ProviderKind::Local;
    let err = start(local, &clock)
        .await
        .err()
        .expect("local node is refused");
    assert!(format!("{err:#}").contains("single-node"), "{err:#}");

    // A node that died without leaving keeps its row; silent past the deadline, it no longer
    // counts: a node sharing no key with it starts.
    a.stop().await;
    b.stop().await;
    let store = open(&db.url).await;
    let mut conn = store.get().await.expect("conn");
    let dead_after = test_config(scratch.path(), "").cluster.dead_after_seconds as i64;
    let silent = devpocket::clock::to_db(clock.now() - chrono::Duration::seconds(dead_after + 1));
    let ghost = devpocket::store::nodes::NodeRow {
        id: uuid::Uuid::new_v4().to_string(),
        address: "ghost".into(),
        provider: "contabo".into(),
        version: "0".into(),
        started_at: silent,
        heartbeat_at: silent,
        draining: false,
        jwt_keys: devpocket::secrets::fingerprint("jwt", b"a key nobody configured, 40 bytes"),
        seal_keys: devpocket::secrets::fingerprint("seal", &[9; 32]),
    };
    devpocket::store::nodes::reinsert(&mut conn, &ghost)
        .await
        .expect("ghost row");
    let c = start(node_config(&scratch, "c", &db, &[&j3], &[&s1]), &clock)
        .await
        .expect("node c starts: the ghost is dead");
    let nodes = c.app.node.list().await.expect("nodes");
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert!(nodes.iter().any(|n| n.address == "ghost" && !n.alive));
    c.stop().await;
    // The same ghost, alive: refused.
    let alive = devpocket::store::nodes::NodeRow {
        heartbeat_at: devpocket::clock::to_db(clock.now()),
        ..ghost
    };
    devpocket::store::nodes::reinsert(&mut conn, &alive)
        .await
        .expect("ghost row");
    let err = start(node_config(&scratch, "c", &db, &[&j3], &[&s1]), &clock)
        .await
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("ghost"), "{err:#}");
}

/// What became of a `devpocket serve` child: listening (and killed when dropped), or exited with
/// its log.
enum Child {
    Serving(Served),
    Exited(std::process::ExitStatus, String),
}

struct Served {
    child: std::process::Child,
    base: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    /// SIGTERM, then whether it exited with success (bounded wait).
    fn stop(mut self) -> bool {
        let pid = self.child.id().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(sent.success());
        for _ in 0..300 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

/// Start the built binary in `dir` with only PATH and `vars`; wait (60 s at most) until it says
/// where it listens, or exits.
fn serve(dir: &std::path::Path, vars: &[(&str, &str)]) -> Child {
    use std::io::BufRead;
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_devpocket"))
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DEVPOCKET_SERVER__BIND", "127.0.0.1:0")
        .env("DEVPOCKET_LOCAL__WORKSPACES_DIR", dir.join("workspaces"))
        .env("DEVPOCKET_LOG__FORMAT", "json")
        .envs(vars.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("devpocket starts");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<Result<String, String>>();
    // Keeps draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        let mut log = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Ok(entry) = serde_json::from_str::<Value>(&line)
                && entry["message"] == "DevPocket server listening"
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(Ok(entry["addr"].as_str().unwrap_or("").to_string()));
            }
            log.push_str(&line);
            log.push('\n');
        }
        if let Some(tx) = tx.take() {
            let _ = tx.send(Err(log));
        }
    });
    match rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server listens or exits")
    {
        Ok(addr) => Child::Serving(Served {
            child,
            base: format!("http://{addr}"),
        }),
        Err(log) => {
            let status = child.wait().expect("exit status");
            Child::Exited(status, log)
        }
    }
}

fn serving(child: Child) -> Served {
    match child {
        Child::Serving(s) => s,
        Child::Exited(status, log) => panic!("exited with {status}: {log}"),
    }
}

/// The refusal a child exited with (fails if it serves instead).
fn refusal(child: Child) -> String {
    match child {
        Child::Serving(s) => panic!("{} serves, but should have refused to start", s.base),
        Child::Exited(status, log) => {
            assert!(!status.success(), "{log}");
            log
        }
    }
}

/// Two processes on one SQLite file: the second refuses to start and says why, whether it shares
/// the first one's data dir or only names its database file; once the first stops, it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_one_sqlite_file_refuses_to_start() {
    let scratch = Scratch::new();
    let first_dir = scratch.path().join("first");
    let first = serving(serve(&first_dir, &[]));
    let resp = reqwest::get(format!("{}/health/ready", first.base))
        .await
        .expect("ready");
    assert_eq!(resp.status(), StatusCode::OK);

    let log = refusal(serve(&first_dir, &[]));
    assert!(log.contains("SQLite is single-node"), "{log}");
    let db = format!(
        "sqlite://{}",
        first_dir.join("data").join("devpocket.db").display()
    );
    let second_dir = scratch.path().join("second");
    let log = refusal(serve(&second_dir, &[("DEVPOCKET_DATABASE__URL", &db)]));
    assert!(
        log.contains("another devpocket process is serving from the SQLite database"),
        "{log}"
    );
    // Another data dir with its own database is another single node: fine.
    let other = serving(serve(&second_dir, &[]));
    assert!(other.stop());

    assert!(first.stop(), "SIGTERM ends it cleanly");
    let again = serving(serve(&second_dir, &[("DEVPOCKET_DATABASE__URL", &db)]));
    assert!(again.stop());
}

/// The local provider is single-node: a second local-provider process on the same PostgreSQL
/// database refuses to start while the first is alive, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_provider_node_refuses_to_join_a_cluster() {
    if !support::postgres_configured() {
        eprintln!("skipped: set {} to run on PostgreSQL", support::PG_ENV);
        return;
    }
    let scratch = Scratch::new();
    let db = TestDb::create(Backend::Postgres, scratch.path()).await;
    let vars = [("DEVPOCKET_DATABASE__URL", db.url.as_str())];
    let first = serving(serve(&scratch.path().join("a"), &vars));
    let log = refusal(serve(&scratch.path().join("b"), &vars));
    assert!(log.contains("is single-node"), "{log}");
    assert!(log.contains("cannot join"), "{log}");
    assert!(first.stop());
    // Alone again (the first left on SIGTERM), the second starts.
    let second = serving(serve(&scratch.path().join("b"), &vars));
    assert!(second.stop());
}

/// `devpocket migrate-store`: a SQLite store filled through the real server (accounts, running
/// local environments with their sealed keys) is copied into an empty PostgreSQL database; the
/// server started on PostgreSQL (same data dir, so the same keys) logs every account in, shows
/// every environment running and opens a terminal with a sealed key that came across. A second
/// copy into the now filled database is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_store_moves_every_account_and_environment() {
    if !support::postgres_configured() {
        eprintln!("skipped: set {} to run on PostgreSQL", support::PG_ENV);
        return;
    }
    let mut s = TestServer::start_with(Backend::Sqlite, |c| c.local.shared_account = true).await;
    let mut owned: Vec<(String, Vec<String>)> = Vec::new();
    for (name, envs) in [("ann", 2), ("ben", 1), ("cal", 0)] {
        let me = s.register(name).await;
        if envs > 1 {
            s.make_plan(name, devpocket::store::users::Plan::Pro).await;
        }
        let mut ids = Vec::new();
        for i in 0..envs {
            ids.push(support::terminal::running_env(&s, &me, &format!("{name}-{i}")).await);
        }
        owned.push((name.to_string(), ids));
    }
    let sqlite_url = s.db.url.clone();
    s.server.take().expect("running").stop().await;

    let pg = TestDb::create(Backend::Postgres, s.data_dir().as_path()).await;
    let copy = |to: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_devpocket"))
            .args(["migrate-store", "--from", &sqlite_url])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DEVPOCKET_MIGRATE_TO", to)
            .output()
            .expect("migrate-store runs")
    };
    let out = copy(&pg.url);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("users: 3 rows") && text.contains("environments: 3 rows"),
        "{text}"
    );
    let out = copy(&pg.url);
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "a filled database is refused");
    assert!(text.contains("not empty"), "{text}");

    // The same node, moved to PostgreSQL.
    let mut config = s.config.clone();
    config.database.url = Secret::new(pg.url.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    s.server = Some(
        start_on(listener, config.clone(), s.clock.clone())
            .await
            .expect("starts on PostgreSQL"),
    );
    s.config = config;
    s.db = std::sync::Arc::new(pg);
    let mut terminal_checked = false;
    for (name, ids) in &owned {
        let (status, body) = s.login(name, support::PASSWORD).await;
        assert_eq!(status, StatusCode::OK, "{name}: {body}");
        let me = support::Session::from_auth(&body);
        let (status, list) = s.get("/api/v1/environments", me.token()).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        let listed: Vec<&str> = list
            .as_array()
            .or_else(|| list["environments"].as_array())
            .expect("a list")
            .iter()
            .filter_map(|e| e["id"].as_str())
            .collect();
        for id in ids {
            assert!(listed.contains(&id.as_str()), "{name} misses {id}: {list}");
            resumed(&s, id).await;
            if !terminal_checked {
                let (mut ws, _) = support::terminal::open_terminal(&s, &me, id, "").await;
                support::terminal::input(&mut ws, "echo moved-$((40+2))\r").await;
                support::terminal::read_until(&mut ws, "moved-42").await;
                terminal_checked = true;
            }
        }
        assert_eq!(listed.len(), ids.len(), "{list}");
    }
    // New rows get fresh ids after the copied ones (sequences moved past them).
    let newcomer = s.register("dan").await;
    support::terminal::running_env(&s, &newcomer, "dan-0").await;
    s.stop().await;
}

/// A node row of a stand-in node that never runs (to take a lease from the server under test).
fn ghost_node(id: &str, now: chrono::NaiveDateTime) -> devpocket::store::nodes::NodeRow {
    devpocket::store::nodes::NodeRow {
        id: id.into(),
        address: "ghost".into(),
        provider: "local".into(),
        version: "0".into(),
        started_at: now,
        heartbeat_at: now,
        draining: false,
        jwt_keys: String::new(),
        seal_keys: String::new(),
    }
}

/// Leases end to end on one real node: another node's claim fences the old owner (its late
/// writes are refused, its actor stops and counts a lost lease); a command for the environment
/// is then carried to the new owner — which never answers here, so the caller gets 504
/// `command_timeout` naming the command, and the command is cancelled unrun; once the other node
/// is dead this node claims the environment back and commands run here again.
async fn a_claimed_lease_fences_the_old_owner_and_commands_follow_it(backend: Backend) {
    use devpocket::store::leases::{self, ClaimScope};
    use devpocket::store::{StoreError, environments as store};
    let s = TestServer::start_with(backend, |c| {
        c.cluster.heartbeat_seconds = 1;
        c.cluster.dead_after_seconds = 2;
    })
    .await;
    let admin = s.admin("lea").await;
    let env = support::terminal::running_env(&s, &admin, "leased").await;
    let app = &s.running().app;
    let me = app.node.id.clone();
    let mut conn = app.db.get().await.expect("conn");
    let old = leases::lease_of(&mut conn, &env, &me)
        .await
        .expect("query")
        .expect("the creating node owns it");

    // Node B claims it as if this node were dead (its heartbeat before `live_since`).
    let now = devpocket::clock::to_db(s.clock.now());
    devpocket::store::nodes::reinsert(&mut conn, &ghost_node("node-b", now))
        .await
        .expect("node b");
    let scope = ClaimScope {
        node: "node-b",
        live_since: now + chrono::Duration::hours(1),
    };
    let new = leases::claim_one(&mut conn, &scope, &env)
        .await
        .expect("claim")
        .expect("claimed from a dead owner");
    assert_eq!(new.epoch, old.epoch + 1);
    let row = store::get(&mut conn, &env).await.expect("q").expect("row");
    let change = store::StatusChange {
        status: row.status,
        progress: 1,
        phase: row.phase,
        message: Some("late".into()),
        error_message: None,
        installation_completed: row.installation_completed,
        updated_at: now,
    };
    let late = store::update_progress(&mut conn, &old, &change).await;
    assert!(matches!(late, Err(StoreError::Fenced(_))), "{late:?}");
    assert_eq!(
        store::get(&mut conn, &env)
            .await
            .expect("q")
            .expect("row")
            .progress,
        row.progress,
        "the late write left nothing"
    );
    store::update_progress(&mut conn, &new, &change)
        .await
        .expect("the new owner writes");
    drop(conn);

    // This node's actor stops within a heartbeat and counts the lost lease.
    s.wait_tree(&admin, "the fenced actor stopped", |tree| {
        support::find_actor(tree, &format!("environment:{env}")).is_none()
    })
    .await;
    let metrics_text = s.metrics_text(None).await;
    assert!(
        metrics_text
            .lines()
            .any(|l| l.starts_with("devpocket_leases_lost_total") && !l.ends_with(" 0")),
        "{metrics_text}"
    );

    // A command now goes to node B, which never answers: 504 naming the command, cancelled.
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{env}/stop"),
            admin.token(),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["code"], "command_timeout", "{body}");
    let detail = body["detail"].as_str().expect("detail");
    assert!(detail.contains("will not run"), "{detail}");
    let command_id = detail
        .split_whitespace()
        .find(|w| uuid::Uuid::parse_str(w).is_ok())
        .expect("the command id")
        .to_string();
    let (status, looked) = s
        .get(&format!("/api/v1/commands/{command_id}"), admin.token())
        .await;
    assert_eq!(status, StatusCode::OK, "{looked}");
    assert_eq!(
        (looked["state"].as_str(), looked["command"].as_str()),
        (Some("expired"), Some("stop")),
        "{looked}"
    );
    let other = s.register("mallory").await;
    let (status, _) = s
        .get(&format!("/api/v1/commands/{command_id}"), other.token())
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "another user's command is unknown"
    );

    // A command node B took and was running when it died: marked lost once B is dead.
    let running = devpocket::store::commands::CommandRow {
        id: uuid::Uuid::new_v4().to_string(),
        environment_id: env.clone(),
        user_id: admin_id(&s, "lea").await,
        target_node: "node-b".into(),
        command: serde_json::json!({ "command": "restart", "environment_id": env }).to_string(),
        state: "running".into(),
        reply: None,
        created_at: now,
        expires_at: now + chrono::Duration::seconds(10),
        answered_at: None,
    };
    {
        let mut conn = app.db.get().await.expect("conn");
        devpocket::store::commands::insert(&mut conn, &running)
            .await
            .expect("insert");
    }

    // Node B dies (time passes past its deadline): this node claims the environment back.
    s.clock.advance(chrono::Duration::seconds(60));
    s.wait_actor(&admin, &format!("environment:{env}"), |n| {
        n["status"] == "running"
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, looked) = s
            .get(&format!("/api/v1/commands/{}", running.id), admin.token())
            .await;
        assert_eq!(status, StatusCode::OK, "{looked}");
        if looked["state"] == "lost" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a dead node's running command is not marked lost: {looked}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{env}/stop"),
            admin.token(),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    s.stop().await;
}

/// A logs WebSocket opened on this node while another node ran the environment (so it follows
/// the relayed feed) keeps showing changes after the environment moves here: the ghost owner
/// dies, this node claims it back and stops it, and the stream sees `stopped` — it does not go
/// silent because the changes are now this node's own.
async fn a_logs_stream_keeps_following_an_environment_that_moves_to_its_node(backend: Backend) {
    use devpocket::store::leases::{self, ClaimScope};
    let s = TestServer::start_with(backend, |c| {
        c.cluster.heartbeat_seconds = 1;
        c.cluster.dead_after_seconds = 2;
    })
    .await;
    let admin = s.admin("liv").await;
    let env = support::terminal::running_env(&s, &admin, "moving").await;
    let app = &s.running().app;
    let mut conn = app.db.get().await.expect("conn");
    let now = devpocket::clock::to_db(s.clock.now());
    devpocket::store::nodes::reinsert(&mut conn, &ghost_node("node-b", now))
        .await
        .expect("node b");
    let scope = ClaimScope {
        node: "node-b",
        live_since: now + chrono::Duration::hours(1),
    };
    leases::claim_one(&mut conn, &scope, &env)
        .await
        .expect("claim")
        .expect("claimed");
    drop(conn);
    s.wait_tree(&admin, "the fenced actor stopped", |tree| {
        support::find_actor(tree, &format!("environment:{env}")).is_none()
    })
    .await;

    // Node B runs it: this stream follows the relayed feed.
    let mut logs = support::terminal::connect(
        &s,
        &format!("/api/v1/ws/logs/{env}?token={}&follow=true", admin.access),
    )
    .await;
    // The stream subscribes before it sends the history: its first frame means it follows.
    let first = support::terminal::next_json(&mut logs)
        .await
        .expect("history");
    assert_eq!(first["type"], "environment_status", "{first}");

    // Node B dies; this node claims the environment back and runs it.
    s.clock.advance(chrono::Duration::seconds(60));
    s.wait_actor(&admin, &format!("environment:{env}"), |n| {
        n["status"] == "running"
    })
    .await;
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{env}/stop"),
            admin.token(),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    loop {
        let frame = support::terminal::next_json(&mut logs)
            .await
            .expect("the logs stream stays open");
        if frame["type"] == "environment_status" && frame["status"] == "stopped" {
            break;
        }
    }
    s.stop().await;
}

/// A draining node (SIGTERM: its actors stopped, its leases about to be handed back) starts no
/// environment actor again — neither the lease reconciler's next round nor a command that
/// arrives meanwhile may bring one back to run (and call the provider) after the hand-back.
async fn a_draining_node_starts_no_environment_actor(backend: Backend) {
    let s = TestServer::start_with(backend, |c| {
        c.cluster.heartbeat_seconds = 1;
        c.cluster.dead_after_seconds = 2;
    })
    .await;
    let admin = s.admin("dan").await;
    let env = support::terminal::running_env(&s, &admin, "draining").await;
    let app = &s.running().app;
    // The first steps of a drain, up to (not including) the hand-back.
    app.node.membership().start_draining();
    app.actors.stop_environment_actors().await;
    app.actors.reconcile_leases().await;
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{env}/stop"),
            admin.token(),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let tree = s.actor_tree(&admin).await;
    assert!(
        support::find_actor(&tree, &format!("environment:{env}")).is_none(),
        "an actor started on a draining node: {tree}"
    );
    s.stop().await;
}

/// A user's id, from the store.
async fn admin_id(s: &TestServer, username: &str) -> String {
    let mut conn = s.running().app.db.get().await.expect("conn");
    devpocket::store::users::by_username(&mut conn, username)
        .await
        .expect("query")
        .expect("user")
        .id
}
