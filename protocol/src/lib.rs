//! The city 检查检验结果互认共享平台 contract, as this project models it
//! (see `docs/protocol.md`). This crate is the only place that knows the platform's
//! field names, paths and answer codes: swapping in the official names means editing
//! this crate alone. It does no I/O; the worker, the extension and the simulator
//! call it.

pub mod answers;
pub mod checks;
pub mod envelope;
pub mod kind;
pub mod mask;
pub mod paths;
pub mod sign;
pub mod source;
pub mod types;
pub mod validate;

pub use envelope::{classify, classify_answer, Envelope, Outcome};
pub use kind::Kind;
pub use types::*;
pub use validate::FieldError;

/// Errors of this crate: a record that cannot become a platform request.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A source row does not have the shape of the record (missing column, wrong type).
    #[error("field {field}: {reason}")]
    Shape { field: String, reason: String },
    /// The record has the right shape but breaks the contract's rules.
    #[error("{} invalid field(s): {}", .0.len(), FieldError::join(.0))]
    Invalid(Vec<FieldError>),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

impl ProtocolError {
    /// The first offending field and its reason, for quarantine rows.
    pub fn field_and_reason(&self) -> (String, String) {
        match self {
            ProtocolError::Shape { field, reason } => (field.clone(), reason.clone()),
            ProtocolError::Invalid(errors) => errors
                .first()
                .map(|e| (e.field.clone(), e.reason.clone()))
                .unwrap_or_default(),
            ProtocolError::Json(e) => (String::new(), e.to_string()),
        }
    }
}
