//! The control API: every fault kind, the request journal, state, summary, reset; and the
//! simulator served on a real socket.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hmr_platform_sim::{Catalog, SimConfig};
use hmr_protocol::paths;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn batch() -> paths::Request {
    paths::departments(&[dept("D1", None)])
}

#[tokio::test]
async fn status_faults_count_and_fraction() {
    let h = Harness::new();
    h.token(&h.hz1, hmr_protocol::Scope::HisUpload).await;
    let r = h
        .control("POST", "/_sim/faults", Some(json!({"status": 503, "count": 2})))
        .await;
    assert_eq!(r.json["faults"]["status"], 503);
    let id = rid();
    for _ in 0..2 {
        let r = h.send_id(&h.hz1, &batch(), &id).await;
        assert_eq!((r.status, r.json["code"].as_str()), (503, Some("B0001")));
        assert_eq!(h.last_effect().await, "fault");
    }
    // A 5xx is not remembered: the retry with the same id gets a fresh answer.
    assert_eq!(h.send_id(&h.hz1, &batch(), &id).await.status, 200);
    assert_eq!(h.last_effect().await, "applied");
    // Faults never apply to the control API.
    h.control("POST", "/_sim/faults", Some(json!({"status": 500, "fraction": 1.0})))
        .await;
    assert_eq!(h.control("GET", "/_sim/state", None).await.status, 200);
    assert_eq!(h.send(&h.hz1, &batch()).await.status, 500);
    h.control("POST", "/_sim/faults", Some(json!({"status": 500, "fraction": 0.0})))
        .await;
    assert_eq!(h.send(&h.hz1, &batch()).await.status, 200);
    // path_prefix limits where they apply.
    h.control(
        "POST",
        "/_sim/faults",
        Some(json!({"status": 502, "path_prefix": "/api/v1/lab-reports"})),
    )
    .await;
    assert_eq!(h.send(&h.hz1, &batch()).await.status, 200);
    // Bad specs are refused.
    assert_eq!(
        h.control("POST", "/_sim/faults", Some(json!({"count": 2})))
            .await
            .status,
        400
    );
    assert_eq!(
        h.control("POST", "/_sim/faults", Some(json!({"bogus": 1})))
            .await
            .status,
        400
    );
    h.control("DELETE", "/_sim/faults", None).await;
}

#[tokio::test]
async fn rate_limit_holds_for_the_org() {
    let h = Harness::new();
    h.token(&h.hz1, hmr_protocol::Scope::HisUpload).await;
    h.token(&h.hz2, hmr_protocol::Scope::HisUpload).await;
    h.control(
        "POST",
        "/_sim/faults",
        Some(json!({"rate_limit": {"retry_after_secs": 30, "count": 1}})),
    )
    .await;
    let r = h.send(&h.hz1, &batch()).await;
    assert_eq!((r.status, r.json["code"].as_str()), (429, Some("A0429")));
    assert_eq!(r.headers["retry-after"], "30");
    // The count is spent, but the Retry-After still holds for hz1 on any path.
    let r = h.send(&h.hz1, &paths::staff(&[staff("S1", "D1")])).await;
    assert_eq!(r.status, 429);
    assert!(r.headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() <= 30);
    assert_eq!(h.send(&h.hz2, &batch()).await.status, 200);
    let faults = h.control("GET", "/_sim/faults", None).await.json;
    assert!(faults["holds"][&h.hz1.code].is_string());
    // The hold ends with its window (moved by the clock here).
    h.control("POST", "/_sim/clock", Some(json!({"offset_secs": 31}))).await;
    assert_eq!(h.send(&h.hz1, &batch()).await.status, 200);
}

#[tokio::test]
async fn hang_until_cleared_and_latency() {
    let h = Harness::new();
    let token = h.token(&h.hz1, hmr_protocol::Scope::HisUpload).await;
    h.control("POST", "/_sim/faults", Some(json!({"hang": true}))).await;
    let req = h.build(&batch(), &h.hz1.code, Some(&token), &rid());
    let app = h.app.clone();
    let pending = tokio::spawn(async move {
        use tower::ServiceExt;
        app.oneshot(req).await.unwrap().status().as_u16()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished(), "a hanging request must not answer");
    // Control still answers while requests hang.
    assert_eq!(h.control("GET", "/_sim/summary", None).await.status, 200);
    h.control("DELETE", "/_sim/faults", None).await;
    let status = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);

    h.control("POST", "/_sim/faults", Some(json!({"latency_ms": 150})))
        .await;
    let started = Instant::now();
    assert_eq!(h.send(&h.hz1, &batch()).await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(150));
    h.control("POST", "/_sim/reset", None).await;
}

#[tokio::test]
async fn journal_state_summary_and_reset() {
    let h = Harness::new();
    let p = patient("P1", &id_no("19900307", "123"));
    h.setup_patient(&h.hz1, &p).await;
    let report = lab("L1", 1, &p, Some("JY0001"), ago(1, 0));
    let id = rid();
    h.send_id(&h.hz1, &paths::lab_report(&report), &id).await;
    h.send_id(&h.hz1, &paths::lab_report(&report), &id).await;
    h.send(
        &h.hz1,
        &paths::pdf(hmr_protocol::ReportType::Lab, "L1", 1, pdf_bytes("x")),
    )
    .await;

    let j = h.journal().await;
    let effects: Vec<_> = j.iter().map(|e| e["effect"].as_str().unwrap()).collect();
    assert_eq!(
        effects,
        vec!["auth", "applied", "auth", "applied", "replayed", "applied"]
    );
    assert_eq!(j[0]["body"]["password"], "***");
    let upload = &j[3];
    assert_eq!(upload["method"], "POST");
    assert_eq!(upload["path"], "/api/v1/lab-reports");
    assert_eq!(upload["request_id"], id.as_str());
    assert_eq!(upload["scope"], "lab-upload");
    assert_eq!(upload["org"], h.hz1.code.as_str());
    assert_eq!(upload["status"], 200);
    assert_eq!(upload["body"]["reportNo"], "L1");
    assert_eq!(j[5]["body"]["sha256"].as_str().unwrap().len(), 64);
    let since = j[3]["seq"].as_u64().unwrap();
    let later = h
        .control("GET", &format!("/_sim/requests?since={since}"), None)
        .await
        .json;
    assert_eq!(later["requests"].as_array().unwrap().len(), 2);

    let state = h.control("GET", "/_sim/state", None).await.json;
    let v = &state["orgs"][&h.hz1.code]["lab_reports"]["L1"]["versions"][0];
    assert_eq!(
        (v["has_pdf"].as_bool(), v["data_code"].as_str()),
        (Some(true), Some("JY0001"))
    );
    assert_eq!(state["orgs"][&h.hz1.code]["patients"]["P1"]["name"], "张三");

    let summary = String::from_utf8(h.control("GET", "/_sim/summary", None).await.body.to_vec()).unwrap();
    assert!(summary.contains("lab L1 v1 +pdf dataCode=JY0001 items=1"), "{summary}");

    h.control("POST", "/_sim/reset", None).await;
    assert!(h.journal().await.is_empty());
    let state = h.control("GET", "/_sim/state", None).await.json;
    assert_eq!(state["orgs"][&h.hz1.code]["patients"], json!({}));
    assert_eq!(state["tokens"], 0);
}

#[tokio::test]
async fn serves_on_a_real_socket() {
    let config = SimConfig::new(Catalog::from_csv(CATALOG).unwrap());
    let (addr, sim, task) = hmr_platform_sim::spawn(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        sim.config().public_url.as_deref(),
        Some(format!("http://{addr}").as_str())
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /_sim/summary HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("惠州市第一人民医院"));
    task.abort();
}
