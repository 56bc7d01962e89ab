//! Every frame of the three WebSocket streams (JSON text frames, as the DevPocket app speaks
//! them; shared/API.md "WebSockets"), pure: no sockets, no actors.
//!
//! - Terminal (`/ws/terminal/{id}`): client → server [`ClientFrame`] (decoded by [`decode`]; a text
//!   frame that is not JSON is input); server → client [`ServerFrame`].
//! - Logs (`/ws/logs/{id}`) and events (`/ws/events`): server → client [`StreamFrame`]; the client
//!   may send `ping`.
//!
//! A status change has one shape everywhere, [`EnvironmentStatus`] (with `status_version` and
//! `progress`): inside a terminal, on the logs stream (history and live) and on the events stream.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::actors::environment::machine::Status;

/// Largest terminal size accepted; larger requests are clamped (and reported).
pub const MAX_COLS: u32 = 1000;
pub const MAX_ROWS: u32 = 500;

/// A terminal client's frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// `{"type":"input","data"}` (or a text frame that is not JSON): keystrokes or a paste.
    Input(String),
    /// `{"type":"resize","cols","rows"}`: the PTY size, clamped to [`MAX_COLS`]×[`MAX_ROWS`].
    Resize { cols: u32, rows: u32 },
    /// `{"type":"ping"}`: answered with `pong`.
    Ping,
    /// `{"type":"ack","offset"}`: output the client has rendered up to this byte offset.
    Ack { offset: u64 },
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Wire {
    Input { data: String },
    Resize { cols: i64, rows: i64 },
    Ping,
    Ack { offset: u64 },
}

/// Why a frame was not understood (answered with an `error`, never a crash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadFrame(pub String);

/// Decode one text frame.
pub fn decode(text: &str) -> Result<ClientFrame, BadFrame> {
    let trimmed = text.trim_start();
    if !trimmed.starts_with('{') {
        // Not JSON: the app's fallback is raw input.
        return Ok(ClientFrame::Input(text.to_string()));
    }
    let value: serde_json::Value = match serde_json::from_str(trimmed) {
        Ok(v) => v,
        Err(_) => return Ok(ClientFrame::Input(text.to_string())),
    };
    let kind = value.get("type").and_then(|t| t.as_str()).unwrap_or("");
    match serde_json::from_value::<Wire>(value.clone()) {
        Ok(Wire::Input { data }) => Ok(ClientFrame::Input(data)),
        Ok(Wire::Resize { cols, rows }) => {
            if cols < 1 || rows < 1 {
                return Err(BadFrame(format!("invalid terminal size {cols}x{rows}")));
            }
            Ok(ClientFrame::Resize {
                cols: (cols as u64).min(u64::from(MAX_COLS)) as u32,
                rows: (rows as u64).min(u64::from(MAX_ROWS)) as u32,
            })
        }
        Ok(Wire::Ping) => Ok(ClientFrame::Ping),
        Ok(Wire::Ack { offset }) => Ok(ClientFrame::Ack { offset }),
        Err(_) if ["input", "resize", "ack"].contains(&kind) => {
            Err(BadFrame(format!("malformed '{kind}' message")))
        }
        Err(_) => Err(BadFrame(format!("unknown message type '{kind}'"))),
    }
}

/// The environment a terminal's welcome names.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EnvironmentInfo {
    pub id: String,
    pub name: String,
    pub template: String,
    pub status: Status,
}

/// An environment's status change, the same on every stream: its new `status`, the
/// `status_version` it was persisted with (monotonic per environment: a client drops what it
/// has seen), `progress` (0–100 within the phase), a human `message` and when (RFC 3339 UTC).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EnvironmentStatus {
    pub environment_id: String,
    pub status: Status,
    pub status_version: i64,
    pub progress: u8,
    pub message: Option<String>,
    pub timestamp: DateTime<Utc>,
}

/// A frame of the logs and events streams (server → client).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamFrame {
    /// A status change (the events stream carries only these).
    EnvironmentStatus(EnvironmentStatus),
    /// One line of installation output, from the environment itself.
    InstallationLog {
        environment_id: String,
        data: String,
        timestamp: DateTime<Utc>,
    },
    /// Installation ended well (`installation_status`: `completed`); `status` is what the
    /// environment became.
    InstallationComplete {
        environment_id: String,
        status: Status,
        installation_status: String,
        message: String,
    },
    /// Installation failed.
    InstallationError {
        environment_id: String,
        error: String,
        is_critical: bool,
    },
    /// A note: a stored notice about the environment, or that updates were skipped.
    Info {
        #[serde(skip_serializing_if = "Option::is_none")]
        environment_id: Option<String>,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        timestamp: Option<DateTime<Utc>>,
    },
    /// The answer to a client's `ping`.
    Pong,
}

impl StreamFrame {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|_| r#"{"type":"info","message":"encoding failed"}"#.into())
    }

    /// The status change this frame carries, if it is one.
    pub fn as_status(&self) -> Option<&EnvironmentStatus> {
        match self {
            Self::EnvironmentStatus(status) => Some(status),
            _ => None,
        }
    }
}

/// A terminal's frame to its client.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The terminal is attached: its id (to resume with) and where this connection's stream starts.
    Welcome {
        message: String,
        environment: EnvironmentInfo,
        terminal_id: String,
        /// Where this connection's output stream starts.
        offset: u64,
    },
    /// Shell output, cut on UTF-8 boundaries.
    Output {
        data: String,
        /// Output bytes of this terminal up to the end of this frame.
        offset: u64,
    },
    /// The answer to `ping`.
    Pong,
    /// Something the client sent or asked for failed (the terminal goes on).
    Error { message: String },
    /// A notice for the person (connecting, reconnecting, output lost while away).
    Info { message: String },
    /// The shell exited with this status; the socket closes next.
    Exit { code: u32 },
    /// The environment changed status.
    EnvironmentStatus(EnvironmentStatus),
}

impl ServerFrame {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|_| r#"{"type":"error","message":"encoding failed"}"#.into())
    }
    pub fn info(message: impl Into<String>) -> Self {
        Self::Info {
            message: message.into(),
        }
    }
    pub fn error(message: impl Into<String>) -> Self {
        Self::Error {
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_decode_and_hostile_ones_are_refused_politely() {
        assert_eq!(
            decode(r#"{"type":"input","data":"ls\r"}"#),
            Ok(ClientFrame::Input("ls\r".into()))
        );
        assert_eq!(
            decode("plain text"),
            Ok(ClientFrame::Input("plain text".into()))
        );
        assert_eq!(
            decode("{not json"),
            Ok(ClientFrame::Input("{not json".into()))
        );
        assert_eq!(decode(r#"{"type":"ping"}"#), Ok(ClientFrame::Ping));
        assert_eq!(
            decode(r#"{"type":"ack","offset":42}"#),
            Ok(ClientFrame::Ack { offset: 42 })
        );
        assert_eq!(
            decode(r#"{"type":"resize","cols":100000,"rows":100000}"#),
            Ok(ClientFrame::Resize {
                cols: MAX_COLS,
                rows: MAX_ROWS
            })
        );
        assert!(decode(r#"{"type":"resize","cols":0,"rows":0}"#).is_err());
        assert!(decode(r#"{"type":"resize","cols":-5,"rows":10}"#).is_err());
        assert!(decode(r#"{"type":"resize","cols":"x"}"#).is_err());
        let err = decode(r#"{"type":"launch_missiles"}"#).expect_err("unknown");
        assert!(err.0.contains("launch_missiles"));
        assert!(decode(r#"{"type":"input"}"#).is_err());
    }

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-30T08:00:00Z")
            .expect("time")
            .with_timezone(&Utc)
    }

    fn status() -> EnvironmentStatus {
        EnvironmentStatus {
            environment_id: "e1".into(),
            status: Status::Running,
            status_version: 7,
            progress: 100,
            message: Some("Environment ready".into()),
            timestamp: at(),
        }
    }

    /// The app reads these shapes: any change here is a change to the contract (API.md).
    #[test]
    fn every_terminal_frame_has_its_pinned_shape() {
        let env = EnvironmentInfo {
            id: "e1".into(),
            name: "box".into(),
            template: "python".into(),
            status: Status::Running,
        };
        let pinned = [
            (
                ServerFrame::Welcome {
                    message: "Connected to box".into(),
                    environment: env,
                    terminal_id: "t1".into(),
                    offset: 5,
                },
                r#"{"type":"welcome","message":"Connected to box","environment":{"id":"e1","name":"box","template":"python","status":"running"},"terminal_id":"t1","offset":5}"#,
            ),
            (
                ServerFrame::Output {
                    data: "hi".into(),
                    offset: 2,
                },
                r#"{"type":"output","data":"hi","offset":2}"#,
            ),
            (ServerFrame::Pong, r#"{"type":"pong"}"#),
            (
                ServerFrame::error("no"),
                r#"{"type":"error","message":"no"}"#,
            ),
            (
                ServerFrame::info("hey"),
                r#"{"type":"info","message":"hey"}"#,
            ),
            (ServerFrame::Exit { code: 3 }, r#"{"type":"exit","code":3}"#),
            (
                ServerFrame::EnvironmentStatus(status()),
                r#"{"type":"environment_status","environment_id":"e1","status":"running","status_version":7,"progress":100,"message":"Environment ready","timestamp":"2026-11-30T08:00:00Z"}"#,
            ),
        ];
        for (frame, json) in pinned {
            assert_eq!(frame.to_json(), json);
        }
    }

    #[test]
    fn every_stream_frame_has_its_pinned_shape() {
        let pinned = [
            (
                StreamFrame::EnvironmentStatus(status()),
                r#"{"type":"environment_status","environment_id":"e1","status":"running","status_version":7,"progress":100,"message":"Environment ready","timestamp":"2026-11-30T08:00:00Z"}"#,
            ),
            (
                StreamFrame::InstallationLog {
                    environment_id: "e1".into(),
                    data: "apt-get install".into(),
                    timestamp: at(),
                },
                r#"{"type":"installation_log","environment_id":"e1","data":"apt-get install","timestamp":"2026-11-30T08:00:00Z"}"#,
            ),
            (
                StreamFrame::InstallationComplete {
                    environment_id: "e1".into(),
                    status: Status::Running,
                    installation_status: "completed".into(),
                    message: "Installation finished".into(),
                },
                r#"{"type":"installation_complete","environment_id":"e1","status":"running","installation_status":"completed","message":"Installation finished"}"#,
            ),
            (
                StreamFrame::InstallationError {
                    environment_id: "e1".into(),
                    error: "exit 1".into(),
                    is_critical: true,
                },
                r#"{"type":"installation_error","environment_id":"e1","error":"exit 1","is_critical":true}"#,
            ),
            (
                StreamFrame::Info {
                    environment_id: Some("e1".into()),
                    message: "Snapshot restored".into(),
                    timestamp: Some(at()),
                },
                r#"{"type":"info","environment_id":"e1","message":"Snapshot restored","timestamp":"2026-11-30T08:00:00Z"}"#,
            ),
            (
                StreamFrame::Info {
                    environment_id: None,
                    message: "3 updates were skipped".into(),
                    timestamp: None,
                },
                r#"{"type":"info","message":"3 updates were skipped"}"#,
            ),
            (StreamFrame::Pong, r#"{"type":"pong"}"#),
        ];
        for (frame, json) in pinned {
            assert_eq!(frame.to_json(), json);
        }
    }
}
