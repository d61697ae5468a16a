//! Decisions taken on the platform's page for a check (contract §6), and the rules of a
//! decision (互认, or 不互认 with a reason).

use super::*;

/// Asks the platform what was decided for a check (its page, §6) and records the decisions
/// taken on the page in hmr.decisions (source `page`); a check decided completely on the
/// page counts as delivered (its decisions are not uploaded again). Returns the answer and
/// how many decisions were recorded now.
pub(super) fn learn_check(settings: &Settings, check_id: &str) -> Result<(CheckDecisions, i64), CallError> {
    let body = call(settings, paths::check_decisions(check_id))?;
    let answer: CheckDecisions =
        parse_data(&body).map_err(|e| CallError::Unavailable(format!("unreadable answer: {e}")))?;
    let mut recorded = 0;
    for d in answer.decisions.iter().filter(|d| d.source == DecisionSource::Page) {
        recorded += Spi::get_one_with_args::<i32>(
            "SELECT hmr.adopt_page_decision($1, $2, $3, $4, $5, $6, $7, $8::timestamptz)",
            &[
                check_id.into(),
                d.order_id.as_str().into(),
                d.report_id.as_str().into(),
                d.recognise.into(),
                d.reason_code.clone().into(),
                d.reason_text.clone().into(),
                d.doctor_no.as_str().into(),
                d.decided_at.as_str().into(),
            ],
        )
        .unwrap_or_else(|e| error!("hmr: cannot record a page decision: {e}"))
        .map_or(0, i64::from);
    }
    if answer.complete && answer.decisions.iter().all(|d| d.source == DecisionSource::Page) {
        // Taken on the page: the platform has them; nothing to upload. The first time, an event
        // lets the worker fetch and keep the recognised reports (pdf and json), as after an
        // upload.
        Spi::run_with_args(
            "WITH d AS (INSERT INTO hmr.delivered (kind, key, version, content_hash) VALUES ('decision', $1, 1, 'page')
                        ON CONFLICT (kind, key) DO NOTHING RETURNING key)
             INSERT INTO hmr.outbox (kind, key, op)
             SELECT 'decision', d.key, 'I' FROM d
              WHERE NOT EXISTS (SELECT 1 FROM hmr.outbox o
                                 WHERE o.kind OPERATOR(pg_catalog.=) 'decision' AND o.key OPERATOR(pg_catalog.=) $1)",
            &[check_id.into()],
        )
        .unwrap_or_else(|e| error!("hmr: cannot record the page decisions: {e}"));
        crate::capture::wake_workers();
    }
    Ok((answer, recorded))
}

/// The check's decisions could not be learnt.
pub(super) fn failed(status: CallStatus, reason: String) -> PageDecisionsResult {
    PageDecisionsResult {
        status,
        reason: Some(reason),
        check_id: None,
        complete: None,
        recorded: None,
        decisions: None,
    }
}

/// 互认页面操作结果: what the doctor decided on the platform's page for this check, recorded
/// here (the HIS polls it while the page is open).
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
pub(super) fn page_decisions_json(check_id: &str) -> JsonB {
    if !ensure_check(check_id) {
        bad_argument(format!("hmr: unknown check {check_id}"));
    }
    let Some(settings) = Settings::load() else {
        return answer(&failed(
            CallStatus::Unavailable,
            "hmr.platform is not configured".into(),
        ));
    };
    answer(&match learn_check(&settings, check_id) {
        Ok((a, recorded)) => PageDecisionsResult {
            status: CallStatus::Ok,
            reason: None,
            check_id: Some(check_id.to_string()),
            complete: Some(a.complete),
            recorded: Some(recorded),
            decisions: Some(
                a.decisions
                    .into_iter()
                    .map(|d| PageDecision {
                        order_id: d.order_id,
                        report_id: d.report_id,
                        recognise: d.recognise,
                        reason_code: d.reason_code,
                        reason_text: d.reason_text,
                        doctor_no: d.doctor_no,
                        decided_at: d.decided_at,
                        source: d.source,
                    })
                    .collect(),
            ),
        },
        Err(e) => {
            let (status, reason) = e.status_and_reason();
            failed(call_status(status), reason)
        }
    })
}

/// For `hmr_record_decision`, before it records a HIS decision: the decisions already taken on
/// the platform's page for this check, recorded here (so a different choice is refused with
/// HM017). 0 when the platform cannot be asked now: the worker reads the check again before it
/// uploads, and adopts the page's decisions then.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
pub(super) fn learn_check_decisions(check_id: &str) -> i64 {
    let Some(settings) = Settings::load() else {
        return 0;
    };
    learn_check(&settings, check_id).map_or(0, |(_, n)| n)
}

/// For the gate, before it refuses a save: decisions the doctor took on the page of an
/// earlier check of these orders (the page of the previous refusal). Returns how many were
/// recorded; the platform being down only means none were learnt.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
pub(super) fn learn_page_decisions(undecided: JsonB) -> i64 {
    let orders: Vec<String> = undecided
        .0
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m["order_id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if orders.is_empty() {
        return 0;
    }
    ingest(false);
    let checks: Vec<String> = Spi::connect(|client| {
        client
            .select(
                "SELECT c.check_id FROM hmr.checks c
                  WHERE c.status OPERATOR(pg_catalog.=) 'ok' AND c.refused_at IS NULL
                    AND c.checked_at OPERATOR(pg_catalog.>) (pg_catalog.now() OPERATOR(pg_catalog.-) interval '1 day')
                    AND NOT EXISTS (SELECT 1 FROM hmr.delivered d
                                     WHERE d.kind OPERATOR(pg_catalog.=) 'decision' AND d.key OPERATOR(pg_catalog.=) c.check_id)
                    AND EXISTS (SELECT 1 FROM pg_catalog.jsonb_array_elements(c.matches) m
                                 WHERE (m OPERATOR(pg_catalog.->>) 'order_id') OPERATOR(pg_catalog.=) ANY ($1))
                  ORDER BY c.checked_at DESC LIMIT 5",
                None,
                &[orders.clone().into()],
            )?
            .map(|r| r.get::<String>(1).map(Option::unwrap_or_default))
            .collect::<Result<Vec<_>, _>>()
    })
    .unwrap_or_else(|e| error!("hmr: cannot read hmr.checks: {e}"));
    let Some(settings) = Settings::load() else {
        return 0;
    };
    checks
        .iter()
        .map(|id| learn_check(&settings, id).map_or(0, |(_, n)| n))
        .sum()
}

/// The contract's reason rules, in words for the doctor; NULL when the decision is valid.
#[pg_extern(immutable, parallel_safe)]
pub(super) fn decision_problem(
    recognise: bool,
    reason_code: Option<&str>,
    reason_text: Option<&str>,
) -> Option<String> {
    let d = hmr_protocol::Decision {
        order_id: "-".into(),
        report_id: "-".into(),
        recognise,
        reason_code: reason_code.map(str::to_string),
        reason_text: reason_text.map(str::to_string),
    };
    let e = hmr_protocol::validate::decision(&d).err()?;
    Some(
        match (e.field.as_str(), e.reason.as_str()) {
            ("reasonCode", "required") => "选择“不互认”时必须选择原因（01–06）",
            ("reasonCode", "code") => "不互认原因代码无效，应为 01–06",
            ("reasonText", "required") => "原因为“其他情形确需复查”（06）时必须填写具体说明",
            ("reasonCode" | "reasonText", "not-allowed") => "选择“互认”时不填写不互认原因",
            ("reasonText", "length") => "不互认原因说明过长（最多 200 字）",
            ("reasonText", "control-character") => "不互认原因说明含有不可见的控制字符，请重新输入",
            _ => "互认/不互认选择无效",
        }
        .to_string(),
    )
}
