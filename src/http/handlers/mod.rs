//! Request handlers, one module per area of API.md, and the response shapes they share.

pub mod admin;
pub mod auth;
pub mod environments;
pub mod files;
pub mod health;
pub mod ports;
pub mod templates;
pub mod users;

use chrono::{DateTime, Duration, NaiveDateTime, Utc};
use http::StatusCode;
use serde::Serialize;
use serde_json::json;

use super::Ctx;
use crate::app::App;
use crate::auth::lockout::{Admission, Subject, seconds_until};
use crate::auth::passwords::HashTicket;
use crate::auth::tokens::new_refresh_token;
use crate::clock::{db_now, from_db};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::store::DbConn;
use crate::store::sessions::{self, Session};
use crate::store::users::User;

/// UserResponse of API.md.
#[derive(Debug, Serialize)]
pub struct UserResponse {
    pub id: String,
    pub username: String,
    pub email: String,
    pub full_name: Option<String>,
    pub avatar_url: Option<String>,
    pub is_active: bool,
    pub is_verified: bool,
    pub subscription_plan: String,
    pub preferred_region: Option<String>,
    pub created_at: DateTime<Utc>,
    pub last_login: Option<DateTime<Utc>>,
}

impl From<&User> for UserResponse {
    fn from(u: &User) -> Self {
        Self {
            id: u.id.clone(),
            username: u.username.clone(),
            email: u.email.clone(),
            full_name: u.full_name.clone(),
            avatar_url: u.avatar_url.clone(),
            is_active: u.is_active,
            is_verified: u.is_verified,
            subscription_plan: u.plan().as_str().to_string(),
            preferred_region: u.preferred_region.clone(),
            created_at: from_db(u.created_at),
            last_login: u.last_login.map(from_db),
        }
    }
}

/// AuthResponse of API.md.
#[derive(Debug, Serialize)]
pub struct AuthResponse {
    pub access_token: String,
    pub refresh_token: String,
    pub token_type: &'static str,
    pub expires_in: i64,
    pub user: UserResponse,
}

#[derive(Debug, Serialize)]
pub struct Message {
    pub message: String,
}

pub fn message(text: impl Into<String>) -> Message {
    Message {
        message: text.into(),
    }
}

/// Tokens for a session: a fresh access token and the given refresh token.
pub fn auth_response(
    app: &App,
    user: &User,
    session_id: &str,
    refresh_token: String,
) -> ApiResult<AuthResponse> {
    Ok(AuthResponse {
        access_token: app.tokens.issue_access(&user.id, session_id)?,
        refresh_token,
        token_type: "bearer",
        expires_in: app.tokens.access_ttl_seconds(),
        user: UserResponse::from(user),
    })
}

pub fn session_expiry(app: &App, now: NaiveDateTime) -> NaiveDateTime {
    now + Duration::days(app.config.auth.refresh_token_days.into())
}

/// Start a login session for `user`: store it with its first refresh token, start its actor and
/// answer with tokens.
pub async fn open_session(
    app: &App,
    conn: &mut DbConn,
    ctx: &Ctx,
    user: &User,
) -> ApiResult<(Session, AuthResponse)> {
    open_session_guarded(app, conn, ctx, user, None).await
}

/// As [`open_session`]; with `password_hash`, only if the user's password is still that hash (the
/// one a login just verified; see [`sessions::create_if_password`]), else 401 `unauthorized`:
/// a password removed by a Google claim during the login must not open a session.
pub async fn open_session_guarded(
    app: &App,
    conn: &mut DbConn,
    ctx: &Ctx,
    user: &User,
    password_hash: Option<&str>,
) -> ApiResult<(Session, AuthResponse)> {
    let now = db_now(app.clock.as_ref());
    let session = Session {
        id: uuid::Uuid::new_v4().to_string(),
        user_id: user.id.clone(),
        user_agent: ctx.user_agent(),
        ip_address: Some(ctx.ip.to_string()),
        created_at: now,
        last_used_at: now,
        expires_at: session_expiry(app, now),
        revoked_at: None,
        revoked_reason: None,
    };
    let (refresh, hash) = new_refresh_token();
    match password_hash {
        None => sessions::create(conn, &session, &hash).await?,
        Some(expected) => {
            if !sessions::create_if_password(conn, &session, &hash, expected).await? {
                return Err(ApiError::unauthorized(
                    "Incorrect username/email or password",
                ));
            }
        }
    }
    app.actors.touch_session(&session.id, &user.id);
    let response = auth_response(app, user, &session.id, refresh)?;
    Ok((session, response))
}

/// A password check that counts toward the lockout: a login, or the password a signed-in user
/// re-enters to change the password or delete the account.
pub struct PasswordCheck<'a> {
    /// Whose counter the attempt is reserved on.
    pub subject: Subject,
    /// The account, when there is one (for the audit).
    pub user_id: Option<&'a str>,
    /// Audit event of a wrong or refused attempt (`login_failed`, `password_check_failed`).
    pub event: &'static str,
    /// Why a wrong attempt was wrong, for the audit (`bad_password`, `unknown_account`, ...).
    pub reason: &'static str,
}

/// 423 while a lock holds, with `Retry-After`: the same answer for accounts and unknown names.
pub fn locked_error(until: DateTime<Utc>, now: DateTime<Utc>) -> ApiError {
    let seconds = seconds_until(until, now);
    ApiError::new(
        StatusCode::LOCKED,
        ErrorCode::AccountLocked,
        format!(
            "Account locked after too many failed login attempts; try again in {} minute(s)",
            seconds.div_ceil(60)
        ),
    )
    .with_retry_after(seconds)
}

/// Reserve an attempt on `check.subject` (with `conn`, which is then given back to the pool:
/// no pooled connection waits on a hash), then verify `password` against `hash` with `ticket`
/// (a decoy hash when there is none, so that takes as long). Over the threshold: 423 without
/// hashing. Every refused or wrong attempt is audited; a right one clears the counter.
pub async fn check_password(
    app: &App,
    ctx: &Ctx,
    mut conn: DbConn,
    ticket: &HashTicket,
    check: PasswordCheck<'_>,
    password: &str,
    hash: Option<&str>,
) -> ApiResult<bool> {
    let now = app.clock.now();
    let admission = app.lockout.reserve(&mut conn, &check.subject, now).await?;
    app.housekeeping(&mut conn).await;
    drop(conn);
    let audit = ctx.audit();
    let (attempt, locks, lock_ends) = match admission {
        Admission::Locked { until } => {
            app.audit(
                &audit,
                check.event,
                check.user_id,
                None,
                json!({ "reason": "locked" }),
            )
            .await;
            return Err(locked_error(until, now));
        }
        Admission::Evaluate {
            attempt,
            locks,
            lock_ends,
        } => (attempt, locks, lock_ends),
    };
    let right = match hash {
        Some(hash) => ticket.verify(password, hash).await,
        None => {
            ticket.verify_decoy(password).await;
            false
        }
    };
    if right {
        let mut conn = app.db.get().await?;
        app.lockout.clear(&mut conn, &check.subject).await?;
        return Ok(true);
    }
    app.audit(
        &audit,
        check.event,
        check.user_id,
        None,
        json!({ "reason": check.reason, "attempt": attempt }),
    )
    .await;
    if locks {
        app.audit(
            &audit,
            "account_locked",
            check.user_id,
            None,
            json!({ "failures": attempt, "until": lock_ends, "account": check.user_id.is_some() }),
        )
        .await;
    }
    Ok(false)
}
