//! The contract's record rules. The simulator refuses what these refuse, and the worker
//! quarantines it before sending, with the same field and reason.

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};

use crate::checks::*;
use crate::types::*;

/// One refused field: the platform's field name and a short reason such as `checksum`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
    pub fn join(errors: &[FieldError]) -> String {
        errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.reason))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The codes a coded field allows (by platform field name, `items[2].abnormalFlag` too).
pub fn allowed_values(field: &str) -> Option<&'static [&'static str]> {
    let name = field.rsplit('.').next().unwrap_or(field);
    Some(match name {
        "genderCode" => &GENDER_CODES,
        "idType" => &ID_TYPES,
        "visitType" => &VISIT_TYPES,
        "abnormalFlag" => &ABNORMAL_FLAGS,
        "status" => &STATUS_CODES,
        "role" => &STAFF_ROLES,
        "examClass" => &EXAM_CLASSES,
        "titleCode" => &TITLE_CODES,
        _ => return None,
    })
}

/// A reason in words, for the DBA reading `hmr.check_sources()`.
pub fn rule_of(reason: &str) -> &'static str {
    match reason {
        "required" => "a value is required",
        "code" => "must be one of the allowed codes",
        "format" => "the format is wrong",
        "checksum" => "the check character (GB 11643 / GB 32100) is wrong",
        "birth-date" => "holds no valid birth date",
        "birth-date-mismatch" => "the birth date inside differs from birth_date",
        "future" => "lies more than 5 minutes in the future",
        "length" => "is too long",
        "control-character" => "holds control or invisible characters",
        "range" => "is out of range",
        _ => "is refused",
    }
}

/// Whether a free-text field may hold line breaks and tabs (findings, impression).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lines {
    Allowed,
    Refused,
}

/// The free-text fields the platform receives, with their limits in characters: one table
/// for the rules below, `docs/protocol.md` and the tests.
pub const FREE_TEXT_LIMITS: &[(&str, usize, Lines)] = &[
    ("name", 50, Lines::Refused),
    ("phone", 30, Lines::Refused),
    ("deptName", 100, Lines::Refused),
    ("specimenName", 50, Lines::Refused),
    ("categoryName", 100, Lines::Refused),
    ("items[].itemName", 100, Lines::Refused),
    ("items[].resultValue", 200, Lines::Refused),
    ("items[].resultUnit", 50, Lines::Refused),
    ("items[].referenceRange", 100, Lines::Refused),
    ("items[].method", 100, Lines::Refused),
    ("examItemName", 100, Lines::Refused),
    ("bodyPartName", 100, Lines::Refused),
    ("findings", 4000, Lines::Allowed),
    ("impression", 2000, Lines::Allowed),
    ("imageUrl", 1000, Lines::Refused),
    ("reason", 200, Lines::Refused),
    ("decisions[].reasonText", 200, Lines::Refused),
];

fn limit(field: &str) -> (usize, Lines) {
    FREE_TEXT_LIMITS
        .iter()
        .find(|(f, _, _)| *f == field)
        .map(|(_, max, lines)| (*max, *lines))
        .unwrap_or((200, Lines::Refused))
}

/// Control characters (C0, DEL, C1) and invisible format characters (zero-width, bidi
/// overrides, BOM): they hide text from the reader or break the receiver's display.
pub fn refused_char(c: char, lines: Lines) -> bool {
    match c {
        '\n' | '\r' | '\t' => lines == Lines::Refused,
        c if c.is_control() => true,
        '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' => true,
        '\u{FEFF}' => true,
        _ => false,
    }
}

/// Collects errors with field paths such as `items[2].itemCode`.
struct Rules<'a> {
    now: &'a DateTime<FixedOffset>,
    prefix: String,
    errors: Vec<FieldError>,
}

impl<'a> Rules<'a> {
    fn new(now: &'a DateTime<FixedOffset>) -> Self {
        Rules {
            now,
            prefix: String::new(),
            errors: vec![],
        }
    }
    fn fail(&mut self, field: &str, reason: &str) {
        self.errors
            .push(FieldError::new(format!("{}{field}", self.prefix), reason));
    }
    fn required(&mut self, field: &str, value: &str) -> bool {
        if value.trim().is_empty() {
            self.fail(field, "required");
            return false;
        }
        true
    }
    /// Free text: required, at most `max` characters, and no control or invisible format
    /// characters (line breaks and tabs only where `lines` is `Lines::Allowed`).
    fn text(&mut self, field: &str, value: &str, max: usize, lines: Lines) {
        if self.required(field, value) {
            self.text_rules(field, value, max, lines);
        }
    }
    fn opt_text(&mut self, field: &str, value: &Option<String>, max: usize, lines: Lines) {
        if let Some(v) = value {
            self.text(field, v, max, lines);
        }
    }
    fn text_rules(&mut self, field: &str, value: &str, max: usize, lines: Lines) {
        if value.chars().count() > max {
            self.fail(field, "length");
        } else if value.chars().any(|c| refused_char(c, lines)) {
            self.fail(field, "control-character");
        }
    }
    fn code(&mut self, field: &str, value: &str, allowed: &[&str]) {
        if self.required(field, value) && !allowed.contains(&value) {
            self.fail(field, "code");
        }
    }
    fn opt_code(&mut self, field: &str, value: &Option<String>, allowed: &[&str]) {
        if let Some(v) = value {
            self.code(field, v, allowed);
        }
    }
    fn opt_nonempty(&mut self, field: &str, value: &Option<String>) {
        if let Some(v) = value {
            self.required(field, v);
        }
    }
    /// An event time: the format, and not more than 300 s in the future.
    fn time(&mut self, field: &str, value: &str) {
        if !self.required(field, value) {
            return;
        }
        match parse_time(value) {
            None => self.fail(field, "format"),
            Some(t) if (t - *self.now).num_seconds() > FUTURE_SLACK_SECS => self.fail(field, "future"),
            Some(_) => {}
        }
    }
    fn opt_time(&mut self, field: &str, value: &Option<String>) {
        if let Some(v) = value {
            self.time(field, v);
        }
    }
    fn person(&mut self, id_type: &str, id_no: &str, birth_date: Option<&str>) {
        self.code("idType", id_type, &ID_TYPES);
        if !self.required("idNo", id_no) {
            return;
        }
        if id_type == "01" {
            if let Some(problem) = id_card_problem(id_no, birth_date) {
                self.fail("idNo", problem);
            }
        } else if id_no.trim() != id_no || id_no.chars().count() > 50 {
            self.fail("idNo", "format");
        }
    }
    fn done(self) -> Result<(), Vec<FieldError>> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self.errors)
        }
    }
}

pub fn patient(p: &Patient, now: &DateTime<FixedOffset>) -> Result<(), Vec<FieldError>> {
    let mut r = Rules::new(now);
    r.required("patientId", &p.patient_id);
    r.person(&p.id_type, &p.id_no, Some(&p.birth_date));
    r.text("name", &p.name, limit("name").0, Lines::Refused);
    r.code("genderCode", &p.gender_code, &GENDER_CODES);
    match parse_date(&p.birth_date) {
        None => r.fail("birthDate", if p.birth_date.is_empty() { "required" } else { "format" }),
        Some(d) if d > now.date_naive() => r.fail("birthDate", "future"),
        Some(_) => {}
    }
    r.opt_nonempty("phone", &p.phone);
    r.opt_text("phone", &p.phone, limit("phone").0, Lines::Refused);
    r.time("registeredAt", &p.registered_at);
    r.time("updatedAt", &p.updated_at);
    r.done()
}

pub fn department(d: &Department, now: &DateTime<FixedOffset>) -> Result<(), Vec<FieldError>> {
    let mut r = Rules::new(now);
    r.required("deptCode", &d.dept_code);
    r.text("deptName", &d.dept_name, limit("deptName").0, Lines::Refused);
    r.required("stdDeptCode", &d.std_dept_code);
    r.required("campusCode", &d.campus_code);
    r.opt_nonempty("parentCode", &d.parent_code);
    r.opt_code("status", &d.status, &STATUS_CODES);
    r.time("updatedAt", &d.updated_at);
    r.done()
}

pub fn staff(s: &Staff, now: &DateTime<FixedOffset>) -> Result<(), Vec<FieldError>> {
    let mut r = Rules::new(now);
    r.required("staffNo", &s.staff_no);
    r.text("name", &s.name, limit("name").0, Lines::Refused);
    r.opt_code("genderCode", &s.gender_code, &GENDER_CODES);
    r.required("deptCode", &s.dept_code);
    r.opt_code("role", &s.role, &STAFF_ROLES);
    r.opt_code("titleCode", &s.title_code, &TITLE_CODES);
    r.opt_code("status", &s.status, &STATUS_CODES);
    r.time("updatedAt", &s.updated_at);
    r.done()
}

fn report_common(
    r: &mut Rules,
    report_no: &str,
    version: u32,
    patient_id: &str,
    name: &str,
    visit_type: &Option<String>,
) {
    r.required("reportNo", report_no);
    if version < 1 {
        r.fail("version", "range");
    }
    r.required("patientId", patient_id);
    r.text("name", name, limit("name").0, Lines::Refused);
    r.opt_code("visitType", visit_type, &VISIT_TYPES);
}

pub fn lab_report(l: &LabReport, now: &DateTime<FixedOffset>) -> Result<(), Vec<FieldError>> {
    let mut r = Rules::new(now);
    report_common(&mut r, &l.report_no, l.version, &l.patient_id, &l.name, &l.visit_type);
    r.person(&l.id_type, &l.id_no, None);
    r.opt_time("sampledAt", &l.sampled_at);
    r.time("reportedAt", &l.reported_at);
    r.opt_time("auditedAt", &l.audited_at);
    r.required("auditorNo", &l.auditor_no);
    r.opt_nonempty("dataCode", &l.data_code);
    for (field, value) in [("specimenName", &l.specimen_name), ("categoryName", &l.category_name)] {
        let (max, lines) = limit(field);
        r.opt_text(field, value, max, lines);
    }
    if l.items.is_empty() {
        r.fail("items", "required");
    }
    for (i, item) in l.items.iter().enumerate() {
        r.prefix = format!("items[{i}].");
        r.required("itemCode", &item.item_code);
        r.text("itemName", &item.item_name, limit("items[].itemName").0, Lines::Refused);
        // A result may legitimately be an empty string only when it is absent; require text.
        r.text(
            "resultValue",
            &item.result_value,
            limit("items[].resultValue").0,
            Lines::Refused,
        );
        for (field, value) in [
            ("resultUnit", &item.result_unit),
            ("referenceRange", &item.reference_range),
            ("method", &item.method),
        ] {
            let (max, lines) = limit(&format!("items[].{field}"));
            r.opt_text(field, value, max, lines);
        }
        r.opt_code("abnormalFlag", &item.abnormal_flag, &ABNORMAL_FLAGS);
    }
    r.done()
}

pub fn exam_report(e: &ExamReport, now: &DateTime<FixedOffset>) -> Result<(), Vec<FieldError>> {
    let mut r = Rules::new(now);
    report_common(&mut r, &e.report_no, e.version, &e.patient_id, &e.name, &e.visit_type);
    r.person(&e.id_type, &e.id_no, None);
    r.code("examClass", &e.exam_class, &EXAM_CLASSES);
    r.text("findings", &e.findings, limit("findings").0, Lines::Allowed);
    r.text("impression", &e.impression, limit("impression").0, Lines::Allowed);
    for (field, value) in [
        ("examItemName", &e.exam_item_name),
        ("bodyPartName", &e.body_part_name),
        ("imageUrl", &e.image_url),
    ] {
        let (max, lines) = limit(field);
        r.opt_text(field, value, max, lines);
    }
    r.opt_time("examinedAt", &e.examined_at);
    r.time("reportedAt", &e.reported_at);
    r.opt_time("auditedAt", &e.audited_at);
    r.required("auditorNo", &e.auditor_no);
    r.opt_nonempty("dataCode", &e.data_code);
    r.done()
}

pub fn revoke(v: &Revoke, now: &DateTime<FixedOffset>) -> Result<(), Vec<FieldError>> {
    let mut r = Rules::new(now);
    if v.version < 1 {
        r.fail("version", "range");
    }
    r.text("reason", &v.reason, limit("reason").0, Lines::Refused);
    r.time("revokedAt", &v.revoked_at);
    r.required("operatorNo", &v.operator_no);
    r.done()
}

/// The 不互认 reason rules: a decline needs a reason code (`06` also a text); a 互认 none.
pub fn decision(d: &Decision) -> Result<(), FieldError> {
    let codes: Vec<&str> = DECLINE_REASONS.iter().map(|(c, _)| *c).collect();
    match (d.recognise, d.reason_code.as_deref()) {
        (true, Some(_)) => Err(FieldError::new("reasonCode", "not-allowed")),
        (true, None) if d.reason_text.is_some() => Err(FieldError::new("reasonText", "not-allowed")),
        (true, None) => Ok(()),
        (false, None) => Err(FieldError::new("reasonCode", "required")),
        (false, Some(code)) if !codes.contains(&code) => Err(FieldError::new("reasonCode", "code")),
        (false, Some("06")) if d.reason_text.as_deref().is_none_or(|t| t.trim().is_empty()) => {
            Err(FieldError::new("reasonText", "required"))
        }
        (false, Some(_)) => free_reason(d),
    }
}

/// A decline's free text: the same limit and characters as every free text (§7).
fn free_reason(d: &Decision) -> Result<(), FieldError> {
    let Some(text) = d.reason_text.as_deref() else {
        return Ok(());
    };
    let (max, lines) = limit("decisions[].reasonText");
    if text.chars().count() > max {
        Err(FieldError::new("reasonText", "length"))
    } else if text.chars().any(|c| refused_char(c, lines)) {
        Err(FieldError::new("reasonText", "control-character"))
    } else {
        Ok(())
    }
}

pub fn decisions(d: &Decisions, now: &DateTime<FixedOffset>) -> Result<(), Vec<FieldError>> {
    let mut r = Rules::new(now);
    r.required("checkId", &d.check_id);
    r.required("doctorNo", &d.doctor_no);
    r.required("deptCode", &d.dept_code);
    r.time("decidedAt", &d.decided_at);
    if d.decisions.is_empty() {
        r.fail("decisions", "required");
    }
    for (i, one) in d.decisions.iter().enumerate() {
        r.prefix = format!("decisions[{i}].");
        r.required("orderId", &one.order_id);
        r.required("reportId", &one.report_id);
        if let Err(e) = decision(one) {
            r.fail(&e.field, &e.reason);
        }
    }
    r.done()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<FixedOffset> {
        parse_time("2024-06-01T12:00:00+08:00").unwrap()
    }

    pub(crate) fn sample_patient() -> Patient {
        Patient {
            patient_id: "P1".into(),
            id_type: "01".into(),
            id_no: "11010519491231002X".into(),
            name: "张三".into(),
            gender_code: "1".into(),
            birth_date: "1949-12-31".into(),
            phone: None,
            registered_at: "2024-06-01T08:00:00+08:00".into(),
            updated_at: "2024-06-01T08:00:00+08:00".into(),
        }
    }

    #[test]
    fn patient_rules() {
        assert_eq!(patient(&sample_patient(), &now()), Ok(()));
        let mut p = sample_patient();
        p.id_no = "110105194912310021".into();
        assert_eq!(patient(&p, &now()), Err(vec![FieldError::new("idNo", "checksum")]));
        let mut p = sample_patient();
        p.updated_at = "2024-06-01T12:06:00+08:00".into();
        p.gender_code = "3".into();
        assert_eq!(
            patient(&p, &now()),
            Err(vec![
                FieldError::new("genderCode", "code"),
                FieldError::new("updatedAt", "future")
            ])
        );
    }

    #[test]
    fn lab_item_paths() {
        let l = LabReport {
            report_no: "L1".into(),
            version: 1,
            patient_id: "P1".into(),
            id_type: "01".into(),
            id_no: "11010519491231002X".into(),
            name: "张三".into(),
            visit_type: None,
            visit_no: None,
            order_no: None,
            dept_code: None,
            request_doctor_no: None,
            specimen_code: None,
            specimen_name: None,
            specimen_no: None,
            sampled_at: None,
            reported_at: "2024-06-01T09:00:00+08:00".into(),
            audited_at: None,
            auditor_no: "D1".into(),
            category_code: None,
            category_name: None,
            data_code: Some("JY0001".into()),
            items: vec![LabItem {
                item_code: "WBC".into(),
                item_name: "白细胞".into(),
                loinc: None,
                result_value: "".into(),
                result_unit: None,
                reference_range: None,
                abnormal_flag: Some("".into()),
                critical_flag: None,
                method: None,
            }],
        };
        assert_eq!(
            lab_report(&l, &now()),
            Err(vec![
                FieldError::new("items[0].resultValue", "required"),
                FieldError::new("items[0].abnormalFlag", "required"),
            ])
        );
    }

    #[test]
    fn free_text_refuses_control_characters_and_overlong_values() {
        for bad in [
            "张\u{1}三",
            "张\u{7}三",
            "张\t三",
            "张\u{200B}三",
            "\u{202E}三张",
            "张\u{85}三",
        ] {
            let mut p = sample_patient();
            p.name = bad.into();
            assert_eq!(
                patient(&p, &now()),
                Err(vec![FieldError::new("name", "control-character")]),
                "{bad:?}"
            );
        }
        let mut p = sample_patient();
        p.name = "张".repeat(51);
        assert_eq!(patient(&p, &now()), Err(vec![FieldError::new("name", "length")]));
        p.name = "张".repeat(50);
        assert_eq!(patient(&p, &now()), Ok(()));
        assert!(!refused_char('\n', Lines::Allowed));
        assert!(refused_char('\n', Lines::Refused));
        assert!(!refused_char('·', Lines::Refused));
    }

    #[test]
    fn decline_needs_reason() {
        let mut d = Decision {
            order_id: "O".into(),
            report_id: "R".into(),
            recognise: false,
            reason_code: None,
            reason_text: None,
        };
        assert_eq!(decision(&d), Err(FieldError::new("reasonCode", "required")));
        d.reason_code = Some("06".into());
        assert_eq!(decision(&d), Err(FieldError::new("reasonText", "required")));
        d.reason_text = Some("复查".into());
        assert_eq!(decision(&d), Ok(()));
        d.recognise = true;
        assert!(decision(&d).is_err());
    }
}
