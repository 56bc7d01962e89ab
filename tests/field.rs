//! Terminals as the mobile app really uses them: it reconnects without a `terminal_id` (sixty
//! times a minute in a bad tunnel), rotates while offline, switches from Wi-Fi to 4G, splits an
//! emoji across frames, and sends the odd malformed frame or query parameter.

mod support;

use std::num::NonZeroU16;

use futures_util::SinkExt;
use serde_json::Value;
use support::terminal::{
    Ws, close_of, input, next_json, open_terminal, ping_pong, read_until, running_env, ws_url,
};
use support::{Backend, Session, TestServer, find_actor, session_id_of};
use tokio_tungstenite::tungstenite::Message;

on_both_backends!(
    a_reconnect_storm_reattaches_and_stays_within_the_cap,
    a_resume_applies_the_size_it_asks_for,
    a_resume_from_another_address_works,
    invalid_messages_are_refused_and_split_emoji_arrive_whole,
    a_malformed_query_parameter_is_named_not_blamed_on_the_token,
    lost_output_is_repainted_exactly_from_the_server_screen,
    a_reattach_without_offset_is_painted_by_the_server_and_terminals_are_listed,
    a_node_at_capacity_refuses_new_terminals_at_once_and_plainly,
    a_repainted_client_keeps_up_with_tmux_scrolling_above_its_status_line,
    at_node_capacity_a_session_gets_the_slot_of_its_own_evicted_terminal,
    parallel_opens_of_one_session_get_a_terminal_each,
);

/// The terminals a session holds, as ops see them.
async fn terminals_of(s: &TestServer, admin: &Session, me: &Session) -> usize {
    let tree = s.actor_tree(admin).await;
    let session = format!("session:{}", session_id_of(&me.access));
    find_actor(&tree, &session)
        .and_then(|n| n["children"].as_array().cloned())
        .map_or(0, |c| c.iter().filter(|t| t["kind"] == "terminal").count())
}

/// The app's reconnects never name a terminal: each one gets the session's detached terminal
/// back, so fifty of them in a row are fifty welcomes, never a refusal, and the session never
/// holds more than its cap (here 4).
async fn a_reconnect_storm_reattaches_and_stays_within_the_cap(backend: Backend) {
    let cap = 4;
    let s = TestServer::start_with(backend, |c| c.terminals.max_terminals_per_session = cap).await;
    let admin = s.admin("ops").await;
    let me = s.register("stormy").await;
    let env = running_env(&s, &me, "tunnel").await;
    let mut ids = std::collections::HashSet::new();
    for round in 0..50 {
        let (mut ws, welcome) = open_terminal(&s, &me, &env, "").await;
        ids.insert(welcome["terminal_id"].as_str().expect("id").to_string());
        if round % 10 == 0 {
            input(&mut ws, &format!("echo round-$(({round}+1000))\r")).await;
            read_until(&mut ws, &format!("round-{}", round + 1000)).await;
        }
        ws.close(None).await.expect("close");
        let held = terminals_of(&s, &admin, &me).await;
        assert!(held <= cap, "round {round}: {held} terminals held");
    }
    assert!(
        ids.len() < 50,
        "reconnects re-attach instead of opening new terminals: {} ids",
        ids.len()
    );
    s.stop().await;
}

/// `stty size` as the shell sees it, asked until it shows `rows cols`-ish (tmux's status line may
/// take a row; tmux applies sizes asynchronously).
async fn shell_size_becomes(ws: &mut Ws, cols: u32) -> String {
    let mut seen = String::new();
    for round in 0..50 {
        input(ws, &format!("stty size; echo sz-$(({round}+2000))\r")).await;
        let (text, _) = read_until(ws, &format!("sz-{}", round + 2000)).await;
        seen = text;
        if seen.contains(&format!(" {cols}\r")) {
            break;
        }
    }
    seen
}

/// A phone rotated while offline resumes with its new size: the PTY takes it.
async fn a_resume_applies_the_size_it_asks_for(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("rotor").await;
    let env = running_env(&s, &me, "turn").await;
    let (mut ws, welcome) = open_terminal(&s, &me, &env, "&cols=80&rows=24").await;
    let tid = welcome["terminal_id"].as_str().expect("id").to_string();
    input(&mut ws, "echo up-$((1+1))\r").await;
    let (_, offset) = read_until(&mut ws, "up-2").await;
    drop(ws);
    let (mut ws, welcome) = open_terminal(
        &s,
        &me,
        &env,
        &format!("&terminal_id={tid}&offset={offset}&cols=57&rows=31"),
    )
    .await;
    assert_eq!(welcome["terminal_id"], tid.as_str(), "the same terminal");
    let seen = shell_size_becomes(&mut ws, 57).await;
    assert!(
        seen.contains("31 57") || seen.contains("30 57"),
        "the resume's size applies: {seen:?}"
    );
    s.stop().await;
}

/// Connect a terminal WebSocket from a given loopback source address.
async fn connect_from(s: &TestServer, source: &str, path: &str) -> Ws {
    let addr = s.running().addr;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("source"))
        .expect("bind the source address");
    let stream = socket.connect(addr).await.expect("connect");
    let (ws, _) = tokio_tungstenite::client_async(
        ws_url(s, path),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .expect("websocket");
    ws
}

async fn welcome_of(ws: &mut Ws) -> Value {
    loop {
        let frame = next_json(ws).await.expect("a welcome");
        if frame["type"] == "welcome" {
            return frame;
        }
        assert_eq!(
            frame["type"], "info",
            "only notices before the welcome: {frame}"
        );
    }
}

/// Wi-Fi to 4G: the resume comes from another address and still gets exactly the missed bytes.
async fn a_resume_from_another_address_works(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("roamer").await;
    let env = running_env(&s, &me, "roam").await;
    let path = format!("/api/v1/ws/terminal/{env}?token={}", me.access);
    let mut wifi = connect_from(&s, "127.0.0.1", &path).await;
    let tid = welcome_of(&mut wifi).await["terminal_id"]
        .as_str()
        .expect("id")
        .to_string();
    input(&mut wifi, "echo wifi-$((2*21))\r").await;
    let (_, offset) = read_until(&mut wifi, "wifi-42").await;
    input(&mut wifi, "echo while-$((3*3))-away\r").await;
    drop(wifi);
    let mut cell = connect_from(
        &s,
        "127.0.0.2",
        &format!("{path}&terminal_id={tid}&offset={offset}"),
    )
    .await;
    let welcome = welcome_of(&mut cell).await;
    assert_eq!(welcome["terminal_id"], tid.as_str());
    assert_eq!(welcome["offset"], offset);
    read_until(&mut cell, "while-9-away").await;
    s.stop().await;
}

/// A JSON message that is not a valid one is answered with an error and never typed; an emoji
/// split into UTF-16 halves across two frames reaches the shell whole.
async fn invalid_messages_are_refused_and_split_emoji_arrive_whole(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("typist").await;
    let env = running_env(&s, &me, "keys").await;
    let (mut ws, _) = open_terminal(&s, &me, &env, "").await;
    for bad in [
        r#"{"type":"input","data":5}"#,
        r#"{"type":"resize","cols":"wide","rows":24}"#,
        r#"{"type":"input","data":"echo typed-$((7*6))"#,
    ] {
        ws.send(Message::text(bad)).await.expect("send");
        loop {
            let frame = next_json(&mut ws).await.expect("an answer");
            if frame["type"] == "error" {
                break;
            }
            // tmux's first screen may still be arriving; nothing typed may be in it.
            assert!(
                frame["type"] != "output"
                    || !frame["data"].as_str().unwrap_or_default().contains("typed"),
                "nothing reaches the shell: {frame}"
            );
        }
    }
    // The halves of U+1F600 in two frames, as some clients split them.
    ws.send(Message::text(r#"{"type":"input","data":"echo \"[\ud83d"}"#))
        .await
        .expect("send");
    ws.send(Message::text(r#"{"type":"input","data":"\ude00]\"\r"}"#))
        .await
        .expect("send");
    let (text, _) = read_until(&mut ws, "[\u{1F600}]").await;
    assert!(
        !text.contains("typed-42"),
        "the malformed input was never run: {text:?}"
    );
    ping_pong(&mut ws).await;
    s.stop().await;
}

/// A bad optional parameter is named; the token is not blamed.
async fn a_malformed_query_parameter_is_named_not_blamed_on_the_token(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("queried").await;
    let env = running_env(&s, &me, "params").await;
    for (extra, name) in [
        ("&cols=abc", "cols"),
        ("&rows=-5", "rows"),
        ("&offset=x", "offset"),
        ("&terminal_id=not-a-uuid", "terminal_id"),
    ] {
        let mut ws = support::terminal::connect(
            &s,
            &format!("/api/v1/ws/terminal/{env}?token={}{extra}", me.access),
        )
        .await;
        let (code, reason) = close_of(&mut ws).await;
        assert_eq!(code, 1008, "{extra}");
        assert_eq!(
            reason,
            format!("Invalid query parameter: {name}"),
            "{extra}"
        );
    }
    let mut logs = support::terminal::connect(
        &s,
        &format!("/api/v1/ws/logs/{env}?token={}&follow=maybe", me.access),
    )
    .await;
    assert_eq!(
        close_of(&mut logs).await,
        (1008, "Invalid query parameter: follow".into())
    );
    // `follow=0` is a valid spelling: history, then a normal close.
    let mut history = support::terminal::connect(
        &s,
        &format!("/api/v1/ws/logs/{env}?token={}&follow=0", me.access),
    )
    .await;
    assert_eq!(close_of(&mut history).await.0, 1000);
    s.stop().await;
}

/// A client-side terminal emulator (the app's xterm.js, here `vt100`).
fn emulator(cols: u16, rows: u16) -> vt100::Parser {
    vt100::Parser::new(
        NonZeroU16::new(rows).expect("rows"),
        NonZeroU16::new(cols).expect("cols"),
        0,
    )
}

/// Feed output frames into `screen` until the stream reaches `offset`; returns where it is.
async fn feed_until(ws: &mut Ws, screen: &mut vt100::Parser, mut at: u64, offset: u64) -> u64 {
    while at < offset {
        let frame = next_json(ws).await.expect("output before close");
        if frame["type"] == "output" {
            screen.process(frame["data"].as_str().expect("data").as_bytes());
            at = frame["offset"].as_u64().expect("offset");
        }
    }
    at
}

/// The environment's terminals as `GET /environments/{id}/terminals` lists them.
async fn listed(s: &TestServer, me: &Session, env: &str) -> Vec<Value> {
    let (status, body) = s
        .get(
            &format!("/api/v1/environments/{env}/terminals"),
            Some(&me.access),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body.as_array().expect("an array of terminals").clone()
}

/// Read `ws` into `screen` until the terminal is quiet: the stream has reached the offset the
/// server lists for it, twice in a row. Returns that offset.
async fn settle(
    s: &TestServer,
    me: &Session,
    env: &str,
    ws: &mut Ws,
    screen: &mut vt100::Parser,
    mut at: u64,
) -> u64 {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "never quiet");
        let server = listed(s, me, env).await[0]["offset"]
            .as_u64()
            .expect("offset");
        at = feed_until(ws, screen, at, server).await;
        if at == server && listed(s, me, env).await[0]["offset"] == server {
            return at;
        }
    }
}

fn same_screen(seen: &vt100::Screen, painted: &vt100::Screen) {
    assert_eq!(seen.contents(), painted.contents());
    assert_eq!(seen.cursor_position(), painted.cursor_position());
    assert_eq!(seen.alternate_screen(), painted.alternate_screen());
    assert_eq!(seen.hide_cursor(), painted.hide_cursor());
    let (rows, cols) = seen.size();
    for r in 0..rows.get() {
        for c in 0..cols.get() {
            assert_eq!(seen.cell(r, c), painted.cell(r, c), "cell {r},{c}");
        }
    }
}

/// A resume whose bytes have left the ring gets the screen painted by the server: cell for cell
/// (text, colours, cursor) what a client that saw every byte shows.
async fn lost_output_is_repainted_exactly_from_the_server_screen(backend: Backend) {
    let s = TestServer::start_with(backend, |c| c.terminals.ring_bytes = 4096).await;
    let me = s.register("painter").await;
    let env = running_env(&s, &me, "canvas").await;
    let (cols, rows) = (70u16, 18u16);
    let (mut ws, welcome) =
        open_terminal(&s, &me, &env, &format!("&cols={cols}&rows={rows}")).await;
    let tid = welcome["terminal_id"].as_str().expect("id").to_string();
    // A client that sees every byte (a new terminal streams from its first byte).
    let mut seen = emulator(cols, rows);
    // No status line: tmux would redraw its clock at any time.
    input(&mut ws, "tmux set -g status off; clear\r").await;
    input(
        &mut ws,
        "seq 1 2500 | tr '\\n' ' '; printf '\\n\\033[1;31mred\\033[0m \\033[4mdone-%s\\033[0m\\n' $((6*7))\r",
    )
    .await;
    let mut at = 0;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !seen.screen().contents().contains("done-42") {
        assert!(tokio::time::Instant::now() < deadline, "never saw done-42");
        at = feed_until(&mut ws, &mut seen, at, at + 1).await;
    }
    let at = settle(&s, &me, &env, &mut ws, &mut seen, at).await;
    assert!(at > 4096, "the ring (4 KiB) has lost the start: {at}");
    drop(ws);

    let (mut ws, welcome) = open_terminal(
        &s,
        &me,
        &env,
        &format!("&terminal_id={tid}&offset=1&cols={cols}&rows={rows}"),
    )
    .await;
    assert_eq!(welcome["terminal_id"], tid.as_str());
    let notice = next_json(&mut ws).await.expect("notice");
    assert_eq!(notice["type"], "info", "{notice}");
    let repaint = next_json(&mut ws).await.expect("repaint");
    assert_eq!(repaint["type"], "output", "{repaint}");
    assert_eq!(repaint["offset"], at, "painted as of the end of the stream");
    let mut painted = emulator(cols, rows);
    painted.process(repaint["data"].as_str().expect("data").as_bytes());
    same_screen(seen.screen(), painted.screen());
    assert!(painted.screen().contents().contains("done-42"));
    let red = painted
        .screen()
        .rows(0, cols)
        .position(|r| r.starts_with("red done-42"))
        .expect("the red line") as u16;
    assert_eq!(
        painted.screen().cell(red, 0).expect("cell").fgcolor(),
        vt100::Color::Idx(1)
    );
    assert!(painted.screen().cell(red, 0).expect("cell").bold());
    assert!(painted.screen().cell(red, 4).expect("cell").underline());
    s.stop().await;
}

/// The app's reconnect (no terminal id, nothing on its screen) gets the screen from the server
/// right after the welcome; `GET /environments/{id}/terminals` shows it as text, to its owner
/// only.
async fn a_reattach_without_offset_is_painted_by_the_server_and_terminals_are_listed(
    backend: Backend,
) {
    let s = TestServer::start(backend).await;
    let me = s.register("glancer").await;
    let other = s.register("neighbour").await;
    let env = running_env(&s, &me, "glance").await;
    assert!(listed(&s, &me, &env).await.is_empty(), "none yet");
    let (mut ws, welcome) = open_terminal(&s, &me, &env, "&cols=64&rows=20").await;
    let tid = welcome["terminal_id"].as_str().expect("id").to_string();
    input(&mut ws, "echo shown-$((40+2))\r").await;
    read_until(&mut ws, "shown-42").await;

    let list = listed(&s, &me, &env).await;
    assert_eq!(list.len(), 1, "{list:?}");
    let t = &list[0];
    assert_eq!(t["terminal_id"], tid.as_str());
    assert_eq!(t["attached"], true);
    assert_eq!(
        (t["cols"].as_u64(), t["rows"].as_u64()),
        (Some(64), Some(20))
    );
    let text = t["screen"].as_str().expect("screen text");
    assert!(text.contains("shown-42"), "{text:?}");
    assert!(!text.contains('\x1b'), "plain text: {text:?}");
    let (status, body) = s
        .get(
            &format!("/api/v1/environments/{env}/terminals"),
            Some(&other.access),
        )
        .await;
    assert_eq!(status, 404, "another user's environment: {body}");

    drop(ws);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while listed(&s, &me, &env).await[0]["attached"] != false {
        assert!(tokio::time::Instant::now() < deadline, "never detached");
        tokio::task::yield_now().await;
    }
    let (mut ws, welcome) = open_terminal(&s, &me, &env, "&cols=64&rows=20").await;
    assert_eq!(welcome["terminal_id"], tid.as_str(), "re-attached");
    let repaint = next_json(&mut ws).await.expect("repaint");
    assert_eq!(repaint["type"], "output", "{repaint}");
    let data = repaint["data"].as_str().expect("data");
    assert!(
        data.starts_with("\u{1b}[?1049"),
        "painted by the server, not redrawn by tmux: {data:?}"
    );
    let mut painted = emulator(64, 20);
    painted.process(data.as_bytes());
    assert!(painted.screen().contents().contains("shown-42"));
    s.stop().await;
}

/// At `terminals.max_terminals_per_node` a new terminal is refused at once with 1013 and a plain
/// reason (another user's, so no per-user or per-session cap is involved); re-attaching to the
/// live one still works, and its end frees the slot.
async fn a_node_at_capacity_refuses_new_terminals_at_once_and_plainly(backend: Backend) {
    let s = TestServer::start_with(backend, |c| c.terminals.max_terminals_per_node = 1).await;
    let me = s.register("first").await;
    let late = s.register("second").await;
    let env = running_env(&s, &me, "only").await;
    let other_env = running_env(&s, &late, "wanted").await;
    let (mut ws, welcome) = open_terminal(&s, &me, &env, "").await;
    let tid = welcome["terminal_id"].as_str().expect("id").to_string();
    input(&mut ws, "echo held-$((3*3))\r").await;
    let (_, offset) = read_until(&mut ws, "held-9").await;

    let mut refused = support::terminal::connect(
        &s,
        &format!("/api/v1/ws/terminal/{other_env}?token={}", late.access),
    )
    .await;
    let (code, reason) = close_of(&mut refused).await;
    assert_eq!((code, reason.as_str()), (1013, "Server busy, try again"));

    drop(ws);
    let (mut ws, welcome) = open_terminal(
        &s,
        &me,
        &env,
        &format!("&terminal_id={tid}&offset={offset}"),
    )
    .await;
    assert_eq!(
        welcome["terminal_id"],
        tid.as_str(),
        "re-attaching is never refused"
    );
    // The shell exits: the terminal ends and its slot is free again.
    input(&mut ws, "exit\r").await;
    assert_eq!(close_of(&mut ws).await.0, 1000);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut ws = support::terminal::connect(
            &s,
            &format!("/api/v1/ws/terminal/{other_env}?token={}", late.access),
        )
        .await;
        let first = next_json(&mut ws).await;
        if first.as_ref().is_some_and(|f| f["type"] == "info") {
            assert_eq!(
                next_json(&mut ws).await.expect("welcome")["type"],
                "welcome"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::task::yield_now().await;
    }
    s.stop().await;
}

/// The screen's rows as the list shows them: trimmed, trailing blank rows dropped.
fn text_of(screen: &vt100::Screen, cols: u16) -> Vec<String> {
    let mut rows: Vec<String> = screen
        .rows(0, cols)
        .map(|r| r.trim_end().to_owned())
        .collect();
    while rows.last().is_some_and(|r| r.is_empty()) {
        rows.pop();
    }
    rows
}

/// tmux scrolls its pane above the status line with a scroll region it sets once and then
/// assumes (it caches what it told the terminal). A client painted by the server must be left
/// with that region, or tmux's next line feeds land on the status line and the screens part.
async fn a_repainted_client_keeps_up_with_tmux_scrolling_above_its_status_line(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("scroller").await;
    let env = running_env(&s, &me, "scrolling").await;
    let (cols, rows) = (50u16, 12u16);
    let (mut ws, welcome) =
        open_terminal(&s, &me, &env, &format!("&cols={cols}&rows={rows}")).await;
    let tid = welcome["terminal_id"].as_str().expect("id").to_string();
    // The status line stays (the default); its clock must not tick during the test.
    input(
        &mut ws,
        "tmux set -g status-right ''; seq 1 40; echo first-$((6*7))\r",
    )
    .await;
    read_until(&mut ws, "first-42").await;
    drop(ws);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while listed(&s, &me, &env).await[0]["attached"] != false {
        assert!(tokio::time::Instant::now() < deadline, "never detached");
        tokio::task::yield_now().await;
    }
    // The app's reconnect: painted by the server, then live output that scrolls the pane.
    let (mut ws, welcome) =
        open_terminal(&s, &me, &env, &format!("&cols={cols}&rows={rows}")).await;
    assert_eq!(welcome["terminal_id"], tid.as_str(), "re-attached");
    let at = welcome["offset"].as_u64().expect("offset");
    let mut client = emulator(cols, rows);
    input(&mut ws, "seq 100 130; echo second-$((6*7))\r").await;
    let mut at = at;
    while !client.screen().contents().contains("second-42") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw second-42"
        );
        at = feed_until(&mut ws, &mut client, at, at + 1).await;
    }
    settle(&s, &me, &env, &mut ws, &mut client, at).await;
    let server: Vec<String> = listed(&s, &me, &env).await[0]["screen"]
        .as_str()
        .expect("screen")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        text_of(client.screen(), cols),
        server,
        "the client's screen is the server's"
    );
    s.stop().await;
}

/// A full node does not refuse a user because of their own abandoned terminal: the terminal the
/// session evicts to make room gives its node slot to the new one.
async fn at_node_capacity_a_session_gets_the_slot_of_its_own_evicted_terminal(backend: Backend) {
    let s = TestServer::start_with(backend, |c| {
        c.terminals.max_terminals_per_node = 1;
        c.terminals.max_terminals_per_session = 1;
    })
    .await;
    let me = s.register("hopper").await;
    let env = running_env(&s, &me, "hop").await;
    let (mut ws, welcome) = open_terminal(&s, &me, &env, "").await;
    let old = welcome["terminal_id"].as_str().expect("id").to_string();
    input(&mut ws, "echo there-$((3*3))\r").await;
    read_until(&mut ws, "there-9").await;
    drop(ws);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while listed(&s, &me, &env).await[0]["attached"] != false {
        assert!(tokio::time::Instant::now() < deadline, "never detached");
        tokio::task::yield_now().await;
    }
    // A resume of a terminal that has expired: nothing to re-attach, so a new terminal, for
    // which the detached one is evicted.
    let gone = "00000000-0000-4000-8000-000000000000";
    let (mut ws, welcome) =
        open_terminal(&s, &me, &env, &format!("&terminal_id={gone}&offset=5")).await;
    assert_ne!(welcome["terminal_id"], old.as_str(), "a new terminal");
    input(&mut ws, "echo here-$((3*3))\r").await;
    read_until(&mut ws, "here-9").await;
    let list = listed(&s, &me, &env).await;
    assert_eq!(list.len(), 1, "the old one was evicted: {list:?}");
    s.stop().await;
}

/// A double tap (or two tabs of one login) opens terminals in parallel without a `terminal_id`:
/// each gets a terminal of its own. A terminal just started is the open's from birth, so a
/// parallel open is never handed it as "the session's detached terminal" (which would replace
/// one of the two WebSockets with 4000).
async fn parallel_opens_of_one_session_get_a_terminal_each(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("twin").await;
    let env = running_env(&s, &me, "twins").await;
    // Nine (below the per-user WebSocket cap of 10), staggered a little, so opens land while earlier ones are between starting and attaching.
    let opens = (0..9u64).map(|i| {
        let (s, me, env) = (&s, &me, &env);
        async move {
            tokio::time::sleep(std::time::Duration::from_millis(i * 7)).await;
            open_terminal(s, me, env, "").await
        }
    });
    let mut opened = futures_util::future::join_all(opens).await;
    let mut ids: Vec<String> = opened
        .iter()
        .map(|(_, w)| w["terminal_id"].as_str().expect("id").to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 9, "nine terminals: {ids:?}");
    // Every WebSocket is still its terminal's: each one answers (a replaced one has closed).
    for (i, (ws, _)) in opened.iter_mut().enumerate() {
        input(ws, &format!("echo twin-$(({i}+100))\r")).await;
        read_until(ws, &format!("twin-{}", i + 100)).await;
    }
    s.stop().await;
}
