//! The contract pipeline every `/api/v1` call goes through: faults, headers, token,
//! idempotency, the endpoint itself, then the journal.

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Duration;
use hmr_protocol::checks::org_code_valid;
use hmr_protocol::paths::{CONTENT_JSON, HEADER_ORG_CODE, HEADER_REQUEST_ID};
use hmr_protocol::{ReportType, Scope};
use serde_json::Value;

use crate::error::SimError;
use crate::faults::{Hostile, Injected};
use crate::handler::{Call, Rendered, Trace};
use crate::journal::{body_summary, Effect, Entry};
use crate::state::{Remembered, State};
use crate::{auth, recognition, records, reports, wire, Sim, SimConfig};

/// Request ids are remembered this long.
const IDEMPOTENCY_DAYS: i64 = 7;
/// Bodies are read up to this size; the 413 rules themselves are the contract's.
pub const READ_LIMIT: usize = 64 * 1024 * 1024;

/// The contract endpoints, with their path parameters.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Token,
    Patients,
    Departments,
    Staff,
    Report(ReportType),
    Revoke(ReportType, String),
    Pdf(ReportType, String, String),
    List,
    Query,
    Check,
    Decisions,
    Download(String),
    CheckDecisions(String),
}

impl Endpoint {
    /// The token scope (interface group) the endpoint belongs to.
    fn scope(&self) -> Option<Scope> {
        Some(match self {
            Endpoint::Token => return None,
            Endpoint::Patients | Endpoint::Departments | Endpoint::Staff => Scope::HisUpload,
            Endpoint::Report(t) | Endpoint::Revoke(t, _) | Endpoint::Pdf(t, _, _) => t.scope(),
            Endpoint::List
            | Endpoint::Query
            | Endpoint::Check
            | Endpoint::Decisions
            | Endpoint::Download(_)
            | Endpoint::CheckDecisions(_) => Scope::Recognition,
        })
    }

    fn is_get(&self) -> bool {
        matches!(
            self,
            Endpoint::List | Endpoint::Download(_) | Endpoint::CheckDecisions(_)
        )
    }
}

impl Sim {
    /// Runs one contract call end to end.
    pub(crate) async fn contract(self, ep: Endpoint, req: Request) -> Response {
        let (parts, body) = req.into_parts();
        let org_header = wire::header(&parts.headers, HEADER_ORG_CODE).unwrap_or("").to_owned();
        let mut trace = Trace {
            org: (!org_header.is_empty()).then(|| org_header.clone()),
            ..Trace::default()
        };
        let body = match axum::body::to_bytes(body, READ_LIMIT).await {
            Ok(b) => b,
            Err(_) => {
                let e = SimError::TooLarge(format!("body over {READ_LIMIT} bytes"));
                return self.finish(&parts, &Bytes::new(), trace, Rendered::error(&e));
            }
        };
        let hostile = match self.faults_for(parts.uri.path(), &org_header).await {
            Ok(hostile) => hostile,
            Err(answer) => return self.finish(&parts, &body, trace, answer),
        };
        if let Some(h) = hostile.as_ref().filter(|h| !h.processed()) {
            // A gateway or another server answered: the platform never saw the request.
            let mut noted = Rendered::injected(200);
            noted.message = format!("hostile answer ({h:?}); not processed");
            let response = hostile_unprocessed(h, &parts);
            noted.status = response.status().as_u16();
            self.record(&parts, &body, trace, &noted);
            return response;
        }
        let answer = {
            let mut st = self.lock();
            handle(&mut st, &self.inner.config, &ep, &parts, &body, &mut trace)
        };
        match hostile {
            Some(h) => {
                self.record(&parts, &body, trace, &answer);
                hostile_processed(&h, answer)
            }
            None => self.finish(&parts, &body, trace, answer),
        }
    }

    /// Waits out hangs and latency; `Err` is the injected answer, `Ok` a hostile mode to
    /// apply (or none).
    async fn faults_for(&self, path: &str, org: &str) -> Result<Option<Hostile>, Rendered> {
        let mut changes = self.inner.fault_changes.subscribe();
        loop {
            let plan = {
                let mut st = self.lock();
                let now = st.now();
                st.faults.plan(path, org, now)
            };
            if plan.hang {
                // Held until the faults are replaced, cleared or reset.
                if changes.changed().await.is_err() {
                    return Err(Rendered::injected(503));
                }
                continue;
            }
            if plan.latency_ms > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(plan.latency_ms)).await;
            }
            return match plan.answer {
                Some(Injected::Status(s)) => Err(Rendered::injected(s)),
                Some(Injected::RateLimited { retry_after_secs }) => Err(Rendered::rate_limited(retry_after_secs)),
                None => Ok(plan.hostile),
            };
        }
    }

    fn finish(&self, parts: &Parts, body: &[u8], trace: Trace, answer: Rendered) -> Response {
        self.record(parts, body, trace, &answer);
        answer.into_response()
    }

    /// Writes the call into the journal.
    fn record(&self, parts: &Parts, body: &[u8], trace: Trace, answer: &Rendered) {
        let content_type = wire::header(&parts.headers, header::CONTENT_TYPE.as_str());
        let mut st = self.lock();
        let entry = Entry {
            seq: 0,
            time: hmr_protocol::checks::format_time(&st.now()),
            org: trace.org,
            method: parts.method.as_str().to_owned(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned()),
            request_id: trace.request_id,
            scope: trace.scope.map(|s| s.as_str().to_owned()),
            status: answer.status,
            effect: answer.effect,
            message: answer.message.clone(),
            body: redact(body_summary(content_type, body)),
            results: answer.results.clone(),
        };
        tracing::info!(
            method = %entry.method, path = %entry.path, status = entry.status,
            effect = ?entry.effect, org = entry.org.as_deref().unwrap_or("-"), "{}", entry.message
        );
        st.journal.push(entry);
    }
}

/// What a gateway or another server answers in the platform's place.
fn hostile_unprocessed(h: &Hostile, parts: &Parts) -> Response {
    match h {
        Hostile::HtmlOk => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            "<html><body>gateway says hi</body></html>",
        )
            .into_response(),
        Hostile::JsonOk => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, CONTENT_JSON)],
            r#"{"result":"ok"}"#,
        )
            .into_response(),
        Hostile::Redirect { location, status } => {
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let target = format!("{}{path}", location.trim_end_matches('/'));
            let mut response = (StatusCode::from_u16(*status).unwrap_or(StatusCode::FOUND), "").into_response();
            if let Ok(v) = HeaderValue::from_str(&target) {
                response.headers_mut().insert(header::LOCATION, v);
            }
            response
        }
        // (processed modes are applied to the real answer)
        _ => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The platform's real answer, spoilt on its way back.
fn hostile_processed(h: &Hostile, answer: Rendered) -> Response {
    let body = answer.body.clone();
    match h {
        Hostile::SlowBody => {
            // One byte a second: no client waits that long.
            let length = body.len();
            let stream = futures_util::stream::unfold(0usize, move |i| {
                let body = body.clone();
                async move {
                    if i >= body.len() {
                        return None;
                    }
                    if i > 0 {
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                    Some((Ok::<_, std::io::Error>(body.slice(i..i + 1)), i + 1))
                }
            });
            response_with(
                answer.status,
                answer.content_type,
                Body::from_stream(stream),
                Some(length),
            )
        }
        Hostile::ResetMidBody => {
            let half = body.slice(..body.len() / 2);
            let stream = futures_util::stream::iter(vec![
                Ok(half),
                Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "cut")),
            ]);
            response_with(
                answer.status,
                answer.content_type,
                Body::from_stream(stream),
                Some(body.len()),
            )
        }
        Hostile::Oversized => {
            // A valid envelope followed by 17 MiB of whitespace: too large to read at all.
            let mut big = body.to_vec();
            big.resize(big.len() + 17 * 1024 * 1024, b' ');
            response_with(answer.status, answer.content_type, Body::from(big), None)
        }
        Hostile::MalformedAnswer => response_with(
            200,
            CONTENT_JSON,
            Body::from(r#"{"code":"00000","message":"成功","data":{"results":"garbled by a proxy"}}"#),
            None,
        ),
        _ => answer.into_response(),
    }
}

fn response_with(status: u16, content_type: &'static str, body: Body, length: Option<usize>) -> Response {
    let mut response = (StatusCode::from_u16(status).unwrap_or(StatusCode::OK), body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(n) = length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    response
}

fn handle(st: &mut State, cfg: &SimConfig, ep: &Endpoint, parts: &Parts, body: &[u8], trace: &mut Trace) -> Rendered {
    match checked(st, cfg, ep, parts, body, trace) {
        Ok(answer) => answer,
        Err(e) => Rendered::error(&e),
    }
}

/// Headers, token and idempotency around the endpoint.
fn checked(
    st: &mut State,
    cfg: &SimConfig,
    ep: &Endpoint,
    parts: &Parts,
    body: &[u8],
    trace: &mut Trace,
) -> Result<Rendered, SimError> {
    let headers = &parts.headers;
    let request_id = request_id(headers)?;
    trace.request_id = Some(request_id.clone());
    let org = org_code(headers)?;
    let now = st.now();
    let Some(scope) = ep.scope() else {
        // The token endpoint is never replayed: every call is fresh.
        return auth::issue(st, cfg, &org, headers, body, now, trace);
    };
    let token = auth::authenticate(st, headers, &org, scope, now)?;
    trace.org = Some(token.org.clone());
    trace.scope = Some(token.scope);

    let path_q = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    let fingerprint = fingerprint(parts.method.as_str(), &path_q, body);
    let key = (org.clone(), request_id.to_ascii_lowercase());
    if let Some(held) = st.idempotency.get(&key) {
        if held.at + Duration::days(IDEMPOTENCY_DAYS) > now {
            if held.fingerprint == fingerprint {
                return Ok(Rendered::replay(held));
            }
            return Err(SimError::Conflict {
                message: "X-Request-Id already used for a different request".into(),
                errors: vec![hmr_protocol::FieldError::new(HEADER_REQUEST_ID, "reused")],
            });
        }
    }

    let call = Call {
        headers,
        query: parts.uri.query(),
        body,
        org: &org,
        now,
    };
    let mut answer = dispatch(st, cfg, ep, &call).unwrap_or_else(|e| Rendered::error(&e));
    if answer.status == 200 && answer.effect == Effect::Rejected {
        answer.effect = Effect::Unchanged;
    }
    // Only final answers are remembered; after 401/404/429/5xx the retry gets a fresh answer.
    if matches!(answer.status, 200 | 400 | 409 | 413) {
        if st.idempotency.len() % 4096 == 4095 {
            st.idempotency
                .retain(|_, r| r.at + Duration::days(IDEMPOTENCY_DAYS) > now);
        }
        st.idempotency.insert(
            key,
            Remembered {
                fingerprint,
                status: answer.status,
                content_type: answer.content_type,
                body: answer.body.clone(),
                at: now,
            },
        );
    }
    Ok(answer)
}

fn dispatch(st: &mut State, cfg: &SimConfig, ep: &Endpoint, call: &Call) -> Result<Rendered, SimError> {
    if ep.is_get() {
        if !call.body.is_empty() {
            return Err(SimError::invalid("body", "not-allowed"));
        }
    } else if let Some(q) = call.query.filter(|q| !q.is_empty()) {
        // POST/PUT take no query parameters: the first one is an unknown field.
        let first = wire::query_value(Some(q))?;
        let key = first
            .as_object()
            .and_then(|m| m.keys().next().cloned())
            .unwrap_or_else(|| "query".into());
        return Err(SimError::invalid(key, "unknown-field"));
    }
    match ep {
        Endpoint::Token => unreachable!("handled before authentication"),
        Endpoint::Patients => records::patients(st, call),
        Endpoint::Departments => records::departments(st, call),
        Endpoint::Staff => records::staff(st, call),
        Endpoint::Report(kind) => reports::upload(st, cfg, call, *kind),
        Endpoint::Revoke(kind, no) => reports::revoke(st, call, *kind, no),
        Endpoint::Pdf(kind, no, version) => reports::pdf(st, call, *kind, no, version),
        Endpoint::List => recognition::list(st, cfg, call),
        Endpoint::Query => recognition::query(st, cfg, call),
        Endpoint::Check => recognition::check(st, cfg, call),
        Endpoint::Decisions => recognition::decide(st, cfg, call),
        Endpoint::Download(id) => recognition::download(st, call, id),
        Endpoint::CheckDecisions(id) => recognition::check_decisions(st, call, id),
    }
}

/// `X-Request-Id`: a canonical (8-4-4-4-12) UUID.
fn request_id(headers: &HeaderMap) -> Result<String, SimError> {
    let Some(id) = wire::header(headers, HEADER_REQUEST_ID) else {
        return Err(SimError::invalid(HEADER_REQUEST_ID, "required"));
    };
    // Of the forms uuid accepts, only the hyphenated one is 36 characters long.
    if id.len() != 36 || uuid::Uuid::try_parse(id).is_err() {
        return Err(SimError::invalid(HEADER_REQUEST_ID, "format"));
    }
    Ok(id.to_owned())
}

/// `X-Org-Code`: an 18-character 统一社会信用代码 with a valid check character.
fn org_code(headers: &HeaderMap) -> Result<String, SimError> {
    let Some(code) = wire::header(headers, HEADER_ORG_CODE) else {
        return Err(SimError::invalid(HEADER_ORG_CODE, "required"));
    };
    if code.len() != 18 || !code.is_ascii() || hmr_protocol::checks::org_code_check_char(&code[..17]).is_none() {
        return Err(SimError::invalid(HEADER_ORG_CODE, "format"));
    }
    if !org_code_valid(code) {
        return Err(SimError::invalid(HEADER_ORG_CODE, "checksum"));
    }
    Ok(code.to_owned())
}

/// "The same request": method, path with query, and body bytes.
fn fingerprint(method: &str, path_q: &str, body: &[u8]) -> String {
    let mut bytes = Vec::with_capacity(method.len() + path_q.len() + body.len() + 2);
    bytes.extend_from_slice(method.as_bytes());
    bytes.push(b'\n');
    bytes.extend_from_slice(path_q.as_bytes());
    bytes.push(b'\n');
    bytes.extend_from_slice(body);
    wire::sha256_hex(&bytes)
}

/// The journal is readable by anyone on loopback: never keep a password or signature in it.
fn redact(mut body: Value) -> Value {
    if let Some(obj) = body.as_object_mut() {
        for key in ["password", "sign"] {
            if let Some(v) = obj.get_mut(key) {
                *v = Value::String("***".into());
            }
        }
    }
    body
}
