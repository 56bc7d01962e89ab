//! The Contabo provider: environments are Cloud VPS instances created with cloud-init user-data.
//! Follows shared/contabo/NOTES.md: secrets by id, `displayName = devpocket-<env id>`, never a
//! blind retry of create (reconcile by display name and by the create's request id in the audit
//! log), delete = stop then cancel, no resize API.

pub mod client;

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use self::client::{ContaboClient, ContaboError, Retry};
use super::{
    Capabilities, HostKey, InstallPlan, InstanceSpec, InstanceState, Provider, ProviderError,
    Region, Size, SnapshotInfo,
};
use crate::config::{ContaboConfig, ProviderKind};

/// Ubuntu 22.04, Contabo's default standard image (NOTES §2.5).
pub const UBUNTU_22_04: &str = "afecbb85-e2fc-46f0-9684-b46b1faf00bb";
/// Page size for list calls (default is 20; we ask for more, fewer pages).
const PAGE_SIZE: u32 = 100;
/// Pages walked at most in one listing (bounds a runaway pagination loop).
const MAX_PAGES: u32 = 50;
/// Contabo snapshot names: 1-30 letters, digits, spaces, dashes.
const SNAPSHOT_NAME_MAX: usize = 30;

/// How installation is followed on a cloud-init VPS: the output log (root:adm 0640, so through
/// sudo) and cloud-init's own verdict.
const CLOUD_INIT_LOG: &str = "sudo -n tail -n +1 -F /var/log/cloud-init-output.log";
const CLOUD_INIT_WAIT: &str = "cloud-init status --wait";

/// The products environments can be created on (NOTES §2.6; Contabo has no product endpoint).
/// Prices are Contabo's list prices in EUR per month, without VAT or setup fees, as published
/// when this table was written; the provider's invoice is authoritative.
const PRODUCTS: &[(&str, &str, u32, u64, u64, f64, &str)] = &[
    ("V91", "Cloud VPS 10 NVMe", 4, 8192, 75, 4.50, "starter"),
    ("V92", "Cloud VPS 10 SSD", 4, 8192, 150, 4.50, "starter"),
    ("V94", "Cloud VPS 20 NVMe", 6, 12288, 100, 7.00, "standard"),
    ("V95", "Cloud VPS 20 SSD", 6, 12288, 200, 7.00, "standard"),
    ("V97", "Cloud VPS 30 NVMe", 8, 24576, 200, 14.00, "pro"),
    ("V98", "Cloud VPS 30 SSD", 8, 24576, 400, 14.00, "pro"),
    ("V100", "Cloud VPS 40 NVMe", 12, 49152, 250, 25.00, "pro"),
    ("V101", "Cloud VPS 40 SSD", 12, 49152, 500, 25.00, "pro"),
    (
        "V103",
        "Cloud VPS 50 NVMe",
        16,
        65536,
        300,
        37.00,
        "enterprise",
    ),
    (
        "V104",
        "Cloud VPS 50 SSD",
        16,
        65536,
        600,
        37.00,
        "enterprise",
    ),
    (
        "V106",
        "Cloud VPS 60 NVMe",
        18,
        98304,
        350,
        50.00,
        "enterprise",
    ),
    (
        "V107",
        "Cloud VPS 60 SSD",
        18,
        98304,
        700,
        50.00,
        "enterprise",
    ),
    (
        "V45",
        "VPS 1 SSD (previous generation)",
        4,
        6144,
        400,
        5.50,
        "starter",
    ),
];

#[derive(Deserialize)]
struct Envelope<T> {
    data: Vec<T>,
    #[serde(rename = "_pagination")]
    pagination: Option<Pagination>,
}

#[derive(Deserialize)]
struct Pagination {
    #[serde(rename = "totalPages")]
    total_pages: f64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Instance {
    instance_id: i64,
    #[serde(default)]
    display_name: Option<String>,
    status: String,
    #[serde(default)]
    error_message: Option<String>,
    #[serde(default)]
    ip_config: Option<IpConfig>,
    #[serde(default)]
    cancel_date: Option<String>,
}

#[derive(Deserialize)]
struct IpConfig {
    v4: Option<IpV4>,
}

#[derive(Deserialize)]
struct IpV4 {
    ip: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Created {
    instance_id: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Secret {
    secret_id: i64,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Audit {
    instance_id: Option<i64>,
    #[serde(default)]
    action: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Snapshot {
    snapshot_id: String,
    name: String,
    #[serde(default)]
    description: Option<String>,
    created_date: DateTime<Utc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DataCenter {
    #[serde(default)]
    capabilities: Vec<String>,
    region_name: String,
    region_slug: String,
}

pub struct ContaboProvider {
    client: ContaboClient,
    config: ContaboConfig,
}

impl ContaboProvider {
    pub fn new(config: &ContaboConfig) -> anyhow::Result<Self> {
        Ok(Self {
            client: ContaboClient::new(config)?,
            config: config.clone(),
        })
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ProviderError> {
        self.client
            .call(Method::GET, path, None, Retry::Safe, None)
            .await
            .map_err(classify)
    }

    /// Walk every page of a list call.
    async fn list<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Vec<T>, ProviderError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut all = Vec::new();
        for page in 1..=MAX_PAGES {
            let env: Envelope<T> = self
                .get(&format!("{path}{sep}page={page}&size={PAGE_SIZE}"))
                .await?;
            let count = env.data.len();
            all.extend(env.data);
            let total = env.pagination.map_or(1.0, |p| p.total_pages) as u32;
            if page >= total || count == 0 {
                break;
            }
        }
        Ok(all)
    }

    /// The instance order itself (never retried blindly: see `create_instance`).
    async fn order(
        &self,
        spec: &InstanceSpec,
        secret: i64,
    ) -> Result<Envelope<Created>, ContaboError> {
        let image = if self.config.image_id.is_empty() {
            UBUNTU_22_04
        } else {
            self.config.image_id.as_str()
        };
        let body = json!({
            "imageId": image,
            "productId": spec.size,
            "region": spec.region,
            "sshKeys": [secret],
            "userData": spec.user_data,
            "period": self.config.period,
            "displayName": spec.display_name,
            "defaultUser": "admin",
        });
        self.client
            .call(
                Method::POST,
                "/v1/compute/instances",
                Some(&body),
                Retry::Never,
                Some(&spec.operation_id),
            )
            .await
    }

    /// The SSH-key secret for an environment, reused by name when it exists.
    async fn ssh_secret(&self, spec: &InstanceSpec) -> Result<i64, ProviderError> {
        let name = spec.display_name.as_str();
        let existing: Vec<Secret> = self
            .list(&format!("/v1/secrets?type=ssh&name={}", encode(name)))
            .await?;
        if let Some(secret) = existing.into_iter().find(|s| s.name == name) {
            return Ok(secret.secret_id);
        }
        let body = json!({ "name": name, "value": spec.ssh_public_key.trim(), "type": "ssh" });
        // A duplicate secret is harmless (found by name next time), so this may be retried.
        let created: Envelope<Secret> = self
            .client
            .call(Method::POST, "/v1/secrets", Some(&body), Retry::Safe, None)
            .await
            .map_err(classify)?;
        created
            .data
            .first()
            .map(|s| s.secret_id)
            .ok_or_else(|| ProviderError::Internal("secret created without an id".into()))
    }

    async fn action(&self, instance_id: &str, action: &str) -> Result<(), ProviderError> {
        let path = format!(
            "/v1/compute/instances/{}/actions/{action}",
            id_path(instance_id)?
        );
        // Start/stop/restart are no-ops in the target state: safe to retry.
        self.client
            .call::<Value>(Method::POST, &path, Some(&json!({})), Retry::Safe, None)
            .await
            .map(|_| ())
            .map_err(classify)
    }
}

/// Map a client error to what the actor needs to know.
fn classify(e: ContaboError) -> ProviderError {
    match e {
        ContaboError::Transport(m) => ProviderError::Ambiguous(m),
        ContaboError::Api { status: 404, .. } => ProviderError::NotFound,
        ContaboError::Api { status, message } if status == 429 || status >= 500 => {
            ProviderError::Unavailable(format!("{status}: {message}"))
        }
        ContaboError::Api { status, message } => ProviderError::Rejected { status, message },
        ContaboError::Auth(m) => ProviderError::Unavailable(m),
        ContaboError::Decode(m) => ProviderError::Internal(m),
    }
}

fn id_path(instance_id: &str) -> Result<i64, ProviderError> {
    instance_id
        .parse::<i64>()
        .map_err(|_| ProviderError::Internal(format!("not a Contabo instance id: {instance_id}")))
}

fn encode(s: &str) -> String {
    serde_urlencoded::to_string([("", s)])
        .map(|q| q.trim_start_matches('=').to_string())
        .unwrap_or_default()
}

/// Contabo's status names reduced to the machine's view (NOTES §3.1).
fn instance_state(i: &Instance) -> InstanceState {
    let ip = i
        .ip_config
        .as_ref()
        .and_then(|c| c.v4.as_ref())
        .and_then(|v| v.ip.clone())
        .filter(|ip| !ip.is_empty() && ip != "0.0.0.0");
    match i.status.as_str() {
        "running" => match ip {
            Some(ip) => InstanceState::Running { ip },
            None => InstanceState::Pending {
                detail: "running, waiting for an address".into(),
            },
        },
        "stopped" => InstanceState::Stopped,
        "provisioning" | "installing" | "uninstalled" | "reset_password" | "rescue" => {
            InstanceState::Pending {
                detail: i.status.clone(),
            }
        }
        "pending_payment" | "verification_required" | "manual_provisioning" => {
            InstanceState::Pending {
                detail: format!("{} (the Contabo account needs attention)", i.status),
            }
        }
        other => InstanceState::Failed {
            message: i
                .error_message
                .clone()
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| format!("instance status {other}")),
        },
    }
}

fn snapshot_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == ' ' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(SNAPSHOT_NAME_MAX)
        .collect();
    let cleaned = cleaned.trim().to_string();
    if cleaned.is_empty() {
        "snapshot".into()
    } else {
        cleaned
    }
}

#[async_trait]
impl Provider for ContaboProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Contabo
    }

    fn capabilities(&self) -> Capabilities {
        // Contabo's API has no call that changes an instance's product.
        Capabilities {
            resize: false,
            snapshots: true,
        }
    }

    fn default_region(&self) -> String {
        self.config.region.clone()
    }

    fn default_size(&self) -> String {
        self.config.product_id.clone()
    }

    fn sizes(&self) -> Vec<Size> {
        PRODUCTS
            .iter()
            .map(|(id, name, vcpus, memory_mb, disk_gb, price, tier)| Size {
                slug: (*id).to_string(),
                name: (*name).to_string(),
                vcpus: *vcpus,
                memory_mb: *memory_mb,
                disk_gb: *disk_gb,
                price_monthly: *price,
                tier: (*tier).to_string(),
            })
            .collect()
    }

    async fn regions(&self) -> Result<Vec<Region>, ProviderError> {
        let centers: Vec<DataCenter> = self.list("/v1/data-centers").await?;
        let mut regions: BTreeMap<String, Region> = BTreeMap::new();
        for dc in centers {
            let entry = regions
                .entry(dc.region_slug.clone())
                .or_insert_with(|| Region {
                    slug: dc.region_slug.clone(),
                    name: dc.region_name.clone(),
                    available: false,
                    features: Vec::new(),
                });
            entry.available |= dc.capabilities.iter().any(|c| c == "VPS");
            for cap in dc.capabilities {
                if !entry.features.contains(&cap) {
                    entry.features.push(cap);
                }
            }
        }
        Ok(regions.into_values().collect())
    }

    fn ssh_user(&self) -> String {
        "dev".into()
    }

    fn new_host_key(&self) -> Result<HostKey, ProviderError> {
        let key = crate::ssh::keys::generate_ed25519();
        let private = crate::ssh::keys::private_to_openssh(&key)
            .map_err(|e| ProviderError::Internal(e.to_string()))?;
        Ok(HostKey {
            public: crate::ssh::keys::public_to_openssh(key.public_key()),
            private: Some(private),
        })
    }

    fn ssh_endpoint(&self, ip: &str) -> (String, u16) {
        (ip.to_string(), self.config.ssh_port)
    }

    fn install_plan(&self, _local_setup: &[String]) -> InstallPlan {
        InstallPlan {
            log_command: CLOUD_INIT_LOG.into(),
            status_command: Some(CLOUD_INIT_WAIT.into()),
        }
    }

    async fn find_instance(&self, spec: &InstanceSpec) -> Result<Option<String>, ProviderError> {
        let named: Vec<Instance> = self
            .list(&format!(
                "/v1/compute/instances?displayName={}",
                encode(&spec.display_name)
            ))
            .await?;
        if let Some(found) = named.iter().find(|i| {
            i.display_name.as_deref() == Some(spec.display_name.as_str()) && i.cancel_date.is_none()
        }) {
            return Ok(Some(found.instance_id.to_string()));
        }
        // The instance may not carry its name yet; the audit log knows our request id.
        let audits: Vec<Audit> = self
            .list(&format!(
                "/v1/compute/instances/audits?requestId={}",
                encode(&spec.operation_id)
            ))
            .await?;
        Ok(audits
            .iter()
            .filter(|a| a.action.is_empty() || a.action == "CREATED")
            .find_map(|a| a.instance_id)
            .map(|id| id.to_string()))
    }

    async fn create_instance(&self, spec: &InstanceSpec) -> Result<String, ProviderError> {
        // The secret is looked up just before; if it vanishes meanwhile (deleted in the panel),
        // the create answers 404 and ordered nothing, so one more try with a fresh secret is
        // safe. (Some accounts get a 500 instead: that is ambiguous and goes to reconciliation.)
        let mut tries = 0;
        loop {
            tries += 1;
            let secret = self.ssh_secret(spec).await?;
            match self.order(spec, secret).await {
                Err(ContaboError::Api {
                    status: 404,
                    message,
                }) if tries < 2 => {
                    tracing::warn!(environment = %spec.display_name, message, "a referenced secret is gone; creating with a fresh one");
                }
                Err(ContaboError::Api { status, message }) if status >= 500 => {
                    // A 5xx on create may still have ordered a server (NOTES §5.2, §5.4).
                    return Err(ProviderError::Ambiguous(format!("{status}: {message}")));
                }
                Err(other) => return Err(classify(other)),
                Ok(created) => {
                    return created
                        .data
                        .first()
                        .map(|c| c.instance_id.to_string())
                        .ok_or_else(|| {
                            ProviderError::Ambiguous("create answered without an instance".into())
                        });
                }
            }
        }
    }

    async fn instance_state(&self, instance_id: &str) -> Result<InstanceState, ProviderError> {
        let path = format!("/v1/compute/instances/{}", id_path(instance_id)?);
        match self.get::<Envelope<Instance>>(&path).await {
            Ok(env) => Ok(env
                .data
                .first()
                .map(instance_state)
                .unwrap_or(InstanceState::Gone)),
            Err(ProviderError::NotFound) => Ok(InstanceState::Gone),
            Err(e) => Err(e),
        }
    }

    async fn start(&self, instance_id: &str) -> Result<(), ProviderError> {
        self.action(instance_id, "start").await
    }

    async fn stop(&self, instance_id: &str) -> Result<(), ProviderError> {
        self.action(instance_id, "stop").await
    }

    async fn restart(&self, instance_id: &str) -> Result<(), ProviderError> {
        self.action(instance_id, "restart").await
    }

    async fn delete(&self, instance_id: &str) -> Result<(), ProviderError> {
        let id = id_path(instance_id)?;
        match self.instance_state(instance_id).await? {
            InstanceState::Gone => return Ok(()),
            InstanceState::Stopped => {}
            _ => {
                if let Err(e) = self.action(instance_id, "stop").await {
                    tracing::warn!(instance_id, error = %e, "stop before cancel failed; cancelling anyway");
                }
            }
        }
        let path = format!("/v1/compute/instances/{id}/cancel");
        match self
            .client
            .call::<Value>(Method::POST, &path, Some(&json!({})), Retry::Safe, None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                // Cancelling twice is refused; an instance that already has a cancel date is done.
                let env: Envelope<Instance> =
                    self.get(&format!("/v1/compute/instances/{id}")).await?;
                if env.data.first().is_some_and(|i| i.cancel_date.is_some()) {
                    Ok(())
                } else {
                    Err(classify(e))
                }
            }
        }
    }

    async fn create_snapshot(
        &self,
        instance_id: &str,
        name: &str,
    ) -> Result<SnapshotInfo, ProviderError> {
        let path = format!("/v1/compute/instances/{}/snapshots", id_path(instance_id)?);
        let body = json!({ "name": snapshot_name(name), "description": format!("DevPocket snapshot: {name}") });
        let created: Envelope<Snapshot> = self
            .client
            .call(Method::POST, &path, Some(&body), Retry::Never, None)
            .await
            .map_err(classify)?;
        created
            .data
            .into_iter()
            .next()
            .map(|s| SnapshotInfo {
                id: s.snapshot_id,
                name: s.name,
                description: s.description,
                created_at: s.created_date,
            })
            .ok_or_else(|| ProviderError::Internal("snapshot created without data".into()))
    }

    async fn list_snapshots(&self, instance_id: &str) -> Result<Vec<SnapshotInfo>, ProviderError> {
        let path = format!("/v1/compute/instances/{}/snapshots", id_path(instance_id)?);
        let snaps: Vec<Snapshot> = self.list(&path).await?;
        Ok(snaps
            .into_iter()
            .map(|s| SnapshotInfo {
                id: s.snapshot_id,
                name: s.name,
                description: s.description,
                created_at: s.created_date,
            })
            .collect())
    }

    async fn restore_snapshot(
        &self,
        instance_id: &str,
        snapshot_id: &str,
    ) -> Result<(), ProviderError> {
        let path = format!(
            "/v1/compute/instances/{}/snapshots/{}/rollback",
            id_path(instance_id)?,
            encode(snapshot_id)
        );
        self.client
            .call::<Value>(Method::POST, &path, Some(&json!({})), Retry::Never, None)
            .await
            .map(|_| ())
            .map_err(classify)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(status: &str, ip: Option<&str>) -> Instance {
        Instance {
            instance_id: 1,
            display_name: None,
            status: status.into(),
            error_message: None,
            ip_config: Some(IpConfig {
                v4: Some(IpV4 {
                    ip: ip.map(String::from),
                }),
            }),
            cancel_date: None,
        }
    }

    #[test]
    fn statuses_map_to_the_machine() {
        assert_eq!(
            instance_state(&instance("running", Some("1.2.3.4"))),
            InstanceState::Running {
                ip: "1.2.3.4".into()
            }
        );
        assert!(matches!(
            instance_state(&instance("running", None)),
            InstanceState::Pending { .. }
        ));
        assert!(matches!(
            instance_state(&instance("installing", None)),
            InstanceState::Pending { .. }
        ));
        assert!(matches!(
            instance_state(&instance("verification_required", None)),
            InstanceState::Pending { .. }
        ));
        assert_eq!(
            instance_state(&instance("stopped", None)),
            InstanceState::Stopped
        );
        let mut failed = instance("error", None);
        failed.error_message = Some("disk exploded".into());
        assert_eq!(
            instance_state(&failed),
            InstanceState::Failed {
                message: "disk exploded".into()
            }
        );
        assert!(matches!(
            instance_state(&instance("product_not_available", None)),
            InstanceState::Failed { .. }
        ));
        assert!(matches!(
            instance_state(&instance("something_new", None)),
            InstanceState::Failed { .. }
        ));
    }

    #[test]
    fn snapshot_names_fit_contabo_rules() {
        assert_eq!(snapshot_name("before upgrade"), "before upgrade");
        assert_eq!(snapshot_name("a/b_c"), "a-b-c");
        assert_eq!(snapshot_name(&"x".repeat(40)).len(), 30);
        assert_eq!(snapshot_name("!!!"), "---");
        assert_eq!(snapshot_name("   "), "snapshot");
    }
}
