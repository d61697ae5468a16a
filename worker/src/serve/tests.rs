use super::*;
use base64::Engine as _;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};

fn key() -> (EcdsaKeyPair, crate::config::Jwk) {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let public = pair.public_key().as_ref().to_vec();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwk = crate::config::Jwk {
        kty: "EC".into(),
        crv: Some("P-384".into()),
        x: Some(b64.encode(&public[1..49])),
        y: Some(b64.encode(&public[49..])),
        ..Default::default()
    };
    (pair, jwk)
}

fn token(pair: &EcdsaKeyPair, claims: Value, alg: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let h = b64.encode(json!({"alg": alg, "typ": "JWT"}).to_string());
    let p = b64.encode(claims.to_string());
    let sig = pair
        .sign(&ring::rand::SystemRandom::new(), format!("{h}.{p}").as_bytes())
        .unwrap();
    format!("{h}.{p}.{}", b64.encode(sig.as_ref()))
}

#[test]
fn a_terminal_past_its_budget_waits_and_others_go_on() {
    let limits = RateLimits::new(60, 3);
    let t0 = Instant::now();
    for _ in 0..3 {
        assert_eq!(limits.take("ward-app", t0), Ok(()));
    }
    let wait = limits.take("ward-app", t0).unwrap_err();
    assert!(
        wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
        "{wait:?}"
    );
    assert_eq!(limits.take("clinic", t0), Ok(()), "another terminal has its own budget");
    assert_eq!(
        limits.take("ward-app", t0 + Duration::from_secs(1)),
        Ok(()),
        "one a second comes back"
    );
    assert!(limits.take("ward-app", t0 + Duration::from_secs(1)).is_err());
    // Idle for long, it gets its burst back and no more.
    let later = t0 + Duration::from_secs(3600);
    for _ in 0..3 {
        assert_eq!(limits.take("ward-app", later), Ok(()));
    }
    assert!(limits.take("ward-app", later).is_err());
    // Asking spends nothing.
    let fresh = t0 + Duration::from_secs(7200);
    for _ in 0..10 {
        assert_eq!(limits.has("clinic", fresh), Ok(()));
    }
}

#[test]
fn a_session_reaches_its_own_patient_and_what_it_was_shown_only() {
    let sessions = Sessions::new(Duration::from_secs(60));
    let (token, _) = sessions.open(Session {
        terminal: "门诊医生站".into(),
        patient_id: "P0001".into(),
        visit_no: "MZ001".into(),
        doctor_no: "D001".into(),
        visit_type: "1".into(),
        until: Instant::now(),
        seen: HashSet::new(),
    });
    let caller = Caller {
        name: sessions.terminal(&token),
        session: Some(token.clone()),
    };
    assert_eq!(caller.name.as_deref(), Some("门诊医生站"));
    let mut body = json!({"orders": []});
    sessions.bind(&caller, &mut body).unwrap();
    assert_eq!(
        (body["patient_id"].as_str(), body["doctor_no"].as_str()),
        (Some("P0001"), Some("D001"))
    );
    let mut other = json!({"patient_id": "P0002"});
    assert_eq!(sessions.bind(&caller, &mut other).unwrap_err().0, StatusCode::FORBIDDEN);
    let mut inpatient = json!({"visit_type": "3"});
    assert_eq!(
        sessions.bind(&caller, &mut inpatient).unwrap_err().0,
        StatusCode::FORBIDDEN
    );
    // Not an object: refused, and the sessions still work (no lock poisoned).
    assert_eq!(
        sessions.bind(&caller, &mut json!([])).unwrap_err().0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(sessions.terminal(&token).as_deref(), Some("门诊医生站"));
    assert!(!sessions.allows(&caller, Seen::Check, "C1"));
    assert!(!sessions.allows(&caller, Seen::Report, "R1"));
    let report = |id: &str| hmr_protocol::answers::ReportSummary {
        report_id: id.into(),
        report_type: hmr_protocol::ReportType::Lab,
        org_code: "O".into(),
        org_name: "其他医院".into(),
        report_no: id.into(),
        version: 1,
        data_code: "JY0001".into(),
        item_name: "血常规".into(),
        reported_at: "2026-12-01T08:00:00+08:00".into(),
        valid_until: "2026-12-08T08:00:00+08:00".into(),
        own: false,
        decided: None,
    };
    sessions.remember(
        &caller,
        &hmr_protocol::answers::PrescriptionCheckResult {
            status: hmr_protocol::answers::CallStatus::Ok,
            reason: None,
            duplicate: true,
            check_id: Some("C1".into()),
            url: None,
            matches: vec![hmr_protocol::answers::OrderMatch {
                order_id: "O1".into(),
                item_code: Some("CBC".into()),
                data_code: "JY0001".into(),
                reports: vec![report("R1")],
            }],
        },
    );
    sessions.remember(
        &caller,
        &hmr_protocol::answers::QueryResult {
            status: hmr_protocol::answers::CallStatus::Ok,
            reason: None,
            items: vec![report("R2")],
        },
    );
    assert!(sessions.allows(&caller, Seen::Check, "C1"));
    assert!(
        !sessions.allows(&caller, Seen::Report, "C1"),
        "a check id is not a report id"
    );
    assert!(sessions.allows(&caller, Seen::Report, "R1") && sessions.allows(&caller, Seen::Report, "R2"));
    let terminal = Caller {
        name: Some("x".into()),
        session: None,
    };
    assert!(
        sessions.allows(&terminal, Seen::Report, "anything"),
        "a terminal's own token"
    );
    assert_eq!(sessions.terminal("not-a-session"), None);
    let ended = Sessions::new(Duration::ZERO);
    let (token, _) = ended.open(Session {
        terminal: "t".into(),
        patient_id: "P".into(),
        visit_no: String::new(),
        doctor_no: "D".into(),
        visit_type: "1".into(),
        until: Instant::now(),
        seen: HashSet::new(),
    });
    assert_eq!(ended.terminal(&token), None, "an ended session");
}

#[test]
fn terminals_or_anonymous_on_loopback_and_tls_beyond() {
    let mut cfg = crate::config::ServeConfig::default();
    let local: SocketAddr = "127.0.0.1:8090".parse().unwrap();
    let wide: SocketAddr = "0.0.0.0:8443".parse().unwrap();
    assert!(
        listen_allowed(local, &cfg).unwrap_err().contains("no terminals"),
        "nobody to let in"
    );
    cfg.anonymous = true;
    assert!(listen_allowed(local, &cfg).is_ok(), "a rehearsal on this machine");
    cfg.tls_cert = Some("/etc/hmr/serve.crt".into());
    cfg.tls_key = Some("/etc/hmr/serve.key".into());
    assert!(
        listen_allowed(wide, &cfg).unwrap_err().contains("loopback only"),
        "anonymous, even with TLS"
    );
    cfg.terminals.push(crate::config::TerminalConfig {
        iss: "a".into(),
        name: "b".into(),
        jwk: crate::config::Jwk {
            kty: "EC".into(),
            crv: Some("P-384".into()),
            ..Default::default()
        },
    });
    assert!(listen_allowed(local, &cfg).unwrap_err().contains("choose one"));
    cfg.anonymous = false;
    assert!(listen_allowed(wide, &cfg).unwrap_err().contains("audience"));
    cfg.audience = Some("https://hmr.example".into());
    assert!(listen_allowed(wide, &cfg).is_ok());
    cfg.tls_key = None;
    assert!(listen_allowed(wide, &cfg).unwrap_err().contains("TLS"));
    assert!(listen_allowed(local, &cfg).is_ok(), "loopback behind a TLS proxy");
}

#[test]
fn a_session_has_its_own_budget_and_a_terminal_is_known_by_its_iss() {
    assert_eq!(rate_key(Some("ward-app"), None), "terminal:ward-app");
    assert_eq!(rate_key(Some("ward-app"), Some("t1")), "session:t1");
    assert_ne!(rate_key(None, Some("t1")), rate_key(None, Some("t2")));
    assert_eq!(rate_key(None, None), "anonymous");
}

#[test]
fn only_a_fresh_token_of_a_known_terminal_for_this_service_passes() {
    let (pair, jwk) = key();
    let (other, _) = key();
    let cfg = crate::config::ServeConfig {
        audience: Some("https://hmr.example/cds-services".into()),
        terminals: vec![crate::config::TerminalConfig {
            iss: "ward-app".into(),
            name: "病区移动查房".into(),
            jwk,
        }],
        ..Default::default()
    };
    let auth = Auth::new(&cfg).unwrap();
    let now = 1_800_000_000;
    let claims = |jti: &str| json!({"iss": "ward-app", "aud": "https://hmr.example/cds-services", "exp": now + 300, "iat": now, "jti": jti});
    assert_eq!(
        auth.verify(&token(&pair, claims("a"), "ES384"), now),
        Ok("病区移动查房".into())
    );
    assert!(auth
        .verify(&token(&pair, claims("a"), "ES384"), now)
        .unwrap_err()
        .contains("replay"));
    assert!(auth
        .verify(&token(&other, claims("b"), "ES384"), now)
        .unwrap_err()
        .contains("signature"));
    assert!(
        auth.verify(&token(&pair, claims("c"), "none"), now).is_err(),
        "alg none"
    );
    let mut expired = claims("d");
    expired["exp"] = json!(now - 1);
    assert!(auth
        .verify(&token(&pair, expired, "ES384"), now)
        .unwrap_err()
        .contains("expired"));
    let mut wrong_aud = claims("e");
    wrong_aud["aud"] = json!("https://elsewhere");
    assert!(auth
        .verify(&token(&pair, wrong_aud, "ES384"), now)
        .unwrap_err()
        .contains("aud"));
    let mut stranger = claims("f");
    stranger["iss"] = json!("someone");
    assert!(auth
        .verify(&token(&pair, stranger, "ES384"), now)
        .unwrap_err()
        .contains("unknown"));
    let mut long_lived = claims("h");
    long_lived["exp"] = json!(now + 3600);
    assert!(auth
        .verify(&token(&pair, long_lived, "ES384"), now)
        .unwrap_err()
        .contains("5 minutes"));
    // What the database is asked to claim: the verified token's terminal, jti and expiry.
    let v = auth.verify_claims(&token(&pair, claims("i"), "ES384"), now).unwrap();
    assert_eq!((v.iss.as_str(), v.jti.as_str(), v.exp), ("ward-app", "i", now + 300));
    // The terminal a token names, unverified: it keys the budget of refused tokens (with the
    // source address), never the terminal's own.
    assert_eq!(auth.claimed(&token(&other, claims("k"), "ES384")), Some("ward-app"));
    let mut stranger = claims("j");
    stranger["iss"] = json!("someone");
    assert_eq!(auth.claimed(&token(&pair, stranger, "ES384")), None);
    assert_eq!(auth.claimed("junk"), None);
    let t = token(&pair, claims("g"), "ES384");
    let tampered = t.replacen('.', ".e30", 1);
    assert!(auth.verify(&tampered, now).is_err(), "a changed payload");
}

fn rsa_key(bits: aws_lc_rs::rsa::KeySize) -> (aws_lc_rs::signature::RsaKeyPair, crate::config::Jwk) {
    use aws_lc_rs::signature::KeyPair as _;
    let pair = aws_lc_rs::signature::RsaKeyPair::generate(bits).unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let public = pair.public_key();
    let jwk = crate::config::Jwk {
        kty: "RSA".into(),
        n: Some(b64.encode(public.modulus().big_endian_without_leading_zero())),
        e: Some(b64.encode(public.exponent().big_endian_without_leading_zero())),
        ..Default::default()
    };
    (pair, jwk)
}

fn rsa_token(pair: &aws_lc_rs::signature::RsaKeyPair, claims: Value, alg: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let h = b64.encode(json!({"alg": alg, "typ": "JWT"}).to_string());
    let p = b64.encode(claims.to_string());
    let mut sig = vec![0; pair.public_modulus_len()];
    pair.sign(
        &aws_lc_rs::signature::RSA_PKCS1_SHA384,
        &aws_lc_rs::rand::SystemRandom::new(),
        format!("{h}.{p}").as_bytes(),
        &mut sig,
    )
    .unwrap();
    format!("{h}.{p}.{}", b64.encode(sig))
}

#[test]
fn an_rsa_terminal_signs_rs384_and_nothing_else() {
    let (pair, jwk) = rsa_key(aws_lc_rs::rsa::KeySize::Rsa2048);
    let (ec_pair, ec_jwk) = key();
    let cfg = crate::config::ServeConfig {
        audience: Some("https://hmr.example/cds-services".into()),
        terminals: vec![
            crate::config::TerminalConfig {
                iss: "emr".into(),
                name: "门诊电子病历".into(),
                jwk,
            },
            crate::config::TerminalConfig {
                iss: "ward-app".into(),
                name: "病区移动查房".into(),
                jwk: ec_jwk,
            },
        ],
        ..Default::default()
    };
    let auth = Auth::new(&cfg).unwrap();
    let now = 1_800_000_000;
    let claims = |iss: &str, jti: &str| json!({"iss": iss, "aud": "https://hmr.example/cds-services", "exp": now + 300, "iat": now, "jti": jti});
    assert_eq!(
        auth.verify(&rsa_token(&pair, claims("emr", "a"), "RS384"), now),
        Ok("门诊电子病历".into())
    );
    assert!(auth
        .verify(&rsa_token(&pair, claims("emr", "a"), "RS384"), now)
        .unwrap_err()
        .contains("replay"));
    // The algorithm is the key's: an EC terminal cannot be spoken to as RSA, nor the other
    // way round, and a header naming another algorithm is refused before any check.
    for (t, why) in [
        (
            rsa_token(&pair, claims("ward-app", "b"), "RS384"),
            "RS384 for an EC terminal",
        ),
        (
            token(&ec_pair, claims("emr", "c"), "ES384"),
            "ES384 for an RSA terminal",
        ),
        (rsa_token(&pair, claims("emr", "d"), "RS256"), "RS256"),
        (rsa_token(&pair, claims("emr", "e"), "HS384"), "HS384"),
    ] {
        assert!(auth.verify(&t, now).unwrap_err().contains("expected"), "{why}");
    }
    let (stranger, _) = rsa_key(aws_lc_rs::rsa::KeySize::Rsa2048);
    assert!(auth
        .verify(&rsa_token(&stranger, claims("emr", "f"), "RS384"), now)
        .unwrap_err()
        .contains("signature"));
    // Keys the verification would refuse are refused when the service starts.
    let small = crate::config::Jwk {
        kty: "RSA".into(),
        n: Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xffu8; 128])),
        e: Some("AQAB".into()),
        ..Default::default()
    };
    let mut weak = cfg.clone();
    weak.terminals[0].jwk = small;
    assert!(Auth::new(&weak).err().unwrap().to_string().contains("2048"));
    // 2047 bits: 256 bytes, the first below 0x80.
    let mut short = [0xffu8; 256];
    short[0] = 0x7f;
    weak.terminals[0].jwk.n = Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(short));
    assert!(Auth::new(&weak).err().unwrap().to_string().contains("2048"));
    let mut even = cfg.clone();
    even.terminals[0].jwk.e = Some("AQAA".into());
    assert!(Auth::new(&even).err().unwrap().to_string().contains("exponent"));
    let mut odd = cfg.clone();
    odd.terminals[0].jwk.kty = "OKP".into();
    assert!(Auth::new(&odd).is_err());
}

#[test]
fn a_tls_key_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("hmr-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("serve.crt"), dir.join("serve.key"));
    std::fs::write(&cert, "not a certificate").unwrap();
    std::fs::write(&key, "not a key").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = tls_acceptor(&cert, &key).err().expect("refused").to_string();
    assert!(err.contains("chmod 600") && err.contains("serve.key"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = tls_acceptor(&cert, &key)
        .err()
        .expect("still not a certificate")
        .to_string();
    assert!(!err.contains("chmod 600"), "the mode is fine now: {err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_platforms_text_in_a_card_is_neither_markdown_nor_html() {
    let hostile = "<img src=x onerror=alert(1)>[点此复核](http://evil.example/phish) **急** www.evil.example";
    let text = card_text(hostile);
    for raw in ["<img", "](", "[点此复核]", "**", "http://", "www.evil"] {
        assert!(!text.contains(raw), "{raw} left in {text}");
    }
    assert_eq!(
        text,
        "&lt;img src\\=x onerror\\=alert\\(1\\)&gt;\\[点此复核\\]\\(http\\:\\/\\/evil\\.example\\/phish\\) \\*\\*急\\*\\* www\\.evil\\.example"
    );
    // A plain hospital name and a time read as they were; a line break cannot start a block.
    assert_eq!(card_text("惠州市中心人民医院"), "惠州市中心人民医院");
    assert_eq!(card_text("2024-05-01 10:00"), "2024\\-05\\-01 10\\:00");
    assert_eq!(card_text("甲\n# 乙"), "甲 \\# 乙");
}

#[test]
fn the_service_answers_to_its_own_names_only() {
    let listen: std::net::SocketAddr = "127.0.0.1:8443".parse().unwrap();
    let cfg = crate::config::ServeConfig {
        audience: Some("https://HMR.Hospital.example:8443/cds-services".into()),
        ..Default::default()
    };
    let hosts = allowed_hosts(listen, &cfg).unwrap();
    for ok in ["127.0.0.1", "localhost", "::1", "hmr.hospital.example"] {
        assert!(hosts.contains(&ok.to_string()), "{ok} in {hosts:?}");
    }
    assert!(!hosts.contains(&"rebind.attacker.example".to_string()));
    let named = crate::config::ServeConfig {
        allowed_hosts: vec!["[::1]".into(), "HMR.example.".into()],
        ..cfg
    };
    assert_eq!(allowed_hosts(listen, &named).unwrap(), ["::1", "hmr.example"]);
    let host = |h: &str| {
        let r = axum::http::Request::builder()
            .header(header::HOST, h)
            .body(axum::body::Body::empty())
            .unwrap();
        request_host(&r)
    };
    assert_eq!(host("127.0.0.1:8443"), Ok(Some("127.0.0.1".into())));
    assert_eq!(host("[::1]:8443"), Ok(Some("::1".into())));
    assert_eq!(
        host("Rebind.Attacker.Example"),
        Ok(Some("rebind.attacker.example".into()))
    );
    assert_eq!(host("a b"), Err(()));
}

/// Issue #29 W4: a workstation origin is exact; a wildcard or anything but an origin is
/// refused at start, so no other site can frame a doctor's widget.
#[test]
fn embed_origins_are_exact_origins_only() {
    use super::widget::frame_ancestors;
    assert_eq!(
        frame_ancestors(&["https://his.hospital.example".into(), "http://10.1.2.3:8080".into()]).unwrap(),
        "'self' https://his.hospital.example http://10.1.2.3:8080"
    );
    for bad in [
        "https://*",
        "https://*.hospital.example",
        "*",
        "https://his.example/path",
        "https://user@his.example",
        "javascript:alert(1)",
        "https://his.example; script-src *",
        "his.example",
    ] {
        assert!(frame_ancestors(&[bad.to_string()]).is_err(), "{bad} accepted");
    }
}
