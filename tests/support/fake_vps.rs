//! The SSH endpoint a simulated Contabo instance "is": a russh server on 127.0.0.1:0 that takes
//! its host key and the `dev` user's authorized keys from the instance's cloud-init userData.
//!
//! - One port serves every instance of a simulator, so each new TCP connection impersonates the
//!   **most recently created instance whose userData has `ssh_keys.ed25519_private`** — or,
//!   started with [`FakeVps::start_per_address`] next to a simulator that gives every instance
//!   its own loopback address (`SimConfig::ipv4_per_instance`), the instance whose address the
//!   connection was made to, so many instances are served at once. The
//!   connection is closed at once (like an unreachable machine) when there is no such instance,
//!   when it is not `running`, or when its userData does not parse.
//! - Only public-key auth for user `dev` with a key from that user's `ssh_authorized_keys`.
//! - The install log is a clock per instance install (reinstall starts a new one) that starts at
//!   the first SSH connection: line `i` of `install_lines` is "written" `i * line_delay_ms` after
//!   it, and cloud-init is done `len * line_delay_ms` after it.
//! - Exec commands, matched loosely:
//!   - containing `cloud-init-output.log`: with `-f`/`-F` (follow) the lines are streamed as they
//!     are written and the channel stays open until the client closes it; otherwise the lines
//!     written so far are printed and the command exits 0.
//!   - `command -v tmux` with `without_tmux`: exits 1 (no tmux on this machine). After
//!     `refuse_tmux_probes(n)`, the next `n` of them are refused (SSH channel failure), as a
//!     server at its session limit or a broken one answers.
//!   - containing `cloud-init status`: with `--wait` prints `.` while waiting, then
//!     `status: done` (exit code 0 or 2) or `status: error` (1) and exits with `cloud_init_exit`;
//!     without `--wait` prints `status: running` (exit 0) until done. `--long` adds
//!     `extended_status:`; `json` in the command prints a JSON object instead.
//!   - anything else runs for real as `/bin/sh -c <command>` in a temp dir on this host, stdin
//!     from the channel, stdout/stderr streamed (1 MiB each at most), then exit status, EOF, close.
//! - `stall(true)` makes the machine hang like a black-holed host: new TCP connections are
//!   accepted and held without a byte of SSH; `stall(false)` drops the held ones.
//! - `deaf(true)` makes the machine stop reading terminal input, as a remote stuck on a program
//!   that never reads stdin: connections made from then on offer a small SSH window
//!   ([`DEAF_WINDOW`]) that is re-opened at most once, and their PTY channels (exec or shell with
//!   a prior `pty-req`) run no program: they print [`DEAF_BANNER`] and stay open, never reading.
//!   A client writing to one waits for window space for ever once about 1.5 windows are sent.
//! - `cut()` hangs up every SSH connection being served (an SSH disconnect, so the client's
//!   channels end at once); new ones are served as before.
//! - Commands and shells get `TMUX_TMPDIR` = the machine's temp dir, so the tmux server the
//!   terminals start is the machine's own; dropping the `FakeVps` kills it.
//! - `shell` with a prior `pty-req` runs `/bin/bash` in a PTY (window changes honoured); without
//!   one, `/bin/sh` on pipes.

use std::collections::{HashMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, Msg, Session};
use russh::{Channel, ChannelId};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::contabo_sim::{ContaboSim, SimHandle};

/// Output forwarded per stream of one real command; the rest is read and discarded.
const MAX_COMMAND_OUTPUT: usize = 1 << 20;
/// Session channels one connection may hold open.
const MAX_CHANNELS: usize = 16;
/// Input chunks queued per channel before the connection is back-pressured.
const INPUT_QUEUE: usize = 32;
/// Concurrent SSH connections; more wait in the accept backlog.
const MAX_CONNECTIONS: usize = 64;
/// Exec commands remembered; the oldest are dropped beyond this.
const MAX_COMMANDS: usize = 10_000;
/// The SSH window a deaf connection offers per channel: the input a client may send before it has
/// to wait (it is re-opened once, after half of it, then never).
pub const DEAF_WINDOW: u32 = 64 * 1024;
/// What a deaf PTY channel prints when it opens.
pub const DEAF_BANNER: &str = "deaf-terminal: this machine reads no input";
/// While `cloud-init status --wait` waits, one dot per this interval (as cloud-init does).
const STATUS_DOT_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Clone, Debug)]
pub struct FakeVpsConfig {
    /// Lines "written" to /var/log/cloud-init-output.log during installation.
    pub install_lines: Vec<String>,
    /// Delay between lines.
    pub line_delay_ms: u64,
    /// Exit code of `cloud-init status --wait` (0 done, 1 error, 2 done with recoverable errors).
    pub cloud_init_exit: u32,
    /// The image has no tmux: `command -v tmux` exits 1 (terminals get a plain login shell, so
    /// every byte a program prints reaches the server, with no tmux redraw in between).
    pub without_tmux: bool,
}

impl Default for FakeVpsConfig {
    fn default() -> Self {
        Self {
            install_lines: vec![
                "Cloud-init v. 24.1.3-0ubuntu1~22.04.1 running 'init' at Mon, 01 Jan 2026 00:00:00 +0000. Up 5.21 seconds.".into(),
                "Reading package lists...".into(),
                "Setting up docker.io (24.0.7-0ubuntu2~22.04.1) ...".into(),
                "Cloud-init v. 24.1.3-0ubuntu1~22.04.1 finished at Mon, 01 Jan 2026 00:01:00 +0000. Datasource DataSourceNoCloud.  Up 65.02 seconds".into(),
            ],
            line_delay_ms: 2,
            cloud_init_exit: 0,
            without_tmux: false,
        }
    }
}

pub struct FakeVps {
    pub port: u16,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl Drop for FakeVps {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        // The tmux server the terminals started lives on (a daemon) after its clients are
        // killed; its socket is under the machine's temp dir (`TMUX_TMPDIR`).
        let _ = std::process::Command::new("tmux")
            .env("TMUX_TMPDIR", self.shared.workdir.path())
            .arg("kill-server")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

struct Shared {
    sim: SimHandle,
    config: FakeVpsConfig,
    workdir: tempfile::TempDir,
    connections: AtomicUsize,
    /// Hang new connections (see the module doc); the held ones, dropped on un-stall.
    stalled: AtomicBool,
    /// PTY channels of new connections never read input (see the module doc).
    deaf: AtomicBool,
    /// `command -v tmux` execs still to refuse (see the module doc).
    refuse_tmux_probes: AtomicUsize,
    held: Mutex<Vec<tokio::net::TcpStream>>,
    /// Bumped by `cut`: every connection being served hangs up.
    cut: tokio::sync::watch::Sender<u64>,
    commands: Mutex<VecDeque<String>>,
    /// (instance id, install generation) → when its install log started.
    installs: Mutex<HashMap<(i64, u32), Instant>>,
    /// Each connection is the instance at the address it was made to (see the module doc).
    per_address: bool,
}

impl FakeVps {
    /// Serve on 127.0.0.1:0 as the instances of `sim` (see the module doc).
    pub async fn start(sim: &ContaboSim, config: FakeVpsConfig) -> Self {
        Self::serve(sim, config, false).await
    }

    /// Serve every loopback address (127.0.0.0/8) on one port, each connection as the instance
    /// at the address it was made to: for a simulator with `SimConfig::ipv4_per_instance`.
    /// Connections from beyond loopback are closed at once.
    pub async fn start_per_address(sim: &ContaboSim, config: FakeVpsConfig) -> Self {
        Self::serve(sim, config, true).await
    }

    async fn serve(sim: &ContaboSim, config: FakeVpsConfig, per_address: bool) -> Self {
        let bind = if per_address {
            "0.0.0.0:0"
        } else {
            "127.0.0.1:0"
        };
        let listener = TcpListener::bind(bind).await.expect("bind fake vps");
        let port = listener.local_addr().expect("fake vps addr").port();
        let shared = Arc::new(Shared {
            sim: sim.handle(),
            config,
            workdir: tempfile::tempdir().expect("fake vps workdir"),
            connections: AtomicUsize::new(0),
            stalled: AtomicBool::new(false),
            deaf: AtomicBool::new(false),
            refuse_tmux_probes: AtomicUsize::new(0),
            held: Mutex::new(Vec::new()),
            cut: tokio::sync::watch::Sender::new(0),
            commands: Mutex::new(VecDeque::new()),
            installs: Mutex::new(HashMap::new()),
            per_address,
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Self {
            port,
            shared,
            task: Some(task),
        }
    }

    /// Stop serving and release the port (every connection ends).
    pub async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// SSH connections served (connections closed at once are not counted).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Hang new connections without a byte of SSH (`true`), or drop the hung ones (`false`).
    pub fn stall(&self, on: bool) {
        self.shared.stalled.store(on, Ordering::SeqCst);
        if !on {
            self.shared
                .held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
    }

    /// Hang up every SSH connection being served now (new ones are served as before).
    pub fn cut(&self) {
        self.shared.cut.send_modify(|n| *n += 1);
    }

    /// Make terminals of connections made from now on never read their input (`true`), or read
    /// it again (`false`, for new connections). See the module doc.
    pub fn deaf(&self, on: bool) {
        self.shared.deaf.store(on, Ordering::SeqCst);
    }

    /// Refuse the next `n` `command -v tmux` execs (see the module doc).
    pub fn refuse_tmux_probes(&self, n: usize) {
        self.shared.refuse_tmux_probes.store(n, Ordering::SeqCst);
    }

    /// Connections accepted and held while stalled.
    pub fn held(&self) -> usize {
        self.shared
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Every exec command received, in order.
    pub fn commands(&self) -> Vec<String> {
        let commands = self
            .shared
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        commands.iter().cloned().collect()
    }
}

/// Hangs up an SSH session when dropped (see `accept_loop`).
struct HangUpOnDrop(russh::server::Handle);

impl Drop for HangUpOnDrop {
    fn drop(&mut self) {
        let handle = self.0.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = handle
                    .disconnect(
                        russh::Disconnect::ByApplication,
                        "stopped".into(),
                        "en".into(),
                    )
                    .await;
            });
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Dropping the set (when this task is aborted) ends every connection.
    let mut sessions = JoinSet::new();
    loop {
        while sessions.try_join_next().is_some() {}
        if sessions.len() >= MAX_CONNECTIONS {
            let _ = sessions.join_next().await;
            continue;
        }
        let Ok((stream, peer)) = listener.accept().await else {
            return;
        };
        if shared.per_address && !peer.ip().is_loopback() {
            continue;
        }
        if shared.stalled.load(Ordering::SeqCst) {
            let mut held = shared.held.lock().unwrap_or_else(|e| e.into_inner());
            if held.len() < MAX_CONNECTIONS {
                held.push(stream);
            }
            continue;
        }
        let Some(identity) = identify(&shared, &stream) else {
            drop(stream);
            continue;
        };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let _ = stream.set_nodelay(true);
        let deaf = shared.deaf.load(Ordering::SeqCst);
        let config = russh::server::Config {
            window_size: if deaf {
                DEAF_WINDOW
            } else {
                russh::server::Config::default().window_size
            },
            keys: vec![identity.host_key],
            methods: russh::MethodSet::from(&[russh::MethodKind::PublicKey][..]),
            auth_rejection_time: Duration::from_millis(5),
            auth_rejection_time_initial: Some(Duration::ZERO),
            inactivity_timeout: Some(Duration::from_secs(120)),
            nodelay: true,
            ..Default::default()
        };
        let handler = VpsSession {
            shared: shared.clone(),
            authorized: identity.authorized,
            install_start: identity.install_start,
            channels: HashMap::new(),
            deaf,
        };
        let mut cut = shared.cut.subscribe();
        sessions.spawn(async move {
            if let Ok(session) = russh::server::run_stream(Arc::new(config), stream, handler).await
            {
                let handle = session.handle();
                // russh runs the session on a task of its own: this task ending (`stop` drops
                // the set) must hang it up, or the connection would outlive the machine.
                let _hang_up = HangUpOnDrop(handle.clone());
                tokio::select! {
                    _ = session => {}
                    _ = cut.changed() => {
                        let _ = handle
                            .disconnect(russh::Disconnect::ByApplication, "cut".into(), "en".into())
                            .await;
                    }
                }
            }
        });
    }
}

/// Who a new connection is: the latest instance with a host key (or the one at the address the
/// connection was made to), if it is up.
struct Identity {
    host_key: PrivateKey,
    authorized: Vec<PublicKey>,
    install_start: Instant,
}

fn identify(shared: &Shared, stream: &tokio::net::TcpStream) -> Option<Identity> {
    let target = if shared.per_address {
        match stream.local_addr().ok()?.ip() {
            std::net::IpAddr::V4(ip) => shared.sim.ssh_target_at(ip)?,
            std::net::IpAddr::V6(_) => return None,
        }
    } else {
        shared.sim.latest_ssh_target()?
    };
    if target.status != "running" {
        return None;
    }
    let cloud: CloudConfig = serde_norway::from_str(&target.user_data).ok()?;
    let pem = cloud.ssh_keys?.ed25519_private?;
    let host_key = russh::keys::decode_secret_key(&pem, None).ok()?;
    let authorized = cloud
        .users
        .iter()
        .filter(|u| u.get("name").and_then(|n| n.as_str()) == Some("dev"))
        .flat_map(|u| match u.get("ssh_authorized_keys") {
            Some(serde_norway::Value::Sequence(keys)) => keys
                .iter()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect(),
            Some(serde_norway::Value::String(key)) => vec![key.clone()],
            _ => Vec::new(),
        })
        .filter_map(|line| PublicKey::from_openssh(line.trim()).ok())
        .collect();
    let install_start = *shared
        .installs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry((target.instance_id, target.generation))
        .or_insert_with(Instant::now);
    Some(Identity {
        host_key,
        authorized,
        install_start,
    })
}

#[derive(Deserialize)]
struct CloudConfig {
    #[serde(default)]
    ssh_keys: Option<CloudSshKeys>,
    #[serde(default)]
    users: Vec<serde_norway::Value>,
}

#[derive(Deserialize)]
struct CloudSshKeys {
    #[serde(default)]
    ed25519_private: Option<String>,
}

/// Input to a running channel task.
enum Input {
    Data(Bytes),
    Resize { cols: u32, rows: u32 },
}

#[derive(Default)]
struct ChannelState {
    pty: Option<(String, u32, u32)>,
    input: Option<mpsc::Sender<Input>>,
    task: Option<JoinHandle<()>>,
}

struct VpsSession {
    shared: Arc<Shared>,
    authorized: Vec<PublicKey>,
    install_start: Instant,
    channels: HashMap<ChannelId, ChannelState>,
    /// Terminals on this connection never read input.
    deaf: bool,
}

impl Drop for VpsSession {
    fn drop(&mut self) {
        for channel in self.channels.values_mut() {
            if let Some(task) = channel.task.take() {
                task.abort();
            }
        }
    }
}

impl VpsSession {
    fn allowed(&self, user: &str, key: &PublicKey) -> bool {
        user == "dev"
            && self
                .authorized
                .iter()
                .any(|k| k.key_data() == key.key_data())
    }

    fn record(&self, command: &str) {
        let mut commands = self
            .shared
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if commands.len() >= MAX_COMMANDS {
            commands.pop_front();
        }
        commands.push_back(command.to_string());
    }

    /// Give the channel an input queue and return its receiving end.
    fn input_for(&mut self, channel: ChannelId) -> mpsc::Receiver<Input> {
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        if let Some(state) = self.channels.get_mut(&channel) {
            state.input = Some(tx);
        }
        rx
    }

    fn set_task(&mut self, channel: ChannelId, task: JoinHandle<()>) {
        match self.channels.get_mut(&channel) {
            Some(state) => {
                if let Some(old) = state.task.replace(task) {
                    old.abort();
                }
            }
            None => task.abort(),
        }
    }

    fn install(&self) -> InstallLog {
        InstallLog {
            lines: self.shared.config.install_lines.clone(),
            start: self.install_start,
            delay: Duration::from_millis(self.shared.config.line_delay_ms),
            exit: self.shared.config.cloud_init_exit,
        }
    }
}

impl russh::server::Handler for VpsSession {
    type Error = anyhow::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.allowed(user, offer.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.allowed(user, key.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    fn adjust_window(&mut self, _channel: ChannelId, current: u32) -> u32 {
        // Deaf: after this (first) re-opening the target window is 1, so russh never re-opens
        // any window of this connection again.
        if self.deaf { 1 } else { current }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Dropping `reply` rejects the channel; `channel` itself is not needed (the handler
        // callbacks carry its traffic).
        if self.channels.len() < MAX_CHANNELS {
            self.channels.insert(channel.id(), ChannelState::default());
            reply.accept().await;
        }
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.channels.get_mut(&channel) {
            Some(state) => {
                state.pty = Some((term.to_string(), col_width, row_height));
                session.channel_success(channel)?;
            }
            None => session.channel_failure(channel)?,
        }
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self.channels.contains_key(&channel) {
            session.channel_failure(channel)?;
            return Ok(());
        }
        let command = String::from_utf8_lossy(data).into_owned();
        self.record(&command);
        if command.contains("command -v tmux")
            && self
                .shared
                .refuse_tmux_probes
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            session.channel_failure(channel)?;
            return Ok(());
        }
        session.channel_success(channel)?;
        let handle = session.handle();
        let has_pty = self.channels.get(&channel).is_some_and(|s| s.pty.is_some());
        let task = if self.deaf && has_pty {
            tokio::spawn(deaf_pty(handle, channel))
        } else if command.contains("cloud-init-output.log") {
            let follow = command
                .split_whitespace()
                .any(|w| w.starts_with('-') && !w.starts_with("--") && w.contains(['f', 'F']))
                || command.contains("--follow");
            tokio::spawn(tail(handle, channel, self.install(), follow))
        } else if command.contains("cloud-init status") {
            tokio::spawn(cloud_init_status(handle, channel, self.install(), command))
        } else if self.shared.config.without_tmux && command.contains("command -v tmux") {
            let rx = self.input_for(channel);
            let workdir = self.shared.workdir.path().to_path_buf();
            tokio::spawn(run_command(
                handle,
                channel,
                Some("exit 1".into()),
                workdir,
                rx,
            ))
        } else if let Some(pty) = self.channels.get(&channel).and_then(|s| s.pty.clone()) {
            // As OpenSSH does: a command with a PTY requested runs on that PTY (tmux needs one).
            let rx = self.input_for(channel);
            let workdir = self.shared.workdir.path().to_path_buf();
            tokio::spawn(pty_shell(handle, channel, pty, workdir, rx, Some(command)))
        } else {
            let rx = self.input_for(channel);
            let workdir = self.shared.workdir.path().to_path_buf();
            tokio::spawn(run_command(handle, channel, Some(command), workdir, rx))
        };
        self.set_task(channel, task);
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(pty) = self.channels.get(&channel).map(|s| s.pty.clone()) else {
            session.channel_failure(channel)?;
            return Ok(());
        };
        session.channel_success(channel)?;
        let handle = session.handle();
        let rx = self.input_for(channel);
        let workdir = self.shared.workdir.path().to_path_buf();
        let task = match pty {
            Some(_) if self.deaf => tokio::spawn(deaf_pty(handle, channel)),
            Some(pty) => tokio::spawn(pty_shell(handle, channel, pty, workdir, rx, None)),
            None => tokio::spawn(run_command(handle, channel, None, workdir, rx)),
        };
        self.set_task(channel, task);
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let input = self.channels.get(&channel).and_then(|s| s.input.clone());
        if let Some(input) = input {
            let _ = input.send(Input::Data(Bytes::copy_from_slice(data))).await;
        }
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let input = self.channels.get(&channel).and_then(|s| s.input.clone());
        if let Some(input) = input {
            let _ = input
                .send(Input::Resize {
                    cols: col_width,
                    rows: row_height,
                })
                .await;
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Closes the command's stdin (a PTY shell keeps its input open).
        if let Some(state) = self.channels.get_mut(&channel)
            && state.pty.is_none()
        {
            state.input = None;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(mut state) = self.channels.remove(&channel)
            && let Some(task) = state.task.take()
        {
            task.abort();
        }
        Ok(())
    }
}

/// The install log of one instance install.
struct InstallLog {
    lines: Vec<String>,
    start: Instant,
    delay: Duration,
    exit: u32,
}

impl InstallLog {
    fn written_at(&self, index: usize) -> Instant {
        self.start + self.delay * index as u32
    }

    fn done_at(&self) -> Instant {
        self.start + self.delay * self.lines.len() as u32
    }
}

/// End an exec: exit status, then EOF and close.
async fn finish(handle: &russh::server::Handle, channel: ChannelId, code: u32) {
    let _ = handle.exit_status_request(channel, code).await;
    let _ = handle.eof(channel).await;
    let _ = handle.close(channel).await;
}

async fn tail(handle: russh::server::Handle, channel: ChannelId, log: InstallLog, follow: bool) {
    for (index, line) in log.lines.iter().enumerate() {
        let at = log.written_at(index);
        if follow {
            tokio::time::sleep_until(at).await;
        } else if Instant::now() < at {
            break;
        }
        if handle.data(channel, format!("{line}\n")).await.is_err() {
            return;
        }
    }
    if follow {
        // Like `tail -F`: never ends by itself; the task is aborted when the channel closes.
        std::future::pending::<()>().await;
    }
    finish(&handle, channel, 0).await;
}

async fn cloud_init_status(
    handle: russh::server::Handle,
    channel: ChannelId,
    log: InstallLog,
    command: String,
) {
    let wait = command.contains("--wait") || command.split_whitespace().any(|w| w == "-w");
    let json = command.contains("json");
    if wait && !json {
        let mut waited = false;
        while Instant::now() < log.done_at() {
            if handle.data(channel, ".").await.is_err() {
                return;
            }
            waited = true;
            tokio::time::sleep_until(log.done_at().min(Instant::now() + STATUS_DOT_INTERVAL)).await;
        }
        if waited && handle.data(channel, "\n").await.is_err() {
            return;
        }
    } else if wait {
        tokio::time::sleep_until(log.done_at()).await;
    }
    let done = Instant::now() >= log.done_at();
    let (status, extended, code) = match (done, log.exit) {
        (false, _) => ("running", "running", 0),
        (true, 0) => ("done", "done", 0),
        (true, 1) => ("error", "error - done", 1),
        (true, code) => ("done", "degraded done", code),
    };
    let text = if json {
        format!(
            "{}\n",
            serde_json::json!({
                "status": status,
                "extended_status": extended,
                "boot_status_code": "enabled-by-generator",
                "errors": if code == 1 { vec!["('scripts_user', RuntimeError('Runparts: 1 failures'))"] } else { vec![] },
                "recoverable_errors": {},
            })
        )
    } else if command.contains("--long") {
        format!(
            "status: {status}\nextended_status: {extended}\nboot_status_code: enabled-by-generator\ndetail: DataSourceNoCloud\n"
        )
    } else {
        format!("status: {status}\n")
    };
    if handle.data(channel, text).await.is_err() {
        return;
    }
    finish(&handle, channel, code).await;
}

/// Aborts the task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Run `/bin/sh -c command` (or an interactive `/bin/sh` on pipes) for real.
async fn run_command(
    handle: russh::server::Handle,
    channel: ChannelId,
    command: Option<String>,
    workdir: std::path::PathBuf,
    mut input: mpsc::Receiver<Input>,
) {
    let mut cmd = tokio::process::Command::new("/bin/sh");
    if let Some(command) = &command {
        cmd.arg("-c").arg(command);
    }
    cmd.current_dir(&workdir)
        .env("TMUX_TMPDIR", &workdir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let _ = handle.extended_data(channel, 1, format!("sh: {e}\n")).await;
            finish(&handle, channel, 127).await;
            return;
        }
    };
    let stdin = child.stdin.take();
    let _writer = AbortOnDrop(tokio::spawn(async move {
        let Some(mut stdin) = stdin else {
            return;
        };
        while let Some(message) = input.recv().await {
            if let Input::Data(bytes) = message
                && stdin.write_all(&bytes).await.is_err()
            {
                return;
            }
        }
        // The channel's EOF drops the sender: close stdin.
    }));
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    tokio::join!(
        pump(&handle, channel, None, stdout),
        pump(&handle, channel, Some(1), stderr)
    );
    let code = match child.wait().await {
        Ok(status) => status
            .code()
            .map(|c| c as u32)
            .or_else(|| status.signal().map(|s| 128 + s as u32))
            .unwrap_or(255),
        Err(_) => 255,
    };
    finish(&handle, channel, code).await;
}

/// Forward a child's output to the channel (`ext` = 1 for stderr), at most
/// [`MAX_COMMAND_OUTPUT`] bytes; the rest is drained so the child never blocks.
async fn pump<R: AsyncRead + Unpin>(
    handle: &russh::server::Handle,
    channel: ChannelId,
    ext: Option<u32>,
    reader: Option<R>,
) {
    let Some(mut reader) = reader else {
        return;
    };
    let mut sent = 0usize;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let take = n.min(MAX_COMMAND_OUTPUT - sent);
        if take == 0 {
            continue;
        }
        sent += take;
        let chunk = Bytes::copy_from_slice(&buf[..take]);
        let delivered = match ext {
            Some(ext) => handle.extended_data(channel, ext, chunk).await.is_ok(),
            None => handle.data(channel, chunk).await.is_ok(),
        };
        if !delivered {
            return;
        }
    }
}

/// A terminal that never reads its input: a banner, then silence until the channel closes (the
/// task is aborted then).
async fn deaf_pty(handle: russh::server::Handle, channel: ChannelId) {
    if handle
        .data(channel, format!("{DEAF_BANNER}\r\n"))
        .await
        .is_ok()
    {
        std::future::pending::<()>().await;
    }
}

/// `/bin/bash` in a PTY, or `bash -c command` (an exec with a PTY requested).
async fn pty_shell(
    handle: russh::server::Handle,
    channel: ChannelId,
    (term, cols, rows): (String, u32, u32),
    workdir: std::path::PathBuf,
    mut input: mpsc::Receiver<Input>,
    command: Option<String>,
) {
    let size = |cols: u32, rows: u32| {
        pty_process::Size::new(
            rows.clamp(1, u16::MAX as u32) as u16,
            cols.clamp(1, u16::MAX as u32) as u16,
        )
    };
    let spawned = devpocket::ssh::pty::open().and_then(|(pty, pts)| {
        pty.resize(size(cols, rows))?;
        let mut shell = pty_process::Command::new("/bin/bash");
        if let Some(command) = &command {
            shell = shell.arg("-c").arg(command);
        }
        let child = shell
            .env("TERM", &term)
            .current_dir(&workdir)
            .env("TMUX_TMPDIR", &workdir)
            .kill_on_drop(true)
            .spawn(pts)?;
        Ok((pty, child))
    });
    let (pty, mut child) = match spawned {
        Ok(spawned) => spawned,
        Err(e) => {
            let _ = handle
                .extended_data(channel, 1, format!("pty: {e}\n"))
                .await;
            finish(&handle, channel, 1).await;
            return;
        }
    };
    let (mut reader, mut writer) = pty.into_split();
    let _writer = AbortOnDrop(tokio::spawn(async move {
        while let Some(message) = input.recv().await {
            match message {
                Input::Data(bytes) => {
                    if writer.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                Input::Resize { cols, rows } => {
                    let _ = writer.resize(size(cols, rows));
                }
            }
        }
    }));
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Linux answers EIO instead of EOF once the shell has exited.
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if handle
            .data(channel, Bytes::copy_from_slice(&buf[..n]))
            .await
            .is_err()
        {
            return;
        }
    }
    let code = match child.wait().await {
        Ok(status) => status.code().map(|c| c as u32).unwrap_or(255),
        Err(_) => 255,
    };
    finish(&handle, channel, code).await;
}
