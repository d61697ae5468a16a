//! What a contract endpoint's handler gets (`Call`) and gives (`Rendered`), and what the journal
//! records of the caller (`Trace`): shared by the pipeline (`api.rs`) and the handlers
//! (`auth.rs`, `records.rs`, `reports.rs`, `recognition.rs`), so neither imports the other.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, FixedOffset};
use hmr_protocol::envelope::{code_for_status, Envelope, ErrorData};
use hmr_protocol::paths::{CONTENT_JSON, CONTENT_PDF, HEADER_RETRY_AFTER};
use hmr_protocol::{RecordResult, Scope};
use serde::Serialize;
use serde_json::Value;

use crate::error::SimError;
use crate::journal::Effect;
use crate::state::Remembered;

/// One answer, rendered, with what the journal says about it.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Bytes,
    pub retry_after: Option<u64>,
    pub effect: Effect,
    pub message: String,
    pub results: Option<Vec<RecordResult>>,
}

impl Rendered {
    pub fn ok<T: Serialize>(data: &T, effect: Effect, message: impl Into<String>) -> Rendered {
        let body = serde_json::to_vec(&Envelope::ok(data)).expect("answers serialize");
        Rendered {
            status: 200,
            content_type: CONTENT_JSON,
            body: body.into(),
            retry_after: None,
            effect,
            message: message.into(),
            results: None,
        }
    }

    /// `200` with `data: null` (revoke, PDF).
    pub fn done(effect: Effect, message: impl Into<String>) -> Rendered {
        Rendered::ok(&Value::Null, effect, message)
    }

    pub fn pdf(bytes: Bytes, message: impl Into<String>) -> Rendered {
        Rendered {
            status: 200,
            content_type: CONTENT_PDF,
            body: bytes,
            retry_after: None,
            effect: Effect::Unchanged,
            message: message.into(),
            results: None,
        }
    }

    pub fn error(e: &SimError) -> Rendered {
        let status = e.status().as_u16();
        let errors = e.field_errors();
        // A 400 always carries `data.errors`; other codes only when there is something to name.
        let data = (status == 400 || !errors.is_empty()).then_some(ErrorData { errors });
        Rendered::envelope(status, data, e.detail(), Effect::Rejected)
    }

    /// An injected status, in the envelope of that status.
    pub fn injected(status: u16) -> Rendered {
        let data = (status == 400).then(ErrorData::default);
        Rendered::envelope(status, data, "injected fault".into(), Effect::Fault)
    }

    pub fn rate_limited(retry_after_secs: u64) -> Rendered {
        let mut a = Rendered::envelope(
            429,
            None::<ErrorData>,
            format!("retry after {retry_after_secs} s"),
            Effect::Fault,
        );
        a.retry_after = Some(retry_after_secs);
        a
    }

    fn envelope<T: Serialize>(status: u16, data: Option<T>, detail: String, effect: Effect) -> Rendered {
        let (code, text) = code_for_status(status);
        let message = if detail.is_empty() {
            text.to_owned()
        } else {
            format!("{text}: {detail}")
        };
        let envelope = Envelope {
            code: code.into(),
            message: message.clone(),
            data,
        };
        Rendered {
            status,
            content_type: CONTENT_JSON,
            body: serde_json::to_vec(&envelope).expect("answers serialize").into(),
            retry_after: None,
            effect,
            message: detail,
            results: None,
        }
    }

    pub(crate) fn replay(r: &Remembered) -> Rendered {
        Rendered {
            status: r.status,
            content_type: r.content_type,
            body: r.body.clone(),
            retry_after: None,
            effect: Effect::Replayed,
            message: "idempotent replay".into(),
            results: None,
        }
    }

    pub fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Body::from(self.body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        if let Some(secs) = self.retry_after {
            headers.insert(HEADER_RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// What the journal records about the caller.
#[derive(Debug, Default)]
pub struct Trace {
    pub org: Option<String>,
    pub scope: Option<Scope>,
    pub request_id: Option<String>,
}

/// What a handler gets: the checked call and the asking org.
pub struct Call<'a> {
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    pub body: &'a [u8],
    pub org: &'a str,
    pub now: DateTime<FixedOffset>,
}
