//! Issue #14: the 互认 gate as a real HIS runs it — through PgBouncer in transaction pooling
//! mode, each step on another server connection, several doctors at once, and care never
//! stopped by a data problem.

use std::time::Duration;

use anyhow::{Context, Result};
use hmr_e2e::*;
use serde_json::{json, Value};
use tokio_postgres::Client;

const P0001_ID: &str = "441302198003151233"; // 陈志明, born 1980-03-15 (outpatient MZ001)
const P0003_ID: &str = "441322197505213458"; // 黄国强, born 1975-05-21 (inpatient ZY003)

/// 陈志明 has a 血常规 and a 肝功能 elsewhere, 黄国强 a 血常规.
async fn world() -> Result<Workstations> {
    Workstations::start(
        &[
            (P0001_ID, "1980-03-15", "W-CBC-1", "JY0001", 1),
            (P0001_ID, "1980-03-15", "W-LFT-2", "JY0004", 1),
            (P0003_ID, "1975-05-21", "W-CBC-3", "JY0001", 1),
        ],
        &WorkerOptions::default().with_metrics()?,
    )
    .await
}

/// Runs `sql` in one transaction through the pool and returns (server pid, first value).
async fn step(client: &Client, sql: &str) -> Result<(String, Option<String>)> {
    let values = simple_values(client, &format!("BEGIN; SELECT pg_backend_pid()::text; {sql}; COMMIT"))
        .await
        .with_context(|| sql.to_string())?;
    Ok((
        values.first().cloned().flatten().unwrap_or_default(),
        values.get(1).cloned().flatten(),
    ))
}

/// Ends the server connection a step ran on, so the next step needs another one.
async fn retire(su: &Client, pid: &str) -> Result<()> {
    su.batch_execute(&format!("SELECT pg_terminate_backend({pid})")).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

fn orders(order_id: &str, patient: &str, visit_type: &str, visit_no: &str, item: &str) -> String {
    json!([{"order_id": order_id, "patient_id": patient, "visit_type": visit_type, "visit_no": visit_no,
            "doctor_no": "D001", "dept_code": "0301", "item_type": "lab", "item_code": item}])
    .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn check_refusal_decision_and_save_each_on_another_pooled_connection() -> Result<()> {
    let w = world().await?;
    w.his
        .batch_execute(
            "CREATE ROLE his_app LOGIN IN ROLE hmr_his; GRANT USAGE ON SCHEMA his TO his_app;
                        GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA his TO his_app;",
        )
        .await?;
    let bouncer = Bouncer::start(&w.cluster, 3, &["postgres", "his_app"]).await?;
    for (workstation, patient, visit_type, visit_no, order) in [
        ("outpatient-emergency", "P0001", "1", "MZ001", "OP-1"),
        ("inpatient", "P0003", "3", "ZY003", "IP-1"),
    ] {
        let lines = orders(order, patient, visit_type, visit_no, "JY0001");
        // Different client connections too, as an application server's pool hands them out.
        let (a, b, c, d) = (
            bouncer.connect("his", "his_app").await?,
            bouncer.connect("his", "his_app").await?,
            bouncer.connect("his", "his_app").await?,
            bouncer.connect("his", "his_app").await?,
        );
        // 1. Ordering: the item is a duplicate.
        let (pid1, ordered) = step(
            &a,
            &format!("SELECT his.check_item('{patient}', '{visit_type}', '{visit_no}', 'D001', '0301', '{order}', 'lab', 'JY0001')"),
        )
        .await?;
        let ordered: Value = serde_json::from_str(&ordered.unwrap_or_default())?;
        assert_eq!(ordered["duplicate"], true, "{workstation}: {ordered}");
        retire(&w.his, &pid1).await?;
        // 2. Saving: refused (HM001, caught by the procedure), the page handed to the UI.
        let (pid2, saved) = step(&b, &format!("SELECT his.save_orders('{lines}')")).await?;
        let saved: Value = serde_json::from_str(&saved.unwrap_or_default())?;
        assert_eq!(saved["saved"], false, "{workstation}: {saved}");
        let check = saved["decide"]["check_id"].as_str().unwrap_or_default().to_string();
        retire(&w.his, &pid2).await?;
        // 3. The doctor decides, minutes later, on whatever connection the pool gives.
        let (pid3, decided) = step(&c, &format!("SELECT hmr_record_decision('{check}', '{order}', true)")).await?;
        let decided: Value = serde_json::from_str(&decided.unwrap_or_default())?;
        assert_eq!(decided["complete"], true, "{workstation}: {decided}");
        retire(&w.his, &pid3).await?;
        // 4. Saving again passes.
        let (pid4, saved) = step(&d, &format!("SELECT his.save_orders('{lines}')")).await?;
        let saved: Value = serde_json::from_str(&saved.unwrap_or_default())?;
        assert_eq!(saved["saved"], true, "{workstation}: {saved}");
        let pids = [&pid1, &pid2, &pid3, &pid4];
        for (i, p) in pids.iter().enumerate() {
            for q in &pids[i + 1..] {
                assert_ne!(p, q, "{workstation}: two steps on one server connection {pids:?}");
            }
        }
        // The prompt is on record with its workstation, and what followed.
        wait_until(Duration::from_secs(20), "the prompt on record", || async {
            Ok(count(
                &w.his,
                &format!(
                    "SELECT count(*) FROM hmr.prompt_log WHERE check_id = '{check}' AND workstation = '{workstation}'
                        AND followed = 'decided' AND doctor_no = 'D001' AND id_no_masked LIKE '4413%****%'"
                ),
            )
            .await?
                == 1)
        })
        .await?;
        // The HIS learns per order that it was recognised, with which report.
        let order_state = simple_values(&a, &format!("SELECT hmr_order_recognition('{order}')")).await?;
        let order_state: Value = serde_json::from_str(order_state[0].as_deref().unwrap_or("null"))?;
        assert_eq!(order_state["decision"], "recognised", "{order_state}");
        let perform = simple_values(&a, &format!("SELECT his.order_to_perform('{order}')::text")).await?;
        assert_eq!(
            perform[0].as_deref(),
            Some("false"),
            "a recognised order is not performed"
        );
        assert!(order_state["report_id"].as_str().is_some_and(|r| r.contains("W-CBC")));
    }
    // The decisions reach the platform.
    wait_until(Duration::from_secs(20), "decisions delivered", || async {
        Ok(count(&w.his, "SELECT count(*) FROM hmr.delivered WHERE kind = 'decision'").await? == 2)
    })
    .await?;
    drop(w.sim);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_doctors_deciding_one_check_at_once_send_it_once() -> Result<()> {
    let w = world().await?;
    let visit = json!({"id_type": "01", "id_no": P0001_ID, "patient_id": "P0001", "visit_type": "1",
                       "visit_no": "MZ001", "doctor_no": "D001", "dept_code": "0301"});
    let lines = json!([{"order_id": "C1", "item_code": "JY0001", "type": "lab"},
                       {"order_id": "C2", "item_code": "JY0004", "type": "lab"}]);
    let check: Value = w
        .his
        .query_one("SELECT hmr_check_prescription($1, $2)", &[&visit, &lines])
        .await?
        .get(0);
    assert_eq!(check["matches"].as_array().map(Vec::len), Some(2), "{check}");
    let id = check["check_id"].as_str().unwrap_or_default().to_string();
    let s1 = w.cluster.connect("his").await?;
    let s2 = w.cluster.connect("his").await?;
    let s2_pid: i32 = s2.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    // s1 decides and keeps its transaction open; s2 decides the other order meanwhile.
    s1.batch_execute(&format!("BEGIN; SELECT hmr_record_decision('{id}', 'C1', true);"))
        .await?;
    let second = {
        let id = id.clone();
        tokio::spawn(async move {
            let row = s2
                .query_one("SELECT hmr_record_decision($1, 'C2', false, '02')", &[&id])
                .await?;
            Ok::<Value, anyhow::Error>(row.get(0))
        })
    };
    // s1 commits only once s2's decision is under way: waiting for a lock (s1's), or done if
    // it did not wait (then it could not see s1's uncommitted decision).
    wait_until(Duration::from_secs(20), "the second decision under way", || async {
        Ok(second.is_finished()
            || count(
                &w.his,
                &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {s2_pid} AND wait_event_type = 'Lock'"),
            )
            .await?
                == 1)
    })
    .await?;
    s1.batch_execute("COMMIT").await?;
    let second = second.await??;
    assert_eq!(
        second["complete"], true,
        "the later decision sees the earlier: {second}"
    );
    wait_until(Duration::from_secs(20), "the decisions delivered once", || async {
        Ok(count(
            &w.his,
            &format!("SELECT count(*) FROM hmr.delivered WHERE kind = 'decision' AND key = '{id}'"),
        )
        .await?
            == 1)
    })
    .await?;
    let events = count(
        &w.his,
        &format!(
            "SELECT (SELECT count(*) FROM hmr.outbox WHERE kind = 'decision' AND key = '{id}')
                  + (SELECT count(*) FROM hmr.outbox_history WHERE kind = 'decision' AND key = '{id}')"
        ),
    )
    .await?;
    assert_eq!(events, 1, "one upload event for the check");
    let uploads = w.sim.requests_with("/api/v1/recognitions/decisions", "applied").await?;
    assert_eq!(uploads.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_problem_never_stops_care() -> Result<()> {
    let w = world().await?;
    w.his
        .batch_execute("SELECT hmr.set_policy(gate_on_unavailable => 'block')")
        .await?;
    // A patient the platform does not know yet (registered, not uploaded: the worker is
    // told to wait), then a platform answering the check with a refusal code.
    w.his.batch_execute(
        "INSERT INTO his.patient (patient_id, id_no, name, sex, birthday) VALUES ('P0009', '11010519491231002X', '新病人', 1, '1949-12-31')",
    )
    .await?;
    w.sim
        .faults(json!({"status": 404, "count": 1, "path_prefix": "/api/v1/prescriptions"}))
        .await?;
    let saved: Value = w
        .his
        .query_one(
            &format!(
                "SELECT his.save_orders('{}')",
                orders("N1", "P0009", "1", "MZ009", "JY0001")
            ),
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        saved["saved"], true,
        "a 404 about the patient does not stop the save: {saved}"
    );
    assert_eq!(
        count(
            &w.his,
            "SELECT count(*) FROM hmr.checks WHERE status = 'unchecked' AND reason LIKE 'HTTP 404%'"
        )
        .await?,
        1
    );
    w.sim
        .faults(json!({"status": 400, "count": 1, "path_prefix": "/api/v1/prescriptions"}))
        .await?;
    let saved: Value = w
        .his
        .query_one(
            &format!(
                "SELECT his.save_orders('{}')",
                orders("N2", "P0001", "1", "MZ001", "JY0002")
            ),
            &[],
        )
        .await?
        .get(0);
    assert_eq!(saved["saved"], true, "{saved}");
    w.sim.clear_faults().await?;
    // The unknown patient went to the front of the queue.
    wait_until(Duration::from_secs(20), "the new patient delivered", || async {
        Ok(count(
            &w.his,
            "SELECT count(*) FROM hmr.delivered WHERE kind = 'patient' AND key = 'P0009'",
        )
        .await?
            == 1)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_date_only_range_means_whole_days() -> Result<()> {
    let w = world().await?;
    let today = hmr_protocol::checks::china_now().date_naive();
    let from = (today - chrono::Duration::days(3)).to_string();
    let filter = json!({"id_type": "01", "id_no": P0001_ID, "from": from, "to": today.to_string()});
    let q: Value = w
        .his
        .query_one("SELECT hmr_query_recognitions($1)", &[&filter])
        .await?
        .get(0);
    assert_eq!(q["status"], "ok", "{q}");
    assert_eq!(q["items"].as_array().map(Vec::len), Some(2), "{q}");
    Ok(())
}

/// The platform refuses a decision (the report was revoked between the check and the upload):
/// the doctor is told, and the next save asks again instead of passing.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_decision_reaches_the_doctor() -> Result<()> {
    let w = world().await?;
    // A second, older 血常规 elsewhere: still recognisable after the newer one is revoked.
    OtherHospital::new(&w.sim)
        .lab_report(P0001_ID, "1980-03-15", "W-CBC-9", "JY0001", 2)
        .await?;
    let lines = orders("R1", "P0001", "1", "MZ001", "JY0001");
    let saved: Value = w
        .his
        .query_one(&format!("SELECT his.save_orders('{lines}')"), &[])
        .await?
        .get(0);
    let check = saved["decide"]["check_id"].as_str().unwrap_or_default().to_string();
    assert!(!check.is_empty(), "{saved}");
    // The upload waits (platform down for decisions) while the report is revoked.
    w.sim
        .faults(json!({"status": 503, "path_prefix": "/api/v1/recognitions/decisions"}))
        .await?;
    let decided: Value = w
        .his
        .query_one("SELECT hmr_record_decision($1, 'R1', true)", &[&check])
        .await?
        .get(0);
    assert!(
        decided["report_id"].as_str().is_some_and(|r| r.contains("W-CBC-1")),
        "{decided}"
    );
    OtherHospital::new(&w.sim).revoke_lab("W-CBC-1").await?;
    w.sim.clear_faults().await?;
    wait_until(Duration::from_secs(30), "the refusal noticed", || async {
        Ok(count(
            &w.his,
            &format!("SELECT count(*) FROM hmr.checks WHERE check_id = '{check}' AND refused_at IS NOT NULL"),
        )
        .await?
            == 1)
    })
    .await?;
    let e = w
        .his
        .query_one("SELECT hmr_record_decision($1, 'R1', true)", &[&check])
        .await
        .expect_err("a refused check takes no decision");
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("HM015"), "{e}");
    let state: Value = w.his.query_one("SELECT hmr_order_recognition('R1')", &[]).await?.get(0);
    assert_eq!(state["decision"], "none", "{state}");
    // The next save asks again: the older report is still recognisable.
    let again: Value = w
        .his
        .query_one(&format!("SELECT his.save_orders('{lines}')"), &[])
        .await?
        .get(0);
    assert_eq!(again["saved"], false, "{again}");
    assert!(again["decide"]["matches"].to_string().contains("W-CBC-9"), "{again}");
    assert_eq!(count(&w.his, "SELECT count(*) FROM hmr.quarantine").await?, 0);
    Ok(())
}

/// The doctor decides on the platform's page (§6): hmr learns it (polled by the HIS, or on the
/// next save), records it with source `page`, uploads nothing, and the save passes.
#[tokio::test(flavor = "multi_thread")]
async fn decisions_taken_on_the_platform_page_count() -> Result<()> {
    let w = world().await?;
    let page_decide = |url: String, order: &str, report: &str| {
        let form = vec![
            ("order_id", order.to_string()),
            ("report_id", report.to_string()),
            ("doctor_no", "D001".to_string()),
            ("choice", "recognise".to_string()),
        ];
        async move {
            // The doctor opens the page (the one-time ticket), then presses 互认 (posted as a
            // script would: one order's fields).
            let (page, html) = PlatformPage::open(&url).await?;
            anyhow::ensure!(html.contains("互认") && html.contains("不互认"), "{html}");
            anyhow::ensure!(html.contains("06 其他情形确需复查"), "the six reasons are offered");
            let (status, done) = page.post(&form).await?;
            anyhow::ensure!(status == 200 && done.contains("互认选择已完成"), "{status} {done}");
            Ok::<_, anyhow::Error>(())
        }
    };
    // 1. Polled by the HIS while the page is open.
    let lines = orders("G1", "P0001", "1", "MZ001", "JY0001");
    let refused: Value = w
        .his
        .query_one(&format!("SELECT his.save_orders('{lines}')"), &[])
        .await?
        .get(0);
    let check = refused["decide"]["check_id"].as_str().unwrap_or_default().to_string();
    let url = refused["decide"]["url"].as_str().unwrap_or_default().to_string();
    let report = refused["decide"]["matches"][0]["reports"][0]["report_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    page_decide(url, "G1", &report).await?;
    let polled: Value = w
        .his
        .query_one("SELECT hmr_page_decisions($1)", &[&check])
        .await?
        .get(0);
    assert_eq!(polled["complete"], true, "{polled}");
    assert_eq!(polled["decisions"][0]["source"], "page", "{polled}");
    let saved: Value = w
        .his
        .query_one(&format!("SELECT his.save_orders('{lines}')"), &[])
        .await?
        .get(0);
    assert_eq!(saved["saved"], true, "{saved}");
    // 2. Learnt by the next save alone.
    let lines = orders("G2", "P0003", "3", "ZY003", "JY0001");
    let refused: Value = w
        .his
        .query_one(&format!("SELECT his.save_orders('{lines}')"), &[])
        .await?
        .get(0);
    let url = refused["decide"]["url"].as_str().unwrap_or_default().to_string();
    let report = refused["decide"]["matches"][0]["reports"][0]["report_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    page_decide(url, "G2", &report).await?;
    let saved: Value = w
        .his
        .query_one(&format!("SELECT his.save_orders('{lines}')"), &[])
        .await?
        .get(0);
    assert_eq!(saved["saved"], true, "the save learnt the page decision: {saved}");
    assert_eq!(
        count(&w.his, "SELECT count(*) FROM hmr.decisions WHERE source = 'page'").await?,
        2
    );
    // A whole turn of the worker after the decisions: had they been queued, they went now.
    w.worker.wait_rounds(2).await?;
    assert!(
        w.sim
            .requests_with("/api/v1/recognitions/decisions", "applied")
            .await?
            .is_empty(),
        "page decisions are not uploaded again"
    );
    let state: Value = w.his.query_one("SELECT hmr_order_recognition('G2')", &[]).await?.get(0);
    assert_eq!(state["decision"], "recognised", "{state}");
    Ok(())
}
