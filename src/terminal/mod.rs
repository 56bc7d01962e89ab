//! Terminals: the WebSocket protocol codec and output bookkeeping (pure), and the terminal actor
//! that bridges a WebSocket to an SSH PTY running tmux.

pub mod actor;
pub mod coalesce;
pub mod output;
pub mod protocol;

/// The id a terminal has in the ops directory.
pub fn directory_id(terminal_id: &str) -> String {
    format!("terminal:{terminal_id}")
}
