//! The HTTP side of Contabo (shared/contabo/NOTES.md): OAuth2 password grant with a cached,
//! single-flight token refreshed before expiry; a fresh `x-request-id` (UUIDv4) on every call;
//! timeouts; jittered exponential backoff for safe calls only; both error-body shapes parsed and
//! non-JSON bodies (WAF pages) kept raw; a 401 drops the token and retries once.

use std::time::Duration;

use rand::RngExt;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::{ContaboConfig, Secret};

/// Refresh the token this long before it expires.
const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(30);
/// Largest error body kept (for logs and messages).
const MAX_ERROR_BODY: usize = 2048;
/// Longest single backoff wait.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ContaboError {
    /// No HTTP answer (timeout, connection dropped): the call may have taken effect.
    #[error("transport error: {0}")]
    Transport(String),
    /// An HTTP error answer, with the message parsed from either body shape (or the raw text).
    #[error("Contabo answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error("Contabo authentication failed: {0}")]
    Auth(String),
    #[error("unexpected response from Contabo: {0}")]
    Decode(String),
}

impl ContaboError {
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Worth retrying a safe call after: no answer, rate limited, server-side trouble.
    fn transient(&self) -> bool {
        match self {
            Self::Transport(_) => true,
            Self::Api { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// `{"statusCode": 400, "message": "..." | ["...", ...]}`
#[derive(Deserialize)]
struct ErrorBody {
    message: Option<Message>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Message {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

#[derive(Deserialize)]
struct TokenError {
    error: Option<String>,
    error_description: Option<String>,
}

struct CachedToken {
    value: Secret,
    refresh_at: Instant,
}

/// Whether a call may be repeated when its outcome is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Reads and idempotent actions: retried with backoff.
    Safe,
    /// Creates: exactly one attempt (plus one after a 401, which the server rejected unprocessed).
    Never,
}

pub struct ContaboClient {
    http: reqwest::Client,
    api_url: String,
    auth_url: String,
    client_id: String,
    client_secret: Secret,
    username: String,
    password: Secret,
    max_retries: u32,
    retry_base: Duration,
    /// Held across the token request on purpose: concurrent callers share one grant.
    token: Mutex<Option<CachedToken>>,
}

impl ContaboClient {
    pub fn new(config: &ContaboConfig) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.request_timeout_seconds))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("devpocket/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            api_url: config.api_url.trim_end_matches('/').to_string(),
            auth_url: config.auth_url.clone(),
            client_id: config.client_id.clone(),
            client_secret: config.client_secret.clone(),
            username: config.username.clone(),
            password: config.password.clone(),
            max_retries: config.max_retries,
            retry_base: Duration::from_millis(config.retry_base_ms),
            token: Mutex::new(None),
        })
    }

    async fn access_token(&self) -> Result<String, ContaboError> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref()
            && Instant::now() < token.refresh_at
        {
            return Ok(token.value.expose().to_string());
        }
        let form = [
            ("grant_type", "password"),
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.expose()),
            ("username", self.username.as_str()),
            ("password", self.password.expose()),
        ];
        let resp = self
            .http
            .post(&self.auth_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| ContaboError::Auth(e.without_url().to_string()))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| ContaboError::Auth(e.without_url().to_string()))?;
        if !status.is_success() {
            let detail = serde_json::from_str::<TokenError>(&text)
                .ok()
                .and_then(|e| e.error_description.or(e.error))
                .unwrap_or_else(|| excerpt(&text));
            return Err(ContaboError::Auth(format!("{status}: {detail}")));
        }
        let token: TokenResponse = serde_json::from_str(&text)
            .map_err(|e| ContaboError::Auth(format!("bad token response: {e}")))?;
        let lifetime = Duration::from_secs(token.expires_in);
        let refresh_at = Instant::now() + lifetime.saturating_sub(TOKEN_REFRESH_MARGIN);
        *cached = Some(CachedToken {
            value: Secret::new(token.access_token.clone()),
            refresh_at,
        });
        Ok(token.access_token)
    }

    async fn drop_token(&self) {
        *self.token.lock().await = None;
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.retry_base.saturating_mul(1u32 << attempt.min(16));
        let capped = exp.min(MAX_BACKOFF);
        // Full jitter: anywhere in [capped/2, capped].
        let half = capped / 2;
        let jitter_ms = rand::rng().random_range(0..=half.as_millis().max(1) as u64);
        half + Duration::from_millis(jitter_ms)
    }

    /// Call `/v1/...`. `request_id` is the `x-request-id` to send on the first attempt (a fresh
    /// UUIDv4 when `None`); retries always get a fresh one.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        retry: Retry,
        request_id: Option<&str>,
    ) -> Result<T, ContaboError> {
        let mut attempt = 0u32;
        let mut reauthenticated = false;
        let mut first_id = request_id.map(str::to_string);
        loop {
            let id = first_id
                .take()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let result = self.once(method.clone(), path, body, &id).await;
            match result {
                Err(ContaboError::Api { status: 401, .. }) if !reauthenticated => {
                    // Rejected before anything happened: new token, one more try.
                    reauthenticated = true;
                    self.drop_token().await;
                }
                Err(e) if retry == Retry::Safe && e.transient() && attempt < self.max_retries => {
                    let wait = self.backoff(attempt);
                    tracing::debug!(path, attempt, error = %e, wait_ms = wait.as_millis() as u64, "Contabo call failed; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn once<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        request_id: &str,
    ) -> Result<T, ContaboError> {
        let token = self.access_token().await?;
        let mut req = self
            .http
            .request(method, format!("{}{}", self.api_url, path))
            .bearer_auth(token)
            .header("x-request-id", request_id)
            .header("x-trace-id", "devpocket");
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| ContaboError::Transport(e.without_url().to_string()))?;
        let status = resp.status();
        let is_json = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("json"));
        let text = resp
            .text()
            .await
            .map_err(|e| ContaboError::Transport(e.without_url().to_string()))?;
        if !status.is_success() {
            return Err(api_error(status, &text, is_json));
        }
        let text = if status == StatusCode::NO_CONTENT || text.trim().is_empty() {
            "null"
        } else {
            text.as_str()
        };
        serde_json::from_str(text)
            .map_err(|e| ContaboError::Decode(format!("{e} in {}", excerpt(text))))
    }
}

fn api_error(status: StatusCode, text: &str, is_json: bool) -> ContaboError {
    let parsed = if is_json || text.trim_start().starts_with('{') {
        serde_json::from_str::<ErrorBody>(text)
            .ok()
            .and_then(|b| b.message)
            .map(|m| match m {
                Message::One(s) => s,
                Message::Many(v) => v.join("; "),
            })
    } else {
        None
    };
    // Not JSON (e.g. a WAF/HTML page): keep the raw text, trimmed, for the operator.
    let message = parsed.unwrap_or_else(|| excerpt(text));
    ContaboError::Api {
        status: status.as_u16(),
        message,
    }
}

fn excerpt(text: &str) -> String {
    let trimmed = text.trim();
    if trimmed.len() <= MAX_ERROR_BODY {
        return trimmed.to_string();
    }
    let mut end = MAX_ERROR_BODY;
    while !trimmed.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &trimmed[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_error_shapes_and_html_are_understood() {
        let e = api_error(
            StatusCode::BAD_REQUEST,
            r#"{"statusCode":400,"message":["productId must be longer than or equal to 1 characters","region bad"]}"#,
            true,
        );
        assert_eq!(e.status(), Some(400));
        assert!(
            e.to_string().contains("productId must be") && e.to_string().contains("; region bad")
        );
        let e = api_error(
            StatusCode::PAYMENT_REQUIRED,
            r#"{"statusCode":402,"message":"Total snapshots exceed the total max limit of 1 snapshots"}"#,
            true,
        );
        assert!(e.to_string().contains("Total snapshots exceed"));
        let e = api_error(
            StatusCode::FORBIDDEN,
            "<html><body>Your IP is not allowed to access Contabo.com</body></html>",
            false,
        );
        assert!(e.to_string().contains("Your IP is not allowed"));
        assert!(!api_error(StatusCode::BAD_REQUEST, "x", false).transient());
        assert!(api_error(StatusCode::TOO_MANY_REQUESTS, "", false).transient());
        assert!(api_error(StatusCode::BAD_GATEWAY, "", false).transient());
    }

    #[test]
    fn long_bodies_are_cut_on_a_char_boundary() {
        let text = "é".repeat(MAX_ERROR_BODY);
        let cut = excerpt(&text);
        assert!(cut.len() <= MAX_ERROR_BODY + '…'.len_utf8());
    }
}
