//! The file API (issue 13) through the real server on the local provider: real SSH, OpenSSH's
//! sftp-server run as the environment's own account, real files. Uploads go through a raw
//! HTTP/1.1 client so the test controls how fast bytes arrive and samples the server's memory
//! (it runs in this process) between pieces. These need root (CI runs as root) for the accounts;
//! without it they say they were skipped.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::terminal::running_env;
use support::{Backend, Session, TestServer, rss_kib};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

on_both_backends!(
    files_round_trip_as_the_environments_account,
    uploads_over_the_limit_and_escapes_are_refused,
    a_symlink_to_the_data_dir_is_refused_by_the_os,
);

/// Size of the big upload: above the 10 MiB body limit of every other route.
const BIG: usize = 32 * 1024 * 1024;
/// The upload limit the tests run with: the big upload fits exactly.
const LIMIT: u64 = BIG as u64;
/// Pieces the raw client writes at a time (and samples memory between).
const PIECE: usize = 1024 * 1024;

/// The tests of this binary run one at a time: the server's memory is measured in this process,
/// and another test's allocations (its 32 MiB, a password hash's 19 MiB) must not land in it.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn root() -> bool {
    if devpocket::provider::sandbox::running_as_root() {
        return true;
    }
    eprintln!("skipped: the local provider's accounts need root (CI runs as root)");
    false
}

async fn server(backend: Backend) -> TestServer {
    TestServer::start_with(backend, |c| {
        c.files.max_upload_bytes = LIMIT;
        c.files.max_operations_per_user = 2;
    })
    .await
}

/// Not-quite-random bytes that do not compress (xorshift), reproducible.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn files_url(env: &str, path: &str) -> String {
    format!("/api/v1/environments/{env}/files?path={}", url_escape(path))
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// An answer of the raw client: status, headers (lower-case names), body.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// PUT `data` with a raw HTTP/1.1 client, in [`PIECE`]s (chunked when `chunked`), calling `each`
/// between pieces; the connection is closed by the server after its answer.
async fn raw_put(
    s: &TestServer,
    path: &str,
    me: &Session,
    extra: &[(&str, &str)],
    data: &[u8],
    chunked: bool,
    mut each: impl FnMut(),
) -> Raw {
    let addr = s.url("").trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let mut head = format!(
        "PUT {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\nconnection: close\r\ncontent-type: application/octet-stream\r\n",
        me.token().expect("token")
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if chunked {
        head.push_str("transfer-encoding: chunked\r\n\r\n");
    } else {
        head.push_str(&format!("content-length: {}\r\n\r\n", data.len()));
    }
    tcp.write_all(head.as_bytes()).await.expect("head");
    for piece in data.chunks(PIECE) {
        let sent = if chunked {
            let mut framed = format!("{:x}\r\n", piece.len()).into_bytes();
            framed.extend_from_slice(piece);
            framed.extend_from_slice(b"\r\n");
            tcp.write_all(&framed).await
        } else {
            tcp.write_all(piece).await
        };
        if sent.is_err() {
            break; // the server answered early and closed
        }
        each();
    }
    if chunked {
        let _ = tcp.write_all(b"0\r\n\r\n").await;
    }
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer).await;
    parse_response(&answer)
}

fn parse_response(raw: &[u8]) -> Raw {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Raw {
        status,
        headers,
        body,
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&raw[..end]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&raw[end + 2..end + 2 + size]);
        raw = &raw[end + 2 + size + 2..];
    }
    out
}

async fn put_small(s: &TestServer, me: &Session, env: &str, path: &str, data: &[u8]) -> Raw {
    raw_put(s, &files_url(env, path), me, &[], data, false, || {}).await
}

/// GET a file; the status, the ETag and the sha256 and length of the body, read piece by piece.
async fn download(
    s: &TestServer,
    me: &Session,
    env: &str,
    path: &str,
    range: Option<&str>,
    mut each: impl FnMut(),
) -> (StatusCode, reqwest::header::HeaderMap, String, usize) {
    let mut req = s
        .http
        .get(s.url(&files_url(env, path)))
        .bearer_auth(me.token().expect("token"));
    if let Some(range) = range {
        req = req.header("range", range);
    }
    let mut resp = req.send().await.expect("download");
    let status = resp.status();
    let headers = resp.headers().clone();
    let mut hash = Sha256::new();
    let mut len = 0;
    while let Some(chunk) = resp.chunk().await.expect("body") {
        hash.update(&chunk);
        len += chunk.len();
        each();
    }
    (status, headers, hex(&hash.finalize()), len)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

async fn listing(s: &TestServer, me: &Session, env: &str, path: &str) -> Value {
    let (status, body) = s.get(&files_url(env, path), me.token()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn names(listing: &Value) -> Vec<String> {
    listing["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .collect()
}

fn workspace(s: &TestServer, env: &str) -> PathBuf {
    s.workspaces_dir().join(env)
}

/// Leftover temporary files of uploads anywhere in the workspace.
fn leftovers(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(".devpocket-upload-")
            {
                out.push(path.clone());
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(leftovers(&path));
            }
        }
    }
    out
}

async fn audit_events(s: &TestServer, admin: &Session, event: &str) -> Vec<Value> {
    let (status, page) = s
        .get(&format!("/api/v1/admin/audit?event={event}"), admin.token())
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["items"].as_array().expect("items").clone()
}

async fn files_round_trip_as_the_environments_account(backend: Backend) {
    if !root() {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().await;
    let s = server(backend).await;
    let me = s.register("filer").await;
    let env = running_env(&s, &me, "files").await;
    let home = workspace(&s, &env);

    // 32 MiB up, with the server's memory sampled while it arrives.
    let (rss_growth, put) = {
        let data = noise(BIG, 7);
        let before = rss_kib();
        let mut peak = before;
        let put = raw_put(
            &s,
            &files_url(&env, "big.bin"),
            &me,
            &[],
            &data,
            false,
            || {
                peak = peak.max(rss_kib());
            },
        )
        .await;
        let growth = peak.max(rss_kib()).saturating_sub(before);
        assert_eq!(put.status, 201, "{}", String::from_utf8_lossy(&put.body));
        // ...and down again, piece by piece.
        let mut down_peak = rss_kib();
        let (status, headers, digest, len) = download(&s, &me, &env, "big.bin", None, || {
            down_peak = down_peak.max(rss_kib());
        })
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(len, BIG);
        assert_eq!(digest, sha256(&data), "the same bytes come back");
        assert_eq!(headers["accept-ranges"], "bytes");
        assert_eq!(headers["content-type"], "application/octet-stream");
        assert_eq!(headers["etag"].to_str().ok(), put.header("etag"));
        // A part of it.
        let (status, headers, digest, len) =
            download(&s, &me, &env, "big.bin", Some("bytes=1000-1999"), || {}).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(len, 1000);
        assert_eq!(digest, sha256(&data[1000..2000]));
        assert_eq!(headers["content-range"], format!("bytes 1000-1999/{BIG}"));
        let (status, _, digest, _) =
            download(&s, &me, &env, "big.bin", Some("bytes=-10"), || {}).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(digest, sha256(&data[BIG - 10..]));
        let (status, headers, _, _) = download(
            &s,
            &me,
            &env,
            "big.bin",
            Some(&format!("bytes={BIG}-")),
            || {},
        )
        .await;
        assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(headers["content-range"], format!("bytes */{BIG}"));
        (growth.max(down_peak.saturating_sub(before)), put)
    };
    // Nowhere near the file's size: the body streams through bounded buffers (SFTP writes in
    // flight, SSH windows and queues), it is never held whole.
    let growth_mib = rss_growth / 1024;
    eprintln!("server memory growth moving 32 MiB: {rss_growth} KiB");
    assert!(
        growth_mib < 16,
        "server memory grew by {growth_mib} MiB moving a 32 MiB file"
    );
    let entry = put.json();
    assert_eq!(entry["name"], "big.bin");
    assert_eq!(entry["type"], "file");
    assert_eq!(entry["size"], BIG);
    assert_eq!(entry["mode"], "0644");

    // Written by the environment's account, not by the server's user.
    let account =
        devpocket::provider::sandbox::lookup(&devpocket::provider::sandbox::account_name(&env))
            .expect("passwd")
            .expect("account")
            .0;
    let meta = std::fs::metadata(home.join("big.bin")).expect("on disk");
    assert_eq!(meta.uid(), account.uid);
    assert_eq!(meta.len(), BIG as u64);
    assert!(leftovers(&home).is_empty());

    // Directories, a listing, a move.
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{env}/files/mkdir"),
            me.token(),
            json!({ "path": "src/deep", "parents": true }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["type"], "directory");
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{env}/files/mkdir"),
            me.token(),
            json!({ "path": "src/deep" }),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "file_exists");
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{env}/files/mkdir"),
            me.token(),
            json!({ "path": "nowhere/new" }),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let moved = s
        .post(
            &format!("/api/v1/environments/{env}/files/move"),
            me.token(),
            json!({ "from": "big.bin", "to": "src/deep/big.bin" }),
        )
        .await;
    assert_eq!(moved.0, StatusCode::OK, "{}", moved.1);
    assert_eq!(moved.1["path"], "src/deep/big.bin");
    let (status, body) = s.get(&files_url(&env, "big.bin"), me.token()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["code"], "not_found");
    let deep = listing(&s, &me, &env, "src/deep").await;
    assert_eq!(names(&deep), ["big.bin"]);
    assert_eq!(deep["entries"][0]["size"], BIG);
    assert_eq!(deep["total"], 1);
    assert_eq!(deep["truncated"], false);
    let top = listing(&s, &me, &env, "").await;
    assert!(names(&top).contains(&"src".to_string()), "{top}");

    // A move onto something that exists is refused; nothing is replaced.
    assert_eq!(
        put_small(&s, &me, &env, "src/a.txt", b"aaa").await.status,
        201
    );
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{env}/files/move"),
            me.token(),
            json!({ "from": "src/a.txt", "to": "src/deep/big.bin" }),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "file_exists");

    // Pages.
    for i in 0..5 {
        put_small(&s, &me, &env, &format!("src/f{i}.txt"), b"x").await;
    }
    let (status, page) = s
        .get(
            &format!("{}&offset=2&limit=3", files_url(&env, "src")),
            me.token(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(names(&page), ["f0.txt", "f1.txt", "f2.txt"]);
    assert_eq!(page["total"], 7);

    // Safe edits: If-Match with the current ETag replaces, with a stale one is refused.
    let first = put_small(&s, &me, &env, "notes.md", b"# v1\n").await;
    assert_eq!(first.status, 201);
    let v1 = first.header("etag").expect("etag").to_string();
    let second = raw_put(
        &s,
        &files_url(&env, "notes.md"),
        &me,
        &[("if-match", &v1)],
        b"# version 2\n",
        false,
        || {},
    )
    .await;
    assert_eq!(
        second.status,
        200,
        "{}",
        String::from_utf8_lossy(&second.body)
    );
    let stale = raw_put(
        &s,
        &files_url(&env, "notes.md"),
        &me,
        &[("if-match", &v1)],
        b"# lost update from an old copy\n",
        false,
        || {},
    )
    .await;
    assert_eq!(
        stale.status,
        412,
        "{}",
        String::from_utf8_lossy(&stale.body)
    );
    assert_eq!(stale.json()["code"], "precondition_failed");
    assert_eq!(
        std::fs::read(home.join("notes.md")).expect("notes"),
        b"# version 2\n"
    );
    let create_only = raw_put(
        &s,
        &files_url(&env, "notes.md"),
        &me,
        &[("if-none-match", "*")],
        b"x",
        false,
        || {},
    )
    .await;
    assert_eq!(create_only.status, 412);
    let (_, headers, _, _) = download(&s, &me, &env, "notes.md", None, || {}).await;
    assert_eq!(headers["content-type"], "text/markdown");
    assert!(leftovers(&home).is_empty());

    // Deletes: a non-empty directory is refused, files and empty directories go.
    let del = |path: &str| {
        s.http
            .delete(s.url(&files_url(&env, path)))
            .bearer_auth(me.token().expect("token"))
            .send()
    };
    let resp = del("src/deep").await.expect("delete");
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert_eq!(
        resp.json::<Value>().await.expect("json")["code"],
        "directory_not_empty"
    );
    assert_eq!(
        del("src/deep/big.bin").await.expect("delete").status(),
        StatusCode::OK
    );
    assert_eq!(
        del("src/deep").await.expect("delete").status(),
        StatusCode::OK
    );
    assert_eq!(
        del("src/deep").await.expect("delete").status(),
        StatusCode::NOT_FOUND
    );
    assert!(!home.join("src/deep").exists());

    // Audited, with who and which environment.
    let admin = s.admin("auditor").await;
    for event in [
        "file_written",
        "file_moved",
        "file_deleted",
        "directory_created",
    ] {
        let events = audit_events(&s, &admin, event).await;
        assert!(!events.is_empty(), "{event} audited");
        assert!(
            events
                .iter()
                .all(|e| e["user_id"] == me.user_id.as_str()
                    && e["detail"].to_string().contains(&env)),
            "{event}: {events:?}"
        );
    }

    // Another user's environment does not exist; a stopped one has no files to serve.
    let other = s.register("snoop").await;
    let (status, _) = s.get(&files_url(&env, "notes.md"), other.token()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let stolen = put_small(&s, &other, &env, "notes.md", b"pwned").await;
    assert_eq!(stolen.status, 404);
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{env}/stop"),
            me.token(),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    s.wait_status(&me, &env, "stopped").await;
    let (status, body) = s.get(&files_url(&env, ""), me.token()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "environment_not_running");
    s.stop().await;
}

async fn uploads_over_the_limit_and_escapes_are_refused(backend: Backend) {
    if !root() {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().await;
    let s = server(backend).await;
    let me = s.register("limits").await;
    let env = running_env(&s, &me, "limits").await;
    let home = workspace(&s, &env);

    // Over the limit, declared: refused before anything is written.
    let over = vec![0u8; BIG + 1];
    let declared = raw_put(
        &s,
        &files_url(&env, "over.bin"),
        &me,
        &[],
        &over,
        false,
        || {},
    )
    .await;
    assert_eq!(
        declared.status,
        413,
        "{}",
        String::from_utf8_lossy(&declared.body)
    );
    assert_eq!(declared.json()["code"], "payload_too_large");
    // Over the limit, streamed without a length: found out midway; the partial file is gone
    // before the answer.
    let streamed = raw_put(
        &s,
        &files_url(&env, "over.bin"),
        &me,
        &[],
        &over,
        true,
        || {},
    )
    .await;
    // A refused upload's body is read (and thrown away) so the client gets its answer, even one
    // far larger than the socket buffers on the way.
    let refused = raw_put(
        &s,
        &files_url(&env, "over.bin"),
        &me,
        &[("if-match", "\"1-1\"")],
        &over[..BIG / 2],
        false,
        || {},
    )
    .await;
    assert_eq!(
        refused.status,
        412,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    drop(over);
    assert_eq!(
        streamed.status,
        413,
        "{}",
        String::from_utf8_lossy(&streamed.body)
    );
    assert!(!home.join("over.bin").exists());
    assert!(leftovers(&home).is_empty(), "{:?}", leftovers(&home));
    // A client that goes away midway leaves nothing behind either.
    {
        let addr = s.url("").trim_start_matches("http://").to_string();
        let mut tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let head = format!(
            "PUT {} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\ncontent-length: {}\r\n\r\n",
            files_url(&env, "gone.bin"),
            me.token().expect("token"),
            BIG
        );
        tcp.write_all(head.as_bytes()).await.expect("head");
        tcp.write_all(&vec![7u8; PIECE]).await.expect("piece");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while leftovers(&home).is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the upload never started"
            );
            tokio::task::yield_now().await;
        }
        drop(tcp);
        while !leftovers(&home).is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?} left behind",
                leftovers(&home)
            );
            tokio::task::yield_now().await;
        }
        assert!(!home.join("gone.bin").exists());
    }
    // A chunked upload within the limit works.
    let small = noise(100_000, 3);
    let ok = raw_put(
        &s,
        &files_url(&env, "ok.bin"),
        &me,
        &[],
        &small,
        true,
        || {},
    )
    .await;
    assert_eq!(ok.status, 201, "{}", String::from_utf8_lossy(&ok.body));
    assert_eq!(std::fs::read(home.join("ok.bin")).expect("ok.bin"), small);

    // Paths outside the home.
    for path in ["../x", "a/../../x", "/etc/passwd", "/"] {
        let (status, body) = s.get(&files_url(&env, path), me.token()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{path}: {body}");
        assert_eq!(body["code"], "invalid_path", "{path}");
        assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    let escape = put_small(&s, &me, &env, "../../escape.txt", b"x").await;
    assert_eq!(escape.status, 422);
    assert_eq!(escape.json()["code"], "invalid_path");
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{env}/files/move"),
            me.token(),
            json!({ "from": "ok.bin", "to": "../ok.bin" }),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{env}/files/mkdir"),
            me.token(),
            json!({ "path": "x\u{0}y" }),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    // The home itself, absolutely: inside, so allowed.
    let abs = format!(
        "{}/ok.bin",
        std::fs::canonicalize(&home).expect("home").display()
    );
    let (status, _, digest, _) = download(&s, &me, &env, &abs, None, || {}).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(digest, sha256(&small));
    let (status, body) = s.get(&files_url(&env, "missing.txt"), me.token()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = s
        .get(&format!("{}&limit=0", files_url(&env, "")), me.token())
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    // A user's transfers are capped: two downloads nobody reads hold their slots (the file is
    // far larger than what the buffers on the way take), a third operation is refused.
    std::fs::write(home.join("held.bin"), noise(BIG / 2, 5)).expect("held.bin");
    let hold = || {
        s.http
            .get(s.url(&files_url(&env, "held.bin")))
            .bearer_auth(me.token().expect("token"))
            .send()
    };
    let first = hold().await.expect("first");
    let second = hold().await.expect("second");
    assert_eq!(
        (first.status(), second.status()),
        (StatusCode::OK, StatusCode::OK)
    );
    let (status, body) = s.get(&files_url(&env, ""), me.token()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["code"], "too_many_file_operations");
    // Abandoned downloads give their slots back.
    drop((first, second));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, body) = s.get(&files_url(&env, ""), me.token()).await;
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        assert!(tokio::time::Instant::now() < deadline, "slots never freed");
        tokio::task::yield_now().await;
    }
    s.stop().await;
}

async fn a_symlink_to_the_data_dir_is_refused_by_the_os(backend: Backend) {
    if !root() {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().await;
    let s = server(backend).await;
    let me = s.register("linker").await;
    let env = running_env(&s, &me, "links").await;
    let home = workspace(&s, &env);
    let data = s.data_dir();
    // Made by root here; a shell in the environment could make the same links.
    std::os::unix::fs::symlink(&data, home.join("data")).expect("symlink");
    std::os::unix::fs::symlink(data.join("ssh_host_ed25519_key"), home.join("key"))
        .expect("symlink");
    let before: Vec<_> = std::fs::read_dir(&data)
        .expect("data dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();

    // The listing shows the links as links.
    let top = listing(&s, &me, &env, "").await;
    let link = top["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["name"] == "data")
        .expect("data link listed")
        .clone();
    assert_eq!(link["type"], "symlink");

    // Following them is the account's business, and the account may not.
    for path in ["data", "data/ssh_host_ed25519_key", "key"] {
        let (status, body) = s.get(&files_url(&env, path), me.token()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
        assert_eq!(body["code"], "file_access_denied", "{path}");
    }
    let planted = put_small(&s, &me, &env, "data/planted", b"x").await;
    assert_eq!(
        planted.status,
        403,
        "{}",
        String::from_utf8_lossy(&planted.body)
    );
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{env}/files/move"),
            me.token(),
            json!({ "from": "data/ssh_host_ed25519_key", "to": "stolen" }),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let resp = s
        .http
        .delete(s.url(&files_url(&env, "data/ssh_host_ed25519_key")))
        .bearer_auth(me.token().expect("token"))
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let after: Vec<_> = std::fs::read_dir(&data)
        .expect("data dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(before.len(), after.len(), "nothing planted or removed");
    assert!(data.join("ssh_host_ed25519_key").exists());
    assert!(!home.join("stolen").exists());
    // The link itself is the account's: it can be deleted (not what it points to).
    let resp = s
        .http
        .delete(s.url(&files_url(&env, "key")))
        .bearer_auth(me.token().expect("token"))
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(data.join("ssh_host_ed25519_key").exists());
    s.stop().await;
}

// ---- the SFTP client against OpenSSH (the reference peer) -------------------------------------

/// What `sftp-server` under OpenSSH's sshd does for the file API's client, as the user sshd
/// logs in (this test's own): atomic replace, streamed reads, listing, rename, removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sftp_client_works_against_openssh() {
    use devpocket::ssh::keys;
    use devpocket::ssh::sftp::{FsError, Kind, Remote};
    use std::sync::Arc;
    use std::time::Duration;

    if devpocket::ssh::sftp::sftp_server_path().is_none() {
        eprintln!("skipped: OpenSSH's sftp-server is not installed (.ci/run installs it)");
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().await;
    let user_key = Arc::new(keys::generate_ed25519());
    let host = keys::generate_ed25519();
    let sshd = support::sshd::Sshd::start_anywhere(
        &keys::private_to_openssh(&host).expect("host key"),
        &keys::public_to_openssh(user_key.public_key()),
    )
    .await;
    let user = String::from_utf8(
        std::process::Command::new("id")
            .arg("-un")
            .output()
            .expect("id")
            .stdout,
    )
    .expect("utf-8")
    .trim()
    .to_string();
    let target = devpocket::ssh::SshTarget {
        host: "127.0.0.1".into(),
        port: sshd.port,
        user,
        key: user_key,
        host_key: host.public_key().clone(),
        connect_timeout: Duration::from_secs(10),
    };
    let remote = match Remote::connect(&target, Duration::from_secs(10)).await {
        Ok(remote) => Arc::new(remote),
        Err(e) => panic!("SFTP to sshd: {e}\nsshd log:\n{}", sshd.log()),
    };
    assert!(remote.home().starts_with('/'));
    let dir = tempfile::tempdir().expect("tempdir");
    let at = |name: &str| format!("{}/{name}", dir.path().display());
    std::fs::write(dir.path().join("file.bin"), b"old").expect("old version");

    // Write a temporary file in bounded pieces, then rename it over the old version.
    let data = noise(3 * 1024 * 1024 + 17, 11);
    let handle = remote.create_new(&at(".tmp"), 0o600).await.expect("create");
    assert!(matches!(
        remote.create_new(&at(".tmp"), 0o600).await,
        Err(FsError::Failed(_))
    ));
    let mut writer = remote.writer(handle.clone());
    for piece in data.chunks(100_000) {
        writer.push(piece).await.expect("write");
    }
    assert_eq!(writer.len(), data.len() as u64);
    writer.finish().await.expect("flush");
    remote.close(&handle).await.expect("close");
    remote
        .replace(&at(".tmp"), &at("file.bin"))
        .await
        .expect("replace");
    assert_eq!(
        std::fs::read(dir.path().join("file.bin")).expect("read"),
        data
    );
    let stat = remote
        .stat(&at("file.bin"))
        .await
        .expect("stat")
        .expect("exists");
    assert_eq!(
        (stat.kind, stat.size, stat.mode),
        (Kind::File, data.len() as u64, 0o600)
    );

    // Read it back, whole and in part.
    let read = |start: u64, len: u64| {
        let remote = remote.clone();
        let file = at("file.bin");
        async move {
            let (handle, _) = remote.open_read(&file).await.expect("open");
            let (tx, mut rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(remote.stream_file(handle, start, len, tx, Duration::from_secs(10)));
            let mut out = Vec::new();
            while let Some(piece) = rx.recv().await {
                out.extend_from_slice(&piece.expect("piece"));
            }
            out
        }
    };
    assert_eq!(read(0, data.len() as u64).await, data);
    assert_eq!(read(1_000_000, 70_000).await, data[1_000_000..1_070_000]);

    // List, rename (never over an existing name), remove.
    remote.mkdir(&at("sub")).await.expect("mkdir");
    let (entries, truncated) = remote
        .list(&dir.path().display().to_string(), 100)
        .await
        .expect("list");
    let mut names: Vec<_> = entries.iter().map(|(n, s)| (n.as_str(), s.kind)).collect();
    names.sort_by_key(|(n, _)| *n);
    assert_eq!(names, [("file.bin", Kind::File), ("sub", Kind::Directory)]);
    assert!(!truncated);
    let (one, truncated) = remote
        .list(&dir.path().display().to_string(), 1)
        .await
        .expect("list");
    assert_eq!((one.len(), truncated), (1, true));
    remote
        .rename(&at("file.bin"), &at("sub/moved.bin"))
        .await
        .expect("rename");
    std::fs::write(dir.path().join("taken"), b"t").expect("taken");
    assert!(
        remote
            .rename(&at("sub/moved.bin"), &at("taken"))
            .await
            .is_err()
    );
    assert_eq!(
        std::fs::read(dir.path().join("taken")).expect("taken"),
        b"t"
    );
    assert!(matches!(
        remote.remove_dir(&at("sub")).await,
        Err(FsError::Failed(_))
    ));
    remote.remove_file(&at("sub/moved.bin")).await.expect("rm");
    remote.remove_dir(&at("sub")).await.expect("rmdir");
    assert_eq!(remote.stat(&at("sub")).await.expect("stat"), None);
    assert!(matches!(
        remote.open_read(&at("sub")).await,
        Err(FsError::NotFound)
    ));
    drop(remote);
    drop(sshd);
}
