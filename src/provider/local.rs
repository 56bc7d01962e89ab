//! The local provider, the embedded default: each environment is a workspace directory under
//! `local.workspaces_dir`, reached through an SSH server this process runs on loopback (real SSH,
//! so the terminal path is the same as for a VPS).
//!
//! Sandboxing (see README, "Environments and providers"): run as root, every environment gets an
//! unprivileged OS account of its own (`dp-` + 12 hex digits of its id, home = its workspace,
//! mode 0700), created on first start and removed on delete; its shells run as that account with
//! a clean login environment, default signal dispositions, bounded processes (RLIMIT_NPROC of the
//! account) and bounded memory per process (RLIMIT_DATA), and their tmux server is the account's
//! own (socket under `<workspaces_dir>/.tmux/<account>`). Stop kills every process of the
//! account. The network is not separated: environments reach whatever listens on loopback.
//!
//! Without root there are no accounts to separate: the provider then serves a single DevPocket
//! account, unless `local.shared_account` is set (everything then runs as the server's user).

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use russh::keys::{PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};

use super::sandbox::{self, Account};
use super::{
    Capabilities, HostKey, InstallPlan, InstanceSpec, InstanceState, Provider, ProviderError,
    Region, Size, SnapshotInfo,
};
use crate::config::{LocalConfig, ProviderKind};
use crate::ssh::keys;
use crate::ssh::server::{Authorizer, LocalSshServer, SessionSpec};

pub const REGION: &str = "local";
pub const SIZE: &str = "local";
const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";
/// Snapshots kept per environment (each is a full copy of the workspace).
const MAX_SNAPSHOTS: usize = 5;
/// Who may use the provider without root and without `shared_account` (a DevPocket user id).
const OWNER_FILE: &str = "owner";
/// Longest path a Unix socket takes (`sun_path`, including its NUL).
const SOCKET_PATH_MAX: usize = 107;
/// Channels of a shared connection kept free for short-lived ones (see
/// `ssh_holders_per_connection`): at most one per holder is open at once, and holders open them
/// rarely and briefly, so a few suffice; a channel refused for lack of room is retried by its
/// holder like any other failed command.
const SHORT_CHANNEL_ROOM: usize = 4;

/// How environments are kept apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Root: one OS account per environment.
    Accounts,
    /// Not root: everything runs as this user, for one DevPocket account only.
    Single,
    /// Not root, `local.shared_account = true`: everything runs as this user, for everyone.
    Shared,
}

#[derive(Clone)]
struct LocalEnv {
    key: PublicKey,
    workspace: PathBuf,
    env: Vec<(String, String)>,
    stopped: bool,
    account: Option<Account>,
}

/// Which key opens which workspace. Shared with the SSH server; the lock is never held across
/// an `.await`.
#[derive(Default, Clone)]
struct Registry(Arc<RwLock<HashMap<String, LocalEnv>>>);

impl Registry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, LocalEnv>> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, LocalEnv>> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}

struct KeyAuthorizer {
    registry: Registry,
    shell: PathBuf,
    /// Prefix of every program (`prlimit ... --`; empty without limits).
    wrapper: Vec<OsString>,
}

impl Authorizer for KeyAuthorizer {
    fn authorize(&self, _user: &str, key: &PublicKey) -> Option<SessionSpec> {
        let registry = self.registry.read();
        let env = registry
            .values()
            .find(|e| !e.stopped && e.key.key_data() == key.key_data())?;
        Some(SessionSpec {
            workdir: env.workspace.clone(),
            env: env.env.clone(),
            shell: self.shell.clone(),
            account: env.account.map(|a| (a.uid, a.gid)),
            wrapper: self.wrapper.clone(),
        })
    }
}

#[derive(Serialize, Deserialize)]
struct SnapshotMeta {
    id: String,
    name: String,
    created_at: DateTime<Utc>,
}

pub struct LocalProvider {
    root: PathBuf,
    mode: Mode,
    shell: PathBuf,
    addr: SocketAddr,
    server: tokio::sync::Mutex<Option<LocalSshServer>>,
    host_key: PublicKey,
    registry: Registry,
}

/// Create `dir` if needed and give it `mode` (it is ours: the provider made it).
fn private_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// The data dir 0700 and the files in it 0600 (the database, its `-wal`/`-shm`, keys): nothing
/// in it is for environments. SQLite creates `-wal`/`-shm` with the database file's mode.
fn harden_data_dir(data_dir: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))?;
    for entry in std::fs::read_dir(data_dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let mode = if kind.is_dir() {
            0o700
        } else if kind.is_file() {
            0o600
        } else {
            continue;
        };
        std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Every directory above `dir` must let other users through (execute for "other"), or no
/// account can reach its home.
fn check_traversable(dir: &Path) -> anyhow::Result<()> {
    let dir = std::fs::canonicalize(dir)?;
    for ancestor in dir.ancestors().skip(1) {
        let mode = std::fs::metadata(ancestor)?.permissions().mode();
        if mode & 0o001 == 0 {
            anyhow::bail!(
                "local.workspaces_dir {}: {} is not searchable by other users (mode {:o}); environment accounts could not reach their homes: choose another directory or chmod o+x it",
                dir.display(),
                ancestor.display(),
                mode & 0o7777
            );
        }
    }
    Ok(())
}

/// The program prefix of every session: the limits (`prlimit ... --`), or nothing without limits.
/// (Default signal dispositions come from the SSH server itself, for every program it runs.)
fn wrapper(config: &LocalConfig, mode: Mode) -> anyhow::Result<Vec<OsString>> {
    let mut argv: Vec<OsString> = Vec::new();
    let mut limits: Vec<OsString> = Vec::new();
    // RLIMIT_NPROC counts every process of the real uid: only an account of its own makes it a
    // per-environment bound (for the server's own user it would count the server's threads).
    if mode == Mode::Accounts {
        limits.push(format!("--nproc={}", config.max_processes).into());
    }
    if config.max_memory_mb > 0 {
        limits.push(format!("--data={}", config.max_memory_mb * 1024 * 1024).into());
    }
    if !limits.is_empty() {
        let prlimit = sandbox::find_tool("prlimit").context("prlimit (util-linux) is required")?;
        argv.push(prlimit.into());
        argv.extend(limits);
        argv.push("--".into());
    }
    Ok(argv)
}

impl LocalProvider {
    /// Prepare the workspaces root and start the loopback SSH server (its host key lives in the
    /// data dir, mode 0600).
    pub async fn start(data_dir: &Path, config: &LocalConfig) -> anyhow::Result<Self> {
        let is_root = sandbox::running_as_root();
        let mode = match (is_root, config.shared_account) {
            (true, _) => Mode::Accounts,
            (false, false) => Mode::Single,
            (false, true) => Mode::Shared,
        };
        let root = config.workspaces_root(is_root);
        if root.starts_with(data_dir) {
            anyhow::bail!("local.workspaces_dir must be outside the data dir");
        }
        harden_data_dir(data_dir).context("restricting the data dir")?;
        let legacy = data_dir.join("workspaces");
        // Workspaces of earlier versions lived in the data dir; move them out once.
        if legacy.is_dir() && !root.exists() {
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)?;
            }
            if let Err(e) = std::fs::rename(&legacy, &root) {
                tracing::warn!(from = %legacy.display(), to = %root.display(), error = %e, "could not move the old workspaces; move them by hand");
            }
        }
        match mode {
            Mode::Accounts => {
                // Accounts pass through the root to their homes, and see nothing else in it.
                private_dir(&root, 0o711)?;
                if let Err(e) = check_traversable(&root) {
                    tracing::error!(
                        error = format!("{e:#}"),
                        "local environments will not start"
                    );
                }
                for tool in ["useradd", "userdel", "pkill", "prlimit", "cp", "find"] {
                    sandbox::find_tool(tool).with_context(|| {
                        format!(
                            "{tool} is required to give local environments accounts of their own"
                        )
                    })?;
                }
            }
            Mode::Single | Mode::Shared => private_dir(&root, 0o700)?,
        }
        private_dir(&root.join(".state"), 0o700)?;
        private_dir(&root.join(".snapshots"), 0o711)?;
        private_dir(&root.join(".tmux"), 0o711)?;
        let tmux_socket_len = std::fs::canonicalize(&root)?.as_os_str().len() + 45;
        if tmux_socket_len > SOCKET_PATH_MAX {
            tracing::warn!(root = %root.display(), "local.workspaces_dir is too long for tmux sockets under it; choose a shorter path");
        }
        match mode {
            Mode::Accounts => {
                tracing::info!(root = %root.display(), "local provider: one OS account per environment")
            }
            Mode::Single => {
                tracing::warn!(root = %root.display(), "local provider without root: environments cannot get OS accounts of their own, so only ONE DevPocket account may have local environments (set local.shared_account = true to let several share this OS user, unsafely)")
            }
            Mode::Shared => {
                tracing::warn!(root = %root.display(), "!!! local.shared_account = true without root: EVERY DevPocket account's shells run as this server's OS user and can read the data dir (database, keys) and each other's workspaces; use it only on a single-user machine !!!")
            }
        }
        let host_key = load_or_create_host_key(data_dir)?;
        let public = host_key.public_key().clone();
        let registry = Registry::default();
        let authorizer = Arc::new(KeyAuthorizer {
            registry: registry.clone(),
            shell: config.shell.clone(),
            wrapper: wrapper(config, mode)?,
        });
        let bind = SocketAddr::from(([127, 0, 0, 1], config.ssh_port));
        let server = LocalSshServer::start_with_limit(
            bind,
            host_key,
            authorizer,
            config.max_ssh_connections,
        )
        .await?;
        tracing::warn!(addr = %server.addr, "local provider: SSH server for local environments (shells on THIS host) listening on loopback");
        Ok(Self {
            root,
            mode,
            shell: config.shell.clone(),
            addr: server.addr,
            server: tokio::sync::Mutex::new(Some(server)),
            host_key: public,
            registry,
        })
    }

    pub fn ssh_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The root of the workspaces.
    pub fn workspaces_dir(&self) -> &Path {
        &self.root
    }

    fn check_id(id: &str) -> Result<(), ProviderError> {
        // Ids are our UUIDs; refuse anything that could walk out of the root.
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(ProviderError::Internal(format!("bad environment id {id}")));
        }
        Ok(())
    }

    fn workspace(&self, id: &str) -> Result<PathBuf, ProviderError> {
        Self::check_id(id)?;
        Ok(self.root.join(id))
    }

    fn stopped_marker(&self, id: &str) -> PathBuf {
        self.root.join(".state").join(format!("{id}.stopped"))
    }

    fn snapshots_dir(&self, id: &str) -> PathBuf {
        self.root.join(".snapshots").join(id)
    }

    /// The directory tmux puts its socket in for this environment (`TMUX_TMPDIR`).
    fn tmux_dir(&self, id: &str) -> PathBuf {
        self.root.join(".tmux").join(sandbox::account_name(id))
    }

    fn account_of(&self, id: &str) -> Option<Account> {
        self.registry.read().get(id).and_then(|e| e.account)
    }

    /// Without root and without `shared_account`, the first DevPocket account to create a local
    /// environment is the only one served.
    async fn check_owner(&self, spec: &InstanceSpec) -> Result<(), ProviderError> {
        if self.mode != Mode::Single {
            return Ok(());
        }
        let path = self.root.join(".state").join(OWNER_FILE);
        let owner = spec.owner_id.clone();
        let claimed = blocking(move || match std::fs::read_to_string(&path) {
            Ok(existing) => Ok(existing.trim().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::write(&path, &owner)?;
                Ok(owner)
            }
            Err(e) => Err(e),
        })
        .await?;
        if claimed == spec.owner_id {
            Ok(())
        } else {
            Err(ProviderError::Rejected {
                status: 403,
                message: "this server runs the local provider without root, so it cannot give environments OS accounts of their own and serves one DevPocket account only (an operator may set local.shared_account = true)".into(),
            })
        }
    }

    /// The environment's account (root only), created if missing, and its workspace and tmux
    /// directory made and handed to it.
    async fn prepare(&self, id: &str) -> Result<Option<Account>, ProviderError> {
        let workspace = self.workspace(id)?;
        let tmux_dir = self.tmux_dir(id);
        let name = sandbox::account_name(id);
        let shell = self.shell.clone();
        let accounts = self.mode == Mode::Accounts;
        if accounts {
            let root = self.root.clone();
            blocking(move || check_traversable(&root).map_err(std::io::Error::other)).await?;
        }
        blocking(move || {
            let existed = workspace.is_dir();
            // Not recursive: a workspaces root that is gone is not silently made again.
            for dir in [&workspace, &tmux_dir] {
                match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                    _ => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?,
                }
            }
            if !accounts {
                return Ok(None);
            }
            let had_account = sandbox::lookup(&name)?.is_some();
            let account = sandbox::ensure_account(&name, &workspace, &shell)?;
            if existed && !had_account {
                // A workspace from before accounts (or restored by an operator): hand it over.
                sandbox::run_as(
                    None,
                    "chown",
                    &[
                        "-R".as_ref(),
                        format!("{}:{}", account.uid, account.gid).as_ref(),
                        workspace.as_os_str(),
                    ],
                )?;
            }
            for dir in [&workspace, &tmux_dir] {
                std::os::unix::fs::chown(dir, Some(account.uid), Some(account.gid))?;
            }
            Ok(Some(account))
        })
        .await
    }

    async fn register(&self, spec: &InstanceSpec) -> Result<(), ProviderError> {
        let key = keys::parse_public(&spec.ssh_public_key)
            .map_err(|e| ProviderError::Internal(format!("environment key: {e}")))?;
        let id = &spec.environment_id;
        let workspace = self.workspace(id)?;
        let account = self.prepare(id).await?;
        let user = match self.mode {
            Mode::Accounts => sandbox::account_name(id),
            Mode::Single | Mode::Shared => {
                std::env::var("USER").unwrap_or_else(|_| "devpocket".into())
            }
        };
        let mut env: Vec<(String, String)> = spec
            .environment_variables
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // After the environment's own variables: these say who and where the shell is.
        env.extend([
            ("HOME".into(), workspace.display().to_string()),
            ("USER".into(), user.clone()),
            ("LOGNAME".into(), user),
            (
                "TMUX_TMPDIR".into(),
                self.tmux_dir(id).display().to_string(),
            ),
            ("DEVPOCKET_ENVIRONMENT_ID".into(), id.clone()),
        ]);
        let stopped = self.stopped_marker(id).exists();
        self.registry.write().insert(
            id.clone(),
            LocalEnv {
                key,
                workspace,
                env,
                stopped,
                account,
            },
        );
        Ok(())
    }

    /// End everything the environment runs: every process of its account (its tmux server
    /// too), or without root every process carrying its id.
    async fn kill_all(&self, id: &str) -> Result<(), ProviderError> {
        Self::check_id(id)?;
        let account = match self.mode {
            Mode::Accounts => match self.account_of(id) {
                Some(account) => Some(account),
                None => {
                    let name = sandbox::account_name(id);
                    blocking(move || Ok(sandbox::lookup(&name)?.map(|(a, _)| a))).await?
                }
            },
            Mode::Single | Mode::Shared => None,
        };
        let id = id.to_string();
        let mode = self.mode;
        blocking(move || match (mode, account) {
            (Mode::Accounts, Some(account)) => sandbox::kill_uid(account.uid),
            (Mode::Accounts, None) => Ok(()),
            _ => sandbox::kill_marked(&id),
        })
        .await
    }

    fn set_stopped(&self, id: &str, stopped: bool) -> Result<(), ProviderError> {
        let marker = self.stopped_marker(id);
        let io = |e: std::io::Error| ProviderError::Internal(e.to_string());
        if stopped {
            std::fs::write(&marker, b"").map_err(io)?;
        } else if marker.exists() {
            std::fs::remove_file(&marker).map_err(io)?;
        }
        match self.registry.write().get_mut(id) {
            Some(env) => {
                env.stopped = stopped;
                Ok(())
            }
            None => Err(ProviderError::NotFound),
        }
    }
}

fn load_or_create_host_key(data_dir: &Path) -> anyhow::Result<PrivateKey> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(HOST_KEY_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        return keys::parse_private(&text);
    }
    let key = keys::generate_ed25519();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(keys::private_to_openssh(&key)?.as_bytes())?;
    Ok(key)
}

/// A shell script that runs the template's local steps, echoing progress markers the way the
/// cloud-init templates do. A failing step is reported and the rest still run; the script then
/// exits 2, which (as with cloud-init) means "done, with recoverable errors".
fn setup_script(steps: &[String]) -> String {
    let mut script = String::from("failed=0\necho \"devpocket-progress: 5 preparing workspace\"\n");
    let total = steps.len().max(1);
    for (i, step) in steps.iter().enumerate() {
        let percent = 10 + (i * 85) / total;
        script.push_str(&format!(
            "echo \"devpocket-progress: {percent} step {} of {}\"\necho {}\n( {} ) 2>&1 || {{ echo \"devpocket: step {} failed (exit $?)\"; failed=1; }}\n",
            i + 1,
            steps.len(),
            shell_quote(&format!("+ {step}")),
            step,
            i + 1,
        ));
    }
    script.push_str("echo \"devpocket-progress: 100 ready\"\n[ \"$failed\" = 0 ] || exit 2\n");
    format!("sh -c {}", shell_quote(&script))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, ProviderError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ProviderError::Internal(e.to_string()))?
        .map_err(|e| ProviderError::Internal(e.to_string()))
}

/// Copy the contents of `from` into the existing directory `to` with `cp -a`, as `account`: a
/// copy made with root's rights could follow links the environment planted.
fn copy_as(account: Option<Account>, from: &Path, to: &Path) -> std::io::Result<()> {
    let mut source = from.as_os_str().to_os_string();
    source.push("/.");
    sandbox::run_as(
        account,
        "cp",
        &[
            "-a".as_ref(),
            "--".as_ref(),
            source.as_os_str(),
            to.as_os_str(),
        ],
    )
}

#[async_trait]
impl Provider for LocalProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Local
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            resize: false,
            snapshots: true,
        }
    }

    fn default_region(&self) -> String {
        REGION.into()
    }

    fn default_size(&self) -> String {
        SIZE.into()
    }

    fn sizes(&self) -> Vec<Size> {
        let vcpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let memory_mb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map_or(0, |kb| kb / 1024);
        vec![Size {
            slug: SIZE.into(),
            name: "This host (shared)".into(),
            vcpus,
            memory_mb,
            disk_gb: 0,
            price_monthly: 0.0,
            tier: "local".into(),
        }]
    }

    async fn regions(&self) -> Result<Vec<Region>, ProviderError> {
        Ok(vec![Region {
            slug: REGION.into(),
            name: "This host".into(),
            available: true,
            features: vec!["workspaces".into(), "ssh".into()],
        }])
    }

    fn ssh_user(&self) -> String {
        "dev".into()
    }

    fn new_host_key(&self) -> Result<HostKey, ProviderError> {
        Ok(HostKey {
            public: keys::public_to_openssh(&self.host_key),
            private: None,
        })
    }

    fn ssh_endpoint(&self, _ip: &str) -> (String, u16) {
        ("127.0.0.1".into(), self.addr.port())
    }

    fn install_plan(&self, local_setup: &[String]) -> InstallPlan {
        InstallPlan {
            log_command: setup_script(local_setup),
            status_command: None,
        }
    }

    /// The local SSH server takes [`crate::ssh::server::MAX_CHANNELS_PER_CONNECTION`] channels
    /// per connection (it has no `MaxSessions` of OpenSSH's 10); [`SHORT_CHANNEL_ROOM`] of them
    /// stay free for the short channels holders open now and then (a terminal's `command -v
    /// tmux`, a metrics sample, a preview's forward). Fewer connections per environment: each
    /// costs this process ~150–200 KiB (the client and the server side, russh's buffers).
    fn ssh_holders_per_connection(&self, _configured: usize) -> usize {
        crate::ssh::server::MAX_CHANNELS_PER_CONNECTION - SHORT_CHANNEL_ROOM
    }

    fn metrics_command(&self) -> &'static str {
        match self.mode {
            Mode::Accounts => ACCOUNT_METRICS_COMMAND,
            Mode::Single | Mode::Shared => crate::actors::environment::metrics::COMMAND,
        }
    }

    async fn shutdown(&self) {
        if let Some(server) = self.server.lock().await.take() {
            server.stop().await;
        }
    }

    async fn attach(&self, spec: &InstanceSpec) -> Result<(), ProviderError> {
        if !self.workspace(&spec.environment_id)?.is_dir() {
            return Ok(());
        }
        if let Err(e) = self.check_owner(spec).await {
            tracing::warn!(environment = %spec.environment_id, error = %e, "local environment not served");
            return Ok(());
        }
        self.register(spec).await
    }

    async fn find_instance(&self, spec: &InstanceSpec) -> Result<Option<String>, ProviderError> {
        let exists = self.workspace(&spec.environment_id)?.is_dir();
        if exists {
            self.check_owner(spec).await?;
            self.register(spec).await?;
        }
        Ok(exists.then(|| spec.environment_id.clone()))
    }

    async fn create_instance(&self, spec: &InstanceSpec) -> Result<String, ProviderError> {
        self.check_owner(spec).await?;
        self.register(spec).await?;
        Ok(spec.environment_id.clone())
    }

    async fn instance_state(&self, instance_id: &str) -> Result<InstanceState, ProviderError> {
        if !self.workspace(instance_id)?.is_dir() {
            return Ok(InstanceState::Gone);
        }
        Ok(match self.registry.read().get(instance_id) {
            Some(env) if env.stopped => InstanceState::Stopped,
            Some(_) => InstanceState::Running {
                ip: "127.0.0.1".into(),
            },
            None => InstanceState::Pending {
                detail: "workspace not attached".into(),
            },
        })
    }

    async fn start(&self, instance_id: &str) -> Result<(), ProviderError> {
        self.set_stopped(instance_id, false)
    }

    async fn stop(&self, instance_id: &str) -> Result<(), ProviderError> {
        // Refuse new sessions first, then end what runs (tmux server included).
        self.set_stopped(instance_id, true)?;
        self.kill_all(instance_id).await
    }

    async fn restart(&self, instance_id: &str) -> Result<(), ProviderError> {
        self.set_stopped(instance_id, true)?;
        self.kill_all(instance_id).await?;
        self.set_stopped(instance_id, false)
    }

    async fn delete(&self, instance_id: &str) -> Result<(), ProviderError> {
        let workspace = self.workspace(instance_id)?;
        let snapshots = self.snapshots_dir(instance_id);
        let tmux_dir = self.tmux_dir(instance_id);
        let marker = self.stopped_marker(instance_id);
        // No new sessions, then nothing running, then no account, then no files.
        if let Some(env) = self.registry.write().get_mut(instance_id) {
            env.stopped = true;
        }
        self.kill_all(instance_id).await?;
        self.registry.write().remove(instance_id);
        let name = (self.mode == Mode::Accounts).then(|| sandbox::account_name(instance_id));
        blocking(move || {
            if let Some(name) = name {
                sandbox::remove_account(&name)?;
            }
            for dir in [&workspace, &snapshots, &tmux_dir] {
                if dir.exists() {
                    std::fs::remove_dir_all(dir)?;
                }
            }
            if marker.exists() {
                std::fs::remove_file(marker)?;
            }
            Ok(())
        })
        .await
    }

    async fn create_snapshot(
        &self,
        instance_id: &str,
        name: &str,
    ) -> Result<SnapshotInfo, ProviderError> {
        let existing = self.list_snapshots(instance_id).await?;
        if existing.len() >= MAX_SNAPSHOTS {
            return Err(ProviderError::Rejected {
                status: 402,
                message: format!("at most {MAX_SNAPSHOTS} snapshots per local environment"),
            });
        }
        let workspace = self.workspace(instance_id)?;
        let meta = SnapshotMeta {
            id: format!("snap-{}", uuid::Uuid::new_v4().simple()),
            name: name.to_string(),
            created_at: Utc::now(),
        };
        let dir = self.snapshots_dir(instance_id).join(&meta.id);
        let json = serde_json::to_vec(&meta).map_err(|e| ProviderError::Internal(e.to_string()))?;
        let account = self.account_of(instance_id);
        let target = dir.clone();
        blocking(move || {
            // <snapshots>/<env>/<snap> and its meta.json are the server's; only files/ is the
            // account's (it is a copy of what the account could read anyway).
            private_dir(&target, 0o711)?;
            let files = target.join("files");
            private_dir(&files, 0o700)?;
            if let Some(account) = account {
                std::os::unix::fs::chown(&files, Some(account.uid), Some(account.gid))?;
            }
            copy_as(account, &workspace, &files)?;
            std::fs::write(target.join("meta.json"), json)
        })
        .await?;
        Ok(SnapshotInfo {
            id: meta.id,
            name: meta.name,
            description: None,
            created_at: meta.created_at,
        })
    }

    async fn list_snapshots(&self, instance_id: &str) -> Result<Vec<SnapshotInfo>, ProviderError> {
        Self::check_id(instance_id)?;
        let dir = self.snapshots_dir(instance_id);
        let mut list = blocking(move || {
            let mut out = Vec::new();
            if !dir.is_dir() {
                return Ok(out);
            }
            for entry in std::fs::read_dir(&dir)? {
                let Ok(meta) = std::fs::read(entry?.path().join("meta.json")) else {
                    continue; // being written, or a failed copy
                };
                if let Ok(meta) = serde_json::from_slice::<SnapshotMeta>(&meta) {
                    out.push(meta);
                }
            }
            Ok(out)
        })
        .await?;
        list.sort_by_key(|m| m.created_at);
        Ok(list
            .into_iter()
            .map(|m| SnapshotInfo {
                id: m.id,
                name: m.name,
                description: None,
                created_at: m.created_at,
            })
            .collect())
    }

    async fn restore_snapshot(
        &self,
        instance_id: &str,
        snapshot_id: &str,
    ) -> Result<(), ProviderError> {
        if !snapshot_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(ProviderError::NotFound);
        }
        let source = self
            .snapshots_dir(instance_id)
            .join(snapshot_id)
            .join("files");
        if !source.is_dir() {
            return Err(ProviderError::NotFound);
        }
        let workspace = self.workspace(instance_id)?;
        let account = self.account_of(instance_id);
        blocking(move || {
            // Emptied and refilled by the account itself: the workspace directory stays its.
            sandbox::run_as(
                account,
                "find",
                &[
                    workspace.as_os_str(),
                    "-mindepth".as_ref(),
                    "1".as_ref(),
                    "-delete".as_ref(),
                ],
            )?;
            copy_as(account, &source, &workspace)
        })
        .await
    }
}

/// Metrics of an environment that has an account of its own, in the tagged lines
/// [`crate::actors::environment::metrics::parse`] reads: CPU as the account's share of the
/// host's CPU time over one second (`cpu` lines whose "busy" is the account's ticks), memory as
/// the account's resident memory against the host's, disk as the workspace's size against its
/// file system; network and uptime stay host-wide.
const ACCOUNT_METRICS_COMMAND: &str = r#"sh -c 'own() { cat $(ps -o pid= -U "$(id -u)" | awk "{print \"/proc/\" \$1 \"/stat\"}") 2>/dev/null | awk "{sub(/.*\) /, \"\"); t += \$12 + \$13} END {print t+0}"; }; tot() { head -n1 /proc/stat | awk "{s=0; for (i=2;i<=NF;i++) s+=\$i; print s}"; }; o1=$(own); t1=$(tot); sleep 1; o2=$(own); t2=$(tot); d=$((o2 - o1)); T=$((t2 - t1)); [ "$d" -lt 0 ] && d=0; [ "$d" -gt "$T" ] && d=$T; echo "cpu1 cpu 0 0 0 0"; echo "cpu2 cpu $d 0 0 $((T - d))"; rss=$(ps -o rss= -U "$(id -u)" | awk "{s+=\$1} END {print s+0}"); awk -v rss="$rss" "/^MemTotal:/ {print \"mem MemTotal: \" \$2; print \"mem MemAvailable: \" (\$2 - rss)}" /proc/meminfo; echo "disk $(df -Pk "$HOME" | awk "NR==2 {print \$2}") $(du -sk "$HOME" 2>/dev/null | awk "{print \$1}")"; awk "NR>2 {gsub(\":\", \" \"); if (\$1 != \"lo\") {rx += \$2; tx += \$10}} END {print \"net \" rx+0 \" \" tx+0}" /proc/net/dev; awk "{print \"uptime \" \$1}" /proc/uptime'"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_run_under_the_limits() {
        let mut config = crate::config::Config::defaults().local;
        config.max_processes = 100;
        config.max_memory_mb = 64;
        let argv = |config: &LocalConfig, mode| {
            wrapper(config, mode)
                .expect("tools")
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        };
        let accounts = argv(&config, Mode::Accounts);
        assert!(accounts[0].ends_with("/prlimit"), "{accounts:?}");
        assert_eq!(
            &accounts[1..],
            ["--nproc=100", "--data=67108864", "--"],
            "{accounts:?}"
        );
        // Without an account of its own, RLIMIT_NPROC would count the server's threads.
        let single = argv(&config, Mode::Single);
        assert!(
            !single.iter().any(|a| a.starts_with("--nproc")),
            "{single:?}"
        );
        assert!(
            single.contains(&"--data=67108864".to_string()),
            "{single:?}"
        );
        // The prefix really runs a program under the limits.
        let mut command = std::process::Command::new(&accounts[0]);
        command.args(&accounts[1..]).args(["sh", "-c", "ulimit -d"]);
        let out = command.output().expect("runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "65536");
        // No limits, no prefix: the shell runs directly.
        config.max_memory_mb = 0;
        assert!(argv(&config, Mode::Single).is_empty());
    }

    #[test]
    fn the_account_metrics_command_runs_here() {
        let script = ACCOUNT_METRICS_COMMAND
            .trim_start_matches("sh -c '")
            .trim_end_matches('\'');
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("HOME", env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("sh");
        let text = String::from_utf8_lossy(&out.stdout);
        let sample =
            crate::actors::environment::metrics::parse(&text, Utc::now()).expect("a sample");
        assert!((0.0..=100.0).contains(&sample.cpu_usage), "{text}");
        assert!(
            sample.memory_usage > 0.0 && sample.memory_usage <= 100.0,
            "{text}"
        );
        // The workspace's share of its file system may round to 0 %: look at the raw line.
        let used: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("disk "))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .expect("disk line");
        assert!(used > 0, "{text}");
        assert!(sample.uptime > 0, "{text}");
    }

    #[test]
    fn setup_script_quotes_and_marks_progress() {
        let script = setup_script(&["echo 'it''s'".into(), "true".into()]);
        assert!(script.starts_with("sh -c '"));
        assert!(script.contains("devpocket-progress: 100 ready"));
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .expect("sh runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("devpocket-progress: 5 preparing workspace"),
            "{text}"
        );
        assert!(text.contains("+ echo 'it''s'"), "{text}");
        assert!(
            text.contains("devpocket-progress: 10 step 1 of 2"),
            "{text}"
        );
        assert_eq!(out.status.code(), Some(0));
        let failing = setup_script(&["false".into(), "echo still-runs".into()]);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&failing)
            .output()
            .expect("sh");
        assert_eq!(out.status.code(), Some(2), "done with recoverable errors");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("devpocket: step 1 failed (exit 1)"), "{text}");
        assert!(
            text.contains("still-runs") && text.contains("100 ready"),
            "{text}"
        );
    }
}
