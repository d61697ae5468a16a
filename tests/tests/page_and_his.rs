//! Issue #28 §1: one check, decisions on both sides (contract §6). A doctor may decide an
//! order on the platform's page (the check's `url`) and another in the HIS, or both for one
//! order. Whatever the mix, every decision ends up on the platform exactly once, a HIS decision
//! that differs from the page's is refused at once (HM017, in Chinese, naming the page's
//! choice), and no save stays blocked. Every HIS step goes through PgBouncer in transaction
//! pooling mode, as a HIS application server's would.

use std::time::Duration;

use anyhow::{Context, Result};
use hmr_e2e::*;
use hmr_protocol::answers::{DecisionResult, OrderCheckResult, PromptDetail};
use serde_json::{json, Value};
use tokio_postgres::types::Type;
use tokio_postgres::Client;

const P0001_ID: &str = "441302198003151233"; // 陈志明 (outpatient MZ001)

/// 陈志明 has a recognisable 血常规 (JY0001) and 肝功能 (JY0004) elsewhere; the HIS logs in as
/// `his_app` through a pool of 2 server connections.
struct Ward {
    w: Workstations,
    bouncer: Bouncer,
    /// Pages opened (the `url` is a one-time ticket: opened once, then its form posts).
    opened: std::sync::Mutex<std::collections::HashMap<String, PlatformPage>>,
}

impl Ward {
    async fn open() -> Result<Ward> {
        let w = Workstations::start(
            &[
                (P0001_ID, "1980-03-15", "W-CBC-1", "JY0001", 1),
                (P0001_ID, "1980-03-15", "W-LFT-1", "JY0004", 1),
            ],
            &WorkerOptions::default().with_metrics()?,
        )
        .await?;
        w.his
            .batch_execute(
                "CREATE ROLE his_app LOGIN IN ROLE hmr_his; GRANT USAGE ON SCHEMA his TO his_app;
                 GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA his TO his_app;",
            )
            .await?;
        let bouncer = Bouncer::start(&w.cluster, 2, &["postgres", "his_app"]).await?;
        Ok(Ward {
            w,
            bouncer,
            opened: Default::default(),
        })
    }

    async fn his(&self) -> Result<Client> {
        self.bouncer.connect("his", "his_app").await
    }

    /// Saves orders `a` (血常规) and `b` (肝功能) in one statement: the result of
    /// `his.save_orders`.
    async fn save(&self, a: &str, b: &str) -> Result<Value> {
        let lines = json!([
            {"order_id": a, "patient_id": "P0001", "visit_type": "1", "visit_no": "MZ001", "doctor_no": "D001",
             "dept_code": "0301", "item_type": "lab", "item_code": "JY0001", "item_name": "血常规"},
            {"order_id": b, "patient_id": "P0001", "visit_type": "1", "visit_no": "MZ001", "doctor_no": "D001",
             "dept_code": "0301", "item_type": "lab", "item_code": "JY0004", "item_name": "肝功能"}
        ]);
        let his = self.his().await?;
        let row = one(&his, "SELECT his.save_orders($1)", &[(&lines, Type::JSONB)]).await?;
        Ok(row.get(0))
    }

    /// The first save: refused, with the check and its two matched orders.
    async fn prompted(&self, a: &str, b: &str) -> Result<PromptDetail> {
        let saved = self.save(a, b).await?;
        anyhow::ensure!(saved["saved"] == false, "the first save is refused: {saved}");
        let detail: PromptDetail = serde_json::from_value(saved["decide"].clone()).context("HM001's detail")?;
        anyhow::ensure!(detail.matches.len() == 2, "two matched orders: {detail:?}");
        Ok(detail)
    }

    /// The doctor decides `order` on the platform's page.
    async fn on_page(&self, p: &PromptDetail, order: &str, recognise: bool) -> Result<()> {
        let url = p.url.clone().context("the check's page")?;
        let opened = self.opened.lock().unwrap().get(&url).cloned();
        let page = match opened {
            Some(page) => page,
            None => {
                // The doctor opens the page once (the one-time ticket) and decides there.
                let (page, _) = PlatformPage::open(&url).await?;
                self.opened.lock().unwrap().insert(url.clone(), page.clone());
                page
            }
        };
        let (status, done) = page.decide(order, (!recognise).then_some("02")).await?;
        anyhow::ensure!(status == 200, "{status} {done}");
        anyhow::ensure!(done.contains(order) || done.contains("互认选择已完成"), "{done}");
        Ok(())
    }

    /// The HIS records the doctor's choice (`reason`: 不互认 with that code).
    async fn in_his(&self, check: &str, order: &str, reason: Option<&str>) -> Result<DecisionResult> {
        let his = self.his().await?;
        let recognise = reason.is_none();
        let row = one(
            &his,
            "SELECT hmr_record_decision($1, $2, $3, $4)",
            &[
                (&check, Type::TEXT),
                (&order, Type::TEXT),
                (&recognise, Type::BOOL),
                (&reason, Type::TEXT),
            ],
        )
        .await?;
        Ok(serde_json::from_value(row.get(0))?)
    }

    /// The decisions uploads the platform received for `check`, by effect.
    async fn uploads(&self, check: &str) -> Result<Vec<Value>> {
        Ok(self
            .w
            .sim
            .requests()
            .await?
            .into_iter()
            .filter(|r| r["path"] == "/api/v1/recognitions/decisions" && r["body"]["checkId"] == check)
            .collect())
    }

    /// What the platform holds for `check` (§6), as our hospital reads it.
    async fn held(&self, check: &str) -> Result<Value> {
        let his = self.his().await?;
        Ok(one(&his, "SELECT hmr_page_decisions($1)", &[(&check, Type::TEXT)])
            .await?
            .get(0))
    }

    /// Waits until the platform holds every decision of `check`, then a whole round more.
    async fn settled(&self, check: &str) -> Result<Value> {
        wait_until(
            Duration::from_secs(30),
            "the check complete on the platform",
            || async { Ok(self.held(check).await?["complete"] == true) },
        )
        .await?;
        wait_until(Duration::from_secs(30), "the outbox empty", || async {
            outbox_empty(&self.w.his).await
        })
        .await?;
        self.w.worker.wait_rounds(2).await?;
        self.held(check).await
    }
}

/// One row of `sql` through the pool, in one round trip with an unnamed statement: in
/// transaction pooling a named statement prepared on one server connection may be executed on
/// another ("prepared statement does not exist").
async fn one(
    his: &Client,
    sql: &str,
    params: &[(&(dyn tokio_postgres::types::ToSql + Sync), Type)],
) -> std::result::Result<tokio_postgres::Row, tokio_postgres::Error> {
    let rows = his.query_typed(sql, params).await?;
    Ok(rows.into_iter().next().expect("one row"))
}

/// The platform's choice for `order` in a §6 answer: (recognise, reason_code, source).
fn choice(held: &Value, order: &str) -> (bool, Option<String>, String) {
    let d = held["decisions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["order_id"] == order)
        .cloned()
        .unwrap_or(Value::Null);
    (
        d["recognise"].as_bool().unwrap_or_default(),
        d["reason_code"].as_str().map(str::to_string),
        d["source"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn page_only_uploads_nothing_and_the_save_passes() -> Result<()> {
    let ward = Ward::open().await?;
    let p = ward.prompted("A1", "B1").await?;
    ward.on_page(&p, "A1", true).await?;
    ward.on_page(&p, "B1", false).await?;
    assert_eq!(ward.save("A1", "B1").await?["saved"], true);
    let held = ward.settled(&p.check_id).await?;
    assert_eq!(choice(&held, "A1"), (true, None, "page".into()));
    assert_eq!(choice(&held, "B1"), (false, Some("02".into()), "page".into()));
    assert!(
        ward.uploads(&p.check_id).await?.is_empty(),
        "decided on the page: nothing to upload"
    );
    // The report recognised on the page is kept, pdf and json, with its check, as after an upload.
    let kept = format!(
        "SELECT count(*) FROM hmr.retained_reports WHERE check_id = '{}' AND format IN ('pdf', 'json')",
        p.check_id
    );
    wait_until(Duration::from_secs(30), "the page's recognised report kept", || async {
        Ok(count(&ward.w.his, &kept).await? == 2)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn his_only_uploads_once() -> Result<()> {
    let ward = Ward::open().await?;
    let p = ward.prompted("A2", "B2").await?;
    assert!(!ward.in_his(&p.check_id, "A2", None).await?.complete);
    assert!(ward.in_his(&p.check_id, "B2", Some("01")).await?.complete);
    assert_eq!(ward.save("A2", "B2").await?["saved"], true);
    let held = ward.settled(&p.check_id).await?;
    assert_eq!(choice(&held, "A2"), (true, None, "upload".into()));
    assert_eq!(choice(&held, "B2"), (false, Some("01".into()), "upload".into()));
    let uploads = ward.uploads(&p.check_id).await?;
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    assert_eq!(uploads[0]["effect"], "applied");
    Ok(())
}

/// The page decides one order, the HIS the other: the HIS's is uploaded, with the page's.
#[tokio::test(flavor = "multi_thread")]
async fn page_and_his_disjoint_both_reach_the_platform_once() -> Result<()> {
    let ward = Ward::open().await?;
    let p = ward.prompted("A3", "B3").await?;
    ward.on_page(&p, "A3", true).await?;
    let recorded = ward.in_his(&p.check_id, "B3", Some("01")).await?;
    assert!(recorded.complete, "the page's decision counts: {recorded:?}");
    assert_eq!(ward.save("A3", "B3").await?["saved"], true);
    let held = ward.settled(&p.check_id).await?;
    assert_eq!(choice(&held, "A3"), (true, None, "page".into()));
    assert_eq!(choice(&held, "B3"), (false, Some("01".into()), "upload".into()));
    let uploads = ward.uploads(&p.check_id).await?;
    assert_eq!(uploads.len(), 1, "one upload: {uploads:?}");
    assert_eq!(uploads[0]["effect"], "applied", "{uploads:?}");
    Ok(())
}

/// The HIS records the same choice the page took: accepted as already taken, nothing refused.
#[tokio::test(flavor = "multi_thread")]
async fn page_and_his_equal_is_accepted_and_uploaded_once() -> Result<()> {
    let ward = Ward::open().await?;
    let p = ward.prompted("A4", "B4").await?;
    ward.on_page(&p, "A4", true).await?;
    let same = ward.in_his(&p.check_id, "A4", None).await?;
    assert_eq!(same.already_sent, Some(true), "{same:?}");
    assert!(ward.in_his(&p.check_id, "B4", None).await?.complete);
    assert_eq!(ward.save("A4", "B4").await?["saved"], true);
    let held = ward.settled(&p.check_id).await?;
    assert_eq!(choice(&held, "A4"), (true, None, "page".into()));
    assert_eq!(choice(&held, "B4"), (true, None, "upload".into()));
    let uploads = ward.uploads(&p.check_id).await?;
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    assert_eq!(uploads[0]["effect"], "applied");
    Ok(())
}

/// The HIS tries another choice than the page's: refused at once with HM017, in Chinese, naming
/// the page's choice; never uploaded; the rest goes on and the save passes.
#[tokio::test(flavor = "multi_thread")]
async fn a_his_decision_differing_from_the_page_is_refused_at_once() -> Result<()> {
    let ward = Ward::open().await?;
    let p = ward.prompted("A5", "B5").await?;
    ward.on_page(&p, "A5", true).await?;
    let his = ward.his().await?;
    let err = his
        .query_typed(
            "SELECT hmr_record_decision($1, 'A5', false, '02')",
            &[(&p.check_id, Type::TEXT)],
        )
        .await
        .expect_err("a different choice than the page's");
    let db = err.as_db_error().context("a database error")?;
    assert_eq!(db.code().code(), "HM017");
    assert!(
        db.message().contains("互认平台页面") && db.message().contains("“互认”"),
        "{}",
        db.message()
    );
    assert!(db.hint().unwrap_or_default().contains("互认平台页面"), "a Chinese hint");
    assert!(ward.in_his(&p.check_id, "B5", None).await?.complete);
    assert_eq!(ward.save("A5", "B5").await?["saved"], true);
    let held = ward.settled(&p.check_id).await?;
    assert_eq!(
        choice(&held, "A5"),
        (true, None, "page".into()),
        "the page's choice stands"
    );
    let uploads = ward.uploads(&p.check_id).await?;
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    assert_eq!(uploads[0]["effect"], "applied", "no 409: {uploads:?}");
    let order: Value = one(&ward.his().await?, "SELECT hmr_order_recognition('A5')", &[])
        .await?
        .get(0);
    assert_eq!(order["decision"], "recognised", "{order}");
    Ok(())
}

/// The HIS decided an order before the page did otherwise (nobody told the HIS): the worker
/// reads the check before it uploads, adopts the page's choice, and the upload is accepted.
#[tokio::test(flavor = "multi_thread")]
async fn a_page_decision_taken_after_the_his_one_wins_without_a_409() -> Result<()> {
    let ward = Ward::open().await?;
    let p = ward.prompted("A6", "B6").await?;
    // Nothing is queued until the check is complete: the HIS's A6 waits here.
    ward.in_his(&p.check_id, "A6", Some("02")).await?;
    ward.on_page(&p, "A6", true).await?;
    assert!(ward.in_his(&p.check_id, "B6", None).await?.complete);
    assert_eq!(ward.save("A6", "B6").await?["saved"], true);
    let held = ward.settled(&p.check_id).await?;
    assert_eq!(choice(&held, "A6"), (true, None, "page".into()));
    let uploads = ward.uploads(&p.check_id).await?;
    assert!(
        uploads.iter().all(|u| u["status"] != 409),
        "the upload carried the page's choice: {uploads:?}"
    );
    assert_eq!(
        uploads.iter().filter(|u| u["effect"] == "applied").count(),
        1,
        "{uploads:?}"
    );
    assert_eq!(count(&ward.w.his, "SELECT count(*) FROM hmr.quarantine").await?, 0);
    Ok(())
}

/// The page decides otherwise after the HIS's upload was planned and while the platform could
/// not take it: the planned upload is refused (409 already-decided); the worker adopts the
/// page's choice and uploads again. The save is never blocked, nothing is quarantined.
#[tokio::test(flavor = "multi_thread")]
async fn a_409_already_decided_is_planned_again_never_a_blocked_save() -> Result<()> {
    let ward = Ward::open().await?;
    let p = ward.prompted("A7", "B7").await?;
    ward.w
        .sim
        .faults(json!({"status": 503, "path_prefix": "/api/v1/recognitions/decisions"}))
        .await?;
    ward.in_his(&p.check_id, "A7", None).await?;
    assert!(ward.in_his(&p.check_id, "B7", None).await?.complete);
    wait_until(
        Duration::from_secs(30),
        "the upload planned and refused by the outage",
        || async { Ok(ward.uploads(&p.check_id).await?.iter().any(|u| u["status"] == 503)) },
    )
    .await?;
    ward.on_page(&p, "B7", false).await?;
    ward.w.sim.clear_faults().await?;
    let held = ward.settled(&p.check_id).await?;
    assert_eq!(choice(&held, "B7"), (false, Some("02".into()), "page".into()));
    assert_eq!(choice(&held, "A7"), (true, None, "upload".into()));
    let uploads = ward.uploads(&p.check_id).await?;
    assert!(
        uploads.iter().any(|u| u["status"] == 409),
        "the planned upload met the page's choice: {uploads:?}"
    );
    assert_eq!(
        uploads.iter().filter(|u| u["effect"] == "applied").count(),
        1,
        "{uploads:?}"
    );
    assert_eq!(ward.save("A7", "B7").await?["saved"], true, "never a blocked save");
    let order: Value = one(&ward.his().await?, "SELECT hmr_order_recognition('B7')", &[])
        .await?
        .get(0);
    assert_eq!(order["decision"], "declined", "{order}");
    assert_eq!(count(&ward.w.his, "SELECT count(*) FROM hmr.quarantine").await?, 0);
    Ok(())
}

/// Issue #28 §5: what a doctor reads — message and hint of the gate's and the decision's
/// refusals — is Chinese (the hint may name the SQL function to call).
#[tokio::test(flavor = "multi_thread")]
async fn doctor_facing_messages_and_hints_are_chinese() -> Result<()> {
    let ward = Ward::open().await?;
    let his = ward.his().await?;
    let cjk = |s: &str| s.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c));
    let english = |s: &str| {
        [
            " the ",
            "Record ",
            "Save ",
            "comes from",
            "required",
            "Re-order",
            "Connect ",
        ]
        .iter()
        .any(|w| s.contains(w))
    };
    let mut seen = vec![];
    let hm001 = his
        .batch_execute(
            "INSERT INTO his.orders (order_id, patient_id, visit_type, visit_no, doctor_no, dept_code, item_type,
                                     item_code, item_name)
             VALUES ('H1', 'P0001', '1', 'MZ001', 'D001', '0301', 'lab', 'JY0001', '血常规')",
        )
        .await
        .expect_err("HM001");
    seen.push(hm001);
    let p = ward.prompted("H2", "H3").await?;
    seen.push(
        his.query_typed("SELECT hmr_record_decision('no-such-check', 'H2', true)", &[])
            .await
            .expect_err("HM003"),
    );
    seen.push(
        his.query_typed(
            "SELECT hmr_record_decision($1, 'H2', false)",
            &[(&p.check_id, Type::TEXT)],
        )
        .await
        .expect_err("HM004"),
    );
    let codes: Vec<&str> = seen
        .iter()
        .map(|e| e.as_db_error().map_or("?", |d| d.code().code()))
        .collect();
    assert_eq!(codes, ["HM001", "HM003", "HM004"]);
    for e in &seen {
        let d = e.as_db_error().context("a database error")?;
        let hint = d.hint().unwrap_or_default();
        assert!(
            cjk(d.message()) && cjk(hint),
            "{}: {} / {hint}",
            d.code().code(),
            d.message()
        );
        assert!(!english(hint), "{}: an English hint: {hint}", d.code().code());
    }
    Ok(())
}

/// Issue #28 §2: a duplicate at ordering yields a check whose page takes the decision; the
/// decision taken there, or recorded in the HIS for that check, satisfies the gate at save
/// without a second prompt (the 门诊 example's `his.check_item`, through PgBouncer).
#[tokio::test(flavor = "multi_thread")]
async fn ordering_yields_a_check_whose_decisions_satisfy_the_save() -> Result<()> {
    let ward = Ward::open().await?;
    let order_check = |order: &'static str, item: &'static str| {
        let ward = &ward;
        async move {
            let his = ward.his().await?;
            let v: Value = one(
                &his,
                "SELECT his.check_item('P0001', '1', 'MZ001', 'D001', '0301', $1, 'lab', $2)",
                &[(&order, Type::TEXT), (&item, Type::TEXT)],
            )
            .await?
            .get(0);
            let c: OrderCheckResult = serde_json::from_value(v.clone()).context("hmr_check_order's answer")?;
            anyhow::ensure!(c.duplicate && c.check_id.is_some() && c.url.is_some(), "{v}");
            Ok::<_, anyhow::Error>(PromptDetail {
                check_id: c.check_id.unwrap_or_default(),
                url: c.url,
                matches: c.matches,
            })
        }
    };
    let save_one = |order: &'static str, item: &'static str| {
        let ward = &ward;
        async move {
            let lines = json!([{"order_id": order, "patient_id": "P0001", "visit_type": "1", "visit_no": "MZ001",
                                "doctor_no": "D001", "dept_code": "0301", "item_type": "lab", "item_code": item}]);
            let his = ward.his().await?;
            let saved: Value = one(&his, "SELECT his.save_orders($1)", &[(&lines, Type::JSONB)])
                .await?
                .get(0);
            Ok::<_, anyhow::Error>(saved)
        }
    };
    // Decided in the HIS against the ordering's check.
    let c = order_check("C1", "JY0001").await?;
    assert!(ward.in_his(&c.check_id, "C1", None).await?.complete);
    let saved = save_one("C1", "JY0001").await?;
    assert_eq!(saved["saved"], true, "no second prompt: {saved}");
    // Decided on the ordering check's page.
    let c = order_check("C2", "JY0004").await?;
    ward.on_page(&c, "C2", false).await?;
    let saved = save_one("C2", "JY0004").await?;
    assert_eq!(saved["saved"], true, "the page's decision counts at save: {saved}");
    let state: Value = one(&ward.his().await?, "SELECT hmr_order_recognition('C2')", &[])
        .await?
        .get(0);
    assert_eq!(state["decision"], "declined", "{state}");
    Ok(())
}
