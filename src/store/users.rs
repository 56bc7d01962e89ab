//! Accounts.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use serde::{Deserialize, Serialize};

use super::schema::{sessions, users};
use super::{DbConn, StoreResult};
use crate::db_run;

/// Subscription plans and what they allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    Free,
    Starter,
    Pro,
    Admin,
}

impl Plan {
    pub const ALL: [Plan; 4] = [Plan::Free, Plan::Starter, Plan::Pro, Plan::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Free => "free",
            Self::Starter => "starter",
            Self::Pro => "pro",
            Self::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
    }

    /// Environments a user may hold in any non-terminal state.
    pub fn max_environments(self) -> u32 {
        match self {
            Self::Free => 1,
            Self::Starter => 3,
            Self::Pro => 10,
            Self::Admin => 100,
        }
    }
}

#[derive(Debug, Clone, Queryable, Selectable, Identifiable)]
#[diesel(table_name = users)]
#[diesel(check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct User {
    pub id: String,
    pub username: String,
    pub username_key: String,
    pub email: String,
    pub password_hash: Option<String>,
    pub full_name: Option<String>,
    pub avatar_url: Option<String>,
    pub google_id: Option<String>,
    pub is_active: bool,
    pub is_verified: bool,
    pub subscription_plan: String,
    pub preferred_region: Option<String>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    pub last_login: Option<NaiveDateTime>,
}

impl User {
    pub fn plan(&self) -> Plan {
        Plan::parse(&self.subscription_plan).unwrap_or(Plan::Free)
    }
    pub fn is_admin(&self) -> bool {
        self.plan() == Plan::Admin
    }
}

#[derive(Debug, Insertable)]
#[diesel(table_name = users)]
pub struct NewUser {
    pub id: String,
    pub username: String,
    pub username_key: String,
    pub email: String,
    pub password_hash: Option<String>,
    pub full_name: Option<String>,
    pub avatar_url: Option<String>,
    pub google_id: Option<String>,
    pub is_active: bool,
    pub is_verified: bool,
    pub subscription_plan: String,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    pub last_login: Option<NaiveDateTime>,
}

/// Profile fields a user may change; `None` leaves a field as it is.
#[derive(Debug, Default, AsChangeset)]
#[diesel(table_name = users)]
pub struct ProfileChanges {
    pub username: Option<String>,
    pub username_key: Option<String>,
    pub full_name: Option<Option<String>>,
    pub avatar_url: Option<Option<String>>,
    pub updated_at: Option<NaiveDateTime>,
}

/// The case-insensitive key a username is unique by.
pub fn username_key(username: &str) -> String {
    username.to_lowercase()
}

pub async fn insert(conn: &mut DbConn, new: &NewUser) -> StoreResult<User> {
    Ok(db_run!(conn: {
        diesel::insert_into(users::table)
            .values(new)
            .returning(User::as_returning())
            .get_result(conn)
            .await?
    }))
}

pub async fn by_id(conn: &mut DbConn, id: &str) -> StoreResult<Option<User>> {
    Ok(db_run!(conn: {
        users::table.find(id).select(User::as_select()).first(conn).await.optional()?
    }))
}

pub async fn by_email(conn: &mut DbConn, email: &str) -> StoreResult<Option<User>> {
    let email = email.to_lowercase();
    Ok(db_run!(conn: {
        users::table
            .filter(users::email.eq(&email))
            .select(User::as_select())
            .first(conn)
            .await
            .optional()?
    }))
}

pub async fn by_username(conn: &mut DbConn, username: &str) -> StoreResult<Option<User>> {
    let key = username_key(username);
    Ok(db_run!(conn: {
        users::table
            .filter(users::username_key.eq(&key))
            .select(User::as_select())
            .first(conn)
            .await
            .optional()?
    }))
}

/// A user by username or e-mail address (what the login form takes).
pub async fn by_login(conn: &mut DbConn, login: &str) -> StoreResult<Option<User>> {
    let login = login.trim();
    if login.contains('@') {
        by_email(conn, login).await
    } else {
        by_username(conn, login).await
    }
}

pub async fn by_google_id(conn: &mut DbConn, google_id: &str) -> StoreResult<Option<User>> {
    Ok(db_run!(conn: {
        users::table
            .filter(users::google_id.eq(google_id))
            .select(User::as_select())
            .first(conn)
            .await
            .optional()?
    }))
}

/// Note a successful sign-in (`last_login`).
pub async fn record_login(conn: &mut DbConn, id: &str, now: NaiveDateTime) -> StoreResult<()> {
    db_run!(conn: {
        diesel::update(users::table.find(id))
            .set(users::last_login.eq(Some(now)))
            .execute(conn)
            .await?;
    });
    Ok(())
}

pub async fn update_profile(
    conn: &mut DbConn,
    id: &str,
    changes: &ProfileChanges,
) -> StoreResult<User> {
    Ok(db_run!(conn: {
        diesel::update(users::table.find(id))
            .set(changes)
            .returning(User::as_returning())
            .get_result(conn)
            .await?
    }))
}

pub async fn set_plan(
    conn: &mut DbConn,
    id: &str,
    plan: Plan,
    now: NaiveDateTime,
) -> StoreResult<()> {
    db_run!(conn: {
        diesel::update(users::table.find(id))
            .set((users::subscription_plan.eq(plan.as_str()), users::updated_at.eq(now)))
            .execute(conn)
            .await?;
    });
    Ok(())
}

/// What [`bind_google`] did to the account a verified Google e-mail matched.
#[derive(Debug)]
pub enum GoogleBind {
    /// We had verified the account's e-mail: the Google identity was linked (or already was).
    Linked(Box<User>),
    /// We had never verified the account's e-mail: the Google identity took the account over.
    /// Its password was removed, `ended` are the sessions revoked with it, `had_password` says
    /// whether there was a password to remove, and `replaced_google` whether another Google
    /// identity was linked before (now replaced).
    Claimed {
        user: Box<User>,
        ended: Vec<String>,
        had_password: bool,
        replaced_google: bool,
    },
    /// The account's e-mail is verified and it is linked to a different Google identity.
    OtherGoogle,
    /// The account is gone (deleted meanwhile).
    Gone,
}

/// Revoke every live session of `$user` in the connection `$c` (inside a transaction), except
/// `$keep`; evaluates to the ids revoked.
macro_rules! revoke_sessions_in {
    ($c:ident, $user:expr, $keep:expr, $reason:expr, $now:expr) => {
        diesel::update(
            sessions::table
                .filter(sessions::user_id.eq($user))
                .filter(sessions::revoked_at.is_null())
                .filter(sessions::id.ne($keep)),
        )
        .set((
            sessions::revoked_at.eq(Some($now)),
            sessions::revoked_reason.eq(Some($reason)),
            sessions::successor_sealed.eq(None::<String>),
        ))
        .returning(sessions::id)
        .get_results::<String>($c)
        .await?
    };
}

/// Run `$body` (with the connection bound to `$c` and the user's row, or `None`, to `$user`) in
/// one transaction that holds the user's row against concurrent writers: PostgreSQL locks it
/// (`SELECT … FOR UPDATE`), SQLite takes the write lock up front (`BEGIN IMMEDIATE`). Every write
/// that must see a consistent password/Google state of an account goes through this.
macro_rules! with_locked_user {
    ($conn:ident, $id:expr, |$c:ident, $user:ident| $body:block) => {{
        let result: Result<_, diesel::result::Error> = db_run!($conn: pg {
            $conn.transaction(async |$c| {
                let $user: Option<User> = users::table
                    .find($id)
                    .select(User::as_select())
                    .for_update()
                    .first($c)
                    .await
                    .optional()?;
                $body
            })
            .await
        } sqlite {
            $conn.immediate_transaction(async |$c| {
                let $user: Option<User> = users::table
                    .find($id)
                    .select(User::as_select())
                    .first($c)
                    .await
                    .optional()?;
                $body
            })
            .await
        });
        result?
    }};
}

/// Bind the Google identity `google_id`, whose e-mail Google verified and which matched the
/// account `id` by e-mail, in one transaction (see `with_locked_user`):
/// - the account's e-mail is verified (by us, through Google before): link it, unless it is
///   linked to another Google identity ([`GoogleBind::OtherGoogle`]);
/// - it is not (anyone can register any address): **claim** it — remove the password, mark the
///   e-mail verified, set `google_id` (replacing one the registrant may have linked) and revoke
///   every session (reason `account_claimed`). The caller stops the ended sessions' actors.
///
/// `picture` becomes the avatar when the account has none (linked) or always when Google has one
/// (claimed: nothing the registrant chose is kept for show).
pub async fn bind_google(
    conn: &mut DbConn,
    id: &str,
    google_id: &str,
    picture: Option<&str>,
    now: NaiveDateTime,
) -> StoreResult<GoogleBind> {
    use diesel_async::AsyncConnection;
    Ok(with_locked_user!(conn, id, |c, user| {
        let Some(user) = user else {
            return Ok(GoogleBind::Gone);
        };
        if user.is_verified {
            if user.google_id.as_deref().is_some_and(|g| g != google_id) {
                return Ok(GoogleBind::OtherGoogle);
            }
            let avatar = user.avatar_url.as_deref().or(picture);
            let user = diesel::update(users::table.find(id))
                .set((
                    users::google_id.eq(Some(google_id)),
                    users::avatar_url.eq(avatar),
                    users::updated_at.eq(now),
                ))
                .returning(User::as_returning())
                .get_result(c)
                .await?;
            return Ok(GoogleBind::Linked(Box::new(user)));
        }
        let had_password = user.password_hash.is_some();
        let replaced_google = user.google_id.as_deref().is_some_and(|g| g != google_id);
        let avatar = picture.or(user.avatar_url.as_deref());
        let claimed = diesel::update(users::table.find(id))
            .set((
                users::password_hash.eq(None::<String>),
                users::is_verified.eq(true),
                users::google_id.eq(Some(google_id)),
                users::avatar_url.eq(avatar),
                users::updated_at.eq(now),
            ))
            .returning(User::as_returning())
            .get_result(c)
            .await?;
        let ended = revoke_sessions_in!(c, id, "", "account_claimed", now);
        Ok(GoogleBind::Claimed {
            user: Box::new(claimed),
            ended,
            had_password,
            replaced_google,
        })
    }))
}

/// What [`link_google`] found.
#[derive(Debug)]
pub enum GoogleLink {
    /// Linked now (`verified`: the e-mail was marked verified with it).
    Linked { user: Box<User>, verified: bool },
    /// This Google identity was already linked to this account (a repeat).
    AlreadyLinked(Box<User>),
    /// The account is linked to a different Google identity.
    OtherGoogle,
    /// The account is gone.
    Gone,
}

/// Link the Google identity `google_id` to the signed-in account `id` if it has none. The
/// e-mail is marked verified when `verifies_email` (the token's e-mail is the account's and
/// Google verified it); `picture` becomes the avatar when the account has none. A Google identity
/// linked to another account is a unique violation ([`super::StoreError::unique_violation`]).
pub async fn link_google(
    conn: &mut DbConn,
    id: &str,
    google_id: &str,
    verifies_email: bool,
    picture: Option<&str>,
    now: NaiveDateTime,
) -> StoreResult<GoogleLink> {
    use diesel_async::AsyncConnection;
    Ok(with_locked_user!(conn, id, |c, user| {
        let Some(user) = user else {
            return Ok(GoogleLink::Gone);
        };
        match user.google_id.as_deref() {
            Some(g) if g == google_id => return Ok(GoogleLink::AlreadyLinked(Box::new(user))),
            Some(_) => return Ok(GoogleLink::OtherGoogle),
            None => {}
        }
        let avatar = user.avatar_url.as_deref().or(picture);
        let user = diesel::update(users::table.find(id))
            .set((
                users::google_id.eq(Some(google_id)),
                users::is_verified.eq(user.is_verified || verifies_email),
                users::avatar_url.eq(avatar),
                users::updated_at.eq(now),
            ))
            .returning(User::as_returning())
            .get_result(c)
            .await?;
        Ok(GoogleLink::Linked {
            user: Box::new(user),
            verified: verifies_email,
        })
    }))
}

/// What [`unlink_google`] found.
#[derive(Debug)]
pub enum GoogleUnlink {
    /// Unlinked; the account keeps its password.
    Unlinked(Box<User>),
    /// No Google identity is linked.
    NotLinked,
    /// The account has no password: unlinking would leave no way to sign in.
    LastSignInMethod,
    /// The account is gone.
    Gone,
}

/// Remove the Google identity of account `id`, refused when it has no password (checked and
/// written in one transaction, so a concurrent claim cannot leave the account with neither).
pub async fn unlink_google(
    conn: &mut DbConn,
    id: &str,
    now: NaiveDateTime,
) -> StoreResult<GoogleUnlink> {
    use diesel_async::AsyncConnection;
    Ok(with_locked_user!(conn, id, |c, user| {
        let Some(user) = user else {
            return Ok(GoogleUnlink::Gone);
        };
        if user.google_id.is_none() {
            return Ok(GoogleUnlink::NotLinked);
        }
        if user.password_hash.is_none() {
            return Ok(GoogleUnlink::LastSignInMethod);
        }
        let user = diesel::update(users::table.find(id))
            .set((
                users::google_id.eq(None::<String>),
                users::updated_at.eq(now),
            ))
            .returning(User::as_returning())
            .get_result(c)
            .await?;
        Ok(GoogleUnlink::Unlinked(Box::new(user)))
    }))
}

/// What [`replace_password`] did.
#[derive(Debug)]
pub enum PasswordReplaced {
    /// The password is set; `ended` are the other sessions revoked with it.
    Set { ended: Vec<String> },
    /// The password changed since the caller checked it (a claim removed it, another change set
    /// it): nothing was written.
    Changed,
    /// The calling session has ended meanwhile (or the account is gone): nothing was written.
    SessionEnded,
}

/// Set the password of account `id` to `new_hash` if it still is `expected` (the hash the caller
/// verified the current password against, or `None` when the account had none) and the calling
/// session `session_id` is still live, and revoke every other session (reason `reason`) — in one
/// transaction, so a password change racing a Google claim cannot hand the account back.
pub async fn replace_password(
    conn: &mut DbConn,
    id: &str,
    expected: Option<&str>,
    new_hash: &str,
    session_id: &str,
    reason: &str,
    now: NaiveDateTime,
) -> StoreResult<PasswordReplaced> {
    use diesel_async::AsyncConnection;
    Ok(with_locked_user!(conn, id, |c, user| {
        let Some(user) = user else {
            return Ok(PasswordReplaced::SessionEnded);
        };
        if user.password_hash.as_deref() != expected {
            return Ok(PasswordReplaced::Changed);
        }
        let live: i64 = sessions::table
            .filter(sessions::id.eq(session_id))
            .filter(sessions::user_id.eq(id))
            .filter(sessions::revoked_at.is_null())
            .filter(sessions::expires_at.gt(now))
            .count()
            .get_result(c)
            .await?;
        if live == 0 {
            return Ok(PasswordReplaced::SessionEnded);
        }
        diesel::update(users::table.find(id))
            .set((
                users::password_hash.eq(Some(new_hash)),
                users::updated_at.eq(now),
            ))
            .execute(c)
            .await?;
        let ended = revoke_sessions_in!(c, id, session_id, reason, now);
        Ok(PasswordReplaced::Set { ended })
    }))
}

/// Allow or stop sign-ins and new environments for an account (account deletion deactivates
/// first: environment creates check this in their transaction).
pub async fn set_active(conn: &mut DbConn, id: &str, active: bool) -> StoreResult<()> {
    db_run!(conn: {
        diesel::update(users::table.find(id))
            .set(users::is_active.eq(active))
            .execute(conn)
            .await?;
    });
    Ok(())
}

pub async fn delete(conn: &mut DbConn, id: &str) -> StoreResult<bool> {
    Ok(db_run!(conn: {
        diesel::delete(users::table.find(id)).execute(conn).await? > 0
    }))
}
