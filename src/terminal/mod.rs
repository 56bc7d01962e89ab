//! Terminals, the pure parts: the output ring, UTF-8 boundaries, coalescing and the server-side
//! screen model (the frames are in [`crate::protocol`], re-exported here as `protocol`). The terminal actor that bridges a
//! WebSocket to an SSH PTY running tmux is `actors::terminal`.

pub mod coalesce;
pub mod output;
pub mod screen;
pub use crate::protocol;

/// The id a terminal has in the ops directory.
pub fn directory_id(terminal_id: &str) -> String {
    format!("terminal:{terminal_id}")
}
