//! Where environments run. One trait, two implementations chosen by `[provider] kind`:
//! [`contabo`] (cloud VPS through Contabo's API) and [`local`] (workspaces on this host behind the
//! process's own SSH server). The environment actor is the only caller.

pub mod contabo;
pub mod local;
pub mod sandbox;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::ProviderKind;

/// What the actor asks a provider to create.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    pub environment_id: String,
    /// The DevPocket user who owns the environment.
    pub owner_id: String,
    /// `devpocket-<environment id>`: how a lost instance is found again.
    pub display_name: String,
    /// Our id for this create attempt, stored before the call; sent as the request id.
    pub operation_id: String,
    pub region: String,
    pub size: String,
    /// Rendered cloud-init user-data.
    pub user_data: String,
    /// The environment's SSH public key (OpenSSH line) for the `dev` user.
    pub ssh_public_key: String,
    /// Variables for the environment's shells (cloud-init providers get them via user-data).
    pub environment_variables: std::collections::BTreeMap<String, String>,
}

/// An instance as the provider sees it, reduced to what the state machine needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceState {
    /// Still coming up (or blocked on the account); the detail says why.
    Pending {
        detail: String,
    },
    Running {
        ip: String,
    },
    Stopped,
    Failed {
        message: String,
    },
    /// The provider does not have it (any more).
    Gone,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Capabilities {
    pub resize: bool,
    pub snapshots: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Region {
    pub slug: String,
    pub name: String,
    pub available: bool,
    pub features: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Size {
    pub slug: String,
    pub name: String,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub disk_gb: u64,
    pub price_monthly: f64,
    pub tier: String,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// How the actor follows installation over SSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallPlan {
    /// Streams the installation log, one line per line of output.
    pub log_command: String,
    /// Waits for the installation to end; its exit status decides (0 done, 2 done with warnings,
    /// anything else failed). `None`: the log command's own exit status decides.
    pub status_command: Option<String>,
}

/// SSH credentials a new environment gets: the host key we will pin, and (for providers that
/// install it through cloud-init) its private half.
#[derive(Debug, Clone)]
pub struct HostKey {
    pub public: String,
    pub private: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// No answer: the request may or may not have taken effect (reconcile before repeating).
    #[error("no answer from the provider: {0}")]
    Ambiguous(String),
    /// The provider answered no; repeating the same request will not help.
    #[error("provider refused ({status}): {message}")]
    Rejected { status: u16, message: String },
    /// Temporarily unavailable (rate limits, 5xx, outages); try again later.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    #[error("not supported by this provider")]
    Unsupported,
    #[error("not found at the provider")]
    NotFound,
    #[error("{0}")]
    Internal(String),
}

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    fn kind(&self) -> ProviderKind;
    fn capabilities(&self) -> Capabilities;
    fn default_region(&self) -> String;
    fn default_size(&self) -> String;
    fn sizes(&self) -> Vec<Size>;
    async fn regions(&self) -> Result<Vec<Region>, ProviderError>;

    /// The user name environments are reached as over SSH.
    fn ssh_user(&self) -> String;
    /// Host key material for a new environment.
    fn new_host_key(&self) -> Result<HostKey, ProviderError>;
    /// Where to reach an instance with this address over SSH.
    fn ssh_endpoint(&self, ip: &str) -> (String, u16);
    /// How installation is followed; `local_setup` are the template's steps for local hosts.
    fn install_plan(&self, local_setup: &[String]) -> InstallPlan;

    /// The shell command that samples metrics inside an environment (output as
    /// [`crate::actors::environment::metrics::parse`] reads it).
    fn metrics_command(&self) -> &'static str {
        crate::actors::environment::metrics::COMMAND
    }

    /// Holders of one shared SSH connection to an environment before the pool opens another
    /// ([`crate::ssh::pool::SshPool`]). `configured` is `provider.ssh_channels_per_connection`,
    /// sized for OpenSSH's `MaxSessions`; a provider whose SSH server is this process's own
    /// states its own limit instead.
    fn ssh_holders_per_connection(&self, configured: usize) -> usize {
        configured
    }

    /// Release what the provider runs (the local provider's SSH server).
    async fn shutdown(&self) {}

    /// An existing environment's actor started (e.g. after a server restart): re-establish
    /// whatever the provider keeps in memory for it.
    async fn attach(&self, _spec: &InstanceSpec) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Reconciliation: an instance this environment already has (by display name, or by the
    /// request id of an earlier create).
    async fn find_instance(&self, spec: &InstanceSpec) -> Result<Option<String>, ProviderError>;
    /// Create an instance; never retried blindly by the implementation.
    async fn create_instance(&self, spec: &InstanceSpec) -> Result<String, ProviderError>;
    async fn instance_state(&self, instance_id: &str) -> Result<InstanceState, ProviderError>;
    async fn start(&self, instance_id: &str) -> Result<(), ProviderError>;
    async fn stop(&self, instance_id: &str) -> Result<(), ProviderError>;
    async fn restart(&self, instance_id: &str) -> Result<(), ProviderError>;
    /// Remove the instance for good (Contabo: stop, then cancel the contract).
    async fn delete(&self, instance_id: &str) -> Result<(), ProviderError>;
    async fn create_snapshot(
        &self,
        instance_id: &str,
        name: &str,
    ) -> Result<SnapshotInfo, ProviderError>;
    async fn list_snapshots(&self, instance_id: &str) -> Result<Vec<SnapshotInfo>, ProviderError>;
    async fn restore_snapshot(
        &self,
        instance_id: &str,
        snapshot_id: &str,
    ) -> Result<(), ProviderError>;
}
