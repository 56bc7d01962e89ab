//! SSH: key helpers ([`keys`]), the client the server uses to reach environments with pinned host
//! keys ([`client`]) and its connections shared per environment ([`pool`]), the local provider's loopback server ([`server`]) with its port
//! forwarding for previews ([`forward`], [`listeners`]), and SFTP to an environment as its own
//! account for the file API ([`sftp`]).

pub mod client;
pub mod forward;
pub mod keys;
pub mod listeners;
pub mod pool;
pub mod pty;
pub mod server;
pub mod sftp;
mod spawn;
pub mod target;

pub use client::{
    ExecOutput, PtyEvent, PtyReader, PtySession, PtyWriter, SshClient, SshError, SshTarget,
};
pub use server::{Authorizer, LocalSshServer, SessionSpec};
