//! `/api/v1/auth`: register, login (with lockout), Google sign-in, refresh-token rotation with
//! reuse detection, logout, me.

use chrono::Duration;
use http::{Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::{UserResponse, auth_response, message, open_session, session_expiry};
use crate::app::AppState;
use crate::auth::google::GoogleError;
use crate::auth::tokens::{hash_refresh_token, new_refresh_token};
use crate::auth::{self as rules, LockState};
use crate::clock::{db_now, from_db, to_db};
use crate::error::{ErrorCode, ApiError, ApiResult, FieldError};
use crate::http::{Body, Ctx, json, ok};
use crate::store::sessions::{self, Rotation};
use crate::store::users::{self, NewUser, Plan, User, username_key};
use crate::store::{DbConn, StoreError};

#[derive(Deserialize)]
pub struct RegisterRequest {
    username: String,
    email: String,
    password: String,
    #[serde(default)]
    full_name: Option<String>,
}

#[derive(Deserialize)]
pub struct LoginRequest {
    username_or_email: String,
    password: String,
}

#[derive(Deserialize)]
pub struct GoogleRequest {
    #[serde(default)]
    id_token: Option<String>,
    #[serde(default)]
    token: Option<String>,
}

#[derive(Deserialize)]
pub struct RefreshRequest {
    refresh_token: String,
}

const BAD_CREDENTIALS: &str = "Incorrect username/email or password";

fn duplicate(which: &str) -> ApiError {
    if which.contains("email") {
        ApiError::bad_request(ErrorCode::EmailTaken, "Email already registered")
    } else {
        ApiError::bad_request(ErrorCode::UsernameTaken, "Username already taken")
    }
}

fn registration_closed() -> ApiError {
    ApiError::forbidden(
        ErrorCode::RegistrationClosed,
        "Self-registration is closed on this server; ask an administrator for an account",
    )
}

pub async fn register(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let req: RegisterRequest = ctx.json()?;
    let username = req.username.trim().to_string();
    let email = req.email.trim().to_lowercase();
    let full_name = req
        .full_name
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty());
    let mut errors = Vec::new();
    rules::check_username("username", &username, &mut errors);
    rules::check_email("email", &email, &mut errors);
    rules::check_password("password", &req.password, &mut errors);
    rules::check_optional_len(
        "full_name",
        full_name.as_deref(),
        rules::FULL_NAME_MAX,
        &mut errors,
    );
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    if !app.config.registration_open() {
        return Err(registration_closed());
    }
    let mut conn = app.db.get().await?;
    if users::by_email(&mut conn, &email).await?.is_some() {
        return Err(duplicate("email"));
    }
    if users::by_username(&mut conn, &username).await?.is_some() {
        return Err(duplicate("username"));
    }
    let hash = app.passwords.hash(&req.password).await?;
    let now = db_now(app.clock.as_ref());
    let new = NewUser {
        id: uuid::Uuid::new_v4().to_string(),
        username_key: username_key(&username),
        username,
        email,
        password_hash: Some(hash),
        full_name,
        avatar_url: None,
        google_id: None,
        is_active: true,
        is_verified: false,
        subscription_plan: Plan::Free.as_str().to_string(),
        failed_logins: 0,
        created_at: now,
        updated_at: now,
        last_login: Some(now),
    };
    let user = insert_user(&mut conn, &new).await?;
    let (session, response) = open_session(&app, &mut conn, &ctx, &user).await?;
    app.audit(
        &ctx.audit(),
        "register",
        Some(&user.id),
        Some(&session.id),
        json!({ "method": "password" }),
    )
    .await;
    Ok(json(StatusCode::CREATED, &response))
}

/// Insert, turning a unique violation (a concurrent registration) into the 400 of API.md.
async fn insert_user(conn: &mut DbConn, new: &NewUser) -> ApiResult<User> {
    match users::insert(conn, new).await {
        Ok(user) => Ok(user),
        Err(e) => match e.unique_violation() {
            Some(what) => Err(duplicate(&what)),
            None => Err(e.into()),
        },
    }
}

pub async fn login(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let req: LoginRequest = ctx.json()?;
    let mut conn = app.db.get().await?;
    let Some(user) = users::by_login(&mut conn, &req.username_or_email).await? else {
        app.passwords.verify_decoy(&req.password).await;
        app.audit(
            &ctx.audit(),
            "login_failed",
            None,
            None,
            json!({ "reason": "unknown_account" }),
        )
        .await;
        return Err(ApiError::unauthorized(BAD_CREDENTIALS));
    };
    let now = app.clock.now();
    match rules::lock_state(user.failed_logins, user.locked_until.map(from_db), now) {
        LockState::Locked { until } => {
            let seconds = (until - now).num_seconds().max(1) as u64;
            return Err(ApiError::new(
                StatusCode::LOCKED,
                ErrorCode::AccountLocked,
                format!(
                    "Account locked after too many failed login attempts; try again in {} minute(s)",
                    seconds.div_ceil(60)
                ),
            )
            .with_retry_after(seconds));
        }
        LockState::Expired => users::clear_failures(&mut conn, &user.id).await?,
        LockState::Open { .. } => {}
    }
    let verified = match &user.password_hash {
        Some(hash) => app.passwords.verify(&req.password, hash).await,
        None => {
            app.passwords.verify_decoy(&req.password).await;
            false
        }
    };
    if !verified {
        return Err(failed_login(&app, &ctx, &mut conn, &user).await);
    }
    if !user.is_active {
        return Err(ApiError::forbidden(
            ErrorCode::AccountDisabled,
            "Account is disabled",
        ));
    }
    users::record_login(&mut conn, &user.id, to_db(now)).await?;
    let user = users::by_id(&mut conn, &user.id)
        .await?
        .ok_or_else(|| ApiError::unauthorized(BAD_CREDENTIALS))?;
    let (session, response) = open_session(&app, &mut conn, &ctx, &user).await?;
    app.audit(
        &ctx.audit(),
        "login",
        Some(&user.id),
        Some(&session.id),
        json!({ "method": "password" }),
    )
    .await;
    ok(&response)
}

/// Count a wrong password, lock the account at the threshold, and answer 401 either way.
async fn failed_login(app: &AppState, ctx: &Ctx, conn: &mut DbConn, user: &User) -> ApiError {
    let result: Result<(), StoreError> = async {
        let now = app.clock.now();
        let failures = users::add_failed_login(conn, &user.id, to_db(now)).await?;
        let lock_for = Duration::minutes(app.config.auth.lockout_minutes.into());
        let threshold = app.config.auth.lockout_threshold;
        app.audit(
            &ctx.audit(),
            "login_failed",
            Some(&user.id),
            None,
            json!({ "reason": "bad_password", "failures": failures }),
        )
        .await;
        if let Some(until) =
            rules::lock_after_failure(failures.max(0) as u32, threshold, now, lock_for)
        {
            users::lock(conn, &user.id, to_db(until)).await?;
            app.audit(
                &ctx.audit(),
                "account_locked",
                Some(&user.id),
                None,
                json!({ "failures": failures, "until": until }),
            )
            .await;
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => ApiError::unauthorized(BAD_CREDENTIALS),
        Err(e) => e.into(),
    }
}

pub async fn google(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let req: GoogleRequest = ctx.json()?;
    let Some(token) = req.id_token.or(req.token).filter(|t| !t.is_empty()) else {
        return Err(ApiError::validation(vec![FieldError::new(
            "id_token",
            "required",
            "id_token is required",
        )]));
    };
    let Some(verifier) = &app.google else {
        return Err(ApiError::unavailable(
            ErrorCode::GoogleNotConfigured,
            "Google sign-in is not configured on this server",
        ));
    };
    let identity = verifier.verify(&token).await.map_err(|e| match e {
        GoogleError::Invalid(why) => {
            tracing::info!(reason = why, "Google token rejected");
            ApiError::unauthorized("Invalid Google token")
        }
        GoogleError::Unavailable(why) => {
            tracing::warn!(error = %why, "Google keys unavailable");
            ApiError::unavailable(
                ErrorCode::GoogleUnavailable,
                "Google sign-in is unavailable; try again",
            )
        }
    })?;
    let mut conn = app.db.get().await?;
    let now = db_now(app.clock.as_ref());
    let (user, how) = if let Some(user) = users::by_google_id(&mut conn, &identity.sub).await? {
        (user, "google_id")
    } else {
        let email = identity
            .email
            .clone()
            .filter(|_| identity.email_verified)
            .ok_or_else(|| ApiError::unauthorized("Google account has no verified e-mail"))?;
        match users::by_email(&mut conn, &email).await? {
            Some(existing) => {
                let avatar = existing.avatar_url.clone().or(identity.picture.clone());
                let user = users::link_google(
                    &mut conn,
                    &existing.id,
                    &identity.sub,
                    avatar.as_deref(),
                    now,
                )
                .await?;
                (user, "email")
            }
            None => {
                if !app.config.registration_open() {
                    return Err(registration_closed());
                }
                let username = free_username(&mut conn, &email).await?;
                let new = NewUser {
                    id: uuid::Uuid::new_v4().to_string(),
                    username_key: username_key(&username),
                    username,
                    email,
                    password_hash: None,
                    full_name: identity.name.clone(),
                    avatar_url: identity.picture.clone(),
                    google_id: Some(identity.sub.clone()),
                    is_active: true,
                    is_verified: true,
                    subscription_plan: Plan::Free.as_str().to_string(),
                    failed_logins: 0,
                    created_at: now,
                    updated_at: now,
                    last_login: None,
                };
                let user = insert_user(&mut conn, &new).await?;
                app.audit(
                    &ctx.audit(),
                    "register",
                    Some(&user.id),
                    None,
                    json!({ "method": "google" }),
                )
                .await;
                (user, "created")
            }
        }
    };
    if !user.is_active {
        return Err(ApiError::forbidden(
            ErrorCode::AccountDisabled,
            "Account is disabled",
        ));
    }
    users::record_login(&mut conn, &user.id, now).await?;
    let (session, response) = open_session(&app, &mut conn, &ctx, &user).await?;
    app.audit(
        &ctx.audit(),
        "login",
        Some(&user.id),
        Some(&session.id),
        json!({ "method": "google", "matched_by": how }),
    )
    .await;
    ok(&response)
}

/// A username derived from an e-mail address that nobody has yet.
async fn free_username(conn: &mut DbConn, email: &str) -> ApiResult<String> {
    let local = email.split('@').next().unwrap_or("");
    let mut base: String = local
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(rules::USERNAME_MAX - 5)
        .collect();
    while base.len() < rules::USERNAME_MIN {
        base.push('_');
    }
    if users::by_username(conn, &base).await?.is_none() {
        return Ok(base);
    }
    for _ in 0..20 {
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..4];
        let candidate = format!("{base}{suffix}");
        if users::by_username(conn, &candidate).await?.is_none() {
            return Ok(candidate);
        }
    }
    Err(ApiError::internal(anyhow::anyhow!(
        "no free username for a Google account"
    )))
}

pub async fn refresh(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let req: RefreshRequest = ctx.json()?;
    let invalid = || ApiError::unauthorized("Invalid refresh token");
    let mut conn = app.db.get().await?;
    let now = db_now(app.clock.as_ref());
    let (new_token, new_hash) = new_refresh_token();
    let rotation = sessions::rotate(
        &mut conn,
        &hash_refresh_token(req.refresh_token.trim()),
        &new_hash,
        now,
        session_expiry(&app, now),
    )
    .await?;
    let session = match rotation {
        Rotation::Unknown | Rotation::Ended => return Err(invalid()),
        Rotation::Reused(session) => {
            if sessions::revoke(&mut conn, &session.id, "refresh_token_reuse", now).await? {
                app.actors
                    .stop_sessions(vec![session.id.clone()], "refresh token reuse");
            }
            tracing::warn!(session = %session.id, "refresh token reused; session revoked");
            app.audit(
                &ctx.audit(),
                "refresh_token_reuse",
                Some(&session.user_id),
                Some(&session.id),
                serde_json::Value::Null,
            )
            .await;
            return Err(invalid());
        }
        Rotation::Rotated(session) => session,
    };
    let Some((_, user)) = sessions::with_user(&mut conn, &session.id).await? else {
        return Err(invalid());
    };
    if !user.is_active {
        return Err(invalid());
    }
    app.actors.touch_session(&session.id, &user.id);
    ok(&auth_response(&app, &user, &session.id, new_token)?)
}

pub async fn logout(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let auth = ctx.user()?;
    let mut conn = app.db.get().await?;
    let now = db_now(app.clock.as_ref());
    sessions::revoke(&mut conn, &auth.session.id, "logout", now).await?;
    app.actors
        .stop_sessions(vec![auth.session.id.clone()], "logout");
    app.audit(
        &ctx.audit(),
        "logout",
        Some(&auth.user.id),
        Some(&auth.session.id),
        serde_json::Value::Null,
    )
    .await;
    ok(&message("Logged out"))
}

pub async fn me(_app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    ok(&UserResponse::from(&ctx.user()?.user))
}
