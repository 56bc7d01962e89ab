//! This process as a node of a cluster: several `devpocket serve` processes on one PostgreSQL
//! database (on SQLite there is only ever one). A node registers in the nodes table on start,
//! heartbeats every `cluster.heartbeat_seconds`, and removes its row on a graceful shutdown; a
//! node silent for `cluster.dead_after_seconds` is dead.
//!
//! Joining is refused, with a message that says what to fix, when the node's keys share no key
//! with a live node's (compared by fingerprint, see [`crate::secrets::fingerprint`]), or when the
//! local provider would end up in a cluster (it is single-node: workspaces, accounts and its SSH
//! server live on one host).
//!
//! A node's id is stable per data directory (`<data_dir>/node.id`), so a node that crashed and
//! restarts replaces its own leftover row instead of meeting itself as a live stranger. The file
//! is locked (`flock`) for as long as the process serves: a second process on the same data
//! directory refuses to start.

pub mod leases;
pub mod signals;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use anyhow::{Context, bail};
use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::app::NodeKeys;
use crate::clock::{SharedClock, from_db, to_db};
use crate::config::{Config, ProviderKind};
use crate::store::Db;
use crate::store::nodes::{self, NodeRow};

/// File in the data directory holding this node's id (and locked while it serves).
pub const NODE_ID_FILE: &str = "node.id";
/// Rows of dead nodes are deleted this long after their last heartbeat: long enough for ops to
/// see what died, short enough that the table stays a handful of rows.
pub const DEAD_NODE_RETENTION: Duration = Duration::hours(24);

/// This node: its id, its row, and the heartbeat that keeps the row alive.
pub struct Node {
    pub id: String,
    row: NodeRow,
    db: Db,
    clock: SharedClock,
    dead_after: Duration,
    /// Clock time (Unix seconds) of the last heartbeat the store took.
    last_heartbeat: Arc<AtomicI64>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<()>>>,
    /// The locked files; released by [`Node::leave`] (or when the node is dropped).
    claim: Mutex<Option<Claim>>,
    /// This node's leases and signals (see [`leases`]).
    membership: Arc<leases::Membership>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.id).finish()
    }
}

/// One node as ops see it (`GET /api/v1/admin/actors`, `nodes`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeView {
    pub id: String,
    pub address: String,
    pub provider: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    /// Seconds since the last heartbeat, by this node's clock.
    pub heartbeat_age_seconds: i64,
    /// Whether the heartbeat is within `cluster.dead_after_seconds`.
    pub alive: bool,
    pub draining: bool,
    /// Whether this is the node that answered.
    pub this_node: bool,
    /// Live environments whose lease the node holds.
    pub environments_owned: i64,
}

/// This node's name for humans: `cluster.address`, or `<hostname>/<addr>`.
pub fn default_address(config: &Config, addr: std::net::SocketAddr) -> String {
    if !config.cluster.address.is_empty() {
        return config.cluster.address.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    if host.is_empty() {
        addr.to_string()
    } else {
        format!("{host}/{addr}")
    }
}

/// The files this process holds locked while it serves: its data directory's `node.id`, and for
/// a SQLite store the lock file next to the database. Released when dropped.
#[derive(Debug)]
pub struct Claim {
    pub id: String,
    _id_file: File,
    _store_lock: Option<File>,
}

/// Take this process's claims before the store is opened (or migrated): the SQLite file (a
/// second process on it refuses to start: SQLite is single-node) and the data directory.
pub fn claim(config: &Config) -> anyhow::Result<Claim> {
    let store_lock = match crate::store::DbUrl::from_config(
        config.database.url.expose(),
        &config.server.data_dir,
    ) {
        Some(crate::store::DbUrl::Sqlite(path)) => Some(lock_sqlite(&path)?),
        _ => None,
    };
    let (id, id_file) = claim_id(&config.server.data_dir)?;
    Ok(Claim {
        id,
        _id_file: id_file,
        _store_lock: store_lock,
    })
}

/// How long a claim waits for a lock its previous holder is releasing: a service manager's
/// restart may start the new process while the old one is still exiting, and a child forked by
/// the old one holds its descriptors until it execs (they are close-on-exec).
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Take `file`'s exclusive lock, waiting up to `wait` for a holder that is letting go (polled
/// every 50 ms; this runs once, at start).
fn lock_within(file: &File, wait: std::time::Duration) -> Result<(), std::fs::TryLockError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match file.try_lock() {
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Open `path` (mode 0600, created if missing) and take its exclusive lock (see
/// [`lock_within`]); `held_by` says who holds it when another process does, and what to do.
fn open_locked(path: &Path, held_by: impl FnOnce() -> String) -> anyhow::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    match lock_within(&file, RELEASE_WAIT) {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!("{}", held_by()),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Lock `<database>.lock` next to a SQLite database, or say which process to stop.
pub fn lock_sqlite(db: &Path) -> anyhow::Result<File> {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let path = std::path::PathBuf::from(name);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    open_locked(&path, || {
        format!(
            "another devpocket process is serving from the SQLite database {} (it holds {}); SQLite is single-node: stop the other process, or move to PostgreSQL (devpocket migrate-store) to run several nodes",
            db.display(),
            path.display()
        )
    })
}

/// Read (or make) this node's id in `data_dir` and lock the file, so that no other process
/// serves from the same data directory.
fn claim_id(data_dir: &Path) -> anyhow::Result<(String, File)> {
    let path = data_dir.join(NODE_ID_FILE);
    let mut file = open_locked(&path, || {
        format!(
            "another devpocket process is serving from the data directory {} (it holds {}); stop it, or give this process a server.data_dir of its own",
            data_dir.display(),
            path.display()
        )
    })?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let id = text.trim();
    if uuid::Uuid::parse_str(id).is_ok() {
        return Ok((id.to_string(), file));
    }
    let id = uuid::Uuid::new_v4().to_string();
    file.set_len(0)?;
    file.rewind()?;
    file.write_all(id.as_bytes())?;
    file.sync_all()?;
    Ok((id, file))
}

/// What a joining node brings, for [`admit`].
#[derive(Debug, Clone)]
pub struct Joining<'a> {
    pub provider: ProviderKind,
    pub jwt_keys: &'a [String],
    pub seal_keys: &'a [String],
}

/// Whether a node may join the `live` nodes (others than itself): the refusal says why and what
/// to change.
pub fn admit(me: &Joining<'_>, live: &[NodeRow]) -> Result<(), String> {
    let Some(first) = live.first() else {
        return Ok(());
    };
    if me.provider == ProviderKind::Local {
        return Err(format!(
            "provider.kind = \"local\" is single-node (workspaces, accounts and its SSH server live on this host), but node {} ({}) is alive on this database; stop it, or run a cluster with provider.kind = \"contabo\"",
            first.id, first.address
        ));
    }
    if let Some(local) = live
        .iter()
        .find(|n| n.provider == ProviderKind::Local.as_str())
    {
        return Err(format!(
            "node {} ({}) on this database runs the local provider, which is single-node; no other node may join it",
            local.id, local.address
        ));
    }
    for node in live {
        let checks = [
            (
                "access-token keys (auth.secret_key, auth.previous_secret_keys)",
                me.jwt_keys,
                node.jwt_fingerprints().collect::<Vec<_>>(),
            ),
            (
                "sealing keys (secrets.seal_key, secrets.previous_seal_keys)",
                me.seal_keys,
                node.seal_fingerprints().collect::<Vec<_>>(),
            ),
        ];
        for (what, mine, theirs) in checks {
            if !mine.iter().any(|m| theirs.contains(&m.as_str())) {
                return Err(format!(
                    "this node's {what} share no key with live node {} ({}): every node of a cluster must be configured with the cluster's keys (key ids here: {}; there: {})",
                    node.id,
                    node.address,
                    short_ids(mine.iter().map(String::as_str)),
                    short_ids(theirs.iter().copied()),
                ));
            }
        }
    }
    Ok(())
}

/// Key ids (see [`crate::secrets::key_id`]) of fingerprints, for messages.
fn short_ids<'a>(fingerprints: impl Iterator<Item = &'a str>) -> String {
    let ids: Vec<&str> = fingerprints.map(|f| &f[..f.len().min(16)]).collect();
    ids.join(", ")
}

/// Warnings about live nodes whose current key this node does not accept (their tokens or sealed
/// values would not open here): expected for a moment in a rolling rotation, a mistake otherwise.
fn rotation_warnings(me: &Joining<'_>, live: &[NodeRow]) {
    for node in live {
        let current_jwt = node.jwt_fingerprints().next();
        let current_seal = node.seal_fingerprints().next();
        if current_jwt.is_some_and(|c| !me.jwt_keys.iter().any(|m| m == c)) {
            tracing::warn!(node = %node.id, address = %node.address, "this node does not accept the access-token key another live node signs with; add it to auth.previous_secret_keys");
        }
        if current_seal.is_some_and(|c| !me.seal_keys.iter().any(|m| m == c)) {
            tracing::warn!(node = %node.id, address = %node.address, "this node cannot open what another live node seals; add its key to secrets.previous_seal_keys");
        }
    }
}

impl Node {
    /// Check that this node (its [`claim`]) may join the live nodes, register it and start its
    /// heartbeat. `address` is the node's name for humans.
    pub async fn join(
        config: &Config,
        claim: Claim,
        address: String,
        db: &Db,
        keys: &NodeKeys,
        clock: SharedClock,
    ) -> anyhow::Result<Arc<Self>> {
        let id = claim.id.clone();
        let now = to_db(clock.now());
        let dead_after = Duration::seconds(config.cluster.dead_after_seconds as i64);
        let jwt_keys = keys.jwt.fingerprints();
        let seal_keys = keys.seal.fingerprints();
        let row = NodeRow {
            id: id.clone(),
            address,
            provider: config.provider.kind.as_str().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: now,
            heartbeat_at: now,
            draining: false,
            jwt_keys: jwt_keys.join(" "),
            seal_keys: seal_keys.join(" "),
        };
        let joining = Joining {
            provider: config.provider.kind,
            jwt_keys: &jwt_keys,
            seal_keys: &seal_keys,
        };
        let mut conn = db.get().await?;
        let admitted = nodes::join(&mut conn, &row, now - dead_after, |live| {
            admit(&joining, live)?;
            rotation_warnings(&joining, live);
            Ok(())
        })
        .await
        .context("registering this node")?;
        drop(conn);
        if let Err(refusal) = admitted {
            bail!("this node cannot join: {refusal}");
        }
        tracing::info!(node = %id, address = %row.address, "node registered");
        let postgres_url = match crate::store::DbUrl::from_config(
            config.database.url.expose(),
            &config.server.data_dir,
        ) {
            Some(crate::store::DbUrl::Postgres(url)) => Some(url),
            _ => None,
        };
        let signals = signals::Signals::start(&id, db, postgres_url);
        let membership = Arc::new(leases::Membership::new(
            &id,
            signals,
            StdDuration::from_secs(config.cluster.heartbeat_seconds),
            StdDuration::from_secs(config.cluster.dead_after_seconds),
        ));
        let node = Arc::new(Self {
            membership,
            id,
            last_heartbeat: Arc::new(AtomicI64::new(clock.now().timestamp())),
            row,
            db: db.clone(),
            clock,
            dead_after,
            stop: Mutex::new(None),
            task: Mutex::new(None),
            claim: Mutex::new(Some(claim)),
        });
        let (tx, rx) = oneshot::channel();
        let every = StdDuration::from_secs(config.cluster.heartbeat_seconds);
        let task = tokio::spawn(heartbeat_loop(node.clone(), every, rx));
        *lock(&node.stop) = Some(tx);
        *lock(&node.task) = Some(task);
        Ok(node)
    }

    /// Whether the store took a heartbeat of this node within the dead-after deadline (else the
    /// others consider it dead, and it should not take work) and its leases still hold (see
    /// [`leases::LeaseGuard`]).
    pub fn heartbeat_healthy(&self) -> bool {
        let last = self.last_heartbeat.load(Ordering::Acquire);
        self.clock.now().timestamp() - last < self.dead_after.num_seconds()
            && self.membership.guard.valid()
    }

    /// This node's leases and signals.
    pub fn membership(&self) -> &Arc<leases::Membership> {
        &self.membership
    }

    /// Mark this node as draining (a graceful shutdown has begun: it claims nothing more);
    /// failures are logged.
    pub async fn drain(&self) {
        self.membership.start_draining();
        let result = match self.db.get().await {
            Ok(mut conn) => nodes::set_draining(&mut conn, &self.id).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not mark this node as draining");
        }
    }

    /// Stop heartbeating, remove this node's row and release its data directory. Idempotent.
    pub async fn leave(&self) {
        let stop = lock(&self.stop).take();
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        let task = lock(&self.task).take();
        if let Some(task) = task {
            let _ = task.await;
            let result = match self.db.get().await {
                Ok(mut conn) => nodes::remove(&mut conn, &self.id).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => tracing::info!(node = %self.id, "node deregistered"),
                Err(e) => {
                    tracing::warn!(error = %e, "could not remove this node's row; it expires")
                }
            }
        }
        self.membership.signals.stop();
        lock(&self.claim).take();
    }

    /// Every node on this database, as ops see them.
    pub async fn list(&self) -> crate::store::StoreResult<Vec<NodeView>> {
        let mut conn = self.db.get().await?;
        let rows = nodes::list(&mut conn).await?;
        let held: std::collections::HashMap<String, i64> =
            crate::store::leases::held_by_node(&mut conn)
                .await?
                .into_iter()
                .collect();
        let now = self.clock.now();
        Ok(rows
            .into_iter()
            .map(|row| {
                let heartbeat_at = from_db(row.heartbeat_at);
                let age = now - heartbeat_at;
                NodeView {
                    environments_owned: held.get(&row.id).copied().unwrap_or(0),
                    this_node: row.id == self.id,
                    alive: age < self.dead_after,
                    heartbeat_age_seconds: age.num_seconds().max(0),
                    heartbeat_at,
                    started_at: from_db(row.started_at),
                    draining: row.draining,
                    id: row.id,
                    address: row.address,
                    provider: row.provider,
                    version: row.version,
                }
            })
            .collect())
    }

    /// One heartbeat: refresh this node's row (writing it again if another node pruned it) and
    /// prune the rows of long-dead nodes.
    async fn beat(&self) -> crate::store::StoreResult<()> {
        let started = std::time::Instant::now();
        let now = self.clock.now();
        let mut conn = self.db.get().await?;
        if !nodes::heartbeat(&mut conn, &self.id, to_db(now)).await? {
            tracing::warn!(node = %self.id, "this node's row was gone (it was silent too long); registering again");
            let row = NodeRow {
                heartbeat_at: to_db(now),
                ..self.row.clone()
            };
            nodes::reinsert(&mut conn, &row).await?;
        }
        self.last_heartbeat
            .store(now.timestamp(), Ordering::Release);
        self.membership.guard.renewed(started);
        nodes::prune(&mut conn, to_db(now - DEAD_NODE_RETENTION)).await?;
        Ok(())
    }
}

/// Heartbeat every `every` until `stop`. A failed beat is logged and retried at the next tick; it
/// never ends the loop (readiness reports a node whose beats keep failing).
async fn heartbeat_loop(node: Arc<Node>, every: StdDuration, mut stop: oneshot::Receiver<()>) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate: the row was just written
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = ticks.tick() => {
                if let Err(e) = node.beat().await {
                    tracing::warn!(error = %e, "node heartbeat failed");
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, provider: &str, jwt: &str, seal: &str) -> NodeRow {
        let t = chrono::DateTime::from_timestamp(0, 0)
            .expect("epoch")
            .naive_utc();
        NodeRow {
            id: id.into(),
            address: format!("host-{id}"),
            provider: provider.into(),
            version: "0".into(),
            started_at: t,
            heartbeat_at: t,
            draining: false,
            jwt_keys: jwt.into(),
            seal_keys: seal.into(),
        }
    }

    #[test]
    fn admission_needs_a_shared_key_and_no_local_provider() {
        let jwt = vec!["j2".repeat(32), "j1".repeat(32)];
        let seal = vec!["s1".repeat(32)];
        let me = Joining {
            provider: ProviderKind::Contabo,
            jwt_keys: &jwt,
            seal_keys: &seal,
        };
        assert_eq!(admit(&me, &[]), Ok(()));
        let j1 = "j1".repeat(32);
        let s1 = "s1".repeat(32);
        // Mid-rotation: the other node still signs with j1, which this node still accepts.
        let peer = row("a", "contabo", &j1, &s1);
        assert_eq!(admit(&me, std::slice::from_ref(&peer)), Ok(()));
        let stranger = row("b", "contabo", &"j9".repeat(32), &s1);
        let err = admit(&me, &[peer.clone(), stranger]).expect_err("no shared jwt key");
        assert!(
            err.contains("access-token keys") && err.contains("node b"),
            "{err}"
        );
        assert!(err.contains(&"j2".repeat(8)), "names key ids: {err}");
        let stranger = row("c", "contabo", &j1, &"s9".repeat(32));
        let err = admit(&me, &[stranger]).expect_err("no shared seal key");
        assert!(err.contains("sealing keys"), "{err}");
        let local_peer = row("d", "local", &j1, &s1);
        let err = admit(&me, &[local_peer]).expect_err("local peer");
        assert!(err.contains("local provider"), "{err}");
        let local_me = Joining {
            provider: ProviderKind::Local,
            ..me
        };
        assert_eq!(admit(&local_me, &[]), Ok(()));
        let err = admit(&local_me, std::slice::from_ref(&peer)).expect_err("local joining");
        assert!(
            err.contains("single-node") && err.contains("node a"),
            "{err}"
        );
    }

    #[test]
    fn a_sqlite_file_is_served_by_one_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("sub").join("x.db");
        let held = lock_sqlite(&db).expect("first");
        let err = lock_sqlite(&db).expect_err("second");
        assert!(err.to_string().contains("SQLite is single-node"), "{err}");
        drop(held);
        lock_sqlite(&db).expect("free again");
    }

    #[test]
    fn the_node_id_is_stable_and_its_data_dir_taken_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (id, lock) = claim_id(dir.path()).expect("claim");
        let err = claim_id(dir.path()).expect_err("held");
        assert!(
            err.to_string().contains("another devpocket process"),
            "{err}"
        );
        drop(lock);
        let (again, _lock) = claim_id(dir.path()).expect("claim again");
        assert_eq!(id, again);
    }
}
