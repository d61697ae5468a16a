//! The lab-report walking skeleton end to end: LIS table → capture trigger → outbox →
//! worker → simulator, on a real PostgreSQL 15 cluster.

use std::time::Duration;

use anyhow::Result;
use hmr_e2e::*;
use serde_json::{json, Value};

const LAB: &str = "/api/v1/lab-reports";
const PATIENTS: &str = "/api/v1/patients";

async fn approve(his: &tokio_postgres::Client, report_no: &str) -> Result<()> {
    his.execute(
        "UPDATE lis.report SET status = 'audited', audited_at = now() - interval '1 minute' WHERE report_no = $1",
        &[&report_no],
    )
    .await?;
    Ok(())
}

fn report_no(request: &Value) -> String {
    request["body"]["reportNo"].as_str().unwrap_or_default().to_string()
}

async fn uploads_of(sim: &Sim, report: &str) -> Result<Vec<Value>> {
    Ok(sim
        .requests_with(LAB, "applied")
        .await?
        .into_iter()
        .filter(|r| report_no(r) == report)
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn approval_uploads_once_after_its_patient() -> Result<()> {
    let Hospital {
        cluster: _cluster,
        his,
        sim,
        worker,
    } = Hospital::start(&WorkerOptions::default().with_metrics()?).await?;

    approve(&his, "L20261126001").await?;
    wait_until(Duration::from_secs(20), "the report at the platform", || async {
        Ok(!uploads_of(&sim, "L20261126001").await?.is_empty())
    })
    .await?;
    wait_until(Duration::from_secs(10), "an empty outbox", || outbox_empty(&his)).await?;

    let uploads = uploads_of(&sim, "L20261126001").await?;
    assert_eq!(uploads.len(), 1, "exactly one upload: {uploads:#?}");
    let body = &uploads[0]["body"];
    assert_eq!(body["version"], 1);
    assert_eq!(body["dataCode"], "JY0001");
    assert_eq!(body["name"], "陈志明");
    assert_eq!(body["items"].as_array().map(Vec::len), Some(4));
    assert_eq!(body["items"][1]["abnormalFlag"], "3", "L (low) maps to 3");
    assert_eq!(body["items"][0]["resultValue"], "6.5");

    // The patient went first: the platform refuses a report of an unknown patient.
    let patients = sim.requests_with(PATIENTS, "applied").await?;
    assert_eq!(patients.len(), 1);
    assert!(patients[0]["seq"].as_u64() < uploads[0]["seq"].as_u64());
    assert!(
        sim.requests().await?.iter().all(|r| r["status"] != 404),
        "no upload was refused for a missing patient"
    );

    // An update that touches the status but not the content sends nothing.
    let touched_at: std::time::SystemTime = his.query_one("SELECT now()", &[]).await?.get(0);
    his.batch_execute(
        "BEGIN; UPDATE lis.report SET status = 'draft' WHERE report_no = 'L20261126001';
                UPDATE lis.report SET status = 'audited' WHERE report_no = 'L20261126001'; COMMIT;",
    )
    .await?;
    wait_until(Duration::from_secs(10), "the re-approval drained", || {
        outbox_empty(&his)
    })
    .await?;
    let before = sim.requests().await?.len();
    // A whole turn of the worker after the drain: had the touch left anything to send, it
    // went now.
    worker.wait_rounds(2).await?;
    assert_eq!(uploads_of(&sim, "L20261126001").await?.len(), 1);
    assert_eq!(sim.requests().await?.len(), before);
    let outcomes: Vec<String> = his
        .query(
            "SELECT outcome FROM hmr.outbox_history
              WHERE key = 'L20261126001' AND created_at > $1 ORDER BY id",
            &[&touched_at],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The touch's two events in one transaction: the first merged into the second, which was
    // compared and not sent (the worker read the report as the transaction left it).
    assert_eq!(
        outcomes,
        ["merged", "unchanged"],
        "both events of the touch accounted for"
    );

    // A changed result re-approved is version 2.
    his.batch_execute(
        "UPDATE lis.report SET status = 'draft' WHERE report_no = 'L20261126001';
         UPDATE lis.result SET value = '7.1' WHERE report_no = 'L20261126001' AND seq = 1;",
    )
    .await?;
    approve(&his, "L20261126001").await?;
    wait_until(Duration::from_secs(20), "version 2", || async {
        Ok(uploads_of(&sim, "L20261126001")
            .await?
            .iter()
            .any(|u| u["body"]["version"] == 2))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn rolled_back_approval_sends_nothing() -> Result<()> {
    let Hospital {
        cluster: _cluster,
        his,
        sim,
        worker: _worker,
    } = Hospital::start(&WorkerOptions::default()).await?;

    his.batch_execute(
        "BEGIN; UPDATE lis.report SET status = 'audited', audited_at = now() WHERE report_no = 'L20261126002'; ROLLBACK;",
    )
    .await?;
    approve(&his, "L20261126003").await?;
    wait_until(Duration::from_secs(20), "the committed report", || async {
        Ok(!uploads_of(&sim, "L20261126003").await?.is_empty())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(uploads_of(&sim, "L20261126002").await?.is_empty());
    assert!(sim.requests().await?.iter().all(|r| report_no(r) != "L20261126002"));
    // The INSERT of the draft was captured (and skipped: not audited); the rolled-back
    // approval left no event at all.
    assert_eq!(
        count(
            &his,
            "SELECT count(*) FROM hmr.outbox_history WHERE key = 'L20261126002' AND op <> 'I'"
        )
        .await?,
        0
    );
    assert_eq!(
        count(
            &his,
            "SELECT count(*) FROM hmr.outbox_history WHERE key = 'L20261126002' AND outcome NOT IN ('skipped', 'merged')"
        )
        .await?,
        0
    );
    assert_eq!(
        count(&his, "SELECT count(*) FROM hmr.delivered WHERE key = 'L20261126002'").await?,
        0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_records_are_quarantined_and_the_rest_flows() -> Result<()> {
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    load_sample_data(&his).await?;
    // A wrong check digit on one patient; a missing result value on one report.
    his.batch_execute(
        "UPDATE his.patient SET id_no = '441302199211082340' WHERE patient_id = 'P0002';
         UPDATE lis.result SET value = NULL WHERE report_no = 'L20261126001' AND seq = 2;",
    )
    .await?;
    let sim = Sim::start()?;
    let _worker = Worker::start(&cluster, &sim, &WorkerOptions::default())?;
    for r in ["L20261126001", "L20261126002", "L20261126003"] {
        approve(&his, r).await?;
    }
    wait_until(Duration::from_secs(20), "the valid report", || async {
        Ok(!uploads_of(&sim, "L20261126003").await?.is_empty())
    })
    .await?;
    wait_until(Duration::from_secs(20), "the two bad records quarantined", || async {
        Ok(count(
            &his,
            "SELECT count(*) FROM hmr.quarantine WHERE key IN ('P0002', 'L20261126001')",
        )
        .await?
            == 2)
    })
    .await?;
    // The patient's registration and the update that broke its number, both waiting when the
    // worker started: one event, the update merged into it.
    assert_eq!(
        count(
            &his,
            "SELECT count(*) FROM hmr.outbox_history WHERE key = 'P0002' AND outcome = 'merged'"
        )
        .await?,
        1
    );
    // A later change while it is quarantined is an event of its own (it may be the fix);
    // still bad, it is quarantined and supersedes the older row: one row per record.
    his.batch_execute("UPDATE his.patient SET name = name WHERE patient_id = 'P0002'")
        .await?;
    wait_until(
        Duration::from_secs(20),
        "the older quarantined row superseded",
        || async {
            Ok(count(
                &his,
                "SELECT count(*) FROM hmr.outbox_history WHERE key = 'P0002' AND outcome = 'superseded'",
            )
            .await?
                == 1)
        },
    )
    .await?;
    assert_eq!(
        count(
            &his,
            "SELECT count(*) FROM hmr.outbox WHERE kind = 'patient' AND key = 'P0002'"
        )
        .await?,
        1
    );
    let rows = his
        .query(
            "SELECT kind, key, error_field, error_reason FROM hmr.quarantine WHERE key IN ('P0002', 'L20261126001')",
            &[],
        )
        .await?;
    let found: Vec<(String, String, String, String)> =
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    assert!(
        found.contains(&("patient".into(), "P0002".into(), "id_no".into(), "checksum".into())),
        "{found:?}"
    );
    assert!(
        found.contains(&(
            "lab_report".into(),
            "L20261126001".into(),
            "items[1].result_value".into(),
            "required".into()
        )),
        "{found:?}"
    );
    // Neither reached the platform; the report of the bad patient waits for it.
    assert!(uploads_of(&sim, "L20261126001").await?.is_empty());
    assert!(uploads_of(&sim, "L20261126002").await?.is_empty());

    // The DBA fixes the source and retries: it goes through.
    his.batch_execute("UPDATE lis.result SET value = '4.0' WHERE report_no = 'L20261126001' AND seq = 2")
        .await?;
    his.batch_execute("SELECT hmr.retry(id) FROM hmr.quarantine WHERE key = 'L20261126001'")
        .await?;
    wait_until(Duration::from_secs(20), "the fixed report", || async {
        Ok(!uploads_of(&sim, "L20261126001").await?.is_empty())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn platform_503_for_a_while_then_delivered() -> Result<()> {
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    load_sample_data(&his).await?;
    let sim = Sim::start()?;
    sim.faults(json!({"status": 503, "fraction": 1.0})).await?;
    let _worker = Worker::start(&cluster, &sim, &WorkerOptions::default())?;
    approve(&his, "L20261126001").await?;
    wait_until(Duration::from_secs(20), "several refused tries", || async {
        Ok(sim.requests().await?.iter().filter(|r| r["status"] == 503).count() >= 3)
    })
    .await?;
    assert!(count(&his, "SELECT count(*) FROM hmr.outbox WHERE last_error LIKE '%503%'").await? >= 1);
    assert!(uploads_of(&sim, "L20261126001").await?.is_empty());

    sim.clear_faults().await?;
    wait_until(Duration::from_secs(20), "delivery after the outage", || async {
        Ok(!uploads_of(&sim, "L20261126001").await?.is_empty())
    })
    .await?;
    wait_until(Duration::from_secs(10), "an empty outbox", || outbox_empty(&his)).await?;
    assert_eq!(uploads_of(&sim, "L20261126001").await?.len(), 1);
    // The PDF went up from the plan frozen before the outage (kept beside it as bytes):
    // the platform checked it against its SHA-256 header and holds a whole PDF.
    let pdf = reqwest::get(format!("{}/_sim/pdf/{ORG_CODE}/lab/L20261126001/1", sim.base))
        .await?
        .bytes()
        .await?;
    assert!(pdf.starts_with(b"%PDF-") && pdf.len() > 1000, "{} bytes", pdf.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_token_is_refreshed() -> Result<()> {
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    load_sample_data(&his).await?;
    let sim = Sim::start()?;
    let _worker = Worker::start(
        &cluster,
        &sim,
        &WorkerOptions {
            auth: "signature",
            ..Default::default()
        },
    )?;
    approve(&his, "L20261126001").await?;
    wait_until(Duration::from_secs(20), "first report", || async {
        Ok(!uploads_of(&sim, "L20261126001").await?.is_empty())
    })
    .await?;
    // Every token the worker holds becomes invalid: the next call gets 401.
    sim.faults(json!({"expire_tokens_now": true})).await?;
    approve(&his, "L20261126003").await?;
    wait_until(Duration::from_secs(20), "second report", || async {
        Ok(!uploads_of(&sim, "L20261126003").await?.is_empty())
    })
    .await?;
    let requests = sim.requests().await?;
    assert!(
        requests.iter().any(|r| r["status"] == 401),
        "the stale token was refused"
    );
    let grants = requests
        .iter()
        .filter(|r| r["path"] == "/api/v1/auth/token" && r["status"] == 200)
        .count();
    assert!(
        grants >= 3,
        "tokens for his-upload and lab-upload, then a fresh one: {grants}"
    );
    Ok(())
}

/// 1,000 approvals in 1,000 transactions while the worker is SIGKILLed three times: the
/// platform must hold every report once, with no second effect.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_a_thousand_approvals_loses_and_repeats_nothing() -> Result<()> {
    const N: i64 = 1000;
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    load_sample_data(&his).await?;
    his.execute(
        "INSERT INTO lis.report (report_no, patient_id, group_code, group_name, reported_at, auditor_no)
         SELECT 'K' || lpad(g::text, 5, '0'), 'P000' || (g % 3 + 1), 'JY0001', '血常规', now() - interval '1 hour', 'T001'
           FROM generate_series(1, $1::bigint) g",
        &[&N],
    )
    .await?;
    his.execute(
        "INSERT INTO lis.result (report_no, seq, item_code, item_name, value, unit)
         SELECT report_no, 1, 'WBC', '白细胞计数', (4 + random() * 5)::numeric(4,1)::text, '10^9/L'
           FROM lis.report WHERE report_no LIKE 'K%'",
        &[],
    )
    .await?;
    let sim = Sim::start()?;
    let mut worker = Worker::start(
        &cluster,
        &sim,
        &WorkerOptions {
            batch_size: 50,
            ..Default::default()
        },
    )?;

    let mut kills = 0;
    for i in 1..=N {
        approve(&his, &format!("K{i:05}")).await?;
        if i % 250 == 0 && kills < 3 {
            worker.kill();
            kills += 1;
            worker.restart()?;
        }
    }
    wait_until(Duration::from_secs(180), "all approvals delivered", || async {
        Ok(count(
            &his,
            "SELECT count(*) FROM hmr.delivered WHERE kind = 'lab_report' AND key LIKE 'K%'",
        )
        .await?
            == N
            && outbox_empty(&his).await?)
    })
    .await?;

    let all = sim.requests().await?;
    let lab: Vec<&Value> = all
        .iter()
        .filter(|r| r["path"] == LAB && report_no(r).starts_with('K'))
        .collect();
    let applied: Vec<&Value> = lab.iter().copied().filter(|r| r["effect"] == "applied").collect();
    let mut per_report = std::collections::HashMap::<String, usize>::new();
    for r in &applied {
        *per_report.entry(report_no(r)).or_default() += 1;
    }
    let duplicates: usize = per_report.values().map(|n| n - 1).sum();
    let unchanged = lab.iter().filter(|r| r["effect"] == "unchanged").count();
    let replayed = lab.iter().filter(|r| r["effect"] == "replayed").count();
    println!(
        "kill test: approvals {N}, worker kills {kills}, upload requests sent {}, reports received {}, \
         second effects {duplicates}, idempotent replays {replayed}, unchanged resends {unchanged}",
        lab.len(),
        per_report.len()
    );
    assert_eq!(per_report.len() as i64, N, "every report arrived");
    assert_eq!(duplicates, 0, "no report applied twice");
    assert_eq!(unchanged, 0, "no report re-sent under a new request id");
    assert!(per_report.values().all(|&n| n == 1));
    let state = sim.get("/_sim/state").await?;
    let held = state.to_string().matches("\"K0").count();
    assert!(held >= N as usize, "the simulator holds every report ({held})");
    Ok(())
}

/// SIGTERM while a request hangs: the worker waits its grace period, returns its claim to
/// the queue and exits 0; the next worker delivers the report once.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_releases_claims_and_exits_cleanly() -> Result<()> {
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    load_sample_data(&his).await?;
    let sim = Sim::start()?;
    // Let the patient through, then hang the report upload.
    let options = WorkerOptions {
        timeout_ms: 30_000,
        ..Default::default()
    };
    let mut worker = Worker::start(&cluster, &sim, &options)?;
    sim.faults(json!({"hang": true, "path_prefix": LAB})).await?;
    approve(&his, "L20261126001").await?;
    let claimed = wait_until(Duration::from_secs(20), "the report claimed", || async {
        Ok(count(
            &his,
            "SELECT count(*) FROM hmr.outbox WHERE key = 'L20261126001' AND state = 'claimed'",
        )
        .await?
            >= 1)
    })
    .await;
    if claimed.is_err() {
        for r in his
            .query("SELECT id, kind, key, state, attempts, last_error FROM hmr.outbox", &[])
            .await?
        {
            let (id, kind, key, state, attempts, last): (i64, String, String, String, i32, Option<String>) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
            eprintln!("outbox: {id} {kind} {key} {state} attempts={attempts} {last:?}");
        }
        eprintln!("simulator: {:#?}", sim.requests().await?);
        eprintln!("worker log: {}", worker.log());
    }
    claimed?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let status = worker.terminate()?;
    assert!(status.success(), "exit status {status}: {}", worker.log());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped within its grace period"
    );
    assert_eq!(
        count(
            &his,
            "SELECT count(*) FROM hmr.outbox WHERE state = 'claimed' OR lease_owner IS NOT NULL"
        )
        .await?,
        0
    );
    // The released claim waits for the next worker (with the report's other events: its
    // draft's INSERT, its results' (the items table is watched too), its approval).
    let pending = count(
        &his,
        "SELECT (SELECT count(*) FROM hmr.outbox WHERE kind = 'lab_report' AND key = 'L20261126001' AND state = 'pending')
               + (SELECT count(*) FROM hmr.captured WHERE kind = 'lab_report' AND key = 'L20261126001')",
    )
    .await?;
    assert!(pending >= 1, "{pending} pending");

    sim.clear_faults().await?;
    let _worker = Worker::start(&cluster, &sim, &options)?;
    wait_until(Duration::from_secs(20), "delivery by the next worker", || async {
        Ok(!uploads_of(&sim, "L20261126001").await?.is_empty() && outbox_empty(&his).await?)
    })
    .await?;
    assert_eq!(uploads_of(&sim, "L20261126001").await?.len(), 1);
    Ok(())
}

/// A report whose patient is quarantined waits in the quarantine, naming the record it waits
/// for (`waits_for_kind`, `waits_for_key`), and goes by itself once the DBA has fixed and
/// retried the patient — only the patient.
#[tokio::test(flavor = "multi_thread")]
async fn a_report_waits_for_its_quarantined_patient_and_follows_the_fix() -> Result<()> {
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    load_sample_data(&his).await?;
    // A gender code the platform does not know: the patient is refused; the report itself
    // (which carries no gender) is valid.
    his.batch_execute("UPDATE his.patient SET sex = 5 WHERE patient_id = 'P0002'")
        .await?;
    let sim = Sim::start()?;
    let _worker = Worker::start(&cluster, &sim, &WorkerOptions::default())?;
    approve(&his, "L20261126002").await?;
    wait_until(
        Duration::from_secs(30),
        "the report waiting for its patient",
        || async {
            Ok(count(
                &his,
                "SELECT count(*) FROM hmr.quarantine WHERE key = 'L20261126002'
                AND error_reason = 'dependency-quarantined' AND error_field = 'patient_id'
                AND waits_for_kind = 'patient' AND waits_for_key = 'P0002'",
            )
            .await?
                == 1)
        },
    )
    .await?;
    assert_eq!(
        count(
            &his,
            "SELECT count(*) FROM hmr.stuck_records WHERE key = 'L20261126002' AND waits_for_key = 'P0002'"
        )
        .await?,
        1
    );
    assert!(uploads_of(&sim, "L20261126002").await?.is_empty());

    his.batch_execute(
        "UPDATE his.patient SET sex = 2 WHERE patient_id = 'P0002';
         SELECT hmr.retry(id) FROM hmr.quarantine WHERE kind = 'patient' AND key = 'P0002';",
    )
    .await?;
    wait_until(Duration::from_secs(30), "the report released and delivered", || async {
        Ok(!uploads_of(&sim, "L20261126002").await?.is_empty())
    })
    .await?;
    assert_eq!(count(&his, "SELECT count(*) FROM hmr.quarantine").await?, 0);
    Ok(())
}

/// The PDF the worker renders is a report a hospital would sign: the patient's gender and age
/// at report time, the department and every person by name (looked up in the department and
/// staff views), the specimen's received time and the 互认 statement — read back with
/// pdftotext from what the platform received.
#[tokio::test(flavor = "multi_thread")]
async fn the_rendered_pdf_names_people_and_places() -> Result<()> {
    let Hospital {
        cluster: _cluster,
        his,
        sim,
        worker: _worker,
    } = Hospital::start(&WorkerOptions::default()).await?;
    approve(&his, "L20261126001").await?;
    wait_until(Duration::from_secs(20), "the report", || async {
        Ok(
            reqwest::get(format!("{}/_sim/pdf/{ORG_CODE}/lab/L20261126001/1", sim.base))
                .await?
                .status()
                .is_success(),
        )
    })
    .await?;
    let pdf = reqwest::get(format!("{}/_sim/pdf/{ORG_CODE}/lab/L20261126001/1", sim.base))
        .await?
        .bytes()
        .await?;
    let path = std::env::temp_dir().join(format!("hmr-rendered-{}.pdf", std::process::id()));
    std::fs::write(&path, &pdf)?;
    let out = std::process::Command::new("pdftotext")
        .args([path.to_str().unwrap(), "-"])
        .output()?;
    let _ = std::fs::remove_file(&path);
    let text: String = String::from_utf8(out.stdout)?
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    // P0001: 男, born 1980-03-15; department 0301 心血管内科; D001 王建华 asked for it, T002 刘芳
    // tested, T001 张伟 audited.
    let age = {
        let born = chrono::NaiveDate::from_ymd_opt(1980, 3, 15).unwrap();
        let today = hmr_protocol::checks::china_now().date_naive();
        today.years_since(born).unwrap()
    };
    for needle in [
        "性别：男".to_string(),
        format!("年龄：{age}岁"),
        "科室：心血管内科".into(),
        "申请医生：王建华".into(),
        "检验者：刘芳".into(),
        "审核者：张伟".into(),
        "接收时间：".into(),
        "互认".into(),
    ] {
        assert!(text.contains(&needle), "{needle} missing from {text}");
    }
    for code in ["D001", "T001", "T002"] {
        assert!(!text.contains(code), "{code} printed instead of a name: {text}");
    }
    Ok(())
}
