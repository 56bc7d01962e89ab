//! Environments and their event log. Only the environment's actor writes an environment's state;
//! handlers read.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};

use super::schema::{environment_events, environments};
use super::{DbConn, StoreResult};
use crate::db_run;

#[derive(Debug, Clone, Queryable, Selectable, Identifiable, Insertable)]
#[diesel(table_name = environments)]
#[diesel(check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct Environment {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub template: String,
    pub provider: String,
    pub status: String,
    pub status_version: i64,
    pub progress: i32,
    pub phase: Option<String>,
    pub message: Option<String>,
    pub error_message: Option<String>,
    pub region: String,
    pub size: String,
    pub resources: String,
    pub environment_variables: String,
    pub display_name: String,
    pub operation_id: Option<String>,
    pub create_attempts: i32,
    pub instance_id: Option<String>,
    pub ip_address: Option<String>,
    pub ssh_port: Option<i32>,
    pub ssh_user: String,
    pub ssh_public_key: String,
    pub ssh_private_key: String,
    pub host_public_key: String,
    pub host_private_key: Option<String>,
    pub dev_password_hash: Option<String>,
    pub installation_completed: bool,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    pub last_accessed: Option<NaiveDateTime>,
}

/// A state change as the actor persists it.
#[derive(Debug, Clone, AsChangeset)]
#[diesel(table_name = environments)]
#[diesel(treat_none_as_null = true)]
pub struct StatusChange {
    pub status: String,
    pub progress: i32,
    pub phase: Option<String>,
    pub message: Option<String>,
    pub error_message: Option<String>,
    pub installation_completed: bool,
    pub updated_at: NaiveDateTime,
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = environment_events)]
#[diesel(check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct EnvironmentEvent {
    pub id: i64,
    pub environment_id: String,
    pub occurred_at: NaiveDateTime,
    pub kind: String,
    pub level: String,
    pub source: String,
    pub message: String,
    pub status: Option<String>,
    pub status_version: Option<i64>,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = environment_events)]
pub struct NewEvent {
    pub environment_id: String,
    pub occurred_at: NaiveDateTime,
    pub kind: String,
    pub level: String,
    pub source: String,
    pub message: String,
    pub status: Option<String>,
    pub status_version: Option<i64>,
}

pub async fn insert(conn: &mut DbConn, env: &Environment) -> StoreResult<()> {
    db_run!(conn: {
        diesel::insert_into(environments::table).values(env).execute(conn).await?;
    });
    Ok(())
}

pub async fn get(conn: &mut DbConn, id: &str) -> StoreResult<Option<Environment>> {
    Ok(db_run!(conn: {
        environments::table.find(id).select(Environment::as_select()).first(conn).await.optional()?
    }))
}

/// An environment if `user_id` owns it (otherwise it does not exist for them).
pub async fn get_owned(
    conn: &mut DbConn,
    id: &str,
    user_id: &str,
) -> StoreResult<Option<Environment>> {
    Ok(db_run!(conn: {
        environments::table
            .filter(environments::id.eq(id))
            .filter(environments::user_id.eq(user_id))
            .select(Environment::as_select())
            .first(conn)
            .await
            .optional()?
    }))
}

pub async fn list_for_user(
    conn: &mut DbConn,
    user_id: &str,
    status: Option<&str>,
) -> StoreResult<Vec<Environment>> {
    Ok(db_run!(conn: {
        let mut q = environments::table
            .filter(environments::user_id.eq(user_id))
            .into_boxed();
        if let Some(status) = status {
            q = q.filter(environments::status.eq(status));
        }
        q.order((environments::created_at.desc(), environments::id.desc()))
            .select(Environment::as_select())
            .load(conn)
            .await?
    }))
}

/// Environments of a user that are not terminated (what plan limits count).
pub async fn count_active(conn: &mut DbConn, user_id: &str) -> StoreResult<i64> {
    Ok(db_run!(conn: {
        environments::table
            .filter(environments::user_id.eq(user_id))
            .filter(environments::status.ne("terminated"))
            .count()
            .get_result(conn)
            .await?
    }))
}

/// A user's environments by status, for the profile.
pub async fn count_by_status(conn: &mut DbConn, user_id: &str) -> StoreResult<Vec<(String, i64)>> {
    Ok(db_run!(conn: {
        environments::table
            .filter(environments::user_id.eq(user_id))
            .group_by(environments::status)
            .select((environments::status, diesel::dsl::count_star()))
            .load(conn)
            .await?
    }))
}

pub async fn name_in_use(
    conn: &mut DbConn,
    user_id: &str,
    name: &str,
    except: &str,
) -> StoreResult<bool> {
    let n: i64 = db_run!(conn: {
        environments::table
            .filter(environments::user_id.eq(user_id))
            .filter(environments::name.eq(name))
            .filter(environments::status.ne("terminated"))
            .filter(environments::id.ne(except))
            .count()
            .get_result(conn)
            .await?
    });
    Ok(n > 0)
}

/// Ids of every environment that is not terminated (their actors start with the server).
pub async fn resumable_ids(conn: &mut DbConn) -> StoreResult<Vec<String>> {
    Ok(db_run!(conn: {
        environments::table
            .filter(environments::status.ne("terminated"))
            .select(environments::id)
            .load(conn)
            .await?
    }))
}

/// Persist a transition: bump `status_version`, write the status event, in one transaction.
/// Returns the new version.
pub async fn record_transition(
    conn: &mut DbConn,
    id: &str,
    change: &StatusChange,
    event: NewEvent,
) -> StoreResult<i64> {
    let id = id.to_string();
    let change = change.clone();
    Ok(db_run!(conn: {
        conn.transaction::<_, diesel::result::Error, _>(async |c| {
            let version: i64 = diesel::update(environments::table.find(&id))
                .set((&change, environments::status_version.eq(environments::status_version + 1)))
                .returning(environments::status_version)
                .get_result(c)
                .await?;
            let event = NewEvent { status_version: Some(version), ..event };
            diesel::insert_into(environment_events::table).values(&event).execute(c).await?;
            Ok(version)
        })
        .await?
    }))
}

/// Progress within a phase: no new version, no event row.
pub async fn update_progress(
    conn: &mut DbConn,
    id: &str,
    change: &StatusChange,
) -> StoreResult<i64> {
    Ok(db_run!(conn: {
        diesel::update(environments::table.find(id))
            .set(change)
            .returning(environments::status_version)
            .get_result(conn)
            .await?
    }))
}

pub async fn add_event(conn: &mut DbConn, event: &NewEvent) -> StoreResult<()> {
    db_run!(conn: {
        diesel::insert_into(environment_events::table).values(event).execute(conn).await?;
    });
    Ok(())
}

/// Store the id of the create request about to be sent (before sending it).
pub async fn begin_create(
    conn: &mut DbConn,
    id: &str,
    operation_id: &str,
    now: NaiveDateTime,
) -> StoreResult<()> {
    db_run!(conn: {
        diesel::update(environments::table.find(id))
            .set((
                environments::operation_id.eq(Some(operation_id)),
                environments::create_attempts.eq(environments::create_attempts + 1),
                environments::updated_at.eq(now),
            ))
            .execute(conn)
            .await?;
    });
    Ok(())
}

pub async fn set_instance(
    conn: &mut DbConn,
    id: &str,
    instance_id: &str,
    now: NaiveDateTime,
) -> StoreResult<()> {
    db_run!(conn: {
        diesel::update(environments::table.find(id))
            .set((environments::instance_id.eq(Some(instance_id)), environments::updated_at.eq(now)))
            .execute(conn)
            .await?;
    });
    Ok(())
}

pub async fn set_address(
    conn: &mut DbConn,
    id: &str,
    ip: &str,
    port: i32,
    now: NaiveDateTime,
) -> StoreResult<()> {
    db_run!(conn: {
        diesel::update(environments::table.find(id))
            .set((
                environments::ip_address.eq(Some(ip)),
                environments::ssh_port.eq(Some(port)),
                environments::updated_at.eq(now),
            ))
            .execute(conn)
            .await?;
    });
    Ok(())
}

/// Rename / change variables (PUT).
pub async fn update_settings(
    conn: &mut DbConn,
    id: &str,
    name: Option<&str>,
    environment_variables: Option<&str>,
    now: NaiveDateTime,
) -> StoreResult<Environment> {
    Ok(db_run!(conn: {
        diesel::update(environments::table.find(id))
            .set((
                name.map(|n| environments::name.eq(n)),
                environment_variables.map(|v| environments::environment_variables.eq(v)),
                environments::updated_at.eq(now),
            ))
            .returning(Environment::as_returning())
            .get_result(conn)
            .await?
    }))
}

pub async fn touch_accessed(conn: &mut DbConn, id: &str, now: NaiveDateTime) -> StoreResult<()> {
    db_run!(conn: {
        diesel::update(environments::table.find(id))
            .set(environments::last_accessed.eq(Some(now)))
            .execute(conn)
            .await?;
    });
    Ok(())
}

/// Events of an environment, oldest first: the `limit` newest at or after `since`, and whether
/// older ones exist beyond them.
pub async fn events(
    conn: &mut DbConn,
    id: &str,
    since: Option<NaiveDateTime>,
    limit: i64,
) -> StoreResult<(Vec<EnvironmentEvent>, i64)> {
    macro_rules! filtered {
        () => {{
            let mut q = environment_events::table
                .filter(environment_events::environment_id.eq(id))
                .into_boxed();
            if let Some(since) = since {
                q = q.filter(environment_events::occurred_at.ge(since));
            }
            q
        }};
    }
    Ok(db_run!(conn: {
        let total: i64 = filtered!().count().get_result(conn).await?;
        let mut rows: Vec<EnvironmentEvent> = filtered!()
            .order(environment_events::id.desc())
            .limit(limit)
            .select(EnvironmentEvent::as_select())
            .load(conn)
            .await?;
        rows.reverse();
        (rows, total)
    }))
}
