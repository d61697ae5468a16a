//! Issue #31: a third vendor's HIS, in MariaDB (`sql/vendor3`): pinyin tables, outpatients and
//! inpatients in separate tables, Chinese status and code words (主任医师, 已审核, 偏低), local
//! wall-clock DATETIMEs. Connected from PostgreSQL through mysql_fdw by `03_connect.sql` alone,
//! in at most 40 lines; every kind arrives, each poll's bounds reach MariaDB, a result corrected
//! on an audited report makes its next version, and an un-audit revokes.

use std::time::Duration;

use anyhow::Result;
use hmr_e2e::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread")]
async fn a_mariadb_his_connects_in_forty_lines_and_each_poll_reads_the_changes() -> Result<()> {
    let dir = repo_root().join("sql/vendor3");
    let connect = std::fs::read_to_string(dir.join("03_connect.sql"))?;
    let lines = sql_lines(&connect);
    println!("sql/vendor3/03_connect.sql: {lines} non-blank, non-comment lines");
    assert!(lines <= 40, "{lines} lines");

    let maria = MariaDb::start()?;
    maria.sql("CREATE DATABASE his CHARACTER SET utf8mb4")?;
    for file in ["01_mariadb_schema.sql", "02_mariadb_sample.sql"] {
        maria.sql(&format!("USE his; {}", std::fs::read_to_string(dir.join(file))?))?;
    }
    let cluster = Cluster::start_empty().await?;
    let his = cluster.connect("his").await?;
    // The DBA's edits: where the server is, and the login.
    his.batch_execute(
        &connect
            .replace("port '3306'", &format!("port '{}'", maria.port))
            .replace(
                "username 'hmr', password 'change-me'",
                &format!("username '{MARIADB_USER}', password '{MARIADB_PASSWORD}'"),
            ),
    )
    .await?;
    let problems: Vec<String> = his
        .query(
            "SELECT concat_ws(' | ', kind, key, field, problem, value, rule) FROM hmr.check_sources()",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        problems.is_empty(),
        "ready, and every poll's bounds sent to MariaDB: {problems:#?}"
    );

    // From here on MariaDB logs every statement it is sent: the worker's reads are checked
    // against it at the end (check_sources' whole-view checks above read whole tables on
    // purpose, once, when the DBA asks).
    let general_log = maria.dir.join("general.log");
    maria.sql(&format!(
        "SET GLOBAL log_output = 'FILE'; SET GLOBAL general_log_file = '{}'; SET GLOBAL general_log = 1",
        general_log.display()
    ))?;

    let sim = Sim::start()?;
    let _worker = Worker::start(&cluster, &sim, &WorkerOptions::default())?;
    wait_until(Duration::from_secs(40), "every kind from the MariaDB HIS", || async {
        Ok(held(&sim, "departments", "NK01").await?
            && held(&sim, "staff", "1001").await?
            && held(&sim, "patients", "MZ0001").await?
            && held(&sim, "patients", "ZY0001").await?
            && !history_of(&sim, "/api/v1/lab-reports", "J0001").await?.is_empty()
            && !history_of(&sim, "/api/v1/lab-reports", "J0002").await?.is_empty())
    })
    .await?;
    let requests = sim.requests().await?;
    let body = |path: &str, field: &str, key: &str| -> Value {
        requests
            .iter()
            .filter(|r| r["path"] == path)
            .flat_map(|r| match r["body"]["records"].as_array() {
                Some(records) => records.clone(),
                None => vec![r["body"].clone()],
            })
            .find(|b| b[field] == key)
            .unwrap_or(Value::Null)
    };
    assert_eq!(
        body("/api/v1/staff", "staffNo", "1001")["titleCode"],
        "232",
        "副主任医师 → GB/T 8561"
    );
    assert_eq!(body("/api/v1/staff", "staffNo", "2001")["titleCode"], "263", "主管技师");
    assert_eq!(
        body("/api/v1/lab-reports", "reportNo", "J0002")["visitType"],
        "3",
        "住院"
    );
    let j1 = body("/api/v1/lab-reports", "reportNo", "J0001");
    assert_eq!(j1["items"][1]["abnormalFlag"], "3", "偏低: {j1}");
    // The report view has no patient columns: the identity came from hmr_src.patient by key.
    assert_eq!(
        (j1["idType"].as_str(), j1["idNo"].as_str(), j1["name"].as_str()),
        (Some("01"), Some("441302198003151233"), Some("陈志明")),
        "{j1}"
    );
    assert_eq!(
        body("/api/v1/lab-reports", "reportNo", "J0002")["name"],
        "黄国强",
        "an inpatient's identity, from the other table of the UNION"
    );
    assert_eq!(
        j1["auditedAt"], "2026-11-20T09:40:00+08:00",
        "a wall-clock time read as Beijing time"
    );

    // A result corrected on the audited report: its line's change time moves, and the report
    // goes again as version 2 with the corrected value.
    maria.sql("USE his; UPDATE jyjg SET jg = '6.8', xgsj = '2026-11-21 11:00:00' WHERE bgdh = 'J0001' AND xh = 1")?;
    wait_until(Duration::from_secs(30), "the corrected result", || async {
        Ok(history_of(&sim, "/api/v1/lab-reports", "J0001")
            .await?
            .iter()
            .any(|(s, v)| s == "data" && *v == 2))
    })
    .await?;
    // Un-audited (未审核): the report leaves the views and is revoked.
    maria.sql("USE his; UPDATE jybg SET zt = '未审核' WHERE bgdh = 'J0002'")?;
    wait_until(Duration::from_secs(30), "the revoke", || async {
        Ok(history_of(&sim, "/api/v1/lab-reports", "J0002")
            .await?
            .iter()
            .any(|(s, _)| s == "revoke"))
    })
    .await?;
    assert_eq!(count(&his, "SELECT count(*) FROM hmr.quarantine").await?, 0);

    // Everything the worker asked of the patient and report tables named its rows: reading
    // a changed report by key never fetched every patient (a report view joined to the
    // patient UNION did: SELECT brid, xm, sfzh FROM mzbr, once per report).
    let log = std::fs::read_to_string(&general_log)?;
    let reads: Vec<&str> = log
        .lines()
        .filter(|l| ["mzbr`", "zybr`", "jybg`", "jyjg`"].iter().any(|t| l.contains(t)))
        .collect();
    assert!(
        reads
            .iter()
            .any(|l| l.contains("FROM `his`.`mzbr` WHERE") && l.contains("MZ0001")),
        "the patient's identity read by key: {reads:#?}"
    );
    let whole: Vec<&&str> = reads.iter().filter(|l| !l.contains("WHERE")).collect();
    assert!(whole.is_empty(), "statements that read a whole table: {whole:#?}");

    // The check that finds it: a report view joined to the patient view is named, with the
    // remote table it reads whole and the fix.
    his.batch_execute(
        "CREATE VIEW hmr_src.lab_report_joined AS
         SELECT r.*, p.id_type, p.id_no, p.name AS patient_name
           FROM hmr_src.lab_report r JOIN hmr_src.patient p USING (patient_id);
         UPDATE hmr.kinds SET source_view = 'hmr_src.lab_report_joined' WHERE kind = 'lab_report';",
    )
    .await?;
    let flagged: Vec<String> = his
        .query(
            "SELECT rule || ' | ' || hint FROM hmr.check_sources('lab_report')
              WHERE problem = 'read-by-key-reads-whole-table'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(flagged.len(), 2, "mzbr and zybr: {flagged:#?}");
    assert!(
        flagged
            .iter()
            .all(|f| f.contains("leave id_type, id_no and patient_name out")),
        "{flagged:#?}"
    );
    Ok(())
}
