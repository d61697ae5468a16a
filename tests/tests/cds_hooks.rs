//! `hmr-worker serve`: the recognition services as a CDS Hooks 2.0 service, over the same SQL
//! functions (one set of checks, decisions and outbox). Requests and answers use the field
//! names of the specification (`docs/design/cds-hooks.md`).

use std::time::Duration;

use anyhow::Result;
use hmr_e2e::*;
use serde_json::{json, Value};

const P0001_ID: &str = "441302198003151233";
const P0002_ID: &str = "441302199211082345";

fn draft_orders(orders: &[(&str, &str)]) -> Value {
    json!({
        "resourceType": "Bundle",
        "type": "collection",
        "entry": orders.iter().map(|(id, code)| json!({"resource": {
            "resourceType": "ServiceRequest", "id": id, "status": "draft", "intent": "order",
            "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "108252007", "display": "Laboratory procedure"}]}],
            "code": {"coding": [{"system": "urn:hmr:item", "code": code}]},
            "subject": {"reference": "Patient/P0001"}
        }})).collect::<Vec<_>>()
    })
}

/// Our hospital with the other hospital's 血常规 for 陈志明, and `hmr-worker serve` with no
/// terminals: nothing checked, loopback only (a rehearsal on this machine).
async fn anonymous_serve() -> Result<(Workstations, Serve)> {
    let w = Workstations::start(
        &[(P0001_ID, "1980-03-15", "W-CBC-1", "JY0001", 1)],
        &WorkerOptions {
            extra_config: Some("[serve]\nanonymous = true\n".into()),
            ..Default::default()
        },
    )
    .await?;
    let s = serve(&w, None).await?;
    Ok((w, s))
}

#[tokio::test(flavor = "multi_thread")]
async fn discovery_and_patient_view_show_the_badge_as_a_card() -> Result<()> {
    let (w, s) = anonymous_serve().await?;
    let http = s.http.clone();

    // Discovery.
    let services: Value = reqwest::get(format!("{}/cds-services", s.base)).await?.json().await?;
    let hooks: Vec<&str> = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["hook"].as_str().unwrap())
        .collect();
    assert_eq!(hooks, ["patient-view", "order-select", "order-sign"], "{services}");
    for svc in services["services"].as_array().unwrap() {
        assert!(
            svc["id"].is_string() && svc["description"].is_string(),
            "required fields: {svc}"
        );
    }

    // patient-view: the badge as a card with the platform's page.
    let context = json!({"userId": "Practitioner/D001", "patientId": "P0001", "encounterId": "MZ001"});
    let view: Value = http
        .post(format!("{}/cds-services/hmr-recognitions", s.base))
        .json(&json!({"hook": "patient-view", "hookInstance": uuid_like(1), "context": context}))
        .send()
        .await?
        .json()
        .await?;
    let card = &view["cards"][0];
    assert_eq!(card["summary"], "本患者有 1 项可互认的检查检验结果", "{view}");
    assert_eq!(card["indicator"], "info");
    assert!(card["source"]["label"].is_string());
    assert_eq!(card["links"][0]["type"], "absolute");
    assert!(card["summary"].as_str().unwrap().chars().count() < 140);
    // The call is kept for the statistics like any other list call.
    assert_eq!(
        count(
            &w.his,
            "SELECT count(*) FROM hmr.list_log WHERE workstation = 'cds-hooks'"
        )
        .await?,
        1
    );

    // A request without the patient is refused with a 4xx, not answered with empty cards.
    let bad = http
        .post(format!("{}/cds-services/hmr-recognitions", s.base))
        .json(
            &json!({"hook": "patient-view", "hookInstance": uuid_like(4), "context": {"userId": "Practitioner/D001"}}),
        )
        .send()
        .await?;
    assert_eq!(bad.status().as_u16(), 400);

    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn order_select_cards_only_the_selected_order() -> Result<()> {
    let (_w, s) = anonymous_serve().await?;
    let http = s.http.clone();

    // order-select, shaped as the specification's example (hooks/order-select.md): the doctor
    // has two draft orders and has just selected one; a card for it only, information only.
    let select = json!({
        "hookInstance": uuid_like(5),
        "hook": "order-select",
        "fhirServer": "http://his.example/fhir",
        "context": {
            "userId": "Practitioner/D001", "patientId": "P0001", "encounterId": "MZ001",
            "selections": ["ServiceRequest/SR0"],
            "draftOrders": draft_orders(&[("SR0", "JY0001"), ("SR9", "JY0005")])
        }
    });
    let selected: Value = http
        .post(format!("{}/cds-services/hmr-order-select", s.base))
        .json(&select)
        .send()
        .await?
        .json()
        .await?;
    let cards = selected["cards"].as_array().expect("cards");
    assert_eq!(cards.len(), 1, "{selected}");
    assert_eq!(cards[0]["indicator"], "info");
    assert!(
        cards[0]["summary"].as_str().unwrap().contains("已有 1 份可互认结果"),
        "{selected}"
    );
    assert!(cards[0].get("suggestions").is_none(), "nothing is decided at select");
    // Selecting the order without a recognisable result: no card.
    let mut other = select.clone();
    other["context"]["selections"] = json!(["ServiceRequest/SR9"]);
    let selected: Value = http
        .post(format!("{}/cds-services/hmr-order-select", s.base))
        .json(&other)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(selected["cards"], json!([]), "{selected}");
    // `selections` is required by the hook.
    other["context"].as_object_mut().unwrap().remove("selections");
    let refused = http
        .post(format!("{}/cds-services/hmr-order-select", s.base))
        .json(&other)
        .send()
        .await?;
    assert_eq!(refused.status().as_u16(), 400);
    // An order coded only in another system (LOINC here) is not answered "no duplicate" (an
    // empty card list): 400 naming the coding, at select and at sign alike.
    let mut loinc = select.clone();
    loinc["context"]["draftOrders"]["entry"][0]["resource"]["code"] =
        json!({"coding": [{"system": "http://loinc.org", "code": "58410-2"}]});
    for hook in ["hmr-order-select", "hmr-order-check"] {
        let mut asked = loinc.clone();
        asked["hook"] = json!(if hook == "hmr-order-select" {
            "order-select"
        } else {
            "order-sign"
        });
        let refused = http
            .post(format!("{}/cds-services/{hook}", s.base))
            .json(&asked)
            .send()
            .await?;
        assert_eq!(refused.status().as_u16(), 400, "{hook}");
        let said: Value = refused.json().await?;
        let error = said["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("http://loinc.org") && error.contains("urn:hmr:item"),
            "{hook}: {said}"
        );
    }

    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn order_sign_and_feedback_record_the_decision() -> Result<()> {
    let (w, s) = anonymous_serve().await?;
    let http = s.http.clone();

    // order-sign: one card for the duplicate, 互认 as the suggestion, the six 不互认 reasons.
    let mut context = json!({"userId": "Practitioner/D001", "patientId": "P0001", "encounterId": "MZ001"});
    context["draftOrders"] = draft_orders(&[("SR1", "JY0001"), ("SR2", "JY0005")]);
    let sign: Value = http
        .post(format!("{}/cds-services/hmr-order-check", s.base))
        .json(&json!({"hook": "order-sign", "hookInstance": uuid_like(2), "context": context}))
        .send()
        .await?
        .json()
        .await?;
    let cards = sign["cards"].as_array().expect("cards");
    assert_eq!(cards.len(), 1, "only the duplicate: {sign}");
    let card = &cards[0];
    assert_eq!(card["indicator"], "warning");
    assert_eq!(card["selectionBehavior"], "at-most-one");
    assert_eq!(card["suggestions"][0]["actions"][0]["type"], "delete");
    assert_eq!(
        card["suggestions"][0]["actions"][0]["resourceId"][0],
        "ServiceRequest/SR1"
    );
    let reasons: Vec<&str> = card["overrideReasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["01", "02", "03", "04", "05", "06"]);
    // The same check as from SQL: the order is undecided until the feedback.
    let state: Value = w
        .his
        .query_one("SELECT hmr_order_recognition('SR1')", &[])
        .await?
        .get(0);
    assert_ne!(state["decision"], "recognised", "{state}");

    // feedback: the suggestion taken is 互认, recorded like hmr_record_decision.
    let uuid = card["uuid"].as_str().unwrap();
    let suggestion = card["suggestions"][0]["uuid"].as_str().unwrap();
    let fb = http
        .post(format!("{}/cds-services/hmr-order-check/feedback", s.base))
        .json(&json!({"feedback": [{"card": uuid, "outcome": "accepted",
                                     "acceptedSuggestions": [{"id": suggestion}],
                                     "outcomeTimestamp": "2026-12-02T09:00:00+08:00"}]}))
        .send()
        .await?;
    assert!(fb.status().is_success(), "{}", fb.text().await?);
    let state: Value = w
        .his
        .query_one("SELECT hmr_order_recognition('SR1')", &[])
        .await?
        .get(0);
    assert_eq!(state["decision"], "recognised", "{state}");
    let check: String = w
        .his
        .query_one("SELECT check_id FROM hmr.decisions WHERE order_id = 'SR1'", &[])
        .await?
        .get(0);
    assert_eq!(uuid.split('|').next(), Some(check.as_str()));

    // Overriding a card with a reason is 不互认 with that reason.
    let sign: Value = http
        .post(format!("{}/cds-services/hmr-order-check", s.base))
        .json(&json!({"hook": "order-sign", "hookInstance": uuid_like(3),
                      "context": {"userId": "Practitioner/D001", "patientId": "P0001", "encounterId": "MZ001",
                                  "draftOrders": draft_orders(&[("SR3", "JY0001")])}}))
        .send()
        .await?
        .json()
        .await?;
    let uuid = sign["cards"][0]["uuid"].as_str().expect("a card").to_string();
    let fb = http
        .post(format!("{}/cds-services/hmr-order-check/feedback", s.base))
        .json(&json!({"feedback": [{"card": uuid, "outcome": "overridden",
                                     "overrideReason": {"reason": {"system": "urn:hmr:decline-reason", "code": "04",
                                                                   "display": "急诊、急救"}},
                                     "outcomeTimestamp": "2026-12-02T09:01:00+08:00"}]}))
        .send()
        .await?;
    assert!(fb.status().is_success(), "{}", fb.text().await?);
    let (recognise, reason): (bool, Option<String>) = w
        .his
        .query_one(
            "SELECT recognise, reason_code FROM hmr.decisions WHERE order_id = 'SR3'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))?;
    assert_eq!((recognise, reason.as_deref()), (false, Some("04")));

    // The report recognised through the CDS card, once the worker has kept it.
    let report_id: String = w
        .his
        .query_one("SELECT report_id FROM hmr.decisions WHERE order_id = 'SR1'", &[])
        .await?
        .get(0);
    wait_report_kept(&w.his, &report_id).await?;
    let pdf = reqwest::get(format!("{}/api/reports/{report_id}?format=pdf", s.base)).await?;
    assert_eq!(pdf.headers()["content-type"], "application/pdf");
    assert!(pdf.bytes().await?.starts_with(b"%PDF-"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_plain_json_api_calls_the_same_functions() -> Result<()> {
    let (_w, s) = anonymous_serve().await?;
    let http = s.http.clone();

    // The plain JSON API (docs/openapi.yaml): the same functions.
    let badge: Value = reqwest::get(format!(
        "{}/api/badge?patient_id=P0001&visit_no=MZ001&doctor_no=D001",
        s.base
    ))
    .await?
    .json()
    .await?;
    assert_eq!(
        (badge["status"].as_str(), badge["count"].as_i64()),
        (Some("ok"), Some(1)),
        "{badge}"
    );
    let query: Value = http
        .post(format!("{}/api/query", s.base))
        .json(&json!({"patient_id": "P0001", "doctor_no": "D001", "data_codes": ["JY0001"]}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(query["items"].as_array().map(Vec::len), Some(1), "{query}");
    let check: Value = http
        .post(format!("{}/api/check", s.base))
        .json(&json!({"patient_id": "P0001", "visit_no": "MZ001", "doctor_no": "D001",
                      "orders": [{"order_id": "A1", "item_code": "JY0001", "type": "lab"}]}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(check["duplicate"], true, "{check}");
    let decided = http
        .post(format!("{}/api/decide", s.base))
        .json(&json!({"check_id": check["check_id"], "order_id": "A1", "recognise": false, "reason_code": "01"}))
        .send()
        .await?;
    assert!(decided.status().is_success(), "{}", decided.text().await?);
    // A refusal of the SQL function reaches the terminal with its SQLSTATE.
    let refused = http
        .post(format!("{}/api/decide", s.base))
        .json(&json!({"check_id": "no-such-check", "order_id": "A1", "recognise": true}))
        .send()
        .await?;
    assert_eq!(refused.status().as_u16(), 422);
    let refused: Value = refused.json().await?;
    assert_eq!(refused["sqlstate"], "HM003", "{refused}");
    Ok(())
}

fn uuid_like(n: u32) -> String {
    format!("d1577c69-dfbe-44ad-ba6d-3e05e953b{n:03}")
}

const AUDIENCE: &str = "https://hmr.hospital.example/cds-services";

/// Our hospital with the other hospital's 血常规 for 陈志明 (P0001) and for P0002, and
/// `hmr-worker serve` with two terminals: `ward-app` (病区移动查房, ES384) and `web-emr`
/// (门诊电子病历, an RSA key: RS384).
async fn terminals_serve() -> Result<(Workstations, Serve, Terminal, Terminal)> {
    let ward = Terminal::new("ward-app", AUDIENCE);
    let emr = Terminal::rsa("web-emr", AUDIENCE);
    let w = Workstations::start(
        &[
            (P0001_ID, "1980-03-15", "W-CBC-1", "JY0001", 1),
            (P0002_ID, "1992-11-08", "W-CBC-2", "JY0001", 1),
        ],
        &WorkerOptions {
            extra_config: Some(ward.config("病区移动查房", "") + &emr.entry("门诊电子病历")),
            ..Default::default()
        },
    )
    .await?;
    let s = serve(&w, None).await?;
    Ok((w, s, ward, emr))
}

/// The patient-view hook for P0001, as the terminals call it.
fn patient_view() -> Value {
    json!({"hook": "patient-view", "hookInstance": uuid_like(9),
           "context": {"userId": "Practitioner/D001", "patientId": "P0001", "encounterId": "MZ001"}})
}

/// With terminals configured, every call but the discovery needs a CDS Hooks JWT (ES384, or
/// RS384 from a terminal with an RSA key) of one of them; the terminal's name is recorded
/// with its badge calls; a replayed or forged token is refused.
#[tokio::test(flavor = "multi_thread")]
async fn only_a_configured_terminal_with_a_fresh_token_is_served() -> Result<()> {
    let (w, s, ward, emr) = terminals_serve().await?;
    let http = s.http.clone();
    let request = patient_view();
    let url = format!("{}/cds-services/hmr-recognitions", s.base);

    // The discovery is open; a call without a token is not.
    assert!(http
        .get(format!("{}/cds-services", s.base))
        .send()
        .await?
        .status()
        .is_success());
    assert_eq!(http.post(&url).json(&request).send().await?.status().as_u16(), 401);
    assert_eq!(
        http.get(format!("{}/api/badge?patient_id=P0001&doctor_no=D001", s.base))
            .send()
            .await?
            .status()
            .as_u16(),
        401
    );
    // A signed, fresh token of the terminal: served, and its name kept with the call.
    let t = ward.token_with("first");
    let ok = http.post(&url).bearer_auth(&t).json(&request).send().await?;
    assert!(ok.status().is_success(), "{}", ok.text().await?);
    let answer: Value = ok.json().await?;
    assert_eq!(answer["cards"].as_array().map(Vec::len), Some(1), "{answer}");
    assert_eq!(
        count(
            &w.his,
            "SELECT count(*) FROM hmr.list_log WHERE workstation = '病区移动查房'"
        )
        .await?,
        1
    );
    // A terminal with an RSA key signs RS384, and is served as itself.
    let rs = http.post(&url).bearer_auth(emr.token()).json(&request).send().await?;
    assert!(rs.status().is_success(), "{}", rs.text().await?);
    assert_eq!(
        count(
            &w.his,
            "SELECT count(*) FROM hmr.list_log WHERE workstation = '门诊电子病历'"
        )
        .await?,
        1
    );
    // The same token again: a replay.
    let replay = http.post(&url).bearer_auth(&t).json(&request).send().await?;
    assert_eq!(replay.status().as_u16(), 401);
    assert!(replay.text().await?.contains("replay"));
    // A token of another key under the same iss.
    let forger = Terminal::new("ward-app", AUDIENCE);
    assert_eq!(
        http.post(&url)
            .bearer_auth(forger.token())
            .json(&request)
            .send()
            .await?
            .status()
            .as_u16(),
        401
    );
    Ok(())
}

/// A decision a terminal makes through the JSON API is kept with the terminal's name and the
/// doctor.
#[tokio::test(flavor = "multi_thread")]
async fn a_terminals_decision_is_kept_with_its_name_and_the_doctor() -> Result<()> {
    let (w, s, ward, _emr) = terminals_serve().await?;
    let http = s.http.clone();

    let check: Value = http
        .post(format!("{}/api/check", s.base))
        .bearer_auth(ward.token())
        .json(&json!({"patient_id": "P0001", "visit_no": "MZ001", "doctor_no": "D001",
                      "orders": [{"order_id": "T1", "item_code": "JY0001", "type": "lab"}]}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(check["duplicate"], true, "{check}");
    let decided = http
        .post(format!("{}/api/decide", s.base))
        .bearer_auth(ward.token())
        .json(&json!({"check_id": check["check_id"], "order_id": "T1", "recognise": true}))
        .send()
        .await?;
    assert!(decided.status().is_success(), "{}", decided.text().await?);
    let (workstation, doctor): (Option<String>, String) = w
        .his
        .query_one(
            "SELECT workstation, doctor_no FROM hmr.decisions WHERE order_id = 'T1'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))?;
    assert_eq!(
        (workstation.as_deref(), doctor.as_str()),
        (Some("病区移动查房"), "D001")
    );
    Ok(())
}

/// A widget session a terminal opens reaches its own patient, checks and reports only, and
/// its decisions are kept with the terminal's name.
#[tokio::test(flavor = "multi_thread")]
async fn a_widget_session_reaches_its_own_patient_checks_and_reports_only() -> Result<()> {
    let (w, s, ward, _emr) = terminals_serve().await?;
    let http = s.http.clone();
    let url = format!("{}/cds-services/hmr-recognitions", s.base);

    // A check the terminal made for another patient (P0002), which the session must not reach.
    let p2_check: Value = http
        .post(format!("{}/api/check", s.base))
        .bearer_auth(ward.token())
        .json(&json!({"patient_id": "P0002", "visit_no": "MZ002", "doctor_no": "D001",
                      "orders": [{"order_id": "T2", "item_code": "JY0001", "type": "lab"}]}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(p2_check["duplicate"], true, "{p2_check}");

    // A widget session for P0001 (what a workstation embeds), and what it cannot reach.
    let opened = http
        .post(format!("{}/api/sessions", s.base))
        .bearer_auth(ward.token())
        .json(&json!({"patient_id": "P0001", "visit_no": "MZ001", "doctor_no": "D001"}))
        .send()
        .await?;
    assert!(opened.status().is_success(), "{}", opened.text().await?);
    let opened: Value = opened.json().await?;
    let session = format!("Session {}", opened["session"].as_str().unwrap());
    let widget = opened["widget"].as_str().unwrap();
    assert!(
        widget.starts_with("/widget/?patient_id=P0001&visit_no=MZ001&doctor_no=D001"),
        "{widget}"
    );
    assert!(widget.ends_with(&format!("#session={}", opened["session"].as_str().unwrap())));
    let with = |rb: reqwest::RequestBuilder| rb.header("Authorization", &session);
    let badge = with(http.get(format!("{}/api/badge", s.base))).send().await?;
    assert!(
        badge.status().is_success(),
        "the session's own patient, filled in: {}",
        badge.text().await?
    );
    let other_patient = with(http.get(format!("{}/api/badge?patient_id=P0002&doctor_no=D001", s.base)))
        .send()
        .await?;
    assert_eq!(other_patient.status().as_u16(), 403, "another patient");
    let other_check = with(http.post(format!("{}/api/decide", s.base)))
        .json(&json!({"check_id": p2_check["check_id"], "order_id": "T2", "recognise": true}))
        .send()
        .await?;
    assert_eq!(other_check.status().as_u16(), 403, "a check the session did not make");
    let p2_report = p2_check["matches"][0]["reports"][0]["report_id"].as_str().unwrap();
    let other_report = with(http.get(format!("{}/api/reports/{p2_report}", s.base)))
        .send()
        .await?;
    assert_eq!(
        other_report.status().as_u16(),
        403,
        "a report the session was not shown"
    );
    let hook = with(http.post(&url)).json(&patient_view()).send().await?;
    assert_eq!(hook.status().as_u16(), 403, "the CDS hooks are for terminals");
    let nested = with(http.post(format!("{}/api/sessions", s.base)))
        .json(&json!({"patient_id": "P0002", "doctor_no": "D001"}))
        .send()
        .await?;
    assert_eq!(nested.status().as_u16(), 403, "a session opens no other");
    // A body that is not an object is refused, and the session (and every other) still works.
    let not_object = with(http.post(format!("{}/api/check", s.base)))
        .json(&json!([]))
        .send()
        .await?;
    assert_eq!(not_object.status().as_u16(), 400);
    // Its own check and decision: allowed, kept with the terminal that opened the session.
    let own: Value = with(http.post(format!("{}/api/check", s.base)))
        .json(&json!({"orders": [{"order_id": "S1", "item_code": "JY0001", "type": "lab"}]}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(own["duplicate"], true, "{own}");
    let decided = with(http.post(format!("{}/api/decide", s.base)))
        .json(&json!({"check_id": own["check_id"], "order_id": "S1", "recognise": false, "reason_code": "03"}))
        .send()
        .await?;
    assert!(decided.status().is_success(), "{}", decided.text().await?);
    let kept: Option<String> = w
        .his
        .query_one("SELECT workstation FROM hmr.decisions WHERE order_id = 'S1'", &[])
        .await?
        .get(0);
    assert_eq!(kept.as_deref(), Some("病区移动查房"));
    let unknown = http
        .get(format!("{}/api/badge", s.base))
        .header("Authorization", "Session 00ff")
        .send()
        .await?;
    assert_eq!(unknown.status().as_u16(), 401);
    // Nothing was decided for P0002.
    assert_eq!(
        count(&w.his, "SELECT count(*) FROM hmr.decisions WHERE order_id = 'T2'").await?,
        0
    );
    Ok(())
}

/// Over TLS (rustls, the test's own certificate), and each terminal within its own budget;
/// forged tokens spend the budget of the terminal they name before any signature is checked;
/// only the configured workstation origins may frame the widget.
#[tokio::test(flavor = "multi_thread")]
async fn over_tls_each_terminal_within_its_rate() -> Result<()> {
    let dir = unique_dir("serve-tls");
    let (ca, cert, key) = test_certificates(&dir)?;
    let audience = "https://127.0.0.1/cds-services";
    let (busy, quiet) = (Terminal::new("busy", audience), Terminal::new("quiet", audience));
    let (flooded, night) = (Terminal::new("flooded", audience), Terminal::new("night", audience));
    let more = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\nrate_per_minute = 6\nburst = 3\n\
         embed_origins = [\"https://his.hospital.example\"]",
        cert.display(),
        key.display()
    );
    let config = busy.config("急诊移动端", &more)
        + &quiet.entry("体检中心")
        + &flooded.entry("住院医生站")
        + &night.entry("夜间急诊");
    let w = Workstations::start(
        &[(P0001_ID, "1980-03-15", "W-CBC-1", "JY0001", 1)],
        &WorkerOptions {
            extra_config: Some(config),
            ..Default::default()
        },
    )
    .await?;
    let s = serve(&w, Some(&ca)).await?;
    assert!(s.base.starts_with("https://"));
    let badge = |t: &Terminal| {
        s.http
            .get(format!(
                "{}/api/badge?patient_id=P0001&visit_no=MZ001&doctor_no=D001",
                s.base
            ))
            .bearer_auth(t.token())
            .send()
    };
    let first = badge(&busy).await?;
    assert!(first.status().is_success(), "{}", first.text().await?);
    // Plain HTTP on the TLS port gets no answer.
    let plain = reqwest::Client::new()
        .get(format!("{}/cds-services", s.base.replacen("https", "http", 1)))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "answered in clear: {plain:?}");
    // A burst of 3, then one call per 10 s: the fourth at once is refused with Retry-After.
    let mut statuses = vec![];
    let mut retry_after = None;
    for _ in 0..3 {
        let r = badge(&busy).await?;
        statuses.push(r.status().as_u16());
        if let Some(v) = r.headers().get("retry-after") {
            retry_after = v.to_str().ok().and_then(|v| v.parse::<u64>().ok());
        }
    }
    assert_eq!(statuses, [200, 200, 429], "the first call took one of the burst of 3");
    assert!(retry_after.is_some_and(|s| (1..=10).contains(&s)), "{retry_after:?}");
    // Another terminal has its own budget.
    assert_eq!(badge(&quiet).await?.status().as_u16(), 200);
    // Tokens forged in another terminal's name (another key): refused, and each takes the
    // budget of refused tokens of its source address in that terminal's name, so a flood costs
    // no signature checks beyond it (then 429, until it refills). The genuine terminal shares
    // it only from the same address, as here; from elsewhere it goes on (serve_attacks.rs, J10).
    let forger = Terminal::new("flooded", audience);
    let mut forged = vec![];
    for _ in 0..4 {
        forged.push(badge(&forger).await?.status().as_u16());
    }
    assert_eq!(forged, [401, 401, 401, 429]);
    assert_eq!(badge(&flooded).await?.status().as_u16(), 429);
    assert_eq!(badge(&quiet).await?.status().as_u16(), 200, "the others go on");
    // The widget's pages may be framed by the hospital's workstation origins only.
    let page = s.http.get(format!("{}/widget/", s.base)).send().await?;
    let csp = page
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        csp.contains("frame-ancestors 'self' https://his.hospital.example"),
        "{csp}"
    );
    assert!(csp.contains("default-src 'self'"), "{csp}");
    // The database crashes and comes back: the service answers again without a restart of
    // its own (its connections are replaced), and while it is down it says so (503).
    w.cluster.fail()?;
    let down = badge(&night).await?;
    assert_eq!(down.status().as_u16(), 503);
    let said: Value = down.json().await?;
    assert_eq!(
        said["error"], "数据库暂不可用，请稍后重试",
        "no database message: {said}"
    );
    // A hook says so too: no cards would read as "no duplicates". (By `quiet`, whose last
    // call of its burst this is: `night` keeps its budget for the wait below.)
    let hook = s
        .http
        .post(format!("{}/cds-services/hmr-recognitions", s.base))
        .bearer_auth(quiet.token())
        .json(
            &json!({"hook": "patient-view", "hookInstance": "d0d0d0d0-0000-4000-8000-000000000001",
                      "context": {"userId": "Practitioner/D001", "patientId": "P0001", "encounterId": "MZ001"}}),
        )
        .send()
        .await?;
    assert_eq!(hook.status().as_u16(), 503, "{}", hook.text().await?);
    w.cluster.start_again()?;
    // The database first (its restart takes seconds on a loaded machine), then serve, asked
    // once a second: every answer before the pool's connections are replaced (up to one 503 per
    // pooled connection) spends `night`'s budget (burst 3, then one call per 10 s), and polling
    // faster only spent it sooner (this wait timed out under CI load).
    wait_until(Duration::from_secs(30), "the database back", || async {
        Ok(w.cluster.connect("his").await.is_ok())
    })
    .await?;
    let mut statuses = vec![];
    for _ in 0..60 {
        statuses.push(badge(&night).await?.status().as_u16());
        if statuses.last() == Some(&200) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        statuses.last(),
        Some(&200),
        "serve answers again within a minute of the database's return; it answered {statuses:?}; its log: {}",
        std::fs::read_to_string(&s.log).unwrap_or_default()
    );
    Ok(())
}
