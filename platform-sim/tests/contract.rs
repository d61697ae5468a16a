//! Sections 1–5 and 7: headers, tokens, wire rules, idempotency, master data, reports, PDFs.

mod common;

use axum::body::Body;
use axum::http;
use chrono::Utc;
use common::*;
use hmr_protocol::paths;
use hmr_protocol::sign::sign;
use hmr_protocol::*;
use serde_json::json;

fn signature(h: &Harness, nonce: &str, ts: i64, alg: SignAlg) -> paths::Request {
    paths::token(&TokenRequest::Signature {
        app_id: h.hz1.app_id.clone(),
        timestamp: ts,
        nonce: nonce.into(),
        scope: Scope::LabUpload,
        sign_alg: alg,
        sign: sign(alg, &h.hz1.app_secret, &h.hz1.app_id, ts, nonce),
    })
}

#[tokio::test]
async fn password_and_signature_grants() {
    let h = Harness::new();
    let r = h.password_token(&h.hz1, Scope::HisUpload).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["code"], "00000");
    assert_eq!(r.data()["tokenType"], "Bearer");
    assert_eq!(r.data()["expiresIn"], 7200);
    assert_eq!(h.last_effect().await, "auth");

    let mut wrong = h.hz1.clone();
    wrong.password = "nope".into();
    let r = h.password_token(&wrong, Scope::HisUpload).await;
    assert_eq!((r.status, r.json["code"].as_str()), (401, Some("A0301")));
    // hz2's credentials presented under hz1's org code.
    let mut mixed = h.hz2.clone();
    mixed.code = h.hz1.code.clone();
    assert_eq!(h.password_token(&mixed, Scope::HisUpload).await.status, 401);

    let now = Utc::now().timestamp_millis();
    let req = signature(&h, "n-1", now, SignAlg::HmacSha256);
    assert_eq!(h.raw(h.build(&req, &h.hz1.code, None, &rid())).await.status, 200);
    // The same nonce again, even freshly signed: 401.
    assert_eq!(h.raw(h.build(&req, &h.hz1.code, None, &rid())).await.status, 401);
    let req = signature(&h, "n-2", now, SignAlg::HmacSm3);
    assert_eq!(h.raw(h.build(&req, &h.hz1.code, None, &rid())).await.status, 200);
    let req = signature(&h, "n-3", now - 301_000, SignAlg::HmacSha256);
    assert_eq!(h.raw(h.build(&req, &h.hz1.code, None, &rid())).await.status, 401);
    let req = signature(&h, "n-4", now + 301_000, SignAlg::HmacSha256);
    assert_eq!(h.raw(h.build(&req, &h.hz1.code, None, &rid())).await.status, 401);
    // A bad signature does not burn the nonce.
    let mut bad = signature(&h, "n-5", now, SignAlg::HmacSha256);
    bad.body = String::from_utf8(bad.body)
        .unwrap()
        .replace("\"sign\":\"", "\"sign\":\"0")
        .into_bytes();
    assert_eq!(h.raw(h.build(&bad, &h.hz1.code, None, &rid())).await.status, 401);
    let req = signature(&h, "n-5", now, SignAlg::HmacSha256);
    assert_eq!(h.raw(h.build(&req, &h.hz1.code, None, &rid())).await.status, 200);

    // Field errors of the tagged token body name their field.
    let body = json!({"grantType": "password", "username": "hz1", "password": "hz1-secret", "scope": "all"});
    let req = paths::Request {
        body: body.to_string().into_bytes(),
        ..paths::token(&TokenRequest::Password {
            username: String::new(),
            password: String::new(),
            scope: Scope::HisUpload,
        })
    };
    let r = h.raw(h.build(&req, &h.hz1.code, None, &rid())).await;
    assert_eq!((r.status, r.errors()), (400, vec![("scope".into(), "code".into())]));
}

#[tokio::test]
async fn token_expiry_unknown_and_scope() {
    let h = Harness::new();
    let p = patient("P1", &id_no("19900307", "123"));
    h.setup_patient(&h.hz1, &p).await;
    let req = paths::patients(std::slice::from_ref(&p));

    // Wrong scope and another org's token: 403.
    let lab_token = h.token(&h.hz1, Scope::LabUpload).await;
    let r = h.raw(h.build(&req, &h.hz1.code, Some(&lab_token), &rid())).await;
    assert_eq!((r.status, r.json["code"].as_str()), (403, Some("A0303")));
    let his_token = h.token(&h.hz1, Scope::HisUpload).await;
    let r = h.raw(h.build(&req, &h.hz2.code, Some(&his_token), &rid())).await;
    assert_eq!(r.status, 403);
    let r = h.raw(h.build(&req, &h.hz1.code, Some("sim.unknown"), &rid())).await;
    assert_eq!(r.status, 401);
    let r = h.raw(h.build(&req, &h.hz1.code, None, &rid())).await;
    assert_eq!(r.status, 401);

    // The clock moves past the TTL: 401.
    h.control("POST", "/_sim/clock", Some(json!({"offset_secs": 7201})))
        .await;
    let r = h.raw(h.build(&req, &h.hz1.code, Some(&his_token), &rid())).await;
    assert_eq!(r.status, 401);
    h.control("POST", "/_sim/clock", Some(json!({"offset_secs": 0}))).await;

    // Short TTL from the fault API, then expire everything now.
    h.control("POST", "/_sim/faults", Some(json!({"token_ttl_secs": 2})))
        .await;
    h.forget_tokens();
    let r = h.password_token(&h.hz1, Scope::HisUpload).await;
    assert_eq!(r.data()["expiresIn"], 2);
    let t = r.data()["accessToken"].as_str().unwrap().to_owned();
    assert_eq!(h.raw(h.build(&req, &h.hz1.code, Some(&t), &rid())).await.status, 200);
    h.control("POST", "/_sim/faults", Some(json!({"expire_tokens_now": true})))
        .await;
    assert_eq!(h.raw(h.build(&req, &h.hz1.code, Some(&t), &rid())).await.status, 401);
    h.control("DELETE", "/_sim/faults", None).await;
    assert_eq!(
        h.password_token(&h.hz1, Scope::HisUpload).await.data()["expiresIn"],
        7200
    );
}

#[tokio::test]
async fn headers_are_checked() {
    let h = Harness::new();
    let p = patient("P1", &id_no("19900307", "123"));
    let req = paths::patients(std::slice::from_ref(&p));
    let token = h.token(&h.hz1, Scope::HisUpload).await;

    let r = h.raw(h.build(&req, &h.hz1.code, Some(&token), "not-a-uuid")).await;
    assert_eq!(
        (r.status, r.errors()),
        (400, vec![("X-Request-Id".into(), "format".into())])
    );
    let simple = uuid::Uuid::new_v4().simple().to_string();
    assert_eq!(
        h.raw(h.build(&req, &h.hz1.code, Some(&token), &simple)).await.status,
        400
    );

    let mut bad_code = h.hz1.code.clone();
    bad_code.replace_range(17.., if bad_code.ends_with('0') { "1" } else { "0" });
    let r = h.raw(h.build(&req, &bad_code, Some(&token), &rid())).await;
    assert_eq!(
        (r.status, r.errors()),
        (400, vec![("X-Org-Code".into(), "checksum".into())])
    );

    let mut no_org = h.build(&req, &h.hz1.code, Some(&token), &rid());
    no_org.headers_mut().remove("X-Org-Code");
    let r = h.raw(no_org).await;
    assert_eq!(
        (r.status, r.errors()),
        (400, vec![("X-Org-Code".into(), "required".into())])
    );
    // The token endpoint needs both headers too.
    let mut t = h.build(
        &paths::token(&TokenRequest::Password {
            username: "hz1".into(),
            password: "hz1-secret".into(),
            scope: Scope::HisUpload,
        }),
        &h.hz1.code,
        None,
        &rid(),
    );
    t.headers_mut().remove("X-Request-Id");
    assert_eq!(h.raw(t).await.status, 400);
}

#[tokio::test]
async fn wire_format_rules() {
    let h = Harness::new();
    let token = h.token(&h.hz1, Scope::HisUpload).await;
    let p = patient("P1", &id_no("19900307", "123"));
    let send = |body: String, ct: &'static str| {
        let mut req = paths::patients(std::slice::from_ref(&p));
        req.body = body.into_bytes();
        req.content_type = Some(ct.into());
        h.build(&req, &h.hz1.code, Some(&token), &rid())
    };
    let good: serde_json::Value = serde_json::from_slice(&paths::patients(std::slice::from_ref(&p)).body).unwrap();

    // Unknown field at the top level: the whole batch is 400.
    let mut v = good.clone();
    v["extra"] = json!(1);
    let r = h.raw(send(v.to_string(), "application/json")).await;
    assert_eq!(
        (r.status, r.errors()),
        (400, vec![("extra".into(), "unknown-field".into())])
    );
    // Duplicate keys.
    let text = good
        .to_string()
        .replacen("{\"records\"", "{\"records\":[],\"records\"", 1);
    let r = h.raw(send(text, "application/json")).await;
    assert_eq!(
        (r.status, r.errors()),
        (400, vec![("records".into(), "duplicate-key".into())])
    );
    let text = good.to_string().replacen("\"name\":", "\"name\":\"x\",\"name\":", 1);
    let r = h.raw(send(text, "application/json")).await;
    assert_eq!(
        (r.status, r.errors()),
        (400, vec![("records[0].name".into(), "duplicate-key".into())])
    );
    // Wrong content type, broken JSON.
    assert_eq!(
        h.raw(send(good.to_string(), "text/plain")).await.errors()[0].0,
        "Content-Type"
    );
    assert_eq!(
        h.raw(send("{".into(), "application/json")).await.errors()[0],
        ("body".into(), "syntax".into())
    );
    // null counts as absent: an optional null is fine.
    let mut v = good.clone();
    v["records"][0]["phone"] = json!(null);
    let r = h.raw(send(v.to_string(), "application/json")).await;
    assert_eq!(r.status, 200);
    // Content-Length is required.
    let mut req = send(good.to_string(), "application/json");
    req.headers_mut().remove("Content-Length");
    assert_eq!(h.raw(req).await.errors()[0].0, "Content-Length");
    // A POST takes no query parameters.
    let mut req = paths::patients(std::slice::from_ref(&p));
    req.path.push_str("?debug=1");
    let r = h.send(&h.hz1, &req).await;
    assert_eq!(
        (r.status, r.errors()),
        (400, vec![("debug".into(), "unknown-field".into())])
    );
    // Unknown path: enveloped 404.
    let r = h
        .raw(http::Request::get("/api/v1/nothing").body(Body::empty()).unwrap())
        .await;
    assert_eq!((r.status, r.json["code"].as_str()), (404, Some("A0404")));
}

#[tokio::test]
async fn idempotent_replay_and_conflicts() {
    let h = Harness::new();
    let p = patient("P1", &id_no("19900307", "123"));
    let report = lab("L1", 1, &p, Some("JY0001"), ago(1, 0));
    let req = paths::lab_report(&report);
    let id = rid();

    // Patient not uploaded: 404, not remembered.
    let r = h.send_id(&h.hz1, &req, &id).await;
    assert_eq!((r.status, r.json["code"].as_str()), (404, Some("A0404")));
    h.setup_patient(&h.hz1, &p).await;
    let first = h.send_id(&h.hz1, &req, &id).await;
    assert_eq!(first.status, 200);
    assert_eq!(h.last_effect().await, "applied");
    // Same id, same bytes: the first answer again.
    let again = h.send_id(&h.hz1, &req, &id).await;
    assert_eq!((again.status, &again.body), (200, &first.body));
    assert_eq!(h.last_effect().await, "replayed");
    // Same id, other body: 409.
    let other = paths::lab_report(&lab("L2", 1, &p, Some("JY0001"), ago(1, 0)));
    let r = h.send_id(&h.hz1, &other, &id).await;
    assert_eq!((r.status, r.json["code"].as_str()), (409, Some("A0409")));
    // A 400 is final: remembered and replayed even after the cause would be gone.
    let mut bad = lab("L3", 1, &p, Some("JC0002"), ago(1, 0));
    let bad_req = paths::lab_report(&bad);
    let id2 = rid();
    let r = h.send_id(&h.hz1, &bad_req, &id2).await;
    assert_eq!(
        (r.status, r.errors()),
        (400, vec![("dataCode".into(), "wrong-type".into())])
    );
    assert_eq!(h.send_id(&h.hz1, &bad_req, &id2).await.status, 400);
    assert_eq!(h.last_effect().await, "replayed");
    bad.data_code = Some("JY9999".into());
    let r = h.send(&h.hz1, &paths::lab_report(&bad)).await;
    assert_eq!(r.errors(), vec![("dataCode".into(), "not-in-catalog".into())]);
    // Request ids are per org: hz2 may use the same id independently.
    let p2 = patient("Q1", &id_no("19851111", "456"));
    h.setup_patient(&h.hz2, &p2).await;
    let r = h
        .send_id(&h.hz2, &paths::lab_report(&lab("L1", 1, &p2, None, ago(1, 0))), &id)
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn patient_batch_per_record_results() {
    let h = Harness::new();
    let good = patient("P1", &id_no("19900307", "123"));
    let mut bad = patient("P2", &id_no("19900307", "124"));
    let last = bad.id_no.pop().unwrap();
    bad.id_no.push(if last == '0' { '1' } else { '0' });
    let third = patient("P3", &id_no("19800101", "555"));
    let r = h.send(&h.hz1, &paths::patients(&[good.clone(), bad, third])).await;
    assert_eq!(r.status, 200);
    let results = r.data()["results"].as_array().unwrap();
    assert_eq!(results[0], json!({"index": 0, "status": "accepted"}));
    assert_eq!(
        results[1],
        json!({"index": 1, "status": "rejected", "errors": [{"field": "idNo", "reason": "checksum"}]})
    );
    assert_eq!(results[2]["status"], "accepted");
    let j = h.journal().await;
    assert_eq!(j.last().unwrap()["results"][1]["status"], "rejected");

    // A record with an unknown field is rejected alone.
    let mut v: serde_json::Value =
        serde_json::from_slice(&paths::patients(&[good.clone(), good.clone()]).body).unwrap();
    v["records"][1]["nickname"] = json!("x");
    let mut req = paths::patients(&[]);
    req.body = v.to_string().into_bytes();
    let r = h.send(&h.hz1, &req).await;
    assert_eq!(r.data()["results"][0]["status"], "accepted");
    assert_eq!(
        r.data()["results"][1]["errors"],
        json!([{"field": "nickname", "reason": "unknown-field"}])
    );

    // A strictly older record is accepted with no change.
    let mut old = good.clone();
    old.name = "旧名".into();
    old.updated_at = ago(3, 0);
    let r = h.send(&h.hz1, &paths::patients(&[old])).await;
    assert_eq!(r.data()["results"][0]["status"], "accepted");
    assert_eq!(h.last_effect().await, "unchanged");
    let state = h.control("GET", "/_sim/state", None).await.json;
    assert_eq!(state["orgs"][&h.hz1.code]["patients"]["P1"]["name"], "张三");

    // Over 500 records: 413.
    let many: Vec<_> = (0..501).map(|i| patient(&format!("X{i}"), &good.id_no)).collect();
    let r = h.send(&h.hz1, &paths::patients(&many)).await;
    assert_eq!((r.status, r.json["code"].as_str()), (413, Some("A0413")));
}

#[tokio::test]
async fn departments_and_staff_references() {
    let h = Harness::new();
    let r = h
        .send(
            &h.hz1,
            &paths::departments(&[dept("D1", None), dept("D2", Some("D1")), dept("D3", Some("D9"))]),
        )
        .await;
    let res = r.data()["results"].as_array().unwrap();
    assert_eq!(res[0]["status"], "accepted");
    assert_eq!(res[1]["status"], "accepted", "parent earlier in the same batch");
    assert_eq!(
        res[2]["errors"],
        json!([{"field": "parentCode", "reason": "unknown-parent"}])
    );

    let r = h
        .send(&h.hz1, &paths::staff(&[staff("S1", "D2"), staff("S2", "D404")]))
        .await;
    let res = r.data()["results"].as_array().unwrap();
    assert_eq!(res[0]["status"], "accepted");
    assert_eq!(
        res[1]["errors"],
        json!([{"field": "deptCode", "reason": "unknown-dept"}])
    );
    // Departments are per org.
    let r = h.send(&h.hz2, &paths::staff(&[staff("S1", "D2")])).await;
    assert_eq!(r.data()["results"][0]["status"], "rejected");
}

#[tokio::test]
async fn report_versions_and_revoke() {
    let h = Harness::new();
    let p = patient("P1", &id_no("19900307", "123"));
    h.setup_patient(&h.hz1, &p).await;
    let v1 = lab("L1", 1, &p, Some("JY0001"), ago(1, 0));
    assert_eq!(h.send(&h.hz1, &paths::lab_report(&v1)).await.status, 200);
    assert_eq!(h.send(&h.hz1, &paths::lab_report(&v1)).await.status, 200);
    assert_eq!(h.last_effect().await, "unchanged");
    let mut v1b = v1.clone();
    v1b.items[0].result_value = "7.0".into();
    assert_eq!(h.send(&h.hz1, &paths::lab_report(&v1b)).await.status, 409);
    let mut v2 = v1b.clone();
    v2.version = 2;
    assert_eq!(h.send(&h.hz1, &paths::lab_report(&v2)).await.status, 200);
    // Lower version, same content as held v1: 200; other content: 409.
    assert_eq!(h.send(&h.hz1, &paths::lab_report(&v1)).await.status, 200);
    let mut v1c = v1.clone();
    v1c.auditor_no = "D99".into();
    assert_eq!(h.send(&h.hz1, &paths::lab_report(&v1c)).await.status, 409);
    // Lab and exam are separate namespaces.
    let e = exam("L1", 1, &p, Some("JC0002"), ago(1, 0));
    assert_eq!(h.send(&h.hz1, &paths::exam_report(&e)).await.status, 200);
    // The report's person must be the patient's.
    let mut other = lab("L9", 1, &p, None, ago(1, 0));
    other.id_no = id_no("19851111", "456");
    let r = h.send(&h.hz1, &paths::lab_report(&other)).await;
    assert_eq!(r.errors(), vec![("idNo".into(), "patient-mismatch".into())]);
    // Another org's patient is unknown here.
    assert_eq!(h.send(&h.hz2, &paths::exam_report(&e)).await.status, 404);
    // Validation from the protocol crate: empty abnormal flag, Z time.
    let mut bad = lab("L8", 1, &p, None, ago(1, 0));
    bad.items[0].abnormal_flag = Some(String::new());
    bad.reported_at = "2024-06-01T08:00:00Z".into();
    let r = h.send(&h.hz1, &paths::lab_report(&bad)).await;
    assert_eq!(
        r.errors(),
        vec![
            ("reportedAt".into(), "format".into()),
            ("items[0].abnormalFlag".into(), "required".into())
        ]
    );

    let revoke = |version| Revoke {
        version,
        reason: "取消审核".into(),
        revoked_at: ago(0, 1),
        operator_no: "D01".into(),
    };
    assert_eq!(
        h.send(&h.hz1, &paths::revoke(ReportType::Lab, "L1", &revoke(2)))
            .await
            .status,
        200
    );
    assert_eq!(h.last_effect().await, "applied");
    assert_eq!(
        h.send(&h.hz1, &paths::revoke(ReportType::Lab, "L1", &revoke(2)))
            .await
            .status,
        200
    );
    assert_eq!(h.last_effect().await, "unchanged");
    assert_eq!(
        h.send(&h.hz1, &paths::revoke(ReportType::Lab, "L1", &revoke(5)))
            .await
            .status,
        404
    );
    assert_eq!(
        h.send(&h.hz1, &paths::revoke(ReportType::Lab, "NOPE", &revoke(1)))
            .await
            .status,
        404
    );
    assert_eq!(
        h.send(&h.hz1, &paths::revoke(ReportType::Exam, "L2", &revoke(1)))
            .await
            .status,
        404
    );
    let mut v3 = v2.clone();
    v3.version = 3;
    assert_eq!(h.send(&h.hz1, &paths::lab_report(&v3)).await.status, 200);
    let state = h.control("GET", "/_sim/state", None).await.json;
    let versions = &state["orgs"][&h.hz1.code]["lab_reports"]["L1"]["versions"];
    assert_eq!(versions.as_array().unwrap().len(), 3);
    assert_eq!(versions[1]["revoked"], true);
    assert_eq!(versions[2]["revoked"], false);
    assert_eq!(versions[2]["item_count"], 1);
}

#[tokio::test]
async fn pdf_rules() {
    let h = Harness::new();
    let p = patient("P1", &id_no("19900307", "123"));
    h.setup_patient(&h.hz1, &p).await;
    h.send(
        &h.hz1,
        &paths::exam_report(&exam("E1", 1, &p, Some("JC0002"), ago(1, 0))),
    )
    .await;
    let put = |no: &str, v: u32, bytes: Vec<u8>| paths::pdf(ReportType::Exam, no, v, bytes);

    assert_eq!(h.send(&h.hz1, &put("E1", 2, pdf_bytes("a"))).await.status, 404);
    assert_eq!(h.send(&h.hz1, &put("E9", 1, pdf_bytes("a"))).await.status, 404);
    assert_eq!(h.send(&h.hz1, &put("E1", 1, pdf_bytes("a"))).await.status, 200);
    assert_eq!(h.send(&h.hz1, &put("E1", 1, pdf_bytes("a"))).await.status, 200);
    assert_eq!(h.last_effect().await, "unchanged");
    assert_eq!(h.send(&h.hz1, &put("E1", 1, pdf_bytes("b"))).await.status, 409);
    let j = h.journal().await;
    assert_eq!(j.last().unwrap()["body"]["size"], pdf_bytes("b").len());

    let r = h.send(&h.hz1, &put("E1", 1, b"<html>".to_vec())).await;
    assert_eq!(r.errors(), vec![("body".into(), "format".into())]);
    let mut wrong_hash = put("E1", 1, pdf_bytes("a"));
    wrong_hash.headers[0].1 = "00".repeat(32);
    let r = h.send(&h.hz1, &wrong_hash).await;
    assert_eq!(r.errors(), vec![("X-Content-SHA256".into(), "mismatch".into())]);
    let mut big = b"%PDF-".to_vec();
    big.resize(10 * 1024 * 1024 + 1, b' ');
    assert_eq!(h.send(&h.hz1, &put("E1", 1, big)).await.status, 413);

    // A revoked version takes no PDF.
    h.send(&h.hz1, &paths::exam_report(&exam("E2", 1, &p, None, ago(1, 0))))
        .await;
    let rv = Revoke {
        version: 1,
        reason: "x".into(),
        revoked_at: ago(0, 1),
        operator_no: "D".into(),
    };
    h.send(&h.hz1, &paths::revoke(ReportType::Exam, "E2", &rv)).await;
    assert_eq!(h.send(&h.hz1, &put("E2", 1, pdf_bytes("c"))).await.status, 409);
    // The PDF endpoint answers to its own scope only.
    let token = h.token(&h.hz1, Scope::LabUpload).await;
    let r = h
        .raw(h.build(&put("E1", 1, pdf_bytes("a")), &h.hz1.code, Some(&token), &rid()))
        .await;
    assert_eq!(r.status, 403);
}
