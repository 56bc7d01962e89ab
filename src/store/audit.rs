//! The audit trail: who did what, when, from where, in which request. Never secrets.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::audit_events;
use super::{DbConn, StoreResult};
use crate::db_run;

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = audit_events)]
#[diesel(check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct AuditEvent {
    pub id: i64,
    pub occurred_at: NaiveDateTime,
    pub event: String,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub ip_address: Option<String>,
    pub request_id: Option<String>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = audit_events)]
pub struct NewAuditEvent {
    pub occurred_at: NaiveDateTime,
    pub event: String,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub ip_address: Option<String>,
    pub request_id: Option<String>,
    pub detail: Option<String>,
}

/// Filters of `GET /admin/audit`; all optional.
#[derive(Debug, Default, Clone)]
pub struct AuditFilter {
    pub event: Option<String>,
    pub user_id: Option<String>,
    pub since: Option<NaiveDateTime>,
    pub until: Option<NaiveDateTime>,
    pub limit: i64,
    pub offset: i64,
}

pub async fn insert(conn: &mut DbConn, event: &NewAuditEvent) -> StoreResult<()> {
    db_run!(conn: {
        diesel::insert_into(audit_events::table).values(event).execute(conn).await?;
    });
    Ok(())
}

/// One page of matching events, newest first, and how many match in all.
pub async fn query(conn: &mut DbConn, f: &AuditFilter) -> StoreResult<(Vec<AuditEvent>, i64)> {
    macro_rules! filtered {
        () => {{
            let mut q = audit_events::table.into_boxed();
            if let Some(event) = &f.event {
                q = q.filter(audit_events::event.eq(event));
            }
            if let Some(user_id) = &f.user_id {
                q = q.filter(audit_events::user_id.eq(user_id));
            }
            if let Some(since) = f.since {
                q = q.filter(audit_events::occurred_at.ge(since));
            }
            if let Some(until) = f.until {
                q = q.filter(audit_events::occurred_at.lt(until));
            }
            q
        }};
    }
    Ok(db_run!(conn: {
        let total: i64 = filtered!().count().get_result(conn).await?;
        let items = filtered!()
            .order(audit_events::id.desc())
            .limit(f.limit)
            .offset(f.offset)
            .select(AuditEvent::as_select())
            .load(conn)
            .await?;
        (items, total)
    }))
}
