//! Failover: the HIS database with a streaming replica (`pg_basebackup -R`, both throwaway
//! clusters). The worker connects with a multi-host connection string
//! (`target_session_attrs=read-write`); the primary fails (`pg_ctl stop -m immediate`), the
//! replica is promoted, and the worker follows it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use hmr_e2e::*;

const LAB: &str = "/api/v1/lab-reports";

fn report_no(n: usize) -> String {
    format!("K{n:05}")
}

/// Draft lab reports K00001..=n (one result each) for the sample patients.
async fn drafts(his: &tokio_postgres::Client, n: usize) -> Result<()> {
    his.batch_execute(&format!(
        "INSERT INTO lis.report (report_no, patient_id, group_code, group_name, sampled_at, reported_at, auditor_no)
         SELECT 'K' || lpad(g::text, 5, '0'), 'P000' || (g % 3 + 1), 'JY0001', '血常规', now() - interval '2 hours',
                now() - interval '1 hour', 'T001'
           FROM generate_series(1, {n}) g;
         INSERT INTO lis.result (report_no, seq, item_code, item_name, value, unit, ref_range, flag, critical)
         SELECT 'K' || lpad(g::text, 5, '0'), 1, 'WBC', '白细胞计数', (4 + g % 5)::text, '10^9/L', '3.5-9.5', 'N', false
           FROM generate_series(1, {n}) g;"
    ))
    .await?;
    Ok(())
}

async fn approve(his: &tokio_postgres::Client, n: usize) -> Result<()> {
    his.execute(
        "UPDATE lis.report SET status = 'audited', audited_at = now() WHERE report_no = $1",
        &[&report_no(n)],
    )
    .await?;
    Ok(())
}

/// Per report: the applied data uploads and PDFs at the simulator, in arrival order.
async fn arrivals(sim: &Sim) -> Result<HashMap<String, Vec<(String, u64)>>> {
    let mut out: HashMap<String, Vec<(String, u64)>> = HashMap::new();
    for r in sim.requests().await? {
        if r["effect"] != "applied" {
            continue;
        }
        let path = r["path"].as_str().unwrap_or_default();
        if path == LAB {
            let no = r["body"]["reportNo"].as_str().unwrap_or_default().to_string();
            out.entry(no)
                .or_default()
                .push(("data".into(), r["body"]["version"].as_u64().unwrap_or(0)));
        } else if let Some(rest) = path.strip_prefix(&format!("{LAB}/")) {
            let mut parts = rest.split('/');
            if let (Some(no), Some("versions"), Some(v), Some("pdf")) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            {
                out.entry(no.to_string())
                    .or_default()
                    .push(("pdf".into(), v.parse().unwrap_or(0)));
            }
        }
    }
    Ok(out)
}

/// No request id stood for two different requests: the simulator refuses such a reuse with
/// 409 `reused`, and every id it saw came with one body.
async fn no_request_id_reused(sim: &Sim) -> Result<()> {
    let mut bodies: HashMap<String, HashSet<String>> = HashMap::new();
    for r in sim.requests().await? {
        assert!(
            !(r["status"] == 409 && r["message"].as_str().unwrap_or_default().contains("X-Request-Id")),
            "a request id was reused for another request: {r}"
        );
        if let Some(id) = r["request_id"].as_str() {
            bodies
                .entry(id.to_ascii_lowercase())
                .or_default()
                .insert(format!("{} {} {}", r["method"], r["path"], r["body"]));
        }
    }
    assert!(!bodies.is_empty(), "the simulator's journal names request ids");
    for (id, b) in &bodies {
        assert_eq!(b.len(), 1, "request id {id} with {} different requests: {b:?}", b.len());
    }
    Ok(())
}

/// Synchronous replication: every approval whose commit the HIS saw reaches the platform
/// exactly once, in order, through the failover; capture works on the new primary.
#[tokio::test(flavor = "multi_thread")]
async fn a_promoted_synchronous_replica_loses_nothing() -> Result<()> {
    let primary = Cluster::start().await?;
    let his = primary.connect("his").await?;
    load_sample_data(&his).await?;
    drafts(&his, 80).await?;
    let replica = primary.synchronous_replica(&his).await?;
    let sim = Sim::start()?;
    let worker = Worker::start(
        &primary,
        &sim,
        &WorkerOptions {
            url: Some(primary.url_with(&replica, "his")),
            ..Default::default()
        },
    )?;

    // Doctors approve one report per transaction, committed synchronously (the HIS's setting
    // for zero loss); the primary fails in the middle of it.
    let committed = Arc::new(AtomicUsize::new(0));
    let approver = {
        let committed = committed.clone();
        let url = primary.url("his");
        tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            c.batch_execute("SET synchronous_commit = on").await?;
            for n in 1..=40 {
                if approve(&c, n).await.is_err() {
                    break;
                }
                committed.store(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(())
        })
    };
    wait_until(Duration::from_secs(20), "approvals under way", || async {
        Ok(committed.load(Ordering::SeqCst) >= 15)
    })
    .await?;
    primary.fail()?;
    let _ = approver.await;
    let before = committed.load(Ordering::SeqCst);
    replica.promote()?;

    // The HIS carries on against the new primary.
    let his2 = replica.connect("his").await?;
    for n in 41..=60 {
        approve(&his2, n).await?;
    }
    let expected: Vec<String> = (1..=before).chain(41..=60).map(report_no).collect();
    wait_until(
        Duration::from_secs(90),
        "every committed approval delivered",
        || async {
            let a = arrivals(&sim).await?;
            Ok(expected.iter().all(|r| a.get(r).is_some_and(|h| h.len() >= 2)) && outbox_empty(&his2).await?)
        },
    )
    .await?;

    // 0 lost, 0 second effects, 0 out of order.
    let a = arrivals(&sim).await?;
    for r in &expected {
        assert_eq!(
            a.get(r).cloned().unwrap_or_default(),
            [("data".to_string(), 1), ("pdf".to_string(), 1)],
            "{r}: once, data before its PDF"
        );
    }
    // Synchronous: what the HIS saw committed is on the new primary.
    assert_eq!(
        count(
            &his2,
            &format!(
                "SELECT count(*) FROM lis.report WHERE status = 'audited' AND report_no <= '{}'",
                report_no(40)
            )
        )
        .await? as usize,
        a.keys().filter(|r| r.as_str() <= report_no(40).as_str()).count(),
        "no report reached the platform that the new primary does not have"
    );
    no_request_id_reused(&sim).await?;
    // The primary's failure is the database's in the worker's log, never the platform's.
    let log = worker.log();
    assert!(
        log.contains("side=\"database\""),
        "the database named as the side that failed:\n{log}"
    );
    assert!(!log.contains("platform unreachable: database"), "{log}");
    println!(
        "synchronous failover: {before} approvals committed before the primary failed, 20 after; \
         {} reports at the platform, 0 lost, 0 second effects, 0 out of order",
        a.len()
    );
    Ok(())
}

/// Asynchronous replication: the replica is behind when the primary fails. What the platform
/// received from the old primary after that point is what the HIS lost too (the approvals are
/// not on the new primary); the new primary's event ids repeat the lost ones, yet no request
/// id is ever sent with two different bodies (ids cover what each step sends).
#[tokio::test(flavor = "multi_thread")]
async fn an_asynchronous_failover_never_reuses_a_request_id() -> Result<()> {
    let primary = Cluster::start().await?;
    let his = primary.connect("his").await?;
    load_sample_data(&his).await?;
    drafts(&his, 110).await?;
    let replica = primary.replica()?;
    let sim = Sim::start()?;
    let worker = Worker::start(
        &primary,
        &sim,
        &WorkerOptions {
            url: Some(primary.url_with(&replica, "his")),
            ..Default::default()
        },
    )?;
    // Reports from..=to delivered, data and PDF, and nothing left in the old primary's outbox.
    let delivered = |from: usize, to: usize| {
        let (sim, his) = (&sim, &his);
        async move {
            let a = arrivals(sim).await?;
            Ok::<bool, anyhow::Error>(
                (from..=to).all(|n| a.get(&report_no(n)).is_some_and(|h| h.len() == 2)) && outbox_empty(his).await?,
            )
        }
    };
    for n in 1..=10 {
        approve(&his, n).await?;
    }
    wait_until(Duration::from_secs(30), "the first ten delivered", || delivered(1, 10)).await?;
    primary.replica_caught_up(&his).await?;

    // The replica falls behind (here: stopped) and the primary goes on alone, for more events
    // than PostgreSQL logs a sequence ahead (32): the new primary will hand out event ids the
    // old one used.
    replica.stop()?;
    for n in 11..=70 {
        approve(&his, n).await?;
    }
    wait_until(
        Duration::from_secs(60),
        "the next sixty delivered by the old primary",
        || delivered(11, 70),
    )
    .await?;
    let old_last_event: i64 = his
        .query_one("SELECT max(id) FROM hmr.outbox_history", &[])
        .await?
        .get(0);
    primary.fail()?;
    drop(worker);
    replica.start_again()?;
    replica.promote()?;

    // The new primary never saw approvals 11..70: the HIS lost them, and the platform holds
    // them. New approvals get event ids the old primary had used.
    let his2 = replica.connect("his").await?;
    let promoted_at: std::time::SystemTime = his2.query_one("SELECT now()", &[]).await?.get(0);
    let lost_by_his = count(
        &his2,
        &format!(
            "SELECT count(*) FROM lis.report WHERE report_no BETWEEN '{}' AND '{}' AND status <> 'audited'",
            report_no(11),
            report_no(70)
        ),
    )
    .await?;
    let _worker = Worker::start(
        &replica,
        &sim,
        &WorkerOptions {
            url: Some(primary.url_with(&replica, "his")),
            ..Default::default()
        },
    )?;
    for n in 71..=110 {
        approve(&his2, n).await?;
    }
    wait_until(
        Duration::from_secs(60),
        "the new primary's approvals delivered",
        || async {
            let a = arrivals(&sim).await?;
            Ok((71..=110).all(|n| a.get(&report_no(n)).is_some_and(|h| h.len() == 2)) && outbox_empty(&his2).await?)
        },
    )
    .await?;
    let reused_ids: i64 = his2
        .query_one(
            "SELECT count(*) FROM hmr.outbox_history WHERE id <= $1 AND created_at >= $2",
            &[&old_last_event, &promoted_at],
        )
        .await?
        .get(0);
    assert!(
        reused_ids > 0,
        "the new primary reused event ids of the old one (else this proves nothing)"
    );
    no_request_id_reused(&sim).await?;
    let a = arrivals(&sim).await?;
    for n in (1..=10).chain(71..=110) {
        assert_eq!(
            a.get(&report_no(n)).cloned().unwrap_or_default(),
            [("data".to_string(), 1), ("pdf".to_string(), 1)],
            "{}: once, in order",
            report_no(n)
        );
    }
    assert_eq!(lost_by_his, 60, "approvals 11..70 are not on the new primary");
    assert_eq!(count(&his2, "SELECT count(*) FROM hmr.quarantine").await?, 0);
    println!(
        "asynchronous failover: {lost_by_his} approvals lost by the HIS (committed on the old primary only) \
         and held by the platform; {reused_ids} events of the new primary reused old event ids; \
         0 request ids with two bodies"
    );
    Ok(())
}

/// A doctors' read-only screen pointed at the hot standby: the badge, the list and an order's
/// decision work there; a prescription check, a decision and a download (they record) stop
/// with HM016, saying the primary is needed.
#[tokio::test(flavor = "multi_thread")]
async fn a_hot_standby_answers_reads_and_sends_writes_to_the_primary() -> Result<()> {
    const P0001_ID: &str = "441302198003151233";
    let primary = Cluster::start().await?;
    let his = primary.connect("his").await?;
    load_sample_data(&his).await?;
    let sim = platform_with(&his, &[(P0001_ID, "1980-03-15", "W-CBC-1", "JY0001", 1)]).await?;
    let replica = primary.replica()?;
    primary.replica_caught_up(&his).await?;
    let standby = replica.connect("his").await?;
    let list: serde_json::Value = standby
        .query_one(
            &format!("SELECT hmr_list_recognitions('01', '{P0001_ID}', 'MZ001', 'D001', '0301')"),
            &[],
        )
        .await?
        .get(0);
    assert_eq!(list["status"], "ok", "{list}");
    assert_eq!(list["count"], 1, "{list}");
    let order: serde_json::Value = standby
        .query_one("SELECT hmr_order_recognition('H1')", &[])
        .await?
        .get(0);
    assert!(order.is_object(), "{order}");

    let visit = serde_json::json!({"id_type": "01", "id_no": P0001_ID, "patient_id": "P0001", "visit_type": "1",
                                   "visit_no": "MZ001", "doctor_no": "D001", "dept_code": "0301"});
    let orders = serde_json::json!([{"order_id": "H1", "item_code": "JY0001", "type": "lab"}]);
    let requests_before = sim.requests().await?.len();
    for (sql, args) in [
        ("SELECT hmr_check_prescription($1, $2)", Some((&visit, &orders))),
        ("SELECT hmr_check_order($1, $2)", Some((&visit, &orders))),
        ("SELECT hmr_record_decision('c1', 'H1', true)", None),
        ("SELECT hmr_download_report('W-CBC-1')", None),
    ] {
        let result = match args {
            Some((v, o)) => standby.query_one(sql, &[v, o]).await,
            None => standby.query_one(sql, &[]).await,
        };
        let e = result.expect_err(sql);
        let db = e.as_db_error().expect("a database error");
        assert_eq!(db.code().code(), "HM016", "{sql}: {db:?}");
        assert!(db.message().contains("主库"), "{sql}: {}", db.message());
    }
    assert_eq!(
        sim.requests().await?.len(),
        requests_before,
        "a refused call asks the platform nothing"
    );
    Ok(())
}
