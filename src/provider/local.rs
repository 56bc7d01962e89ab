//! The local provider, the embedded default: each environment is a workspace directory under the
//! data dir, reached through an SSH server this process runs on loopback (real SSH, so the terminal
//! path is the same as for a VPS). It gives shells ON THIS HOST, as the server's OS user, to every
//! account that has an environment: for development and single-user hosts only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use russh::keys::{PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};

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

#[derive(Clone)]
struct LocalEnv {
    key: PublicKey,
    workspace: PathBuf,
    env: Vec<(String, String)>,
    stopped: bool,
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
    addr: SocketAddr,
    server: tokio::sync::Mutex<Option<LocalSshServer>>,
    host_key: PublicKey,
    registry: Registry,
}

impl LocalProvider {
    /// Start the loopback SSH server (its host key lives in the data dir, mode 0600).
    pub async fn start(data_dir: &Path, config: &LocalConfig) -> anyhow::Result<Self> {
        let root = data_dir.join("workspaces");
        std::fs::create_dir_all(root.join(".state"))?;
        let host_key = load_or_create_host_key(data_dir)?;
        let public = host_key.public_key().clone();
        let registry = Registry::default();
        let authorizer = Arc::new(KeyAuthorizer {
            registry: registry.clone(),
            shell: config.shell.clone(),
        });
        let bind = SocketAddr::from(([127, 0, 0, 1], config.ssh_port));
        let server = LocalSshServer::start(bind, host_key, authorizer).await?;
        tracing::warn!(addr = %server.addr, "local provider: SSH server for local environments (shells on THIS host) listening on loopback");
        Ok(Self {
            root,
            addr: server.addr,
            server: tokio::sync::Mutex::new(Some(server)),
            host_key: public,
            registry,
        })
    }

    pub fn ssh_addr(&self) -> SocketAddr {
        self.addr
    }

    fn workspace(&self, id: &str) -> Result<PathBuf, ProviderError> {
        // Ids are our UUIDs; refuse anything that could walk out of the root.
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(ProviderError::Internal(format!("bad environment id {id}")));
        }
        Ok(self.root.join(id))
    }

    fn stopped_marker(&self, id: &str) -> PathBuf {
        self.root.join(".state").join(format!("{id}.stopped"))
    }

    fn snapshots_dir(&self, id: &str) -> PathBuf {
        self.root.join(".snapshots").join(id)
    }

    fn register(&self, spec: &InstanceSpec) -> Result<(), ProviderError> {
        let key = keys::parse_public(&spec.ssh_public_key)
            .map_err(|e| ProviderError::Internal(format!("environment key: {e}")))?;
        let workspace = self.workspace(&spec.environment_id)?;
        let mut env: Vec<(String, String)> = spec
            .environment_variables
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.push((
            "DEVPOCKET_ENVIRONMENT_ID".into(),
            spec.environment_id.clone(),
        ));
        let stopped = self.stopped_marker(&spec.environment_id).exists();
        self.registry.write().insert(
            spec.environment_id.clone(),
            LocalEnv {
                key,
                workspace,
                env,
                stopped,
            },
        );
        Ok(())
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

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else if kind.is_symlink() {
            let link = std::fs::read_link(entry.path())?;
            std::os::unix::fs::symlink(link, target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, ProviderError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ProviderError::Internal(e.to_string()))?
        .map_err(|e| ProviderError::Internal(e.to_string()))
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

    async fn shutdown(&self) {
        if let Some(server) = self.server.lock().await.take() {
            server.stop().await;
        }
    }

    async fn attach(&self, spec: &InstanceSpec) -> Result<(), ProviderError> {
        if self.workspace(&spec.environment_id)?.is_dir() {
            self.register(spec)?;
        }
        Ok(())
    }

    async fn find_instance(&self, spec: &InstanceSpec) -> Result<Option<String>, ProviderError> {
        let exists = self.workspace(&spec.environment_id)?.is_dir();
        if exists {
            self.register(spec)?;
        }
        Ok(exists.then(|| spec.environment_id.clone()))
    }

    async fn create_instance(&self, spec: &InstanceSpec) -> Result<String, ProviderError> {
        let workspace = self.workspace(&spec.environment_id)?;
        blocking(move || {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&workspace)
        })
        .await?;
        self.register(spec)?;
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
        self.set_stopped(instance_id, true)
    }

    async fn restart(&self, instance_id: &str) -> Result<(), ProviderError> {
        self.set_stopped(instance_id, false)
    }

    async fn delete(&self, instance_id: &str) -> Result<(), ProviderError> {
        let workspace = self.workspace(instance_id)?;
        let snapshots = self.snapshots_dir(instance_id);
        let marker = self.stopped_marker(instance_id);
        self.registry.write().remove(instance_id);
        blocking(move || {
            for dir in [&workspace, &snapshots] {
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
        let target = dir.clone();
        blocking(move || {
            copy_dir(&workspace, &target.join("files"))?;
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
        let dir = self.snapshots_dir(instance_id);
        let mut list = blocking(move || {
            let mut out = Vec::new();
            if !dir.is_dir() {
                return Ok(out);
            }
            for entry in std::fs::read_dir(&dir)? {
                let meta = std::fs::read(entry?.path().join("meta.json"))?;
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
        blocking(move || {
            if workspace.exists() {
                std::fs::remove_dir_all(&workspace)?;
            }
            copy_dir(&source, &workspace)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
