//! Configuration: one plain struct, loaded once and validated as a whole.
//!
//! Layers, later ones win: the embedded `config/default.toml` (which also documents every key), an
//! optional file given with `--config`, `DEVPOCKET_<SECTION>__<KEY>` environment variables, and the
//! original server's plain names (`DATABASE_URL`, `SECRET_KEY`, `ALLOWED_ORIGINS`,
//! `GOOGLE_CLIENT_ID`, `CONTABO_*`). Secrets are wrapped in [`Secret`] so they never print.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::providers::{Format, Serialized, Toml};
use figment::value::Value;
use figment::{Figment, Provider};
use serde::{Deserialize, Serialize};

/// The embedded defaults; the same text ships as `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the structured environment overrides.
const ENV_PREFIX: &str = "DEVPOCKET_";

/// A value that must never appear in logs, `Debug` output or error messages.
#[derive(Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself; call only where it is used, never to print it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "***" })
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub rate_limit: RateLimitConfig,
    pub log: LogConfig,
    pub actors: ActorsConfig,
    pub google: GoogleConfig,
    pub provider: ProviderConfig,
    pub environments: EnvironmentsConfig,
    pub terminals: TerminalsConfig,
    pub local: LocalConfig,
    pub contabo: ContaboConfig,
    pub ops: OpsConfig,
    pub files: FilesConfig,
    pub secrets: SecretsConfig,
    pub cluster: ClusterConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub bind: String,
    pub data_dir: PathBuf,
    pub environment: String,
    pub allowed_origins: Vec<String>,
    /// Largest request body of an authenticated route, in bytes (413 beyond).
    pub max_body_bytes: u64,
    /// Largest request body of a route that runs before authentication (register, login, google,
    /// refresh and every other public route), in bytes: these bodies are read from strangers.
    pub max_unauthenticated_body_bytes: u64,
    /// Connections served at once, all clients together (WebSockets included).
    pub max_connections: u32,
    /// Connections served at once from one client address (an IPv6 client counts per /64);
    /// sized for many users behind one carrier NAT. Trusted proxies are exempt.
    pub max_connections_per_ip: u32,
    /// Seconds from accept to a complete first request head (protocol detection included).
    pub header_read_timeout_seconds: u64,
    /// Seconds an idle keep-alive connection may wait for (all of) its next request head.
    pub keep_alive_timeout_seconds: u64,
    /// Seconds from a request head to the end of its body; slower bodies get 408 and a close.
    pub body_timeout_seconds: u64,
    pub drain_timeout_seconds: u64,
    /// Reverse proxies (IP addresses or CIDR ranges) whose connections are exempt from
    /// `max_connections_per_ip` and whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<String>,
    pub hsts: bool,
    pub registration: Registration,
    /// Port previews are served at `{port}--{environment_id}.<preview_domain>` (each its own
    /// browser origin). The default `localhost` needs no DNS: browsers resolve `*.localhost`.
    pub preview_domain: String,
    /// Also serve previews at `/preview/{environment_id}/{port}/` on the API's own origin. Off by
    /// default: such previews share one origin, so one preview's page can read another's.
    pub preview_path_based: bool,
    /// Hours a preview cookie lasts (a working day); logout or revocation of the session that
    /// opened it ends it sooner.
    pub preview_cookie_hours: u32,
    /// Proxied requests per minute per client IP, apart from the API's quota (a dev server's
    /// page loads hundreds of modules).
    pub preview_per_minute: u32,
    /// Seconds to reach the port and get the response head from the app; then 502/504.
    pub preview_response_timeout_seconds: u64,
    /// Seconds a proxied body or upgraded connection may stay silent both ways before it is cut.
    pub preview_idle_timeout_seconds: u64,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    Auto,
    Open,
    Closed,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub url: Secret,
    pub max_connections: u32,
    pub acquire_timeout_seconds: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// HMAC key of new access tokens (at least 32 characters); empty = generated into
    /// `<data_dir>/jwt.key`. Every node of a cluster needs the same.
    pub secret_key: Secret,
    /// Keys still accepted for verifying access tokens (rotation), at most
    /// [`crate::secrets::MAX_PREVIOUS_KEYS`].
    pub previous_secret_keys: Vec<Secret>,
    pub access_token_minutes: u32,
    pub refresh_token_days: u32,
    pub lockout_threshold: u32,
    pub lockout_minutes: u32,
    pub issuer: String,
    pub audience: String,
    /// Password hashes computed at once; 0 = one per CPU core ([`AuthConfig::hash_threads`]).
    pub hash_concurrency: u32,
    /// Credential requests that may wait for a hash beyond those running; more get 503.
    pub hash_queue: u32,
    /// Seconds after a refresh-token rotation in which presenting the rotated token again returns
    /// the same successor pair instead of counting as theft (0 = no grace).
    pub refresh_reuse_grace_seconds: u32,
    /// Most failed-login counters kept for login names that match no account.
    pub lockout_max_unknown_names: u32,
    /// Seconds a node trusts the session and account rows it read for a request (see
    /// `auth::session_cache`): a session ended or an account changed through another node or
    /// the CLI is refused here within this bound (on the node that did it, at once). 0 = off.
    pub session_cache_seconds: u64,
}

/// Upper bound of `auth.hash_queue`: each waiting request holds a connection and its body.
pub const HASH_QUEUE_MAX: u32 = 10_000;
/// Upper bound of `auth.refresh_reuse_grace_seconds`: the window is for lost replies and
/// parallel refreshes, not a second lifetime for a spent token.
pub const REFRESH_GRACE_MAX: u32 = 300;

impl AuthConfig {
    /// Hashes computed at once: `hash_concurrency`, or one per CPU core when it is 0.
    pub fn hash_threads(&self) -> usize {
        match self.hash_concurrency {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n as usize,
        }
    }
}

/// Request rate limits (governor). Counted by each node on its own, in memory: with N nodes
/// behind a load balancer a client may get up to N times these (the caps users would notice —
/// WebSockets per user, terminals per session, plan limits — are counted in the store instead).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub enabled: bool,
    pub per_minute: u32,
    pub auth_per_minute: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActorsConfig {
    pub restart_limit: u32,
    pub restart_window_seconds: u64,
    pub session_idle_minutes: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GoogleConfig {
    pub client_id: String,
    pub jwks_url: String,
    pub issuers: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    pub poll_initial_ms: u64,
    pub poll_max_ms: u64,
    pub provision_timeout_seconds: u64,
    pub install_timeout_seconds: u64,
    pub ssh_connect_timeout_seconds: u64,
    /// Holders of one shared SSH connection to an environment (its terminals and its metrics
    /// sampler) before another connection is opened; see [`crate::ssh::pool`]. Keep it below
    /// the environment sshd's `MaxSessions` (OpenSSH default 10): each holder may open a short
    /// extra channel now and then. The local provider states its own (see
    /// [`crate::provider::Provider::ssh_holders_per_connection`]).
    pub ssh_channels_per_connection: usize,
    pub max_create_attempts: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentsConfig {
    pub metrics_interval_seconds: u64,
    pub metrics_retention_hours: u64,
    pub restart_backoff_ms: u64,
    /// How long account deletion waits for the account's environments to reach `terminated`.
    pub delete_wait_seconds: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalsConfig {
    pub grace_seconds: u64,
    pub ring_bytes: usize,
    /// WebSocket connections (terminal, logs, events) one user may hold at once over all nodes:
    /// each takes a row in the store's `connection_slots`, counted on live nodes in a transaction
    /// serialised per user (see [`crate::presence`]); past it the socket closes with 1008
    /// `Too many connections`.
    pub max_connections_per_user: usize,
    pub idle_timeout_seconds: u64,
    pub ping_interval_seconds: u64,
    pub max_message_bytes: usize,
    pub reconnect_attempts: u32,
    /// Terminals one login session may hold at once: this node's (attached or within their grace
    /// period) plus those attached on other live nodes, counted in the store's `terminals` table
    /// (see [`crate::presence`]).
    pub max_terminals_per_session: usize,
    /// Terminal input per user, in bytes per second: a governor rate limit, counted per node.
    pub input_bytes_per_second: u32,
    pub input_burst_bytes: u32,
    /// Seconds one piece of terminal input may wait for the environment to read it (its SSH
    /// window to open) before the pending input is dropped and the client told; bounds what a
    /// remote that stops reading can hold up.
    pub write_timeout_seconds: u64,
    /// Largest screen (columns × rows) a terminal keeps a server-side model of (see
    /// `terminal::screen`): 32 bytes per cell, twice with a full-screen program, so the default
    /// 40,000 cells bound it at 2.5 MiB per terminal (an 80×24 phone uses 60 KiB). Above it a
    /// terminal keeps no model and repaints fall back to tmux; 0 turns the model off.
    pub screen_max_cells: usize,
    /// Terminals this node runs at once, over all users. Each holds a few descriptors (the
    /// WebSocket, its SSH connection, on the local provider a PTY and the SSH server's end) and
    /// its ring and screen; past this a new terminal is refused at once with close code 1013
    /// `Server busy, try again` (re-attaching to a live one is never refused).
    pub max_terminals_per_node: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    pub ssh_port: u16,
    /// Connections the local SSH server serves at once (a terminal or an environment's metrics
    /// sampler holds one each); past it new ones are closed at once rather than queued, so a
    /// terminal at capacity fails fast instead of timing out.
    pub max_ssh_connections: usize,
    pub shell: PathBuf,
    /// Root of the environments' workspaces (each one an account's home), outside the data dir.
    /// Empty: `/var/lib/devpocket-workspaces` when the server runs as root, `./workspaces`
    /// otherwise.
    pub workspaces_dir: PathBuf,
    /// Without root the provider cannot give environments OS accounts of their own; it then
    /// serves one DevPocket account only, unless this is set (every account's shells then run as
    /// the server's OS user and can read each other's workspaces and the data dir).
    pub shared_account: bool,
    /// Processes (threads included) one environment's account may run at once (RLIMIT_NPROC):
    /// a fork bomb stops there instead of exhausting the host's process table.
    pub max_processes: u32,
    /// Memory one process of an environment may allocate (RLIMIT_DATA, MiB; 0 = unbounded): a
    /// runaway build fails its allocation instead of driving the host into the OOM killer.
    pub max_memory_mb: u64,
}

impl LocalConfig {
    /// The workspaces root this process uses (see [`LocalConfig::workspaces_dir`]).
    pub fn workspaces_root(&self, running_as_root: bool) -> PathBuf {
        if !self.workspaces_dir.as_os_str().is_empty() {
            self.workspaces_dir.clone()
        } else if running_as_root {
            PathBuf::from("/var/lib/devpocket-workspaces")
        } else {
            PathBuf::from("./workspaces")
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Local,
    Contabo,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Contabo => "contabo",
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContaboConfig {
    pub api_url: String,
    pub auth_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub username: String,
    pub password: Secret,
    pub region: String,
    pub product_id: String,
    pub image_id: String,
    pub ssh_port: u16,
    pub period: u32,
    pub request_timeout_seconds: u64,
    pub max_retries: u32,
    pub retry_base_ms: u64,
}

/// The file API (`/environments/{id}/files`, over SFTP as the environment's account).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// Largest file one upload may write, in bytes (the upload route is exempt from
    /// `server.max_body_bytes`; it streams to disk with bounded memory).
    pub max_upload_bytes: u64,
    /// Seconds an upload may send nothing (408), or a download's client read nothing (the
    /// response is cut), before the transfer is abandoned and its SFTP session ended.
    pub idle_timeout_seconds: u64,
    /// Entries read from one directory for a listing; past it the listing says `truncated`.
    pub max_list_entries: usize,
    /// Seconds one SFTP request may wait for the environment's answer.
    pub request_timeout_seconds: u64,
    /// File operations one user may run at once (each holds an SSH connection; a download until
    /// it is sent); more → 429 `too_many_file_operations`.
    pub max_operations_per_user: usize,
}

/// Keys of secrets at rest.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsConfig {
    /// Sealing key of new sealed values: standard base64 of at least 32 bytes; empty = generated
    /// into `<data_dir>/seal.key`. Every node of a cluster needs the same.
    pub seal_key: Secret,
    /// Sealing keys still used to open values sealed with them (rotation), at most
    /// [`crate::secrets::MAX_PREVIOUS_KEYS`].
    pub previous_seal_keys: Vec<Secret>,
}

/// This process as a node of a cluster (several nodes on one PostgreSQL database).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// How this node is named for humans in the nodes list; empty = `<hostname>/<bind address>`.
    pub address: String,
    /// Seconds between this node's heartbeats in the nodes table. A heartbeat also renews every
    /// environment lease the node holds, and each one the node claims unowned environments up to
    /// its fair share (see [`crate::cluster::leases`]).
    pub heartbeat_seconds: u64,
    /// Seconds without a heartbeat after which a node counts as dead (at least twice the
    /// heartbeat interval): its environments may then be claimed. The node itself stops acting
    /// on them one heartbeat earlier.
    pub dead_after_seconds: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OpsConfig {
    pub fault_injection: bool,
}

/// Every problem found in a configuration, reported together.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for problem in &self.0 {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Keys whose environment variables may be comma-separated lists (besides `[a, b]`).
const LIST_KEYS: &[&str] = &[
    "server.allowed_origins",
    "server.trusted_proxies",
    "auth.previous_secret_keys",
    "secrets.previous_seal_keys",
];

/// Plain (unprefixed) variable names of the original server and the key each sets.
const PLAIN_NAMES: &[(&str, &str)] = &[
    ("DATABASE_URL", "database.url"),
    ("SECRET_KEY", "auth.secret_key"),
    ("GOOGLE_CLIENT_ID", "google.client_id"),
    ("CONTABO_API_URL", "contabo.api_url"),
    ("CONTABO_AUTH_URL", "contabo.auth_url"),
    ("CONTABO_CLIENT_ID", "contabo.client_id"),
    ("CONTABO_CLIENT_SECRET", "contabo.client_secret"),
    ("CONTABO_USERNAME", "contabo.username"),
    ("CONTABO_API_USER", "contabo.username"),
    ("CONTABO_PASSWORD", "contabo.password"),
    ("CONTABO_API_PASSWORD", "contabo.password"),
    ("CONTABO_REGION", "contabo.region"),
    ("CONTABO_DEFAULT_REGION", "contabo.region"),
    ("CONTABO_PRODUCT_ID", "contabo.product_id"),
    ("CONTABO_IMAGE_ID", "contabo.image_id"),
    ("CONTABO_SSH_PORT", "contabo.ssh_port"),
];

impl Config {
    /// The embedded defaults alone (what `devpocket` runs with when nothing is configured).
    pub fn defaults() -> Self {
        Self::load(None, std::iter::empty()).expect("the embedded default configuration is valid")
    }

    /// Load from the layers described in the module docs. `env` is passed in (rather than read
    /// here) so tests can give their own.
    pub fn load<I>(file: Option<&Path>, env: I) -> Result<Self, ConfigErrors>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut problems = Vec::new();
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            if path.is_file() {
                figment = figment.merge(Toml::file(path));
            } else {
                problems.push(format!("config file {} does not exist", path.display()));
            }
        }
        for (key, value) in env_overrides(env, &mut problems) {
            figment = figment.merge(Serialized::default(&key, value));
        }
        let config = extract_sections(&figment, &mut problems);
        match config {
            Some(config) if problems.is_empty() => {
                let semantic = config.problems();
                if semantic.is_empty() {
                    Ok(config)
                } else {
                    Err(ConfigErrors(semantic))
                }
            }
            _ => Err(ConfigErrors(problems)),
        }
    }

    /// Semantic checks that serde cannot express; every problem is returned.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.server.bind.parse::<SocketAddr>().is_err() {
            p.push(format!(
                "server.bind: '{}' is not an address:port (e.g. 127.0.0.1:8000)",
                self.server.bind
            ));
        }
        if self.server.data_dir.as_os_str().is_empty() {
            p.push("server.data_dir: must not be empty".into());
        }
        if !(16..=1_000_000).contains(&self.local.max_processes) {
            p.push("local.max_processes: must be 16 to 1000000".into());
        }
        if self.local.max_memory_mb != 0 && self.local.max_memory_mb < 64 {
            p.push("local.max_memory_mb: must be 0 (unbounded) or at least 64".into());
        }
        if !self.local.workspaces_dir.as_os_str().is_empty()
            && self.local.workspaces_dir.starts_with(&self.server.data_dir)
        {
            p.push("local.workspaces_dir: must be outside server.data_dir".into());
        }
        for origin in &self.server.allowed_origins {
            let ok = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.ends_with('/'));
            if !ok {
                p.push(format!(
                    "server.allowed_origins: '{origin}' must be \"*\" or scheme://host[:port] without a trailing slash"
                ));
            }
        }
        if self.files.max_upload_bytes == 0 {
            p.push("files.max_upload_bytes: must be above 0".into());
        }
        if self.files.max_operations_per_user == 0 {
            p.push("files.max_operations_per_user: must be above 0".into());
        }
        if !(1..=1_000_000).contains(&self.files.max_list_entries) {
            p.push("files.max_list_entries: must be 1 to 1000000".into());
        }
        if self.files.idle_timeout_seconds == 0 || self.files.request_timeout_seconds == 0 {
            p.push(
                "files.idle_timeout_seconds and files.request_timeout_seconds: must be above 0"
                    .into(),
            );
        }
        let domain = &self.server.preview_domain;
        if domain.is_empty()
            || domain.starts_with('.')
            || domain.ends_with('.')
            || !domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            p.push(format!(
                "server.preview_domain: '{domain}' must be a DNS name such as localhost or preview.example.com"
            ));
        }
        if self.server.preview_cookie_hours == 0 {
            p.push("server.preview_cookie_hours: must be above 0".into());
        }
        if self.server.max_body_bytes == 0 {
            p.push("server.max_body_bytes: must be above 0".into());
        }
        let url = self.database.url.expose();
        if !url.is_empty() && crate::store::DbUrl::parse(url).is_none() {
            p.push(
                "database.url: must start with sqlite://, postgres:// or postgresql:// (value hidden)"
                    .into(),
            );
        }
        if self.server.max_unauthenticated_body_bytes == 0
            || self.server.max_unauthenticated_body_bytes > self.server.max_body_bytes
        {
            p.push(
                "server.max_unauthenticated_body_bytes: must be above 0 and at most server.max_body_bytes"
                    .into(),
            );
        }
        positive(
            &mut p,
            "server.max_connections",
            self.server.max_connections,
        );
        if self.server.max_connections_per_ip == 0
            || self.server.max_connections_per_ip > self.server.max_connections
        {
            p.push(
                "server.max_connections_per_ip: must be above 0 and at most server.max_connections"
                    .into(),
            );
        }
        for (key, seconds) in [
            (
                "server.header_read_timeout_seconds",
                self.server.header_read_timeout_seconds,
            ),
            (
                "server.keep_alive_timeout_seconds",
                self.server.keep_alive_timeout_seconds,
            ),
            (
                "server.body_timeout_seconds",
                self.server.body_timeout_seconds,
            ),
        ] {
            if seconds == 0 {
                p.push(format!("{key}: must be above 0"));
            }
        }
        for proxy in &self.server.trusted_proxies {
            if parse_trusted_proxy(proxy).is_none() {
                p.push(format!(
                    "server.trusted_proxies: '{proxy}' is not an IP address or CIDR range (e.g. 10.0.0.0/8)"
                ));
            }
        }
        if self.database.max_connections == 0 {
            p.push("database.max_connections: must be at least 1".into());
        }
        let secret = self.auth.secret_key.expose();
        if !secret.is_empty() && secret.len() < 32 {
            p.push("auth.secret_key: must be at least 32 characters (value hidden)".into());
        }
        self.key_problems(&mut p);
        if self.cluster.heartbeat_seconds == 0 {
            p.push("cluster.heartbeat_seconds: must be above 0".into());
        }
        if self.cluster.dead_after_seconds < self.cluster.heartbeat_seconds.saturating_mul(2) {
            p.push(
                "cluster.dead_after_seconds: must be at least twice cluster.heartbeat_seconds"
                    .into(),
            );
        }
        positive(
            &mut p,
            "auth.access_token_minutes",
            self.auth.access_token_minutes,
        );
        positive(
            &mut p,
            "auth.refresh_token_days",
            self.auth.refresh_token_days,
        );
        positive(
            &mut p,
            "auth.lockout_threshold",
            self.auth.lockout_threshold,
        );
        positive(&mut p, "auth.lockout_minutes", self.auth.lockout_minutes);
        if self.auth.hash_concurrency > 256 {
            p.push("auth.hash_concurrency: must be 0 (one per core) to 256".into());
        }
        if self.auth.hash_queue > HASH_QUEUE_MAX {
            p.push(format!("auth.hash_queue: must be at most {HASH_QUEUE_MAX}"));
        }
        if self.auth.refresh_reuse_grace_seconds > REFRESH_GRACE_MAX {
            p.push(format!(
                "auth.refresh_reuse_grace_seconds: must be at most {REFRESH_GRACE_MAX}"
            ));
        }
        positive(
            &mut p,
            "auth.lockout_max_unknown_names",
            self.auth.lockout_max_unknown_names,
        );
        positive(&mut p, "rate_limit.per_minute", self.rate_limit.per_minute);
        positive(
            &mut p,
            "rate_limit.auth_per_minute",
            self.rate_limit.auth_per_minute,
        );
        if self.auth.issuer.is_empty() || self.auth.audience.is_empty() {
            p.push("auth.issuer and auth.audience: must not be empty".into());
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            p.push(format!(
                "log.level: '{}' is not a valid filter",
                self.log.level
            ));
        }
        if self.actors.restart_window_seconds == 0 {
            p.push("actors.restart_window_seconds: must be above 0".into());
        }
        if self.actors.session_idle_minutes == 0 {
            p.push("actors.session_idle_minutes: must be above 0".into());
        }
        if !self.google.client_id.is_empty() && !is_http_url(&self.google.jwks_url) {
            p.push("google.jwks_url: must be an http(s) URL".into());
        }
        if self.provider.poll_initial_ms == 0
            || self.provider.poll_max_ms < self.provider.poll_initial_ms
        {
            p.push("provider.poll_initial_ms / poll_max_ms: need 0 < initial <= max".into());
        }
        if !(1..=1024).contains(&self.provider.ssh_channels_per_connection) {
            p.push("provider.ssh_channels_per_connection: must be between 1 and 1024".into());
        }
        if self.terminals.max_terminals_per_node == 0 || self.local.max_ssh_connections == 0 {
            p.push(
                "terminals.max_terminals_per_node and local.max_ssh_connections: must be at least 1"
                    .into(),
            );
        }
        if self.terminals.ring_bytes < 1024 || self.terminals.max_connections_per_user == 0 {
            p.push(
                "terminals.ring_bytes (>= 1024) and max_connections_per_user (>= 1) are too small"
                    .into(),
            );
        }
        if self.terminals.write_timeout_seconds == 0 {
            p.push("terminals.write_timeout_seconds: must be above 0".into());
        }
        if self.terminals.ping_interval_seconds == 0 || self.terminals.idle_timeout_seconds == 0 {
            p.push(
                "terminals.ping_interval_seconds and idle_timeout_seconds: must be above 0".into(),
            );
        }
        if self.environments.delete_wait_seconds == 0 {
            p.push("environments.delete_wait_seconds: must be above 0".into());
        }
        if self.environments.metrics_interval_seconds == 0 {
            p.push("environments.metrics_interval_seconds: must be above 0".into());
        }
        if ![1, 3, 6, 12].contains(&self.contabo.period) {
            p.push("contabo.period: must be 1, 3, 6 or 12 (months)".into());
        }
        if self.provider.kind == ProviderKind::Contabo {
            let c = &self.contabo;
            for (key, empty) in [
                ("contabo.client_id", c.client_id.is_empty()),
                ("contabo.client_secret", c.client_secret.is_empty()),
                ("contabo.username", c.username.is_empty()),
                ("contabo.password", c.password.is_empty()),
            ] {
                if empty {
                    p.push(format!("{key}: required when provider.kind = \"contabo\""));
                }
            }
            if !is_http_url(&c.api_url) || !is_http_url(&c.auth_url) {
                p.push("contabo.api_url and contabo.auth_url: must be http(s) URLs".into());
            }
        }
        p
    }

    /// Problems of the rotation keys (`auth.previous_secret_keys`, `secrets.*`); values hidden.
    fn key_problems(&self, p: &mut Vec<String>) {
        use crate::secrets::{MAX_PREVIOUS_KEYS, decode_seal_key};
        let previous = &self.auth.previous_secret_keys;
        if previous.len() > MAX_PREVIOUS_KEYS {
            p.push(format!(
                "auth.previous_secret_keys: at most {MAX_PREVIOUS_KEYS} keys"
            ));
        }
        if previous.iter().any(|k| k.expose().len() < 32) {
            p.push("auth.previous_secret_keys: every key must be at least 32 characters (values hidden)".into());
        }
        if !previous.is_empty() && self.auth.secret_key.is_empty() {
            p.push("auth.previous_secret_keys: needs auth.secret_key (the current key)".into());
        }
        let seal = &self.secrets;
        if !seal.seal_key.is_empty()
            && let Err(e) = decode_seal_key(seal.seal_key.expose())
        {
            p.push(format!("secrets.seal_key: {e} (value hidden)"));
        }
        if seal.previous_seal_keys.len() > MAX_PREVIOUS_KEYS {
            p.push(format!(
                "secrets.previous_seal_keys: at most {MAX_PREVIOUS_KEYS} keys"
            ));
        }
        for key in &seal.previous_seal_keys {
            if let Err(e) = decode_seal_key(key.expose()) {
                p.push(format!("secrets.previous_seal_keys: {e} (values hidden)"));
                break;
            }
        }
        if !seal.previous_seal_keys.is_empty() && seal.seal_key.is_empty() {
            p.push("secrets.previous_seal_keys: needs secrets.seal_key (the current key)".into());
        }
    }

    /// The address to listen on (validated by [`Config::problems`]).
    pub fn bind_addr(&self) -> SocketAddr {
        self.server
            .bind
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8000)))
    }

    /// `server.trusted_proxies` as networks (entries that do not parse are left out; they are
    /// reported by [`Config::problems`]).
    pub fn trusted_proxies(&self) -> Vec<ipnet::IpNet> {
        self.server
            .trusted_proxies
            .iter()
            .filter_map(|p| parse_trusted_proxy(p))
            .collect()
    }

    /// Whether self-registration is open under this configuration (see `server.registration`).
    pub fn registration_open(&self) -> bool {
        match self.server.registration {
            Registration::Open => true,
            Registration::Closed => false,
            Registration::Auto => {
                self.provider.kind != ProviderKind::Local || self.bind_addr().ip().is_loopback()
            }
        }
    }
}

/// Top-level sections; anything else in a file or variable is a mistake worth reporting.
const SECTIONS: [&str; 16] = [
    "server",
    "database",
    "auth",
    "rate_limit",
    "log",
    "actors",
    "google",
    "provider",
    "environments",
    "terminals",
    "local",
    "contabo",
    "ops",
    "files",
    "secrets",
    "cluster",
];

/// Extract section by section so that a mistake in one section does not hide those in others.
fn extract_sections(figment: &Figment, problems: &mut Vec<String>) -> Option<Config> {
    if let Ok(data) = figment.data() {
        for dict in data.values() {
            for key in dict.keys().filter(|k| !SECTIONS.contains(&k.as_str())) {
                problems.push(format!("{key}: unknown section"));
            }
        }
    }
    fn section<T: serde::de::DeserializeOwned>(
        figment: &Figment,
        name: &str,
        problems: &mut Vec<String>,
    ) -> Option<T> {
        match figment.extract_inner::<T>(name) {
            Ok(value) => Some(value),
            Err(errors) => {
                for e in errors {
                    let field: Vec<&str> = e
                        .path
                        .iter()
                        .map(String::as_str)
                        .filter(|p| *p != name)
                        .collect();
                    let path = if field.is_empty() {
                        name.to_string()
                    } else {
                        format!("{name}.{}", field.join("."))
                    };
                    problems.push(format!("{path}: {}", e.kind));
                }
                None
            }
        }
    }
    let server = section(figment, "server", problems);
    let database = section(figment, "database", problems);
    let auth = section(figment, "auth", problems);
    let rate_limit = section(figment, "rate_limit", problems);
    let log = section(figment, "log", problems);
    let actors = section(figment, "actors", problems);
    let google = section(figment, "google", problems);
    let provider = section(figment, "provider", problems);
    let environments = section(figment, "environments", problems);
    let terminals = section(figment, "terminals", problems);
    let local = section(figment, "local", problems);
    let contabo = section(figment, "contabo", problems);
    let ops = section(figment, "ops", problems);
    let files = section(figment, "files", problems);
    let secrets = section(figment, "secrets", problems);
    let cluster = section(figment, "cluster", problems);
    Some(Config {
        server: server?,
        database: database?,
        auth: auth?,
        rate_limit: rate_limit?,
        log: log?,
        actors: actors?,
        google: google?,
        provider: provider?,
        environments: environments?,
        terminals: terminals?,
        local: local?,
        contabo: contabo?,
        ops: ops?,
        files: files?,
        secrets: secrets?,
        cluster: cluster?,
    })
}

/// One `server.trusted_proxies` entry: an address (`10.0.0.7`, `::1`) or a range (`10.0.0.0/8`).
pub fn parse_trusted_proxy(entry: &str) -> Option<ipnet::IpNet> {
    let entry = entry.trim();
    entry
        .parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| {
            entry
                .parse::<std::net::IpAddr>()
                .ok()
                .map(ipnet::IpNet::from)
        })
        .map(|net| net.trunc())
}

fn positive(problems: &mut Vec<String>, key: &str, value: u32) {
    if value == 0 {
        problems.push(format!("{key}: must be above 0"));
    }
}

fn is_http_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// Turn environment variables into `(dotted.key, value)` overrides, plain names first so the
/// structured `DEVPOCKET_` names win over them.
fn env_overrides<I>(env: I, problems: &mut Vec<String>) -> Vec<(String, Value)>
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut plain = Vec::new();
    let mut structured = Vec::new();
    for (name, raw) in env {
        if let Some(rest) = name.strip_prefix(ENV_PREFIX) {
            // Only SECTION__KEY names are configuration; others (e.g. DEVPOCKET_TEST_*) are not ours.
            let Some((section, key)) = rest.split_once("__") else {
                continue;
            };
            let key = format!("{}.{}", section.to_lowercase(), key.to_lowercase());
            let is_list = LIST_KEYS.contains(&key.as_str());
            if is_list && !raw.trim_start().starts_with('[') {
                structured.push((key, comma_list(&raw)));
            } else {
                structured.push((key, parse_env_value(&raw)));
            }
        } else if name == "ALLOWED_ORIGINS" {
            plain.push(("server.allowed_origins".to_string(), comma_list(&raw)));
        } else if let Some((_, key)) = PLAIN_NAMES.iter().find(|(n, _)| *n == name) {
            // Secrets and URLs stay strings; only the port is a number.
            let value = if key.ends_with("ssh_port") {
                parse_env_value(&raw)
            } else {
                Value::from(raw)
            };
            plain.push((key.to_string(), value));
        } else if name.starts_with("CONTABO_") && !raw.is_empty() {
            problems.push(format!(
                "{name}: not a known setting (see config/default.toml, section [contabo])"
            ));
        }
    }
    plain.extend(structured);
    plain
}

fn parse_env_value(raw: &str) -> Value {
    Value::from_str(raw).unwrap_or_else(|_| Value::from(raw.to_string()))
}

fn comma_list(raw: &str) -> Value {
    let items: Vec<String> = raw
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    Value::serialize(items).unwrap_or_else(|_| Value::from(Vec::<Value>::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid_and_local() {
        let c = Config::defaults();
        assert_eq!(c.server.bind, "127.0.0.1:8000");
        assert_eq!(c.server.data_dir, PathBuf::from("./data"));
        assert_eq!(c.provider.kind, ProviderKind::Local);
        assert!(c.database.url.is_empty());
        assert!(c.registration_open());
    }

    #[test]
    fn local_sandbox_settings_are_checked() {
        let c = Config::defaults();
        assert!(!c.local.shared_account, "secure by default");
        assert_eq!(
            c.local.workspaces_root(true),
            PathBuf::from("/var/lib/devpocket-workspaces")
        );
        assert_eq!(
            c.local.workspaces_root(false),
            PathBuf::from("./workspaces")
        );
        let mut c = Config::defaults();
        c.local.max_processes = 3;
        c.local.max_memory_mb = 10;
        c.local.workspaces_dir = c.server.data_dir.join("workspaces");
        let problems = c.problems().join("\n");
        for key in [
            "local.max_processes",
            "local.max_memory_mb",
            "local.workspaces_dir",
        ] {
            assert!(problems.contains(key), "{key}: {problems}");
        }
        c.local.workspaces_dir = PathBuf::from("/srv/ws");
        c.local.max_processes = 64;
        c.local.max_memory_mb = 0;
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        assert_eq!(c.local.workspaces_root(true), PathBuf::from("/srv/ws"));
    }

    #[test]
    fn structured_env_overrides_win_over_plain_names() {
        let c = Config::load(
            None,
            env(&[
                ("DEVPOCKET_SERVER__BIND", "0.0.0.0:9000"),
                ("DEVPOCKET_RATE_LIMIT__AUTH_PER_MINUTE", "7"),
                ("DEVPOCKET_AUTH__LOCKOUT_MINUTES", "2"),
                ("DATABASE_URL", "sqlite:///tmp/a.db"),
                ("DEVPOCKET_DATABASE__URL", "postgres://u:p@h/db"),
                ("ALLOWED_ORIGINS", "https://a.example, https://b.example"),
                ("CONTABO_USERNAME", "me@example.com"),
                ("DEVPOCKET_TEST_DATABASE_URL", "ignored"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.server.bind, "0.0.0.0:9000");
        assert_eq!(c.rate_limit.auth_per_minute, 7);
        assert_eq!(c.auth.lockout_minutes, 2);
        assert_eq!(c.database.url.expose(), "postgres://u:p@h/db");
        assert_eq!(
            c.server.allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
        assert_eq!(c.contabo.username, "me@example.com");
        // Local provider on a public bind: self-registration closes by default.
        assert!(!c.registration_open());
    }

    #[test]
    fn every_problem_is_reported_and_secrets_stay_hidden() {
        let err = Config::load(
            None,
            env(&[
                ("DEVPOCKET_SERVER__BIND", "nowhere"),
                ("DEVPOCKET_DATABASE__URL", "mysql://root:hunter2@db/x"),
                ("SECRET_KEY", "short-secret-value"),
                ("DEVPOCKET_AUTH__LOCKOUT_THRESHOLD", "0"),
            ]),
        )
        .expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("server.bind"), "{text}");
        assert!(text.contains("database.url"), "{text}");
        assert!(text.contains("auth.secret_key"), "{text}");
        assert!(text.contains("auth.lockout_threshold"), "{text}");
        assert_eq!(err.0.len(), 4, "{text}");
        assert!(!text.contains("hunter2") && !text.contains("short-secret-value"));
    }

    #[test]
    fn auth_hardening_settings_are_bounded() {
        let c = Config::load(None, env(&[])).expect("defaults");
        assert_eq!(c.auth.hash_queue, 64);
        assert_eq!(c.auth.refresh_reuse_grace_seconds, 30);
        assert!(c.auth.hash_threads() >= 1, "0 = one per core");
        let err = Config::load(
            None,
            env(&[
                ("DEVPOCKET_AUTH__HASH_QUEUE", "100000"),
                ("DEVPOCKET_AUTH__REFRESH_REUSE_GRACE_SECONDS", "3600"),
                ("DEVPOCKET_AUTH__LOCKOUT_MAX_UNKNOWN_NAMES", "0"),
                ("DEVPOCKET_AUTH__HASH_CONCURRENCY", "1000"),
            ]),
        )
        .expect_err("out of bounds");
        let text = err.to_string();
        for key in [
            "auth.hash_queue",
            "auth.refresh_reuse_grace_seconds",
            "auth.lockout_max_unknown_names",
            "auth.hash_concurrency",
        ] {
            assert!(text.contains(key), "{key}: {text}");
        }
        assert_eq!(err.0.len(), 4, "{text}");
    }

    #[test]
    fn unknown_keys_and_bad_types_are_errors() {
        let err = Config::load(None, env(&[("DEVPOCKET_SERVER__BOGUS", "1")])).expect_err("bad");
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = Config::load(
            None,
            env(&[
                ("DEVPOCKET_LOG__FORMAT", "xml"),
                ("DEVPOCKET_AUTH__LOCKOUT_MINUTES", "soon"),
                ("DEVPOCKET_NOPE__X", "1"),
            ]),
        )
        .expect_err("bad");
        let text = err.to_string();
        assert!(
            text.contains("log.format") && text.contains("xml"),
            "{text}"
        );
        assert!(text.contains("auth.lockout_minutes"), "{text}");
        assert!(text.contains("nope: unknown section"), "{text}");
    }

    #[test]
    fn connection_limits_and_trusted_proxies_are_validated() {
        let c = Config::load(
            None,
            env(&[(
                "DEVPOCKET_SERVER__TRUSTED_PROXIES",
                "10.0.0.0/8, 192.168.1.7, ::1",
            )]),
        )
        .expect("valid");
        let nets = c.trusted_proxies();
        assert_eq!(nets.len(), 3);
        assert!(nets[0].contains(&"10.1.2.3".parse::<std::net::IpAddr>().expect("ip")));
        assert!(nets[1].contains(&"192.168.1.7".parse::<std::net::IpAddr>().expect("ip")));
        assert!(!nets[1].contains(&"192.168.1.8".parse::<std::net::IpAddr>().expect("ip")));
        let err = Config::load(
            None,
            env(&[
                (
                    "DEVPOCKET_SERVER__TRUSTED_PROXIES",
                    "[\"10.0.0.0/33\", \"proxy.local\"]",
                ),
                ("DEVPOCKET_SERVER__MAX_CONNECTIONS", "10"),
                ("DEVPOCKET_SERVER__MAX_CONNECTIONS_PER_IP", "11"),
                ("DEVPOCKET_SERVER__BODY_TIMEOUT_SECONDS", "0"),
                ("DEVPOCKET_SERVER__MAX_UNAUTHENTICATED_BODY_BYTES", "0"),
            ]),
        )
        .expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "'10.0.0.0/33'",
            "'proxy.local'",
            "server.max_connections_per_ip",
            "server.body_timeout_seconds",
            "server.max_unauthenticated_body_bytes",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
        assert_eq!(err.0.len(), 5, "{text}");
    }

    #[test]
    fn rotation_keys_come_from_the_environment_and_are_checked() {
        use base64::Engine;
        let b64 = |b: u8| base64::engine::general_purpose::STANDARD.encode([b; 32]);
        let c = Config::load(
            None,
            env(&[
                ("DEVPOCKET_AUTH__SECRET_KEY", &"n".repeat(40)),
                (
                    "DEVPOCKET_AUTH__PREVIOUS_SECRET_KEYS",
                    &format!("{},{}", "o".repeat(40), "p".repeat(32)),
                ),
                ("DEVPOCKET_SECRETS__SEAL_KEY", &b64(1)),
                ("DEVPOCKET_SECRETS__PREVIOUS_SEAL_KEYS", &b64(2)),
            ]),
        )
        .expect("valid");
        assert_eq!(c.auth.previous_secret_keys.len(), 2);
        assert_eq!(c.secrets.seal_key.expose(), b64(1));
        assert_eq!(c.secrets.previous_seal_keys, vec![Secret::new(b64(2))]);
        assert!(!format!("{c:?}").contains(&b64(1)));
        let err = Config::load(
            None,
            env(&[
                ("DEVPOCKET_AUTH__PREVIOUS_SECRET_KEYS", "short"),
                ("DEVPOCKET_SECRETS__SEAL_KEY", "hunter2-not-base64!"),
                ("DEVPOCKET_SECRETS__PREVIOUS_SEAL_KEYS", &b64(2)),
                ("DEVPOCKET_CLUSTER__HEARTBEAT_SECONDS", "10"),
                ("DEVPOCKET_CLUSTER__DEAD_AFTER_SECONDS", "15"),
            ]),
        )
        .expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "auth.previous_secret_keys: every key",
            "auth.previous_secret_keys: needs auth.secret_key",
            "secrets.seal_key: not base64",
            "cluster.dead_after_seconds",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::new("topsecret");
        assert_eq!(format!("{s:?}"), "***");
        let c = Config::load(None, env(&[("SECRET_KEY", &"k".repeat(40))])).expect("valid");
        assert!(!format!("{c:?}").contains(&"k".repeat(40)));
    }
}
