//! The server under measurement as a child process: the bench's sibling binary
//! (`CARGO_BIN_EXE_devpocket`, the same profile as the bench) on SQLite and the local provider,
//! in a throwaway dir, listening on 127.0.0.1:0. Its CPU time and resident memory are read from
//! `/proc/<pid>` and so are the server's alone: not the benchmark's client, not tmux or the shells
//! (the local provider's SSH server is part of the server process, so it is counted).
//!
//! The process is started through `setpriv --pdeathsig KILL` when `setpriv` exists (it execs, so
//! the pid is the server's), so it dies with the benchmark even if the benchmark is killed; it is
//! killed on drop, and [`Scratch`] then removes the environment accounts (their tmux servers
//! included) and the files.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Duration;

use devpocket::config::{Config, LogFormat};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::nodes::to_toml;
use crate::support::terminal::{Ws, next_json};
use crate::support::{PASSWORD, Scratch, Session, test_config};

/// How long the release server may take from spawn to "listening" (migrations included).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a terminated server may take to exit before it is killed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Generous bound of an environment's create → running on the local provider.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(60);

pub struct ChildServer {
    // Drop order: the process (killed) before the scratch dir (accounts swept, files removed).
    child: Option<std::process::Child>,
    pub base: String,
    pub http: reqwest::Client,
    _dir: Scratch,
}

impl ChildServer {
    /// Start the server on [`test_config`] (generous rate limits, fast provider polling) with
    /// `tweak` applied; panics with its log if it does not listen within [`START_TIMEOUT`].
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = Scratch::new();
        let home = dir.path().to_path_buf();
        let db = format!("sqlite://{}", home.join("data").join("bench.db").display());
        let mut config = test_config(&home.join("data"), &db);
        config.log.format = LogFormat::Json;
        config.ops.fault_injection = false;
        tweak(&mut config);
        let config_path = home.join("config.toml");
        std::fs::write(&config_path, to_toml(&config)).expect("write config");
        let mut child = command(&config_path, &home)
            .spawn()
            .expect("devpocket starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<String, String>>();
        // Drains the log for the server's life so it never blocks on a full pipe; keeps the
        // last lines for a failure message until it is listening.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut last = std::collections::VecDeque::new();
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.is_none() {
                    continue;
                }
                if let Ok(entry) = serde_json::from_str::<Value>(&line)
                    && entry["message"] == "DevPocket server listening"
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(Ok(entry["addr"].as_str().unwrap_or("").to_string()));
                    continue;
                }
                if last.len() >= 40 {
                    last.pop_front();
                }
                last.push_back(line);
            }
            if let Some(tx) = tx.take() {
                let _ = tx.send(Err(Vec::from(last).join("\n")));
            }
        });
        let addr = match tokio::time::timeout(START_TIMEOUT, rx).await {
            Ok(Ok(Ok(addr))) => addr,
            Ok(Ok(Err(log))) => {
                let status = child.wait().ok();
                panic!("the server exited ({status:?}) instead of listening:\n{log}");
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the server is not listening after {START_TIMEOUT:?}");
            }
        };
        Self {
            child: Some(child),
            base: format!("http://{addr}"),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client"),
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// CPU time the server has used so far (user + system, all its threads, exited ones
    /// included), in seconds: `utime + stime` of `/proc/<pid>/stat` over the clock tick.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let fields: Vec<&str> = stat
            .rsplit_once(") ")
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // Index 0 here is field 3 (state).
        (ticks(11) + ticks(12)) as f64 / clock_ticks_per_second()
    }

    /// The server's resident memory (`VmRSS` of `/proc/<pid>/status`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmRSS:")
    }

    /// One line of `/proc/<pid>/status` and `smaps_rollup` worth printing next to the RSS:
    /// anonymous vs file-backed memory and the thread count.
    pub fn memory_detail(&self) -> String {
        let pid = self.pid();
        format!(
            "anon {} KiB, file {} KiB, {} threads",
            status_kib(pid, "RssAnon:"),
            status_kib(pid, "RssFile:"),
            status_kib(pid, "Threads:")
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        let mut req = self.http.post(self.url(path)).json(&body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = self.http.get(self.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Register `username` (one argon2id hash).
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

    /// Log in (one argon2id verification): a new login session.
    pub async fn login(&self, username: &str) -> Session {
        let (status, body) = self
            .post(
                "/api/v1/auth/login",
                None,
                json!({ "username_or_email": username, "password": PASSWORD }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        Session::from_auth(&body)
    }

    /// Create an environment and wait until it is running; its id.
    pub async fn running_env(&self, me: &Session, name: &str) -> String {
        let (status, env) = self
            .post(
                "/api/v1/environments",
                me.token(),
                json!({ "name": name, "template": "ubuntu" }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{env}");
        let id = env["id"].as_str().expect("id").to_string();
        let deadline = tokio::time::Instant::now() + RUNNING_TIMEOUT;
        loop {
            let (_, env) = self
                .get(&format!("/api/v1/environments/{id}"), me.token())
                .await;
            if env["status"] == "running" {
                return id;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not running in time: {env}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Open a terminal WebSocket and read up to its welcome.
    pub async fn open_terminal(&self, me: &Session, env: &str, extra: &str) -> (Ws, Value) {
        let url = self
            .url(&format!(
                "/api/v1/ws/terminal/{env}?token={}{extra}",
                me.access
            ))
            .replacen("http://", "ws://", 1);
        let (mut ws, resp) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        loop {
            let frame = next_json(&mut ws).await.expect("welcome before close");
            match frame["type"].as_str() {
                Some("welcome") => return (ws, frame),
                Some("info") => {}
                _ => panic!("unexpected before the welcome: {frame}"),
            }
        }
    }

    /// Ask the server to stop (SIGTERM) and wait for it, bounded; killed past the bound.
    pub async fn stop(mut self) {
        if let Some(child) = self.child.take() {
            tokio::task::spawn_blocking(move || terminate(child))
                .await
                .expect("stopping the server");
        }
    }
}

/// SIGTERM, then wait up to `EXIT_TIMEOUT` for the exit (so a profiler in the server, such as
/// heaptrack, writes its data out), then SIGKILL.
fn terminate(mut child: std::process::Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = std::time::Instant::now() + EXIT_TIMEOUT;
    while std::time::Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            terminate(child);
        }
    }
}

/// `BENCH_SERVER_ENV`: space-separated `NAME=value` pairs for the server's environment, on top of
/// `PATH` (e.g. `GLIBC_TUNABLES=glibc.malloc.arena_max=2` to compare allocator settings without a
/// rebuild, or heaptrack's `LD_PRELOAD=.../libheaptrack_preload.so DUMP_HEAPTRACK_OUTPUT=<file>`).
fn server_env() -> Vec<(String, String)> {
    std::env::var("BENCH_SERVER_ENV")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

fn command(config_path: &Path, home: &Path) -> std::process::Command {
    // `BENCH_SERVER_BIN` measures another build (a saved copy of an earlier one, say).
    let exe = std::env::var_os("BENCH_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_devpocket")));
    let mut command = match setpriv() {
        Some(setpriv) => {
            let mut command = std::process::Command::new(setpriv);
            command.args(["--pdeathsig", "KILL", "--"]).arg(&exe);
            command
        }
        None => std::process::Command::new(exe),
    };
    command
        .arg("--config")
        .arg(config_path)
        .arg("serve")
        .current_dir(home)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(server_env())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    command
}

/// The unit of `/proc/<pid>/stat`'s times (`getconf CLK_TCK`; 100 on Linux when unreadable).
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn setpriv() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("setpriv"))
        .find(|p| p.is_file())
}

/// A `kB` line of `/proc/<pid>/status` (or a plain count such as `Threads:`), 0 when absent.
pub fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
