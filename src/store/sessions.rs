//! Login sessions and their rotating refresh tokens (stored only as SHA-256 hashes).

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::{refresh_tokens, sessions, users};
use super::users::User;
use super::{DbConn, StoreResult};
use crate::db_run;

#[derive(Debug, Clone, Queryable, Selectable, Identifiable, Insertable)]
#[diesel(table_name = sessions)]
#[diesel(check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct Session {
    pub id: String,
    pub user_id: String,
    pub user_agent: Option<String>,
    pub ip_address: Option<String>,
    pub created_at: NaiveDateTime,
    pub last_used_at: NaiveDateTime,
    pub expires_at: NaiveDateTime,
    pub revoked_at: Option<NaiveDateTime>,
    pub revoked_reason: Option<String>,
}

impl Session {
    pub fn is_live(&self, now: NaiveDateTime) -> bool {
        self.revoked_at.is_none() && self.expires_at > now
    }
}

/// What presenting a refresh token found.
#[derive(Debug)]
pub enum Rotation {
    /// The token was current; it is now spent and the new one stored.
    Rotated(Session),
    /// The token was already spent: somebody replayed it.
    Reused(Session),
    /// The token was current but its session has been revoked or has expired.
    Ended,
    /// No such token (or its session is gone).
    Unknown,
}

pub async fn create(conn: &mut DbConn, session: &Session, token_hash: &str) -> StoreResult<()> {
    let token = (
        refresh_tokens::token_hash.eq(token_hash),
        refresh_tokens::session_id.eq(&session.id),
        refresh_tokens::created_at.eq(session.created_at),
    );
    db_run!(conn: {
        diesel::insert_into(sessions::table).values(session).execute(conn).await?;
        diesel::insert_into(refresh_tokens::table).values(token).execute(conn).await?;
    });
    Ok(())
}

/// A session with its user, whatever its state.
pub async fn with_user(conn: &mut DbConn, id: &str) -> StoreResult<Option<(Session, User)>> {
    Ok(db_run!(conn: {
        sessions::table
            .inner_join(users::table)
            .filter(sessions::id.eq(id))
            .select((Session::as_select(), User::as_select()))
            .first(conn)
            .await
            .optional()?
    }))
}

/// Spend `old_hash` and store `new_hash` in its place. Single use is enforced by a conditional
/// update, so two concurrent refreshes with one token cannot both succeed.
pub async fn rotate(
    conn: &mut DbConn,
    old_hash: &str,
    new_hash: &str,
    now: NaiveDateTime,
    expires_at: NaiveDateTime,
) -> StoreResult<Rotation> {
    let spent = db_run!(conn: {
        diesel::update(
            refresh_tokens::table
                .filter(refresh_tokens::token_hash.eq(old_hash))
                .filter(refresh_tokens::used_at.is_null()),
        )
        .set(refresh_tokens::used_at.eq(Some(now)))
        .execute(conn)
        .await?
    });
    let found: Option<Session> = db_run!(conn: {
        refresh_tokens::table
            .inner_join(sessions::table)
            .filter(refresh_tokens::token_hash.eq(old_hash))
            .select(Session::as_select())
            .first(conn)
            .await
            .optional()?
    });
    let Some(session) = found else {
        return Ok(Rotation::Unknown);
    };
    if spent == 0 {
        return Ok(Rotation::Reused(session));
    }
    if !session.is_live(now) {
        return Ok(Rotation::Ended);
    }
    let token = (
        refresh_tokens::token_hash.eq(new_hash),
        refresh_tokens::session_id.eq(&session.id),
        refresh_tokens::created_at.eq(now),
    );
    let session = db_run!(conn: {
        diesel::insert_into(refresh_tokens::table).values(token).execute(conn).await?;
        diesel::update(sessions::table.find(&session.id))
            .set((sessions::last_used_at.eq(now), sessions::expires_at.eq(expires_at)))
            .returning(Session::as_returning())
            .get_result(conn)
            .await?
    });
    Ok(Rotation::Rotated(session))
}

/// Mark a session used (throttled by the caller).
pub async fn touch(conn: &mut DbConn, id: &str, now: NaiveDateTime) -> StoreResult<()> {
    db_run!(conn: {
        diesel::update(sessions::table.find(id))
            .set(sessions::last_used_at.eq(now))
            .execute(conn)
            .await?;
    });
    Ok(())
}

/// Revoke one live session; false if it was not live.
pub async fn revoke(
    conn: &mut DbConn,
    id: &str,
    reason: &str,
    now: NaiveDateTime,
) -> StoreResult<bool> {
    Ok(db_run!(conn: {
        diesel::update(sessions::table.find(id).filter(sessions::revoked_at.is_null()))
            .set((sessions::revoked_at.eq(Some(now)), sessions::revoked_reason.eq(Some(reason))))
            .execute(conn)
            .await? > 0
    }))
}

/// Revoke every live session of a user except `keep`; returns the ids revoked.
pub async fn revoke_all(
    conn: &mut DbConn,
    user_id: &str,
    keep: Option<&str>,
    reason: &str,
    now: NaiveDateTime,
) -> StoreResult<Vec<String>> {
    let keep = keep.unwrap_or("");
    Ok(db_run!(conn: {
        diesel::update(
            sessions::table
                .filter(sessions::user_id.eq(user_id))
                .filter(sessions::revoked_at.is_null())
                .filter(sessions::id.ne(keep)),
        )
        .set((sessions::revoked_at.eq(Some(now)), sessions::revoked_reason.eq(Some(reason))))
        .returning(sessions::id)
        .get_results(conn)
        .await?
    }))
}

/// A user's live sessions, newest first.
pub async fn list_live(
    conn: &mut DbConn,
    user_id: &str,
    now: NaiveDateTime,
) -> StoreResult<Vec<Session>> {
    Ok(db_run!(conn: {
        sessions::table
            .filter(sessions::user_id.eq(user_id))
            .filter(sessions::revoked_at.is_null())
            .filter(sessions::expires_at.gt(now))
            .order((sessions::created_at.desc(), sessions::id.desc()))
            .select(Session::as_select())
            .load(conn)
            .await?
    }))
}
