//! A cluster of real `devpocket serve` processes (the built binary, as child processes) on one
//! throwaway PostgreSQL database, for the multi-node tests and the cluster bench: a node can be
//! killed abruptly (SIGKILL), paused (SIGSTOP/SIGCONT), terminated (SIGTERM, exit awaited) and
//! started again on its own data dir.
//!
//! - Every node gets its own data dir under one [`Scratch`] dir, the same `auth.secret_key` and
//!   `secrets.seal_key` (every node verifies every node's tokens and opens every node's sealed
//!   secrets), `cluster.address = "node-<i>"`, short cluster timings ([`HEARTBEAT_SECONDS`],
//!   [`DEAD_AFTER_SECONDS`]) and the Contabo provider on one in-process [`ContaboSim`] with a
//!   [`FakeVps`] that serves every instance at its own loopback address.
//! - The configuration is written as a TOML file (`<node dir>/config.toml`) and given with
//!   `--config`; the environment is cleared (PATH only), so nothing of the test's leaks in.
//! - Each node binds 127.0.0.1:0; the harness learns the port from its JSON startup log line
//!   "DevPocket server listening". The log (stderr) is read by a thread that keeps the last
//!   [`LOG_LINES`] lines per node (across restarts) for failure messages.
//! - Dropping the [`Cluster`] kills every node still running (SIGKILL, then reaped), drops the
//!   database and removes the temp dirs. Where util-linux's `setpriv` is on PATH the nodes are
//!   started through it with a parent-death signal, so even a test killed outright (no `Drop`)
//!   leaves no node behind.

use std::collections::{BTreeMap, VecDeque};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devpocket::config::{Config, LogFormat, Secret};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::contabo_sim::{ContaboSim, SimConfig, use_simulator};
use super::fake_vps::{FakeVps, FakeVpsConfig};
use super::{Backend, PASSWORD, Scratch, Session, TestDb, test_config};

/// Heartbeat interval of the nodes (`cluster.heartbeat_seconds`), unless a test's tweak changes it.
pub const HEARTBEAT_SECONDS: u64 = 1;
/// Silence after which a node counts as dead (`cluster.dead_after_seconds`), unless tweaked.
pub const DEAD_AFTER_SECONDS: u64 = 3;
/// The JWT key every node shares (at least 32 characters).
pub const JWT_KEY: &str = "cluster-test-jwt-key-shared-by-every-node-0001";
/// Log lines kept per node (across its restarts), for [`Cluster::log`].
pub const LOG_LINES: usize = 300;
/// Log lines per node in a failure message of a wait (every node's, so kept short).
pub const FAILURE_LOG_LINES: usize = 40;
/// How long a node may take from spawn to "listening" (a debug build, migrations on the first).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Beyond `server.drain_timeout_seconds`, how long a terminated node may take to exit.
pub const EXIT_HEADROOM: Duration = Duration::from_secs(20);
/// Headroom every wait adds to the configured deadline it is bounded by: a loaded 2-core machine
/// running a debug build, three nodes and the test itself.
pub const HEADROOM: Duration = Duration::from_secs(20);
/// Interval between two polls of a condition.
pub const POLL: Duration = Duration::from_millis(100);
/// Per-request timeout of the harness's client: a paused node must not hang a poll for ever.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The sealing key every node shares: standard base64 of 32 bytes.
pub fn seal_key() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([0x5e; 32])
}

/// What a cluster runs on: how many nodes, the simulator and the fake VPS.
#[derive(Clone, Debug)]
pub struct ClusterSetup {
    pub nodes: usize,
    /// `ipv4_per_instance` is forced on (the fake VPS tells instances apart by address).
    pub sim: SimConfig,
    pub vps: FakeVpsConfig,
}

impl Default for ClusterSetup {
    fn default() -> Self {
        Self {
            nodes: 3,
            sim: SimConfig::default(),
            vps: FakeVpsConfig::default(),
        }
    }
}

/// One node: its configuration and, while it runs, its process.
struct Node {
    name: String,
    config: Config,
    config_path: PathBuf,
    process: Option<Process>,
    /// The last log lines, across restarts (each start begins with a marker line).
    log: Arc<Mutex<VecDeque<String>>>,
    /// How the last process ended, once reaped.
    exited: Option<ExitStatus>,
}

struct Process {
    child: std::process::Child,
    base: String,
    paused: bool,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            // SIGKILL also ends a stopped process.
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// Several real nodes on one database; see the module doc.
pub struct Cluster {
    // Fields drop in order: the nodes (killed) before the database and the temp dirs.
    nodes: Vec<Node>,
    pub http: reqwest::Client,
    store: Option<devpocket::store::Db>,
    pub vps: FakeVps,
    pub sim: ContaboSim,
    pub sim_config: SimConfig,
    pub db: TestDb,
    dir: Scratch,
}

impl Cluster {
    /// Start `setup.nodes` nodes one after the other (the first migrates the database), each
    /// configured by [`test_config`], the shared keys and cluster timings, the simulator, then
    /// `tweak`. Panics (with the node's log) if a node does not listen within [`START_TIMEOUT`].
    pub async fn start(setup: ClusterSetup, tweak: impl Fn(&mut Config)) -> Self {
        let dir = Scratch::new();
        let db = TestDb::create(Backend::Postgres, dir.path()).await;
        let sim_config = SimConfig {
            ipv4_per_instance: true,
            ..setup.sim
        };
        let sim = ContaboSim::start(sim_config.clone()).await;
        let vps = FakeVps::start_per_address(&sim, setup.vps).await;
        let nodes = (0..setup.nodes)
            .map(|i| {
                let name = format!("node-{i}");
                let home = dir.path().join(&name);
                std::fs::create_dir_all(&home).expect("node dir");
                let mut config = test_config(&home.join("data"), &db.url);
                use_simulator(&mut config, &sim, &sim_config, vps.port);
                config.cluster.address = name.clone();
                config.cluster.heartbeat_seconds = HEARTBEAT_SECONDS;
                config.cluster.dead_after_seconds = DEAD_AFTER_SECONDS;
                // Until environments are leased (issue 11), a node refuses to start next to a
                // live one without this.
                config.auth.secret_key = Secret::new(JWT_KEY);
                config.secrets.seal_key = Secret::new(seal_key());
                config.log.format = LogFormat::Json;
                tweak(&mut config);
                Node {
                    name,
                    config,
                    config_path: home.join("config.toml"),
                    process: None,
                    log: Arc::new(Mutex::new(VecDeque::new())),
                    exited: None,
                }
            })
            .collect();
        let mut cluster = Self {
            nodes,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(REQUEST_TIMEOUT)
                .build()
                .expect("client"),
            store: None,
            vps,
            sim,
            sim_config,
            db,
            dir,
        };
        for i in 0..cluster.len() {
            cluster.start_node(i).await;
        }
        let url = devpocket::store::DbUrl::parse(&cluster.db.url).expect("database url");
        cluster.store = Some(
            devpocket::store::Db::connect(&url, 2, Duration::from_secs(10))
                .await
                .expect("the test connects to the cluster's database"),
        );
        cluster
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The configuration node `i` runs with (after the tweak).
    pub fn config(&self, i: usize) -> &Config {
        &self.nodes[i].config
    }

    /// Change node `i`'s configuration for its next [`Cluster::start_node`].
    pub fn config_mut(&mut self, i: usize) -> &mut Config {
        &mut self.nodes[i].config
    }

    /// The cluster's own connection to the shared database (for what the CLI would do).
    pub fn store(&self) -> &devpocket::store::Db {
        self.store.as_ref().expect("store opened at start")
    }

    /// The temp dir holding every node's dir (`node-<i>/data`, `node-<i>/config.toml`).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    // ---------------------------------------------------------------------------------------
    // Processes

    /// Start node `i` (again) on its data dir; panics with its log if it does not listen.
    pub async fn start_node(&mut self, i: usize) {
        if let Err(why) = self.try_start_node(i).await {
            panic!("{} did not start: {why}", self.nodes[i].name);
        }
    }

    /// Start node `i` (again); `Err` with its exit status and log when it exits instead of
    /// listening (a refusal).
    pub async fn try_start_node(&mut self, i: usize) -> Result<(), String> {
        let node = &mut self.nodes[i];
        assert!(node.process.is_none(), "{} is already running", node.name);
        std::fs::write(&node.config_path, to_toml(&node.config)).expect("write config");
        push_line(&node.log, format!("----- {} starting -----", node.name));
        let mut command = match setpriv() {
            // Killed with the test's thread even if the test itself is killed (no Drop then).
            Some(setpriv) => {
                let mut command = std::process::Command::new(setpriv);
                command
                    .args(["--pdeathsig", "KILL", "--"])
                    .arg(env!("CARGO_BIN_EXE_devpocket"));
                command
            }
            None => std::process::Command::new(env!("CARGO_BIN_EXE_devpocket")),
        };
        let mut child = command
            .arg("--config")
            .arg(&node.config_path)
            .arg("serve")
            .current_dir(node.config_path.parent().expect("node dir"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("devpocket starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        let log = node.log.clone();
        // Keeps draining the log so the node never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(entry) = serde_json::from_str::<Value>(&line)
                    && entry["message"] == "DevPocket server listening"
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(entry["addr"].as_str().unwrap_or("").to_string());
                }
                push_line(&log, line);
            }
        });
        let listening = tokio::time::timeout(START_TIMEOUT, rx).await;
        match listening {
            Ok(Ok(addr)) => {
                node.exited = None;
                node.process = Some(Process {
                    child,
                    base: format!("http://{addr}"),
                    paused: false,
                });
                Ok(())
            }
            Ok(Err(_)) => {
                let status = child.wait().expect("exit status");
                node.exited = Some(status);
                // The reader dropped the sender at the end of the pipe: every line is in.
                Err(format!(
                    "exited with {status}:\n{}",
                    tail(&node.log, LOG_LINES)
                ))
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "not listening after {START_TIMEOUT:?}:\n{}",
                    tail(&node.log, LOG_LINES)
                ))
            }
        }
    }

    fn process(&self, i: usize) -> &Process {
        self.nodes[i]
            .process
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.nodes[i].name))
    }

    /// Whether node `i` has a process (running or paused).
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].process.is_some()
    }

    /// Whether node `i` is paused (SIGSTOP).
    pub fn is_paused(&self, i: usize) -> bool {
        self.nodes[i].process.as_ref().is_some_and(|p| p.paused)
    }

    /// Nodes that run and are not paused: those that can answer.
    pub fn answering(&self) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| self.is_running(i) && !self.is_paused(i))
            .collect()
    }

    pub fn pid(&self, i: usize) -> u32 {
        self.process(i).child.id()
    }

    /// How node `i`'s last process ended (after `kill`, `terminate` or a refused start).
    pub fn exit_status(&self, i: usize) -> Option<ExitStatus> {
        self.nodes[i].exited
    }

    fn signal(&self, i: usize, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid(i) as i32).expect("a child's pid");
        rustix::process::kill_process(pid, signal)
            .unwrap_or_else(|e| panic!("signal {signal:?} to {}: {e}", self.nodes[i].name));
    }

    /// SIGKILL node `i` (no drain, no lease hand-back, its row stays) and reap it.
    pub fn kill(&mut self, i: usize) -> ExitStatus {
        self.signal(i, rustix::process::Signal::KILL);
        let node = &mut self.nodes[i];
        let mut process = node.process.take().expect("running");
        let status = process.child.wait().expect("reap");
        node.exited = Some(status);
        push_line(&node.log, format!("----- {} killed -----", node.name));
        status
    }

    /// SIGSTOP node `i`: it answers nothing and heartbeats nothing until [`Cluster::resume`].
    pub fn pause(&mut self, i: usize) {
        self.signal(i, rustix::process::Signal::STOP);
        // SIGSTOP lands asynchronously: wait until every thread of the node is stopped, so a
        // request sent next cannot be answered by a thread still running.
        let pid = self.pid(i);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !all_threads_stopped(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "node {i} (pid {pid}) did not stop within 5 s of SIGSTOP"
            );
            std::thread::yield_now();
        }
        let node = &mut self.nodes[i];
        node.process.as_mut().expect("running").paused = true;
        push_line(&node.log, format!("----- {} paused -----", node.name));
    }

    /// SIGCONT node `i`.
    pub fn resume(&mut self, i: usize) {
        self.signal(i, rustix::process::Signal::CONT);
        let node = &mut self.nodes[i];
        node.process.as_mut().expect("running").paused = false;
        push_line(&node.log, format!("----- {} resumed -----", node.name));
    }

    /// SIGTERM node `i` and wait for it to exit (bounded by its drain timeout plus
    /// [`EXIT_HEADROOM`]); returns how it exited.
    pub async fn terminate(&mut self, i: usize) -> ExitStatus {
        self.signal(i, rustix::process::Signal::TERM);
        let bound =
            Duration::from_secs(self.nodes[i].config.server.drain_timeout_seconds) + EXIT_HEADROOM;
        let deadline = Instant::now() + bound;
        let node = &mut self.nodes[i];
        let process = node.process.as_mut().expect("running");
        loop {
            if let Some(status) = process.child.try_wait().expect("try_wait") {
                node.process = None;
                node.exited = Some(status);
                push_line(
                    &node.log,
                    format!("----- {} exited: {status} -----", node.name),
                );
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not exit within {bound:?} of SIGTERM:\n{}",
                    node.name,
                    tail(&node.log, LOG_LINES)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The last log lines of node `i` (at most [`LOG_LINES`]).
    pub fn log(&self, i: usize) -> String {
        tail(&self.nodes[i].log, LOG_LINES)
    }

    /// The last [`FAILURE_LOG_LINES`] log lines of every node, for a failure message.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "===== {} =====\n{}",
                    n.name,
                    tail(&n.log, FAILURE_LOG_LINES)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    // ---------------------------------------------------------------------------------------
    // HTTP

    /// `http://127.0.0.1:<port>` of node `i` (its current process).
    pub fn base(&self, i: usize) -> &str {
        &self.process(i).base
    }

    pub fn url(&self, i: usize, path: &str) -> String {
        format!("{}{path}", self.base(i))
    }

    pub fn ws_url(&self, i: usize, path: &str) -> String {
        self.url(i, path).replacen("http://", "ws://", 1)
    }

    pub fn request(
        &self,
        i: usize,
        method: Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, self.url(i, path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req
    }

    /// Send and return status and JSON body (`Value::Null` when the body is not JSON); panics
    /// (with every node's log) when the request fails.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        match self.try_send(req).await {
            Ok(answer) => answer,
            Err(e) => panic!("request failed: {e}\n{}", self.logs()),
        }
    }

    pub async fn try_send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Value), reqwest::Error> {
        let resp = req.send().await?;
        let status = resp.status();
        Ok((status, resp.json::<Value>().await.unwrap_or(Value::Null)))
    }

    pub async fn get(&self, i: usize, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        self.send(self.request(i, Method::GET, path, token)).await
    }

    pub async fn post(
        &self,
        i: usize,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> (StatusCode, Value) {
        self.send(self.request(i, Method::POST, path, token).json(&body))
            .await
    }

    /// Register through node `i`.
    pub async fn register(&self, i: usize, username: &str) -> Session {
        let (status, body) = self
            .post(
                i,
                "/api/v1/auth/register",
                None,
                json!({ "username": username, "email": format!("{username}@example.com"), "password": PASSWORD }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        Session::from_auth(&body)
    }

    pub async fn login(&self, i: usize, username: &str) -> Session {
        let (status, body) = self
            .post(
                i,
                "/api/v1/auth/login",
                None,
                json!({ "username_or_email": username, "password": PASSWORD }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        Session::from_auth(&body)
    }

    /// Put a user on a plan in the shared store (as `devpocket user set-plan` would), then wait
    /// until every answering node reports it (their session caches are bounded by
    /// `auth.session_cache_seconds`).
    pub async fn set_plan(
        &self,
        session: &Session,
        username: &str,
        plan: devpocket::store::users::Plan,
    ) {
        {
            let mut conn = self.store().get().await.expect("conn");
            let user = devpocket::store::users::by_username(&mut conn, username)
                .await
                .expect("query")
                .expect("user exists");
            let now = devpocket::clock::to_db(chrono::Utc::now());
            devpocket::store::users::set_plan(&mut conn, &user.id, plan, now)
                .await
                .expect("set plan");
        }
        let bound = Duration::from_secs(self.config(0).auth.session_cache_seconds) + HEADROOM;
        for i in self.answering() {
            self.eventually(&format!("node-{i} sees plan {plan:?}"), bound, || async {
                let (status, me) = self.get(i, "/api/v1/auth/me", session.token()).await;
                if status == StatusCode::OK && me["subscription_plan"] == plan.as_str() {
                    Ok(())
                } else {
                    Err(format!("{status} {me}"))
                }
            })
            .await;
        }
    }

    /// A user registered through node 0 and put on the admin plan (100 environments).
    pub async fn admin(&self, username: &str) -> Session {
        let session = self.register(0, username).await;
        self.set_plan(&session, username, devpocket::store::users::Plan::Admin)
            .await;
        session
    }

    // ---------------------------------------------------------------------------------------
    // Waiting

    /// Poll `probe` every [`POLL`] until it gives `Ok`, for at most `within`; then fail with
    /// `what`, the last `Err` and every node's log.
    pub async fn eventually<T, F>(
        &self,
        what: &str,
        within: Duration,
        mut probe: impl FnMut() -> F,
    ) -> T
    where
        F: std::future::Future<Output = Result<T, String>>,
    {
        let deadline = Instant::now() + within;
        loop {
            let last = match probe().await {
                Ok(value) => return value,
                Err(last) => last,
            };
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {within:?} waiting for {what}; last: {last}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Bound of waits for a node to count as dead: `dead_after` plus a heartbeat plus
    /// [`HEADROOM`].
    pub fn dead_bound(&self) -> Duration {
        let c = &self.config(0).cluster;
        Duration::from_secs(c.dead_after_seconds + c.heartbeat_seconds) + HEADROOM
    }

    /// Bound of waits for environments of a dead node to be claimed elsewhere: the node is dead
    /// after `dead_after` (its leases expire with its heartbeat), and the next claim round comes
    /// within a heartbeat.
    pub fn failover_bound(&self) -> Duration {
        let c = &self.config(0).cluster;
        Duration::from_secs(c.dead_after_seconds + 2 * c.heartbeat_seconds) + HEADROOM
    }

    /// Bound of a provisioning from create to running: provisioning, installing and the install
    /// log of the simulator and fake VPS, the server's provision and install timeouts being the
    /// outer limit, plus [`HEADROOM`].
    pub fn provision_bound(&self) -> Duration {
        let p = &self.config(0).provider;
        Duration::from_secs(p.provision_timeout_seconds + p.install_timeout_seconds) + HEADROOM
    }

    // ---------------------------------------------------------------------------------------
    // Ops views

    /// `GET /api/v1/admin/actors` on node `i` (the whole body), as `admin`.
    pub async fn actors(&self, i: usize, admin: &Session) -> Value {
        let (status, body) = self.get(i, "/api/v1/admin/actors", admin.token()).await;
        assert_eq!(status, StatusCode::OK, "node-{i}: {body}");
        body
    }

    /// The environment ids whose actor runs on node `i` (actors `environment:<id>` in its tree).
    pub async fn owned_by(&self, i: usize, admin: &Session) -> Vec<String> {
        let body = self.actors(i, admin).await;
        let mut ids = Vec::new();
        environment_actors(&body["actors"], &mut ids);
        ids
    }

    /// For every environment actor on an answering node: the nodes running it.
    pub async fn owners(&self, admin: &Session) -> BTreeMap<String, Vec<usize>> {
        let mut owners: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for i in self.answering() {
            for id in self.owned_by(i, admin).await {
                owners.entry(id).or_default().push(i);
            }
        }
        owners
    }

    /// Wait until each of `envs` runs on exactly one answering node, within `within`; returns
    /// the owner of each.
    pub async fn wait_single_owners(
        &self,
        admin: &Session,
        envs: &[String],
        within: Duration,
    ) -> BTreeMap<String, usize> {
        self.eventually("exactly one owner per environment", within, || async {
            let owners = self.owners(admin).await;
            let mut single = BTreeMap::new();
            let mut wrong = Vec::new();
            for env in envs {
                match owners.get(env).map(Vec::as_slice) {
                    Some([one]) => {
                        single.insert(env.clone(), *one);
                    }
                    other => wrong.push(format!("{env}: {other:?}")),
                }
            }
            if wrong.is_empty() {
                Ok(single)
            } else {
                Err(wrong.join(", "))
            }
        })
        .await
    }

    /// The `nodes` list of node `i`'s ops view.
    pub async fn nodes_seen_by(&self, i: usize, admin: &Session) -> Vec<Value> {
        self.actors(i, admin).await["nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Node `i`'s own id (`node` of its ops view).
    pub async fn node_id(&self, i: usize, admin: &Session) -> String {
        self.actors(i, admin).await["node"]
            .as_str()
            .expect("node id")
            .to_string()
    }

    /// Create an environment through node `i`; returns its id (asserting 201).
    pub async fn create_env(&self, i: usize, session: &Session, name: &str) -> String {
        let (status, body) = self
            .post(
                i,
                "/api/v1/environments",
                session.token(),
                json!({ "name": name, "template": "python" }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "node-{i}: {body}");
        body["id"].as_str().expect("id").to_string()
    }

    /// An environment as node `i` shows it.
    pub async fn env(&self, i: usize, session: &Session, id: &str) -> Value {
        let (status, env) = self
            .get(i, &format!("/api/v1/environments/{id}"), session.token())
            .await;
        assert_eq!(status, StatusCode::OK, "node-{i}: {env}");
        env
    }

    /// Poll environment `id` through node `i` until its status is `status`, within `within`.
    pub async fn wait_status(
        &self,
        i: usize,
        session: &Session,
        id: &str,
        status: &str,
        within: Duration,
    ) -> Value {
        self.eventually(&format!("{id} {status} on node-{i}"), within, || async {
            let env = self.env(i, session, id).await;
            if env["status"] == status {
                Ok(env)
            } else {
                Err(env.to_string())
            }
        })
        .await
    }

    /// Poll every one of `ids` (each through the answering nodes in turn) until all are
    /// `status`, within `within`.
    pub async fn wait_all_status(
        &self,
        session: &Session,
        ids: &[String],
        status: &str,
        within: Duration,
    ) {
        let answering = self.answering();
        let mut turn = 0;
        self.eventually(&format!("all {status}"), within, || {
            turn += 1;
            let answering = &answering;
            let i = answering[turn % answering.len()];
            async move {
                let (code, list) = self.get(i, "/api/v1/environments", session.token()).await;
                if code != StatusCode::OK {
                    return Err(format!("node-{i}: {code} {list}"));
                }
                let listed = list
                    .as_array()
                    .or_else(|| list["environments"].as_array())
                    .cloned()
                    .unwrap_or_default();
                let behind: Vec<String> = ids
                    .iter()
                    .filter(|id| {
                        !listed
                            .iter()
                            .any(|e| e["id"] == id.as_str() && e["status"] == status)
                    })
                    .map(|id| {
                        let seen = listed.iter().find(|e| e["id"] == id.as_str());
                        format!(
                            "{id}: {}",
                            seen.map_or("missing", |e| e["status"].as_str().unwrap_or("?"))
                        )
                    })
                    .collect();
                if behind.is_empty() {
                    Ok(())
                } else {
                    Err(format!("via node-{i}: {}", behind.join(", ")))
                }
            }
        })
        .await
    }

    /// Node `i`'s Prometheus metric `name` summed over its label sets (`None` when absent).
    pub async fn metric(&self, i: usize, name: &str) -> Option<f64> {
        let resp = self
            .http
            .get(self.url(i, "/metrics"))
            .send()
            .await
            .expect("metrics");
        let text = resp.text().await.expect("metrics text");
        metric_value(&text, name)
    }

    /// Exactly one simulator instance is named after each of `envs`, and no other exists.
    pub fn assert_one_instance_each(&self, envs: &[String]) {
        let instances = self.sim.instances();
        for env in envs {
            assert_eq!(
                self.sim.instances_named(&format!("devpocket-{env}")),
                1,
                "one instance for {env}: {instances:?}"
            );
        }
        assert_eq!(instances.len(), envs.len(), "{instances:?}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Kill every node before the database goes (the nodes' Drop does it; explicit here so
        // the order never depends on field order).
        for node in &mut self.nodes {
            if let Some(mut p) = node.process.take() {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
        if let Some(store) = self.store.take() {
            store.close();
        }
    }
}

/// Ends `root`'s tmux session of that name on drop: a terminal on the fake VPS runs tmux for real
/// on this host.
pub struct TmuxSession(pub String);

impl Drop for TmuxSession {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// util-linux's `setpriv` on PATH: it sets the parent-death signal and execs the node (the same
/// process, so signals and the pid are the node's).
fn setpriv() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("setpriv"))
        .find(|p| p.is_file())
}

fn push_line(log: &Mutex<VecDeque<String>>, line: String) {
    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
    if log.len() >= LOG_LINES {
        log.pop_front();
    }
    log.push_back(line);
}

/// The last `n` lines of a node's log.
fn tail(log: &Mutex<VecDeque<String>>, n: usize) -> String {
    let log = log.lock().unwrap_or_else(|e| e.into_inner());
    let skip = log.len().saturating_sub(n);
    log.iter()
        .skip(skip)
        .cloned()
        .collect::<Vec<_>>()
        .join("\n")
}

/// Collect the ids of `environment:<id>` actors anywhere in an ops tree.
fn environment_actors(nodes: &Value, out: &mut Vec<String>) {
    for n in nodes.as_array().into_iter().flatten() {
        if let Some(id) = n["id"]
            .as_str()
            .and_then(|id| id.strip_prefix("environment:"))
        {
            out.push(id.to_string());
        }
        environment_actors(&n["children"], out);
    }
}

/// The sum of the samples of `name` (with or without labels) in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// A configuration as TOML (what `--config` reads): sections of the serialized [`Config`], each
/// value written as JSON, which TOML reads the same for strings, numbers, booleans and arrays;
/// nested tables as inline tables.
pub fn to_toml(config: &Config) -> String {
    let value = serde_json::to_value(config).expect("config serializes");
    let mut out = String::new();
    for (section, table) in value.as_object().expect("sections") {
        out.push_str(&format!("[{section}]\n"));
        for (key, v) in table.as_object().expect("a section is a table") {
            if v.is_null() {
                continue;
            }
            out.push_str(&format!("{key} = {}\n", toml_value(v)));
        }
        out.push('\n');
    }
    out
}

fn toml_value(v: &Value) -> String {
    match v {
        Value::Object(map) => {
            let items: Vec<String> = map
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("{} = {}", Value::String(k.clone()), toml_value(v)))
                .collect();
            format!("{{ {} }}", items.join(", "))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(toml_value).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// Whether every thread of process `pid` is stopped (state `T` in `/proc/<pid>/task/*/stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // The state follows the parenthesised command name.
            stat.rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next())
                .is_some_and(|state| state == 'T' || state == 't')
        })
    })
}
