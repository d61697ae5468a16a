//! Issue #28 §4: reception. A patient whose identity number the platform refuses gets a grey
//! badge that says so (`invalid_patient`, with the platform's reason), never an error that
//! throws out of the reception procedure.

use anyhow::Result;
use hmr_e2e::*;
use hmr_protocol::answers::{CallStatus, ListResult};

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
