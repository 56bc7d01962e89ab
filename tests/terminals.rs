//! Terminals and live streams through the real server: a real WebSocket client, real SSH to the
//! local provider's server, tmux in the environment.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Backend, Session, TestServer};
use tokio_tungstenite::tungstenite::Message;

use support::terminal::*;

on_both_backends!(
    echo_resize_and_tmux_persistence,
    resume_replays_exactly_the_missing_bytes,
    multibyte_output_arrives_intact,
    rejections_close_with_1008_and_a_reason,
    hostile_frames_never_hurt_the_server,
    logout_and_delete_close_live_terminals,
    logs_and_events_streams,
    replaced_lost_exit_ops_view_and_audit,
    terminals_per_session_are_bounded,
    a_closed_connection_is_not_counted_against_its_reconnect,
    ten_terminals_of_a_local_environment_share_one_connection,
);

async fn echo_resize_and_tmux_persistence(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("tess").await;
    let env = running_env(&s, &me, "shell").await;
    let (mut ws, welcome) = open_terminal(&s, &me, &env, "&cols=100&rows=30").await;
    assert_eq!(welcome["message"], "Connected to shell");
    assert_eq!(welcome["environment"]["id"], env.as_str());
    assert_eq!(welcome["offset"], 0);
    assert!(welcome["terminal_id"].is_string());
    input(&mut ws, "echo hello-$((6*7))\r").await;
    read_until(&mut ws, "hello-42").await;
    ws.send(Message::text(
        json!({ "type": "resize", "cols": 132, "rows": 43 }).to_string(),
    ))
    .await
    .expect("send");
    // tmux applies a resize asynchronously: ask until the shell sees it.
    let mut seen = String::new();
    for round in 0..50 {
        input(&mut ws, &format!("stty size; echo sz-$(({round}+1000))\r")).await;
        let (text, _) = read_until(&mut ws, &format!("sz-{}", round + 1000)).await;
        seen = text;
        if seen.contains(" 132\r") {
            break;
        }
    }
    // tmux's status line takes one of the 43 rows.
    assert!(
        seen.contains("42 132") || seen.contains("43 132"),
        "{seen:?}"
    );
    ws.send(Message::text(r#"{"type":"ping"}"#))
        .await
        .expect("send");
    loop {
        let f = next_json(&mut ws).await.expect("frame");
        if f["type"] == "pong" {
            break;
        }
    }
    input(&mut ws, "export DP_VAR=persist$((1+1))ed\r").await;
    input(&mut ws, "echo set-$DP_VAR\r").await;
    read_until(&mut ws, "set-persist2ed").await;
    ws.close(None).await.expect("close");
    drop(ws);

    // A brand-new terminal (another login, so not a re-attach of the first) lands in the same
    // tmux session: the shell and its variable survived.
    let (_, login) = s.login("tess", support::PASSWORD).await;
    let me = Session::from_auth(&login);
    let (mut ws, welcome2) = open_terminal(&s, &me, &env, "").await;
    assert_ne!(welcome2["terminal_id"], welcome["terminal_id"]);
    input(&mut ws, "echo again-$DP_VAR\r").await;
    read_until(&mut ws, "again-persist2ed").await;
    ws.close(None).await.ok();
    s.stop().await;
}

async fn resume_replays_exactly_the_missing_bytes(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("rudy").await;
    let env = running_env(&s, &me, "resume").await;
    let (mut ws, welcome) = open_terminal(&s, &me, &env, "").await;
    let terminal_id = welcome["terminal_id"].as_str().expect("id").to_string();
    input(
        &mut ws,
        "for i in $(seq 1 150); do echo n$i.; sleep 0.01; done; echo fini$((1))shed\r",
    )
    .await;
    // Read until the first numbers show, then drop the connection mid-stream.
    let (first, offset) = read_until(&mut ws, "n20.").await;
    drop(ws);
    let (mut ws, welcome) = open_terminal(
        &s,
        &me,
        &env,
        &format!("&terminal_id={terminal_id}&offset={offset}"),
    )
    .await;
    assert_eq!(
        welcome["terminal_id"],
        terminal_id.as_str(),
        "same terminal resumed"
    );
    assert_eq!(
        welcome["offset"], offset,
        "the stream continues where the client was"
    );
    let (second, _) = read_until(&mut ws, "fini1shed").await;
    let joined = format!("{first}{second}");
    let numbers: Vec<u32> = joined
        .split('n')
        .filter_map(|part| part.split('.').next()?.parse().ok())
        .filter(|n| (1..=150).contains(n))
        .collect();
    assert_eq!(
        numbers,
        (1..=150).collect::<Vec<_>>(),
        "nothing missing or repeated: {joined:?}"
    );
    // Offsets are contiguous: every frame continues the previous one, up to the marker's echo
    // (read until it rather than a number of frames: tmux sends as many as it likes, and only
    // its status line's clock would bring another one later).
    input(&mut ws, "echo do$((1))ne\r").await;
    let (mut last, mut text) = (None, String::new());
    while !text.contains("do1ne") {
        let f = next_json(&mut ws).await.expect("output until the marker");
        if f["type"] != "output" {
            continue;
        }
        let data = f["data"].as_str().expect("data");
        let end = f["offset"].as_u64().expect("offset");
        if let Some(prev) = last {
            assert_eq!(end - data.len() as u64, prev, "no gap, no overlap");
        }
        last = Some(end);
        text.push_str(data);
    }
    assert!(last.is_some(), "output frames carry offsets");
    s.stop().await;
}

async fn multibyte_output_arrives_intact(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("uma").await;
    let env = running_env(&s, &me, "utf8").await;
    let (mut ws, _) = open_terminal(&s, &me, &env, "&cols=200&rows=50").await;
    input(
        &mut ws,
        "for i in $(seq 1 40); do printf '€😀ä%.0s' $(seq 1 50); echo; done; echo end$((1))x\r",
    )
    .await;
    let (text, _) = read_until(&mut ws, "end1x").await;
    assert!(!text.contains('\u{fffd}'), "a character was cut: {text:?}");
    assert!(
        text.matches('😀').count() >= 2000,
        "all four-byte characters arrived"
    );
    s.stop().await;
}

/// Read until the server's side of the closing handshake (or the end of the stream).
async fn drain_to_end(ws: &mut Ws) {
    tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = ws.next().await {} })
        .await
        .expect("the close completes in time");
}

/// At the per-user WebSocket cap, a client that comes back the moment its connection closed —
/// closed by the client, or refused by the server after the slot was taken — is admitted: the
/// closed connection's slot is not counted against it. On PostgreSQL the store's deletion of the
/// old slot is held up by a row lock: the new connection waits for it instead of being refused
/// ("Too many connections"), however long the deletion takes.
async fn a_closed_connection_is_not_counted_against_its_reconnect(backend: Backend) {
    let s = TestServer::start_with(backend, |c| c.terminals.max_connections_per_user = 1).await;
    let me = s.register("rhea").await;
    let events = format!("/api/v1/ws/events?token={}", me.access);
    let missing = format!(
        "/api/v1/ws/terminal/{}?token={}",
        uuid::Uuid::new_v4(),
        me.access
    );
    for _ in 0..10 {
        let mut ws = connect(&s, &events).await;
        ping_pong(&mut ws).await;
        ws.close(None).await.expect("client close");
        drain_to_end(&mut ws).await;
        let mut refused = connect(&s, &missing).await;
        assert_eq!(
            close_of(&mut refused).await,
            (1008, "Environment not found".into())
        );
    }

    if backend == Backend::Postgres {
        use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
        let mut ws = connect(&s, &events).await;
        ping_pong(&mut ws).await;
        let mut blocker = AsyncPgConnection::establish(&s.db.url)
            .await
            .expect("a connection of the test's own");
        blocker
            .batch_execute("BEGIN; SELECT id FROM connection_slots FOR UPDATE;")
            .await
            .expect("lock the slot rows");
        ws.close(None).await.expect("client close");
        drain_to_end(&mut ws).await;
        let back = {
            let url = ws_url(&s, &events);
            tokio::spawn(async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(url)
                    .await
                    .expect("websocket connects");
                ping_pong(&mut ws).await;
                ws
            })
        };
        // The server's deletion of the old slot now waits on the test's lock (an old server
        // would have refused the new connection by now, and `back` would have panicked).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut probe = AsyncPgConnection::establish(&s.db.url)
            .await
            .expect("a connection to watch the locks");
        loop {
            use diesel::prelude::*;
            #[derive(QueryableByName)]
            struct Waiting {
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                n: i64,
            }
            let waiting: Waiting = diesel_async::RunQueryDsl::get_result(
                diesel::sql_query(
                    "SELECT count(*) AS n FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                ),
                &mut probe,
            )
            .await
            .expect("pg_stat_activity");
            if waiting.n > 0 {
                break;
            }
            assert!(
                !back.is_finished(),
                "the reconnect ended before the old slot was given back"
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "the server never tried to give the slot back"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !back.is_finished(),
            "admitted while the old slot was still counted"
        );
        blocker.batch_execute("COMMIT").await.expect("unlock");
        let mut ws = tokio::time::timeout(WAIT, back)
            .await
            .expect("the reconnect is admitted in time")
            .expect("reconnect task");
        ws.close(None).await.expect("close");
    }
    s.stop().await;
}

async fn rejections_close_with_1008_and_a_reason(backend: Backend) {
    let s = TestServer::start_with(backend, |c| c.terminals.max_connections_per_user = 2).await;
    let me = s.register("vera").await;
    let other = s.register("walt").await;
    let env = s.create_env(&me, "mine", "ubuntu").await["id"]
        .as_str()
        .expect("id")
        .to_string();

    for path in [
        format!("/api/v1/ws/terminal/{env}"),
        format!("/api/v1/ws/terminal/{env}?token=garbage"),
    ] {
        let mut ws = connect(&s, &path).await;
        assert_eq!(
            close_of(&mut ws).await,
            (1008, "Authentication failed".into()),
            "{path}"
        );
    }
    let mut ws = connect(
        &s,
        &format!("/api/v1/ws/terminal/{env}?token={}", other.access),
    )
    .await;
    assert_eq!(
        close_of(&mut ws).await,
        (1008, "Environment not found".into())
    );
    let mut ws = connect(&s, &format!("/api/v1/ws/logs/{env}?token={}", other.access)).await;
    assert_eq!(
        close_of(&mut ws).await,
        (1008, "Environment not found".into())
    );
    s.wait_status(&me, &env, "running").await;
    s.post(
        &format!("/api/v1/environments/{env}/stop"),
        me.token(),
        json!({}),
    )
    .await;
    s.wait_status(&me, &env, "stopped").await;
    let mut ws = connect(
        &s,
        &format!("/api/v1/ws/terminal/{env}?token={}", me.access),
    )
    .await;
    assert_eq!(
        close_of(&mut ws).await,
        (1008, "Environment not ready".into())
    );

    let mut a = connect(&s, &format!("/api/v1/ws/events?token={}", me.access)).await;
    let mut b = connect(&s, &format!("/api/v1/ws/events?token={}", me.access)).await;
    // Both are admitted (they hold their slots) once they answer a ping.
    ping_pong(&mut a).await;
    ping_pong(&mut b).await;
    let mut third = connect(&s, &format!("/api/v1/ws/events?token={}", me.access)).await;
    assert_eq!(
        close_of(&mut third).await,
        (1008, "Too many connections".into())
    );
    // Plain HTTP to a WebSocket route is a clear 400, not a crash.
    let (status, body) = s
        .get(&format!("/api/v1/ws/terminal/{env}"), me.token())
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("websocket_required"))
    );
    s.stop().await;
}

async fn hostile_frames_never_hurt_the_server(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("xena").await;
    let env = running_env(&s, &me, "hostile").await;
    let (mut ws, _) = open_terminal(&s, &me, &env, "").await;
    let expect_error = async |ws: &mut Ws, what: &str| loop {
        let f = next_json(ws)
            .await
            .unwrap_or_else(|| panic!("closed after {what}"));
        if f["type"] == "error" {
            return f;
        }
    };
    ws.send(Message::binary(vec![0u8, 159, 146, 150, 255]))
        .await
        .expect("send");
    expect_error(&mut ws, "binary").await;
    ws.send(Message::text(r#"{"type":"self_destruct"}"#))
        .await
        .expect("send");
    let err = expect_error(&mut ws, "unknown type").await;
    assert!(
        err["message"]
            .as_str()
            .is_some_and(|m| m.contains("self_destruct"))
    );
    ws.send(Message::text(r#"{"type":"resize","cols":0,"rows":0}"#))
        .await
        .expect("send");
    expect_error(&mut ws, "0x0").await;
    ws.send(Message::text(
        r#"{"type":"resize","cols":100000,"rows":100000}"#,
    ))
    .await
    .expect("send");
    // Not JSON at all: it is input, and the shell still answers.
    ws.send(Message::text("{oops")).await.expect("send");
    input(&mut ws, "\recho still-$((40+2))\r").await;
    read_until(&mut ws, "still-42").await;
    // An oversize frame (over 1 MiB) closes that socket cleanly.
    let big = "x".repeat(2 * 1024 * 1024);
    let _ = ws.send(Message::text(big)).await;
    let (code, _) = close_of(&mut ws).await;
    assert!(code == 1009 || code == 0, "closed: {code}");
    // The server keeps serving others, and this user can reconnect.
    assert_eq!(s.get("/health", None).await.0, StatusCode::OK);
    let (mut ws, _) = open_terminal(&s, &me, &env, "").await;
    input(&mut ws, "echo back-$((1+1))\r").await;
    read_until(&mut ws, "back-2").await;
    s.stop().await;
}

async fn logout_and_delete_close_live_terminals(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("yuri").await;
    let env = running_env(&s, &me, "closing").await;
    let (_, body) = s.login("yuri", support::PASSWORD).await;
    let second = Session::from_auth(&body);

    let (mut ws, _) = open_terminal(&s, &me, &env, "").await;
    s.post("/api/v1/auth/logout", me.token(), json!({})).await;
    assert_eq!(close_of(&mut ws).await, (1008, "Session ended".into()));

    let (mut ws, _) = open_terminal(&s, &second, &env, "").await;
    let (status, _) = s
        .send(s.request(
            Method::DELETE,
            &format!("/api/v1/environments/{env}"),
            second.token(),
        ))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let mut saw_status = false;
    let (code, reason) = loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(t))) => {
                let f: Value = serde_json::from_str(t.as_str()).expect("json");
                saw_status |= f["type"] == "environment_status" && f["status"] == "deleting";
            }
            Some(Ok(Message::Close(Some(frame)))) => {
                break (u16::from(frame.code), frame.reason.to_string());
            }
            Some(Ok(_)) => {}
            other => panic!("unexpected end: {other:?}"),
        }
    };
    assert!(saw_status, "the terminal heard the environment change");
    assert_eq!((code, reason.as_str()), (1001, "Environment deleting"));
    s.stop().await;
}

async fn logs_and_events_streams(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("zoe").await;
    s.make_plan("zoe", devpocket::store::users::Plan::Starter)
        .await;
    let mut events = connect(&s, &format!("/api/v1/ws/events?token={}", me.access)).await;
    let stranger = s.register("stranger").await;
    let a = s.create_env(&me, "alpha", "ubuntu").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    // Live logs from the start of installation.
    let mut logs = connect(
        &s,
        &format!("/api/v1/ws/logs/{a}?token={}&follow=true", me.access),
    )
    .await;
    let b = s.create_env(&me, "beta", "ubuntu").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let _theirs = s.create_env(&stranger, "not-mine", "ubuntu").await;

    let mut running = std::collections::HashSet::new();
    while running.len() < 2 {
        let f = next_json(&mut events).await.expect("event");
        assert_eq!(f["type"], "environment_status", "{f}");
        let id = f["environment_id"].as_str().expect("id").to_string();
        assert!(id == a || id == b, "only my environments: {f}");
        if f["status"] == "running" {
            running.insert(id);
        }
    }
    let mut saw_line = false;
    let live_running = loop {
        let f = next_json(&mut logs).await.expect("log frame");
        saw_line |= f["type"] == "installation_log"
            && f["data"]
                .as_str()
                .is_some_and(|d| d.starts_with("git version"));
        if f["type"] == "environment_status" && f["status"] == "running" {
            break f;
        }
    };
    assert!(saw_line, "installation output streamed live");

    // History only: everything stored, then a normal close.
    let mut history = connect(
        &s,
        &format!("/api/v1/ws/logs/{a}?token={}&follow=false", me.access),
    )
    .await;
    let mut kinds = Vec::new();
    let mut stored_running = None;
    while let Some(f) = next_json(&mut history).await {
        kinds.push(f["type"].as_str().unwrap_or_default().to_string());
        if f["type"] == "environment_status" && f["status"] == "running" {
            stored_running = Some(f.clone());
        }
        if f["type"] == "installation_complete" {
            assert_eq!(f["status"], "running", "{f}");
        }
    }
    assert!(
        kinds.contains(&"installation_log".to_string())
            && kinds.contains(&"environment_status".to_string())
            && kinds.contains(&"installation_complete".to_string()),
        "{kinds:?}"
    );
    // One shape for a status change, live or from history (the message may differ in nothing).
    let stored_running = stored_running.expect("the running change is in the history");
    assert_eq!(stored_running, live_running);
    assert_eq!(stored_running["progress"], 100, "{stored_running}");
    s.stop().await;
}

async fn replaced_lost_exit_ops_view_and_audit(backend: Backend) {
    let s = TestServer::start_with(backend, |c| c.terminals.ring_bytes = 4096).await;
    let admin = s.admin("ops").await;
    let me = s.register("quinn").await;
    let env = running_env(&s, &me, "edges").await;
    let (mut first, welcome) = open_terminal(&s, &me, &env, "").await;
    let tid = welcome["terminal_id"].as_str().expect("id").to_string();
    input(&mut first, "echo one-$((1))\r").await;
    let (_, offset) = read_until(&mut first, "one-1").await;

    // Ops see the terminal under the user's session, attached, with byte counts.
    let (_, tree) = s.get("/api/v1/admin/actors", admin.token()).await;
    let text = tree.to_string();
    assert!(text.contains(&format!("terminal:{tid}")), "{text}");
    assert!(
        text.contains("\"attached\":true") && text.contains(&env),
        "{text}"
    );

    // A newer attach replaces the older, which is told why.
    let (second, welcome2) = open_terminal(
        &s,
        &me,
        &env,
        &format!("&terminal_id={tid}&offset={offset}"),
    )
    .await;
    assert_eq!(welcome2["terminal_id"], tid.as_str());
    assert_eq!(
        close_of(&mut first).await,
        (4000, "Replaced by a newer connection".into())
    );

    // Output beyond the (small) ring while away: the client is told, never sent stale bytes.
    drop(second);
    let (mut third, _) = open_terminal(&s, &me, &env, &format!("&terminal_id={tid}")).await;
    input(&mut third, "for i in $(seq 1 400); do echo pad-$i-xxxxxxxxxxxxxxxxxxxxxxxx; sleep 0.001; done; echo big-$((2))\r").await;
    read_until(&mut third, "big-2").await;
    drop(third);
    let (mut fourth, welcome4) = open_terminal(
        &s,
        &me,
        &env,
        &format!("&terminal_id={tid}&offset={offset}"),
    )
    .await;
    assert!(
        welcome4["offset"].as_u64() > Some(offset),
        "resumes at what is still held: {welcome4}"
    );
    let notice = next_json(&mut fourth).await.expect("notice");
    assert_eq!(notice["type"], "info", "{notice}");
    assert!(
        notice["message"]
            .as_str()
            .is_some_and(|m| m.contains("lost")),
        "{notice}"
    );

    // The shell exiting ends the terminal with its exit frame.
    input(&mut fourth, "exit\r").await;
    let mut saw_exit = false;
    let close = loop {
        match tokio::time::timeout(WAIT, fourth.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(t))) => saw_exit |= t.as_str().contains("\"type\":\"exit\""),
            Some(Ok(Message::Close(Some(f)))) => break (u16::from(f.code), f.reason.to_string()),
            Some(Ok(_)) => {}
            other => panic!("unexpected: {other:?}"),
        }
    };
    assert!(saw_exit, "exit frame before the close");
    assert_eq!(close, (1000, "Shell exited".into()));

    // The audit trail has the terminal's open and close, with byte counts (never the bytes).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, page) = s
            .get("/api/v1/admin/audit?event=terminal_closed", admin.token())
            .await;
        if let Some(item) = page["items"].as_array().and_then(|i| i.first()) {
            assert_eq!(item["detail"]["terminal_id"], tid.as_str());
            assert!(item["detail"]["bytes_out"].as_u64() > Some(0));
            assert!(item["detail"]["bytes_in"].as_u64() > Some(0));
            assert!(
                !page.to_string().contains("one-1"),
                "no terminal content in the trail"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no terminal_closed event"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, opened) = s
        .get("/api/v1/admin/audit?event=terminal_opened", admin.token())
        .await;
    assert_eq!(opened["total"], 1);
    s.stop().await;
}

/// The local provider's SSH server takes 16 channels per connection, so its pool puts 12
/// holders on one (OpenSSH's `MaxSessions` of 10 keeps remote environments at the configured 8):
/// ten terminals opened at once, and the environment's metrics sampler, use one connection.
async fn ten_terminals_of_a_local_environment_share_one_connection(backend: Backend) {
    let s = TestServer::start_with(backend, |c| {
        c.terminals.max_connections_per_user = 10;
        c.terminals.max_terminals_per_session = 10;
        c.provider.ssh_channels_per_connection = 8;
    })
    .await;
    let me = s.register("tena").await;
    let env = running_env(&s, &me, "ten").await;
    let opened = futures_util::future::join_all(
        (0..10).map(|_| open_terminal(&s, &me, &env, "&cols=80&rows=24")),
    )
    .await;
    assert_eq!(
        s.ssh_connections().await,
        1,
        "ten terminals, one connection"
    );
    let mut terminals: Vec<Ws> = opened.into_iter().map(|(ws, _)| ws).collect();
    for (i, ws) in terminals.iter_mut().enumerate() {
        input(ws, &format!("echo ten-$(({i}+100))\r")).await;
        read_until(ws, &format!("ten-{}", i + 100)).await;
    }
    assert_eq!(s.ssh_connections().await, 1);
    drop(terminals);
    s.stop().await;
}

async fn terminals_per_session_are_bounded(backend: Backend) {
    let s = TestServer::start_with(backend, |c| c.terminals.max_terminals_per_session = 2).await;
    let me = s.register("bea").await;
    let env = running_env(&s, &me, "bounded").await;
    // Both held by live WebSockets: a third is refused (a detached one would be re-attached or
    // make room instead; see tests/field.rs).
    let (first, welcome) = open_terminal(&s, &me, &env, "").await;
    let (second, _) = open_terminal(&s, &me, &env, "").await;
    let mut third = connect(
        &s,
        &format!("/api/v1/ws/terminal/{env}?token={}", me.access),
    )
    .await;
    let error = loop {
        let frame = next_json(&mut third).await.expect("error frame");
        if frame["type"] != "info" {
            break frame;
        }
    };
    assert_eq!(error["type"], "error", "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("too many open terminals")),
        "{error}"
    );
    // Resuming an existing one is still fine.
    let tid = welcome["terminal_id"].as_str().expect("id");
    let (_, again) = open_terminal(&s, &me, &env, &format!("&terminal_id={tid}")).await;
    assert_eq!(again["terminal_id"], tid);
    drop((first, second));
    s.stop().await;
}
