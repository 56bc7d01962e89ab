//! `/api/v1/environments/{id}/files`: list, download, upload, mkdir, move and delete files in a
//! running environment, over SFTP as the environment's own account ([`crate::ssh::sftp`]): the
//! operating system decides what that account may touch, so nothing here checks permissions,
//! and a symlink out of the workspace reaches only what the account itself could.
//!
//! Paths are relative to the environment's home (its workspace), `/`-separated; `.` and `..` are
//! resolved lexically and may not climb above the home; an absolute path is taken only when it
//! lies inside the home. Answers: 404 missing, 409 exists / not running / wrong kind, 412 a stale
//! `If-Match`, 413 over `files.max_upload_bytes`, 416 a `Range` outside the file, 422 a bad
//! path, 403 when the OS refuses the account, 503 when the environment cannot be reached.
//! Uploads, moves, deletes and new directories are audited (`file_written`, `file_moved`,
//! `file_deleted`, `directory_created`).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::environments::owned;
use crate::actors::environment::machine::Status;
use crate::app::{App, AppState};
use crate::error::{ApiError, ApiResult, ErrorCode, FieldError};
use crate::http::{Body, BodyError, Ctx, json};
use crate::ssh::sftp::{DOWNLOAD_QUEUE, FsError, Kind, Remote, Stat};
use crate::store::environments::Environment;

/// Longest path accepted, in bytes (Linux's PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;
/// Entries per listing page unless `limit` says otherwise, and the most `limit` may ask for.
pub const LIST_LIMIT_DEFAULT: usize = 200;
pub const LIST_LIMIT_MAX: usize = 1000;
/// After an upload proves too large, read and discard at most this much more so the client gets
/// to read the 413 instead of a reset connection (as for every other body).
const OVERSIZE_DRAIN_LIMIT: u64 = 32 * 1024 * 1024;
/// Mode of a new file (an existing file's mode is kept when it is replaced).
const NEW_FILE_MODE: u32 = 0o644;
/// Retry-After of a 503 when the environment cannot be reached.
const UNREACHABLE_RETRY_SECONDS: u64 = 5;

/// File operations running per user: each holds an SSH connection and an `sftp-server` process
/// until it ends (a download until its last byte is sent), so one user's parallel transfers are
/// capped at `files.max_operations_per_user` and cannot take the local SSH server's connection
/// slots from everyone else's terminals. The map holds only users with operations running.
static RUNNING: LazyLock<Mutex<HashMap<String, usize>>> = LazyLock::new(Default::default);

/// One running file operation of a user; released when dropped.
struct Slot {
    user: String,
}

impl Slot {
    fn take(user: &str, max: usize) -> Option<Self> {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        let count = running.entry(user.to_string()).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Self {
            user: user.to_string(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = running.get_mut(&self.user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                running.remove(&self.user);
            }
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileQuery {
    path: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MkdirRequest {
    path: String,
    /// Create missing parents too (`mkdir -p`); an existing directory is then no error.
    #[serde(default)]
    parents: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    from: String,
    to: String,
}

/// A file or directory as the API shows it (FileEntry in the OpenAPI document).
#[derive(Debug, Serialize)]
pub struct FileEntry {
    pub name: String,
    /// Relative to the home (`""` is the home).
    pub path: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    /// Bytes.
    pub size: u64,
    /// Permission bits in octal, e.g. `"0644"`.
    pub mode: String,
    pub modified: Option<DateTime<Utc>>,
    /// The `ETag` of a file (for `If-Match`); absent for other kinds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

impl FileEntry {
    fn new(components: &[String], name: String, stat: &Stat) -> Self {
        Self {
            name,
            path: components.join("/"),
            kind: stat.kind,
            size: stat.size,
            mode: format!("{:04o}", stat.mode),
            modified: stat.modified,
            etag: (stat.kind == Kind::File).then(|| stat.etag()),
        }
    }

    fn at(components: &[String], stat: &Stat) -> Self {
        let name = components.last().cloned().unwrap_or_default();
        Self::new(components, name, stat)
    }
}

/// A path as given, normalised lexically: `.` and empty components dropped, `..` applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GivenPath {
    /// Relative to the home.
    Relative(Vec<String>),
    /// From the root; must lie inside the home (known once connected).
    Absolute(Vec<String>),
}

/// Check and normalise a path (the syntax only; see [`inside_home`] for absolute ones).
pub fn parse_path(raw: &str) -> Result<GivenPath, String> {
    if raw.len() > MAX_PATH_BYTES {
        return Err(format!("The path is longer than {MAX_PATH_BYTES} bytes"));
    }
    if raw.contains('\0') {
        return Err("The path contains a NUL byte".into());
    }
    let absolute = raw.starts_with('/');
    let mut components: Vec<String> = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                // Above the root is the root; above the home is outside it.
                if components.pop().is_none() && !absolute {
                    return Err("The path leads outside the environment's home".into());
                }
            }
            name => components.push(name.to_string()),
        }
    }
    Ok(if absolute {
        GivenPath::Absolute(components)
    } else {
        GivenPath::Relative(components)
    })
}

/// The components below `home` of a parsed path, or why it is not inside the home.
pub fn inside_home(path: GivenPath, home: &str) -> Result<Vec<String>, String> {
    match path {
        GivenPath::Relative(components) => Ok(components),
        GivenPath::Absolute(components) => {
            let home: Vec<&str> = home.split('/').filter(|c| !c.is_empty()).collect();
            let inside =
                components.len() >= home.len() && components.iter().zip(&home).all(|(a, b)| a == b);
            if inside {
                Ok(components[home.len()..].to_vec())
            } else {
                Err("The path is outside the environment's home".into())
            }
        }
    }
}

/// Which part of a file a `Range` header asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ranged {
    /// No (usable) range: the whole file. Several ranges are answered with the whole file too,
    /// as RFC 9110 allows.
    Whole,
    /// `(start, length)`, within the file.
    Part(u64, u64),
    /// Outside the file: 416.
    Unsatisfiable,
}

/// Interpret a `Range` header for a file of `size` bytes (RFC 9110 §14.1.2; a malformed one is
/// ignored).
pub fn parse_range(header: Option<&str>, size: u64) -> Ranged {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ranged::Whole;
    };
    if spec.contains(',') {
        return Ranged::Whole;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Ranged::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    let number = |s: &str| s.parse::<u64>().ok();
    match (first.is_empty(), last.is_empty()) {
        (true, true) => Ranged::Whole,
        (true, false) => match number(last) {
            None => Ranged::Whole,
            Some(0) => Ranged::Unsatisfiable,
            Some(_) if size == 0 => Ranged::Unsatisfiable,
            Some(n) => {
                let len = n.min(size);
                Ranged::Part(size - len, len)
            }
        },
        (false, true) => match number(first) {
            None => Ranged::Whole,
            Some(start) if start >= size => Ranged::Unsatisfiable,
            Some(start) => Ranged::Part(start, size - start),
        },
        (false, false) => match (number(first), number(last)) {
            (Some(start), Some(end)) if end >= start => {
                if start >= size {
                    Ranged::Unsatisfiable
                } else {
                    let end = end.min(size - 1);
                    Ranged::Part(start, end - start + 1)
                }
            }
            _ => Ranged::Whole,
        },
    }
}

/// Whether an `If-Match`-style list (`*`, or quoted tags separated by commas) names `etag`.
/// `weak`: compare `W/"x"` as `"x"` (If-None-Match); otherwise a weak tag never matches.
pub fn etag_matches(header: &str, etag: Option<&str>, weak: bool) -> bool {
    let Some(etag) = etag else {
        return false;
    };
    header.split(',').map(str::trim).any(|tag| {
        let tag = if weak {
            tag.strip_prefix("W/").unwrap_or(tag)
        } else {
            tag
        };
        tag == "*" || tag == etag
    })
}

fn invalid_path(detail: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::InvalidPath,
        detail,
    )
}

fn conflict(code: ErrorCode, detail: impl Into<String>) -> ApiError {
    ApiError::conflict(code, detail)
}

fn precondition_failed(detail: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::PRECONDITION_FAILED,
        ErrorCode::PreconditionFailed,
        detail,
    )
}

fn shown(components: &[String]) -> String {
    if components.is_empty() {
        "the home directory".into()
    } else {
        components.join("/")
    }
}

/// How a failed file operation on `components` reads to the client.
fn fs_error(e: FsError, components: &[String]) -> ApiError {
    let path = shown(components);
    match e {
        FsError::NotFound => ApiError::not_found(format!("No such file or directory: {path}")),
        FsError::PermissionDenied => ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::FileAccessDenied,
            format!("Permission denied: the environment's account may not access {path}"),
        ),
        FsError::Failed(reason) => conflict(
            ErrorCode::FileOperationFailed,
            format!("The environment refused the operation on {path} ({reason})"),
        ),
        FsError::Unreachable(reason) => unreachable(reason),
    }
}

fn unreachable(reason: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %reason, "file API: environment unreachable");
    ApiError::unavailable(
        ErrorCode::EnvironmentUnreachable,
        "Cannot reach the environment's files; try again",
    )
    .with_retry_after(UNREACHABLE_RETRY_SECONDS)
}

/// A path from the request (422 when missing, malformed or escaping).
fn given(raw: Option<&str>) -> ApiResult<GivenPath> {
    let raw = raw.ok_or_else(|| invalid_path("The path is required (?path=)"))?;
    parse_path(raw).map_err(invalid_path)
}

/// An SFTP session to the caller's running environment as its own account, and the caller's
/// slot for it (429 `too_many_file_operations` when they are all taken).
async fn connect(app: &App, env: &Environment) -> ApiResult<(Remote, Slot)> {
    if env.status != Status::Running {
        return Err(conflict(
            ErrorCode::EnvironmentNotRunning,
            format!("Environment is {}; files need it running", env.status),
        ));
    }
    let max = app.config.files.max_operations_per_user;
    let slot = Slot::take(&env.user_id, max).ok_or_else(|| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::TooManyFileOperations,
            format!("At most {max} file operations may run at once; wait for one to finish"),
        )
        .with_retry_after(1)
    })?;
    let target = match app.actors.ssh_target(&env.id).await {
        Ok(Ok(target)) => target,
        Ok(Err(e)) => return Err(unreachable(format!("{e:#}"))),
        Err(_) => {
            return Err(ApiError::unavailable(
                ErrorCode::EnvironmentBusy,
                "Environment busy, try again",
            )
            .with_retry_after(2));
        }
    };
    let timeout = Duration::from_secs(app.config.files.request_timeout_seconds);
    let remote = Remote::connect(&target, timeout)
        .await
        .map_err(|e| fs_error(e, &[]))?;
    Ok((remote, slot))
}

/// Components of a path below the home of a connected session.
fn resolve(remote: &Remote, path: GivenPath) -> ApiResult<Vec<String>> {
    inside_home(path, remote.home()).map_err(invalid_path)
}

async fn stat(remote: &Remote, components: &[String]) -> ApiResult<Option<Stat>> {
    remote
        .stat(&remote.absolute(components))
        .await
        .map_err(|e| fs_error(e, components))
}

async fn lstat(remote: &Remote, components: &[String]) -> ApiResult<Option<Stat>> {
    remote
        .lstat(&remote.absolute(components))
        .await
        .map_err(|e| fs_error(e, components))
}

/// The parent of `components` must be an existing directory (404 / 409 otherwise).
async fn check_parent(remote: &Remote, components: &[String]) -> ApiResult<()> {
    let parent = &components[..components.len().saturating_sub(1)];
    match stat(remote, parent).await? {
        None => Err(ApiError::not_found(format!(
            "No such directory: {}",
            shown(parent)
        ))),
        Some(s) if s.kind != Kind::Directory => Err(conflict(
            ErrorCode::NotADirectory,
            format!("Not a directory: {}", shown(parent)),
        )),
        Some(_) => Ok(()),
    }
}

async fn audit(app: &App, ctx: &Ctx, env: &Environment, event: &str, detail: serde_json::Value) {
    let session = ctx.auth.as_ref().map(|a| a.session.id.as_str());
    app.audit(&ctx.audit(), event, Some(&env.user_id), session, detail)
        .await;
}

fn header_str<'a>(headers: &'a HeaderMap, name: &header::HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `If-Match` / `If-None-Match` of a write against the current version (`etag`: None when
/// nothing is there).
fn check_preconditions(headers: &HeaderMap, etag: Option<&str>) -> ApiResult<()> {
    if let Some(wanted) = header_str(headers, &header::IF_MATCH)
        && !etag_matches(wanted, etag, false)
    {
        return Err(precondition_failed(match etag {
            Some(current) => format!("The file changed: its ETag is now {current}"),
            None => "There is no file to match".into(),
        }));
    }
    if let Some(unwanted) = header_str(headers, &header::IF_NONE_MATCH)
        && etag_matches(unwanted, etag, true)
    {
        return Err(precondition_failed("The file exists"));
    }
    Ok(())
}

/// GET: a directory's listing or a file's bytes.
pub async fn get(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let query: FileQuery = ctx.query()?;
    let limit = query.limit.unwrap_or(LIST_LIMIT_DEFAULT);
    if !(1..=LIST_LIMIT_MAX).contains(&limit) {
        return Err(ApiError::validation(vec![FieldError::new(
            "limit",
            "range",
            format!("limit must be 1 to {LIST_LIMIT_MAX}"),
        )]));
    }
    let env = owned(&app, &ctx).await?;
    let path = parse_path(query.path.as_deref().unwrap_or("")).map_err(invalid_path)?;
    let (remote, slot) = connect(&app, &env).await?;
    let components = resolve(&remote, path)?;
    let Some(found) = stat(&remote, &components).await? else {
        return Err(fs_error(FsError::NotFound, &components));
    };
    match found.kind {
        Kind::Directory => list(&app, &remote, &components, query.offset.unwrap_or(0), limit).await,
        Kind::File => download(&app, &ctx, remote, slot, &components).await,
        _ => Err(conflict(
            ErrorCode::FileOperationFailed,
            format!(
                "{} is not a regular file or a directory",
                shown(&components)
            ),
        )),
    }
}

async fn list(
    app: &App,
    remote: &Remote,
    components: &[String],
    offset: usize,
    limit: usize,
) -> ApiResult<Response<Body>> {
    let (mut entries, truncated) = remote
        .list(
            &remote.absolute(components),
            app.config.files.max_list_entries,
        )
        .await
        .map_err(|e| fs_error(e, components))?;
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let total = entries.len();
    let page: Vec<FileEntry> = entries
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|(name, stat)| {
            let mut path = components.to_vec();
            path.push(name.clone());
            FileEntry::new(&path, name, &stat)
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({
            "path": components.join("/"),
            "type": "directory",
            "entries": page,
            "offset": offset,
            "limit": limit,
            "total": total,
            "truncated": truncated,
        }),
    ))
}

/// An HTTP date (IMF-fixdate).
fn http_date(t: DateTime<Utc>) -> String {
    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

/// `attachment; filename*=UTF-8''…` (RFC 6266 / 8187).
fn disposition(name: &str) -> String {
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename*=UTF-8''{encoded}")
}

fn set(resp: &mut Response<Body>, name: header::HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(name, value);
    }
}

async fn download(
    app: &App,
    ctx: &Ctx,
    remote: Remote,
    slot: Slot,
    components: &[String],
) -> ApiResult<Response<Body>> {
    let (handle, stat) = remote
        .open_read(&remote.absolute(components))
        .await
        .map_err(|e| fs_error(e, components))?;
    let etag = stat.etag();
    let close = |remote: Remote, handle: String| async move {
        let _ = remote.close(&handle).await;
    };
    if let Some(wanted) = header_str(&ctx.headers, &header::IF_MATCH)
        && !etag_matches(wanted, Some(&etag), false)
    {
        close(remote, handle).await;
        return Err(precondition_failed(format!(
            "The file changed: its ETag is now {etag}"
        )));
    }
    let not_modified = header_str(&ctx.headers, &header::IF_NONE_MATCH)
        .is_some_and(|h| etag_matches(h, Some(&etag), true));
    let range = if not_modified {
        Ranged::Whole
    } else {
        parse_range(header_str(&ctx.headers, &header::RANGE), stat.size)
    };
    let (status, start, len) = match range {
        _ if not_modified => (StatusCode::NOT_MODIFIED, 0, 0),
        Ranged::Whole => (StatusCode::OK, 0, stat.size),
        Ranged::Part(start, len) => (StatusCode::PARTIAL_CONTENT, start, len),
        Ranged::Unsatisfiable => {
            close(remote, handle).await;
            let mut err = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                ErrorCode::RangeNotSatisfiable,
                format!("The range is outside the file ({} bytes)", stat.size),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", stat.size)) {
                err.headers.push((header::CONTENT_RANGE, v));
            }
            return Err(err);
        }
    };
    let body = if status == StatusCode::NOT_MODIFIED || ctx.method == Method::HEAD || len == 0 {
        close(remote, handle).await;
        crate::http::full(Bytes::new())
    } else {
        let (tx, rx) = tokio::sync::mpsc::channel(DOWNLOAD_QUEUE);
        let idle = Duration::from_secs(app.config.files.idle_timeout_seconds);
        tokio::spawn(async move {
            Arc::new(remote)
                .stream_file(handle, start, len, tx, idle)
                .await;
            drop(slot);
        });
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })
        .map(|item| item.map(Frame::data).map_err(BodyError::from));
        StreamBody::new(frames).boxed_unsync()
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let name = components.last().map(String::as_str).unwrap_or("");
    set(&mut resp, header::ETAG, &etag);
    if let Some(modified) = stat.modified {
        set(&mut resp, header::LAST_MODIFIED, &http_date(modified));
    }
    set(&mut resp, header::CACHE_CONTROL, "private, no-cache");
    if status == StatusCode::NOT_MODIFIED {
        return Ok(resp);
    }
    let mime = mime_guess::from_path(name).first_or_octet_stream();
    set(&mut resp, header::CONTENT_TYPE, mime.essence_str());
    set(&mut resp, header::CONTENT_LENGTH, &len.to_string());
    set(&mut resp, header::ACCEPT_RANGES, "bytes");
    set(&mut resp, header::CONTENT_DISPOSITION, &disposition(name));
    if status == StatusCode::PARTIAL_CONTENT {
        let end = start + len - 1;
        set(
            &mut resp,
            header::CONTENT_RANGE,
            &format!("bytes {start}-{end}/{}", stat.size),
        );
    }
    Ok(resp)
}

fn too_large(limit: u64) -> ApiError {
    let mut err = ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::PayloadTooLarge,
        format!("The file is larger than the upload limit of {limit} bytes"),
    );
    err.headers
        .push((header::CONNECTION, HeaderValue::from_static("close")));
    err
}

/// Read and discard what is left of a refused upload (at most [`OVERSIZE_DRAIN_LIMIT`], each
/// piece within `idle`), so the client reads the answer instead of a reset.
async fn drain(body: &mut Incoming, idle: Duration) {
    let mut seen: u64 = 0;
    while seen <= OVERSIZE_DRAIN_LIMIT {
        match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            _ => return,
        }
    }
}

/// PUT: stream the body into a temporary file next to the target, then rename it over the
/// target. Memory: one body frame plus the SFTP writes in flight.
/// A refused upload's body is read and discarded (bounded) before the answer, so the client
/// reads the answer rather than a reset connection.
pub async fn put(app: AppState, mut ctx: Ctx) -> ApiResult<Response<Body>> {
    let mut body = ctx
        .stream
        .take()
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("upload route without its body")))?;
    let idle = Duration::from_secs(app.config.files.idle_timeout_seconds);
    let result = upload(&app, &ctx, &mut body, idle).await;
    if let Err(e) = &result
        && e.status != StatusCode::REQUEST_TIMEOUT
        && !hyper::body::Body::is_end_stream(&body)
    {
        drain(&mut body, idle).await;
    }
    result
}

async fn upload(
    app: &App,
    ctx: &Ctx,
    body: &mut Incoming,
    idle: Duration,
) -> ApiResult<Response<Body>> {
    let query: FileQuery = ctx.query()?;
    let env = owned(app, ctx).await?;
    let path = given(query.path.as_deref())?;
    let limit = app.config.files.max_upload_bytes;
    let declared =
        header_str(&ctx.headers, &header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    let (remote, _slot) = connect(app, &env).await?;
    let components = resolve(&remote, path)?;
    let Some(name) = components.last().cloned() else {
        return Err(invalid_path("The path must name a file, not the home"));
    };
    check_parent(&remote, &components).await?;
    let target = remote.absolute(&components);
    let existing = lstat(&remote, &components).await?;
    if existing.as_ref().is_some_and(|s| s.kind == Kind::Directory) {
        return Err(conflict(
            ErrorCode::IsADirectory,
            format!("{} is a directory", shown(&components)),
        ));
    }
    // Versions are those GET shows: of what a symlink points to.
    let current = stat(&remote, &components).await?;
    check_preconditions(&ctx.headers, current.as_ref().map(Stat::etag).as_deref())?;
    let mode = current.as_ref().map_or(NEW_FILE_MODE, |s| s.mode);
    let parent = remote.absolute(&components[..components.len() - 1]);
    let temp = format!(
        "{}/.devpocket-upload-{}",
        parent.trim_end_matches('/'),
        uuid::Uuid::new_v4().simple()
    );
    let handle = remote
        .create_new(&temp, mode)
        .await
        .map_err(|e| fs_error(e, &components))?;
    // Removes the temporary file if this future is dropped (the client went away).
    let mut remover = remote.remover();
    remover.arm(temp.clone());
    let written = receive(&remote, &handle, body, limit, idle, &components).await;
    let closed = remote.close(&handle).await;
    let outcome = match (written, closed) {
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(fs_error(e, &components)),
        (Ok(size), Ok(())) => {
            async {
                // The precondition again, just before the rename: a write that raced this upload.
                if ctx.headers.contains_key(header::IF_MATCH)
                    || ctx.headers.contains_key(header::IF_NONE_MATCH)
                {
                    let now = stat(&remote, &components).await?;
                    check_preconditions(&ctx.headers, now.as_ref().map(Stat::etag).as_deref())?;
                }
                remote
                    .replace(&temp, &target)
                    .await
                    .map_err(|e| fs_error(e, &components))?;
                Ok(size)
            }
            .await
        }
    };
    let size = match outcome {
        Ok(size) => {
            remover.disarm();
            size
        }
        Err(e) => {
            // Removed before answering, so the client never sees a partial file.
            if remote.remove_file(&temp).await.is_ok() {
                remover.disarm();
            }
            return Err(e);
        }
    };
    let stat = stat(&remote, &components)
        .await?
        .ok_or_else(|| fs_error(FsError::NotFound, &components))?;
    let created = current.is_none();
    audit(
        app,
        ctx,
        &env,
        "file_written",
        json!({ "environment_id": env.id, "path": components.join("/"), "size": size, "created": created }),
    )
    .await;
    let entry = FileEntry::new(&components, name, &stat);
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut resp = json(status, &entry);
    set(&mut resp, header::ETAG, &stat.etag());
    Ok(resp)
}

/// The upload's bytes into the open temporary file; its size.
async fn receive(
    remote: &Remote,
    handle: &str,
    body: &mut Incoming,
    limit: u64,
    idle: Duration,
    components: &[String],
) -> ApiResult<u64> {
    let mut writer = remote.writer(handle.to_string());
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                let mut err = ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    ErrorCode::BodyTimeout,
                    format!(
                        "The upload stalled: nothing arrived for {} seconds",
                        idle.as_secs()
                    ),
                );
                err.headers
                    .push((header::CONNECTION, HeaderValue::from_static("close")));
                return Err(err);
            }
            Ok(None) => break,
            Ok(Some(Err(_))) => {
                return Err(ApiError::bad_request(
                    ErrorCode::BadBody,
                    "The upload could not be read",
                ));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if writer.len() + data.len() as u64 > limit {
            return Err(too_large(limit));
        }
        writer
            .push(&data)
            .await
            .map_err(|e| fs_error(e, components))?;
    }
    let size = writer.len();
    writer.finish().await.map_err(|e| fs_error(e, components))?;
    Ok(size)
}

/// POST mkdir: `{path, parents?}` → 201 FileEntry.
pub async fn mkdir(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let request: MkdirRequest = ctx.json()?;
    let env = owned(&app, &ctx).await?;
    let path = given(Some(&request.path))?;
    let (remote, _slot) = connect(&app, &env).await?;
    let components = resolve(&remote, path)?;
    if let Some(existing) = lstat(&remote, &components).await? {
        if request.parents && existing.kind == Kind::Directory {
            return Ok(json(StatusCode::OK, &FileEntry::at(&components, &existing)));
        }
        return Err(conflict(
            ErrorCode::FileExists,
            format!("{} already exists", shown(&components)),
        ));
    }
    let first_new = if request.parents {
        let mut first = components.len() - 1;
        while first > 0 && lstat(&remote, &components[..first]).await?.is_none() {
            first -= 1;
        }
        first + 1
    } else {
        check_parent(&remote, &components).await?;
        components.len()
    };
    for end in first_new..=components.len() {
        remote
            .mkdir(&remote.absolute(&components[..end]))
            .await
            .map_err(|e| fs_error(e, &components[..end]))?;
    }
    let stat = stat(&remote, &components)
        .await?
        .ok_or_else(|| fs_error(FsError::NotFound, &components))?;
    audit(
        &app,
        &ctx,
        &env,
        "directory_created",
        json!({ "environment_id": env.id, "path": components.join("/") }),
    )
    .await;
    Ok(json(
        StatusCode::CREATED,
        &FileEntry::at(&components, &stat),
    ))
}

/// POST move: `{from, to}` → 200 FileEntry of `to`; `to` must not exist.
pub async fn move_file(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let request: MoveRequest = ctx.json()?;
    let env = owned(&app, &ctx).await?;
    let from = given(Some(&request.from))?;
    let to = given(Some(&request.to))?;
    let (remote, _slot) = connect(&app, &env).await?;
    let from = resolve(&remote, from)?;
    let to = resolve(&remote, to)?;
    if from.is_empty() || to.is_empty() {
        return Err(invalid_path("The home itself cannot be moved or replaced"));
    }
    if lstat(&remote, &from).await?.is_none() {
        return Err(fs_error(FsError::NotFound, &from));
    }
    if lstat(&remote, &to).await?.is_some() {
        return Err(conflict(
            ErrorCode::FileExists,
            format!("{} already exists", shown(&to)),
        ));
    }
    check_parent(&remote, &to).await?;
    // SFTP's rename never replaces: a `to` created meanwhile makes it fail, not vanish.
    remote
        .rename(&remote.absolute(&from), &remote.absolute(&to))
        .await
        .map_err(|e| fs_error(e, &from))?;
    let stat = lstat(&remote, &to)
        .await?
        .ok_or_else(|| fs_error(FsError::NotFound, &to))?;
    audit(
        &app,
        &ctx,
        &env,
        "file_moved",
        json!({ "environment_id": env.id, "from": from.join("/"), "to": to.join("/") }),
    )
    .await;
    Ok(json(StatusCode::OK, &FileEntry::at(&to, &stat)))
}

/// DELETE: a file, a symlink or an empty directory.
pub async fn delete(app: AppState, ctx: Ctx) -> ApiResult<Response<Body>> {
    let query: FileQuery = ctx.query()?;
    let env = owned(&app, &ctx).await?;
    let path = given(query.path.as_deref())?;
    let (remote, _slot) = connect(&app, &env).await?;
    let components = resolve(&remote, path)?;
    if components.is_empty() {
        return Err(invalid_path("The home itself cannot be deleted"));
    }
    let Some(found) = lstat(&remote, &components).await? else {
        return Err(fs_error(FsError::NotFound, &components));
    };
    if ctx.headers.contains_key(header::IF_MATCH) {
        let current = stat(&remote, &components).await?;
        check_preconditions(&ctx.headers, current.as_ref().map(Stat::etag).as_deref())?;
    }
    let absolute = remote.absolute(&components);
    if found.kind == Kind::Directory {
        if let Err(e) = remote.remove_dir(&absolute).await {
            let has_entries =
                matches!(remote.list(&absolute, 1).await, Ok((entries, _)) if !entries.is_empty());
            return Err(if has_entries {
                conflict(
                    ErrorCode::DirectoryNotEmpty,
                    format!("{} is not empty", shown(&components)),
                )
            } else {
                fs_error(e, &components)
            });
        }
    } else {
        remote
            .remove_file(&absolute)
            .await
            .map_err(|e| fs_error(e, &components))?;
    }
    audit(
        &app,
        &ctx,
        &env,
        "file_deleted",
        json!({ "environment_id": env.id, "path": components.join("/"), "type": found.kind }),
    )
    .await;
    Ok(json(
        StatusCode::OK,
        &json!({ "message": format!("Deleted {}", components.join("/")) }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(parts: &[&str]) -> GivenPath {
        GivenPath::Relative(parts.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn paths_normalise_and_stay_home() {
        assert_eq!(parse_path(""), Ok(rel(&[])));
        assert_eq!(parse_path("a/./b//c/"), Ok(rel(&["a", "b", "c"])));
        assert_eq!(parse_path("a/../b"), Ok(rel(&["b"])));
        assert!(parse_path("..").is_err());
        assert!(parse_path("a/../../etc/passwd").is_err());
        assert!(parse_path("a\0b").is_err());
        assert!(parse_path(&"x".repeat(MAX_PATH_BYTES + 1)).is_err());
        let home = "/var/lib/ws/abc";
        let abs = |p: &str| inside_home(parse_path(p).expect("syntax"), home);
        assert_eq!(
            abs("/var/lib/ws/abc/src/main.rs"),
            Ok(vec!["src".into(), "main.rs".into()])
        );
        assert_eq!(abs("/var/lib/ws/abc"), Ok(vec![]));
        assert!(abs("/var/lib/ws/abcd/x").is_err());
        assert!(abs("/etc/passwd").is_err());
        assert!(abs("/var/lib/ws/abc/../other").is_err());
        assert!(abs("/../../var/lib/ws/abc/x").is_ok());
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(parse_range(None, 10), Ranged::Whole);
        assert_eq!(parse_range(Some("bytes=0-3"), 10), Ranged::Part(0, 4));
        assert_eq!(parse_range(Some("bytes=5-"), 10), Ranged::Part(5, 5));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ranged::Part(7, 3));
        assert_eq!(parse_range(Some("bytes=-30"), 10), Ranged::Part(0, 10));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), Ranged::Part(8, 2));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Ranged::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), Ranged::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), Ranged::Whole);
        assert_eq!(parse_range(Some("bytes=4-2"), 10), Ranged::Whole);
        assert_eq!(parse_range(Some("items=0-1"), 10), Ranged::Whole);
        assert_eq!(parse_range(Some("bytes=x-1"), 10), Ranged::Whole);
    }

    #[test]
    fn etags_compare_strongly_for_if_match() {
        assert!(etag_matches("\"a\"", Some("\"a\""), false));
        assert!(etag_matches("\"b\", \"a\"", Some("\"a\""), false));
        assert!(etag_matches("*", Some("\"a\""), false));
        assert!(!etag_matches("*", None, false));
        assert!(!etag_matches("W/\"a\"", Some("\"a\""), false));
        assert!(etag_matches("W/\"a\"", Some("\"a\""), true));
        assert!(!etag_matches("\"b\"", Some("\"a\""), false));
    }

    #[test]
    fn download_names_are_encoded() {
        assert_eq!(
            disposition("a b\"ü.txt"),
            "attachment; filename*=UTF-8''a%20b%22%C3%BC.txt"
        );
    }
}
