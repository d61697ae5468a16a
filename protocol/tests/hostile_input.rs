//! Hostile-input properties of the protocol crate: whatever a source row, a platform answer
//! or a header holds, the crate answers with a value (never a panic), and the answers it
//! gives obey the contract. Run: `cargo test -p hmr-protocol --test hostile_input`
//! (add `-- --nocapture` to see how many cases each property executed).

use std::cell::Cell;
use std::collections::BTreeSet;
use std::fmt::Debug;
use std::time::Duration;

use chrono::{DateTime, Days, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, SecondsFormat, TimeZone, Utc};
use hmr_protocol::checks;
use hmr_protocol::envelope::{self, classify, parse_data, Outcome, MAX_ANSWER_BYTES, MAX_RETRY_AFTER};
use hmr_protocol::paths::{self, Method, Request};
use hmr_protocol::sign;
use hmr_protocol::source::{self, SourceView};
use hmr_protocol::validate;
use hmr_protocol::*;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseResult, TestRunner};
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------- harness

/// Runs one property for `cases` cases and reports how many times its body ran.
fn check<S>(name: &str, cases: u32, strategy: S, test: impl Fn(S::Value) -> TestCaseResult)
where
    S: Strategy,
    S::Value: Debug,
{
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(config);
    let runs = Cell::new(0u64);
    let started = std::time::Instant::now();
    let result = runner.run(&strategy, |value| {
        runs.set(runs.get() + 1);
        test(value)
    });
    eprintln!(
        "hostile_input {name}: {} executions ({cases} cases) in {:.1} s",
        runs.get(),
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

// ---------------------------------------------------------------- strategies

/// Strings a careless or hostile source holds: any Unicode, whitespace, near-miss formats,
/// multi-byte text and long runs.
fn hostile_string() -> BoxedStrategy<String> {
    prop_oneof![
        4 => any::<String>(),
        3 => "[0-9A-Za-z中文é𝄞 \\-+:.TZ]{0,30}",
        1 => Just(String::new()),
        1 => "[ \t\r\n\u{3000}]{1,4}",
        1 => (any::<char>(), 0usize..6000).prop_map(|(c, n)| std::iter::repeat_n(c, n).collect()),
    ]
    .boxed()
}

fn json_leaf() -> BoxedStrategy<Value> {
    prop_oneof![
        2 => Just(Value::Null),
        2 => any::<bool>().prop_map(Value::Bool),
        2 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        6 => hostile_string().prop_map(Value::String),
    ]
    .boxed()
}

/// A huge string (tens of thousands of one character, often multi-byte).
fn huge_string() -> BoxedStrategy<String> {
    (any::<char>(), 10_000usize..100_000)
        .prop_map(|(c, n)| std::iter::repeat_n(c, n).collect())
        .boxed()
}

fn json_value() -> BoxedStrategy<Value> {
    json_leaf()
        .prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(hostile_string(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
        .boxed()
}

const CODES: [&str; 10] = [
    envelope::CODE_OK,
    envelope::CODE_INVALID,
    envelope::CODE_UNAUTHORIZED,
    envelope::CODE_FORBIDDEN,
    envelope::CODE_NOT_FOUND,
    envelope::CODE_CONFLICT,
    envelope::CODE_TOO_LARGE,
    envelope::CODE_RATE_LIMITED,
    envelope::CODE_FAULT,
    "",
];

/// `data.errors` as a platform might (mis)send it: right, wrong types, wrong shapes.
fn errors_value() -> BoxedStrategy<Value> {
    let entry = prop_oneof![
        (hostile_string(), hostile_string()).prop_map(|(f, r)| json!({"field": f, "reason": r})),
        (json_leaf(), json_leaf()).prop_map(|(f, r)| json!({"field": f, "reason": r})),
        json_value(),
    ];
    prop_oneof![
        prop::collection::vec(entry, 0..5).prop_map(|v| json!({ "errors": v })),
        json_value().prop_map(|v| json!({ "errors": v })),
        json_value(),
    ]
    .boxed()
}

/// A JSON envelope whose members may be missing, null or of the wrong type.
fn envelope_value() -> BoxedStrategy<Value> {
    let code = prop_oneof![
        3 => prop::sample::select(&CODES[..]).prop_map(|c| Some(json!(c))),
        1 => json_leaf().prop_map(Some),
        1 => Just(None),
    ];
    let message = prop_oneof![
        3 => hostile_string().prop_map(|m| Some(json!(m))),
        1 => json_leaf().prop_map(Some),
        1 => Just(None),
    ];
    let data = prop_oneof![
        2 => errors_value().prop_map(Some),
        1 => json_value().prop_map(Some),
        1 => Just(None),
    ];
    (code, message, data)
        .prop_map(|(code, message, data)| {
            let mut map = Map::new();
            for (k, v) in [("code", code), ("message", message), ("data", data)] {
                if let Some(v) = v {
                    map.insert(k.into(), v);
                }
            }
            Value::Object(map)
        })
        .boxed()
}

/// Deeply nested JSON (far past serde_json's recursion limit), optionally closed.
fn deep_body() -> BoxedStrategy<Vec<u8>> {
    let opener = prop::sample::select(vec!["[", "{\"a\":", "{\"data\":{\"errors\":[", "{\"code\":"]);
    (opener, 1usize..20_000, any::<bool>())
        .prop_map(|(open, depth, close)| {
            let mut s = String::from("{\"code\":\"A0400\",\"message\":\"m\",\"data\":");
            s.push_str(&open.repeat(depth));
            if close {
                s.push('1');
                let closer = match open {
                    "[" => "]",
                    "{\"a\":" | "{\"code\":" => "}",
                    _ => "]}}",
                };
                s.push_str(&closer.repeat(depth));
                s.push('}');
            }
            s.into_bytes()
        })
        .boxed()
}

fn hostile_body() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..512),
        2 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => (huge_string(), hostile_string())
            .prop_map(|(m, c)| serde_json::to_vec(&json!({"code": c, "message": m, "data": {"errors": [m]}})).unwrap()),
        4 => envelope_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => (envelope_value(), any::<prop::sample::Index>()).prop_map(|(v, cut)| {
            let bytes = serde_json::to_vec(&v).unwrap();
            bytes[..cut.index(bytes.len() + 1)].to_vec()
        }),
        1 => deep_body(),
    ]
    .boxed()
}

fn retry_after() -> BoxedStrategy<Option<String>> {
    prop_oneof![
        1 => Just(None),
        2 => hostile_string().prop_map(Some),
        2 => (any::<u64>(), "[ \t]{0,2}", "[ \t]{0,2}").prop_map(|(n, a, b)| Some(format!("{a}{n}{b}"))),
        1 => "[+-]?[0-9]{1,30}(\\.[0-9]{0,3})?".prop_map(Some),
        1 => Just(Some("Wed, 21 Oct 2015 07:28:00 GMT".to_string())),
    ]
    .boxed()
}

fn date_between(from: NaiveDate, to: NaiveDate) -> BoxedStrategy<NaiveDate> {
    let span = (to - from).num_days() as u64;
    (0..=span).prop_map(move |d| from + Days::new(d)).boxed()
}

fn ymd(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).unwrap()
}

/// A valid resident identity number and the birth date inside it.
fn valid_id_card() -> BoxedStrategy<(String, NaiveDate)> {
    valid_id_card_born(ymd(1000, 1, 1), ymd(9999, 12, 31))
}

fn valid_id_card_born(from: NaiveDate, to: NaiveDate) -> BoxedStrategy<(String, NaiveDate)> {
    ("[0-9]{6}", date_between(from, to), "[0-9]{3}")
        .prop_map(|(region, born, seq)| {
            let first17 = format!("{region}{}{seq}", born.format("%Y%m%d"));
            let check = checks::id_card_check_char(&first17);
            (format!("{first17}{check}"), born)
        })
        .boxed()
}

const ORG_CHARS: &str = "0123456789ABCDEFGHJKLMNPQRTUWXY";

fn valid_org_code() -> BoxedStrategy<String> {
    "[0-9ABCDEFGHJKLMNPQRTUWXY]{17}"
        .prop_map(|first17| {
            let check = checks::org_code_check_char(&first17).expect("alphabet characters");
            format!("{first17}{check}")
        })
        .boxed()
}

/// Any local date-time in years 0000–9999 at any whole-minute offset (the wire format has
/// no offset seconds), to the second or to the nanosecond.
fn wire_time(nanos: bool) -> BoxedStrategy<DateTime<FixedOffset>> {
    wire_time_in(ymd(0, 1, 1), ymd(9999, 12, 31), nanos)
}

fn wire_time_in(from: NaiveDate, to: NaiveDate, nanos: bool) -> BoxedStrategy<DateTime<FixedOffset>> {
    let max_minutes = 24 * 60 - 1;
    (
        date_between(from, to),
        0u32..86_400,
        if nanos {
            (0u32..1_000_000_000).boxed()
        } else {
            Just(0u32).boxed()
        },
        -max_minutes..=max_minutes,
    )
        .prop_map(|(date, secs, nano, minutes)| {
            let time = NaiveTime::from_num_seconds_from_midnight_opt(secs, nano).unwrap();
            let offset = FixedOffset::east_opt(minutes * 60).unwrap();
            offset
                .from_local_datetime(&NaiveDateTime::new(date, time))
                .single()
                .unwrap()
        })
        .boxed()
}

fn now() -> DateTime<FixedOffset> {
    checks::parse_time("2024-06-01T12:00:00+08:00").unwrap()
}

/// A field value: hostile most of the time, sometimes what the rule wants, so the rules
/// past the first check run too.
fn field_string() -> BoxedStrategy<String> {
    prop_oneof![
        4 => hostile_string(),
        1 => valid_id_card().prop_map(|(id, _)| id),
        1 => date_between(ymd(1900, 1, 1), ymd(2030, 12, 31)).prop_map(|d| d.format("%Y-%m-%d").to_string()),
        1 => wire_time(false).prop_map(|t| checks::format_time(&t)),
        1 => prop::sample::select(vec!["01", "02", "03", "04", "99", "0", "1", "2", "9", "CT", "06", "doctor"])
            .prop_map(str::to_string),
    ]
    .boxed()
}

fn opt_field_string() -> BoxedStrategy<Option<String>> {
    prop::option::of(field_string()).boxed()
}

// ---------------------------------------------------------------- answers: classify

fn is_2xx(status: u16) -> bool {
    (200..=299).contains(&status)
}

/// The code a 2xx body names, if it names one (`null` names none).
fn named_code(body: &[u8]) -> Option<String> {
    match serde_json::from_slice::<Value>(body).ok()?.get("code")? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

#[test]
fn classify_never_panics_and_keeps_the_status_rules() {
    check(
        "classify_any_answer",
        1200,
        (0u16..=999, retry_after(), hostile_body()),
        |(status, retry_after, body)| {
            let outcome = classify(status, retry_after.as_deref(), &body);
            match status {
                s if is_2xx(s) => match named_code(&body) {
                    Some(code) if code != envelope::CODE_OK => prop_assert!(
                        matches!(&outcome, Outcome::Permanent { code: c, .. } if *c == code),
                        "2xx naming code {code:?} gave {outcome:?}"
                    ),
                    Some(_) => prop_assert_eq!(&outcome, &Outcome::Done),
                    // No code: not the platform's answer, whatever the status says.
                    None => prop_assert!(matches!(outcome, Outcome::Retry { after: None, .. }), "{outcome:?}"),
                },
                401 => prop_assert_eq!(&outcome, &Outcome::RefreshToken),
                404 => prop_assert!(matches!(outcome, Outcome::MissingDependency { .. }), "{:?}", outcome),
                429 => {
                    let expected = retry_after
                        .as_deref()
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|n| Duration::from_secs(n).min(MAX_RETRY_AFTER));
                    prop_assert!(
                        matches!(outcome, Outcome::Retry { after, .. } if after == expected),
                        "{:?} for {:?}",
                        outcome,
                        retry_after
                    );
                }
                400 | 403 | 409 | 413 => {
                    prop_assert!(
                        matches!(outcome, Outcome::Permanent { status: s, .. } if s == status),
                        "{:?}",
                        outcome
                    )
                }
                _ => prop_assert!(matches!(outcome, Outcome::Retry { after: None, .. }), "{outcome:?}"),
            }
            Ok(())
        },
    );
}

#[test]
fn classify_2xx_with_ok_code_is_done() {
    let ok_envelope = (hostile_string(), prop::option::of(json_value())).prop_map(|(message, data)| {
        let mut v = json!({"code": envelope::CODE_OK, "message": message});
        if let Some(data) = data {
            v["data"] = data;
        }
        serde_json::to_vec(&v).unwrap()
    });
    check(
        "classify_2xx_ok_code",
        1000,
        (200u16..=299, retry_after(), ok_envelope),
        |(status, retry_after, body)| {
            prop_assert_eq!(classify(status, retry_after.as_deref(), &body), Outcome::Done);
            Ok(())
        },
    );
}

#[test]
fn classify_5xx_retries_and_401_refreshes() {
    check(
        "classify_5xx_401",
        500,
        (500u16..=599, retry_after(), hostile_body(), retry_after()),
        |(status, ra, body, ra401)| {
            let outcome = classify(status, ra.as_deref(), &body);
            prop_assert!(matches!(outcome, Outcome::Retry { .. }), "{:?}", outcome);
            prop_assert_eq!(classify(401, ra401.as_deref(), &body), Outcome::RefreshToken);
            Ok(())
        },
    );
}

#[test]
fn classify_429_honours_numeric_retry_after() {
    check(
        "classify_429_retry_after",
        2000,
        (
            any::<u64>(),
            "[ \t]{0,3}",
            "[ \t]{0,3}",
            prop::collection::vec(any::<u8>(), 0..64),
        ),
        |(secs, before, after, body)| {
            let header = format!("{before}{secs}{after}");
            let expected = Duration::from_secs(secs).min(MAX_RETRY_AFTER);
            match classify(429, Some(&header), &body) {
                Outcome::Retry { after: Some(d), .. } => prop_assert_eq!(d, expected),
                other => prop_assert!(false, "429 with {header:?} gave {other:?}"),
            }
            // Whatever the header says, the pause it asks for can be added to a clock.
            prop_assert!(std::time::Instant::now().checked_add(expected).is_some());
            Ok(())
        },
    );
}

#[test]
fn classify_keeps_well_typed_errors_and_drops_wrong_types() {
    let entries = prop::collection::vec((hostile_string(), hostile_string()), 0..8);
    check(
        "classify_data_errors",
        600,
        (prop::sample::select(vec![400u16, 403, 409, 413]), entries, json_value()),
        |(status, entries, junk)| {
            let errors: Vec<FieldError> = entries.iter().map(|(f, r)| FieldError::new(f, r)).collect();
            let body = json!({"code": "A0400", "message": "bad", "data": {"errors": errors}});
            match classify(status, None, &serde_json::to_vec(&body).unwrap()) {
                Outcome::Permanent {
                    status: s,
                    code,
                    errors: got,
                    ..
                } => {
                    prop_assert_eq!(s, status);
                    prop_assert_eq!(code, "A0400");
                    prop_assert_eq!(got, errors);
                }
                other => prop_assert!(false, "{other:?}"),
            }
            // `errors` of the wrong shape: still Permanent, just without field errors
            // unless `junk` happens to be a list of {field, reason} strings.
            let body = json!({"code": "A0400", "message": "bad", "data": {"errors": junk}});
            let expected: Vec<FieldError> = serde_json::from_value(junk.clone()).unwrap_or_default();
            match classify(status, None, &serde_json::to_vec(&body).unwrap()) {
                Outcome::Permanent { errors: got, .. } => prop_assert_eq!(got, expected),
                other => prop_assert!(false, "{other:?}"),
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------- answers: parse_data

#[test]
fn parse_data_never_panics() {
    check("parse_data_any_body", 1000, hostile_body(), |body| {
        let _ = parse_data::<Value>(&body);
        let _ = parse_data::<TokenAnswer>(&body);
        let _ = parse_data::<BatchAnswer>(&body);
        let _ = parse_data::<ListAnswer>(&body);
        let _ = parse_data::<CheckAnswer>(&body);
        let _ = parse_data::<ItemsAnswer>(&body);
        Ok(())
    });
}

#[test]
fn parse_data_refuses_oversized_bodies() {
    // Bodies of MAX_ANSWER_BYTES + excess: each case builds a 16 MiB body, so few cases.
    check("parse_data_too_large", 4, 1usize..4096, |excess| {
        let head = br#"{"code":"00000","message":"","data":""#;
        let mut body = Vec::with_capacity(MAX_ANSWER_BYTES + excess);
        body.extend_from_slice(head);
        body.resize(MAX_ANSWER_BYTES + excess - 2, b'a');
        body.extend_from_slice(b"\"}");
        prop_assert_eq!(body.len(), MAX_ANSWER_BYTES + excess);
        match parse_data::<Value>(&body) {
            Err(ProtocolError::Shape { field, reason }) => {
                prop_assert_eq!(field, "body");
                prop_assert_eq!(reason, "too-large");
            }
            other => prop_assert!(false, "{other:?}"),
        }
        // The same answer cut to the limit is read.
        let at_limit = [&body[..MAX_ANSWER_BYTES - 2], b"\"}"].concat();
        prop_assert!(parse_data::<Value>(&at_limit).is_ok());
        Ok(())
    });
}

#[test]
fn parse_data_wrong_types_are_errors() {
    let field = prop::sample::select(vec!["accessToken", "tokenType", "expiresIn"]);
    check(
        "parse_data_wrong_types",
        1000,
        (hostile_string(), hostile_string(), any::<u64>(), field, json_value()),
        |(token, kind, expires, field, junk)| {
            let good = json!({"accessToken": token, "tokenType": kind, "expiresIn": expires});
            let body = serde_json::to_vec(&json!({"code": "00000", "message": "", "data": good})).unwrap();
            let answer = parse_data::<TokenAnswer>(&body);
            prop_assert!(
                matches!(&answer, Ok(a) if a.access_token == token && a.token_type == kind && a.expires_in == expires),
                "{answer:?}"
            );
            let mut bad = good.clone();
            bad[field] = junk.clone();
            let fits = match field {
                "expiresIn" => junk.is_u64(),
                _ => junk.is_string(),
            };
            let body = serde_json::to_vec(&json!({"code": "00000", "message": "", "data": bad})).unwrap();
            prop_assert_eq!(parse_data::<TokenAnswer>(&body).is_ok(), fits);
            // `data` absent or null: an error naming `data`.
            let body = serde_json::to_vec(&json!({"code": "00000", "message": "", "data": null})).unwrap();
            let answer = parse_data::<TokenAnswer>(&body);
            prop_assert!(
                matches!(&answer, Err(ProtocolError::Shape { field, .. }) if field == "data"),
                "{:?}",
                answer
            );
            Ok(())
        },
    );
}

// ---------------------------------------------------------------- GB 11643 identity numbers

/// Strings shaped almost like an identity number, with multi-byte characters mixed in.
fn near_id_card() -> BoxedStrategy<String> {
    prop_oneof![
        any::<String>(),
        "[0-9Xx中é𝄞 ]{14,19}",
        "[0-9]{16,17}[0-9Xx中é]",
        (valid_id_card(), 0usize..18, any::<char>()).prop_map(|((id, _), at, c)| {
            id.chars()
                .enumerate()
                .map(|(i, x)| if i == at { c } else { x })
                .collect()
        }),
    ]
    .boxed()
}

#[test]
fn id_card_never_panics() {
    check(
        "id_card_any_string",
        3000,
        (
            near_id_card(),
            prop::option::of(prop_oneof![hostile_string(), field_string()]),
        ),
        |(id, birth)| {
            if checks::id_card_problem(&id, birth.as_deref()).is_none() {
                let b = id.as_bytes();
                prop_assert!(b.len() == 18 && b[..17].iter().all(u8::is_ascii_digit));
                prop_assert!(b[17].is_ascii_digit() || b[17] == b'X');
            }
            Ok(())
        },
    );
}

#[test]
fn id_card_valid_numbers_pass() {
    check(
        "id_card_valid",
        2000,
        (valid_id_card(), date_between(ymd(1000, 1, 1), ymd(9999, 12, 31))),
        |((id, born), other)| {
            prop_assert_eq!(checks::id_card_problem(&id, None), None);
            let given = born.format("%Y-%m-%d").to_string();
            prop_assert_eq!(checks::id_card_problem(&id, Some(&given)), None);
            if other != born {
                let wrong = other.format("%Y-%m-%d").to_string();
                prop_assert_eq!(checks::id_card_problem(&id, Some(&wrong)), Some("birth-date-mismatch"));
            }
            Ok(())
        },
    );
}

#[test]
fn id_card_single_digit_changes_are_rejected() {
    check(
        "id_card_one_change",
        3000,
        (valid_id_card(), 0usize..18, 1u8..=10),
        |((id, _), at, step)| {
            let mut bytes = id.clone().into_bytes();
            let old = bytes[at];
            // Ten other values a position can take: the other nine digits and, for the
            // check character, `X` (or, when it is `X`, every digit).
            let new = if old == b'X' {
                b'0' + (step - 1)
            } else if at == 17 && step == 10 {
                b'X'
            } else {
                b'0' + (old - b'0' + step % 10) % 10
            };
            if new == old {
                // step 10 on positions 0..17 wraps to the same digit: not a change.
                return Ok(());
            }
            bytes[at] = new;
            let changed = String::from_utf8(bytes).unwrap();
            prop_assert!(
                checks::id_card_problem(&changed, None).is_some(),
                "{id} → {changed} was accepted"
            );
            Ok(())
        },
    );
}

// ---------------------------------------------------------------- GB 32100 organisation codes

#[test]
fn org_code_never_panics() {
    let near = prop_oneof![
        any::<String>(),
        "[0-9A-Za-z中é𝄞]{16,19}",
        (valid_org_code(), 0usize..18, any::<char>()).prop_map(|(code, at, c)| code
            .chars()
            .enumerate()
            .map(|(i, x)| if i == at { c } else { x })
            .collect()),
    ];
    check("org_code_any_string", 3000, near, |code| {
        if checks::org_code_valid(&code) {
            prop_assert!(code.len() == 18 && code.chars().all(|c| ORG_CHARS.contains(c)));
        }
        let _ = checks::org_code_check_char(&code);
        Ok(())
    });
}

#[test]
fn org_code_valid_codes_pass_and_single_changes_fail() {
    // The replacement: another alphabet character, a lower-case or excluded letter, or
    // any character at all (multi-byte ones change the length).
    let replacement = prop_oneof![
        (1usize..31).prop_map(Err),
        any::<char>().prop_map(Ok),
        prop::sample::select(vec!['i', 'o', 's', 'v', 'z', 'I', 'O', 'S', 'V', 'Z', 'a', 'y']).prop_map(Ok),
    ];
    check(
        "org_code_one_change",
        3000,
        (valid_org_code(), 0usize..18, replacement),
        |(code, at, replacement)| {
            prop_assert!(checks::org_code_valid(&code), "{code}");
            let old = code.as_bytes()[at] as char;
            let new = match replacement {
                Err(step) => {
                    let i = ORG_CHARS.find(old).unwrap();
                    ORG_CHARS.as_bytes()[(i + step) % 31] as char
                }
                Ok(c) if c == old => return Ok(()),
                Ok(c) => c,
            };
            let changed: String = code
                .chars()
                .enumerate()
                .map(|(i, x)| if i == at { new } else { x })
                .collect();
            prop_assert!(!checks::org_code_valid(&changed), "{code} → {changed} was accepted");
            Ok(())
        },
    );
}

// ---------------------------------------------------------------- times

#[test]
fn parse_time_never_panics() {
    let mutated = (
        wire_time(true),
        prop::collection::vec((any::<prop::sample::Index>(), any::<char>()), 1..4),
    )
        .prop_map(|(t, edits)| {
            let mut chars: Vec<char> = t.to_rfc3339_opts(SecondsFormat::AutoSi, false).chars().collect();
            for (at, c) in edits {
                let i = at.index(chars.len());
                chars[i] = c;
            }
            chars.into_iter().collect::<String>()
        });
    check(
        "parse_time_any_string",
        3000,
        prop_oneof![hostile_string(), mutated, field_string()],
        |s| {
            if let Some(t) = checks::parse_time(&s) {
                // What it accepts has a numeric offset and is what RFC 3339 reads.
                prop_assert!(!s.ends_with(['Z', 'z']));
                prop_assert_eq!(DateTime::parse_from_rfc3339(&s).ok(), Some(t));
            }
            let _ = checks::parse_date(&s);
            Ok(())
        },
    );
}

#[test]
fn format_time_round_trips() {
    check(
        "time_round_trip",
        3000,
        (wire_time(false), wire_time(true)),
        |(t, fine)| {
            let text = checks::format_time(&t);
            let back = checks::parse_time(&text);
            prop_assert_eq!(back, Some(t), "{}", text);
            prop_assert_eq!(*back.unwrap().offset(), *t.offset());
            // Fractions of a second are accepted too.
            let text = fine.to_rfc3339_opts(SecondsFormat::Nanos, false);
            prop_assert_eq!(checks::parse_time(&text), Some(fine), "{}", text);
            Ok(())
        },
    );
}

#[test]
fn times_ending_in_z_are_refused() {
    check(
        "time_z_refused",
        3000,
        (wire_time(true), hostile_string()),
        |(t, junk)| {
            let utc = t.with_timezone(&Utc);
            for format in [SecondsFormat::Secs, SecondsFormat::Millis, SecondsFormat::Nanos] {
                let z = utc.to_rfc3339_opts(format, true);
                prop_assert!(z.ends_with('Z'));
                prop_assert_eq!(checks::parse_time(&z), None, "{}", z);
                prop_assert_eq!(checks::parse_time(&z.replace('Z', "z")), None);
            }
            prop_assert_eq!(checks::parse_time(&format!("{junk}Z")), None);
            prop_assert_eq!(checks::parse_time(&format!("{}Z", checks::format_time(&t))), None);
            Ok(())
        },
    );
}

// ---------------------------------------------------------------- source rows

fn hostile_row(view: &'static SourceView) -> BoxedStrategy<Map<String, Value>> {
    let names: Vec<&'static str> = view.columns.iter().map(|c| c.name).collect();
    let key = prop_oneof![3 => prop::sample::select(names).prop_map(str::to_string), 1 => hostile_string()];
    let value = prop_oneof![
        6 => json_leaf(),
        2 => json_value(),
        4 => field_string().prop_map(Value::String),
        1 => huge_string().prop_map(Value::String),
    ];
    prop::collection::btree_map(key, value, 0..view.columns.len() + 4)
        .prop_map(|m| m.into_iter().collect())
        .boxed()
}

/// A row whose every column has the right JSON type (text as any string); optional
/// columns may be missing or null.
fn well_typed_row(view: &'static SourceView) -> BoxedStrategy<Map<String, Value>> {
    let cells: Vec<BoxedStrategy<Option<Value>>> = view
        .columns
        .iter()
        .map(|c| {
            let value = if c.sql_type == "boolean" {
                any::<bool>().prop_map(Value::Bool).boxed()
            } else {
                field_string().prop_map(Value::String).boxed()
            };
            if c.required {
                value.prop_map(Some).boxed()
            } else {
                prop_oneof![value.prop_map(Some), Just(Some(Value::Null)), Just(None)].boxed()
            }
        })
        .collect();
    cells
        .prop_map(move |cells| {
            view.columns
                .iter()
                .zip(cells)
                .filter_map(|(c, v)| v.map(|v| (c.name.to_string(), v)))
                .collect()
        })
        .boxed()
}

fn item_value() -> BoxedStrategy<Value> {
    prop_oneof![
        2 => well_typed_row(&source::LAB_ITEM).prop_map(|m| Value::Object(source::LAB_ITEM.to_fields(&m))),
        1 => hostile_row(&source::LAB_ITEM).prop_map(|m| Value::Object(source::LAB_ITEM.to_fields(&m))),
        1 => json_value(),
    ]
    .boxed()
}

/// The field of a shape error must name something a person can find: a column of the
/// view, an item column as `items[i].column`, or a field the hospital side adds.
fn names_a_column(view: &SourceView, field: &str, extra: &Map<String, Value>) -> bool {
    let column = |v: &SourceView, name: &str| v.columns.iter().any(|c| c.name == name);
    if column(view, field) || extra.contains_key(field) {
        return true;
    }
    let Some(rest) = field.strip_prefix("items[") else {
        return false;
    };
    let Some((index, tail)) = rest.split_once(']') else {
        return false;
    };
    // An unknown member of an item is named as sent.
    let in_item = |name: &str| {
        let item = index.parse::<usize>().ok().and_then(|i| extra.get("items")?.get(i));
        item.and_then(Value::as_object).is_some_and(|m| m.contains_key(name))
    };
    // `items[i]` itself, a column of the item (`items[i].result_value`), or inside an item
    // that is not an object at all (`items[i][0]`: serde reads structs from arrays too).
    index.parse::<usize>().is_ok()
        && (tail.is_empty()
            || tail.starts_with('[')
            || tail
                .strip_prefix('.')
                .is_some_and(|c| column(&source::LAB_ITEM, c) || in_item(c)))
}

fn record_property<T: serde::de::DeserializeOwned>(
    view: &'static SourceView,
    row: &Map<String, Value>,
    extra: &Map<String, Value>,
) -> TestCaseResult {
    // Reports also get `version` and `items` from the hospital side: those names count.
    let mut added = extra.clone();
    if matches!(view.kind, "lab_report" | "exam_report") {
        for name in ["version", "items"] {
            added.entry(name).or_insert(Value::Null);
        }
    }
    match view.record::<T>(row, extra.clone()) {
        Ok(_) => {}
        Err(ProtocolError::Shape { field, reason }) => {
            prop_assert!(
                names_a_column(view, &field, &added),
                "{}: error field {field:?} ({reason}) names no column",
                view.kind
            );
            prop_assert!(!reason.is_empty());
        }
        Err(other) => prop_assert!(false, "not a shape error: {other:?}"),
    }
    Ok(())
}

#[test]
fn source_rows_never_panic_and_errors_name_columns() {
    check("record_patient_any_row", 600, hostile_row(&source::PATIENT), |row| {
        record_property::<Patient>(&source::PATIENT, &row, &Map::new())
    });
    check(
        "record_staff_department_any_row",
        300,
        (hostile_row(&source::STAFF), hostile_row(&source::DEPARTMENT)),
        |(staff, dept)| {
            record_property::<Staff>(&source::STAFF, &staff, &Map::new())?;
            record_property::<Department>(&source::DEPARTMENT, &dept, &Map::new())
        },
    );
    let extra = (
        prop_oneof![Just(json!(1)), json_leaf()],
        prop::option::of(prop::collection::vec(item_value(), 0..3)),
        prop::option::of((hostile_string(), json_leaf())),
    )
        .prop_map(|(version, items, junk)| {
            let mut m = Map::new();
            m.insert("version".into(), version);
            if let Some(items) = items {
                m.insert("items".into(), Value::Array(items));
            }
            if let Some((k, v)) = junk {
                m.insert(k, v);
            }
            m
        });
    check(
        "record_lab_exam_any_row",
        250,
        (
            hostile_row(&source::LAB_REPORT),
            hostile_row(&source::EXAM_REPORT),
            extra,
            any::<bool>(),
        ),
        |(lab, exam, extra, no_extra)| {
            let extra = if no_extra { Map::new() } else { extra };
            record_property::<LabReport>(&source::LAB_REPORT, &lab, &extra)?;
            record_property::<ExamReport>(&source::EXAM_REPORT, &exam, &extra)
        },
    );
}

#[test]
fn well_typed_rows_always_build() {
    check(
        "record_well_typed_rows",
        400,
        (
            well_typed_row(&source::PATIENT),
            well_typed_row(&source::STAFF),
            well_typed_row(&source::LAB_REPORT),
            prop::collection::vec(well_typed_row(&source::LAB_ITEM), 1..4),
            1u32..=u32::MAX,
        ),
        |(patient, staff, lab, items, version)| {
            let p: Patient = source::PATIENT.record(&patient, Map::new()).unwrap();
            prop_assert_eq!(
                serde_json::to_value(&p).unwrap(),
                Value::Object(source::PATIENT.to_fields(&patient))
            );
            let s: Staff = source::STAFF.record(&staff, Map::new()).unwrap();
            prop_assert_eq!(
                serde_json::to_value(&s).unwrap(),
                Value::Object(source::STAFF.to_fields(&staff))
            );
            let items: Vec<Value> = items
                .iter()
                .map(|m| Value::Object(source::LAB_ITEM.to_fields(m)))
                .collect();
            let mut extra = Map::new();
            extra.insert("version".into(), json!(version));
            extra.insert("items".into(), Value::Array(items.clone()));
            let l: LabReport = source::LAB_REPORT.record(&lab, extra).unwrap();
            prop_assert_eq!(l.version, version);
            prop_assert_eq!(serde_json::to_value(&l.items).unwrap(), Value::Array(items));
            Ok(())
        },
    );
}

#[test]
fn column_for_field_never_panics() {
    let kind = prop_oneof![
        prop::sample::select(vec![
            "patient",
            "department",
            "staff",
            "lab_report",
            "lab_item",
            "exam_report"
        ])
        .prop_map(str::to_string),
        hostile_string(),
    ];
    let field = prop_oneof![
        hostile_string(),
        (0usize..1000, hostile_string()).prop_map(|(i, f)| format!("items[{i}].{f}")),
        "items\\[[^\\]]{0,4}\\]?\\.?[a-zA-Z中]{0,12}",
    ];
    check("column_for_field_any", 3000, (kind, field), |(kind, field)| {
        let column = source::column_for_field(&kind, &field);
        if source::view_for(&kind).is_none() {
            prop_assert_eq!(column, field);
        }
        Ok(())
    });
}

// ---------------------------------------------------------------- validation

fn patient_strategy() -> BoxedStrategy<Patient> {
    (prop::collection::vec(field_string(), 8), opt_field_string())
        .prop_map(|(mut f, phone)| Patient {
            updated_at: f.pop().unwrap(),
            registered_at: f.pop().unwrap(),
            birth_date: f.pop().unwrap(),
            gender_code: f.pop().unwrap(),
            name: f.pop().unwrap(),
            id_no: f.pop().unwrap(),
            id_type: f.pop().unwrap(),
            patient_id: f.pop().unwrap(),
            phone,
        })
        .boxed()
}

fn lab_item_strategy() -> BoxedStrategy<LabItem> {
    (
        prop::collection::vec(field_string(), 3),
        prop::collection::vec(opt_field_string(), 5),
        prop::option::of(any::<bool>()),
    )
        .prop_map(|(mut f, mut o, critical_flag)| LabItem {
            result_value: f.pop().unwrap(),
            item_name: f.pop().unwrap(),
            item_code: f.pop().unwrap(),
            method: o.pop().unwrap(),
            abnormal_flag: o.pop().unwrap(),
            reference_range: o.pop().unwrap(),
            result_unit: o.pop().unwrap(),
            loinc: o.pop().unwrap(),
            critical_flag,
        })
        .boxed()
}

fn lab_report_strategy() -> BoxedStrategy<LabReport> {
    (
        prop::collection::vec(field_string(), 7),
        prop::collection::vec(opt_field_string(), 13),
        any::<u32>(),
        prop::collection::vec(lab_item_strategy(), 0..4),
    )
        .prop_map(|(mut f, mut o, version, items)| LabReport {
            auditor_no: f.pop().unwrap(),
            reported_at: f.pop().unwrap(),
            name: f.pop().unwrap(),
            id_no: f.pop().unwrap(),
            id_type: f.pop().unwrap(),
            patient_id: f.pop().unwrap(),
            report_no: f.pop().unwrap(),
            version,
            visit_type: o.pop().unwrap(),
            visit_no: o.pop().unwrap(),
            order_no: o.pop().unwrap(),
            dept_code: o.pop().unwrap(),
            request_doctor_no: o.pop().unwrap(),
            specimen_code: o.pop().unwrap(),
            specimen_name: o.pop().unwrap(),
            specimen_no: o.pop().unwrap(),
            sampled_at: o.pop().unwrap(),
            audited_at: o.pop().unwrap(),
            category_code: o.pop().unwrap(),
            category_name: o.pop().unwrap(),
            data_code: o.pop().unwrap(),
            items,
        })
        .boxed()
}

fn exam_report_strategy() -> BoxedStrategy<ExamReport> {
    (
        prop::collection::vec(field_string(), 10),
        prop::collection::vec(opt_field_string(), 15),
        any::<u32>(),
        prop::option::of(any::<bool>()),
    )
        .prop_map(|(mut f, mut o, version, critical_flag)| ExamReport {
            auditor_no: f.pop().unwrap(),
            reported_at: f.pop().unwrap(),
            impression: f.pop().unwrap(),
            findings: f.pop().unwrap(),
            exam_class: f.pop().unwrap(),
            name: f.pop().unwrap(),
            id_no: f.pop().unwrap(),
            id_type: f.pop().unwrap(),
            patient_id: f.pop().unwrap(),
            report_no: f.pop().unwrap(),
            version,
            visit_type: o.pop().unwrap(),
            visit_no: o.pop().unwrap(),
            order_no: o.pop().unwrap(),
            dept_code: o.pop().unwrap(),
            request_doctor_no: o.pop().unwrap(),
            exam_item_code: o.pop().unwrap(),
            exam_item_name: o.pop().unwrap(),
            body_part_code: o.pop().unwrap(),
            body_part_name: o.pop().unwrap(),
            data_code: o.pop().unwrap(),
            accession_no: o.pop().unwrap(),
            study_instance_uid: o.pop().unwrap(),
            examined_at: o.pop().unwrap(),
            audited_at: o.pop().unwrap(),
            reporter_no: o.pop().unwrap(),
            critical_flag,
            image_url: None,
        })
        .boxed()
}

fn decisions_strategy() -> BoxedStrategy<Decisions> {
    let reason = prop_oneof![
        3 => prop::sample::select(vec!["01", "02", "03", "04", "05", "06"]).prop_map(|c| Some(c.to_string())),
        1 => Just(None),
        1 => hostile_string().prop_map(Some),
    ];
    let one = (
        field_string(),
        field_string(),
        any::<bool>(),
        reason,
        opt_field_string(),
    )
        .prop_map(|(order_id, report_id, recognise, reason_code, reason_text)| Decision {
            order_id,
            report_id,
            recognise,
            reason_code,
            reason_text,
        });
    (
        prop::collection::vec(field_string(), 4),
        prop::collection::vec(one, 0..5),
    )
        .prop_map(|(mut f, decisions)| Decisions {
            decided_at: f.pop().unwrap(),
            dept_code: f.pop().unwrap(),
            doctor_no: f.pop().unwrap(),
            check_id: f.pop().unwrap(),
            decisions,
        })
        .boxed()
}

/// Every error field, mapped as the worker maps it, lands on a column of the view (or an
/// item column, or a field the hospital side adds).
fn errors_map_to_columns(kind: &str, errors: &[FieldError]) -> TestCaseResult {
    let view = source::view_for(kind).unwrap();
    let mut added = Map::new();
    added.insert("version".into(), Value::Null);
    added.insert("items".into(), Value::Null);
    for e in errors {
        prop_assert!(!e.reason.is_empty());
        let column = source::column_for_field(kind, &e.field);
        prop_assert!(
            names_a_column(view, &column, &added),
            "{kind}: {} → {column:?} is no column",
            e.field
        );
    }
    Ok(())
}

#[test]
fn validation_never_panics() {
    let now = now();
    check("validate_patient", 1000, patient_strategy(), |p| {
        if let Err(errors) = validate::patient(&p, &now) {
            errors_map_to_columns("patient", &errors)?;
        }
        Ok(())
    });
    check("validate_lab_report", 600, lab_report_strategy(), |l| {
        if let Err(errors) = validate::lab_report(&l, &now) {
            errors_map_to_columns("lab_report", &errors)?;
            for e in &errors {
                if let Some(rest) = e.field.strip_prefix("items[") {
                    let i: usize = rest.split(']').next().unwrap().parse().unwrap();
                    prop_assert!(i < l.items.len());
                }
            }
        }
        Ok(())
    });
    check("validate_exam_report", 600, exam_report_strategy(), |e| {
        if let Err(errors) = validate::exam_report(&e, &now) {
            errors_map_to_columns("exam_report", &errors)?;
        }
        Ok(())
    });
    check("validate_decisions", 1000, decisions_strategy(), |d| {
        let top: BTreeSet<&str> = ["checkId", "doctorNo", "deptCode", "decidedAt", "decisions"].into();
        let inner: BTreeSet<&str> = ["orderId", "reportId", "reasonCode", "reasonText"].into();
        if let Err(errors) = validate::decisions(&d, &now) {
            for e in errors {
                let ok = top.contains(e.field.as_str())
                    || e.field
                        .strip_prefix("decisions[")
                        .and_then(|r| r.split_once("]."))
                        .is_some_and(|(i, f)| {
                            i.parse::<usize>().is_ok_and(|i| i < d.decisions.len()) && inner.contains(f)
                        });
                prop_assert!(ok, "unexpected field {:?}", e.field);
            }
        }
        for one in &d.decisions {
            let _ = validate::decision(one);
        }
        Ok(())
    });
}

#[test]
fn generated_valid_patients_pass() {
    let now = now();
    let strategy = (
        valid_id_card_born(ymd(1800, 1, 1), ymd(2024, 5, 31)),
        hostile_string().prop_filter("a name", |n| {
            !n.trim().is_empty()
                && n.chars().count() <= 50
                && !n.chars().any(|c| validate::refused_char(c, validate::Lines::Refused))
        }),
        "[A-Za-z0-9]{1,20}",
        prop::sample::select(vec!["0", "1", "2", "9"]),
        wire_time_in(ymd(1900, 1, 1), ymd(2024, 5, 30), false),
    );
    check(
        "validate_valid_patient",
        1000,
        strategy,
        |((id_no, born), name, id, gender, at)| {
            let p = Patient {
                patient_id: id,
                id_type: "01".into(),
                id_no,
                name,
                gender_code: gender.into(),
                birth_date: born.format("%Y-%m-%d").to_string(),
                phone: None,
                registered_at: checks::format_time(&at),
                updated_at: checks::format_time(&at),
            };
            prop_assert_eq!(validate::patient(&p, &now), Ok(()));
            Ok(())
        },
    );
}

// ---------------------------------------------------------------- frozen requests and paths

fn request_strategy() -> BoxedStrategy<Request> {
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..2048),
        any::<String>().prop_map(String::into_bytes),
        ("(t:|x:|T:|:|)", any::<String>()).prop_map(|(p, s)| format!("{p}{s}").into_bytes()),
        ("(t:|x:)", "[0-9a-f]{0,40}").prop_map(|(p, s)| format!("{p}{s}").into_bytes()),
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
    ];
    (
        prop::sample::select(vec![Method::Get, Method::Post, Method::Put]),
        hostile_string(),
        prop::option::of(prop::sample::select(Scope::ALL.to_vec())),
        prop::option::of(hostile_string()),
        prop::collection::vec((hostile_string(), hostile_string()), 0..3),
        body,
    )
        .prop_map(|(method, path, scope, content_type, headers, body)| Request {
            method,
            path,
            scope,
            content_type,
            headers,
            body,
        })
        .boxed()
}

#[test]
fn frozen_requests_round_trip() {
    check("request_round_trip", 1000, request_strategy(), |r| {
        let text = serde_json::to_string(&r).unwrap();
        prop_assert_eq!(&serde_json::from_str::<Request>(&text).unwrap(), &r);
        let value = serde_json::to_value(&r).unwrap();
        prop_assert_eq!(&serde_json::from_value::<Request>(value).unwrap(), &r);
        Ok(())
    });
}

/// What `frozen_request_garbage_is_an_error` hands the parser.
#[derive(Debug, Clone)]
enum FrozenInput {
    /// Bytes that are not a frozen request at all (hostile platform answers, random bytes).
    Garbage(Vec<u8>),
    /// A frozen request whose `body` member was replaced by `junk`.
    Body {
        request: Request,
        junk: Value,
        bytes: Vec<u8>,
    },
}

/// The body a frozen `body` member stands for, by the frozen format (`t:` then the text, or
/// `x:` then hex); `None` when `junk` is no such string and the request must not parse.
fn frozen_body(junk: &Value) -> Option<Vec<u8>> {
    let s = junk.as_str()?;
    if let Some(text) = s.strip_prefix("t:") {
        Some(text.as_bytes().to_vec())
    } else if let Some(hex) = s.strip_prefix("x:") {
        hex::decode(hex).ok()
    } else {
        None
    }
}

/// Whether `bytes` could even be shaped like a frozen request: a JSON object naming a
/// `method`, or a JSON array (serde's sequence form of a struct) starting with a method.
/// `hostile_body` makes such bytes only by a fluke; they are not asserted on.
fn shaped_like_request(bytes: &[u8]) -> bool {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => m.contains_key("method"),
        Ok(Value::Array(a)) => a
            .first()
            .and_then(Value::as_str)
            .is_some_and(|m| ["Get", "Post", "Put"].contains(&m)),
        _ => false,
    }
}

#[test]
fn frozen_request_garbage_is_an_error() {
    // Junk bodies: any JSON (a string only rarely has a right prefix), and strings that
    // nearly or exactly follow the frozen format, so both answers are exercised.
    let junk = prop_oneof![
        3 => json_value(),
        1 => ("(t:|x:|T:|X:|:|)", prop_oneof![any::<String>(), "[0-9a-fA-F]{0,41}", "[0-9a-fA-Fg-z]{0,8}"])
            .prop_map(|(p, s)| Value::String(format!("{p}{s}"))),
    ];
    let frozen = (request_strategy(), junk).prop_map(|(request, junk)| {
        let mut v = serde_json::to_value(&request).unwrap();
        v["body"] = junk.clone();
        let bytes = serde_json::to_vec(&v).unwrap();
        FrozenInput::Body { request, junk, bytes }
    });
    let garbage = hostile_body().prop_map(FrozenInput::Garbage);
    check("request_garbage", 400, prop_oneof![garbage, frozen], |input| {
        match input {
            FrozenInput::Garbage(bytes) => {
                if !shaped_like_request(&bytes) {
                    let parsed = serde_json::from_slice::<Request>(&bytes);
                    prop_assert!(parsed.is_err(), "garbage parsed as a frozen request: {parsed:?}");
                }
            }
            FrozenInput::Body { request, junk, bytes } => {
                let parsed = serde_json::from_slice::<Request>(&bytes);
                match (frozen_body(&junk), parsed) {
                    (None, Err(_)) => {}
                    (Some(body), Ok(got)) => prop_assert_eq!(got, Request { body, ..request }),
                    (None, Ok(got)) => prop_assert!(false, "junk body {junk:?} parsed as {got:?}"),
                    (Some(body), Err(e)) => {
                        prop_assert!(false, "valid frozen body {junk:?} ({body:?}) refused: {e}")
                    }
                }
            }
        }
        Ok(())
    });
}

fn is_upper_hex(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'A'..=b'F')
}

fn is_encoded(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => i += 1,
            b'%' if i + 2 < b.len() && is_upper_hex(b[i + 1]) && is_upper_hex(b[i + 2]) => i += 3,
            _ => return false,
        }
    }
    true
}

#[test]
fn encode_is_unreserved_ascii_and_reversible() {
    check("paths_encode", 3000, hostile_string(), |s| {
        let e = paths::encode(&s);
        prop_assert!(is_encoded(&e), "{e:?}");
        prop_assert_eq!(
            percent_encoding::percent_decode_str(&e).decode_utf8().unwrap(),
            s.as_str()
        );
        Ok(())
    });
}

#[test]
fn builders_keep_values_inside_their_segment() {
    let query = prop::collection::vec(hostile_string(), 6);
    check(
        "paths_builders",
        500,
        (
            hostile_string(),
            hostile_string(),
            any::<u32>(),
            query,
            prop::collection::vec(any::<u8>(), 0..256),
        ),
        |(report_no, format, version, q, pdf)| {
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8()
                    .unwrap()
                    .into_owned()
            };
            for t in [ReportType::Lab, ReportType::Exam] {
                let revoke = paths::revoke(
                    t,
                    &report_no,
                    &Revoke {
                        version,
                        reason: format.clone(),
                        revoked_at: String::new(),
                        operator_no: String::new(),
                    },
                );
                let segments: Vec<&str> = revoke.path.split('/').collect();
                prop_assert_eq!(segments.len(), 6, "{}", revoke.path);
                prop_assert_eq!(decode(segments[4]), report_no.as_str());
                prop_assert!(!revoke.path.contains(['?', '#']));
                let req = paths::pdf(t, &report_no, version, pdf.clone());
                let segments: Vec<&str> = req.path.split('/').collect();
                prop_assert_eq!(segments.len(), 8, "{}", req.path);
                prop_assert_eq!(decode(segments[4]), report_no.as_str());
                prop_assert_eq!(segments[6], version.to_string());
                use sha2::Digest;
                let hash = hex::encode(sha2::Sha256::digest(&pdf));
                prop_assert_eq!(&req.headers, &vec![(paths::HEADER_CONTENT_SHA256.to_string(), hash)]);
            }
            let download = paths::download(&report_no, &format);
            let (path, query) = download.path.split_once('?').unwrap();
            prop_assert_eq!(decode(path.split('/').nth(4).unwrap()), report_no.as_str());
            prop_assert_eq!(query.strip_prefix("format=").map(decode), Some(format.clone()));
            let list = paths::list_recognitions(&ListQuery {
                id_type: q[0].clone(),
                id_no: q[1].clone(),
                visit_no: q[2].clone(),
                doctor_no: q[3].clone(),
                dept_code: q[4].clone(),
                kind: q[5].clone(),
            });
            let (_, query) = list.path.split_once('?').unwrap();
            let pairs: Vec<(String, String)> = query
                .split('&')
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap();
                    (k.to_string(), decode(v))
                })
                .collect();
            let names = ["idType", "idNo", "visitNo", "doctorNo", "deptCode", "type"];
            prop_assert_eq!(pairs.len(), 6);
            for ((k, v), (name, want)) in pairs.iter().zip(names.iter().zip(&q)) {
                prop_assert_eq!(k, name);
                prop_assert_eq!(v, want);
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------- signatures

fn hex_digit_other_than(c: u8, pick: u8) -> u8 {
    const HEX: &[u8] = b"0123456789abcdefABCDEF";
    let candidates: Vec<u8> = HEX.iter().copied().filter(|&h| h != c).collect();
    candidates[pick as usize % candidates.len()]
}

#[test]
fn signatures_verify_only_themselves() {
    let alg = prop::sample::select(vec![SignAlg::HmacSha256, SignAlg::HmacSm3]);
    check(
        "sign_verify",
        1000,
        (
            alg,
            (hostile_string(), hostile_string(), any::<i64>(), hostile_string()),
            (0usize..64, any::<u8>(), "[0-9a-fA-F]{64}", hostile_string()),
        ),
        |(alg, (secret, app_id, ts, nonce), (at, pick, other, junk))| {
            let s = sign::sign(alg, &secret, &app_id, ts, &nonce);
            prop_assert_eq!(s.len(), 64);
            prop_assert!(s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            prop_assert!(sign::verify(alg, &secret, &app_id, ts, &nonce, &s));
            // One character changed (including only its case): refused.
            let mut one = s.clone().into_bytes();
            one[at] = hex_digit_other_than(one[at], pick);
            let one = String::from_utf8(one).unwrap();
            prop_assert!(!sign::verify(alg, &secret, &app_id, ts, &nonce, &one), "{one}");
            // Any other hex of the same length: refused.
            prop_assert_eq!(sign::verify(alg, &secret, &app_id, ts, &nonce, &other), other == s);
            prop_assert!(!sign::verify(alg, &secret, &app_id, ts, &nonce, &s.to_uppercase()) || s == s.to_uppercase());
            // Other lengths and junk: refused, never a panic.
            prop_assert!(!sign::verify(alg, &secret, &app_id, ts, &nonce, &s[..at]));
            let longer = format!("{s}0");
            prop_assert!(!sign::verify(alg, &secret, &app_id, ts, &nonce, &longer), "{}", longer);
            prop_assert_eq!(sign::verify(alg, &secret, &app_id, ts, &nonce, &junk), junk == s);
            Ok(())
        },
    );
}

// ---------------------------------------------------------------- regressions

/// The inputs these properties first broke, kept as plain cases (see HOSTILE_INPUT.md).
#[test]
fn regressions_found_by_these_properties() {
    // A 2xx naming a refusal but leaving out `message` used to count as delivered.
    let body = br#"{"code":"A0400","data":{"errors":[]}}"#;
    assert!(matches!(classify(200, None, body), Outcome::Permanent { status: 200, code, .. } if code == "A0400"));
    assert!(matches!(classify(201, None, br#"{"code":400}"#), Outcome::Permanent { code, .. } if code == "400"));
    // A 2xx without the envelope's code is not success (issue #13: gateways answer so).
    assert!(matches!(
        classify(200, None, br#"{"code":null}"#),
        Outcome::Retry { .. }
    ));
    assert!(matches!(classify(204, None, b""), Outcome::Retry { .. }));
    // A Retry-After past what a clock can add (the worker does `Instant::now() + after`).
    match classify(429, Some("18446744073709551615"), b"") {
        Outcome::Retry { after: Some(after), .. } => {
            assert_eq!(after, MAX_RETRY_AFTER);
            assert!(std::time::Instant::now().checked_add(after).is_some());
        }
        other => panic!("{other:?}"),
    }
    // Fields no column fills used to be reported as `?`.
    let mut extra = Map::new();
    extra.insert("".into(), Value::Null);
    extra.insert("version".into(), json!(1));
    let err = source::LAB_REPORT.record::<LabReport>(&Map::new(), extra).unwrap_err();
    assert_ne!(err.field_and_reason().0, "?");
    let row: Map<String, Value> = [
        "report_no",
        "patient_id",
        "id_type",
        "id_no",
        "patient_name",
        "reported_at",
        "auditor_no",
    ]
    .into_iter()
    .map(|c| (c.to_string(), json!("x")))
    .collect();
    let err = source::LAB_REPORT.record::<LabReport>(&row, Map::new()).unwrap_err();
    assert_eq!(err.field_and_reason(), ("version".to_string(), "required".to_string()));
}
