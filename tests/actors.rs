//! The supervision tree as ops see it, and what a panicking actor does to the server (nothing
//! but a counted restart).

mod support;

use reqwest::StatusCode;
use serde_json::json;
use support::{Backend, TestServer, find_actor, session_id_of};

on_both_backends!(
    admin_sees_the_tree,
    panicking_session_actor_is_restarted_and_counted,
    supervisors_restart_and_readiness_reports_a_dead_one,
    fault_injection_is_off_by_default,
);

async fn admin_sees_the_tree(backend: Backend) {
    let s = TestServer::start(backend).await;
    let admin = s.admin("ops").await;
    let user = s.register("nina").await;
    let sid = format!("session:{}", session_id_of(&user.access));

    let t = s
        .wait_tree(&admin, "nina's session actor", |t| {
            find_actor(t, &sid).is_some()
        })
        .await;
    let root = &t[0];
    assert_eq!(
        (root["kind"].as_str(), root["id"].as_str()),
        (Some("root"), Some("root"))
    );
    let sessions = find_actor(&t, "sessions").expect("sessions supervisor");
    assert_eq!(sessions["kind"], "supervisor");
    assert!(
        find_actor(&t, "environments").is_some(),
        "environments supervisor"
    );
    let session = find_actor(&sessions["children"], &sid).expect("under the sessions supervisor");
    assert_eq!(session["kind"], "session");
    assert_eq!(session["owner"], user.user_id.as_str());
    assert_eq!(session["status"], "running");
    assert_eq!(session["restarts"], 0);
    assert_eq!(session["restart_limit"], 3);
    assert!(session["uptime_seconds"].is_i64() && session["mailbox_depth"].is_u64());
    assert!(session["last_failure"].is_null());

    // Logging out stops the actor.
    s.post("/api/v1/auth/logout", user.token(), json!({})).await;
    s.wait_tree(&admin, "session actor gone after logout", |t| {
        find_actor(t, &sid).is_none()
    })
    .await;

    let (status, _) = s
        .get("/api/v1/admin/actors", s.register("olga").await.token())
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        s.get("/api/v1/admin/actors", None).await.0,
        StatusCode::UNAUTHORIZED
    );
    s.stop().await;
}

async fn panicking_session_actor_is_restarted_and_counted(backend: Backend) {
    let s = TestServer::start(backend).await;
    let admin = s.admin("ops").await;
    let victim = s.register("pete").await;
    let bystander = s.register("quinn").await;
    let sid = format!("session:{}", session_id_of(&victim.access));
    s.wait_tree(&admin, "victim's actor", |t| find_actor(t, &sid).is_some())
        .await;

    let crash = format!("/api/v1/admin/actors/{sid}/crash");
    let (status, body) = s.post(&crash, admin.token(), json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    // The restart is counted when the failure is seen; the node reads "running" once the new
    // actor is up.
    let t = s
        .wait_tree(&admin, "one restart, running again", |t| {
            find_actor(t, &sid).is_some_and(|n| n["restarts"] == 1 && n["status"] == "running")
        })
        .await;
    let node = find_actor(&t, &sid).expect("restarted");
    assert_eq!(node["status"], "running");
    assert!(
        node["last_failure"]
            .as_str()
            .is_some_and(|f| f.contains("fault injection")),
        "{node}"
    );
    assert!(node["last_failure_at"].is_string());

    // Everyone is unaffected, the victim included.
    assert_eq!(
        s.get("/api/v1/auth/me", victim.token()).await.0,
        StatusCode::OK
    );
    assert_eq!(
        s.get("/api/v1/auth/me", bystander.token()).await.0,
        StatusCode::OK
    );
    assert_eq!(s.get("/health/ready", None).await.0, StatusCode::OK);

    // Two more restarts are granted; the fourth failure in the window leaves it down.
    for n in 2..=3 {
        assert_eq!(
            s.post(&crash, admin.token(), json!({})).await.0,
            StatusCode::ACCEPTED
        );
        s.wait_tree(&admin, "next restart, running again", |t| {
            find_actor(t, &sid).is_some_and(|x| x["restarts"] == n && x["status"] == "running")
        })
        .await;
    }
    assert_eq!(
        s.post(&crash, admin.token(), json!({})).await.0,
        StatusCode::ACCEPTED
    );
    let t = s
        .wait_tree(&admin, "given up", |t| {
            find_actor(t, &sid).is_some_and(|x| x["status"] == "failed")
        })
        .await;
    assert_eq!(find_actor(&t, &sid).expect("kept for ops")["restarts"], 3);
    // Its session still works for HTTP; the failure is visible, and nothing else broke.
    assert_eq!(
        s.get("/api/v1/auth/me", victim.token()).await.0,
        StatusCode::OK
    );
    assert_eq!(
        s.get("/api/v1/auth/me", bystander.token()).await.0,
        StatusCode::OK
    );
    assert_eq!(
        s.post(&crash, admin.token(), json!({})).await.0,
        StatusCode::NOT_FOUND,
        "it is down"
    );

    let metrics = s.metrics_text(None).await;
    assert!(
        metrics.contains("devpocket_actor_restarts_total{kind=\"session\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("devpocket_actors_live{kind=\"supervisor\"} 2"),
        "{metrics}"
    );
    s.stop().await;
}

async fn supervisors_restart_and_readiness_reports_a_dead_one(backend: Backend) {
    let s = TestServer::start(backend).await;
    let admin = s.admin("ops").await;
    let user = s.register("rita").await;
    let sid = format!("session:{}", session_id_of(&user.access));
    s.wait_tree(&admin, "session actor", |t| find_actor(t, &sid).is_some())
        .await;

    assert_eq!(
        s.post("/api/v1/admin/actors/root/crash", admin.token(), json!({}))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        s.post(
            "/api/v1/admin/actors/session:nope/crash",
            admin.token(),
            json!({})
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );

    assert_eq!(
        s.post(
            "/api/v1/admin/actors/sessions/crash",
            admin.token(),
            json!({})
        )
        .await
        .0,
        StatusCode::ACCEPTED
    );
    let t = s
        .wait_tree(&admin, "sessions supervisor restarted", |t| {
            find_actor(t, "sessions")
                .is_some_and(|n| n["restarts"] == 1 && n["status"] == "running")
        })
        .await;
    assert!(
        find_actor(&t, &sid).is_none(),
        "its children went down with it"
    );
    // The next request brings the session actor back under the new supervisor.
    assert_eq!(
        s.get("/api/v1/auth/me", user.token()).await.0,
        StatusCode::OK
    );
    s.wait_tree(&admin, "session actor back", |t| {
        find_actor(t, &sid).is_some()
    })
    .await;

    for k in 1..=4 {
        let (status, _) = s
            .post(
                "/api/v1/admin/actors/environments/crash",
                admin.token(),
                json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED);
        s.wait_tree(&admin, "environments supervisor", |t| {
            find_actor(t, "environments").is_some_and(|x| {
                if k <= 3 {
                    x["restarts"] == k && x["status"] == "running"
                } else {
                    x["status"] == "failed"
                }
            })
        })
        .await;
    }
    let (status, body) = s.get("/health/ready", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("actors")),
        "{body}"
    );
    assert!(
        body["checks"]["actors"]
            .as_str()
            .is_some_and(|d| d.contains("environments")),
        "{body}"
    );
    assert_eq!(body["checks"]["database"], "healthy");
    // The API itself keeps serving.
    assert_eq!(
        s.get("/api/v1/auth/me", user.token()).await.0,
        StatusCode::OK
    );
    s.stop().await;
}

async fn fault_injection_is_off_by_default(backend: Backend) {
    let s = TestServer::start_with(backend, |c| c.ops.fault_injection = false).await;
    let admin = s.admin("ops").await;
    let (status, body) = s
        .post(
            "/api/v1/admin/actors/sessions/crash",
            admin.token(),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("fault_injection_disabled"))
    );
    s.stop().await;
}
