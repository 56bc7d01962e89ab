//! A server one client cannot take down: the per-address connection cap, the head, keep-alive
//! and body deadlines, authentication before any body is read, the small body limit of the
//! routes read before authentication, and trusted proxies (exempt from the cap, their
//! `X-Forwarded-For` names the client). Clients are raw sockets bound to chosen loopback source
//! addresses (all of 127.0.0.0/8 is local on Linux), so "another client" is another address.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Backend, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

on_both_backends!(
    one_address_cannot_take_the_connections_of_others,
    deadlines_close_idle_slow_and_stalled_connections,
    authentication_comes_before_the_body,
    trusted_proxies_name_the_client_and_others_do_not,
);

const ATTACKER: &str = "127.0.0.1";
const NEIGHBOUR: &str = "127.0.0.2";

/// A TCP connection to the server from `source` (an address of 127.0.0.0/8).
async fn connect_from(source: &str, server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    let local: IpAddr = source.parse().expect("source address");
    socket.bind(SocketAddr::new(local, 0)).expect("bind source");
    socket.connect(server).await.expect("connect")
}

/// A reqwest client whose connections come from `source`.
fn client_from(source: &str, timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(source.parse::<IpAddr>().expect("source address"))
        .timeout(timeout)
        .build()
        .expect("client")
}

/// Read until the server closes the connection (EOF or reset); what it sent meanwhile. Fails if
/// it is still open at `deadline`.
async fn read_until_closed(stream: &mut (impl AsyncReadExt + Unpin), deadline: Instant) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => panic!(
                "connection still open at the deadline; received: {:?}",
                String::from_utf8_lossy(&received)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return received,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// `None` while the server has neither closed `stream` nor sent anything on it (it is being
/// held); otherwise what could be read at once (empty after a close).
fn read_now(stream: &TcpStream) -> Option<Vec<u8>> {
    let mut buf = [0u8; 4096];
    match stream.try_read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Ok(n) => Some(buf[..n].to_vec()),
        Err(_) => Some(Vec::new()),
    }
}

fn still_held(stream: &TcpStream) -> bool {
    read_now(stream).is_none()
}

/// Read one HTTP/1.1 response head and its `Content-Length` body from a raw socket.
async fn read_response(stream: &mut TcpStream, deadline: Instant) -> String {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&received).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if received.len() >= end + 4 + length {
                return text;
            }
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("a response before the deadline")
            .expect("read");
        assert!(n > 0, "closed before a full response: {text:?}");
        received.extend_from_slice(&buf[..n]);
    }
}

fn status_line(response: &[u8]) -> String {
    String::from_utf8_lossy(response)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

/// The value of one sample of the metrics exposition (0 when absent), fetched by `client`.
async fn metric(s: &TestServer, client: &reqwest::Client, sample: &str) -> u64 {
    let text = s.metrics_text(Some(client)).await;
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0)
}

async fn one_address_cannot_take_the_connections_of_others(backend: Backend) {
    // Deadlines far beyond how long this test holds its sockets: what keeps the neighbour served
    // here is the per-address cap, not a deadline.
    let s = TestServer::start_with(backend, |c| {
        c.server.max_connections = 40;
        c.server.max_connections_per_ip = 10;
        c.server.header_read_timeout_seconds = 120;
        c.server.body_timeout_seconds = 120;
    })
    .await;
    let server = s.running().addr;
    let cap = s.config.server.max_connections_per_ip as usize;
    let bound = Duration::from_secs(s.config.server.header_read_timeout_seconds / 2);

    // Slow bodies first (so they are among the connections the cap admits), then twice the
    // server's whole connection budget of idle sockets, all from one address.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = connect_from(ATTACKER, server).await;
        stream
            .write_all(
                b"POST /api/v1/auth/login HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n\
                  content-length: 4000\r\n\r\n{",
            )
            .await
            .expect("write head");
        held.push(stream);
    }
    for _ in 0..2 * s.config.server.max_connections {
        held.push(connect_from(ATTACKER, server).await);
    }

    // Another address is served, again and again, while all of that is held.
    let neighbour = client_from(NEIGHBOUR, bound);
    for _ in 0..5 {
        let resp = neighbour
            .get(s.url("/health"))
            .send()
            .await
            .expect("the neighbour is served while the attacker holds its sockets");
        assert_eq!(resp.status(), StatusCode::OK);
    }
    // A third address, speaking HTTP/2 (the server detects it from the preface).
    let other = reqwest::Client::builder()
        .no_proxy()
        .local_address("127.0.0.3".parse::<IpAddr>().expect("source address"))
        .http2_prior_knowledge()
        .timeout(bound)
        .build()
        .expect("client");
    let resp = other.get(s.url("/health/live")).send().await.expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);

    // The attacker got its cap and no more: the connections past it were told 503 and closed at
    // once; those within it are still held (the deadlines are far away).
    let deadline = Instant::now() + bound;
    let mut refused = 0;
    let mut open = 0;
    for stream in &mut held {
        let Some(mut response) = read_now(stream) else {
            open += 1;
            continue;
        };
        if !response.is_empty() {
            response.extend(read_until_closed(stream, deadline).await);
        }
        let text = String::from_utf8_lossy(&response);
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        assert!(text.contains("retry-after: 5"), "{text}");
        assert!(text.contains("\"code\":\"too_many_connections\""), "{text}");
        refused += 1;
    }
    assert_eq!(open, cap, "the attacker holds exactly its cap");
    assert_eq!(refused, held.len() - cap);
    assert!(
        still_held(&held[0]),
        "the first slow body is among those admitted"
    );
    assert_eq!(
        metric(
            &s,
            &neighbour,
            "devpocket_http_connections_closed_total{reason=\"per_ip_cap\"}"
        )
        .await,
        refused as u64
    );
    // A further connection from the attacker is refused at once too; once it lets go of its
    // sockets, it is served again.
    let mut extra = connect_from(ATTACKER, server).await;
    assert!(status_line(&read_until_closed(&mut extra, deadline).await).contains("503"));
    drop(held);
    let attacker = client_from(ATTACKER, bound);
    let until = Instant::now() + bound;
    loop {
        match attacker.get(s.url("/health")).send().await {
            Ok(resp) if resp.status() == StatusCode::OK => break,
            // The server notices the closed sockets as it reads them.
            other => assert!(
                Instant::now() < until,
                "the attacker's address was not served again: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.stop().await;
}

async fn deadlines_close_idle_slow_and_stalled_connections(backend: Backend) {
    let s = TestServer::start_with(backend, |c| {
        c.server.max_connections = 100;
        c.server.max_connections_per_ip = 20;
        c.server.header_read_timeout_seconds = 2;
        c.server.keep_alive_timeout_seconds = 1;
        c.server.body_timeout_seconds = 2;
    })
    .await;
    let server = s.running().addr;
    let cfg = &s.config.server;
    // Every held socket must be closed by some deadline; generous headroom for a loaded machine.
    let bound = Duration::from_secs(
        5 * (cfg.header_read_timeout_seconds
            + cfg.keep_alive_timeout_seconds
            + cfg.body_timeout_seconds)
            + 30,
    );
    let started = Instant::now();
    let deadline = started + bound;

    // Connected, nothing sent (hyper-util has not even seen a protocol preface).
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(connect_from(ATTACKER, server).await);
    }
    // Half an HTTP/2 preface: still before protocol detection.
    let mut half_preface = connect_from(ATTACKER, server).await;
    half_preface
        .write_all(b"PRI * HTTP/2.0\r\n")
        .await
        .expect("write");
    // One served request, then silence on the kept-alive connection.
    let mut kept_alive = connect_from(ATTACKER, server).await;
    kept_alive
        .write_all(b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .expect("write");
    let first = read_response(&mut kept_alive, deadline).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // A body that stops arriving: 408, readable, then the close.
    let mut stalled = connect_from(ATTACKER, server).await;
    stalled
        .write_all(
            b"POST /api/v1/auth/login HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n\
              content-length: 4000\r\n\r\n{\"username_or_email\":",
        )
        .await
        .expect("write");
    // A head and a body that trickle in (a byte at a time, forever if let). The start of each is
    // sent at once, as a real client would, the rest drips.
    let trickle = move |stream: TcpStream, drip: &'static [u8]| {
        tokio::spawn(async move {
            let (mut read, mut write) = stream.into_split();
            let writer = tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    if write.write_all(drip).await.is_err() {
                        break;
                    }
                }
            });
            let received = read_until_closed(&mut read, deadline).await;
            writer.abort();
            received
        })
    };
    let mut slow = Vec::new();
    for _ in 0..3 {
        let mut stream = connect_from(ATTACKER, server).await;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nx-pad: ")
            .await
            .expect("write");
        slow.push(trickle(stream, b"x"));
    }
    let mut slow_bodies = Vec::new();
    for _ in 0..3 {
        let mut stream = connect_from(ATTACKER, server).await;
        stream
            .write_all(
                b"POST /api/v1/auth/login HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n\
                  content-length: 4000\r\n\r\n{",
            )
            .await
            .expect("write");
        slow_bodies.push(trickle(stream, b" "));
    }

    // Meanwhile another address is served.
    let neighbour = client_from(NEIGHBOUR, bound);
    let resp = neighbour.get(s.url("/health")).send().await.expect("send");
    assert_eq!(resp.status(), StatusCode::OK);

    // Every held socket is closed by a deadline: the head ones without a word, the stalled body
    // with a 408 in the error shape.
    for mut stream in idle {
        assert_eq!(read_until_closed(&mut stream, deadline).await, b"");
    }
    assert_eq!(read_until_closed(&mut half_preface, deadline).await, b"");
    assert_eq!(read_until_closed(&mut kept_alive, deadline).await, b"");
    let answer = read_until_closed(&mut stalled, deadline).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or(""))
        .unwrap_or_else(|e| panic!("json error body ({e}): {text}"));
    assert_eq!(body["code"], "body_timeout");
    assert!(body["detail"].is_string());
    for task in slow {
        let received = task.await.expect("join");
        assert!(
            received.is_empty(),
            "{:?}",
            String::from_utf8_lossy(&received)
        );
    }
    for task in slow_bodies {
        // Closed; a 408 if it could still be read before the close (the drip may reset it).
        let received = task.await.expect("join");
        assert!(
            received.is_empty() || status_line(&received).starts_with("HTTP/1.1 408"),
            "{:?}",
            String::from_utf8_lossy(&received)
        );
    }
    assert_eq!(
        metric(
            &s,
            &neighbour,
            "devpocket_http_requests_total{method=\"POST\",route=\"/api/v1/auth/login\",status=\"408\"}"
        )
        .await,
        4,
        "the stalled and the three trickling bodies timed out"
    );
    assert!(
        metric(
            &s,
            &neighbour,
            "devpocket_http_connections_closed_total{reason=\"head_timeout\"}"
        )
        .await
            >= 9
    );
    assert!(
        metric(
            &s,
            &neighbour,
            "devpocket_http_connections_closed_total{reason=\"keep_alive_timeout\"}"
        )
        .await
            >= 1
    );
    // And the server is as good as new.
    let resp = client_from(ATTACKER, bound)
        .get(s.url("/health"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    s.stop().await;
}

async fn authentication_comes_before_the_body(backend: Backend) {
    let s = TestServer::start(backend).await;
    let server = s.running().addr;
    let cfg = &s.config.server;
    let deadline = Instant::now()
        + Duration::from_secs(
            5 * (cfg.body_timeout_seconds
                + cfg.keep_alive_timeout_seconds
                + cfg.header_read_timeout_seconds),
        );
    // A 10 MB upload to a route that needs a user, without a token or with a bad one: the 401
    // comes after the head alone; not a byte of the body is sent.
    for authorization in ["", "authorization: Bearer not.a.token\r\n"] {
        let mut stream = connect_from(ATTACKER, server).await;
        let head = format!(
            "PUT /api/v1/users/me HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n\
             {authorization}content-length: {}\r\n\r\n",
            10 * 1024 * 1024
        );
        stream.write_all(head.as_bytes()).await.expect("write");
        let response = read_response(&mut stream, deadline).await;
        assert!(response.starts_with("HTTP/1.1 401"), "{response}");
        assert!(response.contains("\"code\""), "{response}");
    }
    // Uploads to a credential route are small: 64 KiB is refused with the error shape.
    let resp = s
        .request(Method::POST, "/api/v1/auth/login", None)
        .header("content-type", "application/json")
        .body(vec![b' '; 64 * 1024])
        .send()
        .await
        .expect("the 413 is readable");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["code"], "payload_too_large");
    assert!(body["detail"].is_string());
    // A signed-in user still gets the large limit (the body is read, then judged as JSON).
    let me = s.register("uploader").await;
    let (status, body) = s
        .send(
            s.request(Method::PUT, "/api/v1/users/me", me.token())
                .header("content-type", "application/json")
                .body(vec![b' '; 64 * 1024]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = s
        .send(
            s.request(Method::PUT, "/api/v1/users/me", me.token())
                .json(&json!({ "full_name": "Up Loader" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    s.stop().await;
}

async fn trusted_proxies_name_the_client_and_others_do_not(backend: Backend) {
    let s = TestServer::start_with(backend, |c| {
        c.server.trusted_proxies = vec![ATTACKER.into()];
        c.server.max_connections = 40;
        c.server.max_connections_per_ip = 5;
        c.server.header_read_timeout_seconds = 120;
        c.rate_limit.auth_per_minute = 2;
    })
    .await;
    let server = s.running().addr;
    let bound = Duration::from_secs(s.config.server.header_read_timeout_seconds / 2);
    let admin = s.admin("root").await;
    let proxy = client_from(ATTACKER, bound);
    let direct = client_from(NEIGHBOUR, bound);
    let login = |client: &reqwest::Client, forwarded: &str| {
        client
            .post(s.url("/api/v1/auth/login"))
            .header("x-forwarded-for", forwarded)
            .json(&json!({ "username_or_email": "nobody", "password": "wrong-password" }))
            .send()
    };
    // Through the trusted proxy, each forwarded client has its own credential quota; a client
    // cannot pick its address by writing its own entry in front.
    for _ in 0..2 {
        let resp = login(&proxy, "198.51.100.1, 203.0.113.1")
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    let resp = login(&proxy, "198.51.100.2, 203.0.113.1")
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
    let resp = login(&proxy, "203.0.113.2").await.expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "another client");
    // A peer that is not a trusted proxy is one client whatever it forwards.
    for (i, expected) in [
        StatusCode::UNAUTHORIZED,
        StatusCode::UNAUTHORIZED,
        StatusCode::TOO_MANY_REQUESTS,
    ]
    .into_iter()
    .enumerate()
    {
        let resp = login(&direct, &format!("203.0.113.{}", 10 + i))
            .await
            .expect("send");
        assert_eq!(resp.status(), expected, "attempt {i}");
    }
    // The audit log names the same client address as the rate limits.
    let (status, page) = s
        .get("/api/v1/admin/audit?event=login_failed", admin.token())
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let mut ips: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|e| e["ip_address"].as_str())
        .collect();
    ips.sort_unstable();
    assert_eq!(
        ips,
        vec![
            NEIGHBOUR,
            NEIGHBOUR,
            "203.0.113.1",
            "203.0.113.1",
            "203.0.113.2"
        ]
    );

    // The proxy is exempt from the per-address cap: far more than the cap of its connections
    // are held, and it is still served.
    let cap = s.config.server.max_connections_per_ip as usize;
    let mut held = Vec::new();
    for _ in 0..3 * cap {
        held.push(connect_from(ATTACKER, server).await);
    }
    let resp = proxy.get(s.url("/health")).send().await.expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(held.iter().all(still_held), "none was refused");
    // Not so for an untrusted peer.
    let mut direct_held = Vec::new();
    for _ in 0..cap {
        direct_held.push(connect_from(NEIGHBOUR, server).await);
    }
    let mut over = connect_from(NEIGHBOUR, server).await;
    let deadline = Instant::now() + bound;
    assert!(status_line(&read_until_closed(&mut over, deadline).await).contains("503"));
    s.stop().await;
}
