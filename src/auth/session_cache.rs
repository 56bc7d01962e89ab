//! The per-request session check without a database round trip: a small cache of
//! `(session, user)` rows by session id, each trusted for at most `auth.session_cache_seconds`.
//!
//! Revocation bound (OWASP ASVS 4.0 V3.3.1, sessions end on logout; V3.3.3, on password change):
//! on the node that ends a session or changes an account, every path that does so forgets the
//! cached rows first ([`SessionCache::forget_sessions`], [`SessionCache::forget_user`]), so the
//! next request there is refused at once. Anywhere else — another node, the `devpocket user`
//! CLI — a cached row is re-read from the store once it is older than the TTL, so a change made
//! there takes effect within `auth.session_cache_seconds` (default 2 s). A TTL of 0 turns the
//! cache off.
//!
//! Bound: at most `max_entries` rows (one per live session in use); when full, expired rows go
//! first, then the whole cache (a refill costs one query per session).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Duration, Utc};

use crate::store::sessions::Session;
use crate::store::users::User;

/// Rows kept at most: a node's active sessions fit many times over (a row is ~1 KiB).
pub const MAX_ENTRIES: usize = 16_384;

struct Entry {
    session: Session,
    user: User,
    fetched: DateTime<Utc>,
}

/// See the module doc.
pub struct SessionCache {
    ttl: Duration,
    max_entries: usize,
    entries: Mutex<HashMap<String, Entry>>,
    /// Grows with every forget: rows read before one are not cached (a request that read a
    /// session just before its logout committed must not put it back).
    epoch: AtomicU64,
}

impl SessionCache {
    /// A cache trusting rows for `ttl_seconds` (0: off), holding at most `max_entries`.
    pub fn new(ttl_seconds: u64, max_entries: usize) -> Self {
        Self {
            ttl: Duration::seconds(ttl_seconds.min(3600) as i64),
            max_entries: max_entries.max(1),
            entries: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic elsewhere while holding it leaves plain data: keep using it.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fresh(&self, fetched: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        now >= fetched && now - fetched < self.ttl
    }

    /// The rows of session `id` if they were read from the store less than the TTL ago.
    pub fn get(&self, id: &str, now: DateTime<Utc>) -> Option<(Session, User)> {
        if self.ttl <= Duration::zero() {
            return None;
        }
        let entries = self.lock();
        let entry = entries.get(id)?;
        self.fresh(entry.fetched, now)
            .then(|| (entry.session.clone(), entry.user.clone()))
    }

    /// Take before reading rows from the store; pass to [`SessionCache::put`].
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Remember rows read from the store at `now`, unless something was forgotten since `epoch`
    /// was taken (the rows may predate that change).
    pub fn put(&self, epoch: u64, session: &Session, user: &User, now: DateTime<Utc>) {
        if self.ttl <= Duration::zero() {
            return;
        }
        let mut entries = self.lock();
        // Checked under the lock forgets take, so no forget slips between check and insert.
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        if entries.len() >= self.max_entries && !entries.contains_key(&session.id) {
            entries.retain(|_, e| now >= e.fetched && now - e.fetched < self.ttl);
            if entries.len() >= self.max_entries {
                entries.clear();
            }
        }
        entries.insert(
            session.id.clone(),
            Entry {
                session: session.clone(),
                user: user.clone(),
                fetched: now,
            },
        );
    }

    /// These sessions ended (logout, revocation, refresh-token reuse, password change).
    pub fn forget_sessions<'a>(&self, ids: impl IntoIterator<Item = &'a String>) {
        let mut entries = self.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for id in ids {
            entries.remove(id);
        }
    }

    /// This account changed (profile, plan, password, Google link, deactivation, deletion):
    /// every cached session of it is read again.
    pub fn forget_user(&self, user_id: &str) {
        let mut entries = self.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        entries.retain(|_, e| e.user.id != user_id);
    }

    /// Forget everything (the store was changed behind this node's back, e.g. by tests).
    pub fn clear(&self) {
        let mut entries = self.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        entries.clear();
    }

    /// Rows held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(session: &str, user: &str) -> (Session, User) {
        let t = Utc::now().naive_utc();
        let session = Session {
            id: session.into(),
            user_id: user.into(),
            user_agent: None,
            ip_address: None,
            created_at: t,
            last_used_at: t,
            expires_at: t,
            revoked_at: None,
            revoked_reason: None,
        };
        let user = User {
            id: user.into(),
            username: user.into(),
            username_key: user.into(),
            email: format!("{user}@example.com"),
            password_hash: None,
            full_name: None,
            avatar_url: None,
            google_id: None,
            is_active: true,
            is_verified: false,
            subscription_plan: "free".into(),
            preferred_region: None,
            created_at: t,
            updated_at: t,
            last_login: None,
        };
        (session, user)
    }

    #[test]
    fn rows_are_trusted_for_the_ttl_only() {
        let cache = SessionCache::new(2, 10);
        let now = Utc::now();
        let (s, u) = rows("s1", "u1");
        cache.put(cache.epoch(), &s, &u, now);
        assert!(
            cache
                .get("s1", now + Duration::milliseconds(1999))
                .is_some()
        );
        assert!(cache.get("s1", now + Duration::seconds(2)).is_none());
        assert!(
            cache.get("s1", now - Duration::seconds(1)).is_none(),
            "clock went back"
        );
        let off = SessionCache::new(0, 10);
        off.put(off.epoch(), &s, &u, now);
        assert!(off.get("s1", now).is_none(), "0 = off");
    }

    #[test]
    fn a_read_that_raced_a_forget_is_not_cached() {
        let cache = SessionCache::new(2, 10);
        let now = Utc::now();
        let (s, u) = rows("s1", "u1");
        let epoch = cache.epoch(); // a request starts reading the store...
        cache.forget_sessions([&"s1".to_string()]); // ...a logout commits and forgets...
        cache.put(epoch, &s, &u, now); // ...the stale read arrives
        assert!(cache.get("s1", now).is_none());
        cache.put(cache.epoch(), &s, &u, now);
        assert!(cache.get("s1", now).is_some());
        cache.forget_user("u1");
        assert!(
            cache.get("s1", now).is_none(),
            "an account change forgets its sessions"
        );
    }

    #[test]
    fn it_never_holds_more_than_its_bound() {
        let cache = SessionCache::new(2, 3);
        let now = Utc::now();
        for i in 0..10 {
            let (s, u) = rows(&format!("s{i}"), "u");
            cache.put(cache.epoch(), &s, &u, now);
            assert!(cache.len() <= 3);
        }
        assert!(cache.get("s9", now).is_some(), "the newest is kept");
    }
}
