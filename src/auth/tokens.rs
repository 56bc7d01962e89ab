//! Access tokens (short-lived HS256 JWTs, one allowed algorithm) and refresh tokens (opaque random
//! strings, stored only as SHA-256 hashes, single use).
//!
//! Access tokens are signed with the current key of a [`KeySet`] and name it in their `kid`
//! header; any key of the set verifies (rotation). A token without `kid` (issued before key ids)
//! is checked against each key of the set.

use chrono::Duration;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clock::SharedClock;
use crate::secrets::{KeySet, random_token};

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
    /// The current key and its id (the `kid` header of every token issued).
    encoding: (String, EncodingKey),
    /// Every accepted key by id, the current one first.
    decoding: Vec<(String, DecodingKey)>,
    validation: Validation,
    issuer: String,
    audience: String,
    access_ttl: Duration,
    clock: SharedClock,
}

impl Tokens {
    /// Tokens signed with the current key of `keys` and verified with any of them.
    pub fn new(
        keys: &KeySet,
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
            encoding: (
                keys.current().id.clone(),
                EncodingKey::from_secret(&keys.current().bytes),
            ),
            decoding: keys
                .keys()
                .iter()
                .map(|k| (k.id.clone(), DecodingKey::from_secret(&k.bytes)))
                .collect(),
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
        let mut header = Header::new(ALGORITHM);
        header.kid = Some(self.encoding.0.clone());
        Ok(jsonwebtoken::encode(&header, &claims, &self.encoding.1)?)
    }

    pub fn verify_access(&self, token: &str) -> Result<AccessClaims, TokenError> {
        if token.starts_with(REFRESH_PREFIX) {
            return Err(TokenError::WrongType);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        let decode = |key: &DecodingKey| {
            jsonwebtoken::decode::<AccessClaims>(token, key, &self.validation).ok()
        };
        let data = match header.kid {
            Some(kid) => self
                .decoding
                .iter()
                .find(|(id, _)| *id == kid)
                .and_then(|(_, key)| decode(key)),
            None => self.decoding.iter().find_map(|(_, key)| decode(key)),
        }
        .ok_or(TokenError::Invalid)?;
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

    fn keys(key: u8) -> KeySet {
        KeySet::single("jwt", &[key; 32]).expect("keys")
    }

    fn tokens(clock: SharedClock) -> Tokens {
        Tokens::new(&keys(7), "devpocket", "app", Duration::minutes(30), clock)
    }

    #[test]
    fn rotation_accepts_previous_keys_and_names_the_current_one() {
        let clock: SharedClock = ManualClock::starting_now();
        let before = tokens(clock.clone());
        let old_jwt = before.issue_access("u1", "s1").expect("issue");
        let rotated = KeySet::new("jwt", vec![9; 32], vec![vec![7; 32]]).expect("keys");
        let after = Tokens::new(
            &rotated,
            "devpocket",
            "app",
            Duration::minutes(30),
            clock.clone(),
        );
        assert_eq!(after.verify_access(&old_jwt).expect("old token").sub, "u1");
        let new_jwt = after.issue_access("u2", "s2").expect("issue");
        let kid = jsonwebtoken::decode_header(&new_jwt).expect("header").kid;
        assert_eq!(kid.as_deref(), Some(rotated.current().id.as_str()));
        assert_eq!(
            jsonwebtoken::decode_header(&old_jwt).expect("header").kid,
            Some(keys(7).current().id.clone())
        );
        // A node that never had the new key refuses the new token; one that dropped the old key
        // refuses the old one.
        assert_eq!(before.verify_access(&new_jwt), Err(TokenError::Invalid));
        let retired = Tokens::new(
            &keys(9),
            "devpocket",
            "app",
            Duration::minutes(30),
            clock.clone(),
        );
        assert_eq!(retired.verify_access(&old_jwt), Err(TokenError::Invalid));
        assert!(retired.verify_access(&new_jwt).is_ok());
        // A token issued before key ids (no kid) is checked against every key.
        let now = clock.now().timestamp();
        let claims = AccessClaims {
            sub: "u3".into(),
            sid: "s3".into(),
            typ: ACCESS_TYP.into(),
            iat: now,
            exp: now + 60,
            iss: "devpocket".into(),
            aud: "app".into(),
            jti: "j".into(),
        };
        let legacy = jsonwebtoken::encode(
            &Header::new(ALGORITHM),
            &claims,
            &EncodingKey::from_secret(&[7u8; 32]),
        )
        .expect("encode");
        assert_eq!(after.verify_access(&legacy).expect("legacy").sub, "u3");
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
            &keys(8),
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
        let wrong_aud = Tokens::new(&keys(7), "devpocket", "other", Duration::minutes(30), clock);
        let jwt = wrong_aud.issue_access("u1", "s1").expect("issue");
        assert_eq!(t.verify_access(&jwt), Err(TokenError::Invalid));
    }
}
