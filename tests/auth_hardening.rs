//! Authentication under pressure, through the real server on both backends: password hashing that
//! never starves other requests, lockout that holds under concurrency (and looks the same for
//! unknown names), the password checks of signed-in users, bounded lockout storage, and refresh
//! tokens that survive lost replies and parallel refreshes.

mod support;

use chrono::Duration;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::terminal::{Ws, close_of, connect, ping_pong};
use support::{Backend, PASSWORD, Session, TestServer, session_id_of};

on_both_backends!(
    parallel_and_repeated_refreshes_get_the_same_pair,
    many_logins_never_starve_other_users,
    a_full_hash_queue_answers_503_on_credential_routes_only,
    concurrent_guesses_never_exceed_the_threshold,
    unknown_names_lock_exactly_like_accounts,
    password_checks_count_toward_the_lockout,
    lockout_storage_is_bounded_and_expires,
    a_session_that_ends_closes_its_logs_and_events_streams,
    a_locked_account_stays_locked_for_google,
    sessions_ended_here_are_refused_at_once_and_elsewhere_within_the_cache_bound,
);

async fn refresh(s: &TestServer, token: &str) -> (StatusCode, Value) {
    s.post(
        "/api/v1/auth/refresh",
        None,
        json!({ "refresh_token": token }),
    )
    .await
}

/// Audit events named `event` (newest first), read from the store.
async fn audit_events(s: &TestServer, event: &str) -> Vec<devpocket::store::audit::AuditEvent> {
    let app = &s.running().app;
    let mut conn = app.db.get().await.expect("conn");
    let filter = devpocket::store::audit::AuditFilter {
        event: Some(event.to_string()),
        limit: 10_000,
        ..Default::default()
    };
    devpocket::store::audit::query(&mut conn, &filter)
        .await
        .expect("audit")
        .0
}

fn detail(e: &devpocket::store::audit::AuditEvent) -> Value {
    e.detail
        .as_deref()
        .and_then(|d| serde_json::from_str(d).ok())
        .unwrap_or(Value::Null)
}

async fn parallel_and_repeated_refreshes_get_the_same_pair(backend: Backend) {
    let s = TestServer::start(backend).await;
    let user = s.register("phone").await;

    // Two refreshes with one token at once: both succeed, with the same successor pair.
    let ((a_status, a), (b_status, b)) =
        tokio::join!(refresh(&s, &user.refresh), refresh(&s, &user.refresh));
    assert_eq!(
        (a_status, b_status),
        (StatusCode::OK, StatusCode::OK),
        "{a} {b}"
    );
    assert_eq!(a["access_token"], b["access_token"]);
    assert_eq!(a["refresh_token"], b["refresh_token"]);
    let next = Session::from_auth(&a);
    assert_ne!(next.refresh, user.refresh);
    let other = Session::from_auth(&b);
    for token in [next.token(), other.token()] {
        assert_eq!(s.get("/api/v1/auth/me", token).await.0, StatusCode::OK);
    }

    // The reply was lost: a repeat one second later gets the same pair again.
    s.clock.advance(Duration::seconds(1));
    let (status, again) = refresh(&s, &user.refresh).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["refresh_token"], a["refresh_token"]);
    assert_eq!(again["access_token"], a["access_token"]);
    let expires_in = again["expires_in"].as_i64().expect("expires_in");
    assert!((1..30 * 60).contains(&expires_in), "{expires_in}");

    // The successor works as usual.
    let (status, body) = refresh(&s, &next.refresh).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let latest = Session::from_auth(&body);
    assert_eq!(
        s.get("/api/v1/auth/me", latest.token()).await.0,
        StatusCode::OK
    );

    // After the window, presenting the first token again is theft: refused, session gone.
    s.clock.advance(Duration::seconds(30));
    let (status, body) = refresh(&s, &user.refresh).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(
        s.get("/api/v1/auth/me", latest.token()).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        refresh(&s, &latest.refresh).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(audit_events(&s, "refresh_token_reuse").await.len(), 1);
    s.stop().await;
}

/// 100 concurrent logins for unknown accounts (rate limits lifted) while another user works:
/// that user never sees a 5xx, every login is a 401 or a 503 `auth_busy` with `Retry-After`, and
/// every failed login is in the audit trail. The pool is small and gives up after 2 s, far more
/// than the short queries it serves take, but far less than the 100 hashes (one at a time) that a
/// login holding its connection while it waits for the hasher would make everybody wait.
async fn many_logins_never_starve_other_users(backend: Backend) {
    const LOGINS: usize = 100;
    let s = TestServer::start_with(backend, |c| {
        c.database.max_connections = 4;
        c.database.acquire_timeout_seconds = 2;
        c.auth.hash_concurrency = 1;
        c.auth.hash_queue = 16;
    })
    .await;
    let worker = s.register("worker").await;
    let done = std::sync::atomic::AtomicBool::new(false);

    let logins = async {
        let statuses: Vec<(StatusCode, Option<String>, Value)> = (0..LOGINS)
            .map(|i| {
                let req = s.request(Method::POST, "/api/v1/auth/login", None).json(
                    &json!({ "username_or_email": format!("ghost{i}"), "password": "Wrong1234" }),
                );
                async move {
                    let resp = req.send().await.expect("sent");
                    let status = resp.status();
                    let retry = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    (
                        status,
                        retry,
                        resp.json::<Value>().await.unwrap_or(Value::Null),
                    )
                }
            })
            .collect::<FuturesUnordered<_>>()
            .collect()
            .await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        statuses
    };
    let other_user = async {
        let mut seen = Vec::new();
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            for path in ["/api/v1/environments", "/api/v1/auth/me"] {
                let (status, body) = s.get(path, worker.token()).await;
                seen.push((path, status, body));
            }
        }
        seen
    };
    let (logins, seen) = tokio::join!(logins, other_user);

    assert!(!seen.is_empty());
    for (path, status, body) in &seen {
        assert_eq!(*status, StatusCode::OK, "{path}: {body}");
    }
    let mut refused = 0;
    for (status, retry, body) in &logins {
        match *status {
            StatusCode::UNAUTHORIZED => {
                assert_eq!(body["detail"], "Incorrect username/email or password")
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                refused += 1;
                assert_eq!(body["code"], "auth_busy", "{body}");
                assert!(retry.is_some(), "Retry-After on {body}");
            }
            other => panic!("login answered {other}: {body}"),
        }
    }
    let failed = audit_events(&s, "login_failed").await;
    assert_eq!(failed.len(), LOGINS - refused, "every failed login audited");
    assert!(
        failed
            .iter()
            .all(|e| detail(e)["reason"] == "unknown_account" && e.user_id.is_none())
    );
    s.stop().await;
}

async fn a_full_hash_queue_answers_503_on_credential_routes_only(backend: Backend) {
    let s = TestServer::start_with(backend, |c| {
        c.auth.hash_concurrency = 1;
        c.auth.hash_queue = 0;
    })
    .await;
    let user = s.register("busy_bee").await;
    // Somebody holds the one place in the queue.
    let ticket = s.running().app.passwords.admit().expect("room");

    let resp = s
        .request(Method::POST, "/api/v1/auth/login", None)
        .json(&json!({ "username_or_email": "busy_bee", "password": PASSWORD }))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["code"], "auth_busy");
    assert_eq!(body["retry_after"], retry);
    assert!(body["detail"].is_string());
    let (status, body) = s
        .post(
            "/api/v1/auth/register",
            None,
            json!({ "username": "late", "email": "late@example.com", "password": PASSWORD }),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let (status, body) = s
        .post(
            "/api/v1/users/me/password",
            user.token(),
            json!({ "current_password": PASSWORD, "new_password": "Newer12345" }),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    // Everything else is unaffected.
    assert_eq!(
        s.get("/api/v1/auth/me", user.token()).await.0,
        StatusCode::OK
    );
    assert_eq!(
        s.get("/api/v1/environments", user.token()).await.0,
        StatusCode::OK
    );
    assert_eq!(refresh(&s, &user.refresh).await.0, StatusCode::OK);
    // A refused login was never evaluated, so it did not count toward the lockout.
    assert!(audit_events(&s, "login_failed").await.is_empty());

    drop(ticket);
    assert_eq!(s.login("busy_bee", PASSWORD).await.0, StatusCode::OK);
    s.stop().await;
}

/// Send `n` logins at once; returns the statuses in the order they were answered.
async fn concurrent_logins(
    s: &TestServer,
    login: &str,
    n: usize,
    password: &str,
) -> Vec<StatusCode> {
    (0..n)
        .map(|_| async { s.login(login, password).await.0 })
        .collect::<FuturesUnordered<_>>()
        .collect()
        .await
}

fn count(statuses: &[StatusCode], which: StatusCode) -> usize {
    statuses.iter().filter(|s| **s == which).count()
}

async fn concurrent_guesses_never_exceed_the_threshold(backend: Backend) {
    let s = TestServer::start(backend).await;
    let erin = s.register("erin").await;

    // Seven wrong guesses at once, and the right one while they are still being checked (sent
    // once two of them have been refused, i.e. all seven are counted): five are evaluated.
    let mut wrong: FuturesUnordered<_> = (0..7)
        .map(|_| async { s.login("erin", "Wrong1234").await.0 })
        .collect();
    let mut statuses = Vec::new();
    while count(&statuses, StatusCode::LOCKED) < 2 {
        statuses.push(wrong.next().await.expect("seven answers"));
    }
    let (right, rest) = tokio::join!(s.login("erin", PASSWORD), wrong.collect::<Vec<_>>());
    statuses.extend(rest);
    assert_eq!(right.0, StatusCode::LOCKED, "{}", right.1);
    assert_eq!(
        count(&statuses, StatusCode::UNAUTHORIZED),
        5,
        "{statuses:?}"
    );
    assert_eq!(count(&statuses, StatusCode::LOCKED), 2, "{statuses:?}");
    let failed = audit_events(&s, "login_failed").await;
    let evaluated = failed
        .iter()
        .filter(|e| detail(e)["reason"] == "bad_password")
        .count();
    assert_eq!(evaluated, 5, "only five guesses were checked");
    assert_eq!(
        failed.len(),
        8,
        "every failed login audited, locked ones too"
    );
    assert!(
        failed
            .iter()
            .all(|e| e.user_id.as_deref() == Some(erin.user_id.as_str()))
    );
    assert_eq!(audit_events(&s, "account_locked").await.len(), 1);

    // The same for a name without an account.
    let statuses = concurrent_logins(&s, "ghost", 8, "Wrong1234").await;
    assert_eq!(
        count(&statuses, StatusCode::UNAUTHORIZED),
        5,
        "{statuses:?}"
    );
    assert_eq!(count(&statuses, StatusCode::LOCKED), 3, "{statuses:?}");
    s.stop().await;
}

/// Six attempts, with their status, code, detail and Retry-After.
async fn six_attempts(s: &TestServer, login: &str) -> Vec<(StatusCode, Value, Option<String>)> {
    let mut seen = Vec::new();
    for _ in 0..6 {
        let resp = s
            .request(Method::POST, "/api/v1/auth/login", None)
            .json(&json!({ "username_or_email": login, "password": "Wrong1234" }))
            .send()
            .await
            .expect("sent");
        let status = resp.status();
        let retry = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body: Value = resp.json().await.expect("json");
        seen.push((status, json!([body["code"], body["detail"]]), retry));
    }
    seen
}

async fn unknown_names_lock_exactly_like_accounts(backend: Backend) {
    let s = TestServer::start_with(backend, |c| c.auth.lockout_minutes = 2).await;
    s.register("known").await;
    let known = six_attempts(&s, "known").await;
    let unknown = six_attempts(&s, "unknown").await;
    assert_eq!(known, unknown, "an attacker cannot tell which exists");
    let statuses: Vec<StatusCode> = known.iter().map(|k| k.0).collect();
    assert_eq!(
        statuses,
        [
            [StatusCode::UNAUTHORIZED; 5].as_slice(),
            &[StatusCode::LOCKED]
        ]
        .concat()
    );
    assert_eq!(known[5].1[0], "account_locked");
    assert_eq!(known[5].2.as_deref(), Some("120"));

    // Username and e-mail are one account: its lock holds for both, right password or not.
    assert_eq!(
        s.login("known@example.com", PASSWORD).await.0,
        StatusCode::LOCKED
    );
    s.clock.advance(Duration::seconds(121));
    assert_eq!(
        s.login("unknown", "Wrong1234").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(s.login("KNOWN", PASSWORD).await.0, StatusCode::OK);
    s.stop().await;
}

async fn password_checks_count_toward_the_lockout(backend: Backend) {
    let s = TestServer::start_with(backend, |c| c.auth.lockout_minutes = 2).await;
    let here = s.register("frank").await;
    let change = |current: &'static str| {
        s.post(
            "/api/v1/users/me/password",
            here.token(),
            json!({ "current_password": current, "new_password": "Newer12345" }),
        )
    };
    // Twelve wrong guesses: five are checked, the rest refused without checking.
    let mut seen = Vec::new();
    for _ in 0..12 {
        let (status, body) = change("Nope12345").await;
        seen.push((status, body["code"].as_str().map(str::to_string)));
    }
    for (i, (status, code)) in seen.iter().enumerate() {
        let expected = if i < 5 {
            (StatusCode::BAD_REQUEST, "wrong_password")
        } else {
            (StatusCode::LOCKED, "account_locked")
        };
        assert_eq!(
            (*status, code.as_deref()),
            (expected.0, Some(expected.1)),
            "guess {}",
            i + 1
        );
    }
    // The right current password is refused now too, and so is a login.
    assert_eq!(change(PASSWORD).await.0, StatusCode::LOCKED);
    assert_eq!(s.login("frank", PASSWORD).await.0, StatusCode::LOCKED);
    let (status, body) = s
        .send(
            s.request(Method::DELETE, "/api/v1/users/me", here.token())
                .json(&json!({ "password": PASSWORD })),
        )
        .await;
    assert_eq!(status, StatusCode::LOCKED, "{body}");
    let checked = audit_events(&s, "password_check_failed").await;
    assert_eq!(
        checked
            .iter()
            .filter(|e| detail(e)["reason"] == "bad_current_password")
            .count(),
        5
    );

    // Concurrent guesses on another account: still only five checked.
    let other = s.register("grace").await;
    let statuses: Vec<StatusCode> = (0..8)
        .map(|_| async {
            s.post(
                "/api/v1/users/me/password",
                other.token(),
                json!({ "current_password": "Nope12345", "new_password": "Newer12345" }),
            )
            .await
            .0
        })
        .collect::<FuturesUnordered<_>>()
        .collect()
        .await;
    assert_eq!(count(&statuses, StatusCode::BAD_REQUEST), 5, "{statuses:?}");
    assert_eq!(count(&statuses, StatusCode::LOCKED), 3, "{statuses:?}");

    // When the lock ends the right password works, and a success clears the counter.
    s.clock.advance(Duration::seconds(121));
    assert_eq!(change(PASSWORD).await.0, StatusCode::OK);
    for _ in 0..4 {
        assert_eq!(
            s.login("frank", "Wrong1234").await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(s.login("frank", "Newer12345").await.0, StatusCode::OK);
    assert_eq!(
        s.login("frank", "Wrong1234").await.0,
        StatusCode::UNAUTHORIZED
    );
    s.stop().await;
}

async fn attempt_rows(s: &TestServer) -> (i64, i64) {
    let mut conn = s.running().app.db.get().await.expect("conn");
    devpocket::store::login_attempts::counts(&mut conn)
        .await
        .expect("counts")
}

async fn sealed_successors(s: &TestServer) -> i64 {
    use devpocket::store::schema::sessions;
    use diesel::prelude::*;
    use diesel_async::RunQueryDsl;
    let mut conn = s.running().app.db.get().await.expect("conn");
    let conn = &mut conn;
    devpocket::db_run!(conn: {
        sessions::table
            .filter(sessions::successor_sealed.is_not_null())
            .count()
            .get_result::<i64>(conn)
            .await
            .expect("count")
    })
}

async fn lockout_storage_is_bounded_and_expires(backend: Backend) {
    let s = TestServer::start_with(backend, |c| c.auth.lockout_max_unknown_names = 3).await;
    let user = s.register("keeper").await;
    assert_eq!(refresh(&s, &user.refresh).await.0, StatusCode::OK);
    assert_eq!(sealed_successors(&s).await, 1);
    assert_eq!(
        s.login("keeper", "Wrong1234").await.0,
        StatusCode::UNAUTHORIZED
    );
    for i in 0..6 {
        let (status, _) = s.login(&format!("stranger{i}"), "Wrong1234").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        attempt_rows(&s).await,
        (1, 6),
        "swept at most once a minute"
    );

    // A minute later the next attempt sweeps: unknown names are capped at the newest three, and
    // the sealed refresh successor, past its grace window, is forgotten.
    s.clock.advance(Duration::seconds(61));
    assert_eq!(
        s.login("stranger9", "Wrong1234").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(attempt_rows(&s).await, (1, 3));
    assert_eq!(sealed_successors(&s).await, 0);

    // Past the lock window every counter has ended and is swept.
    s.clock.advance(Duration::minutes(31));
    assert_eq!(
        s.login("stranger10", "Wrong1234").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(attempt_rows(&s).await, (0, 1));
    s.stop().await;
}

/// The logs and events streams of `who`, admitted and live.
async fn streams(s: &TestServer, who: &Session, env: &str) -> (Ws, Ws) {
    let mut logs = connect(
        s,
        &format!("/api/v1/ws/logs/{env}?token={}&follow=true", who.access),
    )
    .await;
    let mut events = connect(s, &format!("/api/v1/ws/events?token={}", who.access)).await;
    ping_pong(&mut logs).await;
    ping_pong(&mut events).await;
    (logs, events)
}

async fn a_session_that_ends_closes_its_logs_and_events_streams(backend: Backend) {
    let s = TestServer::start(backend).await;
    let home = s.register("streamer").await;
    let env = s.create_env(&home, "watched", "ubuntu").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let s = &s;
    let login = |password: &'static str| async move {
        let (status, body) = s.login("streamer", password).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        Session::from_auth(&body)
    };
    let ended = (1008, "Session ended".to_string());
    let mut home_events = connect(s, &format!("/api/v1/ws/events?token={}", home.access)).await;
    ping_pong(&mut home_events).await;

    // Revoked from another session.
    let b = login(PASSWORD).await;
    let (mut logs, mut events) = streams(s, &b, &env).await;
    let (status, body) = s
        .send(s.request(
            Method::DELETE,
            &format!("/api/v1/users/me/sessions/{}", session_id_of(&b.access)),
            home.token(),
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(close_of(&mut logs).await, ended);
    assert_eq!(close_of(&mut events).await, ended);
    ping_pong(&mut home_events).await;

    // Logged out.
    let c = login(PASSWORD).await;
    let (mut logs, mut events) = streams(s, &c, &env).await;
    s.post("/api/v1/auth/logout", c.token(), json!({})).await;
    assert_eq!(close_of(&mut logs).await, ended);
    assert_eq!(close_of(&mut events).await, ended);

    // Signed out by a password change elsewhere.
    let d = login(PASSWORD).await;
    let (mut logs, mut events) = streams(s, &d, &env).await;
    let (status, body) = s
        .post(
            "/api/v1/users/me/password",
            home.token(),
            json!({ "current_password": PASSWORD, "new_password": "Newer12345" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(close_of(&mut logs).await, ended);
    assert_eq!(close_of(&mut events).await, ended);
    ping_pong(&mut home_events).await;

    // "Revoke all", this session included.
    let e = login("Newer12345").await;
    let (mut logs, mut events) = streams(s, &e, &env).await;
    let (status, body) = s
        .post(
            "/api/v1/users/me/sessions/revoke-all",
            home.token(),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(close_of(&mut logs).await, ended);
    assert_eq!(close_of(&mut events).await, ended);
    assert_eq!(close_of(&mut home_events).await, ended);

    // The account is deleted.
    let f = login("Newer12345").await;
    let mut events = connect(s, &format!("/api/v1/ws/events?token={}", f.access)).await;
    ping_pong(&mut events).await;
    let (status, body) = s
        .send(
            s.request(Method::DELETE, "/api/v1/users/me", f.token())
                .json(&json!({ "password": "Newer12345" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(close_of(&mut events).await, ended);
}

async fn a_locked_account_stays_locked_for_google(backend: Backend) {
    use support::jwks::{self, CLIENT_ID, JwksServer};
    let keys = JwksServer::start().await;
    let url = keys.url.clone();
    let s = TestServer::start_with(backend, move |c| {
        c.google.client_id = CLIENT_ID.into();
        c.google.jwks_url = url;
        c.auth.lockout_minutes = 2;
    })
    .await;
    let registrant = s.register("sam").await;
    for _ in 0..5 {
        assert_eq!(
            s.login("sam", "Wrong1234").await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    let google = |now| {
        let token = jwks::sign(&jwks::claims("google-sub-1", "sam@example.com", now), true);
        s.post("/api/v1/auth/google", None, json!({ "id_token": token }))
    };
    let (status, body) = google(s.now_ts()).await;
    assert_eq!(status, StatusCode::LOCKED, "{body}");
    assert_eq!(body["code"], "account_locked");
    // Refused before anything changed: nothing was claimed.
    assert_eq!(
        s.get("/api/v1/auth/me", registrant.token()).await.0,
        StatusCode::OK
    );
    assert!(audit_events(&s, "account_claimed").await.is_empty());
    s.clock.advance(Duration::seconds(121));
    let (status, body) = google(s.now_ts()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Unlocked, the unverified account is claimed.
    assert_eq!(audit_events(&s, "account_claimed").await.len(), 1);
    assert_eq!(
        s.get("/api/v1/auth/me", registrant.token()).await.0,
        StatusCode::UNAUTHORIZED
    );
    s.stop().await;
}

/// The per-request session check is cached (`auth.session_cache_seconds`, 2 s): a logout or
/// profile change on this node applies to the very next request; a revocation written by
/// someone else (another node, the CLI) applies once the cached rows are older than the bound.
async fn sessions_ended_here_are_refused_at_once_and_elsewhere_within_the_cache_bound(
    backend: Backend,
) {
    let s = TestServer::start(backend).await;
    let here = s.register("cached").await;
    let (status, _) = s.get("/api/v1/auth/me", Some(&here.access)).await;
    assert_eq!(status, StatusCode::OK);
    // A change on this node: seen at once.
    let (status, body) = s
        .send(
            s.request(Method::PUT, "/api/v1/users/me", Some(&here.access))
                .json(&json!({ "full_name": "Cache Aware" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, me) = s.get("/api/v1/auth/me", Some(&here.access)).await;
    assert_eq!(me["full_name"], "Cache Aware", "{me}");
    let (status, _) = s
        .post("/api/v1/auth/logout", Some(&here.access), json!({}))
        .await;
    assert!(status.is_success(), "{status}");
    let (status, _) = s.get("/api/v1/auth/me", Some(&here.access)).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "logged out here: refused at once"
    );

    // A revocation written elsewhere (as another node or the CLI would).
    let there = s.register("elsewhere").await;
    let (status, _) = s.get("/api/v1/auth/me", Some(&there.access)).await;
    assert_eq!(status, StatusCode::OK);
    {
        let app = &s.running().app;
        let mut conn = app.db.get().await.expect("conn");
        let now = devpocket::clock::db_now(app.clock.as_ref());
        let revoked = devpocket::store::sessions::revoke(
            &mut conn,
            &session_id_of(&there.access),
            "revoked_elsewhere",
            now,
        )
        .await
        .expect("revoke");
        assert!(revoked);
    }
    // Within the bound this node still answers from what it read (no query per request)...
    let (status, _) = s.get("/api/v1/auth/me", Some(&there.access)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "served from the cache within the bound"
    );
    // ...and no longer once the rows are older than it.
    let bound = s.running().app.config.auth.session_cache_seconds;
    assert_eq!(bound, 2, "the documented default");
    s.clock.advance(Duration::seconds(bound as i64));
    let (status, _) = s.get("/api/v1/auth/me", Some(&there.access)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "refused within {bound} s");
    s.stop().await;
}
