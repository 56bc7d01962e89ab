//! The front end's transport rules: health, info, metrics, OpenAPI, routing, error shape, security
//! headers, CORS, request ids, the body limit.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Backend, TestServer};

on_both_backends!(
    health_and_readiness,
    security_headers_on_every_response,
    hsts_when_configured_and_request_ids_are_echoed,
    oversized_bodies_get_413,
    cors_follows_the_configured_origins,
    openapi_describes_every_route_and_metrics_count_requests,
);

async fn health_and_readiness(backend: Backend) {
    let s = TestServer::start(backend).await;
    let (status, body) = s.get("/health", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (body["status"].as_str(), body["service"].as_str()),
        (Some("healthy"), Some("DevPocket API"))
    );
    assert_eq!(body["environment"], "development");
    assert!(body["version"].is_string() && body["timestamp"].is_string());
    assert_eq!(
        s.get("/health/live", None).await.1,
        json!({ "status": "alive" })
    );
    let (status, body) = s.get("/health/ready/", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["checks"]["database"], "healthy");
    assert_eq!(body["checks"]["actors"], "healthy");
    let (_, info) = s.get("/api/v1/info", None).await;
    assert_eq!(info["features"]["provider"], "local");
    assert_eq!(info["features"]["google_oauth"], false);
    assert_eq!(
        info["features"]["database"],
        match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    );
    assert_eq!(info["plans"]["pro"]["max_environments"], 10);
    s.stop().await;
}

fn assert_security_headers(resp: &reqwest::Response) {
    let h = resp.headers();
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["referrer-policy"], "strict-origin-when-cross-origin");
    assert!(h.contains_key("content-security-policy"));
    assert!(h.get("x-request-id").is_some_and(|v| !v.is_empty()));
}

async fn security_headers_on_every_response(backend: Backend) {
    let s = TestServer::start(backend).await;
    for (method, path, expected) in [
        (Method::GET, "/health", StatusCode::OK),
        (Method::GET, "/api/v1/auth/me", StatusCode::UNAUTHORIZED),
        (Method::GET, "/nowhere", StatusCode::NOT_FOUND),
        (
            Method::PATCH,
            "/api/v1/users/me",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::POST,
            "/api/v1/auth/login",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (Method::GET, "/metrics", StatusCode::OK),
    ] {
        let resp = s
            .request(method.clone(), path, None)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), expected, "{method} {path}");
        assert_security_headers(&resp);
        assert!(
            !resp.headers().contains_key("strict-transport-security"),
            "no HSTS without TLS"
        );
        if expected.is_client_error() {
            let body: Value = resp.json().await.expect("json error body");
            assert!(
                body["detail"].is_string() && body["code"].is_string(),
                "{body}"
            );
        }
    }
    let resp = s
        .request(Method::PATCH, "/api/v1/users/me", None)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.headers()["allow"], "GET, PUT, DELETE");
    s.stop().await;
}

async fn hsts_when_configured_and_request_ids_are_echoed(backend: Backend) {
    let s = TestServer::start_with(backend, |c| c.server.hsts = true).await;
    let resp = s
        .request(Method::GET, "/health", None)
        .header("x-request-id", "phone-req-42")
        .send()
        .await
        .expect("send");
    assert!(
        resp.headers()["strict-transport-security"]
            .to_str()
            .expect("ascii")
            .contains("max-age")
    );
    assert_eq!(resp.headers()["x-request-id"], "phone-req-42");
    let resp = s
        .request(Method::GET, "/health", None)
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .expect("send");
    let id = resp.headers()["x-request-id"].to_str().expect("ascii");
    assert!(
        uuid::Uuid::parse_str(id).is_ok(),
        "replaced with a fresh id: {id}"
    );
    s.stop().await;
}

async fn oversized_bodies_get_413(backend: Backend) {
    let s = TestServer::start(backend).await;
    let me = s.register("big").await;
    let body = vec![b'a'; 11 * 1024 * 1024];
    let resp = s
        .request(Method::PUT, "/api/v1/users/me", me.token())
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("the 413 is readable");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_security_headers(&resp);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["code"], "payload_too_large");
    // A body just under the limit is read (and rejected for what it is, not its size).
    let body = vec![b' '; 10 * 1024 * 1024 - 16];
    let resp = s
        .request(Method::PUT, "/api/v1/users/me", me.token())
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // Routes read before authentication take small bodies only.
    let limit = s.config.server.max_unauthenticated_body_bytes as usize;
    let resp = s
        .request(Method::POST, "/api/v1/auth/register", None)
        .header("content-type", "application/json")
        .body(vec![b' '; limit + 1])
        .send()
        .await
        .expect("the 413 is readable");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let resp = s
        .request(Method::POST, "/api/v1/auth/register", None)
        .header("content-type", "application/json")
        .body(vec![b' '; limit])
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(s.get("/health", None).await.0, StatusCode::OK);
    s.stop().await;
}

async fn cors_follows_the_configured_origins(backend: Backend) {
    let s = TestServer::start_with(backend, |c| {
        c.server.allowed_origins = vec!["https://app.devpocket.example".into()]
    })
    .await;
    let resp = s
        .request(Method::OPTIONS, "/api/v1/auth/login", None)
        .header("origin", "https://app.devpocket.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .expect("preflight");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://app.devpocket.example"
    );
    assert!(
        resp.headers()["access-control-allow-methods"]
            .to_str()
            .expect("ascii")
            .contains("POST")
    );
    let resp = s
        .request(Method::GET, "/health", None)
        .header("origin", "https://evil.example")
        .send()
        .await
        .expect("send");
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
    let resp = s
        .request(Method::GET, "/health", None)
        .header("origin", "https://app.devpocket.example")
        .send()
        .await
        .expect("send");
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://app.devpocket.example"
    );
    s.stop().await;
}

async fn openapi_describes_every_route_and_metrics_count_requests(backend: Backend) {
    let s = TestServer::start(backend).await;
    let (status, doc) = s.get("/api/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    let operations: usize = paths
        .values()
        .map(|p| p.as_object().map_or(0, |m| m.len()))
        .sum();
    assert_eq!(operations, devpocket::http::router::ROUTER.routes().len());
    for (path, method) in [
        ("/api/v1/auth/register", "post"),
        ("/api/v1/auth/refresh", "post"),
        ("/api/v1/users/me/sessions/{session_id}", "delete"),
        ("/api/v1/admin/actors", "get"),
        ("/metrics", "get"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
    }
    assert_eq!(
        doc["paths"]["/api/v1/auth/me"]["get"]["security"][0]["bearer"],
        json!([])
    );

    // Every documented GET without parameters or auth answers (the document is not aspirational).
    for (path, item) in paths {
        let op = &item["get"];
        if op.is_object() && op["security"].is_null() && !path.contains('{') {
            assert_eq!(s.get(path, None).await.0.as_u16() / 100, 2, "{path}");
        }
    }

    s.get("/api/v1/users/me/sessions/abc", None).await;
    let text = s.metrics_text(None).await;
    assert!(text.contains("devpocket_http_requests_total{method=\"GET\",route=\"/api/v1/openapi.json\",status=\"200\"} 2"), "fetched twice: {text}");
    assert!(
        text.contains("route=\"unmatched\""),
        "raw paths never become labels: {text}"
    );
    assert!(
        text.contains("devpocket_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains("devpocket_actors_live{kind=\"root\"} 1"),
        "{text}"
    );
    s.stop().await;
}
