//! Terminal benchmark: DevPocket's terminal path next to its floor, in one run. Prints numbers
//! and ratios; asserts only that the bytes are right, never how fast they came.
//!
//! `cargo bench --bench terminal` (release build; a default run takes about 2 minutes).
//!
//! - **Floor**: a PTY the benchmark opens itself (`pty-process`), 200×50, running
//!   `tmux -S <own socket> -u new-session -A -s floor bash` (tmux on its own socket in a temp dir,
//!   no config file, killed at the end).
//! - **DevPocket**: WebSocket → server → SSH → PTY → tmux → bash on the local provider, 200×50.
//!   The server runs as a child process (the bench's sibling binary, SQLite, local provider, a
//!   temp dir; see `server.rs`), so its CPU time and memory are its own, read from `/proc`.
//!
//! Both paths run the same measurements, interleaved over `BENCH_ROUNDS` rounds (the order of
//! the two paths alternates per round): keystroke echo (one key, then until it is echoed back
//! through tmux, then erase it; a 15 ms typing pace so output is quiet before each key) and a
//! flood (`head -c N /dev/zero | tr '\0' y | fold -w 199`, then a marker; time until the marker
//! arrives). Printed: each round, the medians over the rounds, and DevPocket ÷ floor for echo p50,
//! echo p99 and flood time; the server's CPU per MiB of flood.
//!
//! Memory (issue 12, goal 3): the server's RSS once idle (started, one registration and one
//! login, one terminal open, `BENCH_IDLE_SECONDS` quiet), and at the end what each additional
//! idle terminal costs (10 more, then up to 40 more, each set quiet for a few seconds).
//!
//! Knobs: `BENCH_KEYSTROKES` (per path and round, default 300), `BENCH_FLOOD_MB` (MiB, default
//! 100), `BENCH_ROUNDS` (3), `BENCH_IDLE_SECONDS` (10), `BENCH_EXTRA_TERMINALS` (40; 0 skips);
//! `BENCH_SERVER_BIN` runs another server binary (a saved earlier build, to compare);
//! `BENCH_SERVER_ENV` adds `NAME=value` pairs to the server's environment (`GLIBC_TUNABLES=...` to
//! compare allocator settings without a rebuild, heaptrack's `LD_PRELOAD`; see `server.rs`); `BENCH_PROFILE_SECONDS` > 0 only types, for that long, for
//! `perf record -p <server pid>` (the pid is printed), and skips everything else.
//!
//! # Where a keystroke's time goes (perf on the server, release build, 2 shared cores, 2026-11-30)
//!
//! `BENCH_PROFILE_SECONDS=30` then `perf stat -e task-clock,context-switches -p <pid>` and
//! `perf record --call-graph dwarf -p <pid>` (the release profile keeps symbols and `.eh_frame`).
//! Before the fixes of this commit: about 0.5 ms of server CPU and 4–5 context switches per echo
//! (a key or its erase), for an echo the floor delivers in 0.25–0.3 ms of wall time.
//!
//! - **Eight task hand-offs per echo**, each a wake-up (and with 2 workers usually an unpark of
//!   the other worker: a futex and a context switch; `finish_task_switch` after `epoll_wait` or
//!   the park condvar is 20–25% of the samples). In: WebSocket task → terminal channel task
//!   (`In` queue) → russh client session task → loopback TCP → russh server session task →
//!   the local SSH server's `supervise` task → PTY. Out: `supervise` (PTY read) → russh server
//!   session task → loopback TCP → russh client session task → terminal channel task (coalescer,
//!   ring, screen model) → WebSocket task (`Out` queue) → client.
//! - **SSH to itself**: on the local provider the server is both SSH client and SSH server, so
//!   each echo is two loopback TCP round trips and four ChaCha20-Poly1305 packet operations
//!   (`ChaCha20_ctr32`, russh `cipher::read`, `PacketWriter::write_packet`), i.e. half the hops
//!   and all of the crypto are the local provider talking to itself.
//! - **tungstenite's read buffer** (128 KiB by default) was zeroed before every WebSocket read
//!   (`FrameCodec::read_frame` → `BytesMut::resize` → memset): ~5% of the server's CPU per
//!   keystroke, and 128 KiB resident per terminal. Fixed: `http::ws::WS_READ_BUFFER` (4 KiB).
//! - Smaller: input frames are decoded through a `serde_json::Value` (`InputDecoder::decode`,
//!   ~0.5%); tokio's scheduler computes its poll-time average with `pow` each time a worker
//!   wakes (~0.4%, another cost of the wake-ups above); timers re-armed per read.
//!
//! Fixed since: the coalescer's zero-length timer after a quiet spell (it waited for the time
//! driver's next 1 ms tick, up to 1 ms of every echo; now `now_or_never`), the terminals of one
//! environment share one SSH connection, and idle channels hold no read buffer. Measured after
//! (2026-11-30, release, quiet machine, 3 runs of 3 rounds, medians): echo p50 0.75 ms against
//! the floor's 0.32 ms (2.35×, from 9.0×), p99 1.67× (1.16–3.29× between runs); flood 1.09×.
//!
//! What the remaining ~0.4 ms is: the hops above minus the timer — four of them, both loopback
//! TCP round trips and all the crypto are the local provider being an SSH server to itself, which
//! the design asks for (DESIGN.md, Providers: "the terminal path is identical (real SSH)"), so a
//! Contabo terminal takes the same code path. Removing them would mean a local-only path (hand
//! the PTY's halves straight to the channel task) that the Contabo path never exercises; not done.
//! Within the design, what is left is each task hop's wake-up: the WebSocket task writing the
//! channel task's frames itself, or one terminal's tasks kept on one worker. How much that could
//! give, measured (2026-12-01, 2 rounds each): the server on one worker thread
//! (`BENCH_SERVER_ENV=TOKIO_WORKER_THREADS=1`, every hop on one thread, no unparking) echoes at
//! p50 0.73 ms against 0.84 ms on two, the floor 0.38 ms — the wake-ups are about 0.1 ms of the
//! ~0.45 ms over the floor; the rest is the work itself (both SSH ends, four packet crypto
//! operations, two loopback TCP round trips, the screen model).
//!
//! # The flood (goal 2)
//!
//! tmux redraws rather than forwards: of the 100 MiB the shell prints, 2–6 MiB reach the server,
//! in PTY reads of tens of bytes at 7,000–10,000 reads a second (2026-12-01, from
//! `/proc/<pid>/io` and the threads' context switches, sampled every 0.5 s). Each read was an SSH
//! packet (both ends' crypto), a loopback write and read, half a dozen task wake-ups and a
//! WebSocket frame: about 25 µs of server CPU each, 9–10 ms per MiB of flood, and on two cores
//! that CPU is taken from tmux, which sets the pace (1.09–1.21× the floor). Output pacing
//! (`ssh::server::OUTPUT_PACE`: after a read shorter than half the PTY's buffer the next read
//! waits 2 ms) turns the bursts into a few reads of up to 4 KiB: 0.8–0.9 MiB on the wire, the
//! server's CPU per MiB 10.4 → 5.4–6.8 ms (1 ms pacing: 6.2 ms), the flood 0.96–1.11× the floor
//! (median 0.99×, 3 runs), echo unchanged (the first read after a quiet spell is not delayed).
//!
//! # Where idle memory goes (goal 3)
//!
//! Most of the idle RSS was the program's own code, mapped from the file: at start, before any
//! request, 8.9 MiB of the 11.2 MB `.text` was resident (2026-12-01, fat-LTO `opt-level = "s"`
//! build, read from `/proc/<pid>/smaps` and `pagemap`). The kernel maps file pages around each
//! fault in 64 KiB windows (`fault_around_bytes`; `MADV_RANDOM` does not change that, tried),
//! and the code run at start (config, clap, tracing, migrations, templates, the SSH server,
//! hyper, tokio) is spread so that 154 of the 171 windows of `.text` hold some of it; a login
//! and a terminal open map most of them again. Those pages are shared with the page cache, not
//! allocated by the server. Now the server unmaps its binary's clean pages once it is up and
//! whenever it goes quiet (`memory::release_code_when_quiet`, `MADV_DONTNEED`): RSS at start
//! 14.7 → 5.4 MiB, idle with one terminal 18.5 → 7.5–7.8 MiB (4.6–4.9 anonymous, 3.1 mapped
//! code; 3 runs with a 5 s quiet check). Variable: the release must land inside the 10 quiet
//! seconds (one run 17.3 MiB, it came after), and with the final 2 s check one run kept 8.3 MiB
//! of code mapped (13.4 MiB): what maps it back while idle is not yet known. The anonymous part is the real cost: heap (the terminal's screen model, 200×50
//! with tmux's alternate screen, is about 0.6 MiB of it), thread stacks, SQLite's page cache.

#[path = "../support/mod.rs"]
mod support;

mod report;
mod server;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use devpocket::terminal::output::{Replay, Ring};
use devpocket::terminal::screen::ScreenModel;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use report::{Latencies, knob, line, ms};
use server::ChildServer;
use support::terminal::{Ws, input, next_json};

/// Terminal size of both paths.
const COLS: u16 = 200;
const ROWS: u16 = 50;
/// Typing pace: the pause before each key, so output is quiet when it is pressed.
const PACE: Duration = Duration::from_millis(15);
/// Bound on any single wait for output (a stuck path fails the bench instead of hanging it).
const WAIT: Duration = Duration::from_secs(60);
/// Keys typed: letters that end no common escape sequence, so an echo is not mistaken for one.
const KEYS: [u8; 5] = *b"vwxyz";
/// The flood's end marker, and the command that prints it (`$((6*7))` so the typed command line,
/// echoed first, does not contain it).
const MARKER: &str = "flood-42";

fn main() {
    println!(
        "# terminal; {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let profile = knob("BENCH_PROFILE_SECONDS", 0);
    if profile > 0 {
        runtime.block_on(profile_typing(Duration::from_secs(profile as u64)));
        return;
    }
    ring();
    screen();
    runtime.block_on(side_by_side(Knobs {
        keystrokes: knob("BENCH_KEYSTROKES", 300),
        flood_mib: knob("BENCH_FLOOD_MB", 100),
        rounds: knob("BENCH_ROUNDS", 3).max(1),
        idle: Duration::from_secs(knob("BENCH_IDLE_SECONDS", 10) as u64),
        extra_terminals: knob("BENCH_EXTRA_TERMINALS", 40),
    }));
}

struct Knobs {
    keystrokes: usize,
    flood_mib: usize,
    rounds: usize,
    idle: Duration,
    extra_terminals: usize,
}

/// The output ring every terminal keeps for resume: recording and replaying.
fn ring() {
    const RING: usize = 1 << 20;
    let chunk = vec![b'y'; 4096];
    let mut ring = Ring::new(RING);
    let total: usize = 512 << 20;
    let t = Instant::now();
    for _ in 0..total / chunk.len() {
        ring.push(&chunk);
    }
    let push = t.elapsed();
    line(
        "ring push (4 KiB chunks, 1 MiB ring)",
        format!("{:>9.0} MiB/s", (total >> 20) as f64 / push.as_secs_f64()),
    );
    let rounds = 2000;
    let t = Instant::now();
    let mut replayed = 0usize;
    for i in 0..rounds {
        match ring.since(ring.end() - (RING as u64 / 2) - (i % 1024)) {
            Replay::Bytes(b) => replayed += b.len(),
            Replay::Lost { .. } => panic!("within the ring"),
        }
    }
    line(
        "ring replay (512 KiB from a 1 MiB ring)",
        format!(
            "{:>9.0} MiB/s  {:>8.3} ms each",
            (replayed >> 20) as f64 / t.elapsed().as_secs_f64(),
            ms(t.elapsed()) / f64::from(rounds as u32)
        ),
    );
}

/// The server-side screen model every terminal feeds its output through: its cost per MiB next
/// to the ring's (the floor: a copy), a repaint, and its memory at common sizes.
fn screen() {
    // Shell-like output: coloured prompts, text, line ends (what a build log or `ls` prints).
    let mut chunk = Vec::new();
    while chunk.len() < 4096 {
        chunk.extend_from_slice(b"\x1b[1;32muser@dev\x1b[0m:\x1b[34m~/src\x1b[0m$ cargo build --release 2>&1 | tail\r\n");
        chunk.extend_from_slice("   Compiling tokio v1.54.1 — ünïcödé ✓\r\n".as_bytes());
    }
    let total: usize = 128 << 20;
    let mut ring = Ring::new(1 << 20);
    let t = Instant::now();
    for _ in 0..total / chunk.len() {
        ring.push(&chunk);
    }
    let floor = t.elapsed();
    let mut model = ScreenModel::new(80, 24, 40_000);
    let t = Instant::now();
    for _ in 0..total / chunk.len() {
        model.process(&chunk);
    }
    let parse = t.elapsed();
    let per_mib = |d: Duration| ms(d) / (total >> 20) as f64;
    line(
        "screen model parse (80×24, shell output)",
        format!(
            "{:>9.3} ms/MiB  ({:.1}× the ring's {:.3} ms/MiB)",
            per_mib(parse),
            parse.as_secs_f64() / floor.as_secs_f64(),
            per_mib(floor)
        ),
    );
    let rounds = 2000u32;
    let t = Instant::now();
    let mut bytes = 0;
    for _ in 0..rounds {
        bytes += model.repaint().map_or(0, |r| r.len());
    }
    line(
        "screen repaint (80×24)",
        format!(
            "{:>9.3} ms each, {} bytes",
            ms(t.elapsed()) / f64::from(rounds),
            bytes / rounds as usize
        ),
    );
    for (cols, rows) in [(80, 24), (120, 40), (200, 60)] {
        let mut model = ScreenModel::new(cols, rows, 40_000);
        model.process(b"\x1b[?1049h");
        line(
            &format!("screen model memory {cols}×{rows}"),
            format!(
                "{:>9} KiB (main grid), {} KiB with the alternate screen",
                model.memory_bytes() / 2 / 1024,
                model.memory_bytes() / 1024
            ),
        );
    }
}

/// The server the terminal measurements run against: generous caps so the extra idle
/// terminals fit one user, metrics sampling at its default (a quiet server stays quiet).
async fn start_server() -> ChildServer {
    ChildServer::start(|c| {
        c.environments.metrics_interval_seconds = 60;
        c.terminals.max_connections_per_user = 256;
        c.terminals.max_terminals_per_session = 256;
    })
    .await
}

/// A terminal path under measurement: the bare PTY or DevPocket's WebSocket.
trait Terminal {
    async fn send(&mut self, bytes: &[u8]);
    /// Wait for output; the bytes of the next piece that arrives.
    async fn recv(&mut self) -> Vec<u8>;
    /// Take whatever output is already there without waiting.
    async fn drain(&mut self);
}

struct Floor {
    pty: pty_process::Pty,
    tmux: tokio::process::Child,
    socket: PathBuf,
    buf: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl Floor {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("tmux.sock");
        let (pty, pts) = pty_process::open().expect("open a PTY");
        pty.resize(pty_process::Size::new(ROWS, COLS))
            .expect("size the PTY");
        let tmux = pty_process::Command::new("tmux")
            .arg("-S")
            .arg(&socket)
            .args(["-f", "/dev/null", "-u", "new-session", "-A", "-s", "floor"])
            .arg("bash")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .env("TERM", "xterm-256color")
            .env("LANG", "C.UTF-8")
            .env("LC_CTYPE", "C.UTF-8")
            .current_dir(dir.path())
            .kill_on_drop(true)
            .spawn(pts)
            .expect("tmux starts");
        let mut floor = Self {
            pty,
            tmux,
            socket,
            buf: vec![0; 64 * 1024],
            _dir: dir,
        };
        floor.send(b"echo ready-$((1))\r").await;
        until(&mut floor, "ready-1").await;
        floor
    }

    /// Kill the floor's tmux server (and so its shell) and wait for the client.
    async fn stop(mut self) {
        kill_tmux(&self.socket);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tmux.wait()).await;
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        // Idempotent: a panicking bench leaves no tmux server behind either.
        kill_tmux(&self.socket);
    }
}

fn kill_tmux(socket: &std::path::Path) {
    if socket.exists() {
        let _ = std::process::Command::new("tmux")
            .arg("-S")
            .arg(socket)
            .arg("kill-server")
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Terminal for Floor {
    async fn send(&mut self, bytes: &[u8]) {
        self.pty.write_all(bytes).await.expect("write the PTY");
    }

    async fn recv(&mut self) -> Vec<u8> {
        let n = tokio::time::timeout(WAIT, self.pty.read(&mut self.buf))
            .await
            .expect("output in time")
            .expect("read the PTY");
        assert!(n > 0, "the floor's PTY closed");
        self.buf[..n].to_vec()
    }

    async fn drain(&mut self) {
        // A zero timeout polls the read once: what is there, without waiting.
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::ZERO, self.pty.read(&mut self.buf)).await
        {
            if n == 0 {
                break;
            }
        }
    }
}

struct DevPocket {
    ws: Ws,
}

impl Terminal for DevPocket {
    async fn send(&mut self, bytes: &[u8]) {
        input(
            &mut self.ws,
            std::str::from_utf8(bytes).expect("UTF-8 input"),
        )
        .await;
    }

    async fn recv(&mut self) -> Vec<u8> {
        loop {
            let frame = tokio::time::timeout(WAIT, next_json(&mut self.ws))
                .await
                .expect("output in time")
                .expect("the terminal closed");
            if frame["type"] == "output" {
                return frame["data"].as_str().expect("data").as_bytes().to_vec();
            }
        }
    }

    async fn drain(&mut self) {
        while let Ok(Some(msg)) = tokio::time::timeout(Duration::ZERO, self.ws.next()).await {
            if matches!(msg, Err(_) | Ok(Message::Close(_))) {
                break;
            }
        }
    }
}

/// Read until `needle` has arrived (it may straddle two pieces).
async fn until(path: &mut impl Terminal, needle: &str) {
    let needle = needle.as_bytes();
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let piece = path.recv().await;
        tail.extend_from_slice(&piece);
        if tail.windows(needle.len()).any(|w| w == needle) {
            return;
        }
        let keep = tail.len().saturating_sub(needle.len());
        tail.drain(..keep);
    }
}

/// Keystroke echo: `n` keys, each timed from sending it to the first output that holds it.
async fn echo(path: &mut impl Terminal, n: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let key = KEYS[i % KEYS.len()];
        tokio::time::sleep(PACE).await;
        path.drain().await;
        let t = Instant::now();
        path.send(&[key]).await;
        while !path.recv().await.contains(&key) {}
        samples.push(t.elapsed());
        path.send(b"\x7f").await;
        path.recv().await;
    }
    samples
}

/// The flood: `mib` MiB of `y` lines, then the marker; time until the marker arrived and the
/// bytes that came (tmux redraws what it shows, so fewer than were produced).
async fn flood(path: &mut impl Terminal, mib: usize) -> (Duration, usize) {
    tokio::time::sleep(PACE).await;
    path.drain().await;
    let t = Instant::now();
    path.send(
        format!(
            "head -c {} /dev/zero | tr '\\0' y | fold -w 199; echo flood-$((6*7))\r",
            mib << 20
        )
        .as_bytes(),
    )
    .await;
    let needle = MARKER.as_bytes();
    let mut tail: Vec<u8> = Vec::new();
    let mut received = 0;
    loop {
        let piece = path.recv().await;
        received += piece.len();
        tail.extend_from_slice(&piece);
        if tail.windows(needle.len()).any(|w| w == needle) {
            return (t.elapsed(), received);
        }
        let keep = tail.len().saturating_sub(needle.len());
        tail.drain(..keep);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// One path's results over the rounds.
#[derive(Default)]
struct Results {
    p50: Vec<f64>,
    p99: Vec<f64>,
    flood: Vec<f64>,
}

impl Results {
    fn add(
        &mut self,
        name: &str,
        round: usize,
        samples: Vec<Duration>,
        flood: Duration,
        bytes: usize,
    ) {
        let lat = Latencies::new(samples);
        self.p50.push(ms(lat.at(0.50)));
        self.p99.push(ms(lat.at(0.99)));
        self.flood.push(flood.as_secs_f64());
        line(&format!("  round {} {name} echo", round + 1), lat.summary());
        line(
            &format!("  round {} {name} flood", round + 1),
            format!(
                "{:>9.2} s  ({:.1} MiB on the wire)",
                flood.as_secs_f64(),
                bytes as f64 / f64::from(1u32 << 20)
            ),
        );
    }
}

async fn side_by_side(k: Knobs) {
    let s = start_server().await;
    let pid = s.pid();
    line("server (child process)", format!("pid {pid}"));
    line(
        "server RSS at start",
        format!("{:>9} KiB  ({})", s.rss_kib(), s.memory_detail()),
    );
    s.register("bench").await;
    let me = s.login("bench").await;
    let t = Instant::now();
    let env = s.running_env(&me, "bench").await;
    line(
        "environment create → running (local)",
        format!("{:>9.1} ms", ms(t.elapsed())),
    );
    let t = Instant::now();
    let (ws, _) = s
        .open_terminal(&me, &env, &format!("&cols={COLS}&rows={ROWS}"))
        .await;
    line(
        "terminal open → welcome (SSH + PTY + tmux)",
        format!("{:>9.1} ms", ms(t.elapsed())),
    );
    let mut dp = DevPocket { ws };
    dp.send(b"echo ready-$((1))\r").await;
    until(&mut dp, "ready-1").await;

    // Goal 3: idle with one terminal open.
    tokio::time::sleep(k.idle).await;
    let idle = s.rss_kib();
    line(
        &format!("server RSS idle ({} s, 1 terminal)", k.idle.as_secs()),
        format!(
            "{:>9} KiB = {:.1} MiB  ({})",
            idle,
            idle as f64 / 1024.0,
            s.memory_detail()
        ),
    );

    let mut floor = Floor::start().await;
    let (mut f, mut d) = (Results::default(), Results::default());
    let mut cpu_per_mib = Vec::new();
    let mut peak = 0;
    for round in 0..k.rounds {
        // Alternate which path goes first, so neither always runs on a warmer machine.
        let floor_first = round % 2 == 0;
        let (fe, de) = if floor_first {
            let fe = echo(&mut floor, k.keystrokes).await;
            (fe, echo(&mut dp, k.keystrokes).await)
        } else {
            let de = echo(&mut dp, k.keystrokes).await;
            (echo(&mut floor, k.keystrokes).await, de)
        };
        let dp_flood = async |dp: &mut DevPocket, peak: &mut u64| {
            let cpu = s.cpu_seconds();
            let sampler = sample_rss(&s);
            let result = flood(dp, k.flood_mib).await;
            *peak = (*peak).max(sampler.stop().await);
            (result, s.cpu_seconds() - cpu)
        };
        let ((ff, fb), ((df, db), cpu)) = if floor_first {
            let fr = flood(&mut floor, k.flood_mib).await;
            (fr, dp_flood(&mut dp, &mut peak).await)
        } else {
            let dr = dp_flood(&mut dp, &mut peak).await;
            (flood(&mut floor, k.flood_mib).await, dr)
        };
        cpu_per_mib.push(cpu * 1000.0 / k.flood_mib as f64);
        f.add("floor    ", round, fe, ff, fb);
        d.add("DevPocket", round, de, df, db);
    }
    floor.stop().await;

    let (fp50, fp99, fflood) = (median(f.p50), median(f.p99), median(f.flood));
    let (dp50, dp99, dflood) = (median(d.p50), median(d.p99), median(d.flood));
    println!("# medians over {} rounds", k.rounds);
    line(
        "floor: PTY → tmux → bash",
        format!(
            "echo p50 {fp50:.3} ms  p99 {fp99:.3} ms  flood {} MiB {fflood:.2} s",
            k.flood_mib
        ),
    );
    line(
        "DevPocket: WS → server → SSH → PTY → tmux",
        format!(
            "echo p50 {dp50:.3} ms  p99 {dp99:.3} ms  flood {} MiB {dflood:.2} s",
            k.flood_mib
        ),
    );
    line(
        "ratio DevPocket ÷ floor",
        format!(
            "echo p50 {:.2}×  p99 {:.2}×  flood {:.2}×   (goals ≤ 1.3×, ≤ 1.5×, ≤ 1.05×)",
            dp50 / fp50,
            dp99 / fp99,
            dflood / fflood
        ),
    );
    line(
        "server CPU per MiB of flood",
        format!(
            "{:>9.2} ms/MiB  (user + system, server process only)",
            median(cpu_per_mib)
        ),
    );
    line(
        "server RSS peak during the floods",
        format!("{:>9} KiB = {:.1} MiB", peak, peak as f64 / 1024.0),
    );

    if k.extra_terminals > 0 {
        extra_terminals(&s, &me, &env, k.extra_terminals).await;
    }
    drop(dp);
    s.stop().await;
}

/// Memory per additional idle terminal: open them in two steps (10, then the rest), let each
/// step go quiet, read the RSS.
async fn extra_terminals(s: &ChildServer, me: &support::Session, env: &str, total: usize) {
    const QUIET: Duration = Duration::from_secs(3);
    tokio::time::sleep(QUIET).await;
    let base = s.rss_kib();
    line(
        "server RSS before more terminals",
        format!("{:>9} KiB  ({})", base, s.memory_detail()),
    );
    let mut open = Vec::with_capacity(total);
    let mut steps = vec![total.min(10), total];
    steps.dedup();
    for step in steps {
        while open.len() < step {
            let (ws, _) = s.open_terminal(me, env, "").await;
            open.push(ws);
        }
        tokio::time::sleep(QUIET).await;
        let rss = s.rss_kib();
        line(
            &format!("server RSS with {} more idle terminals", open.len()),
            format!(
                "{:>9} KiB  +{:.0} KiB per terminal  ({})",
                rss,
                rss.saturating_sub(base) as f64 / open.len() as f64,
                s.memory_detail()
            ),
        );
    }
}

/// Samples the server's RSS every 50 ms until stopped; `stop` gives the peak (KiB).
struct RssSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<u64>,
}

fn sample_rss(s: &ChildServer) -> RssSampler {
    let pid = s.pid();
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            peak = peak.max(server::status_kib(pid, "VmRSS:"));
            tokio::select! {
                _ = &mut stopped => return peak,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    });
    RssSampler { stop, task }
}

impl RssSampler {
    async fn stop(self) -> u64 {
        let _ = self.stop.send(());
        self.task.await.unwrap_or(0)
    }
}

/// Only type, for `seconds`, at the bench's pace: for `perf record -p <pid>` on the server.
async fn profile_typing(seconds: Duration) {
    let s = start_server().await;
    s.register("bench").await;
    let me = s.login("bench").await;
    let env = s.running_env(&me, "bench").await;
    let (ws, _) = s
        .open_terminal(&me, &env, &format!("&cols={COLS}&rows={ROWS}"))
        .await;
    let mut dp = DevPocket { ws };
    dp.send(b"echo ready-$((1))\r").await;
    until(&mut dp, "ready-1").await;
    println!(
        "server pid {} — typing for {} s",
        s.pid(),
        seconds.as_secs()
    );
    let cpu = s.cpu_seconds();
    let t = Instant::now();
    let mut samples = Vec::new();
    while t.elapsed() < seconds {
        samples.extend(echo(&mut dp, 50).await);
    }
    let keys = samples.len();
    line("keystroke → echo", Latencies::new(samples).summary());
    line(
        "server CPU per keystroke",
        format!(
            "{:>9.1} µs (key and its erase)",
            (s.cpu_seconds() - cpu) * 1e6 / keys as f64
        ),
    );
    drop(dp);
    s.stop().await;
}
