//! The update feed: what an environment publishes to its subscribers (logs WebSockets and
//! terminals) and, for status changes, to the all-environments bus (the events WebSocket). The
//! frames themselves are defined in [`crate::protocol`].

use crate::protocol::StreamFrame;

/// Updates kept for slow subscribers of one environment before they lag (and are told so).
pub const ENV_FEED_CAPACITY: usize = 256;

/// One update: the frame, and who owns the environment (the events stream sends a user only
/// their own environments' changes).
#[derive(Debug, Clone)]
pub struct EnvUpdate {
    pub owner: String,
    pub frame: StreamFrame,
}
