//! Paths, headers and request builders. A [`Request`] is plain data: the worker sends it,
//! freezes it in the outbox for an exact retry, and the simulator routes the same paths.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};

use crate::types::*;

pub const HEADER_ORG_CODE: &str = "X-Org-Code";
pub const HEADER_REQUEST_ID: &str = "X-Request-Id";
pub const HEADER_CONTENT_SHA256: &str = "X-Content-SHA256";
pub const HEADER_RETRY_AFTER: &str = "Retry-After";
pub const CONTENT_JSON: &str = "application/json";
pub const CONTENT_PDF: &str = "application/pdf";

/// Route patterns (axum syntax) for the simulator; clients use the builders below.
pub mod route {
    pub const TOKEN: &str = "/api/v1/auth/token";
    pub const PATIENTS: &str = "/api/v1/patients";
    pub const DEPARTMENTS: &str = "/api/v1/departments";
    pub const STAFF: &str = "/api/v1/staff";
    pub const LAB_REPORTS: &str = "/api/v1/lab-reports";
    pub const LAB_REVOKE: &str = "/api/v1/lab-reports/{report_no}/revoke";
    pub const LAB_PDF: &str = "/api/v1/lab-reports/{report_no}/versions/{version}/pdf";
    pub const EXAM_REPORTS: &str = "/api/v1/exam-reports";
    pub const EXAM_REVOKE: &str = "/api/v1/exam-reports/{report_no}/revoke";
    pub const EXAM_PDF: &str = "/api/v1/exam-reports/{report_no}/versions/{version}/pdf";
    pub const RECOGNITIONS: &str = "/api/v1/recognitions";
    pub const RECOGNITIONS_QUERY: &str = "/api/v1/recognitions/query";
    pub const PRESCRIPTION_CHECK: &str = "/api/v1/prescriptions/check";
    pub const DECISIONS: &str = "/api/v1/recognitions/decisions";
    pub const CHECK_DECISIONS: &str = "/api/v1/prescriptions/checks/{check_id}";
    pub const DOWNLOAD: &str = "/api/v1/reports/{report_id}/download";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Method {
    Get,
    Post,
    Put,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
        }
    }
}

/// One HTTP request to the platform, without the per-try headers (token, request id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub method: Method,
    /// Path with query string, e.g. `/api/v1/recognitions?idType=01&…`.
    pub path: String,
    /// The token scope it needs; `None` only for the token request itself.
    pub scope: Option<Scope>,
    pub content_type: Option<String>,
    /// Extra headers the contract asks for (the PDF hash).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(with = "body_text")]
    pub body: Vec<u8>,
}

impl Request {
    /// Its URL at the platform's `base` (with or without a trailing slash).
    pub fn url(&self, base: &str) -> String {
        format!("{}{}", base.trim_end_matches('/'), self.path)
    }

    /// Every header it goes out with, in order: the org, the request id, the token (when it
    /// needs one), its content type and the contract's extra headers. Both HTTP clients (the
    /// worker's, async; the extension's, blocking inside a backend) send exactly these.
    pub fn wire_headers(&self, org_code: &str, request_id: &str, token: Option<&str>) -> Vec<(String, String)> {
        let mut out = vec![
            (HEADER_ORG_CODE.to_string(), org_code.to_string()),
            (HEADER_REQUEST_ID.to_string(), request_id.to_string()),
        ];
        if let Some(t) = token {
            out.push(("Authorization".to_string(), format!("Bearer {t}")));
        }
        if let Some(ct) = &self.content_type {
            out.push(("Content-Type".to_string(), ct.clone()));
        }
        out.extend(self.headers.iter().cloned());
        out
    }
}

/// JSON bodies are kept as text when a request is frozen; others as hex.
mod body_text {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(body: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(body) {
            Ok(text) => s.serialize_str(&format!("t:{text}")),
            Err(_) => s.serialize_str(&format!("x:{}", hex::encode(body))),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if let Some(t) = s.strip_prefix("t:") {
            Ok(t.as_bytes().to_vec())
        } else if let Some(x) = s.strip_prefix("x:") {
            hex::decode(x).map_err(serde::de::Error::custom)
        } else {
            Err(serde::de::Error::custom("frozen body without t:/x: prefix"))
        }
    }
}

/// Path segments and query values: everything but unreserved characters is escaped.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

pub fn encode(value: &str) -> String {
    utf8_percent_encode(value, SEGMENT).to_string()
}

fn json<T: Serialize>(method: Method, path: String, scope: Option<Scope>, body: &T) -> Request {
    Request {
        method,
        path,
        scope,
        content_type: Some(CONTENT_JSON.into()),
        headers: vec![],
        body: serde_json::to_vec(body).expect("wire types always serialize"),
    }
}

fn report_base(t: ReportType) -> &'static str {
    match t {
        ReportType::Lab => route::LAB_REPORTS,
        ReportType::Exam => route::EXAM_REPORTS,
    }
}

pub fn token(req: &TokenRequest) -> Request {
    json(Method::Post, route::TOKEN.into(), None, req)
}

pub fn patients(records: &[Patient]) -> Request {
    json(
        Method::Post,
        route::PATIENTS.into(),
        Some(Scope::HisUpload),
        &Batch {
            records: records.to_vec(),
        },
    )
}

pub fn departments(records: &[Department]) -> Request {
    json(
        Method::Post,
        route::DEPARTMENTS.into(),
        Some(Scope::HisUpload),
        &Batch {
            records: records.to_vec(),
        },
    )
}

pub fn staff(records: &[Staff]) -> Request {
    json(
        Method::Post,
        route::STAFF.into(),
        Some(Scope::HisUpload),
        &Batch {
            records: records.to_vec(),
        },
    )
}

pub fn lab_report(report: &LabReport) -> Request {
    json(Method::Post, route::LAB_REPORTS.into(), Some(Scope::LabUpload), report)
}

pub fn exam_report(report: &ExamReport) -> Request {
    json(
        Method::Post,
        route::EXAM_REPORTS.into(),
        Some(Scope::ExamUpload),
        report,
    )
}

pub fn revoke(t: ReportType, report_no: &str, body: &Revoke) -> Request {
    let path = format!("{}/{}/revoke", report_base(t), encode(report_no));
    json(Method::Post, path, Some(t.scope()), body)
}

pub fn pdf(t: ReportType, report_no: &str, version: u32, pdf: Vec<u8>) -> Request {
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(&pdf));
    Request {
        method: Method::Put,
        path: format!("{}/{}/versions/{version}/pdf", report_base(t), encode(report_no)),
        scope: Some(t.scope()),
        content_type: Some(CONTENT_PDF.into()),
        headers: vec![(HEADER_CONTENT_SHA256.into(), hash)],
        body: pdf,
    }
}

pub fn list_recognitions(q: &ListQuery) -> Request {
    let path = format!(
        "{}?idType={}&idNo={}&visitNo={}&doctorNo={}&deptCode={}&type={}",
        route::RECOGNITIONS,
        encode(&q.id_type),
        encode(&q.id_no),
        encode(&q.visit_no),
        encode(&q.doctor_no),
        encode(&q.dept_code),
        encode(&q.kind)
    );
    Request {
        method: Method::Get,
        path,
        scope: Some(Scope::Recognition),
        content_type: None,
        headers: vec![],
        body: vec![],
    }
}

pub fn precise_query(q: &PreciseQuery) -> Request {
    json(
        Method::Post,
        route::RECOGNITIONS_QUERY.into(),
        Some(Scope::Recognition),
        q,
    )
}

pub fn prescription_check(c: &PrescriptionCheck) -> Request {
    json(
        Method::Post,
        route::PRESCRIPTION_CHECK.into(),
        Some(Scope::Recognition),
        c,
    )
}

pub fn decisions(d: &Decisions) -> Request {
    json(Method::Post, route::DECISIONS.into(), Some(Scope::Recognition), d)
}

/// 互认页面操作结果 (§6): what is decided so far for a check, on its page or uploaded. A new
/// request each poll (a reused request id would replay the first answer).
pub fn check_decisions(check_id: &str) -> Request {
    Request {
        method: Method::Get,
        path: format!("/api/v1/prescriptions/checks/{}", encode(check_id)),
        scope: Some(Scope::Recognition),
        content_type: None,
        headers: vec![],
        body: vec![],
    }
}

/// `format` is `pdf` or `json`.
/// Whether the answer to `request` is a PDF rather than the JSON envelope.
pub fn expects_pdf(request: &Request) -> bool {
    request.method == Method::Get
        && request.path.starts_with("/api/v1/reports/")
        && request.path.ends_with("format=pdf")
}

/// The host (and port) a `Location` header points to, for a message; `?` when unreadable.
pub fn location_host(location: &str) -> String {
    let rest = location.split_once("://").map_or(location, |(_, r)| r);
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = host.rsplit('@').next().unwrap_or_default();
    if host.is_empty() {
        "the same host".into()
    } else {
        host.to_string()
    }
}

pub fn download(report_id: &str, format: &str) -> Request {
    let path = format!(
        "/api/v1/reports/{}/download?format={}",
        encode(report_id),
        encode(format)
    );
    Request {
        method: Method::Get,
        path,
        scope: Some(Scope::Recognition),
        content_type: None,
        headers: vec![],
        body: vec![],
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_clients_send_the_same_headers() {
        let r = pdf(ReportType::Lab, "L1", 2, b"%PDF-1.7".to_vec());
        let h = r.wire_headers("124413004567890125", "id-1", Some("tok"));
        let names: Vec<&str> = h.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            &names[..4],
            [HEADER_ORG_CODE, HEADER_REQUEST_ID, "Authorization", "Content-Type"]
        );
        assert_eq!(h[2].1, "Bearer tok");
        assert_eq!(
            h.len(),
            4 + r.headers.len(),
            "the contract's extra headers too (the PDF hash)"
        );
        assert!(!r.headers.is_empty());
        let get = check_decisions("c1").wire_headers("o", "i", None);
        assert_eq!(
            get.len(),
            2,
            "a GET without a token: the org and the request id only: {get:?}"
        );
        assert_eq!(r.url("http://p/"), format!("http://p{}", r.path));
    }

    use super::*;

    #[test]
    fn paths_escape_report_numbers() {
        let r = revoke(
            ReportType::Lab,
            "L/2024 01",
            &Revoke {
                version: 1,
                reason: "x".into(),
                revoked_at: "t".into(),
                operator_no: "o".into(),
            },
        );
        assert_eq!(r.path, "/api/v1/lab-reports/L%2F2024%2001/revoke");
    }

    #[test]
    fn frozen_request_round_trips() {
        let r = pdf(ReportType::Exam, "E1", 2, b"%PDF-\xff".to_vec());
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        let j = download("R1", "pdf");
        assert_eq!(
            serde_json::from_str::<Request>(&serde_json::to_string(&j).unwrap()).unwrap(),
            j
        );
    }
}
