//! `direct-tcpip` on the local provider's SSH server: the channel a port preview rides on. Only
//! loopback destinations, and only ports whose every listening socket is owned by the
//! environment's own account and held by no socket of this process ([`listeners`]): the API, the
//! SSH server itself, PostgreSQL and other tenants share the host's loopback and are refused.
//! After connecting, the socket that accepted is checked again (the port may change hands in
//! between). A refusal is an SSH open failure; nothing else is said.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::TcpStream;

use super::listeners::{self, Refusal};

/// From the channel open to a connected, verified TCP stream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Host names a `direct-tcpip` request may name: the environment's own loopback.
fn loopback_name(host: &str) -> bool {
    matches!(host, "localhost" | "127.0.0.1" | "::1" | "[::1]")
}

/// The uid programs of a session run as: its account's, or this process's own.
pub fn session_uid(account: Option<(u32, u32)>) -> Option<u32> {
    match account {
        Some((uid, _)) => Some(uid),
        None => std::fs::metadata("/proc/self").ok().map(|m| m.uid()),
    }
}

/// Check, connect, then accept `channel` and copy bytes both ways until either side closes; or
/// refuse it. Runs as its own task (the checks read `/proc`, the connect waits).
pub async fn direct_tcpip(
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    host: String,
    port: u32,
    uid: u32,
) {
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, connect(&host, port, uid)).await;
    let stream = match connected {
        Ok(Ok(stream)) => stream,
        Ok(Err(why)) => {
            tracing::info!(port, uid, reason = %why, "local SSH: direct-tcpip refused");
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return;
        }
        Err(_) => {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    reply.accept().await;
    let mut tcp = stream;
    let mut ssh = channel.into_stream();
    if let Err(e) = tokio::io::copy_bidirectional(&mut ssh, &mut tcp).await {
        tracing::debug!(port, error = %e, "local SSH: forwarded connection ended");
    }
}

/// Why a forward was not made.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("destination {0} is not loopback")]
    NotLoopback(String),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("cannot read the socket table: {0}")]
    Proc(std::io::Error),
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("port {0} changed hands while connecting")]
    Changed(u16),
}

async fn connect(host: &str, port: u32, uid: u32) -> Result<TcpStream, ForwardError> {
    if !loopback_name(host) {
        return Err(ForwardError::NotLoopback(host.to_string()));
    }
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(Refusal::NotListening(0))?;
    let own = listeners::own_socket_inodes();
    let sockets = listeners::host_sockets().map_err(ForwardError::Proc)?;
    let target: SocketAddr = listeners::forward_target(&sockets, port, uid, &own)?;
    let stream = TcpStream::connect(target)
        .await
        .map_err(ForwardError::Connect)?;
    let ours = stream.local_addr().map_err(ForwardError::Connect)?;
    let sockets = listeners::host_sockets().map_err(ForwardError::Proc)?;
    if !listeners::accepted_by(&sockets, target, ours, uid) {
        return Err(ForwardError::Changed(port));
    }
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
