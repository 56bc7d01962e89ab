//! Invariants that must hold however requests race: the plan limit and one live name per user
//! under parallel creates (a phone's double-tap), renames racing for one name, and the store's
//! own last line of defence (the partial unique index) — on SQLite and PostgreSQL.

mod support;

use devpocket::store::users::Plan;
use futures_util::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Backend, Session, TestServer};

on_both_backends!(
    parallel_creates_never_pass_the_plan_limit,
    parallel_creates_of_one_name_make_one_environment,
    parallel_renames_to_one_name_leave_one_owner,
    the_store_refuses_a_second_live_name,
    names_duplicated_before_the_upgrade_are_resolved_by_the_migration,
    creates_racing_account_deletion_leave_nothing_behind,
);

/// Send `bodies` as parallel creates; the (status, body) of each.
async fn create_all(s: &TestServer, me: &Session, bodies: Vec<Value>) -> Vec<(StatusCode, Value)> {
    join_all(
        bodies
            .into_iter()
            .map(|body| s.post("/api/v1/environments", me.token(), body)),
    )
    .await
}

fn count(results: &[(StatusCode, Value)], status: StatusCode, code: Option<&str>) -> usize {
    results
        .iter()
        .filter(|(st, body)| *st == status && code.is_none_or(|c| body["code"] == c))
        .count()
}

async fn live_environments(s: &TestServer, me: &Session) -> Vec<Value> {
    let (status, list) = s.get("/api/v1/environments", me.token()).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    list.as_array()
        .expect("a list")
        .iter()
        .filter(|e| e["status"] != "terminated")
        .cloned()
        .collect()
}

async fn parallel_creates_never_pass_the_plan_limit(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("tapper").await;
    let bodies = (0..20)
        .map(|i| json!({ "name": format!("box-{i}"), "template": "ubuntu" }))
        .collect();
    let results = create_all(&s, &me, bodies).await;
    assert_eq!(count(&results, StatusCode::CREATED, None), 1, "{results:?}");
    assert_eq!(
        count(&results, StatusCode::FORBIDDEN, Some("plan_limit")),
        19,
        "{results:?}"
    );
    assert_eq!(live_environments(&s, &me).await.len(), 1);
    s.stop().await;
}

async fn parallel_creates_of_one_name_make_one_environment(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("twin").await;
    s.make_plan("twin", Plan::Pro).await;
    let bodies = (0..10)
        .map(|_| json!({ "name": "same", "template": "ubuntu" }))
        .collect();
    let results = create_all(&s, &me, bodies).await;
    assert_eq!(count(&results, StatusCode::CREATED, None), 1, "{results:?}");
    assert_eq!(
        count(&results, StatusCode::CONFLICT, Some("name_taken")),
        9,
        "{results:?}"
    );
    let live = live_environments(&s, &me).await;
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0]["name"], "same");
    s.stop().await;
}

async fn parallel_renames_to_one_name_leave_one_owner(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("renamer").await;
    s.make_plan("renamer", Plan::Pro).await;
    let mut ids = Vec::new();
    for name in ["one", "two", "three", "four"] {
        ids.push(s.create_env(&me, name, "ubuntu").await["id"].clone());
    }
    let (s, me) = (&s, &me);
    let renames = ids.iter().map(|id| {
        let id = id.as_str().expect("id").to_string();
        async move {
            s.send(
                s.request(
                    Method::PUT,
                    &format!("/api/v1/environments/{id}"),
                    me.token(),
                )
                .json(&json!({ "name": "wanted" })),
            )
            .await
        }
    });
    let results = join_all(renames).await;
    assert_eq!(count(&results, StatusCode::OK, None), 1, "{results:?}");
    assert_eq!(
        count(&results, StatusCode::CONFLICT, Some("name_taken")),
        3,
        "{results:?}"
    );
    let named: Vec<Value> = live_environments(s, me)
        .await
        .into_iter()
        .filter(|e| e["name"] == "wanted")
        .collect();
    assert_eq!(named.len(), 1, "{named:?}");
}

/// Below every check in the actors: a second live environment with a taken name cannot be
/// written at all, while the same name on a terminated one can.
async fn the_store_refuses_a_second_live_name(backend: Backend) {
    use devpocket::actors::environment::machine::Status;
    use devpocket::store::environments as store;
    let s = TestServer::start(backend).await;
    let me = s.register("guard").await;
    s.make_plan("guard", Plan::Pro).await;
    let first = s.create_env(&me, "taken", "ubuntu").await;
    let app = &s.running().app;
    let mut conn = app.db.get().await.expect("conn");
    let mut copy = store::get(&mut conn, first["id"].as_str().expect("id"))
        .await
        .expect("query")
        .expect("row");
    copy.id = uuid::Uuid::new_v4().to_string();
    let err = store::insert(&mut conn, &copy)
        .await
        .expect_err("a second live 'taken' is refused");
    assert!(err.unique_violation().is_some(), "{err}");
    copy.status = Status::Terminated;
    store::insert(&mut conn, &copy)
        .await
        .expect("a terminated one may share the name");
    drop(conn);
    s.stop().await;
}

/// A store from before the unique index, holding duplicated live names (as the old check-then-act
/// allowed): the migration keeps the oldest name, renames the others (`-2`, `-3`; an id piece
/// when that name is already someone's), leaves terminated ones alone, records each rename, and then the index
/// holds.
async fn names_duplicated_before_the_upgrade_are_resolved_by_the_migration(backend: Backend) {
    use devpocket::store::{Db, DbConn, DbUrl, environments as store};
    use diesel_async::SimpleAsyncConnection;
    let dir = tempfile::tempdir().expect("temp dir");
    let test_db = support::TestDb::create(backend, dir.path()).await;
    let url = DbUrl::parse(&test_db.url).expect("url");
    let db = Db::connect(&url, 2, std::time::Duration::from_secs(10))
        .await
        .expect("connect");
    db.migrate_until("2026-11-22-000002")
        .await
        .expect("old schema");
    let env_row = |id: &str, name: &str, status: &str, second: u32| {
        format!(
            "INSERT INTO environments (id, user_id, name, template, provider, status, region, size, \
             resources, environment_variables, display_name, ssh_user, ssh_public_key, \
             ssh_private_key, host_public_key, created_at, updated_at) VALUES ('{id}', 'u1', \
             '{name}', 'ubuntu', 'local', '{status}', 'local', 'local', '{{}}', '{{}}', \
             'devpocket-{id}', 'dev', 'k', 'k', 'k', '2026-01-01 00:00:{second:02}', \
             '2026-01-01 00:00:{second:02}');"
        )
    };
    let sql = [
        "INSERT INTO users (id, username, username_key, email, created_at, updated_at) VALUES \
         ('u1', 'old', 'old', 'old@example.com', '2026-01-01 00:00:00', '2026-01-01 00:00:00');"
            .to_string(),
        env_row("e1", "dup", "running", 1),
        env_row("e2", "dup", "stopped", 2),
        env_row("e3", "dup", "terminated", 3),
        env_row("e4", "dup", "error", 4),
        env_row("e5", "dup-2", "running", 5),
        env_row("e6", "solo", "running", 6),
    ]
    .join("\n");
    {
        let mut conn = db.get().await.expect("conn");
        match &mut conn {
            DbConn::Pg(c) => c.batch_execute(&sql).await.expect("old rows"),
            DbConn::Sqlite(c) => c.batch_execute(&sql).await.expect("old rows"),
        }
    }
    db.migrate().await.expect("migrate forward");
    let mut conn = db.get().await.expect("conn");
    let mut names = Vec::new();
    for id in ["e1", "e2", "e3", "e4", "e5", "e6"] {
        let row = store::get(&mut conn, id)
            .await
            .expect("query")
            .expect("row");
        names.push(row.name);
    }
    assert_eq!(
        names,
        ["dup", "dup-e2", "dup", "dup-3", "dup-2", "solo"].map(String::from),
        "the oldest keeps its name; a name already taken (dup-2) is not given again"
    );
    let (events, _) = store::events(&mut conn, "e2", None, 10)
        .await
        .expect("events");
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("Renamed from 'dup' to 'dup-e2'")),
        "{events:?}"
    );
    drop(conn);
    db.close();
}

/// Creates that race an account deletion are either deleted with the account or refused: once
/// the deletion has answered, nothing of the account runs (no environment actor, no store row).
async fn creates_racing_account_deletion_leave_nothing_behind(backend: Backend) {
    let s = TestServer::start(backend).await;
    let admin = s.admin("ops").await;
    let me = s.register("leaver").await;
    s.make_plan("leaver", Plan::Pro).await;
    s.create_env(&me, "first", "ubuntu").await;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let done = AtomicBool::new(false);
    let created = AtomicUsize::new(0);
    let creator = |lane: usize| {
        let (s, me, done, created) = (&s, &me, &done, &created);
        async move {
            let mut mine = 0;
            for i in 0..3 {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let body = json!({ "name": format!("race-{lane}-{i}"), "template": "ubuntu" });
                let (status, _) = s.post("/api/v1/environments", me.token(), body).await;
                if status == StatusCode::CREATED {
                    created.fetch_add(1, Ordering::Relaxed);
                    mine += 1;
                }
            }
            mine
        }
    };
    let deleter = async {
        // Delete while creates are landing: after the first ones, with others in flight.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while created.load(Ordering::Relaxed) < 2 && tokio::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        let (status, body) = s
            .send(
                s.request(Method::DELETE, "/api/v1/users/me", me.token())
                    .json(&json!({ "password": support::PASSWORD })),
            )
            .await;
        done.store(true, Ordering::Relaxed);
        (status, body)
    };
    let (a, b, c, (status, body)) = tokio::join!(creator(0), creator(1), creator(2), deleter);
    assert_eq!(status, StatusCode::OK, "{body}");
    eprintln!("created while deleting: {}", a + b + c);
    let user_id = me.user_id.clone();
    s.wait_tree(&admin, "no actor of the deleted account", |tree| {
        !tree.to_string().contains(&user_id)
    })
    .await;
    let app = &s.running().app;
    let mut conn = app.db.get().await.expect("conn");
    let live = devpocket::store::environments::live_ids_for_user(&mut conn, &user_id)
        .await
        .expect("query");
    assert!(live.is_empty(), "{live:?}");
    drop(conn);
    s.stop().await;
}
