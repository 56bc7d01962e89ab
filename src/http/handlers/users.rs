//! `/api/v1/users/me`: profile, password change (or setting one where there is none), account
//! deletion, sessions, linking and unlinking Google. The passwords re-entered for a change or a
//! deletion count toward the lockout like logins.

use chrono::{DateTime, Utc};
use http::Response;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::auth::{GoogleRequest, other_google_linked, verified_google_identity};
use super::{PasswordCheck, UserResponse, check_password, message};
use crate::actors::environment::command::Command;
use crate::actors::environment::machine::Status;
use crate::app::AppState;
use crate::auth as rules;
use crate::auth::lockout::Subject;
use crate::clock::{db_now, from_db};
use crate::error::{ApiError, ApiResult, ErrorCode, FieldError};
use crate::http::{Body, Ctx, ok};
use crate::store::sessions;
use crate::store::users::{
    self, GoogleLink, GoogleUnlink, PasswordReplaced, ProfileChanges, username_key,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileUpdate {
    #[serde(default)]
    full_name: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    avatar_url: Option<String>,
}

/// `current_password` is required when the account has a password; an account without one (a
/// Google account, or one claimed through Google) sets one with `new_password` alone.
#[derive(Deserialize)]
pub struct PasswordChange {
    #[serde(default)]
    current_password: Option<String>,
    new_password: String,
}

#[derive(Deserialize, Default)]
pub struct DeleteAccount {
    #[serde(default)]
    password: Option<String>,
}

#[derive(Deserialize, Default)]
pub struct RevokeAllQuery {
    #[serde(default)]
    keep_current: Option<bool>,
}

#[derive(Serialize)]
struct SessionView {
    id: String,
    user_agent: Option<String>,
    ip_address: Option<String>,
    created_at: DateTime<Utc>,
    last_used_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    current: bool,
}

pub async fn profile(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let auth = ctx.user()?;
    let mut conn = app.db.get().await?;
    let now = db_now(app.clock.as_ref());
    let live = sessions::list_live(&mut conn, &auth.user.id, now).await?;
    let mut body = serde_json::to_value(UserResponse::from(&auth.user))
        .map_err(|e| ApiError::internal(anyhow::Error::from(e)))?;
    body["active_sessions"] = json!(live.len());
    body["plan_limits"] = json!({ "max_environments": auth.user.plan().max_environments() });
    let by_status = crate::store::environments::count_by_status(&mut conn, &auth.user.id).await?;
    let active: i64 = by_status
        .iter()
        .filter(|(s, _)| s.counts_against_limit())
        .map(|(_, n)| n)
        .sum();
    let running = by_status
        .iter()
        .find(|(s, _)| *s == Status::Running)
        .map_or(0, |(_, n)| *n);
    body["environments"] = json!({
        "total": active,
        "running": running,
        "by_status": by_status
            .into_iter()
            .map(|(s, n)| (s.as_str(), n))
            .collect::<std::collections::BTreeMap<_, _>>(),
    });
    ok(&body)
}

pub async fn update_profile(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let auth = ctx.user()?;
    let req: ProfileUpdate = ctx.json()?;
    let mut errors = Vec::new();
    let username = req.username.map(|u| u.trim().to_string());
    if let Some(username) = &username {
        rules::check_username("username", username, &mut errors);
    }
    let full_name = req.full_name.map(|n| n.trim().to_string());
    rules::check_optional_len(
        "full_name",
        full_name.as_deref(),
        rules::FULL_NAME_MAX,
        &mut errors,
    );
    let avatar_url = req.avatar_url.map(|a| a.trim().to_string());
    if let Some(url) = avatar_url.as_deref().filter(|u| !u.is_empty()) {
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            errors.push(FieldError::new(
                "avatar_url",
                "url",
                "Must be an http(s) URL",
            ));
        }
        rules::check_optional_len("avatar_url", Some(url), rules::AVATAR_URL_MAX, &mut errors);
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let mut conn = app.db.get().await?;
    if let Some(name) = &username
        && username_key(name) != auth.user.username_key
        && users::by_username(&mut conn, name).await?.is_some()
    {
        return Err(ApiError::bad_request(
            ErrorCode::UsernameTaken,
            "Username already taken",
        ));
    }
    let changes = ProfileChanges {
        username_key: username.as_deref().map(username_key),
        username,
        full_name: full_name.map(|n| Some(n).filter(|n| !n.is_empty())),
        avatar_url: avatar_url.map(|a| Some(a).filter(|a| !a.is_empty())),
        updated_at: Some(db_now(app.clock.as_ref())),
    };
    let user = match users::update_profile(&mut conn, &auth.user.id, &changes).await {
        Ok(user) => user,
        Err(e) if e.unique_violation().is_some() => {
            return Err(ApiError::bad_request(
                ErrorCode::UsernameTaken,
                "Username already taken",
            ));
        }
        Err(e) => return Err(e.into()),
    };
    app.session_cache.forget_user(&auth.user.id);
    ok(&UserResponse::from(&user))
}

/// Change the password, or set one when the account has none (no `current_password` needed
/// then; the caller is signed in). Every other session ends. The write is conditional on the
/// password still being the one checked and this session still being live
/// ([`users::replace_password`]), so it cannot undo a Google claim that raced it.
pub async fn change_password(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let auth = ctx.user()?;
    let req: PasswordChange = ctx.json()?;
    let mut errors = Vec::new();
    rules::check_password("new_password", &req.new_password, &mut errors);
    let current = auth.user.password_hash.as_deref();
    if current.is_some() && req.current_password.is_none() {
        errors.push(current_password_required());
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let ticket = app.passwords.admit()?;
    if let (Some(hash), Some(given)) = (current, req.current_password.as_deref()) {
        let check = PasswordCheck {
            subject: Subject::account(&auth.user.id),
            user_id: Some(&auth.user.id),
            event: "password_check_failed",
            reason: "bad_current_password",
        };
        let conn = app.db.get().await?;
        if !check_password(&app, &ctx, conn, &ticket, check, given, Some(hash)).await? {
            return Err(ApiError::bad_request(
                ErrorCode::WrongPassword,
                "Current password is incorrect",
            ));
        }
    }
    let hash = ticket.hash(&req.new_password).await?;
    drop(ticket);
    let mut conn = app.db.get().await?;
    let now = db_now(app.clock.as_ref());
    let replaced = users::replace_password(
        &mut conn,
        &auth.user.id,
        current,
        &hash,
        &auth.session.id,
        "password_change",
        now,
    )
    .await?;
    app.session_cache.forget_user(&auth.user.id);
    let ended = match replaced {
        PasswordReplaced::Set { ended } => ended,
        PasswordReplaced::SessionEnded => {
            return Err(ApiError::unauthorized("Session has ended"));
        }
        PasswordReplaced::Changed => {
            return Err(ApiError::conflict(
                ErrorCode::InvalidState,
                "The password was changed meanwhile; reload and try again",
            ));
        }
    };
    let count = ended.len();
    app.end_sessions(ended, "password changed").await;
    app.audit(
        &ctx.audit(),
        if current.is_some() {
            "password_change"
        } else {
            "password_set"
        },
        Some(&auth.user.id),
        Some(&auth.session.id),
        json!({ "sessions_ended": count }),
    )
    .await;
    let message = if current.is_some() {
        "Password changed; other sessions have been signed out"
    } else {
        "Password set; other sessions have been signed out"
    };
    ok(&json!({ "message": message, "sessions_ended": count }))
}

fn current_password_required() -> FieldError {
    FieldError::new(
        "current_password",
        "required",
        "current_password is required to change the password",
    )
}

/// `POST /users/me/google {id_token}`: link a Google account to the signed-in account, so it can
/// sign in with Google too. The token's e-mail may differ from the account's (the signed-in user
/// chooses which Google account to link); the e-mail is marked verified only when it is the same
/// and Google verified it. 409 `google_linked_elsewhere` when that Google account belongs to
/// another account, 409 `google_already_linked` when this account has a different one (unlink it
/// first); linking the same one again answers 200. Audited as `google_linked`.
pub async fn link_google(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let auth = ctx.user()?;
    let req: GoogleRequest = ctx.json()?;
    let identity = verified_google_identity(&app, req).await?;
    let mut conn = app.db.get().await?;
    let linked_elsewhere = || {
        ApiError::conflict(
            ErrorCode::GoogleLinkedElsewhere,
            "This Google account is linked to another account",
        )
    };
    if let Some(owner) = users::by_google_id(&mut conn, &identity.sub).await?
        && owner.id != auth.user.id
    {
        return Err(linked_elsewhere());
    }
    let verifies_email = identity.email_verified
        && identity
            .email
            .as_deref()
            .is_some_and(|e| e.eq_ignore_ascii_case(&auth.user.email));
    let now = db_now(app.clock.as_ref());
    let linked = users::link_google(
        &mut conn,
        &auth.user.id,
        &identity.sub,
        verifies_email,
        identity.picture.as_deref(),
        now,
    )
    .await;
    app.session_cache.forget_user(&auth.user.id);
    let user = match linked {
        Ok(GoogleLink::Linked { user, verified }) => {
            app.audit(
                &ctx.audit(),
                "google_linked",
                Some(&auth.user.id),
                Some(&auth.session.id),
                json!({
                    "google_email": identity.email,
                    "same_email": verifies_email,
                    "email_verified": verified,
                }),
            )
            .await;
            user
        }
        Ok(GoogleLink::AlreadyLinked(user)) => user,
        Ok(GoogleLink::OtherGoogle) => return Err(other_google_linked()),
        Ok(GoogleLink::Gone) => return Err(ApiError::unauthorized("Account no longer exists")),
        Err(e) if e.unique_violation().is_some() => return Err(linked_elsewhere()),
        Err(e) => return Err(e.into()),
    };
    ok(&UserResponse::from(&*user))
}

/// `DELETE /users/me/google`: unlink the Google account. Refused with 409 `last_sign_in_method`
/// when the account has no password (it would leave no way to sign in: set a password first),
/// 409 `google_not_linked` when none is linked. Audited as `google_unlinked`.
pub async fn unlink_google(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let auth = ctx.user()?;
    let mut conn = app.db.get().await?;
    let now = db_now(app.clock.as_ref());
    let unlinked = users::unlink_google(&mut conn, &auth.user.id, now).await?;
    app.session_cache.forget_user(&auth.user.id);
    let user = match unlinked {
        GoogleUnlink::Unlinked(user) => user,
        GoogleUnlink::NotLinked => {
            return Err(ApiError::conflict(
                ErrorCode::GoogleNotLinked,
                "No Google account is linked",
            ));
        }
        GoogleUnlink::LastSignInMethod => {
            return Err(ApiError::conflict(
                ErrorCode::LastSignInMethod,
                "Google is the only way to sign in to this account; set a password first",
            ));
        }
        GoogleUnlink::Gone => return Err(ApiError::unauthorized("Account no longer exists")),
    };
    app.audit(
        &ctx.audit(),
        "google_unlinked",
        Some(&auth.user.id),
        Some(&auth.session.id),
        json!({}),
    )
    .await;
    ok(&UserResponse::from(&*user))
}

pub async fn delete_account(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let auth = ctx.user()?;
    let req: DeleteAccount = ctx.json_or_default()?;
    if let Some(hash) = &auth.user.password_hash {
        let Some(password) = req.password.as_deref() else {
            return Err(ApiError::validation(vec![FieldError::new(
                "password",
                "required",
                "Password is required to delete the account",
            )]));
        };
        let ticket = app.passwords.admit()?;
        let check = PasswordCheck {
            subject: Subject::account(&auth.user.id),
            user_id: Some(&auth.user.id),
            event: "password_check_failed",
            reason: "bad_password_delete_account",
        };
        let conn = app.db.get().await?;
        if !check_password(&app, &ctx, conn, &ticket, check, password, Some(hash)).await? {
            return Err(ApiError::bad_request(
                ErrorCode::WrongPassword,
                "Password is incorrect",
            ));
        }
    }
    // Close the account to new environments first (creates check it in their transaction), so
    // the deletion below sees every environment there will ever be; then release their provider
    // resources before the account goes. If that cannot finish, the account opens again so the
    // person can retry.
    {
        let mut conn = app.db.get().await?;
        users::set_active(&mut conn, &auth.user.id, false).await?;
        app.session_cache.forget_user(&auth.user.id);
    }
    let user_id = auth.user.id.clone();
    if let Err(e) = app
        .actors
        .dispatch(Command::DeleteAllForUser { user_id })
        .await
    {
        let mut conn = app.db.get().await?;
        users::set_active(&mut conn, &auth.user.id, true).await?;
        app.session_cache.forget_user(&auth.user.id);
        return Err(e.into());
    }
    let mut conn = app.db.get().await?;
    let now = db_now(app.clock.as_ref());
    let ended =
        sessions::revoke_all(&mut conn, &auth.user.id, None, "account_deleted", now).await?;
    app.end_sessions(ended, "account deleted").await;
    users::delete(&mut conn, &auth.user.id).await?;
    app.session_cache.forget_user(&auth.user.id);
    app.audit(
        &ctx.audit(),
        "account_deleted",
        Some(&auth.user.id),
        Some(&auth.session.id),
        json!({ "username": auth.user.username }),
    )
    .await;
    ok(&message("Account deleted"))
}

pub async fn list_sessions(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let auth = ctx.user()?;
    let mut conn = app.db.get().await?;
    let now = db_now(app.clock.as_ref());
    let list: Vec<SessionView> = sessions::list_live(&mut conn, &auth.user.id, now)
        .await?
        .into_iter()
        .map(|s| SessionView {
            current: s.id == auth.session.id,
            id: s.id,
            user_agent: s.user_agent,
            ip_address: s.ip_address,
            created_at: from_db(s.created_at),
            last_used_at: from_db(s.last_used_at),
            expires_at: from_db(s.expires_at),
        })
        .collect();
    ok(&json!({ "sessions": list, "total": list.len() }))
}

pub async fn revoke_session(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let auth = ctx.user()?;
    let id = ctx.param("session_id").to_string();
    let mut conn = app.db.get().await?;
    let not_found = || ApiError::not_found("Session not found");
    let (session, _) = sessions::with_user(&mut conn, &id)
        .await?
        .filter(|(s, _)| s.user_id == auth.user.id)
        .ok_or_else(not_found)?;
    let now = db_now(app.clock.as_ref());
    if !sessions::revoke(&mut conn, &session.id, "revoked_by_user", now).await? {
        return Err(not_found());
    }
    app.end_sessions(vec![session.id.clone()], "session revoked")
        .await;
    app.audit(
        &ctx.audit(),
        "session_revoked",
        Some(&auth.user.id),
        Some(&auth.session.id),
        json!({ "revoked_session": session.id }),
    )
    .await;
    ok(&message("Session revoked"))
}

pub async fn revoke_all(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let auth = ctx.user()?;
    let query: RevokeAllQuery = ctx.query()?;
    let keep = query
        .keep_current
        .unwrap_or(false)
        .then_some(auth.session.id.as_str());
    let mut conn = app.db.get().await?;
    let now = db_now(app.clock.as_ref());
    let ended = sessions::revoke_all(&mut conn, &auth.user.id, keep, "revoked_all", now).await?;
    let count = ended.len();
    app.end_sessions(ended, "all sessions revoked").await;
    app.audit(
        &ctx.audit(),
        "session_revoked",
        Some(&auth.user.id),
        Some(&auth.session.id),
        json!({ "all": true, "count": count, "kept_current": keep.is_some() }),
    )
    .await;
    ok(&json!({ "message": "Sessions revoked", "revoked": count }))
}
