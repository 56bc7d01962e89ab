//! A stand-in for Google's JWKS endpoint (a real HTTP server on 127.0.0.1:0 serving the test key
//! set) and a minter of ID tokens signed with the test keys.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::TcpListener;

pub const CLIENT_ID: &str = "devpocket-test.apps.googleusercontent.com";
pub const KID: &str = "test-key-1";
const JWKS: &str = include_str!("fixtures/google_jwks.json");
const KEY_1: &str = include_str!("fixtures/google_key_1.pem");
const KEY_2: &str = include_str!("fixtures/google_key_2.pem");

pub struct JwksServer {
    pub url: String,
    pub fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!(
            "http://{}/oauth2/v3/certs",
            listener.local_addr().expect("addr")
        );
        let fetches = Arc::new(AtomicUsize::new(0));
        let counter = fetches.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let mut resp = hyper::Response::new(Full::new(Bytes::from_static(
                                JWKS.as_bytes(),
                            )));
                            resp.headers_mut()
                                .insert("content-type", "application/json".parse().expect("hv"));
                            resp.headers_mut().insert(
                                "cache-control",
                                "public, max-age=3600".parse().expect("hv"),
                            );
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { url, fetches, task }
    }

    pub fn fetch_count(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// Standard claims of a valid token for `sub` / `email`, expiring in an hour from `now`.
pub fn claims(sub: &str, email: &str, now: i64) -> Value {
    json!({
        "iss": "https://accounts.google.com",
        "aud": CLIENT_ID,
        "sub": sub,
        "email": email,
        "email_verified": true,
        "name": "Test Person",
        "picture": "https://example.com/avatar.png",
        "iat": now,
        "exp": now + 3600,
    })
}

/// Sign with the published key (`published = true`) or with a key the JWKS does not hold, in
/// both cases under the published kid.
pub fn sign(claims: &Value, published: bool) -> String {
    let pem = if published { KEY_1 } else { KEY_2 };
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(KID.to_string());
    let key = EncodingKey::from_rsa_pem(pem.as_bytes()).expect("test key");
    jsonwebtoken::encode(&header, claims, &key).expect("sign")
}
