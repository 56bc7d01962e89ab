//! A Contabo API simulator over real HTTP on 127.0.0.1:0, faithful to the shapes in
//! `shared/contabo/NOTES.md` §1–§5 and the OpenAPI document: the Keycloak token endpoint, the
//! `/v1` envelope and pagination, instances with a lazy `provisioning → installing → running`
//! timeline, actions, cancel, audits, secrets, snapshots, images and data centers, plus injected
//! faults ([`Fault`]).
//!
//! Choices where the real API is unknown (each is what the backend must cope with):
//! - Cancelling an instance that already has a `cancelDate` answers **422**
//!   `{"statusCode":422,"message":"Instance <id> is already cancelled"}` (NOTES §5.2.4).
//! - Actions (`start|stop|restart|shutdown|rescue|resetPassword`) and snapshots need an installed
//!   instance (`running`, `stopped` or `rescue`); otherwise **409**. Actions flip the status at
//!   once and are no-ops when already in that state.
//! - While `provisioning`, `ipConfig` is present with empty strings and `netmaskCidr: 0`.
//! - `displayName`, `name` and `search` list filters match case-insensitive substrings: compare
//!   the results exactly yourself.
//! - Faults of different kinds are independent: create faults (`CreateFails500`,
//!   `CreateResponseLost`) queue for the next creates, instance fates (`StuckProvisioning`,
//!   `ErrorStatus`) for the next created instances, `RateLimited`/`Html403` count down over the
//!   next `/v1` requests (the WAF answers before the rate limiter and before auth).
//! - `ExpireTokens` invalidates access and refresh tokens alike.
//! - An instance call naming a missing secret answers 404 (`Entity Secret with id N not found`),
//!   or, with `SimConfig::missing_secret_500`, the 500 some accounts really get (NOTES §2.7,
//!   tf#17). `SecretVanishes` deletes the secrets the next create refers to just before it is
//!   processed (deleted in the panel meanwhile).
//! - `orderBy=field:ASC|DESC` (repeatable) sorts any list by top-level fields before paging; a
//!   malformed one answers 400.
//! - Unknown request fields on create/PATCH/reinstall answer 400 (`property x should not exist`),
//!   and a non-empty body must be sent as `application/json`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use chrono::{DateTime, Months, NaiveDate, SecondsFormat, Utc};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Path of the Keycloak token endpoint (on the simulator's own host).
pub const TOKEN_PATH: &str = "/auth/realms/contabo/protocol/openid-connect/token";
pub const TENANT_ID: &str = "INT";
pub const CUSTOMER_ID: &str = "14135176";
/// The standard Ubuntu 22.04 image, the API's default `imageId`.
pub const UBUNTU_22_04: &str = "afecbb85-e2fc-46f0-9684-b46b1faf00bb";
pub const UBUNTU_24_04: &str = "d64d5c6c-9dda-4e38-8174-0ee282474d8a";
pub const DEBIAN_12: &str = "0b6e8c1a-4f3e-4a57-9d7b-2f4c1e5a8b93";

/// Request bodies above this answer 413 (userData has no documented limit; tens of kB at most).
const MAX_BODY_BYTES: usize = 1 << 20;
/// Recorded requests; the oldest are dropped beyond this.
const MAX_RECORDED_REQUESTS: usize = 10_000;
/// Instances one simulator will create (create answers 402 beyond).
const MAX_INSTANCES: usize = 1_000;
/// Secrets one simulator will hold (create answers 402 beyond).
const MAX_SECRETS: usize = 1_000;
/// Live tokens kept; expired ones are pruned first, then arbitrary ones.
const MAX_TOKENS: usize = 10_000;
/// Audit rows kept per kind; the oldest are dropped beyond this.
const MAX_AUDITS: usize = 10_000;
/// Queued create faults or instance fates (a test that queues more is broken).
const MAX_QUEUED_FAULTS: usize = 64;
/// Concurrent HTTP connections served; more wait in the accept backlog.
const MAX_CONNECTIONS: usize = 256;
const REFRESH_TTL_SECS: u64 = 1800;
const DEFAULT_PAGE_SIZE: usize = 20;
const SNAPSHOT_LIFETIME_DAYS: u64 = 30;

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub client_id: String,
    pub client_secret: String,
    pub username: String,
    pub password: String,
    /// `expires_in` of access tokens, enforced in real time.
    pub token_ttl_secs: u64,
    /// Time an instance spends in `provisioning`.
    pub provisioning_ms: u64,
    /// Time in `installing` (after create and after reinstall); IPs appear when it starts.
    pub installing_ms: u64,
    /// IPv4 given to every instance (127.0.0.1 so tests reach their fake VPS).
    pub ipv4: String,
    /// Snapshots per instance before 402.
    pub snapshot_slots: usize,
    /// A missing secret id on an instance call answers 500 (tf#17) instead of 404.
    pub missing_secret_500: bool,
    /// Time (timelines, token expiry) moves only when the test calls `ContaboSim::advance`.
    pub manual_time: bool,
    /// Give every instance its own loopback address ([`loopback_of`]) instead of `ipv4`, so a
    /// fake VPS started with `FakeVps::start_per_address` serves many instances at once, each
    /// with its own host key.
    pub ipv4_per_instance: bool,
}

/// The loopback address of instance `id` when `SimConfig::ipv4_per_instance` is set:
/// `127.<1 + bits 16..23 mod 128>.<bits 8..15>.<bits 0..7>`, distinct for ids less than 2^23
/// apart (the simulator numbers instances consecutively) and never 127.0.0.1. Linux routes all of
/// 127.0.0.0/8 to the loopback interface.
pub fn loopback_of(id: i64) -> std::net::Ipv4Addr {
    let id = id as u64;
    std::net::Ipv4Addr::new(
        127,
        1 + ((id >> 16) & 0x7f) as u8,
        ((id >> 8) & 0xff) as u8,
        (id & 0xff) as u8,
    )
}

impl SimConfig {
    /// The IPv4 address instance `id` gets once installing.
    fn ipv4_of(&self, id: i64) -> String {
        if self.ipv4_per_instance {
            loopback_of(id).to_string()
        } else {
            self.ipv4.clone()
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            client_id: "sim-client".into(),
            client_secret: "sim-secret".into(),
            username: "api@example.com".into(),
            password: "Sim-Password-1!".into(),
            token_ttl_secs: 300,
            provisioning_ms: 40,
            installing_ms: 40,
            ipv4: "127.0.0.1".into(),
            snapshot_slots: 2,
            missing_secret_500: false,
            manual_time: false,
            ipv4_per_instance: false,
        }
    }
}

/// A fault to inject; see the module doc for how kinds combine.
#[derive(Clone, Debug)]
pub enum Fault {
    /// The next create answers 500 and creates nothing.
    CreateFails500,
    /// The next (valid) create creates the instance and its audit row, then drops the
    /// connection without a response.
    CreateResponseLost,
    /// The next N `/v1` requests answer 429.
    RateLimited(u32),
    /// The next N `/v1` requests answer 403 with a Cloudflare HTML page.
    Html403(u32),
    /// The next created instance stays in `provisioning` forever.
    StuckProvisioning,
    /// The next created instance goes to `error` with this `errorMessage` instead of installing.
    ErrorStatus(String),
    /// Every access and refresh token issued so far becomes invalid.
    ExpireTokens,
    /// The secrets the next create refers to are deleted just before it is processed.
    SecretVanishes,
}

#[derive(Clone, Debug)]
pub struct SimInstance {
    pub instance_id: i64,
    pub display_name: String,
    pub status: String,
    pub user_data: Option<String>,
    pub ssh_keys: Vec<i64>,
    pub cancel_date: Option<String>,
    pub product_id: String,
    pub region: String,
    pub ipv4: Option<String>,
}

/// One request the simulator received. `status` is 0 when the connection was dropped.
#[derive(Clone, Debug)]
pub struct SimRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub request_id: Option<String>,
    pub trace_id: Option<String>,
    pub status: u16,
}

/// What the fake VPS needs to know about the instance it impersonates.
#[derive(Clone, Debug)]
pub struct SshTarget {
    pub instance_id: i64,
    /// Bumped by every reinstall (a fresh install log).
    pub generation: u32,
    pub status: String,
    pub user_data: String,
}

/// A shared view of a simulator's state that outlives borrows of [`ContaboSim`].
#[derive(Clone)]
pub struct SimHandle(Arc<Mutex<State>>);

impl SimHandle {
    /// The most recently created instance whose userData carries an ed25519 host key.
    pub fn latest_ssh_target(&self) -> Option<SshTarget> {
        let mut state = lock(&self.0);
        state.advance_all();
        state.instances.iter().rev().find_map(|i| {
            let user_data = i.user_data.as_ref()?;
            user_data.contains("ed25519_private").then(|| SshTarget {
                instance_id: i.id,
                generation: i.generation,
                status: i.status.clone(),
                user_data: user_data.clone(),
            })
        })
    }
}

impl SimHandle {
    /// The instance at `ip` (see `SimConfig::ipv4_per_instance`) whose userData carries an
    /// ed25519 host key; the latest such one if several share the address.
    pub fn ssh_target_at(&self, ip: std::net::Ipv4Addr) -> Option<SshTarget> {
        let mut state = lock(&self.0);
        state.advance_all();
        let ip = ip.to_string();
        state.instances.iter().rev().find_map(|i| {
            let user_data = i.user_data.as_ref()?;
            (i.ips.as_ref().is_some_and(|ips| ips.v4 == ip)
                && user_data.contains("ed25519_private"))
            .then(|| SshTarget {
                instance_id: i.id,
                generation: i.generation,
                status: i.status.clone(),
                user_data: user_data.clone(),
            })
        })
    }
}

pub struct ContaboSim {
    /// Base URL of the API, e.g. `http://127.0.0.1:PORT` (paths start with `/v1`).
    pub api_url: String,
    /// Full token URL: `{api_url}/auth/realms/contabo/protocol/openid-connect/token`.
    pub auth_url: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ContaboSim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ContaboSim {
    pub async fn start(config: SimConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sim");
        let api_url = format!("http://{}", listener.local_addr().expect("sim addr"));
        let state = Arc::new(Mutex::new(State::new(config, &api_url)));
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        Self {
            auth_url: format!("{api_url}{TOKEN_PATH}"),
            api_url,
            state,
            task,
        }
    }

    pub fn handle(&self) -> SimHandle {
        SimHandle(self.state.clone())
    }

    pub fn inject(&self, fault: Fault) {
        let mut state = lock(&self.state);
        match fault {
            Fault::CreateFails500 | Fault::CreateResponseLost | Fault::SecretVanishes => {
                assert!(
                    state.create_faults.len() < MAX_QUEUED_FAULTS,
                    "too many faults"
                );
                state.create_faults.push_back(fault);
            }
            Fault::StuckProvisioning | Fault::ErrorStatus(_) => {
                assert!(state.fates.len() < MAX_QUEUED_FAULTS, "too many faults");
                state.fates.push_back(fault);
            }
            Fault::RateLimited(n) => state.rate_limited += n,
            Fault::Html403(n) => state.html403 += n,
            Fault::ExpireTokens => {
                state.tokens.clear();
                state.refresh_tokens.clear();
            }
        }
    }

    /// Every instance ever created (including cancelled ones), in creation order.
    pub fn instances(&self) -> Vec<SimInstance> {
        let mut state = lock(&self.state);
        state.advance_all();
        state.instances.iter().map(Instance::summary).collect()
    }

    pub fn instance_count(&self) -> usize {
        lock(&self.state).instances.len()
    }

    /// How many instances have exactly this display name.
    pub fn instances_named(&self, display_name: &str) -> usize {
        let state = lock(&self.state);
        state
            .instances
            .iter()
            .filter(|i| i.display_name == display_name)
            .count()
    }

    /// Move the simulator's clock forward (`SimConfig::manual_time` only).
    pub fn advance(&self, by: Duration) {
        let mut state = lock(&self.state);
        let now = state
            .manual_now
            .as_mut()
            .expect("advance needs SimConfig::manual_time");
        *now += by;
    }

    /// Ids of the secrets held now.
    pub fn secret_ids(&self) -> Vec<i64> {
        lock(&self.state).secrets.keys().copied().collect()
    }

    /// Instance ids successfully cancelled, in order.
    pub fn cancels(&self) -> Vec<i64> {
        lock(&self.state).cancels.clone()
    }

    /// Successful actions as (instanceId, action), in order.
    pub fn actions(&self) -> Vec<(i64, String)> {
        lock(&self.state).actions.clone()
    }

    pub fn user_data(&self, instance_id: i64) -> Option<String> {
        let state = lock(&self.state);
        state.instance(instance_id)?.user_data.clone()
    }

    /// Requests to the token endpoint, whatever their outcome.
    pub fn token_requests(&self) -> usize {
        lock(&self.state).token_requests
    }

    /// Every request received (token endpoint included), oldest first.
    pub fn requests(&self) -> Vec<SimRequest> {
        lock(&self.state).requests.iter().cloned().collect()
    }

    /// Force a status (clears any pending timeline); installed statuses get IPs if missing.
    pub fn set_status(&self, instance_id: i64, status: &str, error_message: Option<&str>) {
        let mut state = lock(&self.state);
        let ipv4 = state.config.ipv4_of(instance_id);
        let instance = state
            .instance_mut(instance_id)
            .expect("set_status: no such instance");
        instance.status = status.to_string();
        instance.error_message = error_message.map(str::to_string);
        instance.timer = None;
        if matches!(status, "running" | "stopped" | "rescue" | "installing") {
            instance.assign_ips(&ipv4);
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// HTTP plumbing

/// Returned by the service to make hyper drop the connection without a response.
#[derive(Debug)]
struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("simulated lost response")
    }
}

impl std::error::Error for DropConnection {}

async fn accept_loop(listener: TcpListener, state: Arc<Mutex<State>>) {
    // Dropping the set (when this task is aborted) aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_CONNECTIONS {
            let _ = connections.join_next().await;
            continue;
        }
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let state = state.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| handle(state.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The parts of a request the handlers look at.
struct Ctx {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    raw_query: String,
    headers: HeaderMap,
    body: Bytes,
    request_id: String,
    trace_id: String,
}

impl Ctx {
    fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

enum Outcome {
    Reply(Reply),
    Drop,
}

struct Reply {
    status: u16,
    body: ReplyBody,
}

enum ReplyBody {
    Json(Value),
    Html(&'static str),
    Empty,
}

impl Reply {
    fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            body: ReplyBody::Json(body),
        }
    }

    /// `{"statusCode": N, "message": "..."}`.
    fn error(status: u16, message: impl Into<String>) -> Self {
        Self::json(
            status,
            json!({ "statusCode": status, "message": message.into() }),
        )
    }

    /// Validation failure: 400 with `message` as an array (class-validator style).
    fn invalid(messages: Vec<String>) -> Self {
        Self::json(400, json!({ "statusCode": 400, "message": messages }))
    }

    fn not_found(what: &str, id: impl std::fmt::Display) -> Self {
        Self::error(404, format!("Entity {what} with id {id} not found"))
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let (content_type, body) = match self.body {
            ReplyBody::Json(v) => ("application/json; charset=utf-8", v.to_string()),
            ReplyBody::Html(h) => ("text/html; charset=UTF-8", h.to_string()),
            ReplyBody::Empty => ("", String::new()),
        };
        let mut builder = Response::builder().status(self.status);
        if !content_type.is_empty() {
            builder = builder.header("content-type", content_type);
        }
        if matches!(self.status, 403) && content_type.starts_with("text/html") {
            builder = builder
                .header("server", "cloudflare")
                .header("cf-ray", "8f1e2d3c4b5a6978-FRA");
        }
        builder
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    }
}

impl From<Reply> for Outcome {
    fn from(reply: Reply) -> Self {
        Outcome::Reply(reply)
    }
}

async fn handle(
    state: Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, DropConnection> {
    let (parts, body) = req.into_parts();
    let raw_query = parts.uri.query().unwrap_or("").to_string();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut record = SimRequest {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query: raw_query.clone(),
        request_id: header("x-request-id"),
        trace_id: header("x-trace-id"),
        status: 0,
    };
    let outcome = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Err(_) => Outcome::Reply(Reply::error(413, "Payload Too Large")),
        Ok(collected) => {
            let ctx = Ctx {
                method: record.method.clone(),
                path: record.path.clone(),
                query: serde_urlencoded::from_str(&raw_query).unwrap_or_default(),
                raw_query,
                request_id: record.request_id.clone().unwrap_or_default(),
                trace_id: record.trace_id.clone().unwrap_or_default(),
                headers: parts.headers,
                body: collected.to_bytes(),
            };
            lock(&state).dispatch(&ctx)
        }
    };
    let result = match outcome {
        Outcome::Reply(reply) => {
            record.status = reply.status;
            Ok(reply.into_response())
        }
        Outcome::Drop => Err(DropConnection),
    };
    lock(&state).record(record);
    result
}

// ---------------------------------------------------------------------------------------------
// Static tables

struct Product {
    id: &'static str,
    name: &'static str,
    cpu_cores: u32,
    ram_mb: u64,
    disk_mb: u64,
    product_type: &'static str,
}

const fn product(
    id: &'static str,
    name: &'static str,
    cpu_cores: u32,
    ram_gb: u64,
    disk_gb: u64,
    product_type: &'static str,
) -> Product {
    Product {
        id,
        name,
        cpu_cores,
        ram_mb: ram_gb * 1024,
        disk_mb: disk_gb * 1024,
        product_type,
    }
}

/// The current generation (NOTES §2.6): the only ids create accepts.
static PRODUCTS: &[Product] = &[
    product("V91", "Cloud VPS 10 NVMe (no setup)", 4, 8, 75, "nvme"),
    product("V92", "Cloud VPS 10 SSD (no setup)", 4, 8, 150, "ssd"),
    product("V93", "Storage VPS 10 (no setup)", 2, 4, 300, "ssd"),
    product("V94", "Cloud VPS 20 NVMe (no setup)", 6, 12, 100, "nvme"),
    product("V95", "Cloud VPS 20 SSD (no setup)", 6, 12, 200, "ssd"),
    product("V96", "Storage VPS 20 (no setup)", 3, 8, 400, "ssd"),
    product("V97", "Cloud VPS 30 NVMe (no setup)", 8, 24, 200, "nvme"),
    product("V98", "Cloud VPS 30 SSD (no setup)", 8, 24, 400, "ssd"),
    product("V99", "Storage VPS 30 (no setup)", 6, 18, 1000, "nvme"),
    product("V100", "Cloud VPS 40 NVMe (no setup)", 12, 48, 250, "nvme"),
    product("V101", "Cloud VPS 40 SSD (no setup)", 12, 48, 500, "ssd"),
    product("V102", "Storage VPS 40 (no setup)", 8, 30, 1200, "nvme"),
    product("V103", "Cloud VPS 50 NVMe (no setup)", 16, 64, 300, "nvme"),
    product("V104", "Cloud VPS 50 SSD (no setup)", 16, 64, 600, "ssd"),
    product("V105", "Storage VPS 50 (no setup)", 14, 50, 1400, "ssd"),
    product("V106", "Cloud VPS 60 NVMe (no setup)", 18, 96, 350, "nvme"),
    product("V107", "Cloud VPS 60 SSD (no setup)", 18, 96, 700, "ssd"),
    product("V8", "Cloud VDS S (no setup)", 3, 24, 180, "vds"),
    product("V9", "Cloud VDS M (no setup)", 4, 32, 240, "vds"),
    product("V10", "Cloud VDS L (no setup)", 6, 48, 360, "vds"),
    product("V11", "Cloud VDS XL (no setup)", 8, 64, 480, "vds"),
    product("V16", "Cloud VDS XXL (no setup)", 12, 96, 720, "vds"),
];

const REGIONS: &[&str] = &[
    "EU",
    "US-central",
    "US-east",
    "US-west",
    "SIN",
    "UK",
    "AUS",
    "JPN",
    "IND",
];

/// (slug, name, regionSlug, regionName, s3Url); the first of each region hosts its instances.
const DATA_CENTERS: &[(&str, &str, &str, &str, &str)] = &[
    (
        "EU2",
        "European Union 2",
        "EU",
        "European Union",
        "eu2.contabostorage.com",
    ),
    (
        "EU1",
        "European Union 1",
        "EU",
        "European Union",
        "eu2.contabostorage.com",
    ),
    (
        "EU4",
        "European Union 4",
        "EU",
        "European Union",
        "eu2.contabostorage.com",
    ),
    (
        "US-central1",
        "United States (Central) 1",
        "US-central",
        "United States (Central)",
        "usc1.contabostorage.com",
    ),
    (
        "US-east1",
        "United States (East) 1",
        "US-east",
        "United States (East)",
        "use1.contabostorage.com",
    ),
    (
        "US-west1",
        "United States (West) 1",
        "US-west",
        "United States (West)",
        "usw1.contabostorage.com",
    ),
    (
        "SIN1",
        "Asia (Singapore) 1",
        "SIN",
        "Asia (Singapore)",
        "sin1.contabostorage.com",
    ),
    (
        "UK1",
        "United Kingdom 1",
        "UK",
        "United Kingdom",
        "uk1.contabostorage.com",
    ),
    (
        "AUS1",
        "Asia (Australia) 1",
        "AUS",
        "Asia (Australia)",
        "aus1.contabostorage.com",
    ),
    (
        "JPN1",
        "Asia (Japan) 1",
        "JPN",
        "Asia (Japan)",
        "jpn1.contabostorage.com",
    ),
    (
        "IND1",
        "Asia (India) 1",
        "IND",
        "Asia (India)",
        "ind1.contabostorage.com",
    ),
];

/// (imageId, name, description, version, sizeMb): standard images, all Linux qcow2.
const IMAGES: &[(&str, &str, &str, &str, u64)] = &[
    (
        UBUNTU_22_04,
        "ubuntu-22.04",
        "Ubuntu 22.04 LTS",
        "22.04",
        2252,
    ),
    (
        UBUNTU_24_04,
        "ubuntu-24.04",
        "Ubuntu 24.04 LTS",
        "24.04",
        2458,
    ),
    (
        "3f2e8a9c-5d1b-4c7e-8f6a-1b2c3d4e5f60",
        "ubuntu-22.04-cpanel",
        "Ubuntu 22.04 LTS with cPanel",
        "22.04-cpanel",
        4096,
    ),
    (DEBIAN_12, "debian-12", "Debian 12 (Bookworm)", "12", 1843),
    (
        "66abf39a-ba8b-425e-a385-8eb347ceac10",
        "debian-11",
        "Debian 11 (Bullseye)",
        "11",
        1638,
    ),
    (
        "9a4d1e7b-2c3f-4b8a-a1d2-e3f4a5b6c7d8",
        "rockylinux-9",
        "Rocky Linux 9",
        "9",
        1946,
    ),
];

const FORBIDDEN_HTML: &str = r#"<!DOCTYPE html>
<!--[if lt IE 7]> <html class="no-js ie6 oldie" lang="en-US"> <![endif]-->
<html lang="en-US">
<head>
<title>Attention Required! | Cloudflare</title>
<meta charset="UTF-8" />
<meta name="robots" content="noindex, nofollow" />
</head>
<body>
  <div id="cf-wrapper">
    <div id="cf-error-details" class="cf-error-details-wrapper">
      <h1 data-translate="block_headline">Sorry, you have been blocked</h1>
      <h2 class="cf-subheadline">You are unable to access contabo.com</h2>
      <p>This website is using a security service to protect itself from online attacks.
      The action you just performed triggered the security solution.</p>
      <p>Your IP is not allowed to access Contabo.com</p>
      <span class="cf-footer-item">Cloudflare Ray ID: <strong>8f1e2d3c4b5a6978</strong></span>
    </div>
  </div>
</body>
</html>
"#;

// ---------------------------------------------------------------------------------------------
// State

struct Issued {
    expires: Instant,
}

#[derive(Clone)]
enum Timer {
    /// Leaves `provisioning` at `until` for `installing`, or for `error` with a message.
    Provisioning {
        until: Instant,
        error: Option<String>,
    },
    Installing {
        until: Instant,
    },
}

struct Ips {
    v4: String,
    v4_gateway: String,
    v6: String,
}

struct Snapshot {
    id: String,
    name: String,
    description: String,
    created: DateTime<Utc>,
}

struct Instance {
    id: i64,
    name: String,
    display_name: String,
    product: &'static Product,
    region: String,
    data_center: &'static str,
    region_name: &'static str,
    image_id: String,
    ssh_keys: Vec<i64>,
    user_data: Option<String>,
    default_user: String,
    period: u32,
    created: DateTime<Utc>,
    cancel_date: Option<NaiveDate>,
    status: String,
    error_message: Option<String>,
    timer: Option<Timer>,
    ips: Option<Ips>,
    mac: String,
    vhost_id: i64,
    vhost_number: i64,
    generation: u32,
    snapshots: Vec<Snapshot>,
}

impl Instance {
    fn advance(&mut self, now: Instant, installing: Duration, ipv4: &str) {
        loop {
            match self.timer.clone() {
                Some(Timer::Provisioning { until, error }) if now >= until => match error {
                    Some(message) => {
                        self.status = "error".into();
                        self.error_message = Some(message);
                        self.timer = None;
                    }
                    None => {
                        self.status = "installing".into();
                        self.assign_ips(ipv4);
                        self.timer = Some(Timer::Installing {
                            until: until + installing,
                        });
                    }
                },
                Some(Timer::Installing { until }) if now >= until => {
                    self.status = "running".into();
                    self.timer = None;
                }
                _ => return,
            }
        }
    }

    fn assign_ips(&mut self, ipv4: &str) {
        if self.ips.is_some() {
            return;
        }
        let v4_gateway = match ipv4.parse::<std::net::Ipv4Addr>() {
            Ok(ip) => {
                let [a, b, c, _] = ip.octets();
                format!("{a}.{b}.{c}.1")
            }
            Err(_) => String::new(),
        };
        let id = self.id as u64;
        self.ips = Some(Ips {
            v4: ipv4.to_string(),
            v4_gateway,
            // Fully expanded, as the real API writes it.
            v6: format!(
                "2a02:c207:{:04x}:{:04x}:0000:0000:0000:0001",
                (id >> 16) & 0xffff,
                id & 0xffff
            ),
        });
    }

    fn installed(&self) -> bool {
        matches!(self.status.as_str(), "running" | "stopped" | "rescue")
    }

    fn gone(&self, today: NaiveDate) -> bool {
        self.cancel_date.is_some_and(|d| d < today)
    }

    fn summary(&self) -> SimInstance {
        SimInstance {
            instance_id: self.id,
            display_name: self.display_name.clone(),
            status: self.status.clone(),
            user_data: self.user_data.clone(),
            ssh_keys: self.ssh_keys.clone(),
            cancel_date: self.cancel_date.map(|d| d.to_string()),
            product_id: self.product.id.to_string(),
            region: self.region.clone(),
            ipv4: self.ips.as_ref().map(|ips| ips.v4.clone()),
        }
    }

    fn ip_config(&self) -> Value {
        match &self.ips {
            Some(ips) => json!({
                "v4": { "ip": ips.v4, "gateway": ips.v4_gateway, "netmaskCidr": 24 },
                "v6": { "ip": ips.v6, "gateway": "fe80::1", "netmaskCidr": 64 },
            }),
            None => json!({
                "v4": { "ip": "", "gateway": "", "netmaskCidr": 0 },
                "v6": { "ip": "", "gateway": "", "netmaskCidr": 0 },
            }),
        }
    }

    /// The full `InstanceResponse`.
    fn to_json(&self) -> Value {
        let mut v = json!({
            "tenantId": TENANT_ID,
            "customerId": CUSTOMER_ID,
            "additionalIps": [],
            "name": self.name,
            "displayName": self.display_name,
            "instanceId": self.id,
            "dataCenter": self.data_center,
            "region": self.region,
            "regionName": self.region_name,
            "productId": self.product.id,
            "imageId": self.image_id,
            "ipConfig": self.ip_config(),
            "macAddress": self.mac,
            "ramMb": self.product.ram_mb,
            "cpuCores": self.product.cpu_cores,
            "osType": "Linux",
            "diskMb": self.product.disk_mb,
            "sshKeys": self.ssh_keys,
            "createdDate": timestamp(self.created),
            "cancelDate": self.cancel_date.map(|d| d.to_string()),
            "status": self.status,
            "vHostId": self.vhost_id,
            "vHostNumber": self.vhost_number,
            "vHostName": format!("m{}", self.vhost_number),
            "addOns": [],
            "productType": self.product.product_type,
            "productName": self.product.name,
            "defaultUser": self.default_user,
        });
        if let (Some(message), Some(obj)) = (&self.error_message, v.as_object_mut()) {
            obj.insert("errorMessage".into(), json!(message));
        }
        v
    }

    /// `{tenantId, customerId, instanceId, createdDate}` (PATCH and reinstall responses).
    fn short_json(&self) -> Value {
        json!({
            "tenantId": TENANT_ID,
            "customerId": CUSTOMER_ID,
            "instanceId": self.id,
            "createdDate": timestamp(self.created),
        })
    }

    fn snapshot_json(&self, s: &Snapshot) -> Value {
        let image = IMAGES.iter().find(|i| i.0 == self.image_id);
        json!({
            "tenantId": TENANT_ID,
            "customerId": CUSTOMER_ID,
            "snapshotId": s.id,
            "name": s.name,
            "description": s.description,
            "instanceId": self.id,
            "createdDate": timestamp(s.created),
            "autoDeleteDate": timestamp(s.created + chrono::Duration::days(SNAPSHOT_LIFETIME_DAYS as i64)),
            "imageId": self.image_id,
            "imageName": image.map(|i| i.1).unwrap_or("custom"),
        })
    }
}

struct Secret {
    id: i64,
    name: String,
    kind: String,
    value: String,
    created: DateTime<Utc>,
    updated: DateTime<Utc>,
}

impl Secret {
    fn to_json(&self, with_value: bool) -> Value {
        let mut v = json!({
            "tenantId": TENANT_ID,
            "customerId": CUSTOMER_ID,
            "secretId": self.id,
            "name": self.name,
            "type": self.kind,
            "createdAt": timestamp(self.created),
            "updatedAt": timestamp(self.updated),
        });
        if let (true, Some(obj)) = (with_value, v.as_object_mut()) {
            obj.insert("value".into(), json!(self.value));
        }
        v
    }
}

struct State {
    config: SimConfig,
    /// `Some` when the test controls time.
    manual_now: Option<Instant>,
    api_url: String,
    /// The API user's Keycloak id (`sub`, and `changedBy` in audits).
    sub: String,
    next_instance_id: i64,
    next_secret_id: i64,
    next_audit_id: i64,
    last_snapshot_epoch: i64,
    tokens: HashMap<String, Issued>,
    refresh_tokens: HashMap<String, Issued>,
    instances: Vec<Instance>,
    secrets: BTreeMap<i64, Secret>,
    audits: VecDeque<Value>,
    action_audits: VecDeque<Value>,
    create_faults: VecDeque<Fault>,
    fates: VecDeque<Fault>,
    rate_limited: u32,
    html403: u32,
    requests: VecDeque<SimRequest>,
    cancels: Vec<i64>,
    actions: Vec<(i64, String)>,
    token_requests: usize,
}

fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The spec's `x-request-id` pattern:
/// `^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-5][0-9A-Fa-f]{3}-[089abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}$`.
pub fn valid_request_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, &b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            14 => (b'0'..=b'5').contains(&b),
            19 => b"089abAB".contains(&b),
            _ => b.is_ascii_hexdigit(),
        })
}

/// The secret password rule of §2.7.
fn password_ok(value: &str) -> bool {
    let upper = value.chars().any(|c| c.is_ascii_uppercase());
    let lower = value.chars().any(|c| c.is_ascii_lowercase());
    let digits = value.chars().filter(char::is_ascii_digit).count();
    let specials = value.chars().filter(|c| "!@#$^&*?_~".contains(*c)).count();
    value.chars().count() >= 8
        && upper
        && lower
        && ((digits >= 1 && specials >= 2) || (digits >= 3 && specials >= 1))
}

fn is_uuid(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok() && s.len() == 36
}

fn contains_ci(haystack: &str, needle: &str) -> bool {
    haystack.to_lowercase().contains(&needle.to_lowercase())
}

fn in_list(list: &str, value: &str) -> bool {
    list.split(',')
        .any(|item| item.trim().eq_ignore_ascii_case(value))
}

/// Parse a JSON object body; an empty body counts as `{}`.
fn object_body(ctx: &Ctx) -> Result<Map<String, Value>, Reply> {
    if ctx.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let json_type = ctx
        .header("content-type")
        .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("application/json"));
    if !json_type {
        return Err(Reply::invalid(vec![
            "Content-Type must be application/json".into(),
        ]));
    }
    match serde_json::from_slice::<Value>(&ctx.body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Reply::invalid(vec!["body must be an object".into()])),
        Err(e) => Err(Reply::error(400, format!("Unexpected token in JSON: {e}"))),
    }
}

fn reject_unknown(body: &Map<String, Value>, allowed: &[&str], problems: &mut Vec<String>) {
    for key in body.keys() {
        if !allowed.contains(&key.as_str()) {
            problems.push(format!("property {key} should not exist"));
        }
    }
}

/// An optional string field; wrong types are reported.
fn opt_str(body: &Map<String, Value>, key: &str, problems: &mut Vec<String>) -> Option<String> {
    match body.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            problems.push(format!("{key} must be a string"));
            None
        }
    }
}

fn opt_ids(body: &Map<String, Value>, key: &str, problems: &mut Vec<String>) -> Vec<i64> {
    match body.get(key) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) if items.iter().all(|v| v.as_i64().is_some()) => {
            items.iter().filter_map(Value::as_i64).collect()
        }
        Some(_) => {
            problems.push(format!("each value in {key} must be an integer number"));
            Vec::new()
        }
    }
}

impl State {
    fn new(config: SimConfig, api_url: &str) -> Self {
        Self {
            manual_now: config.manual_time.then(Instant::now),
            config,
            api_url: api_url.to_string(),
            sub: uuid::Uuid::new_v4().to_string(),
            next_instance_id: rand::random_range(200_000_000..800_000_000),
            next_secret_id: rand::random_range(100_000..900_000),
            next_audit_id: 1,
            last_snapshot_epoch: 0,
            tokens: HashMap::new(),
            refresh_tokens: HashMap::new(),
            instances: Vec::new(),
            secrets: BTreeMap::new(),
            audits: VecDeque::new(),
            action_audits: VecDeque::new(),
            create_faults: VecDeque::new(),
            fates: VecDeque::new(),
            rate_limited: 0,
            html403: 0,
            requests: VecDeque::new(),
            cancels: Vec::new(),
            actions: Vec::new(),
            token_requests: 0,
        }
    }

    /// The simulator's clock: real time, or the test's (see `ContaboSim::advance`).
    fn now(&self) -> Instant {
        self.manual_now.unwrap_or_else(Instant::now)
    }

    fn record(&mut self, request: SimRequest) {
        if self.requests.len() >= MAX_RECORDED_REQUESTS {
            self.requests.pop_front();
        }
        self.requests.push_back(request);
    }

    fn advance_all(&mut self) {
        let now = self.now();
        let installing = Duration::from_millis(self.config.installing_ms);
        for instance in &mut self.instances {
            let ipv4 = self.config.ipv4_of(instance.id);
            instance.advance(now, installing, &ipv4);
        }
    }

    fn instance(&self, id: i64) -> Option<&Instance> {
        self.instances.iter().find(|i| i.id == id)
    }

    fn instance_mut(&mut self, id: i64) -> Option<&mut Instance> {
        self.instances.iter_mut().find(|i| i.id == id)
    }

    /// A visible instance by path id, or the error reply.
    fn find_instance(&mut self, raw: &str) -> Result<&mut Instance, Reply> {
        let Ok(id) = raw.parse::<i64>() else {
            return Err(Reply::error(
                400,
                "Validation failed (numeric string is expected)",
            ));
        };
        let today = Utc::now().date_naive();
        match self.instance_mut(id) {
            Some(instance) if !instance.gone(today) => Ok(instance),
            _ => Err(Reply::not_found("Instance", id)),
        }
    }

    fn dispatch(&mut self, ctx: &Ctx) -> Outcome {
        if ctx.path == TOKEN_PATH {
            return self.token(ctx).into();
        }
        if !ctx.path.starts_with("/v1/") {
            return cannot(ctx).into();
        }
        if self.html403 > 0 {
            self.html403 -= 1;
            return Reply {
                status: 403,
                body: ReplyBody::Html(FORBIDDEN_HTML),
            }
            .into();
        }
        if self.rate_limited > 0 {
            self.rate_limited -= 1;
            return Reply::error(429, "ThrottlerException: Too Many Requests").into();
        }
        if !self.authorized(ctx) {
            return Reply::error(401, "Unauthorized").into();
        }
        if !valid_request_id(&ctx.request_id) {
            return Reply::invalid(vec!["x-request-id must be a UUID".into()]).into();
        }
        self.advance_all();
        self.route(ctx)
    }

    fn route(&mut self, ctx: &Ctx) -> Outcome {
        let rest = &ctx.path["/v1/".len()..];
        let segs: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
        let reply = match (ctx.method.as_str(), segs.as_slice()) {
            ("GET", ["compute", "instances"]) => self.list_instances(ctx),
            ("POST", ["compute", "instances"]) => return self.create_instance(ctx),
            ("GET", ["compute", "instances", "audits"]) => {
                self.list_audits(ctx, AuditKind::Instances)
            }
            ("GET", ["compute", "instances", "actions", "audits"]) => {
                self.list_audits(ctx, AuditKind::Actions)
            }
            ("GET", ["compute", "instances", id]) => self.get_instance(id),
            ("PATCH", ["compute", "instances", id]) => self.patch_instance(ctx, id),
            ("PUT", ["compute", "instances", id]) => self.reinstall(ctx, id),
            ("POST", ["compute", "instances", id, "cancel"]) => self.cancel(ctx, id),
            ("POST", ["compute", "instances", id, "actions", action]) => {
                self.action(ctx, id, action)
            }
            ("GET", ["compute", "instances", id, "snapshots"]) => self.list_snapshots(ctx, id),
            ("POST", ["compute", "instances", id, "snapshots"]) => self.create_snapshot(ctx, id),
            ("GET", ["compute", "instances", id, "snapshots", sid]) => self.get_snapshot(id, sid),
            ("PATCH", ["compute", "instances", id, "snapshots", sid]) => {
                self.patch_snapshot(ctx, id, sid)
            }
            ("DELETE", ["compute", "instances", id, "snapshots", sid]) => {
                self.delete_snapshot(id, sid)
            }
            ("POST", ["compute", "instances", id, "snapshots", sid, "rollback"]) => {
                self.rollback(ctx, id, sid)
            }
            ("GET", ["compute", "images"]) => list_images(ctx),
            ("GET", ["compute", "images", id]) => get_image(id),
            ("GET", ["data-centers"]) => list_data_centers(ctx),
            ("GET", ["secrets"]) => self.list_secrets(ctx),
            ("POST", ["secrets"]) => self.create_secret(ctx),
            ("GET", ["secrets", id]) => self.get_secret(id),
            ("PATCH", ["secrets", id]) => self.patch_secret(ctx, id),
            ("DELETE", ["secrets", id]) => self.delete_secret(id),
            _ => cannot(ctx),
        };
        reply.into()
    }

    // -- auth ---------------------------------------------------------------------------------

    fn authorized(&mut self, ctx: &Ctx) -> bool {
        let Some(value) = ctx.header("authorization") else {
            return false;
        };
        let Some((scheme, token)) = value.split_once(' ') else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return false;
        }
        self.tokens
            .get(token.trim())
            .is_some_and(|t| t.expires > self.now())
    }

    fn token(&mut self, ctx: &Ctx) -> Reply {
        self.token_requests += 1;
        if ctx.method != "POST" {
            return Reply::json(405, json!({ "error": "HTTP 405 Method Not Allowed" }));
        }
        let is_form = ctx.header("content-type").is_some_and(|ct| {
            ct.to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
        let form: Vec<(String, String)> = if is_form {
            serde_urlencoded::from_bytes(&ctx.body).unwrap_or_default()
        } else {
            Vec::new()
        };
        let field = |key: &str| {
            form.iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        let (basic_id, basic_secret) = basic_credentials(ctx);
        let client_id = field("client_id").or(basic_id);
        let client_secret = field("client_secret").or(basic_secret);
        let Some(grant_type) = field("grant_type") else {
            return oauth_error(400, "invalid_request", "Missing form parameter: grant_type");
        };
        let (Some(client_id), Some(client_secret)) = (client_id, client_secret) else {
            return oauth_error(400, "invalid_request", "Missing parameter: client_id");
        };
        match grant_type.as_str() {
            "password" => {
                let (Some(username), Some(password)) = (field("username"), field("password"))
                else {
                    return oauth_error(400, "invalid_request", "Missing parameter: username");
                };
                if !self.client_ok(&client_id, &client_secret) {
                    return invalid_client();
                }
                if username != self.config.username || password != self.config.password {
                    return oauth_error(401, "invalid_grant", "Invalid user credentials");
                }
                self.issue(&client_id)
            }
            "refresh_token" => {
                let Some(refresh) = field("refresh_token") else {
                    return oauth_error(400, "invalid_request", "Missing parameter: refresh_token");
                };
                if !self.client_ok(&client_id, &client_secret) {
                    return invalid_client();
                }
                let valid = self
                    .refresh_tokens
                    .get(&refresh)
                    .is_some_and(|t| t.expires > self.now());
                if !valid {
                    return oauth_error(400, "invalid_grant", "Invalid refresh token");
                }
                self.issue(&client_id)
            }
            _ => oauth_error(400, "unsupported_grant_type", "Unsupported grant_type"),
        }
    }

    fn client_ok(&self, id: &str, secret: &str) -> bool {
        id == self.config.client_id && secret == self.config.client_secret
    }

    fn issue(&mut self, client_id: &str) -> Reply {
        let now = self.now();
        prune(&mut self.tokens, now);
        prune(&mut self.refresh_tokens, now);
        let iat = Utc::now().timestamp();
        let ttl = self.config.token_ttl_secs;
        let session_state = uuid::Uuid::new_v4().to_string();
        let issuer = format!("{}/auth/realms/contabo", self.api_url);
        let access = jwt(json!({
            "exp": iat + ttl as i64,
            "iat": iat,
            "jti": uuid::Uuid::new_v4().to_string(),
            "iss": issuer,
            "aud": "account",
            "sub": self.sub,
            "typ": "Bearer",
            "azp": client_id,
            "session_state": session_state,
            "scope": "profile email",
            "email_verified": true,
            "preferred_username": self.config.username,
            "email": self.config.username,
            "tenantId": TENANT_ID,
            "customerId": CUSTOMER_ID,
            "realm_access": { "roles": ["offline_access", "uma_authorization", "default-roles-contabo"] },
        }));
        let refresh = jwt(json!({
            "exp": iat + REFRESH_TTL_SECS as i64,
            "iat": iat,
            "jti": uuid::Uuid::new_v4().to_string(),
            "iss": issuer,
            "aud": issuer,
            "sub": self.sub,
            "typ": "Refresh",
            "azp": client_id,
            "session_state": session_state,
            "scope": "profile email",
        }));
        self.tokens.insert(
            access.clone(),
            Issued {
                expires: now + Duration::from_secs(ttl),
            },
        );
        self.refresh_tokens.insert(
            refresh.clone(),
            Issued {
                expires: now + Duration::from_secs(REFRESH_TTL_SECS),
            },
        );
        Reply::json(
            200,
            json!({
                "access_token": access,
                "expires_in": ttl,
                "refresh_expires_in": REFRESH_TTL_SECS,
                "refresh_token": refresh,
                "token_type": "Bearer",
                "not-before-policy": 0,
                "session_state": session_state,
                "scope": "profile email",
            }),
        )
    }

    // -- instances ----------------------------------------------------------------------------

    fn list_instances(&mut self, ctx: &Ctx) -> Reply {
        let today = Utc::now().date_naive();
        let p = |k: &str| ctx.param(k).filter(|v| !v.is_empty());
        let items = self
            .instances
            .iter()
            .filter(|i| !i.gone(today))
            .filter(|i| p("name").is_none_or(|v| contains_ci(&i.name, v)))
            .filter(|i| p("displayName").is_none_or(|v| contains_ci(&i.display_name, v)))
            .filter(|i| p("dataCenter").is_none_or(|v| i.data_center.eq_ignore_ascii_case(v)))
            .filter(|i| p("region").is_none_or(|v| i.region.eq_ignore_ascii_case(v)))
            .filter(|i| p("instanceId").is_none_or(|v| v == i.id.to_string()))
            .filter(|i| p("instanceIds").is_none_or(|v| in_list(v, &i.id.to_string())))
            .filter(|i| p("status").is_none_or(|v| in_list(v, &i.status)))
            .filter(|i| p("productIds").is_none_or(|v| in_list(v, i.product.id)))
            .filter(|i| p("productTypes").is_none_or(|v| in_list(v, i.product.product_type)))
            .filter(|i| {
                p("search").is_none_or(|v| {
                    contains_ci(&i.name, v)
                        || contains_ci(&i.display_name, v)
                        || i.ips
                            .as_ref()
                            .is_some_and(|ips| ips.v4.contains(v) || contains_ci(&ips.v6, v))
                })
            })
            .map(Instance::to_json)
            .collect();
        paginate(ctx, items)
    }

    fn get_instance(&mut self, id: &str) -> Reply {
        match self.find_instance(id) {
            Ok(instance) => Reply::json(
                200,
                json!({
                    "data": [instance.to_json()],
                    "_links": { "self": format!("/v1/compute/instances/{}", instance.id) },
                }),
            ),
            Err(reply) => reply,
        }
    }

    fn create_instance(&mut self, ctx: &Ctx) -> Outcome {
        if matches!(self.create_faults.front(), Some(Fault::CreateFails500)) {
            self.create_faults.pop_front();
            return Reply::error(500, "Internal Server Error, retry or contact support").into();
        }
        let body = match object_body(ctx) {
            Ok(body) => body,
            Err(reply) => return reply.into(),
        };
        let mut problems = Vec::new();
        reject_unknown(
            &body,
            &[
                "imageId",
                "productId",
                "region",
                "sshKeys",
                "rootPassword",
                "userData",
                "license",
                "period",
                "displayName",
                "defaultUser",
                "addOns",
                "applicationId",
            ],
            &mut problems,
        );
        let image_id = opt_str(&body, "imageId", &mut problems).unwrap_or(UBUNTU_22_04.into());
        if !is_uuid(&image_id) {
            problems.push("imageId must be a UUID".into());
        }
        let product_id = opt_str(&body, "productId", &mut problems).unwrap_or("V92".into());
        if product_id.is_empty() {
            problems.push("productId must be longer than or equal to 1 characters".into());
        }
        let region = opt_str(&body, "region", &mut problems).unwrap_or("EU".into());
        if !REGIONS.contains(&region.as_str()) {
            problems.push(format!(
                "region must be one of the following values: {}",
                REGIONS.join(", ")
            ));
        }
        let period = match body.get("period") {
            None | Some(Value::Null) => 1,
            Some(v) => match v.as_u64() {
                Some(p @ (1 | 3 | 6 | 12)) => p as u32,
                _ => {
                    problems.push("period must be one of the following values: 1, 3, 6, 12".into());
                    1
                }
            },
        };
        let display_name = opt_str(&body, "displayName", &mut problems).unwrap_or_default();
        if display_name.chars().count() > 255 {
            problems.push("displayName must be shorter than or equal to 255 characters".into());
        }
        let default_user = opt_str(&body, "defaultUser", &mut problems).unwrap_or("admin".into());
        if !["root", "admin", "administrator"].contains(&default_user.as_str()) {
            problems.push(
                "defaultUser must be one of the following values: root, admin, administrator"
                    .into(),
            );
        }
        let user_data = opt_str(&body, "userData", &mut problems);
        let ssh_keys = opt_ids(&body, "sshKeys", &mut problems);
        let root_password = match body.get("rootPassword") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_i64() {
                Some(id) => Some(id),
                None => {
                    problems.push("rootPassword must be an integer number".into());
                    None
                }
            },
        };
        if !problems.is_empty() {
            return Reply::invalid(problems).into();
        }
        let Some(product) = PRODUCTS.iter().find(|p| p.id == product_id) else {
            return Reply::error(400, format!("Bad Request productId {product_id} is wrong"))
                .into();
        };
        if !IMAGES.iter().any(|i| i.0.eq_ignore_ascii_case(&image_id)) {
            return Reply::error(400, format!("Bad Request imageId {image_id} is wrong")).into();
        }
        if matches!(self.create_faults.front(), Some(Fault::SecretVanishes)) {
            self.create_faults.pop_front();
            for id in ssh_keys.iter().chain(root_password.iter()) {
                self.secrets.remove(id);
            }
        }
        if let Err(reply) = self.check_secrets(&ssh_keys, root_password) {
            return reply.into();
        }
        if self.instances.len() >= MAX_INSTANCES {
            return Reply::error(402, "Instance limit of the simulator reached").into();
        }

        let id = self.next_instance_id;
        self.next_instance_id += rand::random_range(1..1000);
        let now = self.now();
        let timer = match self.fates.pop_front() {
            Some(Fault::StuckProvisioning) => None,
            Some(Fault::ErrorStatus(message)) => Some(Timer::Provisioning {
                until: now + Duration::from_millis(self.config.provisioning_ms),
                error: Some(message),
            }),
            _ => Some(Timer::Provisioning {
                until: now + Duration::from_millis(self.config.provisioning_ms),
                error: None,
            }),
        };
        let (_, data_center, _, region_name, _) = DATA_CENTERS
            .iter()
            .find(|d| d.2 == region)
            .copied()
            .unwrap_or(DATA_CENTERS[0]);
        let mac_bytes: [u8; 3] = rand::random();
        let vhost_number = rand::random_range(10_000..20_000);
        let instance = Instance {
            id,
            name: format!("vmi{:07}", id % 10_000_000),
            display_name,
            product,
            region,
            data_center,
            region_name,
            image_id: image_id.to_ascii_lowercase(),
            ssh_keys,
            user_data,
            default_user,
            period,
            created: Utc::now(),
            cancel_date: None,
            status: "provisioning".into(),
            error_message: None,
            timer,
            ips: None,
            mac: format!(
                "00:50:56:{:02x}:{:02x}:{:02x}",
                mac_bytes[0], mac_bytes[1], mac_bytes[2]
            ),
            vhost_id: vhost_number - 3_775,
            vhost_number,
            generation: 0,
            snapshots: Vec::new(),
        };
        let created = json!({
            "tenantId": TENANT_ID,
            "customerId": CUSTOMER_ID,
            "instanceId": id,
            "createdDate": timestamp(instance.created),
            "imageId": instance.image_id,
            "productId": instance.product.id,
            "region": instance.region,
            "addOns": [],
            "osType": "Linux",
            "status": "provisioning",
            "sshKeys": instance.ssh_keys,
            "defaultUser": instance.default_user,
        });
        let changes = json!({ "new": instance.to_json() });
        self.instances.push(instance);
        self.audit(ctx, AuditKind::Instances, id, "CREATED", changes);
        if matches!(self.create_faults.front(), Some(Fault::CreateResponseLost)) {
            self.create_faults.pop_front();
            return Outcome::Drop;
        }
        Reply::json(
            201,
            json!({
                "data": [created],
                "_links": { "self": format!("/v1/compute/instances/{id}") },
            }),
        )
        .into()
    }

    /// A missing secret: 404, or the 500 of tf#17 in that mode.
    fn missing_secret(&self, id: i64) -> Reply {
        if self.config.missing_secret_500 {
            Reply::error(500, "Internal Server Error, retry or contact support")
        } else {
            Reply::not_found("Secret", id)
        }
    }

    fn check_secrets(&self, ssh_keys: &[i64], root_password: Option<i64>) -> Result<(), Reply> {
        for id in ssh_keys {
            match self.secrets.get(id) {
                None => return Err(self.missing_secret(*id)),
                Some(s) if s.kind != "ssh" => {
                    return Err(Reply::invalid(vec![format!(
                        "sshKeys must reference secrets of type ssh, secret {id} is of type {}",
                        s.kind
                    )]));
                }
                Some(_) => {}
            }
        }
        if let Some(id) = root_password {
            match self.secrets.get(&id) {
                None => return Err(self.missing_secret(id)),
                Some(s) if s.kind != "password" => {
                    return Err(Reply::invalid(vec![format!(
                        "rootPassword must reference a secret of type password, secret {id} is of type {}",
                        s.kind
                    )]));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn patch_instance(&mut self, ctx: &Ctx, id: &str) -> Reply {
        let body = match object_body(ctx) {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let mut problems = Vec::new();
        reject_unknown(&body, &["displayName"], &mut problems);
        let display_name = opt_str(&body, "displayName", &mut problems);
        if display_name
            .as_ref()
            .is_some_and(|d| d.chars().count() > 255)
        {
            problems.push("displayName must be shorter than or equal to 255 characters".into());
        }
        if !problems.is_empty() {
            return Reply::invalid(problems);
        }
        let instance = match self.find_instance(id) {
            Ok(instance) => instance,
            Err(reply) => return reply,
        };
        let mut changes = json!({});
        if let Some(name) = display_name {
            changes = json!({
                "prev": { "displayName": instance.display_name },
                "new": { "displayName": name },
            });
            instance.display_name = name;
        }
        let (iid, data) = (instance.id, instance.short_json());
        self.audit(ctx, AuditKind::Instances, iid, "UPDATED", changes);
        Reply::json(
            200,
            json!({ "data": [data], "_links": { "self": format!("/v1/compute/instances/{iid}") } }),
        )
    }

    fn reinstall(&mut self, ctx: &Ctx, id: &str) -> Reply {
        let body = match object_body(ctx) {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let mut problems = Vec::new();
        reject_unknown(
            &body,
            &[
                "imageId",
                "sshKeys",
                "rootPassword",
                "userData",
                "defaultUser",
                "applicationId",
            ],
            &mut problems,
        );
        let image_id = opt_str(&body, "imageId", &mut problems);
        if !image_id.as_deref().is_some_and(is_uuid) {
            problems.push("imageId must be a UUID".into());
        }
        let ssh_keys = opt_ids(&body, "sshKeys", &mut problems);
        let user_data = opt_str(&body, "userData", &mut problems);
        let default_user = opt_str(&body, "defaultUser", &mut problems);
        let root_password = body.get("rootPassword").and_then(Value::as_i64);
        if !problems.is_empty() {
            return Reply::invalid(problems);
        }
        let image_id = image_id.unwrap_or_default().to_ascii_lowercase();
        if !IMAGES.iter().any(|i| i.0 == image_id) {
            return Reply::error(400, format!("Bad Request imageId {image_id} is wrong"));
        }
        if let Err(reply) = self.check_secrets(&ssh_keys, root_password) {
            return reply;
        }
        let installing = Duration::from_millis(self.config.installing_ms);
        let addressing = self.config.clone();
        let now = self.now();
        let instance = match self.find_instance(id) {
            Ok(instance) => instance,
            Err(reply) => return reply,
        };
        if instance.status == "provisioning" {
            return Reply::error(
                409,
                format!("Instance {} is still provisioning", instance.id),
            );
        }
        let changes = json!({
            "prev": { "imageId": instance.image_id, "status": instance.status },
            "new": { "imageId": image_id, "status": "installing" },
        });
        instance.image_id = image_id;
        instance.ssh_keys = ssh_keys;
        instance.user_data = user_data;
        if let Some(user) = default_user {
            instance.default_user = user;
        }
        instance.status = "installing".into();
        instance.error_message = None;
        instance.generation += 1;
        instance.assign_ips(&addressing.ipv4_of(instance.id));
        instance.timer = Some(Timer::Installing {
            until: now + installing,
        });
        let (iid, data) = (instance.id, instance.short_json());
        self.audit(ctx, AuditKind::Instances, iid, "UPDATED", changes);
        Reply::json(
            200,
            json!({ "data": [data], "_links": { "self": format!("/v1/compute/instances/{iid}") } }),
        )
    }

    fn cancel(&mut self, ctx: &Ctx, id: &str) -> Reply {
        let body = match object_body(ctx) {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let requested = match body.get("cancelDate") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                let date = DateTime::parse_from_rfc3339(s)
                    .map(|d| d.date_naive())
                    .or_else(|_| NaiveDate::parse_from_str(s, "%Y-%m-%d"));
                match date {
                    Ok(d) => Some(d),
                    Err(_) => {
                        return Reply::invalid(vec![
                            "cancelDate must be a valid ISO 8601 date string".into(),
                        ]);
                    }
                }
            }
            Some(_) => {
                return Reply::invalid(vec![
                    "cancelDate must be a valid ISO 8601 date string".into(),
                ]);
            }
        };
        let instance = match self.find_instance(id) {
            Ok(instance) => instance,
            Err(reply) => return reply,
        };
        if instance.cancel_date.is_some() {
            return Reply::error(
                422,
                format!("Instance {} is already cancelled", instance.id),
            );
        }
        let end_of_term = instance
            .created
            .date_naive()
            .checked_add_months(Months::new(instance.period))
            .unwrap_or(instance.created.date_naive());
        let date = requested.unwrap_or(end_of_term);
        instance.cancel_date = Some(date);
        let iid = instance.id;
        self.cancels.push(iid);
        self.audit(
            ctx,
            AuditKind::Instances,
            iid,
            "UPDATED",
            json!({ "prev": { "cancelDate": null }, "new": { "cancelDate": date.to_string() } }),
        );
        Reply::json(
            201,
            json!({
                "data": [{
                    "tenantId": TENANT_ID,
                    "customerId": CUSTOMER_ID,
                    "instanceId": iid,
                    "cancelDate": date.to_string(),
                }],
                "_links": { "self": format!("/v1/compute/instances/{iid}") },
            }),
        )
    }

    fn action(&mut self, ctx: &Ctx, id: &str, action: &str) -> Reply {
        let target = match action {
            "start" | "restart" => Some("running"),
            "stop" | "shutdown" => Some("stopped"),
            "rescue" => Some("rescue"),
            "resetPassword" => None,
            _ => return cannot(ctx),
        };
        if matches!(action, "rescue" | "resetPassword")
            && let Err(reply) = object_body(ctx)
        {
            return reply;
        }
        let instance = match self.find_instance(id) {
            Ok(instance) => instance,
            Err(reply) => return reply,
        };
        if !instance.installed() {
            return Reply::error(
                409,
                format!(
                    "Action {action} is not possible while instance {} is {}",
                    instance.id, instance.status
                ),
            );
        }
        let prev = instance.status.clone();
        if let Some(status) = target {
            instance.status = status.into();
        }
        let iid = instance.id;
        self.actions.push((iid, action.to_string()));
        self.audit(
            ctx,
            AuditKind::Actions,
            iid,
            "CREATED",
            json!({ "prev": { "status": prev }, "new": { "action": action } }),
        );
        Reply::json(
            201,
            json!({
                "data": [{
                    "tenantId": TENANT_ID,
                    "customerId": CUSTOMER_ID,
                    "instanceId": iid,
                    "action": action,
                }],
                "_links": { "self": format!("/v1/compute/instances/{iid}/actions/{action}") },
            }),
        )
    }

    // -- audits -------------------------------------------------------------------------------

    fn audit(
        &mut self,
        ctx: &Ctx,
        kind: AuditKind,
        instance_id: i64,
        action: &str,
        changes: Value,
    ) {
        let row = json!({
            "id": self.next_audit_id,
            "action": action,
            "timestamp": timestamp(Utc::now()),
            "tenantId": TENANT_ID,
            "customerId": CUSTOMER_ID,
            "changedBy": self.sub,
            "username": self.config.username,
            "requestId": ctx.request_id,
            "traceId": ctx.trace_id,
            "instanceId": instance_id,
            "changes": changes,
        });
        self.next_audit_id += 1;
        let rows = match kind {
            AuditKind::Instances => &mut self.audits,
            AuditKind::Actions => &mut self.action_audits,
        };
        if rows.len() >= MAX_AUDITS {
            rows.pop_front();
        }
        rows.push_back(row);
    }

    fn list_audits(&self, ctx: &Ctx, kind: AuditKind) -> Reply {
        let rows = match kind {
            AuditKind::Instances => &self.audits,
            AuditKind::Actions => &self.action_audits,
        };
        let p = |k: &str| ctx.param(k).filter(|v| !v.is_empty());
        let field = |row: &Value, k: &str| row[k].as_str().unwrap_or("").to_string();
        let items = rows
            .iter()
            .filter(|r| {
                p("instanceId").is_none_or(|v| v.parse::<i64>().ok() == r["instanceId"].as_i64())
            })
            .filter(|r| {
                p("requestId").is_none_or(|v| field(r, "requestId").eq_ignore_ascii_case(v))
            })
            .filter(|r| p("changedBy").is_none_or(|v| field(r, "changedBy") == v))
            .cloned()
            .collect();
        paginate(ctx, items)
    }

    // -- snapshots ----------------------------------------------------------------------------

    fn list_snapshots(&mut self, ctx: &Ctx, id: &str) -> Reply {
        let instance = match self.find_instance(id) {
            Ok(instance) => instance,
            Err(reply) => return reply,
        };
        let name = ctx.param("name").filter(|v| !v.is_empty());
        let items = instance
            .snapshots
            .iter()
            .filter(|s| name.is_none_or(|n| contains_ci(&s.name, n)))
            .map(|s| instance.snapshot_json(s))
            .collect();
        paginate(ctx, items)
    }

    fn create_snapshot(&mut self, ctx: &Ctx, id: &str) -> Reply {
        let body = match object_body(ctx) {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let mut problems = Vec::new();
        reject_unknown(&body, &["name", "description"], &mut problems);
        let name = opt_str(&body, "name", &mut problems).unwrap_or_default();
        validate_snapshot_name(&name, &mut problems);
        let description = opt_str(&body, "description", &mut problems);
        if description
            .as_ref()
            .is_some_and(|d| d.is_empty() || d.chars().count() > 255)
        {
            problems.push("description must be between 1 and 255 characters".into());
        }
        if !problems.is_empty() {
            return Reply::invalid(problems);
        }
        let slots = self.config.snapshot_slots;
        let epoch = Utc::now().timestamp().max(self.last_snapshot_epoch + 1);
        let instance = match self.find_instance(id) {
            Ok(instance) => instance,
            Err(reply) => return reply,
        };
        if !instance.installed() {
            return Reply::error(
                409,
                format!(
                    "Snapshots are not possible while instance {} is {}",
                    instance.id, instance.status
                ),
            );
        }
        if instance.snapshots.len() >= slots {
            return Reply::error(
                402,
                format!("Total snapshots exceed the total max limit of {slots} snapshots"),
            );
        }
        let snapshot = Snapshot {
            id: format!("snap{epoch}"),
            name,
            description: description.unwrap_or_default(),
            created: Utc::now(),
        };
        let data = instance.snapshot_json(&snapshot);
        let link = format!(
            "/v1/compute/instances/{}/snapshots/{}",
            instance.id, snapshot.id
        );
        instance.snapshots.push(snapshot);
        self.last_snapshot_epoch = epoch;
        Reply::json(201, json!({ "data": [data], "_links": { "self": link } }))
    }

    fn get_snapshot(&mut self, id: &str, sid: &str) -> Reply {
        let instance = match self.find_instance(id) {
            Ok(instance) => instance,
            Err(reply) => return reply,
        };
        match instance.snapshots.iter().find(|s| s.id == sid) {
            Some(s) => Reply::json(
                200,
                json!({
                    "data": [instance.snapshot_json(s)],
                    "_links": { "self": format!("/v1/compute/instances/{}/snapshots/{sid}", instance.id) },
                }),
            ),
            None => Reply::not_found("Snapshot", sid),
        }
    }

    fn patch_snapshot(&mut self, ctx: &Ctx, id: &str, sid: &str) -> Reply {
        let body = match object_body(ctx) {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let mut problems = Vec::new();
        reject_unknown(&body, &["name", "description"], &mut problems);
        let name = opt_str(&body, "name", &mut problems);
        if let Some(name) = &name {
            validate_snapshot_name(name, &mut problems);
        }
        let description = opt_str(&body, "description", &mut problems);
        if !problems.is_empty() {
            return Reply::invalid(problems);
        }
        let instance = match self.find_instance(id) {
            Ok(instance) => instance,
            Err(reply) => return reply,
        };
        let iid = instance.id;
        let Some(index) = instance.snapshots.iter().position(|s| s.id == sid) else {
            return Reply::not_found("Snapshot", sid);
        };
        let snapshot = &mut instance.snapshots[index];
        if let Some(name) = name {
            snapshot.name = name;
        }
        if let Some(description) = description {
            snapshot.description = description;
        }
        let data = instance.snapshot_json(&instance.snapshots[index]);
        Reply::json(
            200,
            json!({
                "data": [data],
                "_links": { "self": format!("/v1/compute/instances/{iid}/snapshots/{sid}") },
            }),
        )
    }

    fn delete_snapshot(&mut self, id: &str, sid: &str) -> Reply {
        let instance = match self.find_instance(id) {
            Ok(instance) => instance,
            Err(reply) => return reply,
        };
        let before = instance.snapshots.len();
        instance.snapshots.retain(|s| s.id != sid);
        if instance.snapshots.len() == before {
            return Reply::not_found("Snapshot", sid);
        }
        Reply {
            status: 204,
            body: ReplyBody::Empty,
        }
    }

    fn rollback(&mut self, ctx: &Ctx, id: &str, sid: &str) -> Reply {
        if let Err(reply) = object_body(ctx) {
            return reply;
        }
        let instance = match self.find_instance(id) {
            Ok(instance) => instance,
            Err(reply) => return reply,
        };
        let Some(index) = instance.snapshots.iter().position(|s| s.id == sid) else {
            return Reply::not_found("Snapshot", sid);
        };
        // Rolling back to a snapshot deletes every newer one.
        instance.snapshots.truncate(index + 1);
        Reply::json(
            200,
            json!({ "_links": { "self": format!("/v1/compute/instances/{}/snapshots/{sid}", instance.id) } }),
        )
    }

    // -- secrets ------------------------------------------------------------------------------

    fn list_secrets(&self, ctx: &Ctx) -> Reply {
        let name = ctx.param("name").filter(|v| !v.is_empty());
        let kind = ctx.param("type").filter(|v| !v.is_empty());
        if kind.is_some_and(|k| k != "ssh" && k != "password") {
            return Reply::invalid(vec![
                "type must be one of the following values: password, ssh".into(),
            ]);
        }
        let items = self
            .secrets
            .values()
            .filter(|s| name.is_none_or(|n| contains_ci(&s.name, n)))
            .filter(|s| kind.is_none_or(|k| s.kind == k))
            .map(|s| s.to_json(false))
            .collect();
        paginate(ctx, items)
    }

    fn create_secret(&mut self, ctx: &Ctx) -> Reply {
        let body = match object_body(ctx) {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let mut problems = Vec::new();
        reject_unknown(&body, &["name", "value", "type"], &mut problems);
        let name = opt_str(&body, "name", &mut problems).unwrap_or_default();
        let value = opt_str(&body, "value", &mut problems).unwrap_or_default();
        let kind = opt_str(&body, "type", &mut problems).unwrap_or_default();
        validate_secret_name(&name, &mut problems);
        validate_secret_value(&value, &kind, &mut problems);
        if kind != "ssh" && kind != "password" {
            problems.push("type must be one of the following values: password, ssh".into());
        }
        if !problems.is_empty() {
            return Reply::invalid(problems);
        }
        if self.secrets.len() >= MAX_SECRETS {
            return Reply::error(402, "Secret limit of the simulator reached");
        }
        let id = self.next_secret_id;
        self.next_secret_id += 1;
        let now = Utc::now();
        let secret = Secret {
            id,
            name,
            kind,
            value,
            created: now,
            updated: now,
        };
        let data = secret.to_json(true);
        self.secrets.insert(id, secret);
        Reply::json(
            201,
            json!({ "data": [data], "_links": { "self": format!("/v1/secrets/{id}") } }),
        )
    }

    fn secret_id(raw: &str) -> Result<i64, Reply> {
        raw.parse::<i64>()
            .map_err(|_| Reply::error(400, "Validation failed (numeric string is expected)"))
    }

    fn get_secret(&self, raw: &str) -> Reply {
        let id = match Self::secret_id(raw) {
            Ok(id) => id,
            Err(reply) => return reply,
        };
        match self.secrets.get(&id) {
            Some(s) => Reply::json(
                200,
                json!({ "data": [s.to_json(true)], "_links": { "self": format!("/v1/secrets/{id}") } }),
            ),
            None => Reply::not_found("Secret", id),
        }
    }

    fn patch_secret(&mut self, ctx: &Ctx, raw: &str) -> Reply {
        let id = match Self::secret_id(raw) {
            Ok(id) => id,
            Err(reply) => return reply,
        };
        let body = match object_body(ctx) {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let mut problems = Vec::new();
        reject_unknown(&body, &["name", "value"], &mut problems);
        let name = opt_str(&body, "name", &mut problems);
        let value = opt_str(&body, "value", &mut problems);
        let Some(secret) = self.secrets.get_mut(&id) else {
            return Reply::not_found("Secret", id);
        };
        if let Some(name) = &name {
            validate_secret_name(name, &mut problems);
        }
        if let Some(value) = &value {
            validate_secret_value(value, &secret.kind, &mut problems);
        }
        if !problems.is_empty() {
            return Reply::invalid(problems);
        }
        if let Some(name) = name {
            secret.name = name;
        }
        if let Some(value) = value {
            secret.value = value;
        }
        secret.updated = Utc::now();
        Reply::json(
            200,
            json!({ "_links": { "self": format!("/v1/secrets/{id}") } }),
        )
    }

    fn delete_secret(&mut self, raw: &str) -> Reply {
        let id = match Self::secret_id(raw) {
            Ok(id) => id,
            Err(reply) => return reply,
        };
        match self.secrets.remove(&id) {
            Some(_) => Reply {
                status: 204,
                body: ReplyBody::Empty,
            },
            None => Reply::not_found("Secret", id),
        }
    }
}

#[derive(Clone, Copy)]
enum AuditKind {
    Instances,
    Actions,
}

fn validate_snapshot_name(name: &str, problems: &mut Vec<String>) {
    let len = name.chars().count();
    if !(1..=30).contains(&len) {
        problems.push("name must be between 1 and 30 characters".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '-')
    {
        problems.push("name may only contain letters, numbers, spaces and dashes".into());
    }
}

fn validate_secret_name(name: &str, problems: &mut Vec<String>) {
    let len = name.chars().count();
    if len < 1 {
        problems.push("name must be longer than or equal to 1 characters".into());
    }
    if len > 255 {
        problems.push("name must be shorter than or equal to 255 characters".into());
    }
}

fn validate_secret_value(value: &str, kind: &str, problems: &mut Vec<String>) {
    let len = value.chars().count();
    if len < 8 {
        problems.push("value must be longer than or equal to 8 characters".into());
    }
    if len > 500 {
        problems.push("value must be shorter than or equal to 500 characters".into());
    }
    if kind == "password" && !password_ok(value) {
        problems.push(
            "value must contain at least one upper and one lower case character and either one \
             number with two special characters or at least three numbers with one special \
             character (!@#$^&*?_~)"
                .into(),
        );
    }
}

fn list_images(ctx: &Ctx) -> Reply {
    let p = |k: &str| ctx.param(k).filter(|v| !v.is_empty());
    if let Some(v) = p("standardImage")
        && v != "true"
        && v != "false"
    {
        return Reply::invalid(vec!["standardImage must be a boolean value".into()]);
    }
    let items = IMAGES
        .iter()
        .filter(|_| p("standardImage").is_none_or(|v| v == "true"))
        .filter(|i| p("name").is_none_or(|v| contains_ci(i.1, v)))
        .filter(|i| p("search").is_none_or(|v| contains_ci(i.1, v) || contains_ci("Linux", v)))
        .map(image_json)
        .collect();
    paginate(ctx, items)
}

fn get_image(id: &str) -> Reply {
    match IMAGES.iter().find(|i| i.0.eq_ignore_ascii_case(id)) {
        Some(image) => Reply::json(
            200,
            json!({
                "data": [image_json(image)],
                "_links": { "self": format!("/v1/compute/images/{}", image.0) },
            }),
        ),
        None => Reply::not_found("Image", id),
    }
}

fn image_json(image: &(&str, &str, &str, &str, u64)) -> Value {
    let (id, name, description, version, size) = *image;
    json!({
        "imageId": id,
        "tenantId": TENANT_ID,
        "customerId": CUSTOMER_ID,
        "name": name,
        "description": description,
        "url": "",
        "sizeMb": size,
        "uploadedSizeMb": 0,
        "osType": "Linux",
        "version": version,
        "format": "qcow2",
        "status": "downloaded",
        "errorMessage": "",
        "standardImage": true,
        "creationDate": "2024-04-25T09:12:44.000Z",
        "lastModifiedDate": "2025-11-03T14:20:05.000Z",
        "tags": [],
    })
}

fn list_data_centers(ctx: &Ctx) -> Reply {
    let p = |k: &str| ctx.param(k).filter(|v| !v.is_empty());
    let mut table: Vec<_> = DATA_CENTERS.to_vec();
    table.sort_by_key(|d| d.0);
    let items = table
        .iter()
        .filter(|d| p("slug").is_none_or(|v| d.0.eq_ignore_ascii_case(v)))
        .filter(|d| p("name").is_none_or(|v| d.1.eq_ignore_ascii_case(v)))
        .filter(|d| p("regionSlug").is_none_or(|v| d.2.eq_ignore_ascii_case(v)))
        .filter(|d| p("regionName").is_none_or(|v| d.3.eq_ignore_ascii_case(v)))
        .map(|&(slug, name, region_slug, region_name, s3)| {
            let mut capabilities = vec!["VPS", "VDS", "Private-Networking"];
            if region_slug == "EU" || region_slug.starts_with("US") || region_slug == "SIN" {
                capabilities.push("Object-Storage");
            }
            json!({
                "name": name,
                "slug": slug,
                "capabilities": capabilities,
                "s3Url": s3,
                "regionName": region_name,
                "regionSlug": region_slug,
                "tenantId": TENANT_ID,
                "customerId": CUSTOMER_ID,
            })
        })
        .collect();
    paginate(ctx, items)
}

/// The NestJS answer for an unknown route.
fn cannot(ctx: &Ctx) -> Reply {
    Reply::json(
        404,
        json!({
            "statusCode": 404,
            "message": format!("Cannot {} {}", ctx.method, ctx.path),
            "error": "Not Found",
        }),
    )
}

/// The list envelope: `data`, `_links` (relative, `""` when absent), `_pagination`.
/// `orderBy=field:ASC|DESC`, repeatable (first key first); fields are top-level keys.
fn order_by(ctx: &Ctx, items: &mut [Value], problems: &mut Vec<String>) {
    let mut keys = Vec::new();
    for (k, v) in &ctx.query {
        if k != "orderBy" && k != "orderBy[]" {
            continue;
        }
        match v.split_once(':') {
            Some((field, dir)) if !field.is_empty() && matches!(dir, "ASC" | "DESC") => {
                keys.push((field.to_string(), dir == "DESC"));
            }
            _ => problems.push(format!(
                "orderBy must be in the format field:ASC or field:DESC, got {v}"
            )),
        }
    }
    let rank = |v: &Value| match v {
        Value::Null => 0,
        Value::Bool(_) => 1,
        Value::Number(_) => 2,
        Value::String(_) => 3,
        _ => 4,
    };
    items.sort_by(|a, b| {
        for (field, desc) in &keys {
            let (x, y) = (&a[field.as_str()], &b[field.as_str()]);
            let o = match (x, y) {
                (Value::Number(m), Value::Number(n)) => m
                    .as_f64()
                    .partial_cmp(&n.as_f64())
                    .unwrap_or(std::cmp::Ordering::Equal),
                (Value::String(m), Value::String(n)) => m.cmp(n),
                _ => rank(x).cmp(&rank(y)),
            };
            let o = if *desc { o.reverse() } else { o };
            if o.is_ne() {
                return o;
            }
        }
        std::cmp::Ordering::Equal
    });
}

fn paginate(ctx: &Ctx, mut items: Vec<Value>) -> Reply {
    let mut problems = Vec::new();
    order_by(ctx, &mut items, &mut problems);
    let mut number = |key: &str, default: usize| match ctx.param(key) {
        None => default,
        Some(raw) => match raw.parse::<usize>() {
            Ok(n) if n >= 1 => n,
            Ok(_) => {
                problems.push(format!("{key} must not be less than 1"));
                default
            }
            Err(_) => {
                problems.push(format!("{key} must be an integer number"));
                default
            }
        },
    };
    let page = number("page", 1);
    let size = number("size", DEFAULT_PAGE_SIZE);
    if !problems.is_empty() {
        return Reply::invalid(problems);
    }
    let total = items.len();
    let pages = total.div_ceil(size);
    let data: Vec<Value> = items
        .into_iter()
        .skip((page - 1).saturating_mul(size))
        .take(size)
        .collect();
    let filters: Vec<(String, String)> = ctx
        .query
        .iter()
        .filter(|(k, _)| k != "page" && k != "size")
        .cloned()
        .collect();
    let link = |page: Option<usize>| {
        let mut pairs = filters.clone();
        if let Some(page) = page {
            pairs.push(("page".into(), page.to_string()));
        }
        pairs.push(("size".into(), size.to_string()));
        let query = serde_urlencoded::to_string(&pairs).unwrap_or_default();
        format!("{}?{query}", ctx.path)
    };
    let self_link = if ctx.raw_query.is_empty() {
        ctx.path.clone()
    } else {
        format!("{}?{}", ctx.path, ctx.raw_query)
    };
    Reply::json(
        200,
        json!({
            "data": data,
            "_links": {
                "first": link(None),
                "previous": if page > 1 { link(Some((page - 1).min(pages.max(1)))) } else { String::new() },
                "next": if page < pages { link(Some(page + 1)) } else { String::new() },
                "last": link(Some(pages.max(1))),
                "self": self_link,
            },
            "_pagination": {
                "size": size,
                "totalElements": total,
                "totalPages": pages,
                "page": page,
            },
        }),
    )
}

fn oauth_error(status: u16, error: &str, description: &str) -> Reply {
    Reply::json(
        status,
        json!({ "error": error, "error_description": description }),
    )
}

fn invalid_client() -> Reply {
    oauth_error(
        401,
        "invalid_client",
        "Invalid client or Invalid client credentials",
    )
}

/// Client credentials from an HTTP Basic header (what Go's oauth2 may send).
fn basic_credentials(ctx: &Ctx) -> (Option<String>, Option<String>) {
    let decoded = ctx
        .header("authorization")
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok());
    match decoded.as_deref().and_then(|d| d.split_once(':')) {
        Some((id, secret)) => (Some(id.to_string()), Some(secret.to_string())),
        None => (None, None),
    }
}

/// A JWT-looking token: real header and payload, random bytes for an RS256-sized signature.
fn jwt(payload: Value) -> String {
    let header = json!({ "alg": "RS256", "typ": "JWT", "kid": "sim-signing-key" });
    let mut signature = [0u8; 256];
    rand::fill(&mut signature[..]);
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.to_string().as_bytes()),
        b64(&signature)
    )
}

fn prune(tokens: &mut HashMap<String, Issued>, now: Instant) {
    if tokens.len() < MAX_TOKENS {
        return;
    }
    tokens.retain(|_, t| t.expires > now);
    while tokens.len() >= MAX_TOKENS {
        let Some(key) = tokens.keys().next().cloned() else {
            break;
        };
        tokens.remove(&key);
    }
}

/// Point a server's configuration at this simulator (and the fake VPS on `ssh_port`), with fast
/// retries: the Contabo set-up every Contabo test starts from.
pub fn use_simulator(
    c: &mut devpocket::config::Config,
    sim: &ContaboSim,
    config: &SimConfig,
    ssh_port: u16,
) {
    c.provider.kind = devpocket::config::ProviderKind::Contabo;
    c.contabo.api_url = sim.api_url.clone();
    c.contabo.auth_url = sim.auth_url.clone();
    c.contabo.client_id = config.client_id.clone();
    c.contabo.client_secret = devpocket::config::Secret::new(config.client_secret.clone());
    c.contabo.username = config.username.clone();
    c.contabo.password = devpocket::config::Secret::new(config.password.clone());
    c.contabo.ssh_port = ssh_port;
    c.contabo.retry_base_ms = 5;
}
