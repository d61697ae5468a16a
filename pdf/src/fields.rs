//! The values a template can print, by field name.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use hmr_protocol::{ExamReport, LabItem, LabReport};

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
    "recognition_statement",
    "birth_date",
    "gender_code",
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
    "auditor_no",
    "request_doctor_no",
    "data_code",
];

const LAB_ONLY: &[&str] = &[
    "specimen",
    "specimen_no",
    "sampled_at",
    "received_at",
    "tester",
    "category",
];

const EXAM_ONLY: &[&str] = &[
    "exam_class",
    "exam_class_code",
    "reporter_no",
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
    // A name the hospital gave, else the code the report carries.
    let name_or = |name: &Option<String>, code: &Option<String>| {
        name.clone()
            .filter(|n| !n.trim().is_empty())
            .or_else(|| code.clone())
            .unwrap_or_default()
    };
    v.insert("hospital_name", ctx.hospital_name.clone());
    v.insert("recognition_statement", opt(&ctx.recognition_statement));
    v.insert("name", r.name.to_owned());
    v.insert(
        "gender",
        ctx.gender
            .clone()
            .or_else(|| ctx.gender_code.as_deref().and_then(gender_name).map(str::to_owned))
            .unwrap_or_default(),
    );
    v.insert("gender_code", opt(&ctx.gender_code));
    v.insert(
        "age",
        ctx.age
            .clone()
            .or_else(|| ctx.birth_date.as_deref().and_then(|b| age_at(b, r.reported_at)))
            .unwrap_or_default(),
    );
    v.insert(
        "birth_date",
        ctx.birth_date
            .as_deref()
            .map(|d| d.chars().take(10).collect())
            .unwrap_or_default(),
    );
    v.insert("patient_id", r.patient_id.to_owned());
    v.insert("id_no", r.id_no.to_owned());
    v.insert("visit_type", opt(r.visit_type));
    v.insert("visit_no", opt(r.visit_no));
    v.insert("order_no", opt(r.order_no));
    v.insert("department", name_or(&ctx.department_name, r.dept_code));
    v.insert("dept_code", opt(r.dept_code));
    v.insert("request_doctor", name_or(&ctx.request_doctor_name, r.request_doctor_no));
    v.insert("request_doctor_no", opt(r.request_doctor_no));
    v.insert("report_no", r.report_no.to_owned());
    v.insert("version", r.version.to_string());
    v.insert("reported_at", time(r.reported_at));
    v.insert("audited_at", r.audited_at.as_deref().map(time).unwrap_or_default());
    v.insert("auditor", name_or(&ctx.auditor_name, &Some(r.auditor_no.to_owned())));
    v.insert("auditor_no", r.auditor_no.to_owned());
    v.insert("data_code", opt(r.data_code));
}

/// GB/T 2261.1 gender codes as printed.
fn gender_name(code: &str) -> Option<&'static str> {
    Some(match code.trim() {
        "1" => "男",
        "2" => "女",
        "0" => "未知",
        "9" => "未说明",
        _ => return None,
    })
}

/// The age on the day of `at` of someone born on `birth` (both starting `YYYY-MM-DD`): 岁 from
/// one year, 月 from one month, else 天 — as Chinese reports print it.
pub(crate) fn age_at(birth: &str, at: &str) -> Option<String> {
    let date = |s: &str| -> Option<(i32, u32, u32)> {
        let b = s.get(..10)?;
        Some((
            b.get(..4)?.parse().ok()?,
            b.get(5..7)?.parse().ok()?,
            b.get(8..10)?.parse().ok()?,
        ))
    };
    let (by, bm, bd) = date(birth)?;
    let (ay, am, ad) = date(at)?;
    if (ay, am, ad) < (by, bm, bd) {
        return None;
    }
    let mut months = (ay - by) * 12 + am as i32 - bm as i32;
    if ad < bd {
        months -= 1;
    }
    if months >= 12 {
        return Some(format!("{}岁", months / 12));
    }
    if months >= 1 {
        return Some(format!("{months}月"));
    }
    // Days within the first month.
    let days_in = |y: i32, m: u32| match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    };
    let days = if (ay, am) == (by, bm) {
        ad - bd
    } else {
        days_in(by, bm) - bd + ad
    };
    Some(format!("{days}天"))
}

/// Exam classes (DICOM modality codes and the usual local ones) as a report title prints
/// them; an unknown code prints as it is.
pub(crate) fn exam_class_name(code: &str) -> String {
    match code.trim().to_ascii_uppercase().as_str() {
        "CT" => "CT",
        "MR" | "MRI" => "磁共振",
        "DR" | "DX" | "CR" | "RF" | "XR" => "X线",
        "MG" => "乳腺X线",
        "US" => "超声",
        "ES" | "EN" | "GI" => "内镜",
        "ECG" | "EKG" => "心电图",
        "PS" | "PA" | "PATH" | "SM" => "病理",
        "NM" | "PT" | "PET" => "核医学",
        "XA" => "血管造影",
        "EEG" => "脑电图",
        "OP" | "OT" => "眼科",
        _ => return code.to_owned(),
    }
    .to_owned()
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
    v.insert("received_at", ctx.received_at.as_deref().map(time).unwrap_or_default());
    v.insert("tester", ctx.tester_name.clone().unwrap_or_default());
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
    v.insert("exam_class", exam_class_name(&r.exam_class));
    v.insert("exam_class_code", r.exam_class.clone());
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
    v.insert(
        "reporter",
        ctx.reporter_name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .or_else(|| r.reporter_no.clone())
            .unwrap_or_default(),
    );
    v.insert("reporter_no", opt(&r.reporter_no));
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

/// How a template marks abnormal and critical results (its `[flags]` table).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flags {
    /// Mark per `abnormal_flag` code ("1" normal, "2" high, "3" low, "4" other).
    pub abnormal: BTreeMap<String, String>,
    /// Appended to an item's mark when the item is critical.
    pub critical: String,
    /// The `{critical}` field of an exam report flagged critical.
    pub critical_report: String,
    pub bold_abnormal: bool,
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
    fn ages_as_reports_print_them() {
        assert_eq!(
            age_at("1980-03-15", "2026-11-20T09:00:00+08:00").as_deref(),
            Some("46岁")
        );
        assert_eq!(
            age_at("1980-11-21", "2026-11-20").as_deref(),
            Some("45岁"),
            "the day before the birthday"
        );
        assert_eq!(age_at("2026-05-20", "2026-11-20").as_deref(), Some("6月"));
        assert_eq!(age_at("2026-10-25", "2026-11-20").as_deref(), Some("26天"));
        assert_eq!(age_at("2026-11-20", "2026-11-20").as_deref(), Some("0天"));
        assert_eq!(age_at("2025-11-21", "2026-11-20").as_deref(), Some("11月"));
        assert_eq!(age_at("2027-01-01", "2026-11-20"), None, "born after the report");
        assert_eq!(age_at("unknown", "2026-11-20"), None);
    }

    #[test]
    fn exam_classes_print_in_chinese() {
        assert_eq!(exam_class_name("US"), "超声");
        assert_eq!(exam_class_name("mr"), "磁共振");
        assert_eq!(exam_class_name("CT"), "CT");
        assert_eq!(exam_class_name("XYZ"), "XYZ");
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
