//! Terminals, the pure parts: the WebSocket protocol codec, the output ring, UTF-8 boundaries
//! and coalescing. The terminal actor that bridges a WebSocket to an SSH PTY running tmux is
//! `actors::terminal`.

pub mod coalesce;
pub mod output;
pub mod protocol;

/// The id a terminal has in the ops directory.
pub fn directory_id(terminal_id: &str) -> String {
    format!("terminal:{terminal_id}")
}
