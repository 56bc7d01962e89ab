//! The Terminal actor: one per open terminal, a child of the user's session actor. It owns an SSH
//! connection to the environment with a PTY running `tmux -u new-session -A -s devpocket_<env>`
//! (UTF-8 whatever the locale; see [`tmux_session`]), a bounded output ring, and the currently
//! attached WebSocket (at most one). Its row in the store (see [`crate::presence`]) follows its
//! attach state and size, and goes when it ends.
//!
//! Ownership — state lives in one task, everything else talks to it by message; no lock is
//! shared and none is held across an `.await`:
//! - The **channel task** (one per terminal, it outlives SSH reconnects) owns the PTY's reader
//!   and writer, the output [`Ring`], the UTF-8 carry, the coalescer, the terminal size and the
//!   sink (the attached client's bounded frame queue). It `select!`s over control messages from
//!   the actor (always answered at once), SSH output, client input and room in the client's
//!   queue. It always reads SSH (the connection is shared with the environment's other
//!   terminals and its sampler, see [`crate::ssh::pool`], and russh stalls every channel of a
//!   connection while one channel is not read): output goes into the ring and the screen model,
//!   and the client is sent frames cut from the ring at its own pace (`Sink::sent` is how far it
//!   got). A client that falls more than the ring behind skips to a repaint of the current screen
//!   from the model with a notice, as tmux does for a slow client, so a slow phone costs no
//!   memory beyond the ring and holds back no other terminal. Input is written one piece at a time as a
//!   future held in the loop (never blocking it); a piece the remote does not take within
//!   `terminals.write_timeout_seconds` is abandoned with the input queued behind it, and the
//!   client is told. An attach swaps the sink and cuts the replay from the ring in one step, so
//!   no byte is sent twice or skipped.
//! - The **actor** handles control: attach, detach and the grace period, closing, environment
//!   status, and reconnecting a lost SSH connection (connecting runs on a task; the new PTY is
//!   handed to the channel task by message, the ring stays). Its handler never awaits the
//!   remote: it only `try_send`s to the channel task, which answers attaches itself.
//! - Bytes never pass through the actor's mailbox; client input goes through its own bounded
//!   queue, so Ctrl-C gets through during a flood.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use crate::actors::environment::actor::EnvUpdate;
use crate::protocol::{EnvironmentInfo, EnvironmentStatus, ServerFrame, StreamFrame};
use crate::ssh::client::{PtyReader, PtySession, PtyWriter, SshClient, SshTarget};
use crate::terminal::coalesce::{Batch, Coalescer};
use crate::terminal::output::{Replay, Ring, incomplete_tail};
use crate::terminal::screen::{ScreenModel, ScreenSnapshot};

/// Frames queued for one WebSocket before the channel task waits (the backpressure bound).
pub const CLIENT_QUEUE: usize = 64;
/// Input messages queued from the client; the WebSocket drops input beyond this (and says so)
/// rather than stop reading its client, so a close is always heard.
pub const INPUT_QUEUE: usize = 256;
/// Control messages queued from the actor to the channel task. The task takes each at once (it
/// never waits on the remote or the client while handling one), so this only absorbs a burst.
const CONTROL_QUEUE: usize = 32;
/// Input is written to SSH in pieces of at most this many bytes (one SSH packet); the write
/// timeout applies to each piece, so it measures a remote that stopped reading, not a big paste.
const WRITE_CHUNK: usize = 32 * 1024;
/// Largest output frame cut from the ring for a client that is behind (a client that keeps up
/// gets one frame per coalesced batch).
const FRAME_BYTES: usize = 64 * 1024;
/// Flowing output is coalesced up to this many bytes per frame...
pub const COALESCE_BYTES: usize = 16 * 1024;
/// ...or for this long after the first byte, whichever comes first (see `coalesce`: output after
/// a quiet spell goes out at once).
pub const COALESCE_WAIT: Duration = Duration::from_millis(4);
const TERM: &str = "xterm-256color";

/// Something for the attached WebSocket.
#[derive(Debug)]
pub enum Out {
    /// Boxed: a [`ServerFrame`] is 136 bytes (its largest variant, the welcome) and every
    /// client queue allocates room for [`CLIENT_QUEUE`]'s first 32 messages up front, idle or
    /// not (4.3 KiB per terminal; boxed, 1 KiB).
    Frame(Box<ServerFrame>),
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

/// Counters for ops and the audit trail (atomics: read by the ops view, written by the task).
#[derive(Default, Debug)]
pub struct Stats {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub attached: std::sync::atomic::AtomicBool,
}

pub enum TerminalMsg {
    /// Attach a WebSocket from `offset` (`None`: from now); resize to `size` if given; repaint
    /// the whole screen if asked (or if the bytes after `offset` are gone).
    Attach {
        offset: Option<u64>,
        size: Option<(u32, u32)>,
        repaint: bool,
        reply: RpcReplyPort<Attachment>,
    },
    Detached {
        connection: u64,
    },
    GraceExpired {
        connection: u64,
    },
    /// The PTY of SSH connection `generation` ended (the channel task has delivered its output,
    /// and the exit frame when there is an exit status).
    PumpEnded {
        generation: u64,
        exit: Option<u32>,
    },
    Reconnect {
        attempt: u32,
    },
    /// A reconnect attempt finished (connecting runs on a task, off this actor).
    Reconnected {
        attempt: u32,
        result: anyhow::Result<Box<Opened>>,
    },
    /// The environment changed status.
    EnvironmentStatus(EnvironmentStatus),
    /// What the terminal shows now (for `GET /environments/{id}/terminals`).
    Snapshot(RpcReplyPort<TerminalSnapshot>),
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
    /// The tmux session the PTY attaches to (created if missing): [`tmux_session`] of the
    /// environment, or the one a terminal of another node used (a resume that moved nodes).
    pub tmux_session: String,
    pub cols: u32,
    pub rows: u32,
    pub ring_bytes: usize,
    pub grace: Duration,
    pub reconnect_attempts: u32,
    /// How long one piece of input may wait for the remote to read it (see the module doc).
    pub write_timeout: Duration,
    /// The bound of the server-side screen model, in cells (see [`ScreenModel`]).
    pub screen_max_cells: usize,
    pub feed: Option<broadcast::Receiver<EnvUpdate>>,
    pub stats: Arc<Stats>,
    pub directory: crate::actors::directory::Directory,
    pub directory_id: String,
    /// The SSH connections shared per environment (the PTY is a channel on one of them).
    pub ssh: Arc<crate::ssh::pool::SshPool>,
    /// This terminal's slot of the node's capacity, held for its lifetime.
    pub slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Called once when the terminal ends, with the bytes in and out (for the audit trail).
    pub on_close: Option<Box<dyn FnOnce(u64, u64) + Send + Sync>>,
    /// The terminal's row in the store: told of attaches, detaches and resizes; deleted when the
    /// terminal ends (the channel task holds it).
    pub record: Option<crate::presence::TerminalRecord>,
}

/// One live terminal as `GET /api/v1/environments/{id}/terminals` lists it (API.md:
/// `{terminal_id, cols, rows, attached, created_at, screen}` plus `offset`, `cursor` and
/// `alternate_screen`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TerminalSnapshot {
    pub terminal_id: String,
    pub cols: u16,
    pub rows: u16,
    /// Whether a WebSocket holds it now (otherwise it is within its grace period).
    pub attached: bool,
    /// When it started (RFC 3339 UTC).
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// The visible screen as plain text (see [`ScreenSnapshot::text`]); null while the screen
    /// is above `terminals.screen_max_cells`.
    pub screen: Option<String>,
    /// Zero-based `[row, col]` of the cursor.
    pub cursor: [u16; 2],
    /// Whether a full-screen program has the alternate screen.
    pub alternate_screen: bool,
    /// Output bytes since it started (the offset a client resumes from).
    pub offset: u64,
}

/// The process group (ractor `pg`, scope [`TERMINALS_SCOPE`], group = environment id) every
/// terminal of an environment joins, so its terminals can be listed whatever session holds them.
pub const TERMINALS_SCOPE: &str = "terminals";

/// Snapshots of the live terminals of `environment_id` on this node, each asked within `wait`
/// (a terminal that does not answer in time is left out).
pub async fn snapshots(environment_id: &str, wait: Duration) -> Vec<TerminalSnapshot> {
    let members =
        ractor::pg::get_scoped_members(&TERMINALS_SCOPE.to_owned(), &environment_id.to_owned());
    let asks = members.into_iter().map(|cell| async move {
        let actor: ActorRef<TerminalMsg> = cell.into();
        match actor.call(TerminalMsg::Snapshot, Some(wait)).await {
            Ok(ractor::rpc::CallResult::Success(snapshot)) => Some(snapshot),
            _ => None,
        }
    });
    let mut list: Vec<TerminalSnapshot> = futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect();
    list.sort_by(|a, b| a.terminal_id.cmp(&b.terminal_id));
    list
}

/// A connected SSH client (shared with the environment's other users, see
/// [`crate::ssh::pool`]) with the terminal's PTY open on it.
pub struct Opened {
    client: SshClient,
    pty: PtySession,
    has_tmux: bool,
}

pub struct TerminalActor;

/// The attached WebSocket as the actor knows it (the channel task holds its own sender).
struct Client {
    connection: u64,
    frames: mpsc::Sender<Out>,
    closed: watch::Sender<Option<(u16, String)>>,
}

pub struct TerminalState {
    args: TerminalArgs,
    control: mpsc::Sender<Control>,
    input: mpsc::Sender<In>,
    client: Option<SshClient>,
    attached: Option<Client>,
    generation: u64,
    next_connection: u64,
    /// The channel task and the environment feed's forwarder.
    tasks: Vec<JoinHandle<()>>,
    /// A reconnect attempt in progress.
    connecting: Option<JoinHandle<()>>,
}

impl Drop for TerminalState {
    fn drop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(c) = self.connecting.take() {
            c.abort();
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

/// The tmux session of an environment's terminals: every terminal of the environment, on any
/// node, attaches to it (so a shell outlives its terminals and a resume on another node finds it).
pub fn tmux_session(environment_id: &str) -> String {
    format!("devpocket_{environment_id}")
}

/// Whether `name` is a tmux session name this server makes (it goes into a shell command, so
/// anything else, e.g. a tampered row, is not used).
pub fn valid_tmux_session(name: &str) -> bool {
    name.strip_prefix("devpocket_").is_some_and(|rest| {
        !rest.is_empty()
            && rest.len() <= 64
            && rest
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

/// The command the PTY runs: tmux keeps the shell alive across disconnects. `session` must pass
/// [`valid_tmux_session`].
pub fn tmux_command(session: &str) -> String {
    // UTF-8 by construction, whatever the server's or the SSH server's environment says (a
    // service manager often gives no LANG, and an SSH server may refuse environment requests):
    // tmux `-u` draws UTF-8 whatever the locale, and `C.UTF-8` (on every stock Debian/Ubuntu)
    // is the shell's locale in a new session.
    format!("env LANG=C.UTF-8 LC_CTYPE=C.UTF-8 tmux -u new-session -A -s {session}")
}

/// How a terminal reaches its environment's shell (owned, for a reconnect on a task).
struct Reach {
    ssh: Arc<crate::ssh::pool::SshPool>,
    environment_id: String,
    target: SshTarget,
    tmux_session: String,
}

impl TerminalArgs {
    fn reach(&self) -> Reach {
        Reach {
            ssh: self.ssh.clone(),
            environment_id: self.environment.id.clone(),
            target: self.target.clone(),
            tmux_session: self.tmux_session.clone(),
        }
    }
}

impl Reach {
    /// Take a connection from the pool (connecting if needed) and open the PTY on it, each step
    /// bounded by the target's connect timeout.
    async fn connect(&self, cols: u32, rows: u32) -> anyhow::Result<Opened> {
        use anyhow::Context;
        let (target, tmux_session) = (&self.target, self.tmux_session.as_str());
        let client = self
            .ssh
            .client(&self.environment_id, target)
            .await
            .context("cannot connect to the environment")?;
        let open = async {
            let has_tmux = has_tmux(&client).await?;
            let command = has_tmux.then(|| tmux_command(tmux_session));
            let pty = client
                .open_pty(TERM, cols, rows, command.as_deref())
                .await
                .context("cannot open a terminal")?;
            Ok::<_, anyhow::Error>((pty, has_tmux))
        };
        let (pty, has_tmux) = tokio::time::timeout(target.connect_timeout, open)
            .await
            .map_err(|_| {
                anyhow::anyhow!("cannot open a terminal: the environment did not answer in time")
            })??;
        Ok(Opened {
            client,
            pty,
            has_tmux,
        })
    }
}

/// Whether the environment has tmux: `command -v tmux` exits 0 (found) or with another status
/// (not found; POSIX gives 1, a missing shell 127). Only an exit status answers the question: a
/// refused or broken exec channel, or one closed without a status, is an error (the open fails
/// plainly, a reconnect retries) — never taken for "no tmux", which would silently give the
/// terminal a plain shell that does not survive a disconnect.
async fn has_tmux(client: &SshClient) -> anyhow::Result<bool> {
    use anyhow::Context;
    let probe = client
        .exec("command -v tmux", 1024)
        .await
        .context("cannot ask the environment whether tmux is installed")?;
    match probe.status {
        Some(status) => Ok(status == 0),
        None => anyhow::bail!(
            "cannot ask the environment whether tmux is installed: the command ended without an exit status"
        ),
    }
}

impl TerminalState {
    fn close_sink(&mut self, code: u16, reason: &str) {
        if let Some(client) = self.attached.take() {
            let _ = client.closed.send(Some((code, reason.to_string())));
        }
        self.args.stats.attached.store(false, Ordering::Relaxed);
    }

    /// Send a control frame to the attached client, if any (never waits).
    fn notify(&self, frame: ServerFrame) {
        if let Some(client) = &self.attached {
            let _ = client.frames.try_send(Out::Frame(Box::new(frame)));
        }
    }

    /// Take a new connection: keep its client, hand its PTY to the channel task.
    fn adopt(&mut self, opened: Opened) -> anyhow::Result<()> {
        let Opened {
            client,
            pty,
            has_tmux,
        } = opened;
        if !has_tmux {
            self.notify(ServerFrame::info(
                "tmux is not installed in this environment: starting a plain login shell, which will not survive disconnects",
            ));
        }
        self.client = Some(client);
        self.generation += 1;
        let (reader, writer) = pty.into_split();
        self.control
            .try_send(Control::Pty {
                generation: self.generation,
                reader,
                writer,
            })
            .map_err(|_| anyhow::anyhow!("the terminal's channel task is not answering"))
    }

    fn reconnect(&mut self, myself: &ActorRef<TerminalMsg>, attempt: u32) {
        let how = self.args.reach();
        let (cols, rows) = (self.args.cols.max(1), self.args.rows.max(1));
        let me = myself.clone();
        if let Some(old) = self.connecting.replace(tokio::spawn(async move {
            let result = how.connect(cols, rows).await.map(Box::new);
            let _ = me.cast(TerminalMsg::Reconnected { attempt, result });
        })) {
            old.abort();
        }
    }
}

// ---------------------------------------------------------------- the channel task

/// From the actor to the channel task.
enum Control {
    /// Make this connection the sink and answer the attach (the replay is cut from the ring in
    /// the same step as the swap). Boxed: the largest message, and the queue allocates room for
    /// 32 of them up front.
    Attach(Box<AttachRequest>),
    /// That connection's WebSocket is gone: stop sending to it.
    Detach { connection: u64 },
    /// Answer with what the terminal shows now.
    Snapshot(RpcReplyPort<TerminalSnapshot>),
    /// The PTY of a new SSH connection; the old one, if any, is dropped (closing its channel).
    Pty {
        generation: u64,
        reader: PtyReader,
        writer: PtyWriter,
    },
}

/// [`Control::Attach`]'s content.
struct AttachRequest {
    connection: u64,
    frames: mpsc::Sender<Out>,
    offset: Option<u64>,
    size: Option<(u32, u32)>,
    repaint: bool,
    attachment: Box<Attachment>,
    reply: RpcReplyPort<Attachment>,
}

/// Where the channel task sends output.
struct Sink {
    connection: u64,
    frames: mpsc::Sender<Out>,
    /// The ring offset this client's frames have reached (output after it is still to send).
    sent: u64,
}

/// Why a write to the remote did not complete.
enum WriteError {
    /// The connection is gone (the reader notices too and the actor reconnects).
    Failed,
    /// The remote did not take a piece within the write timeout.
    TimedOut,
}

/// A write or resize in flight; it owns what it needs, so the loop keeps serving meanwhile.
type Op = Pin<Box<dyn Future<Output = Result<(), WriteError>> + Send>>;

/// Everything the channel task owns besides the PTY halves and the in-flight operation.
struct Channel {
    terminal_id: String,
    created_at: chrono::DateTime<chrono::Utc>,
    ring: Ring,
    /// The screen as the output drew it (exact repaints and snapshots).
    screen: ScreenModel,
    /// The screen model restarted empty: the program was asked to redraw, and the model is exact
    /// from the first output after that request.
    awaiting_redraw: bool,
    /// Bytes read that end inside a UTF-8 character; they go out with the next frame.
    carry: Vec<u8>,
    sink: Option<Sink>,
    /// Frames other than output waiting for room in the sink's queue, sent after the output
    /// recorded before them (the exit frame).
    pending: VecDeque<Out>,
    size: (u32, u32),
    stats: Arc<Stats>,
    write_timeout: Duration,
    actor: ActorRef<TerminalMsg>,
    /// The terminal's row in the store (dropped with the task: the row goes).
    record: Option<crate::presence::TerminalRecord>,
    /// A client has attached once: before that the row keeps what it was registered with (the
    /// attaching client), so a start is not recorded as a detach and an attach.
    attached_once: bool,
}

impl Channel {
    /// Cut on a UTF-8 boundary (carrying an incomplete character to the next batch) and record
    /// in the ring and the screen model (the client's frames are cut from the ring). The model
    /// may restart (its parser failed on the bytes): then the program is asked to redraw.
    fn record(&mut self, chunk: &[u8], local: &mut VecDeque<In>) {
        let mut bytes = std::mem::take(&mut self.carry);
        bytes.extend_from_slice(chunk);
        let keep = incomplete_tail(&bytes);
        let complete = bytes.len() - keep;
        self.carry = bytes.split_off(complete);
        if bytes.is_empty() {
            return;
        }
        self.ring.push(&bytes);
        if self.screen.process(&bytes) {
            self.ask_redraw(local);
        }
        self.stats
            .bytes_out
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    }

    /// Whether the attached client has something to be sent.
    fn outgoing(&self) -> bool {
        self.sink
            .as_ref()
            .is_some_and(|s| s.sent < self.ring.end() || !self.pending.is_empty())
    }

    /// The next frame for the attached client: output it has not had (at most
    /// [`FRAME_BYTES`]), else a waiting frame. A client whose next byte has left the ring
    /// skips to the current screen (painted from the model, or redrawn by the program when the
    /// model cannot paint it) with a notice.
    fn next_frame(&mut self, local: &mut VecDeque<In>) -> Option<Out> {
        let sink = self.sink.as_mut()?;
        if sink.sent >= self.ring.end() {
            return self.pending.pop_front();
        }
        match self.ring.read(sink.sent, FRAME_BYTES) {
            Replay::Bytes(bytes) => {
                sink.sent += bytes.len() as u64;
                Some(Out::Frame(Box::new(ServerFrame::Output {
                    data: utf8(bytes),
                    offset: sink.sent,
                })))
            }
            Replay::Lost { from } => {
                sink.sent = from;
                self.tell(ServerFrame::info(
                    "Output came faster than this connection took it; skipping to the current screen",
                ));
                match self.screen.repaint() {
                    Some(data) => Some(Out::Frame(Box::new(ServerFrame::Output {
                        data,
                        offset: from,
                    }))),
                    None => {
                        self.ask_redraw(local);
                        None
                    }
                }
            }
        }
    }

    /// A frame for the client that must not wait (notices); dropped if its queue is full.
    fn tell(&self, frame: ServerFrame) {
        if let Some(sink) = &self.sink {
            let _ = sink.frames.try_send(Out::Frame(Box::new(frame)));
        }
    }

    /// Swap the sink and answer the attach. Output the old client had not been sent is in the
    /// ring: the new client's replay (or its fresh start at the end) covers it exactly. A client that asks for a repaint, or whose bytes have left the ring, gets
    /// the screen painted from the server's model. Returns whether the program must be asked to
    /// redraw instead (the model is off or not exact).
    fn attach(
        &mut self,
        connection: u64,
        frames: mpsc::Sender<Out>,
        offset: Option<u64>,
        repaint: bool,
        mut attachment: Box<Attachment>,
        reply: RpcReplyPort<Attachment>,
    ) -> bool {
        let ring = &self.ring;
        let painted = |screen: &ScreenModel| {
            screen.repaint().map(|data| ServerFrame::Output {
                data,
                offset: ring.end(),
            })
        };
        let (start, replay, notice) = match offset {
            None if repaint => (ring.end(), painted(&self.screen), None),
            None => (ring.end(), None, None),
            Some(offset) => match ring.since(offset) {
                Replay::Bytes(bytes) if bytes.is_empty() => (offset.min(ring.end()), None, None),
                Replay::Bytes(bytes) => (
                    offset,
                    Some(ServerFrame::Output {
                        data: utf8(bytes),
                        offset: ring.end(),
                    }),
                    None,
                ),
                Replay::Lost { from } => (
                    from,
                    painted(&self.screen),
                    Some(ServerFrame::info(
                        "Some output was lost while you were away; redrawing the screen",
                    )),
                ),
            },
        };
        self.sink = Some(Sink {
            connection,
            frames,
            sent: ring.end(),
        });
        self.attached_once = true;
        let wanted = repaint || notice.is_some();
        let redraw = wanted && replay.is_none();
        attachment.offset = start;
        attachment.replay = replay;
        attachment.notice = notice;
        if reply.send(*attachment).is_err() {
            // Nobody took it (the caller gave up): start the grace period as for a detach.
            let _ = self.actor.cast(TerminalMsg::Detached { connection });
        }
        redraw
    }

    /// Tell the store what it keeps of this terminal (attached, size); a no-op unless changed.
    fn publish(&self) {
        if let Some(record) = self.record.as_ref().filter(|_| self.attached_once) {
            record.publish(crate::presence::TerminalState {
                attached: self.sink.is_some(),
                cols: self.size.0,
                rows: self.size.1,
            });
        }
    }

    fn snapshot(&self) -> TerminalSnapshot {
        let ScreenSnapshot {
            cols,
            rows,
            text,
            alternate_screen,
            cursor,
        } = self.screen.snapshot();
        TerminalSnapshot {
            terminal_id: self.terminal_id.clone(),
            cols,
            rows,
            attached: self.sink.is_some(),
            created_at: self.created_at,
            screen: text,
            cursor,
            alternate_screen,
            offset: self.ring.end(),
        }
    }

    /// The PTY's size is now `cols`×`rows` (the model follows; see `awaiting_redraw`).
    fn set_size(&mut self, cols: u32, rows: u32, local: &mut VecDeque<In>) {
        self.size = (cols.max(1), rows.max(1));
        if self.screen.resize(self.size.0, self.size.1) {
            self.ask_redraw(local);
        }
    }

    /// The model restarted empty: make the program redraw (a size change forces one) and take
    /// the output after it as the whole screen. At most two resizes wait at any time.
    fn ask_redraw(&mut self, local: &mut VecDeque<In>) {
        if self.awaiting_redraw && !local.is_empty() {
            return;
        }
        self.awaiting_redraw = true;
        local.push_back(In::Resize {
            cols: self.size.0,
            rows: self.size.1.saturating_sub(1).max(1),
        });
        local.push_back(In::Resize {
            cols: self.size.0,
            rows: self.size.1,
        });
    }

    fn detach(&mut self, connection: u64) {
        if self
            .sink
            .as_ref()
            .is_some_and(|s| s.connection == connection)
        {
            self.sink = None;
            self.pending.clear();
        }
    }

    /// Start writing `msg` to the PTY.
    fn start(&mut self, writer: &Arc<PtyWriter>, msg: In) -> Op {
        let (w, timeout) = (writer.clone(), self.write_timeout);
        match msg {
            In::Data(bytes) => {
                self.stats
                    .bytes_in
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Box::pin(async move {
                    for piece in bytes.chunks(WRITE_CHUNK) {
                        match tokio::time::timeout(timeout, w.write(piece)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => return Err(WriteError::Failed),
                            Err(_) => return Err(WriteError::TimedOut),
                        }
                    }
                    Ok(())
                })
            }
            In::Resize { cols, rows } => Box::pin(async move {
                match tokio::time::timeout(timeout, w.resize(cols, rows)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(WriteError::Failed),
                    Err(_) => Err(WriteError::TimedOut),
                }
            }),
        }
    }
}

/// Output bytes as frame text: valid UTF-8 (the ring holds whole characters) without a copy;
/// anything else with replacement characters.
fn utf8(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The next batch of output, or never when there is no PTY.
async fn next_output(coalescer: &mut Coalescer, reader: &mut Option<PtyReader>) -> Batch {
    match reader {
        Some(reader) => coalescer.next_batch(reader).await,
        None => std::future::pending().await,
    }
}

/// Room for one frame in the sink's queue (`Err` when its WebSocket is gone), or never. The
/// permit owns a sender clone, so the loop may swap the sink while it is held.
async fn room(sink: Option<mpsc::Sender<Out>>) -> Result<mpsc::OwnedPermit<Out>, ()> {
    match sink {
        Some(frames) => frames.reserve_owned().await.map_err(|_| ()),
        None => std::future::pending().await,
    }
}

/// The next input: the task's own (redraw resizes) first, then the client's.
async fn next_input(local: &mut VecDeque<In>, input: &mut mpsc::Receiver<In>) -> Option<In> {
    match local.pop_front() {
        Some(msg) => Some(msg),
        None => input.recv().await,
    }
}

/// Finish an operation that may be absent (then never).
async fn finish(op: &mut Option<Op>) -> Result<(), WriteError> {
    match op {
        Some(op) => op.await,
        None => std::future::pending().await,
    }
}

/// The channel task (see the module doc). Ends when the actor drops its senders (or aborts it).
async fn channel_task(
    mut ch: Channel,
    mut control: mpsc::Receiver<Control>,
    mut input: mpsc::Receiver<In>,
) {
    let mut generation = 0;
    let mut reader: Option<PtyReader> = None;
    let mut writer: Option<Arc<PtyWriter>> = None;
    let mut coalescer = Coalescer::new(COALESCE_BYTES, COALESCE_WAIT);
    let mut op: Option<Op> = None;
    // Resizes the task sends itself (a redraw, the size after a reconnect): at most a few.
    let mut local: VecDeque<In> = VecDeque::new();
    let mut exit = None;
    // The PTY ended: reported to the actor once its last frames are queued for the client.
    let mut ended = false;
    loop {
        if ch.sink.is_none() {
            ch.pending.clear();
        }
        ch.publish();
        if ended && !ch.outgoing() {
            ended = false;
            ch.pending.clear();
            let _ = ch.actor.cast(TerminalMsg::PumpEnded {
                generation,
                exit: exit.take(),
            });
        }
        // Always read (see the module doc): the client's pace only decides what it is sent.
        let reading = reader.is_some();
        let sending = ch.outgoing();
        let writing = op.is_some();
        tokio::select! {
            biased;
            msg = control.recv() => match msg {
                Some(Control::Attach(request)) => {
                    let AttachRequest { connection, frames, offset, size, repaint, attachment, reply } = *request;
                    // The client's size wins on attach (a phone rotated while away); the model
                    // takes it first, so a repaint fits the client's screen.
                    let resized = size.filter(|s| *s != ch.size);
                    if let Some((cols, rows)) = resized {
                        ch.set_size(cols, rows, &mut local);
                    }
                    let redraw = ch.attach(connection, frames, offset, repaint, attachment, reply);
                    if writer.is_some() && (redraw || resized.is_some()) {
                        let (cols, rows) = ch.size;
                        if resized.is_none() {
                            // Make tmux repaint the whole screen: a size change forces a redraw.
                            local.push_back(In::Resize { cols, rows: rows.saturating_sub(1).max(1) });
                        }
                        local.push_back(In::Resize { cols, rows });
                    }
                }
                Some(Control::Detach { connection }) => ch.detach(connection),
                Some(Control::Snapshot(reply)) => {
                    let _ = reply.send(ch.snapshot());
                }
                Some(Control::Pty { generation: g, reader: r, writer: w }) => {
                    generation = g;
                    reader = Some(r);
                    writer = Some(Arc::new(w));
                    op = None;
                    exit = None;
                    ended = false;
                    coalescer = Coalescer::new(COALESCE_BYTES, COALESCE_WAIT);
                    // An incomplete character of the dead connection never completes.
                    ch.carry.clear();
                    // It was opened at the first size: give it the current one.
                    let (cols, rows) = ch.size;
                    local.clear();
                    local.push_back(In::Resize { cols, rows });
                }
                None => return,
            },
            done = finish(&mut op), if writing => {
                op = None;
                match done {
                    Ok(()) => {}
                    // The reader sees the connection end too; the actor reconnects.
                    Err(WriteError::Failed) => writer = None,
                    Err(WriteError::TimedOut) => {
                        // Drop what queued up behind it (the client typed into a remote that
                        // does not read); keep the latest size.
                        let mut dropped = 0usize;
                        while let Ok(msg) = input.try_recv() {
                            match msg {
                                In::Data(bytes) => dropped += bytes.len(),
                                In::Resize { cols, rows } => {
                                    local.retain(|m| !matches!(m, In::Resize { .. }));
                                    local.push_back(In::Resize { cols, rows });
                                }
                            }
                        }
                        ch.tell(ServerFrame::error(format!(
                            "The environment has not read input for {} s; pending input ({dropped} more bytes) was dropped",
                            ch.write_timeout.as_secs()
                        )));
                    }
                }
            },
            permit = room(ch.sink.as_ref().filter(|_| sending).map(|s| s.frames.clone())), if sending => match permit {
                Ok(permit) => {
                    if let Some(out) = ch.next_frame(&mut local) {
                        permit.send(out);
                    }
                }
                Err(()) => {
                    // Its WebSocket is gone; the output is in the ring for the next attach.
                    ch.sink = None;
                    ch.pending.clear();
                }
            },
            msg = next_input(&mut local, &mut input), if !writing => match msg {
                Some(msg) => {
                    if let In::Resize { cols, rows } = msg {
                        ch.set_size(cols, rows, &mut local);
                    }
                    // No PTY (reconnecting): input has nowhere to go, as on a dead line.
                    if let Some(w) = &writer {
                        op = Some(ch.start(w, msg));
                    }
                }
                None => return,
            },
            batch = next_output(&mut coalescer, &mut reader), if reading => {
                if batch.exit.is_some() {
                    exit = batch.exit;
                }
                if !batch.data.is_empty() {
                    if ch.awaiting_redraw && local.is_empty() && op.is_none() {
                        // The redraw asked for when the model restarted is this output.
                        ch.awaiting_redraw = false;
                        ch.screen.redrawn();
                    }
                    ch.record(&batch.data, &mut local);
                }
                if batch.closed {
                    reader = None;
                    writer = None;
                    op = None;
                    local.clear();
                    if let (Some(code), Some(_)) = (exit, &ch.sink) {
                        ch.pending
                            .push_back(Out::Frame(Box::new(ServerFrame::Exit { code })));
                    }
                    ended = true;
                }
            },
        }
    }
}

// ---------------------------------------------------------------- the actor

impl Actor for TerminalActor {
    type Msg = TerminalMsg;
    type State = TerminalState;
    type Arguments = TerminalArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        mut args: TerminalArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        args.cols = args.cols.max(1);
        args.rows = args.rows.max(1);
        // The whole chain of causes goes into the startup error (the client sees it). Boxed:
        // ractor runs `pre_start` inside the actor's task, whose size is that of its largest
        // state for the terminal's whole life, and connecting (SSH, exec, PTY) is the largest.
        let opened = Box::pin(args.reach().connect(args.cols, args.rows))
            .await
            .map_err(|e| format!("{e:#}"))?;
        let (input, input_rx) = mpsc::channel(INPUT_QUEUE);
        let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let channel = Channel {
            terminal_id: args.terminal_id.clone(),
            created_at: chrono::Utc::now(),
            ring: Ring::new(args.ring_bytes),
            screen: ScreenModel::new(args.cols, args.rows, args.screen_max_cells),
            awaiting_redraw: false,
            carry: Vec::new(),
            sink: None,
            pending: VecDeque::new(),
            size: (args.cols, args.rows),
            stats: args.stats.clone(),
            write_timeout: args.write_timeout,
            actor: myself.clone(),
            record: args.record.take(),
            attached_once: false,
        };
        let mut tasks = vec![tokio::spawn(channel_task(channel, control_rx, input_rx))];
        // Listed with its environment's terminals; ractor removes it from the group when it stops.
        ractor::pg::join_scoped(
            TERMINALS_SCOPE.to_owned(),
            args.environment.id.clone(),
            vec![myself.get_cell()],
        );
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
            control,
            input,
            client: None,
            attached: None,
            generation: 0,
            next_connection: 0,
            tasks,
            connecting: None,
            args,
        };
        state.adopt(opened).map_err(|e| format!("{e:#}"))?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TerminalMsg::Attach {
                offset,
                size,
                repaint,
                reply,
            } => {
                state.next_connection += 1;
                let connection = state.next_connection;
                let (frames_tx, frames) = mpsc::channel(CLIENT_QUEUE);
                let (closed_tx, closed) = watch::channel(None);
                let attachment = Box::new(Attachment {
                    terminal: myself.clone(),
                    terminal_id: state.args.terminal_id.clone(),
                    connection,
                    frames,
                    input: state.input.clone(),
                    offset: 0,
                    replay: None,
                    notice: None,
                    closed,
                });
                // The channel task swaps the sink, cuts the replay and answers; if it cannot
                // take the message the reply port is dropped and the caller hears so.
                let sent = state
                    .control
                    .try_send(Control::Attach(Box::new(AttachRequest {
                        connection,
                        frames: frames_tx.clone(),
                        offset,
                        size,
                        repaint,
                        attachment,
                        reply,
                    })));
                if sent.is_err() {
                    tracing::warn!(terminal = %state.args.terminal_id, "attach refused: the channel task is not answering");
                    if state.attached.is_none() {
                        // This connection number is the newest now: its grace period applies.
                        myself.send_after(state.args.grace, move || TerminalMsg::GraceExpired {
                            connection,
                        });
                    }
                    return Ok(());
                }
                let client = Client {
                    connection,
                    frames: frames_tx,
                    closed: closed_tx,
                };
                if let Some(old) = state.attached.replace(client) {
                    let _ = old
                        .closed
                        .send(Some((4000, "Replaced by a newer connection".into())));
                }
                state.args.stats.attached.store(true, Ordering::Relaxed);
                state
                    .args
                    .directory
                    .set_phase(&state.args.directory_id, Some("attached"));
            }
            TerminalMsg::Detached { connection } => {
                if state
                    .attached
                    .as_ref()
                    .is_some_and(|c| c.connection == connection)
                {
                    state.attached = None;
                    // If the task misses this (its queue full), it finds the sink closed.
                    let _ = state.control.try_send(Control::Detach { connection });
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
                if state.attached.is_none() && state.next_connection == connection {
                    myself.stop(Some("grace period over".into()));
                }
            }
            TerminalMsg::PumpEnded { generation, exit } => {
                if generation != state.generation {
                    return Ok(());
                }
                match exit {
                    Some(_) => {
                        // The exit frame is queued already, after the last output.
                        state.close_sink(1000, "Shell exited");
                        myself.stop(Some("shell exited".into()));
                    }
                    None => {
                        state.notify(ServerFrame::info(
                            "Connection to the environment lost; reconnecting (your shell keeps running in tmux)",
                        ));
                        state.reconnect(&myself, 1);
                    }
                }
            }
            TerminalMsg::Reconnect { attempt } => state.reconnect(&myself, attempt),
            TerminalMsg::Reconnected { attempt, result } => {
                state.connecting = None;
                let result = result.and_then(|opened| state.adopt(*opened));
                match result {
                    Ok(()) => state.notify(ServerFrame::info("Reconnected")),
                    Err(e) if attempt >= state.args.reconnect_attempts => {
                        state.notify(ServerFrame::error(format!(
                            "Could not reconnect to the environment: {e:#}"
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
                }
            }
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
            TerminalMsg::Snapshot(reply) => {
                // Answered by the channel task; if it cannot take it, the caller's wait ends.
                let _ = state.control.try_send(Control::Snapshot(reply));
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
        // The channel task goes with the state (its PTY channel closes); the connection is
        // shared and ends when its last user lets go (see `crate::ssh::pool`).
        state.client = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tmux_sessions_this_server_makes_reach_the_shell() {
        let env = "0b6f3c5e-8d1a-4a57-9a3e-2f1d1b9e7c11";
        assert!(valid_tmux_session(&tmux_session(env)));
        assert_eq!(
            tmux_command(&tmux_session(env)),
            format!("env LANG=C.UTF-8 LC_CTYPE=C.UTF-8 tmux -u new-session -A -s devpocket_{env}")
        );
        for bad in [
            "",
            "devpocket_",
            "other_x",
            "devpocket_a;rm -rf ~",
            "devpocket_a b",
            "devpocket_$(id)",
            &format!("devpocket_{}", "a".repeat(65)),
        ] {
            assert!(!valid_tmux_session(bad), "{bad:?}");
        }
    }
}
