//! Everything the simulator holds, in memory behind one mutex. Handlers run synchronously
//! while holding it; nothing awaits with the lock taken.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use axum::body::Bytes;
use chrono::{DateTime, Duration, FixedOffset, Utc};
use hmr_protocol::checks::{normalise_id_no, parse_time};
use hmr_protocol::{
    Decision, Department, ExamReport, LabReport, Patient, RecognitionItem, ReportType, Revoke, Scope, Staff,
};
use serde::Serialize;

use crate::faults::Faults;
use crate::journal::Journal;

/// China Standard Time: the offset the simulator writes its own times in.
pub fn cst() -> FixedOffset {
    hmr_protocol::checks::china()
}

#[derive(Default)]
pub struct State {
    /// Per org code; every configured org has an entry from the start.
    pub orgs: BTreeMap<String, OrgData>,
    pub tokens: HashMap<String, TokenInfo>,
    /// `(appId, nonce)` pairs ever used by a valid signature grant.
    pub nonces: HashSet<(String, String)>,
    /// Remembered final answers by `(org, X-Request-Id)`.
    pub idempotency: HashMap<(String, String), Remembered>,
    pub journal: Journal,
    pub tickets: HashMap<String, Ticket>,
    /// Tickets already shown: a second visit is `410`, not `404`.
    pub used_tickets: HashSet<String>,
    /// Pages opened, by ticket: usable in the browser that opened them (its cookie).
    pub pages: HashMap<String, OpenPage>,
    pub checks: HashMap<String, Check>,
    pub faults: Faults,
    /// Shifts the simulator's clock (control API), for token and validity rehearsals.
    pub clock_offset_secs: i64,
}

impl State {
    pub fn new(org_codes: impl IntoIterator<Item = String>) -> State {
        let mut st = State::default();
        for code in org_codes {
            st.orgs.insert(code, OrgData::default());
        }
        st
    }

    /// The simulator's clock, in +08:00.
    pub fn now(&self) -> DateTime<FixedOffset> {
        (Utc::now() + Duration::seconds(self.clock_offset_secs)).with_timezone(&cst())
    }

    pub fn org_mut(&mut self, code: &str) -> &mut OrgData {
        self.orgs.entry(code.to_owned()).or_default()
    }

    /// A report version by its id, with the org's name resolved by the caller.
    pub fn version(&self, id: &ReportId) -> Option<&HeldVersion> {
        self.orgs
            .get(&id.org)?
            .reports(id.kind)
            .get(&id.report_no)?
            .versions
            .get(&id.version)
    }
}

#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub org: String,
    pub scope: Scope,
    pub expires_at: DateTime<FixedOffset>,
}

/// A final answer kept for idempotent replay.
#[derive(Debug, Clone)]
pub struct Remembered {
    pub fingerprint: String,
    pub status: u16,
    pub content_type: &'static str,
    pub body: Bytes,
    pub at: DateTime<FixedOffset>,
}

#[derive(Default)]
pub struct OrgData {
    pub patients: BTreeMap<String, Patient>,
    pub departments: BTreeMap<String, Department>,
    pub staff: BTreeMap<String, Staff>,
    pub lab: BTreeMap<String, HeldReport>,
    pub exam: BTreeMap<String, HeldReport>,
    pub decisions: Vec<DecisionRecord>,
    /// Report ids this org recognised (互认) by a decision: these it may download.
    pub recognised: BTreeSet<String>,
    pub downloads: Vec<DownloadRecord>,
}

impl OrgData {
    pub fn reports(&self, kind: ReportType) -> &BTreeMap<String, HeldReport> {
        match kind {
            ReportType::Lab => &self.lab,
            ReportType::Exam => &self.exam,
        }
    }

    pub fn reports_mut(&mut self, kind: ReportType) -> &mut BTreeMap<String, HeldReport> {
        match kind {
            ReportType::Lab => &mut self.lab,
            ReportType::Exam => &mut self.exam,
        }
    }
}

#[derive(Default)]
pub struct HeldReport {
    pub versions: BTreeMap<u32, HeldVersion>,
}

impl HeldReport {
    pub fn newest(&self) -> Option<(u32, &HeldVersion)> {
        self.versions.iter().next_back().map(|(v, h)| (*v, h))
    }
}

pub struct HeldVersion {
    pub body: ReportBody,
    pub revoked: Option<Revoke>,
    pub pdf: Option<StoredPdf>,
    pub received_at: DateTime<FixedOffset>,
}

pub struct StoredPdf {
    pub bytes: Bytes,
    pub sha256: String,
}

/// A report as uploaded, lab or exam.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ReportBody {
    Lab(LabReport),
    Exam(ExamReport),
}

impl ReportBody {
    pub fn kind(&self) -> ReportType {
        match self {
            ReportBody::Lab(_) => ReportType::Lab,
            ReportBody::Exam(_) => ReportType::Exam,
        }
    }
    pub fn report_no(&self) -> &str {
        match self {
            ReportBody::Lab(r) => &r.report_no,
            ReportBody::Exam(r) => &r.report_no,
        }
    }
    pub fn version(&self) -> u32 {
        match self {
            ReportBody::Lab(r) => r.version,
            ReportBody::Exam(r) => r.version,
        }
    }
    pub fn patient_id(&self) -> &str {
        match self {
            ReportBody::Lab(r) => &r.patient_id,
            ReportBody::Exam(r) => &r.patient_id,
        }
    }
    pub fn id_type(&self) -> &str {
        match self {
            ReportBody::Lab(r) => &r.id_type,
            ReportBody::Exam(r) => &r.id_type,
        }
    }
    pub fn id_no(&self) -> &str {
        match self {
            ReportBody::Lab(r) => &r.id_no,
            ReportBody::Exam(r) => &r.id_no,
        }
    }
    pub fn data_code(&self) -> Option<&str> {
        match self {
            ReportBody::Lab(r) => r.data_code.as_deref(),
            ReportBody::Exam(r) => r.data_code.as_deref(),
        }
    }
    pub fn reported_at(&self) -> &str {
        match self {
            ReportBody::Lab(r) => &r.reported_at,
            ReportBody::Exam(r) => &r.reported_at,
        }
    }
    /// Lab: result lines; exam: one report.
    pub fn item_count(&self) -> usize {
        match self {
            ReportBody::Lab(r) => r.items.len(),
            ReportBody::Exam(_) => 1,
        }
    }
    pub fn belongs_to(&self, id_type: &str, id_no: &str) -> bool {
        self.id_type() == id_type && normalise_id_no(self.id_no()) == normalise_id_no(id_no)
    }
    pub fn reported_time(&self) -> Option<DateTime<FixedOffset>> {
        parse_time(self.reported_at())
    }
}

/// `{orgCode}:{lab|exam}:{reportNo}:{version}`: names one report version. Org codes and
/// the type contain no `:`, and the version is the last segment, so a report number with
/// `:` in it still parses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReportId {
    pub org: String,
    pub kind: ReportType,
    pub report_no: String,
    pub version: u32,
}

impl ReportId {
    pub fn parse(s: &str) -> Option<ReportId> {
        let (head, version) = s.rsplit_once(':')?;
        let version: u32 = version.parse().ok()?;
        let mut parts = head.splitn(3, ':');
        let org = parts.next()?.to_owned();
        let kind = ReportType::parse(parts.next()?)?;
        let report_no = parts.next()?.to_owned();
        if org.is_empty() || report_no.is_empty() || version == 0 {
            return None;
        }
        Some(ReportId {
            org,
            kind,
            report_no,
            version,
        })
    }
}

impl std::fmt::Display for ReportId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}",
            self.org,
            self.kind.as_str(),
            self.report_no,
            self.version
        )
    }
}

/// A one-time page: the items as they were when the URL was handed out.
pub struct Ticket {
    pub org: String,
    pub title: String,
    pub items: Vec<RecognitionItem>,
    pub expires_at: DateTime<FixedOffset>,
    /// The check whose decisions the page takes (a check's URL), if any.
    pub check_id: Option<String>,
}

/// A page opened once: the browser holding `secret` (a cookie) may reload it and post its form.
pub struct OpenPage {
    pub secret: String,
    pub ticket: Ticket,
    pub opened_at: DateTime<FixedOffset>,
}

/// A prescription check, kept so its decisions can be verified against what was offered.
pub struct Check {
    pub org: String,
    pub patient_id: String,
    pub created_at: DateTime<FixedOffset>,
    /// Who asked: the page's decisions are this doctor's unless the form names another.
    pub doctor_no: String,
    pub dept_code: String,
    /// Matched orders only: orderId → report ids offered for it.
    pub matched: BTreeMap<String, Vec<String>>,
    /// The decisions request accepted for this check, to replay or refuse a different one.
    pub decided: Option<hmr_protocol::Decisions>,
    /// Decisions taken on the check's page, per order (§6).
    pub page: BTreeMap<String, hmr_protocol::CheckDecision>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord {
    pub check_id: String,
    pub doctor_no: String,
    pub dept_code: String,
    pub decided_at: String,
    pub received_at: String,
    pub decisions: Vec<Decision>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DownloadRecord {
    pub report_id: String,
    pub format: String,
    pub at: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_ids_round_trip() {
        let id = ReportId {
            org: "X".into(),
            kind: ReportType::Exam,
            report_no: "E:1".into(),
            version: 3,
        };
        assert_eq!(id.to_string(), "X:exam:E:1:3");
        assert_eq!(ReportId::parse("X:exam:E:1:3"), Some(id));
        assert_eq!(ReportId::parse("X:blood:E:1"), None);
        assert_eq!(ReportId::parse("X:lab:E:0"), None);
        assert_eq!(ReportId::parse("X:lab:E"), None);
    }
}
