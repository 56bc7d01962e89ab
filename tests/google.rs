//! Google sign-in against a JWKS served by the test (real HTTP), with tokens signed by test keys.

mod support;

use reqwest::StatusCode;
use serde_json::json;
use support::jwks::{self, CLIENT_ID, JwksServer};
use support::{Backend, PASSWORD, TestServer};

on_both_backends!(
    google_sign_in_links_and_creates,
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

async fn google_sign_in_links_and_creates(backend: Backend) {
    let keys = JwksServer::start().await;
    let s = server(backend, &keys).await;
    let now = s.now_ts();
    let existing = s.register("sam").await;

    // Links to the existing account by verified e-mail.
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
    assert_eq!(s.login("sam", PASSWORD).await.0, StatusCode::OK);

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
