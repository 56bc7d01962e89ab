//! How to reach an environment over SSH: its address (through the provider's endpoint mapping),
//! its own key (unsealed) and the pinned host key. Used by the environment actor (installation,
//! metrics) and, through it, by terminals.

use std::sync::Arc;

use anyhow::{Context, anyhow};
use std::time::Duration;

use crate::provider::Provider;
use crate::secrets::Sealer;
use crate::ssh::client::SshTarget;
use crate::store::environments::Environment;

/// How to reach an environment over SSH: its address, its own key (unsealed) and the pinned host
/// key. Errors: no address yet (still provisioning), or a secret that does not open or parse.
pub fn ssh_target(
    row: &Environment,
    provider: &dyn Provider,
    sealer: &Sealer,
    connect_timeout: Duration,
) -> anyhow::Result<SshTarget> {
    let ip = row
        .ip_address
        .clone()
        .ok_or_else(|| anyhow!("the environment has no address yet"))?;
    let (host, port) = provider.ssh_endpoint(&ip);
    let private = sealer
        .open(&row.ssh_private_key, &row.id)
        .context("cannot unseal environment secret")?;
    let key = crate::ssh::keys::parse_private(&String::from_utf8(private)?)?;
    let host_key = crate::ssh::keys::parse_public(&row.host_public_key)?;
    Ok(SshTarget {
        host,
        port,
        user: row.ssh_user.clone(),
        key: Arc::new(key),
        host_key,
        connect_timeout,
    })
}
