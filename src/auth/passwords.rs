//! Password hashing with argon2id at OWASP's parameters, run on the blocking pool behind a bounded
//! queue: at most `concurrency` hashes run at once (each takes 19 MiB and most of a core) and at
//! most `queue` more wait for their turn. A request that finds the queue full is refused at once
//! ([`HashBusy`]) instead of waiting; credential routes turn that into a 503 with `Retry-After`,
//! and nothing else ever waits on the hasher.
//!
//! Callers take a [`HashTicket`] first (cheap, never waits), do their database work, give their
//! pooled connection back, and only then hash with the ticket.

use std::sync::Arc;

use anyhow::Context;
use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};

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

/// The hashing queue is full: the caller should answer 503 with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("password hashing is at capacity")]
pub struct HashBusy;

#[derive(Clone)]
pub struct PasswordHashing {
    /// Hashes computing at once (`auth.hash_concurrency`).
    running: Arc<Semaphore>,
    /// Tickets out at once: running plus waiting (`auth.hash_concurrency + auth.hash_queue`).
    admitted: Arc<Semaphore>,
    /// A real hash of a random password, verified against when the account does not exist so
    /// that "no such user" takes as long as "wrong password".
    decoy: Arc<OnceCell<String>>,
}

/// A place in the hashing queue. Holding one does not hash yet; dropping it gives the place back.
/// A ticket may be used for several hashes in turn (a password change verifies, then hashes).
pub struct HashTicket {
    hashing: PasswordHashing,
    place: Arc<OwnedSemaphorePermit>,
}

impl PasswordHashing {
    /// `concurrency`: hashes computed at once (at least 1); `queue`: requests that may wait for a
    /// turn beyond those; more are refused with [`HashBusy`].
    pub fn new(concurrency: usize, queue: usize) -> Self {
        let concurrency = concurrency.max(1);
        Self {
            running: Arc::new(Semaphore::new(concurrency)),
            admitted: Arc::new(Semaphore::new(concurrency.saturating_add(queue))),
            decoy: Arc::new(OnceCell::new()),
        }
    }

    /// A place in the queue, or [`HashBusy`] at once when it is full. Never waits.
    pub fn admit(&self) -> Result<HashTicket, HashBusy> {
        let place = self
            .admitted
            .clone()
            .try_acquire_owned()
            .map_err(|_| HashBusy)?;
        Ok(HashTicket {
            hashing: self.clone(),
            place: Arc::new(place),
        })
    }

    /// Wait for a turn, then run `work` on the blocking pool. The turn and the queue place go
    /// with the work, so a caller that gives up (a client that disconnects) does not free them
    /// before the hash has really finished.
    async fn run<T: Send + 'static>(
        &self,
        place: Arc<OwnedSemaphorePermit>,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let turn = self
            .running
            .clone()
            .acquire_owned()
            .await
            .context("hasher closed")?;
        Ok(tokio::task::spawn_blocking(move || {
            let result = work();
            drop((turn, place));
            result
        })
        .await?)
    }
}

impl HashTicket {
    /// Hash a new password (argon2id PHC string).
    pub async fn hash(&self, password: &str) -> anyhow::Result<String> {
        let password = password.as_bytes().to_vec();
        self.hashing
            .run(self.place.clone(), move || hash_blocking(&password))
            .await?
    }

    /// Whether `password` matches `hash`; false on any failure.
    pub async fn verify(&self, password: &str, hash: &str) -> bool {
        let password = password.as_bytes().to_vec();
        let hash = hash.to_string();
        self.hashing
            .run(self.place.clone(), move || {
                verify_blocking(&password, &hash)
            })
            .await
            .unwrap_or(false)
    }

    /// Spend the time of one verification, for accounts that do not exist or have no password.
    pub async fn verify_decoy(&self, password: &str) {
        let decoy = self
            .hashing
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
        let h = PasswordHashing::new(2, 0);
        let t = h.admit().expect("room");
        let a = t.hash("Correct1horse").await.expect("hash");
        let b = t.hash("Correct1horse").await.expect("hash");
        assert!(a.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{a}");
        assert_ne!(a, b, "salts differ");
        assert!(t.verify("Correct1horse", &a).await);
        assert!(!t.verify("correct1horse", &a).await);
        assert!(!t.verify("Correct1horse", "not a hash").await);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_frees_with_the_tickets() {
        let h = PasswordHashing::new(1, 2);
        let tickets: Vec<_> = (0..3).map(|_| h.admit().expect("room")).collect();
        assert_eq!(h.admit().err(), Some(HashBusy), "1 running + 2 waiting");
        // A hash runs with a ticket and keeps its place until it is done.
        assert!(!tickets[0].verify("x", "not a hash").await);
        assert!(h.admit().is_err());
        drop(tickets);
        assert!(h.admit().is_ok());
    }
}
