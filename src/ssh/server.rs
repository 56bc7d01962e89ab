//! The local provider's SSH server: loopback only, public-key auth through an [`Authorizer`],
//! PTY shells and commands in the environment's workspace directory, and the `sftp` subsystem
//! (OpenSSH's `sftp-server`, run as the session's account like any command: see
//! [`crate::ssh::sftp`]).
//!
//! Each accepted session channel gets its own task that owns the russh channel and runs the
//! protocol for it in order (`pty-req`, `shell`/`exec`, `window-change`, data, EOF, close); the
//! connection handler only authenticates, counts channels and answers requests. Child processes
//! are tied to their channel: when the client closes it or the connection drops, a PTY is hung
//! up (the shell gets SIGHUP), and whatever is still running after [`KILL_GRACE`] is killed.
//!
//! Flow control: output waits for the client's channel window, so a slow client holds the child
//! back through the PTY or pipe. Input goes to the child through a bounded queue. russh
//! acknowledges windows on receipt, not on consumption, and stops reading the whole connection
//! while one channel's queue is full, so a shell's or command's input is always taken off the
//! connection: it waits for the child up to [`INPUT_BUFFER_BYTES`], and what does not fit, or is
//! not taken within [`INPUT_STALL_LIMIT`], is dropped with a notice on the channel's stderr — a
//! terminal whose program reads no input never holds back the others sharing its connection.
//! A subsystem's input is never dropped (its protocol would be garbled by a gap): a wedged
//! `sftp-server` stalls only its own connection (the file API opens one per operation).

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{self, Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{
    Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Disconnect, MethodKind,
    MethodSet,
};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdin};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Concurrent connections by default ([`LocalSshServer::start`]; the local provider passes
/// `local.max_ssh_connections`). Past the limit a new connection is closed at once: a client
/// left waiting in the listen backlog would only time out, slowly and with a vague error.
pub const MAX_CONNECTIONS: usize = 64;
/// Session channels open at once on one connection (a terminal plus a few commands).
pub const MAX_CHANNELS_PER_CONNECTION: usize = 16;
/// Client messages russh queues per channel before it stops reading the connection: a typing
/// burst or a small paste (at most 32 × 32 KiB packets).
const CHANNEL_BUFFER: usize = 32;
/// Client input chunks (each at most one 32 KiB packet) waiting for the child to read them.
const INPUT_QUEUE: usize = 32;
/// Read size for child output. A PTY read returns at most 4 KiB (the line discipline's buffer,
/// N_TTY_BUF_SIZE), pipes more over several reads. The buffer is one per worker thread
/// ([`read_chunk`]), not one per channel: an idle terminal holds none.
const OUTPUT_CHUNK: usize = 8 * 1024;

thread_local! {
    /// [`read_chunk`]'s buffer: only used within one poll, so one per thread serves every channel.
    static READ_SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; OUTPUT_CHUNK].into_boxed_slice());
}

/// One read from `src` (at most [`OUTPUT_CHUNK`] bytes; empty at end of stream), returned as its
/// own exact-size copy. A pending read holds no buffer: each poll reads into this thread's
/// scratch buffer (`AsyncRead` lets every poll bring a different buffer), so thousands of idle
/// channels do not each keep 8 KiB. Errors: those of the read.
async fn read_chunk(src: &mut Output) -> std::io::Result<Bytes> {
    std::future::poll_fn(|cx| {
        READ_SCRATCH.with_borrow_mut(|scratch| {
            let mut buf = tokio::io::ReadBuf::new(scratch);
            std::pin::Pin::new(&mut *src)
                .poll_read(cx, &mut buf)
                .map_ok(|()| Bytes::copy_from_slice(buf.filled()))
        })
    })
    .await
}

/// A PTY read at least this long means the program writes faster than it is read, so the next
/// read is not paced ([`OUTPUT_PACE`]). A PTY read returns at most 4 KiB (the line discipline's
/// buffer, N_TTY_BUF_SIZE) and, while the writer is ahead, 4095 bytes (n_tty keeps a byte of
/// room), so "full" is taken as half of it: a redraw burst reads tens to hundreds of bytes.
const PTY_FULL_READ: usize = 2048;
/// Output pacing of a PTY: after a read shorter than [`PTY_FULL_READ`] (the program writes in
/// small pieces, as tmux redrawing does), the next read waits this long, so a burst leaves as
/// a few packets of up to 4 KiB instead of thousands of tens of bytes, each of which costs an
/// SSH packet (crypto, a loopback write and read), a task wake-up per hop and a WebSocket
/// frame. The first read after a quiet spell is never delayed (a keystroke's echo goes at
/// once); a program that writes faster than this fills the buffer and is read without pause.
/// Measured (issue 12, `cargo bench --bench terminal`, 100 MiB through tmux): the server's CPU
/// per MiB of flood 10.4 ms unpaced, 6.2 ms at 1 ms, 5.4 ms at 2 ms; echo unchanged.
pub const OUTPUT_PACE: Duration = Duration::from_millis(2);

/// How long input may wait for a child that does not read it before it is dropped.
pub const INPUT_STALL_LIMIT: Duration = Duration::from_secs(30);
/// Time a hung-up shell gets to exit on SIGHUP before it is killed.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// After the child exits, output still in flight is forwarded until the stream has been quiet
/// this long (a background job may keep the PTY or pipe open)...
const DRAIN_IDLE: Duration = Duration::from_millis(200);
/// ...or at most this long.
const DRAIN_MAX: Duration = Duration::from_secs(10);
/// From TCP accept to the client's version line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// From the version line to successful authentication (OpenSSH's LoginGraceTime is 120 s).
const AUTH_TIMEOUT: Duration = Duration::from_secs(30);
/// Keepalives find dead clients of idle terminals within about two minutes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_MAX: usize = 3;
/// A connection with no traffic at all (keepalive replies count) for this long is dropped.
const INACTIVITY_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Pause after a failed accept (usually out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long `stop()` waits for sessions to end and children to be reaped.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection being shut down gets to say goodbye.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);
/// `PATH` of a session unless its spec sets one.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// What an authorized session runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSpec {
    /// Working directory of every shell and command (the workspace).
    pub workdir: PathBuf,
    /// The session's variables (`HOME`, `USER`, the environment's own...), on top of a clean
    /// base (`HOME` = workdir, `PATH`, `LANG=C.UTF-8`, `SHELL`); nothing is inherited from the
    /// server process.
    pub env: Vec<(String, String)>,
    /// The shell: `shell -l` for a login shell, `shell -c <command>` for commands.
    pub shell: PathBuf,
    /// Run every program as this OS account, `(uid, gid)`, with no supplementary groups;
    /// `None`: as the server's own user.
    pub account: Option<(u32, u32)>,
    /// A command prefix every program runs under (e.g. `prlimit ... --`);
    /// its first item is the program executed. Empty: the shell runs directly.
    pub wrapper: Vec<OsString>,
}

impl SessionSpec {
    /// A session in `workdir` running `shell` as the server's user, without a wrapper.
    pub fn new(workdir: PathBuf, env: Vec<(String, String)>, shell: PathBuf) -> Self {
        Self {
            workdir,
            env,
            shell,
            account: None,
            wrapper: Vec::new(),
        }
    }

    /// The program to execute and its arguments: the wrapper, the shell, the shell's arguments
    /// (or, for a subsystem, its program instead of the shell).
    fn argv(&self, program: &Program) -> (OsString, Vec<OsString>) {
        let mut argv: Vec<OsString> = self.wrapper.clone();
        match program {
            Program::Subsystem(path) => argv.push(path.clone().into()),
            _ => {
                argv.push(self.shell.clone().into());
                argv.extend(program_args(program));
            }
        }
        let first = argv.remove(0);
        (first, argv)
    }
}

/// Decides who gets in.
pub trait Authorizer: Send + Sync + 'static {
    /// Which session a user/key pair gets, or None to reject. Called for public-key auth only
    /// (password auth is always rejected).
    fn authorize(&self, user: &str, key: &PublicKey) -> Option<SessionSpec>;
}

/// A running server. `stop()` ends it; dropping it does the same without waiting.
pub struct LocalSshServer {
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    accept: JoinHandle<()>,
    /// Closed once every connection and channel task has ended (each holds a sender).
    all_done: mpsc::Receiver<()>,
}

impl std::fmt::Debug for LocalSshServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSshServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl LocalSshServer {
    /// Bind (e.g. `127.0.0.1:0`) and start accepting, at most [`MAX_CONNECTIONS`] at once.
    pub async fn start(
        bind: SocketAddr,
        host_key: PrivateKey,
        authorizer: Arc<dyn Authorizer>,
    ) -> anyhow::Result<Self> {
        Self::start_with_limit(bind, host_key, authorizer, MAX_CONNECTIONS).await
    }

    /// [`LocalSshServer::start`] serving at most `max_connections` at once; one more is closed
    /// as soon as it is accepted.
    pub async fn start_with_limit(
        bind: SocketAddr,
        host_key: PrivateKey,
        authorizer: Arc<dyn Authorizer>,
        max_connections: usize,
    ) -> anyhow::Result<Self> {
        if !bind.ip().is_loopback() {
            tracing::warn!(%bind, "the local SSH server gives shells on this host; it should listen on loopback only");
        }
        let listener = TcpListener::bind(bind)
            .await
            .with_context(|| format!("binding the local SSH server to {bind}"))?;
        let addr = listener.local_addr()?;
        let config = Arc::new(server_config(host_key));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (done_tx, all_done) = mpsc::channel(1);
        let accept = tokio::spawn(accept_loop(
            listener,
            max_connections.max(1),
            config,
            authorizer,
            shutdown_rx,
            done_tx,
        ));
        tracing::info!(%addr, "local SSH server listening");
        Ok(Self {
            addr,
            shutdown,
            accept,
            all_done,
        })
    }

    /// Stop accepting, disconnect every client, and wait (bounded) until their children are
    /// gone.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        let _ = self.accept.await;
        if tokio::time::timeout(STOP_TIMEOUT, self.all_done.recv())
            .await
            .is_err()
        {
            tracing::warn!("local SSH server: sessions still ending after the stop timeout");
        }
    }
}

fn server_config(host_key: PrivateKey) -> server::Config {
    server::Config {
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        // OpenSSH clients open with a "none" probe; answer it at once.
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        channel_buffer_size: CHANNEL_BUFFER,
        max_auth_attempts: 6,
        inactivity_timeout: Some(INACTIVITY_TIMEOUT),
        keepalive_interval: Some(KEEPALIVE_INTERVAL),
        keepalive_max: KEEPALIVE_MAX,
        nodelay: true,
        ..Default::default()
    }
}

async fn accept_loop(
    listener: TcpListener,
    max_connections: usize,
    config: Arc<server::Config>,
    authorizer: Arc<dyn Authorizer>,
    mut shutdown: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let accepted = tokio::select! {
            () = until_set(&mut shutdown) => return,
            accepted = listener.accept() => accepted,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // At capacity: closed now (the client fails fast), never queued.
            tracing::warn!(
                max_connections,
                "local SSH server at capacity: connection refused"
            );
            drop(accepted);
            continue;
        };
        let (socket, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "local SSH server: accept failed");
                // Mostly fd exhaustion: do not spin on it.
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let (authed_tx, authed_rx) = oneshot::channel();
        let handler = ConnectionHandler {
            authorizer: authorizer.clone(),
            identity: None,
            authed: Some(authed_tx),
            channels: HashMap::new(),
            done: done.clone(),
        };
        let config = config.clone();
        let shutdown = shutdown.clone();
        let done = done.clone();
        tokio::spawn(async move {
            serve_connection(socket, config, handler, authed_rx, shutdown).await;
            tracing::debug!(%peer, "local SSH connection ended");
            drop((permit, done));
        });
    }
}

/// Resolves once the flag is set or its sender is gone (a dropped `LocalSshServer` stops too).
async fn until_set(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

async fn serve_connection(
    socket: TcpStream,
    config: Arc<server::Config>,
    handler: ConnectionHandler,
    authed: oneshot::Receiver<()>,
    mut shutdown: watch::Receiver<bool>,
) {
    let session = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        server::run_stream(config, socket, handler),
    )
    .await
    {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "local SSH handshake failed");
            return;
        }
        Err(_) => return,
    };
    let handle = session.handle();
    tokio::pin!(session);
    let auth_deadline = async {
        if tokio::time::timeout(AUTH_TIMEOUT, authed).await.is_ok() {
            // Authenticated (or the session ended first): no deadline any more.
            std::future::pending::<()>().await;
        }
    };
    let reason = tokio::select! {
        result = &mut session => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "local SSH session ended with an error");
            }
            return;
        }
        () = auth_deadline => "authentication timeout",
        () = until_set(&mut shutdown) => "server stopping",
    };
    let goodbye = handle.disconnect(Disconnect::ByApplication, reason.into(), "en".into());
    let _ = tokio::time::timeout(DISCONNECT_GRACE, goodbye).await;
    let _ = tokio::time::timeout(DISCONNECT_GRACE, &mut session).await;
}

/// Per-connection russh handler: authentication, channel bookkeeping, request replies.
struct ConnectionHandler {
    authorizer: Arc<dyn Authorizer>,
    /// Set by successful authentication: who signed in. Every new channel asks the authorizer
    /// again, so a stopped environment's open connections cannot start programs any more.
    identity: Option<(String, PublicKey)>,
    authed: Option<oneshot::Sender<()>>,
    channels: HashMap<ChannelId, ChannelEntry>,
    done: mpsc::Sender<()>,
}

/// What the handler knows about a channel, to answer requests the way its task will act on them.
struct ChannelEntry {
    pty: bool,
    started: bool,
    /// Shared with the channel's task; a count of one means the task has ended.
    alive: Arc<()>,
}

impl server::Handler for ConnectionHandler {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // Spare the signature check for keys that would be refused anyway.
        Ok(match self.authorizer.authorize(user, offer.public_key) {
            Some(_) => Auth::Accept,
            None => Auth::reject(),
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let Some(spec) = self.authorizer.authorize(user, key.public_key) else {
            tracing::info!(user, "local SSH: public key refused");
            return Ok(Auth::reject());
        };
        tracing::debug!(user, workdir = %spec.workdir.display(), "local SSH: authenticated");
        self.identity = Some((user.to_string(), key.public_key.clone()));
        if let Some(authed) = self.authed.take() {
            let _ = authed.send(());
        }
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Dropping `reply` refuses the channel.
        let Some((user, key)) = &self.identity else {
            return Ok(());
        };
        let Some(spec) = self.authorizer.authorize(user, key) else {
            tracing::info!(user, "local SSH: no longer authorized; channel refused");
            return Ok(());
        };
        let spec = Arc::new(spec);
        self.channels
            .retain(|_, entry| Arc::strong_count(&entry.alive) > 1);
        if self.channels.len() >= MAX_CHANNELS_PER_CONNECTION {
            tracing::warn!("local SSH: too many channels on one connection");
            return Ok(());
        }
        let alive = Arc::new(());
        self.channels.insert(
            channel.id(),
            ChannelEntry {
                pty: false,
                started: false,
                alive: alive.clone(),
            },
        );
        let done = self.done.clone();
        tokio::spawn(async move {
            run_channel(channel, spec).await;
            drop((alive, done));
        });
        reply.accept().await;
        Ok(())
    }

    /// A port preview's channel: only to a loopback port owned by the session's own account
    /// (see [`super::forward`]); counted with the session channels.
    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Dropping `reply` refuses the channel.
        let Some((user, key)) = &self.identity else {
            return Ok(());
        };
        let Some(uid) = self
            .authorizer
            .authorize(user, key)
            .and_then(|spec| super::forward::session_uid(spec.account))
        else {
            return Ok(());
        };
        self.channels
            .retain(|_, entry| Arc::strong_count(&entry.alive) > 1);
        if self.channels.len() >= MAX_CHANNELS_PER_CONNECTION {
            tracing::warn!("local SSH: too many channels on one connection");
            return Ok(());
        }
        let alive = Arc::new(());
        let entry = ChannelEntry {
            pty: false,
            started: true,
            alive: alive.clone(),
        };
        self.channels.insert(channel.id(), entry);
        let (host, done) = (host_to_connect.to_string(), self.done.clone());
        tokio::spawn(async move {
            super::forward::direct_tcpip(channel, reply, host, port_to_connect, uid).await;
            drop((alive, done));
        });
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = match self.channels.get_mut(&channel) {
            Some(entry) if !entry.pty && !entry.started => {
                entry.pty = true;
                true
            }
            _ => false,
        };
        Self::reply(session, channel, ok)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self.start(channel);
        Self::reply(session, channel, ok)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self.start(channel);
        Self::reply(session, channel, ok)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self.channels.get(&channel).is_some_and(|entry| entry.pty);
        Self::reply(session, channel, ok)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _variable_name: &str,
        _variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The environment comes from the SessionSpec only.
        Self::reply(session, channel, false)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Only `sftp`, and only where OpenSSH's sftp-server is installed (as the channel's task
        // decides too).
        let ok = subsystem_program(name).is_some() && self.start(channel);
        Self::reply(session, channel, ok)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        Self::reply(session, channel, false)
    }
}

impl ConnectionHandler {
    fn reply(session: &mut Session, channel: ChannelId, ok: bool) -> Result<(), russh::Error> {
        if ok {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    /// The first `shell`/`exec` on a channel starts its program; later ones are refused.
    fn start(&mut self, channel: ChannelId) -> bool {
        match self.channels.get_mut(&channel) {
            Some(entry) if !entry.started => {
                entry.started = true;
                true
            }
            _ => false,
        }
    }
}

/// What a channel runs.
enum Program {
    Shell,
    Exec(Bytes),
    /// A subsystem's program, run without a shell and without a PTY (`sftp`: sftp-server).
    Subsystem(PathBuf),
}

/// The program of a subsystem this server offers: `sftp` only, when sftp-server is installed.
fn subsystem_program(name: &str) -> Option<PathBuf> {
    (name == "sftp")
        .then(crate::ssh::sftp::sftp_server_path)
        .flatten()
}

struct PtyParams {
    term: String,
    size: pty_process::Size,
}

/// How a channel's program ended.
enum Outcome {
    /// It exited: report the status, then EOF and close.
    Exited(u32),
    /// The client closed the channel or went away; the child has been dealt with.
    ClientGone,
}

/// Input for the child, in arrival order.
enum Input {
    Data(Bytes),
    Resize(pty_process::Size),
    Eof,
}

/// One channel, from open to close: collect `pty-req`, start the program on `shell`/`exec`,
/// then shuttle data until the program exits or the client leaves.
async fn run_channel(channel: Channel<Msg>, spec: Arc<SessionSpec>) {
    let (mut rx, tx) = channel.split();
    let mut pty: Option<PtyParams> = None;
    let program = loop {
        match rx.wait().await {
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            }) if pty.is_none() => {
                pty = Some(PtyParams {
                    term,
                    size: pty_size(col_width, row_height),
                });
            }
            Some(ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            }) => {
                if let Some(params) = pty.as_mut() {
                    params.size = pty_size(col_width, row_height);
                }
            }
            Some(ChannelMsg::RequestShell { .. }) => break Program::Shell,
            Some(ChannelMsg::Exec { command, .. }) => break Program::Exec(command.into()),
            Some(ChannelMsg::RequestSubsystem { name, .. }) => {
                // Anything else was refused by the handler.
                if let Some(path) = subsystem_program(&name) {
                    break Program::Subsystem(path);
                }
            }
            Some(ChannelMsg::Close) | None => return,
            // Data before a program has nowhere to go; env and other requests are refused.
            Some(_) => {}
        }
    };
    let outcome = match pty {
        // A subsystem speaks a binary protocol: never through a terminal.
        Some(params) if !matches!(program, Program::Subsystem(_)) => {
            run_in_pty(&mut rx, &tx, &spec, params, &program).await
        }
        _ => run_with_pipes(&mut rx, &tx, &spec, &program).await,
    };
    let status = match outcome {
        Ok(Outcome::ClientGone) => return,
        Ok(Outcome::Exited(status)) => status,
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "local SSH: cannot start the program"
            );
            let message = format!(
                "devpocket: cannot start {}: {e:#}\r\n",
                spec.shell.display()
            );
            let _ = tx.extended_data_bytes(1, message.into_bytes()).await;
            127
        }
    };
    let _ = tx.exit_status(status).await;
    let _ = tx.eof().await;
    let _ = tx.close().await;
}

/// SSH gives columns first, `Size::new` takes rows first.
fn pty_size(cols: u32, rows: u32) -> pty_process::Size {
    let (rows, cols) = rows_cols(cols, rows);
    pty_process::Size::new(rows, cols)
}

/// `(rows, cols)` clamped to what a PTY takes: at least 1 (OpenSSH `-tt` without a terminal
/// sends 0×0), at most `u16::MAX`.
fn rows_cols(cols: u32, rows: u32) -> (u16, u16) {
    let clamp = |v: u32| u16::try_from(v.max(1)).unwrap_or(u16::MAX);
    (clamp(rows), clamp(cols))
}

fn program_args(program: &Program) -> Vec<OsString> {
    match program {
        Program::Shell => vec!["-l".into()],
        Program::Exec(command) => vec![
            "-c".into(),
            std::ffi::OsStr::from_bytes(command).to_os_string(),
        ],
        Program::Subsystem(_) => Vec::new(),
    }
}

/// The child's whole environment, built rather than inherited: a clean base (`HOME` = the
/// workdir, `PATH`, `LANG`, `SHELL`), the spec's variables, `TERM` for a PTY, and
/// `DEVPOCKET_WORKSPACE`.
fn session_env(spec: &SessionSpec, term: Option<&str>) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = vec![
        ("HOME".into(), spec.workdir.clone().into()),
        ("PATH".into(), DEFAULT_PATH.into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("SHELL".into(), spec.shell.clone().into()),
    ];
    env.extend(
        spec.env
            .iter()
            .map(|(name, value)| (name.into(), value.into())),
    );
    if let Some(term) = term {
        env.push(("TERM".into(), term.into()));
    }
    env.push(("DEVPOCKET_WORKSPACE".into(), spec.workdir.clone().into()));
    env
}

async fn run_in_pty(
    rx: &mut ChannelReadHalf,
    tx: &ChannelWriteHalf<Msg>,
    spec: &SessionSpec,
    params: PtyParams,
    program: &Program,
) -> anyhow::Result<Outcome> {
    let (pty, pts) = super::pty::open().context("opening a PTY")?;
    pty.resize(params.size).context("sizing the PTY")?;
    let (file, args) = spec.argv(program);
    let mut command = pty_process::Command::new(file);
    if let Some((uid, gid)) = spec.account {
        // The terminal belongs to the account that uses it (tools reopen it by name).
        std::os::unix::fs::fchown(&pts, Some(uid), Some(gid)).context("handing over the PTY")?;
        command = command.uid(uid).gid(gid);
    }
    command = super::spawn::default_signals_in_pty_child(command);
    let mut child = command
        .args(args)
        .env_clear()
        .envs(session_env(spec, Some(&params.term)))
        .current_dir(&spec.workdir)
        .kill_on_drop(true)
        .spawn(pts)
        .with_context(|| format!("in {}", spec.workdir.display()))?;
    let (reader, writer) = pty.into_split();
    let ended = supervise(
        rx,
        tx,
        &mut child,
        InputSink::Pty(writer),
        Box::new(reader),
        None,
        Some(INPUT_STALL_LIMIT),
    )
    .await;
    // The PTY is closed now (its halves lived in the futures `supervise` dropped).
    Ok(match ended {
        Some(status) => Outcome::Exited(exit_code(status)),
        None => {
            // Hung up: an interactive shell passes SIGHUP on to its jobs and exits.
            if tokio::time::timeout(KILL_GRACE, child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
            Outcome::ClientGone
        }
    })
}

async fn run_with_pipes(
    rx: &mut ChannelReadHalf,
    tx: &ChannelWriteHalf<Msg>,
    spec: &SessionSpec,
    program: &Program,
) -> anyhow::Result<Outcome> {
    let (file, args) = spec.argv(program);
    // A session of its own, without a controlling terminal: a command in an environment must
    // never reach the terminal the server was started from (`/dev/tty`, TIOCSTI keystroke
    // injection, Ctrl-C). `setsid` (util-linux) execs in place — the child is not a group
    // leader, so it does not fork — and the pid we hold stays the program's.
    let mut command = match crate::provider::sandbox::find_tool("setsid") {
        Some(setsid) => {
            let mut command = tokio::process::Command::new(setsid);
            command.arg(file);
            command
        }
        None => {
            tracing::warn!("setsid (util-linux) not found: commands share the server's session");
            let mut command = tokio::process::Command::new(file);
            command.process_group(0);
            command
        }
    };
    if let Some((uid, gid)) = spec.account {
        command.uid(uid).gid(gid);
    }
    super::spawn::default_signals_in_child(&mut command);
    let mut child = command
        .args(args)
        .env_clear()
        .envs(session_env(spec, None))
        .current_dir(&spec.workdir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("in {}", spec.workdir.display()))?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let ended = supervise(
        rx,
        tx,
        &mut child,
        InputSink::Pipe(stdin),
        Box::new(stdout),
        Some(Box::new(stderr)),
        // A subsystem speaks a protocol: input dropped midway would garble the rest of it, so
        // a subsystem that stops reading stalls its own connection instead.
        (!matches!(program, Program::Subsystem(_))).then_some(INPUT_STALL_LIMIT),
    )
    .await;
    Ok(match ended {
        Some(status) => Outcome::Exited(exit_code(status)),
        None => {
            // No hangup without a PTY: the pipes are closed, the child is killed.
            let _ = child.kill().await;
            Outcome::ClientGone
        }
    })
}

type Output = Box<dyn AsyncRead + Send + Unpin>;

/// Run a started child until it exits and its output is drained (`Some(status)`), or until the
/// client closes the channel or goes away (`None`; the child is still to be dealt with). Input
/// the child does not take within `stall_limit` is dropped (`None`: never dropped).
async fn supervise(
    rx: &mut ChannelReadHalf,
    tx: &ChannelWriteHalf<Msg>,
    child: &mut Child,
    sink: InputSink,
    stdout: Output,
    stderr: Option<Output>,
    stall_limit: Option<Duration>,
) -> Option<ExitStatus> {
    let (input_tx, input_rx) = mpsc::channel(INPUT_QUEUE);
    let (exited_tx, exited_rx) = watch::channel(false);
    // Only a PTY is paced: it is a terminal's screen; a pipe may carry a protocol (SFTP) whose
    // round trips a pause would slow.
    let pace = matches!(sink, InputSink::Pty(_)).then_some(OUTPUT_PACE);
    let finished = async {
        let wait = async {
            let status = child.wait().await;
            let _ = exited_tx.send(true);
            status
        };
        let stderr_pump = async {
            if let Some(stderr) = stderr {
                pump_output(stderr, tx, Some(1), exited_rx.clone(), None).await;
            }
        };
        let stdout_pump = pump_output(stdout, tx, None, exited_rx.clone(), pace);
        let (status, (), ()) = tokio::join!(wait, stdout_pump, stderr_pump);
        status
    };
    let client = async {
        let forward = forward_input(rx, tx, input_tx, stall_limit);
        let write = write_input(sink, input_rx);
        tokio::pin!(forward, write);
        let mut writing = true;
        loop {
            tokio::select! {
                () = &mut forward => return,
                () = &mut write, if writing => writing = false,
            }
        }
    };
    tokio::select! {
        status = finished => match status {
            Ok(status) => Some(status),
            Err(e) => {
                tracing::warn!(error = %e, "local SSH: waiting for the child failed");
                Some(ExitStatus::from_raw(255 << 8))
            }
        },
        () = client => None,
    }
}

/// Child output to the channel, waiting for the client's window: everything until EOF (or EIO,
/// how a PTY reports that its last writer is gone). Once the child has exited, it also stops when
/// the output goes quiet ([`DRAIN_IDLE`], at most [`DRAIN_MAX`]), since a background job may
/// hold the stream open. With a `pace` (a PTY), a short read is followed by that pause before
/// the next read ([`OUTPUT_PACE`]).
async fn pump_output(
    mut src: Output,
    tx: &ChannelWriteHalf<Msg>,
    ext: Option<u32>,
    mut exited: watch::Receiver<bool>,
    pace: Option<Duration>,
) {
    let mut drain_until: Option<tokio::time::Instant> = None;
    loop {
        let read = match drain_until {
            None => tokio::select! {
                read = read_chunk(&mut src) => read,
                () = until_set(&mut exited) => {
                    drain_until = Some(tokio::time::Instant::now() + DRAIN_MAX);
                    continue;
                }
            },
            Some(deadline) => {
                let quiet = tokio::time::Instant::now() + DRAIN_IDLE;
                match tokio::time::timeout_at(quiet.min(deadline), read_chunk(&mut src)).await {
                    Ok(read) => read,
                    Err(_) => return,
                }
            }
        };
        let chunk = match read {
            Ok(chunk) if chunk.is_empty() => return,
            Ok(chunk) => chunk,
            // EIO: the PTY's last slave fd closed; anything else ends the stream too.
            Err(_) => return,
        };
        let short = chunk.len() < PTY_FULL_READ;
        let sent = match ext {
            None => tx.data_bytes(chunk).await,
            Some(ext) => tx.extended_data_bytes(ext, chunk).await,
        };
        if sent.is_err() {
            return;
        }
        if let Some(pace) = pace.filter(|p| short && !p.is_zero()) {
            tokio::time::sleep(pace).await;
        }
    }
}

/// Client messages to the input queue, until the client closes the channel or the connection
/// goes.
///
/// With a `stall_limit` (shells and commands) this never leaves russh waiting: russh
/// acknowledges a channel's window on receipt and stops reading the whole connection while one
/// channel's message queue is full, so a program that reads no input would otherwise freeze every
/// other terminal sharing the connection (OpenSSH's sshd keeps per-channel windows instead).
/// Input the child has not taken waits here, up to [`INPUT_BUFFER_BYTES`]; beyond that, and all
/// of it once the child has taken nothing for `stall_limit`, it is dropped, and the client is
/// told once per episode on the channel's stderr. Without a limit (a subsystem, whose protocol a
/// gap would garble) input is handed over in order, waiting as long as the child does.
async fn forward_input(
    rx: &mut ChannelReadHalf,
    tx: &ChannelWriteHalf<Msg>,
    input: mpsc::Sender<Input>,
    stall_limit: Option<Duration>,
) {
    let Some(limit) = stall_limit else {
        while let Some(msg) = rx.wait().await {
            match input_item(msg) {
                Some(Ok(item)) => {
                    let _ = input.send(item).await; // an error: the child's input is closed
                }
                Some(Err(Closed)) => return,
                None => {}
            }
        }
        return;
    };
    let mut pending = InputBuffer::default();
    // The last time the child took input (or input started waiting).
    let mut progress = tokio::time::Instant::now();
    let mut told = false;
    loop {
        let waiting = !pending.is_empty();
        let dropped = tokio::select! {
            msg = rx.wait() => {
                let Some(msg) = msg else { return };
                match input_item(msg) {
                    Some(Ok(item)) => {
                        if !waiting {
                            progress = tokio::time::Instant::now();
                        }
                        pending.push(item)
                    }
                    Some(Err(Closed)) => return,
                    None => 0,
                }
            },
            permit = input.reserve(), if waiting => {
                match permit {
                    Ok(permit) => {
                        if let Some(item) = pending.pop() {
                            permit.send(item);
                        }
                        progress = tokio::time::Instant::now();
                        told &= !pending.is_empty();
                        0
                    }
                    // The child's input is closed: nothing will take it.
                    Err(_) => pending.clear(),
                }
            },
            () = tokio::time::sleep_until(progress + limit), if waiting => {
                // Sizes and EOF stay queued; the next stall is counted from now.
                progress = tokio::time::Instant::now();
                pending.clear_data()
            },
        };
        if dropped > 0 {
            tracing::warn!(
                bytes = dropped,
                "local SSH: the child is not reading its input; dropped"
            );
            if !told {
                told = true;
                let notice = Bytes::from_static(
                    b"\r\n[devpocket: input dropped: the program is not reading its input]\r\n",
                );
                // Bounded: this loop must get back to draining the connection.
                let _ = tokio::time::timeout(NOTICE_WAIT, tx.extended_data_bytes(1, notice)).await;
            }
        }
    }
}

/// Client input a shell's or command's channel holds while its child does not read it: a large
/// paste (the PTY itself takes ~4 KiB, the queue [`INPUT_QUEUE`] messages). Past it, input is
/// dropped (see [`forward_input`]).
pub const INPUT_BUFFER_BYTES: usize = 1024 * 1024;

/// How long the dropped-input notice may wait for the client's window.
const NOTICE_WAIT: Duration = Duration::from_secs(1);

/// The client closed the channel.
struct Closed;

/// What a channel message means for the child's input: `None` for messages that are not input.
fn input_item(msg: ChannelMsg) -> Option<Result<Input, Closed>> {
    Some(Ok(match msg {
        ChannelMsg::Data { data } => Input::Data(data),
        ChannelMsg::WindowChange {
            col_width,
            row_height,
            ..
        } => Input::Resize(pty_size(col_width, row_height)),
        ChannelMsg::Eof => Input::Eof,
        ChannelMsg::Close => return Some(Err(Closed)),
        _ => return None,
    }))
}

/// What one waiting data message is charged beyond its bytes (its `Bytes` handle and queue
/// slot), so a stream of 1-byte messages is bounded by [`INPUT_BUFFER_BYTES`] too.
const INPUT_ITEM_OVERHEAD: usize = 64;

/// Input waiting for the child, bounded to [`INPUT_BUFFER_BYTES`] (data plus
/// [`INPUT_ITEM_OVERHEAD`] per message). A size and EOF are state, not a stream: only the latest
/// size is kept and handed over first, EOF once, after the data; neither is ever dropped.
#[derive(Default)]
struct InputBuffer {
    data: std::collections::VecDeque<Bytes>,
    charged: usize,
    resize: Option<pty_process::Size>,
    eof: bool,
}

impl InputBuffer {
    fn is_empty(&self) -> bool {
        self.data.is_empty() && self.resize.is_none() && !self.eof
    }

    /// Queue `item`; returns the data bytes dropped (all of it when it does not fit).
    fn push(&mut self, item: Input) -> usize {
        match item {
            Input::Data(data) => {
                let cost = data.len() + INPUT_ITEM_OVERHEAD;
                if self.charged + cost > INPUT_BUFFER_BYTES {
                    return data.len();
                }
                self.charged += cost;
                self.data.push_back(data);
            }
            Input::Resize(size) => self.resize = Some(size),
            Input::Eof => self.eof = true,
        }
        0
    }

    fn pop(&mut self) -> Option<Input> {
        if let Some(size) = self.resize.take() {
            return Some(Input::Resize(size));
        }
        if let Some(data) = self.data.pop_front() {
            self.charged -= data.len() + INPUT_ITEM_OVERHEAD;
            return Some(Input::Data(data));
        }
        std::mem::take(&mut self.eof).then_some(Input::Eof)
    }

    /// Drop everything waiting; returns the data bytes dropped.
    fn clear(&mut self) -> usize {
        self.resize = None;
        self.eof = false;
        self.clear_data()
    }

    /// Drop the waiting data (keep the size and EOF); returns its bytes.
    fn clear_data(&mut self) -> usize {
        self.charged = 0;
        self.data.drain(..).map(|d| d.len()).sum()
    }
}

/// Where client input goes.
enum InputSink {
    Pty(pty_process::OwnedWritePty),
    /// `None` once the client sent EOF (stdin closed).
    Pipe(Option<ChildStdin>),
}

/// Input queue to the child; returns when the child's input is closed or broken.
async fn write_input(mut sink: InputSink, mut input: mpsc::Receiver<Input>) {
    while let Some(item) = input.recv().await {
        let ok = match (&mut sink, item) {
            (InputSink::Pty(pty), Input::Data(data)) => pty.write_all(&data).await.is_ok(),
            (InputSink::Pty(pty), Input::Resize(size)) => {
                if let Err(e) = pty.resize(size) {
                    tracing::debug!(error = %e, "local SSH: resize failed");
                }
                true
            }
            // A terminal has no EOF of its own; the user types ^D.
            (InputSink::Pty(_), Input::Eof) => true,
            (InputSink::Pipe(Some(stdin)), Input::Data(data)) => {
                stdin.write_all(&data).await.is_ok()
            }
            (InputSink::Pipe(stdin), Input::Eof) => {
                *stdin = None;
                false
            }
            (InputSink::Pipe(_), _) => true,
        };
        if !ok {
            return;
        }
    }
}

/// The SSH exit status: the code, or 128 + the signal number for a signal death.
fn exit_code(status: ExitStatus) -> u32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u32::try_from(code).unwrap_or(255),
        (None, Some(signal)) => 128 + u32::try_from(signal).unwrap_or(0),
        (None, None) => 255,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_input_is_bounded_in_data_and_keeps_sizes_and_eof() {
        let mut buf = InputBuffer::default();
        let chunk = || Input::Data(Bytes::from(vec![b'x'; 256 * 1024 - INPUT_ITEM_OVERHEAD]));
        for _ in 0..4 {
            assert_eq!(buf.push(chunk()), 0);
        }
        // Full: the next chunk is dropped whole, sizes and EOF are still kept (the latest size).
        assert_eq!(buf.push(chunk()), 256 * 1024 - INPUT_ITEM_OVERHEAD);
        for cols in 1..=1000 {
            assert_eq!(buf.push(Input::Resize(pty_size(cols, 30))), 0);
        }
        assert_eq!(buf.push(Input::Eof), 0);
        assert!(
            matches!(buf.pop(), Some(Input::Resize(size)) if format!("{size:?}") == format!("{:?}", pty_size(1000, 30)))
        );
        assert!(matches!(buf.pop(), Some(Input::Data(_))));
        assert_eq!(buf.push(chunk()), 0, "room again after the child took some");
        assert_eq!(buf.clear_data(), 4 * (256 * 1024 - INPUT_ITEM_OVERHEAD));
        assert!(matches!(buf.pop(), Some(Input::Eof)));
        assert!(buf.is_empty());
        // Tiny messages are bounded too: each is charged its overhead.
        let mut taken = 0;
        while buf.push(Input::Data(Bytes::from_static(b"x"))) == 0 {
            taken += 1;
        }
        assert_eq!(taken, INPUT_BUFFER_BYTES / (1 + INPUT_ITEM_OVERHEAD));
        assert_eq!(buf.clear(), taken);
        assert!(buf.is_empty());
    }

    #[test]
    fn pty_size_swaps_order_and_clamps() {
        assert_eq!(rows_cols(132, 43), (43, 132));
        assert_eq!(rows_cols(0, 0), (1, 1));
        assert_eq!(rows_cols(100_000, 5), (5, u16::MAX));
    }

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }

    #[test]
    fn session_env_is_built_not_inherited() {
        let spec = SessionSpec::new(
            "/work/space".into(),
            vec![("FOO".into(), "bar".into())],
            "/bin/bash".into(),
        );
        let env = session_env(&spec, Some("xterm-256color"));
        let get = |name: &str| {
            env.iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.to_string_lossy().into_owned())
        };
        assert_eq!(get("DEVPOCKET_WORKSPACE").as_deref(), Some("/work/space"));
        assert_eq!(get("TERM").as_deref(), Some("xterm-256color"));
        assert_eq!(get("FOO").as_deref(), Some("bar"));
        assert_eq!(get("SHELL").as_deref(), Some("/bin/bash"));
        assert_eq!(get("PATH").as_deref(), Some(DEFAULT_PATH));
        assert_eq!(get("HOME").as_deref(), Some("/work/space"));
        assert_eq!(get("LANG").as_deref(), Some("C.UTF-8"));
        assert!(
            env.iter()
                .all(|(k, _)| k != "CARGO_MANIFEST_DIR" && k != "USER")
        );
        assert_eq!(
            session_env(&spec, None)
                .iter()
                .filter(|(k, _)| k == "TERM")
                .count(),
            0
        );
    }
}
