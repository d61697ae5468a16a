//! Patients, departments and staff: real-time capture from several registration paths,
//! batches with per-record answers, dependencies, and the backfill of a connecting day.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;
use hmr_e2e::*;
use serde_json::Value;

const PATIENTS: &str = "/api/v1/patients";
const DEPARTMENTS: &str = "/api/v1/departments";
const STAFF: &str = "/api/v1/staff";

/// Per-record results of accepted batch records, keyed by the record's key field.
async fn accepted(sim: &Sim, path: &str, key_field: &str) -> Result<HashMap<String, usize>> {
    let mut seen = HashMap::new();
    for r in sim.requests_with(path, "applied").await? {
        let records = r["body"]["records"].as_array().cloned().unwrap_or_default();
        for result in r["results"].as_array().cloned().unwrap_or_default() {
            if result["status"] == "accepted" {
                let i = result["index"].as_u64().unwrap_or(0) as usize;
                let key = records
                    .get(i)
                    .and_then(|rec| rec[key_field].as_str())
                    .unwrap_or_default()
                    .to_string();
                *seen.entry(key).or_default() += 1;
            }
        }
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn patients_from_two_registration_paths_arrive_and_touches_send_nothing() -> Result<()> {
    let Hospital {
        cluster: _cluster,
        his,
        sim,
        worker: _worker,
    } = Hospital::start(&WorkerOptions::default()).await?;
    wait_until(Duration::from_secs(20), "the sample patients", || async {
        held(&sim, "patients", "P0003").await
    })
    .await?;

    his.batch_execute(
        "INSERT INTO his.patient (patient_id, id_no, name, sex, birthday, registered_via)
              VALUES ('P0100', '441381198808084563', '郑海峰', 1, '1988-08-08', 'kiosk');
         INSERT INTO his.wechat_registration (patient_id, openid, id_no, name, sex, birthday, phone)
              VALUES ('W0001', 'oWx-1', '441302201501015677', '何小雨', 2, '2015-01-01', '13900000000');",
    )
    .await?;
    wait_until(Duration::from_secs(20), "both new patients", || async {
        Ok(held(&sim, "patients", "P0100").await? && held(&sim, "patients", "W0001").await?)
    })
    .await?;
    wait_until(Duration::from_secs(10), "an empty outbox", || outbox_empty(&his)).await?;

    // A touch of a column the platform does not hold: captured, compared, not sent.
    let before =
        sim.requests_with(PATIENTS, "applied").await?.len() + sim.requests_with(PATIENTS, "unchanged").await?.len();
    his.batch_execute("UPDATE his.patient SET registered_via = 'outpatient' WHERE patient_id = 'P0100'")
        .await?;
    wait_until(Duration::from_secs(10), "the touch drained", || outbox_empty(&his)).await?;
    let after =
        sim.requests_with(PATIENTS, "applied").await?.len() + sim.requests_with(PATIENTS, "unchanged").await?.len();
    assert_eq!(before, after, "nothing sent for an irrelevant update");
    assert_eq!(
        count(&his, "SELECT count(*) FROM hmr.outbox_history WHERE kind = 'patient' AND key = 'P0100' AND outcome = 'unchanged'").await?,
        1
    );

    // A change the platform holds is sent again.
    his.batch_execute("UPDATE his.patient SET phone = '13700000000', updated_at = now() WHERE patient_id = 'P0100'")
        .await?;
    wait_until(Duration::from_secs(10), "the phone change", || async {
        Ok(sim
            .requests_with(PATIENTS, "applied")
            .await?
            .iter()
            .any(|r| r.to_string().contains("13700000000")))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_record_is_quarantined_and_the_rest_of_its_batch_arrives() -> Result<()> {
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    let sim = Sim::start()?;
    let _worker = Worker::start(&cluster, &sim, &WorkerOptions::default())?;
    // One transaction: one batch. P0202 has a wrong check digit (…4562, should be …4563).
    his.batch_execute(
        "INSERT INTO his.patient (patient_id, id_no, name, sex, birthday) VALUES
            ('P0201', '441302198003151233', '陈一', 1, '1980-03-15'),
            ('P0202', '441381198808084562', '陈二', 1, '1988-08-08'),
            ('P0203', '441302199211082345', '陈三', 2, '1992-11-08');
         INSERT INTO his.department (dept_code, dept_name, std_code, campus, parent_code) VALUES
            ('10', '儿科', 'A07', 'HZ01', NULL),
            ('1001', '新生儿科', 'A07.01', 'HZ01', 'NOPE');",
    )
    .await?;
    wait_until(
        Duration::from_secs(20),
        "the good records and two quarantined",
        || async {
            Ok(held(&sim, "patients", "P0201").await?
                && held(&sim, "patients", "P0203").await?
                && held(&sim, "departments", "10").await?
                && count(&his, "SELECT count(*) FROM hmr.quarantine").await? == 2)
        },
    )
    .await?;
    assert!(!held(&sim, "patients", "P0202").await?);
    let rows = his
        .query(
            "SELECT kind, key, error_field, error_reason FROM hmr.quarantine ORDER BY kind",
            &[],
        )
        .await?;
    let q: Vec<(String, String, String, String)> =
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    // Ours refused the checksum and the parent that exists nowhere before sending; the
    // department waits for its parent (released once a department NOPE is delivered).
    assert_eq!(
        q[0],
        (
            "department".into(),
            "1001".into(),
            "parent_code".into(),
            "unknown-parent".into()
        )
    );
    assert_eq!(
        q[1],
        ("patient".into(), "P0202".into(), "id_no".into(), "checksum".into())
    );
    assert_eq!(
        count(
            &his,
            "SELECT count(*) FROM hmr.quarantine WHERE key = '1001' AND waits_for_kind = 'department' AND waits_for_key = 'NOPE'"
        )
        .await?,
        1
    );
    assert!(!held(&sim, "departments", "1001").await?);
    assert!(
        sim.requests()
            .await?
            .iter()
            .all(|r| !r["body"].to_string().contains("\"1001\"")),
        "the child was never sent"
    );
    Ok(())
}

/// A department whose parent existed before hmr was connected (never captured): the parent is
/// enqueued and sent first, as a report's patient is. A parent and its child captured together
/// go in one batch, the parent first.
#[tokio::test(flavor = "multi_thread")]
async fn departments_follow_their_parents() -> Result<()> {
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    let sim = Sim::start()?;
    his.batch_execute(
        "ALTER TABLE his.department DISABLE TRIGGER hmr_capture_department;
         INSERT INTO his.department (dept_code, dept_name, std_code, campus) VALUES ('30', '外科', 'A04', 'HZ01');
         ALTER TABLE his.department ENABLE TRIGGER hmr_capture_department;
         INSERT INTO his.department (dept_code, dept_name, std_code, campus, parent_code) VALUES ('3001', '普外科', 'A04.01', 'HZ01', '30');
         INSERT INTO his.department (dept_code, dept_name, std_code, campus, parent_code) VALUES
            ('400101', '心内一病区', 'A03.01', 'HZ01', '4001'),
            ('4001', '心内科', 'A03.01', 'HZ01', '40'),
            ('40', '内科', 'A03', 'HZ01', NULL);",
    )
    .await?;
    let _worker = Worker::start(&cluster, &sim, &WorkerOptions::default())?;
    wait_until(Duration::from_secs(20), "every department", || async {
        let mut all = true;
        for d in ["30", "3001", "40", "4001", "400101"] {
            all &= held(&sim, "departments", d).await?;
        }
        Ok(all)
    })
    .await?;
    let requests = sim.requests().await?;
    let position = |dept: &str| {
        requests
            .iter()
            .filter(|r| r["path"] == DEPARTMENTS && r["effect"] == "applied")
            .flat_map(|r| {
                let seq = r["seq"].as_u64().unwrap_or(0);
                r["body"]["records"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .enumerate()
                    .map(move |(i, x)| (seq, i, x["deptCode"].as_str().unwrap_or_default().to_string()))
            })
            .find(|(_, _, code)| code == dept)
            .map(|(seq, i, _)| (seq, i))
            .expect("sent")
    };
    for (parent, child) in [("30", "3001"), ("40", "4001"), ("4001", "400101")] {
        assert!(
            position(parent) < position(child),
            "{parent} {:?} before {child} {:?}",
            position(parent),
            position(child)
        );
    }
    assert!(
        requests.iter().all(|r| !r.to_string().contains("unknown-parent")),
        "no department was sent before its parent"
    );
    assert_eq!(count(&his, "SELECT count(*) FROM hmr.quarantine").await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn staff_arrive_after_their_department() -> Result<()> {
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    let sim = Sim::start()?;
    // A department created while capture was off (never sent), then staff who reference it.
    his.batch_execute(
        "ALTER TABLE his.department DISABLE TRIGGER hmr_capture_department;
         INSERT INTO his.department (dept_code, dept_name, std_code, campus) VALUES ('20', '眼科', 'A10', 'HZ02');
         ALTER TABLE his.department ENABLE TRIGGER hmr_capture_department;
         INSERT INTO his.department (dept_code, dept_name, std_code, campus) VALUES ('21', '耳鼻喉科', 'A11', 'HZ01');
         INSERT INTO his.staff (staff_no, name, sex, dept_code, role) VALUES
            ('S001', '眼科医生', 1, '20', 'doctor'), ('S002', '耳鼻喉医生', 2, '21', 'doctor');",
    )
    .await?;
    let _worker = Worker::start(&cluster, &sim, &WorkerOptions::default())?;
    wait_until(Duration::from_secs(20), "both staff", || async {
        Ok(held(&sim, "staff", "S001").await? && held(&sim, "staff", "S002").await?)
    })
    .await?;
    let requests = sim.requests().await?;
    let first_seq = |path: &str, key_field: &str, key: &str| {
        requests
            .iter()
            .filter(|r| r["path"] == path && r["effect"] == "applied")
            .find(|r| {
                r["body"]["records"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x[key_field] == key))
            })
            .and_then(|r| r["seq"].as_u64())
    };
    for (dept, staff) in [("20", "S001"), ("21", "S002")] {
        let d = first_seq(DEPARTMENTS, "deptCode", dept).expect("department sent");
        let s = first_seq(STAFF, "staffNo", staff).expect("staff sent");
        assert!(d < s, "department {dept} (#{d}) before staff {staff} (#{s})");
    }
    assert!(
        requests.iter().all(|r| !r.to_string().contains("unknown-dept")),
        "no staff record was sent before its department"
    );
    Ok(())
}

/// 100,000 patients registered before hmr was connected: the backfill is SIGKILLed once
/// and resumed; every patient reaches the platform once.
#[tokio::test(flavor = "multi_thread")]
async fn backfill_of_100k_patients_interrupted_and_resumed() -> Result<()> {
    const N: i64 = 100_000;
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    create_id_no_generator(&his).await?;
    his.batch_execute("ALTER TABLE his.patient DISABLE TRIGGER hmr_capture_patient")
        .await?;
    his.execute(
        "INSERT INTO his.patient (patient_id, id_no, name, sex, birthday, created_at, updated_at)
         SELECT 'B' || lpad(n::text, 6, '0'), pg_temp.id_no(n), '患者' || n, (n % 2) + 1,
                date '1940-01-01' + (n % 25000)::int, now() - interval '1 day', now() - interval '1 day'
           FROM generate_series(1, $1::bigint) n",
        &[&N],
    )
    .await?;
    his.batch_execute("ALTER TABLE his.patient ENABLE TRIGGER hmr_capture_patient")
        .await?;
    assert_eq!(
        count(&his, "SELECT count(*) FROM hmr.check_sources('patient')").await?,
        0,
        "the sources are clean"
    );

    let sim = Sim::start()?;
    let worker = Worker::start(
        &cluster,
        &sim,
        &WorkerOptions {
            batch_size: 1000,
            ..Default::default()
        },
    )?;
    let started = Instant::now();
    let backfill_log = worker.log_path.with_file_name("backfill.log");
    let backfill = || {
        Command::new(bin_dir().join("hmr-worker"))
            .arg("--config")
            .arg(&worker.config_path)
            .args(["backfill", "patients", "--page", "2000"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&backfill_log)
                    .expect("log"),
            )
            .spawn()
    };
    let mut first = backfill()?;
    let third = wait_until(Duration::from_secs(60), "a third of the backfill enqueued", || async {
        Ok(count(&his, "SELECT coalesce(max(enqueued), 0) FROM hmr.backfills").await? >= N / 3)
    })
    .await;
    if third.is_err() {
        eprintln!(
            "backfill log: {}",
            std::fs::read_to_string(&backfill_log).unwrap_or_default()
        );
    }
    third?;
    first.kill()?; // SIGKILL: the page in flight rolls back with its checkpoint
    first.wait()?;
    let interrupted_at = count(&his, "SELECT max(enqueued) FROM hmr.backfills").await?;
    assert!(interrupted_at < N, "interrupted before the end ({interrupted_at})");
    let second = backfill()?.wait_with_output()?;
    let said = String::from_utf8_lossy(&second.stdout).to_string();
    assert!(said.contains("finished"), "{said}");
    assert_eq!(
        count(&his, "SELECT count(*) FROM hmr.backfills").await?,
        1,
        "the second run resumed the first"
    );

    wait_until(Duration::from_secs(300), "every patient delivered", || async {
        Ok(
            count(&his, "SELECT count(*) FROM hmr.delivered WHERE kind = 'patient'").await? == N
                && outbox_empty(&his).await?,
        )
    })
    .await?;
    let elapsed = started.elapsed();
    // Each patient enqueued once (the interrupted page left nothing), and accepted once.
    assert_eq!(
        count(&his, "SELECT count(*) FROM hmr.outbox_history WHERE kind = 'patient'").await?,
        N
    );
    assert_eq!(
        count(
            &his,
            "SELECT count(DISTINCT key) FROM hmr.outbox_history WHERE kind = 'patient'"
        )
        .await?,
        N
    );
    let accepted = accepted(&sim, PATIENTS, "patientId").await?;
    assert_eq!(accepted.len() as i64, N, "every patient accepted");
    assert!(accepted.values().all(|&n| n == 1), "no patient accepted twice");
    let state: Value = sim.get("/_sim/state").await?;
    assert_eq!(
        state["orgs"][ORG_CODE]["patients"].as_object().map(|m| m.len() as i64),
        Some(N)
    );
    println!(
        "backfill: {N} patients enqueued (interrupted at {interrupted_at}, resumed) and delivered in {:.1} s: {:.0} records/s",
        elapsed.as_secs_f64(),
        N as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
