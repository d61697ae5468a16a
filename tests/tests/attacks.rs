//! The extension's trust boundaries, tried as an attacker would, as the real roles: a HIS
//! login (member of `hmr_his`) that owns a schema of its own, the order table's owner, and
//! `hmr_admin`. Each test is one attack of issue #12; README "Security" states what they prove.

use std::time::Duration;

use anyhow::Result;
use hmr_e2e::*;
use serde_json::{json, Value};
use tokio_postgres::Client;

const P0001_ID: &str = "441302198003151233";

fn code(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_string())
        .unwrap_or_else(|| format!("not a database error: {e}"))
}

/// Our hospital with the example order table and gate; the other hospital holds a
/// recognisable 血常规 (JY0001) of 陈志明; our patients delivered. Roles:
/// `his_app` (HIS login, hmr_his, may create schemas), `his_owner` (owns his.orders),
/// `admin_app` (hmr_admin).
async fn world() -> Result<Workstations> {
    let w = Workstations::start(
        &[(P0001_ID, "1980-03-15", "W-CBC-1", "JY0001", 1)],
        &WorkerOptions::default(),
    )
    .await?;
    w.his
        .batch_execute(
            "CREATE ROLE his_app LOGIN IN ROLE hmr_his;
             CREATE ROLE his_owner LOGIN;
             CREATE ROLE admin_app LOGIN IN ROLE hmr_admin;
             GRANT CREATE ON DATABASE his TO his_app, admin_app;
             GRANT USAGE ON SCHEMA his, lis TO his_app, his_owner;
             GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA his, lis TO his_app;
             GRANT SELECT ON ALL TABLES IN SCHEMA his TO his_owner;
             ALTER TABLE his.orders OWNER TO his_owner;",
        )
        .await?;
    Ok(w)
}

const SAVE_DUPLICATE: &str =
    "INSERT INTO his.orders (order_id, patient_id, visit_type, visit_no, doctor_no, dept_code, item_type, item_code)
     VALUES ('A1', 'P0001', '1', 'MZ001', 'D001', '0301', 'lab', 'JY0001')";

/// Operators and functions in the attacker's schema that shadow pg_catalog's when the
/// attacker's schema is first in search_path. Each call writes who ran it (and, if it ran
/// with rights it should not have, makes the attacker superuser and copies the platform's
/// password) into the attacker's own table.
const HIJACK: &str = r#"
CREATE SCHEMA evil;
CREATE TABLE evil.loot (who text, what text);
CREATE FUNCTION evil.payload() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO evil.loot VALUES (current_user, NULL);
    BEGIN
        EXECUTE format('ALTER ROLE %I SUPERUSER', session_user);
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    BEGIN
        INSERT INTO evil.loot SELECT current_user, password FROM hmr.platform;
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
END $$;
CREATE FUNCTION evil.eq(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM evil.payload(); RETURN a OPERATOR(pg_catalog.=) b; END $$;
CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.eq);
CREATE FUNCTION evil.arrow(j jsonb, k text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM evil.payload(); RETURN j OPERATOR(pg_catalog.->>) k; END $$;
CREATE OPERATOR evil.->> (LEFTARG = jsonb, RIGHTARG = text, FUNCTION = evil.arrow);
CREATE FUNCTION evil.clock_timestamp() RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN PERFORM evil.payload(); RETURN pg_catalog.clock_timestamp(); END $$;
CREATE FUNCTION evil.make_interval(secs double precision) RETURNS interval LANGUAGE plpgsql AS $$
BEGIN PERFORM evil.payload(); RETURN pg_catalog.make_interval(secs => secs); END $$;
CREATE FUNCTION evil.jsonb_array_elements(j jsonb) RETURNS SETOF jsonb LANGUAGE plpgsql AS $$
BEGIN PERFORM evil.payload(); RETURN QUERY SELECT pg_catalog.jsonb_array_elements(j); END $$;
SET search_path = evil, pg_catalog, public;
"#;

/// Attack 1: operator/function hijack of SECURITY DEFINER code, directly and through the gate.
async fn hijack_as(w: &Workstations, login: &str) -> Result<()> {
    let attacker = w.cluster.connect_as("his", login).await?;
    attacker.batch_execute(HIJACK).await?;
    let visit = json!({"id_type": "01", "id_no": P0001_ID, "patient_id": "P0001", "visit_type": "1",
                       "visit_no": "MZ001", "doctor_no": "D001", "dept_code": "0301"});
    let lines = json!([{"order_id": "H1", "item_code": "JY0001", "type": "lab"}]);
    // The functions behind the wrappers: refused to HIS logins; pinned for hmr_admin.
    for sql in [
        "SELECT hmr.check_prescription_json($1, $2)",
        "SELECT public.hmr_check_prescription($1, $2)",
    ] {
        match attacker.query_one(sql, &[&visit, &lines]).await {
            Ok(row) => {
                let answer: Value = row.get(0);
                assert_eq!(answer["status"], "ok", "{login}: {sql}: {answer}");
                assert_eq!(answer["duplicate"], true, "{login}: {sql}: {answer}");
            }
            Err(e) => assert_eq!(code(&e), "42501", "{login}: {sql}: {e}"),
        }
    }
    for sql in [
        format!("SELECT hmr_list_recognitions('01', '{P0001_ID}', 'MZ001', 'D001', '0301', use_cache => true)"),
        format!("SELECT hmr_list_recognitions('01', '{P0001_ID}', 'MZ001', 'D001', '0301', use_cache => true)"),
        format!(
            "SELECT hmr_query_recognitions('{{\"id_type\": \"01\", \"id_no\": \"{P0001_ID}\", \"item_codes\": [\"JY0001\"]}}')"
        ),
        format!(
            "SELECT hmr.list_recognitions_json('01', '{P0001_ID}', 'MZ001', 'D001', '0301', 'all', false)"
        ),
        "SELECT hmr.ensure_check('nope')".into(),
        "SELECT hmr.fetch_report('x', 'pdf')".into(),
    ] {
        if let Err(e) = attacker.query(&sql, &[]).await {
            // Refused outright, or a clean error of the function itself (the report is not ours).
            assert!(
                ["42501", "22023"].contains(&code(&e).as_str()),
                "{login}: {sql}: {e}"
            );
        }
    }
    for sql in [
        "SELECT hmr_record_decision('nope', 'H1', true)",
        "SELECT hmr_download_report('x')",
    ] {
        let e = attacker.query(sql, &[]).await.expect_err("unknown check / report");
        assert!(
            ["HM003", "HM006", "42501"].contains(&code(&e).as_str()),
            "{login}: {sql}: {e}"
        );
    }
    // Through the gate: the duplicate is still refused (no bypass by a lying operator).
    if login == "his_app" {
        let e = attacker
            .batch_execute(&SAVE_DUPLICATE.replace("'A1'", "'A-hijack'"))
            .await
            .expect_err("the gate refuses");
        assert_eq!(code(&e), "HM001", "{e}");
    }
    // Nothing ran with rights other than the attacker's own, nothing leaked.
    let rolsuper: bool = w
        .his
        .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&login])
        .await?
        .get(0);
    assert!(!rolsuper, "{login} became superuser");
    let foreign: i64 = w
        .his
        .query_one(
            "SELECT count(*) FROM evil.loot WHERE who <> $1 OR what IS NOT NULL",
            &[&login],
        )
        .await?
        .get(0);
    assert_eq!(
        foreign, 0,
        "{login}: hijacked code ran as another role or read the password"
    );
    w.his.batch_execute("DROP SCHEMA evil CASCADE").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_hijack_escalates_nothing_leaks_nothing_bypasses_nothing() -> Result<()> {
    let w = world().await?;
    hijack_as(&w, "his_app").await?;
    hijack_as(&w, "admin_app").await?;
    // Every SECURITY DEFINER function of the extension pins search_path.
    let unpinned: Vec<String> = w
        .his
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p
               JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
               JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'hmr'
              WHERE p.prosecdef
                AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false)",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        unpinned.is_empty(),
        "SECURITY DEFINER without a pinned search_path: {unpinned:?}"
    );
    let definers: i64 = count(
        &w.his,
        "SELECT count(*) FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
           JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'hmr' WHERE p.prosecdef",
    )
    .await?;
    assert!(definers >= 10, "the check above saw the definer functions ({definers})");
    drop(w.sim);
    Ok(())
}

/// Attack 2: a changed event table must not crash the server.
#[tokio::test(flavor = "multi_thread")]
async fn a_reshaped_event_table_is_refused_without_a_crash() -> Result<()> {
    let cluster = Cluster::start().await?;
    let su = cluster.connect("his").await?;
    load_sample_data(&su).await?;
    let started: String = su
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await?
        .get(0);
    let touch = "UPDATE his.patient SET phone = '13900000000', updated_at = now() WHERE patient_id = 'P0001'";
    for (change, undo) in [
        (
            "ALTER TABLE hmr.captured ADD COLUMN note text",
            "ALTER TABLE hmr.captured DROP COLUMN note",
        ),
        (
            "ALTER TABLE hmr.captured ALTER COLUMN key TYPE varchar(20)",
            "ALTER TABLE hmr.captured ALTER COLUMN key TYPE text",
        ),
        (
            "ALTER TABLE hmr.captured RENAME COLUMN kind TO sort",
            "ALTER TABLE hmr.captured RENAME COLUMN sort TO kind",
        ),
        (
            "CREATE INDEX captured_id ON hmr.captured (id)",
            "DROP INDEX hmr.captured_id",
        ),
        (
            "ALTER TABLE hmr.captured ADD CONSTRAINT c CHECK (id > 0)",
            "ALTER TABLE hmr.captured DROP CONSTRAINT c",
        ),
    ] {
        su.batch_execute(change).await?;
        let his = cluster.connect("his").await?;
        let e = his.batch_execute(touch).await.expect_err(change);
        assert_eq!(code(&e), "55000", "{change}: {e}");
        assert!(
            e.as_db_error()
                .is_some_and(|d| d.message().starts_with("hmr.captured has the wrong shape")),
            "{change}: {e}"
        );
        // The same connection goes on; the change was rolled back, nothing captured.
        his.batch_execute("SELECT 1").await?;
        su.batch_execute(undo).await?;
        his.batch_execute(touch).await?;
    }
    assert!(count(&su, "SELECT count(*) FROM hmr.captured WHERE key = 'P0001'").await? >= 5);
    let after: String = su
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await?
        .get(0);
    assert_eq!(started, after);
    let log = cluster.log();
    assert!(!log.contains("terminated by signal"), "a backend crashed");
    assert!(!log.contains("all server processes terminated"), "the server restarted");
    Ok(())
}

/// Attack 3: the gate's policy is the hospital's, not the saving session's.
#[tokio::test(flavor = "multi_thread")]
async fn the_gate_policy_is_the_hospitals() -> Result<()> {
    let w = world().await?;
    let admin = w.cluster.connect_as("his", "admin_app").await?;
    // Validated: a misspelt action and an out-of-range timeout are errors, whoever writes.
    let e = admin
        .batch_execute("SELECT hmr.set_policy(gate_on_unavailable => 'blok')")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "22023");
    let e = admin
        .batch_execute("UPDATE hmr.policy SET gate_on_unavailable = 'blok'")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "22P02");
    let e = admin
        .batch_execute("SELECT hmr.set_policy(platform_timeout_ms => 5)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "23514");
    admin
        .batch_execute("SELECT hmr.set_policy(gate_on_unavailable => 'block', platform_timeout_ms => 3000)")
        .await?;

    // A HIS login cannot change it, and sees it before any hmr function ran.
    let his = w.cluster.connect_as("his", "his_app").await?;
    let shown: String = his
        .query_one("SELECT value FROM hmr.settings WHERE name = 'gate_on_unavailable'", &[])
        .await?
        .get(0);
    assert_eq!(shown, "block");
    for sql in [
        "UPDATE hmr.policy SET gate_on_unavailable = 'allow'",
        "INSERT INTO hmr.policy (gate_on_unavailable) VALUES ('allow')",
        "SELECT hmr.set_policy(gate_on_unavailable => 'allow')",
        "DELETE FROM hmr.policy",
    ] {
        let e = his.batch_execute(sql).await.expect_err(sql);
        assert_eq!(code(&e), "42501", "{sql}: {e}");
    }
    // What a session could SET before is not a setting any more (refused once hmr is loaded;
    // a placeholder nobody reads before that).
    his.batch_execute("SELECT hmr.id_card_problem('x')").await?;
    for sql in [
        "SET hmr.gate_on_unavailable = 'allow'",
        "SET hmr.platform_timeout_ms = 100",
    ] {
        let e = his.batch_execute(sql).await.expect_err(sql);
        assert_eq!(code(&e), "42602", "{sql}: {e}");
    }
    // The platform answers in 600 ms: a session cannot make that "unavailable" to save a
    // duplicate with a mere WARNING; the check is made and the duplicate refused.
    w.sim
        .faults(json!({"latency_ms": 600, "path_prefix": "/api/v1/prescriptions"}))
        .await?;
    let fresh = w.cluster.connect_as("his", "his_app").await?;
    let _ = fresh.batch_execute("SET hmr.platform_timeout_ms = 100").await;
    let e = fresh.batch_execute(SAVE_DUPLICATE).await.expect_err("refused");
    assert_eq!(code(&e), "HM001", "{e}");
    // Unavailable platform + block: HM002, and the hint suggests no way around the policy.
    w.sim.faults(json!({"status": 503})).await?;
    let e = fresh.batch_execute(SAVE_DUPLICATE).await.expect_err("blocked");
    assert_eq!(code(&e), "HM002", "{e}");
    let hint = e.as_db_error().and_then(|d| d.hint()).unwrap_or_default().to_string();
    assert!(!hint.contains("allow"), "{hint}");
    w.sim.clear_faults().await?;
    Ok(())
}

/// Attack 4: draft then submit (INSERT, then UPDATE into a duplicate) is gated too; an update
/// that leaves the guard's view of the prescription unchanged asks nothing.
#[tokio::test(flavor = "multi_thread")]
async fn draft_then_submit_is_gated() -> Result<()> {
    let w = world().await?;
    let his = w.cluster.connect_as("his", "his_app").await?;
    his.batch_execute(
        "INSERT INTO his.orders (order_id, patient_id, visit_type, visit_no, doctor_no, dept_code, item_type, item_code)
         VALUES ('D1', 'P0001', '1', 'MZ001', 'D001', '0301', 'drug', 'AMOX500')",
    )
    .await?;
    let e = his
        .batch_execute("UPDATE his.orders SET item_type = 'lab', item_code = 'JY0001' WHERE order_id = 'D1'")
        .await
        .expect_err("submitting a duplicate is refused");
    assert_eq!(code(&e), "HM001", "{e}");
    assert_eq!(
        count(&w.his, "SELECT count(*) FROM his.orders WHERE item_code = 'JY0001'").await?,
        0
    );
    // A lab order that is no duplicate (JY0002 has no report elsewhere), then a status change.
    his.batch_execute(
        "INSERT INTO his.orders (order_id, patient_id, visit_type, visit_no, doctor_no, dept_code, item_type, item_code)
         VALUES ('D2', 'P0001', '1', 'MZ001', 'D001', '0301', 'lab', 'JY0002')",
    )
    .await?;
    // (Count checks only: the worker talks to the platform meanwhile.)
    let checks = || async {
        Ok::<_, anyhow::Error>(
            w.sim
                .requests()
                .await?
                .iter()
                .filter(|r| r["path"] == "/api/v1/prescriptions/check")
                .count(),
        )
    };
    let before = checks().await?;
    his.batch_execute("UPDATE his.orders SET status = 'sent' WHERE order_id = 'D2'")
        .await?;
    let after = checks().await?;
    assert_eq!(before, after, "a status change asked the platform");
    // After a decision, the submit passes.
    let check: Value = his
        .query_one(
            "SELECT hmr_check_prescription($1, $2)",
            &[
                &json!({"id_type": "01", "id_no": P0001_ID, "patient_id": "P0001", "visit_type": "1",
                        "visit_no": "MZ001", "doctor_no": "D001", "dept_code": "0301"}),
                &json!([{"order_id": "D1", "item_code": "JY0001", "type": "lab"}]),
            ],
        )
        .await?
        .get(0);
    let check_id = check["check_id"].as_str().unwrap_or_default().to_string();
    his.execute("SELECT hmr_record_decision($1, 'D1', false, '02')", &[&check_id])
        .await?;
    his.batch_execute("UPDATE his.orders SET item_type = 'lab', item_code = 'JY0001' WHERE order_id = 'D1'")
        .await?;
    Ok(())
}

type GateState = (String, String, bool, String, i64);

async fn state(su: &Client) -> Result<GateState> {
    let r = su
        .query_one(
            "SELECT g.on_insert, g.on_update, g.active, g.table_owner, s.guards_off
               FROM hmr.guards g, hmr.status s WHERE g.tbl = 'his.orders'::regclass",
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
}

/// Attack 5: the order table's owner can switch the gate off, but not unseen; a HIS login
/// that does not own the table cannot.
#[tokio::test(flavor = "multi_thread")]
async fn a_switched_off_gate_is_visible() -> Result<()> {
    let w = world().await?;
    assert_eq!(
        state(&w.his).await?,
        ("enabled".into(), "enabled".into(), true, "his_owner".into(), 0)
    );
    let his = w.cluster.connect_as("his", "his_app").await?;
    for sql in [
        "ALTER TABLE his.orders DISABLE TRIGGER hmr_gate",
        "ALTER TABLE his.orders DISABLE TRIGGER ALL",
        "DROP TRIGGER hmr_gate ON his.orders",
    ] {
        let e = his.batch_execute(sql).await.expect_err(sql);
        assert_eq!(code(&e), "42501", "{sql}: {e}");
    }
    let owner = w.cluster.connect_as("his", "his_owner").await?;
    owner
        .batch_execute("ALTER TABLE his.orders DISABLE TRIGGER hmr_gate")
        .await?;
    assert_eq!(
        state(&w.his).await?,
        ("disabled".into(), "enabled".into(), false, "his_owner".into(), 1)
    );
    owner
        .batch_execute("DROP TRIGGER hmr_gate_update ON his.orders")
        .await?;
    assert_eq!(
        state(&w.his).await?,
        ("disabled".into(), "missing".into(), false, "his_owner".into(), 1)
    );
    // hmr_admin sees it too, and guarding again repairs it.
    let admin = w.cluster.connect_as("his", "admin_app").await?;
    let off: i64 = admin
        .query_one("SELECT count(*) FROM hmr.guards WHERE NOT active", &[])
        .await?
        .get(0);
    assert_eq!(off, 1);
    let query: String = w
        .his
        .query_one("SELECT query FROM hmr.guarded WHERE tbl = 'his.orders'::regclass", &[])
        .await?
        .get(0);
    w.his.execute("SELECT hmr.guard('his.orders', $1)", &[&query]).await?;
    assert_eq!(
        state(&w.his).await?,
        ("enabled".into(), "enabled".into(), true, "his_owner".into(), 0)
    );
    Ok(())
}

/// Attack 6: update_when is one expression, never spliced into extra statements.
#[tokio::test(flavor = "multi_thread")]
async fn update_when_cannot_inject_sql() -> Result<()> {
    let cluster = Cluster::start().await?;
    let su = cluster.connect("his").await?;
    su.batch_execute(
        "CREATE ROLE admin_app LOGIN IN ROLE hmr_admin; GRANT USAGE ON SCHEMA lis TO admin_app;
                      ALTER TABLE lis.report OWNER TO admin_app;",
    )
    .await?;
    let admin = cluster.connect_as("his", "admin_app").await?;
    for hostile in [
        "true) EXECUTE FUNCTION hmr.capture('lab_report', 'report_no'); CREATE TABLE public.pwned(); --",
        "true); CREATE TABLE public.pwned(); --",
        "NEW.status = 'a' --\n) EXECUTE FUNCTION hmr.capture('x', 'y'); CREATE TABLE public.pwned(); --",
        "true; CREATE TABLE public.pwned()",
        "true FROM pg_class",
    ] {
        let e = admin
            .query(
                "SELECT hmr.watch('lab_report', 'lis.report', 'report_no', $1)",
                &[&hostile],
            )
            .await
            .expect_err(hostile);
        assert_eq!(code(&e), "HM014", "{hostile}: {e}");
    }
    assert_eq!(
        count(&su, "SELECT count(*) FROM pg_class WHERE relname = 'pwned'").await?,
        0
    );
    Ok(())
}

/// Attack 7: free text with control characters or of absurd length is quarantined with the
/// view's column and the reason; the rest flows.
#[tokio::test(flavor = "multi_thread")]
async fn free_text_is_checked_before_it_leaves() -> Result<()> {
    let cluster = Cluster::start().await?;
    let su = cluster.connect("his").await?;
    load_sample_data(&su).await?;
    let sim = Sim::start()?;
    let _worker = Worker::start(&cluster, &sim, &WorkerOptions::default())?;
    su.batch_execute(
        "UPDATE his.patient SET name = E'陈\\x01志\\x07明\\t\\u200B', updated_at = now() WHERE patient_id = 'P0001';
         UPDATE lis.result SET value = repeat('9', 1048576) WHERE report_no = 'L20261126002' AND seq = 1;
         UPDATE lis.report SET status = 'audited', audited_at = now() WHERE report_no = 'L20261126002';",
    )
    .await?;
    wait_until(
        Duration::from_secs(30),
        "both quarantined, the rest delivered",
        || async {
            // (P0001 may have gone up with its first, valid name before the change.)
            Ok(count(&su, "SELECT count(*) FROM hmr.quarantine").await? == 2
                && outbox_empty(&su).await?
                && count(
                    &su,
                    "SELECT count(*) FROM hmr.delivered WHERE kind = 'patient' AND key IN ('P0002', 'P0003')",
                )
                .await?
                    == 2)
        },
    )
    .await?;
    let rows: Vec<(String, String, String)> = su
        .query(
            "SELECT key, error_field, error_reason FROM hmr.quarantine ORDER BY key",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("L20261126002".into(), "items[0].result_value".into(), "length".into()),
            ("P0001".into(), "name".into(), "control-character".into()),
        ]
    );
    // Nothing of either reached the platform.
    let sent = serde_json::to_string(&sim.requests().await?)?;
    assert!(!sent.contains("L20261126002") && !sent.contains("\\u0001"));
    Ok(())
}

/// Attack 6 (this release's objects): a HIS login reads none of the statistics (who looked at
/// which patient, every doctor's 互认率), cannot forge them, cannot release held reports by
/// mapping a code or turn the hold policy off, cannot add a polled source; and what it passes
/// as its workstation (to the list and to a decision) is stored as data, cut to 32 characters,
/// and cannot be rewritten afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn a_his_login_neither_reads_nor_forges_the_statistics() -> Result<()> {
    let w = world().await?;
    let his = w.cluster.connect_as("his", "his_app").await?;
    for sql in [
        "SELECT * FROM hmr.list_log",
        "SELECT * FROM hmr.recognition_stats",
        "SELECT * FROM hmr.recognition_totals",
        "SELECT * FROM hmr.upload_stats()",
        "SELECT * FROM hmr.quarantine_ageing",
        "INSERT INTO hmr.list_log (kind, status) VALUES ('all', 'ok')",
        "INSERT INTO hmr.upload_days (day, kind, uploaded) VALUES ('2026-11-01', 'lab_report', 1000)",
        "INSERT INTO hmr.item_prices VALUES ('JY0001', 1)",
        "INSERT INTO hmr.item_map (type, local_code, data_code) VALUES ('exam', 'X', 'JC0001')",
        "UPDATE hmr.kinds SET unmapped = 'send'",
        "INSERT INTO hmr.polled_sources (name, kind, source_view) VALUES ('evil', 'exam_report', 'pg_authid')",
        "UPDATE hmr.outbox SET waits_for_kind = NULL",
    ] {
        let e = his.batch_execute(sql).await.expect_err(sql);
        assert_eq!(code(&e), "42501", "{sql}: {e}");
    }
    let long = format!("'); DROP TABLE hmr.list_log; --{}", "门".repeat(100));
    his.query_one(
        &format!("SELECT hmr_list_recognitions('01', '{P0001_ID}', 'MZ001', 'D001', '0301', workstation => $1)"),
        &[&long],
    )
    .await?;
    let kept: String = w
        .his
        .query_one("SELECT workstation FROM hmr.list_log ORDER BY id DESC LIMIT 1", &[])
        .await?
        .get(0);
    assert_eq!(kept.chars().count(), 32);
    assert!(long.starts_with(&kept), "stored as given, cut: {kept}");
    // The same for the terminal a decision names, and nobody rewrites it afterwards.
    let visit = serde_json::json!({"id_type": "01", "id_no": P0001_ID, "patient_id": "P0001", "visit_type": "1",
                                   "visit_no": "MZ001", "doctor_no": "D001", "dept_code": "0301"});
    let orders = serde_json::json!([{"order_id": "W1", "item_code": "JY0001", "type": "lab"}]);
    let check: serde_json::Value = his
        .query_one("SELECT hmr_check_prescription($1, $2)", &[&visit, &orders])
        .await?
        .get(0);
    let check_id = check["check_id"].as_str().expect("a check").to_string();
    his.query_one(
        "SELECT hmr_record_decision($1, 'W1', true, workstation => $2)",
        &[&check_id, &long],
    )
    .await?;
    let kept: String = w
        .his
        .query_one("SELECT workstation FROM hmr.decisions WHERE order_id = 'W1'", &[])
        .await?
        .get(0);
    assert!(kept.chars().count() == 32 && long.starts_with(&kept), "{kept}");
    for sql in [
        "UPDATE hmr.decisions SET workstation = '门诊医生站' WHERE order_id = 'W1'",
        "INSERT INTO hmr.decisions (check_id, order_id, report_id, recognise, doctor_no, dept_code, workstation)
         SELECT check_id, 'W9', report_id, true, 'D001', '0301', '病区' FROM hmr.decisions LIMIT 1",
    ] {
        let e = his.batch_execute(sql).await.expect_err(sql);
        assert_eq!(code(&e), "42501", "{sql}: {e}");
    }
    Ok(())
}

/// Issue #29 R3, R4, R5, as a HIS login (`his_app`): it cannot forge 提醒 (the prompts the
/// hospital is assessed on) with invented orders or by prompting one check twice; it cannot
/// credit a decision to a doctor or department other than the check's (another doctor only if
/// on the staff, then in that doctor's department); it cannot read who decided (no per-doctor
/// counts), while it still reads what was decided per order.
#[tokio::test(flavor = "multi_thread")]
async fn a_his_login_cannot_forge_prompts_credit_others_or_count_doctors() -> Result<()> {
    let w = world().await?;
    let his = w.cluster.connect_as("his", "his_app").await?;
    let visit = serde_json::json!({"id_type": "01", "id_no": P0001_ID, "patient_id": "P0001", "visit_type": "1",
                                   "visit_no": "MZ001", "doctor_no": "D001", "dept_code": "0301"});
    let orders = serde_json::json!([{"order_id": "W2", "item_code": "JY0001", "type": "lab"}]);
    let check: serde_json::Value = his
        .query_one("SELECT hmr_check_prescription($1, $2)", &[&visit, &orders])
        .await?
        .get(0);
    let check_id = check["check_id"].as_str().expect("a check").to_string();
    let keep = |undecided: serde_json::Value| {
        let (his, check_id) = (&his, check_id.clone());
        async move {
            let kept: bool = his
                .query_one("SELECT hmr.keep_prompt($1, $2)", &[&check_id, &undecided])
                .await?
                .get(0);
            anyhow::Ok(kept)
        }
    };
    // R3: 100 invented orders count nothing; the check's own order counts once, with the
    // check's match as its content; a second prompt of the same check counts nothing.
    let invented: Vec<serde_json::Value> = (0..100)
        .map(|i| serde_json::json!({"order_id": format!("X{i}"), "reports": []}))
        .collect();
    assert!(!keep(serde_json::Value::Array(invented)).await?);
    assert!(keep(serde_json::json!([{"order_id": "W2", "reports": []}, {"order_id": "X1"}])).await?);
    assert!(!keep(serde_json::json!([{"order_id": "W2"}])).await?);
    let (prompts, orders_prompted, with_reports): (i64, i64, bool) = {
        let r = w
            .his
            .query_one(
                "SELECT count(*), sum(jsonb_array_length(undecided))::int8,
                        bool_and(jsonb_array_length(undecided->0->'reports') > 0)
                   FROM hmr.prompts WHERE check_id = $1",
                &[&check_id],
            )
            .await?;
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!((prompts, orders_prompted, with_reports), (1, 1, true));

    // R4: credited to nobody but the check's doctor, or a member of staff in their own
    // department.
    for (sql, why) in [
        (
            "SELECT hmr_record_decision($1, 'W2', true, doctor_no => 'D999')",
            "not on the staff",
        ),
        (
            "SELECT hmr_record_decision($1, 'W2', true, dept_code => '=cmd|'' /C calc''!A0')",
            "not the check's department",
        ),
        (
            "SELECT hmr_record_decision($1, 'W2', true, doctor_no => 'D002', dept_code => '0301')",
            "not D002's department",
        ),
    ] {
        let e = his.query_one(sql, &[&check_id]).await.expect_err(why);
        assert_eq!(code(&e), "HM018", "{why}: {e}");
    }
    his.query_one(
        "SELECT hmr_record_decision($1, 'W2', true, doctor_no => 'D002')",
        &[&check_id],
    )
    .await?;
    let who: (String, String) = {
        let r = w
            .his
            .query_one(
                "SELECT doctor_no, dept_code FROM hmr.decisions WHERE order_id = 'W2'",
                &[],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    assert_eq!(who, ("D002".to_string(), "0502".to_string()));

    // R5: what was decided per order, yes; who decided, no.
    let recognised: bool = his
        .query_one(
            "SELECT recognised FROM hmr.order_recognitions WHERE order_id = 'W2'",
            &[],
        )
        .await?
        .get(0);
    assert!(recognised);
    for sql in [
        "SELECT doctor_no, count(*) FROM hmr.current_decisions GROUP BY 1",
        "SELECT * FROM hmr.decisions",
        "SELECT doctor_no, count(*) FROM hmr.order_recognitions GROUP BY 1",
        "SELECT dept_code FROM hmr.orders_to_perform",
    ] {
        let e = his.batch_execute(sql).await.expect_err(sql);
        assert_eq!(code(&e), "42501", "{sql}: {e}");
    }
    Ok(())
}

/// Issue #29 T5: 互认 of a report whose validity ran out after the check is refused at once
/// (HM015, in Chinese; the platform would answer 409), not accepted locally and lost later;
/// 不互认 of it stays possible.
#[tokio::test(flavor = "multi_thread")]
async fn recognising_a_report_past_its_validity_is_refused_at_once() -> Result<()> {
    let w = world().await?;
    let his = w.cluster.connect_as("his", "his_app").await?;
    let visit = serde_json::json!({"id_type": "01", "id_no": P0001_ID, "patient_id": "P0001", "visit_type": "1",
                                   "visit_no": "MZ001", "doctor_no": "D001", "dept_code": "0301"});
    let orders = serde_json::json!([{"order_id": "V1", "item_code": "JY0001", "type": "lab"}]);
    let check: serde_json::Value = his
        .query_one("SELECT hmr_check_prescription($1, $2)", &[&visit, &orders])
        .await?
        .get(0);
    let check_id = check["check_id"].as_str().expect("a check").to_string();
    // Time passes: the offered report's validity ends (the check as kept, one minute ago).
    w.his
        .execute(
            "UPDATE hmr.checks SET matches = jsonb_set(matches, '{0,reports,0,valid_until}',
                    to_jsonb(to_char(now() - interval '1 minute', 'YYYY-MM-DD\"T\"HH24:MI:SSOF:00')))
              WHERE check_id = $1",
            &[&check_id],
        )
        .await?;
    let e = his
        .query_one("SELECT hmr_record_decision($1, 'V1', true)", &[&check_id])
        .await
        .expect_err("past its validity");
    assert_eq!(code(&e), "HM015", "{e}");
    let message = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(message.contains("已超过互认有效期"), "{message}");
    his.query_one("SELECT hmr_record_decision($1, 'V1', false, '01')", &[&check_id])
        .await?;
    Ok(())
}
