//! The crate's one error type. Contract errors map to an HTTP status and the
//! envelope's `data.errors`; the others only happen at start-up.

use axum::http::StatusCode;
use hmr_protocol::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// 400: the request breaks the contract; each error names a field and a reason.
    #[error("invalid request: {}", FieldError::join(.0))]
    Invalid(Vec<FieldError>),
    /// 401: token missing, unknown or expired; bad credentials.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// 403: another org's token, a scope that may not call this, a report not recognised.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// 404: a referenced patient, report, version or check is not held.
    #[error("not found: {0}")]
    NotFound(String),
    /// 409: request id reused, stale version, different PDF, decision differs.
    #[error("conflict: {message}")]
    Conflict { message: String, errors: Vec<FieldError> },
    /// 413: batch over 500 records, PDF over 10 MiB.
    #[error("too large: {0}")]
    TooLarge(String),
    /// 410: a one-time page ticket already used or expired.
    #[error("gone: {0}")]
    Gone(String),
    /// Start-up: the catalog file cannot be used.
    #[error("catalog {origin}: {reason}")]
    Catalog { origin: String, reason: String },
    /// Start-up: an `--org` specification cannot be used.
    #[error("org configuration: {0}")]
    OrgConfig(String),
}

impl SimError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        SimError::Invalid(vec![FieldError::new(field, reason)])
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        SimError::Conflict {
            message: message.into(),
            errors: vec![],
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            SimError::Invalid(_) => StatusCode::BAD_REQUEST,
            SimError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            SimError::Forbidden(_) => StatusCode::FORBIDDEN,
            SimError::NotFound(_) => StatusCode::NOT_FOUND,
            SimError::Conflict { .. } => StatusCode::CONFLICT,
            SimError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            SimError::Gone(_) => StatusCode::GONE,
            SimError::Catalog { .. } | SimError::OrgConfig(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The field errors a client quarantines with (400 always has at least one).
    pub fn field_errors(&self) -> Vec<FieldError> {
        match self {
            SimError::Invalid(errors) | SimError::Conflict { errors, .. } => errors.clone(),
            _ => vec![],
        }
    }

    /// A short human detail for the envelope's `message`.
    pub fn detail(&self) -> String {
        match self {
            SimError::Invalid(errors) => FieldError::join(errors),
            SimError::Unauthorized(m)
            | SimError::Forbidden(m)
            | SimError::NotFound(m)
            | SimError::TooLarge(m)
            | SimError::Gone(m)
            | SimError::OrgConfig(m) => m.clone(),
            SimError::Conflict { message, .. } => message.clone(),
            SimError::Catalog { reason, .. } => reason.clone(),
        }
    }
}

impl From<Vec<FieldError>> for SimError {
    fn from(errors: Vec<FieldError>) -> Self {
        SimError::Invalid(errors)
    }
}
