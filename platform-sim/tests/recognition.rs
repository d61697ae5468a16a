//! Section 6: list, precise query, prescription check, decisions, download, pages.

mod common;

use axum::body::Body;
use axum::http;
use common::*;
use hmr_protocol::paths;
use hmr_protocol::*;

/// hz2 holds several reports of one person; hz1 (the asking hospital) has the patient too.
async fn scene(h: &Harness) -> Patient {
    let idno = id_no("19900307", "123");
    let p1 = patient("P1", &idno);
    let p2 = patient("Q7", &idno);
    h.setup_patient(&h.hz1, &p1).await;
    h.setup_patient(&h.hz2, &p2).await;
    let send = |r: paths::Request| async move {
        let a = h.send(&h.hz2, &r).await;
        assert_eq!(a.status, 200, "{:?}", a.json);
    };
    // Recognisable: a recent 血常规 (two versions) and a chest CT with a PDF.
    send(paths::lab_report(&lab("L1", 1, &p2, Some("JY0001"), ago(2, 0)))).await;
    let mut l1v2 = lab("L1", 2, &p2, Some("JY0001"), ago(2, 0));
    l1v2.items[0].result_value = "6.6".into();
    send(paths::lab_report(&l1v2)).await;
    send(paths::exam_report(&exam("E1", 1, &p2, Some("JC0002"), ago(1, 0)))).await;
    send(paths::pdf(ReportType::Exam, "E1", 1, pdf_bytes("ct"))).await;
    // Not recognisable: expired (血常规 lasts 7 days), revoked, no dataCode, another person.
    send(paths::lab_report(&lab("L2", 1, &p2, Some("JY0001"), ago(8, 0)))).await;
    send(paths::lab_report(&lab("L3", 1, &p2, Some("JY0004"), ago(1, 0)))).await;
    let rv = Revoke {
        version: 1,
        reason: "取消审核".into(),
        revoked_at: ago(0, 1),
        operator_no: "D".into(),
    };
    send(paths::revoke(ReportType::Lab, "L3", &rv)).await;
    send(paths::lab_report(&lab("L4", 1, &p2, None, ago(1, 0)))).await;
    let other = patient("Q8", &id_no("19851111", "456"));
    h.setup_patient(&h.hz2, &other).await;
    send(paths::lab_report(&lab("L5", 1, &other, Some("JY0005"), ago(1, 0)))).await;
    p1
}

/// The cookie a page's first visit sets (`name=value`), scoped to the page's path.
fn page_cookie(page: &Resp) -> String {
    let set = page.headers["set-cookie"].to_str().unwrap();
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
    set.split(';').next().unwrap().to_string()
}

fn list_query(p: &Patient, kind: &str) -> ListQuery {
    ListQuery {
        id_type: p.id_type.clone(),
        id_no: p.id_no.to_lowercase(),
        visit_no: "MZ001".into(),
        doctor_no: "D100".into(),
        dept_code: "D1".into(),
        kind: kind.into(),
    }
}

#[tokio::test]
async fn list_and_one_time_page() {
    let h = Harness::new();
    let p = scene(&h).await;
    let r = h.send(&h.hz1, &paths::list_recognitions(&list_query(&p, "all"))).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    let answer: ListAnswer = serde_json::from_value(r.data().clone()).unwrap();
    assert_eq!(answer.count, 2);
    let ids: Vec<_> = answer.items.iter().map(|i| i.report_id.as_str()).collect();
    // Newest reportedAt first; only the newest version of L1.
    assert_eq!(
        ids,
        vec![format!("{}:exam:E1:1", h.hz2.code), format!("{}:lab:L1:2", h.hz2.code)]
    );
    assert_eq!(answer.items[1].item_name, "血常规");
    assert_eq!(answer.items[1].org_name, "惠州市中心人民医院");
    assert!(answer.url.starts_with("http://sim.test/page/"));

    let path = answer.url.trim_start_matches("http://sim.test");
    let page = h.raw(http::Request::get(path).body(Body::empty()).unwrap()).await;
    assert_eq!(page.status, 200);
    assert!(String::from_utf8_lossy(&page.body).contains("胸部CT平扫"));
    // A one-time link: the same URL elsewhere (no cookie) is gone; in the browser that opened
    // it, it reloads.
    let again = h.raw(http::Request::get(path).body(Body::empty()).unwrap()).await;
    assert_eq!(again.status, 410);
    assert!(String::from_utf8_lossy(&again.body).contains("一次性链接"));
    let cookie = page_cookie(&page);
    let reload = h
        .raw(
            http::Request::get(path)
                .header("Cookie", &cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(reload.status, 200);
    assert!(String::from_utf8_lossy(&reload.body).contains("胸部CT平扫"));

    let r = h.send(&h.hz1, &paths::list_recognitions(&list_query(&p, "lab"))).await;
    assert_eq!(r.data()["count"], 1);
    let r = h
        .send(&h.hz1, &paths::list_recognitions(&list_query(&p, "blood")))
        .await;
    assert_eq!(r.errors(), vec![("type".into(), "code".into())]);
    // All six parameters: a missing one is required, an extra one unknown.
    let mut req = paths::list_recognitions(&list_query(&p, "all"));
    req.path = req.path.replace("&visitNo=MZ001", "");
    assert_eq!(
        h.send(&h.hz1, &req).await.errors(),
        vec![("visitNo".into(), "required".into())]
    );
    let mut req = paths::list_recognitions(&list_query(&p, "all"));
    req.path.push_str("&page=2");
    assert_eq!(
        h.send(&h.hz1, &req).await.errors(),
        vec![("page".into(), "unknown-field".into())]
    );

    // Own reports count by default, not when configured otherwise.
    let r = h.send(&h.hz2, &paths::list_recognitions(&list_query(&p, "all"))).await;
    assert_eq!(r.data()["count"], 2);
    let h2 = Harness::with(|c| c.own_reports_recognisable = false);
    let p = scene(&h2).await;
    assert_eq!(
        h2.send(&h2.hz2, &paths::list_recognitions(&list_query(&p, "all")))
            .await
            .data()["count"],
        0
    );
    assert_eq!(
        h2.send(&h2.hz1, &paths::list_recognitions(&list_query(&p, "all")))
            .await
            .data()["count"],
        2
    );
}

#[tokio::test]
async fn precise_query_filters() {
    let h = Harness::new();
    let p = scene(&h).await;
    let base = PreciseQuery {
        id_type: "01".into(),
        id_no: p.id_no.clone(),
        ..Default::default()
    };
    let count = |r: Resp| r.data()["items"].as_array().unwrap().len();
    assert_eq!(count(h.send(&h.hz1, &paths::precise_query(&base)).await), 2);
    let q = PreciseQuery {
        data_codes: Some(vec!["JC0002".into()]),
        ..base.clone()
    };
    assert_eq!(count(h.send(&h.hz1, &paths::precise_query(&q)).await), 1);
    let q = PreciseQuery {
        item_name: Some("血常".into()),
        org_name: Some("中心".into()),
        ..base.clone()
    };
    assert_eq!(count(h.send(&h.hz1, &paths::precise_query(&q)).await), 1);
    let q = PreciseQuery {
        org_code: Some(h.hz1.code.clone()),
        ..base.clone()
    };
    assert_eq!(count(h.send(&h.hz1, &paths::precise_query(&q)).await), 0);
    let q = PreciseQuery {
        from: Some(ago(1, 12)),
        kind: Some("exam".into()),
        ..base.clone()
    };
    assert_eq!(count(h.send(&h.hz1, &paths::precise_query(&q)).await), 1);
    let q = PreciseQuery {
        to: Some("2024-01-01".into()),
        ..base.clone()
    };
    assert_eq!(
        h.send(&h.hz1, &paths::precise_query(&q)).await.errors(),
        vec![("to".into(), "format".into())]
    );
}

fn check_req(p: &Patient, orders: Vec<CheckOrder>) -> PrescriptionCheck {
    PrescriptionCheck {
        id_type: p.id_type.clone(),
        id_no: p.id_no.clone(),
        patient_id: p.patient_id.clone(),
        visit_type: "1".into(),
        visit_no: "MZ001".into(),
        doctor_no: "D100".into(),
        dept_code: "D1".into(),
        orders,
    }
}

fn order(id: &str, code: &str, t: ReportType) -> CheckOrder {
    CheckOrder {
        order_id: id.into(),
        local_item_code: format!("LOCAL-{code}"),
        data_code: code.into(),
        report_type: t,
    }
}

fn decisions(check_id: &str, list: Vec<Decision>) -> Decisions {
    Decisions {
        check_id: check_id.into(),
        doctor_no: "D100".into(),
        dept_code: "D1".into(),
        decided_at: ago(0, 0),
        decisions: list,
    }
}

fn yes(order: &str, report: &str) -> Decision {
    Decision {
        order_id: order.into(),
        report_id: report.into(),
        recognise: true,
        reason_code: None,
        reason_text: None,
    }
}

#[tokio::test]
async fn check_decide_download() {
    let h = Harness::new();
    let p = scene(&h).await;
    let orders = vec![
        order("O1", "JY0001", ReportType::Lab),
        order("O2", "JC0002", ReportType::Exam),
        order("O3", "JY0004", ReportType::Lab),
    ];
    let r = h
        .send(&h.hz1, &paths::prescription_check(&check_req(&p, orders.clone())))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    let check: CheckAnswer = serde_json::from_value(r.data().clone()).unwrap();
    assert!(check.duplicate);
    assert_eq!(check.matches.len(), 2, "the revoked 肝功能 is not offered");
    let lab_id = check.matches[0].reports[0].report_id.clone();
    let ct_id = check.matches[1].reports[0].report_id.clone();

    // Unknown patient at the asking org: 404; nothing matching: still a checkId.
    let stranger = patient("P404", &p.id_no);
    assert_eq!(
        h.send(
            &h.hz1,
            &paths::prescription_check(&check_req(&stranger, orders.clone()))
        )
        .await
        .status,
        404
    );
    let r = h
        .send(
            &h.hz1,
            &paths::prescription_check(&check_req(&p, vec![order("O9", "JY0005", ReportType::Lab)])),
        )
        .await;
    assert_eq!(
        (
            r.data()["duplicate"].as_bool(),
            r.data()["matches"].as_array().unwrap().len()
        ),
        (Some(false), 0)
    );
    assert!(r.data()["checkId"].as_str().is_some_and(|s| !s.is_empty()));
    let mut bad = check_req(&p, vec![order("O1", "JC0002", ReportType::Lab)]);
    bad.doctor_no = String::new();
    assert_eq!(
        h.send(&h.hz1, &paths::prescription_check(&bad)).await.errors(),
        vec![
            ("doctorNo".into(), "required".into()),
            ("orders[0].dataCode".into(), "wrong-type".into())
        ]
    );

    // Download before any decision: 403.
    assert_eq!(h.send(&h.hz1, &paths::download(&ct_id, "pdf")).await.status, 403);

    // Decisions: every matched order exactly once; declines need a reason.
    let r = h
        .send(
            &h.hz1,
            &paths::decisions(&decisions(&check.check_id, vec![yes("O1", &lab_id)])),
        )
        .await;
    assert_eq!(r.errors(), vec![("decisions".into(), "missing-order".into())]);
    let decline = Decision {
        recognise: false,
        ..yes("O2", &ct_id)
    };
    let r = h
        .send(
            &h.hz1,
            &paths::decisions(&decisions(&check.check_id, vec![yes("O1", &lab_id), decline.clone()])),
        )
        .await;
    assert_eq!(r.errors(), vec![("decisions[1].reasonCode".into(), "required".into())]);
    let r = h
        .send(
            &h.hz1,
            &paths::decisions(&decisions(&check.check_id, vec![yes("O1", &ct_id), yes("O2", &ct_id)])),
        )
        .await;
    assert_eq!(r.errors(), vec![("decisions[0].reportId".into(), "not-offered".into())]);
    let r = h
        .send(&h.hz1, &paths::decisions(&decisions("nope", vec![yes("O1", &lab_id)])))
        .await;
    assert_eq!(r.status, 404);

    let declined = Decision {
        reason_code: Some("01".into()),
        ..decline
    };
    let body = decisions(&check.check_id, vec![yes("O1", &lab_id), declined.clone()]);
    let r = h.send(&h.hz1, &paths::decisions(&body)).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    // The same decisions again (new request id): 200; different ones: 409.
    assert_eq!(h.send(&h.hz1, &paths::decisions(&body)).await.status, 200);
    assert_eq!(h.last_effect().await, "unchanged");
    let changed = decisions(&check.check_id, vec![yes("O1", &lab_id), yes("O2", &ct_id)]);
    assert_eq!(h.send(&h.hz1, &paths::decisions(&changed)).await.status, 409);
    // Another org cannot use this check.
    assert_eq!(h.send(&h.hz2, &paths::decisions(&body)).await.status, 404);

    // Download: the recognised lab report as JSON; no PDF for it; the declined CT is 403.
    let r = h.send(&h.hz1, &paths::download(&lab_id, "json")).await;
    assert_eq!(r.status, 200);
    let report: LabReport = serde_json::from_value(r.data().clone()).unwrap();
    assert_eq!((report.report_no.as_str(), report.version), ("L1", 2));
    assert_eq!(h.send(&h.hz1, &paths::download(&lab_id, "pdf")).await.status, 404);
    assert_eq!(h.send(&h.hz1, &paths::download(&ct_id, "pdf")).await.status, 403);
    assert_eq!(
        h.send(&h.hz1, &paths::download(&lab_id, "xml")).await.errors(),
        vec![("format".into(), "code".into())]
    );
    assert_eq!(h.send(&h.hz2, &paths::download(&lab_id, "json")).await.status, 403);
    let state = h.control("GET", "/_sim/state", None).await.json;
    assert_eq!(state["orgs"][&h.hz1.code]["downloads"][0]["report_id"], lab_id);
}

#[tokio::test]
async fn recognising_a_revoked_report_conflicts_and_pdf_downloads() {
    let h = Harness::new();
    let p = scene(&h).await;
    let orders = vec![
        order("O1", "JY0001", ReportType::Lab),
        order("O2", "JC0002", ReportType::Exam),
    ];
    let r = h.send(&h.hz1, &paths::prescription_check(&check_req(&p, orders))).await;
    let check: CheckAnswer = serde_json::from_value(r.data().clone()).unwrap();
    let lab_id = check.matches[0].reports[0].report_id.clone();
    let ct_id = check.matches[1].reports[0].report_id.clone();

    // hz2 supersedes L1 with v3 after the check: recognising v2 is now 409.
    let mut v3 = lab("L1", 3, &patient("Q7", &p.id_no), Some("JY0001"), ago(0, 2));
    v3.items[0].result_value = "9.9".into();
    assert_eq!(h.send(&h.hz2, &paths::lab_report(&v3)).await.status, 200);
    let body = decisions(&check.check_id, vec![yes("O1", &lab_id), yes("O2", &ct_id)]);
    let r = h.send(&h.hz1, &paths::decisions(&body)).await;
    assert_eq!(
        (r.status, r.errors()),
        (409, vec![("decisions[0].reportId".into(), "not-recognisable".into())])
    );

    // A fresh check offers v3; recognising both works and the CT PDF downloads.
    let orders = vec![
        order("O1", "JY0001", ReportType::Lab),
        order("O2", "JC0002", ReportType::Exam),
    ];
    let r = h.send(&h.hz1, &paths::prescription_check(&check_req(&p, orders))).await;
    let check: CheckAnswer = serde_json::from_value(r.data().clone()).unwrap();
    assert!(check.matches[0].reports[0].report_id.ends_with(":lab:L1:3"));
    let body = decisions(
        &check.check_id,
        vec![yes("O1", &check.matches[0].reports[0].report_id), yes("O2", &ct_id)],
    );
    assert_eq!(h.send(&h.hz1, &paths::decisions(&body)).await.status, 200);
    let r = h.send(&h.hz1, &paths::download(&ct_id, "pdf")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/pdf");
    assert_eq!(r.body.as_ref(), pdf_bytes("ct").as_slice());

    // Revoked after the check: no longer offered in the list either.
    let rv = Revoke {
        version: 1,
        reason: "x".into(),
        revoked_at: ago(0, 0),
        operator_no: "D".into(),
    };
    h.send(&h.hz2, &paths::revoke(ReportType::Exam, "E1", &rv)).await;
    let q = PreciseQuery {
        id_type: "01".into(),
        id_no: p.id_no.clone(),
        ..Default::default()
    };
    let r = h.send(&h.hz1, &paths::precise_query(&q)).await;
    assert_eq!(r.data()["items"].as_array().unwrap().len(), 1);
}

/// A check's page as a doctor uses it: the offered reports with their results before the
/// choice, the doctor known from the check, every order at once, a wrong choice explained
/// with nothing recorded, the decisions shown after (post, redirect, get), and the link usable
/// only in the browser that opened it.
#[tokio::test]
async fn check_page_is_what_a_doctor_uses() {
    let h = Harness::new();
    let p = scene(&h).await;
    let orders = vec![
        order("O1", "JY0001", ReportType::Lab),
        order("O2", "JC0002", ReportType::Exam),
    ];
    let r = h.send(&h.hz1, &paths::prescription_check(&check_req(&p, orders))).await;
    let check: CheckAnswer = serde_json::from_value(r.data().clone()).unwrap();
    let lab_id = check.matches[0].reports[0].report_id.clone();
    let path = check.url.trim_start_matches("http://sim.test").to_string();
    let get = |cookie: Option<&str>| {
        let mut b = http::Request::get(path.as_str());
        if let Some(c) = cookie {
            b = b.header("Cookie", c);
        }
        h.raw(b.body(Body::empty()).unwrap())
    };
    let post = |cookie: Option<&str>, form: &str| {
        let mut b =
            http::Request::post(format!("{path}/decide")).header("Content-Type", "application/x-www-form-urlencoded");
        if let Some(c) = cookie {
            b = b.header("Cookie", c);
        }
        h.raw(b.body(Body::from(form.to_string())).unwrap())
    };
    let text = |r: &Resp| String::from_utf8_lossy(&r.body).into_owned();

    let first = get(None).await;
    assert_eq!(first.status, 200);
    let html = text(&first);
    // Results before deciding: the 血常规's value (version 2) and the CT's conclusion.
    for shown in [
        "白细胞",
        "6.6",
        "双肺纹理清晰",
        "未见异常",
        "开单医生 D100",
        "惠州市中心人民医院",
    ] {
        assert!(html.contains(shown), "{shown} on the page: {html}");
    }
    assert!(
        !html.contains("name=\"doctor_no\""),
        "the doctor is the check's, not re-typed"
    );
    let cookie = page_cookie(&first);

    // 不互认 without a reason: the page again with the reason asked for, nothing recorded.
    let wrong = post(
        Some(&cookie),
        "order_0=O1&choice_0=decline&order_1=O2&choice_1=decline&reason_code_1=02",
    )
    .await;
    assert_eq!(wrong.status, 400);
    assert!(
        text(&wrong).contains("医嘱 O1：选择“不互认”时必须选择原因"),
        "{}",
        text(&wrong)
    );
    let so_far = h.send(&h.hz1, &paths::check_decisions(&check.check_id)).await;
    assert_eq!(so_far.data()["decisions"].as_array().unwrap().len(), 0);

    // Another browser cannot post with the link alone.
    let form = format!(
        "order_0=O1&choice_0=recognise%3A{}&order_1=O2&choice_1=decline&reason_code_1=02",
        urlencode(&lab_id)
    );
    assert_eq!(post(None, &form).await.status, 410);

    // Both orders at once; the answer sends the browser back to the page.
    let done = post(Some(&cookie), &form).await;
    assert_eq!(done.status, 303);
    assert_eq!(done.headers["location"].to_str().unwrap(), path);
    let so_far = h.send(&h.hz1, &paths::check_decisions(&check.check_id)).await;
    let d = so_far.data();
    assert_eq!(d["complete"], true);
    let decisions = d["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 2);
    assert!(
        decisions
            .iter()
            .all(|x| x["doctorNo"] == "D100" && x["source"] == "page"),
        "{d}"
    );

    let after = text(&get(Some(&cookie)).await);
    assert!(
        after.contains("已互认") && after.contains("不互认：结果在疾病发展中变化较快"),
        "{after}"
    );
    assert!(after.contains("互认选择已完成") && !after.contains("<form"), "{after}");
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
