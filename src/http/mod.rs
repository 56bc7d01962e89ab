//! The thin hyper front end: accept (connection caps, head deadline) → request id → CORS
//! preflight → route → rate limit → authenticate → bounded, deadlined body → handler → error
//! shape, security headers, metrics, access log. Handlers read the store for queries and send
//! messages into the actor tree for commands. A request for a port preview (by its host, see
//! [`preview`]) is proxied to the environment instead of routed.

pub mod authn;
pub mod conn;
pub mod handlers;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod preview;
pub mod router;
pub mod ws;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::app::{AppState, AuditContext};
use crate::error::{ApiError, ApiResult, ErrorCode, json_body_error};
use authn::AuthUser;
use conn::{HeadDeadline, Held, PerIpConnections, TrustedProxies};
use router::{Access, ROUTER, RouteMatch};

/// A response body: a whole one ([`full`]) or a stream (a file download).
pub type Body = UnsyncBoxBody<Bytes, BodyError>;
/// Why a streamed response body broke off (hyper then cuts the response).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A response body of these bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// TCP keepalive on every accepted socket: a phone that vanished (network switch, tunnel) without
/// a FIN is found within about `TCP_KEEPALIVE_IDLE + 3 × TCP_KEEPALIVE_INTERVAL`, and NAT
/// mappings in between see traffic even when the WebSocket is quiet.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

fn set_keepalive(stream: &tokio::net::TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "could not set TCP keepalive");
    }
}

/// Longest `X-Request-Id` taken from a client; longer or odd ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;
/// After a body proves too large, read and discard at most this much more so the client sees the
/// 413 instead of a reset connection, then give up on the connection.
const OVERSIZE_DRAIN_LIMIT: u64 = 32 * 1024 * 1024;
/// How often idle rate-limit state is pruned.
const LIMITER_HOUSEKEEPING: Duration = Duration::from_secs(60);
/// What a connection over `server.max_connections_per_ip` is told (written without waiting, if
/// the socket takes it at once) before it is closed.
static OVER_CAP_RESPONSE: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let body = serde_json::json!({
        "detail": "Too many connections from this address",
        "code": crate::error::ErrorCode::TooManyConnections,
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nretry-after: 5\r\ncontent-type: application/json\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});
const CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// Everything a handler gets about its request. Owned, so handlers are `'static` futures.
pub struct Ctx {
    pub method: Method,
    pub route: &'static str,
    pub params: Vec<(String, String)>,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// On a route with a streamed body (`Route::streamed_body`) the body itself, unread (and
    /// `body` empty): the handler reads it with bounds of its own.
    pub stream: Option<Incoming>,
    pub ip: IpAddr,
    pub request_id: String,
    pub auth: Option<AuthUser>,
}

impl Ctx {
    pub fn param(&self, name: &str) -> &str {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }

    /// The request body as JSON of type `T` (400 malformed, 422 wrong shape).
    pub fn json<T: DeserializeOwned>(&self) -> ApiResult<T> {
        if self.body.is_empty() {
            return Err(ApiError::validation(vec![crate::error::FieldError::new(
                "body",
                "required",
                "A JSON body is required",
            )]));
        }
        // Parsed as a value first: malformed JSON is a 400; a body that is not an object (an
        // array would otherwise fill a struct positionally, a string or number be a type error
        // deep in serde) is a 422 on `body`, for every JSON route alike.
        let value: serde_json::Value =
            serde_json::from_slice(&self.body).map_err(|e| json_body_error(&e))?;
        if !value.is_object() {
            return Err(ApiError::validation(vec![crate::error::FieldError::new(
                "body",
                "type",
                "The request body must be a JSON object",
            )]));
        }
        serde_json::from_value(value).map_err(|e| json_body_error(&e))
    }

    /// Like [`Ctx::json`], but an empty body is `T::default()`.
    pub fn json_or_default<T: DeserializeOwned + Default>(&self) -> ApiResult<T> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            Ok(T::default())
        } else {
            self.json()
        }
    }

    /// The query string as `T` (422 naming the parameter when it does not fit).
    pub fn query<T: DeserializeOwned>(&self) -> ApiResult<T> {
        serde_urlencoded::from_str(&self.query).map_err(|e| {
            ApiError::validation(vec![crate::error::FieldError::new(
                "query",
                "invalid",
                e.to_string(),
            )])
        })
    }

    /// The authenticated caller (present on every route whose access is not public).
    pub fn user(&self) -> ApiResult<&AuthUser> {
        self.auth
            .as_ref()
            .ok_or_else(|| ApiError::unauthorized("Not authenticated"))
    }

    pub fn audit(&self) -> AuditContext {
        AuditContext {
            ip: Some(self.ip.to_string()),
            request_id: Some(self.request_id.clone()),
        }
    }

    pub fn user_agent(&self) -> Option<String> {
        self.headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(256).collect())
    }
}

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub fn ok<T: Serialize>(value: &T) -> ApiResult<Response<Body>> {
    Ok(json(StatusCode::OK, value))
}

pub fn text(content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(full(body));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn error_response(err: &ApiError) -> Response<Body> {
    let mut resp = json(err.status, &err.body());
    for (name, value) in &err.headers {
        resp.headers_mut().insert(name.clone(), value.clone());
    }
    if let Some(seconds) = err.retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    resp
}

/// What the accept loop shares with every connection: who is a trusted proxy and how many
/// connections each client address holds.
struct Front {
    trusted: TrustedProxies,
    per_ip: Arc<PerIpConnections>,
}

/// Serve until `shutdown` resolves, then drain in-flight requests for at most the configured
/// drain timeout and cut what is left.
///
/// Admission: at most `server.max_connections` connections at once (further clients wait in the
/// listen backlog), and at most `server.max_connections_per_ip` from one client address (further
/// ones get a 503 written without waiting and are closed at once), so one address cannot take the
/// slots of others. Connections from `server.trusted_proxies` are exempt from the per-address cap.
pub async fn serve(
    listener: TcpListener,
    app: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(app.config.server.max_connections as usize));
    let front = Arc::new(Front {
        trusted: TrustedProxies::new(app.config.trusted_proxies()),
        per_ip: PerIpConnections::new(app.config.server.max_connections_per_ip),
    });
    let mut connections = JoinSet::new();
    let mut housekeeping = tokio::time::interval(LIMITER_HOUSEKEEPING);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next() => {}
            _ = housekeeping.tick() => {
                app.limits.housekeeping();
                app.previews.housekeeping();
            }
            permit = permits.clone().acquire_owned() => {
                let Ok(permit) = permit else { break };
                let accepted = tokio::select! {
                    _ = &mut shutdown => break,
                    accepted = listener.accept() => accepted,
                };
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let peer_ip = peer.ip().to_canonical();
                let slot = if front.trusted.contains(peer_ip) {
                    None
                } else {
                    match front.per_ip.try_acquire(peer_ip) {
                        Some(slot) => Some(slot),
                        None => {
                            refuse_over_cap(&app, stream, peer_ip);
                            continue;
                        }
                    }
                };
                let _ = stream.set_nodelay(true);
                set_keepalive(&stream);
                let stream = Held::new(stream, permit, slot);
                connections.spawn(serve_connection(
                    app.clone(),
                    front.clone(),
                    stream,
                    peer,
                    stop_rx.clone(),
                ));
            }
        }
    }
    let _ = stop_tx.send(true);
    drop(listener);
    let drain = Duration::from_secs(app.config.server.drain_timeout_seconds);
    let drained = tokio::time::timeout(drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            remaining = connections.len(),
            "drain timeout reached; closing remaining connections"
        );
        connections.shutdown().await;
    }
    tracing::info!("HTTP front end stopped");
}

/// Tell a connection over the per-address cap so (if its socket takes the bytes at once) and
/// close it; never waits on the client.
fn refuse_over_cap(app: &AppState, stream: TcpStream, ip: IpAddr) {
    let _ = stream.try_write(&OVER_CAP_RESPONSE);
    app.metrics.connection_closed("per_ip_cap");
    tracing::debug!(%ip, "connection refused: per-address connection cap reached");
}

/// One connection: hyper-util's auto builder (HTTP/1.1 or HTTP/2 by the client's preface), with
/// the head deadline running from accept, the preface read included, and after every response.
/// A connection whose deadline passes is dropped (closed) wherever it is.
async fn serve_connection(
    app: AppState,
    front: Arc<Front>,
    stream: Held<TcpStream>,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let server = &app.config.server;
    let deadline = HeadDeadline::from_accept(
        Duration::from_secs(server.header_read_timeout_seconds),
        Duration::from_secs(server.keep_alive_timeout_seconds),
    );
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // hyper's own header timer would also count keep-alive idle time against the head timeout;
    // `HeadDeadline` covers both, each with its own setting.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    builder.http2().timer(TokioTimer::new());
    let service = {
        let app = app.clone();
        let deadline = deadline.clone();
        hyper::service::service_fn(move |req| {
            let (app, front, deadline) = (app.clone(), front.clone(), deadline.clone());
            async move {
                // A preview (by host, or by path when enabled) is proxied, not routed.
                if let Some(target) = preview::target(&app.config.server, &req) {
                    let ip = conn::client_ip(&front.trusted, peer.ip(), req.headers());
                    let trusted = front.trusted.contains(peer.ip().to_canonical());
                    return Ok(preview::serve(app, deadline, ip, trusted, req, target).await);
                }
                handle(app, front, deadline, peer, req).await
            }
        })
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let expired = deadline.expired();
    tokio::pin!(expired);
    tokio::select! {
        _ = conn.as_mut() => return,
        which = expired.as_mut() => {
            app.metrics.connection_closed(which.label());
            tracing::debug!(%peer, reason = which.label(), "connection closed by deadline");
            return;
        }
        _ = stop.wait_for(|stopping| *stopping) => {}
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn => {}
        which = expired => app.metrics.connection_closed(which.label()),
    }
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| {
            !s.is_empty()
                && s.len() <= MAX_REQUEST_ID_LEN
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

async fn handle(
    app: AppState,
    front: Arc<Front>,
    deadline: HeadDeadline,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let _in_flight = deadline.request_started();
    let started = Instant::now();
    let request_id = request_id(req.headers());
    let ip = conn::client_ip(&front.trusted, peer.ip(), req.headers());
    let origin = req.headers().get(header::ORIGIN).cloned();
    let method = req.method().clone();
    let path = req.uri().path().to_string();

    let (route, result) = dispatch(&app, req, ip, &request_id).await;
    let mut resp = match result {
        // A streamed body (a download) is still being sent when this returns: the request stays
        // in flight until it is done, or the keep-alive deadline would cut it.
        Ok(resp) if hyper::body::Body::size_hint(resp.body()).exact().is_none() => {
            let in_flight = deadline.request_started();
            resp.map(|body| {
                body.map_frame(move |frame| {
                    let _ = &in_flight;
                    frame
                })
                .boxed_unsync()
            })
        }
        Ok(resp) => resp,
        Err(err) => {
            if let Some(source) = &err.source {
                tracing::error!(request_id = %request_id, route, error = format!("{source:#}"), "request failed");
            }
            error_response(&err)
        }
    };
    finish(&app, &mut resp, &request_id, origin.as_ref());
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        deadline.upgraded();
    }
    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    app.metrics
        .observe(metric_method(&method), route, status, elapsed);
    tracing::info!(
        request_id = %request_id,
        %ip,
        method = %method,
        path = %path,
        status,
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    Ok(resp)
}

pub(crate) fn metric_method(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::HEAD => "HEAD",
        _ => "OTHER",
    }
}

/// Route, limit, read, authenticate, call. Returns the route pattern (for metrics) and the result.
async fn dispatch(
    app: &AppState,
    req: Request<Incoming>,
    ip: IpAddr,
    request_id: &str,
) -> (&'static str, ApiResult<Response<Body>>) {
    if req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return ("preflight", Ok(preflight(app, req.headers())));
    }
    let (route, params) = match ROUTER.find(req.method(), req.uri().path()) {
        RouteMatch::Found(route, params) => (route, params),
        RouteMatch::MethodNotAllowed(allowed) => {
            let mut err = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::MethodNotAllowed,
                "Method not allowed",
            );
            if let Ok(v) = HeaderValue::from_str(&allowed) {
                err.headers.push((header::ALLOW, v));
            }
            return ("unmatched", Err(err));
        }
        RouteMatch::NotFound => return ("unmatched", Err(ApiError::not_found("Not found"))),
    };
    let pattern = route.path;
    if let Err(wait) = app.limits.check(route.rate, ip) {
        return (pattern, Err(ApiError::rate_limited(wait)));
    }
    if let Some(kind) = route.websocket {
        // Authentication happens on the socket, so a refusal is a close frame with a reason.
        return (pattern, ws::upgrade(app, req, kind, params, ip, request_id));
    }
    let (parts, body) = req.into_parts();
    // Authenticate from the headers before a byte of the body is read: a stranger's upload to a
    // route that needs a user costs nothing (hyper closes the connection instead of reading it).
    let auth = if route.access == Access::Public {
        None
    } else {
        match authn::authenticate_headers(app, &parts.headers).await {
            Ok(user) if route.access == Access::Admin && !user.user.is_admin() => {
                return (
                    pattern,
                    Err(ApiError::forbidden(
                        ErrorCode::AdminRequired,
                        "Admin access required",
                    )),
                );
            }
            Ok(user) => Some(user),
            Err(err) => return (pattern, Err(err)),
        }
    };
    if route.streamed_body {
        // The one exception to the body limit: the handler streams it, bounded itself.
        let ctx = Ctx {
            method: parts.method,
            route: pattern,
            params,
            query: parts.uri.query().unwrap_or("").to_string(),
            headers: parts.headers,
            body: Bytes::new(),
            stream: Some(body),
            ip,
            request_id: request_id.to_string(),
            auth,
        };
        return (pattern, (route.handler)(app.clone(), ctx).await);
    }
    let server = &app.config.server;
    let limit = if auth.is_some() {
        server.max_body_bytes
    } else {
        server.max_unauthenticated_body_bytes
    };
    let body_timeout = Duration::from_secs(server.body_timeout_seconds);
    let content_length = parts.headers.get(header::CONTENT_LENGTH);
    let body = match read_body(body, content_length, limit, body_timeout).await {
        Ok(body) => body,
        Err(err) => return (pattern, Err(err)),
    };
    let ctx = Ctx {
        method: parts.method,
        route: pattern,
        params,
        query: parts.uri.query().unwrap_or("").to_string(),
        headers: parts.headers,
        body,
        stream: None,
        ip,
        request_id: request_id.to_string(),
        auth,
    };
    (pattern, (route.handler)(app.clone(), ctx).await)
}

/// Read the body up to `max` bytes within `timeout` of now (the head has arrived). Past `max` the
/// answer is 413, after draining a bounded amount (without keeping it) so the client gets to read
/// it; past the deadline it is 408 (or still 413 when it was already too large), and the
/// connection is closed either way.
async fn read_body(
    mut body: Incoming,
    content_length: Option<&HeaderValue>,
    max: u64,
    timeout: Duration,
) -> ApiResult<Bytes> {
    let close = || (header::CONNECTION, HeaderValue::from_static("close"));
    let too_large = || {
        let mut err = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            format!("Request body is larger than {max} bytes"),
        );
        err.headers.push(close());
        err
    };
    let declared = content_length
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let deadline = tokio::time::Instant::now() + timeout;
    let mut collected = Vec::new();
    let mut seen: u64 = 0;
    let over_from_start = declared.is_some_and(|n| n > max);
    loop {
        let Ok(frame) = tokio::time::timeout_at(deadline, body.frame()).await else {
            if over_from_start || seen > max {
                return Err(too_large());
            }
            let mut err = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::BodyTimeout,
                format!(
                    "The request body did not arrive within {} seconds",
                    timeout.as_secs()
                ),
            );
            err.headers.push(close());
            return Err(err);
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|_| {
            ApiError::bad_request(ErrorCode::BadBody, "The request body could not be read")
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len() as u64;
        if over_from_start || seen > max {
            if seen > max + OVERSIZE_DRAIN_LIMIT {
                break;
            }
            collected = Vec::new();
            continue;
        }
        collected.extend_from_slice(&data);
    }
    if over_from_start || seen > max {
        return Err(too_large());
    }
    Ok(Bytes::from(collected))
}

fn allowed_origin<'a>(app: &AppState, origin: Option<&'a HeaderValue>) -> Option<&'a HeaderValue> {
    let origin = origin?;
    let text = origin.to_str().ok()?;
    let allowed = &app.config.server.allowed_origins;
    allowed
        .iter()
        .any(|a| a == "*" || a == text)
        .then_some(origin)
}

fn preflight(app: &AppState, headers: &HeaderMap) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    if allowed_origin(app, headers.get(header::ORIGIN)).is_some() {
        let h = resp.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, x-request-id"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    resp
}

/// Headers every response carries.
fn finish(
    app: &AppState,
    resp: &mut Response<Body>,
    request_id: &str,
    origin: Option<&HeaderValue>,
) {
    let allowed = allowed_origin(app, origin).cloned();
    let h = resp.headers_mut();
    let set = |h: &mut HeaderMap, name: HeaderName, value: &'static str| {
        h.insert(name, HeaderValue::from_static(value));
    };
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(
        h,
        header::REFERRER_POLICY,
        "strict-origin-when-cross-origin",
    );
    set(h, header::CONTENT_SECURITY_POLICY, CSP);
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, header::CACHE_CONTROL, "no-store");
    }
    if app.config.server.hsts {
        set(
            h,
            header::STRICT_TRANSPORT_SECURITY,
            "max-age=31536000; includeSubDomains",
        );
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-request-id", v);
    }
    if let Some(origin) = allowed {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("x-request-id, retry-after"),
        );
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}
