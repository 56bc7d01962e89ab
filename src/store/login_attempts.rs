//! Failed-login counters, keyed by a subject: an account (`user:<id>`) or a login name that matches
//! no account (`name:<SHA-256 of the name>`), so both are counted and locked alike. An attempt is
//! reserved here, in one statement, before its password is hashed; see [`crate::auth::lockout`].
//!
//! Bounded and expiring: a row ends at `expires_at` (the lock window after its last counted
//! failure, or the end of its lock) and [`sweep`] deletes ended rows and all but the newest
//! `max_names` rows of unknown names, which anybody can create by typing a new name.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Text, Timestamp};
use diesel_async::RunQueryDsl;

use super::schema::login_attempts;
use super::{DbConn, StoreResult};
use crate::db_run;

/// Subject prefix of rows for login names that match no account.
pub const NAME_PREFIX: &str = "name:";
/// Subject prefix of rows for accounts.
pub const USER_PREFIX: &str = "user:";

/// One reserved attempt: the counter after it, and when the counter (or its lock) ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, QueryableByName)]
pub struct Reserved {
    #[diesel(sql_type = Integer)]
    pub failures: i32,
    #[diesel(sql_type = Timestamp)]
    pub expires_at: NaiveDateTime,
}

/// Count one attempt against `subject`, atomically (one upsert), and return the counter after it.
/// A counter that has ended starts again at 1. While the counter is below `threshold` every
/// attempt pushes its end to `window_end`; the attempt that reaches `threshold` sets the lock to
/// end at `window_end`; attempts past it change nothing but the (capped) count.
pub async fn reserve(
    conn: &mut DbConn,
    subject: &str,
    now: NaiveDateTime,
    window_end: NaiveDateTime,
    threshold: i32,
) -> StoreResult<Reserved> {
    // $1 subject, $2 window end, $3 now, $4 threshold. In SET, columns are the row before the update.
    const SQL: &str = "INSERT INTO login_attempts (subject, failures, expires_at, updated_at) \
        VALUES ($1, 1, $2, $3) \
        ON CONFLICT (subject) DO UPDATE SET \
        failures = CASE WHEN login_attempts.expires_at <= $3 THEN 1 \
            WHEN login_attempts.failures > $4 THEN login_attempts.failures \
            ELSE login_attempts.failures + 1 END, \
        expires_at = CASE WHEN login_attempts.expires_at <= $3 THEN $2 \
            WHEN login_attempts.failures >= $4 THEN login_attempts.expires_at \
            ELSE $2 END, \
        updated_at = $3 \
        RETURNING failures, expires_at";
    Ok(db_run!(conn: pg {
        diesel::sql_query(SQL)
            .bind::<Text, _>(subject)
            .bind::<Timestamp, _>(window_end)
            .bind::<Timestamp, _>(now)
            .bind::<Integer, _>(threshold)
            .get_result::<Reserved>(conn)
            .await?
    } sqlite {
        diesel::sql_query(SQL.replace('$', "?"))
            .bind::<Text, _>(subject)
            .bind::<Timestamp, _>(window_end)
            .bind::<Timestamp, _>(now)
            .bind::<Integer, _>(threshold)
            .get_result::<Reserved>(conn)
            .await?
    }))
}

/// Forget a subject's failures (after a success).
pub async fn clear(conn: &mut DbConn, subject: &str) -> StoreResult<()> {
    db_run!(conn: {
        diesel::delete(login_attempts::table.find(subject)).execute(conn).await?;
    });
    Ok(())
}

/// When the lock on `subject` ends, if it is locked at `now` (`threshold` failures or more).
pub async fn locked_until(
    conn: &mut DbConn,
    subject: &str,
    now: NaiveDateTime,
    threshold: i32,
) -> StoreResult<Option<NaiveDateTime>> {
    Ok(db_run!(conn: {
        login_attempts::table
            .find(subject)
            .filter(login_attempts::failures.ge(threshold))
            .filter(login_attempts::expires_at.gt(now))
            .select(login_attempts::expires_at)
            .first(conn)
            .await
            .optional()?
    }))
}

/// Delete ended rows, then all but the `max_names` most recently used rows of unknown names.
/// Returns the rows deleted.
pub async fn sweep(conn: &mut DbConn, now: NaiveDateTime, max_names: i64) -> StoreResult<usize> {
    const CAP: &str = "DELETE FROM login_attempts WHERE subject LIKE 'name:%' AND subject NOT IN \
        (SELECT subject FROM login_attempts WHERE subject LIKE 'name:%' \
         ORDER BY updated_at DESC, subject DESC LIMIT $1)";
    let ended = db_run!(conn: {
        diesel::delete(login_attempts::table.filter(login_attempts::expires_at.le(now)))
            .execute(conn)
            .await?
    });
    let capped = db_run!(conn: pg {
        diesel::sql_query(CAP).bind::<BigInt, _>(max_names).execute(conn).await?
    } sqlite {
        diesel::sql_query(CAP.replace('$', "?")).bind::<BigInt, _>(max_names).execute(conn).await?
    });
    Ok(ended + capped)
}

/// Rows kept, of accounts and of unknown names (for tests and operators).
pub async fn counts(conn: &mut DbConn) -> StoreResult<(i64, i64)> {
    Ok(db_run!(conn: {
        let users: i64 = login_attempts::table
            .filter(login_attempts::subject.like(format!("{USER_PREFIX}%")))
            .count()
            .get_result(conn)
            .await?;
        let names: i64 = login_attempts::table
            .filter(login_attempts::subject.like(format!("{NAME_PREFIX}%")))
            .count()
            .get_result(conn)
            .await?;
        (users, names)
    }))
}
