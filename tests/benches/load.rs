//! Load benchmark (issue 12, goal 4): many concurrent terminals on the local provider, each
//! receiving a steady stream of output (40 KB/s each by default: the traffic of Coder's published
//! scale test), while a probe terminal on a quiet environment of its own measures keystroke echo.
//! Prints numbers, asserts only that the load was real (terminals open, bytes flowing), never
//! how fast it went.
//!
//! `cargo bench --bench load` (release build). Knobs: `BENCH_TERMINALS` (default 1000),
//! `BENCH_PER_ENV` (terminals per environment, default 10: every terminal of an environment
//! attaches to its one tmux session, so one producer there feeds all of them), `BENCH_RATE`
//! (bytes/s per producer, default 40000), `BENCH_SECONDS` (measured load, default 20),
//! `BENCH_KEYSTROKES` (probe echoes, default 200), `BENCH_RING` (bytes; 0 = run twice, at the
//! configured default ring and at a 64 KiB ring).
//!
//! The server is a child process ([`server::ChildServer`]) with its caps as configured by
//! default except those that count clients per address or per node (all clients here come from
//! 127.0.0.1): the bench makes as many users as the per-user WebSocket cap and as many sessions
//! as the per-session terminal cap require (one environment per user, the free plan's limit).
//! Memory is the server process's alone (the local provider's SSH server is part of it; tmux and
//! the shells are not). The per-terminal figure is split into the output ring and the screen
//! model (both sized by config: `terminals.ring_bytes`, the screen's cells; the model counts
//! both grids, as tmux runs in the alternate screen) and the rest.

#[path = "../support/mod.rs"]
mod support;

mod report;
#[allow(dead_code)] // shared with the terminal bench, which uses more of it
mod server;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use devpocket::terminal::screen::ScreenModel;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use server::ChildServer;
use support::Session;
use support::terminal::Ws;
use tokio_tungstenite::tungstenite::Message;

use report::{Latencies, knob, line};

/// Terminal size of every load terminal (the screen model is sized from it).
const COLS: u16 = 80;
const ROWS: u16 = 24;
/// Bound on one terminal open (SSH, PTY, tmux) under load.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// Opens in flight at once (a phone fleet reconnecting is spread out; this only bounds the
/// bench's own burst).
const OPEN_CONCURRENCY: usize = 16;

/// What an idle terminal's ring holds: its storage starts at 4 KiB (`Ring::new`) and tmux's
/// first screen of an 80×24 terminal fits in it.
const IDLE_RING_KIB: u64 = 4;

/// The screen model of one load terminal, in KiB: main and alternate grid, as every terminal
/// here runs tmux, which switches to the alternate screen (vt100 allocates that grid then).
fn screen_kib(max_cells: usize) -> f64 {
    let mut model = ScreenModel::new(u32::from(COLS), u32::from(ROWS), max_cells);
    model.process(b"\x1b[?1049h");
    model.memory_bytes() as f64 / 1024.0
}

fn main() {
    raise_open_files();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let k = Knobs {
        terminals: knob("BENCH_TERMINALS", 1000).max(1),
        per_env: knob("BENCH_PER_ENV", 10).max(1),
        rate: knob("BENCH_RATE", 40_000).max(100),
        seconds: knob("BENCH_SECONDS", 20).max(1),
        keystrokes: knob("BENCH_KEYSTROKES", 200).max(1),
    };
    println!(
        "# load: {} terminals, {} per environment, {} B/s each, {} s; {} cores",
        k.terminals,
        k.per_env,
        k.rate,
        k.seconds,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let rings = match knob("BENCH_RING", 0) {
        0 => vec![None, Some(64 * 1024)],
        n => vec![Some(n)],
    };
    for ring in rings {
        runtime.block_on(run(&k, ring));
    }
}

struct Knobs {
    terminals: usize,
    per_env: usize,
    rate: usize,
    seconds: usize,
    keystrokes: usize,
}

/// The bench holds two descriptors per terminal (its WebSocket and reqwest's pool aside).
fn raise_open_files() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    );
}

/// One user with its environment and its terminals' session.
struct Tenant {
    me: Session,
    env: String,
}

async fn run(k: &Knobs, ring: Option<usize>) {
    let s = Arc::new(
        ChildServer::start(|c| {
            if let Some(ring) = ring {
                c.terminals.ring_bytes = ring;
            }
            // All clients come from 127.0.0.1: the per-address and per-node caps must hold them.
            c.server.max_connections = (k.terminals as u32 + 256).max(c.server.max_connections);
            c.server.max_connections_per_ip = c.server.max_connections;
            c.terminals.max_terminals_per_node =
                (k.terminals + 16).max(c.terminals.max_terminals_per_node);
            c.environments.metrics_interval_seconds = 60;
        })
        .await,
    );
    let defaults = devpocket::config::Config::defaults();
    let ring_bytes = ring.unwrap_or(defaults.terminals.ring_bytes);
    let per_user = defaults
        .terminals
        .max_connections_per_user
        .min(defaults.terminals.max_terminals_per_session)
        .min(k.per_env);
    let tenants_needed = k.terminals.div_ceil(per_user);
    println!(
        "\n## ring {} KiB: {tenants_needed} users × {per_user} terminals (per-user WebSocket cap {}, per-session terminal cap {})",
        ring_bytes / 1024,
        defaults.terminals.max_connections_per_user,
        defaults.terminals.max_terminals_per_session
    );

    // Users and their environments, a few at a time (each register is one argon2id hash).
    let t = Instant::now();
    let tenants: Vec<Tenant> = futures_util::stream::iter(0..tenants_needed)
        .map(|i| {
            let s = s.clone();
            async move {
                let me = s.register(&format!("load{i}")).await;
                let env = s.running_env(&me, &format!("load{i}")).await;
                Tenant { me, env }
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let probe_me = s.register("probe").await;
    let probe_env = s.running_env(&probe_me, "probe").await;
    line(
        "users + environments running",
        format!("{:>9.1} s", t.elapsed().as_secs_f64()),
    );
    let quiet = Duration::from_secs(3);
    tokio::time::sleep(quiet).await;
    let rss_base = s.rss_kib();

    // The terminals, each read by a task of its own that counts bytes and notices a close.
    let received = Arc::new(AtomicU64::new(0));
    let disconnects = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let plan: Vec<(usize, usize)> = (0..k.terminals)
        .map(|i| (i / per_user, i % per_user))
        .collect();
    let opened: Vec<Option<Ws>> = futures_util::stream::iter(plan.iter().copied())
        .map(|(u, _)| {
            let (s, tenant) = (s.clone(), &tenants[u]);
            let refused = refused.clone();
            async move {
                match open(&s, &tenant.me, &tenant.env).await {
                    Ok(ws) => Some(ws),
                    Err(why) => {
                        if refused.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("open refused: {why}");
                        }
                        None
                    }
                }
            }
        })
        .buffered(OPEN_CONCURRENCY)
        .collect()
        .await;
    let open_secs = t.elapsed().as_secs_f64();
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for ((u, nth), ws) in plan.iter().copied().zip(opened) {
        let Some(ws) = ws else { continue };
        let (sink, stream) = ws.split();
        if nth == 0 {
            writers.push((u, sink));
        }
        readers.push(tokio::spawn(read_all(
            stream,
            received.clone(),
            disconnects.clone(),
        )));
    }
    let open_now = readers.len();
    line(
        &format!("terminals open (of {})", k.terminals),
        format!(
            "{open_now:>9}  in {open_secs:.1} s, {} refused",
            refused.load(Ordering::Relaxed)
        ),
    );
    assert!(open_now > 0, "no terminal opened");
    // The probe's own terminal, opened before the load starts (its echo is what is measured).
    let mut probe_ws = open(&s, &probe_me, &probe_env)
        .await
        .expect("probe terminal");
    tokio::time::sleep(quiet).await;
    let rss_idle = s.rss_kib();
    let idle_per = rss_idle.saturating_sub(rss_base) as f64 / open_now as f64;
    let screen_kib = screen_kib(defaults.terminals.screen_max_cells);
    line(
        "server RSS idle (before → with terminals)",
        format!(
            "{rss_base:>9} KiB → {rss_idle} KiB  = {idle_per:.1} KiB per idle terminal: ring ≤ {IDLE_RING_KIB} KiB + screen {screen_kib:.0} KiB + the rest {:.1} KiB  ({})",
            (idle_per - IDLE_RING_KIB as f64 - screen_kib).max(0.0),
            s.memory_detail()
        ),
    );

    // Producers: one per environment, in its first terminal (the others mirror its tmux session).
    let per_tick = (k.rate / 10).max(100);
    let producer = format!(
        "perl -e '$|=1; $n=0; while (1) {{ $b=\"\"; while (length($b) < {per_tick}) {{ $b .= sprintf(\"%08d %s\\n\", $n++, \"x\" x 70) }} print $b; select(undef,undef,undef,0.1) }}'\r"
    );
    for (_, sink) in &mut writers {
        send_input(sink, &producer).await;
    }
    // Warm up, then measure.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_before = s.cpu_seconds();
    let bytes_before = received.load(Ordering::Relaxed);
    let t = Instant::now();
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (s, sampling) = (s.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut peak = 0;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(s.rss_kib());
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            peak
        })
    };
    let echo = probe(&mut probe_ws, k.keystrokes).await;
    let remaining = Duration::from_secs(k.seconds as u64).saturating_sub(t.elapsed());
    tokio::time::sleep(remaining).await;
    let elapsed = t.elapsed().as_secs_f64();
    let cpu = s.cpu_seconds() - cpu_before;
    let bytes = received.load(Ordering::Relaxed) - bytes_before;
    sampling.store(false, Ordering::Relaxed);
    let rss_peak = sampler.await.expect("sampler");
    let rss_loaded = s.rss_kib();
    let lost = disconnects.load(Ordering::Relaxed);
    line("probe keystroke → echo under load", echo.summary());
    line(
        "output delivered to the load terminals",
        format!(
            "{:>9.1} MB/s  ({:.1} KB/s per terminal; {} B/s produced per environment)",
            bytes as f64 / elapsed / 1e6,
            bytes as f64 / elapsed / 1e3 / open_now as f64,
            k.rate
        ),
    );
    line(
        "disconnects during the load",
        format!("{lost:>9}  (of {open_now})"),
    );
    line(
        "server CPU under load",
        format!(
            "{:>9.2} cores  ({:.1} ms per MB delivered)",
            cpu / elapsed,
            cpu * 1000.0 / (bytes as f64 / 1e6).max(1e-9)
        ),
    );
    let per_terminal = rss_loaded.saturating_sub(rss_base) as f64 / open_now as f64;
    // The ring's storage grows by doubling, up to its capacity, as output comes.
    let per_terminal_output = (received.load(Ordering::Relaxed) / open_now as u64) as usize;
    let ring_kib = ring_bytes
        .next_power_of_two()
        .min(per_terminal_output.max(1).next_power_of_two()) as f64
        / 1024.0;
    line(
        "server RSS under load",
        format!(
            "{rss_loaded:>9} KiB (peak {rss_peak})  = {per_terminal:.1} KiB per terminal: ring ≤ {ring_kib:.0} KiB + screen {screen_kib:.0} KiB + the rest {:.1} KiB  ({})",
            (per_terminal - ring_kib - screen_kib).max(0.0),
            s.memory_detail()
        ),
    );

    // Stop the producers, then the server (it ends the terminals; the scratch dir sweeps up).
    for (_, sink) in &mut writers {
        send_input(sink, "\u{3}").await;
    }
    for r in readers {
        r.abort();
    }
    if let Ok(s) = Arc::try_unwrap(s) {
        s.stop().await;
    }
}

/// Open a terminal; `Err` with why when it is refused or does not come up in time.
async fn open(s: &ChildServer, me: &Session, env: &str) -> Result<Ws, String> {
    let url = s
        .url(&format!(
            "/api/v1/ws/terminal/{env}?token={}&cols={COLS}&rows={ROWS}",
            me.access
        ))
        .replacen("http://", "ws://", 1);
    let attempt = async {
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let frame: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    match frame["type"].as_str() {
                        Some("welcome") => return Ok(ws),
                        Some("error") => return Err(frame.to_string()),
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(f))) => return Err(format!("closed: {f:?}")),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("closed".into()),
            }
        }
    };
    tokio::time::timeout(OPEN_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

type Sink = futures_util::stream::SplitSink<Ws, Message>;

async fn send_input(sink: &mut Sink, data: &str) {
    let _ = sink
        .send(Message::text(
            json!({ "type": "input", "data": data }).to_string(),
        ))
        .await;
}

/// Read a load terminal until it closes (counted as a disconnect: nothing closes them on
/// purpose while the bench runs). Counts output bytes; pings are answered by tungstenite.
async fn read_all(
    mut stream: futures_util::stream::SplitStream<Ws>,
    received: Arc<AtomicU64>,
    disconnects: Arc<AtomicUsize>,
) {
    let mut why = "the stream ended".to_owned();
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(Message::Text(t)) => {
                received.fetch_add(t.len() as u64, Ordering::Relaxed);
            }
            Ok(Message::Close(f)) => {
                why = format!("closed: {f:?}");
                break;
            }
            Err(e) => {
                why = e.to_string();
                break;
            }
            Ok(_) => {}
        }
    }
    if disconnects.fetch_add(1, Ordering::Relaxed) < 3 {
        eprintln!("a load terminal disconnected: {why}");
    }
}

/// Keystroke echo on a quiet terminal of its own while the load runs: one letter in, until its
/// echo comes back, then erase it (paced like typing). An echo that takes longer than
/// [`ECHO_GIVE_UP`] ends the measurement (the server is past its capacity); the summary says how
/// many echoes were measured.
async fn probe(ws: &mut Ws, keystrokes: usize) -> Latencies {
    let mut samples = Vec::with_capacity(keystrokes);
    let mut text = String::new();
    send_raw(ws, "echo probe-$((1))\r").await;
    if !until(ws, &mut text, "probe-1").await {
        eprintln!("the probe's shell did not answer within {ECHO_GIVE_UP:?}");
        return Latencies::new(samples);
    }
    for i in 0..keystrokes {
        let c = ['v', 'w', 'x', 'y', 'z'][i % 5];
        tokio::time::sleep(Duration::from_millis(20)).await;
        text.clear();
        let t = Instant::now();
        send_raw(ws, &c.to_string()).await;
        if !until(ws, &mut text, &c.to_string()).await {
            eprintln!("an echo took longer than {ECHO_GIVE_UP:?}: the measurement stops");
            break;
        }
        samples.push(t.elapsed());
        send_raw(ws, "\u{7f}").await;
    }
    Latencies::new(samples)
}

/// Longest wait for one echo before the probe gives up.
const ECHO_GIVE_UP: Duration = Duration::from_secs(10);

async fn send_raw(ws: &mut Ws, data: &str) {
    ws.send(Message::text(
        json!({ "type": "input", "data": data }).to_string(),
    ))
    .await
    .expect("probe input");
}

/// Read output until `text` (output since it was cleared) contains `needle`; false after
/// [`ECHO_GIVE_UP`].
async fn until(ws: &mut Ws, text: &mut String, needle: &str) -> bool {
    let wait = async {
        while !text.contains(needle) {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let frame: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    if frame["type"] == "output" {
                        text.push_str(frame["data"].as_str().unwrap_or_default());
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("probe terminal closed: {other:?}"),
            }
        }
    };
    tokio::time::timeout(ECHO_GIVE_UP, wait).await.is_ok()
}
