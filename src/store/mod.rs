//! The store: diesel + diesel-async over SQLite (embedded default) or PostgreSQL.
//!
//! One `schema.rs` serves both backends; a query is written once inside [`db_run!`], which
//! type-checks and compiles the same body for each connection type (the Vaultwarden pattern).
//! Migrations for both dialects are embedded and run at start.

pub mod audit;
pub mod commands;
pub mod copy;
pub mod environments;
pub mod leases;
pub mod login_attempts;
pub mod nodes;
pub mod previews;
pub mod schema;
pub mod sessions;
pub mod slots;
pub mod templates;
pub mod terminals;
pub mod users;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::SqliteConnection;
use diesel_async::pooled_connection::deadpool::{Hook, HookError, Object, Pool};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, PoolError, RecyclingMethod,
};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{
    AsyncConnection, AsyncMigrationHarness, AsyncPgConnection, SimpleAsyncConnection,
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures_util::FutureExt;

pub type SqliteConn = SyncConnectionWrapper<SqliteConnection>;

const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
/// Advisory-lock key that lets one process at a time migrate a PostgreSQL database.
const MIGRATION_LOCK_KEY: i64 = 0x6465_7670_6f63_6b03; // "devpock" + 3

/// Per-connection SQLite settings: WAL for concurrent readers, a busy timeout so writers queue
/// instead of failing, and enforced foreign keys (cascades rely on them).
const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode=WAL; PRAGMA busy_timeout=5000; PRAGMA foreign_keys=ON; PRAGMA synchronous=NORMAL;";

/// Busy timeout of the connections that read inline ([`Db::read_sqlite`]): in WAL mode a reader
/// waits only in rare moments (another connection recovering the WAL index); past this the read
/// goes through the pool instead, off the async threads.
const SQLITE_INLINE_BUSY_MS: u32 = 50;
/// Connections that read inline, at most (one per async worker thread is all that can be busy at
/// once: an inline read never yields).
const SQLITE_INLINE_READERS: usize = 4;

/// A pooled connection idle this long is checked with a round trip (`SELECT 1`) before it is
/// handed out; one used more recently is handed out as it is (a broken one is still dropped, and
/// one that died since fails its query, which the caller sees as a 5xx once). Checking every
/// checkout cost a round trip per request — on SQLite a hop to a blocking thread and back.
const VERIFY_IDLE_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Query(#[from] diesel::result::Error),
    #[error("migration failed: {0}")]
    Migration(String),
    /// A write named a lease this node no longer holds (another node claimed the environment,
    /// or this node handed it back): refused, nothing written. See [`environments::Lease`].
    #[error("the lease on environment {0} is no longer held by this node")]
    Fenced(String),
}

impl StoreError {
    /// Whether this is a unique-constraint violation, and on what (constraint or message text,
    /// which name the column on both backends).
    pub fn unique_violation(&self) -> Option<String> {
        use diesel::result::{DatabaseErrorKind, Error};
        match self {
            Self::Query(Error::DatabaseError(DatabaseErrorKind::UniqueViolation, info)) => Some(
                info.constraint_name()
                    .map(str::to_string)
                    .unwrap_or_else(|| info.message().to_string()),
            ),
            _ => None,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A parsed database URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

impl DbUrl {
    pub fn parse(url: &str) -> Option<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres(url.to_string()))
        } else if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            (!path.is_empty()).then(|| Self::Sqlite(PathBuf::from(path)))
        } else {
            None
        }
    }

    /// The URL from config, or the default SQLite file in the data directory.
    pub fn from_config(url: &str, data_dir: &Path) -> Option<Self> {
        if url.is_empty() {
            Some(Self::Sqlite(data_dir.join("devpocket.db")))
        } else {
            Self::parse(url)
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }
}

/// A pool of connections to one backend (and, on SQLite, the connections of
/// [`Db::read_sqlite`]).
#[derive(Clone)]
pub enum Db {
    Pg(Pool<AsyncPgConnection>, Duration),
    Sqlite(Pool<SqliteConn>, Duration, Arc<InlineReaders>),
}

/// Plain (synchronous) SQLite connections for the few hot reads of the request path, run on the
/// calling async thread instead of a blocking thread: a read of a few indexed rows takes
/// microseconds, while the hop to `spawn_blocking` and back (futex wake-ups on both sides) cost
/// more than the rest of the request together (profiled under `wrk`, issue 12). Bounded:
/// at most [`SQLITE_INLINE_READERS`] connections, opened on first use.
pub struct InlineReaders {
    path: String,
    idle: Mutex<Vec<SqliteConnection>>,
    open: std::sync::atomic::AtomicUsize,
}

impl InlineReaders {
    fn new(path: String) -> Self {
        Self {
            path,
            idle: Mutex::new(Vec::new()),
            open: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// An idle connection, or a new one while fewer than the bound are open; `None` otherwise.
    fn take(&self) -> Option<SqliteConnection> {
        use diesel::Connection;
        use diesel::connection::SimpleConnection;
        use std::sync::atomic::Ordering;
        if let Some(conn) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Some(conn);
        }
        if self.open.fetch_add(1, Ordering::AcqRel) >= SQLITE_INLINE_READERS {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let opened = SqliteConnection::establish(&self.path).and_then(|mut conn| {
            conn.batch_execute(&format!(
                "PRAGMA busy_timeout={SQLITE_INLINE_BUSY_MS}; PRAGMA foreign_keys=ON; PRAGMA query_only=ON;"
            ))
            .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
            Ok(conn)
        });
        match opened {
            Ok(conn) => Some(conn),
            Err(e) => {
                self.open.fetch_sub(1, Ordering::AcqRel);
                tracing::debug!(error = %e, "could not open an inline SQLite reader");
                None
            }
        }
    }

    fn put_back(&self, conn: SqliteConnection) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
    }

    fn discard(&self) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A pooled connection; use it through [`db_run!`]. (Lives on the stack of one request; the
/// size difference between the variants does not matter there.)
#[allow(clippy::large_enum_variant)]
pub enum DbConn {
    Pg(Object<AsyncPgConnection>),
    Sqlite(Object<SqliteConn>),
}

/// Run one query body on whichever backend the connection is, compiled once per backend.
/// `db_run!(conn: { ... })` for shared bodies; `db_run!(conn: pg { ... } sqlite { ... })` where the
/// dialects differ.
#[macro_export]
macro_rules! db_run {
    ($conn:ident: $body:block) => {
        match $conn {
            $crate::store::DbConn::Pg($conn) => {
                let $conn: &mut diesel_async::AsyncPgConnection = &mut *$conn;
                $body
            }
            $crate::store::DbConn::Sqlite($conn) => {
                let $conn: &mut $crate::store::SqliteConn = &mut *$conn;
                $body
            }
        }
    };
    ($conn:ident: pg $pg:block sqlite $sq:block) => {
        match $conn {
            $crate::store::DbConn::Pg($conn) => {
                let $conn: &mut diesel_async::AsyncPgConnection = &mut *$conn;
                $pg
            }
            $crate::store::DbConn::Sqlite($conn) => {
                let $conn: &mut $crate::store::SqliteConn = &mut *$conn;
                $sq
            }
        }
    };
}

/// Bounds on a transaction that takes locks other nodes wait for (the claim lock, a lease row):
/// a node paused (SIGSTOP, a long GC-like stall, a frozen VM) in the middle of one would
/// otherwise hold the lock until its TCP connection dies, and every other node's claims would
/// wait behind it. PostgreSQL ends a session idle in its transaction for
/// `idle_in_transaction_session_timeout` (its transaction rolls back, its locks go), and a waiter
/// gives up after `lock_timeout` (the claim is retried at the next heartbeat). Both are
/// transaction-local (`set_config(…, true)`). Our own transactions take milliseconds.
const LOCK_BOUNDS_SQL: &str = "SELECT set_config('idle_in_transaction_session_timeout', '5s', true), set_config('lock_timeout', '10s', true)";

/// Apply [`LOCK_BOUNDS_SQL`] to the current transaction (nothing on SQLite: one process).
pub trait BoundLocks {
    fn bound_locks(
        &mut self,
    ) -> impl std::future::Future<Output = Result<(), diesel::result::Error>> + Send;
}

impl BoundLocks for AsyncPgConnection {
    fn bound_locks(
        &mut self,
    ) -> impl std::future::Future<Output = Result<(), diesel::result::Error>> + Send {
        use diesel_async::RunQueryDsl;
        async move {
            diesel::sql_query(LOCK_BOUNDS_SQL)
                .execute(self)
                .await
                .map(|_| ())
        }
    }
}

impl BoundLocks for SqliteConn {
    fn bound_locks(
        &mut self,
    ) -> impl std::future::Future<Output = Result<(), diesel::result::Error>> + Send {
        std::future::ready(Ok(()))
    }
}

/// Run `$body` (a block using connection `$c`, evaluating to `Result<T, diesel::result::Error>`)
/// in one transaction serialised with every other transaction naming the same `$key`:
/// PostgreSQL takes the transaction-scoped advisory lock `$key` first; SQLite takes the write
/// lock up front (`BEGIN IMMEDIATE`, one writer at a time anyway). Evaluates to the body's
/// result.
#[macro_export]
macro_rules! serialised {
    ($conn:ident, $key:expr, |$c:ident| $body:block) => {
        $crate::db_run!($conn: pg {
            $conn
                .transaction(async |$c| {
                    $crate::store::BoundLocks::bound_locks($c).await?;
                    diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
                        .bind::<diesel::sql_types::BigInt, _>($key)
                        .execute($c)
                        .await?;
                    $body
                })
                .await
        } sqlite {
            $conn.immediate_transaction(async |$c| $body).await
        })
    };
}

impl Db {
    /// Open a pool of at most `max` connections; acquiring one waits at most `acquire_timeout`.
    pub async fn connect(url: &DbUrl, max: u32, acquire_timeout: Duration) -> anyhow::Result<Self> {
        let max = max.max(1) as usize;
        match url {
            DbUrl::Postgres(url) => {
                let mut config = ManagerConfig::<AsyncPgConnection>::default();
                config.recycling_method = RecyclingMethod::Fast;
                let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
                    url.clone(),
                    config,
                );
                let pool = Pool::builder(manager)
                    .max_size(max)
                    .pre_recycle(verify_when_idle())
                    .build()?;
                Ok(Self::Pg(pool, acquire_timeout))
            }
            DbUrl::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                let mut config = ManagerConfig::<SqliteConn>::default();
                config.recycling_method = RecyclingMethod::Fast;
                config.custom_setup = Box::new(|url| {
                    async move {
                        let mut conn = SqliteConn::establish(url).await?;
                        conn.batch_execute(SQLITE_PRAGMAS)
                            .await
                            .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                        Ok(conn)
                    }
                    .boxed()
                });
                let manager = AsyncDieselConnectionManager::<SqliteConn>::new_with_config(
                    path.to_string_lossy(),
                    config,
                );
                let pool = Pool::builder(manager)
                    .max_size(max)
                    .pre_recycle(verify_when_idle())
                    .build()?;
                let readers = Arc::new(InlineReaders::new(path.to_string_lossy().into_owned()));
                Ok(Self::Sqlite(pool, acquire_timeout, readers))
            }
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Self::Pg(..) => "postgres",
            Self::Sqlite(..) => "sqlite",
        }
    }

    pub async fn get(&self) -> StoreResult<DbConn> {
        match self {
            Self::Pg(pool, timeout) => Ok(DbConn::Pg(acquire(pool, *timeout).await?)),
            Self::Sqlite(pool, timeout, _) => Ok(DbConn::Sqlite(acquire(pool, *timeout).await?)),
        }
    }

    /// On SQLite, run the read `query` on this thread with a plain connection (see
    /// [`InlineReaders`]); `None` on PostgreSQL, when every inline reader is in use, or when the
    /// read failed (busy, I/O): the caller then reads through [`Db::get`] as usual, which reports
    /// a lasting failure properly. Only for short reads of a few rows by index — never writes
    /// (the connections are `query_only`), never anything that could wait.
    pub fn read_sqlite<T>(
        &self,
        query: impl FnOnce(&mut SqliteConnection) -> diesel::QueryResult<T>,
    ) -> Option<T> {
        let Self::Sqlite(_, _, readers) = self else {
            return None;
        };
        let mut conn = readers.take()?;
        match query(&mut conn) {
            Ok(value) => {
                readers.put_back(conn);
                Some(value)
            }
            Err(e) => {
                tracing::debug!(error = %e, "inline SQLite read failed; reading through the pool");
                drop(conn);
                readers.discard();
                None
            }
        }
    }

    /// Apply pending migrations; returns the versions applied. On PostgreSQL one process at a
    /// time (a session advisory lock): nodes started together on a fresh database would each
    /// run the first migration, and all but one fail on the tables the winner created.
    pub async fn migrate(&self) -> StoreResult<Vec<String>> {
        let conn = self.get().await?;
        let applied = match conn {
            DbConn::Pg(mut c) => {
                use diesel_async::RunQueryDsl;
                diesel::sql_query("SELECT pg_advisory_lock($1)")
                    .bind::<diesel::sql_types::BigInt, _>(MIGRATION_LOCK_KEY)
                    .execute(&mut c)
                    .await?;
                let mut harness = AsyncMigrationHarness::new(c);
                let applied = harness
                    .run_pending_migrations(PG_MIGRATIONS)
                    .map(|v| v.iter().map(ToString::to_string).collect());
                // Closed rather than returned to the pool: its session ends, and the lock with
                // it, whatever state the migrations left it in.
                drop(Object::take(harness.into_inner()));
                applied
            }
            DbConn::Sqlite(c) => AsyncMigrationHarness::new(c)
                .run_pending_migrations(SQLITE_MIGRATIONS)
                .map(|v| v.iter().map(ToString::to_string).collect()),
        };
        applied.map_err(|e| StoreError::Migration(e.to_string()))
    }

    /// Apply pending migrations up to and including `last` (a version such as
    /// `2026-11-22-000002`), as an older release would have: lets a test put data in an old
    /// schema and then migrate it forward with [`Db::migrate`].
    pub async fn migrate_until(&self, last: &str) -> StoreResult<()> {
        fn run<H, DB>(harness: &mut H, source: EmbeddedMigrations, last: &str) -> StoreResult<()>
        where
            H: MigrationHarness<DB>,
            DB: diesel::backend::Backend,
            EmbeddedMigrations: diesel::migration::MigrationSource<DB>,
        {
            // Versions compare by their digits (diesel may print them without the dashes).
            let digits = |v: &str| v.chars().filter(char::is_ascii_digit).collect::<String>();
            let last = digits(last);
            let pending = harness
                .pending_migrations(source)
                .map_err(|e| StoreError::Migration(e.to_string()))?;
            for migration in pending {
                if digits(&migration.name().version().to_string()) > last {
                    break;
                }
                harness
                    .run_migration(&*migration)
                    .map_err(|e| StoreError::Migration(e.to_string()))?;
            }
            Ok(())
        }
        match self.get().await? {
            DbConn::Pg(c) => run(&mut AsyncMigrationHarness::new(c), PG_MIGRATIONS, last),
            DbConn::Sqlite(c) => run(&mut AsyncMigrationHarness::new(c), SQLITE_MIGRATIONS, last),
        }
    }

    /// Close the pool: idle connections now, busy ones when they come back.
    pub fn close(&self) {
        match self {
            Self::Pg(pool, _) => pool.close(),
            Self::Sqlite(pool, _, readers) => {
                pool.close();
                let idle =
                    std::mem::take(&mut *readers.idle.lock().unwrap_or_else(|e| e.into_inner()));
                for _ in idle {
                    readers.discard();
                }
            }
        }
    }

    /// A trivial round trip, for readiness checks.
    pub async fn ping(&self) -> StoreResult<()> {
        let mut conn = self.get().await?;
        let conn = &mut conn;
        db_run!(conn: {
            conn.batch_execute("SELECT 1").await?;
        });
        Ok(())
    }
}

/// The pool's `pre_recycle` hook: a round trip only for a connection idle at least
/// [`VERIFY_IDLE_AFTER`] (the managers themselves are set to `RecyclingMethod::Fast`).
fn verify_when_idle<C>() -> Hook<C>
where
    C: SimpleAsyncConnection + Send + 'static,
    AsyncDieselConnectionManager<C>: deadpool::managed::Manager<Type = C, Error = PoolError>,
{
    Hook::async_fn(|conn: &mut C, metrics: &deadpool::managed::Metrics| {
        let idle = metrics.last_used() >= VERIFY_IDLE_AFTER;
        Box::pin(async move {
            if idle {
                conn.batch_execute("SELECT 1")
                    .await
                    .map_err(|e| HookError::Backend(PoolError::QueryError(e)))?;
            }
            Ok(())
        })
    })
}

async fn acquire<C>(pool: &Pool<C>, timeout: Duration) -> StoreResult<Object<C>>
where
    C: 'static,
    AsyncDieselConnectionManager<C>: deadpool::managed::Manager<Type = C>,
    <AsyncDieselConnectionManager<C> as deadpool::managed::Manager>::Error: std::fmt::Display,
{
    match tokio::time::timeout(timeout, pool.get()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(StoreError::Unavailable(e.to_string())),
        Err(_) => Err(StoreError::Unavailable(format!(
            "no connection within {}s",
            timeout.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_pick_the_backend() {
        assert_eq!(
            DbUrl::parse("sqlite:///var/db.sqlite"),
            Some(DbUrl::Sqlite(PathBuf::from("/var/db.sqlite")))
        );
        assert_eq!(
            DbUrl::parse("sqlite:rel.db"),
            Some(DbUrl::Sqlite(PathBuf::from("rel.db")))
        );
        assert!(matches!(
            DbUrl::parse("postgresql://u@h/d"),
            Some(DbUrl::Postgres(_))
        ));
        assert!(matches!(
            DbUrl::parse("postgres://u@h/d"),
            Some(DbUrl::Postgres(_))
        ));
        assert_eq!(DbUrl::parse("mysql://x"), None);
        assert_eq!(
            DbUrl::from_config("", Path::new("/d")),
            Some(DbUrl::Sqlite(PathBuf::from("/d/devpocket.db")))
        );
    }
}
