//! The application: everything a request handler may use, built once at start, and the running
//! server ([`start`] → [`RunningServer`]) that tests start on `127.0.0.1:0` and stop at will.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration as StdDuration;

use anyhow::Context;
use chrono::{DateTime, Duration, Utc};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::actors::Actors;
use crate::actors::directory::{Directory, RestartPolicy};
use crate::actors::environment::actor::EnvDeps;
use crate::auth::google::GoogleVerifier;
use crate::auth::lockout::Lockout;
use crate::auth::passwords::PasswordHashing;
use crate::auth::tokens::Tokens;
use crate::clock::{SharedClock, db_now, to_db};
use crate::cluster::signals::{Heard, Topic};
use crate::config::{Config, ProviderKind};
use crate::http::limits::RateLimits;
use crate::http::metrics::Metrics;
use crate::provider::Provider;
use crate::secrets::{self, KeySet, Sealer};
use crate::store::audit::{self, NewAuditEvent};
use crate::store::{Db, DbConn, DbUrl, login_attempts, sessions};

/// What request handlers share. It holds no provider, no sealer and no SSH client: every change
/// to an environment is a command to the actor tree (`actors.dispatch`), so the compiler keeps
/// the front end thin.
pub struct App {
    pub config: Config,
    pub db: Db,
    pub clock: SharedClock,
    pub tokens: Tokens,
    pub passwords: PasswordHashing,
    pub lockout: Lockout,
    /// The per-request session check's cache (see [`crate::auth::session_cache`]).
    pub session_cache: crate::auth::session_cache::SessionCache,
    pub housekeeping: Housekeeping,
    pub google: Option<GoogleVerifier>,
    pub actors: Actors,
    pub metrics: Metrics,
    pub limits: RateLimits,
    /// Seals refresh-token successors kept for the reuse grace window: a key of its own,
    /// derived from the seal key, so it opens nothing the environments sealed.
    pub session_sealer: Sealer,
    pub ws_connections: Arc<crate::http::ws::ConnectionCounts>,
    /// Port previews: their rate limiter and this node's SSH connections for them.
    pub previews: crate::http::preview::Previews,
    /// Terminals this node may run at once (`terminals.max_terminals_per_node`).
    pub terminal_slots: Arc<tokio::sync::Semaphore>,
    pub started_at: DateTime<Utc>,
    /// This process in the nodes table (heartbeat, the node list for ops).
    pub node: Arc<crate::cluster::Node>,
    /// This node's terminals and WebSocket slots in the store (lists and caps over all nodes).
    pub presence: Arc<crate::presence::Presence>,
}

pub type AppState = Arc<App>;

/// Who did something, for the audit trail.
#[derive(Debug, Clone, Default)]
pub struct AuditContext {
    pub ip: Option<String>,
    pub request_id: Option<String>,
}

impl App {
    /// End these login sessions on every node: here at once (the session check forgets them, so
    /// their next request is refused, and their actors stop, closing their terminals and
    /// streams), and on the other nodes through a signal ([`Topic::Session`], see
    /// [`session_relay`]) — well within the two seconds the cluster promises.
    pub async fn end_sessions(&self, session_ids: Vec<String>, reason: &str) {
        if session_ids.is_empty() {
            return;
        }
        self.end_sessions_here(session_ids.clone(), reason);
        let signals = &self.node.membership().signals;
        if let Err(e) = signals.publish_batched(Topic::Session, &session_ids).await {
            tracing::warn!(error = %e, "could not tell the other nodes about ended sessions; their session caches expire them");
        }
    }

    /// Signals may have been lost: end here every session this node runs actors for that the
    /// store says has ended (revoked, expired, its account gone or disabled). One store read per
    /// such session; this runs only after a listener reconnect.
    async fn end_dead_sessions_here(&self) {
        let ids: Vec<String> = self
            .actors
            .directory()
            .tree()
            .into_iter()
            .filter_map(|a| a.id.strip_prefix("session:").map(str::to_string))
            .collect();
        let Ok(mut conn) = self.db.get().await else {
            return; // the next resync tries again; the session cache expires them meanwhile
        };
        let now = db_now(self.clock.as_ref());
        let mut ended = Vec::new();
        for id in ids {
            match sessions::with_user(&mut conn, &id).await {
                Ok(Some((session, user))) if session.is_live(now) && user.is_active => {}
                Ok(_) => ended.push(id),
                Err(e) => {
                    tracing::warn!(error = %e, "could not re-check sessions after lost signals");
                    return;
                }
            }
        }
        drop(conn);
        if !ended.is_empty() {
            self.end_sessions_here(ended, "session ended on another node");
        }
    }

    /// End these login sessions on this node only.
    fn end_sessions_here(&self, session_ids: Vec<String>, reason: &str) {
        self.session_cache.forget_sessions(&session_ids);
        self.actors.stop_sessions(session_ids, reason);
    }

    /// Record an audit event. A failure to record is logged, never shown to the client.
    pub async fn audit(
        &self,
        ctx: &AuditContext,
        event: &str,
        user_id: Option<&str>,
        session_id: Option<&str>,
        detail: serde_json::Value,
    ) {
        let row = NewAuditEvent {
            occurred_at: db_now(self.clock.as_ref()),
            event: event.to_string(),
            user_id: user_id.map(str::to_string),
            session_id: session_id.map(str::to_string),
            ip_address: ctx.ip.clone(),
            request_id: ctx.request_id.clone(),
            detail: (!detail.is_null()).then(|| detail.to_string()),
        };
        let result = match self.db.get().await {
            Ok(mut conn) => audit::insert(&mut conn, &row).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::error!(event, error = %e, "could not record audit event");
        }
    }
}

/// Credential bookkeeping that keeps the store bounded, run by the credential routes at most once
/// per [`Housekeeping::EVERY`] (by the server's clock, so tests move it): ended login-attempt
/// counters are deleted and unknown names capped at `auth.lockout_max_unknown_names`, and sealed
/// refresh-token successors past the grace window are forgotten.
#[derive(Debug)]
pub struct Housekeeping {
    /// Unix time before which no pass runs.
    next: AtomicI64,
}

impl Housekeeping {
    /// Between passes the login-attempt table grows by at most the credential rate limit times
    /// this, and a sealed successor outlives its window by at most this.
    pub const EVERY: Duration = Duration::seconds(60);

    fn new() -> Self {
        Self {
            next: AtomicI64::new(i64::MIN),
        }
    }

    /// Whether a pass is due at `now`; true for exactly one caller per due time.
    fn claim(&self, now: DateTime<Utc>) -> bool {
        let due = self.next.load(Ordering::Acquire);
        now.timestamp() >= due
            && self
                .next
                .compare_exchange(
                    due,
                    (now + Self::EVERY).timestamp(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }
}

impl App {
    /// Run the housekeeping pass on `conn` if it is due; failures are logged (the next due
    /// caller tries again), never shown to the client.
    pub async fn housekeeping(&self, conn: &mut DbConn) {
        let now = self.clock.now();
        if !self.housekeeping.claim(now) {
            return;
        }
        let max_names = i64::from(self.config.auth.lockout_max_unknown_names);
        if let Err(e) = login_attempts::sweep(conn, to_db(now), max_names).await {
            tracing::warn!(error = %e, "could not sweep login-attempt counters");
        }
        let grace = Duration::seconds(self.config.auth.refresh_reuse_grace_seconds.into());
        if let Err(e) = sessions::forget_successors(conn, to_db(now - grace)).await {
            tracing::warn!(error = %e, "could not forget sealed refresh successors");
        }
    }
}

/// Create the data directory readable by this user only (it holds the secrets and the database).
fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating data dir {}", dir.display()))?;
    } else if std::fs::metadata(dir)?.permissions().mode() & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), "data dir is accessible to other users; consider chmod 700");
    }
    Ok(())
}

/// Status changes kept for slow subscribers of the all-environments feed before they lag.
const EVENT_BUS_CAPACITY: usize = 1024;

async fn start_provider(config: &Config) -> anyhow::Result<Arc<dyn Provider>> {
    Ok(match config.provider.kind {
        ProviderKind::Local => Arc::new(
            crate::provider::local::LocalProvider::start(&config.server.data_dir, &config.local)
                .await
                .context("starting the local provider's SSH server")?,
        ),
        ProviderKind::Contabo => Arc::new(crate::provider::contabo::ContaboProvider::new(
            &config.contabo,
        )?),
    })
}

/// Write the built-in templates into the store, so an upgrade ships its new versions. Admins'
/// own templates are kept, and so is an admin's override of a built-in one.
async fn load_templates(db: &Db, clock: &dyn crate::clock::Clock) -> anyhow::Result<()> {
    use crate::store::templates::{self as store, TemplateRow};
    let mut conn = db.get().await?;
    let now = db_now(clock);
    for template in crate::templates::builtin() {
        if store::get(&mut conn, template.id())
            .await?
            .is_some_and(|row| !row.builtin)
        {
            tracing::info!(
                template = template.id(),
                "keeping the admin's override of a built-in template"
            );
            continue;
        }
        store::upsert(&mut conn, &TemplateRow::new(&template, true, now)?).await?;
    }
    Ok(())
}

/// This node's keys: access-token keys and sealing keys, each a current key and previous ones.
#[derive(Debug, Clone)]
pub struct NodeKeys {
    pub jwt: KeySet,
    pub seal: KeySet,
}

/// The keys from configuration, or (when a current key is not configured) from the key files in
/// the data directory, generated on first start: the single-node default.
pub fn load_keys(config: &Config) -> anyhow::Result<NodeKeys> {
    let data_dir = &config.server.data_dir;
    let jwt_current = if config.auth.secret_key.is_empty() {
        secrets::load_or_create_key(data_dir, secrets::JWT_KEY_FILE)?
    } else {
        config.auth.secret_key.expose().as_bytes().to_vec()
    };
    let jwt_previous = config
        .auth
        .previous_secret_keys
        .iter()
        .map(|k| k.expose().as_bytes().to_vec())
        .collect();
    let seal_current = if config.secrets.seal_key.is_empty() {
        secrets::load_or_create_key(data_dir, secrets::SEAL_KEY_FILE)?
    } else {
        secrets::decode_seal_key(config.secrets.seal_key.expose()).context("secrets.seal_key")?
    };
    let seal_previous = config
        .secrets
        .previous_seal_keys
        .iter()
        .map(|k| secrets::decode_seal_key(k.expose()))
        .collect::<anyhow::Result<Vec<_>>>()
        .context("secrets.previous_seal_keys")?;
    Ok(NodeKeys {
        jwt: KeySet::new("jwt", jwt_current, jwt_previous)?,
        seal: KeySet::new("seal", seal_current, seal_previous)?,
    })
}

/// Open the store named by the configuration and bring its schema up to date.
pub async fn open_store(config: &Config) -> anyhow::Result<Db> {
    let url = DbUrl::from_config(config.database.url.expose(), &config.server.data_dir)
        .context("database.url is not a supported URL")?;
    let db = Db::connect(
        &url,
        config.database.max_connections,
        StdDuration::from_secs(config.database.acquire_timeout_seconds),
    )
    .await
    .context("opening the database")?;
    let applied = db.migrate().await.context("migrating the database")?;
    if !applied.is_empty() {
        tracing::info!(
            backend = db.backend(),
            ?applied,
            "applied database migrations"
        );
    }
    Ok(db)
}

/// Build the application: store, secrets, this node's registration, tokens, the supervision
/// tree. `address` names the node for humans (see [`crate::cluster::default_address`]).
pub async fn build(
    config: Config,
    address: String,
    clock: SharedClock,
) -> anyhow::Result<AppState> {
    create_private_dir(&config.server.data_dir)?;
    let claim = crate::cluster::claim(&config)?;
    let db = open_store(&config).await?;
    let keys = load_keys(&config)?;
    let node =
        crate::cluster::Node::join(&config, claim, address, &db, &keys, clock.clone()).await?;
    match build_on(config, clock, db, keys, node.clone()).await {
        Ok(app) => Ok(app),
        Err(e) => {
            node.leave().await;
            Err(e)
        }
    }
}

async fn build_on(
    config: Config,
    clock: SharedClock,
    db: Db,
    keys: NodeKeys,
    node: Arc<crate::cluster::Node>,
) -> anyhow::Result<AppState> {
    let sealer = Sealer::from_keys(&keys.seal);
    let session_sealer = Sealer::for_purpose(&keys.seal, "sessions")?;
    let tokens = Tokens::new(
        &keys.jwt,
        &config.auth.issuer,
        &config.auth.audience,
        Duration::minutes(config.auth.access_token_minutes.into()),
        clock.clone(),
    );

    let provider = start_provider(&config).await?;
    load_templates(&db, clock.as_ref()).await?;
    let (bus, _) = tokio::sync::broadcast::channel(EVENT_BUS_CAPACITY);
    let env_deps = Arc::new(EnvDeps {
        db: db.clone(),
        clock: clock.clone(),
        provider: provider.clone(),
        sealer: sealer.clone(),
        config: config.clone(),
        bus,
        cluster: node.membership().clone(),
        ssh: Arc::new(crate::ssh::pool::SshPool::new(
            provider.ssh_holders_per_connection(config.provider.ssh_channels_per_connection),
        )),
    });

    let directory = Directory::new(clock.clone());
    let policy = RestartPolicy {
        limit: config.actors.restart_limit,
        window: Duration::seconds(config.actors.restart_window_seconds as i64),
    };
    let actors = Actors::start(
        directory,
        policy,
        StdDuration::from_secs(config.actors.session_idle_minutes * 60),
        env_deps,
    )
    .await?;
    actors.start_cluster_loops();

    if config.provider.kind == ProviderKind::Local {
        tracing::warn!(
            "provider.kind = \"local\": environments are shells ON THIS HOST for every account; use it for development or single-user hosts only"
        );
    }
    if config.server.preview_path_based {
        tracing::warn!(
            "server.preview_path_based = true: previews are also served at /preview/{{environment_id}}/{{port}}/ on the API's own origin, where one preview's page can read another's (and call the API with cookies of that origin); prefer host-based previews"
        );
    }
    if !config.registration_open() {
        tracing::warn!(
            "self-registration is closed (local provider on a non-loopback address); create accounts with `devpocket user create` or set server.registration = \"open\""
        );
    }

    Ok(Arc::new(App {
        passwords: PasswordHashing::new(
            config.auth.hash_threads(),
            config.auth.hash_queue as usize,
        ),
        lockout: Lockout::new(&config.auth),
        session_cache: crate::auth::session_cache::SessionCache::new(
            config.auth.session_cache_seconds,
            crate::auth::session_cache::MAX_ENTRIES,
        ),
        housekeeping: Housekeeping::new(),
        google: GoogleVerifier::from_config(&config.google, clock.clone()),
        limits: RateLimits::new(&config.rate_limit, &config.terminals),
        previews: crate::http::preview::Previews::new(&config.server, config.rate_limit.enabled),
        metrics: Metrics::new(),
        started_at: clock.now(),
        tokens,
        session_sealer,
        ws_connections: Arc::default(),
        presence: Arc::new(crate::presence::Presence::new(
            db.clone(),
            clock.clone(),
            node.id.clone(),
            Duration::seconds(config.cluster.dead_after_seconds as i64),
        )),
        node,
        terminal_slots: Arc::new(tokio::sync::Semaphore::new(
            config.terminals.max_terminals_per_node,
        )),
        actors,
        db,
        clock,
        config,
    }))
}

/// End here the sessions other nodes ended (see [`App::end_sessions`]) until `stop` fires. After
/// lost signals nothing is replayed: the session cache forgets within
/// `auth.session_cache_seconds`, and open streams re-check their session when they lag.
async fn session_relay(app: AppState, mut stop: oneshot::Receiver<()>) {
    let signals = app.node.membership().signals.clone();
    let mut heard = signals.subscribe(Topic::Session);
    loop {
        let heard_one = tokio::select! {
            _ = &mut stop => return,
            heard_one = crate::cluster::signals::next(&mut heard) => heard_one,
        };
        match heard_one {
            Some(Heard::Signal { node, payload }) if *node != *app.node.id => {
                let ids: Vec<String> = payload.split_whitespace().map(str::to_string).collect();
                app.end_sessions_here(ids, "session ended on another node");
            }
            Some(Heard::Resync) => app.end_dead_sessions_here().await,
            Some(_) => {}
            None => return,
        }
    }
}

/// How long a draining node waits for its WebSockets to send their "reconnect" close frames.
const DRAIN_STREAMS_WAIT: StdDuration = StdDuration::from_secs(3);

/// A server running in the background of this process.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub app: AppState,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// The relay of sessions other nodes end ([`session_relay`]).
    relay: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl RunningServer {
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop accepting, drain in-flight requests (within the drain timeout), stop the actors.
    pub async fn stop(mut self) {
        self.stop_inner().await;
    }

    async fn stop_inner(&mut self) {
        // Draining: readiness fails, terminals and streams close with "reconnect", the leases
        // go back to the other nodes; then the front end stops and finishes what is in flight.
        self.app.node.drain().await;
        self.app.actors.drain().await;
        if !self.app.ws_connections.wait_idle(DRAIN_STREAMS_WAIT).await {
            tracing::warn!("some WebSockets did not close within the drain wait; they are cut");
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        if let Some((stop, task)) = self.relay.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
        self.app.actors.shutdown().await;
        self.app.actors.shutdown_provider().await;
        self.app.node.leave().await;
        self.app.db.close();
    }

    /// Run until the server stops by itself (it does not, short of `stop`).
    pub async fn wait(mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some((stop, _)) = self.relay.take() {
            let _ = stop.send(());
        }
    }
}

/// Build the application and serve it on `listener` until [`RunningServer::stop`].
pub async fn start_on(
    listener: TcpListener,
    config: Config,
    clock: SharedClock,
) -> anyhow::Result<RunningServer> {
    let addr = listener.local_addr()?;
    let address = crate::cluster::default_address(&config, addr);
    let app = build(config, address, clock).await?;
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(crate::http::serve(listener, app.clone(), async move {
        let _ = rx.await;
    }));
    let (stop_relay, relay_stopped) = oneshot::channel();
    let relay = tokio::spawn(session_relay(app.clone(), relay_stopped));
    tracing::info!(%addr, "DevPocket server listening");
    Ok(RunningServer {
        addr,
        app,
        shutdown: Some(tx),
        task: Some(task),
        relay: Some((stop_relay, relay)),
    })
}

/// Bind the configured address and start.
pub async fn start(config: Config, clock: SharedClock) -> anyhow::Result<RunningServer> {
    let addr = config.bind_addr();
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    start_on(listener, config, clock).await
}
