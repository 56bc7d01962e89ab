//! `/api/v1/templates`: the catalogue (built-in templates are loaded at start; admins may add,
//! replace and remove their own, and override a built-in one: deleting the override restores the
//! shipped version).

use http::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::message;
use crate::app::AppState;
use crate::clock::db_now;
use crate::error::{ApiError, ApiResult, FieldError};
use crate::http::{Body, Ctx, json, ok};
use crate::store::templates::{self as store, TemplateRow};
use crate::templates::Template;

#[derive(Deserialize, Default)]
pub struct ListQuery {
    category: Option<String>,
}

fn parse_row(row: &TemplateRow) -> Option<Template> {
    serde_json::from_str(&row.definition).ok()
}

/// The shipped version of a built-in template id.
fn shipped(id: &str) -> Option<Template> {
    crate::templates::builtin()
        .into_iter()
        .find(|t| t.id() == id)
}

fn view(row: &TemplateRow, template: &Template) -> Value {
    let mut v = template.api_view();
    v["builtin"] = json!(row.builtin);
    // An admin's override of a built-in template.
    v["customized"] = json!(!row.builtin && shipped(&row.id).is_some());
    v
}

pub async fn list(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let q: ListQuery = ctx.query()?;
    let mut conn = app.db.get().await?;
    let rows = store::list(&mut conn).await?;
    let items: Vec<Value> = rows
        .iter()
        .filter_map(|r| parse_row(r).map(|t| (r, t)))
        .filter(|(_, t)| {
            q.category
                .as_deref()
                .is_none_or(|c| t.category.eq_ignore_ascii_case(c))
        })
        .map(|(r, t)| view(r, &t))
        .collect();
    ok(&items)
}

pub async fn get(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let id = ctx.param("template_id").to_lowercase();
    let mut conn = app.db.get().await?;
    let row = store::get(&mut conn, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("Template not found"))?;
    let template = parse_row(&row).ok_or_else(|| ApiError::not_found("Template not found"))?;
    ok(&view(&row, &template))
}

fn checked(ctx: &Ctx) -> ApiResult<Template> {
    let template: Template = ctx.json()?;
    crate::templates::validate(&template).map_err(|e| {
        ApiError::validation(vec![FieldError::new("template", "invalid", e.to_string())])
    })?;
    Ok(template)
}

async fn save(app: &AppState, template: &Template) -> ApiResult<()> {
    let mut conn = app.db.get().await?;
    let row = TemplateRow::new(template, false, db_now(app.clock.as_ref()))
        .map_err(anyhow::Error::from)?;
    store::upsert(&mut conn, &row).await?;
    Ok(())
}

pub async fn create(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let template = checked(&ctx)?;
    let mut conn = app.db.get().await?;
    if store::get(&mut conn, template.id()).await?.is_some() {
        return Err(ApiError::conflict(
            "template_exists",
            format!("Template '{}' already exists", template.id()),
        ));
    }
    save(&app, &template).await?;
    Ok(json(StatusCode::CREATED, &template.api_view()))
}

pub async fn replace(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let id = ctx.param("template_id").to_lowercase();
    let template = checked(&ctx)?;
    if template.id() != id {
        return Err(ApiError::validation(vec![FieldError::new(
            "name",
            "mismatch",
            "The body's name must match the path",
        )]));
    }
    let mut conn = app.db.get().await?;
    if store::get(&mut conn, &id).await?.is_none() {
        return Err(ApiError::not_found("Template not found"));
    }
    save(&app, &template).await?;
    ok(&template.api_view())
}

pub async fn delete(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let id = ctx.param("template_id").to_lowercase();
    let mut conn = app.db.get().await?;
    let row = store::get(&mut conn, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("Template not found"))?;
    if row.builtin {
        return Err(ApiError::conflict(
            "builtin_template",
            "Built-in templates cannot be deleted",
        ));
    }
    if let Some(template) = shipped(&id) {
        let row = TemplateRow::new(&template, true, db_now(app.clock.as_ref()))
            .map_err(anyhow::Error::from)?;
        store::upsert(&mut conn, &row).await?;
        return ok(&message("Template restored to its built-in version"));
    }
    store::delete(&mut conn, &id).await?;
    ok(&message("Template deleted"))
}
