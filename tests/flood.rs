//! A flood of terminal output to a deliberately slow reader. In its own test binary so the flood
//! (which the environment's tmux still has to digest) does not compete with the other terminal
//! tests for the CPU.

mod support;

use std::time::Duration;

use support::terminal::*;
use support::{Backend, TestServer, rss_kib};

on_both_backends!(a_flood_to_a_slow_reader_keeps_memory_flat_and_ctrl_c_works);

async fn a_flood_to_a_slow_reader_keeps_memory_flat_and_ctrl_c_works(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("flo").await;
    let env = running_env(&s, &me, "flood").await;
    let (mut ws, _) = open_terminal(&s, &me, &env, "&cols=200&rows=50").await;
    input(&mut ws, "echo ready-$((1))\r").await;
    read_until(&mut ws, "ready-1").await;
    let before = rss_kib();
    // ~200 MB of output if nothing held it back.
    input(
        &mut ws,
        "head -c 200000000 /dev/zero | tr '\\0' 'y' | fold -w 150\r",
    )
    .await;
    let mut peak = before;
    let mut received = 0usize;
    for _ in 0..150 {
        if let Some(f) = next_json(&mut ws).await
            && f["type"] == "output"
        {
            received += f["data"].as_str().map_or(0, str::len);
        }
        // A deliberately slow reader.
        tokio::time::sleep(Duration::from_millis(10)).await;
        peak = peak.max(rss_kib());
    }
    let growth_mib = peak.saturating_sub(before) / 1024;
    // The bound: far below the flood's size; queues and the ring are bounded (1 MiB ring, 64
    // frames of at most 64 KiB per client, SSH windows).
    assert!(
        growth_mib < 64,
        "server memory grew by {growth_mib} MiB while {received} bytes were read"
    );
    input(&mut ws, "\u{3}").await;
    input(&mut ws, "echo stopped-$((2+2))\r").await;
    read_until(&mut ws, "stopped-4").await;
    s.stop().await;
}
