//! Issue #29: attacks on `hmr-worker serve` from the ward network, each run as the real roles
//! (an unauthenticated client, a terminal with its key, a forger without it) against serve as
//! a process. The attacker comes from 127.0.0.2, the genuine terminal from 127.0.0.1: two
//! source addresses on one machine (all of 127/8 is this machine's loopback).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use hmr_e2e::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const P0001_ID: &str = "441302198003151233";
const AUDIENCE: &str = "https://hmr.hospital.example/cds-services";
const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// How long a genuine terminal may wait for its answer while an attack runs. Issue #29 asks
/// for an answer within 1 s; the bound is generous for a loaded 2-core CI machine, and far
/// below what the attacks caused (28.6 s, or no answer at all).
const ANSWERED_WITHIN: Duration = Duration::from_secs(2);

/// Our hospital with the other hospital's 血常规 for P0001, and serve with two terminals,
/// `ward-app` (病区移动查房) and `web-emr` (门诊电子病历); `more`: more `[serve]` lines.
async fn terminals_serve(more: &str) -> Result<(Workstations, Serve, Terminal, Terminal)> {
    let ward = Terminal::new("ward-app", AUDIENCE);
    let emr = Terminal::rsa("web-emr", AUDIENCE);
    let w = Workstations::start(
        &[(P0001_ID, "1980-03-15", "W-CBC-1", "JY0001", 1)],
        &WorkerOptions {
            extra_config: Some(ward.config("病区移动查房", more) + &emr.entry("门诊电子病历")),
            ..Default::default()
        },
    )
    .await?;
    let s = serve(&w, None).await?;
    Ok((w, s, ward, emr))
}

fn badge_url(s: &Serve) -> String {
    format!("{}/api/badge?patient_id=P0001&visit_no=MZ001&doctor_no=D001", s.base)
}

/// A fresh HTTP client (its own connections) calling from `from`.
fn client_from(from: IpAddr) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .local_address(from)
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// serve's `127.0.0.1:PORT`.
fn address(s: &Serve) -> std::net::SocketAddr {
    s.base.trim_start_matches("http://").parse().expect("serve's address")
}

/// A TCP connection to serve from `from`.
async fn connect_from(from: IpAddr, to: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// The genuine terminal's badge call, timed: (status, how long it took).
async fn timed_badge(s: &Serve, t: &Terminal) -> Result<(u16, Duration)> {
    let http = client_from(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
    let started = Instant::now();
    let status = match http.get(badge_url(s)).bearer_auth(t.token()).send().await {
        Ok(r) => r.status().as_u16(),
        Err(e) => {
            eprintln!("the genuine call failed: {e}");
            0
        }
    };
    Ok((status, started.elapsed()))
}

/// N4: one unauthenticated client holds ~600 idle sockets and reopens each one serve drops.
/// serve closes its connections beyond `max_connections_per_client` (default 32) at once, so
/// the genuine terminal, from another address, is answered at once.
#[tokio::test(flavor = "multi_thread")]
async fn n4_a_client_hoarding_idle_sockets_does_not_starve_a_terminal() -> Result<()> {
    let (_w, s, ward, _emr) = terminals_serve("").await?;
    let to = address(&s);
    let stop = Arc::new(AtomicBool::new(false));
    let (open, closed_by_serve) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let connects = Arc::new(AtomicUsize::new(0));
    let mut hoarders = vec![];
    for _ in 0..600 {
        let (stop, open, closed) = (stop.clone(), open.clone(), closed_by_serve.clone());
        let connects = connects.clone();
        hoarders.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // Connect, send nothing, wait for serve to drop it, then reopen (a second later).
                if let Ok(Ok(mut tcp)) = tokio::time::timeout(Duration::from_secs(5), connect_from(ATTACKER, to)).await
                {
                    open.fetch_add(1, Ordering::Relaxed);
                    connects.fetch_add(1, Ordering::Relaxed);
                    let mut buf = [0u8; 64];
                    let dropped = tokio::select! {
                        r = tcp.read(&mut buf) => matches!(r, Ok(0) | Err(_)),
                        _ = async { while !stop.load(Ordering::Relaxed) { tokio::time::sleep(Duration::from_millis(100)).await } } => false,
                    };
                    open.fetch_sub(1, Ordering::Relaxed);
                    if dropped {
                        closed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }
    // The attack is on: every socket connected once (held by serve, waiting in its backlog,
    // or closed and being reopened).
    wait_until(Duration::from_secs(20), "the hoarder's sockets connected", || async {
        Ok(connects.load(Ordering::Relaxed) >= 600)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut latencies = vec![];
    for _ in 0..3 {
        let (status, took) = timed_badge(&s, &ward).await?;
        assert_eq!(status, 200, "the genuine terminal's call after {took:?}");
        latencies.push(took);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    eprintln!(
        "N4: genuine terminal answered in {latencies:?} while {} hoarded sockets were open; {} connects, serve closed {}",
        open.load(Ordering::Relaxed),
        connects.load(Ordering::Relaxed),
        closed_by_serve.load(Ordering::Relaxed)
    );
    for took in &latencies {
        assert!(*took < ANSWERED_WITHIN, "answered after {latencies:?}");
    }
    // Beyond its share the hoarder's connections were closed at once, not left to time out.
    assert!(
        closed_by_serve.load(Ordering::Relaxed) >= 500,
        "closed: {}",
        closed_by_serve.load(Ordering::Relaxed)
    );
    for h in hoarders {
        let _ = h.await;
    }
    Ok(())
}

/// N5: one terminal (with its key) opens 300 POSTs that promise a 100 kB body and never send
/// it. serve admits its share of them (32), answers those 408 once `body_timeout_secs` (10 s)
/// pass, closes the rest at once, and the other terminal is answered meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn n5_bodies_that_never_come_hold_nothing_for_long() -> Result<()> {
    // A generous budget: the attack is the stalled bodies, not the rate.
    let (_w, s, ward, emr) = terminals_serve("rate_per_minute = 60000\nburst = 1000").await?;
    let to = address(&s);
    let started = Instant::now();
    let mut stalled = vec![];
    for _ in 0..300 {
        let request = format!(
            "POST /api/query HTTP/1.1\r\nHost: {to}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{\"id_type\":",
            ward.token()
        );
        stalled.push(tokio::spawn(async move {
            // What serve said, and when the connection ended: (answer, elapsed).
            let Ok(mut tcp) = connect_from(ATTACKER, to).await else {
                return (String::from("not connected"), Duration::ZERO);
            };
            let _ = tcp.write_all(request.as_bytes()).await;
            let mut answer = vec![];
            let _ = tokio::time::timeout(Duration::from_secs(40), tcp.read_to_end(&mut answer)).await;
            (String::from_utf8_lossy(&answer).to_string(), started.elapsed())
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, took) = timed_badge(&s, &emr).await?;
    eprintln!("N5: the other terminal answered {status} in {took:?} while 300 bodies stalled");
    assert_eq!(status, 200, "after {took:?}");
    assert!(took < ANSWERED_WITHIN, "answered after {took:?}");
    let mut timed_out = 0;
    let mut closed_at_once = 0;
    for h in stalled {
        let (answer, ended) = h.await?;
        if answer.starts_with("HTTP/1.1 408") {
            timed_out += 1;
            assert!(
                ended > Duration::from_secs(8) && ended < Duration::from_secs(30),
                "408 after {ended:?}"
            );
        } else if answer.is_empty() && ended < Duration::from_secs(5) {
            closed_at_once += 1;
        } else {
            panic!("a stalled request held on: {ended:?} {answer:?}");
        }
    }
    eprintln!("N5: {timed_out} answered 408, {closed_at_once} closed at once (beyond the client's share)");
    assert!((1..=32).contains(&timed_out), "{timed_out} answered 408");
    assert_eq!(timed_out + closed_at_once, 300);
    Ok(())
}

/// J10: tokens forged in a terminal's `iss` (another key, or no signature at all), from
/// another address. They are refused, and past the budget of refused tokens that address is
/// refused before any signature check; the genuine terminal's own budget is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn j10_a_forger_without_the_key_cannot_lock_a_terminal_out() -> Result<()> {
    // A burst of 60 that refills slowly (one call per 10 s): the forger's 61st comes too soon.
    let (_w, s, ward, _emr) = terminals_serve("rate_per_minute = 6\nburst = 60").await?;
    let forger = Terminal::new("ward-app", AUDIENCE);
    let http = client_from(ATTACKER)?;
    let mut statuses = vec![];
    for i in 0..70 {
        let token = if i % 2 == 0 {
            forger.token()
        } else {
            // Signed with no key: the genuine header and claims, an empty signature.
            let t = forger.token();
            format!("{}.", t.rsplit_once('.').expect("a JWT").0)
        };
        statuses.push(
            http.get(badge_url(&s))
                .bearer_auth(token)
                .send()
                .await?
                .status()
                .as_u16(),
        );
    }
    assert!(
        statuses[..60].iter().all(|s| *s == 401),
        "the first 60 refused: {statuses:?}"
    );
    assert!(
        statuses[60..].iter().all(|s| *s == 429),
        "then the forger's address is held off: {statuses:?}"
    );
    // The genuine terminal (its burst is 60 calls) is served, again and again.
    let genuine = client_from(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
    for _ in 0..5 {
        let r = genuine.get(badge_url(&s)).bearer_auth(ward.token()).send().await?;
        assert_eq!(r.status().as_u16(), 200, "{}", r.text().await?);
    }
    Ok(())
}

/// J8: a token used once is refused when replayed, by this serve and by the next one after a
/// restart (the used jtis are kept in the database, `hmr.serve_jti`).
#[tokio::test(flavor = "multi_thread")]
async fn j8_a_replayed_token_is_refused_after_serve_restarts() -> Result<()> {
    let (w, s, ward, _emr) = terminals_serve("").await?;
    let token = ward.token();
    let first = s.http.get(badge_url(&s)).bearer_auth(&token).send().await?;
    assert_eq!(first.status().as_u16(), 200, "{}", first.text().await?);
    let replay = s.http.get(badge_url(&s)).bearer_auth(&token).send().await?;
    assert_eq!(replay.status().as_u16(), 401);
    drop(s);
    let s = serve(&w, None).await?;
    let replay = s.http.get(badge_url(&s)).bearer_auth(&token).send().await?;
    let status = replay.status().as_u16();
    let said: Value = replay.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 401, "the replay after a restart: {said}");
    assert!(said["error"].as_str().unwrap_or_default().contains("replay"), "{said}");
    // A fresh token is served, and the used ids are the definer function's alone: a HIS login
    // can neither read nor write them.
    let fresh = s.http.get(badge_url(&s)).bearer_auth(ward.token()).send().await?;
    assert_eq!(fresh.status().as_u16(), 200);
    assert_eq!(
        count(&w.his, "SELECT count(*) FROM hmr.serve_jti WHERE iss = 'ward-app'").await?,
        2
    );
    let his = w.cluster.connect_as("his", "serve_app").await?;
    let read = his.query("SELECT * FROM hmr.serve_jti", &[]).await;
    assert!(read.is_err(), "a HIS login read the used token ids");
    let write = his
        .query("DELETE FROM hmr.serve_jti", &[])
        .await
        .map_err(|e| e.code().map(|c| c.code().to_string()));
    assert_eq!(write.err().flatten().as_deref(), Some("42501"));
    Ok(())
}

/// Our hospital, the other hospital named `other_org_name` on the platform, and serve without
/// terminals (loopback only, nothing checked).
async fn anonymous_serve_with(other_org_name: &str) -> Result<(Workstations, Serve)> {
    let w = Workstations::start_on(
        Sim::start_named(other_org_name)?,
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

/// W6: DNS rebinding. With `anonymous = true` on loopback, a page of `rebind.attacker.example`
/// whose name resolves to 127.0.0.1 would call serve from the doctor's browser; its requests
/// say `Host: rebind.attacker.example` and are refused (421) with no patient data.
#[tokio::test(flavor = "multi_thread")]
async fn w6_a_request_for_another_host_is_refused() -> Result<()> {
    let (_w, s) = anonymous_serve_with(OTHER_ORG_NAME).await?;
    let port = address(&s).port();
    let ask = |host: String| s.http.get(badge_url(&s)).header("Host", host).send();
    let rebound = ask(format!("rebind.attacker.example:{port}")).await?;
    assert_eq!(rebound.status().as_u16(), 421);
    let said = rebound.text().await?;
    assert!(
        !said.contains("count") && said.contains("rebind.attacker.example"),
        "{said}"
    );
    let hook = s
        .http
        .post(format!("{}/cds-services/hmr-recognitions", s.base))
        .header("Host", "rebind.attacker.example")
        .json(
            &json!({"hook": "patient-view", "hookInstance": "d0d0d0d0-0000-4000-8000-0000000000a1",
                      "context": {"userId": "Practitioner/D001", "patientId": "P0001", "encounterId": "MZ001"}}),
        )
        .send()
        .await?;
    assert_eq!(hook.status().as_u16(), 421);
    // By this machine's own names it is answered.
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "LOCALHOST".into(),
    ] {
        let r = ask(host.clone()).await?;
        assert_eq!(r.status().as_u16(), 200, "{host}");
        let answer: Value = r.json().await?;
        assert_eq!(answer["count"], 1, "{host}: {answer}");
    }
    Ok(())
}

/// W5: the other hospital's name carries HTML and a Markdown link to a phishing page. It
/// reaches order-select's and order-sign's cards escaped: no tag, no link.
#[tokio::test(flavor = "multi_thread")]
async fn w5_the_platforms_text_in_a_card_is_escaped() -> Result<()> {
    let hostile = "惠州<img src=x onerror=alert(1)>[点此复核](http://evil.example/phish)";
    let (_w, s) = anonymous_serve_with(hostile).await?;
    let draft = json!({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {
        "resourceType": "ServiceRequest", "id": "SR1", "status": "draft", "intent": "order",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "108252007"}]}],
        "code": {"coding": [{"system": "urn:hmr:item", "code": "JY0001"}]}}}]});
    let context = json!({"userId": "Practitioner/D001", "patientId": "P0001", "encounterId": "MZ001",
                         "selections": ["ServiceRequest/SR1"], "draftOrders": draft});
    for (service, hook) in [("hmr-order-select", "order-select"), ("hmr-order-check", "order-sign")] {
        let answer: Value = s
            .http
            .post(format!("{}/cds-services/{service}", s.base))
            .json(&json!({"hook": hook, "hookInstance": "d0d0d0d0-0000-4000-8000-0000000000b1", "context": context}))
            .send()
            .await?
            .json()
            .await?;
        let cards = answer["cards"].as_array().cloned().unwrap_or_default();
        assert_eq!(cards.len(), 1, "{hook}: {answer}");
        if hook == "order-sign" {
            assert!(
                cards[0]["summary"].as_str().unwrap_or_default().contains("惠州"),
                "{answer}"
            );
        }
        for field in ["summary", "detail"] {
            let text = cards[0][field].as_str().unwrap_or_default();
            for raw in ["<img", "](", "[点此复核]", "http://"] {
                assert!(!text.contains(raw), "{hook} {field} carries {raw}: {text}");
            }
        }
        let detail = cards[0]["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("惠州&lt;img src\\=x onerror\\=alert\\(1\\)&gt;\\[点此复核\\]"),
            "{hook}: the name, escaped: {detail}"
        );
    }
    Ok(())
}

/// T1, decided: the hospital's terminals are one trust domain. A check made at one terminal
/// (病区移动查房) is decided at another (门诊电子病历), as a doctor who signs at one workstation
/// and decides at another does; the decision keeps the terminal it came from. A NUL in the
/// reason is a 400 naming the field, not "the database is unavailable".
#[tokio::test(flavor = "multi_thread")]
async fn t1_terminals_are_one_trust_domain_and_each_decision_keeps_its_terminal() -> Result<()> {
    let (w, s, ward, emr) = terminals_serve("").await?;
    let check: Value = s
        .http
        .post(format!("{}/api/check", s.base))
        .bearer_auth(ward.token())
        .json(&json!({"patient_id": "P0001", "visit_no": "MZ001", "doctor_no": "D001",
                      "orders": [{"order_id": "T1-1", "item_code": "JY0001", "type": "lab"}]}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(check["duplicate"], true, "{check}");
    let nul = s
        .http
        .post(format!("{}/api/decide", s.base))
        .bearer_auth(emr.token())
        .json(
            &json!({"check_id": check["check_id"], "order_id": "T1-1", "recognise": false,
                      "reason_code": "06", "reason_text": "复查\u{0}"}),
        )
        .send()
        .await?;
    assert_eq!(nul.status().as_u16(), 400);
    let answer: Value = nul.json().await?;
    assert_eq!(answer["field"], "reason_text", "{answer}");
    let decided = s
        .http
        .post(format!("{}/api/decide", s.base))
        .bearer_auth(emr.token())
        .json(&json!({"check_id": check["check_id"], "order_id": "T1-1", "recognise": true}))
        .send()
        .await?;
    assert_eq!(decided.status().as_u16(), 200, "{}", decided.text().await?);
    let terminal: Option<String> = w
        .his
        .query_one("SELECT workstation FROM hmr.decisions WHERE order_id = 'T1-1'", &[])
        .await?
        .get(0);
    assert_eq!(terminal.as_deref(), Some("门诊电子病历"));
    Ok(())
}
