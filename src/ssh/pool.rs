//! Shared SSH connections: the terminals and the metrics sampler of one environment use channels
//! on one connection instead of a connection each (a second one opens only when the first holds
//! `provider.ssh_channels_per_connection` users). When a connection dies, every user of it sees
//! its channels close and asks again; the first ask connects anew and the others wait for it and
//! share the result, so the environment is reconnected as one.
//!
//! Why a bound per connection: OpenSSH's sshd refuses session channels past `MaxSessions`
//! (default 10, sshd_config(5)), and the local provider's server past
//! [`crate::ssh::server::MAX_CHANNELS_PER_CONNECTION`]. A user here holds one long-lived channel
//! (a terminal's PTY) and opens short ones (a terminal's `command -v tmux`, a metrics sample), so
//! the default of 8 users leaves room for those under OpenSSH's default; the local provider puts
//! 12 on one (16 channels minus room for the short ones, see
//! [`crate::provider::Provider::ssh_holders_per_connection`]).
//!
//! Flow: russh queues each channel's incoming data (bounded) and stalls the whole connection's
//! reading while one channel's queue is full, so a user of a shared connection must keep reading
//! its channel; terminals do (their output goes to a bounded ring whatever the client does, see
//! [`crate::actors::terminal`]).
//!
//! Connections close when their last user drops its client and channels (russh ends a session
//! when nothing can send on it any more); the pool keeps only weak references.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use super::client::{Handle, SshClient, SshError, SshTarget};

/// One environment's connections, behind an async lock so concurrent asks share one connect.
type Slot = Arc<tokio::sync::Mutex<Vec<Weak<Handle>>>>;

/// SSH connections to environments, shared by their users (see the module doc).
pub struct SshPool {
    /// Keyed by environment id and the address/user/host key the connection was made to (so a
    /// moved or rebuilt environment gets a fresh connection).
    slots: Mutex<HashMap<String, Slot>>,
    users_per_connection: usize,
}

impl std::fmt::Debug for SshPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshPool")
            .field("users_per_connection", &self.users_per_connection)
            .finish_non_exhaustive()
    }
}

impl SshPool {
    /// A pool handing each connection to at most `users_per_connection` holders (at least 1).
    pub fn new(users_per_connection: usize) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            users_per_connection: users_per_connection.max(1),
        }
    }

    /// A client for `environment_id` at `target`: a live connection with room (fewer than
    /// `users_per_connection` clients held), else a new one (bounded by the target's connect
    /// timeout). Concurrent callers for one environment wait for each other's connect and share
    /// it. Errors as [`SshClient::connect`].
    pub async fn client(
        &self,
        environment_id: &str,
        target: &SshTarget,
    ) -> Result<SshClient, SshError> {
        let key = format!(
            "{environment_id} {}@{}:{} {}",
            target.user,
            target.host,
            target.port,
            super::keys::fingerprint(&target.host_key)
        );
        let slot = self.slot(&key);
        let mut conns = slot.lock().await;
        conns.retain(|weak| weak.upgrade().is_some_and(|h| !h.is_closed()));
        for weak in conns.iter() {
            if let Some(handle) = weak.upgrade() {
                // The pool's upgrade is one of the counted references; users are the others.
                if Arc::strong_count(&handle) - 1 < self.users_per_connection {
                    return Ok(SshClient::from_shared(handle));
                }
            }
        }
        let client = SshClient::connect(target).await?;
        conns.push(client.downgrade());
        Ok(client)
    }

    /// Live connections, over all environments (for ops and tests).
    pub fn connections(&self) -> usize {
        let slots: Vec<Slot> = self.lock().values().cloned().collect();
        slots
            .iter()
            .filter_map(|s| s.try_lock().ok())
            .map(|conns| {
                conns
                    .iter()
                    .filter(|w| w.upgrade().is_some_and(|h| !h.is_closed()))
                    .count()
            })
            .sum()
    }

    fn slot(&self, key: &str) -> Slot {
        let mut slots = self.lock();
        if let Some(slot) = slots.get(key) {
            return slot.clone();
        }
        // Forget environments with no live connection and nobody connecting (bounded by the
        // environments in use rather than every one ever seen).
        slots.retain(|_, slot| {
            Arc::strong_count(slot) > 1
                || slot
                    .try_lock()
                    .map_or(true, |c| c.iter().any(|w| w.strong_count() > 0))
        });
        slots.entry(key.to_owned()).or_default().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        // A panic while holding this lock leaves the map consistent (every step is one call).
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
