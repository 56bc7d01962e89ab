//! How to reach an environment over SSH: its address (through the provider's endpoint mapping),
//! its own key (unsealed) and the pinned host key. Used by the environment actor (installation,
//! metrics) and, through it, by terminals.

use std::sync::Arc;
use std::time::Duration;

use crate::provider::Provider;
use crate::secrets::Sealer;
use crate::ssh::client::SshTarget;
use crate::store::environments::Environment;

/// How to reach an environment over SSH: its address, its own key (unsealed) and the pinned host
/// key. Shared by the environment actor and terminals.
pub fn ssh_target(
    row: &Environment,
    provider: &dyn Provider,
    sealer: &Sealer,
    connect_timeout: Duration,
) -> Result<SshTarget, String> {
    let ip = row
        .ip_address
        .clone()
        .ok_or_else(|| "the environment has no address yet".to_string())?;
    let (host, port) = provider.ssh_endpoint(&ip);
    let private = sealer
        .open(&row.ssh_private_key, &row.id)
        .map_err(|e| format!("cannot unseal environment secret: {e}"))
        .and_then(|b| String::from_utf8(b).map_err(|e| e.to_string()))?;
    let key = crate::ssh::keys::parse_private(&private).map_err(|e| e.to_string())?;
    let host_key =
        crate::ssh::keys::parse_public(&row.host_public_key).map_err(|e| e.to_string())?;
    Ok(SshTarget {
        host,
        port,
        user: row.ssh_user.clone(),
        key: Arc::new(key),
        host_key,
        connect_timeout,
    })
}
