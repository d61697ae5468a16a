//! What hmr answers the hospital: the JSON of the SQL functions a HIS calls
//! (`hmr_list_recognitions`, `hmr_query_recognitions`, `hmr_check_order`,
//! `hmr_check_prescription`, `hmr_record_decision`, `hmr_page_decisions`) and of serve's JSON
//! API, which passes them on. The hospital side's own snake_case words, not the platform's.
//!
//! The extension builds them, serve and the tests read them, and `docs/openapi.yaml`'s schemas
//! are generated from them (`openapi_schemas`, checked by `tests/openapi.rs`). Readers are
//! lenient (unknown fields are ignored): a newer extension may add a field.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::types::{DecisionSource, RecognitionItem, ReportType};

/// Whether the platform answered the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CallStatus {
    /// The platform answered.
    Ok,
    /// The platform could not be asked (down, too slow, not configured): nothing is known.
    Unavailable,
    /// The platform refused to check (a data problem, e.g. the patient not there yet): the
    /// save goes on, and the check is recorded with the reason.
    Unchecked,
    /// The platform refuses the patient's identity (证件号码): the list shows nothing until the
    /// HIS corrects it (`reason` says what the platform refused).
    InvalidPatient,
}

/// A report that may be recognised (互认): another hospital's, or this one's own (`own`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReportSummary {
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
    /// A report of this hospital itself. The contract counts them (§6: "reports of the asking
    /// org itself count unless the platform is configured otherwise"), so hmr offers them
    /// too, marked: the HIS already holds them.
    #[serde(default)]
    pub own: bool,
    /// This hospital's decision on the report: `recognised` when an order's current decision
    /// (of a check the platform did not refuse) recognises it (it may be downloaded), else
    /// `declined` when one declines it. Filled by serve's list (`GET /api/badge`), read at
    /// each call; a HIS asks `hmr.report_marks(report_ids)` (kept out of
    /// `hmr_list_recognitions`, the reception's hot path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided: Option<Decided>,
}

/// A hospital's decision on a report, as the list marks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Decided {
    /// 已互认: recognised here (the report may be downloaded).
    Recognised,
    /// 不互认: declined here, the test performed again.
    Declined,
}

impl From<&RecognitionItem> for ReportSummary {
    fn from(i: &RecognitionItem) -> ReportSummary {
        ReportSummary {
            report_id: i.report_id.clone(),
            report_type: i.report_type,
            org_code: i.org_code.clone(),
            org_name: i.org_name.clone(),
            report_no: i.report_no.clone(),
            version: i.version,
            data_code: i.data_code.clone(),
            item_name: i.item_name.clone(),
            reported_at: i.reported_at.clone(),
            valid_until: i.valid_until.clone(),
            own: false,
            decided: None,
        }
    }
}

/// The recognition list (互认信息列表, the badge): `hmr_list_recognitions`, `GET /api/badge`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ListResult {
    pub status: CallStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub count: usize,
    /// The platform's page listing them (a one-time ticket).
    pub url: Option<String>,
    pub items: Vec<ReportSummary>,
    /// Orders of this patient recognised here whose report its hospital revoked since: the
    /// tests are to be performed after all. Filled by serve's list (it knows the patient);
    /// `hmr_list_recognitions` (by identity number) leaves it out: a HIS reads
    /// `hmr.orders_to_perform`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_perform: Vec<OrderToPerform>,
}

/// An order recognised (互认, not performed) whose report was revoked at its hospital since.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OrderToPerform {
    pub order_id: String,
    pub report_id: String,
    /// The order's item as the HIS named it at the check, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_name: Option<String>,
    pub revoked_at: String,
}

impl ListResult {
    /// Nothing known: the platform could not be asked.
    pub fn unavailable(reason: impl Into<String>) -> ListResult {
        ListResult {
            status: CallStatus::Unavailable,
            reason: Some(reason.into()),
            count: 0,
            url: None,
            items: vec![],
            to_perform: vec![],
        }
    }
}

/// The precise query (精准互认信息): `hmr_query_recognitions`, `POST /api/query`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct QueryResult {
    pub status: CallStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub items: Vec<ReportSummary>,
}

/// One order that duplicates recognisable reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OrderMatch {
    pub order_id: String,
    /// The HIS's item code of the order (null if the platform matched an order not asked).
    pub item_code: Option<String>,
    pub data_code: String,
    pub reports: Vec<ReportSummary>,
}

/// The check at ordering: `hmr_check_order`. With the visit's `patient_id` and `visit_type`
/// it is a prescription check of the ordered items: `check_id` names it, and `url` is its page
/// where the doctor decides (decisions there or through `hmr_record_decision` count at save).
/// Without them, the precise query: `url` is the recognition list's page, no `check_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OrderCheckResult {
    pub status: CallStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub duplicate: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_id: Option<String>,
    /// The page the workstation opens when `duplicate`.
    pub url: Option<String>,
    pub matches: Vec<OrderMatch>,
}

/// The check at signing (处方保存互认逻辑校验): `hmr_check_prescription`, `POST /api/check`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PrescriptionCheckResult {
    pub status: CallStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Some order duplicates a recognisable report: the doctor decides 互认 or 不互认 per order.
    pub duplicate: bool,
    /// The check the decisions name (null when no order was in the catalog).
    pub check_id: Option<String>,
    /// The platform's page for this check (decisions can be taken there).
    pub url: Option<String>,
    pub matches: Vec<OrderMatch>,
}

/// The DETAIL of the gate's refusal (`HM001`, a prompt): the check and its matched orders still
/// without a decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PromptDetail {
    pub check_id: String,
    pub url: Option<String>,
    /// The undecided matches.
    pub matches: Vec<OrderMatch>,
}

/// A decision recorded: `hmr_record_decision`, `POST /api/decide`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DecisionResult {
    /// Absent when the same decision had already been sent (`already_sent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_id: Option<i64>,
    pub check_id: String,
    pub order_id: String,
    pub report_id: String,
    pub recognise: bool,
    /// Every matched order of the check has its decision (they go to the platform).
    pub complete: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub already_sent: Option<bool>,
}

/// A decision taken for a check, on the platform's page or uploaded by the hospital.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PageDecision {
    pub order_id: String,
    pub report_id: String,
    pub recognise: bool,
    pub reason_code: Option<String>,
    pub reason_text: Option<String>,
    pub doctor_no: String,
    pub decided_at: String,
    pub source: DecisionSource,
}

/// The decisions the platform holds for a check (互认页面操作结果): `hmr_page_decisions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PageDecisionsResult {
    pub status: CallStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_id: Option<String>,
    /// Every matched order of the check has a decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete: Option<bool>,
    /// How many page decisions were recorded here by this call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decisions: Option<Vec<PageDecision>>,
}

/// The answers' JSON Schemas as OpenAPI 3.0 `components.schemas` (by type name), for
/// `docs/openapi.yaml`.
pub fn openapi_schemas() -> serde_json::Map<String, serde_json::Value> {
    let mut generator = schemars::generate::SchemaSettings::openapi3().into_generator();
    generator.subschema_for::<ListResult>();
    generator.subschema_for::<QueryResult>();
    generator.subschema_for::<OrderCheckResult>();
    generator.subschema_for::<PrescriptionCheckResult>();
    generator.subschema_for::<DecisionResult>();
    generator.subschema_for::<PageDecisionsResult>();
    generator.take_definitions(true)
}

/// What an answer showed its caller: the check it made and the reports it listed (a widget
/// session may then act on these only).
pub trait Shown {
    /// The check this answer made, if any.
    fn check_id(&self) -> Option<&str> {
        None
    }
    /// The reports this answer showed.
    fn report_ids(&self) -> Vec<&str>;
}

impl Shown for ListResult {
    fn report_ids(&self) -> Vec<&str> {
        self.items.iter().map(|i| i.report_id.as_str()).collect()
    }
}

impl Shown for QueryResult {
    fn report_ids(&self) -> Vec<&str> {
        self.items.iter().map(|i| i.report_id.as_str()).collect()
    }
}

impl Shown for PrescriptionCheckResult {
    fn check_id(&self) -> Option<&str> {
        self.check_id.as_deref()
    }
    fn report_ids(&self) -> Vec<&str> {
        self.matches
            .iter()
            .flat_map(|m| m.reports.iter().map(|r| r.report_id.as_str()))
            .collect()
    }
}
