//! Authentication of a request: a bearer access token whose session is still live and whose user
//! is still active. Every failure is a 401 with `WWW-Authenticate: Bearer`.

use chrono::Duration;
use http::HeaderMap;
use http::header::AUTHORIZATION;

use crate::app::App;
use crate::auth::tokens::TokenError;
use crate::clock::{db_now, from_db};
use crate::error::{ApiError, ApiResult};
use crate::store::sessions::{self, Session};
use crate::store::users::User;

/// `last_used_at` is written at most this often per session (not on every request).
const TOUCH_INTERVAL: Duration = Duration::seconds(60);

/// The caller of an authenticated request.
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub user: User,
    pub session: Session,
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

pub async fn authenticate_headers(app: &App, headers: &HeaderMap) -> ApiResult<AuthUser> {
    let token = bearer(headers).ok_or_else(|| ApiError::unauthorized("Not authenticated"))?;
    authenticate_token(app, token).await
}

pub async fn authenticate_token(app: &App, token: &str) -> ApiResult<AuthUser> {
    let claims = app.tokens.verify_access(token).map_err(|e| match e {
        TokenError::Expired => ApiError::unauthorized("Token has expired"),
        TokenError::Invalid | TokenError::WrongType => {
            ApiError::unauthorized("Could not validate credentials")
        }
    })?;
    let at = app.clock.now();
    let now = db_now(app.clock.as_ref());
    // The rows from the session cache (see `auth::session_cache` for the revocation bound), or
    // from the store.
    let (mut session, user) = match app.session_cache.get(&claims.sid, at) {
        Some(rows) => rows,
        None => {
            let epoch = app.session_cache.epoch();
            let rows = sessions::with_user_in(&app.db, &claims.sid)
                .await?
                .ok_or_else(|| ApiError::unauthorized("Could not validate credentials"))?;
            app.session_cache.put(epoch, &rows.0, &rows.1, at);
            rows
        }
    };
    if session.user_id != claims.sub || user.id != claims.sub {
        return Err(ApiError::unauthorized("Could not validate credentials"));
    }
    if !session.is_live(now) {
        return Err(ApiError::unauthorized("Session has ended"));
    }
    if !user.is_active {
        return Err(ApiError::unauthorized("Account is disabled"));
    }
    if from_db(now) - from_db(session.last_used_at) >= TOUCH_INTERVAL {
        let mut conn = app.db.get().await?;
        sessions::touch(&mut conn, &session.id, now).await?;
        session.last_used_at = now;
        // Read again next time (a re-put would stretch the cached user's age past the bound).
        app.session_cache.forget_sessions([&session.id]);
    }
    app.actors.touch_session(&session.id, &user.id);
    Ok(AuthUser { user, session })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc.def"));
        assert_eq!(bearer(&h), Some("abc.def"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer  xyz"));
        assert_eq!(bearer(&h), Some("xyz"));
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcjpwdw=="),
        );
        assert_eq!(bearer(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);
    }
}
