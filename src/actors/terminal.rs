//! The Terminal actor: one per open terminal, a child of the user's session actor. It owns an SSH
//! connection to the environment with a PTY running `tmux new-session -A -s devpocket_<env>`, a
//! bounded output ring, and the currently attached WebSocket (at most one).
//!
//! Bytes do not pass through the actor's mailbox: a pump task reads the SSH channel into the ring
//! and the attached client's bounded queue, and waits when that queue is full, so a slow phone
//! holds the SSH window closed instead of growing server memory. Input goes through its own
//! bounded queue to a writer, so Ctrl-C gets through during a flood. The actor handles control:
//! attach, detach and the grace period, reconnecting a lost SSH connection, closing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use crate::actors::environment::actor::EnvUpdate;
use crate::protocol::{EnvironmentInfo, EnvironmentStatus, ServerFrame, StreamFrame};
use crate::ssh::client::{PtyReader, PtyWriter, SshClient, SshTarget};
use crate::terminal::coalesce::Coalescer;
use crate::terminal::output::{Replay, Ring, incomplete_tail};

/// Frames queued for one WebSocket before the pump waits (the backpressure bound).
pub const CLIENT_QUEUE: usize = 64;
/// Input messages queued from the client before its reads wait.
pub const INPUT_QUEUE: usize = 256;
/// Flowing output is coalesced up to this many bytes per frame...
pub const COALESCE_BYTES: usize = 16 * 1024;
/// ...or for this long after the first byte, whichever comes first (see `coalesce`: output after
/// a quiet spell goes out at once).
pub const COALESCE_WAIT: Duration = Duration::from_millis(4);
const TERM: &str = "xterm-256color";

/// Something for the attached WebSocket.
#[derive(Debug)]
pub enum Out {
    Frame(ServerFrame),
    /// Close the WebSocket with this code and reason.
    Close(u16, String),
}

/// Something from the client for the shell.
#[derive(Debug)]
pub enum In {
    Data(Vec<u8>),
    Resize { cols: u32, rows: u32 },
}

/// What the WebSocket gets when it attaches.
pub struct Attachment {
    pub terminal: ActorRef<TerminalMsg>,
    pub terminal_id: String,
    pub connection: u64,
    pub frames: mpsc::Receiver<Out>,
    pub input: mpsc::Sender<In>,
    /// Where this connection's stream starts.
    pub offset: u64,
    /// Output to send right after the welcome (bytes the client missed), or a notice that some
    /// were lost.
    pub replay: Option<ServerFrame>,
    pub notice: Option<ServerFrame>,
    /// Closed (with a code and reason) when this attachment is replaced or the terminal ends.
    pub closed: watch::Receiver<Option<(u16, String)>>,
}

struct Sink {
    connection: u64,
    frames: mpsc::Sender<Out>,
    closed: watch::Sender<Option<(u16, String)>>,
}

/// What the pump and `attach` share; the lock is never held across an `.await`.
struct Shared {
    ring: Ring,
    /// Bytes read that end inside a UTF-8 character; they go out with the next frame.
    carry: Vec<u8>,
    sink: Option<Sink>,
}

/// Counters for ops and the audit trail.
#[derive(Default, Debug)]
pub struct Stats {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub attached: std::sync::atomic::AtomicBool,
}

pub enum TerminalMsg {
    Attach {
        offset: Option<u64>,
        reply: RpcReplyPort<Attachment>,
    },
    Detached {
        connection: u64,
    },
    GraceExpired {
        connection: u64,
    },
    /// The pump of SSH connection `generation` ended.
    PumpEnded {
        generation: u64,
        exit: Option<u32>,
    },
    Reconnect {
        attempt: u32,
    },
    /// The environment changed status.
    EnvironmentStatus(EnvironmentStatus),
    Close {
        code: u16,
        reason: String,
    },
    Crash(String),
}

pub struct TerminalArgs {
    pub terminal_id: String,
    pub environment: EnvironmentInfo,
    pub target: SshTarget,
    pub cols: u32,
    pub rows: u32,
    pub ring_bytes: usize,
    pub grace: Duration,
    pub reconnect_attempts: u32,
    pub feed: Option<broadcast::Receiver<EnvUpdate>>,
    pub stats: Arc<Stats>,
    pub directory: crate::actors::directory::Directory,
    pub directory_id: String,
    /// Called once when the terminal ends, with the bytes in and out (for the audit trail).
    pub on_close: Option<Box<dyn FnOnce(u64, u64) + Send + Sync>>,
}

pub struct TerminalActor;

pub struct TerminalState {
    args: TerminalArgs,
    shared: Arc<Mutex<Shared>>,
    writer: Arc<tokio::sync::Mutex<Option<PtyWriter>>>,
    input: mpsc::Sender<In>,
    client: Option<SshClient>,
    generation: u64,
    next_connection: u64,
    size: Arc<Mutex<(u32, u32)>>,
    tasks: Vec<JoinHandle<()>>,
    pump: Option<JoinHandle<()>>,
}

impl Drop for TerminalState {
    fn drop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(p) = self.pump.take() {
            p.abort();
        }
        self.close_sink(1001, "Terminal closed");
        if let Some(on_close) = self.args.on_close.take() {
            on_close(
                self.args.stats.bytes_in.load(Ordering::Relaxed),
                self.args.stats.bytes_out.load(Ordering::Relaxed),
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The command the PTY runs: tmux keeps the shell alive across disconnects.
pub fn tmux_command(environment_id: &str) -> String {
    format!("tmux new-session -A -s devpocket_{environment_id}")
}

impl TerminalState {
    fn close_sink(&self, code: u16, reason: &str) {
        if let Some(sink) = lock(&self.shared).sink.take() {
            let _ = sink.closed.send(Some((code, reason.to_string())));
        }
        self.args.stats.attached.store(false, Ordering::Relaxed);
    }

    /// Send a control frame to the attached client, if any (never waits).
    fn notify(&self, frame: ServerFrame) {
        if let Some(sink) = &lock(&self.shared).sink {
            let _ = sink.frames.try_send(Out::Frame(frame));
        }
    }

    /// Connect and open the PTY; start the pump.
    async fn open(&mut self, myself: &ActorRef<TerminalMsg>) -> Result<(), String> {
        let client = SshClient::connect(&self.args.target)
            .await
            .map_err(|e| format!("cannot connect to the environment: {e}"))?;
        let has_tmux = client
            .exec("command -v tmux", 1024)
            .await
            .map(|o| o.status == Some(0))
            .unwrap_or(false);
        let command = has_tmux.then(|| tmux_command(&self.args.environment.id));
        if !has_tmux {
            self.notify(ServerFrame::info(
                "tmux is not installed in this environment: starting a plain login shell, which will not survive disconnects",
            ));
        }
        let (cols, rows) = *lock(&self.size);
        let pty = client
            .open_pty(TERM, cols, rows, command.as_deref())
            .await
            .map_err(|e| format!("cannot open a terminal: {e}"))?;
        let (reader, writer) = pty.into_split();
        *self.writer.lock().await = Some(writer);
        self.generation += 1;
        if let Some(old) = self.pump.take() {
            old.abort();
        }
        self.pump = Some(tokio::spawn(pump(
            reader,
            self.shared.clone(),
            self.args.stats.clone(),
            myself.clone(),
            self.generation,
        )));
        self.client = Some(client);
        Ok(())
    }
}

/// Read the SSH channel, coalesce, cut on UTF-8 boundaries, record in the ring, hand to the
/// attached client — waiting while its queue is full (that wait is the backpressure).
async fn pump(
    mut reader: PtyReader,
    shared: Arc<Mutex<Shared>>,
    stats: Arc<Stats>,
    myself: ActorRef<TerminalMsg>,
    generation: u64,
) {
    let mut exit = None;
    let mut coalescer = Coalescer::new(COALESCE_BYTES, COALESCE_WAIT);
    loop {
        let batch = coalescer.next_batch(&mut reader).await;
        if batch.exit.is_some() {
            exit = batch.exit;
        }
        if !batch.data.is_empty() {
            deliver(&shared, &stats, &batch.data).await;
        }
        if batch.closed {
            break;
        }
    }
    let _ = myself.cast(TerminalMsg::PumpEnded { generation, exit });
}

/// Cut on a UTF-8 boundary (carrying an incomplete character to the next batch), record in the
/// ring, and hand to the attached client, waiting while its queue is full.
async fn deliver(shared: &Mutex<Shared>, stats: &Stats, chunk: &[u8]) {
    let (frame, sink) = {
        let mut s = lock(shared);
        let mut bytes = std::mem::take(&mut s.carry);
        bytes.extend_from_slice(chunk);
        let keep = incomplete_tail(&bytes);
        let complete = bytes.len() - keep;
        s.carry = bytes.split_off(complete);
        if bytes.is_empty() {
            return;
        }
        s.ring.push(&bytes);
        stats
            .bytes_out
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let frame = ServerFrame::Output {
            data: String::from_utf8_lossy(&bytes).into_owned(),
            offset: s.ring.end(),
        };
        let sink = s
            .sink
            .as_ref()
            .map(|k| (k.frames.clone(), k.closed.subscribe()));
        (frame, sink)
    };
    if let Some((frames, mut closed)) = sink {
        tokio::select! {
            // Waits while the client is slow: SSH's window then holds the producer back.
            _ = frames.send(Out::Frame(frame)) => {}
            // Replaced or gone meanwhile: the bytes are in the ring for the next attach.
            _ = closed.wait_for(Option::is_some) => {}
        }
    }
}

/// Forward client input (bytes and resizes) to the current SSH channel.
async fn input_loop(
    mut rx: mpsc::Receiver<In>,
    writer: Arc<tokio::sync::Mutex<Option<PtyWriter>>>,
    size: Arc<Mutex<(u32, u32)>>,
    stats: Arc<Stats>,
) {
    while let Some(msg) = rx.recv().await {
        let mut guard = writer.lock().await;
        let Some(w) = guard.as_mut() else { continue };
        let result = match msg {
            In::Data(bytes) => {
                stats
                    .bytes_in
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                w.write(&bytes).await
            }
            In::Resize { cols, rows } => {
                *lock(&size) = (cols, rows);
                w.resize(cols, rows).await
            }
        };
        if result.is_err() {
            // The connection is gone; the pump reports it and the actor reconnects.
            *guard = None;
        }
    }
}

impl Actor for TerminalActor {
    type Msg = TerminalMsg;
    type State = TerminalState;
    type Arguments = TerminalArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        mut args: TerminalArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (input, input_rx) = mpsc::channel(INPUT_QUEUE);
        let writer = Arc::new(tokio::sync::Mutex::new(None));
        let size = Arc::new(Mutex::new((args.cols.max(1), args.rows.max(1))));
        let mut tasks = vec![tokio::spawn(input_loop(
            input_rx,
            writer.clone(),
            size.clone(),
            args.stats.clone(),
        ))];
        if let Some(mut feed) = args.feed.take() {
            let me = myself.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    match feed.recv().await {
                        Ok(EnvUpdate {
                            frame: StreamFrame::EnvironmentStatus(status),
                            ..
                        }) => {
                            let _ = me.cast(TerminalMsg::EnvironmentStatus(status));
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => {
                            let _ = me.cast(TerminalMsg::Close {
                                code: 1001,
                                reason: "Environment is no longer available".into(),
                            });
                            return;
                        }
                    }
                }
            }));
        }
        let mut state = TerminalState {
            shared: Arc::new(Mutex::new(Shared {
                ring: Ring::new(args.ring_bytes),
                carry: Vec::new(),
                sink: None,
            })),
            writer,
            input,
            client: None,
            generation: 0,
            next_connection: 0,
            size,
            tasks,
            pump: None,
            args,
        };
        state.open(&myself).await?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TerminalMsg::Attach { offset, reply } => {
                state.next_connection += 1;
                let connection = state.next_connection;
                let (frames_tx, frames) = mpsc::channel(CLIENT_QUEUE);
                let (closed_tx, closed) = watch::channel(None);
                let (start, replay, notice) = {
                    let mut s = lock(&state.shared);
                    let (start, replay, notice) = match offset {
                        None => (s.ring.end(), None, None),
                        Some(offset) => match s.ring.since(offset) {
                            Replay::Bytes(bytes) if bytes.is_empty() => {
                                (offset.min(s.ring.end()), None, None)
                            }
                            Replay::Bytes(bytes) => (
                                offset,
                                Some(ServerFrame::Output {
                                    data: String::from_utf8_lossy(&bytes).into_owned(),
                                    offset: s.ring.end(),
                                }),
                                None,
                            ),
                            Replay::Lost { from } => (
                                from,
                                None,
                                Some(ServerFrame::info(
                                    "Some output was lost while you were away; redrawing the screen",
                                )),
                            ),
                        },
                    };
                    // Swapped under the same lock the pump records under: no byte is sent twice
                    // or skipped.
                    if let Some(old) = s.sink.replace(Sink {
                        connection,
                        frames: frames_tx,
                        closed: closed_tx,
                    }) {
                        let _ = old
                            .closed
                            .send(Some((4000, "Replaced by a newer connection".into())));
                    }
                    (start, replay, notice)
                };
                state.args.stats.attached.store(true, Ordering::Relaxed);
                state
                    .args
                    .directory
                    .set_phase(&state.args.directory_id, Some("attached"));
                if notice.is_some() {
                    // Make tmux repaint the whole screen: a size change forces a redraw.
                    let (cols, rows) = *lock(&state.size);
                    let _ = state.input.try_send(In::Resize {
                        cols,
                        rows: rows.saturating_sub(1).max(1),
                    });
                    let _ = state.input.try_send(In::Resize { cols, rows });
                }
                let _ = reply.send(Attachment {
                    terminal: myself.clone(),
                    terminal_id: state.args.terminal_id.clone(),
                    connection,
                    frames,
                    input: state.input.clone(),
                    offset: start,
                    replay,
                    notice,
                    closed,
                });
            }
            TerminalMsg::Detached { connection } => {
                let mine = {
                    let mut s = lock(&state.shared);
                    if s.sink.as_ref().is_some_and(|k| k.connection == connection) {
                        s.sink = None;
                        true
                    } else {
                        false
                    }
                };
                if mine {
                    state.args.stats.attached.store(false, Ordering::Relaxed);
                    state
                        .args
                        .directory
                        .set_phase(&state.args.directory_id, Some("detached"));
                    myself.send_after(state.args.grace, move || TerminalMsg::GraceExpired {
                        connection,
                    });
                }
            }
            TerminalMsg::GraceExpired { connection } => {
                let idle = {
                    let s = lock(&state.shared);
                    s.sink.is_none() && state.next_connection == connection
                };
                if idle {
                    myself.stop(Some("grace period over".into()));
                }
            }
            TerminalMsg::PumpEnded { generation, exit } => {
                if generation != state.generation {
                    return Ok(());
                }
                match exit {
                    Some(code) => {
                        state.notify(ServerFrame::Exit { code });
                        state.close_sink(1000, "Shell exited");
                        myself.stop(Some("shell exited".into()));
                    }
                    None => {
                        state.notify(ServerFrame::info(
                            "Connection to the environment lost; reconnecting (your shell keeps running in tmux)",
                        ));
                        *state.writer.lock().await = None;
                        let _ = myself.cast(TerminalMsg::Reconnect { attempt: 1 });
                    }
                }
            }
            TerminalMsg::Reconnect { attempt } => match state.open(&myself).await {
                Ok(()) => state.notify(ServerFrame::info("Reconnected")),
                Err(e) if attempt >= state.args.reconnect_attempts => {
                    state.notify(ServerFrame::error(format!(
                        "Could not reconnect to the environment: {e}"
                    )));
                    state.close_sink(1011, "Environment unreachable");
                    myself.stop(Some("reconnect attempts exhausted".into()));
                }
                Err(_) => {
                    let wait = Duration::from_millis(250u64 << attempt.min(6));
                    myself.send_after(wait, move || TerminalMsg::Reconnect {
                        attempt: attempt + 1,
                    });
                }
            },
            TerminalMsg::EnvironmentStatus(change) => {
                let status = change.status;
                state.notify(ServerFrame::EnvironmentStatus(change));
                use crate::actors::environment::machine::Status;
                if !matches!(status, Status::Running | Status::Snapshotting) {
                    state.notify(ServerFrame::info(format!(
                        "The environment is {status}; closing the terminal"
                    )));
                    state.close_sink(1001, &format!("Environment {status}"));
                    myself.stop(Some(format!("environment {status}")));
                }
            }
            TerminalMsg::Close { code, reason } => {
                state.close_sink(code, &reason);
                myself.stop(Some(reason));
            }
            TerminalMsg::Crash(message) => panic!("{message}"),
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(client) = state.client.take() {
            client.disconnect().await;
        }
        Ok(())
    }
}
