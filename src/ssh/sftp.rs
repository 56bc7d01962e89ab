//! The file API's transport: SFTP (the `russh-sftp` client) over a channel of the server's own SSH
//! client ([`SshClient::open_subsystem`]) to the environment's `sftp-server`, which runs as the
//! environment's account — OpenSSH's on a VPS, and on the local provider the same program started
//! by [`crate::ssh::server`] exactly like a shell (same uid/gid, clean environment, limits). So
//! every path is resolved and every permission checked by the operating system as that account:
//! a symlink in the workspace that points at the server's data directory is refused by the kernel,
//! not by a path check of ours.
//!
//! Paths handed to [`Remote`] are absolute (the home, as `sftp-server` reports it, joined with a
//! path the caller has normalised: see `crate::http::handlers::files`). Memory is bounded: reads
//! and writes are [`CHUNK`] bytes with at most [`READS_IN_FLIGHT`]/[`WRITES_IN_FLIGHT`] of them
//! outstanding, and a directory is read at most up to a caller-given number of entries.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::{FuturesOrdered, FuturesUnordered};
use russh_sftp::client::RawSftpSession;
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::protocol::{FileAttributes, OpenFlags, Packet, StatusCode};
use tokio::sync::mpsc;

use super::client::{SshClient, SshError, SshTarget};

/// Where distributions install OpenSSH's `sftp-server` (Debian/Ubuntu first: package
/// `openssh-sftp-server`).
pub const SFTP_SERVER_PATHS: &[&str] = &[
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
    "/usr/lib/ssh/sftp-server",
];

/// Bytes per SFTP read or write request: OpenSSH's own client uses 32 KiB, and every server
/// takes it (the protocol's floor for packets is 34000 bytes).
pub const CHUNK: usize = 32 * 1024;
/// Reads outstanding at once while a file is streamed out: enough to hide a round trip on a
/// remote VPS, and at most `READS_IN_FLIGHT × CHUNK` (256 KiB) held per download.
pub const READS_IN_FLIGHT: usize = 8;
/// Writes outstanding at once while an upload is streamed in (at most 256 KiB held per upload).
pub const WRITES_IN_FLIGHT: usize = 8;
/// Chunks of a download queued between the SFTP reader and the HTTP response (256 KiB).
pub const DOWNLOAD_QUEUE: usize = 8;

/// OpenSSH's `sftp-server`, if installed.
pub fn sftp_server_path() -> Option<PathBuf> {
    SFTP_SERVER_PATHS
        .iter()
        .map(Path::new)
        .find(|path| path.is_file())
        .map(Path::to_path_buf)
}

/// What can go wrong with a file operation, as the HTTP layer tells it apart.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("permission denied")]
    PermissionDenied,
    /// SFTP v3's catch-all (`SSH_FX_FAILURE`): the server gives no reason (a non-empty directory,
    /// a full disk, a rename onto something existing...).
    #[error("the environment refused the operation ({0})")]
    Failed(String),
    /// The environment cannot be reached, or the SFTP session broke or timed out.
    #[error("cannot reach the environment's files: {0}")]
    Unreachable(String),
}

impl From<SftpError> for FsError {
    fn from(e: SftpError) -> Self {
        match e {
            SftpError::Status(status) => match status.status_code {
                StatusCode::NoSuchFile => Self::NotFound,
                StatusCode::PermissionDenied => Self::PermissionDenied,
                StatusCode::Failure | StatusCode::OpUnsupported | StatusCode::Eof => {
                    Self::Failed(status.error_message)
                }
                _ => Self::Unreachable(format!("{}: {}", status.status_code, status.error_message)),
            },
            other => Self::Unreachable(other.to_string()),
        }
    }
}

impl From<SshError> for FsError {
    fn from(e: SshError) -> Self {
        Self::Unreachable(e.to_string())
    }
}

pub type FsResult<T> = Result<T, FsError>;

/// The kind of a directory entry (symlinks are not followed in listings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Directory,
    Symlink,
    Other,
}

/// What SFTP tells about a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub kind: Kind,
    /// Bytes (0 when the server does not say).
    pub size: u64,
    /// Permission bits (`0o7777` part of the mode).
    pub mode: u32,
    /// Last modification, whole seconds.
    pub modified: Option<DateTime<Utc>>,
}

impl From<&FileAttributes> for Stat {
    fn from(attrs: &FileAttributes) -> Self {
        let permissions = attrs.permissions.unwrap_or(0);
        let kind = match permissions & 0o170000 {
            0o040000 => Kind::Directory,
            0o100000 => Kind::File,
            0o120000 => Kind::Symlink,
            _ => Kind::Other,
        };
        Self {
            kind,
            size: attrs.size.unwrap_or(0),
            mode: permissions & 0o7777,
            modified: attrs
                .mtime
                .and_then(|t| DateTime::<Utc>::from_timestamp(i64::from(t), 0)),
        }
    }
}

impl Stat {
    /// An entity tag for `If-Match`: size and modification time. Two writes of the same size in
    /// the same second look alike (SFTP v3 gives neither inode nor sub-second times).
    pub fn etag(&self) -> String {
        let mtime = self.modified.map_or(0, |t| t.timestamp());
        format!("\"{:x}-{:x}\"", self.size, mtime)
    }
}

/// One SFTP session to one environment, as its account. Dropping it closes the channel and the
/// SSH connection (unless a clone of the client lives on).
pub struct Remote {
    client: SshClient,
    raw: Arc<RawSftpSession>,
    home: String,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("home", &self.home).finish()
    }
}

impl Remote {
    /// Connect (bounded by the target's connect timeout), start `sftp-server`, learn the home.
    /// Every later request waits at most `request_timeout` for its answer.
    pub async fn connect(target: &SshTarget, request_timeout: Duration) -> FsResult<Self> {
        let client = SshClient::connect(target).await?;
        let setup = async {
            let stream = client.open_subsystem("sftp").await?;
            let config = russh_sftp::client::Config {
                request_timeout_secs: request_timeout.as_secs().max(1),
                ..Default::default()
            };
            let raw = RawSftpSession::new_with_config(stream, config);
            raw.init().await?;
            let name = raw.realpath(".").await?;
            let home = name
                .files
                .first()
                .map(|f| f.filename.clone())
                .ok_or_else(|| FsError::Unreachable("sftp-server gave no home".into()))?;
            FsResult::Ok((raw, home))
        };
        let (raw, home) = tokio::time::timeout(target.connect_timeout, setup)
            .await
            .map_err(|_| FsError::Unreachable("timed out starting SFTP".into()))??;
        Ok(Self {
            client,
            raw: Arc::new(raw),
            home,
        })
    }

    /// The home (working directory of `sftp-server`), absolute, without a trailing slash unless
    /// it is `/`.
    pub fn home(&self) -> &str {
        &self.home
    }

    /// `home` joined with normalised components (none: the home itself).
    pub fn absolute(&self, components: &[String]) -> String {
        let mut out = self.home.trim_end_matches('/').to_string();
        for c in components {
            out.push('/');
            out.push_str(c);
        }
        if out.is_empty() {
            out.push('/');
        }
        out
    }

    /// Attributes, following symlinks (`None`: nothing there).
    pub async fn stat(&self, path: &str) -> FsResult<Option<Stat>> {
        missing_is_none(self.raw.stat(path).await.map(|a| Stat::from(&a.attrs)))
    }

    /// Attributes of the path itself (a symlink is a symlink).
    pub async fn lstat(&self, path: &str) -> FsResult<Option<Stat>> {
        missing_is_none(self.raw.lstat(path).await.map(|a| Stat::from(&a.attrs)))
    }

    /// Up to `max_entries` entries of a directory (without `.` and `..`), unsorted; `true` when
    /// the directory has more.
    pub async fn list(
        &self,
        path: &str,
        max_entries: usize,
    ) -> FsResult<(Vec<(String, Stat)>, bool)> {
        let handle = self.raw.opendir(path).await?.handle;
        let mut entries = Vec::new();
        let mut truncated = false;
        let result = loop {
            match self.raw.readdir(handle.as_str()).await {
                Ok(name) => {
                    for file in name.files {
                        if file.filename == "." || file.filename == ".." {
                            continue;
                        }
                        if entries.len() == max_entries {
                            truncated = true;
                            break;
                        }
                        let stat = Stat::from(&file.attrs);
                        entries.push((file.filename, stat));
                    }
                    if truncated {
                        break Ok(());
                    }
                }
                Err(SftpError::Status(s)) if s.status_code == StatusCode::Eof => break Ok(()),
                Err(e) => break Err(FsError::from(e)),
            }
        };
        let _ = self.raw.close(handle).await;
        result.map(|()| (entries, truncated))
    }

    pub async fn mkdir(&self, path: &str) -> FsResult<()> {
        self.raw.mkdir(path, FileAttributes::empty()).await?;
        Ok(())
    }

    /// Rename; fails if `to` exists (SFTP v3 semantics).
    pub async fn rename(&self, from: &str, to: &str) -> FsResult<()> {
        self.raw.rename(from, to).await?;
        Ok(())
    }

    /// Rename, atomically replacing `to` if it exists (`posix-rename@openssh.com`; OpenSSH's
    /// sftp-server has it). Without the extension: `Failed`.
    pub async fn replace(&self, from: &str, to: &str) -> FsResult<()> {
        let mut data = Vec::with_capacity(8 + from.len() + to.len());
        for s in [from, to] {
            let len =
                u32::try_from(s.len()).map_err(|_| FsError::Failed("path too long".into()))?;
            data.extend_from_slice(&len.to_be_bytes());
            data.extend_from_slice(s.as_bytes());
        }
        match self.raw.extended("posix-rename@openssh.com", data).await? {
            Packet::Status(s) if s.status_code == StatusCode::Ok => Ok(()),
            Packet::Status(s) => Err(SftpError::Status(s).into()),
            _ => Err(FsError::Unreachable(
                "unexpected answer to posix-rename".into(),
            )),
        }
    }

    pub async fn remove_file(&self, path: &str) -> FsResult<()> {
        self.raw.remove(path).await?;
        Ok(())
    }

    pub async fn remove_dir(&self, path: &str) -> FsResult<()> {
        self.raw.rmdir(path).await?;
        Ok(())
    }

    /// Open an existing file for reading; returns its handle and attributes (from the open
    /// handle, so they are the file's that is read).
    pub async fn open_read(&self, path: &str) -> FsResult<(String, Stat)> {
        let handle = self
            .raw
            .open(path, OpenFlags::READ, FileAttributes::empty())
            .await?
            .handle;
        match self.raw.fstat(handle.as_str()).await {
            Ok(attrs) => Ok((handle, Stat::from(&attrs.attrs))),
            Err(e) => {
                let _ = self.raw.close(handle).await;
                Err(e.into())
            }
        }
    }

    /// Create `path`, which must not exist, for writing, with permission bits `mode`.
    pub async fn create_new(&self, path: &str, mode: u32) -> FsResult<String> {
        let attrs = FileAttributes {
            permissions: Some(mode & 0o7777),
            ..FileAttributes::empty()
        };
        let flags = OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCLUDE;
        Ok(self.raw.open(path, flags, attrs).await?.handle)
    }

    /// Close a handle; for a written file this is where a late write error shows.
    pub async fn close(&self, handle: &str) -> FsResult<()> {
        self.raw.close(handle).await?;
        Ok(())
    }

    /// A writer for an open handle, from offset 0, with bounded writes in flight.
    pub fn writer(&self, handle: String) -> Writer {
        Writer {
            raw: self.raw.clone(),
            handle,
            offset: 0,
            pending: Vec::with_capacity(CHUNK),
            in_flight: FuturesUnordered::new(),
        }
    }

    /// Stream `len` bytes of an open file from `start` into `out`, then close the handle. Stops
    /// early when `out`'s receiver goes away (the client left) or takes nothing for `idle` (a
    /// client that stopped reading); a file that ends before
    /// `start + len` or a failing read is reported as an error item (so the response is cut,
    /// not completed short).
    pub async fn stream_file(
        self: Arc<Self>,
        handle: String,
        start: u64,
        len: u64,
        out: mpsc::Sender<std::io::Result<Bytes>>,
        idle: Duration,
    ) {
        let end = start.saturating_add(len);
        let mut next = start;
        let mut delivered = start;
        let mut in_flight = FuturesOrdered::new();
        while delivered < end {
            while in_flight.len() < READS_IN_FLIGHT && next < end {
                let n = u32::try_from((end - next).min(CHUNK as u64)).unwrap_or(CHUNK as u32);
                let (raw, h, offset) = (self.raw.clone(), handle.clone(), next);
                in_flight.push_back(async move { (n, raw.read(h, offset, n).await) });
                next += u64::from(n);
            }
            let Some((asked, result)) = in_flight.next().await else {
                break;
            };
            let failure = match result {
                Ok(data) if !data.data.is_empty() => {
                    let got = data.data.len() as u64;
                    delivered += got;
                    let sent = tokio::time::timeout(idle, out.send(Ok(Bytes::from(data.data))));
                    if !matches!(sent.await, Ok(Ok(()))) {
                        break;
                    }
                    if got < u64::from(asked) {
                        // A short read: what was asked after it starts at the wrong offset.
                        in_flight = FuturesOrdered::new();
                        next = delivered;
                    }
                    continue;
                }
                Ok(_) => "the file ended early".to_string(),
                Err(SftpError::Status(s)) if s.status_code == StatusCode::Eof => {
                    "the file ended early".to_string()
                }
                Err(e) => e.to_string(),
            };
            let _ = out.send(Err(std::io::Error::other(failure))).await;
            break;
        }
        drop(in_flight);
        let _ = self.raw.close(handle).await;
    }

    /// A handle that outlives this request's future: the temp file of an upload is removed by it
    /// even when the client goes away mid-upload (the handler's future is then dropped).
    pub fn remover(&self) -> Remover {
        Remover {
            client: self.client.clone(),
            raw: self.raw.clone(),
            path: None,
        }
    }
}

/// Removes a file when dropped (armed with [`Remover::arm`]), in a task of its own; disarm it
/// once the file has been renamed into place.
pub struct Remover {
    client: SshClient,
    raw: Arc<RawSftpSession>,
    path: Option<String>,
}

impl Remover {
    pub fn arm(&mut self, path: String) {
        self.path = Some(path);
    }

    pub fn disarm(&mut self) {
        self.path = None;
    }
}

impl Drop for Remover {
    fn drop(&mut self) {
        let Some(path) = self.path.take() else {
            return;
        };
        let (client, raw) = (self.client.clone(), self.raw.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = raw.remove(path.as_str()).await {
                    tracing::warn!(path, error = %e, "could not remove an unfinished upload");
                }
                drop(raw);
                drop(client);
            });
        }
    }
}

/// Writes a file sequentially: data is cut into [`CHUNK`]-byte writes, at most
/// [`WRITES_IN_FLIGHT`] outstanding; `push` waits when that many are.
pub struct Writer {
    raw: Arc<RawSftpSession>,
    handle: String,
    offset: u64,
    pending: Vec<u8>,
    in_flight: FuturesUnordered<futures_util::future::BoxFuture<'static, FsResult<()>>>,
}

impl Writer {
    /// Bytes accepted so far (written or on their way).
    pub fn len(&self) -> u64 {
        self.offset + self.pending.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub async fn push(&mut self, mut data: &[u8]) -> FsResult<()> {
        while !data.is_empty() {
            let room = CHUNK - self.pending.len();
            let take = room.min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == CHUNK {
                self.send_pending().await?;
            }
        }
        Ok(())
    }

    /// Send what is pending and wait for every write to be acknowledged.
    pub async fn finish(mut self) -> FsResult<()> {
        if !self.pending.is_empty() {
            self.send_pending().await?;
        }
        while let Some(result) = self.in_flight.next().await {
            result?;
        }
        Ok(())
    }

    async fn send_pending(&mut self) -> FsResult<()> {
        while self.in_flight.len() >= WRITES_IN_FLIGHT {
            if let Some(result) = self.in_flight.next().await {
                result?;
            }
        }
        let data = std::mem::replace(&mut self.pending, Vec::with_capacity(CHUNK));
        let len = data.len() as u64;
        let (raw, handle, offset) = (self.raw.clone(), self.handle.clone(), self.offset);
        self.in_flight.push(Box::pin(async move {
            raw.write(handle, offset, data).await?;
            Ok(())
        }));
        self.offset += len;
        Ok(())
    }
}

fn missing_is_none<T>(result: Result<T, SftpError>) -> FsResult<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) => match FsError::from(e) {
            FsError::NotFound => Ok(None),
            other => Err(other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_read_as_kinds_and_permissions() {
        let attrs = FileAttributes {
            size: Some(5),
            permissions: Some(0o100644),
            mtime: Some(1_700_000_000),
            ..FileAttributes::empty()
        };
        let stat = Stat::from(&attrs);
        assert_eq!(stat.kind, Kind::File);
        assert_eq!(stat.mode, 0o644);
        assert_eq!(stat.size, 5);
        assert_eq!(stat.etag(), "\"5-6553f100\"");
        let dir = FileAttributes {
            permissions: Some(0o040755),
            ..FileAttributes::empty()
        };
        assert_eq!(Stat::from(&dir).kind, Kind::Directory);
        let link = FileAttributes {
            permissions: Some(0o120777),
            ..FileAttributes::empty()
        };
        assert_eq!(Stat::from(&link).kind, Kind::Symlink);
    }
}
