//! WebSocket terminal helpers shared by the terminal tests.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::{Session, TestServer};

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Generous bound for anything a terminal test waits on.
pub const WAIT: Duration = Duration::from_secs(30);

pub async fn running_env(s: &TestServer, me: &Session, name: &str) -> String {
    let env = s.create_env(me, name, "ubuntu").await;
    let id = env["id"].as_str().expect("id").to_string();
    s.wait_status(me, &id, "running").await;
    id
}

pub fn ws_url(s: &TestServer, path: &str) -> String {
    s.url(path).replacen("http://", "ws://", 1)
}

pub async fn connect(s: &TestServer, path: &str) -> Ws {
    let (ws, resp) = tokio_tungstenite::connect_async(ws_url(s, path))
        .await
        .expect("websocket connects");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

pub async fn open_terminal(s: &TestServer, me: &Session, env: &str, extra: &str) -> (Ws, Value) {
    let mut ws = connect(
        s,
        &format!("/api/v1/ws/terminal/{env}?token={}{extra}", me.access),
    )
    .await;
    // Feedback while SSH connects comes first (the app ignores it), then the welcome.
    let connecting = next_json(&mut ws).await.expect("connecting");
    assert_eq!(connecting["type"], "info", "{connecting}");
    assert!(
        connecting["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Connecting to ")),
        "{connecting}"
    );
    let welcome = next_json(&mut ws).await.expect("welcome");
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

/// The next JSON text frame (None when the socket closed).
pub async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")?;
        match msg {
            Ok(Message::Text(t)) => {
                return Some(serde_json::from_str(t.as_str()).expect("JSON frame"));
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// The close frame (code, reason) that ends the socket, skipping other frames.
pub async fn close_of(ws: &mut Ws) -> (u16, String) {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("closes in time")
        {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return (0, String::new()),
            Some(Ok(_)) => {}
        }
    }
}

pub async fn input(ws: &mut Ws, data: &str) {
    ws.send(Message::text(
        json!({ "type": "input", "data": data }).to_string(),
    ))
    .await
    .expect("send");
}

/// Send a `ping` and read until its `pong`: proves the server has admitted this connection.
pub async fn ping_pong(ws: &mut Ws) {
    ws.send(Message::text(json!({ "type": "ping" }).to_string()))
        .await
        .expect("send ping");
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a pong in time");
        match msg {
            Some(Ok(Message::Text(t))) => {
                let frame: Value = serde_json::from_str(t.as_str()).expect("JSON frame");
                if frame["type"] == "pong" {
                    return;
                }
            }
            Some(Ok(Message::Close(f))) => panic!("closed before the pong: {f:?}"),
            Some(Err(e)) => panic!("failed before the pong: {e}"),
            None => panic!("ended before the pong"),
            Some(Ok(_)) => {}
        }
    }
}

/// Read output frames until the joined text contains `needle`; returns the text and last offset.
pub async fn read_until(ws: &mut Ws, needle: &str) -> (String, u64) {
    let mut text = String::new();
    let mut offset = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !text.contains(needle) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw {needle:?} in {text:?}"
        );
        let Some(frame) = next_json(ws).await else {
            panic!("closed before {needle:?}: {text:?}")
        };
        if frame["type"] == "output" {
            text.push_str(frame["data"].as_str().expect("data"));
            offset = frame["offset"].as_u64().expect("offset");
        }
    }
    (text, offset)
}

/// Terminal output without its escape sequences (tmux redraws lines with them).
pub fn strip_escapes(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('[') => {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            Some('(' | ')') => {
                chars.next();
            }
            _ => {}
        }
    }
    out
}
