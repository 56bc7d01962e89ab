//! The lockout rule, made to hold under concurrency: an attempt is *reserved* (counted in one
//! database statement) before its password is hashed, and only attempts whose reservation falls
//! within `auth.lockout_threshold` are evaluated. So however many guesses arrive at once, no more
//! than the threshold are ever checked per lock window; the threshold-th failure starts the lock
//! and everything after it answers 423 until the lock ends (then the counter starts again). A
//! success clears the counter.
//!
//! Counters are kept per *subject*: the account when the login name matches one (so its username
//! and e-mail share one counter, and the password-change and account-deletion password checks
//! count too), otherwise the lower-cased login name itself — so a name without an account shows
//! exactly the status sequence of an account, and 423 tells nobody that an account exists.
//! Storage is bounded and expiring (see [`crate::store::login_attempts`]): rows end with their
//! window, and [`crate::app::Housekeeping`] deletes ended rows and caps the rows of unknown names
//! at `auth.lockout_max_unknown_names`.

use chrono::{DateTime, Duration, Utc};
use sha2::{Digest, Sha256};

use crate::clock::{from_db, to_db};
use crate::config::AuthConfig;
use crate::store::login_attempts::{self, NAME_PREFIX, Reserved, USER_PREFIX};
use crate::store::{DbConn, StoreResult};

/// Whose attempts are counted together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// An account, by id.
    Account(String),
    /// A login name that matches no account (kept only as a hash).
    UnknownName(String),
}

impl Subject {
    pub fn account(id: &str) -> Self {
        Self::Account(id.to_string())
    }

    /// A login name as typed (trimmed and lower-cased, as accounts are looked up).
    pub fn unknown_name(login: &str) -> Self {
        Self::UnknownName(login.trim().to_lowercase())
    }

    /// The row key: `user:<id>`, or `name:<hex SHA-256 of the name>` (a mistyped password in the
    /// name field is never stored).
    pub fn key(&self) -> String {
        match self {
            Self::Account(id) => format!("{USER_PREFIX}{id}"),
            Self::UnknownName(name) => {
                let digest = Sha256::digest(name.as_bytes());
                let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                format!("{NAME_PREFIX}{hex}")
            }
        }
    }
}

/// What a reservation allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Evaluate the password. `attempt` is this attempt's number in the window; when `locks` the
    /// window's lock starts if this attempt fails (it ends at `lock_ends`).
    Evaluate {
        attempt: u32,
        locks: bool,
        lock_ends: DateTime<Utc>,
    },
    /// Over the threshold: do not evaluate; answer 423 until `until`.
    Locked { until: DateTime<Utc> },
}

/// The pure rule: what a reservation that brought the counter to `reserved.failures` allows.
pub fn admission(reserved: Reserved, threshold: u32) -> Admission {
    let attempt = reserved.failures.max(0) as u32;
    let ends = from_db(reserved.expires_at);
    if attempt > threshold {
        Admission::Locked { until: ends }
    } else {
        Admission::Evaluate {
            attempt,
            locks: attempt == threshold,
            lock_ends: ends,
        }
    }
}

/// The lockout service the handlers share.
pub struct Lockout {
    threshold: u32,
    window: Duration,
}

impl Lockout {
    pub fn new(config: &AuthConfig) -> Self {
        Self {
            threshold: config.lockout_threshold.max(1),
            window: Duration::minutes(config.lockout_minutes.into()),
        }
    }

    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    /// Reserve one attempt for `subject` at `now` and say whether it may be evaluated.
    pub async fn reserve(
        &self,
        conn: &mut DbConn,
        subject: &Subject,
        now: DateTime<Utc>,
    ) -> StoreResult<Admission> {
        let reserved = login_attempts::reserve(
            conn,
            &subject.key(),
            to_db(now),
            to_db(now + self.window),
            self.threshold as i32,
        )
        .await?;
        Ok(admission(reserved, self.threshold))
    }

    /// After a success: the counter starts again.
    pub async fn clear(&self, conn: &mut DbConn, subject: &Subject) -> StoreResult<()> {
        login_attempts::clear(conn, &subject.key()).await
    }

    /// When `subject`'s lock ends, if it is locked (for sign-ins that check no password).
    pub async fn locked_until(
        &self,
        conn: &mut DbConn,
        subject: &Subject,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<DateTime<Utc>>> {
        let until =
            login_attempts::locked_until(conn, &subject.key(), to_db(now), self.threshold as i32)
                .await?;
        Ok(until.map(from_db))
    }
}

/// Whole seconds until `until`, rounded up and at least 1 (for `Retry-After`).
pub fn seconds_until(until: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    ((until - now).num_milliseconds().max(1) as u64).div_ceil(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reserved(failures: i32, ends: DateTime<Utc>) -> Reserved {
        Reserved {
            failures,
            expires_at: to_db(ends),
        }
    }

    #[test]
    fn only_the_first_threshold_attempts_are_evaluated() {
        let ends = to_db(Utc::now()).and_utc();
        let evaluate = |attempt, locks| Admission::Evaluate {
            attempt,
            locks,
            lock_ends: ends,
        };
        assert_eq!(admission(reserved(1, ends), 5), evaluate(1, false));
        assert_eq!(admission(reserved(4, ends), 5), evaluate(4, false));
        assert_eq!(admission(reserved(5, ends), 5), evaluate(5, true));
        assert_eq!(
            admission(reserved(6, ends), 5),
            Admission::Locked { until: ends }
        );
        assert_eq!(admission(reserved(1, ends), 1), evaluate(1, true));
    }

    #[test]
    fn retry_after_rounds_up() {
        let now = Utc::now();
        assert_eq!(
            seconds_until(now + Duration::milliseconds(119_001), now),
            120
        );
        assert_eq!(seconds_until(now + Duration::seconds(120), now), 120);
        assert_eq!(seconds_until(now, now), 1);
        assert_eq!(seconds_until(now - Duration::seconds(5), now), 1);
    }

    #[test]
    fn subjects_key_accounts_by_id_and_names_by_hash() {
        assert_eq!(Subject::account("abc").key(), "user:abc");
        let name = Subject::unknown_name("  Nobody@Example.com ");
        assert_eq!(name, Subject::unknown_name("nobody@example.com"));
        let key = name.key();
        assert!(key.starts_with("name:") && key.len() == 5 + 64, "{key}");
        assert!(!key.contains("nobody"));
    }
}
