//! Signals between the nodes of a cluster: PostgreSQL `LISTEN`/`NOTIFY` (the PostgreSQL manual,
//! "NOTIFY": delivered to every listening session at the sender's commit, in commit order per
//! sender, at most 8000 bytes of payload, lost for a session that is not connected). A signal
//! carries ids and versions only; the data is read back from the store, so a lost signal costs a
//! delay, never a wrong answer: whoever listens re-reads the store on [`Heard::Resync`].
//!
//! Every node hears every signal, its own included (so a subscriber has one code path). On SQLite
//! (single node) signals go straight to this process's subscribers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::store::{Db, StoreError, StoreResult};

/// Signals kept per topic for a slow subscriber before it lags (it then gets
/// [`Heard::Resync`] and re-reads the store). Signals are small (two ids), so this bounds a
/// few hundred KiB per topic.
pub const TOPIC_CAPACITY: usize = 1024;
/// Largest payload PostgreSQL takes (`NOTIFY`: "must be shorter than 8000 bytes"), less room for
/// the sending node's id.
pub const MAX_PAYLOAD_BYTES: usize = 7900;
/// First wait before the listener connects again after losing its connection; doubled up to
/// [`RECONNECT_MAX`].
const RECONNECT_FIRST: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// What a signal is about (one PostgreSQL channel each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// An environment changed: payload `<environment id> <status_version>` (see
    /// [`crate::actors::environment`]), or `<environment id> line <event id>` for a log line.
    Environment,
    /// Login sessions ended: payload space-separated session ids.
    Session,
    /// A command waits for the environment's owner: payload `<target node> <command id>`.
    Command,
    /// A command was answered: payload `<command id>`.
    Reply,
    /// Leases were handed back (a node is draining): payload the number handed back.
    Lease,
}

impl Topic {
    pub const ALL: [Topic; 5] = [
        Topic::Environment,
        Topic::Session,
        Topic::Command,
        Topic::Reply,
        Topic::Lease,
    ];

    /// The PostgreSQL channel name.
    pub fn channel(self) -> &'static str {
        match self {
            Topic::Environment => "devpocket_environment",
            Topic::Session => "devpocket_session",
            Topic::Command => "devpocket_command",
            Topic::Reply => "devpocket_reply",
            Topic::Lease => "devpocket_lease",
        }
    }

    fn from_channel(channel: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.channel() == channel)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What a subscriber hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// A signal from `node` (this node's own included).
    Signal { node: Arc<str>, payload: Arc<str> },
    /// Signals may have been lost (the listener reconnected, or this receiver lagged): re-read
    /// what you follow from the store.
    Resync,
}

/// This node's end of the signals.
pub struct Signals {
    node: Arc<str>,
    /// The pool NOTIFYs go through (PostgreSQL); `None`: this process only (SQLite).
    db: Option<Db>,
    topics: Vec<broadcast::Sender<Heard>>,
    listener: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Signals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signals").field("node", &self.node).finish()
    }
}

impl Signals {
    /// Start listening. `postgres_url` is the database URL on PostgreSQL (a dedicated connection
    /// listens, outside the pool), `None` on SQLite.
    pub fn start(node: &str, db: &Db, postgres_url: Option<String>) -> Arc<Self> {
        let signals = Self::new(node, postgres_url.is_some().then(|| db.clone()));
        if let Some(url) = postgres_url {
            let task = tokio::spawn(listen(url, signals.topics.clone()));
            *signals.listener.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        }
        signals
    }

    /// Signals within this process only (SQLite, unit tests).
    pub fn detached(node: &str) -> Arc<Self> {
        Self::new(node, None)
    }

    fn new(node: &str, db: Option<Db>) -> Arc<Self> {
        let topics = Topic::ALL
            .iter()
            .map(|_| broadcast::channel(TOPIC_CAPACITY).0)
            .collect();
        Arc::new(Self {
            node: Arc::from(node),
            db,
            topics,
            listener: Mutex::new(None),
        })
    }

    /// This node's id (the sender of its signals).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Hear `topic` from now on.
    pub fn subscribe(&self, topic: Topic) -> broadcast::Receiver<Heard> {
        self.topics[topic.index()].subscribe()
    }

    /// Send a signal to every node (this one included). Errors: the payload is too long
    /// ([`MAX_PAYLOAD_BYTES`]) or the database is unreachable.
    pub async fn publish(&self, topic: Topic, payload: &str) -> StoreResult<()> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(StoreError::Unavailable(format!(
                "signal payload of {} bytes is over {MAX_PAYLOAD_BYTES}",
                payload.len()
            )));
        }
        match &self.db {
            Some(db) => {
                let mut conn = db.get().await?;
                let conn = &mut conn;
                let message = format!("{} {payload}", self.node);
                crate::db_run!(conn: {
                    diesel::sql_query("SELECT pg_notify($1, $2)")
                        .bind::<diesel::sql_types::Text, _>(topic.channel())
                        .bind::<diesel::sql_types::Text, _>(&message)
                        .execute(conn)
                        .await?;
                });
            }
            None => {
                let _ = self.topics[topic.index()].send(Heard::Signal {
                    node: self.node.clone(),
                    payload: Arc::from(payload),
                });
            }
        }
        Ok(())
    }

    /// Send `payloads`, each under [`MAX_PAYLOAD_BYTES`] joined by spaces, in as few signals as
    /// fit (e.g. many session ids).
    pub async fn publish_batched(&self, topic: Topic, payloads: &[String]) -> StoreResult<()> {
        let mut batch = String::new();
        for item in payloads {
            if !batch.is_empty() && batch.len() + 1 + item.len() > MAX_PAYLOAD_BYTES {
                self.publish(topic, &batch).await?;
                batch.clear();
            }
            if !batch.is_empty() {
                batch.push(' ');
            }
            batch.push_str(item);
        }
        if !batch.is_empty() {
            self.publish(topic, &batch).await?;
        }
        Ok(())
    }

    /// Stop listening.
    pub fn stop(&self) {
        if let Some(task) = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Tell every subscriber that signals may have been lost.
fn resync(topics: &[broadcast::Sender<Heard>]) {
    for topic in topics {
        let _ = topic.send(Heard::Resync);
    }
}

/// The listener: one connection that `LISTEN`s on every topic, connected again (with backoff)
/// whenever it is lost; subscribers are told to resync after each gap.
async fn listen(url: String, topics: Vec<broadcast::Sender<Heard>>) {
    let mut wait = RECONNECT_FIRST;
    loop {
        match listen_once(&url, &topics).await {
            Ok(()) => wait = RECONNECT_FIRST,
            Err(e) => {
                tracing::warn!(error = %e, retry_ms = wait.as_millis() as u64, "cluster signal listener lost its connection");
            }
        }
        resync(&topics);
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RECONNECT_MAX);
    }
}

async fn listen_once(url: &str, topics: &[broadcast::Sender<Heard>]) -> anyhow::Result<()> {
    let mut conn = AsyncPgConnection::establish(url).await?;
    let statements: String = Topic::ALL
        .iter()
        .map(|t| format!("LISTEN {};", t.channel()))
        .collect();
    conn.batch_execute(&statements).await?;
    // Anything sent before LISTEN took effect is lost to this node: re-read.
    resync(topics);
    let mut stream = std::pin::pin!(conn.notifications_stream());
    while let Some(item) = stream.next().await {
        let notification = item?;
        let Some(topic) = Topic::from_channel(&notification.channel) else {
            continue;
        };
        let (node, payload) = notification
            .payload
            .split_once(' ')
            .unwrap_or((notification.payload.as_str(), ""));
        let _ = topics[topic.index()].send(Heard::Signal {
            node: Arc::from(node),
            payload: Arc::from(payload),
        });
    }
    anyhow::bail!("the notification stream ended")
}

/// The next thing heard on `rx`, with lag turned into [`Heard::Resync`]; `None` when the signals
/// are gone (shutdown).
pub async fn next(rx: &mut broadcast::Receiver<Heard>) -> Option<Heard> {
    match rx.recv().await {
        Ok(heard) => Some(heard),
        Err(broadcast::error::RecvError::Lagged(_)) => Some(Heard::Resync),
        Err(broadcast::error::RecvError::Closed) => None,
    }
}
