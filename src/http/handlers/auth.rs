//! `/api/v1/auth`: register, login (with lockout that holds under concurrency, for accounts and
//! unknown names alike), Google sign-in, refresh-token rotation with a reuse grace window and
//! reuse detection, logout, me.

use chrono::Duration;
use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{
    AuthResponse, PasswordCheck, UserResponse, auth_response, check_password, locked_error,
    message, open_session, open_session_guarded, session_expiry,
};
use crate::app::AppState;
use crate::auth::google::{GoogleError, GoogleIdentity};
use crate::auth::lockout::Subject;
use crate::auth::tokens::{hash_refresh_token, new_refresh_token};
use crate::auth::{self as rules};
use crate::clock::db_now;
use crate::error::{ApiError, ApiResult, ErrorCode, FieldError};
use crate::http::{Body, Ctx, json, ok};
use crate::store::DbConn;
use crate::store::sessions::{self, Rotation, Successor};
use crate::store::users::{self, GoogleBind, NewUser, Plan, User, username_key};

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
    let ticket = app.passwords.admit()?;
    {
        let mut conn = app.db.get().await?;
        if users::by_email(&mut conn, &email).await?.is_some() {
            return Err(duplicate("email"));
        }
        if users::by_username(&mut conn, &username).await?.is_some() {
            return Err(duplicate("username"));
        }
    } // the connection goes back to the pool before hashing
    let hash = ticket.hash(&req.password).await?;
    drop(ticket);
    let mut conn = app.db.get().await?;
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

/// Sign in with a password. The hashing-queue place is taken first (503 when full, before any
/// database work); the account is read and an attempt reserved on one pooled connection, which is
/// given back before hashing (see [`check_password`]).
pub async fn login(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let req: LoginRequest = ctx.json()?;
    let ticket = app.passwords.admit()?;
    let mut conn = app.db.get().await?;
    let user = users::by_login(&mut conn, &req.username_or_email).await?;
    let (subject, reason) = match &user {
        Some(user) if user.password_hash.is_some() => (Subject::account(&user.id), "bad_password"),
        Some(user) => (Subject::account(&user.id), "no_password"),
        None => (
            Subject::unknown_name(&req.username_or_email),
            "unknown_account",
        ),
    };
    let check = PasswordCheck {
        subject,
        user_id: user.as_ref().map(|u| u.id.as_str()),
        event: "login_failed",
        reason,
    };
    let hash = user.as_ref().and_then(|u| u.password_hash.clone());
    let right = check_password(
        &app,
        &ctx,
        conn,
        &ticket,
        check,
        &req.password,
        hash.as_deref(),
    )
    .await?;
    drop(ticket);
    let (Some(user), Some(verified_hash)) = (user.filter(|_| right), hash) else {
        return Err(ApiError::unauthorized(BAD_CREDENTIALS));
    };
    if !user.is_active {
        return Err(ApiError::forbidden(
            ErrorCode::AccountDisabled,
            "Account is disabled",
        ));
    }
    let mut conn = app.db.get().await?;
    users::record_login(&mut conn, &user.id, db_now(app.clock.as_ref())).await?;
    let user = users::by_id(&mut conn, &user.id)
        .await?
        .ok_or_else(|| ApiError::unauthorized(BAD_CREDENTIALS))?;
    // Only if the password is still the one just verified (a Google claim may have removed it).
    let (session, response) =
        open_session_guarded(&app, &mut conn, &ctx, &user, Some(&verified_hash)).await?;
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

/// The ID token of a Google request (`id_token`, or `token`), verified: 422 when missing, 503
/// when Google sign-in is not configured or its keys cannot be fetched, 401 when invalid.
pub(super) async fn verified_google_identity(
    app: &AppState,
    req: GoogleRequest,
) -> ApiResult<GoogleIdentity> {
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
    verifier.verify(&token).await.map_err(|e| match e {
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
    })
}

/// 409 when an account is linked to a different Google identity than the one presented.
pub(super) fn other_google_linked() -> ApiError {
    ApiError::conflict(
        ErrorCode::GoogleAlreadyLinked,
        "This account is linked to a different Google account",
    )
}

/// Refuse a sign-in to a disabled (403) or locked (423) account. Checked before anything is
/// linked or claimed: a locked account stays locked for Google sign-in too.
async fn admit(app: &AppState, conn: &mut DbConn, user: &User) -> ApiResult<()> {
    if !user.is_active {
        return Err(ApiError::forbidden(
            ErrorCode::AccountDisabled,
            "Account is disabled",
        ));
    }
    let clock_now = app.clock.now();
    if let Some(until) = app
        .lockout
        .locked_until(conn, &Subject::account(&user.id), clock_now)
        .await?
    {
        return Err(locked_error(until, clock_now));
    }
    Ok(())
}

/// Sign in with a Google ID token. The account is found by `google_id`; else, when Google
/// verified the token's e-mail, by that e-mail: an account whose e-mail we verified is linked,
/// one whose e-mail we never verified is **claimed** (see [`users::bind_google`]: password
/// removed, every session revoked and its sockets closed, e-mail verified, audited as
/// `account_claimed`); else a new account is created. A token whose e-mail Google did not verify
/// never matches by e-mail (401). Disabled → 403, locked → 423, both before any change.
pub async fn google(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let req: GoogleRequest = ctx.json()?;
    let identity = verified_google_identity(&app, req).await?;
    let mut conn = app.db.get().await?;
    let now = db_now(app.clock.as_ref());
    let (user, how) = if let Some(user) = users::by_google_id(&mut conn, &identity.sub).await? {
        admit(&app, &mut conn, &user).await?;
        (user, "google_id")
    } else {
        let email = identity
            .email
            .clone()
            .filter(|_| identity.email_verified)
            .ok_or_else(|| ApiError::unauthorized("Google account has no verified e-mail"))?;
        match users::by_email(&mut conn, &email).await? {
            Some(existing) => {
                admit(&app, &mut conn, &existing).await?;
                let bound = users::bind_google(
                    &mut conn,
                    &existing.id,
                    &identity.sub,
                    identity.picture.as_deref(),
                    now,
                )
                .await;
                app.session_cache.forget_user(&existing.id);
                match bound {
                    Ok(GoogleBind::Linked(user)) => (*user, "email"),
                    Ok(GoogleBind::Claimed {
                        user,
                        ended,
                        had_password,
                        replaced_google,
                    }) => {
                        let count = ended.len();
                        app.end_sessions(ended, "account claimed").await;
                        app.audit(
                            &ctx.audit(),
                            "account_claimed",
                            Some(&user.id),
                            None,
                            json!({
                                "method": "google",
                                "email": user.email,
                                "password_removed": had_password,
                                "google_replaced": replaced_google,
                                "sessions_ended": count,
                            }),
                        )
                        .await;
                        (*user, "claimed")
                    }
                    Ok(GoogleBind::OtherGoogle) => return Err(other_google_linked()),
                    Ok(GoogleBind::Gone) => {
                        return Err(ApiError::unauthorized(
                            "The account was deleted meanwhile; try again",
                        ));
                    }
                    Err(e) if e.unique_violation().is_some() => {
                        // This Google identity was linked elsewhere meanwhile.
                        return Err(ApiError::conflict(
                            ErrorCode::GoogleLinkedElsewhere,
                            "This Google account is linked to another account",
                        ));
                    }
                    Err(e) => return Err(e.into()),
                }
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

/// What a rotation seals for a repeat within the grace window: the pair handed out, and when.
#[derive(Serialize, Deserialize)]
struct SealedPair {
    access_token: String,
    refresh_token: String,
}

/// Associated data binding a sealed successor to its session and the token it replaced.
fn successor_aad(session_id: &str, old_hash: &str) -> String {
    format!("refresh-successor:{session_id}:{old_hash}")
}

/// Rotate a refresh token. The successor pair is prepared and sealed before the rotation and
/// stored with it, so a repeat of the same token within `auth.refresh_reuse_grace_seconds` (a
/// lost reply, two parallel refreshes) gets exactly that pair again; later, a repeat is theft and
/// ends the session.
pub async fn refresh(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let req: RefreshRequest = ctx.json()?;
    let invalid = || ApiError::unauthorized("Invalid refresh token");
    let old_hash = hash_refresh_token(req.refresh_token.trim());
    let mut conn = app.db.get().await?;
    app.housekeeping(&mut conn).await;
    let now = db_now(app.clock.as_ref());
    let Some((session, user)) = sessions::by_refresh_token(&mut conn, &old_hash).await? else {
        return Err(invalid());
    };
    if !session.is_live(now) || !user.is_active {
        return Err(invalid());
    }
    let (new_token, new_hash) = new_refresh_token();
    let fresh = auth_response(&app, &user, &session.id, new_token)?;
    let pair = SealedPair {
        access_token: fresh.access_token.clone(),
        refresh_token: fresh.refresh_token.clone(),
    };
    let sealed = app.session_sealer.seal(
        &serde_json::to_vec(&pair).map_err(anyhow::Error::from)?,
        &successor_aad(&session.id, &old_hash),
    )?;
    let grace = app.config.auth.refresh_reuse_grace_seconds;
    let repeat_since = (grace > 0).then(|| now - Duration::seconds(grace.into()));
    let successor = Successor {
        token_hash: &new_hash,
        sealed: &sealed,
    };
    let rotation = sessions::rotate(
        &mut conn,
        &session.id,
        &old_hash,
        successor,
        now,
        session_expiry(&app, now),
        repeat_since,
    )
    .await?;
    match rotation {
        Rotation::Unknown | Rotation::Ended => Err(invalid()),
        Rotation::Rotated(session) => {
            app.actors.touch_session(&session.id, &user.id);
            ok(&fresh)
        }
        Rotation::Repeat {
            session,
            sealed,
            rotated_at,
        } => {
            let pair: SealedPair = app
                .session_sealer
                .open(&sealed, &successor_aad(&session.id, &old_hash))
                .and_then(|bytes| Ok(serde_json::from_slice(&bytes)?))?;
            tracing::info!(session = %session.id, "refresh repeated within the grace window; same pair again");
            let elapsed = (now - rotated_at).num_seconds().max(0);
            ok(&AuthResponse {
                access_token: pair.access_token,
                refresh_token: pair.refresh_token,
                token_type: "bearer",
                expires_in: (app.tokens.access_ttl_seconds() - elapsed).max(1),
                user: UserResponse::from(&user),
            })
        }
        Rotation::Reused(session) => {
            if sessions::revoke(&mut conn, &session.id, "refresh_token_reuse", now).await? {
                app.end_sessions(vec![session.id.clone()], "refresh token reuse")
                    .await;
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
            Err(invalid())
        }
    }
}

pub async fn logout(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let auth = ctx.user()?;
    let mut conn = app.db.get().await?;
    let now = db_now(app.clock.as_ref());
    sessions::revoke(&mut conn, &auth.session.id, "logout", now).await?;
    app.end_sessions(vec![auth.session.id.clone()], "logout")
        .await;
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
