//! Environments, their event log and their metrics samples. Only the environment actors (and the
//! create path of the environments supervisor) write; the front end reads.
//!
//! Invariants the store enforces itself, whatever races above it: one live (non-terminated)
//! environment per user and name (the partial unique index `environments_user_live_name`), and
//! the plan limit, checked and written in one transaction by [`insert_checked`].

use chrono::NaiveDateTime;
use diesel::backend::Backend;
use diesel::deserialize::{self, FromSql};
use diesel::prelude::*;
use diesel::serialize::{self, Output, ToSql};
use diesel::sql_types::Text;
use diesel_async::{AsyncConnection, RunQueryDsl};

pub use super::leases::Lease;
use super::leases::under_lease;
use super::schema::{
    environment_events, environment_leases, environment_metrics, environments, users,
};
use super::users::Plan;
use super::{Db, DbConn, StoreResult};
use crate::actors::environment::machine::Status;
use crate::db_run;

impl ToSql<Text, diesel::pg::Pg> for Status {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, diesel::pg::Pg>) -> serialize::Result {
        <str as ToSql<Text, diesel::pg::Pg>>::to_sql(self.as_str(), out)
    }
}

impl ToSql<Text, diesel::sqlite::Sqlite> for Status {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, diesel::sqlite::Sqlite>) -> serialize::Result {
        out.set_value(self.as_str());
        Ok(serialize::IsNull::No)
    }
}

impl<DB: Backend> FromSql<Text, DB> for Status
where
    String: FromSql<Text, DB>,
{
    fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
        let text = String::from_sql(bytes)?;
        Ok(text.parse()?)
    }
}

#[derive(Debug, Clone, Queryable, Selectable, Identifiable, Insertable)]
#[diesel(table_name = environments)]
#[diesel(check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct Environment {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub template: String,
    pub provider: String,
    pub status: Status,
    pub status_version: i64,
    pub progress: i32,
    pub phase: Option<Status>,
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
    pub status: Status,
    pub progress: i32,
    pub phase: Option<Status>,
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
    pub status: Option<Status>,
    pub status_version: Option<i64>,
    /// Status events: the progress (0–100) the environment had then.
    pub progress: Option<i32>,
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
    pub status: Option<Status>,
    pub status_version: Option<i64>,
    /// Status events: the progress (0–100) the environment had then.
    pub progress: Option<i32>,
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
    status: Option<Status>,
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

/// [`list_for_user`] on a connection of its own: inline on SQLite ([`Db::read_sqlite`], the same
/// query), else through the pool. `GET /api/v1/environments`.
pub async fn list_for_user_in(
    db: &Db,
    user_id: &str,
    status: Option<Status>,
) -> StoreResult<Vec<Environment>> {
    // Not boxed (unlike `list_for_user`): a query of a static type is prepared once per
    // connection and never rendered to SQL again; a boxed one is rendered on every call.
    let inline = db.read_sqlite(|conn| {
        let order = (environments::created_at.desc(), environments::id.desc());
        let mine = environments::table.filter(environments::user_id.eq(user_id));
        match status {
            Some(status) => diesel::RunQueryDsl::load(
                mine.filter(environments::status.eq(status))
                    .order(order)
                    .select(Environment::as_select()),
                conn,
            ),
            None => {
                diesel::RunQueryDsl::load(mine.order(order).select(Environment::as_select()), conn)
            }
        }
    });
    match inline {
        Some(envs) => Ok(envs),
        None => list_for_user(&mut db.get().await?, user_id, status).await,
    }
}

/// Environments of a user that are not terminated (what plan limits count).
pub async fn count_active(conn: &mut DbConn, user_id: &str) -> StoreResult<i64> {
    Ok(db_run!(conn: {
        environments::table
            .filter(environments::user_id.eq(user_id))
            .filter(environments::status.ne(Status::Terminated))
            .count()
            .get_result(conn)
            .await?
    }))
}

/// A user's environments by status, for the profile.
pub async fn count_by_status(conn: &mut DbConn, user_id: &str) -> StoreResult<Vec<(Status, i64)>> {
    Ok(db_run!(conn: {
        environments::table
            .filter(environments::user_id.eq(user_id))
            .group_by(environments::status)
            .select((environments::status, diesel::dsl::count_star()))
            .load(conn)
            .await?
    }))
}

/// Persist a transition under `lease`: bump `status_version`, write the status event, in one
/// transaction. Returns the new version; [`super::StoreError::Fenced`] when the lease is lost.
pub async fn record_transition(
    conn: &mut DbConn,
    lease: &Lease,
    change: &StatusChange,
    event: NewEvent,
) -> StoreResult<i64> {
    let change = change.clone();
    under_lease!(conn, lease, |c| {
        let version: i64 = diesel::update(environments::table.find(&lease.environment_id))
            .set((
                &change,
                environments::status_version.eq(environments::status_version + 1),
            ))
            .returning(environments::status_version)
            .get_result(c)
            .await?;
        let event = NewEvent {
            status_version: Some(version),
            progress: Some(change.progress),
            ..event.clone()
        };
        diesel::insert_into(environment_events::table)
            .values(&event)
            .execute(c)
            .await?;
        version
    })
}

/// Progress within a phase under `lease`: no new version, no event row.
pub async fn update_progress(
    conn: &mut DbConn,
    lease: &Lease,
    change: &StatusChange,
) -> StoreResult<i64> {
    under_lease!(conn, lease, |c| {
        diesel::update(environments::table.find(&lease.environment_id))
            .set(change)
            .returning(environments::status_version)
            .get_result::<i64>(c)
            .await?
    })
}

/// Add an event row (an installation line) under `lease`.
pub async fn add_event(conn: &mut DbConn, lease: &Lease, event: &NewEvent) -> StoreResult<()> {
    under_lease!(conn, lease, |c| {
        diesel::insert_into(environment_events::table)
            .values(event)
            .execute(c)
            .await?;
    })
}

/// Store the id of the create request about to be sent (before sending it), under `lease`.
pub async fn begin_create(
    conn: &mut DbConn,
    lease: &Lease,
    operation_id: &str,
    now: NaiveDateTime,
) -> StoreResult<()> {
    under_lease!(conn, lease, |c| {
        diesel::update(environments::table.find(&lease.environment_id))
            .set((
                environments::operation_id.eq(Some(operation_id)),
                environments::create_attempts.eq(environments::create_attempts + 1),
                environments::updated_at.eq(now),
            ))
            .execute(c)
            .await?;
    })
}

/// Record the instance the provider made, under `lease`.
pub async fn set_instance(
    conn: &mut DbConn,
    lease: &Lease,
    instance_id: &str,
    now: NaiveDateTime,
) -> StoreResult<()> {
    under_lease!(conn, lease, |c| {
        diesel::update(environments::table.find(&lease.environment_id))
            .set((
                environments::instance_id.eq(Some(instance_id)),
                environments::updated_at.eq(now),
            ))
            .execute(c)
            .await?;
    })
}

/// Record the instance's address, under `lease`.
pub async fn set_address(
    conn: &mut DbConn,
    lease: &Lease,
    ip: &str,
    port: i32,
    now: NaiveDateTime,
) -> StoreResult<()> {
    under_lease!(conn, lease, |c| {
        diesel::update(environments::table.find(&lease.environment_id))
            .set((
                environments::ip_address.eq(Some(ip)),
                environments::ssh_port.eq(Some(port)),
                environments::updated_at.eq(now),
            ))
            .execute(c)
            .await?;
    })
}

/// Rename / change variables (PUT) under `lease`. A name another live environment of the user
/// holds is refused by the unique index in the same statement (`Ok(None)`): no check-then-act.
pub async fn update_settings(
    conn: &mut DbConn,
    lease: &Lease,
    name: Option<&str>,
    environment_variables: Option<&str>,
    now: NaiveDateTime,
) -> StoreResult<Option<Environment>> {
    let result: StoreResult<Environment> = under_lease!(conn, lease, |c| {
        diesel::update(environments::table.find(&lease.environment_id))
            .set((
                name.map(|n| environments::name.eq(n)),
                environment_variables.map(|v| environments::environment_variables.eq(v)),
                environments::updated_at.eq(now),
            ))
            .returning(Environment::as_returning())
            .get_result(c)
            .await?
    });
    match result {
        Ok(env) => Ok(Some(env)),
        Err(e) if is_name_violation(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether a store error is the live-name unique index refusing a write.
fn is_name_violation(e: &super::StoreError) -> bool {
    e.unique_violation().is_some_and(|on| on.contains("name"))
}

/// Why [`insert_checked`] refused a new environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateRefusal {
    /// The user's plan allows `limit` live environments and they hold that many.
    PlanLimit { plan: Plan, limit: u32 },
    /// Another live environment of the user has this name.
    NameTaken,
    /// The user no longer exists, or is being deleted (deactivated first, so that no environment
    /// can be created behind account deletion's back).
    NoUser,
}

/// Insert a new environment and its first event if the user's plan has room (counted over every
/// non-terminated environment) and the name is free among them — checked and written in one
/// transaction that serialises the user's creates: PostgreSQL locks the user's row
/// (`SELECT … FOR UPDATE`), SQLite takes the write lock up front (`BEGIN IMMEDIATE`). The plan
/// limit is checked before the name; the partial unique index backs the name check up. The new
/// environment's lease is `owner_node`'s (epoch 1), written in the same transaction.
pub async fn insert_checked(
    conn: &mut DbConn,
    env: &Environment,
    event: &NewEvent,
    owner_node: &str,
) -> StoreResult<Result<(), CreateRefusal>> {
    let (env, event) = (env.clone(), event.clone());
    macro_rules! checked_insert {
        ($c:ident, $plan:expr) => {{
            let Some((plan, true)) = $plan else {
                return Ok(Err(CreateRefusal::NoUser));
            };
            let plan = Plan::parse(&plan).unwrap_or(Plan::Free);
            let limit = plan.max_environments();
            let live: i64 = environments::table
                .filter(environments::user_id.eq(&env.user_id))
                .filter(environments::status.ne(Status::Terminated))
                .count()
                .get_result($c)
                .await?;
            if live >= i64::from(limit) {
                return Ok(Err(CreateRefusal::PlanLimit { plan, limit }));
            }
            let same_name: i64 = environments::table
                .filter(environments::user_id.eq(&env.user_id))
                .filter(environments::name.eq(&env.name))
                .filter(environments::status.ne(Status::Terminated))
                .count()
                .get_result($c)
                .await?;
            if same_name > 0 {
                return Ok(Err(CreateRefusal::NameTaken));
            }
            diesel::insert_into(environments::table)
                .values(&env)
                .execute($c)
                .await?;
            diesel::insert_into(environment_leases::table)
                .values((
                    environment_leases::environment_id.eq(&env.id),
                    environment_leases::owner_node.eq(owner_node),
                    environment_leases::epoch.eq(1_i64),
                ))
                .execute($c)
                .await?;
            diesel::insert_into(environment_events::table)
                .values(&event)
                .execute($c)
                .await?;
            Ok(Ok(()))
        }};
    }
    let result: Result<Result<(), CreateRefusal>, diesel::result::Error> = db_run!(conn: pg {
        conn.transaction(async |c| {
            let plan: Option<(String, bool)> = users::table
                .find(&env.user_id)
                .select((users::subscription_plan, users::is_active))
                .for_update()
                .first(c)
                .await
                .optional()?;
            checked_insert!(c, plan)
        })
        .await
    } sqlite {
        conn.immediate_transaction(async |c| {
            let plan: Option<(String, bool)> = users::table
                .find(&env.user_id)
                .select((users::subscription_plan, users::is_active))
                .first(c)
                .await
                .optional()?;
            checked_insert!(c, plan)
        })
        .await
    });
    match result.map_err(super::StoreError::from) {
        Ok(outcome) => Ok(outcome),
        Err(e) if is_name_violation(&e) => Ok(Err(CreateRefusal::NameTaken)),
        Err(e) => Err(e),
    }
}

/// The checks of [`insert_checked`] without its transaction: a fast refusal before the costly
/// part of a create. Only a hint — the insert checks again where it holds.
pub async fn precheck(
    conn: &mut DbConn,
    user_id: &str,
    name: &str,
) -> StoreResult<Option<CreateRefusal>> {
    let (plan, active, live, same_name): (Option<String>, Option<bool>, i64, i64) = db_run!(conn: {
        let user: Option<(String, bool)> = users::table
            .find(user_id)
            .select((users::subscription_plan, users::is_active))
            .first(conn)
            .await
            .optional()?;
        let live: i64 = environments::table
            .filter(environments::user_id.eq(user_id))
            .filter(environments::status.ne(Status::Terminated))
            .count()
            .get_result(conn)
            .await?;
        let same_name: i64 = environments::table
            .filter(environments::user_id.eq(user_id))
            .filter(environments::name.eq(name))
            .filter(environments::status.ne(Status::Terminated))
            .count()
            .get_result(conn)
            .await?;
        (user.as_ref().map(|u| u.0.clone()), user.map(|u| u.1), live, same_name)
    });
    let (Some(plan), Some(true)) = (plan, active) else {
        return Ok(Some(CreateRefusal::NoUser));
    };
    let plan = Plan::parse(&plan).unwrap_or(Plan::Free);
    let limit = plan.max_environments();
    Ok(if live >= i64::from(limit) {
        Some(CreateRefusal::PlanLimit { plan, limit })
    } else if same_name > 0 {
        Some(CreateRefusal::NameTaken)
    } else {
        None
    })
}

/// The live environments of a user (what account deletion must delete first).
pub async fn live_ids_for_user(conn: &mut DbConn, user_id: &str) -> StoreResult<Vec<String>> {
    Ok(db_run!(conn: {
        environments::table
            .filter(environments::user_id.eq(user_id))
            .filter(environments::status.ne(Status::Terminated))
            .select(environments::id)
            .load(conn)
            .await?
    }))
}

/// One metrics sample as stored.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = environment_metrics)]
#[diesel(check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct MetricsRow {
    pub environment_id: String,
    pub sampled_at: NaiveDateTime,
    pub cpu_usage: f64,
    pub memory_usage: f64,
    pub disk_usage: f64,
    pub network_in: i64,
    pub network_out: i64,
    pub uptime: i64,
}

/// Store a sample and drop the environment's samples older than `keep_after` (retention), so
/// the table stays bounded by retention ÷ interval rows per environment.
pub async fn add_sample(
    conn: &mut DbConn,
    sample: &MetricsRow,
    keep_after: NaiveDateTime,
) -> StoreResult<()> {
    db_run!(conn: {
        diesel::insert_into(environment_metrics::table).values(sample).execute(conn).await?;
        diesel::delete(
            environment_metrics::table
                .filter(environment_metrics::environment_id.eq(&sample.environment_id))
                .filter(environment_metrics::sampled_at.lt(keep_after)),
        )
        .execute(conn)
        .await?;
    });
    Ok(())
}

/// The newest sample of an environment, and its samples at or after `since`, oldest first (at
/// most `limit`).
pub async fn samples(
    conn: &mut DbConn,
    id: &str,
    since: NaiveDateTime,
    limit: i64,
) -> StoreResult<(Option<MetricsRow>, Vec<MetricsRow>)> {
    Ok(db_run!(conn: {
        let latest = environment_metrics::table
            .filter(environment_metrics::environment_id.eq(id))
            .order(environment_metrics::id.desc())
            .select(MetricsRow::as_select())
            .first(conn)
            .await
            .optional()?;
        let rows = environment_metrics::table
            .filter(environment_metrics::environment_id.eq(id))
            .filter(environment_metrics::sampled_at.ge(since))
            .order(environment_metrics::id.asc())
            .limit(limit)
            .select(MetricsRow::as_select())
            .load(conn)
            .await?;
        (latest, rows)
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
/// Events of an environment after event id `after` (oldest first, at most `limit`): what a node
/// relays of an environment another node runs.
pub async fn events_after(
    conn: &mut DbConn,
    id: &str,
    after: i64,
    limit: i64,
) -> StoreResult<Vec<EnvironmentEvent>> {
    Ok(db_run!(conn: {
        environment_events::table
            .filter(environment_events::environment_id.eq(id))
            .filter(environment_events::id.gt(after))
            .order(environment_events::id.asc())
            .limit(limit)
            .select(EnvironmentEvent::as_select())
            .load(conn)
            .await?
    }))
}

/// Status events of an environment with a `status_version` above `after` (oldest first, at most
/// `limit`): every transition a relaying node has not passed on yet.
pub async fn status_events_after(
    conn: &mut DbConn,
    id: &str,
    after: i64,
    limit: i64,
) -> StoreResult<Vec<EnvironmentEvent>> {
    Ok(db_run!(conn: {
        environment_events::table
            .filter(environment_events::environment_id.eq(id))
            .filter(environment_events::kind.eq("status"))
            .filter(environment_events::status_version.gt(after))
            .order(environment_events::status_version.asc())
            .limit(limit)
            .select(EnvironmentEvent::as_select())
            .load(conn)
            .await?
    }))
}

/// The newest event id of an environment (0 when it has none).
pub async fn last_event_id(conn: &mut DbConn, id: &str) -> StoreResult<i64> {
    let last: Option<i64> = db_run!(conn: {
        environment_events::table
            .filter(environment_events::environment_id.eq(id))
            .select(diesel::dsl::max(environment_events::id))
            .first(conn)
            .await?
    });
    Ok(last.unwrap_or(0))
}

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
