//! Port previews (issue 13, part 1), through the real server, the local provider's real SSH server
//! and real programs started in an environment's terminal: the ports API, the host-based proxy
//! (requests carry the preview's `Host`), one-time codes and cookies, public and private ports,
//! refusals (another user, the API's own port, logout), and streaming: a WebSocket echo and
//! server-sent events arriving one by one.

mod support;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::terminal::*;
use support::{Backend, Session, TestServer};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

on_both_backends!(a_private_preview_opens_with_its_code_and_only_for_its_owner);

/// A burst of first requests to a preview shares one SSH connection to the environment: they
/// would otherwise each open their own and take the local SSH server's slots (a few here, so
/// that one connection per request is refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_first_preview_requests_opens_one_connection() {
    if !root() {
        return;
    }
    let s = TestServer::start_with(Backend::Sqlite, |c| c.local.max_ssh_connections = 4).await;
    let alice = s.register("alice").await;
    let env = running_env(&s, &alice, "burst").await;
    let (mut ws, _) = open_terminal(&s, &alice, &env, "").await;
    let port = start_http_server(&mut ws).await;
    set_visibility(&s, &alice, &env, port, "public").await;
    let burst = (0..12).map(|_| status_of(preview(&s, &env, port, "/")));
    let statuses = futures_util::future::join_all(burst).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    drop(ws);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_and_server_sent_events_stream_through_the_preview() {
    streaming(Backend::Sqlite).await
}

/// Lets one user/key pair in; its programs would run as `account`.
struct OneKey {
    key: russh::keys::PublicKey,
    account: Option<(u32, u32)>,
}

impl devpocket::ssh::Authorizer for OneKey {
    fn authorize(
        &self,
        _user: &str,
        key: &russh::keys::PublicKey,
    ) -> Option<devpocket::ssh::SessionSpec> {
        (key.key_data() == self.key.key_data()).then(|| devpocket::ssh::SessionSpec {
            account: self.account,
            ..devpocket::ssh::SessionSpec::new("/".into(), Vec::new(), "/bin/sh".into())
        })
    }
}

/// A TCP echo server in a child process (the server's own uid, but not its sockets).
const ECHO: &str = "import socket\ns=socket.socket()\ns.bind(('127.0.0.1',0))\ns.listen()\nprint(s.getsockname()[1],flush=True)\nc,_=s.accept()\nc.sendall(c.recv(100))\n";

/// The local provider's SSH server on its own: `direct-tcpip` reaches a port of the session's
/// account (here without root: the server's uid, in another process), never a socket of the
/// server process itself, nothing where nothing listens, and nobody else's port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tcpip_reaches_only_the_accounts_own_ports() {
    use std::os::unix::fs::MetadataExt;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let own_uid = std::fs::metadata("/proc/self").expect("proc").uid();
    let host = devpocket::ssh::keys::generate_ed25519();
    let host_key = host.public_key().clone();
    let user_key = std::sync::Arc::new(devpocket::ssh::keys::generate_ed25519());
    let start = |account: Option<(u32, u32)>| {
        let auth = OneKey {
            key: user_key.public_key().clone(),
            account,
        };
        devpocket::ssh::LocalSshServer::start(
            "127.0.0.1:0".parse().expect("addr"),
            host.clone(),
            std::sync::Arc::new(auth),
        )
    };
    let server = start(None).await.expect("server");
    let target = |addr: std::net::SocketAddr| devpocket::ssh::SshTarget {
        host: addr.ip().to_string(),
        port: addr.port(),
        user: "dev".into(),
        key: user_key.clone(),
        host_key: host_key.clone(),
        connect_timeout: WAIT,
    };
    let client = devpocket::ssh::SshClient::connect(&target(server.addr))
        .await
        .expect("connects");

    // A socket of the server's own process (like the API's listener): refused.
    let ours = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let our_port = ours.local_addr().expect("addr").port();
    assert!(client.direct_tcpip(our_port).await.is_err());

    // Another process of the same account: forwarded, bytes both ways.
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", ECHO])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let port: u16 = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("port in time")
        .expect("read")
        .expect("a line")
        .trim()
        .parse()
        .expect("port");
    // Someone else's (an account the session is not): refused, before anything connects.
    let stranger = start(Some((own_uid + 1, own_uid + 1)))
        .await
        .expect("server");
    let other = devpocket::ssh::SshClient::connect(&target(stranger.addr))
        .await
        .expect("connects");
    assert!(other.direct_tcpip(port).await.is_err());
    let mut stream = client.direct_tcpip(port).await.expect("forwarded");
    stream.write_all(b"ping").await.expect("write");
    let mut echoed = [0u8; 4];
    tokio::time::timeout(WAIT, stream.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(&echoed, b"ping");
    drop(stream);
    let _ = tokio::time::timeout(WAIT, child.wait()).await;

    // Nothing listening: refused.
    drop(ours);
    assert!(client.direct_tcpip(our_port).await.is_err());
    client.disconnect().await;
    other.disconnect().await;
    server.stop().await;
    stranger.stop().await;
}

/// A stdlib-only app: `/events` sends one server-sent event, waits until `/next` is requested,
/// sends the second; `/ws` is a WebSocket echo; anything else answers "hello". It prints the
/// port it got (the kernel picks it, so parallel tests never collide).
const APP: &str = r#"
import base64, hashlib, http.server, socketserver, struct, threading
go_on = threading.Event()

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path == "/events":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"data: first\n\n"); self.wfile.flush()
            go_on.wait(60)
            self.wfile.write(b"data: second\n\n"); self.wfile.flush()
            self.close_connection = True
        elif self.path == "/next":
            go_on.set()
            self.reply(b"ok")
        elif self.path == "/ws":
            self.websocket()
        else:
            self.reply(("hello host=%s xfh=%s proto=%s cookie=%s" % (self.headers.get("Host"), self.headers.get("X-Forwarded-Host"), self.headers.get("X-Forwarded-Proto"), self.headers.get("Cookie"))).encode())
    def do_POST(self):
        n = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                self.rfile.read(size + 2)
                n += size
                if size == 0: break
        else:
            n = len(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.reply(("got %d" % n).encode())
    def reply(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-App", "mine")
        self.end_headers()
        self.wfile.write(body)
    def websocket(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers(); self.wfile.flush()
        r, w = self.rfile, self.wfile
        while True:
            head = r.read(2)
            if len(head) < 2: return
            op, n = head[0] & 15, head[1] & 127
            if n == 126: n = struct.unpack(">H", r.read(2))[0]
            elif n == 127: n = struct.unpack(">Q", r.read(8))[0]
            mask = r.read(4)
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(r.read(n)))
            if op == 8:
                w.write(b"\x88\x00"); w.flush(); return
            if op == 9: op = 10
            out = bytes([128 | op]) + (bytes([len(data)]) if len(data) < 126 else b"\x7e" + struct.pack(">H", len(data))) + data
            w.write(out); w.flush()
        self.close_connection = True

class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

s = S(("127.0.0.1", 0), H)
print("LISTENING-ON-%d-" % s.server_address[1], flush=True)
s.serve_forever()
"#;

fn root() -> bool {
    if devpocket::provider::sandbox::running_as_root() {
        return true;
    }
    eprintln!("skipped: the local provider's accounts need root (CI runs as root)");
    false
}

/// The number after `before` up to `after` in the terminal's output, once it has appeared.
async fn read_port(ws: &mut Ws, before: &str, after: &str) -> u16 {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut text = String::new();
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no port in {text:?}"
        );
        let Some(frame) = next_json(ws).await else {
            panic!("terminal closed: {text:?}")
        };
        if frame["type"] == "output" {
            text.push_str(frame["data"].as_str().expect("data"));
        }
        let plain = strip_escapes(&text);
        if let Some(port) = plain.split(before).nth(1).and_then(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            rest[digits.len()..]
                .starts_with(after)
                .then(|| digits.parse().ok())
                .flatten()
        }) {
            return port;
        }
    }
}

/// Start `python3 -m http.server` on a free port in the environment's terminal.
async fn start_http_server(ws: &mut Ws) -> u16 {
    input(ws, "cd ~ && python3 -m http.server 0 --bind 127.0.0.1\r").await;
    read_port(ws, "Serving HTTP on 127.0.0.1 port ", " ").await
}

/// Write [`APP`] into the environment and start it.
async fn start_app(ws: &mut Ws) -> u16 {
    // In lines well below a terminal's line limit (4096 bytes in canonical mode).
    let b64 = base64::engine::general_purpose::STANDARD.encode(APP);
    input(ws, "cd ~ && rm -f app.b64\r").await;
    for line in b64.as_bytes().chunks(512) {
        let line = std::str::from_utf8(line).expect("base64 is ASCII");
        input(ws, &format!("printf %s {line} >> app.b64\r")).await;
    }
    input(ws, "base64 -d app.b64 > app.py && python3 app.py\r").await;
    read_port(ws, "LISTENING-ON-", "-").await
}

fn preview_host(s: &TestServer, env: &str, port: u16) -> String {
    format!("{port}--{env}.localhost:{}", s.running().addr.port())
}

/// A request to a preview: the server's address, the preview's `Host`, no redirects followed.
fn preview(s: &TestServer, env: &str, port: u16, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .get(s.url(path))
        .header("host", preview_host(s, env, port))
}

/// `POST …/ports/{port}/open` → the one-time URL's path and query.
async fn open(s: &TestServer, me: &Session, env: &str, port: u16) -> (StatusCode, String) {
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{env}/ports/{port}/open"),
            me.token(),
            json!({}),
        )
        .await;
    if status != StatusCode::OK {
        return (status, String::new());
    }
    let url = body["url"].as_str().expect("url");
    let host = preview_host(s, env, port);
    let rest = url
        .strip_prefix(&format!("http://{host}"))
        .unwrap_or_else(|| panic!("{url} is not at {host}"));
    assert_eq!(body["expires_in"], 120, "{body}");
    (status, rest.to_string())
}

/// Visit the one-time URL: 303 to the clean URL with the preview cookie; returns `name=value`.
async fn visit_code(s: &TestServer, env: &str, port: u16, path: &str) -> String {
    let resp = preview(s, env, port, path).send().await.expect("sent");
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()["location"], "/");
    let cookie = resp.headers()["set-cookie"].to_str().expect("ascii");
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=36000"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(!cookie.contains("Domain="), "host-only: {cookie}");
    assert!(!cookie.contains("Secure"), "no TLS here: {cookie}");
    cookie.split(';').next().expect("pair").to_string()
}

async fn status_of(req: reqwest::RequestBuilder) -> StatusCode {
    req.send().await.expect("sent").status()
}

async fn set_visibility(s: &TestServer, me: &Session, env: &str, port: u16, v: &str) -> Value {
    let req = s
        .request(
            Method::PUT,
            &format!("/api/v1/environments/{env}/ports/{port}"),
            me.token(),
        )
        .json(&json!({ "visibility": v }));
    let (status, body) = s.send(req).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["visibility"], v, "{body}");
    body
}

async fn audit_events(s: &TestServer, event: &str) -> Vec<Value> {
    let mut conn = s.running().app.db.get().await.expect("db");
    let filter = devpocket::store::audit::AuditFilter {
        event: Some(event.into()),
        limit: 100,
        ..Default::default()
    };
    let (events, _) = devpocket::store::audit::query(&mut conn, &filter)
        .await
        .expect("audit");
    events
        .iter()
        .map(|e| serde_json::from_str(e.detail.as_deref().unwrap_or("null")).expect("json"))
        .collect()
}

async fn a_private_preview_opens_with_its_code_and_only_for_its_owner(backend: Backend) {
    if !root() {
        return;
    }
    let s = TestServer::start(backend).await;
    let alice = s.register("alice").await;
    let bob = s.register("bob").await;
    let env = running_env(&s, &alice, "web").await;
    let (mut ws, _) = open_terminal(&s, &alice, &env, "").await;
    let port = start_http_server(&mut ws).await;
    let api_port = s.running().addr.port();

    // The ports API: this port, private, with its host-based URL; never the API's own port.
    let (status, ports) = s
        .get(&format!("/api/v1/environments/{env}/ports"), alice.token())
        .await;
    assert_eq!(status, StatusCode::OK, "{ports}");
    let list = ports.as_array().expect("array");
    let ours = list
        .iter()
        .find(|p| p["port"] == port)
        .unwrap_or_else(|| panic!("{port} not in {ports}"));
    assert_eq!(ours["visibility"], "private");
    assert_eq!(
        ours["url"],
        format!("http://{}/", preview_host(&s, &env, port))
    );
    assert!(list.iter().all(|p| p["port"] != api_port), "{ports}");

    // Private: no cookie, no preview; a bad or missing code neither.
    assert_eq!(
        status_of(preview(&s, &env, port, "/")).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status_of(preview(&s, &env, port, "/?devpocket_preview_code=nope")).await,
        StatusCode::UNAUTHORIZED
    );

    // The one-time code sets the cookie; the cookie opens the preview, with the app's headers.
    let (status, link) = open(&s, &alice, &env, port).await;
    assert_eq!(status, StatusCode::OK);
    let cookie = visit_code(&s, &env, port, &link).await;
    assert_eq!(
        status_of(preview(&s, &env, port, &link)).await,
        StatusCode::UNAUTHORIZED,
        "a code works once"
    );
    let resp = preview(&s, &env, port, "/")
        .header("cookie", &cookie)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("x-frame-options").is_none());
    assert!(resp.headers().get("content-security-policy").is_none());
    assert!(
        resp.headers()["server"]
            .to_str()
            .is_ok_and(|v| v.contains("SimpleHTTP")),
        "{:?}",
        resp.headers()
    );
    let page = resp.text().await.expect("body");
    assert!(page.contains("Directory listing"), "{page}");
    // The cookie is for this port only.
    assert_eq!(
        status_of(preview(&s, &env, port + 1, "/").header("cookie", &cookie)).await,
        StatusCode::UNAUTHORIZED
    );

    // Another user: the environment does not exist for them, and their cookie opens nothing here.
    let (status, _) = open(&s, &bob, &env, port).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = s
        .get(&format!("/api/v1/environments/{env}/ports"), bob.token())
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let req = s
        .request(
            Method::PUT,
            &format!("/api/v1/environments/{env}/ports/{port}"),
            bob.token(),
        )
        .json(&json!({ "visibility": "public" }));
    assert_eq!(s.send(req).await.0, StatusCode::NOT_FOUND);

    // Another tenant's server on the same loopback: never reachable from alice's environment, and
    // bob's cookie for his own preview opens nothing of alice's.
    let bobs = running_env(&s, &bob, "bobs").await;
    let (mut bob_ws, _) = open_terminal(&s, &bob, &bobs, "").await;
    let bob_port = start_http_server(&mut bob_ws).await;
    let (_, link) = open(&s, &bob, &bobs, bob_port).await;
    let bob_cookie = visit_code(&s, &bobs, bob_port, &link).await;
    assert_eq!(
        status_of(preview(&s, &bobs, bob_port, "/").header("cookie", &bob_cookie)).await,
        StatusCode::OK
    );
    assert_eq!(
        status_of(preview(&s, &env, port, "/").header("cookie", &bob_cookie)).await,
        StatusCode::UNAUTHORIZED
    );
    let (_, link) = open(&s, &alice, &env, bob_port).await;
    let tenant_cookie = visit_code(&s, &env, bob_port, &link).await;
    assert_eq!(
        status_of(preview(&s, &env, bob_port, "/").header("cookie", &tenant_cookie)).await,
        StatusCode::BAD_GATEWAY
    );
    let (_, ports) = s
        .get(&format!("/api/v1/environments/{env}/ports"), alice.token())
        .await;
    assert!(
        ports
            .as_array()
            .expect("array")
            .iter()
            .all(|p| p["port"] != bob_port),
        "{ports}"
    );
    drop(bob_ws);

    // Public: anyone with the URL, until it is private again.
    set_visibility(&s, &alice, &env, port, "public").await;
    assert_eq!(
        status_of(preview(&s, &env, port, "/")).await,
        StatusCode::OK
    );
    set_visibility(&s, &alice, &env, port, "private").await;
    assert_eq!(
        status_of(preview(&s, &env, port, "/")).await,
        StatusCode::UNAUTHORIZED
    );

    // The API's own port (the same uid without root, another one with it) is never forwarded.
    let (_, link) = open(&s, &alice, &env, api_port).await;
    let api_cookie = visit_code(&s, &env, api_port, &link).await;
    let resp = preview(&s, &env, api_port, "/health")
        .header("cookie", &api_cookie)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let page = resp.text().await.expect("page");
    assert!(
        page.contains("Nothing in this environment is listening"),
        "{page}"
    );
    // Nor PostgreSQL's (whether or not one listens on this host).
    let (_, link) = open(&s, &alice, &env, 5432).await;
    let pg_cookie = visit_code(&s, &env, 5432, &link).await;
    assert_eq!(
        status_of(preview(&s, &env, 5432, "/").header("cookie", &pg_cookie)).await,
        StatusCode::BAD_GATEWAY
    );

    // Bad input.
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{env}/ports/70000/open"),
            alice.token(),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let req = s
        .request(
            Method::PUT,
            &format!("/api/v1/environments/{env}/ports/{port}"),
            alice.token(),
        )
        .json(&json!({ "visibility": "everyone" }));
    let (status, body) = s.send(req).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["code"], "validation_error");

    // Audited: the previews opened and the visibility changes.
    let opened = audit_events(&s, "preview_opened").await;
    assert!(
        opened
            .iter()
            .any(|d| d["port"] == port && d["environment_id"] == env.as_str())
    );
    let changes = audit_events(&s, "preview_visibility_changed").await;
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert!(
        changes
            .iter()
            .any(|d| d["from"] == "private" && d["to"] == "public")
    );

    // Logout ends the preview cookie with the session.
    let (status, _) = s
        .post("/api/v1/auth/logout", alice.token(), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        status_of(preview(&s, &env, port, "/").header("cookie", &cookie)).await,
        StatusCode::UNAUTHORIZED
    );
    drop(ws);
    s.stop().await;
}

async fn streaming(backend: Backend) {
    if !root() {
        return;
    }
    // Path-based previews on too: host-based ones work the same beside them.
    // The test client is a trusted proxy here, so its X-Forwarded-Proto counts.
    let s = TestServer::start_with(backend, |c| {
        c.server.preview_path_based = true;
        c.server.trusted_proxies = vec!["127.0.0.1".into()];
        c.server.max_body_bytes = 64 * 1024;
    })
    .await;
    let alice = s.register("alice").await;
    let env = running_env(&s, &alice, "streams").await;
    let (mut ws, _) = open_terminal(&s, &alice, &env, "").await;
    let port = start_app(&mut ws).await;
    let (_, link) = open(&s, &alice, &env, port).await;
    let cookie = visit_code(&s, &env, port, &link).await;

    // Host and X-Forwarded-Host as the browser sent them; our cookie is not passed on.
    let resp = preview(&s, &env, port, "/")
        .header("cookie", format!("theirs=1; {cookie}"))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-app"], "mine");
    let host = preview_host(&s, &env, port);
    assert_eq!(
        resp.text().await.expect("body"),
        format!("hello host={host} xfh={host} proto=http cookie=theirs=1")
    );

    // Behind TLS (a trusted proxy says so): the cookie is Secure, the app hears https.
    let (_, link) = open(&s, &alice, &env, port).await;
    let resp = preview(&s, &env, port, &link)
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let set = resp.headers()["set-cookie"].to_str().expect("ascii");
    assert!(set.ends_with("; Secure"), "{set}");
    let resp = preview(&s, &env, port, "/")
        .header("cookie", &cookie)
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .expect("sent");
    assert!(
        resp.text().await.expect("body").contains(" proto=https "),
        "the app is told the browser's scheme"
    );

    // Server-sent events arrive one by one: the second is only written after the first arrived.
    let mut events = preview(&s, &env, port, "/events")
        .header("cookie", &cookie)
        .send()
        .await
        .expect("sent");
    assert_eq!(events.status(), StatusCode::OK);
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let mut seen = String::new();
    while !seen.contains("data: first\n\n") {
        let chunk = tokio::time::timeout(WAIT, events.chunk())
            .await
            .expect("first event in time")
            .expect("body")
            .expect("not ended");
        seen.push_str(std::str::from_utf8(&chunk).expect("utf-8"));
    }
    assert!(!seen.contains("second"), "{seen}");
    assert_eq!(
        status_of(preview(&s, &env, port, "/next").header("cookie", &cookie)).await,
        StatusCode::OK
    );
    while !seen.contains("data: second\n\n") {
        let chunk = tokio::time::timeout(WAIT, events.chunk())
            .await
            .expect("second event in time")
            .expect("body")
            .expect("not ended");
        seen.push_str(std::str::from_utf8(&chunk).expect("utf-8"));
    }

    // Path-based: its own one-time URL, a cookie scoped to its path, the prefix stripped.
    let prefix = format!("/preview/{env}/{port}");
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{env}/ports/{port}/open?path_based=true"),
            alice.token(),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let url = body["url"].as_str().expect("url");
    let link = url
        .strip_prefix(&s.url(""))
        .unwrap_or_else(|| panic!("{url} is not on the API's origin"));
    assert!(link.starts_with(&format!("{prefix}/?")), "{link}");
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let resp = no_redirects.get(s.url(link)).send().await.expect("sent");
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()["location"], format!("{prefix}/").as_str());
    let set = resp.headers()["set-cookie"].to_str().expect("ascii");
    assert!(set.contains(&format!("Path={prefix}/;")), "{set}");
    let path_cookie = set.split(';').next().expect("pair").to_string();
    let resp = no_redirects.get(s.url(&prefix)).send().await.expect("sent");
    assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        no_redirects
            .get(s.url(&format!("{prefix}/")))
            .send()
            .await
            .expect("sent")
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let resp = no_redirects
        .get(s.url(&format!("{prefix}/")))
        .header("cookie", &path_cookie)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::OK);
    let api_host = s.running().addr.to_string();
    assert_eq!(
        resp.text().await.expect("body"),
        format!("hello host={api_host} xfh={api_host} proto=http cookie=None")
    );
    let (_, ports) = s
        .get(&format!("/api/v1/environments/{env}/ports"), alice.token())
        .await;
    let listed = ports
        .as_array()
        .expect("array")
        .iter()
        .find(|p| p["port"] == port)
        .cloned()
        .unwrap_or_else(|| panic!("{port} not in {ports}"));
    assert_eq!(listed["path_url"], s.url(&format!("{prefix}/")));

    // A WebSocket through the preview (public now: no cookie needed), echoed both ways.
    set_visibility(&s, &alice, &env, port, "public").await;
    let url = format!("ws://{}/ws", s.running().addr);
    let mut request = url.into_client_request().expect("request");
    request
        .headers_mut()
        .insert("host", host.parse().expect("host"));
    let (mut sock, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("upgrade in time")
        .expect("upgraded");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for text in ["hello", "second message", &"x".repeat(1000)] {
        sock.send(Message::text(text)).await.expect("send");
        let echoed = tokio::time::timeout(WAIT, sock.next())
            .await
            .expect("echo in time")
            .expect("open")
            .expect("frame");
        assert_eq!(echoed.to_text().expect("text"), text);
    }
    sock.close(None).await.expect("close");

    // Request bodies stream to the app up to server.max_body_bytes, declared or not.
    let post = |body: reqwest::Body| {
        reqwest::Client::new()
            .post(s.url("/upload"))
            .header("host", &host)
            .body(body)
    };
    let resp = post(vec![b'x'; 1000].into()).send().await.expect("sent");
    assert_eq!(resp.text().await.expect("body"), "got 1000");
    let resp = post(vec![b'x'; 65 * 1024].into())
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Undeclared (chunked) past the limit: cut, 413 (a raw client: the body has no length).
    let mut raw = tokio::net::TcpStream::connect(s.running().addr)
        .await
        .expect("connect");
    let chunk = format!("{:x}\r\n{}\r\n", 40 * 1024, "x".repeat(40 * 1024));
    let request = format!(
        "POST /upload HTTP/1.1\r\nhost: {host}\r\ntransfer-encoding: chunked\r\n\r\n{chunk}{chunk}0\r\n\r\n"
    );
    let (mut rx, mut tx) = raw.split();
    let (_, answer) = tokio::join!(
        async {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut tx, request.as_bytes()).await;
        },
        async {
            let mut head = vec![0u8; 64];
            let n = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut rx, &mut head))
                .await
                .expect("answer in time")
                .expect("read");
            String::from_utf8_lossy(&head[..n]).into_owned()
        }
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Nothing on a port: a readable 502.
    set_visibility(&s, &alice, &env, 1, "public").await;
    let resp = preview(&s, &env, 1, "/").send().await.expect("sent");
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .is_ok_and(|v| v.starts_with("text/html"))
    );

    // What is already open ends with the access: a WebSocket opened while the port was public
    // is closed once it is private again, one opened with the cookie once its session logs out.
    let open_ws = |cookie: Option<String>| {
        let mut request = format!("ws://{}/ws", s.running().addr)
            .into_client_request()
            .expect("request");
        let headers = request.headers_mut();
        headers.insert("host", host.parse().expect("host"));
        if let Some(cookie) = cookie {
            headers.insert("cookie", cookie.parse().expect("cookie"));
        }
        async move {
            let (mut sock, _) =
                tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
                    .await
                    .expect("upgrade in time")
                    .expect("upgraded");
            sock.send(Message::text("open")).await.expect("send");
            let echoed = tokio::time::timeout(WAIT, sock.next())
                .await
                .expect("echo in time")
                .expect("open")
                .expect("frame");
            assert_eq!(echoed.to_text().expect("text"), "open");
            sock
        }
    };
    let ends = |mut sock: tokio_tungstenite::WebSocketStream<_>| async move {
        let next = tokio::time::timeout(WAIT, sock.next())
            .await
            .expect("closed within the deadline");
        assert!(
            matches!(next, Some(Ok(Message::Close(_)) | Err(_)) | None),
            "still open: {next:?}"
        );
    };
    let public_ws = open_ws(None).await;
    set_visibility(&s, &alice, &env, port, "private").await;
    ends(public_ws).await;
    let private_ws = open_ws(Some(cookie.clone())).await;
    let (status, _) = s
        .post("/api/v1/auth/logout", alice.token(), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    ends(private_ws).await;
    drop(ws);
    s.stop().await;
}
