//! Google sign-in against a JWKS served by the test (real HTTP), with tokens signed by test keys.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::jwks::{self, CLIENT_ID, JwksServer};
use support::terminal::{close_of, connect, ping_pong};
use support::{Backend, PASSWORD, Session, TestServer};

on_both_backends!(
    google_sign_in_links_and_creates,
    google_claims_an_account_whose_email_we_never_verified,
    a_login_in_flight_cannot_outlive_a_claim,
    parallel_logins_never_outlive_a_claim,
    google_links_a_verified_account_without_revoking,
    unverified_google_email_never_claims,
    link_and_unlink_google_from_the_profile,
    google_rejects_bad_tokens,
    google_not_configured_is_503,
);

async fn server(backend: Backend, jwks: &JwksServer) -> TestServer {
    let url = jwks.url.clone();
    TestServer::start_with(backend, move |c| {
        c.google.client_id = CLIENT_ID.into();
        c.google.jwks_url = url;
    })
    .await
}

/// Audit events named `event` (newest first), with their detail, read from the store.
async fn audit_events(s: &TestServer, event: &str) -> Vec<(Option<String>, Value)> {
    let app = &s.running().app;
    let mut conn = app.db.get().await.expect("conn");
    let filter = devpocket::store::audit::AuditFilter {
        event: Some(event.to_string()),
        limit: 1000,
        ..Default::default()
    };
    devpocket::store::audit::query(&mut conn, &filter)
        .await
        .expect("audit")
        .0
        .into_iter()
        .map(|e| {
            let detail = e
                .detail
                .as_deref()
                .and_then(|d| serde_json::from_str(d).ok())
                .unwrap_or(Value::Null);
            (e.user_id, detail)
        })
        .collect()
}

async fn google_sign_in(s: &TestServer, sub: &str, email: &str) -> (StatusCode, Value) {
    let token = jwks::sign(&jwks::claims(sub, email, s.now_ts()), true);
    s.post("/api/v1/auth/google", None, json!({ "id_token": token }))
        .await
}

async fn set_password(s: &TestServer, who: &Session, body: Value) -> (StatusCode, Value) {
    s.post("/api/v1/users/me/password", who.token(), body).await
}

async fn link(s: &TestServer, who: &Session, sub: &str, email: &str) -> (StatusCode, Value) {
    let token = jwks::sign(&jwks::claims(sub, email, s.now_ts()), true);
    s.post(
        "/api/v1/users/me/google",
        who.token(),
        json!({ "id_token": token }),
    )
    .await
}

async fn unlink(s: &TestServer, who: &Session) -> (StatusCode, Value) {
    s.send(s.request(Method::DELETE, "/api/v1/users/me/google", who.token()))
        .await
}

/// A Google-created account (verified e-mail, no password) that then sets a password.
async fn google_account_with_password(s: &TestServer, sub: &str, email: &str) -> Session {
    let (status, body) = google_sign_in(s, sub, email).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"]["is_verified"], true);
    let me = Session::from_auth(&body);
    let (status, body) = set_password(s, &me, json!({ "new_password": PASSWORD })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    me
}

async fn google_sign_in_links_and_creates(backend: Backend) {
    let keys = JwksServer::start().await;
    let s = server(backend, &keys).await;
    let now = s.now_ts();
    // A Google account that set a password and unlinked Google: verified, not linked.
    let existing = google_account_with_password(&s, "google-sub-0", "sam@example.com").await;
    assert_eq!(unlink(&s, &existing).await.0, StatusCode::OK);

    // Links to the existing account by verified e-mail (ours and Google's).
    let token = jwks::sign(&jwks::claims("google-sub-1", "SAM@example.com", now), true);
    let (status, body) = s
        .post("/api/v1/auth/google", None, json!({ "id_token": token }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"]["id"], existing.user_id.as_str());
    assert_eq!(body["user"]["is_verified"], true);
    assert_eq!(body["user"]["avatar_url"], "https://example.com/avatar.png");
    // Then by google id (the `token` spelling works too), even if the e-mail changed at Google.
    let token = jwks::sign(
        &jwks::claims("google-sub-1", "renamed@example.com", now),
        true,
    );
    let (status, body) = s
        .post("/api/v1/auth/google", None, json!({ "token": token }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"]["id"], existing.user_id.as_str());
    // The password still works alongside.
    assert_eq!(s.login("sam@example.com", PASSWORD).await.0, StatusCode::OK);

    // A new person gets a new account with a username from the address.
    let token = jwks::sign(
        &jwks::claims("google-sub-2", "tina.t@example.com", now),
        true,
    );
    let (status, body) = s
        .post("/api/v1/auth/google", None, json!({ "id_token": token }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"]["username"], "tinat");
    assert_eq!(body["user"]["email"], "tina.t@example.com");
    let access = body["access_token"].as_str().expect("token");
    assert_eq!(
        s.get("/api/v1/auth/me", Some(access)).await.0,
        StatusCode::OK
    );
    // Keys were fetched once and cached.
    assert_eq!(keys.fetch_count(), 1);
    s.stop().await;
}

/// Someone registers the victim's address with a password, signs in twice, keeps an events
/// socket open and links their own Google account; the victim signs in with Google and takes the
/// account over: the registrant's password, tokens, socket and Google link stop working.
async fn google_claims_an_account_whose_email_we_never_verified(backend: Backend) {
    let keys = JwksServer::start().await;
    let s = server(backend, &keys).await;
    let (status, body) = s
        .post(
            "/api/v1/auth/register",
            None,
            json!({ "username": "mallory", "email": "victim@example.com", "password": PASSWORD }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["user"]["is_verified"], false);
    let first = Session::from_auth(&body);
    let (status, body) = s.login("victim@example.com", PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let second = Session::from_auth(&body);
    let mut events = connect(&s, &format!("/api/v1/ws/events?token={}", second.access)).await;
    ping_pong(&mut events).await;
    // The registrant's own Google account, linked: it does not verify victim@ (another e-mail).
    let (status, body) = link(&s, &first, "google-mallory", "mallory@gmail.example").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["is_verified"], false);

    let (status, body) = google_sign_in(&s, "google-victim", "victim@example.com").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"]["id"], first.user_id.as_str());
    assert_eq!(body["user"]["is_verified"], true);
    let victim = Session::from_auth(&body);

    // The registrant is out: password, access tokens, refresh tokens, socket, Google link.
    assert_eq!(
        close_of(&mut events).await,
        (1008, "Session ended".to_string())
    );
    assert_eq!(
        s.login("victim@example.com", PASSWORD).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        s.login("mallory", PASSWORD).await.0,
        StatusCode::UNAUTHORIZED
    );
    for old in [&first, &second] {
        assert_eq!(
            s.get("/api/v1/auth/me", old.token()).await.0,
            StatusCode::UNAUTHORIZED
        );
        let (status, _) = s
            .post(
                "/api/v1/auth/refresh",
                None,
                json!({ "refresh_token": old.refresh }),
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, body) = google_sign_in(&s, "google-mallory", "mallory@gmail.example").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_ne!(
        body["user"]["id"],
        first.user_id.as_str(),
        "the registrant's Google gets an account of its own"
    );

    // Audited, with what was taken away.
    let claims = audit_events(&s, "account_claimed").await;
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].0.as_deref(), Some(first.user_id.as_str()));
    assert_eq!(claims[0].1["password_removed"], true);
    assert_eq!(claims[0].1["google_replaced"], true);
    assert_eq!(claims[0].1["sessions_ended"], 2);

    // The victim's session lives; only the victim's session.
    let (status, body) = s.get("/api/v1/users/me/sessions", victim.token()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["total"], 1);
    // Unlinking Google now would leave no way in.
    let (status, body) = unlink(&s, &victim).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("last_sign_in_method"))
    );
    // A password is set from the profile without a current one, and then works.
    let (status, body) = set_password(&s, &victim, json!({ "new_password": "Victim12345" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(audit_events(&s, "password_set").await.len(), 1);
    assert_eq!(
        s.login("victim@example.com", PASSWORD).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        s.login("victim@example.com", "Victim12345").await.0,
        StatusCode::OK
    );
    // From now on, changing it needs the current one.
    let (status, body) = set_password(&s, &victim, json!({ "new_password": "Other12345" })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = set_password(
        &s,
        &victim,
        json!({ "current_password": "Wrong12345", "new_password": "Other12345" }),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("wrong_password"))
    );
    // A second Google sign-in finds the account by Google id and claims nothing.
    let (status, body) = google_sign_in(&s, "google-victim", "victim@example.com").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(audit_events(&s, "account_claimed").await.len(), 1);
    assert_eq!(
        s.get("/api/v1/auth/me", victim.token()).await.0,
        StatusCode::OK
    );
    s.stop().await;
}

/// A password login that was verified against the registrant's password but opens its session
/// only after the claim must not get in: the session is opened only while the password checked
/// is still the account's (here the store call is made directly with the pre-claim hash).
async fn a_login_in_flight_cannot_outlive_a_claim(backend: Backend) {
    let keys = JwksServer::start().await;
    let s = server(backend, &keys).await;
    let registrant = s.register("victim").await;
    let app = &s.running().app;
    let mut conn = app.db.get().await.expect("conn");
    let before = devpocket::store::users::by_id(&mut conn, &registrant.user_id)
        .await
        .expect("query")
        .expect("user");
    let hash = before.password_hash.clone().expect("a password");
    let (status, body) = google_sign_in(&s, "google-victim", "victim@example.com").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let now = devpocket::clock::db_now(app.clock.as_ref());
    let session = devpocket::store::sessions::Session {
        id: uuid::Uuid::new_v4().to_string(),
        user_id: registrant.user_id.clone(),
        user_agent: None,
        ip_address: None,
        created_at: now,
        last_used_at: now,
        expires_at: now + chrono::Duration::days(1),
        revoked_at: None,
        revoked_reason: None,
    };
    let created =
        devpocket::store::sessions::create_if_password(&mut conn, &session, "late-hash", &hash)
            .await
            .expect("store");
    assert!(!created, "a session opened on a removed password");
    assert!(
        devpocket::store::sessions::with_user(&mut conn, &session.id)
            .await
            .expect("query")
            .is_none()
    );
    drop(conn);
    s.stop().await;
}

/// Password logins running in parallel with the claim: whichever got a session, none survives
/// it (each either finished before the claim and was revoked by it, or found the password gone).
async fn parallel_logins_never_outlive_a_claim(backend: Backend) {
    // Below the lockout threshold (5): attempts in flight count toward it, so 5 parallel
    // logins would lock the account for the Google sign-in as well.
    const LOGINS: usize = 4;
    let keys = JwksServer::start().await;
    let s = server(backend, &keys).await;
    s.register("victim").await;
    let s = &s;
    let logins = (0..LOGINS).map(|_| async move { s.login("victim", PASSWORD).await });
    let (results, (status, body)) = tokio::join!(
        futures_util::future::join_all(logins),
        google_sign_in(s, "google-victim", "victim@example.com"),
    );
    assert_eq!(status, StatusCode::OK, "{body}");
    let victim = Session::from_auth(&body);
    for (status, body) in results {
        match status {
            StatusCode::OK => {
                let late = Session::from_auth(&body);
                assert_eq!(
                    s.get("/api/v1/auth/me", late.token()).await.0,
                    StatusCode::UNAUTHORIZED,
                    "a password session outlived the claim"
                );
            }
            // Refused after the claim (401; the failures count toward the lockout, so 423
            // once there were enough), or the hashing queue was full (503).
            StatusCode::UNAUTHORIZED | StatusCode::LOCKED | StatusCode::SERVICE_UNAVAILABLE => {}
            other => panic!("login answered {other}: {body}"),
        }
    }
    let (status, body) = s.get("/api/v1/users/me/sessions", victim.token()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["total"], 1,
        "only the claimant's session lives: {body}"
    );
    let (status, body) = s.login("victim", PASSWORD).await;
    assert!(
        status == StatusCode::UNAUTHORIZED || status == StatusCode::LOCKED,
        "{status}: {body}"
    );
}

/// An account whose e-mail we verified (through Google) is linked, never claimed: its password
/// and sessions keep working. One linked to another Google identity refuses a different one.
async fn google_links_a_verified_account_without_revoking(backend: Backend) {
    let keys = JwksServer::start().await;
    let s = server(backend, &keys).await;
    let me = google_account_with_password(&s, "google-old", "vera@example.com").await;
    assert_eq!(unlink(&s, &me).await.0, StatusCode::OK);
    let (status, body) = s.login("vera@example.com", PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let by_password = Session::from_auth(&body);
    let mut events = connect(
        &s,
        &format!("/api/v1/ws/events?token={}", by_password.access),
    )
    .await;
    ping_pong(&mut events).await;

    let (status, body) = google_sign_in(&s, "google-new", "vera@example.com").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"]["id"], me.user_id.as_str());
    for session in [&me, &by_password] {
        assert_eq!(
            s.get("/api/v1/auth/me", session.token()).await.0,
            StatusCode::OK
        );
    }
    ping_pong(&mut events).await;
    assert_eq!(
        s.login("vera@example.com", PASSWORD).await.0,
        StatusCode::OK
    );
    assert!(audit_events(&s, "account_claimed").await.is_empty());

    // Now linked to google-new: another Google identity with the same e-mail is refused.
    let (status, body) = google_sign_in(&s, "google-third", "vera@example.com").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("google_already_linked"))
    );
    assert_eq!(
        s.get("/api/v1/auth/me", by_password.token()).await.0,
        StatusCode::OK
    );
    s.stop().await;
}

/// A Google token whose e-mail Google did not verify never matches an account by e-mail.
async fn unverified_google_email_never_claims(backend: Backend) {
    let keys = JwksServer::start().await;
    let s = server(backend, &keys).await;
    let registrant = s.register("wendy").await;
    for unverified in [json!(false), json!("false"), Value::Null] {
        let mut claims = jwks::claims("google-wendy", "wendy@example.com", s.now_ts());
        claims["email_verified"] = unverified.clone();
        let token = jwks::sign(&claims, true);
        let (status, body) = s
            .post("/api/v1/auth/google", None, json!({ "id_token": token }))
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{unverified}: {body}");
    }
    assert_eq!(
        s.get("/api/v1/auth/me", registrant.token()).await.0,
        StatusCode::OK
    );
    let (status, body) = s.login("wendy", PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"]["is_verified"], false);
    assert!(audit_events(&s, "account_claimed").await.is_empty());
    s.stop().await;
}

async fn link_and_unlink_google_from_the_profile(backend: Backend) {
    let keys = JwksServer::start().await;
    let s = server(backend, &keys).await;
    let lena = s.register("lena").await;
    let omar = s.register("omar").await;

    // Signed in only; a token is required and verified.
    let token = jwks::sign(
        &jwks::claims("google-lena", "lena@example.com", s.now_ts()),
        true,
    );
    let (status, _) = s
        .post(
            "/api/v1/users/me/google",
            None,
            json!({ "id_token": token }),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = s
        .post("/api/v1/users/me/google", lena.token(), json!({}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = s
        .post(
            "/api/v1/users/me/google",
            lena.token(),
            json!({ "id_token": jwks::sign(&jwks::claims("google-lena", "lena@example.com", s.now_ts()), false) }),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Linking Google with the account's own (verified) address verifies it; twice is fine.
    let (status, body) = link(&s, &lena, "google-lena", "lena@example.com").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["id"], lena.user_id.as_str());
    assert_eq!(body["is_verified"], true);
    assert_eq!(
        link(&s, &lena, "google-lena", "lena@example.com").await.0,
        StatusCode::OK
    );
    assert_eq!(audit_events(&s, "google_linked").await.len(), 1);
    // Sign-in with it finds lena; the password still works.
    let (status, body) = google_sign_in(&s, "google-lena", "lena@example.com").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"]["id"], lena.user_id.as_str());
    assert_eq!(s.login("lena", PASSWORD).await.0, StatusCode::OK);

    // Someone else's Google account, or a second one, is refused.
    let (status, body) = link(&s, &omar, "google-lena", "lena@example.com").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("google_linked_elsewhere"))
    );
    let (status, body) = link(&s, &lena, "google-lena-2", "lena2@example.com").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("google_already_linked"))
    );
    // A Google account with another address may be linked; it verifies nothing.
    let (status, body) = link(&s, &omar, "google-omar", "omar.private@gmail.example").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["is_verified"], false);
    assert_eq!(body["email"], "omar@example.com");

    // Unlink: lena has a password, so it is allowed; then there is nothing to unlink.
    let (status, body) = unlink(&s, &lena).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = unlink(&s, &lena).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("google_not_linked"))
    );
    assert_eq!(audit_events(&s, "google_unlinked").await.len(), 1);
    // Google no longer signs in to lena: her (verified) account is linked again by e-mail.
    let (status, body) = google_sign_in(&s, "google-lena", "lena@example.com").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"]["id"], lena.user_id.as_str());
    assert!(audit_events(&s, "account_claimed").await.is_empty());
    assert_eq!(
        s.get("/api/v1/auth/me", lena.token()).await.0,
        StatusCode::OK
    );

    // A Google-only account cannot unlink until it sets a password.
    let (status, body) = google_sign_in(&s, "google-gus", "gus@example.com").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let gus = Session::from_auth(&body);
    let (status, body) = unlink(&s, &gus).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("last_sign_in_method"))
    );
    assert_eq!(
        google_sign_in(&s, "google-gus", "gus@example.com").await.0,
        StatusCode::OK
    );
    let (status, body) = set_password(&s, &gus, json!({ "new_password": PASSWORD })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(unlink(&s, &gus).await.0, StatusCode::OK);
    assert_eq!(s.login("gus@example.com", PASSWORD).await.0, StatusCode::OK);
    s.stop().await;
}

async fn google_rejects_bad_tokens(backend: Backend) {
    let keys = JwksServer::start().await;
    let s = server(backend, &keys).await;
    let now = s.now_ts();
    let base = jwks::claims("google-sub-9", "uma@example.com", now);
    let with = |field: &str, value: serde_json::Value| {
        let mut c = base.clone();
        c[field] = value;
        c
    };
    let cases = [
        (
            "wrong audience",
            jwks::sign(&with("aud", json!("someone-else")), true),
        ),
        (
            "wrong issuer",
            jwks::sign(&with("iss", json!("https://evil.example")), true),
        ),
        ("expired", jwks::sign(&with("exp", json!(now - 3600)), true)),
        ("bad signature", jwks::sign(&base, false)),
        (
            "unverified email",
            jwks::sign(&with("email_verified", json!(false)), true),
        ),
        ("not a jwt", "definitely-not-a-token".to_string()),
    ];
    for (case, token) in cases {
        let (status, body) = s
            .post("/api/v1/auth/google", None, json!({ "id_token": token }))
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{case}: {body}");
        assert!(body["detail"].is_string(), "{case}");
    }
    let (status, _) = s.post("/api/v1/auth/google", None, json!({})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // The good token still works afterwards.
    let (status, _) = s
        .post(
            "/api/v1/auth/google",
            None,
            json!({ "id_token": jwks::sign(&base, true) }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    s.stop().await;
}

async fn google_not_configured_is_503(backend: Backend) {
    let s = TestServer::start(backend).await;
    let (status, body) = s
        .post("/api/v1/auth/google", None, json!({ "id_token": "x" }))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("google_not_configured")
        )
    );
    s.stop().await;
}
