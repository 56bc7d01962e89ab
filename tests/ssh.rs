//! The SSH layer over real SSH on 127.0.0.1: our client against our local-provider server, our
//! client against OpenSSH's sshd (the reference server), and the server's clean-up when clients
//! vanish.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use devpocket::ssh::keys::{self, fingerprint, generate_ed25519, parse_public, public_to_openssh};
use devpocket::ssh::{
    Authorizer, LocalSshServer, PtyEvent, PtySession, SessionSpec, SshClient, SshError, SshTarget,
};
use russh::keys::{PrivateKey, PublicKey};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout, timeout_at};

/// Upper bound for anything a test waits on; generous for a loaded CI machine.
const WAIT: Duration = Duration::from_secs(15);
const USER: &str = "dev";

/// Lets exactly one user/key pair in, into one workspace.
struct OneUser {
    user: String,
    key: PublicKey,
    spec: SessionSpec,
}

impl Authorizer for OneUser {
    fn authorize(&self, user: &str, key: &PublicKey) -> Option<SessionSpec> {
        (user == self.user && key.key_data() == self.key.key_data()).then(|| self.spec.clone())
    }
}

/// Our server on 127.0.0.1:0 with a fresh host key and one authorized user key.
struct Fixture {
    server: LocalSshServer,
    host_key: PublicKey,
    user_key: Arc<PrivateKey>,
    workdir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn start() -> Self {
        Self::start_limited(devpocket::ssh::server::MAX_CONNECTIONS).await
    }

    async fn start_limited(max_connections: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let workdir = dir.path().canonicalize().expect("canonical tempdir");
        let host = generate_ed25519();
        let host_key = host.public_key().clone();
        let user_key = Arc::new(generate_ed25519());
        let auth = OneUser {
            user: USER.into(),
            key: user_key.public_key().clone(),
            spec: SessionSpec::new(
                workdir.clone(),
                vec![("DEVPOCKET_TEST".into(), "yes".into())],
                "/bin/bash".into(),
            ),
        };
        let bind: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let server = LocalSshServer::start_with_limit(bind, host, Arc::new(auth), max_connections)
            .await
            .expect("server starts");
        Self {
            server,
            host_key,
            user_key,
            workdir,
            _dir: dir,
        }
    }

    fn target(&self) -> SshTarget {
        target(
            self.server.addr,
            USER,
            self.user_key.clone(),
            self.host_key.clone(),
        )
    }

    async fn client(&self) -> SshClient {
        within(SshClient::connect(&self.target()))
            .await
            .expect("client connects")
    }
}

fn target(addr: SocketAddr, user: &str, key: Arc<PrivateKey>, host_key: PublicKey) -> SshTarget {
    SshTarget {
        host: addr.ip().to_string(),
        port: addr.port(),
        user: user.into(),
        key,
        host_key,
        connect_timeout: Duration::from_secs(10),
    }
}

async fn within<F: std::future::Future>(fut: F) -> F::Output {
    timeout(WAIT, fut).await.expect("timed out")
}

/// Terminal output as plain text: CSI and OSC escape sequences and carriage returns removed.
fn plain(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                Some(']') => {
                    for c in chars.by_ref() {
                        if c == '\x07' {
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// Read PTY output until its plain text contains `needle`. Commands print `@@$((6*7))` so the
/// marker (`@@42`) appears only in output, never in the echoed command line.
async fn read_until(pty: &mut PtySession, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        match timeout_at(deadline, pty.next()).await {
            Ok(Some(PtyEvent::Data(data))) => {
                seen.extend_from_slice(&data);
                let text = plain(&seen);
                if text.contains(needle) {
                    return text;
                }
            }
            Ok(other) => panic!(
                "{other:?} while waiting for {needle:?}; output so far: {:?}",
                plain(&seen)
            ),
            Err(_) => panic!(
                "timed out waiting for {needle:?}; output so far: {:?}",
                plain(&seen)
            ),
        }
    }
}

/// Everything until the channel closes: (joined output, exit status).
async fn read_to_close(pty: &mut PtySession) -> (Vec<u8>, Option<u32>) {
    let deadline = Instant::now() + WAIT;
    let (mut out, mut status) = (Vec::new(), None);
    loop {
        match timeout_at(deadline, pty.next())
            .await
            .expect("channel closes")
        {
            Some(PtyEvent::Data(data)) => out.extend_from_slice(&data),
            Some(PtyEvent::Exit(code)) => status = Some(code),
            Some(PtyEvent::Eof) => {}
            Some(PtyEvent::Closed) | None => return (out, status),
        }
    }
}

/// Whether a process is gone (no /proc entry, or a zombie waiting to be reaped).
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

async fn assert_dies(pid: u32, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !is_dead(pid) {
        assert!(
            Instant::now() < deadline,
            "{what} (pid {pid}) is still running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- our client ↔ our server ------------------------------------------------------------------

#[tokio::test]
async fn pinned_host_key_is_required() {
    let f = Fixture::start().await;
    let client = f.client().await;
    assert!(!client.is_closed());
    client.disconnect().await;

    let imposter = generate_ed25519();
    let mut wrong = f.target();
    wrong.host_key = imposter.public_key().clone();
    match within(SshClient::connect(&wrong)).await {
        Err(SshError::HostKeyMismatch { expected, got }) => {
            assert_eq!(expected, fingerprint(imposter.public_key()));
            assert_eq!(got, fingerprint(&f.host_key));
        }
        other => panic!("expected a host key mismatch, got {other:?}"),
    }
    f.server.stop().await;
}

#[tokio::test]
async fn unknown_keys_and_users_are_rejected() {
    let f = Fixture::start().await;
    let mut stranger = f.target();
    stranger.key = Arc::new(generate_ed25519());
    let result = within(SshClient::connect(&stranger)).await;
    assert!(matches!(result, Err(SshError::AuthRejected)), "{result:?}");

    let mut other_user = f.target();
    other_user.user = "root".into();
    let result = within(SshClient::connect(&other_user)).await;
    assert!(matches!(result, Err(SshError::AuthRejected)), "{result:?}");
    f.server.stop().await;
}

#[tokio::test]
async fn exec_collects_output_and_status() {
    let f = Fixture::start().await;
    let client = f.client().await;

    let out = within(client.exec("echo hello; exit 3", 1024))
        .await
        .expect("exec");
    assert_eq!(out.stdout, b"hello\n");
    assert_eq!(out.status, Some(3));
    assert!(!out.truncated);

    let out = within(client.exec("echo oops >&2; echo fine", 1024))
        .await
        .expect("exec");
    assert_eq!(out.stdout, b"fine\n");
    assert_eq!(out.stderr, b"oops\n");
    assert_eq!(out.status, Some(0));

    let out = within(client.exec("head -c 200000 /dev/zero; echo tail >&2", 1000))
        .await
        .expect("exec");
    assert_eq!(out.stdout.len(), 1000);
    assert_eq!(out.stderr, b"tail\n");
    assert!(out.truncated);
    assert_eq!(out.status, Some(0));

    // A session of its own, with no controlling terminal: nothing an environment runs can
    // reach the terminal the server was started from.
    let out = within(client.exec(
        "[ \"$(ps -o sid= -p $$ | tr -d ' ')\" = \"$$\" ] && echo own-session; cat /dev/tty 2>/dev/null || echo no-tty",
        1024,
    ))
    .await
    .expect("exec");
    assert_eq!(out.stdout, b"own-session\nno-tty\n", "{out:?}");

    // Stdin is closed right away, so a command that reads it does not hang.
    let out = within(client.exec("cat; echo done", 1024))
        .await
        .expect("exec");
    assert_eq!(out.stdout, b"done\n");

    let out = within(client.exec(
        "echo \"$DEVPOCKET_WORKSPACE|$(pwd)|$DEVPOCKET_TEST|$(printenv TERM || echo none)\"",
        4096,
    ))
    .await
    .expect("exec");
    let wd = f.workdir.display();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{wd}|{wd}|yes|none\n")
    );

    let euro = "\u{20ac}".repeat(5000);
    let out = within(client.exec("printf '\\xe2\\x82\\xac%.0s' $(seq 1 5000)", 1 << 20))
        .await
        .expect("exec");
    assert_eq!(String::from_utf8(out.stdout).expect("utf-8"), euro);

    let out = within(client.exec("kill -TERM $$", 1024))
        .await
        .expect("exec");
    assert_eq!(out.status, Some(143));
    f.server.stop().await;
}

#[tokio::test]
async fn channels_run_concurrently_on_one_connection() {
    let f = Fixture::start().await;
    let client = f.client().await;
    let shared = client.clone();
    let (a, b) = within(async {
        tokio::join!(
            client.exec("sleep 0.3; echo a", 64),
            shared.exec("echo b", 64)
        )
    })
    .await;
    assert_eq!(a.expect("a").stdout, b"a\n");
    assert_eq!(b.expect("b").stdout, b"b\n");
    f.server.stop().await;
}

/// A channel whose program reads no input (a raw PTY in front of `sleep`) holds back no other
/// channel of its connection: russh stops reading the whole connection while one channel's queue
/// is full, so the server must keep taking input off it. A paste far beyond what the PTY, the
/// queue and the channel's buffer hold is written without blocking, a second channel on the same
/// connection answers, and the deaf channel's output says its input was dropped.
#[tokio::test]
async fn a_channel_that_reads_no_input_holds_back_no_other() {
    let f = Fixture::start().await;
    let client = f.client().await;
    let deaf = within(client.open_pty(
        "xterm",
        80,
        24,
        Some("stty raw -echo; echo @@$((6*7)); exec sleep 300"),
    ))
    .await
    .expect("pty");
    let (mut reader, writer) = deaf.into_split();
    // Keep reading the deaf channel (the terminal actor always does), collecting its output.
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<Vec<u8>>();
    let draining = tokio::spawn(async move {
        while let Some(event) = reader.next().await {
            if let PtyEvent::Data(data) = event {
                let _ = seen_tx.send(data.to_vec());
            }
        }
    });
    let mut output = Vec::new();
    collect_until(&mut output, &mut seen, "@@42").await;
    // 6 MiB of lines: the PTY takes ~68 KiB, the queue and russh's channel queue 32 messages
    // each, the buffer 1 MiB.
    let line = format!("{}\n", "p".repeat(1023));
    let chunk = line.repeat(32);
    for _ in 0..(6 * 1024 * 1024 / chunk.len()) {
        within(writer.write(chunk.as_bytes()))
            .await
            .expect("a paste into a deaf channel is taken off the connection");
    }
    // Another channel of the same connection is served.
    let mut other = within(client.open_pty("xterm", 80, 24, None))
        .await
        .expect("a second channel opens on the connection");
    within(other.write(b"echo @@$((6*7)) other\n"))
        .await
        .expect("write");
    read_until(&mut other, "@@42 other").await;
    // The deaf channel's user learns that input was dropped.
    collect_until(&mut output, &mut seen, "input dropped").await;
    writer.close().await;
    other.close().await;
    draining.abort();
}

/// Gather chunks from `seen` into `output` until its plain text contains `needle`.
async fn collect_until(
    output: &mut Vec<u8>,
    seen: &mut mpsc::UnboundedReceiver<Vec<u8>>,
    needle: &str,
) {
    let deadline = Instant::now() + WAIT;
    while !plain(output).contains(needle) {
        match timeout_at(deadline, seen.recv()).await {
            Ok(Some(data)) => output.extend_from_slice(&data),
            _ => panic!("no {needle:?} in the output: {:?}", plain(output)),
        }
    }
}

#[tokio::test]
async fn exec_lines_streams_lines_in_order() {
    let f = Fixture::start().await;
    let client = f.client().await;
    let (tx, mut rx) = mpsc::channel(8);
    let status =
        within(client.exec_lines("for i in 1 2 3; do echo line$i; done; printf partial", tx))
            .await
            .expect("exec_lines");
    assert_eq!(status, Some(0));
    let mut lines = Vec::new();
    while let Some(line) = rx.recv().await {
        lines.push(line);
    }
    assert_eq!(lines, ["line1", "line2", "line3", "partial"]);
    f.server.stop().await;
}

#[tokio::test]
async fn exec_lines_stops_when_the_receiver_leaves_and_the_command_dies() {
    let f = Fixture::start().await;
    let client = f.client().await;
    let (tx, mut rx) = mpsc::channel(8);
    let running = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .exec_lines("echo $$; while :; do echo tick; sleep 0.05; done", tx)
                .await
        }
    });
    let pid: u32 = within(rx.recv())
        .await
        .expect("a pid line")
        .parse()
        .expect("numeric pid");
    assert_eq!(within(rx.recv()).await.as_deref(), Some("tick"));
    drop(rx);
    let status = within(running).await.expect("task").expect("exec_lines");
    assert_eq!(status, None);
    assert_dies(pid, "the command of a closed channel").await;
    // The connection is still good.
    let out = within(client.exec("echo still", 64)).await.expect("exec");
    assert_eq!(out.stdout, b"still\n");
    f.server.stop().await;
}

#[tokio::test]
async fn pty_shell_size_resize_workspace_and_exit() {
    let f = Fixture::start().await;
    let client = f.client().await;
    let mut pty = within(client.open_pty("xterm-256color", 80, 24, None))
        .await
        .expect("pty");

    pty.write(b"echo \"@@$((6*7)) $(stty size)\"\n")
        .await
        .expect("write");
    read_until(&mut pty, "@@42 24 80").await;

    pty.resize(132, 43).await.expect("resize");
    pty.write(b"echo \"@@$((6*7)) $(stty size)\"\n")
        .await
        .expect("write");
    read_until(&mut pty, "@@42 43 132").await;

    pty.write(b"echo \"@@$((6*7)) $DEVPOCKET_WORKSPACE $(pwd) $TERM\"\n")
        .await
        .expect("write");
    let wd = f.workdir.display();
    read_until(&mut pty, &format!("@@42 {wd} {wd} xterm-256color")).await;

    pty.write(b"printf '@@%s\\n' \"$((6*7))\" \"$(printf '\\xe2\\x82\\xac%.0s' $(seq 1 3000))\"\n")
        .await
        .expect("write");
    let euros = format!("@@\u{20ac}{}", "\u{20ac}".repeat(2999));
    read_until(&mut pty, &euros).await;

    pty.write(b"exit 7\n").await.expect("write");
    let (_, status) = read_to_close(&mut pty).await;
    assert_eq!(status, Some(7));
    assert_eq!(pty.next().await, None);
    f.server.stop().await;
}

#[tokio::test]
async fn pty_command_and_split_halves() {
    let f = Fixture::start().await;
    let client = f.client().await;
    let pty = within(client.open_pty(
        "xterm",
        100,
        30,
        Some("read line; echo \"got:$line\"; stty size; exit 4"),
    ))
    .await
    .expect("pty");
    let (mut reader, writer) = pty.into_split();
    let reading = tokio::spawn(async move {
        let mut out = Vec::new();
        let mut status = None;
        while let Some(event) = reader.next().await {
            match event {
                PtyEvent::Data(d) => out.extend_from_slice(&d),
                PtyEvent::Exit(code) => status = Some(code),
                PtyEvent::Eof | PtyEvent::Closed => {}
            }
        }
        (out, status)
    });
    writer.write(b"hello\n").await.expect("write");
    let (out, status) = within(reading).await.expect("reader");
    let text = plain(&out);
    assert!(text.contains("got:hello"), "{text:?}");
    assert!(text.contains("30 100"), "{text:?}");
    assert_eq!(status, Some(4));
    f.server.stop().await;
}

// ---- server robustness ------------------------------------------------------------------------

/// A TCP relay in front of the server that the test can cut, as a lost network would.
struct Relay {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("relay binds");
        let addr = listener.local_addr().expect("relay addr");
        let task = tokio::spawn(async move {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
        Self { addr, task }
    }

    /// Drop both sockets without any SSH goodbye.
    async fn cut(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

#[tokio::test]
#[allow(unsafe_code)] // signal(2), to start the server as `nohup` would
async fn vanished_clients_leave_no_processes_and_others_are_served() {
    // As under `nohup` or a service manager: the server ignores SIGHUP, and an ignored signal
    // survives exec. The shell's job must still get its hangup (the server resets dispositions).
    // Process-wide, so every test in this binary runs its server this way.
    // SAFETY: plain FFI call setting a valid signal to SIG_IGN.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    let f = Fixture::start().await;
    let bystander = f.client().await;

    // A PTY shell running a foreground job.
    let relay = Relay::start(f.server.addr).await;
    let mut via_relay = f.target();
    via_relay.host = relay.addr.ip().to_string();
    via_relay.port = relay.addr.port();
    let client = within(SshClient::connect(&via_relay))
        .await
        .expect("connects");
    let mut pty = within(client.open_pty("xterm", 80, 24, None))
        .await
        .expect("pty");
    pty.write(b"sh -c 'echo \"@@$((6*7)) $PPID $$.\"; exec sleep 300'\n")
        .await
        .expect("write");
    let text = read_until(&mut pty, "@@42 ").await;
    let text = read_after_marker(&text, &mut pty).await;
    let pids: Vec<u32> = text
        .split_whitespace()
        .map(|p| p.trim_end_matches('.').parse().expect("pid"))
        .collect();
    let [shell, job] = pids[..] else {
        panic!("expected two pids, got {text:?}")
    };

    // A plain command on a second channel of the same connection.
    let (tx, mut rx) = mpsc::channel(8);
    let exec = tokio::spawn({
        let client = client.clone();
        async move { client.exec_lines("echo $$; sleep 300", tx).await }
    });
    let command: u32 = within(rx.recv())
        .await
        .expect("pid line")
        .parse()
        .expect("numeric pid");

    relay.cut().await;
    assert_dies(shell, "the PTY shell").await;
    assert_dies(job, "the PTY shell's foreground job").await;
    assert_dies(command, "the plain command").await;
    let _ = within(exec).await;
    drop((pty, client));

    let out = within(bystander.exec("echo alive", 64))
        .await
        .expect("exec");
    assert_eq!(out.stdout, b"alive\n");
    let newcomer = f.client().await;
    let out = within(newcomer.exec("echo welcome", 64))
        .await
        .expect("exec");
    assert_eq!(out.stdout, b"welcome\n");
    f.server.stop().await;
}

/// Output after the `@@42 ` marker up to and including the line's end.
async fn read_after_marker(seen: &str, pty: &mut PtySession) -> String {
    let marker = "@@42 ";
    let mut text = seen.to_owned();
    loop {
        if let Some(start) = text.find(marker) {
            let rest = &text[start + marker.len()..];
            if let Some(end) = rest.find('\n') {
                return rest[..end].trim().to_owned();
            }
        }
        match within(pty.next()).await {
            Some(PtyEvent::Data(data)) => text.push_str(&plain(&data)),
            other => panic!("{other:?} while reading pids; output: {text:?}"),
        }
    }
}

/// At its connection limit the local SSH server closes a new connection at once: the client
/// fails fast with a plain error, never waits out its connect timeout; a freed slot serves again.
#[tokio::test]
async fn a_server_at_capacity_refuses_at_once() {
    let f = Fixture::start_limited(1).await;
    let first = f.client().await;
    let mut patient = f.target();
    patient.connect_timeout = Duration::from_secs(120);
    let refused = tokio::time::timeout(WAIT, SshClient::connect(&patient))
        .await
        .expect("refused well before the connect timeout");
    assert!(
        matches!(refused, Err(SshError::Connect(_) | SshError::Closed)),
        "{refused:?}"
    );
    first.disconnect().await;
    drop(first);
    let deadline = Instant::now() + WAIT;
    loop {
        match SshClient::connect(&f.target()).await {
            Ok(again) => {
                let out = within(again.exec("echo again", 64)).await.expect("exec");
                assert_eq!(out.stdout, b"again\n");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "never served again: {e}"),
        }
        tokio::task::yield_now().await;
    }
    f.server.stop().await;
}

#[tokio::test]
async fn stop_ends_sessions_and_their_children() {
    let f = Fixture::start().await;
    let client = f.client().await;
    let (tx, mut rx) = mpsc::channel(8);
    let exec = tokio::spawn({
        let client = client.clone();
        async move { client.exec_lines("echo $$; sleep 300", tx).await }
    });
    let pid: u32 = within(rx.recv())
        .await
        .expect("pid line")
        .parse()
        .expect("numeric pid");
    let addr = f.server.addr;
    within(f.server.stop()).await;
    assert!(is_dead(pid), "stop() returned with the child still running");
    let _ = within(exec).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after stop()"
    );
}

// ---- our client ↔ OpenSSH sshd ----------------------------------------------------------------

fn current_user() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .expect("id -un");
    String::from_utf8(out.stdout)
        .expect("utf-8 user name")
        .trim()
        .to_owned()
}

#[tokio::test]
async fn client_works_against_openssh() {
    let user_key = Arc::new(generate_ed25519());
    let host = generate_ed25519();
    let host_key = host.public_key().clone();
    let sshd = support::sshd::Sshd::start_anywhere(
        &keys::private_to_openssh(&host).expect("encode host key"),
        &public_to_openssh(user_key.public_key()),
    )
    .await;
    let addr: SocketAddr = ([127, 0, 0, 1], sshd.port).into();
    let t = target(addr, &current_user(), user_key.clone(), host_key.clone());

    let client = match within(SshClient::connect(&t)).await {
        Ok(client) => client,
        Err(e) => panic!("connect to sshd: {e}\nsshd log:\n{}", sshd.log()),
    };
    let out = within(client.exec("echo hello; echo err >&2; exit 5", 1024))
        .await
        .expect("exec");
    assert_eq!(out.stdout, b"hello\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status, Some(5));

    let (tx, mut rx) = mpsc::channel(8);
    let status = within(client.exec_lines("for i in 1 2 3; do echo line$i; done", tx))
        .await
        .expect("exec_lines");
    assert_eq!(status, Some(0));
    let mut lines = Vec::new();
    while let Some(line) = rx.recv().await {
        lines.push(line);
    }
    assert_eq!(lines, ["line1", "line2", "line3"]);

    let mut pty = within(client.open_pty("xterm-256color", 80, 24, None))
        .await
        .expect("pty");
    pty.write(b"echo \"@@$((6*7)) $(stty size)\"\n")
        .await
        .expect("write");
    read_until(&mut pty, "@@42 24 80").await;
    pty.resize(132, 43).await.expect("resize");
    pty.write(b"echo \"@@$((6*7)) $(stty size)\"\n")
        .await
        .expect("write");
    read_until(&mut pty, "@@42 43 132").await;
    pty.write(b"exit 7\n").await.expect("write");
    let (_, status) = read_to_close(&mut pty).await;
    assert_eq!(status, Some(7));
    client.disconnect().await;

    // sshd's real host key is not whatever we pin.
    let mut wrong = t.clone();
    wrong.host_key = generate_ed25519().public_key().clone();
    let result = within(SshClient::connect(&wrong)).await;
    assert!(
        matches!(result, Err(SshError::HostKeyMismatch { ref got, .. }) if *got == fingerprint(&host_key)),
        "{result:?}"
    );

    // And a key sshd does not know is refused.
    let mut stranger = t.clone();
    stranger.key = Arc::new(generate_ed25519());
    let result = within(SshClient::connect(&stranger)).await;
    assert!(matches!(result, Err(SshError::AuthRejected)), "{result:?}");

    drop(sshd);
}

#[test]
fn openssh_reads_the_keys_we_write() {
    // ssh-keygen must accept our private key file and derive the same public key from it.
    let key = generate_ed25519();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("id");
    std::fs::write(&path, keys::private_to_openssh(&key).expect("encode")).expect("write");
    let mut perms = std::fs::metadata(&path).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
    std::fs::set_permissions(&path, perms).expect("chmod");
    let out = std::process::Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(&path)
        .output()
        .expect("ssh-keygen runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let derived = parse_public(&String::from_utf8_lossy(&out.stdout)).expect("parses");
    assert_eq!(derived.key_data(), key.public_key().key_data());
}
