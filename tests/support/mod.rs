//! Test harness: the real server on 127.0.0.1:0 with a manual clock, a throwaway data dir and a
//! throwaway database (SQLite file, or a fresh PostgreSQL database when
//! `DEVPOCKET_TEST_DATABASE_URL` is set), plus a reqwest client and small helpers.
#![allow(dead_code)]

pub mod contabo_sim;
pub mod fake_vps;
pub mod jwks;
pub mod nodes;
pub mod sshd;
pub mod terminal;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use devpocket::app::{RunningServer, start_on};
use devpocket::clock::ManualClock;
use devpocket::config::{Config, Secret};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;

pub const PG_ENV: &str = "DEVPOCKET_TEST_DATABASE_URL";
pub const PASSWORD: &str = "Pocket-Dev-7319";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generate `mod sqlite { #[tokio::test] fn name() }` and `mod postgres { ... }` for each
/// `async fn name(backend: Backend)` listed. The PostgreSQL variant runs when
/// `DEVPOCKET_TEST_DATABASE_URL` is set (CI sets it) and says it was skipped otherwise.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::support::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if !super::support::postgres_configured() {
                        eprintln!("skipped: set {} to run on PostgreSQL", super::support::PG_ENV);
                        return;
                    }
                    super::$name(super::support::Backend::Postgres).await
                }
            )*
        }
    };
}

pub fn postgres_configured() -> bool {
    std::env::var(PG_ENV).is_ok_and(|v| !v.is_empty())
}

/// A database made for one test and dropped after it.
pub struct TestDb {
    pub url: String,
    pg: Option<(String, String)>, // (admin url, database name)
}

impl TestDb {
    pub async fn create(backend: Backend, dir: &Path) -> Self {
        match backend {
            // In the data dir (0700): environment accounts must not read it.
            Backend::Sqlite => Self {
                url: format!("sqlite://{}", dir.join("data").join("test.db").display()),
                pg: None,
            },
            Backend::Postgres => {
                let admin = std::env::var(PG_ENV).expect("PostgreSQL URL");
                let name = format!("devpocket_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn = AsyncPgConnection::establish(&admin)
                    .await
                    .expect("connect to the test PostgreSQL");
                conn.batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create test database");
                Self {
                    url: replace_db_name(&admin, &name),
                    pg: Some((admin, name)),
                }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin, name)) = self.pg.take() else {
            return;
        };
        // Drop needs async; do it on a thread with its own small runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(mut conn) = AsyncPgConnection::establish(&admin).await {
                    let _ = conn
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

fn replace_db_name(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_and_path = &base[scheme_end..];
    let host = host_and_path.split('/').next().unwrap_or(host_and_path);
    let mut out = format!("{}{}/{}", &base[..scheme_end], host, name);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// The defaults a test server runs with: generous rate limits, fault injection on.
pub fn test_config(data_dir: &Path, db_url: &str) -> Config {
    let mut config = Config::defaults();
    config.server.bind = "127.0.0.1:0".into();
    config.server.data_dir = data_dir.to_path_buf();
    config.server.drain_timeout_seconds = 5;
    config.database.url = Secret::new(db_url);
    config.rate_limit.per_minute = 100_000;
    config.rate_limit.auth_per_minute = 100_000;
    config.ops.fault_injection = true;
    config.provider.poll_initial_ms = 20;
    config.provider.poll_max_ms = 200;
    config.provider.provision_timeout_seconds = 60;
    config.provider.install_timeout_seconds = 60;
    config.provider.ssh_connect_timeout_seconds = 5;
    config.environments.metrics_interval_seconds = 1;
    config.environments.restart_backoff_ms = 10;
    // Next to the data dir, in the test's own temp dir: every test server has its own workspaces,
    // tmux sockets (under <workspaces>/.tmux) and environment accounts.
    config.local.workspaces_dir = data_dir.with_file_name("workspaces");
    config
}

/// A test's temp dir. Environment accounts must pass through it to reach their homes (0711);
/// on drop, the accounts whose homes are under it (and everything they still run, their tmux
/// servers included) are removed before the files.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
            .expect("chmod tempdir");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // The workspaces go first: a server still winding down cannot make an account for a
        // workspace that is gone (the provider does not recreate its root).
        let _ = std::fs::remove_dir_all(self.dir.path().join("workspaces"));
        sweep_accounts(self.dir.path());
    }
}

/// Kill and remove every environment account whose home is under `dir`; returns their names.
pub fn sweep_accounts(dir: &Path) -> Vec<String> {
    use devpocket::provider::sandbox;
    // A server winding down may be creating one right now; later ones find no home.
    sandbox::settle();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let mut removed = Vec::new();
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || !fields[0].starts_with(sandbox::ACCOUNT_PREFIX) {
            continue;
        }
        if !Path::new(fields[5]).starts_with(dir) {
            continue;
        }
        // Kills what the account runs (its tmux server too), then removes it.
        if let Err(e) = sandbox::remove_account(fields[0]) {
            eprintln!("could not remove test account {}: {e}", fields[0]);
        }
        removed.push(fields[0].to_string());
    }
    removed
}

pub struct TestServer {
    pub server: Option<RunningServer>,
    pub clock: Arc<ManualClock>,
    pub http: reqwest::Client,
    pub config: Config,
    pub db: Arc<TestDb>,
    dir: Arc<Scratch>,
}

impl TestServer {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = Arc::new(Scratch::new());
        let db = Arc::new(TestDb::create(backend, dir.path()).await);
        let mut config = test_config(&dir.path().join("data"), &db.url);
        tweak(&mut config);
        Self::launch(config, ManualClock::starting_now(), db, dir).await
    }

    async fn launch(
        config: Config,
        clock: Arc<ManualClock>,
        db: Arc<TestDb>,
        dir: Arc<Scratch>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server = start_on(listener, config.clone(), clock.clone())
            .await
            .expect("server starts");
        Self {
            server: Some(server),
            clock,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client"),
            config,
            db,
            dir,
        }
    }

    /// Stop this server and start a new one on the same data dir, database and clock.
    pub async fn restart(mut self) -> Self {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        Self::launch(
            self.config.clone(),
            self.clock.clone(),
            self.db.clone(),
            self.dir.clone(),
        )
        .await
    }

    pub fn running(&self) -> &RunningServer {
        self.server.as_ref().expect("server running")
    }

    /// The server's current time as a Unix timestamp.
    pub fn now_ts(&self) -> i64 {
        use devpocket::clock::Clock;
        self.clock.now().timestamp()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.config.server.data_dir.clone()
    }

    /// The local provider's workspaces root.
    pub fn workspaces_dir(&self) -> PathBuf {
        self.config.local.workspaces_dir.clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.running().url(), path)
    }

    pub fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, self.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req
    }

    /// Send and return status and JSON body (`Value::Null` when the body is not JSON).
    pub async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        (status, body)
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        self.send(self.request(Method::GET, path, token)).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.send(self.request(Method::POST, path, token).json(&body))
            .await
    }

    pub async fn register(&self, username: &str) -> Session {
        let (status, body) = self
            .post(
                "/api/v1/auth/register",
                None,
                json!({ "username": username, "email": format!("{username}@example.com"), "password": PASSWORD }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        Session::from_auth(&body)
    }

    pub async fn login(&self, login: &str, password: &str) -> (StatusCode, Value) {
        self.post(
            "/api/v1/auth/login",
            None,
            json!({ "username_or_email": login, "password": password }),
        )
        .await
    }

    /// Put a user on the admin plan (as `devpocket user set-plan` would).
    pub async fn make_admin(&self, username: &str) {
        self.make_plan(username, devpocket::store::users::Plan::Admin)
            .await
    }

    /// Put a user on a plan (as `devpocket user set-plan` would).
    pub async fn make_plan(&self, username: &str, plan: devpocket::store::users::Plan) {
        let app = &self.running().app;
        let mut conn = app.db.get().await.expect("conn");
        let user = devpocket::store::users::by_username(&mut conn, username)
            .await
            .expect("query")
            .expect("user exists");
        devpocket::store::users::set_plan(
            &mut conn,
            &user.id,
            plan,
            devpocket::clock::db_now(app.clock.as_ref()),
        )
        .await
        .expect("set plan");
        // Written behind the server's back, as the CLI would: without waiting out the session
        // cache's bound.
        app.session_cache.clear();
    }

    /// A registered admin with a session.
    pub async fn admin(&self, username: &str) -> Session {
        let session = self.register(username).await;
        self.make_admin(username).await;
        session
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
    }

    /// The `/metrics` exposition, fetched by `client` (the server's own client when `None`).
    pub async fn metrics_text(&self, client: Option<&reqwest::Client>) -> String {
        client
            .unwrap_or(&self.http)
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// The server's SSH connections to environments: `devpocket_ssh_connections` of `/metrics`.
    pub async fn ssh_connections(&self) -> u64 {
        let text = self.metrics_text(None).await;
        text.lines()
            .find_map(|l| l.strip_prefix("devpocket_ssh_connections "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ssh_connections gauge in {text}"))
    }

    /// Wait (polling, bounded like [`TestServer::wait_tree`]) until the server holds `n` SSH
    /// connections to environments.
    pub async fn wait_ssh_connections(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let now = self.ssh_connections().await;
            if now == n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{now} SSH connections, waiting for {n}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// Resident memory of this process (the server under test runs in it), in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Depth-first search of an ops tree (the `actors` of `/api/v1/admin/actors`) for an actor id.
pub fn find_actor<'a>(nodes: &'a Value, id: &str) -> Option<&'a Value> {
    nodes.as_array()?.iter().find_map(|n| {
        if n["id"] == id {
            Some(n)
        } else {
            find_actor(&n["children"], id)
        }
    })
}

impl TestServer {
    /// The ops tree, as an admin sees it.
    pub async fn actor_tree(&self, admin: &Session) -> Value {
        let (status, body) = self.get("/api/v1/admin/actors", admin.token()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["actors"].clone()
    }

    /// Poll the ops tree (each poll a real request) until `check` holds; fails after a generous
    /// deadline with the last tree seen.
    pub async fn wait_tree(
        &self,
        admin: &Session,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let tree = self.actor_tree(admin).await;
            if check(&tree) {
                return tree;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for: {what}; last tree: {tree}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Wait until the actor `id` is in the ops tree and `check` holds for it; returns its node.
    pub async fn wait_actor(
        &self,
        admin: &Session,
        id: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let tree = self
            .wait_tree(admin, &format!("actor {id}"), |t| {
                find_actor(t, id).is_some_and(&check)
            })
            .await;
        find_actor(&tree, id).cloned().expect("just seen")
    }
}

impl TestServer {
    /// Create an environment; returns its JSON (asserting 201).
    pub async fn create_env(&self, session: &Session, name: &str, template: &str) -> Value {
        let (status, body) = self
            .post(
                "/api/v1/environments",
                session.token(),
                json!({ "name": name, "template": template }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    /// Poll an environment until `done(env)` holds, failing after `timeout` (real work such as SSH
    /// and shells happens meanwhile; every poll is a real request).
    pub async fn wait_env(
        &self,
        session: &Session,
        id: &str,
        what: &str,
        timeout: std::time::Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = Value::Null;
        while tokio::time::Instant::now() < deadline {
            let (status, env) = self
                .get(&format!("/api/v1/environments/{id}"), session.token())
                .await;
            assert_eq!(status, StatusCode::OK, "{env}");
            if done(&env) {
                return env;
            }
            last = env;
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("timed out waiting for {what}; last seen: {last}");
    }

    pub async fn wait_status(&self, session: &Session, id: &str, status: &str) -> Value {
        self.wait_env(
            session,
            id,
            status,
            std::time::Duration::from_secs(60),
            |e| e["status"] == status,
        )
        .await
    }
}

/// Tokens of one login session.
#[derive(Debug, Clone)]
pub struct Session {
    pub access: String,
    pub refresh: String,
    pub user_id: String,
}

impl Session {
    pub fn from_auth(body: &Value) -> Self {
        Self {
            access: body["access_token"]
                .as_str()
                .expect("access_token")
                .to_string(),
            refresh: body["refresh_token"]
                .as_str()
                .expect("refresh_token")
                .to_string(),
            user_id: body["user"]["id"].as_str().expect("user.id").to_string(),
        }
    }

    pub fn token(&self) -> Option<&str> {
        Some(&self.access)
    }
}

/// The session id inside an access token (its `sid` claim), read without verifying.
pub fn session_id_of(access_token: &str) -> String {
    use base64::Engine;
    let payload = access_token.split('.').nth(1).expect("jwt payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64");
    let claims: Value = serde_json::from_slice(&bytes).expect("json");
    claims["sid"].as_str().expect("sid").to_string()
}
