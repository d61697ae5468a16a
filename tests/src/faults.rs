//! The fault suite: a steady stream of approvals, revokes, re-audits, patients and decisions
//! while faults are injected in a bounded loop; then the platform's record is checked against
//! the database: nothing lost, no second effect, nothing out of order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};
use tokio_postgres::Client;

use crate::*;

/// How hard to push.
#[derive(Clone, Debug)]
pub struct Intensity {
    pub worker_kills: usize,
    pub db_restarts: usize,
    pub outage_503: Duration,
    pub hang: Duration,
    pub backend_kills: usize,
    pub held_transaction: Duration,
    /// How long each hostile answer mode (not the platform's answer) lasts.
    pub hostile_each: Duration,
    /// A synchronous streaming replica all along, promoted at the end when the primary fails.
    pub failover: bool,
}

impl Intensity {
    pub fn short() -> Intensity {
        Intensity {
            worker_kills: 4,
            db_restarts: 1,
            outage_503: Duration::from_secs(5),
            hang: Duration::from_secs(3),
            backend_kills: 2,
            held_transaction: Duration::from_secs(8),
            hostile_each: Duration::from_secs(1),
            failover: false,
        }
    }
    pub fn long() -> Intensity {
        Intensity {
            worker_kills: 20,
            db_restarts: 3,
            outage_503: Duration::from_secs(60),
            hang: Duration::from_secs(10),
            backend_kills: 6,
            held_transaction: Duration::from_secs(60),
            hostile_each: Duration::from_secs(6),
            failover: true,
        }
    }
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub approvals: u64,
    pub revokes: u64,
    pub reaudits: u64,
    pub patients: u64,
    pub decisions: u64,
    pub events_committed: i64,
    pub events_delivered: i64,
    pub lost: Vec<String>,
    pub second_effects: Vec<String>,
    pub out_of_order: Vec<String>,
    pub quarantined: Vec<String>,
    pub unexpected_quarantine: Vec<String>,
    pub recovery: Vec<(String, Duration)>,
    pub outbox_rows: i64,
    pub outbox_dead_rows: i64,
    pub history_rows: i64,
    pub elapsed: Duration,
    /// Bytes that reached another host (a redirect target): must be 0.
    pub bytes_to_other_host: usize,
}

impl Outcome {
    pub fn table(&self) -> String {
        let mut t = String::new();
        let row = |t: &mut String, k: &str, v: String| t.push_str(&format!("| {k:<34} | {v:>12} |\n"));
        t.push_str("| measure                            |        value |\n|---|---|\n");
        row(
            &mut t,
            "approvals / revokes / re-audits",
            format!("{}/{}/{}", self.approvals, self.revokes, self.reaudits),
        );
        row(
            &mut t,
            "patients / decisions",
            format!("{}/{}", self.patients, self.decisions),
        );
        row(&mut t, "events committed", self.events_committed.to_string());
        row(
            &mut t,
            "events finished (delivered, unchanged, merged, …)",
            self.events_delivered.to_string(),
        );
        row(&mut t, "lost (must be 0)", self.lost.len().to_string());
        row(
            &mut t,
            "second effects (must be 0)",
            self.second_effects.len().to_string(),
        );
        row(
            &mut t,
            "out of order per record (must be 0)",
            self.out_of_order.len().to_string(),
        );
        row(
            &mut t,
            "quarantined (planted bad only)",
            format!("{}", self.quarantined.len()),
        );
        row(
            &mut t,
            "quarantined unexpectedly (0)",
            self.unexpected_quarantine.len().to_string(),
        );
        row(
            &mut t,
            "outbox rows / dead tuples at end",
            format!("{}/{}", self.outbox_rows, self.outbox_dead_rows),
        );
        row(&mut t, "history rows", self.history_rows.to_string());
        row(
            &mut t,
            "bytes to another host (must be 0)",
            self.bytes_to_other_host.to_string(),
        );
        row(&mut t, "run time", format!("{:.0} s", self.elapsed.as_secs_f64()));
        t.push_str("\n| fault | recovery (all events committed before its end delivered) |\n|---|---|\n");
        for (fault, d) in &self.recovery {
            t.push_str(&format!("| {fault} | {:.2} s |\n", d.as_secs_f64()));
        }
        t
    }

    pub fn passed(&self) -> bool {
        self.bytes_to_other_host == 0
            && self.lost.is_empty()
            && self.second_effects.is_empty()
            && self.out_of_order.is_empty()
            && self.unexpected_quarantine.is_empty()
    }
}

struct Counters {
    approvals: AtomicU64,
    revokes: AtomicU64,
    reaudits: AtomicU64,
    patients: AtomicU64,
    decisions: AtomicU64,
    stop: AtomicBool,
}

/// Valid (or, for planted bad ones, wrong-check-digit) identity numbers.
fn id_no(n: u64, bad: bool) -> (String, String) {
    let born = chrono::NaiveDate::from_ymd_opt(1950, 1, 1).unwrap() + chrono::Days::new(n % 20000);
    let first = format!("441302{}{:03}", born.format("%Y%m%d"), n % 1000);
    let mut check = hmr_protocol::checks::id_card_check_char(&first);
    if bad {
        check = if check == '0' { '1' } else { '0' };
    }
    (format!("{first}{check}"), born.format("%Y-%m-%d").to_string())
}

async fn connect_retrying(url: &str) -> Client {
    loop {
        if let Ok((client, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            // Committed synchronously, as a HIS that wants zero loss through a failover does.
            if client
                .batch_execute("SET synchronous_commit = on; SELECT hmr.set_policy(platform_timeout_ms => 800)")
                .await
                .is_ok()
            {
                return client;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The HIS at work: approvals, revokes, re-audits, registrations, decisions.
async fn stream(url: String, c: Arc<Counters>, planted: Arc<std::sync::Mutex<HashSet<String>>>) {
    let mut his = connect_retrying(&url).await;
    let mut n: u64 = 0;
    let mut approved: Vec<String> = Vec::new();
    while !c.stop.load(Ordering::SeqCst) {
        n += 1;
        let result: Result<(), tokio_postgres::Error> = async {
            match n % 10 {
                // A registration; every 25th is planted with a wrong check digit.
                3 => {
                    let bad = n % 250 == 3;
                    let (id, born) = id_no(n, bad);
                    let pid = format!("F{n:06}");
                    his.execute(
                        "INSERT INTO his.patient (patient_id, id_no, name, sex, birthday) VALUES ($1, $2, '故障测试', 1, $3::text::date)",
                        &[&pid, &id, &born],
                    )
                    .await?;
                    c.patients.fetch_add(1, Ordering::Relaxed);
                    if bad {
                        planted.lock().unwrap().insert(format!("patient:{pid}"));
                    }
                }
                // 取消审核 of an earlier report.
                5 if approved.len() > 5 => {
                    let r = approved[(n as usize * 7) % approved.len()].clone();
                    his.execute("UPDATE lis.report SET status = 'draft' WHERE report_no = $1 AND status = 'audited'", &[&r])
                        .await?;
                    c.revokes.fetch_add(1, Ordering::Relaxed);
                }
                // 重新审核 with a corrected value.
                7 if approved.len() > 5 => {
                    let r = approved[(n as usize * 13) % approved.len()].clone();
                    his.batch_execute(&format!(
                        "BEGIN; UPDATE lis.result SET value = '{}.{}' WHERE report_no = '{r}';
                         UPDATE lis.report SET status = 'audited', audited_at = now() WHERE report_no = '{r}'; COMMIT;",
                        4 + n % 5,
                        n % 10
                    ))
                    .await?;
                    c.reaudits.fetch_add(1, Ordering::Relaxed);
                }
                // A doctor orders a duplicate 血常规 and recognises the other hospital's report.
                9 => {
                    let visit = json!({"id_type": "01", "id_no": "441302198003151233", "patient_id": "P0001",
                                       "visit_type": "1", "visit_no": "MZ001", "doctor_no": "D001", "dept_code": "0301"});
                    let order = format!("FO{n}");
                    let orders = json!([{"order_id": order, "item_code": "JY0001", "type": "lab"}]);
                    let answer: Value = his.query_one("SELECT hmr_check_prescription($1, $2)", &[&visit, &orders]).await?.get(0);
                    // The other hospital's report: our own reports change under this stream
                    // (revokes, re-audits), and the platform rightly refuses a 互认 of a
                    // report that changed since the check (409 not-recognisable).
                    let other = answer["matches"][0]["reports"]
                        .as_array()
                        .and_then(|rs| rs.iter().find(|r| r["org_code"] == OTHER_ORG_CODE))
                        .and_then(|r| r["report_id"].as_str())
                        .map(str::to_string);
                    if let (true, Some(report)) = (answer["status"] == "ok", other) {
                        let check = answer["check_id"].as_str().unwrap_or_default().to_string();
                        his.execute(
                            "SELECT hmr_record_decision($1, $2, true, report_id => $3)",
                            &[&check, &order, &report],
                        )
                        .await?;
                        c.decisions.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // An approval: the report is inserted audited, in one transaction with its results.
                _ => {
                    let r = format!("F{n:06}");
                    his.batch_execute(&format!(
                        "BEGIN;
                         INSERT INTO lis.report (report_no, patient_id, group_code, group_name, reported_at, auditor_no, status, audited_at)
                         VALUES ('{r}', 'P000{}', 'JY0001', '血常规', now() - interval '1 hour', 'T001', 'audited', now());
                         INSERT INTO lis.result (report_no, seq, item_code, item_name, value, unit)
                         VALUES ('{r}', 1, 'WBC', '白细胞计数', '{}', '10^9/L');
                         COMMIT;",
                        n % 3 + 1,
                        4 + n % 5
                    ))
                    .await?;
                    approved.push(r);
                    c.approvals.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            // The database restarted or this connection was ended: the HIS reconnects.
            let _ = his.batch_execute("ROLLBACK").await;
            if his.is_closed() || result.as_ref().err().is_some_and(|e| e.is_closed()) {
                his = connect_retrying(&url).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

/// Waits until every event committed before `since_end` is finished; returns how long it took.
async fn recovery(cluster: &Cluster, fault_end: std::time::SystemTime) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if let Ok(his) = cluster.connect("his").await {
            if let Ok(row) = his
                .query_one(
                    "SELECT (SELECT count(*) FROM hmr.outbox WHERE state <> 'quarantined' AND created_at <= $1)
                          + (SELECT count(*) FROM hmr.captured WHERE created_at <= $1)",
                    &[&fault_end],
                )
                .await
            {
                if row.get::<_, i64>(0) == 0 {
                    return Ok(started.elapsed());
                }
            }
        }
        if started.elapsed() > Duration::from_secs(300) {
            anyhow::bail!("no recovery within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(plan: Intensity) -> Result<Outcome> {
    let started = Instant::now();
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    load_sample_data(&his).await?;
    let sim = platform_with(&his, &[("441302198003151233", "1980-03-15", "W-CBC-1", "JY0001", 1)]).await?;
    // With a failover planned: a synchronous replica all along; the HIS and the workers are
    // given both servers and use the one that takes writes.
    let replica = if plan.failover {
        Some(cluster.synchronous_replica(&his).await?)
    } else {
        None
    };
    let url = match &replica {
        Some(r) => cluster.url_with(r, "his"),
        None => cluster.url("his"),
    };
    let options = WorkerOptions {
        lease_secs: 3,
        timeout_ms: 2000,
        backoff_max_ms: 2000,
        batch_size: 100,
        url: replica.as_ref().map(|_| url.clone()),
        ..Default::default()
    };
    // Two workers race for the same outbox all along.
    let mut a = Worker::start(&cluster, &sim, &options)?;
    let _b = Worker::start(&cluster, &sim, &options)?;

    let counters = Arc::new(Counters {
        approvals: AtomicU64::new(0),
        revokes: AtomicU64::new(0),
        reaudits: AtomicU64::new(0),
        patients: AtomicU64::new(0),
        decisions: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let planted = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let stream_task = tokio::spawn(stream(url.clone(), counters.clone(), planted.clone()));
    let mut recoveries = Vec::new();
    let mut note = |name: String, d: Duration| {
        eprintln!("fault suite: {name}: recovered in {:.2} s", d.as_secs_f64());
        recoveries.push((name, d));
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A transaction held open (blocks vacuum) while the other faults run.
    let holder = cluster.connect("his").await?;
    holder
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM hmr.outbox;")
        .await?;
    let held_until = Instant::now() + plan.held_transaction;

    for i in 0..plan.worker_kills {
        tokio::time::sleep(Duration::from_millis(700)).await;
        a.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.restart()?;
        if i + 1 == plan.worker_kills {
            note(
                format!("SIGKILL of a worker (x{})", plan.worker_kills),
                recovery(&cluster, std::time::SystemTime::now()).await?,
            );
        }
    }
    for _ in 0..plan.backend_kills {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let admin = cluster.connect("postgres").await?;
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'hmr-worker'",
                &[],
            )
            .await?;
    }
    note(
        format!("pg_terminate_backend of the workers (x{})", plan.backend_kills),
        recovery(&cluster, std::time::SystemTime::now()).await?,
    );

    sim.faults(json!({"status": 503})).await?;
    tokio::time::sleep(plan.outage_503).await;
    sim.clear_faults().await?;
    note(
        format!("platform 503 for {} s", plan.outage_503.as_secs()),
        recovery(&cluster, std::time::SystemTime::now()).await?,
    );

    sim.faults(json!({"hang": true})).await?;
    tokio::time::sleep(plan.hang).await;
    sim.clear_faults().await?;
    note(
        format!("platform hanging for {} s", plan.hang.as_secs()),
        recovery(&cluster, std::time::SystemTime::now()).await?,
    );

    sim.faults(json!({"rate_limit": {"retry_after_secs": 2, "count": 5}}))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    sim.clear_faults().await?;
    note(
        "rate limited (429, Retry-After 2 s)".into(),
        recovery(&cluster, std::time::SystemTime::now()).await?,
    );

    sim.faults(json!({"expire_tokens_now": true, "token_ttl_secs": 2}))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    sim.clear_faults().await?;
    note(
        "tokens expiring early".into(),
        recovery(&cluster, std::time::SystemTime::now()).await?,
    );

    // Answers that are not the platform's, half of all calls each in turn: a gateway's page,
    // other JSON, redirects to another host, a body at 1 byte/s, a reset mid-body, an
    // oversized body, a malformed answer.
    let decoy = Decoy::start().await?;
    for mode in [
        json!({"mode": "html_ok"}),
        json!({"mode": "json_ok"}),
        json!({"mode": "redirect", "location": decoy.base, "status": 307}),
        json!({"mode": "redirect", "location": decoy.base, "status": 301}),
        json!({"mode": "slow_body"}),
        json!({"mode": "reset_mid_body"}),
        json!({"mode": "oversized"}),
        json!({"mode": "malformed_answer"}),
    ] {
        sim.faults(json!({"hostile": mode, "fraction": 0.5, "path_prefix": "/api/v1/"}))
            .await?;
        tokio::time::sleep(plan.hostile_each).await;
    }
    sim.clear_faults().await?;
    note(
        "hostile answers (8 modes, half of the calls)".into(),
        recovery(&cluster, std::time::SystemTime::now()).await?,
    );

    if Instant::now() < held_until {
        tokio::time::sleep(held_until - Instant::now()).await;
    }
    holder.batch_execute("COMMIT").await.ok();
    drop(holder);

    for _ in 0..plan.db_restarts {
        tokio::time::sleep(Duration::from_secs(1)).await;
        cluster.crash_and_restart()?;
        note(
            "PostgreSQL stop -m immediate + restart".into(),
            recovery(&cluster, std::time::SystemTime::now()).await?,
        );
    }

    // The primary's machine fails; the synchronous replica is promoted; the HIS and the
    // workers find it by themselves (their connection strings name both).
    let mut serving = &cluster;
    if let Some(replica) = &replica {
        tokio::time::sleep(Duration::from_secs(1)).await;
        cluster.fail()?;
        replica.promote()?;
        serving = replica;
        note(
            "failover: primary lost, synchronous replica promoted".into(),
            recovery(serving, std::time::SystemTime::now()).await?,
        );
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    counters.stop.store(true, Ordering::SeqCst);
    stream_task.await?;
    let end = std::time::SystemTime::now();
    note("end of the stream (drain)".into(), recovery(serving, end).await?);

    let his = serving.connect("his").await?;
    let planted = planted.lock().unwrap().clone();
    let mut outcome = verify(&his, &sim, &planted).await?;
    outcome.approvals = counters.approvals.load(Ordering::Relaxed);
    outcome.revokes = counters.revokes.load(Ordering::Relaxed);
    outcome.reaudits = counters.reaudits.load(Ordering::Relaxed);
    outcome.patients = counters.patients.load(Ordering::Relaxed);
    outcome.decisions = counters.decisions.load(Ordering::Relaxed);
    outcome.recovery = recoveries;
    outcome.elapsed = started.elapsed();
    outcome.bytes_to_other_host = decoy.received();
    Ok(outcome)
}

/// The database's final state against what the simulator holds and received.
async fn verify(his: &Client, sim: &Sim, planted: &HashSet<String>) -> Result<Outcome> {
    let mut o = Outcome::default();
    let state = sim.get("/_sim/state").await?;
    let held = &state["orgs"][ORG_CODE];
    let requests = sim.requests().await?;

    // The last upload applied per report, in journal order.
    let mut last_upload: HashMap<String, &Value> = HashMap::new();
    for r in requests
        .iter()
        .filter(|r| r["path"] == "/api/v1/lab-reports" && r["effect"] == "applied")
    {
        last_upload.insert(r["body"]["reportNo"].as_str().unwrap_or_default().to_string(), r);
    }
    // Reports: audited → the newest version at the platform is valid with today's value;
    // not audited → nothing held, or the newest version revoked.
    for row in his
        .query(
            "SELECT r.report_no, r.status = 'audited', (SELECT value FROM lis.result x WHERE x.report_no = r.report_no AND seq = 1)
               FROM lis.report r WHERE r.report_no LIKE 'F%'",
            &[],
        )
        .await?
    {
        let (no, audited, value): (String, bool, Option<String>) = (row.get(0), row.get(1), row.get(2));
        let versions = held["lab_reports"][&no]["versions"].as_array().cloned().unwrap_or_default();
        let newest = versions.last();
        match (audited, newest) {
            (true, None) => o.lost.push(format!("report {no}: audited, not at the platform")),
            (true, Some(v)) if v["revoked"] == true => o.lost.push(format!("report {no}: audited, revoked at the platform")),
            (true, Some(_)) => {
                let sent = last_upload.get(&no).and_then(|r| r["body"]["items"][0]["resultValue"].as_str()).map(str::to_string);
                if sent != value {
                    o.lost.push(format!("report {no}: platform has {sent:?}, LIS has {value:?}"));
                }
            }
            (false, Some(v)) if v["revoked"] != true => o.lost.push(format!("report {no}: un-audited, still valid at the platform")),
            (false, _) => {}
        }
    }
    // Patients: every valid one arrived.
    for row in his.query("SELECT patient_id FROM his.patient", &[]).await? {
        let pid: String = row.get(0);
        if !planted.contains(&format!("patient:{pid}")) && held["patients"][&pid].is_null() {
            o.lost.push(format!("patient {pid}: not at the platform"));
        }
    }
    // Decisions: every complete check reached the platform once.
    let sent_decisions: Vec<&Value> = requests
        .iter()
        .filter(|r| r["path"] == "/api/v1/recognitions/decisions" && r["effect"] == "applied")
        .collect();
    let mut per_check: HashMap<String, usize> = HashMap::new();
    for r in &sent_decisions {
        *per_check
            .entry(r["body"]["checkId"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    for row in his.query("SELECT DISTINCT check_id FROM hmr.decisions", &[]).await? {
        let check: String = row.get(0);
        match per_check.get(&check) {
            None => o.lost.push(format!("decision of check {check}: not at the platform")),
            Some(n) if *n > 1 => o
                .second_effects
                .push(format!("decision of check {check}: applied {n} times")),
            Some(_) => {}
        }
    }
    // Second effects: an upload of a version applied twice, or re-sent under a new id.
    let mut applied: BTreeMap<(String, u64), usize> = BTreeMap::new();
    for r in &requests {
        if r["path"] != "/api/v1/lab-reports" {
            continue;
        }
        let key = (
            r["body"]["reportNo"].as_str().unwrap_or_default().to_string(),
            r["body"]["version"].as_u64().unwrap_or(0),
        );
        match r["effect"].as_str() {
            Some("applied") => *applied.entry(key).or_default() += 1,
            Some("unchanged") => o
                .second_effects
                .push(format!("report {} v{} re-sent under a new request id", key.0, key.1)),
            _ => {}
        }
    }
    o.second_effects.extend(
        applied
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|((r, v), n)| format!("report {r} v{v} applied {n} times")),
    );
    // Order per record: versions rise; a revoke names the newest version; a PDF follows its data.
    let mut newest: HashMap<String, u64> = HashMap::new();
    for r in requests.iter().filter(|r| r["effect"] == "applied") {
        let path = r["path"].as_str().unwrap_or_default();
        if path == "/api/v1/lab-reports" {
            let no = r["body"]["reportNo"].as_str().unwrap_or_default().to_string();
            let v = r["body"]["version"].as_u64().unwrap_or(0);
            let before = newest.insert(no.clone(), v).unwrap_or(0);
            if v <= before {
                o.out_of_order.push(format!("report {no}: v{v} after v{before}"));
            }
        } else if let Some(rest) = path.strip_prefix("/api/v1/lab-reports/") {
            let no = rest.split('/').next().unwrap_or_default().to_string();
            let v = if rest.ends_with("/revoke") {
                r["body"]["version"].as_u64().unwrap_or(0)
            } else {
                rest.split('/').nth(2).and_then(|x| x.parse().ok()).unwrap_or(0)
            };
            if newest.get(&no) != Some(&v) {
                o.out_of_order.push(format!(
                    "{path}: version {v} is not the newest uploaded ({:?})",
                    newest.get(&no)
                ));
            }
        }
    }
    for row in his
        .query(
            "SELECT kind, key, error_field, error_reason, last_error FROM hmr.quarantine",
            &[],
        )
        .await?
    {
        let (kind, key): (String, String) = (row.get(0), row.get(1));
        let id = format!("{kind}:{key}");
        if planted.contains(&id) || (kind == "lab_report" && planted_patient_of(his, &key, planted).await?) {
            o.quarantined.push(id);
        } else {
            let why: (Option<String>, Option<String>, Option<String>) = (row.get(2), row.get(3), row.get(4));
            o.unexpected_quarantine.push(format!("{id}: {why:?}"));
        }
    }
    o.events_committed = count(
        his,
        "SELECT (SELECT count(*) FROM hmr.outbox) + (SELECT count(*) FROM hmr.captured) + (SELECT count(*) FROM hmr.outbox_history)",
    )
    .await?;
    o.events_delivered = count(his, "SELECT count(*) FROM hmr.outbox_history").await?;
    his.batch_execute("SELECT pg_stat_force_next_flush()").await.ok();
    tokio::time::sleep(Duration::from_millis(600)).await;
    o.outbox_rows = count(
        his,
        "SELECT (SELECT count(*) FROM hmr.outbox) + (SELECT count(*) FROM hmr.captured)",
    )
    .await?;
    o.outbox_dead_rows = count(
        his,
        "SELECT coalesce(n_dead_tup, 0) FROM pg_stat_user_tables WHERE relid = 'hmr.outbox'::regclass",
    )
    .await?;
    o.history_rows = o.events_delivered;
    Ok(o)
}

async fn planted_patient_of(his: &Client, report_no: &str, planted: &HashSet<String>) -> Result<bool> {
    let row = his
        .query_opt("SELECT patient_id FROM lis.report WHERE report_no = $1", &[&report_no])
        .await?;
    Ok(row.is_some_and(|r| planted.contains(&format!("patient:{}", r.get::<_, String>(0)))))
}
