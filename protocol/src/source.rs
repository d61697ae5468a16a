//! The canonical source views a DBA writes (`hmr_src.*`), and their conversion into
//! platform records. Column names are the hospital side's vocabulary; the table maps
//! each to the platform field it fills, so no other crate needs the platform's names.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use sha2::Digest;

use crate::ProtocolError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    pub field: &'static str,
    /// The SQL type the column should have (`text`, `date`, `timestamptz`, `boolean`, `integer`).
    pub sql_type: &'static str,
    pub required: bool,
}

/// One canonical source view: the kind it serves, its key column and its columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceView {
    pub kind: &'static str,
    pub view: &'static str,
    pub key: &'static str,
    pub columns: &'static [Column],
}

const fn req(name: &'static str, field: &'static str, sql_type: &'static str) -> Column {
    Column {
        name,
        field,
        sql_type,
        required: true,
    }
}
const fn opt(name: &'static str, field: &'static str, sql_type: &'static str) -> Column {
    Column {
        name,
        field,
        sql_type,
        required: false,
    }
}

pub const PATIENT: SourceView = SourceView {
    kind: "patient",
    view: "hmr_src.patient",
    key: "patient_id",
    columns: &[
        req("patient_id", "patientId", "text"),
        req("id_type", "idType", "text"),
        req("id_no", "idNo", "text"),
        req("name", "name", "text"),
        req("gender_code", "genderCode", "text"),
        req("birth_date", "birthDate", "date"),
        opt("phone", "phone", "text"),
        req("registered_at", "registeredAt", "timestamptz"),
        req("updated_at", "updatedAt", "timestamptz"),
    ],
};

pub const DEPARTMENT: SourceView = SourceView {
    kind: "department",
    view: "hmr_src.department",
    key: "dept_code",
    columns: &[
        req("dept_code", "deptCode", "text"),
        req("dept_name", "deptName", "text"),
        req("std_dept_code", "stdDeptCode", "text"),
        req("campus_code", "campusCode", "text"),
        opt("parent_code", "parentCode", "text"),
        opt("status", "status", "text"),
        req("updated_at", "updatedAt", "timestamptz"),
    ],
};

pub const STAFF: SourceView = SourceView {
    kind: "staff",
    view: "hmr_src.staff",
    key: "staff_no",
    columns: &[
        req("staff_no", "staffNo", "text"),
        req("name", "name", "text"),
        opt("gender_code", "genderCode", "text"),
        req("dept_code", "deptCode", "text"),
        opt("title_code", "titleCode", "text"),
        opt("practice_cert_no", "practiceCertNo", "text"),
        opt("role", "role", "text"),
        opt("status", "status", "text"),
        opt("external", "external", "boolean"),
        req("updated_at", "updatedAt", "timestamptz"),
    ],
};

pub const LAB_REPORT: SourceView = SourceView {
    kind: "lab_report",
    view: "hmr_src.lab_report",
    key: "report_no",
    columns: &[
        req("report_no", "reportNo", "text"),
        req("patient_id", "patientId", "text"),
        req("id_type", "idType", "text"),
        req("id_no", "idNo", "text"),
        req("patient_name", "name", "text"),
        opt("visit_type", "visitType", "text"),
        opt("visit_no", "visitNo", "text"),
        opt("order_no", "orderNo", "text"),
        opt("dept_code", "deptCode", "text"),
        opt("request_doctor_no", "requestDoctorNo", "text"),
        opt("specimen_code", "specimenCode", "text"),
        opt("specimen_name", "specimenName", "text"),
        opt("specimen_no", "specimenNo", "text"),
        opt("sampled_at", "sampledAt", "timestamptz"),
        req("reported_at", "reportedAt", "timestamptz"),
        opt("audited_at", "auditedAt", "timestamptz"),
        req("auditor_no", "auditorNo", "text"),
        opt("category_code", "categoryCode", "text"),
        opt("category_name", "categoryName", "text"),
        opt("data_code", "dataCode", "text"),
    ],
};

/// Items of a lab report: one row per result, `report_no` names the report, the
/// optional `seq` orders them.
pub const LAB_ITEM: SourceView = SourceView {
    kind: "lab_item",
    view: "hmr_src.lab_item",
    key: "report_no",
    columns: &[
        req("item_code", "itemCode", "text"),
        req("item_name", "itemName", "text"),
        opt("loinc", "loinc", "text"),
        req("result_value", "resultValue", "text"),
        opt("result_unit", "resultUnit", "text"),
        opt("reference_range", "referenceRange", "text"),
        opt("abnormal_flag", "abnormalFlag", "text"),
        opt("critical_flag", "criticalFlag", "boolean"),
        opt("method", "method", "text"),
    ],
};

pub const EXAM_REPORT: SourceView = SourceView {
    kind: "exam_report",
    view: "hmr_src.exam_report",
    key: "report_no",
    columns: &[
        req("report_no", "reportNo", "text"),
        req("patient_id", "patientId", "text"),
        req("id_type", "idType", "text"),
        req("id_no", "idNo", "text"),
        req("patient_name", "name", "text"),
        opt("visit_type", "visitType", "text"),
        opt("visit_no", "visitNo", "text"),
        opt("order_no", "orderNo", "text"),
        opt("dept_code", "deptCode", "text"),
        opt("request_doctor_no", "requestDoctorNo", "text"),
        req("exam_class", "examClass", "text"),
        opt("exam_item_code", "examItemCode", "text"),
        opt("exam_item_name", "examItemName", "text"),
        opt("body_part_code", "bodyPartCode", "text"),
        opt("body_part_name", "bodyPartName", "text"),
        opt("data_code", "dataCode", "text"),
        opt("accession_no", "accessionNo", "text"),
        opt("study_instance_uid", "studyInstanceUid", "text"),
        req("findings", "findings", "text"),
        req("impression", "impression", "text"),
        opt("examined_at", "examinedAt", "timestamptz"),
        req("reported_at", "reportedAt", "timestamptz"),
        opt("audited_at", "auditedAt", "timestamptz"),
        opt("reporter_no", "reporterNo", "text"),
        req("auditor_no", "auditorNo", "text"),
        opt("critical_flag", "criticalFlag", "boolean"),
        opt("image_url", "imageUrl", "text"),
    ],
};

/// A report's patient identity, as (report view column, patient view column). A report view
/// may leave these out: they are then taken from the patient view by `patient_id`, one
/// lookup by key (over an FDW, a report view that joins the patient view makes every read of
/// a report fetch every patient: a foreign join is not parameterised).
pub const PATIENT_IDENTITY: [(&str, &str); 3] = [("id_type", "id_type"), ("id_no", "id_no"), ("patient_name", "name")];

/// Fills the identity columns a report row does not have from its patient's row. A column
/// the view has is kept as it is, `null` included.
pub fn fill_identity(report: &mut Map<String, Value>, patient: &Map<String, Value>) {
    for (column, from) in PATIENT_IDENTITY {
        if !report.contains_key(column) {
            if let Some(v) = patient.get(from) {
                report.insert(column.to_string(), v.clone());
            }
        }
    }
}

/// Whether a report view's missing `column` can come from the patient view instead.
pub fn from_patient(view: &SourceView, column: &str) -> bool {
    matches!(view.kind, "lab_report" | "exam_report") && PATIENT_IDENTITY.iter().any(|(c, _)| *c == column)
}

pub const ALL_VIEWS: [SourceView; 6] = [PATIENT, DEPARTMENT, STAFF, LAB_REPORT, LAB_ITEM, EXAM_REPORT];

pub fn view_for(kind: &str) -> Option<&'static SourceView> {
    ALL_VIEWS.iter().find(|v| v.kind == kind)
}

impl SourceView {
    /// The column filling `field`; a field no column fills (`version`, `items`, an
    /// unknown field) keeps its own name rather than becoming an anonymous `?`.
    fn column_of_field(&self, field: &str) -> String {
        self.columns
            .iter()
            .find(|c| c.field == field)
            .map_or_else(|| field.to_string(), |c| c.name.to_string())
    }

    /// Maps a source row (column → value, as `to_jsonb(row)` gives it) to the platform's
    /// field names; extra columns are ignored; `null`, and an empty or blank text in an
    /// optional column (HIS tables often hold `''` for "none"), count as absent.
    pub fn to_fields(&self, row: &Map<String, Value>) -> Map<String, Value> {
        self.columns
            .iter()
            .filter_map(|c| match row.get(c.name) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if !c.required && s.trim().is_empty() => None,
                Some(v) => Some((c.field.to_string(), v.clone())),
            })
            .collect()
    }

    /// Builds a platform record from a row plus fields the hospital side adds (version,
    /// items). Shape errors name the DBA's column (`items[2].result_value` for items).
    pub fn record<T: DeserializeOwned>(
        &self,
        row: &Map<String, Value>,
        extra: Map<String, Value>,
    ) -> Result<T, ProtocolError> {
        let mut fields = self.to_fields(row);
        fields.extend(extra);
        serde_path_to_error::deserialize(Value::Object(fields)).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // serde reports a missing field by message, not path: recover its name.
            let (path, reason) = match inner.strip_prefix("missing field `") {
                Some(rest) => {
                    let field = rest.split('`').next().unwrap_or_default();
                    let at = if path == "." {
                        field.to_string()
                    } else {
                        format!("{path}.{field}")
                    };
                    (at, "required".to_string())
                }
                None => (path, inner.split(" at line").next().unwrap_or_default().to_string()),
            };
            ProtocolError::Shape {
                field: self.column_path(&path),
                reason,
            }
        })
    }

    /// `items[2].resultValue` → `items[2].result_value`; `idNo` → `id_no`.
    fn column_path(&self, path: &str) -> String {
        match path.split_once('.') {
            Some((head, rest)) if head.starts_with("items[") => {
                format!("{head}.{}", LAB_ITEM.column_of_field(rest))
            }
            _ => self.column_of_field(path),
        }
    }
}

/// The column a platform field (as named in a platform or validation error) comes from.
pub fn column_for_field(kind: &str, field: &str) -> String {
    let Some(view) = view_for(kind) else {
        return field.to_string();
    };
    match field.split_once('.') {
        Some((head, rest)) if head.starts_with("items[") => format!("{head}.{}", LAB_ITEM.column_of_field(rest)),
        _ => view
            .columns
            .iter()
            .find(|c| c.field == field)
            .map(|c| c.name.to_string())
            .unwrap_or_else(|| field.to_string()),
    }
}

/// Content hash of a record as the platform would hold it, version excluded, so a
/// re-approval that changes nothing sends nothing.
pub fn content_hash<T: serde::Serialize>(record: &T) -> String {
    let mut value = serde_json::to_value(record).expect("wire types always serialize");
    if let Value::Object(map) = &mut value {
        map.remove("version");
    }
    hex::encode(sha2::Sha256::digest(
        serde_json::to_vec(&value).expect("values serialize"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::*;
    use serde_json::json;

    fn full_row(view: &SourceView) -> Map<String, Value> {
        view.columns
            .iter()
            .map(|c| {
                let v = match c.sql_type {
                    "boolean" => json!(true),
                    "date" => json!("2000-01-01"),
                    "timestamptz" => json!("2024-06-01T08:00:00+08:00"),
                    _ => json!("x"),
                };
                (c.name.to_string(), v)
            })
            .collect()
    }

    /// The tables above and the wire types must not drift apart: every column lands in a
    /// field that exists, and every field of the record is reachable from a column.
    #[test]
    fn identity_comes_from_the_patient_row_only_when_the_view_lacks_it() {
        let mut report = json!({"report_no": "J1", "patient_id": "P1", "patient_name": null})
            .as_object()
            .unwrap()
            .clone();
        let patient = json!({"patient_id": "P1", "id_type": "01", "id_no": "X", "name": "陈"})
            .as_object()
            .unwrap()
            .clone();
        fill_identity(&mut report, &patient);
        assert_eq!(report["id_type"], "01");
        assert_eq!(report["id_no"], "X");
        // The view has the column: its null stands (and is reported as such).
        assert_eq!(report["patient_name"], Value::Null);
        assert!(from_patient(&LAB_REPORT, "id_no") && !from_patient(&PATIENT, "id_no"));
        assert!(!from_patient(&EXAM_REPORT, "report_no"));
    }

    #[test]
    fn views_cover_wire_types() {
        let extra = |v: Value| v.as_object().unwrap().clone();
        let p: Patient = PATIENT.record(&full_row(&PATIENT), Map::new()).unwrap();
        assert_eq!(
            serde_json::to_value(&p).unwrap().as_object().unwrap().len(),
            PATIENT.columns.len()
        );
        let d: Department = DEPARTMENT.record(&full_row(&DEPARTMENT), Map::new()).unwrap();
        assert_eq!(
            serde_json::to_value(&d).unwrap().as_object().unwrap().len(),
            DEPARTMENT.columns.len()
        );
        let s: Staff = STAFF.record(&full_row(&STAFF), Map::new()).unwrap();
        assert_eq!(
            serde_json::to_value(&s).unwrap().as_object().unwrap().len(),
            STAFF.columns.len()
        );
        let item = Value::Object(LAB_ITEM.to_fields(&full_row(&LAB_ITEM)));
        let l: LabReport = LAB_REPORT
            .record(&full_row(&LAB_REPORT), extra(json!({"version": 1, "items": [item]})))
            .unwrap();
        let lv = serde_json::to_value(&l).unwrap();
        assert_eq!(lv.as_object().unwrap().len(), LAB_REPORT.columns.len() + 2);
        assert_eq!(lv["items"][0].as_object().unwrap().len(), LAB_ITEM.columns.len());
        let e: ExamReport = EXAM_REPORT
            .record(&full_row(&EXAM_REPORT), extra(json!({"version": 1})))
            .unwrap();
        assert_eq!(
            serde_json::to_value(&e).unwrap().as_object().unwrap().len(),
            EXAM_REPORT.columns.len() + 1
        );
    }

    #[test]
    fn shape_errors_name_the_column() {
        let mut row = full_row(&PATIENT);
        row.insert("gender_code".into(), json!(1));
        let err = PATIENT.record::<Patient>(&row, Map::new()).unwrap_err();
        assert_eq!(err.field_and_reason().0, "gender_code");
        row.remove("id_no");
        row.insert("gender_code".into(), json!("1"));
        let err = PATIENT.record::<Patient>(&row, Map::new()).unwrap_err();
        assert_eq!(err.field_and_reason().0, "id_no");
        let item = json!({"itemCode": "A", "itemName": "B", "resultValue": 5});
        let err = LAB_REPORT
            .record::<LabReport>(
                &full_row(&LAB_REPORT),
                json!({"version": 1, "items": [item]}).as_object().unwrap().clone(),
            )
            .unwrap_err();
        assert_eq!(err.field_and_reason().0, "items[0].result_value");
    }

    #[test]
    fn hash_ignores_version() {
        let row = full_row(&EXAM_REPORT);
        let a: ExamReport = EXAM_REPORT
            .record(&row, json!({"version": 1}).as_object().unwrap().clone())
            .unwrap();
        let mut b = a.clone();
        b.version = 2;
        assert_eq!(content_hash(&a), content_hash(&b));
        b.findings = "y".into();
        assert_ne!(content_hash(&a), content_hash(&b));
    }
}

/// A record of one kind, read from its source row and valid for the platform.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Patient(crate::Patient),
    Department(crate::Department),
    Staff(crate::Staff),
    LabReport(crate::LabReport),
    ExamReport(crate::ExamReport),
}

impl Record {
    /// Reads `row` (a source view's row) as a record of `kind` with the `extra` fields (a
    /// report's `version` and `items`) and validates it: the one per-kind dispatch, used by
    /// the worker before it sends and by `hmr.check_sources()` before anything is sent.
    /// `Kind::Decision` has no source view: a shape error.
    pub fn read(
        kind: crate::Kind,
        row: &Map<String, Value>,
        extra: Map<String, Value>,
        now: &chrono::DateTime<chrono::FixedOffset>,
    ) -> Result<Record, ProtocolError> {
        use crate::{validate, Kind};
        let invalid = ProtocolError::Invalid;
        Ok(match kind {
            Kind::Patient => {
                let r = PATIENT.record(row, extra)?;
                validate::patient(&r, now).map_err(invalid)?;
                Record::Patient(r)
            }
            Kind::Department => {
                let r = DEPARTMENT.record(row, extra)?;
                validate::department(&r, now).map_err(invalid)?;
                Record::Department(r)
            }
            Kind::Staff => {
                let r = STAFF.record(row, extra)?;
                validate::staff(&r, now).map_err(invalid)?;
                Record::Staff(r)
            }
            Kind::LabReport => {
                let r = LAB_REPORT.record(row, extra)?;
                validate::lab_report(&r, now).map_err(invalid)?;
                Record::LabReport(r)
            }
            Kind::ExamReport => {
                let r = EXAM_REPORT.record(row, extra)?;
                validate::exam_report(&r, now).map_err(invalid)?;
                Record::ExamReport(r)
            }
            Kind::Decision => {
                return Err(ProtocolError::Shape {
                    field: String::new(),
                    reason: "decision has no source view".into(),
                })
            }
        })
    }
}
