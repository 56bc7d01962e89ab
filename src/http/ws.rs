//! WebSockets on the hyper front end (tokio-tungstenite): the terminal, logs and events streams.
//!
//! The upgrade is accepted first and every rejection is a close frame with code 1008 and one of
//! API.md's reasons (`Authentication failed`, `Too many connections`, `Environment not found`,
//! `Environment not ready`), so the app sees why. Frames are bounded in size; the server pings;
//! a client that sends nothing for the idle timeout is closed. When the login session ends
//! (logout, revocation, password change, account deletion) every one of its streams closes with
//! 1008 `Session ended`: terminals through their session actor, logs and events here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::sync::broadcast;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

use super::Body;
use super::authn::{AuthUser, authenticate_token};
use crate::actors::environment::actor::EnvUpdate;
use crate::actors::environment::machine::Status;
use crate::actors::session::TerminalRequest;
use crate::actors::terminal::{In, Out, Stats, TerminalArgs};
use crate::app::{AppState, AuditContext};
use crate::error::{ApiError, ErrorCode};
use crate::protocol::{self, ClientFrame, EnvironmentInfo, ServerFrame, StreamFrame};
use crate::store::environments::{self as store, Environment};

type Ws = WebSocketStream<SlottedIo>;

/// An upgraded connection and, once admitted, its [`ConnectionSlot`]. The slot is given back
/// before the client can learn that the connection is over, so a client that reconnects at that
/// moment is not counted twice against `terminals.max_connections_per_user`: before the server
/// sends a close frame (`close` gives it back and waits for the store), and before the socket
/// itself closes (fields drop in declaration order: the slot, then the socket).
pub struct SlottedIo {
    slot: Option<ConnectionSlot>,
    io: TokioIo<hyper::upgrade::Upgraded>,
    /// Counted until the socket is gone: a draining node waits for it
    /// ([`ConnectionCounts::wait_idle`]).
    _open: OpenSocket,
}

impl tokio::io::AsyncRead for SlottedIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SlottedIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Which stream a WebSocket route serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsKind {
    Terminal,
    Logs,
    Events,
}

/// Log history sent on the logs stream before live updates.
const LOG_HISTORY: i64 = 1000;

/// Live WebSockets per user on this node: a fast refusal before the store is asked (this node's
/// count alone may already be at the cap); the store's count over all nodes decides (see
/// [`crate::presence::Presence::take_slot`]). A guard gives the slot back when the connection ends.
#[derive(Default)]
pub struct ConnectionCounts {
    counts: Mutex<HashMap<String, usize>>,
    /// Upgraded sockets of this node, admitted or not ([`OpenSocket`]).
    open: AtomicUsize,
    /// Woken when the last socket of this node is gone (a draining node waits for it).
    idle: tokio::sync::Notify,
}

/// This node's count of one connection; see [`ConnectionCounts`].
pub struct LocalSlot {
    counts: Arc<ConnectionCounts>,
    user_id: String,
}

/// One admitted WebSocket's slots: this node's count and its row in the store, both given back
/// when it drops (however the connection ended), or at once by [`ConnectionSlot::release`].
pub struct ConnectionSlot {
    local: LocalSlot,
    store: crate::presence::SlotGuard,
}

impl ConnectionSlot {
    /// Give both back now; returns once the store no longer counts the slot (on any node), or
    /// once its deletion failed or took longer than [`SLOT_RELEASE_WAIT`] (it stays queued and
    /// is deleted with the next slot taken).
    pub async fn release(self) {
        let Self { local, store } = self;
        drop(local);
        let _ = tokio::time::timeout(SLOT_RELEASE_WAIT, store.release()).await;
    }
}

/// Longest a close frame waits for the store to give its connection's slot back (a database
/// that is slow or unreachable must not hold the close up; the slot stays queued).
const SLOT_RELEASE_WAIT: Duration = Duration::from_secs(2);

/// One upgraded socket of this node, counted until dropped (see [`ConnectionCounts::wait_idle`]).
pub struct OpenSocket {
    counts: Arc<ConnectionCounts>,
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        if self.counts.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.counts.idle.notify_waiters();
        }
    }
}

impl WsKind {
    /// The kind as the connection slots table records it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Terminal => "terminal",
            Self::Logs => "logs",
            Self::Events => "events",
        }
    }
}

impl ConnectionCounts {
    /// Count one upgraded socket until the returned guard drops.
    pub fn open_socket(self: &Arc<Self>) -> OpenSocket {
        self.open.fetch_add(1, Ordering::AcqRel);
        OpenSocket {
            counts: self.clone(),
        }
    }

    pub fn acquire(self: &Arc<Self>, user_id: &str, limit: usize) -> Option<LocalSlot> {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(user_id.to_string()).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(LocalSlot {
            counts: self.clone(),
            user_id: user_id.to_string(),
        })
    }

    /// Wait until this node holds no WebSocket socket, at most `bound`; `false` when some are
    /// still open then. A draining node waits here after telling every stream to close, so each
    /// one's close frame ("reconnect") is sent before the process exits (a socket counts until it
    /// is dropped, after its close frame; its slot is given back before that frame).
    pub async fn wait_idle(&self, bound: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }
}

impl Drop for LocalSlot {
    fn drop(&mut self) {
        let mut map = self.counts.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.user_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.user_id);
            }
        }
    }
}

/// The query of a WebSocket route. Each parameter is decoded on its own, so a malformed optional
/// one is named in the refusal instead of hiding the token ([`WsQuery::parse`]).
#[derive(Default, Debug)]
struct WsQuery {
    token: Option<String>,
    terminal_id: Option<String>,
    offset: Option<u64>,
    cols: Option<u32>,
    rows: Option<u32>,
    follow: Option<bool>,
}

impl WsQuery {
    /// Decode `token`, `terminal_id`, `offset`, `cols`, `rows` and `follow` each on its own;
    /// `Err` names the first malformed one (unknown parameters are ignored, the last of a
    /// repeated one wins).
    fn parse(query: &str) -> Result<Self, String> {
        fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<Option<T>, String> {
            match value {
                "" => Ok(None),
                v => v.parse().map(Some).map_err(|_| name.to_string()),
            }
        }
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(query).map_err(|_| "the query string".to_string())?;
        let mut q = WsQuery::default();
        for (name, value) in pairs {
            match name.as_str() {
                "token" => q.token = Some(value),
                "terminal_id" if value.is_empty() => q.terminal_id = None,
                "terminal_id" => {
                    uuid::Uuid::parse_str(&value).map_err(|_| name.clone())?;
                    q.terminal_id = Some(value);
                }
                "offset" => q.offset = number(&name, &value)?,
                "cols" => q.cols = number(&name, &value)?,
                "rows" => q.rows = number(&name, &value)?,
                "follow" => {
                    q.follow = match value.as_str() {
                        "" => None,
                        "true" | "1" => Some(true),
                        "false" | "0" => Some(false),
                        _ => return Err(name),
                    }
                }
                _ => {}
            }
        }
        Ok(q)
    }
}

fn bad_upgrade() -> ApiError {
    ApiError::bad_request(
        ErrorCode::WebsocketRequired,
        "This endpoint speaks WebSocket only",
    )
}

/// Bytes a WebSocket reads from its socket at a time (tungstenite's default is 128 KiB). The
/// buffer is resident for the connection's life and tungstenite zeroes the unused part before
/// each read: at 128 KiB that memset was ~5% of the server's CPU per keystroke and 128 KiB per
/// terminal (perf, `cargo bench --bench terminal`). Client frames are small (a keystroke's is
/// ~40 bytes; a paste is read in several pieces, up to `terminals.max_message_bytes`: a 64 KiB
/// paste is 64 reads, microseconds each), so 1 KiB: issue 12 budgets 64 KiB per terminal.
pub const WS_READ_BUFFER: usize = 1024;

/// Validate the upgrade request, answer 101 and run the stream on the upgraded connection.
pub fn upgrade(
    app: &AppState,
    mut req: Request<Incoming>,
    kind: WsKind,
    params: Vec<(String, String)>,
    ip: IpAddr,
    request_id: &str,
) -> Result<Response<Body>, ApiError> {
    let headers = req.headers();
    let is_upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    let (true, true, Some(key)) = (is_upgrade, version_ok, key) else {
        return Err(bad_upgrade());
    };
    let query = WsQuery::parse(req.uri().query().unwrap_or(""));
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let app = app.clone();
    let audit = AuditContext {
        ip: Some(ip.to_string()),
        request_id: Some(request_id.to_string()),
    };
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let config = WebSocketConfig::default()
            .read_buffer_size(WS_READ_BUFFER)
            .max_message_size(Some(app.config.terminals.max_message_bytes))
            .max_frame_size(Some(app.config.terminals.max_message_bytes));
        let io = SlottedIo {
            slot: None,
            io: TokioIo::new(upgraded),
            _open: app.ws_connections.open_socket(),
        };
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        let env_id = params
            .iter()
            .find(|(k, _)| k == "environment_id")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        run(app, ws, kind, env_id, query, audit).await;
    });
    let mut resp = Response::new(super::full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    Ok(resp)
}

/// Send a close frame (and flush it). The connection's slot, if it holds one, is given back
/// first (see [`SlottedIo`]).
async fn close(ws: &mut Ws, code: u16, reason: &str) {
    if let Some(slot) = ws.get_mut().slot.take() {
        slot.release().await;
    }
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    };
    let _ = ws.send(Message::Close(Some(frame))).await;
    let _ = ws.flush().await;
}

async fn send(ws: &mut Ws, frame: &ServerFrame) -> bool {
    ws.send(Message::text(frame.to_json())).await.is_ok()
}

/// Authenticate and take a connection slot within the per-user limit over all nodes; the slot
/// goes with the socket ([`SlottedIo`]).
async fn admit(app: &AppState, ws: &mut Ws, query: &WsQuery, kind: WsKind) -> Option<AuthUser> {
    let Some(token) = query.token.as_deref().filter(|t| !t.is_empty()) else {
        close(ws, 1008, "Authentication failed").await;
        return None;
    };
    let Ok(user) = authenticate_token(app, token).await else {
        close(ws, 1008, "Authentication failed").await;
        return None;
    };
    let limit = app.config.terminals.max_connections_per_user;
    let Some(local) = app.ws_connections.acquire(&user.user.id, limit) else {
        close(ws, 1008, "Too many connections").await;
        return None;
    };
    match app
        .presence
        .take_slot(&user.user.id, kind.as_str(), limit)
        .await
    {
        Ok(Some(store)) => {
            ws.get_mut().slot = Some(ConnectionSlot { local, store });
            Some(user)
        }
        Ok(None) => {
            close(ws, 1008, "Too many connections").await;
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "store unavailable for a connection slot");
            close(ws, 1011, "Server error, try again").await;
            None
        }
    }
}

async fn owned_environment(
    app: &AppState,
    ws: &mut Ws,
    user: &AuthUser,
    env_id: &str,
) -> Option<Environment> {
    let found = match app.db.get().await {
        Ok(mut conn) => store::get_owned(&mut conn, env_id, &user.user.id).await,
        Err(e) => Err(e),
    };
    match found {
        Ok(Some(env)) => Some(env),
        Ok(None) => {
            close(ws, 1008, "Environment not found").await;
            None
        }
        Err(e) => {
            tracing::error!(environment = env_id, error = %e, "store unavailable for a WebSocket");
            close(ws, 1011, "Server error, try again").await;
            None
        }
    }
}

async fn run(
    app: AppState,
    mut ws: Ws,
    kind: WsKind,
    env_id: String,
    query: Result<WsQuery, String>,
    audit: AuditContext,
) {
    let query = match query {
        Ok(query) => query,
        Err(bad) => {
            close(&mut ws, 1008, &format!("Invalid query parameter: {bad}")).await;
            return;
        }
    };
    // Boxed, as the terminal's setup below: the task keeps the size of its largest state for
    // as long as it runs, and what is left once a terminal is open is only the bridge's.
    let Some(user) = Box::pin(admit(&app, &mut ws, &query, kind)).await else {
        return;
    };
    match kind {
        WsKind::Terminal => {
            let user_id = user.user.id.clone();
            let opened = Box::pin(terminal(&app, ws, user, &env_id, query, audit)).await;
            if let Some((ws, attachment, env)) = opened {
                bridge(&app, ws, attachment, &env, &user_id).await;
            }
        }
        WsKind::Logs => logs(app, ws, user, &env_id, query).await,
        WsKind::Events => events(app, ws, user).await,
    }
}

fn env_info(env: &Environment) -> EnvironmentInfo {
    EnvironmentInfo {
        id: env.id.clone(),
        name: env.name.clone(),
        template: env.template.clone(),
        status: env.status,
    }
}

/// Open (or resume) the terminal a WebSocket asks for: the socket back with its attachment and
/// environment, or `None` once the socket has been told why not (closed).
async fn terminal(
    app: &AppState,
    mut ws: Ws,
    user: AuthUser,
    env_id: &str,
    query: WsQuery,
    audit: AuditContext,
) -> Option<(Ws, crate::actors::terminal::Attachment, Environment)> {
    let env = owned_environment(app, &mut ws, &user, env_id).await?;
    if env.status != Status::Running {
        close(&mut ws, 1008, "Environment not ready").await;
        return None;
    }
    let cfg = &app.config.terminals;
    // Feedback for the person while SSH connects (up to the connect timeout on a slow machine).
    if !send(
        &mut ws,
        &ServerFrame::info(format!("Connecting to {}…", env.name)),
    )
    .await
    {
        return None;
    }
    let target = match app.actors.ssh_target(&env.id).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let _ = send(
                &mut ws,
                &ServerFrame::error(format!("Cannot reach the environment: {e:#}")),
            )
            .await;
            close(&mut ws, 1011, "Environment unreachable").await;
            return None;
        }
        Err(_) => {
            close(&mut ws, 1013, "Environment busy, try again").await;
            return None;
        }
    };
    let terminal_id = uuid::Uuid::new_v4().to_string();
    let moved = match &query.terminal_id {
        Some(asked) => moved_here(app, asked, &env.id, &user.user.id).await,
        None => None,
    };
    let tmux_session = moved
        .as_ref()
        .map(|row| row.tmux_session.clone())
        .unwrap_or_else(|| crate::actors::terminal::tmux_session(&env.id));
    // A moved terminal keeps its size unless the client gives one.
    let (cols, rows) = match (query.cols, query.rows, &moved) {
        (None, None, Some(row)) => (row.cols.max(1) as u32, row.rows.max(1) as u32),
        _ => (query.cols.unwrap_or(80), query.rows.unwrap_or(24)),
    };
    let (cols, rows) = (
        cols.clamp(1, protocol::MAX_COLS),
        rows.clamp(1, protocol::MAX_ROWS),
    );
    let registration = app.presence.registration(
        crate::presence::NewTerminal {
            terminal_id: terminal_id.clone(),
            environment_id: env.id.clone(),
            user_id: user.user.id.clone(),
            session_id: user.session.id.clone(),
            tmux_session: tmux_session.clone(),
        },
        (cols, rows),
    );
    let stats = Arc::new(Stats::default());
    // The close is audited by the terminal itself when it ends (its byte counts are then final).
    let on_close = {
        let (app, audit) = (app.clone(), audit.clone());
        let (user_id, session_id) = (user.user.id.clone(), user.session.id.clone());
        let (env_id, tid) = (env.id.clone(), terminal_id.clone());
        Box::new(move |bytes_in: u64, bytes_out: u64| {
            tokio::spawn(async move {
                let detail = json!({ "environment_id": env_id, "terminal_id": tid, "bytes_in": bytes_in, "bytes_out": bytes_out });
                app.audit(
                    &audit,
                    "terminal_closed",
                    Some(&user_id),
                    Some(&session_id),
                    detail,
                )
                .await;
            });
        }) as Box<dyn FnOnce(u64, u64) + Send + Sync>
    };
    let request = TerminalRequest {
        terminal_id: query.terminal_id.clone(),
        moved: moved.is_some(),
        registration: Some(registration),
        offset: query.offset,
        args: TerminalArgs {
            terminal_id: terminal_id.clone(),
            environment: env_info(&env),
            target,
            ssh: app.actors.ssh_pool(),
            tmux_session,
            cols,
            rows,
            ring_bytes: cfg.ring_bytes,
            grace: Duration::from_secs(cfg.grace_seconds),
            reconnect_attempts: cfg.reconnect_attempts,
            write_timeout: Duration::from_secs(cfg.write_timeout_seconds),
            screen_max_cells: cfg.screen_max_cells,
            feed: app.actors.subscribe(&env.id).await.ok(),
            stats: stats.clone(),
            directory: app.actors.directory().clone(),
            directory_id: crate::terminal::directory_id(&terminal_id),
            on_close: Some(on_close),
            slot: None,
            record: None,
        },
        max_terminals: cfg.max_terminals_per_session,
        node_slots: app.terminal_slots.clone(),
        size: query.cols.zip(query.rows).map(|(cols, rows)| {
            (
                cols.clamp(1, protocol::MAX_COLS),
                rows.clamp(1, protocol::MAX_ROWS),
            )
        }),
    };
    let attachment = match app
        .actors
        .open_terminal(&user.session.id, &user.user.id, request)
        .await
    {
        Ok(a) => a,
        Err(crate::actors::session::OpenError::Busy) => {
            close(&mut ws, 1013, "Server busy, try again").await;
            return None;
        }
        Err(e) => {
            let _ = send(
                &mut ws,
                &ServerFrame::error(format!("Cannot open a terminal: {e}")),
            )
            .await;
            close(&mut ws, 1011, "Terminal unavailable").await;
            return None;
        }
    };
    let created = attachment.terminal_id == terminal_id;
    if created {
        let dir_stats = stats.clone();
        let dir_env = env.id.clone();
        app.actors.directory().set_detail(
            &crate::terminal::directory_id(&terminal_id),
            Arc::new(move || {
                json!({
                    "environment_id": dir_env,
                    "bytes_in": dir_stats.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
                    "bytes_out": dir_stats.bytes_out.load(std::sync::atomic::Ordering::Relaxed),
                    "attached": dir_stats.attached.load(std::sync::atomic::Ordering::Relaxed),
                })
            }),
        );
        app.audit(
            &audit,
            "terminal_opened",
            Some(&user.user.id),
            Some(&user.session.id),
            json!({ "environment_id": env.id, "terminal_id": terminal_id }),
        )
        .await;
    }
    if let Ok(mut conn) = app.db.get().await {
        let _ = store::touch_accessed(&mut conn, &env.id, crate::clock::db_now(app.clock.as_ref()))
            .await;
    }
    Some((ws, attachment, env))
}

/// The row of terminal `asked` when the store says it is this user's terminal on this environment,
/// held by another node (alive or dead) with a tmux session this server makes: a resume that
/// moved nodes. Anything else — unknown, another user's, another environment's, this node's, a
/// store failure — is `None`, so it is treated exactly like an unknown id (nothing leaks).
async fn moved_here(
    app: &AppState,
    asked: &str,
    env_id: &str,
    user_id: &str,
) -> Option<crate::store::terminals::TerminalRow> {
    let row = match app.presence.terminal(asked).await {
        Ok(row) => row?,
        Err(e) => {
            tracing::warn!(terminal = asked, error = %e, "cannot look a resumed terminal up in the store");
            return None;
        }
    };
    (row.user_id == user_id
        && row.environment_id == env_id
        && row.node_id != app.presence.node_id()
        && crate::actors::terminal::valid_tmux_session(&row.tmux_session))
    .then_some(row)
}

/// The terminal loop: a dispatcher between the WebSocket and the terminal's queues.
async fn bridge(
    app: &AppState,
    mut ws: Ws,
    attachment: crate::actors::terminal::Attachment,
    env: &Environment,
    user_id: &str,
) {
    let cfg = &app.config.terminals;
    let crate::actors::terminal::Attachment {
        terminal,
        terminal_id,
        connection,
        mut frames,
        input,
        offset,
        replay,
        notice,
        closed,
    } = attachment;
    let welcome = ServerFrame::Welcome {
        message: format!("Connected to {}", env.name),
        environment: env_info(env),
        terminal_id: terminal_id.clone(),
        offset,
    };
    let mut ok = send(&mut ws, &welcome).await;
    for frame in [notice, replay].into_iter().flatten() {
        ok = ok && send(&mut ws, &frame).await;
    }
    let mut ping = tokio::time::interval(Duration::from_secs(cfg.ping_interval_seconds));
    ping.tick().await;
    let idle = Duration::from_secs(cfg.idle_timeout_seconds);
    let mut last_heard = tokio::time::Instant::now();
    let mut closing = closed.clone();
    let mut backlog = InputBacklog::default();
    let mut decoder = protocol::InputDecoder::default();
    while ok {
        tokio::select! {
            msg = ws.next() => {
                last_heard = tokio::time::Instant::now();
                match msg {
                    Some(Ok(Message::Text(text))) => match decoder.decode(text.as_str()) {
                        Ok(ClientFrame::Input(data)) => {
                            app.limits.terminal_input(user_id, data.len()).await;
                            match backlog.forward(&input, In::Data(data.into_bytes())) {
                                Forward::Sent => {}
                                Forward::Dropped(frame) => ok = send(&mut ws, &frame).await,
                                Forward::Gone => break,
                            }
                        }
                        Ok(ClientFrame::Resize { cols, rows }) => {
                            match backlog.forward(&input, In::Resize { cols, rows }) {
                                Forward::Sent => {}
                                Forward::Dropped(frame) => ok = send(&mut ws, &frame).await,
                                Forward::Gone => break,
                            }
                        }
                        Ok(ClientFrame::Ping) => ok = send(&mut ws, &ServerFrame::Pong).await,
                        Ok(ClientFrame::Ack { .. }) => {}
                        Err(bad) => ok = send(&mut ws, &ServerFrame::error(bad.0)).await,
                    },
                    Some(Ok(Message::Binary(_))) => {
                        ok = send(&mut ws, &ServerFrame::error("binary frames are not supported; send JSON text frames")).await;
                    }
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Ok(_)) => {} // ping/pong are answered by tungstenite
                    Some(Err(e)) => {
                        let too_big = matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_));
                        if too_big {
                            close(&mut ws, 1009, "Message too big").await;
                        }
                        break;
                    }
                }
            }
            permit = input.reserve(), if !backlog.queue.is_empty() => match (permit, backlog.pop()) {
                (Ok(permit), Some(msg)) => permit.send(msg),
                (Ok(_), None) => {}
                (Err(_), _) => break,
            },
            out = frames.recv() => match out {
                Some(Out::Frame(frame)) => ok = send(&mut ws, &frame).await,
                Some(Out::Close(code, reason)) => { close(&mut ws, code, &reason).await; break; }
                None => {
                    let reason = closed.borrow().clone().unwrap_or((1011, "Terminal ended".into()));
                    // Deliver what is still queued (an exit code, say) before closing.
                    close(&mut ws, reason.0, &reason.1).await;
                    break;
                }
            },
            _ = closing.changed() => {
                while let Ok(Out::Frame(frame)) = frames.try_recv() {
                    if !send(&mut ws, &frame).await { break; }
                }
                let reason = closed.borrow().clone().unwrap_or((1000, "Closed".into()));
                close(&mut ws, reason.0, &reason.1).await;
                break;
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= idle {
                    close(&mut ws, 1000, "Idle timeout").await;
                    break;
                }
                ok = ws.send(Message::Ping(Bytes::new())).await.is_ok();
            }
        }
    }
    let _ = terminal.cast(crate::actors::terminal::TerminalMsg::Detached { connection });
}

/// Input held while the terminal's input queue is full. A fast paste into a slow but reading
/// shell loses nothing; past this many bytes the environment is not reading at all (its writes
/// are timing out), and further input is dropped with an `error` frame. The WebSocket keeps being
/// read meanwhile, so a close, a detach or a replacement is heard at once.
pub const INPUT_BACKLOG_BYTES: usize = 1024 * 1024;

/// Client input waiting for room in the terminal's queue, in order, bounded by
/// [`INPUT_BACKLOG_BYTES`].
#[derive(Default)]
struct InputBacklog {
    queue: std::collections::VecDeque<In>,
    bytes: usize,
    /// Input is being dropped (the client has been told once for this run of drops).
    dropping: bool,
}

fn input_len(msg: &In) -> usize {
    match msg {
        In::Data(bytes) => bytes.len(),
        In::Resize { .. } => 16,
    }
}

enum Forward {
    Sent,
    /// Dropped: the backlog is full. The frame (once per run of drops) says so.
    Dropped(ServerFrame),
    /// The terminal is gone.
    Gone,
}

impl InputBacklog {
    /// Hand input to the terminal without waiting: straight into its queue when there is room
    /// and nothing is held, else into the backlog (in order), else dropped.
    fn forward(&mut self, input: &tokio::sync::mpsc::Sender<In>, msg: In) -> Forward {
        use tokio::sync::mpsc::error::TrySendError;
        let msg = if self.queue.is_empty() {
            match input.try_send(msg) {
                Ok(()) => {
                    self.dropping = false;
                    return Forward::Sent;
                }
                Err(TrySendError::Full(msg)) => msg,
                Err(TrySendError::Closed(_)) => return Forward::Gone,
            }
        } else {
            msg
        };
        let len = input_len(&msg);
        if self.bytes + len <= INPUT_BACKLOG_BYTES {
            self.bytes += len;
            self.queue.push_back(msg);
            self.dropping = false;
            return Forward::Sent;
        }
        if std::mem::replace(&mut self.dropping, true) {
            return Forward::Sent;
        }
        Forward::Dropped(ServerFrame::error(
            "Input dropped: the environment is not reading input as fast as it arrives",
        ))
    }

    /// The oldest held input, to send now that the queue has room.
    fn pop(&mut self) -> Option<In> {
        let msg = self.queue.pop_front()?;
        self.bytes -= input_len(&msg);
        Some(msg)
    }
}

async fn logs(app: AppState, mut ws: Ws, user: AuthUser, env_id: &str, query: WsQuery) {
    let Some(env) = owned_environment(&app, &mut ws, &user, env_id).await else {
        return;
    };
    let follow = query.follow.unwrap_or(true);
    // Subscribe before reading history so nothing falls between the two (the actor is started
    // if it is down; a terminated environment has history only).
    let feed = match follow && !env.status.is_final() {
        true => app.actors.subscribe(&env.id).await.ok(),
        false => None,
    };
    let history = match app.db.get().await {
        Ok(mut conn) => store::events(&mut conn, &env.id, None, LOG_HISTORY).await,
        Err(e) => Err(e),
    };
    let history = match history {
        Ok((events, _)) => events,
        Err(e) => {
            tracing::error!(environment = %env.id, error = %e, "cannot read the log history");
            close(&mut ws, 1011, "Server error, try again").await;
            return;
        }
    };
    for event in &history {
        if ws
            .send(Message::text(
                crate::actors::relay::event_frame(&env.id, event).to_json(),
            ))
            .await
            .is_err()
        {
            return;
        }
    }
    match feed {
        Some(feed) => live(&app, ws, feed, None, &user.session.id).await,
        None => close(&mut ws, 1000, "History complete").await,
    }
}

async fn events(app: AppState, ws: Ws, user: AuthUser) {
    let feed = app.actors.status_feed();
    live(&app, ws, feed, Some(user.user.id.clone()), &user.session.id).await;
}

/// Whether a login session is still live (not revoked, not expired, its user active). A store
/// failure counts as live: a database hiccup must not cut every stream.
async fn session_live(app: &AppState, session_id: &str) -> bool {
    let Ok(mut conn) = app.db.get().await else {
        return true;
    };
    match crate::store::sessions::with_user(&mut conn, session_id).await {
        Ok(Some((session, user))) => {
            session.is_live(crate::clock::db_now(app.clock.as_ref())) && user.is_active
        }
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Whether a stream forwards an update: the events stream (`user` given) only that user's
/// environments' status changes; a logs stream everything of its environment.
fn for_this_stream(update: &EnvUpdate, user: Option<&str>) -> bool {
    match user {
        Some(me) => update.owner == me && update.frame.as_status().is_some(),
        None => true,
    }
}

/// Forward a feed (only this user's environments when `user` is given), answer pings, close on
/// idle, close with 1008 `Session ended` when the login session `session_id` ends, and with 1012
/// "reconnect" when this node drains.
async fn live(
    app: &AppState,
    mut ws: Ws,
    mut feed: broadcast::Receiver<EnvUpdate>,
    user: Option<String>,
    session_id: &str,
) {
    let cfg = &app.config.terminals;
    let mut ends = app.actors.session_ends();
    let mut draining = app.actors.draining();
    if !session_live(app, session_id).await {
        close(&mut ws, 1008, "Session ended").await;
        return;
    }
    let mut ping = tokio::time::interval(Duration::from_secs(cfg.ping_interval_seconds));
    ping.tick().await;
    let idle = Duration::from_secs(cfg.idle_timeout_seconds);
    let mut last_heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = async { drop(draining.wait_for(|d| *d).await) } => {
                close(
                    &mut ws,
                    crate::actors::session::DRAIN_CLOSE_CODE,
                    crate::actors::session::DRAIN_CLOSE_REASON,
                )
                .await;
                return;
            }
            ended = ends.recv() => {
                let gone = match ended {
                    Ok(id) => &*id == session_id,
                    Err(broadcast::error::RecvError::Lagged(_)) => !session_live(app, session_id).await,
                    Err(broadcast::error::RecvError::Closed) => {
                        close(&mut ws, 1001, "Server shutting down").await;
                        return;
                    }
                };
                if gone {
                    // What happened before the end is still delivered (an account deletion's
                    // `terminated` changes), then the close.
                    while let Ok(update) = feed.try_recv() {
                        if for_this_stream(&update, user.as_deref())
                            && ws.send(Message::text(update.frame.to_json())).await.is_err()
                        {
                            return;
                        }
                    }
                    close(&mut ws, 1008, "Session ended").await;
                    return;
                }
            }
            update = feed.recv() => match update {
                Ok(update) => {
                    if !for_this_stream(&update, user.as_deref()) {
                        continue;
                    }
                    if ws.send(Message::text(update.frame.to_json())).await.is_err() { return; }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let note = StreamFrame::Info {
                        environment_id: None,
                        message: format!("{n} updates were skipped; refresh to catch up"),
                        timestamp: None,
                    };
                    if ws.send(Message::text(note.to_json())).await.is_err() { return; }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    close(&mut ws, 1000, "Stream ended").await;
                    return;
                }
            },
            msg = ws.next() => {
                last_heard = tokio::time::Instant::now();
                match msg {
                    Some(Ok(Message::Text(text))) => {
                        if matches!(protocol::decode(text.as_str()), Ok(ClientFrame::Ping))
                            && ws.send(Message::text(StreamFrame::Pong.to_json())).await.is_err()
                        {
                            return;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= idle {
                    close(&mut ws, 1000, "Idle timeout").await;
                    return;
                }
                if ws.send(Message::Ping(Bytes::new())).await.is_err() { return; }
            }
        }
    }
}
