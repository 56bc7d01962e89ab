//! Request handlers, one module per area of API.md, and the response shapes they share.

pub mod admin;
pub mod auth;
pub mod environments;
pub mod health;
pub mod templates;
pub mod users;

use chrono::{DateTime, Duration, NaiveDateTime, Utc};
use serde::Serialize;

use super::Ctx;
use crate::app::App;
use crate::auth::tokens::new_refresh_token;
use crate::clock::{db_now, from_db};
use crate::error::ApiResult;
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
    sessions::create(conn, &session, &hash).await?;
    app.actors.touch_session(&session.id, &user.id);
    let response = auth_response(app, user, &session.id, refresh)?;
    Ok((session, response))
}
