//! Deciding what one event's delivery is: facts in, a decision out, no I/O.
//!
//! `drain.rs` reads the facts a delivery needs (the source row, what the platform holds,
//! the item map, the patient's state, the source's PDF), calls a function here, and then
//! carries the decision out (freeze and send, finish, quarantine, wait). Every delivery rule
//! (version, revoke, unchanged, dependency, unmapped, quarantine) lives here and is unit
//! tested at this level.

use chrono::{DateTime, FixedOffset};
use hmr_protocol::paths::{self, Request};
use hmr_protocol::{
    source, validate, Decisions, Department, FieldError, Kind, Patient, ProtocolError, ReportType, Revoke, Staff,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The frozen requests of one event, and what the platform holds once they succeed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub requests: Vec<Request>,
    pub version: i32,
    pub content_hash: String,
    pub revoked: bool,
    /// For download steps: the report id and format whose answer is kept.
    #[serde(default, rename = "keep")]
    pub retain: Vec<Option<(String, String)>>,
    /// How request ids are derived (`Plan::request_id`): 1 (from 0.3.0) includes what each step
    /// sends; 0, plans frozen by an older worker, event and step only.
    #[serde(default, rename = "ids")]
    pub id_scheme: u8,
}

/// Namespace of request ids: UUIDv5 of the event, its retry generation and the step.
const REQUEST_ID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6a8f_4c1e_9b2d_4e57_a3c0_5d1f_7e92_b604);

pub fn request_id(name: &str) -> uuid::Uuid {
    uuid::Uuid::new_v5(&REQUEST_ID_NAMESPACE, name.as_bytes())
}

impl Plan {
    /// The request id of step `index` of event `event_id` (in its retry `generation`): the
    /// same on every retry of the frozen plan; and, because it covers what the step sends
    /// (method, path, headers, body), one id never stands for two different requests — even
    /// after a failover that lost a frozen plan and reused its event's id (the sequence of an
    /// asynchronous replica lags the lost primary's).
    pub fn request_id(&self, event_id: i64, generation: i32, index: usize) -> uuid::Uuid {
        if self.id_scheme == 0 {
            return request_id(&format!("{event_id}:{generation}:{index}"));
        }
        let r = &self.requests[index];
        let mut h = <sha2::Sha256 as sha2::Digest>::new();
        for part in [
            r.method.as_str().as_bytes(),
            r.path.as_bytes(),
            r.content_type.as_deref().unwrap_or("").as_bytes(),
        ] {
            sha2::Digest::update(&mut h, part);
            sha2::Digest::update(&mut h, [0u8]);
        }
        for (name, value) in &r.headers {
            sha2::Digest::update(&mut h, name.as_bytes());
            sha2::Digest::update(&mut h, value.as_bytes());
            sha2::Digest::update(&mut h, [0u8]);
        }
        sha2::Digest::update(&mut h, &r.body);
        let sent = hex::encode(sha2::Digest::finalize(h));
        request_id(&format!("{event_id}:{generation}:{index}:{sent}"))
    }

    /// The request that uploads a PDF: its body is frozen as bytes beside the plan (in
    /// `plan_pdf`), not hex-encoded inside it.
    pub fn pdf_step(&self) -> Option<usize> {
        self.requests
            .iter()
            .position(|r| r.content_type.as_deref() == Some(paths::CONTENT_PDF))
    }

    /// The plan as frozen: JSON without the PDF body, and the PDF body.
    pub fn freeze(&self) -> (Value, Option<Vec<u8>>) {
        let mut stored = self.clone();
        let pdf = stored.pdf_step().map(|i| std::mem::take(&mut stored.requests[i].body));
        (serde_json::to_value(&stored).expect("plans serialize"), pdf)
    }

    pub fn thaw(frozen: &Value, pdf: Option<&Vec<u8>>) -> Result<Plan, String> {
        let mut plan: Plan = serde_json::from_value(frozen.clone()).map_err(|e| e.to_string())?;
        if let Some(i) = plan.pdf_step() {
            if plan.requests[i].body.is_empty() {
                plan.requests[i].body = pdf.cloned().ok_or("the frozen PDF is missing")?;
            }
        }
        Ok(plan)
    }
}

/// How an event ends without a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The platform already holds this content.
    Unchanged,
    /// Nothing to send (not in the source view and nothing held; no decisions).
    Skipped,
}

impl Ending {
    pub const fn as_str(self) -> &'static str {
        match self {
            Ending::Unchanged => "unchanged",
            Ending::Skipped => "skipped",
        }
    }
}

/// What the platform holds of a record, as far as we know (`hmr.delivered`).
#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    pub version: i32,
    pub content_hash: String,
    pub revoked: bool,
}

/// What the source says of an un-audit.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Revocation {
    pub reason: Option<String>,
    pub operator_no: Option<String>,
    pub revoked_at: Option<String>,
}

/// An event parked for the DBA: the column (or platform field) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantine {
    pub field: String,
    pub reason: String,
    pub message: String,
    /// What it waits for: the event is released once that record is delivered, or that
    /// mapping is added.
    pub waits_for: Option<WaitsFor>,
}

/// What a quarantined event waits for (`hmr.outbox.waits_for_kind`, `waits_for_key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitsFor {
    /// A record of another kind (a report's patient, a department's parent).
    Record(Kind, String),
    /// A mapping of a local item code in `hmr.item_map` (released by its trigger).
    Mapping(ReportType, String),
}

impl WaitsFor {
    /// As stored: (`waits_for_kind`, `waits_for_key`).
    pub fn columns(&self) -> (&'static str, String) {
        match self {
            WaitsFor::Record(kind, key) => (kind.as_str(), key.clone()),
            WaitsFor::Mapping(t, local) => ("item_map", format!("{}:{local}", t.as_str())),
        }
    }
}

impl Quarantine {
    pub fn new(field: impl Into<String>, reason: impl Into<String>, message: impl Into<String>) -> Quarantine {
        Quarantine {
            field: field.into(),
            reason: reason.into(),
            message: message.into(),
            waits_for: None,
        }
    }

    /// The platform's permanent refusal of a `kind` upload, for the DBA: its first field error
    /// named as the source view's column, and the whole answer as the message.
    pub fn refused(kind: Kind, status: u16, code: &str, message: &str, errors: &[FieldError]) -> Quarantine {
        let first = errors
            .first()
            .cloned()
            .unwrap_or_else(|| FieldError::new("", format!("http-{status}")));
        Quarantine::new(
            hmr_protocol::source::column_for_field(kind.as_str(), &first.field),
            first.reason,
            format!("HTTP {status} {code} {message}"),
        )
    }
}

/// What to do with one event. `S` is what is sent: a frozen `Plan` for reports and
/// decisions, a record for master data (batched by the caller).
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict<S> {
    Send(S),
    Finish(Ending, &'static str),
    Quarantine(Quarantine),
    /// A record the platform needs first is not there yet: enqueue it and wait.
    Wait(Kind, String),
}

/// What the platform holds of a record this one references (a report's patient, a staff
/// member's department, a department's parent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    Held,
    /// Quarantined: its DBA must fix it first.
    Quarantined,
    /// Not (yet) delivered, but in its source view: it is on its way.
    Missing,
    /// Neither delivered nor in its source view: nothing will bring it but the DBA.
    Absent,
}

/// A record another one names: its kind and key, and the column that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub kind: Kind,
    pub key: String,
    /// The referencing column (`patient_id`, `dept_code`, `parent_code`).
    pub field: &'static str,
}

impl Reference {
    /// The reason a record is refused when what it names does not exist: the platform's
    /// words for the same refusal (`unknown-dept`, `unknown-parent`).
    fn unknown(&self) -> &'static str {
        match self.field {
            "parent_code" => "unknown-parent",
            "dept_code" => "unknown-dept",
            _ => "unknown-patient",
        }
    }
}

/// The platform item code of a report whose source gives a local code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemCode {
    /// The source gives `data_code` itself, or no local code to map.
    AsSource,
    /// `hmr.item_map` maps the local code.
    Mapped(String),
    /// No mapping yet (listed in `hmr.unmapped_items` for the DBA). The kind's policy
    /// (`hmr.kinds.unmapped`): `hold` — the report waits until the code is mapped; `send` —
    /// it goes without a code (shared, never recognised) and again with it once mapped.
    Unmapped { local: String, hold: bool },
}

/// Settings the rules depend on.
pub struct Rules<'a> {
    pub now: DateTime<FixedOffset>,
    /// Who revokes when the source does not say (`platform.revoke_operator_no`).
    pub revoke_operator_no: &'a str,
    /// Waits for a missing dependency before the event is quarantined.
    pub max_dependency_attempts: i32,
    /// Renders a PDF when the source has none (`pdf.render`).
    pub renderer: Option<&'a hmr_pdf::Renderer>,
}

/// Everything a report's delivery depends on, as read by the drainer.
#[derive(Debug, Clone)]
pub struct ReportFacts {
    pub kind: Kind,
    pub key: String,
    /// The report's row in its source view; `None`: not there (deleted, un-audited).
    pub row: Option<Map<String, Value>>,
    pub items: Vec<Value>,
    pub held: Option<Delivered>,
    /// What the source records of an un-audit (read when there is something to revoke).
    pub revocation: Option<Revocation>,
    pub item_code: ItemCode,
    pub patient: Dependency,
    /// The source's own PDF (`pdf` column or `pdf_path`).
    pub source_pdf: Option<Vec<u8>>,
    /// What a rendered PDF prints beyond the report: names, gender, birth date, statement.
    pub pdf: Option<hmr_pdf::Context>,
    /// Attempts so far, this one included.
    pub attempts: i32,
}

impl ReportFacts {
    /// The patient the row references (to read its state before planning).
    pub fn patient_id(row: &Map<String, Value>) -> Option<&str> {
        row.get("patient_id").and_then(Value::as_str)
    }
}

/// A report: upload a new version (data, then PDF), revoke what the platform holds, or
/// nothing.
pub fn report(f: ReportFacts, rules: &Rules) -> Verdict<Plan> {
    let Some(report_type) = f.kind.report_type() else {
        return Verdict::Finish(Ending::Skipped, "not a report kind");
    };
    let Some(mut row) = f.row else {
        return match f.held {
            Some(h) if !h.revoked => Verdict::Send(revoke_plan(report_type, &f.key, h, f.revocation, rules)),
            _ => Verdict::Finish(Ending::Skipped, "not in the source view, nothing held"),
        };
    };
    if let ItemCode::Mapped(code) = &f.item_code {
        row.insert("data_code".into(), Value::String(code.clone()));
    }
    let version = f.held.as_ref().map_or(1, |h| h.version + 1);
    let built = match report_type {
        ReportType::Lab => build_lab(&row, f.items, version, rules, f.pdf.as_ref()),
        ReportType::Exam => build_exam(&row, version, rules, f.pdf.as_ref()),
    };
    let Built {
        request,
        hash,
        patient_id,
        rendered,
    } = match built {
        Ok(b) => b,
        Err(e) => return Verdict::Quarantine(invalid(f.kind, &e)),
    };
    if f.held.as_ref().is_some_and(|h| h.content_hash == hash && !h.revoked) {
        return Verdict::Finish(Ending::Unchanged, "same content as delivered");
    }
    // Without its platform code no other hospital could ever recognise the result.
    if let ItemCode::Unmapped { local, hold: true } = &f.item_code {
        return Verdict::Quarantine(Quarantine {
            field: "local_item_code".into(),
            reason: "unmapped".into(),
            message: format!(
                "local item code {local} is not mapped in hmr.item_map: the report waits (policy hold) and goes by itself once it is mapped"
            ),
            waits_for: Some(WaitsFor::Mapping(report_type, local.clone())),
        });
    }
    // The platform refuses a report whose patient it has not received: that goes first.
    if f.patient != Dependency::Held {
        let patient = Reference {
            kind: Kind::Patient,
            key: patient_id,
            field: "patient_id",
        };
        return dependency(&patient, f.patient, f.attempts, rules);
    }
    let pdf = match (f.source_pdf, rendered) {
        (Some(bytes), _) => Some(bytes),
        (None, Some(Ok(bytes))) => Some(bytes),
        (None, Some(Err(e))) => {
            return Verdict::Quarantine(Quarantine {
                field: "pdf".into(),
                reason: "render".into(),
                message: format!("rendering the PDF failed: {e}"),
                waits_for: None,
            })
        }
        (None, None) => None,
    };
    let mut requests = vec![request];
    if let Some(bytes) = pdf {
        let reason = if bytes.len() > hmr_protocol::checks::MAX_PDF_BYTES {
            Some("too-large")
        } else if !bytes.starts_with(b"%PDF-") {
            Some("not-a-pdf")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Verdict::Quarantine(Quarantine {
                field: "pdf".into(),
                reason: reason.into(),
                message: "the source's PDF cannot be uploaded".into(),
                waits_for: None,
            });
        }
        requests.push(paths::pdf(report_type, &f.key, version as u32, bytes));
    }
    Verdict::Send(Plan {
        requests,
        version,
        content_hash: hash,
        revoked: false,
        retain: vec![],
        id_scheme: 1,
    })
}

struct Built {
    request: Request,
    hash: String,
    patient_id: String,
    rendered: Option<Result<Vec<u8>, hmr_pdf::PdfError>>,
}

fn build_lab(
    row: &Map<String, Value>,
    items: Vec<Value>,
    version: i32,
    rules: &Rules,
    pdf: Option<&hmr_pdf::Context>,
) -> Result<Built, ProtocolError> {
    let items: Vec<Value> = items
        .into_iter()
        .map(|i| match i {
            Value::Object(m) => Value::Object(source::LAB_ITEM.to_fields(&m)),
            other => other,
        })
        .collect();
    let mut extra = Map::new();
    extra.insert("version".into(), json!(version));
    extra.insert("items".into(), Value::Array(items));
    let source::Record::LabReport(r) = source::Record::read(Kind::LabReport, row, extra, &rules.now)? else {
        unreachable!("a lab report reads as one")
    };
    Ok(Built {
        request: paths::lab_report(&r),
        hash: source::content_hash(&r),
        patient_id: r.patient_id.clone(),
        rendered: rules.renderer.zip(pdf).map(|(p, ctx)| p.lab(&r, ctx)),
    })
}

fn build_exam(
    row: &Map<String, Value>,
    version: i32,
    rules: &Rules,
    pdf: Option<&hmr_pdf::Context>,
) -> Result<Built, ProtocolError> {
    let mut extra = Map::new();
    extra.insert("version".into(), json!(version));
    let source::Record::ExamReport(r) = source::Record::read(Kind::ExamReport, row, extra, &rules.now)? else {
        unreachable!("an exam report reads as one")
    };
    Ok(Built {
        request: paths::exam_report(&r),
        hash: source::content_hash(&r),
        patient_id: r.patient_id.clone(),
        rendered: rules.renderer.zip(pdf).map(|(p, ctx)| p.exam(&r, ctx)),
    })
}

/// Revokes the version the platform holds, with the source's reason and operator when it
/// records them.
fn revoke_plan(t: ReportType, key: &str, held: Delivered, said: Option<Revocation>, rules: &Rules) -> Plan {
    let said = said.unwrap_or_default();
    let revoke = Revoke {
        version: held.version as u32,
        reason: said.reason.unwrap_or_else(|| "取消审核".into()),
        revoked_at: said
            .revoked_at
            .unwrap_or_else(|| hmr_protocol::checks::format_time(&rules.now)),
        operator_no: said.operator_no.unwrap_or_else(|| rules.revoke_operator_no.to_string()),
    };
    Plan {
        requests: vec![paths::revoke(t, key, &revoke)],
        version: held.version,
        content_hash: held.content_hash,
        revoked: true,
        retain: vec![],
        id_scheme: 1,
    }
}

/// A record waiting for one it references: quarantined with it (released when that one is
/// delivered), refused when it does not exist at all (released the same way once the DBA adds
/// it), quarantined after too many waits, or waiting.
pub fn dependency<S>(on: &Reference, state: Dependency, attempts: i32, rules: &Rules) -> Verdict<S> {
    let Reference { kind, key, field } = on;
    let quarantine = |reason: &str, message: String| {
        Verdict::Quarantine(Quarantine {
            field: field.to_string(),
            reason: reason.into(),
            message,
            waits_for: Some(WaitsFor::Record(*kind, key.clone())),
        })
    };
    match state {
        Dependency::Held => Verdict::Wait(*kind, key.clone()),
        Dependency::Quarantined => quarantine(
            "dependency-quarantined",
            format!("waiting for {kind} {key}, which is quarantined: this goes by itself once that is fixed and delivered"),
        ),
        Dependency::Absent => quarantine(
            on.unknown(),
            format!("{field} names {kind} {key}, which is neither delivered nor in its source view: this goes by itself once it is"),
        ),
        Dependency::Missing if attempts >= rules.max_dependency_attempts => quarantine(
            "dependency-not-delivered",
            format!("{kind} {key} has not reached the platform (is it in its source view?); this goes by itself once it is delivered"),
        ),
        Dependency::Missing => Verdict::Wait(*kind, key.clone()),
    }
}

/// A record refused before sending: the column of the DBA's view when it can be named.
pub fn invalid(kind: Kind, e: &ProtocolError) -> Quarantine {
    let (field, reason) = e.field_and_reason();
    let field = match e {
        ProtocolError::Invalid(_) => source::column_for_field(kind.as_str(), &field),
        _ => field,
    };
    Quarantine {
        field,
        reason,
        message: format!("refused before sending: {e}"),
        waits_for: None,
    }
}

/// The decisions of a check, once every matched order has one; then the recognised
/// reports' downloads (kept in `hmr.retained_reports`).
/// A check's plan without its decisions request (the platform already holds them, taken on its
/// page): the downloads of the recognised reports only, `None` when there are none.
pub fn retain_only(mut plan: Plan) -> Option<Plan> {
    plan.requests.remove(0);
    plan.retain.remove(0);
    (!plan.requests.is_empty()).then_some(plan)
}

pub fn decisions(decisions: Option<Decisions>, rules: &Rules) -> Verdict<Plan> {
    let Some(decisions) = decisions else {
        return Verdict::Finish(Ending::Skipped, "no decisions recorded");
    };
    if let Err(errors) = validate::decisions(&decisions, &rules.now) {
        return Verdict::Quarantine(invalid(Kind::Decision, &ProtocolError::Invalid(errors)));
    }
    let mut requests = vec![paths::decisions(&decisions)];
    let mut retain = vec![None];
    for d in decisions.decisions.iter().filter(|d| d.recognise) {
        for format in ["pdf", "json"] {
            requests.push(paths::download(&d.report_id, format));
            retain.push(Some((d.report_id.clone(), format.to_string())));
        }
    }
    Verdict::Send(Plan {
        requests,
        version: 1,
        content_hash: source::content_hash(&decisions),
        revoked: false,
        retain,
        id_scheme: 1,
    })
}

// ------------------------------------------------------------------ master data

/// A master-data record, built from its source row and checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Master {
    Patient(Patient),
    Department(Department),
    Staff(Staff),
}

impl Master {
    pub fn build(
        kind: Kind,
        row: &Map<String, Value>,
        now: &DateTime<FixedOffset>,
        campus_codes: &[String],
    ) -> Result<Master, ProtocolError> {
        Ok(match source::Record::read(kind, row, Map::new(), now)? {
            source::Record::Patient(r) => Master::Patient(r),
            source::Record::Department(r) => {
                // A campus the hospital did not configure is a mapping mistake, not a new campus.
                if !campus_codes.is_empty() && !campus_codes.contains(&r.campus_code) {
                    return Err(ProtocolError::Shape {
                        field: "campus_code".into(),
                        reason: "unknown-campus".into(),
                    });
                }
                Master::Department(r)
            }
            source::Record::Staff(r) => Master::Staff(r),
            _ => {
                return Err(ProtocolError::Shape {
                    field: String::new(),
                    reason: format!("{kind} is not master data"),
                })
            }
        })
    }

    pub fn hash(&self) -> String {
        match self {
            Master::Patient(r) => source::content_hash(r),
            Master::Department(r) => source::content_hash(r),
            Master::Staff(r) => source::content_hash(r),
        }
    }

    /// The record this one names, which the platform must hold first: a staff member's
    /// department, a department's parent.
    pub fn depends_on(&self) -> Option<Reference> {
        match self {
            Master::Staff(s) => Some(Reference {
                kind: Kind::Department,
                key: s.dept_code.clone(),
                field: "dept_code",
            }),
            Master::Department(d) => d
                .parent_code
                .as_ref()
                .filter(|p| !p.trim().is_empty() && **p != d.dept_code)
                .map(|p| Reference {
                    kind: Kind::Department,
                    key: p.clone(),
                    field: "parent_code",
                }),
            Master::Patient(_) => None,
        }
    }

    fn key(&self) -> &str {
        match self {
            Master::Patient(p) => &p.patient_id,
            Master::Department(d) => &d.dept_code,
            Master::Staff(s) => &s.staff_no,
        }
    }

    /// One batch request; all records are of one kind (a round groups events by kind).
    pub fn batch_request<'a>(records: impl Iterator<Item = &'a Master>) -> Request {
        let mut patients = Vec::new();
        let mut departments = Vec::new();
        let mut staff = Vec::new();
        for r in records {
            match r {
                Master::Patient(p) => patients.push(p.clone()),
                Master::Department(d) => departments.push(d.clone()),
                Master::Staff(s) => staff.push(s.clone()),
            }
        }
        if !patients.is_empty() {
            paths::patients(&patients)
        } else if !departments.is_empty() {
            paths::departments(&departments)
        } else {
            paths::staff(&staff)
        }
    }
}

/// Orders a batch so that a department comes after its parent when both are in it (the
/// platform accepts a parent "earlier in the same batch"); otherwise the order is kept.
pub fn parents_first<T>(items: Vec<T>, record: impl Fn(&T) -> &Master) -> Vec<T> {
    let keys: std::collections::HashMap<String, usize> = items
        .iter()
        .enumerate()
        .map(|(i, t)| (record(t).key().to_string(), i))
        .collect();
    // Depth of each record's chain of parents inside the batch (a cycle stops at the batch size).
    let depth = |mut i: usize| {
        let mut d = 0;
        while let Some(parent) = record(&items[i]).depends_on().filter(|r| r.field == "parent_code") {
            match keys.get(&parent.key) {
                Some(&p) if d < items.len() => {
                    d += 1;
                    i = p;
                }
                _ => break,
            }
        }
        d
    };
    let depths: Vec<usize> = (0..items.len()).map(depth).collect();
    let mut indexed: Vec<(usize, T)> = items.into_iter().enumerate().collect();
    indexed.sort_by_key(|(i, _)| (depths[*i], *i));
    indexed.into_iter().map(|(_, t)| t).collect()
}

/// A master-data record ready to go in a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct MasterSend {
    pub record: Master,
    pub hash: String,
    pub version: i32,
}

/// A master-data record: new version, unchanged, waiting for the record it names, or
/// refused. `depends`: the state of the record it names (`Master::depends_on`; `None`: it
/// names none).
pub fn master(
    built: Result<Master, ProtocolError>,
    kind: Kind,
    held: Option<&Delivered>,
    depends: Option<Dependency>,
    attempts: i32,
    rules: &Rules,
) -> Verdict<MasterSend> {
    let record = match built {
        Ok(r) => r,
        Err(e) => return Verdict::Quarantine(invalid(kind, &e)),
    };
    let hash = record.hash();
    if held.is_some_and(|h| h.content_hash == hash) {
        return Verdict::Finish(Ending::Unchanged, "same content as delivered");
    }
    if let (Some(on), Some(state)) = (record.depends_on(), depends) {
        if state != Dependency::Held {
            return dependency(&on, state, attempts, rules);
        }
    }
    Verdict::Send(MasterSend {
        record,
        hash,
        version: held.map_or(1, |h| h.version + 1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<FixedOffset> {
        hmr_protocol::checks::china()
            .with_ymd_and_hms(2026, 11, 20, 10, 0, 0)
            .unwrap()
    }
    use chrono::TimeZone;

    fn rules() -> Rules<'static> {
        Rules {
            now: now(),
            revoke_operator_no: "SYS",
            max_dependency_attempts: 5,
            renderer: None,
        }
    }

    fn row(pairs: &[(&str, Value)]) -> Map<String, Value> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    fn exam_row() -> Map<String, Value> {
        row(&[
            ("report_no", json!("E1")),
            ("patient_id", json!("P1")),
            ("id_type", json!("01")),
            ("id_no", json!("441302198003151233")),
            ("patient_name", json!("张三")),
            ("visit_type", json!("1")),
            ("visit_no", json!("V1")),
            ("dept_code", json!("0301")),
            ("data_code", json!("JC0001")),
            ("exam_item_name", json!("胸部X线")),
            ("exam_class", json!("DR")),
            ("findings", json!("两肺纹理清晰")),
            ("impression", json!("未见异常")),
            ("examined_at", json!("2026-11-20T08:00:00+08:00")),
            ("reported_at", json!("2026-11-20T09:00:00+08:00")),
            ("audited_at", json!("2026-11-20T09:10:00+08:00")),
            ("reporter_no", json!("D001")),
            ("auditor_no", json!("D002")),
        ])
    }

    fn facts(row: Option<Map<String, Value>>) -> ReportFacts {
        ReportFacts {
            kind: Kind::ExamReport,
            key: "E1".into(),
            row,
            items: vec![],
            held: None,
            revocation: None,
            item_code: ItemCode::AsSource,
            patient: Dependency::Held,
            source_pdf: None,
            pdf: None,
            attempts: 1,
        }
    }

    fn held(version: i32, hash: &str, revoked: bool) -> Option<Delivered> {
        Some(Delivered {
            version,
            content_hash: hash.into(),
            revoked,
        })
    }

    fn sent(d: Verdict<Plan>) -> Plan {
        match d {
            Verdict::Send(p) => p,
            other => panic!("expected a plan, got {other:?}"),
        }
    }

    fn body(r: &Request) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn a_new_report_is_version_one_and_a_changed_one_the_next_version() {
        let first = sent(report(facts(Some(exam_row())), &rules()));
        assert_eq!(first.version, 1);
        assert_eq!(first.requests.len(), 1, "no PDF in the source, none rendered");
        assert!(!first.revoked);

        let mut f = facts(Some(exam_row()));
        f.held = held(3, "another hash", false);
        let next = sent(report(f, &rules()));
        assert_eq!(next.version, 4);
        assert_eq!(body(&next.requests[0])["version"], json!(4));
        assert_eq!(
            next.content_hash, first.content_hash,
            "the hash is of the content, not the version"
        );
    }

    #[test]
    fn unchanged_content_sends_nothing_but_a_revoked_one_goes_again() {
        let hash = sent(report(facts(Some(exam_row())), &rules())).content_hash;
        let mut f = facts(Some(exam_row()));
        f.held = held(2, &hash, false);
        assert_eq!(
            report(f.clone(), &rules()),
            Verdict::Finish(Ending::Unchanged, "same content as delivered")
        );
        f.held = held(2, &hash, true);
        assert_eq!(sent(report(f, &rules())).version, 3, "re-audited after a revoke");
    }

    #[test]
    fn a_report_gone_from_its_view_revokes_what_the_platform_holds() {
        let mut f = facts(None);
        f.held = held(2, "h", false);
        let plan = sent(report(f.clone(), &rules()));
        assert!(plan.revoked);
        assert_eq!(plan.version, 2, "the held version is revoked");
        assert_eq!(
            body(&plan.requests[0])["operatorNo"],
            json!("SYS"),
            "{:?}",
            body(&plan.requests[0])
        );

        f.revocation = Some(Revocation {
            reason: Some("结果有误".into()),
            operator_no: Some("T009".into()),
            revoked_at: Some("2026-11-20 11:00:00".into()),
        });
        let said = body(&sent(report(f.clone(), &rules())).requests[0]);
        assert_eq!(
            (said["reason"].as_str(), said["operatorNo"].as_str()),
            (Some("结果有误"), Some("T009"))
        );

        f.held = held(2, "h", true);
        assert_eq!(
            report(f.clone(), &rules()),
            Verdict::Finish(Ending::Skipped, "not in the source view, nothing held"),
            "already revoked"
        );
        f.held = None;
        assert!(matches!(report(f, &rules()), Verdict::Finish(Ending::Skipped, _)));
    }

    #[test]
    fn a_report_waits_for_its_patient_and_is_quarantined_with_a_quarantined_one() {
        let mut f = facts(Some(exam_row()));
        f.patient = Dependency::Missing;
        assert_eq!(report(f.clone(), &rules()), Verdict::Wait(Kind::Patient, "P1".into()));

        f.attempts = 5;
        let Verdict::Quarantine(q) = report(f.clone(), &rules()) else {
            panic!()
        };
        assert_eq!(
            (q.field.as_str(), q.reason.as_str()),
            ("patient_id", "dependency-not-delivered")
        );
        assert_eq!(q.waits_for, Some(WaitsFor::Record(Kind::Patient, "P1".into())));

        f.attempts = 1;
        f.patient = Dependency::Quarantined;
        let Verdict::Quarantine(q) = report(f, &rules()) else {
            panic!()
        };
        assert_eq!(q.reason, "dependency-quarantined");
        assert_eq!(
            q.waits_for,
            Some(WaitsFor::Record(Kind::Patient, "P1".into())),
            "released when the patient is delivered"
        );
    }

    #[test]
    fn an_unchanged_report_does_not_wait_for_its_patient() {
        let hash = sent(report(facts(Some(exam_row())), &rules())).content_hash;
        let mut f = facts(Some(exam_row()));
        f.held = held(1, &hash, false);
        f.patient = Dependency::Missing;
        assert!(matches!(report(f, &rules()), Verdict::Finish(Ending::Unchanged, _)));
    }

    #[test]
    fn mapped_items_carry_the_platform_code_and_unmapped_ones_wait_or_go_without() {
        let mut local = exam_row();
        local.remove("data_code");
        local.insert("local_item_code".into(), json!("X-CHEST"));
        let mut f = facts(Some(local));
        f.item_code = ItemCode::Mapped("JC0001".into());
        let plan = sent(report(f.clone(), &rules()));
        assert_eq!(body(&plan.requests[0])["dataCode"], json!("JC0001"));

        // Policy hold (the default): the report waits for its mapping.
        f.item_code = ItemCode::Unmapped {
            local: "X-CHEST".into(),
            hold: true,
        };
        let Verdict::Quarantine(q) = report(f.clone(), &rules()) else {
            panic!()
        };
        assert_eq!((q.field.as_str(), q.reason.as_str()), ("local_item_code", "unmapped"));
        assert_eq!(q.waits_for, Some(WaitsFor::Mapping(ReportType::Exam, "X-CHEST".into())));
        assert_eq!(
            q.waits_for.unwrap().columns(),
            ("item_map", "exam:X-CHEST".to_string()),
            "what the item_map trigger releases"
        );

        // Policy send: shared without a code, never recognised.
        f.item_code = ItemCode::Unmapped {
            local: "X-CHEST".into(),
            hold: false,
        };
        let plan = sent(report(f.clone(), &rules()));
        assert!(body(&plan.requests[0]).get("dataCode").is_none_or(Value::is_null));

        // Sent without the code, then mapped: the content changed, so the next version goes.
        f.held = held(1, &plan.content_hash, false);
        f.item_code = ItemCode::Mapped("JC0001".into());
        let again = sent(report(f, &rules()));
        assert_eq!(again.version, 2);
        assert_eq!(body(&again.requests[0])["dataCode"], json!("JC0001"));
    }

    #[test]
    fn an_invalid_report_is_quarantined_with_the_column_of_the_view() {
        let mut bad = exam_row();
        bad.insert("id_no".into(), json!("441302198003151234"));
        let Verdict::Quarantine(q) = report(facts(Some(bad)), &rules()) else {
            panic!()
        };
        assert_eq!((q.field.as_str(), q.reason.as_str()), ("id_no", "checksum"));
        assert!(
            !q.message.contains("198003151234"),
            "no full identity number: {}",
            q.message
        );
        assert_eq!(q.waits_for, None);

        let mut missing = exam_row();
        missing.remove("auditor_no");
        let Verdict::Quarantine(q) = report(facts(Some(missing)), &rules()) else {
            panic!()
        };
        assert_eq!((q.field.as_str(), q.reason.as_str()), ("auditor_no", "required"));
    }

    #[test]
    fn the_sources_pdf_is_the_second_request_and_a_bad_one_is_quarantined() {
        let mut f = facts(Some(exam_row()));
        f.source_pdf = Some(b"%PDF-1.7 ...".to_vec());
        let plan = sent(report(f.clone(), &rules()));
        assert_eq!(plan.requests.len(), 2);
        assert_eq!(plan.pdf_step(), Some(1));

        f.source_pdf = Some(b"<html>".to_vec());
        let Verdict::Quarantine(q) = report(f.clone(), &rules()) else {
            panic!()
        };
        assert_eq!((q.field.as_str(), q.reason.as_str()), ("pdf", "not-a-pdf"));

        let mut big = b"%PDF-".to_vec();
        big.resize(hmr_protocol::checks::MAX_PDF_BYTES + 1, b' ');
        f.source_pdf = Some(big);
        let Verdict::Quarantine(q) = report(f, &rules()) else {
            panic!()
        };
        assert_eq!(q.reason, "too-large");
    }

    #[test]
    fn staff_wait_for_their_department_and_unchanged_staff_do_not() {
        let staff = row(&[
            ("staff_no", json!("D001")),
            ("name", json!("李医生")),
            ("dept_code", json!("0301")),
            ("updated_at", json!("2026-11-20T08:00:00+08:00")),
        ]);
        let r = rules();
        let built = || Master::build(Kind::Staff, &staff, &r.now, &[]);
        let Verdict::Send(s) = master(built(), Kind::Staff, None, Some(Dependency::Held), 1, &r) else {
            panic!("{:?}", built())
        };
        assert_eq!(s.version, 1);
        assert_eq!(
            master(built(), Kind::Staff, None, Some(Dependency::Missing), 1, &r),
            Verdict::Wait(Kind::Department, "0301".into())
        );
        let Verdict::Quarantine(q) = master(built(), Kind::Staff, None, Some(Dependency::Absent), 1, &r) else {
            panic!()
        };
        assert_eq!(
            (q.field.as_str(), q.reason.as_str(), q.waits_for),
            (
                "dept_code",
                "unknown-dept",
                Some(WaitsFor::Record(Kind::Department, "0301".into()))
            )
        );
        let Verdict::Quarantine(q) = master(built(), Kind::Staff, None, Some(Dependency::Quarantined), 1, &r) else {
            panic!()
        };
        assert_eq!(
            (q.field.as_str(), q.waits_for),
            ("dept_code", Some(WaitsFor::Record(Kind::Department, "0301".into())))
        );
        let same = held(4, &s.hash, false);
        assert!(matches!(
            master(built(), Kind::Staff, same.as_ref(), Some(Dependency::Missing), 1, &r),
            Verdict::Finish(Ending::Unchanged, _)
        ));
        let other = held(4, "old", false);
        let Verdict::Send(s) = master(built(), Kind::Staff, other.as_ref(), Some(Dependency::Held), 1, &r) else {
            panic!()
        };
        assert_eq!(s.version, 5);
    }

    fn department(code: &str, parent: Option<&str>) -> Master {
        let mut row = row(&[
            ("dept_code", json!(code)),
            ("dept_name", json!("科室")),
            ("std_dept_code", json!("A03")),
            ("campus_code", json!("HZ01")),
            ("updated_at", json!("2026-11-20T08:00:00+08:00")),
        ]);
        if let Some(p) = parent {
            row.insert("parent_code".into(), json!(p));
        }
        Master::build(Kind::Department, &row, &now(), &[]).unwrap()
    }

    #[test]
    fn a_department_waits_for_its_parent_and_an_unknown_parent_is_refused_before_sending() {
        let r = rules();
        let child = || Ok(department("1001", Some("10")));
        assert_eq!(
            master(child(), Kind::Department, None, Some(Dependency::Missing), 1, &r),
            Verdict::Wait(Kind::Department, "10".into())
        );
        let Verdict::Quarantine(q) = master(child(), Kind::Department, None, Some(Dependency::Absent), 1, &r) else {
            panic!()
        };
        assert_eq!(
            (q.field.as_str(), q.reason.as_str(), q.waits_for),
            (
                "parent_code",
                "unknown-parent",
                Some(WaitsFor::Record(Kind::Department, "10".into()))
            )
        );
        assert!(matches!(
            master(child(), Kind::Department, None, Some(Dependency::Held), 1, &r),
            Verdict::Send(_)
        ));
        // A top-level department, or one naming itself, depends on nothing.
        assert_eq!(department("10", None).depends_on(), None);
        assert_eq!(department("10", Some("10")).depends_on(), None);
    }

    #[test]
    fn a_batch_sends_parents_before_their_children() {
        let batch = vec![
            department("100101", Some("1001")),
            department("2", None),
            department("1001", Some("10")),
            department("10", None),
            department("3", Some("elsewhere")),
        ];
        let order: Vec<String> = parents_first(batch, |m| m)
            .iter()
            .map(|m| m.key().to_string())
            .collect();
        assert_eq!(order, ["2", "10", "3", "1001", "100101"]);
        // A cycle does not hang.
        let cycle = vec![department("A", Some("B")), department("B", Some("A"))];
        assert_eq!(parents_first(cycle, |m| m).len(), 2);
    }

    #[test]
    fn one_request_id_never_stands_for_two_requests() {
        let plan = sent(report(facts(Some(exam_row())), &rules()));
        assert_eq!(plan.id_scheme, 1);
        // Stable across retries (and a freeze/thaw).
        let (frozen, pdf) = plan.freeze();
        let thawed = Plan::thaw(&frozen, pdf.as_ref()).unwrap();
        assert_eq!(plan.request_id(7, 0, 0), thawed.request_id(7, 0, 0));
        // Another body under the same event id (a failover reused it): another id.
        let mut other_row = exam_row();
        other_row.insert("impression".into(), json!("另一结论"));
        let other = sent(report(facts(Some(other_row)), &rules()));
        assert_ne!(plan.request_id(7, 0, 0), other.request_id(7, 0, 0));
        // Step and generation still count.
        assert_ne!(plan.request_id(7, 0, 0), plan.request_id(7, 1, 0));
        assert_ne!(plan.request_id(7, 0, 0), plan.request_id(8, 0, 0));
        // A plan frozen by an older worker keeps the ids it was sent under.
        let old = Plan {
            id_scheme: 0,
            ..plan.clone()
        };
        assert_eq!(old.request_id(7, 0, 0), request_id("7:0:0"));
    }

    #[test]
    fn decisions_are_skipped_when_none_were_recorded() {
        assert_eq!(
            decisions(None, &rules()),
            Verdict::Finish(Ending::Skipped, "no decisions recorded")
        );
    }

    #[test]
    fn a_frozen_plan_keeps_its_pdf_as_bytes_beside_the_json() {
        let pdf = b"%PDF-1.7 \xff\xfe binary".to_vec();
        let plan = Plan {
            requests: vec![
                hmr_protocol::paths::Request {
                    method: hmr_protocol::paths::Method::Post,
                    path: "/data".into(),
                    scope: None,
                    content_type: Some("application/json".into()),
                    headers: vec![],
                    body: b"{}".to_vec(),
                },
                paths::pdf(ReportType::Lab, "L1", 1, pdf.clone()),
            ],
            version: 1,
            content_hash: "h".into(),
            revoked: false,
            retain: vec![],
            id_scheme: 1,
        };
        let (json, stored) = plan.freeze();
        assert_eq!(stored.as_deref(), Some(pdf.as_slice()));
        assert!(json.to_string().len() < 1000, "no PDF inside the JSON: {json}");
        let thawed = Plan::thaw(&json, stored.as_ref()).unwrap();
        assert_eq!(thawed.requests, plan.requests);
        assert!(
            Plan::thaw(&json, None).is_err(),
            "a missing PDF is an error, not an empty upload"
        );
    }

    #[test]
    fn request_ids_are_stable_and_distinct() {
        assert_eq!(request_id("5:0:0"), request_id("5:0:0"));
        assert_ne!(request_id("5:0:0"), request_id("5:1:0"));
        assert_ne!(request_id("5:0:0"), request_id("5:0:1"));
        assert_eq!(request_id("5:0:0").get_version_num(), 5);
    }
}
