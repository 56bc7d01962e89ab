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

/// Marks a UTF-16 surrogate escape (`\uD800`–`\uDFFF`) that JSON text carried unpaired: it is
/// rewritten before parsing as this noncharacter followed by the four hex digits, so the parsed
/// string still says where the half was and [`InputDecoder`] can join it with its other half.
const SURROGATE_MARK: char = '\u{FDD0}';

/// Rewrite every surrogate escape that is not part of a valid pair (`\uD83D\uDE00` stays) as
/// [`SURROGATE_MARK`] + hex, which serde_json accepts. Escaped backslashes are skipped.
fn mark_lone_surrogates(text: &str) -> std::borrow::Cow<'_, str> {
    fn escape_at(bytes: &[u8], i: usize) -> Option<u16> {
        if bytes.get(i) != Some(&b'\\') || bytes.get(i + 1) != Some(&b'u') {
            return None;
        }
        let hex = std::str::from_utf8(bytes.get(i + 2..i + 6)?).ok()?;
        u16::from_str_radix(hex, 16).ok()
    }
    let is_high = |u: u16| (0xD800..0xDC00).contains(&u);
    let is_low = |u: u16| (0xDC00..0xE000).contains(&u);
    let bytes = text.as_bytes();
    if !text.contains("\\u") {
        return text.into();
    }
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        match escape_at(bytes, i) {
            Some(u) if is_high(u) && escape_at(bytes, i + 6).is_some_and(is_low) => i += 12,
            Some(u) if is_high(u) || is_low(u) => {
                out.push_str(&text[copied..i]);
                out.push_str(&format!("\\u{:04x}{u:04x}", SURROGATE_MARK as u32));
                i += 6;
                copied = i;
            }
            _ => i += 2, // any other escape, including `\\`
        }
    }
    out.push_str(&text[copied..]);
    out.into()
}

/// Decodes one terminal connection's frames, keeping what must carry from one frame to the next:
/// a high surrogate that ended an input frame (a client that split an emoji across two frames)
/// waits for its low half; a surrogate that finds no other half becomes U+FFFD.
#[derive(Debug, Default)]
pub struct InputDecoder {
    pending_high: Option<u16>,
}

impl InputDecoder {
    /// Decode one text frame. Text that is not a JSON object is input (the app's raw fallback);
    /// text that is, or starts like one (`{"`), must be a valid message or it is refused — never
    /// typed into the shell.
    pub fn decode(&mut self, text: &str) -> Result<ClientFrame, BadFrame> {
        match decode_frame(text)? {
            ClientFrame::Input(data) => Ok(ClientFrame::Input(self.join(&data))),
            other => Ok(other),
        }
    }

    /// Resolve the surrogate marks of an input string, carrying a trailing high half.
    fn join(&mut self, data: &str) -> String {
        let mut out = String::with_capacity(data.len());
        let mut chars = data.chars().peekable();
        let mut units: Vec<u16> = self.pending_high.take().into_iter().collect();
        loop {
            let unit = match chars.peek() {
                Some(&SURROGATE_MARK) => {
                    let mut lookahead = chars.clone();
                    lookahead.next();
                    let hex: String = lookahead.by_ref().take(4).collect();
                    match u16::from_str_radix(&hex, 16) {
                        Ok(u) if hex.len() == 4 && (0xD800..0xE000).contains(&u) => {
                            chars = lookahead;
                            Some(u)
                        }
                        _ => None,
                    }
                }
                _ => None,
            };
            match unit {
                Some(u) => units.push(u),
                None => match chars.next() {
                    Some(c) => {
                        flush_units(&mut units, &mut out);
                        out.push(c);
                    }
                    None => break,
                },
            }
        }
        // A high half at the very end waits for the next frame.
        if let Some(&last) = units.last()
            && (0xD800..0xDC00).contains(&last)
        {
            units.pop();
            self.pending_high = Some(last);
        }
        flush_units(&mut units, &mut out);
        out
    }
}

/// Decode collected UTF-16 surrogate units: pairs become their character, lone halves U+FFFD.
fn flush_units(units: &mut Vec<u16>, out: &mut String) {
    out.extend(char::decode_utf16(units.drain(..)).map(|r| r.unwrap_or('\u{FFFD}')));
}

/// Decode one text frame on its own (no state across frames; see [`InputDecoder`]).
pub fn decode(text: &str) -> Result<ClientFrame, BadFrame> {
    InputDecoder::default().decode(text)
}

fn decode_frame(text: &str) -> Result<ClientFrame, BadFrame> {
    let trimmed = text.trim_start();
    if !trimmed.starts_with('{') {
        // Not JSON: the app's fallback is raw input.
        return Ok(ClientFrame::Input(text.to_string()));
    }
    let marked = mark_lone_surrogates(trimmed);
    let value: serde_json::Value = match serde_json::from_str(&marked) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        // Starts like a message but is not one: refused, never typed into the shell.
        _ if trimmed.starts_with("{\"") => {
            return Err(BadFrame("malformed message: not valid JSON".into()));
        }
        _ => return Ok(ClientFrame::Input(text.to_string())),
    };
    let kind = match value.get("type") {
        Some(serde_json::Value::String(kind)) => kind.clone(),
        Some(_) => {
            return Err(BadFrame(
                "malformed message: 'type' must be a string".into(),
            ));
        }
        None => return Err(BadFrame("malformed message: no 'type'".into())),
    };
    match serde_json::from_value::<Wire>(value) {
        Ok(Wire::Input { data }) => Ok(ClientFrame::Input(data)),
        Ok(Wire::Resize { cols, rows }) => {
            if cols < 1 || rows < 1 {
                return Err(BadFrame(format!("invalid terminal size {cols}x{rows}")));
            }
            Ok(ClientFrame::Resize {
                cols: cols.min(i64::from(MAX_COLS)) as u32,
                rows: rows.min(i64::from(MAX_ROWS)) as u32,
            })
        }
        Ok(Wire::Ping) => Ok(ClientFrame::Ping),
        Ok(Wire::Ack { offset }) => Ok(ClientFrame::Ack { offset }),
        Err(e) if ["input", "resize", "ack", "ping"].contains(&kind.as_str()) => {
            Err(BadFrame(format!("malformed '{kind}' message: {e}")))
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
/// `status_version` it was persisted with, `progress` (0–100 within the phase), a human
/// `message` and when (RFC 3339 UTC). `status_version` grows by one with every change of
/// `status`; progress within one status keeps the version and only grows `progress`. So
/// `(status_version, progress)` only ever increases: a client drops a frame not above the last
/// one it has.
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
        assert_eq!(
            decode("{ echo hi; }"),
            Ok(ClientFrame::Input("{ echo hi; }".into())),
            "shell text that is not JSON stays input"
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

    /// A frame that is (or starts like) a JSON message but is not a valid one is refused, never
    /// typed into the shell.
    #[test]
    fn invalid_messages_are_refused_not_typed() {
        for text in [
            r#"{"type":"input","data":5}"#,
            r#"{"type":"input","data":null}"#,
            r#"{"type":"resize","cols":80.5,"rows":24}"#,
            r#"{"type":"resize","cols":99999999999999999999,"rows":24}"#,
            r#"{"type":"ack","offset":-1}"#,
            r#"{"type":"ping","extra":"fine"}"#,
            r#"{"type":7}"#,
            r#"{"data":"rm -rf /"}"#,
            r#"{"type":"input","data":"x""#,
            r#"{"type":"teleport"}"#,
            r#"[1,2,3]"#,
        ] {
            match decode(text) {
                Err(_) => {}
                Ok(ClientFrame::Input(data)) if !text.starts_with('{') => {
                    assert_eq!(data, text, "non-object JSON text is plain input");
                }
                Ok(ClientFrame::Ping) if text.contains("ping") => {}
                other => panic!("{text} must be refused, got {other:?}"),
            }
        }
    }

    /// An emoji split across two input frames as UTF-16 halves arrives whole; a half that finds
    /// no partner becomes U+FFFD; valid pairs in one frame are untouched.
    #[test]
    fn split_surrogates_are_joined_and_lone_ones_replaced() {
        let mut d = InputDecoder::default();
        assert_eq!(
            d.decode(r#"{"type":"input","data":"a\ud83d"}"#),
            Ok(ClientFrame::Input("a".into()))
        );
        assert_eq!(
            d.decode(r#"{"type":"input","data":"\ude00b"}"#),
            Ok(ClientFrame::Input("\u{1F600}b".into()))
        );
        let mut d = InputDecoder::default();
        assert_eq!(
            d.decode(r#"{"type":"input","data":"\ud83d\ude00"}"#),
            Ok(ClientFrame::Input("\u{1F600}".into()))
        );
        assert_eq!(
            d.decode(r#"{"type":"input","data":"x\ude00y"}"#),
            Ok(ClientFrame::Input("x\u{FFFD}y".into()))
        );
        assert_eq!(
            d.decode(r#"{"type":"input","data":"\ud83d"}"#),
            Ok(ClientFrame::Input(String::new()))
        );
        assert_eq!(
            d.decode(r#"{"type":"input","data":"z"}"#),
            Ok(ClientFrame::Input("\u{FFFD}z".into())),
            "a high half followed by no low half"
        );
        assert_eq!(
            d.decode(r#"{"type":"input","data":"back\\ud83d"}"#),
            Ok(ClientFrame::Input("back\\ud83d".into())),
            "an escaped backslash is not an escape"
        );
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
