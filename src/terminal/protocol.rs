//! The terminal WebSocket protocol (JSON text frames, as the DevPocket app speaks them), pure.
//!
//! Client → server: `input {data}`, `resize {cols, rows}`, `ping`, `ack {offset}`; a text frame that
//! is not JSON is taken as input. Server → client: `welcome`, `output {data, offset}`, `pong`,
//! `error`, `info`, `exit`, and environment status events.

use serde::{Deserialize, Serialize};

/// Largest terminal size accepted; larger requests are clamped (and reported).
pub const MAX_COLS: u32 = 1000;
pub const MAX_ROWS: u32 = 500;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    Input(String),
    Resize { cols: u32, rows: u32 },
    Ping,
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

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EnvironmentInfo {
    pub id: String,
    pub name: String,
    pub template: String,
    pub status: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        message: String,
        environment: EnvironmentInfo,
        terminal_id: String,
        /// Where this connection's output stream starts.
        offset: u64,
    },
    Output {
        data: String,
        /// Output bytes of this terminal up to the end of this frame.
        offset: u64,
    },
    Pong,
    Error {
        message: String,
    },
    Info {
        message: String,
    },
    Exit {
        code: u32,
    },
    EnvironmentStatus {
        environment_id: String,
        status: String,
        progress: u8,
        message: Option<String>,
        timestamp: chrono::DateTime<chrono::Utc>,
    },
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

    #[test]
    fn server_frames_have_the_app_shape() {
        let json = ServerFrame::Output {
            data: "hi".into(),
            offset: 2,
        }
        .to_json();
        assert_eq!(json, r#"{"type":"output","data":"hi","offset":2}"#);
        assert_eq!(ServerFrame::Pong.to_json(), r#"{"type":"pong"}"#);
        assert_eq!(
            ServerFrame::Exit { code: 3 }.to_json(),
            r#"{"type":"exit","code":3}"#
        );
    }
}
