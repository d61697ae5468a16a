//! Issue #13: believe only the platform's real answer; one broken view never holds the
//! others; nothing lost to a dump; one view of the platform per org.

use std::time::Duration;

use anyhow::Result;
use hmr_e2e::*;
use serde_json::{json, Value};
use tokio_postgres::Client;

const P0001_ID: &str = "441302198003151233";

async fn delivered_version(his: &Client, kind: &str, key: &str) -> Result<i32> {
    Ok(his
        .query_opt(
            "SELECT version FROM hmr.delivered WHERE kind = $1 AND key = $2 AND NOT revoked",
            &[&kind, &key],
        )
        .await?
        .map_or(0, |r| r.get(0)))
}

/// Uploads the platform received and applied, by path prefix.
async fn applied(sim: &Sim, prefix: &str) -> Result<usize> {
    Ok(sim.requests_with(prefix, "applied").await?.len())
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_platforms_real_answer_counts_and_nothing_goes_elsewhere() -> Result<()> {
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    load_sample_data(&his).await?;
    let sim = Sim::start()?;
    let decoy = Decoy::start().await?;
    let worker = Worker::start(
        &cluster,
        &sim,
        &WorkerOptions {
            timeout_ms: 2000,
            render_pdf: false,
            ..Default::default()
        },
    )?;
    wait_until(Duration::from_secs(20), "patients delivered", || async {
        Ok(count(&his, "SELECT count(*) FROM hmr.delivered WHERE kind = 'patient'").await? == 3)
    })
    .await?;
    let modes = [
        json!({"mode": "html_ok"}),
        json!({"mode": "json_ok"}),
        json!({"mode": "redirect", "location": decoy.base, "status": 301}),
        json!({"mode": "redirect", "location": decoy.base, "status": 307}),
        json!({"mode": "malformed_answer"}),
        json!({"mode": "reset_mid_body"}),
        json!({"mode": "slow_body"}),
        json!({"mode": "oversized"}),
    ];
    // Each mode on a report upload: the report version after it is delivered only once the
    // platform really holds it.
    for (n, mode) in modes.iter().enumerate() {
        let before = applied(&sim, "/api/v1/lab-reports").await?;
        sim.faults(json!({"hostile": mode, "count": 2, "path_prefix": "/api/v1/lab-reports"}))
            .await?;
        his.batch_execute(&format!(
            "UPDATE lis.result SET value = '{}.{n}' WHERE report_no = 'L20261126001' AND seq = 1;
             UPDATE lis.report SET status = 'audited', audited_at = now() WHERE report_no = 'L20261126001';",
            5 + n
        ))
        .await?;
        let version = n as i32 + 1;
        wait_until(
            Duration::from_secs(60),
            &format!("version {version} after {mode}"),
            || async { Ok(delivered_version(&his, "lab_report", "L20261126001").await? == version) },
        )
        .await?;
        assert!(
            applied(&sim, "/api/v1/lab-reports").await? > before,
            "{mode}: recorded delivered, but the platform never applied it"
        );
        sim.clear_faults().await?;
    }
    // Patient batches too: a redirect (name and identity number) and a malformed answer.
    for mode in [
        json!({"mode": "redirect", "location": decoy.base, "status": 307}),
        json!({"mode": "malformed_answer"}),
        json!({"mode": "html_ok"}),
    ] {
        sim.faults(json!({"hostile": mode, "count": 2, "path_prefix": "/api/v1/patients"}))
            .await?;
        let before = applied(&sim, "/api/v1/patients").await?;
        his.batch_execute("UPDATE his.patient SET phone = '139' || floor(random() * 1e8)::text, updated_at = now() WHERE patient_id = 'P0002'")
            .await?;
        wait_until(
            Duration::from_secs(30),
            &format!("the patient after {mode}"),
            || async { Ok(outbox_empty(&his).await? && applied(&sim, "/api/v1/patients").await? > before) },
        )
        .await?;
        sim.clear_faults().await?;
    }
    // Replays only: no id was ever sent with two bodies.
    let conflicts: Vec<Value> = sim
        .requests()
        .await?
        .into_iter()
        .filter(|r| r["status"] == 409)
        .collect();
    assert!(conflicts.is_empty(), "{conflicts:#?}");
    assert_eq!(decoy.received(), 0, "bytes reached the other host");
    assert_eq!(count(&his, "SELECT count(*) FROM hmr.quarantine").await?, 0);
    let log = worker.log();
    assert!(log.contains("not followed"), "the redirect is named in the log");
    assert!(
        !log.contains("reconnecting"),
        "a platform answer cost the database connection"
    );

    // The SQL side: a redirect or a gateway page is `unavailable`, naming the other host;
    // nothing is sent there.
    configure_platform(&his, &sim).await?;
    for (mode, says) in [
        (
            json!({"mode": "redirect", "location": decoy.base, "status": 302}),
            "127.0.0.2",
        ),
        (json!({"mode": "html_ok"}), "envelope"),
        (json!({"mode": "json_ok"}), "envelope"),
    ] {
        sim.faults(json!({"hostile": mode, "path_prefix": "/api/v1/recognitions"}))
            .await?;
        let answer: Value = his
            .query_one(
                &format!(
                    "SELECT hmr_list_recognitions('01', '{P0001_ID}', 'MZ001', 'D001', '0301', use_cache => false)"
                ),
                &[],
            )
            .await?
            .get(0);
        assert_eq!(answer["status"], "unavailable", "{mode}: {answer}");
        assert!(
            answer["reason"].as_str().unwrap_or_default().contains(says),
            "{mode}: {answer}"
        );
    }
    assert_eq!(decoy.received(), 0, "bytes reached the other host from SQL");
    sim.clear_faults().await?;
    Ok(())
}

fn rows_ok(rows: &[String], stuck: &[String]) -> Result<()> {
    // The failing lab report and at least one staff record.
    anyhow::ensure!(stuck.len() >= 2, "outbox: {rows:#?}; stuck: {stuck:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_source_view_holds_back_only_its_record() -> Result<()> {
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    load_sample_data(&his).await?;
    let sim = Sim::start()?;
    let worker = Worker::start(&cluster, &sim, &WorkerOptions::default())?;
    // One report's items divide by zero; the staff view is gone.
    let item_view: String = his
        .query_one("SELECT pg_get_viewdef('hmr_src.lab_item'::regclass)", &[])
        .await?
        .get(0);
    let staff_view: String = his
        .query_one("SELECT pg_get_viewdef('hmr_src.staff'::regclass)", &[])
        .await?
        .get(0);
    his.batch_execute(&format!(
        "CREATE OR REPLACE VIEW hmr_src.lab_item AS
           SELECT * FROM ({}) i WHERE 1 / (CASE WHEN i.report_no = 'L20261126002' THEN 0 ELSE 1 END) = 1;
         DROP VIEW hmr_src.staff;
         SET hmr.stuck_after_seconds = 1;
         UPDATE lis.report SET status = 'audited', audited_at = now();
         UPDATE his.staff SET name = name || '', updated_at = now() WHERE staff_no = 'D001';
         UPDATE his.patient SET phone = '13911112222', updated_at = now() WHERE patient_id = 'P0003';",
        item_view.trim_end_matches(';')
    ))
    .await?;
    wait_until(
        Duration::from_secs(30),
        "the good reports and the patient delivered",
        || async {
            Ok(count(
            &his,
            "SELECT count(*) FROM hmr.delivered WHERE kind = 'lab_report' AND key IN ('L20261126001', 'L20261126003')",
        )
        .await?
            == 2)
        },
    )
    .await?;
    let visible = wait_until(Duration::from_secs(20), "both failures visible", || async {
        // (Every staff record waits: how many depends on what was delivered before the drop.)
        Ok(count(
            &his,
            "SELECT count(*) FROM hmr.stuck_records
              WHERE key = 'L20261126002' AND last_error LIKE '%hmr_src.lab_item%22012%division by zero%'",
        )
        .await?
            == 1
            && count(
                &his,
                "SELECT count(*) FROM hmr.stuck_records WHERE kind = 'staff' AND last_error LIKE '%hmr_src.staff%42P01%'",
            )
            .await?
                >= 1)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; worker log: {}", worker.log()));
    let rows: Vec<String> = his
        .query(
            "SELECT format('%s %s %s %s', kind, key, attempts, last_error) FROM hmr.outbox",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let stuck: Vec<String> = his
        .query("SELECT format('%s %s', kind, key) FROM hmr.stuck_records", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    rows_ok(&rows, &stuck)?;
    visible?;
    assert!(count(&his, "SELECT stuck_records FROM hmr.status").await? >= 2);
    // Repaired: both go.
    his.batch_execute(&format!("CREATE OR REPLACE VIEW hmr_src.lab_item AS {item_view}"))
        .await?;
    his.batch_execute(&format!(
        "CREATE VIEW hmr_src.staff AS {staff_view} GRANT SELECT ON hmr_src.staff TO hmr_worker;"
    ))
    .await?;
    wait_until(
        Duration::from_secs(60),
        "everything delivered after the repair",
        || async {
            Ok(outbox_empty(&his).await?
                && count(
                    &his,
                    "SELECT count(*) FROM hmr.delivered WHERE key IN ('L20261126002', 'D001')",
                )
                .await?
                    == 2)
        },
    )
    .await?;
    let log = worker.log();
    assert!(!log.contains("reconnecting"), "a view's error cost the connection");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_behind_a_backing_off_one_does_not_break_the_loop() -> Result<()> {
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    load_sample_data(&his).await?;
    let sim = Sim::start()?;
    let worker = Worker::start(
        &cluster,
        &sim,
        &WorkerOptions {
            backoff_base_ms: 2000,
            backoff_max_ms: 4000,
            ..Default::default()
        },
    )?;
    sim.faults(json!({"status": 503, "path_prefix": "/api/v1/lab-reports"}))
        .await?;
    his.batch_execute("UPDATE lis.report SET status = 'audited', audited_at = now() WHERE report_no = 'L20261126001'")
        .await?;
    wait_until(Duration::from_secs(20), "the first event backing off", || async {
        Ok(count(
            &his,
            "SELECT count(*) FROM hmr.outbox WHERE key = 'L20261126001' AND attempts > 0 AND state = 'pending'",
        )
        .await?
            == 1)
    })
    .await?;
    // A new event of the same record ('-infinity') waits behind it.
    his.batch_execute(
        "UPDATE lis.result SET value = '9.9' WHERE report_no = 'L20261126001' AND seq = 1;
                       UPDATE lis.report SET audited_at = now() WHERE report_no = 'L20261126001'",
    )
    .await?;
    his.execute("SELECT hmr.enqueue('lab_report', 'L20261126001')", &[])
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    sim.clear_faults().await?;
    wait_until(Duration::from_secs(30), "delivered", || async {
        outbox_empty(&his).await
    })
    .await?;
    let log = worker.log();
    assert!(!log.contains("22008"), "infinite timestamps: {log}");
    assert!(!log.contains("reconnecting"), "the loop dropped its connection");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dump_restored_elsewhere_resends_nothing_and_keeps_every_decision() -> Result<()> {
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    load_sample_data(&his).await?;
    for file in ["01_orders.sql", "02_workstation.sql"] {
        his.batch_execute(&std::fs::read_to_string(repo_root().join("sql/examples").join(file))?)
            .await?;
    }
    let sim = Sim::start()?;
    configure_platform(&his, &sim).await?;
    his.batch_execute("SELECT hmr.set_policy(gate_on_unavailable => 'block')")
        .await?;
    OtherHospital::new(&sim)
        .lab_report(P0001_ID, "1980-03-15", "W-CBC-1", "JY0001", 1)
        .await?;
    let mut worker = Worker::start(&cluster, &sim, &WorkerOptions::default())?;
    his.batch_execute("UPDATE lis.report SET status = 'audited', audited_at = now()")
        .await?;
    wait_until(Duration::from_secs(30), "patients and reports delivered", || async {
        Ok(outbox_empty(&his).await? && count(&his, "SELECT count(*) FROM hmr.delivered").await? >= 6)
    })
    .await?;
    let saved: Value = his
        .query_one(
            "SELECT his.save_orders('[{\"order_id\": \"S1\", \"patient_id\": \"P0001\", \"visit_type\": \"1\", \"visit_no\": \"MZ001\",
               \"doctor_no\": \"D001\", \"dept_code\": \"0301\", \"item_type\": \"lab\", \"item_code\": \"JY0001\"}]')",
            &[],
        )
        .await?
        .get(0);
    let check = saved["decide"]["check_id"].as_str().unwrap_or_default().to_string();
    his.execute("SELECT his.decide($1, 'S1', 'P0001', 'JY0001', true)", &[&check])
        .await?;
    wait_until(Duration::from_secs(30), "decision delivered, report kept", || async {
        Ok(outbox_empty(&his).await? && count(&his, "SELECT count(*) FROM hmr.retained_reports").await? == 2)
    })
    .await?;
    worker.terminate()?;
    let snapshot = "SELECT (SELECT count(*) FROM hmr.delivered), (SELECT count(*) FROM hmr.decisions),
                           (SELECT count(*) FROM hmr.checks), (SELECT count(*) FROM hmr.outbox_history),
                           (SELECT count(*) FROM hmr.retained_reports), (SELECT count(*) FROM hmr.download_log),
                           (SELECT count(*) FROM hmr.catalog), (SELECT count(*) FROM hmr.item_map),
                           (SELECT gate_on_unavailable::text FROM hmr.effective_policy),
                           (SELECT count(*) FROM hmr.platform), (SELECT count(*) FROM hmr.guards WHERE active)";
    let before = his.query_one(snapshot, &[]).await?;
    let dump = cluster.dir.join("his.sql");
    run_as_postgres_pub(&[
        &format!("{PG_BIN}/pg_dump"),
        "-h",
        cluster.dir.to_str().unwrap_or_default(),
        "-p",
        &cluster.port.to_string(),
        "-U",
        "postgres",
        "-f",
        dump.to_str().unwrap_or_default(),
        "his",
    ])?;
    let admin = cluster.connect("postgres").await?;
    admin.batch_execute("CREATE DATABASE his2").await?;
    run_as_postgres_pub(&[
        &format!("{PG_BIN}/psql"),
        "-h",
        cluster.dir.to_str().unwrap_or_default(),
        "-p",
        &cluster.port.to_string(),
        "-U",
        "postgres",
        "-v",
        "ON_ERROR_STOP=1",
        "-q",
        "-f",
        dump.to_str().unwrap_or_default(),
        "his2",
    ])?;
    let his2 = cluster.connect("his2").await?;
    let after = his2.query_one(snapshot, &[]).await?;
    for i in 0..before.len() {
        let (b, a): (String, String) = match (before.try_get::<_, i64>(i), after.try_get::<_, i64>(i)) {
            (Ok(b), Ok(a)) => (b.to_string(), a.to_string()),
            _ => (before.get(i), after.get(i)),
        };
        assert_eq!(b, a, "column {i} of the snapshot");
    }
    // A worker on the restored database sends nothing.
    let requests_before = sim.requests().await?.len();
    let options = WorkerOptions {
        database: Some("his2"),
        ..Default::default()
    }
    .with_metrics()?;
    let worker2 = Worker::start(&cluster, &sim, &options)?;
    // Its first whole turn (sources polled, kept reports rechecked, everything due claimed).
    worker2.wait_rounds(2).await?;
    assert!(outbox_empty(&his2).await?);
    let sent: Vec<Value> = sim.requests().await?.into_iter().skip(requests_before).collect();
    assert!(
        sent.iter()
            .all(|r| r["path"].as_str().is_some_and(|p| p.starts_with("/api/v1/auth"))),
        "the restored database resent: {sent:#?}"
    );
    // The sequences went along: new events and decisions number on.
    let next: i64 = his2
        .query_one("SELECT hmr.enqueue('patient', 'P0001')", &[])
        .await?
        .get(0);
    let max: i64 = his2
        .query_one("SELECT max(id) FROM hmr.outbox_history", &[])
        .await?
        .get(0);
    assert!(next > max);
    Ok(())
}

async fn tokens(sim: &Sim) -> Result<usize> {
    Ok(sim
        .get("/_sim/tokens")
        .await?
        .as_array()
        .map_or(0, |a| a.iter().filter(|t| t["scope"] == "recognition").count()))
}

#[tokio::test(flavor = "multi_thread")]
async fn one_token_and_one_pause_for_every_backend() -> Result<()> {
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    let sim = Sim::start()?;
    configure_platform(&his, &sim).await?;
    // 40 backends × 5 calls: one token.
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let c = cluster.connect("his").await?;
        tasks.push(tokio::spawn(async move {
            for _ in 0..5 {
                let a: Value = c
                    .query_one(
                        &format!("SELECT hmr_list_recognitions('01', '{P0001_ID}', 'MZ001', 'D001', '0301', use_cache => false)"),
                        &[],
                    )
                    .await?
                    .get(0);
                anyhow::ensure!(a["status"] == "ok", "{a}");
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    assert_eq!(tokens(&sim).await?, 1, "one token for every backend");
    let fetched: i64 = his.query_one("SELECT hmr.platform_tokens_fetched()", &[]).await?.get(0);
    assert_eq!(fetched, 1);
    // A 429 to one session holds every session: answered at once, nothing sent.
    sim.faults(json!({"rate_limit": {"retry_after_secs": 3, "count": 1}}))
        .await?;
    let list = format!("SELECT hmr_list_recognitions('01', '{P0001_ID}', 'MZ001', 'D001', '0301', use_cache => false)");
    let first: Value = his.query_one(&list, &[]).await?.get(0);
    assert_eq!(first["status"], "unavailable");
    let sent = sim.requests().await?.len();
    let other = cluster.connect("his").await?;
    let second: Value = other.query_one(&list, &[]).await?.get(0);
    assert_eq!(second["status"], "unavailable");
    assert!(
        second["reason"].as_str().unwrap_or_default().contains("rate-limited"),
        "{second}"
    );
    assert_eq!(sim.requests().await?.len(), sent, "a request went out during the pause");
    let paused: f64 = other.query_one("SELECT hmr.note_rate_limit(0)", &[]).await?.get(0);
    assert!(paused > 1.0, "{paused}");
    tokio::time::sleep(Duration::from_millis(3200)).await;
    sim.clear_faults().await?;
    let after: Value = other.query_one(&list, &[]).await?.get(0);
    assert_eq!(after["status"], "ok", "{after}");
    // After a 401 the call is retried under the same request id.
    sim.faults(json!({"expire_tokens_now": true})).await?;
    let again: Value = other.query_one(&list, &[]).await?.get(0);
    assert_eq!(again["status"], "ok", "{again}");
    let recent: Vec<Value> = sim.requests().await?.into_iter().rev().take(3).collect();
    let ids: Vec<&str> = recent
        .iter()
        .filter(|r| {
            r["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/api/v1/recognitions"))
        })
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    assert_eq!(ids.len(), 2, "{recent:#?}");
    assert_eq!(ids[0], ids[1], "the retry after a 401 kept its request id");
    // New credentials: the shared token is not used any more.
    let before = tokens(&sim).await?;
    his.execute(
        "SELECT hmr.configure_platform($1, $2, 'hz1', 'hz1-secret', auth => 'password', sign_alg => 'HMAC-SM3')",
        &[&sim.base, &ORG_CODE],
    )
    .await?;
    let _: Value = other.query_one(&list, &[]).await?.get(0);
    assert_eq!(tokens(&sim).await?, before + 1);
    Ok(())
}

/// Every view of the extension reads in a session that has loaded the library (with a
/// setting given in another unit) and in one that has not.
#[tokio::test(flavor = "multi_thread")]
async fn every_view_reads_whether_or_not_the_library_is_loaded() -> Result<()> {
    let cluster = Cluster::start().await?;
    let su = cluster.connect("his").await?;
    let views: Vec<String> = su
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'hmr' AND c.relkind = 'v' ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(views.len() >= 10, "{views:?}");
    let fresh = cluster.connect("his").await?;
    for v in &views {
        fresh
            .query(&format!("SELECT * FROM {v} LIMIT 5"), &[])
            .await
            .map_err(|e| anyhow::anyhow!("{v} (library not loaded): {e:?}"))?;
    }
    let loaded = cluster.connect("his").await?;
    loaded
        .batch_execute("SELECT hmr.id_card_problem('x'); SET hmr.stuck_after_seconds = '10min'")
        .await?;
    for v in &views {
        loaded
            .query(&format!("SELECT * FROM {v} LIMIT 5"), &[])
            .await
            .map_err(|e| anyhow::anyhow!("{v} (library loaded): {e:?}"))?;
    }
    Ok(())
}

/// `hmr-worker check` tells apart what stands between the worker and the platform.
#[tokio::test(flavor = "multi_thread")]
async fn the_check_command_names_what_is_wrong() -> Result<()> {
    let cluster = Cluster::start().await?;
    let sim = Sim::start()?;
    let mut worker = Worker::start(&cluster, &sim, &WorkerOptions::default())?;
    worker.kill();
    let config = std::fs::read_to_string(&worker.config_path)?;
    let port = sim.base.rsplit(':').next().unwrap_or_default().to_string();
    let check = |text: String| {
        let path = worker.config_path.with_file_name("check.toml");
        std::fs::write(&path, text)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let out = std::process::Command::new(bin_dir().join("hmr-worker"))
            .arg("--config")
            .arg(&path)
            .arg("check")
            .output()?;
        Ok::<_, anyhow::Error>((out.status.success(), String::from_utf8_lossy(&out.stdout).to_string()))
    };
    let (ok, out) = check(config.clone())?;
    assert!(ok, "{out}");
    assert!(out.contains("platform: ok"), "{out}");
    let (ok, out) = check(config.replace("hz1-secret", "wrong"))?;
    assert!(!ok && out.contains("credentials refused"), "{out}");
    let (ok, out) = check(config.replace(&sim.base, "http://127.0.0.1:9"))?;
    assert!(!ok && out.contains("unreachable"), "{out}");
    let (ok, out) = check(config.replace(&sim.base, &format!("https://127.0.0.1:{port}")))?;
    assert!(!ok && out.contains("TLS failure"), "{out}");
    // The platform refuses the scope to this org (403 on the token).
    sim.faults(json!({"status": 403, "path_prefix": "/api/v1/auth/token"}))
        .await?;
    let (ok, out) = check(config.clone())?;
    assert!(!ok && out.contains("scope missing"), "{out}");
    sim.clear_faults().await?;
    Ok(())
}

/// A report kept after 互认 and later revoked by its hospital is never handed out as valid.
#[tokio::test(flavor = "multi_thread")]
async fn a_kept_report_revoked_at_its_source_is_refused() -> Result<()> {
    let w = Workstations::start(
        &[(P0001_ID, "1980-03-15", "W-CBC-1", "JY0001", 1)],
        &WorkerOptions {
            recheck_kept_secs: Some(1),
            ..Default::default()
        },
    )
    .await?;
    let (his, other) = (&w.his, OtherHospital::new(&w.sim));
    let saved: Value = his
        .query_one(
            "SELECT his.save_orders('[{\"order_id\": \"S1\", \"patient_id\": \"P0001\", \"visit_type\": \"1\", \"visit_no\": \"MZ001\",
               \"doctor_no\": \"D001\", \"dept_code\": \"0301\", \"item_type\": \"lab\", \"item_code\": \"JY0001\"}]')",
            &[],
        )
        .await?
        .get(0);
    let check = saved["decide"]["check_id"].as_str().unwrap_or_default().to_string();
    his.execute("SELECT his.decide($1, 'S1', 'P0001', 'JY0001', true)", &[&check])
        .await?;
    wait_until(Duration::from_secs(30), "the report kept", || async {
        Ok(count(his, "SELECT count(*) FROM hmr.retained_reports").await? == 2)
    })
    .await?;
    let report_id: String = his
        .query_one("SELECT report_id FROM hmr.retained_reports LIMIT 1", &[])
        .await?
        .get(0);
    let pdf: Vec<u8> = his
        .query_one("SELECT hmr_download_report($1)", &[&report_id])
        .await?
        .get(0);
    assert!(pdf.starts_with(b"%PDF"));
    // A copy kept in pdf only (a report first downloaded on demand) is rechecked too.
    his.execute("DELETE FROM hmr.retained_reports WHERE format = 'json'", &[])
        .await?;
    other.revoke_lab("W-CBC-1").await?;
    let revoked = std::time::Instant::now();
    wait_until(Duration::from_secs(20), "the revocation noticed", || async {
        Ok(count(
            his,
            "SELECT count(*) FROM hmr.retained_reports WHERE revoked_at IS NOT NULL",
        )
        .await?
            >= 1)
    })
    .await?;
    // recheck_kept_secs = 1 here: noticed within the period plus the worker's tick (the
    // default, 240 s plus a 60 s tick, keeps the window within 5 minutes).
    assert!(
        revoked.elapsed() < Duration::from_secs(10),
        "noticed after {:?}",
        revoked.elapsed()
    );
    let e = his
        .query_one("SELECT hmr_download_report($1, 'pdf')", &[&report_id])
        .await
        .expect_err("a revoked report is not handed out");
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("HM009"), "{e}");
    // The order recognised on it is to be performed after all, and the HIS can see it.
    let state: Value = his.query_one("SELECT hmr_order_recognition('S1')", &[]).await?.get(0);
    assert_eq!(state["decision"], "revoked", "{state}");
    assert_eq!(
        count(his, "SELECT count(*) FROM hmr.orders_to_perform WHERE order_id = 'S1'").await?,
        1
    );
    // Lists and queries do not offer it.
    let list: Value = his
        .query_one(
            &format!("SELECT hmr_list_recognitions('01', '{P0001_ID}', 'MZ001', 'D001', '0301', use_cache => false)"),
            &[],
        )
        .await?
        .get(0);
    assert_eq!(list["count"], 0, "{list}");
    Ok(())
}

/// Issue #28 §3, with the product's own setting (`recheck_kept_secs` left out: 240 s, checked
/// on the worker's 60 s tick): from a revoke at the source hospital to HM009 when a doctor
/// downloads the kept copy takes at most five minutes. Measured here from the revoke, the
/// download tried every 5 s as a doctor would. (The longest test of the suite by design.)
#[tokio::test(flavor = "multi_thread")]
async fn by_default_a_revoke_reaches_the_doctor_within_five_minutes() -> Result<()> {
    let w = Workstations::start(
        &[(P0001_ID, "1980-03-15", "W-CBC-1", "JY0001", 1)],
        &WorkerOptions {
            recheck_kept_secs: None,
            ..Default::default()
        },
    )
    .await?;
    let (his, other) = (&w.his, OtherHospital::new(&w.sim));
    let saved: Value = his
        .query_one(
            "SELECT his.save_orders('[{\"order_id\": \"S5\", \"patient_id\": \"P0001\", \"visit_type\": \"1\", \"visit_no\": \"MZ001\",
               \"doctor_no\": \"D001\", \"dept_code\": \"0301\", \"item_type\": \"lab\", \"item_code\": \"JY0001\"}]')",
            &[],
        )
        .await?
        .get(0);
    let check = saved["decide"]["check_id"].as_str().unwrap_or_default().to_string();
    his.execute("SELECT his.decide($1, 'S5', 'P0001', 'JY0001', true)", &[&check])
        .await?;
    wait_until(Duration::from_secs(30), "the report kept", || async {
        Ok(count(his, "SELECT count(*) FROM hmr.retained_reports").await? == 2)
    })
    .await?;
    let report_id: String = his
        .query_one("SELECT report_id FROM hmr.retained_reports LIMIT 1", &[])
        .await?
        .get(0);
    other.revoke_lab("W-CBC-1").await?;
    let revoked = std::time::Instant::now();
    let window = loop {
        match his
            .query_one("SELECT hmr_download_report($1, 'pdf')", &[&report_id])
            .await
        {
            Ok(_) => {}
            Err(e) if e.as_db_error().map(|d| d.code().code()) == Some("HM009") => break revoked.elapsed(),
            Err(e) => return Err(e.into()),
        }
        anyhow::ensure!(
            revoked.elapsed() < Duration::from_secs(330),
            "the kept copy still handed out {:?} after the revoke",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    println!(
        "revoke at the source → HM009 at download: {:.0} s",
        window.as_secs_f64()
    );
    assert!(window <= Duration::from_secs(300), "window {window:?}");
    assert_eq!(
        count(his, "SELECT count(*) FROM hmr.orders_to_perform WHERE order_id = 'S5'").await?,
        1
    );
    Ok(())
}

/// Issue #29 RL: the platform answers the worker's upload 429 with `Retry-After`; the hold is
/// the whole org's (§7), so a doctor's SQL call right after is held too — answered at once
/// as unavailable, nothing sent — not only the worker process that got the 429.
#[tokio::test(flavor = "multi_thread")]
async fn a_429_to_the_worker_holds_every_sql_call_at_once() -> Result<()> {
    // The housekeeping tick a minute away: the hold must not wait for it.
    let w = Workstations::start(
        &[(P0001_ID, "1980-03-15", "W-CBC-1", "JY0001", 1)],
        &WorkerOptions {
            poll_sources_ms: 60_000,
            ..Default::default()
        },
    )
    .await?;
    w.sim
        .faults(json!({"rate_limit": {"retry_after_secs": 30, "count": 1}}))
        .await?;
    w.his
        .execute(
            "UPDATE lis.report SET status = 'audited', audited_at = now() - interval '1 minute'
              WHERE report_no = 'L20261126001'",
            &[],
        )
        .await?;
    let refused = loop {
        if let Some(r) = w.sim.requests().await?.iter().find(|r| r["status"] == 429) {
            println!("429: {} {}", r["method"], r["path"]);
            break std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Shared with the database within moments (the worker's next turn, not its 5 s tick).
    let shared = loop {
        let paused: f64 = w.his.query_one("SELECT hmr.note_rate_limit(0)", &[]).await?.get(0);
        if paused > 0.0 {
            break refused.elapsed();
        }
        anyhow::ensure!(
            refused.elapsed() < Duration::from_secs(5),
            "the worker's 429 was not shared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "429 to the worker → held for SQL calls after {:.0} ms",
        shared.as_secs_f64() * 1000.0
    );
    assert!(shared < Duration::from_secs(2), "{shared:?}");
    let sent = w.sim.requests().await?.len();
    let list: Value = w
        .his
        .query_one(
            &format!("SELECT hmr_list_recognitions('01', '{P0001_ID}', 'MZ001', 'D001', '0301', use_cache => false)"),
            &[],
        )
        .await?
        .get(0);
    assert_eq!(list["status"], "unavailable", "{list}");
    assert!(
        list["reason"].as_str().unwrap_or_default().contains("rate-limited"),
        "{list}"
    );
    assert_eq!(
        w.sim.requests().await?.len(),
        sent,
        "a SQL call reached the platform during the hold"
    );
    Ok(())
}
