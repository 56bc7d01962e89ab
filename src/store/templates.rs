//! The template catalogue: built-in templates are written here at start; admins may add their own
//! and override a built-in (an override has `builtin = false` and is kept across restarts; deleting
//! it restores the shipped version). A template is stored whole, as JSON.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::RunQueryDsl;

use super::schema::templates;
use super::{DbConn, StoreResult};
use crate::db_run;

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = templates)]
#[diesel(check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct TemplateRow {
    pub id: String,
    pub definition: String,
    pub builtin: bool,
    pub updated_at: NaiveDateTime,
}

impl TemplateRow {
    pub fn new(
        template: &crate::templates::Template,
        builtin: bool,
        now: NaiveDateTime,
    ) -> serde_json::Result<Self> {
        Ok(Self {
            id: template.id().to_string(),
            definition: serde_json::to_string(template)?,
            builtin,
            updated_at: now,
        })
    }
}

pub async fn upsert(conn: &mut DbConn, row: &TemplateRow) -> StoreResult<()> {
    db_run!(conn: {
        diesel::insert_into(templates::table)
            .values(row)
            .on_conflict(templates::id)
            .do_update()
            .set((
                templates::definition.eq(excluded(templates::definition)),
                templates::builtin.eq(excluded(templates::builtin)),
                templates::updated_at.eq(excluded(templates::updated_at)),
            ))
            .execute(conn)
            .await?;
    });
    Ok(())
}

pub async fn list(conn: &mut DbConn) -> StoreResult<Vec<TemplateRow>> {
    Ok(db_run!(conn: {
        templates::table.order(templates::id).select(TemplateRow::as_select()).load(conn).await?
    }))
}

pub async fn get(conn: &mut DbConn, id: &str) -> StoreResult<Option<TemplateRow>> {
    Ok(db_run!(conn: {
        templates::table.find(id).select(TemplateRow::as_select()).first(conn).await.optional()?
    }))
}

pub async fn delete(conn: &mut DbConn, id: &str) -> StoreResult<bool> {
    Ok(db_run!(conn: {
        diesel::delete(templates::table.find(id)).execute(conn).await? > 0
    }))
}

/// Insert a template that must be new; `false` when one with this id exists (the primary key
/// decides, so two parallel creates cannot both succeed).
pub async fn insert_new(conn: &mut DbConn, row: &TemplateRow) -> StoreResult<bool> {
    let result: StoreResult<()> = async {
        db_run!(conn: {
            diesel::insert_into(templates::table).values(row).execute(conn).await?;
        });
        Ok(())
    }
    .await;
    match result {
        Ok(()) => Ok(true),
        Err(e) if e.unique_violation().is_some() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Replace an existing template (an admin's own, or an override of a built-in one) in one
/// statement; `false` when there is none (deleted meanwhile: never resurrected).
pub async fn replace_existing(conn: &mut DbConn, row: &TemplateRow) -> StoreResult<bool> {
    Ok(db_run!(conn: {
        diesel::update(templates::table.find(&row.id))
            .set((
                templates::definition.eq(&row.definition),
                templates::builtin.eq(row.builtin),
                templates::updated_at.eq(row.updated_at),
            ))
            .execute(conn)
            .await? > 0
    }))
}

/// Delete an admin's template (never a shipped one) in one statement; `false` when there is no
/// such template.
pub async fn delete_custom(conn: &mut DbConn, id: &str) -> StoreResult<bool> {
    Ok(db_run!(conn: {
        diesel::delete(templates::table.filter(templates::id.eq(id)).filter(templates::builtin.eq(false)))
            .execute(conn)
            .await? > 0
    }))
}

/// Put the shipped version back over an admin's override, in one statement; `false` when there
/// is no override (already the shipped version, or no such template).
pub async fn restore_builtin(conn: &mut DbConn, row: &TemplateRow) -> StoreResult<bool> {
    Ok(db_run!(conn: {
        diesel::update(templates::table.filter(templates::id.eq(&row.id)).filter(templates::builtin.eq(false)))
            .set((
                templates::definition.eq(&row.definition),
                templates::builtin.eq(true),
                templates::updated_at.eq(row.updated_at),
            ))
            .execute(conn)
            .await? > 0
    }))
}
