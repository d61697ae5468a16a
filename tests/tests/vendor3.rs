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
    let lines = connect
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
        .count();
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
    Ok(())
}
