//! Wire types, field for field as the platform names them. `null` counts as absent, so
//! optional fields are `Option` and left out when `None`. Unknown fields are refused.

use serde::{Deserialize, Serialize};

/// The four interface groups; each authenticates on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scope {
    #[serde(rename = "his-upload")]
    HisUpload,
    #[serde(rename = "lab-upload")]
    LabUpload,
    #[serde(rename = "exam-upload")]
    ExamUpload,
    #[serde(rename = "recognition")]
    Recognition,
}

impl Scope {
    pub const ALL: [Scope; 4] = [
        Scope::HisUpload,
        Scope::LabUpload,
        Scope::ExamUpload,
        Scope::Recognition,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::HisUpload => "his-upload",
            Scope::LabUpload => "lab-upload",
            Scope::ExamUpload => "exam-upload",
            Scope::Recognition => "recognition",
        }
    }
    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

// ---------------------------------------------------------------- token (section 2)

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "grantType", deny_unknown_fields)]
pub enum TokenRequest {
    #[serde(rename = "password")]
    Password {
        username: String,
        password: String,
        scope: Scope,
    },
    #[serde(rename = "signature", rename_all = "camelCase")]
    Signature {
        app_id: String,
        timestamp: i64,
        nonce: String,
        scope: Scope,
        sign_alg: SignAlg,
        sign: String,
    },
}

impl TokenRequest {
    pub fn scope(&self) -> Scope {
        match self {
            TokenRequest::Password { scope, .. } | TokenRequest::Signature { scope, .. } => *scope,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignAlg {
    #[serde(rename = "HMAC-SHA256")]
    HmacSha256,
    #[serde(rename = "HMAC-SM3")]
    HmacSm3,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenAnswer {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: u64,
}

// ---------------------------------------------------------------- master data (section 3)

/// A batch of at most [`crate::checks::MAX_BATCH`] records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch<T> {
    pub records: Vec<T>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Patient {
    pub patient_id: String,
    pub id_type: String,
    pub id_no: String,
    pub name: String,
    pub gender_code: String,
    pub birth_date: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    pub registered_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Department {
    pub dept_code: String,
    pub dept_name: String,
    pub std_dept_code: String,
    pub campus_code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Staff {
    pub staff_no: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gender_code: Option<String>,
    pub dept_code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub practice_cert_no: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<bool>,
    pub updated_at: String,
}

/// Per-record answer of a batch upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchAnswer {
    pub results: Vec<RecordResult>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordResult {
    pub index: usize,
    pub status: RecordStatus,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<crate::FieldError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordStatus {
    Accepted,
    Rejected,
}

// ---------------------------------------------------------------- reports (sections 4, 5)

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabReport {
    pub report_no: String,
    pub version: u32,
    pub patient_id: String,
    pub id_type: String,
    pub id_no: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visit_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visit_no: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_no: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dept_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_doctor_no: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specimen_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specimen_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specimen_no: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled_at: Option<String>,
    pub reported_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audited_at: Option<String>,
    pub auditor_no: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_code: Option<String>,
    pub items: Vec<LabItem>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabItem {
    pub item_code: String,
    pub item_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loinc: Option<String>,
    pub result_value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_range: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abnormal_flag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical_flag: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExamReport {
    pub report_no: String,
    pub version: u32,
    pub patient_id: String,
    pub id_type: String,
    pub id_no: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visit_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visit_no: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_no: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dept_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_doctor_no: Option<String>,
    pub exam_class: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exam_item_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exam_item_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_part_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_part_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accession_no: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub study_instance_uid: Option<String>,
    pub findings: String,
    pub impression: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub examined_at: Option<String>,
    pub reported_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audited_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporter_no: Option<String>,
    pub auditor_no: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical_flag: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Revoke {
    pub version: u32,
    pub reason: String,
    pub revoked_at: String,
    pub operator_no: String,
}

/// Lab and exam report numbers are separate namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReportType {
    Lab,
    Exam,
}

impl ReportType {
    pub fn as_str(self) -> &'static str {
        match self {
            ReportType::Lab => "lab",
            ReportType::Exam => "exam",
        }
    }
    pub fn parse(s: &str) -> Option<ReportType> {
        match s {
            "lab" => Some(ReportType::Lab),
            "exam" => Some(ReportType::Exam),
            _ => None,
        }
    }
    pub fn scope(self) -> Scope {
        match self {
            ReportType::Lab => Scope::LabUpload,
            ReportType::Exam => Scope::ExamUpload,
        }
    }
}

// ---------------------------------------------------------------- recognition (section 6)

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RecognitionItem {
    pub report_id: String,
    #[serde(rename = "type")]
    pub report_type: ReportType,
    pub org_code: String,
    pub org_name: String,
    pub report_no: String,
    pub version: u32,
    pub data_code: String,
    pub item_name: String,
    pub reported_at: String,
    pub valid_until: String,
}

/// Query parameters of `GET /recognitions`; all six are sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListQuery {
    pub id_type: String,
    pub id_no: String,
    pub visit_no: String,
    pub doctor_no: String,
    pub dept_code: String,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListAnswer {
    pub count: usize,
    pub url: String,
    pub items: Vec<RecognitionItem>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PreciseQuery {
    pub id_type: String,
    pub id_no: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_codes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemsAnswer {
    pub items: Vec<RecognitionItem>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrescriptionCheck {
    pub id_type: String,
    pub id_no: String,
    pub patient_id: String,
    pub visit_type: String,
    pub visit_no: String,
    pub doctor_no: String,
    pub dept_code: String,
    pub orders: Vec<CheckOrder>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckOrder {
    pub order_id: String,
    pub local_item_code: String,
    pub data_code: String,
    #[serde(rename = "type")]
    pub report_type: ReportType,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckAnswer {
    pub duplicate: bool,
    pub check_id: String,
    pub url: String,
    pub matches: Vec<CheckMatch>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckMatch {
    pub order_id: String,
    pub data_code: String,
    pub reports: Vec<RecognitionItem>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Decisions {
    pub check_id: String,
    pub doctor_no: String,
    pub dept_code: String,
    pub decided_at: String,
    pub decisions: Vec<Decision>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Decision {
    pub order_id: String,
    pub report_id: String,
    pub recognise: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_text: Option<String>,
}

/// `GET /prescriptions/checks/{checkId}` (§6): the decisions taken so far for a check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckDecisions {
    pub check_id: String,
    pub complete: bool,
    pub decisions: Vec<CheckDecision>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckDecision {
    pub order_id: String,
    pub report_id: String,
    pub recognise: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_text: Option<String>,
    pub doctor_no: String,
    pub decided_at: String,
    /// `page` (taken on the platform's page) or `upload` (sent by the hospital).
    pub source: DecisionSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DecisionSource {
    Page,
    Upload,
}

/// The 不互认 reason codes and their wording.
pub const DECLINE_REASONS: [(&str, &str); 6] = [
    ("01", "病情变化，原结果难以反映当前病情"),
    ("02", "结果在疾病发展中变化较快"),
    ("03", "手术、输血等重大医疗措施前"),
    ("04", "急诊、急救"),
    ("05", "司法、伤残、病退等鉴定"),
    ("06", "其他情形确需复查"),
];
