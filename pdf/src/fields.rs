//! The values a template can print, by field name.

use std::collections::HashMap;

use hmr_protocol::{ExamReport, LabItem, LabReport};

use crate::template::Flags;
use crate::Context;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Lab,
    Exam,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Lab => "lab",
            Kind::Exam => "exam",
        }
    }
}

/// Placeholders filled per page rather than per report.
pub(crate) const PAGE_PLACEHOLDERS: &[&str] = &["page", "pages"];

const COMMON: &[&str] = &[
    "hospital_name",
    "name",
    "gender",
    "age",
    "patient_id",
    "id_no",
    "visit_type",
    "visit_no",
    "order_no",
    "department",
    "dept_code",
    "request_doctor",
    "report_no",
    "version",
    "reported_at",
    "audited_at",
    "auditor",
    "data_code",
];

const LAB_ONLY: &[&str] = &["specimen", "specimen_no", "sampled_at", "category"];

const EXAM_ONLY: &[&str] = &[
    "exam_class",
    "exam_item",
    "body_part",
    "accession_no",
    "study_instance_uid",
    "examined_at",
    "reporter",
    "critical",
    "findings",
    "impression",
];

/// Columns of the lab items table.
pub(crate) const ITEM_FIELDS: &[&str] = &[
    "index",
    "item_code",
    "item_name",
    "result",
    "flag",
    "unit",
    "reference_range",
    "method",
    "loinc",
];

pub(crate) fn names(kind: Kind) -> Vec<&'static str> {
    let extra = match kind {
        Kind::Lab => LAB_ONLY,
        Kind::Exam => EXAM_ONLY,
    };
    COMMON.iter().chain(extra).copied().collect()
}

pub(crate) type Values = HashMap<&'static str, String>;

fn common(ctx: &Context, v: &mut Values, r: Common<'_>) {
    let opt = |o: &Option<String>| o.clone().unwrap_or_default();
    v.insert("hospital_name", ctx.hospital_name.clone());
    v.insert("name", r.name.to_owned());
    v.insert("gender", opt(&ctx.gender));
    v.insert("age", opt(&ctx.age));
    v.insert("patient_id", r.patient_id.to_owned());
    v.insert("id_no", r.id_no.to_owned());
    v.insert("visit_type", opt(r.visit_type));
    v.insert("visit_no", opt(r.visit_no));
    v.insert("order_no", opt(r.order_no));
    // The wire carries only the code; the caller knows the name.
    v.insert(
        "department",
        ctx.department_name
            .clone()
            .or_else(|| r.dept_code.clone())
            .unwrap_or_default(),
    );
    v.insert("dept_code", opt(r.dept_code));
    v.insert("request_doctor", opt(r.request_doctor_no));
    v.insert("report_no", r.report_no.to_owned());
    v.insert("version", r.version.to_string());
    v.insert("reported_at", time(r.reported_at));
    v.insert("audited_at", r.audited_at.as_deref().map(time).unwrap_or_default());
    v.insert("auditor", r.auditor_no.to_owned());
    v.insert("data_code", opt(r.data_code));
}

/// The fields both report kinds share, borrowed from either.
struct Common<'a> {
    name: &'a str,
    patient_id: &'a str,
    id_no: &'a str,
    visit_type: &'a Option<String>,
    visit_no: &'a Option<String>,
    order_no: &'a Option<String>,
    dept_code: &'a Option<String>,
    request_doctor_no: &'a Option<String>,
    report_no: &'a str,
    version: u32,
    reported_at: &'a str,
    audited_at: &'a Option<String>,
    auditor_no: &'a str,
    data_code: &'a Option<String>,
}

pub(crate) fn lab(r: &LabReport, ctx: &Context) -> Values {
    let mut v = Values::new();
    common(
        ctx,
        &mut v,
        Common {
            name: &r.name,
            patient_id: &r.patient_id,
            id_no: &r.id_no,
            visit_type: &r.visit_type,
            visit_no: &r.visit_no,
            order_no: &r.order_no,
            dept_code: &r.dept_code,
            request_doctor_no: &r.request_doctor_no,
            report_no: &r.report_no,
            version: r.version,
            reported_at: &r.reported_at,
            audited_at: &r.audited_at,
            auditor_no: &r.auditor_no,
            data_code: &r.data_code,
        },
    );
    let specimen = r.specimen_name.clone().or_else(|| r.specimen_code.clone());
    v.insert("specimen", specimen.unwrap_or_default());
    v.insert("specimen_no", r.specimen_no.clone().unwrap_or_default());
    v.insert("sampled_at", r.sampled_at.as_deref().map(time).unwrap_or_default());
    v.insert(
        "category",
        r.category_name
            .clone()
            .or_else(|| r.category_code.clone())
            .unwrap_or_default(),
    );
    v
}

pub(crate) fn exam(r: &ExamReport, ctx: &Context, flags: &Flags) -> Values {
    let mut v = Values::new();
    common(
        ctx,
        &mut v,
        Common {
            name: &r.name,
            patient_id: &r.patient_id,
            id_no: &r.id_no,
            visit_type: &r.visit_type,
            visit_no: &r.visit_no,
            order_no: &r.order_no,
            dept_code: &r.dept_code,
            request_doctor_no: &r.request_doctor_no,
            report_no: &r.report_no,
            version: r.version,
            reported_at: &r.reported_at,
            audited_at: &r.audited_at,
            auditor_no: &r.auditor_no,
            data_code: &r.data_code,
        },
    );
    let opt = |o: &Option<String>| o.clone().unwrap_or_default();
    v.insert("exam_class", r.exam_class.clone());
    v.insert(
        "exam_item",
        r.exam_item_name
            .clone()
            .or_else(|| r.exam_item_code.clone())
            .unwrap_or_default(),
    );
    v.insert(
        "body_part",
        r.body_part_name
            .clone()
            .or_else(|| r.body_part_code.clone())
            .unwrap_or_default(),
    );
    v.insert("accession_no", opt(&r.accession_no));
    v.insert("study_instance_uid", opt(&r.study_instance_uid));
    v.insert("examined_at", r.examined_at.as_deref().map(time).unwrap_or_default());
    v.insert("reporter", opt(&r.reporter_no));
    let critical = if r.critical_flag == Some(true) {
        flags.critical_report.clone()
    } else {
        String::new()
    };
    v.insert("critical", critical);
    v.insert("findings", r.findings.clone());
    v.insert("impression", r.impression.clone());
    v
}

/// One cell of the items table.
pub(crate) fn item(index: usize, it: &LabItem, field: &str, flags: &Flags) -> String {
    let opt = |o: &Option<String>| o.clone().unwrap_or_default();
    match field {
        "index" => (index + 1).to_string(),
        "item_code" => it.item_code.clone(),
        "item_name" => it.item_name.clone(),
        "result" => it.result_value.clone(),
        "flag" => flag_mark(it, flags),
        "unit" => opt(&it.result_unit),
        "reference_range" => opt(&it.reference_range),
        "method" => opt(&it.method),
        "loinc" => opt(&it.loinc),
        _ => String::new(), // unreachable: the template was validated
    }
}

pub(crate) fn flag_mark(it: &LabItem, flags: &Flags) -> String {
    let mut mark = it
        .abnormal_flag
        .as_ref()
        .and_then(|f| flags.abnormal.get(f))
        .cloned()
        .unwrap_or_default();
    if it.critical_flag == Some(true) {
        mark.push_str(&flags.critical);
    }
    mark
}

/// Anything but normal ("1") or absent counts as abnormal.
pub(crate) fn is_abnormal(it: &LabItem) -> bool {
    it.critical_flag == Some(true) || it.abnormal_flag.as_deref().is_some_and(|f| f != "1")
}

/// `2026-11-26T09:30:00+08:00` → `2026-11-26 09:30`; anything else is printed as given.
pub(crate) fn time(s: &str) -> String {
    let b = s.as_bytes();
    let shaped = b.len() >= 16
        && b[..16].is_ascii()
        && matches!(b[10], b'T' | b' ')
        && b[4] == b'-'
        && b[7] == b'-'
        && b[13] == b':';
    if shaped {
        format!("{} {}", &s[..10], &s[11..16])
    } else {
        s.to_owned()
    }
}

/// Replaces `{name}` with its value; names were checked when the template was loaded.
pub(crate) fn fill(text: &str, values: &Values, page: usize, pages: usize) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        match &after[..close] {
            "page" => out.push_str(&page.to_string()),
            "pages" => out.push_str(&pages.to_string()),
            name => out.push_str(values.get(name).map(String::as_str).unwrap_or_default()),
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_to_the_minute() {
        assert_eq!(time("2026-11-26T09:30:00+08:00"), "2026-11-26 09:30");
        assert_eq!(time("2026-11-26 09:30:59"), "2026-11-26 09:30");
        assert_eq!(time("2026-11-26"), "2026-11-26");
        assert_eq!(time("二〇二六年十一月二十六日上午"), "二〇二六年十一月二十六日上午");
    }

    #[test]
    fn placeholders_fill() {
        let mut v = Values::new();
        v.insert("hospital_name", "某市人民医院".into());
        assert_eq!(
            fill("{hospital_name}检验科 {page}/{pages}", &v, 1, 2),
            "某市人民医院检验科 1/2"
        );
        assert_eq!(fill("no close {x", &v, 1, 1), "no close {x");
    }
}
