//! `/api/v1/templates`: the catalogue (built-in templates are loaded at start; admins may add,
//! replace and remove their own, and override a built-in one: deleting the override restores the
//! shipped version).

use http::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::message;
use crate::app::AppState;
use crate::clock::db_now;
use crate::error::{ApiError, ApiResult, ErrorCode, FieldError};
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

/// The row an admin's template is stored as.
fn admin_row(app: &AppState, template: &Template) -> ApiResult<TemplateRow> {
    Ok(
        TemplateRow::new(template, false, db_now(app.clock.as_ref()))
            .map_err(anyhow::Error::from)?,
    )
}

pub async fn create(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let template = checked(&ctx)?;
    let row = admin_row(&app, &template)?;
    let mut conn = app.db.get().await?;
    if !store::insert_new(&mut conn, &row).await? {
        return Err(ApiError::conflict(
            ErrorCode::TemplateExists,
            format!("Template '{}' already exists", template.id()),
        ));
    }
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
    let row = admin_row(&app, &template)?;
    let mut conn = app.db.get().await?;
    if !store::replace_existing(&mut conn, &row).await? {
        return Err(ApiError::not_found("Template not found"));
    }
    ok(&template.api_view())
}

pub async fn delete(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let id = ctx.param("template_id").to_lowercase();
    let mut conn = app.db.get().await?;
    // Each outcome is one statement; the row is read afterwards only to explain a refusal.
    let done = match shipped(&id) {
        Some(template) => {
            let row = TemplateRow::new(&template, true, db_now(app.clock.as_ref()))
                .map_err(anyhow::Error::from)?;
            store::restore_builtin(&mut conn, &row).await?
        }
        None => store::delete_custom(&mut conn, &id).await?,
    };
    if done {
        let text = match shipped(&id) {
            Some(_) => "Template restored to its built-in version",
            None => "Template deleted",
        };
        return ok(&message(text));
    }
    match store::get(&mut conn, &id).await? {
        Some(row) if row.builtin => Err(ApiError::conflict(
            ErrorCode::BuiltinTemplate,
            "Built-in templates cannot be deleted",
        )),
        _ => Err(ApiError::not_found("Template not found")),
    }
}
