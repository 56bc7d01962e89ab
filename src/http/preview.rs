//! Port previews: a reverse proxy from a browser to a TCP port inside an environment, over an SSH
//! `direct-tcpip` channel (the node's own SSH connection to the environment, cached per
//! environment).
//!
//! Addressing: host-based, `{port}--{environment_id}.<server.preview_domain>` (each preview its own
//! browser origin); path-based `/preview/{environment_id}/{port}/…` only when
//! `server.preview_path_based` is on (all such previews share the API's origin).
//!
//! Access: a public port answers anyone with the URL. A private one (the default) needs the
//! preview cookie: `POST /api/v1/environments/{id}/ports/{port}/open` gives a URL carrying a
//! one-time code ([`CODE_PARAM`]); visiting it spends the code, sets [`COOKIE`] (HttpOnly,
//! SameSite=Lax, Secure behind TLS, scoped to that preview's host or path) and redirects to the
//! clean URL. Each request checks the cookie's grant: not expired, its login session still live
//! (logout or revocation ends it), issued to the environment's owner for this port. The cookie
//! is never passed on to the app.
//!
//! Proxying: HTTP/1.1 to the app with the request's own `Host` and `X-Forwarded-For/-Host/
//! -Proto` (and `-Prefix` when path-based); bodies stream both ways (server-sent events arrive as
//! sent); WebSocket (any) upgrades are bridged byte for byte; the app's response headers are
//! kept as they are (none of the API's security headers are added). Bounds: the response head
//! within `server.preview_response_timeout_seconds`, silence both ways at most
//! `server.preview_idle_timeout_seconds`, request bodies at most `server.max_body_bytes`, a
//! response head at most [`MAX_HEAD_BYTES`], a rate limit of its own per client IP
//! (`server.preview_per_minute`). Nothing listening → 502 with a readable page.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::NaiveDateTime;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::conn::{HeadDeadline, InFlight};
use crate::actors::environment::machine::Status;
use crate::app::{App, AppState};
use crate::clock::db_now;
use crate::config::ServerConfig;
use crate::ssh::SshClient;
use crate::store::previews::{self, Grant, KIND_COOKIE};

pub use super::BodyError as BoxError;
/// The body of every response the front end sends (the API's, a download, a proxied stream).
pub type ProxyBody = super::Body;

/// The preview cookie's name (host-only; on a path-based preview scoped to its path).
pub const COOKIE: &str = "devpocket_preview";
/// The query parameter carrying a one-time code.
pub const CODE_PARAM: &str = "devpocket_preview_code";
/// How long a one-time code may wait to be visited.
pub const CODE_TTL: chrono::Duration = chrono::Duration::minutes(2);
/// Environments whose SSH connection is kept for previews (one per environment); past this the
/// least recently used is dropped (it reconnects on its next request). Well below the local
/// provider's SSH server's connection slots, which terminals need too.
const MAX_CLIENTS: usize = 32;
/// A kept connection unused this long is dropped by the housekeeping pass (channels still open on
/// it keep it alive until they end).
const CLIENT_IDLE: Duration = Duration::from_secs(300);
/// Largest response head read from an app (hyper's read buffer); bigger heads are a 502.
pub const MAX_HEAD_BYTES: usize = 256 * 1024;
/// How often an open stream or WebSocket of a preview checks that its access still holds (a
/// store query each time): logout, a revoked session or a port made private ends it within this.
const ACCESS_RECHECK: Duration = Duration::from_secs(5);
/// Preview cookies of one request checked at most (each is a store lookup).
const MAX_COOKIES: usize = 4;
/// Copy buffer per direction of an upgraded (WebSocket) connection.
const BRIDGE_BUFFER: usize = 16 * 1024;
/// Headers of one hop, never passed on (RFC 9110 §7.6.1), except `Connection`/`Upgrade` of an
/// upgrade.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Preview state of one server: its rate limiter and its SSH connections to environments.
pub struct Previews {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    enabled: bool,
    clock: DefaultClock,
    /// environment id → connection; the lock is never held across an `.await`.
    clients: Mutex<HashMap<String, Cached>>,
    /// environment id → the lock one connect to it holds: requests that find no connection wait
    /// for the one being made instead of each opening their own (a burst of first requests would
    /// otherwise take every slot of the local SSH server). Only environments being connected to.
    connecting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

struct Cached {
    client: SshClient,
    used: Instant,
}

impl Previews {
    pub fn new(server: &ServerConfig, rate_limits_enabled: bool) -> Self {
        let n = NonZeroU32::new(server.preview_per_minute).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::keyed(Quota::per_minute(n)),
            enabled: rate_limits_enabled,
            clock: DefaultClock::default(),
            clients: Mutex::default(),
            connecting: Mutex::default(),
        }
    }

    /// `Err(seconds)` to wait when `ip` is over the preview quota.
    fn check_rate(&self, ip: IpAddr) -> Result<(), u64> {
        if !self.enabled {
            return Ok(());
        }
        self.limiter.check_key(&ip).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
        })
    }

    /// Forget clients whose quota is full again, and connections closed or unused for
    /// [`CLIENT_IDLE`].
    pub fn housekeeping(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.clients()
            .retain(|_, c| !c.client.is_closed() && c.used.elapsed() < CLIENT_IDLE);
        // Locks left by a request that went away while connecting.
        self.connecting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, lock| Arc::strong_count(lock) > 1);
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This node's SSH connection to a running environment (made on first use, through the
    /// environment's actor, which knows its address and keys).
    pub async fn client(&self, app: &App, environment_id: &str) -> Result<SshClient, String> {
        if let Some(client) = self.cached(environment_id) {
            return Ok(client);
        }
        let lock = self
            .connecting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(environment_id.to_string())
            .or_default()
            .clone();
        let result = {
            let _one_at_a_time = lock.lock().await;
            match self.cached(environment_id) {
                Some(client) => Ok(client),
                None => self.connect(app, environment_id).await,
            }
        };
        let mut connecting = self.connecting.lock().unwrap_or_else(|e| e.into_inner());
        // Ours and the map's: nobody else waits on it (clones are made under this lock).
        if Arc::strong_count(&lock) == 2 {
            connecting.remove(environment_id);
        }
        result
    }

    /// The kept, open connection to an environment, marked used.
    fn cached(&self, environment_id: &str) -> Option<SshClient> {
        let mut clients = self.clients();
        let cached = clients
            .get_mut(environment_id)
            .filter(|c| !c.client.is_closed())?;
        cached.used = Instant::now();
        Some(cached.client.clone())
    }

    async fn connect(&self, app: &App, environment_id: &str) -> Result<SshClient, String> {
        let target = match app.actors.ssh_target(environment_id).await {
            Ok(Ok(target)) => target,
            Ok(Err(e)) => return Err(format!("{e:#}")),
            Err(_) => return Err("the environment is busy; try again".into()),
        };
        let client = SshClient::connect(&target)
            .await
            .map_err(|e| e.to_string())?;
        let mut clients = self.clients();
        if clients.len() >= MAX_CLIENTS {
            clients.retain(|_, c| !c.client.is_closed());
            let oldest = clients
                .iter()
                .min_by_key(|(_, c)| c.used)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                clients.remove(&oldest);
            }
        }
        let cached = Cached {
            client: client.clone(),
            used: Instant::now(),
        };
        clients.insert(environment_id.to_string(), cached);
        Ok(client)
    }

    /// Drop the cached connection to an environment (after a failure on it).
    pub fn forget(&self, environment_id: &str) {
        self.clients().remove(environment_id);
    }
}

/// Which preview a request is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub environment_id: String,
    pub port: u16,
    /// Path-based: the prefix (`/preview/{id}/{port}`) stripped before the request is passed on.
    pub prefix: Option<String>,
}

/// The preview a request names, if any: by its host (`{port}--{id}.<preview_domain>`), or by
/// its path when path-based previews are on.
pub fn target<B>(server: &ServerConfig, req: &Request<B>) -> Option<Target> {
    if let Some(t) = request_host(req).and_then(|h| target_of_host(&server.preview_domain, &h)) {
        return Some(t);
    }
    if server.preview_path_based {
        return target_of_path(req.uri().path());
    }
    None
}

/// The request's host, lower-cased, without a port.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = match req.uri().host() {
        Some(host) => host.to_string(),
        None => req.headers().get(header::HOST)?.to_str().ok()?.to_string(),
    };
    let authority: http::uri::Authority = raw.parse().ok()?;
    Some(authority.host().to_ascii_lowercase())
}

fn target_of_host(domain: &str, host: &str) -> Option<Target> {
    let label = host.strip_suffix(domain)?.strip_suffix('.')?;
    let (port, id) = label.split_once("--")?;
    let port = parse_port(port)?;
    // Only the canonical spelling (lower-case, hyphenated): one preview, one origin.
    let canonical = uuid::Uuid::parse_str(id).ok()?.to_string();
    (canonical == id).then_some(Target {
        environment_id: canonical,
        port,
        prefix: None,
    })
}

fn target_of_path(path: &str) -> Option<Target> {
    let rest = path.strip_prefix("/preview/")?;
    let mut parts = rest.splitn(3, '/');
    let given = parts.next()?;
    // Only the canonical spelling, as for hosts (the prefix and the cookie's path are it).
    let id = uuid::Uuid::parse_str(given).ok()?.to_string();
    if id != given {
        return None;
    }
    let port_text = parts.next()?;
    let port = parse_port(port_text)?;
    Some(Target {
        prefix: Some(format!("/preview/{id}/{port_text}")),
        environment_id: id,
        port,
    })
}

/// A TCP port 1-65535 in plain decimal, without leading zeros (one port, one spelling: `08000--…`
/// would be a second origin for the same preview).
pub fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty()
        || text.len() > 5
        || text.starts_with('0')
        || !text.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    text.parse::<u16>().ok().filter(|p| *p != 0)
}

/// Scheme of the client's view: https behind TLS (`server.hsts`, or a proxy saying so).
pub fn scheme(server: &ServerConfig, headers: &HeaderMap) -> &'static str {
    let forwarded_https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    if server.hsts || forwarded_https {
        "https"
    } else {
        "http"
    }
}

/// The preview's URL as the client reaching the API at `api_host` (its `Host`, port included)
/// should open it: host-based, or path-based on the API's origin when `path_based`.
pub fn preview_url(
    server: &ServerConfig,
    headers: &HeaderMap,
    environment_id: &str,
    port: u16,
    path_based: bool,
) -> String {
    let scheme = scheme(server, headers);
    let api_host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok());
    if path_based {
        let authority = api_host.map_or_else(|| "localhost".to_string(), |a| a.to_string());
        return format!("{scheme}://{authority}/preview/{environment_id}/{port}/");
    }
    let api_port = api_host
        .and_then(|a| a.port_u16())
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    format!(
        "{scheme}://{port}--{environment_id}.{}{api_port}/",
        server.preview_domain
    )
}

/// Serve one preview request, whatever happens (errors are pages); the connection's head
/// deadline stays lifted until the response body has ended.
pub async fn serve(
    app: AppState,
    deadline: HeadDeadline,
    ip: IpAddr,
    peer_trusted: bool,
    req: Request<Incoming>,
    target: Target,
) -> Response<ProxyBody> {
    // Only a trusted proxy says whether the browser used TLS.
    let https = app.config.server.hsts
        || (peer_trusted && scheme(&app.config.server, req.headers()) == "https");
    let visitor = Visitor { ip, https };
    let in_flight = deadline.request_started();
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = match proxy(&app, &deadline, visitor, req, &target).await {
        Ok(resp) => resp,
        Err(page) => page.response(),
    };
    let elapsed = started.elapsed();
    app.metrics.observe(
        super::metric_method(&method),
        "preview",
        resp.status().as_u16(),
        elapsed,
    );
    tracing::info!(
        %ip,
        method = %method,
        environment_id = %target.environment_id,
        port = target.port,
        path = %path,
        status = resp.status().as_u16(),
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        "preview request"
    );
    let idle = Duration::from_secs(app.config.server.preview_idle_timeout_seconds);
    resp.map(|body| Watched::new(body, idle, in_flight).boxed_unsync())
}

/// A buffered response of the proxy's own (a page, a redirect) as a [`ProxyBody`].
pub fn boxed(resp: Response<Full<Bytes>>) -> Response<ProxyBody> {
    resp.map(|body| {
        body.map_err(|never: Infallible| match never {})
            .boxed_unsync()
    })
}

/// A response of the preview proxy itself: a small readable page.
#[derive(Debug)]
pub struct Page {
    status: StatusCode,
    title: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl Page {
    fn new(status: StatusCode, title: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            title,
            message: message.into(),
            retry_after: None,
        }
    }

    fn response(self) -> Response<ProxyBody> {
        let html = format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\"><title>{title}</title></head><body style=\"font-family:sans-serif;max-width:36em;margin:3em auto;padding:0 1em\"><h1>{title}</h1><p>{message}</p><p style=\"color:#777\">DevPocket preview &middot; {status}</p></body></html>",
            title = escape(self.title),
            message = escape(&self.message),
            status = self.status,
        );
        let mut resp = Response::new(Full::new(Bytes::from(html)));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        // Our own pages (not the app's) cannot be framed and run nothing.
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
            ),
        );
        if let Some(seconds) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        boxed(resp)
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn not_found() -> Page {
    Page::new(
        StatusCode::NOT_FOUND,
        "No such preview",
        "There is no preview at this address.",
    )
}

fn unavailable(e: impl std::fmt::Display) -> Page {
    tracing::error!(error = %e, "preview: store unavailable");
    Page::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "Preview unavailable",
        "The server cannot check access right now; try again shortly.",
    )
}

/// Who is asking: the client's address and whether it reached us over TLS.
#[derive(Debug, Clone, Copy)]
struct Visitor {
    ip: IpAddr,
    https: bool,
}

/// Authorize, then pass the request on.
async fn proxy(
    app: &AppState,
    deadline: &HeadDeadline,
    visitor: Visitor,
    req: Request<Incoming>,
    target: &Target,
) -> Result<Response<ProxyBody>, Page> {
    if let Err(wait) = app.previews.check_rate(visitor.ip) {
        let mut page = Page::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many requests",
            "This preview is getting more requests from you than allowed; slow down.",
        );
        page.retry_after = Some(wait);
        return Err(page);
    }
    if let Some(prefix) = &target.prefix
        && req.uri().path() == prefix
    {
        // The cookie's path ends with a slash: send the browser where it applies.
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        return Ok(redirect(
            StatusCode::PERMANENT_REDIRECT,
            &format!("{prefix}/{query}"),
        ));
    }
    let now = db_now(app.clock.as_ref());
    let mut conn = app.db.get().await.map_err(unavailable)?;
    let env = crate::store::environments::get(&mut conn, &target.environment_id)
        .await
        .map_err(unavailable)?
        .ok_or_else(not_found)?;
    let port = i32::from(target.port);
    if let Some(code) = query_value(req.uri(), CODE_PARAM) {
        let grant = previews::redeem_code(&mut conn, &hash(&code), now)
            .await
            .map_err(unavailable)?
            .filter(|g| g.environment_id == env.id && g.port == port && g.user_id == env.user_id)
            .ok_or_else(|| {
                Page::new(
                    StatusCode::UNAUTHORIZED,
                    "Link expired",
                    "This preview link has expired or was already used. Open the preview again from DevPocket.",
                )
            })?;
        return exchange_code(app, &mut conn, &req, visitor, target, grant, now).await;
    }
    let access = Access {
        environment_id: env.id.clone(),
        user_id: env.user_id.clone(),
        port,
        cookies: cookie_values(req.headers())
            .iter()
            .map(|t| hash(t))
            .collect(),
    };
    if !access.allowed(&mut conn, now).await.map_err(unavailable)? {
        return Err(Page::new(
            StatusCode::UNAUTHORIZED,
            "Private preview",
            "This preview is private. Open it from DevPocket (it signs this browser in), or ask its owner to make it public.",
        ));
    }
    drop(conn);
    if env.status != Status::Running {
        return Err(Page::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Environment not running",
            format!(
                "The environment is {}; start it to see this preview.",
                env.status
            ),
        ));
    }
    forward(app, deadline, visitor, req, target, access).await
}

/// What let a request in: the port is public, or one of its preview cookies (their hashes) is a
/// live grant of the environment's owner for this port. Checked again every [`ACCESS_RECHECK`]
/// while a response streams or a WebSocket is open, so that logout, a revoked session or a port
/// made private also ends what is already open.
#[derive(Debug, Clone)]
struct Access {
    environment_id: String,
    user_id: String,
    port: i32,
    cookies: Vec<String>,
}

impl Access {
    async fn allowed(
        &self,
        conn: &mut crate::store::DbConn,
        now: NaiveDateTime,
    ) -> crate::store::StoreResult<bool> {
        if previews::is_public(conn, &self.environment_id, self.port).await? {
            return Ok(true);
        }
        for token_hash in &self.cookies {
            let granted = previews::live_grant(conn, token_hash, KIND_COOKIE, now)
                .await?
                .is_some_and(|g| {
                    g.environment_id == self.environment_id
                        && g.port == self.port
                        && g.user_id == self.user_id
                });
            if granted {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// A future that ends once this access no longer holds (checked every [`ACCESS_RECHECK`]; a
    /// store that cannot answer keeps it, as a request would be refused only with a 503).
    fn revoked(self, app: AppState) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            loop {
                tokio::time::sleep(ACCESS_RECHECK).await;
                let now = db_now(app.clock.as_ref());
                let Ok(mut conn) = app.db.get().await else {
                    continue;
                };
                if let Ok(false) = self.allowed(&mut conn, now).await {
                    tracing::info!(
                        environment_id = %self.environment_id,
                        port = self.port,
                        "preview: access ended; closing its open stream"
                    );
                    return;
                }
            }
        })
    }
}

/// A proxied response body that ends (with an error: the client sees it cut) once its
/// [`Access`] is revoked.
struct Revocable {
    inner: ProxyBody,
    revoked: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl hyper::body::Body for Revocable {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.revoked.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err("preview access ended".into())));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Spend the code: store a cookie grant tied to the same session, set it, and redirect to the
/// URL without the code.
async fn exchange_code(
    app: &App,
    conn: &mut crate::store::DbConn,
    req: &Request<Incoming>,
    visitor: Visitor,
    target: &Target,
    code: Grant,
    now: NaiveDateTime,
) -> Result<Response<ProxyBody>, Page> {
    let hours = app.config.server.preview_cookie_hours;
    let token = crate::secrets::random_token::<32>();
    let grant = Grant {
        token_hash: hash(&token),
        kind: KIND_COOKIE.to_string(),
        expires_at: now + chrono::Duration::hours(hours.into()),
        created_at: now,
        ..code
    };
    previews::insert_grant(conn, &grant, now)
        .await
        .map_err(unavailable)?;
    let path = target
        .prefix
        .as_deref()
        .map_or("/".to_string(), |p| format!("{p}/"));
    let secure = if visitor.https { "; Secure" } else { "" };
    let cookie = format!(
        "{COOKIE}={token}; Path={path}; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
        u64::from(hours) * 3600
    );
    let mut resp = redirect(StatusCode::SEE_OTHER, &without_param(req.uri(), CODE_PARAM));
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

/// A redirect to `location` (a path and query on this host) that leaks no referrer.
fn redirect(status: StatusCode, location: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(location) {
        h.insert(header::LOCATION, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    boxed(resp)
}

fn hash(token: &str) -> String {
    crate::auth::tokens::hash_refresh_token(token)
}

/// The first value of query parameter `name`.
fn query_value(uri: &Uri, name: &str) -> Option<String> {
    let query = uri.query()?;
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// The path and query of `uri` without parameter `name`.
fn without_param(uri: &Uri, name: &str) -> String {
    let path = uri.path();
    let kept: Vec<&str> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty() && p.split('=').next() != Some(name))
        .collect();
    if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

/// The values of the preview cookies a request carries, at most [`MAX_COOKIES`]: a page on a
/// sibling host may have set one of our name for a parent domain, and must not shadow ours.
fn cookie_values(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
        .take(MAX_COOKIES)
        .collect()
}

/// The `Cookie` header without ours (the app never sees the preview credential).
fn strip_cookie(headers: &mut HeaderMap) {
    let rest: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty() && pair.split('=').next() != Some(COOKIE))
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if let (false, Ok(v)) = (rest.is_empty(), HeaderValue::from_str(&rest.join("; "))) {
        headers.insert(header::COOKIE, v);
    }
}

fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Remove hop-by-hop headers, and those `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

fn too_large(limit: usize) -> Page {
    Page::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "Request too large",
        format!("Previews take request bodies of at most {limit} bytes."),
    )
}

/// Whether a failed exchange failed because the request body passed the limit.
fn over_limit(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

fn bad_gateway(message: impl Into<String>) -> Page {
    Page::new(StatusCode::BAD_GATEWAY, "Nothing to show yet", message)
}

/// The request as the app gets it: origin-form URI (prefix stripped), its own headers without
/// hop-by-hop ones and our cookie, `Host` and `X-Forwarded-*`.
fn outgoing_request(
    app: &App,
    visitor: Visitor,
    req: Request<Incoming>,
    target: &Target,
    upgrade: bool,
) -> Result<Request<ProxyBody>, Page> {
    let (parts, body) = req.into_parts();
    let host = parts
        .uri
        .authority()
        .map(ToString::to_string)
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let mut path = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    if let Some(prefix) = &target.prefix {
        path = path.strip_prefix(prefix.as_str()).unwrap_or("").to_string();
        if !path.starts_with('/') {
            path.insert(0, '/');
        }
    }
    let uri: Uri = path.parse().map_err(|_| not_found())?;
    let mut headers = parts.headers;
    let upgrade_to = headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut headers);
    strip_cookie(&mut headers);
    if let (true, Some(protocol)) = (upgrade, upgrade_to) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
    // What the client claims about proxies before us is not passed on; we say what we saw.
    for name in [
        "forwarded",
        "x-forwarded-prefix",
        "x-forwarded-port",
        "x-real-ip",
    ] {
        headers.remove(name);
    }
    let scheme = if visitor.https { "https" } else { "http" };
    let set = |headers: &mut HeaderMap, name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    set(&mut headers, "host", &host);
    set(&mut headers, "x-forwarded-host", &host);
    set(&mut headers, "x-forwarded-proto", scheme);
    set(&mut headers, "x-forwarded-for", &visitor.ip.to_string());
    if let Some(prefix) = &target.prefix {
        set(&mut headers, "x-forwarded-prefix", prefix);
    }
    let limit = usize::try_from(app.config.server.max_body_bytes).unwrap_or(usize::MAX);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.config.server.max_body_bytes) {
        return Err(too_large(limit));
    }
    let body = Limited::new(body, limit).boxed_unsync();
    let mut out = Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    *out.headers_mut() = headers;
    Ok(out)
}

/// Open a channel to the port, speak HTTP/1.1 over it, hand back the app's response.
async fn forward(
    app: &AppState,
    deadline: &HeadDeadline,
    visitor: Visitor,
    mut req: Request<Incoming>,
    target: &Target,
    access: Access,
) -> Result<Response<ProxyBody>, Page> {
    let timeout = Duration::from_secs(app.config.server.preview_response_timeout_seconds);
    let upgrade = wants_upgrade(req.headers());
    let downstream = upgrade.then(|| hyper::upgrade::on(&mut req));
    let out = outgoing_request(app, visitor, req, target, upgrade)?;
    let exchange = async {
        let stream = open_channel(app, target).await?;
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_HEAD_BYTES)
            .handshake::<_, ProxyBody>(TokioIo::new(stream))
            .await
            .map_err(|e| {
                bad_gateway(format!(
                    "The app on port {} did not speak HTTP: {e}",
                    target.port
                ))
            })?;
        let port = target.port;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(port, error = %e, "preview connection ended");
            }
        });
        let limit = usize::try_from(app.config.server.max_body_bytes).unwrap_or(usize::MAX);
        sender.send_request(out).await.map_err(|e| {
            if over_limit(&e) {
                return too_large(limit);
            }
            bad_gateway(format!(
                "The app on port {} closed the connection without an answer: {e}",
                target.port
            ))
        })
    };
    let mut resp = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| {
            Page::new(
                StatusCode::GATEWAY_TIMEOUT,
                "The app is not answering",
                format!(
                    "The app on port {} did not answer within {} seconds.",
                    target.port,
                    timeout.as_secs()
                ),
            )
        })??;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(downstream) = downstream else {
            return Err(bad_gateway("The app switched protocols unasked."));
        };
        let upstream = hyper::upgrade::on(&mut resp);
        let idle = Duration::from_secs(app.config.server.preview_idle_timeout_seconds);
        deadline.upgraded();
        let revoked = access.revoked(app.clone());
        tokio::spawn(async move {
            match tokio::join!(downstream, upstream) {
                (Ok(down), Ok(up)) => {
                    tokio::select! {
                        () = bridge(TokioIo::new(down), TokioIo::new(up), idle) => {}
                        () = revoked => {}
                    }
                }
                (Err(e), _) | (_, Err(e)) => tracing::debug!(error = %e, "preview upgrade failed"),
            }
        });
        let (mut parts, _) = resp.into_parts();
        let protocol = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(protocol) = protocol {
            parts.headers.insert(header::UPGRADE, protocol);
        }
        return Ok(Response::from_parts(
            parts,
            Empty::new().map_err(|never| match never {}).boxed_unsync(),
        ));
    }
    strip_hop_by_hop(resp.headers_mut());
    let revoked = access.revoked(app.clone());
    Ok(resp.map(|body| {
        Revocable {
            inner: body.map_err(BoxError::from).boxed_unsync(),
            revoked,
        }
        .boxed_unsync()
    }))
}

/// A `direct-tcpip` stream that keeps its SSH connection alive while it is open (the cache may
/// drop the connection meanwhile).
struct Tunnel {
    stream: russh::ChannelStream<russh::client::Msg>,
    _client: SshClient,
}

impl AsyncRead for Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// A `direct-tcpip` stream to the port, on the cached connection or (once) a fresh one.
async fn open_channel(app: &App, target: &Target) -> Result<Tunnel, Page> {
    let env = &target.environment_id;
    for attempt in 0..2 {
        let client = app
            .previews
            .client(app, env)
            .await
            .map_err(|e| bad_gateway(format!("The environment cannot be reached: {e}")))?;
        match client.direct_tcpip(target.port).await {
            Ok(stream) => {
                return Ok(Tunnel {
                    stream,
                    _client: client,
                });
            }
            Err(_) if client.is_closed() && attempt == 0 => app.previews.forget(env),
            Err(_) => break,
        }
    }
    Err(bad_gateway(format!(
        "Nothing in this environment is listening on port {} (or the port is not the environment's own). Start your server, then reload this page.",
        target.port
    )))
}

/// Copy bytes both ways between an upgraded client connection and the app until both sides
/// have ended, or nothing has moved either way for `idle`.
async fn bridge<A, B>(a: A, b: B, idle: Duration)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_rx, mut a_tx) = tokio::io::split(a);
    let (mut b_rx, mut b_tx) = tokio::io::split(b);
    let mut a_buf = vec![0u8; BRIDGE_BUFFER];
    let mut b_buf = vec![0u8; BRIDGE_BUFFER];
    let (mut a_open, mut b_open) = (true, true);
    while a_open || b_open {
        let moved = tokio::time::timeout(idle, async {
            tokio::select! {
                read = a_rx.read(&mut a_buf), if a_open => match read {
                    Ok(n) if n > 0 => b_tx.write_all(&a_buf[..n]).await.map(|()| (true, true)),
                    _ => { let _ = b_tx.shutdown().await; Ok((false, b_open)) }
                },
                read = b_rx.read(&mut b_buf), if b_open => match read {
                    Ok(n) if n > 0 => a_tx.write_all(&b_buf[..n]).await.map(|()| (true, true)),
                    _ => { let _ = a_tx.shutdown().await; Ok((a_open, false)) }
                },
            }
        })
        .await;
        match moved {
            Ok(Ok((true, true))) => {}
            Ok(Ok((a, b))) => {
                a_open &= a;
                b_open &= b;
            }
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// A response body that ends with an error after `idle` without a frame, and holds the
/// connection's in-flight mark until it ends (a long stream is not cut by the keep-alive
/// deadline).
struct Watched {
    inner: ProxyBody,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    _in_flight: InFlight,
}

impl Watched {
    fn new(inner: ProxyBody, idle: Duration, in_flight: InFlight) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            _in_flight: in_flight,
        }
    }
}

impl hyper::body::Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + self.idle;
                self.timer.as_mut().reset(next);
                Poll::Ready(frame)
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err("preview body idle timeout".into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0b7c6c0e-3c5e-4b8e-9a51-1f2d3c4b5a69";

    fn server(path_based: bool) -> ServerConfig {
        let mut s = crate::config::Config::defaults().server;
        s.preview_path_based = path_based;
        s
    }

    fn get(uri: &str, host: &str) -> Request<()> {
        Request::builder()
            .uri(uri)
            .header("host", host)
            .body(())
            .expect("request")
    }

    #[test]
    fn host_based_targets() {
        let s = server(false);
        let t = target(&s, &get("/x", &format!("8000--{ID}.localhost:41234")));
        assert_eq!(
            t,
            Some(Target {
                environment_id: ID.into(),
                port: 8000,
                prefix: None
            })
        );
        let upper = format!("8000--{}.LOCALHOST", ID.to_uppercase());
        assert!(target(&s, &get("/", &upper)).is_some());
        for host in [
            "localhost:8000".to_string(),
            "127.0.0.1".to_string(),
            format!("0--{ID}.localhost"),
            format!("08000--{ID}.localhost"),
            format!("8000--{ID}.localhost."),
            format!("70000--{ID}.localhost"),
            format!("8000--{ID}.evil.localhost.example"),
            format!("8000--{ID}localhost"),
            format!("8000-{ID}.localhost"),
            format!("a.8000--{ID}.localhost"),
            format!("8000--{}.localhost", ID.replace('-', "")),
        ] {
            assert_eq!(target(&s, &get("/", &host)), None, "{host}");
        }
    }

    #[test]
    fn path_based_targets_only_when_enabled() {
        let uri = format!("/preview/{ID}/3000/app/x?y=1");
        assert_eq!(target(&server(false), &get(&uri, "127.0.0.1:8000")), None);
        let t = target(&server(true), &get(&uri, "127.0.0.1:8000")).expect("target");
        assert_eq!(t.port, 3000);
        assert_eq!(t.prefix.as_deref(), Some(&*format!("/preview/{ID}/3000")));
        assert_eq!(target(&server(true), &get("/api/v1/info", "x")), None);
        for other in [
            format!("/preview/{}/3000/", ID.to_uppercase()),
            format!("/preview/{}/3000/", ID.replace('-', "")),
            format!("/preview/{ID}/03000/"),
        ] {
            assert_eq!(target(&server(true), &get(&other, "x")), None, "{other}");
        }
    }

    #[test]
    fn cookies_are_found_and_never_passed_on() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; devpocket_preview=tok; b=2"),
        );
        assert_eq!(cookie_values(&h), vec!["tok".to_string()]);
        strip_cookie(&mut h);
        assert_eq!(h.get(header::COOKIE).expect("kept"), "a=1; b=2");
        let mut only = HeaderMap::new();
        only.insert(
            header::COOKIE,
            HeaderValue::from_static("devpocket_preview=t"),
        );
        strip_cookie(&mut only);
        assert!(!only.contains_key(header::COOKIE));
    }

    #[test]
    fn the_code_leaves_the_url() {
        let uri: Uri = "/a/b?x=1&devpocket_preview_code=abc&y=2"
            .parse()
            .expect("uri");
        assert_eq!(query_value(&uri, CODE_PARAM).as_deref(), Some("abc"));
        assert_eq!(without_param(&uri, CODE_PARAM), "/a/b?x=1&y=2");
        let only: Uri = "/?devpocket_preview_code=abc".parse().expect("uri");
        assert_eq!(without_param(&only, CODE_PARAM), "/");
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn preview_urls_follow_the_api_host() {
        let s = server(false);
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:41234"));
        assert_eq!(
            preview_url(&s, &h, ID, 8000, false),
            format!("http://8000--{ID}.localhost:41234/")
        );
        assert_eq!(
            preview_url(&s, &h, ID, 8000, true),
            format!("http://127.0.0.1:41234/preview/{ID}/8000/")
        );
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert(header::HOST, HeaderValue::from_static("api.example.com"));
        assert_eq!(
            preview_url(&s, &h, ID, 3000, false),
            format!("https://3000--{ID}.localhost/")
        );
    }
}
