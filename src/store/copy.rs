//! `devpocket migrate-store`: copy a single-node SQLite store into an empty PostgreSQL database,
//! table by table, in one PostgreSQL transaction (all or nothing). Values are copied as they are:
//! password hashes, refresh-token hashes and sealed secrets stay valid as long as the nodes on
//! PostgreSQL use the same keys (the SQLite node's `jwt.key` does not matter: access tokens expire;
//! its `seal.key` does: configure it as `secrets.seal_key`). The nodes table is not copied: nodes
//! register themselves; nor are the per-node presence tables (`terminals`, `connection_slots`):
//! their rows live as long as a terminal or WebSocket of a running node.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::schema;
use super::{Db, DbConn, DbUrl, SqliteConn};

/// Rows read and written per statement: bounds memory for any table size, and stays far below
/// PostgreSQL's 65535 bind parameters (31 columns × 1000 rows for environments).
const PAGE: i64 = 1000;

/// Rows copied per table, in copy order.
pub type CopyReport = Vec<(&'static str, usize)>;

/// Declare a full-row struct for a table (every column, plain types), readable from SQLite and
/// insertable into PostgreSQL.
macro_rules! full_row {
    ($name:ident, $table:ident { $($field:ident : $ty:ty),* $(,)? }) => {
        #[derive(Queryable, Selectable, Insertable)]
        #[diesel(table_name = schema::$table)]
        #[diesel(check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
        struct $name { $($field: $ty),* }
    };
}

full_row!(UserRow, users {
    id: String, username: String, username_key: String, email: String,
    password_hash: Option<String>, full_name: Option<String>, avatar_url: Option<String>,
    google_id: Option<String>, is_active: bool, is_verified: bool, subscription_plan: String,
    preferred_region: Option<String>, created_at: NaiveDateTime, updated_at: NaiveDateTime,
    last_login: Option<NaiveDateTime>,
});
full_row!(SessionRow, sessions {
    id: String, user_id: String, user_agent: Option<String>, ip_address: Option<String>,
    created_at: NaiveDateTime, last_used_at: NaiveDateTime, expires_at: NaiveDateTime,
    revoked_at: Option<NaiveDateTime>, revoked_reason: Option<String>,
    rotated_from: Option<String>, rotated_at: Option<NaiveDateTime>,
    successor_sealed: Option<String>,
});
full_row!(RefreshTokenRow, refresh_tokens {
    token_hash: String, session_id: String, created_at: NaiveDateTime,
    used_at: Option<NaiveDateTime>,
});
full_row!(
    LoginAttemptRow,
    login_attempts {
        subject: String,
        failures: i32,
        expires_at: NaiveDateTime,
        updated_at: NaiveDateTime,
    }
);
full_row!(AuditRow, audit_events {
    id: i64, occurred_at: NaiveDateTime, event: String, user_id: Option<String>,
    session_id: Option<String>, ip_address: Option<String>, request_id: Option<String>,
    detail: Option<String>,
});
full_row!(EnvironmentRow, environments {
    id: String, user_id: String, name: String, template: String, provider: String,
    status: String, status_version: i64, progress: i32, phase: Option<String>,
    message: Option<String>, error_message: Option<String>, region: String, size: String,
    resources: String, environment_variables: String, display_name: String,
    operation_id: Option<String>, create_attempts: i32, instance_id: Option<String>,
    ip_address: Option<String>, ssh_port: Option<i32>, ssh_user: String,
    ssh_public_key: String, ssh_private_key: String, host_public_key: String,
    host_private_key: Option<String>, dev_password_hash: Option<String>,
    installation_completed: bool, created_at: NaiveDateTime, updated_at: NaiveDateTime,
    last_accessed: Option<NaiveDateTime>,
});
full_row!(LeaseRow, environment_leases {
    environment_id: String, owner_node: Option<String>, epoch: i64,
});
full_row!(EventRow, environment_events {
    id: i64, environment_id: String, occurred_at: NaiveDateTime, kind: String, level: String,
    source: String, message: String, status: Option<String>, status_version: Option<i64>,
    progress: Option<i32>,
});
full_row!(
    MetricRow,
    environment_metrics {
        id: i64,
        environment_id: String,
        sampled_at: NaiveDateTime,
        cpu_usage: f64,
        memory_usage: f64,
        disk_usage: f64,
        network_in: i64,
        network_out: i64,
        uptime: i64,
    }
);
full_row!(
    TemplateRow,
    templates {
        id: String,
        definition: String,
        builtin: bool,
        updated_at: NaiveDateTime,
    }
);

full_row!(
    PreviewPortRow,
    preview_ports {
        environment_id: String,
        port: i32,
        visibility: String,
        updated_at: NaiveDateTime,
    }
);
full_row!(
    PreviewGrantRow,
    preview_grants {
        token_hash: String,
        kind: String,
        session_id: String,
        user_id: String,
        environment_id: String,
        port: i32,
        expires_at: NaiveDateTime,
        created_at: NaiveDateTime,
    }
);

/// Tables left out on purpose: nodes register themselves, commands in flight between nodes
/// belong to the nodes that sent them, and the presence rows of a node (its terminals and
/// WebSocket slots) end with the node.
pub const NOT_COPIED: [&str; 4] = [
    "nodes",
    "environment_commands",
    "terminals",
    "connection_slots",
];

/// Every table copied, in copy order (referenced rows first); see [`NOT_COPIED`]. A test checks this against the migrated schema.
pub const COPIED: [&str; 12] = [
    "users",
    "sessions",
    "refresh_tokens",
    "login_attempts",
    "audit_events",
    "environments",
    "environment_leases",
    "environment_events",
    "environment_metrics",
    "templates",
    "preview_ports",
    "preview_grants",
];

/// Copy one table page by page (ordered by its primary key); evaluates to the rows copied.
macro_rules! copy_table {
    ($src:expr, $dst:expr, $table:ident, $row:ty) => {{
        use schema::$table::dsl as t;
        let mut copied: usize = 0;
        loop {
            let page: Vec<$row> = schema::$table::table
                .order(diesel::Table::primary_key(&t::$table))
                .select(<$row>::as_select())
                .limit(PAGE)
                .offset(copied as i64)
                .load($src)
                .await?;
            if page.is_empty() {
                break;
            }
            diesel::insert_into(schema::$table::table)
                .values(&page)
                .execute($dst)
                .await?;
            copied += page.len();
        }
        (stringify!($table), copied)
    }};
}

/// Rows in one table of the target (to refuse a database that is not empty).
macro_rules! count {
    ($conn:expr, $table:ident) => {
        schema::$table::table
            .count()
            .get_result::<i64>($conn)
            .await
            .map(|n| (stringify!($table), n))
    };
}

/// Why a copy did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] super::StoreError),
    #[error(transparent)]
    Query(#[from] diesel::result::Error),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Copy every table of the SQLite store `from` into the PostgreSQL database `to`: both are
/// migrated to the current schema first; the target must be empty (no row in any table). One
/// transaction on the target: a failure leaves it as it was.
pub async fn sqlite_to_postgres(from: &DbUrl, to: &DbUrl) -> Result<CopyReport, CopyError> {
    let (DbUrl::Sqlite(_), DbUrl::Postgres(_)) = (from, to) else {
        return Err(CopyError::Refused(
            "migrate-store copies a SQLite store (--from sqlite://PATH) into PostgreSQL (--to postgres://...)".into(),
        ));
    };
    let timeout = std::time::Duration::from_secs(30);
    let source = Db::connect(from, 1, timeout).await?;
    source.migrate().await?;
    let target = Db::connect(to, 1, timeout).await?;
    target.migrate().await?;
    let (DbConn::Sqlite(mut src), DbConn::Pg(mut dst)) = (source.get().await?, target.get().await?)
    else {
        return Err(CopyError::Refused("unexpected backends".into()));
    };
    let src: &mut SqliteConn = &mut src;
    let dst: &mut AsyncPgConnection = &mut dst;
    let report = dst
        .transaction::<_, CopyError, _>(async |dst| {
            refuse_unless_empty(dst).await?;
            let report = vec![
                copy_table!(&mut *src, &mut *dst, users, UserRow),
                copy_table!(&mut *src, &mut *dst, sessions, SessionRow),
                copy_table!(&mut *src, &mut *dst, refresh_tokens, RefreshTokenRow),
                copy_table!(&mut *src, &mut *dst, login_attempts, LoginAttemptRow),
                copy_table!(&mut *src, &mut *dst, audit_events, AuditRow),
                copy_table!(&mut *src, &mut *dst, environments, EnvironmentRow),
                copy_table!(&mut *src, &mut *dst, environment_leases, LeaseRow),
                copy_table!(&mut *src, &mut *dst, environment_events, EventRow),
                copy_table!(&mut *src, &mut *dst, environment_metrics, MetricRow),
                copy_table!(&mut *src, &mut *dst, templates, TemplateRow),
                copy_table!(&mut *src, &mut *dst, preview_ports, PreviewPortRow),
                copy_table!(&mut *src, &mut *dst, preview_grants, PreviewGrantRow),
            ];
            debug_assert_eq!(report.iter().map(|(t, _)| *t).collect::<Vec<_>>(), COPIED);
            // The copied ids were given explicitly: move each sequence past them.
            for table in ["audit_events", "environment_events", "environment_metrics"] {
                diesel::sql_query(format!(
                    "SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
                ))
                .execute(dst)
                .await?;
            }
            Ok(report)
        })
        .await?;
    source.close();
    target.close();
    Ok(report)
}

async fn refuse_unless_empty(dst: &mut AsyncPgConnection) -> Result<(), CopyError> {
    let counts = [
        count!(dst, users)?,
        count!(dst, sessions)?,
        count!(dst, refresh_tokens)?,
        count!(dst, login_attempts)?,
        count!(dst, audit_events)?,
        count!(dst, environments)?,
        count!(dst, environment_leases)?,
        count!(dst, environment_events)?,
        count!(dst, environment_metrics)?,
        count!(dst, templates)?,
        count!(dst, preview_ports)?,
        count!(dst, preview_grants)?,
        count!(dst, nodes)?,
        count!(dst, environment_commands)?,
    ];
    let filled: Vec<String> = counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(table, n)| format!("{table} ({n} rows)"))
        .collect();
    if filled.is_empty() {
        Ok(())
    } else {
        Err(CopyError::Refused(format!(
            "the target database is not empty: {}; migrate-store only copies into an empty database",
            filled.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table added by a migration must be copied (or left out here on purpose).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn every_table_of_the_schema_is_copied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url =
            DbUrl::parse(&format!("sqlite://{}", dir.path().join("s.db").display())).expect("url");
        let db = Db::connect(&url, 1, std::time::Duration::from_secs(5))
            .await
            .expect("connect");
        db.migrate().await.expect("migrate");
        let DbConn::Sqlite(mut conn) = db.get().await.expect("conn") else {
            panic!("sqlite")
        };
        #[derive(QueryableByName)]
        struct Name {
            #[diesel(sql_type = diesel::sql_types::Text)]
            name: String,
        }
        let mut tables: Vec<String> = diesel::sql_query(
            "SELECT name FROM sqlite_master WHERE type = 'table' \
             AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '__diesel%'",
        )
        .load::<Name>(&mut *conn)
        .await
        .expect("tables")
        .into_iter()
        .map(|n| n.name)
        .filter(|n| !NOT_COPIED.contains(&n.as_str()))
        .collect();
        tables.sort();
        let mut copied: Vec<String> = COPIED.iter().map(|t| t.to_string()).collect();
        copied.sort();
        assert_eq!(tables, copied);
    }
}
