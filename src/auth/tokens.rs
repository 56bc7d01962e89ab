//! Access tokens (short-lived HS256 JWTs, one allowed algorithm) and refresh tokens (opaque random
//! strings, stored only as SHA-256 hashes, single use).

use chrono::Duration;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clock::SharedClock;
use crate::secrets::random_token;

/// The only algorithm access tokens are signed or accepted with.
const ALGORITHM: Algorithm = Algorithm::HS256;
/// `typ` claim of access tokens; anything else is refused as an access token.
const ACCESS_TYP: &str = "access";
/// Prefix that makes refresh tokens recognisable (and never a JWT).
const REFRESH_PREFIX: &str = "dpr_";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessClaims {
    /// User id.
    pub sub: String,
    /// Session id: the token dies with its session.
    pub sid: String,
    pub typ: String,
    pub iat: i64,
    pub exp: i64,
    pub iss: String,
    pub aud: String,
    pub jti: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token is malformed or its signature is invalid")]
    Invalid,
    #[error("token has expired")]
    Expired,
    #[error("not an access token")]
    WrongType,
}

pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
    access_ttl: Duration,
    clock: SharedClock,
}

impl Tokens {
    pub fn new(
        key: &[u8],
        issuer: &str,
        audience: &str,
        access_ttl: Duration,
        clock: SharedClock,
    ) -> Self {
        let mut validation = Validation::new(ALGORITHM);
        validation.algorithms = vec![ALGORITHM];
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iat", "sub", "iss", "aud"]);
        // Expiry is checked against our clock below (tests move time instead of sleeping).
        validation.validate_exp = false;
        validation.validate_nbf = false;
        Self {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            validation,
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            access_ttl,
            clock,
        }
    }

    /// Seconds an access token lives.
    pub fn access_ttl_seconds(&self) -> i64 {
        self.access_ttl.num_seconds()
    }

    pub fn issue_access(&self, user_id: &str, session_id: &str) -> anyhow::Result<String> {
        let now = self.clock.now().timestamp();
        let claims = AccessClaims {
            sub: user_id.to_string(),
            sid: session_id.to_string(),
            typ: ACCESS_TYP.to_string(),
            iat: now,
            exp: now + self.access_ttl.num_seconds(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            jti: uuid::Uuid::new_v4().to_string(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(ALGORITHM),
            &claims,
            &self.encoding,
        )?)
    }

    pub fn verify_access(&self, token: &str) -> Result<AccessClaims, TokenError> {
        if token.starts_with(REFRESH_PREFIX) {
            return Err(TokenError::WrongType);
        }
        let data = jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &self.validation)
            .map_err(|_| TokenError::Invalid)?;
        let claims = data.claims;
        if claims.typ != ACCESS_TYP {
            return Err(TokenError::WrongType);
        }
        if claims.exp <= self.clock.now().timestamp() {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// A fresh refresh token and the hash to store for it.
pub fn new_refresh_token() -> (String, String) {
    let token = format!("{REFRESH_PREFIX}{}", random_token::<32>());
    let hash = hash_refresh_token(&token);
    (token, hash)
}

pub fn hash_refresh_token(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn tokens(clock: SharedClock) -> Tokens {
        Tokens::new(&[7u8; 32], "devpocket", "app", Duration::minutes(30), clock)
    }

    #[test]
    fn round_trip_and_expiry_follow_the_clock() {
        let clock = ManualClock::starting_now();
        let t = tokens(clock.clone());
        let jwt = t.issue_access("u1", "s1").expect("issue");
        let claims = t.verify_access(&jwt).expect("valid");
        assert_eq!((claims.sub.as_str(), claims.sid.as_str()), ("u1", "s1"));
        clock.advance(Duration::minutes(31));
        assert_eq!(t.verify_access(&jwt), Err(TokenError::Expired));
    }

    #[test]
    fn other_keys_algorithms_and_refresh_tokens_are_refused() {
        let clock: SharedClock = ManualClock::starting_now();
        let t = tokens(clock.clone());
        let other = Tokens::new(
            &[8u8; 32],
            "devpocket",
            "app",
            Duration::minutes(30),
            clock.clone(),
        );
        let jwt = other.issue_access("u1", "s1").expect("issue");
        assert_eq!(t.verify_access(&jwt), Err(TokenError::Invalid));

        // "alg": "none" with the same claims.
        let now = clock.now().timestamp();
        let header = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            br#"{"alg":"none","typ":"JWT"}"#,
        );
        let body = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            format!(
                r#"{{"sub":"u1","sid":"s1","typ":"access","iat":{now},"exp":{},"iss":"devpocket","aud":"app","jti":"x"}}"#,
                now + 60
            ),
        );
        assert_eq!(
            t.verify_access(&format!("{header}.{body}.")),
            Err(TokenError::Invalid)
        );

        let (refresh, hash) = new_refresh_token();
        assert_eq!(t.verify_access(&refresh), Err(TokenError::WrongType));
        assert_eq!(hash, hash_refresh_token(&refresh));
        assert_eq!(hash.len(), 64);
        let wrong_aud = Tokens::new(
            &[7u8; 32],
            "devpocket",
            "other",
            Duration::minutes(30),
            clock,
        );
        let jwt = wrong_aud.issue_access("u1", "s1").expect("issue");
        assert_eq!(t.verify_access(&jwt), Err(TokenError::Invalid));
    }
}
