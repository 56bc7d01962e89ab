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
