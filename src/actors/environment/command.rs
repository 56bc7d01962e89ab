//! Commands: everything that changes environments, as one serde-serialisable enum with one
//! dispatch function ([`crate::actors::Actors::dispatch`]). The front end decodes a request,
//! checks who owns the environment, sends one [`Command`] and encodes the [`Reply`] or the
//! [`CommandError`]; it never reaches a provider, a sealer or an SSH client itself.
//!
//! Where each command runs: `Create` in the environments supervisor (the environment has no actor
//! yet); `DeleteAllForUser` fans out to the actors of the user's live environments and waits for
//! each to report `terminated` (no polling); every other command in the environment's own actor,
//! started first if it is down (an explicit start, e.g. for `Recover` after the supervisor gave
//! up on it). The enum is serialisable so that commands can later travel between nodes through
//! the store.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::machine::{Event, Rejected, Status};
use crate::error::FieldError;
use crate::provider::{ProviderError, SnapshotInfo};
use crate::store::environments::Environment;
use crate::store::users::Plan;

/// A new environment as the front end validated it (syntax only: the template, region, size and
/// the plan are checked by the create itself).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewEnvironment {
    pub user_id: String,
    /// Lower-cased, `[a-z0-9-_]{1,50}`, not starting or ending with `-`.
    pub name: String,
    /// A template id or name.
    pub template: String,
    /// A provider region slug; the provider's default when absent.
    pub region: Option<String>,
    /// A provider size slug; the provider's default when absent.
    pub size: Option<String>,
    pub environment_variables: BTreeMap<String, String>,
    /// The `dev` user's password (8–128 characters); a random one when absent. Only its
    /// SHA-512-crypt hash is kept.
    #[serde(skip_serializing)]
    pub user_password: Option<String>,
}

/// Every command that changes environments.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    Create(NewEnvironment),
    /// Rename and/or replace the variables (`None`: unchanged).
    Update {
        environment_id: String,
        name: Option<String>,
        environment_variables: Option<BTreeMap<String, String>>,
    },
    Delete {
        environment_id: String,
    },
    Start {
        environment_id: String,
    },
    Stop {
        environment_id: String,
    },
    Restart {
        environment_id: String,
    },
    /// Resume the phase an `error` came from.
    Recover {
        environment_id: String,
    },
    Snapshot {
        environment_id: String,
        name: String,
    },
    ListSnapshots {
        environment_id: String,
    },
    RestoreSnapshot {
        environment_id: String,
        snapshot_id: String,
    },
    Resize {
        environment_id: String,
        size: String,
    },
    /// Delete every live environment of a user and answer when all are terminated (account
    /// deletion).
    DeleteAllForUser {
        user_id: String,
    },
}

impl Command {
    /// The environment this command is for (`None`: create and delete-all).
    pub fn environment_id(&self) -> Option<&str> {
        match self {
            Self::Create(_) | Self::DeleteAllForUser { .. } => None,
            Self::Update { environment_id, .. }
            | Self::Delete { environment_id }
            | Self::Start { environment_id }
            | Self::Stop { environment_id }
            | Self::Restart { environment_id }
            | Self::Recover { environment_id }
            | Self::Snapshot { environment_id, .. }
            | Self::ListSnapshots { environment_id }
            | Self::RestoreSnapshot { environment_id, .. }
            | Self::Resize { environment_id, .. } => Some(environment_id),
        }
    }

    /// The verb of "Cannot <verb> environment in <status> state".
    pub fn verb(&self) -> &'static str {
        match self {
            Self::Create(_) => "create",
            Self::Update { .. } => "update",
            Self::Delete { .. } | Self::DeleteAllForUser { .. } => "delete",
            Self::Start { .. } => "start",
            Self::Stop { .. } => "stop",
            Self::Restart { .. } => "restart",
            Self::Recover { .. } => "recover",
            Self::Snapshot { .. } => "snapshot",
            Self::ListSnapshots { .. } => "list snapshots of",
            Self::RestoreSnapshot { .. } => "restore",
            Self::Resize { .. } => "resize",
        }
    }

    /// The state machine event of a plain action (start, stop, restart, recover, delete,
    /// snapshot); `None` for commands with their own handling.
    pub fn machine_event(&self) -> Option<Event> {
        Some(match self {
            Self::Delete { .. } => Event::Delete,
            Self::Start { .. } => Event::Start,
            Self::Stop { .. } => Event::Stop,
            Self::Restart { .. } => Event::Restart,
            Self::Recover { .. } => Event::Recover,
            Self::Snapshot { name, .. } => Event::Snapshot { name: name.clone() },
            _ => return None,
        })
    }

    /// The answer when the environment has no actor because it is terminated.
    pub fn when_terminated(&self) -> Result<Reply, CommandError> {
        match self {
            Self::ListSnapshots { .. } => Ok(Reply::Snapshots(Vec::new())),
            other => Err(CommandError::InvalidState(Rejected {
                status: Status::Terminated,
                verb: other.verb(),
            })),
        }
    }
}

/// What a command answers.
#[derive(Debug)]
pub enum Reply {
    /// Create and update: the environment as stored.
    Environment(Box<Environment>),
    /// An action was accepted; the environment is now in this status.
    Accepted(Status),
    Snapshots(Vec<SnapshotInfo>),
    /// Every live environment of the user is terminated (this many were deleted).
    AllDeleted(usize),
}

/// Why a command was not carried out. The front end maps each to its HTTP status and stable code.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The request names something that does not exist or fit (422 `validation_error`).
    #[error("validation error")]
    Invalid(Vec<FieldError>),
    /// The plan's environment limit is reached (403 `plan_limit`).
    #[error("Environment limit reached: the {} plan allows {limit} environment(s)", plan.as_str())]
    PlanLimit { plan: Plan, limit: u32 },
    /// Another live environment of the user has this name (409 `name_taken`).
    #[error("You already have an environment named '{0}'")]
    NameTaken(String),
    /// The state machine does not allow it now (409 `invalid_state`).
    #[error("{0}")]
    InvalidState(Rejected),
    /// The environment or the snapshot does not exist (404).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The provider cannot do this (422 `unsupported_by_provider`).
    #[error("{0}")]
    Unsupported(String),
    /// The environment's actor is restarting or its mailbox is full (503 `environment_busy`).
    #[error("The environment is busy or restarting; try again in a moment")]
    Busy,
    /// Deletions did not finish within the wait (409 `environments_pending`).
    #[error("{0}")]
    Pending(String),
    /// The provider refused or is unreachable (502 / 503).
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// Answered by the node that runs the environment, as it answered (same status and code).
    #[error("{}", .0.detail)]
    Remote(crate::actors::remote::RemoteError),
    /// The node that runs the environment did not answer within the wait (504
    /// `command_timeout`): `ran` says whether it took the command (look it up by id) or it was
    /// cancelled unrun.
    #[error("{}", timeout_detail(command_id, *ran))]
    Timeout { command_id: String, ran: bool },
    /// The store failed: unavailable (pool exhausted, database down: 503 `database_unavailable`)
    /// or a query error (500).
    #[error(transparent)]
    Store(crate::store::StoreError),
    /// Anything else: logged, answered 500 without detail.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

fn timeout_detail(command_id: &str, ran: bool) -> String {
    if ran {
        format!(
            "The node that runs this environment took command {command_id} but did not answer in time; look it up at /api/v1/commands/{command_id}"
        )
    } else {
        format!(
            "The node that runs this environment did not take command {command_id} in time; it was cancelled and will not run. Try again"
        )
    }
}

impl From<crate::store::StoreError> for CommandError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Store(e)
    }
}
