//! Lab and exam reports complete: versions, revoke, PDFs (rendered or the source's own) and
//! the polled exam source, end to end.

use std::time::Duration;

use anyhow::Result;
use hmr_e2e::*;
use serde_json::Value;

fn steps(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter().map(|(s, v)| (s.to_string(), *v)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn lab_report_versions_revoke_and_pdfs_arrive_in_order() -> Result<()> {
    const LAB: &str = "/api/v1/lab-reports";
    let Hospital {
        cluster: _cluster,
        his,
        sim,
        worker: _worker,
    } = Hospital::start(&WorkerOptions::default()).await?;
    let r = "L20261126001";
    let wait_for = |expected: Vec<(String, u64)>| {
        let sim = &sim;
        async move {
            wait_until(Duration::from_secs(20), &format!("{expected:?}"), || async {
                Ok(history_of(sim, LAB, r).await? == expected)
            })
            .await
        }
    };

    // 审核 → v1 with its PDF, the PDF after the data.
    his.execute(
        "UPDATE lis.report SET status = 'audited', audited_at = now() WHERE report_no = $1",
        &[&r],
    )
    .await?;
    wait_for(steps(&[("data", 1), ("pdf", 1)])).await?;
    // 取消审核, a result corrected, 重新审核 → revoke v1, then v2 and its PDF.
    his.batch_execute(&format!(
        "UPDATE lis.report SET status = 'draft' WHERE report_no = '{r}';
         INSERT INTO lis.unaudit_log (report_no, reason, operator) VALUES ('{r}', '标本溶血，重新检测', 'T002');"
    ))
    .await?;
    wait_for(steps(&[("data", 1), ("pdf", 1), ("revoke", 1)])).await?;
    his.batch_execute(&format!(
        "UPDATE lis.result SET value = '5.2' WHERE report_no = '{r}' AND seq = 1;
         UPDATE lis.report SET status = 'audited', audited_at = now() WHERE report_no = '{r}';"
    ))
    .await?;
    wait_for(steps(&[
        ("data", 1),
        ("pdf", 1),
        ("revoke", 1),
        ("data", 2),
        ("pdf", 2),
    ]))
    .await?;
    // The revoke carried the LIS's reason and operator.
    let revoke = sim
        .requests()
        .await?
        .into_iter()
        .find(|q| q["path"] == format!("{LAB}/{r}/revoke"))
        .expect("a revoke");
    assert_eq!(revoke["body"]["reason"], "标本溶血，重新检测");
    assert_eq!(revoke["body"]["operatorNo"], "T002");
    // Revoked again, re-audited with the same content: a new version, valid again.
    his.batch_execute(&format!(
        "UPDATE lis.report SET status = 'draft' WHERE report_no = '{r}'"
    ))
    .await?;
    wait_for(steps(&[
        ("data", 1),
        ("pdf", 1),
        ("revoke", 1),
        ("data", 2),
        ("pdf", 2),
        ("revoke", 2),
    ]))
    .await?;
    his.batch_execute(&format!(
        "UPDATE lis.report SET status = 'audited' WHERE report_no = '{r}'"
    ))
    .await?;
    wait_for(steps(&[
        ("data", 1),
        ("pdf", 1),
        ("revoke", 1),
        ("data", 2),
        ("pdf", 2),
        ("revoke", 2),
        ("data", 3),
        ("pdf", 3),
    ]))
    .await?;
    let state = sim.get("/_sim/state").await?;
    let versions = &state["orgs"][ORG_CODE]["lab_reports"][r]["versions"];
    let newest = versions
        .as_array()
        .and_then(|v| v.last())
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(newest["version"], 3);
    assert_eq!(newest["revoked"], false);
    assert_eq!(newest["has_pdf"], true);

    // The rendered PDF reads as a Chinese 检验报告单.
    let pdf = reqwest::get(format!("{}/_sim/pdf/{ORG_CODE}/lab/{r}/3", sim.base))
        .await?
        .bytes()
        .await?;
    assert!(pdf.starts_with(b"%PDF-"));
    assert!(pdf.len() < 200 * 1024, "{} bytes", pdf.len());
    let dir = std::env::temp_dir().join(format!("hmr-e2e-pdf-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("report.pdf");
    std::fs::write(&path, &pdf)?;
    let text = String::from_utf8(
        std::process::Command::new("pdftotext")
            .arg(&path)
            .arg("-")
            .output()?
            .stdout,
    )?;
    for expected in ["检验报告单", "陈志明", "白细胞计数", "5.2", "↓", "张伟"] {
        assert!(text.contains(expected), "{expected:?} not in the PDF text:\n{text}");
    }
    let png = std::process::Command::new("pdftoppm")
        .args(["-png", "-r", "50", "-f", "1", "-l", "1"])
        .arg(&path)
        .arg(dir.join("page"))
        .status()?;
    assert!(png.success());
    let page = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().ends_with(".png"));
    assert!(
        page.is_some_and(|p| p.metadata().map(|m| m.len() > 5_000).unwrap_or(false)),
        "a page image"
    );
    std::fs::remove_dir_all(&dir)?;

    // A result corrected on the audited report, without touching its header (the items table
    // is watched too): the next version, with the corrected value.
    his.batch_execute(&format!(
        "UPDATE lis.result SET value = '4.9' WHERE report_no = '{r}' AND seq = 1"
    ))
    .await?;
    wait_for(steps(&[
        ("data", 1),
        ("pdf", 1),
        ("revoke", 1),
        ("data", 2),
        ("pdf", 2),
        ("revoke", 2),
        ("data", 3),
        ("pdf", 3),
        ("data", 4),
        ("pdf", 4),
    ]))
    .await?;
    let corrected = sim
        .requests()
        .await?
        .into_iter()
        .rfind(|q| q["path"] == LAB && q["body"]["reportNo"] == r)
        .expect("v4");
    assert_eq!(corrected["body"]["version"], 4);
    assert_eq!(corrected["body"]["items"][0]["resultValue"], "4.9");
    // The two revokes are told apart in the history (for the upload statistics).
    assert_eq!(
        count(
            &his,
            &format!("SELECT count(*) FROM hmr.outbox_history WHERE key = '{r}' AND detail = 'revoke'")
        )
        .await?,
        2
    );
    assert_eq!(
        count(&his, "SELECT revokes FROM hmr.upload_stats() WHERE kind = 'lab_report'").await?,
        2
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn polled_exam_source_equal_times_late_rows_delay_and_unmapped_items() -> Result<()> {
    const EXAM: &str = "/api/v1/exam-reports";
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    load_sample_data(&his).await?;
    // Poll often in this test; a RIS-supplied PDF on one report. Unmapped items go without a
    // code (policy send), and again with it once mapped.
    his.batch_execute("UPDATE hmr.polled_sources SET lookback = '1 hour'; UPDATE hmr.kinds SET unmapped = 'send' WHERE kind = 'exam_report'")
        .await?;
    let sim = Sim::start()?;
    let _worker = Worker::start(&cluster, &sim, &WorkerOptions::default())?;
    let arrived = |no: &'static str| {
        let sim = &sim;
        async move { Ok::<bool, anyhow::Error>(!history_of(sim, EXAM, no).await?.is_empty()) }
    };
    wait_until(Duration::from_secs(20), "the sample CT", || arrived("E20261126001")).await?;

    // Two reports audited at the same instant, one of them with the RIS's own PDF.
    his.batch_execute(
        "INSERT INTO ris.exam_report (exam_no, patient_id, modality, item_code, item_name, findings, conclusion,
                                      reported_at, audited_at, auditor, status, pdf)
         SELECT 'E2', 'P0001', 'CT', 'CT-HEAD', '头颅CT平扫', '脑实质未见异常密度。', '头颅CT未见异常。',
                t, t, 'D001', 'F', convert_to('%PDF-1.4 RIS own pdf', 'UTF8')
           FROM (SELECT now() - interval '5 minutes' AS t) s
         UNION ALL
         SELECT 'E3', 'P0002', 'US', 'US-ABD', '腹部彩超', '肝胆胰脾未见异常。', '未见异常。',
                t, t, 'D001', 'F', NULL
           FROM (SELECT now() - interval '5 minutes' AS t) s;",
    )
    .await?;
    wait_until(Duration::from_secs(20), "both equal-time reports", || async {
        Ok(arrived("E2").await? && arrived("E3").await?)
    })
    .await?;
    // A late row: audited earlier than what was already polled, committed only now.
    his.batch_execute(
        "INSERT INTO ris.exam_report (exam_no, patient_id, modality, item_code, item_name, findings, conclusion,
                                      reported_at, audited_at, auditor, status)
         VALUES ('E4', 'P0003', 'CT', 'CT-CHEST', '胸部CT平扫', '右肺上叶见一小结节。', '右肺上叶小结节，建议随访。',
                 now() - interval '20 minutes', now() - interval '20 minutes', 'D001', 'F')",
    )
    .await?;
    wait_until(Duration::from_secs(20), "the late report", || arrived("E4")).await?;

    // Mapping: CT-HEAD → JC0001; US-ABD is unmapped: uploaded without a dataCode, listed.
    let body_of = |no: &str, requests: &[Value]| {
        requests
            .iter()
            .find(|r| r["path"] == EXAM && r["body"]["reportNo"] == no)
            .map(|r| r["body"].clone())
            .unwrap_or(Value::Null)
    };
    let requests = sim.requests().await?;
    assert_eq!(body_of("E2", &requests)["dataCode"], "JC0001");
    assert!(
        body_of("E3", &requests).get("dataCode").is_none(),
        "no dataCode for an unmapped item"
    );
    let unmapped = his
        .query(
            "SELECT local_code, local_name, reports FROM hmr.unmapped_items WHERE type = 'exam'",
            &[],
        )
        .await?;
    assert_eq!(unmapped.len(), 1);
    assert_eq!(unmapped[0].get::<_, String>(0), "US-ABD");
    assert_eq!(unmapped[0].get::<_, Option<String>>(1).as_deref(), Some("腹部彩超"));

    // The RIS's own PDF went up as it is (not rendered); the other was rendered.
    let state = sim.get("/_sim/state").await?;
    let exams = &state["orgs"][ORG_CODE]["exam_reports"];
    let sha = |no: &str| {
        exams[no]["versions"][0]["pdf_sha256"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let own = {
        use std::process::Command;
        let out = Command::new("sh")
            .args(["-c", "printf '%s' '%PDF-1.4 RIS own pdf' | sha256sum"])
            .output()?;
        String::from_utf8(out.stdout)?
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(sha("E2"), own);
    assert!(!sha("E3").is_empty() && sha("E3") != own);

    // The delay rule: with a 3 s delay a fresh report waits, then goes.
    his.batch_execute(
        "UPDATE hmr.polled_sources SET delay = '3 seconds';
         INSERT INTO ris.exam_report (exam_no, patient_id, modality, item_code, item_name, findings, conclusion,
                                      reported_at, audited_at, auditor, status)
         VALUES ('E5', 'P0001', 'DR', 'DR-CHEST', '胸部正位片', '心肺膈未见异常。', '胸片未见异常。', now(), now(), 'D001', 'F')",
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!arrived("E5").await?, "not before the delay");
    wait_until(Duration::from_secs(20), "the delayed report", || arrived("E5")).await?;

    // Preliminary reports never go; withdrawing a final one (status back to P) revokes it.
    assert!(!arrived("E20261126002").await?);
    his.batch_execute("UPDATE ris.exam_report SET status = 'C' WHERE exam_no = 'E4'")
        .await?;
    wait_until(Duration::from_secs(20), "the withdrawn report revoked", || async {
        Ok(history_of(&sim, EXAM, "E4").await?.iter().any(|(s, _)| s == "revoke"))
    })
    .await?;
    // Every report arrived once, in order (data before its PDF).
    for no in ["E2", "E3", "E4", "E5"] {
        let h = history_of(&sim, EXAM, no).await?;
        assert_eq!(h.iter().filter(|(s, _)| s == "data").count(), 1, "{no}: {h:?}");
        assert_eq!(h[0].0, "data", "{no}: {h:?}");
    }
    wait_until(Duration::from_secs(10), "an empty outbox", || outbox_empty(&his)).await?;

    // The DBA maps US-ABD: the report that went without a code goes again, as its next
    // version, with it; the code is no longer listed as unmapped.
    his.batch_execute("INSERT INTO hmr.item_map (type, local_code, data_code) VALUES ('exam', 'US-ABD', 'JC0003')")
        .await?;
    wait_until(Duration::from_secs(20), "E3 again with its code", || async {
        Ok(history_of(&sim, EXAM, "E3")
            .await?
            .iter()
            .filter(|(s, _)| s == "data")
            .count()
            == 2)
    })
    .await?;
    let again: Vec<Value> = sim
        .requests()
        .await?
        .into_iter()
        .filter(|r| r["path"] == EXAM && r["body"]["reportNo"] == "E3" && r["effect"] == "applied")
        .collect();
    let last = &again.last().expect("E3 sent")["body"];
    assert_eq!(
        (last["dataCode"].as_str(), last["version"].as_u64()),
        (Some("JC0003"), Some(2))
    );
    assert_eq!(
        count(
            &his,
            "SELECT count(*) FROM hmr.unmapped_items WHERE local_code = 'US-ABD'"
        )
        .await?,
        0
    );
    Ok(())
}

/// The default policy: a report whose local item code has no mapping waits for it, visibly
/// (hmr.unmapped_items: held, oldest; the quarantine; hmr.status.held_unmapped), and goes by
/// itself, with the platform code, once the DBA maps the code.
#[tokio::test(flavor = "multi_thread")]
async fn an_unmapped_item_holds_its_report_until_the_code_is_mapped() -> Result<()> {
    const EXAM: &str = "/api/v1/exam-reports";
    let Hospital {
        cluster: _cluster,
        his,
        sim,
        worker: _worker,
    } = Hospital::start(&WorkerOptions::default()).await?;
    his.batch_execute(
        "UPDATE hmr.polled_sources SET lookback = '1 hour';
         INSERT INTO ris.exam_report (exam_no, patient_id, modality, item_code, item_name, findings, conclusion,
                                      reported_at, audited_at, auditor, status)
         VALUES ('E7', 'P0001', 'US', 'US-KIDNEY', '双肾彩超', '双肾大小形态正常。', '双肾未见异常。',
                 now() - interval '5 minutes', now() - interval '5 minutes', 'D001', 'F')",
    )
    .await?;
    wait_until(Duration::from_secs(20), "the report held for its code", || async {
        Ok(count(
            &his,
            "SELECT count(*) FROM hmr.unmapped_items
              WHERE type = 'exam' AND local_code = 'US-KIDNEY' AND local_name = '双肾彩超'
                AND held = 1 AND oldest_held_report = 'E7'",
        )
        .await?
            == 1)
    })
    .await?;
    assert_eq!(
        count(
            &his,
            "SELECT count(*) FROM hmr.quarantine WHERE key = 'E7' AND error_field = 'local_item_code'
                AND error_reason = 'unmapped' AND waits_for_kind = 'item_map' AND waits_for_key = 'exam:US-KIDNEY'"
        )
        .await?,
        1
    );
    assert_eq!(count(&his, "SELECT held_unmapped FROM hmr.status").await?, 1);
    assert!(
        history_of(&sim, EXAM, "E7").await?.is_empty(),
        "not sent without its code"
    );

    his.batch_execute("INSERT INTO hmr.item_map (type, local_code, data_code) VALUES ('exam', 'US-KIDNEY', 'JC0003')")
        .await?;
    wait_until(Duration::from_secs(20), "the report with its code", || async {
        Ok(!history_of(&sim, EXAM, "E7").await?.is_empty())
    })
    .await?;
    let sent: Vec<Value> = sim
        .requests()
        .await?
        .into_iter()
        .filter(|r| r["path"] == EXAM && r["body"]["reportNo"] == "E7" && r["effect"] == "applied")
        .collect();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["body"]["dataCode"], "JC0003");
    assert_eq!(sent[0]["body"]["version"], 1);
    assert_eq!(count(&his, "SELECT count(*) FROM hmr.unmapped_items").await?, 0);
    assert_eq!(count(&his, "SELECT count(*) FROM hmr.quarantine").await?, 0);
    assert_eq!(count(&his, "SELECT held_unmapped FROM hmr.status").await?, 0);
    Ok(())
}

/// The exam system in another database, read through postgres_fdw: the source view is over a
/// foreign table, and the polled source picks its reports up like a local one.
#[tokio::test(flavor = "multi_thread")]
async fn exam_reports_polled_from_a_foreign_table() -> Result<()> {
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    load_sample_data(&his).await?;
    let admin = cluster.connect("postgres").await?;
    admin.batch_execute("CREATE DATABASE ris_vendor").await?;
    let vendor = cluster.connect("ris_vendor").await?;
    vendor
        .batch_execute(
            "CREATE TABLE exam (exam_no text PRIMARY KEY, patient_id text, modality text, item_code text, item_name text,
                                findings text, conclusion text, reported_at timestamptz, audited_at timestamptz,
                                auditor text, status text);",
        )
        .await?;
    his.batch_execute(&format!(
        "CREATE EXTENSION postgres_fdw;
         CREATE SERVER ris FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '{}', port '{}', dbname 'ris_vendor');
         CREATE USER MAPPING FOR CURRENT_USER SERVER ris OPTIONS (user 'postgres');
         CREATE SCHEMA ris_remote;
         IMPORT FOREIGN SCHEMA public LIMIT TO (exam) FROM SERVER ris INTO ris_remote;
         DROP VIEW hmr_src.exam_report;
         CREATE VIEW hmr_src.exam_report AS
         SELECT e.exam_no AS report_no, e.patient_id, p.id_type, p.id_no, p.name AS patient_name,
                e.modality AS exam_class, e.item_code AS local_item_code, e.item_name AS local_item_name,
                e.item_name AS exam_item_name, e.findings, e.conclusion AS impression, e.reported_at,
                e.audited_at, e.auditor AS auditor_no
           FROM ris_remote.exam e JOIN his.patient p USING (patient_id)
          WHERE e.status = 'F';",
        cluster.dir.display(),
        cluster.port
    ))
    .await?;
    assert_eq!(
        count(&his, "SELECT count(*) FROM hmr.check_sources('exam_report')").await?,
        0,
        "the foreign source checks clean"
    );
    let sim = Sim::start()?;
    let _worker = Worker::start(&cluster, &sim, &WorkerOptions::default())?;
    vendor
        .batch_execute(
            "INSERT INTO exam VALUES ('R1', 'P0001', 'CT', 'CT-HEAD', '头颅CT平扫', '脑实质未见异常。', '未见异常。',
                                      now() - interval '10 minutes', now() - interval '5 minutes', 'D001', 'F'),
                                     ('R2', 'P0002', 'CT', 'CT-HEAD', '头颅CT平扫', '脑实质未见异常。', '未见异常。',
                                      now(), now(), 'D001', 'P');",
        )
        .await?;
    wait_until(Duration::from_secs(20), "the foreign report", || async {
        Ok(!history_of(&sim, "/api/v1/exam-reports", "R1").await?.is_empty())
    })
    .await?;
    let body = sim
        .requests()
        .await?
        .into_iter()
        .find(|r| r["path"] == "/api/v1/exam-reports" && r["body"]["reportNo"] == "R1")
        .map(|r| r["body"].clone())
        .unwrap_or(Value::Null);
    assert_eq!(body["dataCode"], "JC0001", "mapped through hmr.item_map");
    assert!(
        history_of(&sim, "/api/v1/exam-reports", "R2").await?.is_empty(),
        "a preliminary report stays"
    );
    Ok(())
}

/// Three exam systems feed one kind, each as its own named polled source with its own view,
/// time column, delay and watermark: the RIS (local), an ultrasound system (local, its report
/// numbers prefixed so they cannot collide) and an endoscopy system in another database read
/// through postgres_fdw. The kind's view is their union, where the worker reads each report.
/// A report that leaves one system is revoked; the other systems' reports are not touched.
#[tokio::test(flavor = "multi_thread")]
async fn three_exam_systems_each_polled_by_its_own_source() -> Result<()> {
    const EXAM: &str = "/api/v1/exam-reports";
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    load_sample_data(&his).await?;
    let admin = cluster.connect("postgres").await?;
    admin.batch_execute("CREATE DATABASE endo_vendor").await?;
    let endo = cluster.connect("endo_vendor").await?;
    endo.batch_execute(
        "CREATE TABLE endo (id text PRIMARY KEY, patient text, item text, item_name text, findings text,
                            diagnosis text, report_time timestamptz, check_time timestamptz, doctor text);",
    )
    .await?;
    let columns = "report_no, patient_id, id_type, id_no, patient_name, exam_class, exam_item_name, local_item_code, \
                   local_item_name, findings, impression, reported_at, audited_at, auditor_no";
    his.batch_execute(&format!(
        "CREATE EXTENSION postgres_fdw;
         CREATE SERVER endo FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '{dir}', port '{port}', dbname 'endo_vendor');
         CREATE USER MAPPING FOR CURRENT_USER SERVER endo OPTIONS (user 'postgres');
         CREATE SCHEMA endo_remote;
         IMPORT FOREIGN SCHEMA public LIMIT TO (endo) FROM SERVER endo INTO endo_remote;
         CREATE SCHEMA us;
         CREATE TABLE us.report (no text PRIMARY KEY, pid text, item text, item_name text, seen text, conclusion text,
                                 signed_at timestamptz, signer text);

         ALTER VIEW hmr_src.exam_report RENAME TO exam_ris;
         CREATE VIEW hmr_src.exam_us AS
         SELECT 'US-' || r.no AS report_no, r.pid AS patient_id, p.id_type, upper(trim(p.id_no)) AS id_no,
                p.name AS patient_name, 'US' AS exam_class, r.item_name AS exam_item_name, r.item AS local_item_code,
                r.item_name AS local_item_name, r.seen AS findings, r.conclusion AS impression,
                r.signed_at AS reported_at, r.signed_at AS audited_at, r.signer AS auditor_no
           FROM us.report r JOIN his.patient p ON p.patient_id = r.pid;
         CREATE VIEW hmr_src.exam_endo AS
         SELECT 'EN-' || e.id AS report_no, e.patient AS patient_id, p.id_type, upper(trim(p.id_no)) AS id_no,
                p.name AS patient_name, 'ES' AS exam_class, e.item_name AS exam_item_name, e.item AS local_item_code,
                e.item_name AS local_item_name, e.findings, e.diagnosis AS impression,
                e.report_time AS reported_at, e.check_time AS audited_at, e.check_time AS verified_at, e.doctor AS auditor_no
           FROM endo_remote.endo e JOIN his.patient p ON p.patient_id = e.patient;
         CREATE VIEW hmr_src.exam_report AS
         SELECT {columns} FROM hmr_src.exam_ris
         UNION ALL SELECT {columns} FROM hmr_src.exam_us
         UNION ALL SELECT {columns} FROM hmr_src.exam_endo;

         UPDATE hmr.polled_sources SET name = 'ris', source_view = 'hmr_src.exam_ris', lookback = '1 hour'
          WHERE kind = 'exam_report';
         INSERT INTO hmr.polled_sources (name, kind, source_view, time_column, delay, lookback) VALUES
            ('ultrasound', 'exam_report', 'hmr_src.exam_us', 'audited_at', '0', '1 hour'),
            ('endoscopy', 'exam_report', 'hmr_src.exam_endo', 'verified_at', '1 hour', '1 day');
         INSERT INTO hmr.item_map (type, local_code, data_code) VALUES
            ('exam', 'US-ABD', 'JC0003'), ('exam', 'ES-GAS', 'JC0003');",
        dir = cluster.dir.display(),
        port = cluster.port
    ))
    .await?;
    assert_eq!(
        count(&his, "SELECT count(*) FROM hmr.check_sources('exam_report')").await?,
        0,
        "the union checks clean"
    );
    let sim = Sim::start()?;
    let worker = Worker::start(&cluster, &sim, &WorkerOptions::default().with_metrics()?)?;
    // One report per system; the endoscopy one audited two hours ago (its source waits an hour).
    endo.batch_execute(
        "INSERT INTO endo VALUES ('1', 'P0002', 'ES-GAS', '胃镜检查', '胃黏膜光滑。', '慢性浅表性胃炎。',
                                  now() - interval '2 hours', now() - interval '2 hours', 'D001'),
                                 ('2', 'P0003', 'ES-GAS', '胃镜检查', '胃黏膜光滑。', '未见异常。',
                                  now() - interval '1 minute', now() - interval '1 minute', 'D001');",
    )
    .await?;
    his.batch_execute(
        "INSERT INTO us.report VALUES ('1', 'P0001', 'US-ABD', '腹部彩超', '肝胆胰脾未见异常。', '未见异常。',
                                       now() - interval '1 minute', 'D001');
         INSERT INTO ris.exam_report (exam_no, patient_id, modality, item_code, item_name, findings, conclusion,
                                      reported_at, audited_at, auditor, status)
         VALUES ('E8', 'P0003', 'CT', 'CT-HEAD', '头颅CT平扫', '脑实质未见异常密度。', '头颅CT未见异常。',
                 now() - interval '1 minute', now() - interval '1 minute', 'D001', 'F');",
    )
    .await?;
    let arrived = |no: &'static str| {
        let sim = &sim;
        async move { Ok::<bool, anyhow::Error>(!history_of(sim, EXAM, no).await?.is_empty()) }
    };
    wait_until(Duration::from_secs(30), "a report from each system", || async {
        Ok(arrived("E8").await? && arrived("US-1").await? && arrived("EN-1").await?)
    })
    .await?;
    // Each source keeps its own watermark; the endoscopy report audited a minute ago waits
    // for its source's delay although the same poll found the others.
    let watermarks = his
        .query(
            "SELECT name, watermark IS NOT NULL, polled_at IS NOT NULL FROM hmr.polled_sources ORDER BY name",
            &[],
        )
        .await?;
    let w: Vec<(String, bool, bool)> = watermarks.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        w,
        [
            ("endoscopy".to_string(), true, true),
            ("ris".to_string(), true, true),
            ("ultrasound".to_string(), true, true)
        ]
    );
    assert!(!arrived("EN-2").await?, "the endoscopy source's delay");
    // A disabled source is not polled.
    his.batch_execute(
        "UPDATE hmr.polled_sources SET enabled = false WHERE name = 'ultrasound';
         INSERT INTO us.report VALUES ('2', 'P0002', 'US-ABD', '腹部彩超', '未见异常。', '未见异常。', now(), 'D001');
         INSERT INTO ris.exam_report (exam_no, patient_id, modality, item_code, item_name, findings, conclusion,
                                      reported_at, audited_at, auditor, status)
         VALUES ('E9', 'P0001', 'CT', 'CT-HEAD', '头颅CT平扫', '未见异常。', '未见异常。', now(), now(), 'D001', 'F');",
    )
    .await?;
    let disabled_at = db_clock(&his).await?;
    wait_until(Duration::from_secs(20), "the RIS report after the change", || {
        arrived("E9")
    })
    .await?;
    // The enabled sources polled after the change, and a whole turn of the worker to deliver
    // what that poll found: the disabled source's report would be there by now.
    wait_sources_polled_since(&his, disabled_at).await?;
    worker.wait_rounds(2).await?;
    assert!(!arrived("US-2").await?, "the disabled source was not polled");
    his.batch_execute("UPDATE hmr.polled_sources SET enabled = true WHERE name = 'ultrasound'")
        .await?;
    wait_until(Duration::from_secs(20), "the ultrasound report once enabled", || {
        arrived("US-2")
    })
    .await?;

    // Withdrawn in the ultrasound system: revoked; no other system's report is.
    his.batch_execute("DELETE FROM us.report WHERE no = '1'").await?;
    let withdrawn_at = db_clock(&his).await?;
    wait_until(Duration::from_secs(20), "US-1 revoked", || async {
        Ok(history_of(&sim, EXAM, "US-1").await?.iter().any(|(s, _)| s == "revoke"))
    })
    .await?;
    // Every source polled after the withdrawal, and a whole turn of the worker to deliver
    // what that poll found: a wrong revoke would be at the platform by now.
    wait_sources_polled_since(&his, withdrawn_at).await?;
    worker.wait_rounds(2).await?;
    for no in ["E8", "E9", "EN-1", "US-2"] {
        assert!(
            !history_of(&sim, EXAM, no).await?.iter().any(|(s, _)| s == "revoke"),
            "{no} was not revoked"
        );
    }
    Ok(())
}
