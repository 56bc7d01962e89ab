//! The update feed: what an environment publishes to its subscribers (logs and events WebSockets,
//! terminals) and to the all-environments bus.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::machine::Status;

/// Updates kept for slow subscribers of one environment before they lag (and are told so).
pub const ENV_FEED_CAPACITY: usize = 256;

/// What subscribers (logs and events WebSockets, terminals) receive.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EnvUpdate {
    EnvironmentStatus {
        environment_id: String,
        #[serde(skip)]
        user_id: String,
        status: Status,
        status_version: i64,
        progress: u8,
        message: Option<String>,
        timestamp: DateTime<Utc>,
    },
    InstallationLog {
        environment_id: String,
        data: String,
        timestamp: DateTime<Utc>,
    },
    InstallationComplete {
        environment_id: String,
        status: Status,
        installation_status: String,
        message: String,
    },
    InstallationError {
        environment_id: String,
        error: String,
        is_critical: bool,
    },
}
