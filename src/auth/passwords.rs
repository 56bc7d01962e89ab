//! Password hashing with argon2id at OWASP's parameters, run on the blocking pool with a bounded
//! number of hashes in flight (each one takes 19 MiB and most of a core).

use std::sync::Arc;

use anyhow::Context;
use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use tokio::sync::{OnceCell, Semaphore};

use crate::secrets::random_bytes;

/// OWASP Password Storage Cheat Sheet: argon2id, m = 19 MiB, t = 2, p = 1.
const MEMORY_KIB: u32 = 19 * 1024;
const ITERATIONS: u32 = 2;
const PARALLELISM: u32 = 1;
/// Salt length in bytes (128 bits).
const SALT_LEN: usize = 16;

fn argon2() -> anyhow::Result<Argon2<'static>> {
    let params = Params::new(MEMORY_KIB, ITERATIONS, PARALLELISM, None)
        .map_err(|e| anyhow::anyhow!("argon2 params: {e}"))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

fn hash_blocking(password: &[u8]) -> anyhow::Result<String> {
    let salt = random_bytes::<SALT_LEN>();
    let hash = argon2()?
        .hash_password_with_salt(password, &salt)
        .map_err(|e| anyhow::anyhow!("argon2 hash: {e}"))?;
    Ok(hash.to_string())
}

fn verify_blocking(password: &[u8], hash: &str) -> bool {
    argon2()
        .map(|a| a.verify_password(password, hash).is_ok())
        .unwrap_or(false)
}

#[derive(Clone)]
pub struct PasswordHashing {
    permits: Arc<Semaphore>,
    /// A real hash of a random password, verified against when the account does not exist so
    /// that "no such user" takes as long as "wrong password".
    decoy: Arc<OnceCell<String>>,
}

impl PasswordHashing {
    /// `concurrency`: hashes computed at once; further requests wait for a permit.
    pub fn new(concurrency: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            decoy: Arc::new(OnceCell::new()),
        }
    }

    pub async fn hash(&self, password: &str) -> anyhow::Result<String> {
        let _permit = self.permits.acquire().await.context("hasher closed")?;
        let password = password.as_bytes().to_vec();
        tokio::task::spawn_blocking(move || hash_blocking(&password)).await?
    }

    pub async fn verify(&self, password: &str, hash: &str) -> bool {
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        let password = password.as_bytes().to_vec();
        let hash = hash.to_string();
        tokio::task::spawn_blocking(move || verify_blocking(&password, &hash))
            .await
            .unwrap_or(false)
    }

    /// Spend the time of one verification, for accounts that do not exist or have no password.
    pub async fn verify_decoy(&self, password: &str) {
        let decoy = self
            .decoy
            .get_or_try_init(|| async { self.hash(&crate::secrets::random_token::<16>()).await })
            .await;
        if let Ok(decoy) = decoy {
            let _ = self.verify(password, decoy).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_are_argon2id_salted_and_verify() {
        let h = PasswordHashing::new(2);
        let a = h.hash("Correct1horse").await.expect("hash");
        let b = h.hash("Correct1horse").await.expect("hash");
        assert!(a.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{a}");
        assert_ne!(a, b, "salts differ");
        assert!(h.verify("Correct1horse", &a).await);
        assert!(!h.verify("correct1horse", &a).await);
        assert!(!h.verify("Correct1horse", "not a hash").await);
    }
}
