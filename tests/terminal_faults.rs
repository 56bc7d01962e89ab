//! Terminals against a machine that misbehaves, through the real server, a Contabo simulator and
//! the fake VPS (real SSH):
//! - it stops reading input (its SSH window fills and never re-opens) while the client pastes
//!   3 MiB: control — detach, re-attach, close — never waits for the stuck input, and the write
//!   timeout drops what the machine does not take;
//! - its connection drops: the terminal reconnects and its output stream (the ring) continues.
//! - terminals of one environment share one SSH connection: a client that stops reading while
//!   its shell floods holds back no other terminal on it, and a dropped connection is made again
//!   once for all of them.
//! - it refuses the probe for tmux: that is no answer, so the terminal never falls back to a plain
//!   shell that would not survive the next disconnect.

mod support;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::contabo_sim::{ContaboSim, SimConfig};
use support::fake_vps::{DEAF_BANNER, DEAF_WINDOW, FakeVps, FakeVpsConfig};
use support::terminal::*;
use support::{Backend, Session, TestServer};
use tokio_tungstenite::tungstenite::Message;

on_both_backends!(
    control_never_waits_for_a_remote_that_stops_reading,
    input_a_remote_never_reads_is_dropped_after_the_write_timeout,
    a_dropped_connection_is_reconnected_and_the_stream_continues,
    terminals_share_a_connection_and_a_stalled_client_holds_back_no_other,
    a_refused_tmux_probe_is_never_taken_for_no_tmux,
);

/// The paste: 3 MiB in 2 KiB input frames, far beyond what a deaf machine takes (about 1.5
/// windows) plus the terminal's input queue (256 messages) plus the front end's input backlog
/// (`INPUT_BACKLOG_BYTES`, 1 MiB).
const PASTE_BYTES: usize = 3 << 20;
const PASTE_FRAME: usize = 2048;

struct Deaf {
    _sim: ContaboSim,
    vps: FakeVps,
    s: TestServer,
    me: Session,
    env: String,
}

/// A running Contabo environment whose machine (the fake VPS) does not read terminal input.
async fn deaf_environment(backend: Backend, write_timeout_seconds: u64) -> Deaf {
    let sim_config = SimConfig::default();
    let sim = ContaboSim::start(sim_config.clone()).await;
    let vps = FakeVps::start(&sim, FakeVpsConfig::default()).await;
    let s = TestServer::start_with(backend, |c| {
        support::contabo_sim::use_simulator(c, &sim, &sim_config, vps.port);
        c.terminals.write_timeout_seconds = write_timeout_seconds;
    })
    .await;
    let me = s.register("dora").await;
    // Deaf from the start: the environment's SSH connection (made once it runs, and shared by
    // its metrics sampler and terminals) is then a deaf one. Installation is unaffected (its
    // commands run without a PTY).
    vps.deaf(true);
    let env = running_env(&s, &me, "deaf").await;
    Deaf {
        _sim: sim,
        vps,
        s,
        me,
        env,
    }
}

/// `fut`, which must finish within `WAIT` as a whole (the helpers' own bounds are per frame, and
/// the server's pings would keep those from ever expiring).
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("not in time: {what}"))
}

/// Send `bytes` of input in `PASTE_FRAME`-byte frames (bounded: the server reads them promptly).
async fn paste(ws: &mut Ws, bytes: usize) {
    let chunk = "x".repeat(PASTE_FRAME);
    let frame = json!({ "type": "input", "data": chunk }).to_string();
    tokio::time::timeout(WAIT, async {
        for _ in 0..bytes / PASTE_FRAME {
            ws.send(Message::text(frame.clone())).await.expect("send");
        }
    })
    .await
    .expect("the server takes the paste in time");
}

/// Send a ping and collect every frame up to its pong (the server answers frames in order, so
/// the pong proves it has dealt with everything sent before).
async fn frames_until_pong(ws: &mut Ws) -> Vec<Value> {
    ws.send(Message::text(json!({ "type": "ping" }).to_string()))
        .await
        .expect("send ping");
    let mut seen = Vec::new();
    loop {
        let frame = next_json(ws).await.expect("a pong before the close");
        if frame["type"] == "pong" {
            return seen;
        }
        seen.push(frame);
    }
}

fn errors(frames: &[Value]) -> Vec<&str> {
    frames
        .iter()
        .filter(|f| f["type"] == "error")
        .filter_map(|f| f["message"].as_str())
        .collect()
}

/// Each step is awaited within `WAIT` (30 s), far below the configured write timeout (600 s): a
/// step that waited for the stuck input could not finish in time.
async fn control_never_waits_for_a_remote_that_stops_reading(backend: Backend) {
    let d = deaf_environment(backend, 600).await;
    let (s, me, env) = (&d.s, &d.me, d.env.as_str());
    let admin = s.admin("ops").await;
    let (mut ws, welcome) = within("open", open_terminal(s, me, env, "")).await;
    let terminal_id = welcome["terminal_id"].as_str().expect("id").to_string();
    let (_, offset) = within("the banner", read_until(&mut ws, DEAF_BANNER)).await;

    paste(&mut ws, PASTE_BYTES).await;
    let seen = within("a pong after the paste", frames_until_pong(&mut ws)).await;
    // The remote really stopped reading: more than it and the queue hold was refused, and said.
    assert!(
        PASTE_BYTES > 2 * DEAF_WINDOW as usize + 256 * PASTE_FRAME,
        "the paste must overflow what a deaf machine and the input queue take"
    );
    assert!(
        errors(&seen).iter().any(|m| m.contains("Input dropped")),
        "the client is told its input is dropped: {seen:?}"
    );

    // Detach: the server answers the WebSocket close handshake.
    within("the detach", async {
        ws.close(None).await.expect("send close");
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    let session = format!("session:{}", support::session_id_of(&me.access));
    let terminal = format!("terminal:{terminal_id}");
    s.wait_tree(&admin, "the terminal detached", |t| {
        support::find_actor(t, &terminal).is_some_and(|n| n["phase"] == "detached")
    })
    .await;

    // Re-attach: the same terminal, resuming where the client was.
    let resume = format!("&terminal_id={terminal_id}&offset={offset}");
    let (mut ws, again) = within("the re-attach", open_terminal(s, me, env, &resume)).await;
    assert_eq!(again["terminal_id"], terminal_id.as_str(), "{again}");
    assert_eq!(again["offset"], offset, "{again}");
    within("a pong after the re-attach", ping_pong(&mut ws)).await;

    // Close: a logout ends the session and its terminal at once.
    let (status, body) = s.post("/api/v1/auth/logout", me.token(), json!({})).await;
    assert!(status.is_success(), "{status} {body}");
    assert_eq!(
        within("the close", close_of(&mut ws)).await,
        (1008, "Session ended".into())
    );
    s.wait_tree(&admin, "the session and its terminal gone", |t| {
        support::find_actor(t, &session).is_none() && support::find_actor(t, &terminal).is_none()
    })
    .await;
    d.s.stop().await;
}

/// Input the remote does not take within the write timeout is dropped, the client is told, and
/// the terminal keeps serving.
async fn input_a_remote_never_reads_is_dropped_after_the_write_timeout(backend: Backend) {
    let d = deaf_environment(backend, 2).await;
    let (s, me, env) = (&d.s, &d.me, d.env.as_str());
    let (mut ws, _) = within("open", open_terminal(s, me, env, "")).await;
    within("the banner", read_until(&mut ws, DEAF_BANNER)).await;
    // More than the machine takes, less than the input queue holds: nothing is refused at once.
    let bytes = 4 * DEAF_WINDOW as usize;
    paste(&mut ws, bytes).await;
    let seen = within("a pong after the paste", frames_until_pong(&mut ws)).await;
    assert!(
        !errors(&seen).iter().any(|m| m.contains("Input dropped")),
        "the input queue held the paste: {seen:?}"
    );
    // Within the write timeout (2 s) plus generous headroom, the stuck input is dropped (maybe
    // already before the pong, on a slow machine).
    let message = match errors(&seen).first() {
        Some(m) => m.to_string(),
        None => within("the write-timeout error", next_error(&mut ws)).await,
    };
    assert!(
        message.contains("has not read input for 2 s") && message.contains("dropped"),
        "{message}"
    );
    // The terminal still serves: pings, and a newer input is tried again (and dropped again).
    within("a pong after the timeout", ping_pong(&mut ws)).await;
    input(&mut ws, "more\r").await;
    let message = within("the second write-timeout error", next_error(&mut ws)).await;
    assert!(message.contains("has not read input"), "{message}");
    ws.close(None).await.expect("close");
    d.s.stop().await;
}

/// The message of the next `error` frame.
async fn next_error(ws: &mut Ws) -> String {
    loop {
        let frame = next_json(ws)
            .await
            .expect("an error frame before the close");
        if frame["type"] == "error" {
            return frame["message"].as_str().unwrap_or_default().to_string();
        }
    }
}

/// The machine's connection drops: the client hears so, the terminal reconnects (a new SSH
/// connection, a new PTY), and the output continues the same stream: offsets contiguous, and a
/// resume from before the drop replays exactly what came after it.
async fn a_dropped_connection_is_reconnected_and_the_stream_continues(backend: Backend) {
    let d = deaf_environment(backend, 10).await;
    let (s, me, env) = (&d.s, &d.me, d.env.as_str());
    let (mut ws, welcome) = within("open", open_terminal(s, me, env, "")).await;
    let terminal_id = welcome["terminal_id"].as_str().expect("id").to_string();
    let (_, before) = within("the banner", read_until(&mut ws, DEAF_BANNER)).await;
    let connections = d.vps.connections();
    let banner = format!("{DEAF_BANNER}\r\n");

    d.vps.cut();
    // The notices and the new PTY's first output, in whatever order they interleave.
    let (infos, output) = within("the reconnect", async {
        let (mut infos, mut output) = (Vec::new(), None);
        while output.is_none() || !infos.iter().any(|m: &String| m == "Reconnected") {
            let frame = next_json(&mut ws).await.expect("frames before the close");
            match frame["type"].as_str() {
                Some("info") => infos.push(frame["message"].as_str().unwrap_or_default().into()),
                Some("output") => output = Some(frame),
                _ => {}
            }
        }
        (infos, output.unwrap_or_default())
    })
    .await;
    assert!(
        infos.iter().any(|m| m.contains("lost; reconnecting")),
        "{infos:?}"
    );
    assert!(d.vps.connections() > connections, "a new SSH connection");
    assert_eq!(output["data"], banner.as_str(), "{output}");
    let after = output["offset"].as_u64().expect("offset");
    assert_eq!(
        after - banner.len() as u64,
        before,
        "the stream continues where it was: {output}"
    );

    // The ring outlived the old connection: a resume from before the drop gets exactly the rest.
    drop(ws);
    let resume = format!("&terminal_id={terminal_id}&offset={before}");
    let (mut ws, again) = within("the resume", open_terminal(s, me, env, &resume)).await;
    assert_eq!(again["terminal_id"], terminal_id.as_str(), "{again}");
    assert_eq!(again["offset"], before, "{again}");
    let replay = within("the replay", next_json(&mut ws))
        .await
        .expect("the replay");
    assert_eq!(replay["type"], "output", "{replay}");
    assert_eq!(replay["data"], banner.as_str(), "{replay}");
    assert_eq!(replay["offset"], after, "{replay}");
    d.s.stop().await;
}

/// Read output frames until `needle` shows, keeping only a tail (a flood is large).
async fn drain_until(ws: &mut Ws, needle: &str) {
    let mut tail = String::new();
    while !tail.contains(needle) {
        let Some(f) = next_json(ws).await else {
            panic!("closed before {needle}")
        };
        if f["type"] == "output" {
            let data = f["data"].as_str().expect("data");
            let cut = (tail.len().saturating_sub(64)..=tail.len())
                .find(|&i| tail.is_char_boundary(i))
                .unwrap_or(0);
            tail = format!("{}{data}", &tail[cut..]);
        }
    }
}

/// Terminals of one environment are channels on one SSH connection, and russh stalls a whole
/// connection while one of its channels is not read. The machine here has no tmux, so every
/// byte a shell prints reaches the server (tmux would redraw instead of sending a flood). A
/// flood in terminal A whose client reads nothing — far more than the queues between the
/// server and A's client hold — must not stop terminal B on the same connection; A's client
/// later gets the rest or a skip to the current screen. Then the connection drops: it is made
/// again once for both terminals.
async fn terminals_share_a_connection_and_a_stalled_client_holds_back_no_other(backend: Backend) {
    let sim_config = SimConfig::default();
    let sim = ContaboSim::start(sim_config.clone()).await;
    let vps = FakeVps::start(
        &sim,
        FakeVpsConfig {
            without_tmux: true,
            ..FakeVpsConfig::default()
        },
    )
    .await;
    let s = TestServer::start_with(backend, |c| {
        support::contabo_sim::use_simulator(c, &sim, &sim_config, vps.port);
    })
    .await;
    let me = s.register("shar").await;
    let env = running_env(&s, &me, "shared").await;
    let (mut a, _) = within("open A", open_terminal(&s, &me, &env, "&cols=120&rows=40")).await;
    let (mut b, _) = within("open B", open_terminal(&s, &me, &env, "")).await;
    assert_eq!(
        s.ssh_connections().await,
        1,
        "two terminals, one connection"
    );

    // 30 MB through A, whose client reads nothing (TCP buffers, the client queue and russh's
    // channel queue together hold a few MiB).
    input(
        &mut a,
        "head -c 30000000 /dev/zero | tr '\\0' y | fold -w 100; echo flood-$((6*7))\r",
    )
    .await;
    for i in 0..5 {
        input(&mut b, &format!("echo other-$(({i}+1000))\r")).await;
        within(
            "B answers during A's flood",
            read_until(&mut b, &format!("other-{}", i + 1000)),
        )
        .await;
    }
    within("A catches up", drain_until(&mut a, "flood-42")).await;
    input(&mut a, "echo after-$((2+2))\r").await;
    within("A answers", read_until(&mut a, "after-4")).await;

    // The connection drops: both terminals reconnect, on one new connection.
    let served = vps.connections();
    vps.cut();
    for ws in [&mut a, &mut b] {
        within("the reconnect", async {
            loop {
                let frame = next_json(ws).await.expect("frames before the close");
                if frame["type"] == "info" && frame["message"] == "Reconnected" {
                    return;
                }
            }
        })
        .await;
    }
    assert_eq!(vps.connections(), served + 1, "reconnected as one");
    assert_eq!(s.ssh_connections().await, 1);
    input(&mut b, "echo back-$((3+4))\r").await;
    within("B answers again", read_until(&mut b, "back-7")).await;
    s.stop().await;
}

/// A machine that refuses the `command -v tmux` probe (as an SSH server at its session limit
/// does) has not said it lacks tmux: the open fails plainly (the app retries), and a reconnect
/// whose probe is refused tries again and comes back inside tmux — never a plain shell with a
/// "tmux is not installed" notice, whose work the next disconnect would lose.
async fn a_refused_tmux_probe_is_never_taken_for_no_tmux(backend: Backend) {
    let sim_config = SimConfig::default();
    let sim = ContaboSim::start(sim_config.clone()).await;
    let vps = FakeVps::start(&sim, FakeVpsConfig::default()).await;
    let s = TestServer::start_with(backend, |c| {
        support::contabo_sim::use_simulator(c, &sim, &sim_config, vps.port);
    })
    .await;
    let me = s.register("prob").await;
    let env = running_env(&s, &me, "probe").await;

    vps.refuse_tmux_probes(1);
    let path = format!("/api/v1/ws/terminal/{env}?token={}", me.access);
    let mut ws = connect(&s, &path).await;
    let error = within("the refused open", next_error(&mut ws)).await;
    assert!(
        error.starts_with("Cannot open a terminal") && error.contains("whether tmux is installed"),
        "{error}"
    );
    assert_eq!(within("the close", close_of(&mut ws)).await.0, 1011);

    // `${TMUX:+y}` is `y` only inside tmux; the echoed command line never contains the needle.
    let in_tmux = "echo t-${TMUX:+y}es\r";
    let (mut ws, _) = within("the next open", open_terminal(&s, &me, &env, "")).await;
    input(&mut ws, in_tmux).await;
    within("a shell inside tmux", read_until(&mut ws, "t-yes")).await;
    input(&mut ws, "kept=4$((1+1)); echo set-$kept\r").await;
    within("the shell variable", read_until(&mut ws, "set-42")).await;

    vps.refuse_tmux_probes(1);
    vps.cut();
    let infos = within("the reconnect", async {
        let mut infos = Vec::new();
        while !infos.iter().any(|m: &String| m == "Reconnected") {
            let frame = next_json(&mut ws).await.expect("frames before the close");
            assert_ne!(frame["type"], "error", "{frame}");
            if frame["type"] == "info" {
                infos.push(frame["message"].as_str().unwrap_or_default().to_string());
            }
        }
        infos
    })
    .await;
    assert!(
        !infos.iter().any(|m| m.contains("tmux is not installed")),
        "{infos:?}"
    );
    assert!(
        vps.commands()
            .iter()
            .filter(|c| c.contains("command -v tmux"))
            .count()
            >= 4,
        "refused probes were asked again: {:?}",
        vps.commands()
    );
    // The shell of before the drop, kept by tmux.
    input(&mut ws, "echo kept-$kept\r").await;
    within(
        "the same shell after the reconnect",
        read_until(&mut ws, "kept-42"),
    )
    .await;
    s.stop().await;
}
