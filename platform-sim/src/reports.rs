//! Sections 4 and 5: lab and exam report uploads, versions, revoke and PDFs.

use hmr_protocol::paths::HEADER_CONTENT_SHA256;
use hmr_protocol::{validate, FieldError, ReportType, Revoke};

use crate::error::SimError;
use crate::handler::{Call, Rendered};
use crate::journal::Effect;
use crate::state::{HeldVersion, ReportBody, State, StoredPdf};
use crate::{wire, SimConfig};

pub fn upload(st: &mut State, cfg: &SimConfig, call: &Call, kind: ReportType) -> Result<Rendered, SimError> {
    let value = wire::json_value(call.headers, call.body)?;
    let body = match kind {
        ReportType::Lab => {
            let r: hmr_protocol::LabReport = wire::typed(value)?;
            validate::lab_report(&r, &call.now)?;
            ReportBody::Lab(r)
        }
        ReportType::Exam => {
            let r: hmr_protocol::ExamReport = wire::typed(value)?;
            validate::exam_report(&r, &call.now)?;
            ReportBody::Exam(r)
        }
    };
    if let Some(code) = body.data_code() {
        if let Some(problem) = cfg.catalog.problem(code, kind) {
            return Err(SimError::invalid("dataCode", problem));
        }
    }
    let org = st.org_mut(call.org);
    let Some(patient) = org.patients.get(body.patient_id()) else {
        return Err(SimError::NotFound(format!(
            "patient {} not uploaded by this org",
            body.patient_id()
        )));
    };
    if !body.belongs_to(&patient.id_type, &patient.id_no) {
        let field = if body.id_type() != patient.id_type {
            "idType"
        } else {
            "idNo"
        };
        return Err(SimError::invalid(field, "patient-mismatch"));
    }

    let (report_no, version) = (body.report_no().to_owned(), body.version());
    let held = org.reports_mut(kind).entry(report_no.clone()).or_default();
    let newest = held.newest().map(|(v, _)| v);
    let what = format!("{} {report_no} v{version}", kind.as_str());
    match newest {
        Some(newest) if version <= newest => match held.versions.get(&version) {
            Some(same) if same.body == body => {
                Ok(Rendered::done(Effect::Unchanged, format!("{what}: same content held")))
            }
            Some(_) => Err(SimError::Conflict {
                message: format!("{what} is held with other content; a correction needs a higher version"),
                errors: vec![FieldError::new("version", "conflict")],
            }),
            None => Err(SimError::Conflict {
                message: format!("{what} is older than v{newest} held"),
                errors: vec![FieldError::new("version", "stale")],
            }),
        },
        _ => {
            let items = body.item_count();
            held.versions.insert(
                version,
                HeldVersion {
                    body,
                    revoked: None,
                    pdf: None,
                    received_at: call.now,
                },
            );
            Ok(Rendered::done(
                Effect::Applied,
                format!("{what} stored ({items} items)"),
            ))
        }
    }
}

pub fn revoke(st: &mut State, call: &Call, kind: ReportType, report_no: &str) -> Result<Rendered, SimError> {
    let value = wire::json_value(call.headers, call.body)?;
    let r: Revoke = wire::typed(value)?;
    validate::revoke(&r, &call.now)?;
    let what = format!("{} {report_no} v{}", kind.as_str(), r.version);
    let org = st.org_mut(call.org);
    let Some(held) = org.reports_mut(kind).get_mut(report_no) else {
        return Err(SimError::NotFound(format!(
            "{} report {report_no} not held",
            kind.as_str()
        )));
    };
    let Some(v) = held.versions.get_mut(&r.version) else {
        return Err(SimError::NotFound(format!("{what} not held")));
    };
    if v.revoked.is_some() {
        return Ok(Rendered::done(Effect::Unchanged, format!("{what} already revoked")));
    }
    v.revoked = Some(r);
    Ok(Rendered::done(Effect::Applied, format!("{what} revoked")))
}

pub fn pdf(
    st: &mut State,
    call: &Call,
    kind: ReportType,
    report_no: &str,
    version: &str,
) -> Result<Rendered, SimError> {
    let sha256 = wire::pdf_checks(call.headers, call.body, HEADER_CONTENT_SHA256)?;
    let version: u32 = match version.parse() {
        Ok(v) if v >= 1 && !version.starts_with('+') => v,
        _ => return Err(SimError::invalid("version", "format")),
    };
    let what = format!("{} {report_no} v{version} PDF", kind.as_str());
    let org = st.org_mut(call.org);
    let Some(v) = org
        .reports_mut(kind)
        .get_mut(report_no)
        .and_then(|h| h.versions.get_mut(&version))
    else {
        return Err(SimError::NotFound(format!(
            "{} {report_no} v{version} not held",
            kind.as_str()
        )));
    };
    if v.revoked.is_some() {
        return Err(SimError::conflict(format!("{what}: the version is revoked")));
    }
    match &v.pdf {
        Some(held) if held.sha256 == sha256 => Ok(Rendered::done(Effect::Unchanged, format!("{what}: same PDF held"))),
        Some(_) => Err(SimError::conflict(format!(
            "{what}: another PDF is held; a correction is a new version"
        ))),
        None => {
            let size = call.body.len();
            v.pdf = Some(StoredPdf {
                bytes: axum::body::Bytes::copy_from_slice(call.body),
                sha256,
            });
            Ok(Rendered::done(Effect::Applied, format!("{what} stored ({size} bytes)")))
        }
    }
}
