//! DevPocket Server: the backend of a mobile-first cloud IDE.
//!
//! An actor system (ractor on tokio) behind a thin hyper front end. The crate map:
//!
//! - [`config`] — the one configuration struct: embedded defaults, file, environment; validated
//!   as a whole.
//! - [`app`] — the application state handlers share, and the running server (`start`, `stop`).
//! - [`http`] — the front end: connection caps and deadlines, routing, limits, errors, security
//!   headers, metrics, handlers, and the port-preview reverse proxy.
//! - [`actors`] — the supervision tree: root, sessions and environments supervisors, the
//!   UserSession, environment and terminal actors, restart policy and the ops directory.
//! - [`provider`] — where environments run: the trait, Contabo (real API client) and local.
//! - [`auth`] — passwords (argon2id), access/refresh tokens, Google ID tokens, input rules, lockout.
//! - [`store`] — diesel-async over SQLite or PostgreSQL: schema, migrations, one module per table.
//! - [`secrets`] — keys (generated files or configuration, with rotation) and AEAD sealing of
//!   secrets at rest.
//! - [`cluster`] — this process as a node: registration, heartbeat, join checks (shared keys, no
//!   local provider in a cluster), the data directory's lock.
//! - [`presence`] — this node's terminals and WebSocket slots in the store: the terminals list
//!   over every node, resumes that land on another node, per-user and per-session caps counted
//!   cluster-wide.
//! - [`clock`] — time as a dependency, so tests move it instead of sleeping.
//! - [`error`] — the API error shape (`detail` + `code`).
//! - [`ssh`] — SSH: key handling, the client bridge (pinned host keys), the local provider's
//!   server, and SFTP as an environment's own account (the file API).
//! - [`templates`] — environment templates: metadata and cloud-init user-data, rendering, checks.
//! - [`protocol`] — every frame of the three WebSocket streams (terminal, logs, events), pure.
//! - [`terminal`] — the output ring and coalescing (pure; the actor is in [`actors`]).
//! - [`cli`] — the command line (`serve`, `migrate`, `user ...`).
//! - [`logging`] — tracing setup (pretty or JSON).
//! - [`memory`] — the allocator's settings: big blocks (argon2's) go back to the system.

#![recursion_limit = "512"]

pub mod actors;
pub mod app;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod error;
pub mod http;
pub mod logging;
pub mod memory;
pub mod presence;
pub mod protocol;
pub mod provider;
pub mod secrets;
pub mod ssh;
pub mod store;
pub mod templates;
pub mod terminal;
