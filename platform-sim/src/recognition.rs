//! Section 6: recognition services: list, precise query, prescription check, decisions,
//! download, and the one-time pages the URLs point to.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, FixedOffset};
use hmr_protocol::checks::{format_time, id_card_problem, normalise_id_no, parse_time, ID_TYPES, VISIT_TYPES};
use hmr_protocol::{
    validate, CheckAnswer, CheckMatch, Decision, Decisions, FieldError, ItemsAnswer, ListAnswer, ListQuery,
    PreciseQuery, PrescriptionCheck, RecognitionItem, ReportType,
};
use serde::Deserialize;

use crate::error::SimError;
use crate::handler::{Call, Rendered};
use crate::journal::Effect;
use crate::state::{Check, DecisionRecord, DownloadRecord, HeldReport, ReportId, State, Ticket};
use crate::{wire, SimConfig};

/// How long an unused page ticket stays valid.
const TICKET_MINUTES: i64 = 30;

/// Query of `GET /reports/{reportId}/download`. The protocol crate builds this query
/// (`paths::download`) but has no type for it, so it is declared here.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DownloadQuery {
    format: String,
}

/// A recognisable report and its time, for sorting.
struct Found {
    item: RecognitionItem,
    reported: DateTime<FixedOffset>,
}

/// The report's offer, if it is recognisable now: newest version, not revoked, with a
/// catalog `dataCode`, and `reportedAt + validityDays × 24 h` still ahead.
fn offer(cfg: &SimConfig, org: &str, held: &HeldReport, now: DateTime<FixedOffset>) -> Option<Found> {
    let (version, v) = held.newest()?;
    if v.revoked.is_some() {
        return None;
    }
    let entry = cfg.catalog.get(v.body.data_code()?)?;
    if entry.report_type != v.body.kind() {
        return None;
    }
    let reported = v.body.reported_time()?;
    let valid_until = reported + Duration::hours(24 * i64::from(entry.validity_days));
    if valid_until <= now {
        return None;
    }
    let id = ReportId {
        org: org.to_owned(),
        kind: v.body.kind(),
        report_no: v.body.report_no().to_owned(),
        version,
    };
    Some(Found {
        item: RecognitionItem {
            report_id: id.to_string(),
            report_type: v.body.kind(),
            org_code: org.to_owned(),
            org_name: cfg.org_name(org),
            report_no: v.body.report_no().to_owned(),
            version,
            data_code: entry.data_code.clone(),
            item_name: entry.name.clone(),
            reported_at: v.body.reported_at().to_owned(),
            valid_until: format_time(&valid_until),
        },
        reported,
    })
}

/// Every report recognisable now for the person, newest `reportedAt` first.
fn recognisable(
    st: &State,
    cfg: &SimConfig,
    asking: &str,
    id_type: &str,
    id_no: &str,
    kind: Option<ReportType>,
    now: DateTime<FixedOffset>,
) -> Vec<RecognitionItem> {
    let mut found = Vec::new();
    for (org, data) in &st.orgs {
        if org == asking && !cfg.own_reports_recognisable {
            continue;
        }
        for t in [ReportType::Lab, ReportType::Exam] {
            if kind.is_some_and(|k| k != t) {
                continue;
            }
            for held in data.reports(t).values() {
                let Some((_, newest)) = held.newest() else { continue };
                if !newest.body.belongs_to(id_type, id_no) {
                    continue;
                }
                found.extend(offer(cfg, org, held, now));
            }
        }
    }
    found.sort_by(|a, b| {
        b.reported
            .cmp(&a.reported)
            .then_with(|| a.item.report_id.cmp(&b.item.report_id))
    });
    found.into_iter().map(|f| f.item).collect()
}

/// Whether the report version is still what would be offered now.
fn still_recognisable(st: &State, cfg: &SimConfig, report_id: &str, now: DateTime<FixedOffset>) -> bool {
    let Some(id) = ReportId::parse(report_id) else {
        return false;
    };
    let Some(held) = st.orgs.get(&id.org).and_then(|o| o.reports(id.kind).get(&id.report_no)) else {
        return false;
    };
    offer(cfg, &id.org, held, now).is_some_and(|f| f.item.report_id == report_id)
}

/// `idType` a code, `idNo` present (and for `01` a valid number once normalised).
fn person(id_type: &str, id_no: &str, errors: &mut Vec<FieldError>) {
    if id_type.is_empty() {
        errors.push(FieldError::new("idType", "required"));
    } else if !ID_TYPES.contains(&id_type) {
        errors.push(FieldError::new("idType", "code"));
    }
    let id_no = normalise_id_no(id_no);
    if id_no.is_empty() {
        errors.push(FieldError::new("idNo", "required"));
    } else if id_type == "01" {
        if let Some(problem) = id_card_problem(&id_no, None) {
            errors.push(FieldError::new("idNo", problem));
        }
    }
}

fn required(fields: &[(&str, &str)], errors: &mut Vec<FieldError>) {
    for (field, value) in fields {
        if value.trim().is_empty() {
            errors.push(FieldError::new(*field, "required"));
        }
    }
}

/// `type`: `lab`, `exam` or `all` (None).
fn kind_filter(value: &str, errors: &mut Vec<FieldError>) -> Option<ReportType> {
    match value {
        "all" => None,
        other => ReportType::parse(other).or_else(|| {
            errors.push(FieldError::new(
                "type",
                if other.is_empty() { "required" } else { "code" },
            ));
            None
        }),
    }
}

fn fail_if(errors: Vec<FieldError>) -> Result<(), SimError> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(SimError::Invalid(errors))
    }
}

fn issue_ticket(
    st: &mut State,
    cfg: &SimConfig,
    org: &str,
    title: String,
    items: Vec<RecognitionItem>,
    check_id: Option<String>,
) -> String {
    let ticket = uuid::Uuid::new_v4().simple().to_string();
    let expires_at = st.now() + Duration::minutes(TICKET_MINUTES);
    st.tickets.insert(
        ticket.clone(),
        Ticket {
            org: org.to_owned(),
            title,
            items,
            expires_at,
            check_id,
        },
    );
    format!("{}/page/{ticket}", cfg.public_base())
}

/// `GET /recognitions`: all six parameters required.
pub fn list(st: &mut State, cfg: &SimConfig, call: &Call) -> Result<Rendered, SimError> {
    let q: ListQuery = wire::typed(wire::query_value(call.query)?)?;
    let mut errors = vec![];
    person(&q.id_type, &q.id_no, &mut errors);
    required(
        &[
            ("visitNo", &q.visit_no),
            ("doctorNo", &q.doctor_no),
            ("deptCode", &q.dept_code),
        ],
        &mut errors,
    );
    let kind = kind_filter(&q.kind, &mut errors);
    fail_if(errors)?;
    let items = recognisable(st, cfg, call.org, &q.id_type, &q.id_no, kind, call.now);
    let title = format!("互认信息列表 · 就诊 {}", q.visit_no);
    let url = issue_ticket(st, cfg, call.org, title, items.clone(), None);
    let message = format!("{} recognisable item(s)", items.len());
    Ok(Rendered::ok(
        &ListAnswer {
            count: items.len(),
            url,
            items,
        },
        Effect::Unchanged,
        message,
    ))
}

/// `POST /recognitions/query`: the recognisable items, filtered.
pub fn query(st: &mut State, cfg: &SimConfig, call: &Call) -> Result<Rendered, SimError> {
    let q: PreciseQuery = wire::typed(wire::json_value(call.headers, call.body)?)?;
    let mut errors = vec![];
    person(&q.id_type, &q.id_no, &mut errors);
    let kind = q.kind.as_deref().and_then(|k| kind_filter(k, &mut errors));
    let mut bound = |field: &str, value: &Option<String>| {
        value.as_deref().and_then(|v| {
            let t = parse_time(v);
            if t.is_none() {
                errors.push(FieldError::new(field, "format"));
            }
            t
        })
    };
    let (from, to) = (bound("from", &q.from), bound("to", &q.to));
    fail_if(errors)?;
    let items: Vec<_> = recognisable(st, cfg, call.org, &q.id_type, &q.id_no, kind, call.now)
        .into_iter()
        .filter(|i| q.org_code.as_ref().is_none_or(|c| &i.org_code == c))
        .filter(|i| q.org_name.as_ref().is_none_or(|n| i.org_name.contains(n.as_str())))
        .filter(|i| q.data_codes.as_ref().is_none_or(|codes| codes.contains(&i.data_code)))
        .filter(|i| q.item_name.as_ref().is_none_or(|n| i.item_name.contains(n.as_str())))
        .filter(|i| {
            let t = parse_time(&i.reported_at);
            from.is_none_or(|f| t.is_some_and(|t| t >= f)) && to.is_none_or(|e| t.is_some_and(|t| t <= e))
        })
        .collect();
    let message = format!("{} item(s) match", items.len());
    Ok(Rendered::ok(&ItemsAnswer { items }, Effect::Unchanged, message))
}

/// `POST /prescriptions/check`: which orders repeat a recognisable result.
pub fn check(st: &mut State, cfg: &SimConfig, call: &Call) -> Result<Rendered, SimError> {
    let c: PrescriptionCheck = wire::typed(wire::json_value(call.headers, call.body)?)?;
    let mut errors = vec![];
    person(&c.id_type, &c.id_no, &mut errors);
    required(
        &[
            ("patientId", &c.patient_id),
            ("visitNo", &c.visit_no),
            ("doctorNo", &c.doctor_no),
            ("deptCode", &c.dept_code),
        ],
        &mut errors,
    );
    if !VISIT_TYPES.contains(&c.visit_type.as_str()) {
        errors.push(FieldError::new(
            "visitType",
            if c.visit_type.is_empty() { "required" } else { "code" },
        ));
    }
    if c.orders.is_empty() {
        errors.push(FieldError::new("orders", "required"));
    }
    let mut seen = BTreeSet::new();
    for (i, o) in c.orders.iter().enumerate() {
        let at = |f: &str| format!("orders[{i}].{f}");
        for (f, v) in [
            ("orderId", &o.order_id),
            ("localItemCode", &o.local_item_code),
            ("dataCode", &o.data_code),
        ] {
            if v.trim().is_empty() {
                errors.push(FieldError::new(at(f), "required"));
            }
        }
        if !o.data_code.is_empty() {
            if let Some(problem) = cfg.catalog.problem(&o.data_code, o.report_type) {
                errors.push(FieldError::new(at("dataCode"), problem));
            }
        }
        if !o.order_id.is_empty() && !seen.insert(o.order_id.as_str()) {
            errors.push(FieldError::new(at("orderId"), "duplicate"));
        }
    }
    fail_if(errors)?;
    let Some(patient) = st.orgs.get(call.org).and_then(|o| o.patients.get(&c.patient_id)) else {
        return Err(SimError::NotFound(format!(
            "patient {} not uploaded by this org",
            c.patient_id
        )));
    };
    if patient.id_type != c.id_type || normalise_id_no(&patient.id_no) != normalise_id_no(&c.id_no) {
        let field = if patient.id_type != c.id_type { "idType" } else { "idNo" };
        return Err(SimError::invalid(field, "patient-mismatch"));
    }

    let all = recognisable(st, cfg, call.org, &c.id_type, &c.id_no, None, call.now);
    let mut matches = Vec::new();
    let mut matched = BTreeMap::new();
    for o in &c.orders {
        let reports: Vec<_> = all
            .iter()
            .filter(|i| i.data_code == o.data_code && i.report_type == o.report_type)
            .cloned()
            .collect();
        if !reports.is_empty() {
            matched.insert(
                o.order_id.clone(),
                reports.iter().map(|r| r.report_id.clone()).collect(),
            );
            matches.push(CheckMatch {
                order_id: o.order_id.clone(),
                data_code: o.data_code.clone(),
                reports,
            });
        }
    }
    let check_id = uuid::Uuid::new_v4().to_string();
    let title = format!("处方互认校验 · 就诊 {}", c.visit_no);
    let offered: Vec<RecognitionItem> = matches.iter().flat_map(|m| m.reports.clone()).collect();
    let url = issue_ticket(st, cfg, call.org, title, offered, Some(check_id.clone()));
    st.checks.insert(
        check_id.clone(),
        Check {
            org: call.org.to_owned(),
            patient_id: c.patient_id.clone(),
            created_at: call.now,
            doctor_no: c.doctor_no.clone(),
            dept_code: c.dept_code.clone(),
            matched,
            decided: None,
            page: BTreeMap::new(),
        },
    );
    let message = format!(
        "check {check_id}: {} of {} order(s) matched",
        matches.len(),
        c.orders.len()
    );
    let answer = CheckAnswer {
        duplicate: !matches.is_empty(),
        check_id,
        url,
        matches,
    };
    Ok(Rendered::ok(&answer, Effect::Applied, message))
}

/// `POST /recognitions/decisions`: one decision per matched order of the check.
pub fn decide(st: &mut State, cfg: &SimConfig, call: &Call) -> Result<Rendered, SimError> {
    let d: Decisions = wire::typed(wire::json_value(call.headers, call.body)?)?;
    validate::decisions(&d, &call.now)?;
    let Some(check) = st.checks.get(&d.check_id).filter(|c| c.org == call.org) else {
        return Err(SimError::NotFound(format!("check {} unknown to this org", d.check_id)));
    };
    if let Some(held) = &check.decided {
        // The same decisions (taken on the page, or uploaded before) replay; others conflict.
        let sorted = |ds: &[Decision]| {
            let mut v = ds.to_vec();
            v.sort_by(|a, b| a.order_id.cmp(&b.order_id));
            v
        };
        return if sorted(&held.decisions) == sorted(&d.decisions) {
            Ok(Rendered::done(
                Effect::Unchanged,
                format!("check {}: same decisions held", d.check_id),
            ))
        } else {
            Err(SimError::Conflict {
                message: format!("check {}: other decisions already recorded", d.check_id),
                errors: (0..d.decisions.len())
                    .map(|i| FieldError::new(format!("decisions[{i}]"), "already-decided"))
                    .collect(),
            })
        };
    }

    // Orders decided on the page count as uploaded: the upload must carry the same decision
    // for them (§6); a different one is `409` decisions[i] / already-decided.
    let differing: Vec<FieldError> = d
        .decisions
        .iter()
        .enumerate()
        .filter(|(_, one)| {
            check.page.get(&one.order_id).is_some_and(|p| {
                p.report_id != one.report_id || p.recognise != one.recognise || p.reason_code != one.reason_code
            })
        })
        .map(|(i, _)| FieldError::new(format!("decisions[{i}]"), "already-decided"))
        .collect();
    if !differing.is_empty() {
        return Err(SimError::Conflict {
            message: format!("check {}: decided otherwise on the page", d.check_id),
            errors: differing,
        });
    }

    let mut errors = vec![];
    let mut decided = BTreeSet::new();
    for (i, one) in d.decisions.iter().enumerate() {
        let at = |f: &str| format!("decisions[{i}].{f}");
        match check.matched.get(&one.order_id) {
            None => errors.push(FieldError::new(at("orderId"), "not-matched")),
            Some(_) if !decided.insert(one.order_id.as_str()) => {
                errors.push(FieldError::new(at("orderId"), "duplicate"))
            }
            Some(offered) if !offered.contains(&one.report_id) => {
                errors.push(FieldError::new(at("reportId"), "not-offered"))
            }
            Some(_) => {}
        }
    }
    if errors.is_empty() && decided.len() != check.matched.len() {
        errors.push(FieldError::new("decisions", "missing-order"));
    }
    fail_if(errors)?;
    // What was offered may have been revoked, superseded or expired since the check.
    let stale: Vec<_> = d
        .decisions
        .iter()
        .enumerate()
        .filter(|(_, one)| one.recognise && !still_recognisable(st, cfg, &one.report_id, call.now))
        .map(|(i, _)| FieldError::new(format!("decisions[{i}].reportId"), "not-recognisable"))
        .collect();
    if !stale.is_empty() {
        return Err(SimError::Conflict {
            message: "a report is no longer recognisable".into(),
            errors: stale,
        });
    }

    let recognised = d.decisions.iter().filter(|one| one.recognise).count();
    let message = format!(
        "check {}: {recognised} recognised, {} declined",
        d.check_id,
        d.decisions.len() - recognised
    );
    let org = st.orgs.entry(call.org.to_owned()).or_default();
    org.recognised.extend(
        d.decisions
            .iter()
            .filter(|one| one.recognise)
            .map(|one| one.report_id.clone()),
    );
    org.decisions.push(DecisionRecord {
        check_id: d.check_id.clone(),
        doctor_no: d.doctor_no.clone(),
        dept_code: d.dept_code.clone(),
        decided_at: d.decided_at.clone(),
        received_at: format_time(&call.now),
        decisions: d.decisions.clone(),
    });
    if let Some(check) = st.checks.get_mut(&d.check_id) {
        check.decided = Some(d);
    }
    Ok(Rendered::done(Effect::Applied, message))
}

/// `GET /reports/{reportId}/download?format=pdf|json`: only what this org recognised.
pub fn download(st: &mut State, call: &Call, report_id: &str) -> Result<Rendered, SimError> {
    let q: DownloadQuery = wire::typed(wire::query_value(call.query)?)?;
    if q.format != "pdf" && q.format != "json" {
        return Err(SimError::invalid(
            "format",
            if q.format.is_empty() { "required" } else { "code" },
        ));
    }
    let allowed = st.orgs.get(call.org).is_some_and(|o| o.recognised.contains(report_id));
    if !allowed {
        return Err(SimError::Forbidden(format!(
            "{report_id} was not recognised by a decision of this org"
        )));
    }
    let Some(version) = ReportId::parse(report_id).and_then(|id| st.version(&id)) else {
        return Err(SimError::NotFound(format!("{report_id} not held")));
    };
    // Revoked at its source since it was recognised: not to be used any more (docs/protocol.md
    // D32: the contract is silent; this is our reading).
    if let Some(revoked) = &version.revoked {
        return Err(SimError::Conflict {
            message: format!("{report_id} was revoked by its hospital at {}", revoked.revoked_at),
            errors: vec![hmr_protocol::FieldError::new("reportId", "revoked")],
        });
    }
    let answer = if q.format == "pdf" {
        let Some(pdf) = &version.pdf else {
            return Err(SimError::NotFound(format!("{report_id}: no PDF uploaded")));
        };
        Rendered::pdf(pdf.bytes.clone(), format!("{report_id} PDF downloaded"))
    } else {
        Rendered::ok(&version.body, Effect::Unchanged, format!("{report_id} JSON downloaded"))
    };
    let at = format_time(&call.now);
    st.org_mut(call.org).downloads.push(DownloadRecord {
        report_id: report_id.to_owned(),
        format: q.format,
        at,
    });
    Ok(answer)
}

/// One order's choice on a check's page.
pub struct PageChoice {
    pub order_id: String,
    /// The report recognised (empty for 不互认: the first offered is recorded).
    pub report_id: String,
    pub recognise: bool,
    pub reason_code: Option<String>,
    pub reason_text: Option<String>,
}

/// Decisions taken on a check's page (§6), all or none: each must be valid and offered. When
/// every matched order is decided there, the check counts as decided (an upload of the same
/// decisions replays; others are `409`). `doctor_no` defaults to the check's doctor.
pub fn take_page_decision(
    st: &mut State,
    check_id: &str,
    choices: &[PageChoice],
    doctor_no: Option<&str>,
) -> Result<(), SimError> {
    let now = st.now();
    let (org_code, all) = {
        let Some(check) = st.checks.get_mut(check_id) else {
            return Err(SimError::NotFound("unknown check".into()));
        };
        if check.decided.is_some() {
            return Err(SimError::conflict("this check is decided already"));
        }
        let doctor_no = doctor_no.map_or_else(|| check.doctor_no.clone(), str::to_string);
        let mut errors = Vec::new();
        let mut taken = Vec::new();
        for c in choices {
            let Some(offered) = check.matched.get(&c.order_id) else {
                errors.push(FieldError::new(format!("{}.orderId", c.order_id), "not-matched"));
                continue;
            };
            let report_id = if c.report_id.is_empty() && !c.recognise {
                offered.first().cloned().unwrap_or_default()
            } else {
                c.report_id.clone()
            };
            if !offered.contains(&report_id) {
                errors.push(FieldError::new(format!("{}.reportId", c.order_id), "not-offered"));
                continue;
            }
            let decision = Decision {
                order_id: c.order_id.clone(),
                report_id,
                recognise: c.recognise,
                reason_code: if c.recognise { None } else { c.reason_code.clone() },
                reason_text: if c.recognise { None } else { c.reason_text.clone() },
            };
            match validate::decision(&decision) {
                Ok(()) => taken.push(decision),
                Err(e) => errors.push(FieldError::new(format!("{}.{}", c.order_id, e.field), e.reason)),
            }
        }
        fail_if(errors)?;
        for d in taken {
            check.page.insert(
                d.order_id.clone(),
                hmr_protocol::CheckDecision {
                    order_id: d.order_id,
                    report_id: d.report_id,
                    recognise: d.recognise,
                    reason_code: d.reason_code,
                    reason_text: d.reason_text,
                    doctor_no: doctor_no.clone(),
                    decided_at: format_time(&now),
                    source: hmr_protocol::DecisionSource::Page,
                },
            );
        }
        if check.page.len() < check.matched.len() {
            return Ok(());
        }
        let all = Decisions {
            check_id: check_id.to_owned(),
            doctor_no,
            dept_code: check.dept_code.clone(),
            decided_at: format_time(&now),
            decisions: check
                .page
                .values()
                .map(|d| Decision {
                    order_id: d.order_id.clone(),
                    report_id: d.report_id.clone(),
                    recognise: d.recognise,
                    reason_code: d.reason_code.clone(),
                    reason_text: d.reason_text.clone(),
                })
                .collect(),
        };
        check.decided = Some(all.clone());
        (check.org.clone(), all)
    };
    let org = st.orgs.entry(org_code).or_default();
    org.recognised.extend(
        all.decisions
            .iter()
            .filter(|d| d.recognise)
            .map(|d| d.report_id.clone()),
    );
    org.decisions.push(DecisionRecord {
        check_id: check_id.to_owned(),
        doctor_no: all.doctor_no.clone(),
        dept_code: all.dept_code.clone(),
        decided_at: all.decided_at.clone(),
        received_at: format_time(&now),
        decisions: all.decisions,
    });
    Ok(())
}

/// `GET /prescriptions/checks/{checkId}` (§6): what is decided so far, on the page or uploaded.
pub fn check_decisions(st: &State, call: &Call, check_id: &str) -> Result<Rendered, SimError> {
    if call.query.is_some_and(|q| !q.is_empty()) {
        return Err(SimError::invalid("query", "unknown-field"));
    }
    let Some(check) = st.checks.get(check_id) else {
        return Err(SimError::NotFound(format!("check {check_id} unknown")));
    };
    if check.org != call.org {
        return Err(SimError::Forbidden(
            "only the org that asked the check may read it".into(),
        ));
    }
    // The page's decisions, then the uploaded ones for the other orders.
    let decisions: Vec<hmr_protocol::CheckDecision> = check
        .page
        .values()
        .cloned()
        .chain(check.decided.iter().flat_map(|d| {
            d.decisions
                .iter()
                .filter(|one| !check.page.contains_key(&one.order_id))
                .map(move |one| hmr_protocol::CheckDecision {
                    order_id: one.order_id.clone(),
                    report_id: one.report_id.clone(),
                    recognise: one.recognise,
                    reason_code: one.reason_code.clone(),
                    reason_text: one.reason_text.clone(),
                    doctor_no: d.doctor_no.clone(),
                    decided_at: d.decided_at.clone(),
                    source: hmr_protocol::DecisionSource::Upload,
                })
        }))
        .collect();
    let answer = hmr_protocol::CheckDecisions {
        check_id: check_id.to_string(),
        complete: check.decided.is_some(),
        decisions,
    };
    Ok(Rendered::ok(
        &answer,
        Effect::Unchanged,
        format!("check {check_id} read"),
    ))
}
