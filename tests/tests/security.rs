//! Least privilege, and secrets that never reach a log.

use std::time::Duration;

use anyhow::Result;
use hmr_e2e::*;
use serde_json::Value;

fn denied(r: Result<impl Sized, tokio_postgres::Error>) -> bool {
    matches!(r, Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42501"))
}

#[tokio::test(flavor = "multi_thread")]
async fn each_role_can_do_its_job_and_nothing_more() -> Result<()> {
    let cluster = Cluster::start().await?;
    let su = cluster.connect("his").await?;
    load_sample_data(&su).await?;
    su.batch_execute(
        "CREATE ROLE his_app LOGIN IN ROLE hmr_his;
         CREATE ROLE worker_app LOGIN IN ROLE hmr_worker;
         CREATE ROLE admin_app LOGIN IN ROLE hmr_admin;
         GRANT USAGE ON SCHEMA his, lis TO his_app;
         GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA his, lis TO his_app;
         GRANT USAGE ON SCHEMA hmr_src TO hmr_worker;
         GRANT SELECT ON ALL TABLES IN SCHEMA hmr_src TO hmr_worker;
         SELECT hmr.configure_platform('http://127.0.0.1:9', '124413004567890125', 'hz1', 'hz1-secret');",
    )
    .await?;

    // The HIS role: the API, its own tables (captured through the trigger), nothing of hmr's.
    let his = cluster.connect_as("his", "his_app").await?;
    let answer: Value = his
        .query_one(
            "SELECT hmr_list_recognitions('01', '441302198003151233', 'MZ001', 'D001', '0301')",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(answer["status"], "unavailable");
    his.batch_execute("UPDATE lis.report SET status = 'audited', audited_at = now() WHERE report_no = 'L20261126001'")
        .await?;
    assert!(
        denied(his.query("SELECT * FROM hmr.platform", &[]).await),
        "credentials"
    );
    assert!(
        denied(his.query("SELECT * FROM hmr.outbox", &[]).await),
        "outbox internals"
    );
    assert!(
        denied(his.query("SELECT * FROM hmr.retained_reports", &[]).await),
        "other hospitals' reports"
    );
    assert!(denied(his.query("SELECT * FROM hmr.download_log", &[]).await));
    assert!(denied(
        his.execute(
            "INSERT INTO hmr.decisions (check_id, order_id, report_id, recognise, doctor_no, dept_code) VALUES ('c','o','r',true,'d','k')",
            &[]
        )
        .await
    ));
    assert!(denied(
        his.execute("UPDATE hmr.decisions SET recognise = false", &[]).await
    ));
    assert!(
        denied(his.query("SELECT hmr.retry(1)", &[]).await),
        "retrying is the admin's"
    );
    assert!(denied(his.query("SELECT hmr.fetch_report('x', 'pdf')", &[]).await));
    // Moving captured events (and merging them into the history) is the worker's.
    for sql in ["SELECT hmr.ingest()", "SELECT hmr.ingest_captured()"] {
        assert!(denied(his.query(sql, &[]).await), "{sql}");
    }

    // The admin: configures and looks, but cannot read the credentials back.
    let admin = cluster.connect_as("his", "admin_app").await?;
    admin.query("SELECT * FROM hmr.quarantine", &[]).await?;
    admin.query("SELECT * FROM hmr.status", &[]).await?;
    admin
        .execute(
            "SELECT hmr.configure_platform('http://127.0.0.1:9', '124413004567890125', 'hz1', 'other-secret')",
            &[],
        )
        .await?;
    assert!(denied(admin.query("SELECT password FROM hmr.platform", &[]).await));
    let edit = admin.execute("DELETE FROM hmr.download_log", &[]).await;
    assert!(edit.is_err(), "the audit trail cannot be edited");

    // The worker role is enough to deliver: a real worker logs in as it.
    let sim = Sim::start()?;
    let _worker = Worker::start(
        &cluster,
        &sim,
        &WorkerOptions {
            db_user: "worker_app",
            ..Default::default()
        },
    )?;
    wait_until(
        Duration::from_secs(20),
        "the report delivered by worker_app",
        || async { Ok(count(&su, "SELECT count(*) FROM hmr.delivered WHERE key = 'L20261126001'").await? == 1) },
    )
    .await?;
    let worker = cluster.connect_as("his", "worker_app").await?;
    assert!(denied(worker.query("SELECT * FROM hmr.platform", &[]).await));
    assert!(denied(
        worker
            .execute("INSERT INTO hmr.guarded (tbl, query) VALUES ('his.patient', 'x')", &[])
            .await
    ));
    Ok(())
}

/// A full run (uploads, recognition calls, a decision, downloads) leaves no password, no
/// token and no full identity number in any log: the worker's, the simulator's, PostgreSQL's.
#[tokio::test(flavor = "multi_thread")]
async fn no_secret_token_or_id_number_in_any_log() -> Result<()> {
    const ID: &str = "441302198003151233";
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    // Log every error and every statement that takes a millisecond: what a hospital might do.
    load_sample_data(&his).await?;
    for sql in [
        "ALTER SYSTEM SET log_min_duration_statement = 1",
        "ALTER SYSTEM SET log_min_messages = info",
        "SELECT pg_reload_conf()",
    ] {
        his.execute(sql, &[]).await?;
    }
    // This session is the test's own (the HIS's statements are the HIS's business).
    his.batch_execute("SET log_min_duration_statement = -1").await?;
    for file in ["01_orders.sql", "02_workstation.sql"] {
        his.batch_execute(&std::fs::read_to_string(repo_root().join("sql/examples").join(file))?)
            .await?;
    }
    let sim = Sim::start()?;
    // Credentials are set with statement logging off for this statement (README: Operations).
    his.execute(
        "SELECT set_config('log_min_duration_statement', '-1', false), set_config('log_statement', 'none', false)",
        &[],
    )
    .await?;
    configure_platform(&his, &sim).await?;
    his.batch_execute("SET log_min_duration_statement = -1; RESET log_statement")
        .await?;
    OtherHospital::new(&sim)
        .lab_report(ID, "1980-03-15", "W-CBC-1", "JY0001", 1)
        .await?;
    let worker = Worker::start(&cluster, &sim, &WorkerOptions::default())?;
    his.batch_execute("UPDATE lis.report SET status = 'audited', audited_at = now() WHERE report_no = 'L20261126001'")
        .await?;
    wait_until(Duration::from_secs(20), "delivery", || async {
        Ok(count(&his, "SELECT count(*) FROM hmr.delivered WHERE kind = 'lab_report'").await? >= 1)
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
    wait_until(Duration::from_secs(20), "the report kept", || async {
        Ok(count(&his, "SELECT count(*) FROM hmr.retained_reports").await? == 2)
    })
    .await?;
    // A refused record too (its error goes to the logs): a bad id number.
    his.batch_execute(
        "UPDATE his.patient SET id_no = '441302199211082340', updated_at = now() WHERE patient_id = 'P0002'",
    )
    .await?;
    wait_until(Duration::from_secs(20), "the bad patient quarantined", || async {
        Ok(count(&his, "SELECT count(*) FROM hmr.quarantine WHERE key = 'P0002'").await? == 1)
    })
    .await?;

    let tokens: Vec<String> = sim
        .get("/_sim/tokens")
        .await?
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t["token"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert!(tokens.len() >= 3, "tokens were issued: {}", tokens.len());
    let logs = [
        ("worker", worker.log()),
        ("simulator", std::fs::read_to_string(&sim.log_path).unwrap_or_default()),
        ("postgres", cluster.log()),
    ];
    assert!(logs.iter().all(|(_, text)| !text.is_empty()), "every log has content");
    for (name, text) in &logs {
        assert!(!text.contains("hz1-secret"), "the password is in the {name} log");
        let leak: Vec<&str> = text.lines().filter(|l| l.contains(ID)).take(3).collect();
        assert!(
            leak.is_empty(),
            "a full identity number is in the {name} log: {leak:#?}"
        );
        assert!(
            !text.contains("441302199211082340"),
            "the refused identity number is in the {name} log"
        );
        for t in &tokens {
            assert!(!text.contains(t.as_str()), "a token is in the {name} log");
        }
    }
    Ok(())
}
