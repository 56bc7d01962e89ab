//! Port previews: the visibility of each port an owner chose (no row = private), and the grants
//! that let a browser in — one-time codes and the cookies they are exchanged for — stored only as
//! SHA-256 hashes and tied to the login session that asked (a grant of an ended session is dead).

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::{preview_grants, preview_ports, sessions, users};
use super::{DbConn, StoreResult};
use crate::db_run;

/// A grant's kind: a one-time code in a URL, or the cookie it was exchanged for.
pub const KIND_CODE: &str = "code";
pub const KIND_COOKIE: &str = "cookie";
pub const PUBLIC: &str = "public";
pub const PRIVATE: &str = "private";

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = preview_grants)]
#[diesel(check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct Grant {
    pub token_hash: String,
    pub kind: String,
    pub session_id: String,
    pub user_id: String,
    pub environment_id: String,
    pub port: i32,
    pub expires_at: NaiveDateTime,
    pub created_at: NaiveDateTime,
}

/// The ports of `environment_id` made public.
pub async fn public_ports(conn: &mut DbConn, environment_id: &str) -> StoreResult<Vec<i32>> {
    Ok(db_run!(conn: {
        preview_ports::table
            .filter(preview_ports::environment_id.eq(environment_id))
            .filter(preview_ports::visibility.eq(PUBLIC))
            .select(preview_ports::port)
            .load(conn)
            .await?
    }))
}

/// Whether `port` of `environment_id` is public.
pub async fn is_public(conn: &mut DbConn, environment_id: &str, port: i32) -> StoreResult<bool> {
    let found: Option<String> = db_run!(conn: {
        preview_ports::table
            .find((environment_id, port))
            .select(preview_ports::visibility)
            .first(conn)
            .await
            .optional()?
    });
    Ok(found.as_deref() == Some(PUBLIC))
}

/// Set a port's visibility; returns the previous one (`private` when there was no row).
pub async fn set_visibility(
    conn: &mut DbConn,
    environment_id: &str,
    port: i32,
    visibility: &str,
    now: NaiveDateTime,
) -> StoreResult<String> {
    let before = if is_public(conn, environment_id, port).await? {
        PUBLIC
    } else {
        PRIVATE
    };
    db_run!(conn: {
        diesel::insert_into(preview_ports::table)
            .values((
                preview_ports::environment_id.eq(environment_id),
                preview_ports::port.eq(port),
                preview_ports::visibility.eq(visibility),
                preview_ports::updated_at.eq(now),
            ))
            .on_conflict((preview_ports::environment_id, preview_ports::port))
            .do_update()
            .set((
                preview_ports::visibility.eq(visibility),
                preview_ports::updated_at.eq(now),
            ))
            .execute(conn)
            .await?;
    });
    Ok(before.to_string())
}

/// Store a grant, first forgetting every expired one (so the table holds only live grants).
pub async fn insert_grant(conn: &mut DbConn, grant: &Grant, now: NaiveDateTime) -> StoreResult<()> {
    db_run!(conn: {
        diesel::delete(preview_grants::table.filter(preview_grants::expires_at.le(now)))
            .execute(conn)
            .await?;
        diesel::insert_into(preview_grants::table).values(grant).execute(conn).await?;
    });
    Ok(())
}

/// The live grant of `kind` with this hash: not expired, its session not revoked or expired, its
/// user still active.
pub async fn live_grant(
    conn: &mut DbConn,
    token_hash: &str,
    kind: &str,
    now: NaiveDateTime,
) -> StoreResult<Option<Grant>> {
    Ok(db_run!(conn: {
        preview_grants::table
            .inner_join(sessions::table.inner_join(users::table))
            .filter(preview_grants::token_hash.eq(token_hash))
            .filter(preview_grants::kind.eq(kind))
            .filter(preview_grants::expires_at.gt(now))
            .filter(sessions::revoked_at.is_null())
            .filter(sessions::expires_at.gt(now))
            .filter(users::is_active.eq(true))
            .select(Grant::as_select())
            .first(conn)
            .await
            .optional()?
    }))
}

/// Spend a one-time code: the live grant it names, removed so it can never be used again
/// (`None` if it is unknown, expired, of an ended session, or was spent by someone else first).
pub async fn redeem_code(
    conn: &mut DbConn,
    token_hash: &str,
    now: NaiveDateTime,
) -> StoreResult<Option<Grant>> {
    let Some(grant) = live_grant(conn, token_hash, KIND_CODE, now).await? else {
        return Ok(None);
    };
    let deleted = db_run!(conn: {
        diesel::delete(
            preview_grants::table
                .filter(preview_grants::token_hash.eq(token_hash))
                .filter(preview_grants::kind.eq(KIND_CODE)),
        )
        .execute(conn)
        .await?
    });
    Ok((deleted == 1).then_some(grant))
}
