//! Issue #17: a second, differently shaped HIS (pinyin names, split outpatient/inpatient
//! patients, Chinese code words, timestamp without time zone) connected in SQL alone, in at
//! most 40 lines, end to end.

use std::time::Duration;

use anyhow::Result;
use hmr_e2e::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_second_vendor_connects_in_forty_lines_and_everything_arrives() -> Result<()> {
    let dir = repo_root().join("sql/vendor2");
    let connect = std::fs::read_to_string(dir.join("02_connect.sql"))?;
    let lines = sql_lines(&connect);
    println!("sql/vendor2/02_connect.sql: {lines} non-blank, non-comment lines");
    assert!(lines <= 40, "{lines} lines");

    let cluster = Cluster::start_empty().await?;
    let his = cluster.connect("his").await?;
    for file in ["01_vendor_schema.sql", "02_connect.sql", "03_sample_data.sql"] {
        his.batch_execute(&std::fs::read_to_string(dir.join(file))?).await?;
    }
    // Ready before any report is audited: lab connected and clean, exam not connected.
    // The vendor stores Beijing wall-clock times. On a server whose TimeZone is UTC,
    // localtimestamp is not that: read as Beijing time it comes out 8 h early, which
    // check_sources says (issue #31); then the audit time as the vendor writes it.
    his.batch_execute("SET TimeZone = 'UTC'; UPDATE yy.jybg SET zt = 1, shsj = localtimestamp")
        .await?;
    let clock: Vec<String> = his
        .query(
            "SELECT concat_ws(' | ', kind, field, problem, rule) FROM hmr.check_sources() WHERE problem = 'clock'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        clock.len() == 1 && clock[0].starts_with("lab_report | audited_at | clock"),
        "{clock:#?}"
    );
    his.batch_execute("RESET TimeZone; UPDATE yy.jybg SET shsj = now() AT TIME ZONE 'Asia/Shanghai'")
        .await?;
    let problems: Vec<String> = his
        .query(
            "SELECT concat_ws(' | ', kind, key, field, problem, value, hint) FROM hmr.check_sources()",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");
    // A patient in both the outpatient and the inpatient table under one id: the UNION's key
    // names two rows (the worker would read either), and check_sources says so (issue #31).
    his.batch_execute(
        "INSERT INTO yy.zybr (zybrid, zyh, xm, xb, sfzh, csrq)
         SELECT brid, 'ZY-DUP', xm, xb, sfzh, csrq FROM yy.mzbr WHERE brid = 'MZ0001'",
    )
    .await?;
    let duplicates: Vec<String> = his
        .query(
            "SELECT concat_ws(' | ', kind, key, field, problem) FROM hmr.check_sources() WHERE problem = 'duplicate-key'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Its report, joined to the patient view, comes out twice too.
    assert_eq!(
        duplicates,
        [
            "lab_report | J0001 | report_no | duplicate-key",
            "patient | MZ0001 | patient_id | duplicate-key"
        ],
        "{duplicates:#?}"
    );
    his.batch_execute("DELETE FROM yy.zybr WHERE zyh = 'ZY-DUP'").await?;
    let readiness: Vec<(String, String)> = his
        .query("SELECT kind, state FROM hmr.source_readiness ORDER BY kind", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        readiness.contains(&("exam_report".into(), "not connected".into())),
        "{readiness:?}"
    );
    assert!(
        readiness.contains(&("lab_report".into(), "ready".into())),
        "{readiness:?}"
    );

    // The worker logs in as a plain hmr_worker role: the README's grants are enough.
    his.batch_execute("CREATE ROLE vendor_worker LOGIN IN ROLE hmr_worker")
        .await?;
    let sim = Sim::start()?;
    let worker = Worker::start(
        &cluster,
        &sim,
        &WorkerOptions {
            db_user: "vendor_worker",
            ..Default::default()
        },
    )?;
    wait_until(Duration::from_secs(30), "everything delivered", || async {
        Ok(outbox_empty(&his).await? && count(&his, "SELECT count(*) FROM hmr.delivered").await? == 8)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; worker log: {}", worker.log()))?;
    assert_eq!(count(&his, "SELECT count(*) FROM hmr.quarantine").await?, 0);
    // What the platform received: codes mapped, times with their offset, item codes mapped.
    let text = serde_json::to_string(&sim.requests().await?)?;
    assert!(
        text.contains("\"genderCode\":\"1\"") && text.contains("\"genderCode\":\"2\""),
        "{text}"
    );
    assert!(
        text.contains("JY0001") && text.contains("JY0004"),
        "item codes mapped: {text}"
    );
    assert!(text.contains("\"abnormalFlag\":\"2\""), "↑ mapped to 2: {text}");
    assert!(text.contains("\"visitType\":\"3\""), "住院 mapped to 3: {text}");
    assert!(text.contains("+08:00"), "times carry their offset");
    Ok(())
}
