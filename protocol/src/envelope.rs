//! The response envelope, the answer codes, and what a client does with each answer.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::FieldError;

/// Every JSON response: `{"code": "00000", "message": "成功", "data": …}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub code: String,
    pub message: String,
    #[serde(default = "Option::default")]
    pub data: Option<T>,
}

pub const CODE_OK: &str = "00000";
pub const CODE_INVALID: &str = "A0400";
pub const CODE_UNAUTHORIZED: &str = "A0301";
pub const CODE_FORBIDDEN: &str = "A0303";
pub const CODE_NOT_FOUND: &str = "A0404";
pub const CODE_CONFLICT: &str = "A0409";
pub const CODE_TOO_LARGE: &str = "A0413";
pub const CODE_RATE_LIMITED: &str = "A0429";
pub const CODE_FAULT: &str = "B0001";

/// The platform code and a default message for an HTTP status.
pub fn code_for_status(status: u16) -> (&'static str, &'static str) {
    match status {
        200 => (CODE_OK, "成功"),
        400 => (CODE_INVALID, "请求参数错误"),
        401 => (CODE_UNAUTHORIZED, "令牌缺失、无效或已过期"),
        403 => (CODE_FORBIDDEN, "无权调用"),
        404 => (CODE_NOT_FOUND, "引用的报告或患者不存在"),
        409 => (CODE_CONFLICT, "冲突"),
        413 => (CODE_TOO_LARGE, "请求体过大"),
        429 => (CODE_RATE_LIMITED, "请求过于频繁"),
        _ => (CODE_FAULT, "平台故障"),
    }
}

impl<T> Envelope<T> {
    pub fn ok(data: T) -> Self {
        Envelope {
            code: CODE_OK.into(),
            message: "成功".into(),
            data: Some(data),
        }
    }
}

/// `data` of a 400 answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorData {
    #[serde(default)]
    pub errors: Vec<FieldError>,
}

/// What the client does with an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Delivered (also an idempotent replay).
    Done,
    /// Try again later; `after` is the platform's `Retry-After` when it gave one.
    Retry { after: Option<Duration>, reason: String },
    /// The token was refused: refresh it once and try again.
    RefreshToken,
    /// The platform does not know a record this one references (patient, report):
    /// upload the dependency, then retry.
    MissingDependency { reason: String },
    /// Will never succeed as sent: quarantine with the platform's field and reason.
    Permanent {
        status: u16,
        code: String,
        message: String,
        errors: Vec<FieldError>,
    },
}

/// Largest answer body a client reads (a platform can misbehave too).
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Longest pause a `Retry-After` can ask for; larger values are cut to this, so a hostile
/// header cannot overflow a clock (`Instant + Duration` panics) or stall a client for ever.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Maps an HTTP answer to what the client does. `retry_after` is the raw header.
pub fn classify(status: u16, retry_after: Option<&str>, body: &[u8]) -> Outcome {
    let envelope = loose_envelope(body);
    let message = envelope.as_ref().map(|e| e.message.clone()).unwrap_or_default();
    match status {
        // Success is only what the platform said: its envelope with the success code. A
        // gateway's HTML page or any other JSON is not an answer: retry (the request id
        // makes the retry safe).
        200..=299 => match &envelope {
            Some(e) if e.code == CODE_OK => Outcome::Done,
            Some(e) => Outcome::Permanent {
                status,
                code: e.code.clone(),
                message,
                errors: vec![],
            },
            None => Outcome::Retry {
                after: None,
                reason: format!("{}: {}", NOT_AN_ENVELOPE, preview(body)),
            },
        },
        // Never followed (the request would go to another host): the platform must answer.
        300..=399 => Outcome::Retry {
            after: None,
            reason: format!("HTTP {status}: a redirect, not followed"),
        },
        401 => Outcome::RefreshToken,
        404 => Outcome::MissingDependency { reason: message },
        429 => Outcome::Retry {
            after: retry_after
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|secs| Duration::from_secs(secs).min(MAX_RETRY_AFTER)),
            reason: "rate limited".into(),
        },
        400 | 403 | 409 | 413 => {
            let errors = envelope
                .as_ref()
                .and_then(|e| e.data.clone())
                .and_then(|d| serde_json::from_value::<ErrorData>(d).ok())
                .map(|d| d.errors)
                .unwrap_or_default();
            let code = envelope
                .map(|e| e.code)
                .unwrap_or_else(|| code_for_status(status).0.into());
            Outcome::Permanent {
                status,
                code,
                message,
                errors,
            }
        }
        // 408, 5xx and anything unexpected: the platform may recover.
        _ => Outcome::Retry {
            after: None,
            reason: format!("HTTP {status}"),
        },
    }
}

/// The start of `last_error` for a 2xx that is not the platform's envelope (metrics count it).
pub const NOT_AN_ENVELOPE: &str = "2xx without the platform's envelope";

/// What an answer to `request` means: a PDF download is a PDF (`%PDF-`), everything else the
/// platform's envelope (`classify`).
pub fn classify_answer(
    request: &crate::paths::Request,
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
) -> Outcome {
    if crate::paths::expects_pdf(request) && (200..300).contains(&status) {
        return if body.starts_with(b"%PDF-") {
            Outcome::Done
        } else {
            Outcome::Retry {
                after: None,
                reason: format!("{}: {}", NOT_AN_ENVELOPE, preview(body)),
            }
        };
    }
    classify(status, retry_after, body)
}

/// The first bytes of a body for an error message: printable, identity numbers masked.
pub fn preview(body: &[u8]) -> String {
    let head = &body[..body.len().min(80)];
    let text: String = String::from_utf8_lossy(head)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let more = if body.len() > head.len() { "…" } else { "" };
    format!("{:?}{more} ({} bytes)", crate::mask::scrub(&text), body.len())
}

/// The envelope of an answer, read leniently: an answer that leaves out `message` or sends
/// a code that is not a string still names its code (a 2xx naming a code other than
/// `00000` must not count as delivered). `None` when the body names no code.
fn loose_envelope(body: &[u8]) -> Option<Envelope<serde_json::Value>> {
    use serde_json::Value;
    let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    let code = match map.remove("code")? {
        Value::Null => return None,
        Value::String(code) => code,
        other => other.to_string(),
    };
    let message = match map.remove("message") {
        Some(Value::String(message)) => message,
        _ => String::new(),
    };
    let data = map.remove("data").filter(|d| !d.is_null());
    Some(Envelope { code, message, data })
}

/// Parses the `data` of a successful answer.
pub fn parse_data<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, crate::ProtocolError> {
    if body.len() > MAX_ANSWER_BYTES {
        return Err(crate::ProtocolError::Shape {
            field: "body".into(),
            reason: "too-large".into(),
        });
    }
    let envelope: Envelope<T> = serde_json::from_slice(body)?;
    envelope.data.ok_or_else(|| crate::ProtocolError::Shape {
        field: "data".into(),
        reason: "required".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_statuses_to_outcomes() {
        assert_eq!(
            classify(200, None, br#"{"code":"00000","message":"ok","data":null}"#),
            Outcome::Done
        );
        assert_eq!(classify(401, None, b""), Outcome::RefreshToken);
        assert_eq!(
            classify(429, Some("7"), b""),
            Outcome::Retry {
                after: Some(Duration::from_secs(7)),
                reason: "rate limited".into()
            }
        );
        assert!(matches!(
            classify(503, None, b"garbage"),
            Outcome::Retry { after: None, .. }
        ));
        assert!(matches!(classify(404, None, b"{}"), Outcome::MissingDependency { .. }));
        let body = br#"{"code":"A0400","message":"bad","data":{"errors":[{"field":"idNo","reason":"checksum"}]}}"#;
        match classify(400, None, body) {
            Outcome::Permanent { status, errors, .. } => {
                assert_eq!(status, 400);
                assert_eq!(errors, vec![FieldError::new("idNo", "checksum")]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(409, None, b"not json"),
            Outcome::Permanent { status: 409, .. }
        ));
    }

    #[test]
    fn only_the_platforms_envelope_is_success() {
        for body in [
            &b"<html>gateway says hi</html>"[..],
            br#"{"result":"ok"}"#,
            b"",
            br#"{"code":null,"data":{}}"#,
        ] {
            match classify(200, None, body) {
                Outcome::Retry { after: None, reason } => assert!(reason.starts_with(NOT_AN_ENVELOPE), "{reason}"),
                other => panic!("{body:?}: {other:?}"),
            }
        }
        match classify(200, None, b"<p>patient 441302198003151233</p>") {
            Outcome::Retry { reason, .. } => assert!(!reason.contains("441302198003151233"), "{reason}"),
            other => panic!("{other:?}"),
        }
        for status in [301, 302, 307, 308] {
            assert!(matches!(classify(status, None, b""), Outcome::Retry { .. }));
        }
        let pdf = crate::paths::download("R1", "pdf");
        assert_eq!(classify_answer(&pdf, 200, None, b"%PDF-1.7 ..."), Outcome::Done);
        assert!(matches!(
            classify_answer(&pdf, 200, None, b"<html>"),
            Outcome::Retry { .. }
        ));
        let json = crate::paths::download("R1", "json");
        assert!(matches!(
            classify_answer(&json, 200, None, b"%PDF-1.7"),
            Outcome::Retry { .. }
        ));
        assert_eq!(
            crate::paths::location_host("http://127.0.0.2:9/x?idNo=1"),
            "127.0.0.2:9"
        );
        assert_eq!(crate::paths::location_host("/elsewhere"), "the same host");
    }
}
