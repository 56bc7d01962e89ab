//! SSH: key helpers ([`keys`]), the client the server uses to reach environments with pinned host
//! keys ([`client`]), and the local provider's loopback server ([`server`]).

pub mod client;
pub mod keys;
pub mod pty;
pub mod server;
pub mod target;

pub use client::{
    ExecOutput, PtyEvent, PtyReader, PtySession, PtyWriter, SshClient, SshError, SshTarget,
};
pub use server::{Authorizer, LocalSshServer, SessionSpec};
