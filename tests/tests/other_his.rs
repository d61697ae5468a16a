//! A HIS that is not on PostgreSQL: its tables in a MariaDB server reached through
//! mysql_fdw (and the same HIS in a second PostgreSQL server through postgres_fdw). Nothing
//! can be captured by a trigger there, so every kind is polled: patients and lab reports by a
//! time column, the department and staff dictionaries (which have none) by comparing every
//! row's content hash. The recipe is README's "A HIS not on PostgreSQL".

use std::time::Duration;

use anyhow::Result;
use hmr_e2e::*;
use serde_json::Value;

const PATIENTS: &str = "/api/v1/patients";
const DEPARTMENTS: &str = "/api/v1/departments";
const STAFF: &str = "/api/v1/staff";

/// The vendor's tables (pinyin names, Chinese code words, local times without a zone); `$dt`
/// is the dialect's timestamp type.
const HIS_TABLES: &str = "
CREATE TABLE brxx (brid VARCHAR(20) PRIMARY KEY, zjhm VARCHAR(30), xm VARCHAR(50), xb VARCHAR(4), csrq DATE,
                   lxdh VARCHAR(20), jdsj $dt, gxsj $dt);
CREATE TABLE ksdm (ksdm VARCHAR(20) PRIMARY KEY, ksmc VARCHAR(50), bzks VARCHAR(20), yq VARCHAR(10), sjks VARCHAR(20));
CREATE TABLE ryxx (gh VARCHAR(20) PRIMARY KEY, xm VARCHAR(50), xb VARCHAR(4), ksdm VARCHAR(20), js VARCHAR(20));
CREATE TABLE jybg (bgdh VARCHAR(30) PRIMARY KEY, brid VARCHAR(20), mzh VARCHAR(30), ksdm VARCHAR(20), sqys VARCHAR(20),
                   xmzdm VARCHAR(20), xmzmc VARCHAR(50), bbmc VARCHAR(20), cysj $dt, bgsj $dt, shsj $dt,
                   shr VARCHAR(20), zt VARCHAR(10));
CREATE TABLE jyjg (bgdh VARCHAR(30), xh INT, xmdm VARCHAR(20), xmmc VARCHAR(50), jg VARCHAR(50), dw VARCHAR(20),
                   ckfw VARCHAR(50), bz VARCHAR(4), xgsj $dt, PRIMARY KEY (bgdh, xh));
";

/// One day's data; times are local (Asia/Shanghai) wall-clock times.
const HIS_ROWS: &str = "
INSERT INTO ksdm VALUES ('03', '内科', 'A03', 'HZ01', NULL), ('0301', '心血管内科', 'A03.01', 'HZ01', '03');
INSERT INTO ryxx VALUES ('D001', '王建华', '男', '0301', '医生'), ('T001', '张伟', '男', '03', '技师');
INSERT INTO brxx VALUES ('P0001', '441302198003151233', '陈志明', '男', '1980-03-15', '13800000001',
                         '2026-11-20 08:00:00', '2026-11-20 08:00:00');
INSERT INTO jybg VALUES ('L1', 'P0001', 'MZ001', '0301', 'D001', 'JY0001', '血常规', '全血',
                         '2026-11-20 08:30:00', '2026-11-20 09:30:00', '2026-11-20 09:40:00', 'T001', '已审核');
INSERT INTO jyjg VALUES ('L1', 1, 'WBC', '白细胞计数', '6.5', '10^9/L', '3.5-9.5', '正常', '2026-11-20 09:30:00'),
                        ('L1', 2, 'RBC', '红细胞计数', '4.1', '10^12/L', '4.3-5.8', '偏低', '2026-11-20 09:30:00');
";

/// The source views over the foreign schema `his_remote`, and the polled sources: 24 lines.
const CONNECT: &str = "
CREATE SCHEMA hmr_src;
CREATE VIEW hmr_src.patient AS
SELECT b.brid AS patient_id, '01' AS id_type, upper(b.zjhm) AS id_no, b.xm AS name, hmr.code('gender', b.xb) AS gender_code,
       b.csrq AS birth_date, b.lxdh AS phone, b.jdsj AT TIME ZONE 'Asia/Shanghai' AS registered_at,
       b.gxsj AT TIME ZONE 'Asia/Shanghai' AS updated_at
  FROM his_remote.brxx b;
CREATE VIEW hmr_src.department AS
SELECT k.ksdm AS dept_code, k.ksmc AS dept_name, k.bzks AS std_dept_code, k.yq AS campus_code, k.sjks AS parent_code,
       hmr.changed_at('his-departments', k.ksdm) AS updated_at
  FROM his_remote.ksdm k;
CREATE VIEW hmr_src.staff AS
SELECT r.gh AS staff_no, r.xm AS name, hmr.code('gender', r.xb) AS gender_code, r.ksdm AS dept_code,
       hmr.changed_at('his-staff', r.gh) AS updated_at
  FROM his_remote.ryxx r;
-- No patient columns: the worker takes id_type, id_no and the name from hmr_src.patient by key.
CREATE VIEW hmr_src.lab_report AS
SELECT g.bgdh AS report_no, g.brid AS patient_id, '1' AS visit_type, g.mzh AS visit_no, g.ksdm AS dept_code, g.sqys AS request_doctor_no, g.bbmc AS specimen_name,
       g.cysj AT TIME ZONE 'Asia/Shanghai' AS sampled_at, g.bgsj AT TIME ZONE 'Asia/Shanghai' AS reported_at,
       g.shsj AT TIME ZONE 'Asia/Shanghai' AS audited_at, g.shr AS auditor_no, g.xmzdm AS data_code, g.xmzmc AS category_name
  FROM his_remote.jybg g WHERE g.zt = '已审核';
CREATE VIEW hmr_src.lab_item AS
SELECT j.bgdh AS report_no, j.xh AS seq, j.xmdm AS item_code, j.xmmc AS item_name, j.jg AS result_value, j.dw AS result_unit,
       j.ckfw AS reference_range, hmr.code('abnormal_flag', j.bz) AS abnormal_flag
  FROM his_remote.jyjg j;
-- What each poll reads: the raw wall-clock columns, so its bounds reach the remote server.
CREATE VIEW hmr_src.patient_changes AS SELECT b.brid AS patient_id, b.gxsj AS updated_at FROM his_remote.brxx b;
CREATE VIEW hmr_src.lab_changes AS SELECT g.bgdh AS report_no, g.shsj AS audited_at FROM his_remote.jybg g WHERE g.zt = '已审核';
-- A result corrected after the audit (its line's change time moves) makes the report's next version.
CREATE VIEW hmr_src.lab_result_changes AS SELECT j.bgdh AS report_no, j.xgsj AS changed_at FROM his_remote.jyjg j;
INSERT INTO hmr.polled_sources (name, kind, source_view, time_column, compare_every) VALUES
    ('his-patients', 'patient', 'hmr_src.patient_changes', 'updated_at', NULL), ('his-departments', 'department', NULL, NULL, '1 second'),
    ('his-staff', 'staff', NULL, NULL, '1 second'), ('his-lab', 'lab_report', 'hmr_src.lab_changes', 'audited_at', NULL),
    ('his-lab-results', 'lab_report', 'hmr_src.lab_result_changes', 'changed_at', NULL);
";

/// The remote queries of a poll of `source` (EXPLAIN VERBOSE of what hmr.poll_source runs):
/// what reaches the other server.
async fn remote_queries(his: &tokio_postgres::Client, view: &str, time: &str, key: &str) -> Result<String> {
    let plan: Vec<String> = his
        .query(
            &format!(
                "EXPLAIN VERBOSE SELECT v.{key}::text, v.{time} FROM {view} v
                  WHERE v.{time} > '2026-11-20 00:00:00'::timestamp AND v.{time} <= '2026-12-01 00:00:00'::timestamp"
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(plan
        .into_iter()
        .filter(|l| l.contains("Remote") || l.contains("Filter") || l.contains("Scan") || l.contains("Join"))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// The same checks whichever server the HIS is on. `remote` runs SQL on the vendor's database.
async fn polled_end_to_end(
    cluster: &Cluster,
    his: &tokio_postgres::Client,
    remote: &dyn Fn(&str) -> Result<()>,
) -> Result<()> {
    println!("connected in {} lines of SQL", sql_lines(CONNECT));
    assert!(sql_lines(CONNECT) <= 40);
    his.batch_execute(CONNECT).await?;
    let problems = his
        .query("SELECT kind, field, problem FROM hmr.check_sources()", &[])
        .await?;
    let problems: Vec<(String, String, String)> = problems.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert!(problems.is_empty(), "the foreign sources check clean: {problems:?}");
    // Each poll's change filter reaches the remote server (issue #31): the remote query has
    // the time column in its WHERE, so a poll reads the changes, not the table.
    for (view, time, key, column) in [
        ("hmr_src.patient_changes", "updated_at", "patient_id", "gxsj"),
        ("hmr_src.lab_changes", "audited_at", "report_no", "shsj"),
        ("hmr_src.lab_result_changes", "changed_at", "report_no", "xgsj"),
    ] {
        let remote = remote_queries(his, view, time, key).await?;
        let upper = remote.to_uppercase();
        assert!(
            upper.contains("WHERE") && remote.contains(column),
            "{view}: the bounds on {column} are not sent: {remote}"
        );
    }
    // compare_every on a watermark source would silently do nothing: refused (#31).
    let e = his
        .batch_execute(
            "INSERT INTO hmr.polled_sources (name, kind, time_column, compare_every)
             VALUES ('his-patients-2', 'patient', 'updated_at', '5 minutes')",
        )
        .await
        .expect_err("compare_every with a time column");
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("23514"), "{e}");

    let sim = Sim::start()?;
    let _worker = Worker::start(cluster, &sim, &WorkerOptions::default())?;
    wait_until(Duration::from_secs(40), "every kind from the other HIS", || async {
        Ok(held(&sim, "departments", "0301").await?
            && held(&sim, "staff", "D001").await?
            && held(&sim, "patients", "P0001").await?
            && !history_of(&sim, "/api/v1/lab-reports", "L1").await?.is_empty())
    })
    .await?;
    let requests = sim.requests().await?;
    let patient = requests
        .iter()
        .filter(|r| r["path"] == PATIENTS)
        .flat_map(|r| r["body"]["records"].as_array().cloned().unwrap_or_default())
        .find(|p| p["patientId"] == "P0001")
        .unwrap_or(Value::Null);
    assert_eq!(patient["genderCode"], "1", "男 mapped: {patient}");
    assert_eq!(
        patient["registeredAt"], "2026-11-20T08:00:00+08:00",
        "a local time read as Beijing time"
    );
    let report = requests
        .iter()
        .find(|r| r["path"] == "/api/v1/lab-reports" && r["body"]["reportNo"] == "L1")
        .map(|r| r["body"].clone())
        .unwrap_or(Value::Null);
    assert_eq!(report["items"].as_array().map(Vec::len), Some(2), "{report}");
    assert_eq!(report["items"][1]["abnormalFlag"], "3", "偏低 mapped");
    assert_eq!(
        report["auditedAt"], "2026-11-20T09:40:00+08:00",
        "a local time read as Beijing time"
    );

    // A dictionary without a time column: a renamed department is found by the comparison.
    remote("UPDATE ksdm SET ksmc = '心内科' WHERE ksdm = '0301'")?;
    wait_until(Duration::from_secs(30), "the renamed department", || async {
        Ok(sim.get("/_sim/state").await?["orgs"][ORG_CODE]["departments"]["0301"]["name"] == "心内科")
    })
    .await?;
    // A patient changed (its time column moves): sent again.
    remote("UPDATE brxx SET lxdh = '13900000009', gxsj = '2026-11-21 10:00:00' WHERE brid = 'P0001'")?;
    wait_until(Duration::from_secs(30), "the changed patient", || async {
        Ok(
            sim.get("/_sim/state").await?["orgs"][ORG_CODE]["patients"]["P0001"]["updated_at"]
                == "2026-11-21T10:00:00+08:00",
        )
    })
    .await?;
    // A result corrected on the audited report (only its line's change time moves): found by
    // the poll of the result lines, sent as the report's next version.
    remote("UPDATE jyjg SET jg = '6.8', xgsj = '2026-11-21 11:00:00' WHERE bgdh = 'L1' AND xh = 1")?;
    wait_until(Duration::from_secs(30), "the corrected result", || async {
        Ok(history_of(&sim, "/api/v1/lab-reports", "L1")
            .await?
            .iter()
            .any(|(s, v)| s == "data" && *v == 2))
    })
    .await?;
    let corrected = sim
        .requests()
        .await?
        .into_iter()
        .rfind(|r| r["path"] == "/api/v1/lab-reports" && r["body"]["reportNo"] == "L1")
        .map(|r| r["body"]["items"][0]["resultValue"].clone())
        .unwrap_or(Value::Null);
    assert_eq!(corrected, "6.8", "the corrected value in version 2");
    // Un-audited in the LIS: the report leaves the view and is revoked.
    remote("UPDATE jybg SET zt = '未审核' WHERE bgdh = 'L1'")?;
    wait_until(Duration::from_secs(30), "the revoke", || async {
        Ok(history_of(&sim, "/api/v1/lab-reports", "L1")
            .await?
            .iter()
            .any(|(s, _)| s == "revoke"))
    })
    .await?;
    // Nothing went twice: each record's content once (the comparisons ran many times).
    let sent = |path: &str, key_field: &str, key: &str| {
        let key = key.to_string();
        let (path, key_field) = (path.to_string(), key_field.to_string());
        let sim = &sim;
        async move {
            Ok::<usize, anyhow::Error>(
                sim.requests()
                    .await?
                    .iter()
                    .filter(|r| r["path"] == path.as_str() && r["effect"] == "applied")
                    .filter(|r| {
                        r["body"]["records"]
                            .as_array()
                            .is_some_and(|a| a.iter().any(|x| x[key_field.as_str()] == key.as_str()))
                    })
                    .count(),
            )
        }
    };
    assert_eq!(
        sent(STAFF, "staffNo", "D001").await?,
        1,
        "an unchanged dictionary row is not resent"
    );
    assert_eq!(sent(DEPARTMENTS, "deptCode", "0301").await?, 2, "first, then renamed");
    assert_eq!(count(his, "SELECT count(*) FROM hmr.quarantine").await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_his_on_mariadb_through_mysql_fdw() -> Result<()> {
    let maria = MariaDb::start()?;
    maria.sql("CREATE DATABASE his CHARACTER SET utf8mb4")?;
    maria.sql(&format!("USE his; {}", HIS_TABLES.replace("$dt", "DATETIME")))?;
    maria.sql(&format!("USE his; {HIS_ROWS}"))?;
    let cluster = Cluster::start_empty().await?;
    let his = cluster.connect("his").await?;
    his.batch_execute(&format!(
        "CREATE EXTENSION mysql_fdw;
         CREATE SERVER his_mariadb FOREIGN DATA WRAPPER mysql_fdw OPTIONS (host '127.0.0.1', port '{port}');
         CREATE USER MAPPING FOR PUBLIC SERVER his_mariadb OPTIONS (username '{MARIADB_USER}', password '{MARIADB_PASSWORD}');
         CREATE SCHEMA his_remote;
         IMPORT FOREIGN SCHEMA his FROM SERVER his_mariadb INTO his_remote;",
        port = maria.port
    ))
    .await?;
    polled_end_to_end(&cluster, &his, &|sql| maria.sql(&format!("USE his; {sql}")).map(|_| ())).await?;
    // Polling the report view itself (its audited_at is shsj AT TIME ZONE …, which MariaDB
    // cannot be sent): each poll would read the whole remote table, and check_sources says so.
    his.batch_execute("UPDATE hmr.polled_sources SET source_view = NULL WHERE name = 'his-lab'")
        .await?;
    let problems: Vec<(String, String)> = his
        .query(
            "SELECT kind, problem FROM hmr.check_sources() WHERE problem = 'poll-reads-whole-table'",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let plan = remote_queries(&his, "hmr_src.lab_report", "audited_at", "report_no").await;
    assert!(
        problems.contains(&("lab_report".to_string(), "poll-reads-whole-table".to_string())),
        "{problems:?} {plan:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_his_on_another_postgresql_through_postgres_fdw() -> Result<()> {
    // The HIS's own server: a second PostgreSQL, without hmr.
    let vendor = Cluster::start_with_scripts(&[]).await?;
    let remote_db = vendor.connect("his").await?;
    remote_db
        .batch_execute(&format!("{}{HIS_ROWS}", HIS_TABLES.replace("$dt", "timestamp")))
        .await?;
    let cluster = Cluster::start_empty().await?;
    let his = cluster.connect("his").await?;
    his.batch_execute(&format!(
        "CREATE EXTENSION postgres_fdw;
         CREATE SERVER his_pg FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '{dir}', port '{port}', dbname 'his');
         CREATE USER MAPPING FOR PUBLIC SERVER his_pg OPTIONS (user 'postgres');
         CREATE SCHEMA his_remote;
         IMPORT FOREIGN SCHEMA public FROM SERVER his_pg INTO his_remote;",
        dir = vendor.dir.display(),
        port = vendor.port
    ))
    .await?;
    let url = vendor.url("his");
    polled_end_to_end(&cluster, &his, &move |sql| {
        let out = std::process::Command::new(format!("{PG_BIN}/psql"))
            .args([url.as_str(), "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()?;
        anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    })
    .await
}
