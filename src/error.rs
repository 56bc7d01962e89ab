//! The boundary error: every failure a client can see, with its HTTP status, a stable `code` and a
//! human `detail` (the shape of API.md). Internal failures are logged with the request id and
//! answered with a generic message; nothing internal leaks to the client.

use http::{HeaderName, HeaderValue, StatusCode};
use serde::Serialize;

/// Declares [`ErrorCode`]: each variant with the string clients see.
macro_rules! error_codes {
    ($($(#[$doc:meta])* $variant:ident => $text:literal,)*) => {
        /// Every stable error code the API answers with (`code` in the error body, API.md
        /// "Errors"). Clients match on these strings: `error_codes_are_stable` pins them, so
        /// renaming one is a visible change to the contract.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)*
        }

        impl ErrorCode {
            pub const ALL: &[ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The snake_case string of the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $text,)*
                }
            }
        }
    };
}

error_codes! {
    AccountDisabled => "account_disabled",
    AccountLocked => "account_locked",
    AdminRequired => "admin_required",
    AuthBusy => "auth_busy",
    BadBody => "bad_body",
    BodyTimeout => "body_timeout",
    BuiltinTemplate => "builtin_template",
    /// The node that runs an environment did not answer a command in time (504; the detail
    /// names the command id to look up).
    CommandTimeout => "command_timeout",
    DatabaseUnavailable => "database_unavailable",
    /// A directory to delete is not empty (409).
    DirectoryNotEmpty => "directory_not_empty",
    EmailTaken => "email_taken",
    EnvironmentBusy => "environment_busy",
    /// The environment must be running for this (409).
    EnvironmentNotRunning => "environment_not_running",
    /// SSH or SFTP to a running environment failed (503).
    EnvironmentUnreachable => "environment_unreachable",
    EnvironmentsPending => "environments_pending",
    FaultInjectionDisabled => "fault_injection_disabled",
    /// The environment's own account may not touch this path: the OS refused it (403).
    FileAccessDenied => "file_access_denied",
    /// Something already exists at the path (409).
    FileExists => "file_exists",
    /// The environment refused a file operation without a reason (SFTP's generic failure: a full disk, a move into itself...) (409).
    FileOperationFailed => "file_operation_failed",
    /// The account is linked to a different Google identity than the one presented (409).
    GoogleAlreadyLinked => "google_already_linked",
    /// The Google identity presented is linked to another account (409).
    GoogleLinkedElsewhere => "google_linked_elsewhere",
    GoogleNotConfigured => "google_not_configured",
    /// Unlinking Google from an account that has none linked (409).
    GoogleNotLinked => "google_not_linked",
    GoogleUnavailable => "google_unavailable",
    InternalError => "internal_error",
    InvalidJson => "invalid_json",
    /// A file path that is malformed or outside the environment's home (422).
    InvalidPath => "invalid_path",
    InvalidSince => "invalid_since",
    InvalidState => "invalid_state",
    /// A file operation on a directory (409).
    IsADirectory => "is_a_directory",
    /// The change would leave the account with no way to sign in (409).
    LastSignInMethod => "last_sign_in_method",
    MethodNotAllowed => "method_not_allowed",
    NameTaken => "name_taken",
    /// A directory operation on something else, or a path through a file (409).
    NotADirectory => "not_a_directory",
    NotFound => "not_found",
    NotSupervised => "not_supervised",
    PayloadTooLarge => "payload_too_large",
    PlanLimit => "plan_limit",
    /// `If-Match` / `If-None-Match` did not hold (412).
    PreconditionFailed => "precondition_failed",
    ProviderRefused => "provider_refused",
    ProviderUnavailable => "provider_unavailable",
    /// A `Range` outside the file (416).
    RangeNotSatisfiable => "range_not_satisfiable",
    RateLimited => "rate_limited",
    RegistrationClosed => "registration_closed",
    TemplateExists => "template_exists",
    TooManyConnections => "too_many_connections",
    /// A user's file operations running at once are capped (429).
    TooManyFileOperations => "too_many_file_operations",
    Unauthorized => "unauthorized",
    UnsupportedByProvider => "unsupported_by_provider",
    UsernameTaken => "username_taken",
    ValidationError => "validation_error",
    WebsocketRequired => "websocket_required",
    WrongPassword => "wrong_password",
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One field that failed validation.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
    /// A stable snake_case code (`required`, `length`, `unknown`, …); owned when it came from
    /// another node (see [`crate::actors::remote`]).
    pub code: std::borrow::Cow<'static, str>,
}

impl FieldError {
    pub fn new(field: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
            code: std::borrow::Cow::Borrowed(code),
        }
    }
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub detail: String,
    pub errors: Vec<FieldError>,
    pub retry_after: Option<u64>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The cause of an internal error, for the log only.
    pub source: Option<anyhow::Error>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            errors: Vec::new(),
            retry_after: None,
            headers: Vec::new(),
            source: None,
        }
    }

    pub fn bad_request(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    /// 401 with `WWW-Authenticate: Bearer`, so clients know to refresh or sign in again.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, detail);
        e.headers.push((
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        ));
        e
    }

    pub fn forbidden(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, detail)
    }

    pub fn conflict(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, detail)
    }

    pub fn validation(errors: Vec<FieldError>) -> Self {
        let mut e = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::ValidationError,
            "Validation error",
        );
        e.errors = errors;
        e
    }

    pub fn rate_limited(retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            "Too many requests; slow down",
        );
        e.retry_after = Some(retry_after);
        e
    }

    pub fn unavailable(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, detail)
    }

    pub fn internal(source: impl Into<anyhow::Error>) -> Self {
        let mut e = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::InternalError,
            "Internal server error",
        );
        e.source = Some(source.into());
        e
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The JSON body of API.md.
    pub fn body(&self) -> serde_json::Value {
        let mut body = serde_json::json!({ "detail": self.detail, "code": self.code });
        if !self.errors.is_empty() {
            body["errors"] = serde_json::json!(self.errors);
        }
        if let Some(seconds) = self.retry_after {
            body["retry_after"] = serde_json::json!(seconds);
        }
        body
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Unavailable(_) => {
                let mut err =
                    Self::unavailable(ErrorCode::DatabaseUnavailable, "Database unavailable");
                err.source = Some(e.into());
                err
            }
            other => Self::internal(other),
        }
    }
}

/// Seconds a client is told to wait when password hashing is at capacity: a few hashes' time.
pub const HASH_BUSY_RETRY_SECONDS: u64 = 2;

impl From<crate::auth::passwords::HashBusy> for ApiError {
    fn from(_: crate::auth::passwords::HashBusy) -> Self {
        Self::unavailable(
            ErrorCode::AuthBusy,
            "Too many passwords are being checked right now; try again shortly",
        )
        .with_retry_after(HASH_BUSY_RETRY_SECONDS)
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self::internal(e)
    }
}

/// Turn a serde_json error on a request body into the API's answer: malformed JSON is a 400,
/// well-formed JSON of the wrong shape a 422 naming the field where serde can tell.
pub fn json_body_error(e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::bad_request(ErrorCode::InvalidJson, "Request body is not valid JSON")
        }
        Category::Data => {
            let text = e.to_string();
            let message = text.split(" at line ").next().unwrap_or(&text).to_string();
            let field = between(&message, "field `", "`")
                .unwrap_or("body")
                .to_string();
            let code = if message.starts_with("missing field") {
                "required"
            } else {
                "invalid"
            };
            ApiError::validation(vec![FieldError::new(field, code, message)])
        }
    }
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = s.find(start)? + start.len();
    let len = s[from..].find(end)?;
    Some(&s[from..from + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Login {
        username_or_email: String,
        password: String,
    }

    #[test]
    fn body_errors_are_classified() {
        let e = serde_json::from_str::<Login>("{not json").expect_err("syntax");
        let api = json_body_error(&e);
        assert_eq!(api.status, StatusCode::BAD_REQUEST);
        assert_eq!(api.code, "invalid_json");

        let e = serde_json::from_str::<Login>(r#"{"password":"x"}"#).expect_err("missing");
        let api = json_body_error(&e);
        assert_eq!(api.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(api.errors[0].field, "username_or_email");
        assert_eq!(api.errors[0].code, "required");

        let e = serde_json::from_str::<Login>(r#"{"username_or_email":1,"password":"x"}"#)
            .expect_err("type");
        assert_eq!(json_body_error(&e).errors[0].code, "invalid");
    }

    /// The codes clients match on. Changing this list is changing the API contract: add a
    /// code freely, never rename or remove one without a version.
    #[test]
    fn error_codes_are_stable() {
        let wire: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            wire,
            [
                "account_disabled",
                "account_locked",
                "admin_required",
                "auth_busy",
                "bad_body",
                "body_timeout",
                "builtin_template",
                "command_timeout",
                "database_unavailable",
                "directory_not_empty",
                "email_taken",
                "environment_busy",
                "environment_not_running",
                "environment_unreachable",
                "environments_pending",
                "fault_injection_disabled",
                "file_access_denied",
                "file_exists",
                "file_operation_failed",
                "google_already_linked",
                "google_linked_elsewhere",
                "google_not_configured",
                "google_not_linked",
                "google_unavailable",
                "internal_error",
                "invalid_json",
                "invalid_path",
                "invalid_since",
                "invalid_state",
                "is_a_directory",
                "last_sign_in_method",
                "method_not_allowed",
                "name_taken",
                "not_a_directory",
                "not_found",
                "not_supervised",
                "payload_too_large",
                "plan_limit",
                "precondition_failed",
                "provider_refused",
                "provider_unavailable",
                "range_not_satisfiable",
                "rate_limited",
                "registration_closed",
                "template_exists",
                "too_many_connections",
                "too_many_file_operations",
                "unauthorized",
                "unsupported_by_provider",
                "username_taken",
                "validation_error",
                "websocket_required",
                "wrong_password",
            ]
        );
        assert_eq!(
            serde_json::to_string(&ErrorCode::PlanLimit).expect("json"),
            "\"plan_limit\""
        );
    }

    #[test]
    fn unauthorized_carries_www_authenticate() {
        let e = ApiError::unauthorized("nope");
        assert!(
            e.headers
                .iter()
                .any(|(k, v)| k == http::header::WWW_AUTHENTICATE && v == "Bearer")
        );
        assert_eq!(e.body()["detail"], "nope");
    }
}
