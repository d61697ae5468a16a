//! The control API under `/_sim/` for tests, demos and go-live rehearsal. No auth;
//! loopback callers only unless configured otherwise. Faults never apply here.

use std::fmt::Write as _;
use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Query, Request, State as AxState};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hmr_protocol::checks::format_time;
use hmr_protocol::ReportType;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::faults::FaultSpec;
use crate::journal::Effect;
use crate::state::{OrgData, ReportBody, State};
use crate::{auth, Sim};

pub fn router(sim: Sim) -> Router<Sim> {
    Router::new()
        .route("/faults", post(set_faults).delete(clear_faults).get(get_faults))
        .route("/requests", get(requests))
        .route("/state", get(state))
        .route("/reset", post(reset))
        .route("/summary", get(summary))
        .route("/clock", get(get_clock).post(set_clock))
        .route("/pdf/{org}/{kind}/{report_no}/{version}", get(stored_pdf))
        .route("/tokens", get(issued_tokens))
        .route_layer(middleware::from_fn_with_state(sim, loopback_only))
}

/// Refuses non-loopback callers. Embedded use without a socket (tests) has no peer address.
async fn loopback_only(AxState(sim): AxState<Sim>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    if let Some(peer) = peer {
        if !peer.ip().is_loopback() && !sim.inner.config.control_from_anywhere {
            return problem(StatusCode::FORBIDDEN, "the control API answers loopback callers only");
        }
    }
    next.run(req).await
}

fn problem(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// A control body; an empty one is `{}`.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

async fn set_faults(AxState(sim): AxState<Sim>, body: Bytes) -> Response {
    let spec: FaultSpec = match parse_body(&body) {
        Ok(s) => s,
        Err(e) => return problem(StatusCode::BAD_REQUEST, &e),
    };
    if let Err(e) = spec.check() {
        return problem(StatusCode::BAD_REQUEST, &e.detail());
    }
    {
        let mut st = sim.lock();
        if spec.expire_tokens_now == Some(true) {
            auth::expire_all(&mut st);
        }
        tracing::warn!(faults = ?spec, "faults set");
        st.faults.set(spec);
    }
    sim.faults_changed();
    get_faults(AxState(sim)).await
}

async fn clear_faults(AxState(sim): AxState<Sim>) -> Response {
    sim.lock().faults.clear();
    sim.faults_changed();
    tracing::info!("faults cleared");
    get_faults(AxState(sim)).await
}

async fn get_faults(AxState(sim): AxState<Sim>) -> Response {
    let st = sim.lock();
    let now = st.now();
    let holds: serde_json::Map<String, Value> = st
        .faults
        .holds
        .iter()
        .filter(|(_, until)| **until > now)
        .map(|(org, until)| (org.clone(), Value::String(format_time(until))))
        .collect();
    Json(json!({
        "faults": st.faults.spec,
        "status_left": st.faults.status_left,
        "rate_limit_left": st.faults.rate_left,
        "holds": holds,
    }))
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Since {
    #[serde(default)]
    since: u64,
}

async fn requests(AxState(sim): AxState<Sim>, Query(q): Query<Since>) -> Response {
    let st = sim.lock();
    Json(json!({ "last_seq": st.journal.last_seq(), "requests": st.journal.since(q.since) })).into_response()
}

async fn reset(AxState(sim): AxState<Sim>) -> Response {
    {
        let mut st = sim.lock();
        *st = State::new(sim.inner.config.orgs.iter().map(|o| o.code.clone()));
    }
    // Releases held requests too.
    sim.faults_changed();
    tracing::warn!("simulator reset");
    Json(json!({ "reset": true })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Clock {
    offset_secs: i64,
}

async fn get_clock(AxState(sim): AxState<Sim>) -> Response {
    let st = sim.lock();
    Json(json!({ "now": format_time(&st.now()), "offset_secs": st.clock_offset_secs })).into_response()
}

/// Shifts the simulator's clock (token expiry, validity windows, signature timestamps).
async fn set_clock(AxState(sim): AxState<Sim>, body: Bytes) -> Response {
    let clock: Clock = match parse_body(&body) {
        Ok(c) => c,
        Err(e) => return problem(StatusCode::BAD_REQUEST, &e),
    };
    sim.lock().clock_offset_secs = clock.offset_secs;
    get_clock(AxState(sim)).await
}

/// Every token issued and still remembered: a rehearsal checks its own logs for them.
async fn issued_tokens(AxState(sim): AxState<Sim>) -> Response {
    let st = sim.lock();
    let tokens: Vec<Value> = st
        .tokens
        .iter()
        .map(|(t, i)| serde_json::json!({"token": t, "org": i.org, "scope": i.scope.as_str()}))
        .collect();
    Json(Value::Array(tokens)).into_response()
}

/// The PDF held for one report version, as received (for checking it as a person would).
async fn stored_pdf(
    AxState(sim): AxState<Sim>,
    axum::extract::Path((org, kind, report_no, version)): axum::extract::Path<(String, String, String, u32)>,
) -> Response {
    let st = sim.lock();
    let Some(kind) = ReportType::parse(&kind) else {
        return (StatusCode::NOT_FOUND, "kind is lab or exam").into_response();
    };
    let pdf = st
        .orgs
        .get(&org)
        .and_then(|d| d.reports(kind).get(&report_no))
        .and_then(|r| r.versions.get(&version))
        .and_then(|v| v.pdf.as_ref());
    match pdf {
        Some(p) => ([(axum::http::header::CONTENT_TYPE, "application/pdf")], p.bytes.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, "no PDF held for that version").into_response(),
    }
}

async fn state(AxState(sim): AxState<Sim>) -> Response {
    let st = sim.lock();
    let cfg = &sim.inner.config;
    let orgs: serde_json::Map<String, Value> = st
        .orgs
        .iter()
        .map(|(code, data)| (code.clone(), org_state(&cfg.org_name(code), data)))
        .collect();
    let checks: Vec<Value> = st
        .checks
        .iter()
        .map(|(id, c)| {
            json!({
                "check_id": id, "org": c.org, "patient_id": c.patient_id,
                "created_at": format_time(&c.created_at), "matched": c.matched, "decided": c.decided.is_some(),
            })
        })
        .collect();
    Json(json!({
        "now": format_time(&st.now()),
        "orgs": orgs,
        "checks": checks,
        "tokens": st.tokens.len(),
        "open_tickets": st.tickets.len(),
        "remembered_request_ids": st.idempotency.len(),
        "catalog_entries": cfg.catalog.len(),
    }))
    .into_response()
}

fn org_state(name: &str, d: &OrgData) -> Value {
    let reports = |kind: ReportType| -> serde_json::Map<String, Value> {
        d.reports(kind)
            .iter()
            .map(|(no, held)| {
                let versions: Vec<Value> = held
                    .versions
                    .iter()
                    .map(|(v, h)| {
                        json!({
                            "version": v,
                            "revoked": h.revoked.is_some(),
                            "has_pdf": h.pdf.is_some(),
                            "pdf_sha256": h.pdf.as_ref().map(|p| p.sha256.clone()),
                            "data_code": h.body.data_code(),
                            "item_count": h.body.item_count(),
                            "reported_at": h.body.reported_at(),
                            "patient_id": h.body.patient_id(),
                            "received_at": format_time(&h.received_at),
                        })
                    })
                    .collect();
                (no.clone(), json!({ "versions": versions }))
            })
            .collect()
    };
    json!({
        "name": name,
        "patients": d.patients.iter().map(|(id, p)| (id.clone(), json!({"updated_at": p.updated_at, "name": p.name})))
            .collect::<serde_json::Map<_, _>>(),
        "departments": d.departments.iter()
            .map(|(c, x)| (c.clone(), json!({"name": x.dept_name, "parent_code": x.parent_code, "updated_at": x.updated_at})))
            .collect::<serde_json::Map<_, _>>(),
        "staff": d.staff.iter()
            .map(|(n, x)| (n.clone(), json!({"name": x.name, "dept_code": x.dept_code, "updated_at": x.updated_at})))
            .collect::<serde_json::Map<_, _>>(),
        "lab_reports": reports(ReportType::Lab),
        "exam_reports": reports(ReportType::Exam),
        "decisions": d.decisions,
        "recognised": d.recognised,
        "downloads": d.downloads,
    })
}

/// A plain-text account of what arrived, for the demo to print.
async fn summary(AxState(sim): AxState<Sim>) -> Response {
    let st = sim.lock();
    let cfg = &sim.inner.config;
    let mut out = String::new();
    let _ = writeln!(out, "hmr-platform-sim at {}", format_time(&st.now()));
    for (code, d) in &st.orgs {
        let _ = writeln!(out, "\n{} {}", code, cfg.org_name(code));
        let _ = writeln!(
            out,
            "  patients {}, departments {}, staff {}",
            d.patients.len(),
            d.departments.len(),
            d.staff.len()
        );
        // Small dictionaries are listed (a real one has hundreds: counts only then).
        if d.departments.len() <= 20 {
            for dept in d.departments.values() {
                let _ = writeln!(
                    out,
                    "  dept {} {} campus={} std={}{}",
                    dept.dept_code,
                    dept.dept_name,
                    dept.campus_code,
                    dept.std_dept_code,
                    dept.parent_code
                        .as_deref()
                        .map(|p| format!(" parent={p}"))
                        .unwrap_or_default()
                );
            }
        }
        if d.staff.len() <= 20 {
            for s in d.staff.values() {
                let _ = writeln!(
                    out,
                    "  staff {} {} dept={} {}{}",
                    s.staff_no,
                    s.name,
                    s.dept_code,
                    s.role.as_deref().unwrap_or("-"),
                    if s.external == Some(true) { " (external)" } else { "" }
                );
            }
        }
        for kind in [ReportType::Lab, ReportType::Exam] {
            for (no, held) in d.reports(kind) {
                for (v, h) in &held.versions {
                    let _ = writeln!(
                        out,
                        "  {} {} v{}{}{} dataCode={} items={} reportedAt={}",
                        kind.as_str(),
                        no,
                        v,
                        if h.revoked.is_some() { " REVOKED" } else { "" },
                        if h.pdf.is_some() { " +pdf" } else { "" },
                        h.body.data_code().unwrap_or("-"),
                        h.body.item_count(),
                        h.body.reported_at(),
                    );
                    // The results as received, so a person can compare them with the LIS.
                    if let ReportBody::Lab(r) = &h.body {
                        for item in &r.items {
                            let _ = writeln!(
                                out,
                                "      {} {} = {} {}{}{}",
                                item.item_code,
                                item.item_name,
                                item.result_value,
                                item.result_unit.as_deref().unwrap_or(""),
                                item.reference_range
                                    .as_deref()
                                    .map(|r| format!(" ({r})"))
                                    .unwrap_or_default(),
                                match item.abnormal_flag.as_deref() {
                                    Some("2") => " ↑",
                                    Some("3") => " ↓",
                                    Some("4") => " *",
                                    _ => "",
                                },
                            );
                        }
                    }
                }
            }
        }
        for rec in &d.decisions {
            for one in &rec.decisions {
                let verdict = if one.recognise {
                    "互认".to_owned()
                } else {
                    format!("不互认({})", one.reason_code.as_deref().unwrap_or("-"))
                };
                let _ = writeln!(
                    out,
                    "  decision {} order {} {} {}",
                    rec.check_id, one.order_id, one.report_id, verdict
                );
            }
        }
        for dl in &d.downloads {
            let _ = writeln!(out, "  download {} {} at {}", dl.report_id, dl.format, dl.at);
        }
    }
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for e in st.journal.iter() {
        *counts.entry(format!("{:?}", e.effect).to_lowercase()).or_default() += 1;
    }
    let total: usize = counts.values().sum();
    let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(out, "\nrequests {total}: {}", parts.join(", "));
    let faults = st.journal.iter().filter(|e| e.effect == Effect::Fault).count();
    if faults > 0 {
        let _ = writeln!(out, "injected faults answered {faults} request(s)");
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], out).into_response()
}
