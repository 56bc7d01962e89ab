//! The SSH client the server uses to reach environments: public-key auth, a pinned host key
//! (anything else is refused), commands with bounded output, streamed output lines, and
//! interactive PTY channels.
//!
//! Backpressure: russh hands each channel's incoming messages to a bounded queue
//! ([`CHANNEL_BUFFER`] messages). Nothing here buffers beyond that, so a caller that stops
//! reading a [`PtyReader`] eventually stalls this connection's read loop and then the TCP stream,
//! which holds the remote producer back. That stall covers every channel of the connection
//! (russh opens each channel's SSH window as data arrives, not as it is read), so a user of a
//! shared connection ([`crate::ssh::pool`]) must keep reading its channels.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Disconnect, Sig, client};
use tokio::sync::mpsc;

use super::keys::fingerprint;

/// Messages queued per channel before russh stops reading the connection: a burst of output
/// (at most 32 × 32 KiB packets, 1 MiB) without letting one unread channel hold much memory.
pub const CHANNEL_BUFFER: usize = 32;
/// Longest line [`SshClient::exec_lines`] passes on; the rest of a longer line is dropped.
/// Log lines (cloud-init output, package managers) stay far below this.
pub const MAX_LINE_LEN: usize = 16 * 1024;
/// Keepalive period: a dead environment or network path is noticed within
/// `KEEPALIVE_INTERVAL × (KEEPALIVE_MAX + 1)` even when a terminal is idle.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_MAX: usize = 3;

/// Where and how to reach one environment.
#[derive(Clone)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub key: Arc<PrivateKey>,
    /// The pinned host key: a server presenting any other key is refused.
    pub host_key: PublicKey,
    /// Bound on TCP connect, key exchange and authentication together.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for SshTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("key", &"***")
            .field("host_key", &fingerprint(&self.host_key))
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("host key mismatch: expected {expected}, got {got}")]
    HostKeyMismatch { expected: String, got: String },
    #[error("public key authentication rejected")]
    AuthRejected,
    #[error("channel failed: {0}")]
    Channel(String),
    #[error("timed out")]
    Timeout,
    #[error("connection closed")]
    Closed,
}

impl From<russh::Error> for SshError {
    fn from(e: russh::Error) -> Self {
        match e {
            russh::Error::SendError | russh::Error::RecvError | russh::Error::Disconnect => {
                Self::Closed
            }
            e => Self::Channel(e.to_string()),
        }
    }
}

/// The result of [`SshClient::exec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit status; `None` if the channel closed without one. A signal death is reported as
    /// `128 + signal number`, as shells do.
    pub status: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Output beyond `max_output` (on either stream) was discarded.
    pub truncated: bool,
}

/// One event from a PTY channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyEvent {
    /// Output bytes, as they came (not split on UTF-8 boundaries).
    Data(Bytes),
    /// The remote program exited (a signal death is `128 + signal number`).
    Exit(u32),
    /// The remote side will send no more data.
    Eof,
    /// The channel is closed; `next()` returns `None` after this.
    Closed,
}

/// A connection's handle, as [`crate::ssh::pool::SshPool`] keeps it (weakly).
pub type Handle = client::Handle<PinnedHostKey>;

/// A connection to one SSH server. Cheap to clone; clones share the connection, and channels
/// can be opened on it concurrently. The connection ends when the last clone and the last of
/// its channels are dropped, or on [`SshClient::disconnect`].
#[derive(Clone)]
pub struct SshClient {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for SshClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshClient")
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// Accepts exactly the pinned host key; remembers what else was offered, for the error.
pub struct PinnedHostKey {
    expected: PublicKey,
    offered: Arc<OnceLock<String>>,
}

impl client::Handler for PinnedHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let offered = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                if key.key_data() == self.expected.key_data() {
                    return Ok(true);
                }
                fingerprint(key)
            }
            PublicKeyOrCertificate::Certificate(_) => "a host certificate".to_owned(),
        };
        let _ = self.offered.set(offered);
        Ok(false)
    }
}

fn client_config() -> client::Config {
    client::Config {
        channel_buffer_size: CHANNEL_BUFFER,
        keepalive_interval: Some(KEEPALIVE_INTERVAL),
        keepalive_max: KEEPALIVE_MAX,
        // Liveness comes from keepalives; an idle terminal is not a reason to hang up.
        inactivity_timeout: None,
        nodelay: true,
        ..Default::default()
    }
}

impl SshClient {
    /// Connect, check the host key against the pinned one, authenticate with the target's key.
    pub async fn connect(target: &SshTarget) -> Result<Self, SshError> {
        tokio::time::timeout(target.connect_timeout, Self::connect_inner(target))
            .await
            .unwrap_or(Err(SshError::Timeout))
    }

    async fn connect_inner(target: &SshTarget) -> Result<Self, SshError> {
        let offered = Arc::new(OnceLock::new());
        let handler = PinnedHostKey {
            expected: target.host_key.clone(),
            offered: offered.clone(),
        };
        let addr = (target.host.as_str(), target.port);
        let connected = client::connect(Arc::new(client_config()), addr, handler).await;
        let mut handle = match (connected, offered.get()) {
            (Ok(handle), None) => handle,
            (_, Some(got)) => {
                return Err(SshError::HostKeyMismatch {
                    expected: fingerprint(&target.host_key),
                    got: got.clone(),
                });
            }
            (Err(e), None) => return Err(SshError::Connect(e.to_string())),
        };
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .map_err(|e| SshError::Connect(e.to_string()))?
            .flatten();
        let key = PrivateKeyWithHashAlg::new(target.key.clone(), hash);
        let auth = handle
            .authenticate_publickey(target.user.as_str(), key)
            .await
            .map_err(|e| SshError::Connect(e.to_string()))?;
        if !auth.success() {
            let _ = handle
                .disconnect(Disconnect::ByApplication, "authentication rejected", "en")
                .await;
            return Err(SshError::AuthRejected);
        }
        Ok(Self {
            handle: Arc::new(handle),
        })
    }

    /// Run a command, collect at most `max_output` bytes of stdout and of stderr (the rest is
    /// discarded, flagged), return its exit status. Its stdin is closed at once. There is no
    /// time limit here: wrap the call in a timeout (dropping the future closes the channel).
    pub async fn exec(&self, command: &str, max_output: usize) -> Result<ExecOutput, SshError> {
        let (mut rx, tx) = self.open_exec(command).await?;
        let mut out = ExecOutput {
            status: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
            truncated: false,
        };
        while let Some(msg) = rx.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    out.truncated |= append_capped(&mut out.stdout, &data, max_output);
                }
                ChannelMsg::ExtendedData { data, ext: 1 } => {
                    out.truncated |= append_capped(&mut out.stderr, &data, max_output);
                }
                ChannelMsg::ExitStatus { exit_status } => out.status = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    out.status = Some(signal_status(&signal_name));
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        tx.close_now().await;
        Ok(out)
    }

    /// Run a command and send each stdout line (without the newline, lossy UTF-8, at most
    /// [`MAX_LINE_LEN`] bytes) to `lines` as it arrives; stderr is discarded. Returns the exit
    /// status (`None` if the channel closed without one). If the receiver of `lines` goes away,
    /// the channel is closed and `Ok(None)` returned.
    pub async fn exec_lines(
        &self,
        command: &str,
        lines: mpsc::Sender<String>,
    ) -> Result<Option<u32>, SshError> {
        let (mut rx, tx) = self.open_exec(command).await?;
        let mut splitter = LineSplitter::default();
        let mut status = None;
        loop {
            let msg = tokio::select! {
                msg = rx.wait() => msg,
                () = lines.closed() => {
                    tx.close_now().await;
                    return Ok(None);
                }
            };
            match msg {
                Some(ChannelMsg::Data { data }) => {
                    for line in splitter.push(&data) {
                        if lines.send(line).await.is_err() {
                            tx.close_now().await;
                            return Ok(None);
                        }
                    }
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
                Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                    status = Some(signal_status(&signal_name));
                }
                Some(ChannelMsg::Close) | None => break,
                Some(_) => {}
            }
        }
        if let Some(last) = splitter.finish() {
            // The command is over; a receiver that left now changes nothing.
            let _ = lines.send(last).await;
        }
        tx.close_now().await;
        Ok(status)
    }

    /// Open an interactive PTY session running `command` (or the login shell when `None`).
    pub async fn open_pty(
        &self,
        term: &str,
        cols: u32,
        rows: u32,
        command: Option<&str>,
    ) -> Result<PtySession, SshError> {
        let (mut rx, tx) = self.open_channel().await?;
        tx.half()?
            .request_pty(true, term, cols.max(1), rows.max(1), 0, 0, &[])
            .await?;
        await_reply(&mut rx, "pty-req").await?;
        match command {
            Some(command) => tx.half()?.exec(true, command).await?,
            None => tx.half()?.request_shell(true).await?,
        }
        await_reply(&mut rx, if command.is_some() { "exec" } else { "shell" }).await?;
        Ok(PtySession {
            reader: PtyReader { rx, closed: false },
            writer: PtyWriter { tx },
        })
    }

    /// Open a session channel running the subsystem `name` (e.g. `sftp`) and hand it over as a
    /// byte stream; the channel closes when the stream is dropped. Backpressure as for every
    /// channel ([`CHANNEL_BUFFER`] messages, then the connection stalls).
    pub async fn open_subsystem(
        &self,
        name: &str,
    ) -> Result<russh::ChannelStream<client::Msg>, SshError> {
        let mut channel = self.handle.channel_open_session().await?;
        channel.request_subsystem(true, name).await?;
        loop {
            match channel.wait().await {
                Some(ChannelMsg::Success) => return Ok(channel.into_stream()),
                Some(ChannelMsg::Failure) => {
                    return Err(SshError::Channel(format!(
                        "the server refused the {name} subsystem"
                    )));
                }
                Some(ChannelMsg::Close) | None => {
                    return Err(SshError::Channel(format!(
                        "closed while waiting for the {name} subsystem"
                    )));
                }
                Some(_) => {}
            }
        }
    }

    /// Open a `direct-tcpip` channel to `port` on the environment's own loopback (a port
    /// preview): a byte stream to whatever listens there. Refused by the server when the port is
    /// not the environment's ([`SshError::Channel`]). Reading is bounded by [`CHANNEL_BUFFER`].
    pub async fn direct_tcpip(
        &self,
        port: u16,
    ) -> Result<russh::ChannelStream<client::Msg>, SshError> {
        let channel = self
            .handle
            .channel_open_direct_tcpip("127.0.0.1", u32::from(port), "127.0.0.1", 0)
            .await?;
        Ok(channel.into_stream())
    }

    /// A client on a connection another client made (see [`crate::ssh::pool`]).
    pub(crate) fn from_shared(handle: Arc<Handle>) -> Self {
        Self { handle }
    }

    /// A reference to this connection that does not keep it open.
    pub(crate) fn downgrade(&self) -> std::sync::Weak<Handle> {
        Arc::downgrade(&self.handle)
    }

    /// Whether the connection is gone (then every call fails with [`SshError::Closed`]).
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Say goodbye to the server; channels end with the connection.
    pub async fn disconnect(&self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "bye", "en")
            .await;
    }

    async fn open_channel(&self) -> Result<(ChannelReadHalf, CloseOnDrop), SshError> {
        let channel = self.handle.channel_open_session().await?;
        let (rx, tx) = channel.split();
        Ok((rx, CloseOnDrop(Some(tx))))
    }

    async fn open_exec(&self, command: &str) -> Result<(ChannelReadHalf, CloseOnDrop), SshError> {
        let (mut rx, tx) = self.open_channel().await?;
        tx.half()?.exec(true, command).await?;
        await_reply(&mut rx, "exec").await?;
        // No input: a command that reads stdin sees its end instead of waiting forever.
        tx.half()?.eof().await?;
        Ok((rx, tx))
    }
}

/// Wait for the server's answer to a request sent with `want_reply`.
async fn await_reply(rx: &mut ChannelReadHalf, what: &str) -> Result<(), SshError> {
    loop {
        match rx.wait().await {
            Some(ChannelMsg::Success) => return Ok(()),
            Some(ChannelMsg::Failure) => {
                return Err(SshError::Channel(format!("the server refused {what}")));
            }
            Some(ChannelMsg::Close) | None => {
                return Err(SshError::Channel(format!(
                    "closed while waiting for {what}"
                )));
            }
            Some(_) => {}
        }
    }
}

/// Append at most `cap - buf.len()` bytes; true if anything was cut.
fn append_capped(buf: &mut Vec<u8>, data: &[u8], cap: usize) -> bool {
    let room = cap.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..room.min(data.len())]);
    data.len() > room
}

/// Shell convention for a death by signal: 128 + the signal number (Linux numbering).
fn signal_status(sig: &Sig) -> u32 {
    let n = match sig {
        Sig::HUP => 1,
        Sig::INT => 2,
        Sig::QUIT => 3,
        Sig::ILL => 4,
        Sig::ABRT => 6,
        Sig::FPE => 8,
        Sig::KILL => 9,
        Sig::USR1 => 10,
        Sig::SEGV => 11,
        Sig::PIPE => 13,
        Sig::ALRM => 14,
        Sig::TERM => 15,
        Sig::Custom(_) => 127,
    };
    128 + n
}

/// Splits a byte stream into lines: `\n` ends a line (a preceding `\r` is dropped too), lines
/// longer than [`MAX_LINE_LEN`] are cut there and the rest of them discarded.
#[derive(Default)]
struct LineSplitter {
    current: Vec<u8>,
    /// The current line hit the cap; drop bytes until its newline.
    overflowed: bool,
}

impl LineSplitter {
    fn push(&mut self, data: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for chunk in data.split_inclusive(|b| *b == b'\n') {
            let (body, ends_line) = match chunk.strip_suffix(b"\n") {
                Some(body) => (body, true),
                None => (chunk, false),
            };
            if !self.overflowed {
                let room = MAX_LINE_LEN - self.current.len();
                self.overflowed = body.len() > room;
                self.current
                    .extend_from_slice(&body[..room.min(body.len())]);
            }
            if ends_line {
                out.push(self.take_line());
            }
        }
        out
    }

    fn finish(mut self) -> Option<String> {
        (!self.current.is_empty() || self.overflowed).then(|| self.take_line())
    }

    fn take_line(&mut self) -> String {
        let mut line = std::mem::take(&mut self.current);
        if !self.overflowed && line.last() == Some(&b'\r') {
            line.pop();
        }
        self.overflowed = false;
        String::from_utf8_lossy(&line).into_owned()
    }
}

/// The write half of a client channel, closed when dropped, so an abandoned `exec` or PTY does
/// not leave its remote program running until the connection ends.
struct CloseOnDrop(Option<ChannelWriteHalf<client::Msg>>);

impl CloseOnDrop {
    fn half(&self) -> Result<&ChannelWriteHalf<client::Msg>, SshError> {
        self.0.as_ref().ok_or(SshError::Closed)
    }

    async fn close_now(mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.close().await;
        }
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let (Some(tx), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = tx.close().await;
            });
        }
    }
}

/// An interactive channel with a PTY. Reading is pull-based ([`PtySession::next`]) so the caller
/// controls backpressure. Split it with [`PtySession::into_split`] to write while another task
/// awaits output. Dropping the writer closes the channel.
pub struct PtySession {
    reader: PtyReader,
    writer: PtyWriter,
}

impl PtySession {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), SshError> {
        self.writer.write(data).await
    }

    pub async fn resize(&mut self, cols: u32, rows: u32) -> Result<(), SshError> {
        self.writer.resize(cols, rows).await
    }

    pub async fn next(&mut self) -> Option<PtyEvent> {
        self.reader.next().await
    }

    pub async fn close(self) {
        self.writer.close().await;
    }

    pub fn into_split(self) -> (PtyReader, PtyWriter) {
        (self.reader, self.writer)
    }
}

/// The output side of a [`PtySession`].
pub struct PtyReader {
    rx: ChannelReadHalf,
    closed: bool,
}

impl PtyReader {
    /// The next event; `None` once [`PtyEvent::Closed`] has been returned.
    pub async fn next(&mut self) -> Option<PtyEvent> {
        if self.closed {
            return None;
        }
        loop {
            let event = match self.rx.wait().await {
                Some(ChannelMsg::Data { data }) | Some(ChannelMsg::ExtendedData { data, .. }) => {
                    PtyEvent::Data(data)
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => PtyEvent::Exit(exit_status),
                Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                    PtyEvent::Exit(signal_status(&signal_name))
                }
                Some(ChannelMsg::Eof) => PtyEvent::Eof,
                Some(ChannelMsg::Close) | None => {
                    self.closed = true;
                    PtyEvent::Closed
                }
                Some(_) => continue,
            };
            return Some(event);
        }
    }
}

/// The input side of a [`PtySession`]; dropping it closes the channel.
pub struct PtyWriter {
    tx: CloseOnDrop,
}

impl PtyWriter {
    /// Send keystrokes; waits while the server's channel window is full (a remote that stops
    /// reading makes this wait forever: bound it). Takes `&self`, so a resize can go out while a
    /// write waits for the window. Dropping the future midway may leave part of `data` sent.
    pub async fn write(&self, data: &[u8]) -> Result<(), SshError> {
        self.tx
            .half()?
            .data_bytes(Bytes::copy_from_slice(data))
            .await?;
        Ok(())
    }

    /// Tell the remote PTY its new size (zero is raised to one).
    pub async fn resize(&self, cols: u32, rows: u32) -> Result<(), SshError> {
        self.tx
            .half()?
            .window_change(cols.max(1), rows.max(1), 0, 0)
            .await?;
        Ok(())
    }

    /// Close the channel: the remote side hangs up the PTY.
    pub async fn close(self) {
        self.tx.close_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks_and_crlf() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"li"), Vec::<String>::new());
        assert_eq!(s.push(b"ne1\nline2\r\nline"), vec!["line1", "line2"]);
        assert_eq!(s.push(b"3\n\n"), vec!["line3", ""]);
        assert_eq!(s.push(b"tail"), Vec::<String>::new());
        assert_eq!(s.finish().as_deref(), Some("tail"));
    }

    #[test]
    fn empty_stream_has_no_last_line() {
        let mut s = LineSplitter::default();
        assert!(s.push(b"a\n").len() == 1);
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn long_lines_are_capped_and_the_rest_dropped() {
        let mut s = LineSplitter::default();
        let long = vec![b'x'; MAX_LINE_LEN + 10];
        assert!(s.push(&long[..MAX_LINE_LEN - 1]).is_empty());
        let out = s.push(&long[MAX_LINE_LEN - 1..]);
        assert!(out.is_empty());
        let out = s.push(b"yy\nnext\n");
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len(), MAX_LINE_LEN);
        assert!(out[0].bytes().all(|b| b == b'x'));
        assert_eq!(out[1], "next");
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"a\xffb\n"), vec!["a\u{fffd}b"]);
    }

    #[test]
    fn capped_append_flags_truncation() {
        let mut buf = Vec::new();
        assert!(!append_capped(&mut buf, b"abc", 5));
        assert!(append_capped(&mut buf, b"defg", 5));
        assert_eq!(buf, b"abcde");
        assert!(append_capped(&mut buf, b"h", 5));
        assert!(!append_capped(&mut buf, b"", 5));
    }

    #[test]
    fn signal_deaths_follow_the_shell_convention() {
        assert_eq!(signal_status(&Sig::KILL), 137);
        assert_eq!(signal_status(&Sig::TERM), 143);
    }
}
