//! Login sessions and their rotating refresh tokens (stored only as SHA-256 hashes).

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::{refresh_tokens, sessions, users};
use super::users::User;
use super::{Db, DbConn, StoreResult};
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
    /// The token was current; it is now spent and the successor stored.
    Rotated(Session),
    /// The token is the one this session rotated away last, within the grace window: `sealed` is
    /// the successor handed out then (sealed by the caller), to be handed out again.
    Repeat {
        session: Session,
        sealed: String,
        rotated_at: NaiveDateTime,
    },
    /// The token was already spent, outside the grace window or not by the latest rotation:
    /// somebody replayed it.
    Reused(Session),
    /// The token was current but its session has been revoked or has expired.
    Ended,
    /// No such token (or its session is gone).
    Unknown,
}

/// A session with the state of its latest rotation: `rotated_from`, `rotated_at`,
/// `successor_sealed`.
type RotationRow = (
    Session,
    Option<String>,
    Option<NaiveDateTime>,
    Option<String>,
);

/// The successor of a rotation, prepared before it: the new token's hash and the sealed pair
/// (access and refresh token) to hand out again to a repeat within the grace window.
#[derive(Debug, Clone, Copy)]
pub struct Successor<'a> {
    pub token_hash: &'a str,
    pub sealed: &'a str,
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

/// Create a session (as [`create`]) only if the user's password is still `password_hash` — the
/// hash a login just verified. Checked and written in one transaction holding the user's row
/// (PostgreSQL `FOR UPDATE`, SQLite `BEGIN IMMEDIATE`): a login racing a Google claim either
/// finishes first (and the claim revokes its session) or finds the password gone. False when the
/// password changed (nothing is written).
pub async fn create_if_password(
    conn: &mut DbConn,
    session: &Session,
    token_hash: &str,
    password_hash: &str,
) -> StoreResult<bool> {
    use diesel_async::AsyncConnection;
    let token = (
        refresh_tokens::token_hash.eq(token_hash),
        refresh_tokens::session_id.eq(&session.id),
        refresh_tokens::created_at.eq(session.created_at),
    );
    macro_rules! insert_if {
        ($c:ident, $current:expr) => {{
            let current: Option<Option<String>> = $current;
            if current.flatten().as_deref() != Some(password_hash) {
                return Ok(false);
            }
            diesel::insert_into(sessions::table)
                .values(session)
                .execute($c)
                .await?;
            diesel::insert_into(refresh_tokens::table)
                .values(token)
                .execute($c)
                .await?;
            Ok(true)
        }};
    }
    let created: Result<bool, diesel::result::Error> = db_run!(conn: pg {
        conn.transaction(async |c| {
            insert_if!(c, users::table
                .find(&session.user_id)
                .select(users::password_hash)
                .for_update()
                .first(c)
                .await
                .optional()?)
        })
        .await
    } sqlite {
        conn.immediate_transaction(async |c| {
            insert_if!(c, users::table
                .find(&session.user_id)
                .select(users::password_hash)
                .first(c)
                .await
                .optional()?)
        })
        .await
    });
    Ok(created?)
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

/// [`with_user`] on a connection of its own: inline on SQLite ([`Db::read_sqlite`], the same
/// query), else through the pool. The per-request session check's read.
pub async fn with_user_in(db: &Db, id: &str) -> StoreResult<Option<(Session, User)>> {
    let inline = db.read_sqlite(|conn| {
        diesel::RunQueryDsl::first(
            sessions::table
                .inner_join(users::table)
                .filter(sessions::id.eq(id))
                .select((Session::as_select(), User::as_select())),
            conn,
        )
        .optional()
    });
    match inline {
        Some(rows) => Ok(rows),
        None => with_user(&mut db.get().await?, id).await,
    }
}

/// The session (with its user) that a refresh token belongs to, whether spent or not.
pub async fn by_refresh_token(
    conn: &mut DbConn,
    token_hash: &str,
) -> StoreResult<Option<(Session, User)>> {
    Ok(db_run!(conn: {
        refresh_tokens::table
            .inner_join(sessions::table.inner_join(users::table))
            .filter(refresh_tokens::token_hash.eq(token_hash))
            .select((Session::as_select(), User::as_select()))
            .first(conn)
            .await
            .optional()?
    }))
}

/// Spend `old_hash` (a token of `session_id`) and put `successor` in its place, in one
/// transaction whose first statement is the conditional update that spends the token: of two
/// concurrent refreshes exactly one rotates, and the other waits for it and then finds its
/// successor (a [`Rotation::Repeat`]) — or, when `repeat_since` is `None` or the rotation was
/// before it, a [`Rotation::Reused`].
pub async fn rotate(
    conn: &mut DbConn,
    session_id: &str,
    old_hash: &str,
    successor: Successor<'_>,
    now: NaiveDateTime,
    expires_at: NaiveDateTime,
    repeat_since: Option<NaiveDateTime>,
) -> StoreResult<Rotation> {
    use diesel_async::AsyncConnection;
    let decide = |row: Option<RotationRow>| {
        let Some((session, from, at, sealed)) = row else {
            return Rotation::Unknown;
        };
        if !session.is_live(now) {
            return Rotation::Ended;
        }
        match (from, at, sealed, repeat_since) {
            (Some(from), Some(at), Some(sealed), Some(since))
                if from == old_hash && at >= since =>
            {
                Rotation::Repeat {
                    session,
                    sealed,
                    rotated_at: at,
                }
            }
            _ => Rotation::Reused(session),
        }
    };
    let token = (
        refresh_tokens::token_hash.eq(successor.token_hash),
        refresh_tokens::session_id.eq(session_id),
        refresh_tokens::created_at.eq(now),
    );
    Ok(db_run!(conn: {
        conn.transaction::<_, diesel::result::Error, _>(async move |conn| {
            {
                let spent = diesel::update(
                    refresh_tokens::table
                        .filter(refresh_tokens::token_hash.eq(old_hash))
                        .filter(refresh_tokens::session_id.eq(session_id))
                        .filter(refresh_tokens::used_at.is_null()),
                )
                .set(refresh_tokens::used_at.eq(Some(now)))
                .execute(conn)
                .await?;
                if spent == 0 {
                    let row = sessions::table
                        .find(session_id)
                        .select((
                            Session::as_select(),
                            sessions::rotated_from,
                            sessions::rotated_at,
                            sessions::successor_sealed,
                        ))
                        .first(conn)
                        .await
                        .optional()?;
                    return Ok(decide(row));
                }
                diesel::insert_into(refresh_tokens::table).values(token).execute(conn).await?;
                let session = diesel::update(
                    sessions::table.find(session_id).filter(sessions::revoked_at.is_null()),
                )
                .set((
                    sessions::last_used_at.eq(now),
                    sessions::expires_at.eq(expires_at),
                    sessions::rotated_from.eq(Some(old_hash)),
                    sessions::rotated_at.eq(Some(now)),
                    sessions::successor_sealed.eq(Some(successor.sealed)),
                ))
                .returning(Session::as_returning())
                .get_result(conn)
                .await
                .optional()?;
                Ok(match session {
                    Some(session) if session.is_live(now) => Rotation::Rotated(session),
                    _ => Rotation::Ended,
                })
            }
        })
        .await?
    }))
}

/// Forget sealed successors of rotations before `before` (the grace window has passed for them).
pub async fn forget_successors(conn: &mut DbConn, before: NaiveDateTime) -> StoreResult<usize> {
    Ok(db_run!(conn: {
        diesel::update(
            sessions::table
                .filter(sessions::successor_sealed.is_not_null())
                .filter(sessions::rotated_at.lt(before)),
        )
        .set(sessions::successor_sealed.eq(None::<String>))
        .execute(conn)
        .await?
    }))
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
            .set((
            sessions::revoked_at.eq(Some(now)),
            sessions::revoked_reason.eq(Some(reason)),
            sessions::successor_sealed.eq(None::<String>),
        ))
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
        .set((
            sessions::revoked_at.eq(Some(now)),
            sessions::revoked_reason.eq(Some(reason)),
            sessions::successor_sealed.eq(None::<String>),
        ))
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
