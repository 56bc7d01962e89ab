//! Terminals and WebSocket caps over several nodes (issue 11, items 6 and 8), through the real
//! server: the other nodes are simulated by their rows in the store (a node row, its terminals,
//! its connection slots), alive or dead by their heartbeat against the server's clock.

mod support;

use devpocket::clock::db_now;
use devpocket::store::nodes::{self, NodeRow};
use devpocket::store::slots::{self, SlotRow};
use devpocket::store::terminals::{self, TerminalRow};
use futures_util::SinkExt;
use serde_json::{Value, json};
use support::terminal::*;
use support::{Backend, Session, TestServer, session_id_of};
use tokio_tungstenite::tungstenite::Message;

on_both_backends!(
    terminals_are_registered_and_listed_over_every_node,
    a_resume_that_lands_on_another_node_reopens_the_same_tmux_session,
    the_connection_cap_counts_every_live_node,
    the_terminal_cap_of_a_session_counts_every_live_node,
    a_restarted_node_starts_without_its_old_rows,
);

const OTHER: &str = "node-b-simulated";

async fn conn(s: &TestServer) -> devpocket::store::DbConn {
    s.running().app.db.get().await.expect("store connection")
}

fn this_node(s: &TestServer) -> String {
    s.running().app.node.id.clone()
}

/// Register another node, alive by the server's clock.
async fn other_node(s: &TestServer, id: &str) {
    let now = db_now(s.clock.as_ref());
    let row = NodeRow {
        id: id.into(),
        address: "elsewhere".into(),
        provider: "contabo".into(),
        version: "0".into(),
        started_at: now,
        heartbeat_at: now,
        draining: false,
        jwt_keys: String::new(),
        seal_keys: String::new(),
    };
    nodes::reinsert(&mut conn(s).await, &row)
        .await
        .expect("node row");
}

/// Make a node dead: its last heartbeat just past `cluster.dead_after_seconds`.
async fn kill_node(s: &TestServer, id: &str) {
    let dead = db_now(s.clock.as_ref())
        - chrono::Duration::seconds(s.config.cluster.dead_after_seconds as i64 + 1);
    assert!(
        nodes::heartbeat(&mut conn(s).await, id, dead)
            .await
            .expect("heartbeat")
    );
}

/// A terminal of `node` as its node would register it.
fn terminal_row(
    s: &TestServer,
    node: &str,
    env: &str,
    me: &Session,
    tmux: &str,
    attached: bool,
) -> TerminalRow {
    let now = db_now(s.clock.as_ref());
    TerminalRow {
        id: uuid::Uuid::new_v4().to_string(),
        node_id: node.into(),
        environment_id: env.into(),
        user_id: me.user_id.clone(),
        session_id: session_id_of(&me.access),
        tmux_session: tmux.into(),
        cols: 90,
        rows: 30,
        attached,
        created_at: now,
        updated_at: now,
    }
}

async fn insert_terminal(s: &TestServer, row: &TerminalRow) {
    terminals::insert(&mut conn(s).await, row)
        .await
        .expect("terminal row");
}

async fn stored(s: &TestServer, id: &str) -> Option<TerminalRow> {
    terminals::get(&mut conn(s).await, id).await.expect("get")
}

/// Poll the store (each poll a real query) until `check` holds for terminal `id`'s row.
async fn wait_row(
    s: &TestServer,
    id: &str,
    what: &str,
    check: impl Fn(Option<&TerminalRow>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let row = stored(s, id).await;
        if check(row.as_ref()) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; row: {row:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn listed(s: &TestServer, me: &Session, env: &str) -> Vec<Value> {
    let (status, body) = s
        .get(&format!("/api/v1/environments/{env}/terminals"), me.token())
        .await;
    assert_eq!(status, 200, "{body}");
    body.as_array().expect("an array").clone()
}

fn entry<'a>(list: &'a [Value], id: &str) -> &'a Value {
    list.iter()
        .find(|t| t["terminal_id"] == id)
        .unwrap_or_else(|| panic!("{id} listed: {list:?}"))
}

/// A terminal is in the store while it lives (its attach state and size follow), the list shows
/// it with this node's id and its screen, and other live nodes' terminals without a screen; a
/// dead node's are left out; the row goes when the terminal ends.
async fn terminals_are_registered_and_listed_over_every_node(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("lister").await;
    let env = running_env(&s, &me, "spread").await;
    let (mut ws, welcome) = open_terminal(&s, &me, &env, "&cols=70&rows=20").await;
    let tid = welcome["terminal_id"].as_str().expect("id").to_string();
    input(&mut ws, "echo shown-$((40+2))\r").await;
    read_until(&mut ws, "shown-42").await;

    let row = stored(&s, &tid).await.expect("registered");
    assert_eq!(row.node_id, this_node(&s));
    assert_eq!(row.environment_id, env);
    assert_eq!(row.user_id, me.user_id);
    assert_eq!(row.session_id, session_id_of(&me.access));
    assert_eq!(row.tmux_session, format!("devpocket_{env}"));
    assert_eq!((row.cols, row.rows, row.attached), (70, 20, true));

    other_node(&s, OTHER).await;
    let theirs = terminal_row(&s, OTHER, &env, &me, &row.tmux_session, false);
    insert_terminal(&s, &theirs).await;
    let list = listed(&s, &me, &env).await;
    assert_eq!(list.len(), 2, "{list:?}");
    let mine = entry(&list, &tid);
    assert_eq!(mine["node"], this_node(&s).as_str());
    assert!(
        mine["screen"]
            .as_str()
            .is_some_and(|t| t.contains("shown-42")),
        "{mine}"
    );
    assert!(mine["offset"].as_u64() > Some(0), "{mine}");
    let remote = entry(&list, &theirs.id);
    assert_eq!(remote["node"], OTHER);
    assert_eq!(
        (&remote["cols"], &remote["rows"], &remote["attached"]),
        (&json!(90), &json!(30), &json!(false))
    );
    for field in ["screen", "cursor", "alternate_screen", "offset"] {
        assert!(
            remote[field].is_null(),
            "{field} is only known there: {remote}"
        );
    }

    // Resizes and detaches reach the store.
    ws.send(Message::text(
        json!({ "type": "resize", "cols": 100, "rows": 33 }).to_string(),
    ))
    .await
    .expect("send");
    wait_row(&s, &tid, "the new size", |r| {
        r.is_some_and(|r| (r.cols, r.rows) == (100, 33))
    })
    .await;
    drop(ws);
    wait_row(&s, &tid, "detached", |r| r.is_some_and(|r| !r.attached)).await;

    // A dead node's terminals are not listed.
    kill_node(&s, OTHER).await;
    let list = listed(&s, &me, &env).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["terminal_id"], tid.as_str());

    // The terminal ends (its shell exits): its row goes.
    let (mut ws, welcome) = open_terminal(&s, &me, &env, &format!("&terminal_id={tid}")).await;
    assert_eq!(welcome["terminal_id"], tid.as_str());
    input(&mut ws, "exit\r").await;
    close_of(&mut ws).await;
    wait_row(&s, &tid, "the row gone", |r| r.is_none()).await;
    s.stop().await;
}

/// The first frame after the welcome: the stand-in's notice.
async fn notice_of(ws: &mut Ws) -> String {
    let notice = next_json(ws).await.expect("notice");
    assert_eq!(notice["type"], "info", "{notice}");
    notice["message"].as_str().expect("message").to_string()
}

/// A resume naming a terminal the store places on another node (alive or dead) gets a new
/// terminal here on the same tmux session — the shell's state is there — with an `info` that says
/// so; another user's terminal id is treated exactly like an unknown one.
async fn a_resume_that_lands_on_another_node_reopens_the_same_tmux_session(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("mover").await;
    let env = running_env(&s, &me, "travel").await;
    let (mut ws, welcome) = open_terminal(&s, &me, &env, "").await;
    let first = welcome["terminal_id"].as_str().expect("id").to_string();
    input(&mut ws, "export DP_MOVED=came$((1+1))along\r").await;
    input(&mut ws, "echo set-$DP_MOVED\r").await;
    read_until(&mut ws, "set-came2along").await;
    drop(ws);
    let tmux = stored(&s, &first).await.expect("registered").tmux_session;

    // As if the phone's terminal had been opened through node B.
    other_node(&s, OTHER).await;
    let theirs = terminal_row(&s, OTHER, &env, &me, &tmux, true);
    insert_terminal(&s, &theirs).await;
    let (mut ws, welcome) = open_terminal(
        &s,
        &me,
        &env,
        &format!("&terminal_id={}&offset=1234", theirs.id),
    )
    .await;
    let new = welcome["terminal_id"].as_str().expect("id").to_string();
    assert!(
        new != theirs.id && new != first,
        "a new terminal: {welcome}"
    );
    assert_eq!(
        welcome["offset"], 0,
        "streams from its first byte: {welcome}"
    );
    assert_eq!(
        notice_of(&mut ws).await,
        devpocket::actors::session::MOVED_NOTICE
    );
    input(&mut ws, "echo again-$DP_MOVED\r").await;
    read_until(&mut ws, "again-came2along").await;
    let row = stored(&s, &new)
        .await
        .expect("the new terminal is registered");
    assert_eq!(
        (row.node_id, row.tmux_session),
        (this_node(&s), tmux.clone())
    );
    assert_eq!((row.cols, row.rows), (90, 30), "the moved terminal's size");
    drop(ws);

    // The same when node B has died.
    kill_node(&s, OTHER).await;
    let dead = terminal_row(&s, OTHER, &env, &me, &tmux, true);
    insert_terminal(&s, &dead).await;
    let (mut ws, _) =
        open_terminal(&s, &me, &env, &format!("&terminal_id={}&offset=9", dead.id)).await;
    assert_eq!(
        notice_of(&mut ws).await,
        devpocket::actors::session::MOVED_NOTICE
    );
    input(&mut ws, "echo still-$DP_MOVED\r").await;
    read_until(&mut ws, "still-came2along").await;
    drop(ws);

    // Another user: a terminal id of theirs on this user's own environment is an unknown id.
    let other = s.register("snoop").await;
    let env2 = running_env(&s, &other, "own").await;
    let bait = terminal_row(&s, OTHER, &env2, &me, &format!("devpocket_{env2}"), true);
    insert_terminal(&s, &bait).await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let (mut ws, _) = open_terminal(
        &s,
        &other,
        &env2,
        &format!("&terminal_id={unknown}&offset=9"),
    )
    .await;
    let unknown_notice = notice_of(&mut ws).await;
    drop(ws);
    let (mut ws, welcome) = open_terminal(
        &s,
        &other,
        &env2,
        &format!("&terminal_id={}&offset=9", bait.id),
    )
    .await;
    assert_ne!(welcome["terminal_id"], bait.id.as_str());
    assert_eq!(notice_of(&mut ws).await, unknown_notice);
    assert_ne!(unknown_notice, devpocket::actors::session::MOVED_NOTICE);
    s.stop().await;
}

async fn slots_here(s: &TestServer, me: &Session) -> usize {
    slots::of_user_on_node(&mut conn(s).await, &me.user_id, &this_node(s))
        .await
        .expect("slots")
        .len()
}

fn events_path(me: &Session) -> String {
    format!("/api/v1/ws/events?token={}", me.access)
}

/// `terminals.max_connections_per_user` holds over every live node: another live node's slots
/// count, a dead node's do not, and a closed connection gives its slot back.
async fn the_connection_cap_counts_every_live_node(backend: Backend) {
    let s = TestServer::start_with(backend, |c| c.terminals.max_connections_per_user = 3).await;
    let me = s.register("capped").await;
    other_node(&s, OTHER).await;
    for _ in 0..2 {
        let slot = SlotRow {
            id: uuid::Uuid::new_v4().to_string(),
            node_id: OTHER.into(),
            user_id: me.user_id.clone(),
            kind: "terminal".into(),
            opened_at: db_now(s.clock.as_ref()),
        };
        slots::insert(&mut conn(&s).await, &slot)
            .await
            .expect("slot");
    }
    let mut a = connect(&s, &events_path(&me)).await;
    ping_pong(&mut a).await;
    let mut refused = connect(&s, &events_path(&me)).await;
    assert_eq!(
        close_of(&mut refused).await,
        (1008, "Too many connections".into()),
        "two on node B and one here make three"
    );
    assert_eq!(slots_here(&s, &me).await, 1);

    kill_node(&s, OTHER).await;
    let mut b = connect(&s, &events_path(&me)).await;
    ping_pong(&mut b).await;
    let mut c = connect(&s, &events_path(&me)).await;
    ping_pong(&mut c).await;
    let mut refused = connect(&s, &events_path(&me)).await;
    assert_eq!(
        close_of(&mut refused).await,
        (1008, "Too many connections".into())
    );

    // A closed connection gives its slot back.
    a.close(None).await.expect("close");
    let deadline = tokio::time::Instant::now() + WAIT;
    while slots_here(&s, &me).await != 2 {
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut d = connect(&s, &events_path(&me)).await;
    ping_pong(&mut d).await;
    drop((b, c, d));
    s.stop().await;
}

/// Open a terminal expecting a refusal: the error frame's message.
async fn refused_terminal(s: &TestServer, me: &Session, env: &str) -> String {
    let mut ws = connect(s, &format!("/api/v1/ws/terminal/{env}?token={}", me.access)).await;
    let error = loop {
        let frame = next_json(&mut ws).await.expect("error frame");
        if frame["type"] != "info" {
            break frame;
        }
    };
    assert_eq!(error["type"], "error", "{error}");
    error["message"].as_str().expect("message").to_string()
}

/// `terminals.max_terminals_per_session` holds over every live node: the session's attached
/// terminal on another live node counts; once that node is dead it does not.
async fn the_terminal_cap_of_a_session_counts_every_live_node(backend: Backend) {
    let s = TestServer::start_with(backend, |c| c.terminals.max_terminals_per_session = 1).await;
    let me = s.register("sessioned").await;
    let env = running_env(&s, &me, "capped").await;
    other_node(&s, OTHER).await;
    let theirs = terminal_row(&s, OTHER, &env, &me, &format!("devpocket_{env}"), true);
    insert_terminal(&s, &theirs).await;
    let refusal = refused_terminal(&s, &me, &env).await;
    assert!(refusal.contains("too many open terminals"), "{refusal}");

    kill_node(&s, OTHER).await;
    let (mut ws, _) = open_terminal(&s, &me, &env, "").await;
    input(&mut ws, "echo open-$((2+3))\r").await;
    read_until(&mut ws, "open-5").await;
    s.stop().await;
}

/// A node's terminals and slots hang off its row: when it stops (its row removed) or starts
/// again after a crash (its row written anew) they go with it, so a restarted node counts and
/// lists nothing of its previous run.
async fn a_restarted_node_starts_without_its_old_rows(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("phoenix").await;
    let env = s.create_env(&me, "left", "ubuntu").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let node = this_node(&s);
    let leftover = terminal_row(&s, &node, &env, &me, &format!("devpocket_{env}"), true);
    insert_terminal(&s, &leftover).await;
    let slot = SlotRow {
        id: uuid::Uuid::new_v4().to_string(),
        node_id: node.clone(),
        user_id: me.user_id.clone(),
        kind: "events".into(),
        opened_at: db_now(s.clock.as_ref()),
    };
    slots::insert(&mut conn(&s).await, &slot)
        .await
        .expect("slot");
    let s = s.restart().await;
    assert_eq!(this_node(&s), node, "the same node");
    assert!(
        stored(&s, &leftover.id).await.is_none(),
        "old terminal gone"
    );
    assert_eq!(slots_here(&s, &me).await, 0, "old slot gone");
    s.stop().await;
}
