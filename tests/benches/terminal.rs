//! Terminal benchmark: a WebSocket terminal on a local-provider environment (real SSH, real
//! tmux), through the real server on 127.0.0.1:0. Prints numbers; asserts only that the bytes are
//! right, never how fast they came.
//!
//! `cargo bench --bench terminal` (release build). Knobs: `BENCH_KEYSTROKES` (default 300),
//! `BENCH_FLOOD_MB` (default 50).

#[path = "../support/mod.rs"]
mod support;

mod report;

use std::time::{Duration, Instant};

use devpocket::terminal::output::{Replay, Ring};
use devpocket::terminal::screen::ScreenModel;
use support::terminal::*;
use support::{Backend, TestServer, rss_kib};

use report::{Latencies, knob, line, ms};

fn main() {
    println!(
        "# terminal; {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    ring();
    screen();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(end_to_end(
        knob("BENCH_KEYSTROKES", 300),
        knob("BENCH_FLOOD_MB", 50),
    ));
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

async fn end_to_end(keystrokes: usize, flood_mb: usize) {
    let s = TestServer::start(Backend::Sqlite).await;
    let me = s.register("bench").await;
    let t = Instant::now();
    let env = running_env(&s, &me, "bench").await;
    line(
        "environment create → running (local)",
        format!("{:>9.1} ms", ms(t.elapsed())),
    );

    let t = Instant::now();
    let (mut ws, welcome) = open_terminal(&s, &me, &env, "&cols=200&rows=50").await;
    line(
        "terminal open → welcome (SSH + PTY + tmux)",
        format!("{:>9.1} ms", ms(t.elapsed())),
    );
    let terminal_id = welcome["terminal_id"].as_str().expect("id").to_string();
    input(&mut ws, "echo ready-$((1))\r").await;
    read_until(&mut ws, "ready-1").await;

    // Keystroke echo: one character in, until its echo comes back (through tmux), then erase it.
    // (The bench's one pause: it sets the typing pace.)
    let mut samples = Vec::with_capacity(keystrokes);
    for i in 0..keystrokes {
        // Letters that do not end common escape sequences, so an echo is not mistaken for one.
        let c = ['v', 'w', 'x', 'y', 'z'][i % 5];
        // Typing pace, not a flood: output is quiet before each key.
        tokio::time::sleep(Duration::from_millis(15)).await;
        let t = Instant::now();
        input(&mut ws, &c.to_string()).await;
        read_until(&mut ws, &c.to_string()).await;
        samples.push(t.elapsed());
        input(&mut ws, "\u{7f}").await;
        next_output(&mut ws).await;
    }
    line("keystroke → echo", Latencies::new(samples).summary());

    // A flood: how fast output reaches a reader that keeps up, and what it costs in memory.
    let rss_before = rss_kib();
    let mut peak = rss_before;
    let t = Instant::now();
    input(
        &mut ws,
        &format!(
            "head -c {} /dev/zero | tr '\\0' 'y' | fold -w 199; echo flood-$((6*7))\r",
            flood_mb << 20
        ),
    )
    .await;
    let mut received = 0usize;
    let mut frames = 0usize;
    let mut tail = String::new();
    let mut offset = 0;
    while !tail.contains("flood-42") {
        let Some(frame) = next_json(&mut ws).await else {
            panic!("closed during the flood")
        };
        if frame["type"] == "output" {
            let data = frame["data"].as_str().expect("data");
            received += data.len();
            frames += 1;
            offset = frame["offset"].as_u64().expect("offset");
            tail = format!("{}{data}", &tail[tail.len().saturating_sub(16)..]);
        }
        if frames.is_multiple_of(256) {
            peak = peak.max(rss_kib());
        }
    }
    let elapsed = t.elapsed();
    line(
        &format!("flood {flood_mb} MiB through tmux"),
        format!(
            "{:>9.1} MiB/s produced  {:>7.1} MiB/s on the wire  {} frames (avg {} B)",
            flood_mb as f64 / elapsed.as_secs_f64(),
            received as f64 / f64::from(1u32 << 20) / elapsed.as_secs_f64(),
            frames,
            received / frames.max(1)
        ),
    );
    line(
        "server memory during the flood",
        format!(
            "{:>9} KiB before  {} KiB peak (+{} KiB)",
            rss_before,
            peak,
            peak.saturating_sub(rss_before)
        ),
    );

    // Resume: drop the WebSocket, let output happen, come back with the last offset.
    drop(ws);
    let t = Instant::now();
    let (mut ws, welcome) = open_terminal(
        &s,
        &me,
        &env,
        &format!("&terminal_id={terminal_id}&offset={offset}"),
    )
    .await;
    line("resume → welcome", format!("{:>9.1} ms", ms(t.elapsed())));
    assert_eq!(welcome["offset"].as_u64(), Some(offset));
    input(&mut ws, "echo back-$((2+2))\r").await;
    read_until(&mut ws, "back-4").await;
    s.stop().await;
}

/// Wait for the next output frame, whatever it holds.
async fn next_output(ws: &mut Ws) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no output");
        match next_json(ws).await {
            Some(f) if f["type"] == "output" => return,
            Some(_) => {}
            None => panic!("closed"),
        }
    }
}
