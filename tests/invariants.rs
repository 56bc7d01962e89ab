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
