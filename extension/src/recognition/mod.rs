//! The recognition services as SQL functions (the public `hmr_*` wrappers are in
//! `sql/recognition.sql`). Answers are JSON in the hospital side's own snake_case words; the
//! platform's field names stay in the protocol crate.
//!
//! Rooms: `calls.rs` the calls a workstation makes (list, query, order check, check at
//! signing); `page.rs` decisions taken on the platform's page and the rules of a decision;
//! `kept.rs` what must outlive the caller's transaction (checks and prompts written from
//! files) and the reports kept for download; this file the helpers they share.

use std::collections::HashMap;

use hmr_protocol::answers::{
    CallStatus, ListResult, OrderCheckResult, OrderMatch, PageDecision, PageDecisionsResult, PrescriptionCheckResult,
    QueryResult, ReportSummary,
};
use hmr_protocol::envelope::parse_data;
use hmr_protocol::{
    paths, CheckAnswer, CheckDecisions, CheckOrder, DecisionSource, ItemsAnswer, ListAnswer, ListQuery, PreciseQuery,
    PrescriptionCheck, RecognitionItem, ReportType,
};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};
use sha2::Digest;

use crate::gucs;
use crate::plans;
use crate::platform::{call, CallError, Settings};

/// A report as the hospital's answers show it.
fn item_json(i: &RecognitionItem, own_org: &str) -> ReportSummary {
    ReportSummary {
        own: i.org_code == own_org,
        ..ReportSummary::from(i)
    }
}

fn bad_argument(message: String) -> ! {
    ereport!(
        PgLogLevel::ERROR,
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        message
    );
    unreachable!("ereport(ERROR) does not return")
}

fn refused(status: u16, message: &str) -> ! {
    ereport!(
        PgLogLevel::ERROR,
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        format!("互认平台拒绝了请求 (HTTP {status})"),
        message.to_string()
    );
    unreachable!("ereport(ERROR) does not return")
}

fn text_arg(v: &Value, name: &str, what: &str) -> String {
    match v.get(name) {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => bad_argument(format!("hmr: {what}.{name} is required (text)")),
    }
}

fn opt_text(v: &Value, name: &str) -> Option<String> {
    v.get(name)
        .and_then(|x| x.as_str())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Local item codes → platform data codes, through `hmr.item_map` (and codes already in the
/// catalog pass as they are), in the order asked, in one statement. A database error is an
/// error, never "not in the catalog": that would let an order go unchecked.
fn map_items(asked: &[(&str, &str)]) -> Vec<Option<String>> {
    // The pairs go as one JSON array: an array parameter would be planned afresh on every
    // call (PostgreSQL prefers a plan for the array's known length to the kept one).
    const SQL: &str = "SELECT coalesce(
              (SELECT m.data_code FROM hmr.item_map m
                WHERE m.type OPERATOR(pg_catalog.=) (o.x OPERATOR(pg_catalog.->>) 0)
                  AND m.local_code OPERATOR(pg_catalog.=) (o.x OPERATOR(pg_catalog.->>) 1)),
              (SELECT c.data_code FROM hmr.catalog c
                WHERE c.type OPERATOR(pg_catalog.=) (o.x OPERATOR(pg_catalog.->>) 0)
                  AND c.data_code OPERATOR(pg_catalog.=) (o.x OPERATOR(pg_catalog.->>) 1)))
         FROM pg_catalog.jsonb_array_elements($1) WITH ORDINALITY AS o(x, n)
        ORDER BY o.n";
    if asked.is_empty() {
        return vec![];
    }
    let pairs = json!(asked
        .iter()
        .map(|(kind, local)| json!([kind, local]))
        .collect::<Vec<_>>());
    plans::read(SQL, &[plans::JSONB], &[JsonB(pairs).into()], |rows| {
        rows.map(|row| row.get::<String>(1)).collect::<Result<Vec<_>, _>>()
    })
    .unwrap_or_else(|e| error!("hmr: cannot map items through hmr.item_map: {e}"))
}

fn now_text() -> String {
    Spi::get_one::<String>("SELECT pg_catalog.clock_timestamp()::text")
        .ok()
        .flatten()
        .unwrap_or_default()
}

fn session_user() -> String {
    Spi::get_one::<String>("SELECT pg_catalog.session_user()::text")
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// 4413**********1234: enough to recognise, not enough to identify.
pub fn mask_id(id_no: &str) -> String {
    hmr_protocol::mask::id_no(id_no)
}

mod calls;
mod kept;
mod page;

use kept::*;

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn decision_rules_in_chinese() {
        let p = |sql: &str| Spi::get_one::<String>(sql).unwrap();
        assert_eq!(p("SELECT hmr.decision_problem(true, NULL, NULL)"), None);
        assert_eq!(
            p("SELECT hmr.decision_problem(false, NULL, NULL)").as_deref(),
            Some("选择“不互认”时必须选择原因（01–06）")
        );
        assert!(p("SELECT hmr.decision_problem(false, '06', NULL)")
            .unwrap()
            .contains("具体说明"));
        assert_eq!(p("SELECT hmr.decision_problem(false, '02', NULL)"), None);
        assert!(p("SELECT hmr.decision_problem(false, '09', NULL)")
            .unwrap()
            .contains("无效"));
    }

    #[pg_test]
    fn unconfigured_platform_is_unavailable_not_an_error() {
        let v =
            Spi::get_one::<pgrx::JsonB>("SELECT hmr_list_recognitions('01', '11010519491231002X', 'V1', 'D1', 'K1')")
                .unwrap()
                .unwrap()
                .0;
        assert_eq!(v["status"], "unavailable");
        assert_eq!(v["count"], 0);
    }

    #[pg_test]
    fn ids_are_masked() {
        assert_eq!(super::mask_id("441302198003151233"), "4413**********1233");
    }
}

/// An answer as the SQL functions return it.
fn answer<T: serde::Serialize>(a: &T) -> JsonB {
    JsonB(serde_json::to_value(a).expect("answers serialize"))
}

/// A check's status word (`hmr.checks.status`: `ok`, `unavailable`, `unchecked`).
fn call_status(status: &str) -> CallStatus {
    match status {
        "ok" => CallStatus::Ok,
        "unavailable" => CallStatus::Unavailable,
        _ => CallStatus::Unchecked,
    }
}
