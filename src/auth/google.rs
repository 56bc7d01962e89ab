//! Google sign-in: verify an ID token (RS256 only) against the JWKS at a configured URL, for the
//! configured client id and Google's issuers. Keys are cached for the lifetime the JWKS response
//! allows and fetched again when a token names a key we have not seen (at most once a minute).

use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::clock::SharedClock;
use crate::config::GoogleConfig;

/// Keys are kept this long when the JWKS response says nothing about caching.
const DEFAULT_KEY_TTL: Duration = Duration::hours(1);
/// An unknown `kid` triggers a refetch at most this often (a forged kid must not hammer Google).
const MIN_REFETCH_INTERVAL: Duration = Duration::seconds(60);
/// Clock skew tolerated on `exp`.
const LEEWAY_SECONDS: i64 = 30;
/// Timeout of one JWKS fetch.
const FETCH_TIMEOUT: StdDuration = StdDuration::from_secs(10);
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum GoogleError {
    #[error("invalid Google token: {0}")]
    Invalid(&'static str),
    #[error("Google keys unavailable: {0}")]
    Unavailable(String),
}

/// What we take from a verified ID token.
#[derive(Debug, Clone)]
pub struct GoogleIdentity {
    pub sub: String,
    pub email: Option<String>,
    pub email_verified: bool,
    pub name: Option<String>,
    pub picture: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    email: Option<String>,
    #[serde(default)]
    email_verified: Option<serde_json::Value>,
    name: Option<String>,
    picture: Option<String>,
}

struct KeyCache {
    keys: JwkSet,
    fetched_at: DateTime<Utc>,
    ttl: Duration,
}

pub struct GoogleVerifier {
    client_id: String,
    jwks_url: String,
    issuers: Vec<String>,
    http: reqwest::Client,
    clock: SharedClock,
    /// A tokio mutex on purpose: it is held across the fetch so concurrent sign-ins share one
    /// request to the JWKS URL instead of stampeding it.
    cache: Mutex<Option<KeyCache>>,
}

impl GoogleVerifier {
    /// `None` when Google sign-in is not configured.
    pub fn from_config(config: &GoogleConfig, clock: SharedClock) -> Option<Self> {
        if config.client_id.is_empty() {
            return None;
        }
        Some(Self {
            client_id: config.client_id.clone(),
            jwks_url: config.jwks_url.clone(),
            issuers: config.issuers.clone(),
            http: reqwest::Client::builder()
                .timeout(FETCH_TIMEOUT)
                .build()
                .unwrap_or_default(),
            clock,
            cache: Mutex::new(None),
        })
    }

    pub async fn verify(&self, id_token: &str) -> Result<GoogleIdentity, GoogleError> {
        let header =
            jsonwebtoken::decode_header(id_token).map_err(|_| GoogleError::Invalid("malformed"))?;
        if header.alg != Algorithm::RS256 {
            return Err(GoogleError::Invalid("algorithm not allowed"));
        }
        let kid = header.kid.ok_or(GoogleError::Invalid("no key id"))?;
        let key = self.key_for(&kid).await?;

        let mut validation = Validation::new(Algorithm::RS256);
        validation.algorithms = vec![Algorithm::RS256];
        validation.set_audience(&[&self.client_id]);
        validation.set_issuer(&self.issuers);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        let data = jsonwebtoken::decode::<Claims>(id_token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidAudience => GoogleError::Invalid("wrong audience"),
                ErrorKind::InvalidIssuer => GoogleError::Invalid("wrong issuer"),
                ErrorKind::InvalidSignature => GoogleError::Invalid("bad signature"),
                _ => GoogleError::Invalid("rejected"),
            }
        })?;
        let claims = data.claims;
        if claims.exp + LEEWAY_SECONDS <= self.clock.now().timestamp() {
            return Err(GoogleError::Invalid("expired"));
        }
        let email_verified = match claims.email_verified {
            Some(serde_json::Value::Bool(b)) => b,
            Some(serde_json::Value::String(s)) => s == "true",
            _ => false,
        };
        Ok(GoogleIdentity {
            sub: claims.sub,
            email: claims.email.map(|e| e.to_lowercase()),
            email_verified,
            name: claims.name,
            picture: claims.picture,
        })
    }

    async fn key_for(&self, kid: &str) -> Result<DecodingKey, GoogleError> {
        let now = self.clock.now();
        let mut cache = self.cache.lock().await;
        let (fresh, has_kid, may_refetch) = match cache.as_ref() {
            Some(c) => (
                now - c.fetched_at < c.ttl,
                c.keys.find(kid).is_some(),
                now - c.fetched_at >= MIN_REFETCH_INTERVAL,
            ),
            None => (false, false, true),
        };
        // Fetch when the set is stale, or when it lacks the kid and we have not just fetched.
        if !fresh || (!has_kid && may_refetch) {
            match self.fetch().await {
                Ok((keys, ttl)) => {
                    *cache = Some(KeyCache {
                        keys,
                        fetched_at: now,
                        ttl,
                    })
                }
                // Keep serving a stale set that still has the key rather than fail sign-in.
                Err(e) if !has_kid => return Err(e),
                Err(e) => tracing::warn!(error = %e, "JWKS refresh failed; using cached keys"),
            }
        }
        let jwk = cache
            .as_ref()
            .and_then(|c| c.keys.find(kid))
            .ok_or(GoogleError::Invalid("unknown signing key"))?;
        DecodingKey::from_jwk(jwk).map_err(|_| GoogleError::Invalid("unusable signing key"))
    }

    async fn fetch(&self) -> Result<(JwkSet, Duration), GoogleError> {
        let unavailable = |e: String| GoogleError::Unavailable(e);
        let resp = self
            .http
            .get(&self.jwks_url)
            .send()
            .await
            .map_err(|e| unavailable(e.without_url().to_string()))?;
        if !resp.status().is_success() {
            return Err(unavailable(format!("JWKS answered {}", resp.status())));
        }
        let ttl = max_age(resp.headers()).unwrap_or(DEFAULT_KEY_TTL);
        let body = resp
            .bytes()
            .await
            .map_err(|e| unavailable(e.without_url().to_string()))?;
        if body.len() > MAX_JWKS_BYTES {
            return Err(unavailable("JWKS document too large".into()));
        }
        let keys: JwkSet =
            serde_json::from_slice(&body).map_err(|e| unavailable(format!("bad JWKS: {e}")))?;
        Ok((keys, ttl))
    }
}

fn max_age(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::CACHE_CONTROL)?.to_str().ok()?;
    value.split(',').find_map(|part| {
        let seconds = part.trim().strip_prefix("max-age=")?.parse::<i64>().ok()?;
        Some(Duration::seconds(seconds.clamp(0, 24 * 3600)))
    })
}
