//! Issue #28 §4: reception. A patient whose identity number the platform refuses gets a grey
//! badge that says so (`invalid_patient`, with the platform's reason), never an error that
//! throws out of the reception procedure.

use anyhow::Result;
use hmr_e2e::*;
use hmr_protocol::answers::{CallStatus, ListResult};

const P0001_ID: &str = "441302198003151233"; // 陈志明 (outpatient MZ001)

#[tokio::test(flavor = "multi_thread")]
async fn an_identity_the_platform_refuses_is_a_grey_badge_saying_so() -> Result<()> {
    let w = Workstations::start(&[], &WorkerOptions::default()).await?;
    // 17 characters: the platform refuses the format of idNo (400, field idNo).
    let answer: serde_json::Value = w
        .his
        .query_one(
            "SELECT hmr_list_recognitions('01', '44130219800315123', 'MZ009', 'D001', '0301')",
            &[],
        )
        .await?
        .get(0);
    let list: ListResult = serde_json::from_value(answer.clone())?;
    assert_eq!(list.status, CallStatus::InvalidPatient, "{answer}");
    assert_eq!((list.count, list.items.len(), list.url.as_deref()), (0, 0, None));
    assert!(list.reason.as_deref().is_some_and(|r| r.contains("idNo")), "{answer}");
    // The call is kept for the statistics with its status.
    assert_eq!(
        count(
            &w.his,
            "SELECT count(*) FROM hmr.list_log WHERE status = 'invalid_patient'"
        )
        .await?,
        1
    );
    Ok(())
}

/// The contract counts a hospital's own reports (§6: "reports of the asking org itself count
/// unless the platform is configured otherwise"), and hmr follows it: our own 血常规, once
/// uploaded, is offered beside the other hospital's — marked `own`, so the HIS can say 本院.
/// After a decision `hmr.report_marks` (what serve's widget list shows) marks the report
/// decided here.
#[tokio::test(flavor = "multi_thread")]
async fn our_own_reports_count_marked_own_and_decisions_marked() -> Result<()> {
    let w = Workstations::start(
        &[(P0001_ID, "1980-03-15", "W-CBC-1", "JY0001", 1)],
        &WorkerOptions::default(),
    )
    .await?;
    w.his
        .execute(
            "UPDATE lis.report SET status = 'audited', audited_at = now() - interval '1 minute'
              WHERE report_no = 'L20261126001'",
            &[],
        )
        .await?;
    wait_until(std::time::Duration::from_secs(20), "our report uploaded", || async {
        Ok(count(&w.his, "SELECT count(*) FROM hmr.delivered WHERE key = 'L20261126001'").await? == 1)
    })
    .await?;
    let list = || async {
        let answer: serde_json::Value = w
            .his
            .query_one(
                "SELECT hmr_list_recognitions('01', $1, 'MZ001', 'D001', '0301')",
                &[&P0001_ID],
            )
            .await?
            .get(0);
        anyhow::Ok(serde_json::from_value::<ListResult>(answer)?)
    };
    let first = list().await?;
    assert_eq!(first.status, CallStatus::Ok);
    let ours: Vec<_> = first.items.iter().filter(|i| i.own).collect();
    let theirs: Vec<_> = first.items.iter().filter(|i| !i.own).collect();
    assert_eq!((ours.len(), theirs.len(), first.count), (1, 1, 2), "{first:?}");
    assert_eq!(ours[0].report_no, "L20261126001");
    assert!(first.items.iter().all(|i| i.decided.is_none()));

    // 互认 of the other hospital's 血常规 at a check: the next list (a cache hit) marks it.
    let visit = serde_json::json!({"id_type": "01", "id_no": P0001_ID, "patient_id": "P0001", "visit_type": "1",
                                   "visit_no": "MZ001", "doctor_no": "D001", "dept_code": "0301"});
    let orders = serde_json::json!([{"order_id": "OWN-1", "item_code": "JY0001", "type": "lab"}]);
    let check: serde_json::Value = w
        .his
        .query_one("SELECT hmr_check_prescription($1, $2)", &[&visit, &orders])
        .await?
        .get(0);
    let check_id = check["check_id"].as_str().unwrap_or_default().to_string();
    let report = theirs[0].report_id.clone();
    w.his
        .query_one(
            "SELECT hmr_record_decision($1, 'OWN-1', true, report_id => $2)",
            &[&check_id, &report],
        )
        .await?;
    let ids: Vec<String> = list().await?.items.iter().map(|i| i.report_id.clone()).collect();
    let marked: Vec<(String, String)> = w
        .his
        .query("SELECT report_id, decided FROM hmr.report_marks($1)", &[&ids])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(marked, [(report.clone(), "recognised".to_string())], "{marked:?}");
    Ok(())
}
