//! `hmr-worker serve`: the recognition services as a CDS Hooks 2.0 service, over the same SQL
//! functions (one set of checks, decisions and outbox). Requests and answers use the field
//! names of the specification (`docs/design/cds-hooks.md`).

use std::time::Duration;

use anyhow::Result;
use hmr_e2e::*;
use serde_json::{json, Value};

const P0001_ID: &str = "441302198003151233";

struct Serve {
    child: std::process::Child,
    base: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(worker: &Worker) -> Result<Serve> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = std::process::Command::new(bin_dir().join("hmr-worker"))
        .arg("--config")
        .arg(&worker.config_path)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let s = Serve {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    wait_until(Duration::from_secs(20), "the CDS service", || async {
        Ok(reqwest::get(format!("{}/cds-services", s.base)).await.is_ok())
    })
    .await?;
    Ok(s)
}

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

#[tokio::test(flavor = "multi_thread")]
async fn cds_hooks_badge_order_sign_and_feedback_record_the_decision() -> Result<()> {
    let w = Workstations::start(
        &[(P0001_ID, "1980-03-15", "W-CBC-1", "JY0001", 1)],
        &WorkerOptions::default(),
    )
    .await?;
    let s = serve(&w.worker).await?;
    let http = reqwest::Client::new();

    // Discovery.
    let services: Value = reqwest::get(format!("{}/cds-services", s.base)).await?.json().await?;
    let hooks: Vec<&str> = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["hook"].as_str().unwrap())
        .collect();
    assert_eq!(hooks, ["patient-view", "order-sign"], "{services}");
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

    // order-sign: one card for the duplicate, 互认 as the suggestion, the six 不互认 reasons.
    let mut context = context.clone();
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

    // A request without the patient is refused with a 4xx, not answered with empty cards.
    let bad = http
        .post(format!("{}/cds-services/hmr-recognitions", s.base))
        .json(
            &json!({"hook": "patient-view", "hookInstance": uuid_like(4), "context": {"userId": "Practitioner/D001"}}),
        )
        .send()
        .await?;
    assert_eq!(bad.status().as_u16(), 400);

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
    // The report recognised through the CDS card, once the worker has kept it.
    let report_id: String = w
        .his
        .query_one("SELECT report_id FROM hmr.decisions WHERE order_id = 'SR1'", &[])
        .await?
        .get(0);
    wait_until(Duration::from_secs(30), "the recognised report kept", || async {
        Ok(count(
            &w.his,
            &format!("SELECT count(*) FROM hmr.retained_reports WHERE report_id = '{report_id}'"),
        )
        .await?
            >= 1)
    })
    .await?;
    let pdf = reqwest::get(format!("{}/api/reports/{report_id}?format=pdf", s.base)).await?;
    assert_eq!(pdf.headers()["content-type"], "application/pdf");
    assert!(pdf.bytes().await?.starts_with(b"%PDF-"));
    Ok(())
}

fn uuid_like(n: u32) -> String {
    format!("d1577c69-dfbe-44ad-ba6d-3e05e953b{n:03}")
}

/// With terminals configured, every call but the discovery needs a CDS Hooks JWT (ES384) of
/// one of them; the terminal's name is recorded with its badge calls; a replayed token is
/// refused.
#[tokio::test(flavor = "multi_thread")]
async fn only_a_configured_terminal_with_a_fresh_token_is_served() -> Result<()> {
    use base64::Engine as _;
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let public = pair.public_key().as_ref().to_vec();
    let audience = "https://hmr.hospital.example/cds-services";
    let config = format!(
        "[serve]\naudience = \"{audience}\"\n\n[[serve.terminals]]\niss = \"ward-app\"\nname = \"病区移动查房\"\n\
         jwk = {{ kty = \"EC\", crv = \"P-384\", x = \"{}\", y = \"{}\" }}\n",
        b64.encode(&public[1..49]),
        b64.encode(&public[49..])
    );
    let w = Workstations::start(
        &[(P0001_ID, "1980-03-15", "W-CBC-1", "JY0001", 1)],
        &WorkerOptions {
            extra_config: Some(config),
            ..Default::default()
        },
    )
    .await?;
    let s = serve(&w.worker).await?;
    let http = reqwest::Client::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let token = |jti: &str| {
        let h = b64.encode(json!({"alg": "ES384", "typ": "JWT"}).to_string());
        let p = b64
            .encode(json!({"iss": "ward-app", "aud": audience, "exp": now + 300, "iat": now, "jti": jti}).to_string());
        let sig = pair.sign(&rng, format!("{h}.{p}").as_bytes()).unwrap();
        format!("{h}.{p}.{}", b64.encode(sig.as_ref()))
    };
    let request = json!({"hook": "patient-view", "hookInstance": uuid_like(9),
                         "context": {"userId": "Practitioner/D001", "patientId": "P0001", "encounterId": "MZ001"}});
    let url = format!("{}/cds-services/hmr-recognitions", s.base);

    // The discovery is open; a call without a token is not.
    assert!(reqwest::get(format!("{}/cds-services", s.base))
        .await?
        .status()
        .is_success());
    assert_eq!(http.post(&url).json(&request).send().await?.status().as_u16(), 401);
    assert_eq!(
        reqwest::get(format!("{}/api/badge?patient_id=P0001&doctor_no=D001", s.base))
            .await?
            .status()
            .as_u16(),
        401
    );
    // A signed, fresh token of the terminal: served, and its name kept with the call.
    let t = token("first");
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
    // The same token again: a replay.
    let replay = http.post(&url).bearer_auth(&t).json(&request).send().await?;
    assert_eq!(replay.status().as_u16(), 401);
    assert!(replay.text().await?.contains("replay"));
    // A token of another key.
    let other_pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng).unwrap();
    let other = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, other_pkcs8.as_ref(), &rng).unwrap();
    let h = b64.encode(json!({"alg": "ES384"}).to_string());
    let p =
        b64.encode(json!({"iss": "ward-app", "aud": audience, "exp": now + 300, "iat": now, "jti": "x"}).to_string());
    let forged = format!(
        "{h}.{p}.{}",
        b64.encode(other.sign(&rng, format!("{h}.{p}").as_bytes()).unwrap().as_ref())
    );
    assert_eq!(
        http.post(&url)
            .bearer_auth(&forged)
            .json(&request)
            .send()
            .await?
            .status()
            .as_u16(),
        401
    );
    Ok(())
}
