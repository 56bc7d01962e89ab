//! Environments on the local provider (the embedded default) through the real server: the whole
//! lifecycle over real SSH, ownership, plan limits, validation, actor crashes and recovery.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Backend, Session, TestServer};

on_both_backends!(
    local_lifecycle,
    other_users_get_404_everywhere,
    limits_validation_and_conflicts,
    crashing_environment_actor_restarts_then_errors_and_recovers,
    environments_resume_after_a_server_restart,
    admins_manage_templates,
    an_override_of_a_builtin_template_survives_restarts,
);

fn id_of(env: &Value) -> String {
    env["id"].as_str().expect("id").to_string()
}

async fn local_lifecycle(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("lena").await;

    let (status, templates) = s.get("/api/v1/templates", None).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = templates
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    for t in [
        "ubuntu",
        "python",
        "nodejs",
        "golang",
        "rust",
        "coding-agent",
    ] {
        assert!(ids.contains(&t), "{t} missing from {ids:?}");
    }
    assert!(
        templates[0].get("user_data").is_none(),
        "user-data is not part of the listing"
    );
    let (_, langs) = s.get("/api/v1/templates?category=language", None).await;
    assert!(
        langs
            .as_array()
            .expect("list")
            .iter()
            .all(|t| t["category"] == "language")
    );
    let (status, one) = s.get("/api/v1/templates/python", None).await;
    assert_eq!(
        (status, one["id"].as_str()),
        (StatusCode::OK, Some("python"))
    );
    let (_, regions) = s.get("/api/v1/regions", None).await;
    assert_eq!(regions[0]["slug"], "local");
    let (_, sizes) = s.get("/api/v1/sizes", None).await;
    assert_eq!(sizes[0]["slug"], "local");
    assert!(sizes[0]["vcpus"].as_u64().is_some_and(|n| n >= 1));

    let created = s
        .post(
            "/api/v1/environments/",
            me.token(),
            json!({ "name": "Dev-Box", "template": "ubuntu", "environment_variables": { "GREETING": "hello from devpocket" } }),
        )
        .await;
    assert_eq!(created.0, StatusCode::CREATED, "{}", created.1);
    let env = created.1;
    assert_eq!(
        (env["status"].as_str(), env["name"].as_str()),
        (Some("creating"), Some("dev-box"))
    );
    let id = id_of(&env);

    let running = s.wait_status(&me, &id, "running").await;
    assert_eq!(running["progress"], 100);
    assert_eq!(running["installation_completed"], true);
    assert_eq!(running["ip_address"], "127.0.0.1");
    assert!(running["ssh_port"].as_i64().is_some_and(|p| p > 0));
    assert!(
        running["status_version"].as_i64().is_some_and(|v| v >= 4),
        "{running}"
    );

    // The logs hold the real installation output and every status change, in order.
    let (status, logs) = s
        .get(
            &format!("/api/v1/environments/{id}/logs?lines=1000"),
            me.token(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let messages: Vec<&str> = logs["logs"]
        .as_array()
        .expect("logs")
        .iter()
        .filter_map(|l| l["message"].as_str())
        .collect();
    assert!(
        messages.iter().any(|m| m.starts_with("git version")),
        "{messages:?}"
    );
    assert!(
        messages.contains(&"devpocket-progress: 100 ready"),
        "{messages:?}"
    );
    assert!(messages.contains(&"Environment ready"), "{messages:?}");
    assert_eq!(logs["environment_name"], "dev-box");
    let (_, two) = s
        .get(
            &format!("/api/v1/environments/{id}/logs?lines=2"),
            me.token(),
        )
        .await;
    assert_eq!(two["logs"].as_array().map(Vec::len), Some(2));
    assert_eq!(two["has_more"], true);
    let (status, _) = s
        .get(
            &format!("/api/v1/environments/{id}/logs?since=yesterday"),
            me.token(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Metrics are sampled from the environment itself (a sample needs the memory lines; the
    // environment's own processes may be well under 0.1 % of the host's memory).
    let metrics = wait_for_metrics(&s, &me, &id).await;
    let current = &metrics["current"];
    assert!(
        current["memory_usage"]
            .as_f64()
            .is_some_and(|m| (0.0..=100.0).contains(&m)),
        "{metrics}"
    );
    assert!(
        current["uptime"].as_u64().is_some_and(|u| u > 0),
        "{metrics}"
    );
    let (status, _) = s
        .get(
            &format!("/api/v1/environments/{id}/metrics?hours=169"),
            me.token(),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // Power actions.
    let (sr, mr) = (&s, &me);
    let act = |action: &'static str| {
        let path = format!("/api/v1/environments/{id}/{action}");
        async move { sr.post(&path, mr.token(), json!({})).await }
    };
    let (status, body) = act("start").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["detail"], "Cannot start environment in running state");
    let (status, body) = act("stop").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::ACCEPTED, Some("stopping"))
    );
    s.wait_status(&me, &id, "stopped").await;
    assert_eq!(act("start").await.0, StatusCode::ACCEPTED);
    s.wait_status(&me, &id, "running").await;
    assert_eq!(act("restart").await.0, StatusCode::ACCEPTED);
    s.wait_status(&me, &id, "running").await;

    // Snapshots.
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{id}/snapshot"),
            me.token(),
            json!({ "name": "before-change" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    s.wait_status(&me, &id, "running").await;
    let (_, snaps) = s
        .get(&format!("/api/v1/environments/{id}/snapshots"), me.token())
        .await;
    let snap = &snaps["snapshots"][0];
    assert_eq!(snap["name"], "before-change");
    let sid = snap["id"].as_str().expect("snapshot id");
    let (status, _) = s
        .post(
            &format!("/api/v1/environments/{id}/snapshots/{sid}/restore"),
            me.token(),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    s.wait_status(&me, &id, "running").await;
    let (status, _) = s
        .post(
            &format!("/api/v1/environments/{id}/snapshots/nope/restore"),
            me.token(),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Past the provider's quota (5 on the local provider) a snapshot is refused, and the
    // environment goes back to running instead of to error.
    for i in 0..5 {
        let (status, body) = s
            .post(
                &format!("/api/v1/environments/{id}/snapshot"),
                me.token(),
                json!({ "name": format!("more-{i}") }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        s.wait_status(&me, &id, "running").await;
    }
    let (_, snaps) = s
        .get(&format!("/api/v1/environments/{id}/snapshots"), me.token())
        .await;
    assert_eq!(
        snaps["snapshots"].as_array().map(Vec::len),
        Some(5),
        "{snaps}"
    );
    let (_, logs) = s
        .get(
            &format!("/api/v1/environments/{id}/logs?lines=20"),
            me.token(),
        )
        .await;
    assert!(
        logs.to_string()
            .contains("Snapshot refused by the provider"),
        "{logs}"
    );

    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{id}/resize"),
            me.token(),
            json!({ "size": "local" }),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("unsupported_by_provider")
        )
    );

    // Rename and variables.
    let (status, body) = s
        .send(
            s.request(
                Method::PUT,
                &format!("/api/v1/environments/{id}"),
                me.token(),
            )
            .json(&json!({ "name": "renamed", "environment_variables": { "A": "1" } })),
        )
        .await;
    assert_eq!(
        (status, body["name"].as_str()),
        (StatusCode::OK, Some("renamed")),
        "{body}"
    );
    assert_eq!(body["environment_variables"]["A"], "1");

    // Delete: deleting → terminated, and the row stays visible.
    let (status, body) = s
        .send(s.request(
            Method::DELETE,
            &format!("/api/v1/environments/{id}"),
            me.token(),
        ))
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::ACCEPTED, Some("deleting")),
        "{body}"
    );
    let gone = s.wait_status(&me, &id, "terminated").await;
    assert!(gone["status_version"].as_i64() > running["status_version"].as_i64());
    let (_, list) = s
        .get("/api/v1/environments?status=terminated", me.token())
        .await;
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    let (_, list) = s
        .get("/api/v1/environments?status_filter=running", me.token())
        .await;
    assert_eq!(list.as_array().map(Vec::len), Some(0));
    assert!(!s.workspaces_dir().join(&id).exists(), "workspace removed");
    let (status, _) = s
        .post(
            &format!("/api/v1/environments/{id}/start"),
            me.token(),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    // A terminated environment no longer counts against the plan.
    let second = id_of(&s.create_env(&me, "second", "ubuntu").await);
    s.wait_status(&me, &second, "running").await;
    // Deleting the account deletes its environments first.
    let (status, body) = s
        .send(
            s.request(Method::DELETE, "/api/v1/users/me", me.token())
                .json(&json!({ "password": support::PASSWORD })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        !s.workspaces_dir().join(&second).exists(),
        "workspace removed with the account"
    );
    s.stop().await;
}

async fn wait_for_metrics(s: &TestServer, me: &Session, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, m) = s
            .get(
                &format!("/api/v1/environments/{id}/metrics?hours=1"),
                me.token(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{m}");
        if !m["current"].is_null() {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no metrics sample: {m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn other_users_get_404_everywhere(backend: Backend) {
    let s = TestServer::start(backend).await;
    let owner = s.register("olive").await;
    let other = s.register("oscar").await;
    let env = s.create_env(&owner, "mine", "ubuntu").await;
    let id = id_of(&env);
    s.wait_status(&owner, &id, "running").await;
    let base = format!("/api/v1/environments/{id}");
    let routes: Vec<(Method, String, Value)> = vec![
        (Method::GET, base.clone(), Value::Null),
        (Method::PUT, base.clone(), json!({ "name": "stolen" })),
        (Method::DELETE, base.clone(), Value::Null),
        (Method::POST, format!("{base}/start"), json!({})),
        (Method::POST, format!("{base}/stop"), json!({})),
        (Method::POST, format!("{base}/restart"), json!({})),
        (Method::POST, format!("{base}/recover"), json!({})),
        (
            Method::POST,
            format!("{base}/snapshot"),
            json!({ "name": "x" }),
        ),
        (Method::GET, format!("{base}/snapshots"), Value::Null),
        (
            Method::POST,
            format!("{base}/snapshots/snap-1/restore"),
            json!({}),
        ),
        (
            Method::POST,
            format!("{base}/resize"),
            json!({ "size": "local" }),
        ),
        (Method::GET, format!("{base}/metrics"), Value::Null),
        (Method::GET, format!("{base}/logs"), Value::Null),
    ];
    for (method, path, body) in &routes {
        let mut req = s.request(method.clone(), path, other.token());
        if !body.is_null() {
            req = req.json(body);
        }
        let (status, answer) = s.send(req).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {answer}");
        assert_eq!(answer["detail"], "Environment not found");
    }
    let (_, list) = s.get("/api/v1/environments", other.token()).await;
    assert_eq!(list, json!([]));
    // Nothing happened to it.
    let (_, still) = s.get(&base, owner.token()).await;
    assert_eq!(
        (still["status"].as_str(), still["name"].as_str()),
        (Some("running"), Some("mine"))
    );
    // Unknown ids are 404 too, for the owner as well.
    let (status, _) = s
        .get(
            "/api/v1/environments/00000000-0000-0000-0000-000000000000",
            owner.token(),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(s.get(&base, None).await.0, StatusCode::UNAUTHORIZED);
    s.stop().await;
}

async fn limits_validation_and_conflicts(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("pam").await;
    let post = |body: Value| s.post("/api/v1/environments", me.token(), body);
    for (body, field) in [
        (json!({ "name": "ok", "template": "cobol" }), "template"),
        (json!({ "name": "-bad", "template": "ubuntu" }), "name"),
        (json!({ "name": "has space", "template": "ubuntu" }), "name"),
        (
            json!({ "name": "x".repeat(51), "template": "ubuntu" }),
            "name",
        ),
        (
            json!({ "name": "ok", "template": "ubuntu", "size": "huge" }),
            "size",
        ),
        (
            json!({ "name": "ok", "template": "ubuntu", "region": "mars" }),
            "region",
        ),
        (
            json!({ "name": "ok", "template": "ubuntu", "environment_variables": { "1BAD": "x" } }),
            "environment_variables.1BAD",
        ),
        (
            json!({ "name": "ok", "template": "ubuntu", "user_password": "short" }),
            "user_password",
        ),
    ] {
        let (status, answer) = post(body.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        assert!(
            answer["errors"]
                .as_array()
                .expect("errors")
                .iter()
                .any(|e| e["field"] == field),
            "{field}: {answer}"
        );
    }
    let (status, _) = post(json!({ "template": "ubuntu" })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = s
        .get("/api/v1/environments?status=sleeping", me.token())
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    let first = s.create_env(&me, "one", "python").await;
    // Free plan: one environment in any non-terminated state.
    let (status, answer) = post(json!({ "name": "two", "template": "ubuntu" })).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("plan_limit")),
        "{answer}"
    );
    s.make_plan("pam", devpocket::store::users::Plan::Starter)
        .await;
    let (status, answer) = post(json!({ "name": "one", "template": "ubuntu" })).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::CONFLICT, Some("name_taken"))
    );
    s.create_env(&me, "two", "ubuntu").await;
    s.create_env(&me, "three", "ubuntu").await;
    let (status, _) = post(json!({ "name": "four", "template": "ubuntu" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "starter allows 3");
    let (_, list) = s.get("/api/v1/environments", me.token()).await;
    assert_eq!(list.as_array().map(Vec::len), Some(3));
    let (_, profile) = s.get("/api/v1/users/me", me.token()).await;
    assert_eq!(profile["environments"]["total"], 3, "{profile}");
    let (status, _) = s
        .send(
            s.request(
                Method::PUT,
                &format!("/api/v1/environments/{}", id_of(&first)),
                me.token(),
            )
            .json(&json!({ "name": "two" })),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    s.stop().await;
}

async fn crashing_environment_actor_restarts_then_errors_and_recovers(backend: Backend) {
    let s = TestServer::start(backend).await;
    let admin = s.admin("ops").await;
    let me = s.register("quincy").await;
    let id = id_of(&s.create_env(&me, "fragile", "ubuntu").await);
    s.wait_status(&me, &id, "running").await;
    let actor = format!("environment:{id}");
    let crash = format!("/api/v1/admin/actors/{actor}/crash");

    assert_eq!(
        s.post(&crash, admin.token(), json!({})).await.0,
        StatusCode::ACCEPTED
    );
    let node = s
        .wait_actor(&admin, &actor, |n| {
            n["restarts"] == 1 && n["status"] == "running"
        })
        .await;
    assert_eq!(node["kind"], "environment");
    assert_eq!(node["owner"], me.user_id.as_str());
    assert_eq!(node["phase"], "running", "resumed from the store: {node}");
    let (_, env) = s
        .get(&format!("/api/v1/environments/{id}"), me.token())
        .await;
    assert_eq!(
        env["status"], "running",
        "a restart does not change the environment"
    );

    for n in 2..=3 {
        s.wait_actor(&admin, &actor, |x| x["status"] == "running")
            .await;
        assert_eq!(
            s.post(&crash, admin.token(), json!({})).await.0,
            StatusCode::ACCEPTED
        );
        s.wait_actor(&admin, &actor, |x| x["restarts"] == n).await;
    }
    s.wait_actor(&admin, &actor, |x| x["status"] == "running")
        .await;
    assert_eq!(
        s.post(&crash, admin.token(), json!({})).await.0,
        StatusCode::ACCEPTED
    );
    s.wait_actor(&admin, &actor, |x| x["status"] == "failed")
        .await;
    let env = s.wait_status(&me, &id, "error").await;
    assert!(
        env["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("actor failed")),
        "{env}"
    );
    // A command starts the actor again (in `error`, where it does nothing by itself): only
    // recover and delete are allowed there.
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{id}/stop"),
            me.token(),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "invalid_state", "{body}");
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{id}/recover"),
            me.token(),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    s.wait_status(&me, &id, "running").await;
    s.stop().await;
}

async fn environments_resume_after_a_server_restart(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("rosa").await;
    let id = id_of(&s.create_env(&me, "keeper", "ubuntu").await);
    let before = s.wait_status(&me, &id, "running").await;
    let s = s.restart().await;
    let admin = s.admin("ops").await;
    let node = s
        .wait_actor(&admin, &format!("environment:{id}"), |n| {
            n["status"] == "running"
        })
        .await;
    assert_eq!(node["phase"], "running");
    // Its actor works after the restart (the local workspace is re-attached).
    assert_eq!(
        s.post(
            &format!("/api/v1/environments/{id}/stop"),
            me.token(),
            json!({})
        )
        .await
        .0,
        StatusCode::ACCEPTED
    );
    let after = s.wait_status(&me, &id, "stopped").await;
    assert!(after["status_version"].as_i64() > before["status_version"].as_i64());
    s.stop().await;
}

async fn admins_manage_templates(backend: Backend) {
    let s = TestServer::start(backend).await;
    let admin = s.admin("boss").await;
    let user = s.register("worker").await;
    let mut template = serde_json::to_value(
        devpocket::templates::parse(include_str!("../templates/ubuntu.yaml")).expect("parses"),
    )
    .expect("json");
    template["name"] = json!("custom");
    template["display_name"] = json!("Custom box");
    let (status, _) = s
        .post("/api/v1/templates", user.token(), template.clone())
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = s
        .post("/api/v1/templates", admin.token(), template.clone())
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _) = s
        .post("/api/v1/templates", admin.token(), template.clone())
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, got) = s.get("/api/v1/templates/custom", None).await;
    assert_eq!(
        (
            status,
            got["display_name"].as_str(),
            got["builtin"].as_bool()
        ),
        (StatusCode::OK, Some("Custom box"), Some(false))
    );
    // A template whose user-data is not cloud-config is refused.
    let mut broken = template.clone();
    broken["user_data"] = json!("not: [cloud-config");
    let (status, body) = s
        .send(
            s.request(Method::PUT, "/api/v1/templates/custom", admin.token())
                .json(&broken),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, _) = s
        .send(
            s.request(Method::PUT, "/api/v1/templates/ubuntu", admin.token())
                .json(&template),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "name must match the path"
    );
    // Users can build from it.
    let env = s.create_env(&user, "from-custom", "custom").await;
    assert_eq!(env["template"], "custom");
    let (status, _) = s
        .send(s.request(Method::DELETE, "/api/v1/templates/ubuntu", admin.token()))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "built-ins stay");
    let (status, _) = s
        .send(s.request(Method::DELETE, "/api/v1/templates/custom", admin.token()))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        s.get("/api/v1/templates/custom", None).await.0,
        StatusCode::NOT_FOUND
    );
    s.stop().await;
}

async fn an_override_of_a_builtin_template_survives_restarts(backend: Backend) {
    let s = TestServer::start(backend).await;
    let admin = s.admin("boss").await;
    let mut python = serde_json::to_value(
        devpocket::templates::parse(include_str!("../templates/python.yaml")).expect("parses"),
    )
    .expect("json");
    python["display_name"] = json!("Python (house flavour)");
    let (status, body) = s
        .send(
            s.request(Method::PUT, "/api/v1/templates/python", admin.token())
                .json(&python),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let seen = |t: &Value| {
        (
            t["display_name"].as_str().map(str::to_string),
            t["builtin"].as_bool(),
            t["customized"].as_bool(),
        )
    };
    let house = (
        Some("Python (house flavour)".to_string()),
        Some(false),
        Some(true),
    );
    assert_eq!(
        seen(&s.get("/api/v1/templates/python", None).await.1),
        house
    );

    // A restart reloads the built-ins but keeps the admin's override.
    let s = s.restart().await;
    assert_eq!(
        seen(&s.get("/api/v1/templates/python", None).await.1),
        house
    );
    let (_, ubuntu) = s.get("/api/v1/templates/ubuntu", None).await;
    assert_eq!(
        (ubuntu["builtin"].as_bool(), ubuntu["customized"].as_bool()),
        (Some(true), Some(false))
    );

    // Deleting the override restores the shipped version at once.
    let (status, body) = s
        .send(s.request(Method::DELETE, "/api/v1/templates/python", admin.token()))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("built-in")),
        "{body}"
    );
    let (_, restored) = s.get("/api/v1/templates/python", None).await;
    assert_ne!(restored["display_name"], "Python (house flavour)");
    assert_eq!(
        (
            restored["builtin"].as_bool(),
            restored["customized"].as_bool()
        ),
        (Some(true), Some(false))
    );
    // ...and a built-in itself still cannot be deleted.
    let (status, _) = s
        .send(s.request(Method::DELETE, "/api/v1/templates/python", admin.token()))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    s.stop().await;
}
