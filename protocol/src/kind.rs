//! The kinds of record hmr delivers, as one enum: the outbox, `hmr.kinds`, the worker's
//! dispatch and dependency order, the source views and the command line all name a kind
//! through it, so a misspelt kind is a compile error, not a silently skipped branch.

use serde::{Deserialize, Serialize};

use crate::source::{self, SourceView};
use crate::types::ReportType;

/// A kind of record. The variants are in delivery order: what others depend on first
/// (departments before the staff in them, patients before their reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Department,
    Staff,
    Patient,
    LabReport,
    ExamReport,
    /// A doctor's 互认/不互认 decisions of one prescription check (key: the check id).
    Decision,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Department,
        Kind::Staff,
        Kind::Patient,
        Kind::LabReport,
        Kind::ExamReport,
        Kind::Decision,
    ];

    /// The name in `hmr.kinds`, `hmr.outbox.kind` and the README.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Department => "department",
            Kind::Staff => "staff",
            Kind::Patient => "patient",
            Kind::LabReport => "lab_report",
            Kind::ExamReport => "exam_report",
            Kind::Decision => "decision",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The kind a command-line word names: `patients` → patient, `lab` → lab_report.
    pub fn from_word(word: &str) -> Option<Kind> {
        Some(match word {
            "patients" => Kind::Patient,
            "departments" => Kind::Department,
            "lab" | "lab_reports" => Kind::LabReport,
            "exam" | "exam_reports" => Kind::ExamReport,
            other => return Kind::parse(other),
        })
    }

    /// Patients, departments and staff go in batches; the others one request each.
    pub const fn is_master_data(self) -> bool {
        matches!(self, Kind::Department | Kind::Staff | Kind::Patient)
    }

    pub const fn report_type(self) -> Option<ReportType> {
        match self {
            Kind::LabReport => Some(ReportType::Lab),
            Kind::ExamReport => Some(ReportType::Exam),
            _ => None,
        }
    }

    /// The canonical source view a DBA writes for this kind (decisions have none: they
    /// are made in hmr itself).
    pub fn view(self) -> Option<&'static SourceView> {
        Some(match self {
            Kind::Department => &source::DEPARTMENT,
            Kind::Staff => &source::STAFF,
            Kind::Patient => &source::PATIENT,
            Kind::LabReport => &source::LAB_REPORT,
            Kind::ExamReport => &source::EXAM_REPORT,
            Kind::Decision => return None,
        })
    }

    /// Whether records of other kinds wait for this one (and so its delivery releases them).
    pub const fn has_dependents(self) -> bool {
        matches!(self, Kind::Department | Kind::Patient)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Kind, String> {
        Kind::parse(s).ok_or_else(|| format!("unknown kind {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_views_agree() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
            assert_eq!(k.as_str().parse::<Kind>(), Ok(k));
            assert_eq!(serde_json::to_value(k).unwrap(), serde_json::json!(k.as_str()));
            if let Some(view) = k.view() {
                assert_eq!(view.kind, k.as_str(), "the source view of {k} names its kind");
            }
        }
        assert_eq!(Kind::parse("lab_item"), None);
        assert_eq!(Kind::from_word("lab"), Some(Kind::LabReport));
        assert_eq!(Kind::from_word("patients"), Some(Kind::Patient));
        assert_eq!(Kind::from_word("decisions"), None);
    }

    #[test]
    fn dependencies_come_first_in_delivery_order() {
        assert!(Kind::Department < Kind::Staff);
        assert!(Kind::Patient < Kind::LabReport && Kind::Patient < Kind::ExamReport);
        let mut shuffled = vec![
            Kind::ExamReport,
            Kind::Patient,
            Kind::Decision,
            Kind::Staff,
            Kind::Department,
        ];
        shuffled.sort();
        assert_eq!(
            shuffled,
            [
                Kind::Department,
                Kind::Staff,
                Kind::Patient,
                Kind::ExamReport,
                Kind::Decision
            ]
        );
    }
}
