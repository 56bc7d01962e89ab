//! Accounts through the real server: register, login, refresh rotation and reuse, logout,
//! validation, lockout, password change, sessions, deletion, rate limits, persistence.

mod support;

use chrono::Duration;
use reqwest::{Method, StatusCode};
use serde_json::json;
use support::{Backend, PASSWORD, Session, TestServer, session_id_of};

on_both_backends!(
    register_login_refresh_logout,
    refresh_token_reuse_revokes_the_session,
    invalid_input_and_missing_tokens,
    lockout_after_five_failures_then_expiry,
    password_change_ends_other_sessions,
    sessions_list_and_revoke,
    delete_account,
    profile_update,
    secrets_persist_across_restart,
    audit_trail_for_admins,
    credential_endpoints_are_rate_limited,
    general_rate_limit_applies_to_the_api,
    registration_can_be_closed,
);

async fn register_login_refresh_logout(backend: Backend) {
    let s = TestServer::start(backend).await;
    let (status, body) = s
        .post(
            "/api/v1/auth/register",
            None,
            json!({ "username": "alice", "email": "Alice@Example.com", "password": PASSWORD, "full_name": "Alice A" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["expires_in"], 30 * 60);
    assert_eq!(body["user"]["email"], "alice@example.com");
    assert_eq!(body["user"]["subscription_plan"], "free");
    assert_eq!(body["user"]["full_name"], "Alice A");
    let first = Session::from_auth(&body);

    let (status, body) = s.login("ALICE@example.com", PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let second = Session::from_auth(&body);
    assert_ne!(session_id_of(&first.access), session_id_of(&second.access));

    let (status, me) = s.get("/api/v1/auth/me", second.token()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["username"], "alice");
    assert!(me["last_login"].is_string());

    let (status, body) = s
        .post(
            "/api/v1/auth/refresh",
            None,
            json!({ "refresh_token": second.refresh }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let rotated = Session::from_auth(&body);
    assert_ne!(rotated.refresh, second.refresh, "refresh token rotates");
    assert_eq!(
        session_id_of(&rotated.access),
        session_id_of(&second.access)
    );
    assert_eq!(
        s.get("/api/v1/auth/me", rotated.token()).await.0,
        StatusCode::OK
    );

    // Logout ends the first session at once, and only it.
    let (status, _) = s
        .post("/api/v1/auth/logout", first.token(), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = s.get("/api/v1/auth/me", first.token()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _) = s
        .post(
            "/api/v1/auth/refresh",
            None,
            json!({ "refresh_token": first.refresh }),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        s.get("/api/v1/auth/me", rotated.token()).await.0,
        StatusCode::OK
    );
    s.stop().await;
}

async fn refresh_token_reuse_revokes_the_session(backend: Backend) {
    let s = TestServer::start(backend).await;
    let user = s.register("bob").await;
    let (status, body) = s
        .post(
            "/api/v1/auth/refresh",
            None,
            json!({ "refresh_token": user.refresh }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let rotated = Session::from_auth(&body);

    // Somebody replays the spent token after the grace window (30 s): refused, and the whole
    // session dies with it.
    s.clock.advance(Duration::seconds(31));
    let (status, body) = s
        .post(
            "/api/v1/auth/refresh",
            None,
            json!({ "refresh_token": user.refresh }),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(
        s.get("/api/v1/auth/me", rotated.token()).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, _) = s
        .post(
            "/api/v1/auth/refresh",
            None,
            json!({ "refresh_token": rotated.refresh }),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Unknown tokens are simply refused.
    let (status, body) = s
        .post(
            "/api/v1/auth/refresh",
            None,
            json!({ "refresh_token": "dpr_nonsense" }),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["detail"], "Invalid refresh token");
    s.stop().await;
}

async fn invalid_input_and_missing_tokens(backend: Backend) {
    let s = TestServer::start(backend).await;
    let carol = s.register("carol").await;
    let register = |username: &str, email: &str, password: &str| json!({ "username": username, "email": email, "password": password });
    let (status, body) = s
        .post(
            "/api/v1/auth/register",
            None,
            register("carol2", "CAROL@example.com", PASSWORD),
        )
        .await;
    assert_eq!(
        (status, body["detail"].as_str()),
        (StatusCode::BAD_REQUEST, Some("Email already registered"))
    );
    let (status, body) = s
        .post(
            "/api/v1/auth/register",
            None,
            register("Carol", "other@example.com", PASSWORD),
        )
        .await;
    assert_eq!(
        (status, body["detail"].as_str()),
        (StatusCode::BAD_REQUEST, Some("Username already taken"))
    );

    let (status, body) = s
        .post(
            "/api/v1/auth/register",
            None,
            register("dave", "dave@example.com", "password"),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["code"], "validation_error");
    assert_eq!(body["errors"][0]["field"], "password");
    let (status, body) = s
        .post(
            "/api/v1/auth/register",
            None,
            register("dave", "not-an-email", PASSWORD),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["errors"][0]["field"], "email");
    let (status, body) = s
        .post(
            "/api/v1/auth/register",
            None,
            register("d", "dave@example.com", "short"),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["field"].as_str())
        .collect();
    assert_eq!(
        fields,
        ["username", "password"],
        "every problem reported: {body}"
    );
    let (status, body) = s
        .post("/api/v1/auth/register", None, json!({ "username": "dave" }))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = s
        .send(
            s.request(Method::POST, "/api/v1/auth/login", None)
                .header("content-type", "application/json")
                .body("{not json"),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_json"))
    );

    // Missing, garbage and wrong-type tokens: 401 with WWW-Authenticate.
    for token in [
        None,
        Some("garbage"),
        Some(carol.refresh.as_str()),
        Some("a.b.c"),
    ] {
        let resp = s
            .request(Method::GET, "/api/v1/auth/me", token)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        let body: serde_json::Value = resp.json().await.expect("json");
        assert!(body["detail"].is_string() && body["code"] == "unauthorized");
    }
    // Wrong password and unknown user read the same.
    let (status, body) = s.login("carol", "Wrong1234").await;
    assert_eq!(
        (status, body["detail"].as_str()),
        (
            StatusCode::UNAUTHORIZED,
            Some("Incorrect username/email or password")
        )
    );
    let (status, body2) = s.login("nobody", "Wrong1234").await;
    assert_eq!((status, &body2), (StatusCode::UNAUTHORIZED, &body));
    s.stop().await;
}

async fn lockout_after_five_failures_then_expiry(backend: Backend) {
    let s = TestServer::start_with(backend, |c| c.auth.lockout_minutes = 2).await;
    s.register("erin").await;
    for attempt in 1..=5 {
        let (status, _) = s.login("erin", "Wrong1234").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "attempt {attempt}");
    }
    let (status, body) = s.login("erin", "Wrong1234").await;
    assert_eq!(status, StatusCode::LOCKED, "{body}");
    assert_eq!(body["code"], "account_locked");
    let resp = s
        .request(Method::POST, "/api/v1/auth/login", None)
        .json(&json!({ "username_or_email": "erin", "password": PASSWORD }))
        .send()
        .await
        .expect("send");
    assert_eq!(
        resp.status(),
        StatusCode::LOCKED,
        "right password while locked"
    );
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number");
    assert!((1..=120).contains(&retry), "{retry}");

    // Still locked just before the end; open right after.
    s.clock.advance(Duration::seconds(119));
    assert_eq!(s.login("erin", PASSWORD).await.0, StatusCode::LOCKED);
    s.clock.advance(Duration::seconds(2));
    // The counter starts again: one wrong attempt is a 401, not a 423.
    assert_eq!(
        s.login("erin", "Wrong1234").await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, body) = s.login("erin", PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    s.stop().await;
}

async fn password_change_ends_other_sessions(backend: Backend) {
    let s = TestServer::start(backend).await;
    let here = s.register("frank").await;
    let (_, body) = s.login("frank", PASSWORD).await;
    let elsewhere = Session::from_auth(&body);

    let (status, body) = s
        .post(
            "/api/v1/users/me/password",
            here.token(),
            json!({ "current_password": "Nope12345", "new_password": "Newer12345" }),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("wrong_password"))
    );
    let (status, body) = s
        .post(
            "/api/v1/users/me/password",
            here.token(),
            json!({ "current_password": PASSWORD, "new_password": "weak" }),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = s
        .post(
            "/api/v1/users/me/password",
            here.token(),
            json!({ "current_password": PASSWORD, "new_password": "Newer12345" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["sessions_ended"], 1);

    assert_eq!(
        s.get("/api/v1/auth/me", elsewhere.token()).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, _) = s
        .post(
            "/api/v1/auth/refresh",
            None,
            json!({ "refresh_token": elsewhere.refresh }),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        s.get("/api/v1/auth/me", here.token()).await.0,
        StatusCode::OK
    );
    assert_eq!(s.login("frank", PASSWORD).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(s.login("frank", "Newer12345").await.0, StatusCode::OK);
    s.stop().await;
}

async fn sessions_list_and_revoke(backend: Backend) {
    let s = TestServer::start(backend).await;
    let a = s.register("grace").await;
    let b = Session::from_auth(&s.login("grace", PASSWORD).await.1);
    let c = Session::from_auth(&s.login("grace", PASSWORD).await.1);
    let other = s.register("heidi").await;

    let (status, body) = s.get("/api/v1/users/me/sessions", a.token()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["total"], 3);
    let current: Vec<&str> = body["sessions"]
        .as_array()
        .expect("list")
        .iter()
        .filter(|x| x["current"] == true)
        .filter_map(|x| x["id"].as_str())
        .collect();
    assert_eq!(current, [session_id_of(&a.access)]);

    // Another user's session id is not found; revoking b works.
    let path = format!("/api/v1/users/me/sessions/{}", session_id_of(&b.access));
    let (status, _) = s
        .send(s.request(Method::DELETE, &path, other.token()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(s.get("/api/v1/auth/me", b.token()).await.0, StatusCode::OK);
    let (status, _) = s.send(s.request(Method::DELETE, &path, a.token())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        s.get("/api/v1/auth/me", b.token()).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, _) = s.send(s.request(Method::DELETE, &path, a.token())).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "already revoked");

    let (status, body) = s
        .post(
            "/api/v1/users/me/sessions/revoke-all?keep_current=true",
            a.token(),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, body["revoked"].as_i64()),
        (StatusCode::OK, Some(1))
    );
    assert_eq!(
        s.get("/api/v1/auth/me", c.token()).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(s.get("/api/v1/auth/me", a.token()).await.0, StatusCode::OK);
    let (status, body) = s
        .post("/api/v1/users/me/sessions/revoke-all", a.token(), json!({}))
        .await;
    assert_eq!(
        (status, body["revoked"].as_i64()),
        (StatusCode::OK, Some(1))
    );
    assert_eq!(
        s.get("/api/v1/auth/me", a.token()).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        s.get("/api/v1/auth/me", other.token()).await.0,
        StatusCode::OK
    );
    s.stop().await;
}

async fn delete_account(backend: Backend) {
    let s = TestServer::start(backend).await;
    let ivan = s.register("ivan").await;
    let del = |password: serde_json::Value| {
        s.request(Method::DELETE, "/api/v1/users/me", ivan.token())
            .json(&json!({ "password": password }))
    };
    assert_eq!(
        s.send(del(json!("Wrong1234"))).await.0,
        StatusCode::BAD_REQUEST
    );
    let (status, body) = s
        .send(s.request(Method::DELETE, "/api/v1/users/me", ivan.token()))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(s.send(del(json!(PASSWORD))).await.0, StatusCode::OK);
    assert_eq!(
        s.get("/api/v1/auth/me", ivan.token()).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(s.login("ivan", PASSWORD).await.0, StatusCode::UNAUTHORIZED);
    // The name and address are free again.
    s.register("ivan").await;
    s.stop().await;
}

async fn profile_update(backend: Backend) {
    let s = TestServer::start(backend).await;
    let judy = s.register("judy").await;
    s.register("mallory").await;
    let put = |body: serde_json::Value| {
        s.request(Method::PUT, "/api/v1/users/me/", judy.token())
            .json(&body)
    };
    let (status, body) = s.send(put(json!({ "full_name": "Judy J", "username": "judy2", "avatar_url": "https://x.example/a.png" }))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["full_name"].as_str(), body["username"].as_str()),
        (Some("Judy J"), Some("judy2"))
    );
    let (status, body) = s.send(put(json!({ "username": "MALLORY" }))).await;
    assert_eq!(
        (status, body["detail"].as_str()),
        (StatusCode::BAD_REQUEST, Some("Username already taken"))
    );
    let (status, body) = s
        .send(put(
            json!({ "username": "no spaces", "avatar_url": "javascript:alert(1)" }),
        ))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["errors"].as_array().map(Vec::len), Some(2), "{body}");
    let (status, body) = s.get("/api/v1/users/me", judy.token()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["username"], "judy2");
    assert_eq!(body["active_sessions"], 1);
    assert_eq!(body["plan_limits"]["max_environments"], 1);
    assert_eq!(s.login("judy2", PASSWORD).await.0, StatusCode::OK);
    s.stop().await;
}

async fn secrets_persist_across_restart(backend: Backend) {
    let s = TestServer::start(backend).await;
    let kim = s.register("kim").await;
    let data = s.data_dir();
    let key_before = std::fs::read(data.join("jwt.key")).expect("jwt key written");
    let s = s.restart().await;
    assert_eq!(
        std::fs::read(data.join("jwt.key")).expect("still there"),
        key_before
    );
    {
        use std::os::unix::fs::PermissionsExt;
        for file in ["jwt.key", "seal.key"] {
            let mode = std::fs::metadata(data.join(file))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
    }
    let (status, body) = s.get("/api/v1/auth/me", kim.token()).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "old access token still valid: {body}"
    );
    let (status, _) = s
        .post(
            "/api/v1/auth/refresh",
            None,
            json!({ "refresh_token": kim.refresh }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "old refresh token still valid");
    s.stop().await;
}

async fn audit_trail_for_admins(backend: Backend) {
    let s = TestServer::start(backend).await;
    let admin = s.admin("root_admin").await;
    let leo = s.register("leo").await;
    assert_eq!(
        s.login("leo", "Wrong1234").await.0,
        StatusCode::UNAUTHORIZED
    );
    s.post("/api/v1/auth/logout", leo.token(), json!({})).await;

    let (status, _) = s.get("/api/v1/admin/audit", leo.token()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "logged out");
    let other = s.register("other_user").await;
    assert_eq!(
        s.get("/api/v1/admin/audit", other.token()).await.0,
        StatusCode::FORBIDDEN
    );

    let (status, page) = s
        .get(
            &format!("/api/v1/admin/audit?user_id={}", leo.user_id),
            admin.token(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let events: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|e| e["event"].as_str())
        .collect();
    assert_eq!(
        events,
        ["logout", "login_failed", "register"],
        "newest first"
    );
    let failed = &page["items"][1];
    assert_eq!(failed["ip_address"], "127.0.0.1");
    assert!(failed["request_id"].as_str().is_some_and(|r| !r.is_empty()));
    assert!(
        !page.to_string().contains("Wrong1234"),
        "no secrets in the trail"
    );

    let (_, page) = s
        .get("/api/v1/admin/audit?event=register&limit=1", admin.token())
        .await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(page["total"], 3);
    assert_eq!(page["has_more"], true);
    let (_, page2) = s
        .get(
            "/api/v1/admin/audit?event=register&limit=1&offset=1",
            admin.token(),
        )
        .await;
    assert_ne!(page2["items"][0]["id"], page["items"][0]["id"]);
    let (status, body) = s
        .get("/api/v1/admin/audit?since=yesterday", admin.token())
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, _) = s.get("/api/v1/admin/audit?limit=0", admin.token()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    s.stop().await;
}

async fn credential_endpoints_are_rate_limited(backend: Backend) {
    let s = TestServer::start_with(backend, |c| c.rate_limit.auth_per_minute = 3).await;
    for _ in 0..3 {
        assert_eq!(
            s.login("nobody", "Wrong1234").await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    let resp = s
        .request(Method::POST, "/api/v1/auth/login", None)
        .json(&json!({ "username_or_email": "nobody", "password": "Wrong1234" }))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("secs");
    assert!((1..=60).contains(&retry));
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["code"], "rate_limited");
    assert_eq!(body["retry_after"], retry);
    // The general quota is separate: health and other API calls still work.
    assert_eq!(s.get("/api/v1/info", None).await.0, StatusCode::OK);
    s.stop().await;
}

async fn general_rate_limit_applies_to_the_api(backend: Backend) {
    let s = TestServer::start_with(backend, |c| c.rate_limit.per_minute = 5).await;
    for _ in 0..5 {
        assert_eq!(s.get("/api/v1/info", None).await.0, StatusCode::OK);
    }
    assert_eq!(
        s.get("/api/v1/info", None).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        s.get("/health", None).await.0,
        StatusCode::OK,
        "probes are exempt"
    );
    s.stop().await;
}

async fn registration_can_be_closed(backend: Backend) {
    let s = TestServer::start_with(backend, |c| {
        c.server.registration = devpocket::config::Registration::Closed
    })
    .await;
    let (status, body) = s
        .post(
            "/api/v1/auth/register",
            None,
            json!({ "username": "zed", "email": "z@example.com", "password": PASSWORD }),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("registration_closed"))
    );
    s.stop().await;
}
