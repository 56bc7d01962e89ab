//! Accounts.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use serde::{Deserialize, Serialize};

use super::schema::users;
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

pub async fn set_password(
    conn: &mut DbConn,
    id: &str,
    hash: &str,
    now: NaiveDateTime,
) -> StoreResult<()> {
    db_run!(conn: {
        diesel::update(users::table.find(id))
            .set((users::password_hash.eq(Some(hash)), users::updated_at.eq(now)))
            .execute(conn)
            .await?;
    });
    Ok(())
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

/// Attach a Google account to an existing user (and mark the e-mail verified, as Google did);
/// `avatar_url` is the avatar to keep afterwards.
pub async fn link_google(
    conn: &mut DbConn,
    id: &str,
    google_id: &str,
    avatar_url: Option<&str>,
    now: NaiveDateTime,
) -> StoreResult<User> {
    Ok(db_run!(conn: {
        diesel::update(users::table.find(id))
            .set((
                users::google_id.eq(Some(google_id)),
                users::is_verified.eq(true),
                users::avatar_url.eq(avatar_url),
                users::updated_at.eq(now),
            ))
            .returning(User::as_returning())
            .get_result(conn)
            .await?
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
