//! Terminals as the mobile app really uses them: it reconnects without a `terminal_id` (sixty
//! times a minute in a bad tunnel), rotates while offline, switches from Wi-Fi to 4G, splits an
//! emoji across frames, and sends the odd malformed frame or query parameter.

mod support;

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
            assert_ne!(
                frame["type"], "output",
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
