//! Upgrades ship as `extension/sql/hmr--A--B.sql`. A database created at the last release
//! (its script frozen in `extension/sql/released/`) and moved forward with
//! `ALTER EXTENSION hmr UPDATE` must have exactly the objects of a fresh install of this
//! version — every table column, constraint, index, trigger, function body, view, grant and
//! dump mark — and keep its events, history and delivery state. The old version is installed
//! into a private copy of the PostgreSQL installation, never into the system's.

use anyhow::Result;
use hmr_e2e::*;

/// The last release and its frozen install script.
const RELEASED: &str = "0.2.0";
const RELEASED_SCRIPT: &str = include_str!("../../extension/sql/released/hmr--0.2.0.sql");
const THIS: &str = env!("CARGO_PKG_VERSION");

fn diff(a: &[String], b: &[String]) -> String {
    let only = |x: &[String], y: &[String]| -> Vec<String> { x.iter().filter(|l| !y.contains(l)).cloned().collect() };
    format!(
        "only after the upgrade:\n{}\n\nonly in a fresh install:\n{}",
        only(a, b).join("\n---\n"),
        only(b, a).join("\n---\n")
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_released_database_updated_equals_a_fresh_install_and_keeps_its_events() -> Result<()> {
    let cluster = Cluster::start_with_scripts(&[(&format!("hmr--{RELEASED}.sql"), RELEASED_SCRIPT)]).await?;
    let his = cluster.connect("his").await?;
    his.batch_execute(&format!("CREATE EXTENSION hmr VERSION '{RELEASED}'"))
        .await?;

    // Life at the old version: a watched table, events, a delivered record, and an event a
    // 0.2.0 worker quarantined behind its patient (it said so in last_error only).
    his.batch_execute(
        "CREATE SCHEMA his;
         CREATE TABLE his.person (id text PRIMARY KEY, name text);
         SELECT hmr.watch('patient', 'his.person', 'id');
         INSERT INTO his.person VALUES ('P1', 'a');
         SELECT hmr.ingest();
         INSERT INTO hmr.delivered (kind, key, version, content_hash) VALUES ('patient', 'P0', 1, 'h');
         INSERT INTO hmr.outbox (kind, key, op, state, error_field, error_reason, last_error)
              VALUES ('lab_report', 'L1', 'S', 'quarantined', 'patient_id', 'dependency-quarantined',
                      'waiting for quarantined patient:P:7'),
                     ('lab_report', 'L2', 'S', 'quarantined', 'id_no', 'checksum', 'refused before sending');
         INSERT INTO hmr.unmapped_items (type, local_code, local_name, example_key) VALUES ('exam', 'US-X', '彩超', 'E9');
         INSERT INTO hmr.polled_sources (kind, delay) VALUES ('exam_report', '5 minutes');
         INSERT INTO hmr.polled_seen (kind, key, seen_time) VALUES ('exam_report', 'E1', now());",
    )
    .await?;
    let before = count(&his, "SELECT count(*) FROM hmr.outbox").await?;
    assert_eq!(before, 3);

    his.batch_execute("ALTER EXTENSION hmr UPDATE").await?;
    let now: String = his
        .query_one("SELECT extversion FROM pg_extension WHERE extname = 'hmr'", &[])
        .await?
        .get(0);
    assert_eq!(now, THIS, "the update path reaches this version");

    // The same objects as a fresh install, line for line.
    cluster
        .connect("postgres")
        .await?
        .batch_execute("CREATE DATABASE fresh")
        .await?;
    let fresh = cluster.connect("fresh").await?;
    fresh.batch_execute("CREATE EXTENSION hmr").await?;
    let upgraded = extension_schema(&his).await?;
    let installed = extension_schema(&fresh).await?;
    assert!(
        installed.len() > 90,
        "the comparison sees the objects: {}",
        installed.len()
    );
    assert!(
        installed.iter().any(|l| l.starts_with("table hmr.captured\n")),
        "hmr.captured's shape is compared"
    );
    assert!(upgraded == installed, "{}", diff(&upgraded, &installed));

    // Nothing lost; the old dependency wait is now in the columns the worker releases by.
    assert_eq!(count(&his, "SELECT count(*) FROM hmr.outbox").await?, before);
    assert_eq!(count(&his, "SELECT count(*) FROM hmr.delivered").await?, 1);
    let waits: (Option<String>, Option<String>) = his
        .query_one(
            "SELECT waits_for_kind, waits_for_key FROM hmr.quarantine WHERE key = 'L1'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))?;
    assert_eq!(waits, (Some("patient".into()), Some("P:7".into())));
    assert_eq!(
        count(
            &his,
            "SELECT count(*) FROM hmr.quarantine WHERE key = 'L2' AND waits_for_kind IS NULL"
        )
        .await?,
        1
    );
    // The unmapped code noted by 0.2.0 is still listed (now per report).
    assert_eq!(
        count(
            &his,
            "SELECT count(*) FROM hmr.unmapped_items WHERE local_code = 'US-X' AND reports = 1 AND held = 0"
        )
        .await?,
        1
    );
    // The kind's polled source is now the source named after it.
    assert_eq!(
        count(
            &his,
            "SELECT count(*) FROM hmr.polled_sources WHERE name = 'exam_report' AND kind = 'exam_report'
                AND source_view IS NULL AND delay = '5 minutes'"
        )
        .await?,
        1
    );
    assert_eq!(
        count(
            &his,
            "SELECT count(*) FROM hmr.polled_seen WHERE source = 'exam_report' AND key = 'E1'"
        )
        .await?,
        1
    );
    // Capture still works, and retry clears the wait.
    his.batch_execute(
        "INSERT INTO his.person VALUES ('P2', 'b'); SELECT hmr.retry(id) FROM hmr.quarantine WHERE key = 'L1';",
    )
    .await?;
    assert_eq!(
        count(&his, "SELECT count(*) FROM hmr.captured WHERE key = 'P2'").await?,
        1
    );
    assert_eq!(
        count(
            &his,
            "SELECT count(*) FROM hmr.outbox WHERE key = 'L1' AND state = 'pending' AND waits_for_kind IS NULL"
        )
        .await?,
        1
    );
    Ok(())
}

/// The comparison can fail: a database that differs from a fresh install in one column of
/// `hmr.captured` is told apart.
#[tokio::test(flavor = "multi_thread")]
async fn the_schema_comparison_sees_a_changed_column() -> Result<()> {
    let cluster = Cluster::start_with_scripts(&[]).await?;
    let a = cluster.connect("his").await?;
    a.batch_execute("CREATE EXTENSION hmr").await?;
    cluster
        .connect("postgres")
        .await?
        .batch_execute("CREATE DATABASE b")
        .await?;
    let b = cluster.connect("b").await?;
    b.batch_execute("CREATE EXTENSION hmr").await?;
    assert_eq!(extension_schema(&a).await?, extension_schema(&b).await?);
    b.batch_execute("ALTER TABLE hmr.captured ALTER COLUMN key TYPE varchar(100)")
        .await?;
    let (x, y) = (extension_schema(&a).await?, extension_schema(&b).await?);
    assert_ne!(x, y);
    assert!(diff(&x, &y).contains("key character varying(100)"), "{}", diff(&x, &y));
    Ok(())
}
