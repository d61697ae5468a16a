//! The recognition services as SQL functions (the public `hmr_*` wrappers are in
//! `sql/recognition.sql`). Answers are JSON in the hospital side's own snake_case words; the
//! platform's field names stay in the protocol crate.

use std::collections::HashMap;

use hmr_protocol::envelope::parse_data;
use hmr_protocol::{
    paths, CheckAnswer, CheckDecisions, CheckOrder, DecisionSource, ItemsAnswer, ListAnswer, ListQuery, PreciseQuery,
    PrescriptionCheck, RecognitionItem, ReportType,
};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};
use sha2::Digest;

use crate::gucs;
use crate::plans;
use crate::platform::{call, CallError, Settings};

fn item_json(i: &RecognitionItem) -> Value {
    json!({
        "report_id": i.report_id,
        "type": i.report_type.as_str(),
        "org_code": i.org_code,
        "org_name": i.org_name,
        "report_no": i.report_no,
        "version": i.version,
        "data_code": i.data_code,
        "item_name": i.item_name,
        "reported_at": i.reported_at,
        "valid_until": i.valid_until,
    })
}

fn unavailable(reason: &str) -> Value {
    json!({"status": "unavailable", "reason": reason})
}

fn bad_argument(message: String) -> ! {
    ereport!(
        PgLogLevel::ERROR,
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        message
    );
    unreachable!("ereport(ERROR) does not return")
}

fn refused(status: u16, message: &str) -> ! {
    ereport!(
        PgLogLevel::ERROR,
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        format!("互认平台拒绝了请求 (HTTP {status})"),
        message.to_string()
    );
    unreachable!("ereport(ERROR) does not return")
}

fn text_arg(v: &Value, name: &str, what: &str) -> String {
    match v.get(name) {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => bad_argument(format!("hmr: {what}.{name} is required (text)")),
    }
}

fn opt_text(v: &Value, name: &str) -> Option<String> {
    v.get(name)
        .and_then(|x| x.as_str())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Local item codes → platform data codes, through `hmr.item_map` (and codes already in the
/// catalog pass as they are), in the order asked, in one statement. A database error is an
/// error, never "not in the catalog": that would let an order go unchecked.
fn map_items(asked: &[(&str, &str)]) -> Vec<Option<String>> {
    // The pairs go as one JSON array: an array parameter would be planned afresh on every
    // call (PostgreSQL prefers a plan for the array's known length to the kept one).
    const SQL: &str = "SELECT coalesce(
              (SELECT m.data_code FROM hmr.item_map m
                WHERE m.type OPERATOR(pg_catalog.=) (o.x OPERATOR(pg_catalog.->>) 0)
                  AND m.local_code OPERATOR(pg_catalog.=) (o.x OPERATOR(pg_catalog.->>) 1)),
              (SELECT c.data_code FROM hmr.catalog c
                WHERE c.type OPERATOR(pg_catalog.=) (o.x OPERATOR(pg_catalog.->>) 0)
                  AND c.data_code OPERATOR(pg_catalog.=) (o.x OPERATOR(pg_catalog.->>) 1)))
         FROM pg_catalog.jsonb_array_elements($1) WITH ORDINALITY AS o(x, n)
        ORDER BY o.n";
    if asked.is_empty() {
        return vec![];
    }
    let pairs = json!(asked
        .iter()
        .map(|(kind, local)| json!([kind, local]))
        .collect::<Vec<_>>());
    plans::read(SQL, &[plans::JSONB], &[JsonB(pairs).into()], |rows| {
        rows.map(|row| row.get::<String>(1)).collect::<Result<Vec<_>, _>>()
    })
    .unwrap_or_else(|e| error!("hmr: cannot map items through hmr.item_map: {e}"))
}

fn settings_or(reason: &str) -> Result<Settings, Value> {
    Settings::load().ok_or_else(|| unavailable(reason))
}

/// 互认信息列表: count, page URL and items for the reception badge.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn list_recognitions_json(
    id_type: &str,
    id_no: &str,
    visit_no: &str,
    doctor_no: &str,
    dept_code: &str,
    kind: default!(&str, "'all'"),
    use_cache: default!(bool, true),
    workstation: default!(&str, "''"),
) -> JsonB {
    if !matches!(kind, "lab" | "exam" | "all") {
        bad_argument(format!("hmr: kind must be lab, exam or all, not {kind:?}"));
    }
    let query = ListQuery {
        id_type: id_type.trim().into(),
        id_no: hmr_protocol::checks::normalise_id_no(id_no),
        visit_no: visit_no.trim().into(),
        doctor_no: doctor_no.trim().into(),
        dept_code: dept_code.trim().into(),
        kind: kind.into(),
    };
    let cache_key = hex::encode(sha2::Sha256::digest(serde_json::to_vec(&query).unwrap_or_default()));
    // On a hot standby the (unlogged) cache cannot be read or written: the badge still works,
    // each call asking the platform.
    // SAFETY: reads a flag of this backend's shared-memory state; no arguments.
    let standby = unsafe { pg_sys::RecoveryInProgress() };
    // A read-only transaction (a screen that only reads) may read the cache, not write it.
    // SAFETY: reads a backend-local flag of the current transaction.
    let read_only = standby || unsafe { pg_sys::XactReadOnly };
    let ttl = if standby { 0 } else { gucs::LIST_CACHE_SECONDS.get() };
    if use_cache && ttl > 0 {
        const SQL: &str = "SELECT answer FROM hmr.list_cache
             WHERE cache_key OPERATOR(pg_catalog.=) $1 AND expires_at OPERATOR(pg_catalog.>) pg_catalog.clock_timestamp()";
        let hit = plans::read(SQL, &[plans::TEXT], &[cache_key.as_str().into()], |rows| {
            rows.first().get_one::<JsonB>()
        });
        if let Ok(Some(JsonB(hit))) = hit {
            log_list_call(&query, workstation, &hit, true, read_only);
            return JsonB(hit);
        }
    }
    let settings = match settings_or("hmr.platform is not configured") {
        Ok(s) => s,
        Err(v) => return JsonB(with_empty_list(v)),
    };
    let answer = match call(&settings, paths::list_recognitions(&query)) {
        Ok(body) => match parse_data::<ListAnswer>(&body) {
            Ok(a) => json!({
                "status": "ok",
                "count": a.count,
                "url": a.url,
                "items": a.items.iter().map(item_json).collect::<Vec<_>>(),
            }),
            Err(e) => with_empty_list(unavailable(&format!("unreadable answer: {e}"))),
        },
        Err(CallError::Refused { status, message }) => refused(status, &message),
        Err(CallError::Unavailable(reason) | CallError::NotFound(reason)) => with_empty_list(unavailable(&reason)),
    };
    if answer["status"] == "ok" && ttl > 0 && !read_only {
        const SQL: &str = "INSERT INTO hmr.list_cache
             VALUES ($1, $2, pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => $3))
             ON CONFLICT (cache_key) DO UPDATE SET answer = EXCLUDED.answer, expires_at = EXCLUDED.expires_at";
        let _ = plans::write(
            SQL,
            &[plans::TEXT, plans::JSONB, plans::FLOAT8],
            &[
                cache_key.as_str().into(),
                JsonB(answer.clone()).into(),
                f64::from(ttl).into(),
            ],
        );
    }
    log_list_call(&query, workstation, &answer, false, read_only);
    JsonB(answer)
}

/// Keeps the call for the hospital's statistics (hmr.list_log: 调阅/提醒). Not on a standby or
/// in a read-only transaction (a screen that only reads must keep working).
fn log_list_call(query: &ListQuery, workstation: &str, answer: &Value, cached: bool, read_only: bool) {
    if read_only {
        return;
    }
    let status = answer["status"].as_str().unwrap_or("unavailable");
    let shown = answer["count"].as_i64().map(|n| n as i32);
    const SQL: &str =
        "INSERT INTO hmr.list_log (doctor_no, dept_code, visit_no, id_no_masked, kind, shown, status, cached, workstation)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULLIF(pg_catalog.left($9, 32), ''))";
    use plans::{BOOL, INT4, TEXT};
    let _ = plans::write(
        SQL,
        &[TEXT, TEXT, TEXT, TEXT, TEXT, INT4, TEXT, BOOL, TEXT],
        &[
            query.doctor_no.as_str().into(),
            query.dept_code.as_str().into(),
            query.visit_no.as_str().into(),
            hmr_protocol::mask::id_no(&query.id_no).as_str().into(),
            query.kind.as_str().into(),
            shown.into(),
            status.into(),
            cached.into(),
            workstation.into(),
        ],
    );
}

/// A date alone (`2026-12-01`) means the whole day in UTC+8: from its first second, to its
/// last. Anything else is passed on as given (a full time).
fn whole_day(value: &str, end: bool) -> String {
    let china = hmr_protocol::checks::china();
    let at = |d: chrono::NaiveDate, h, m, s| {
        d.and_hms_opt(h, m, s)
            .and_then(|t| t.and_local_timezone(china).single())
            .map(|t| hmr_protocol::checks::format_time(&t))
    };
    match chrono::NaiveDate::parse_from_str(value.trim(), "%Y-%m-%d") {
        Ok(d) if end => at(d, 23, 59, 59).unwrap_or_else(|| value.to_string()),
        Ok(d) => at(d, 0, 0, 0).unwrap_or_else(|| value.to_string()),
        Err(_) => value.to_string(),
    }
}

fn with_empty_list(mut v: Value) -> Value {
    v["count"] = json!(0);
    v["url"] = Value::Null;
    v["items"] = json!([]);
    v
}

/// The orders of a call (`[{order_id, item_code, type}]`) whose items are in the catalog
/// (mapped through `hmr.item_map`): items outside it can never be recognised, so they are
/// not asked about.
fn catalog_orders(orders: Value) -> Vec<CheckOrder> {
    let Value::Array(order_list) = orders else {
        bad_argument("hmr: orders must be a JSON array".into())
    };
    let mut asked = Vec::new();
    for o in &order_list {
        let order_id = text_arg(o, "order_id", "orders[]");
        let local = text_arg(o, "item_code", "orders[]");
        let kind = text_arg(o, "type", "orders[]");
        let Some(report_type) = ReportType::parse(&kind) else {
            bad_argument(format!("hmr: orders[].type must be lab or exam, not {kind:?}"))
        };
        asked.push((order_id, local, kind, report_type));
    }
    let codes = map_items(&asked.iter().map(|a| (a.2.as_str(), a.1.as_str())).collect::<Vec<_>>());
    asked
        .into_iter()
        .zip(codes)
        .filter_map(|((order_id, local, _, report_type), code)| {
            code.map(|data_code| CheckOrder {
                order_id,
                local_item_code: local,
                data_code,
                report_type,
            })
        })
        .collect()
}

/// The ordering step (seed 18.2/19.2): while the doctor orders, the precise query
/// (精准互认信息接口) for the ordered items; when one is a duplicate, the platform's page URL
/// (the list's one-time ticket), which the workstation must open and the doctor answer
/// (互认 / 不互认) before going on. The save gate runs the prescription check later.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn order_check_json(visit: JsonB, orders: JsonB) -> JsonB {
    let visit = visit.0;
    let wanted = catalog_orders(orders.0);
    let empty = json!({"status": "ok", "duplicate": false, "url": null, "matches": []});
    if wanted.is_empty() {
        return JsonB(empty);
    }
    let id_type = text_arg(&visit, "id_type", "visit");
    let id_no = hmr_protocol::checks::normalise_id_no(&text_arg(&visit, "id_no", "visit"));
    let query = PreciseQuery {
        id_type: id_type.clone(),
        id_no: id_no.clone(),
        org_code: None,
        org_name: None,
        data_codes: Some(wanted.iter().map(|o| o.data_code.clone()).collect()),
        item_name: None,
        from: None,
        to: None,
        kind: None,
    };
    let Some(settings) = Settings::load() else {
        return JsonB(
            json!({"status": "unavailable", "reason": "hmr.platform is not configured",
                            "duplicate": false, "url": null, "matches": []}),
        );
    };
    let items = match call(&settings, paths::precise_query(&query)).and_then(|body| {
        parse_data::<ItemsAnswer>(&body).map_err(|e| CallError::Unavailable(format!("unreadable answer: {e}")))
    }) {
        Ok(a) => a.items,
        Err(e) => {
            let (status, reason) = e.status_and_reason();
            return JsonB(
                json!({"status": status, "reason": reason, "duplicate": false, "url": null,
                                "matches": []}),
            );
        }
    };
    let matches: Vec<Value> = wanted
        .iter()
        .filter_map(|o| {
            let reports: Vec<Value> = items
                .iter()
                .filter(|i| i.data_code == o.data_code)
                .map(item_json)
                .collect();
            (!reports.is_empty()).then(|| {
                json!({"order_id": o.order_id, "item_code": o.local_item_code, "data_code": o.data_code,
                       "reports": reports})
            })
        })
        .collect();
    if matches.is_empty() {
        return JsonB(empty);
    }
    // The page to force open: the list's URL for this patient (a one-time ticket).
    let list = ListQuery {
        id_type,
        id_no,
        visit_no: opt_text(&visit, "visit_no").unwrap_or_default(),
        doctor_no: opt_text(&visit, "doctor_no").unwrap_or_default(),
        dept_code: opt_text(&visit, "dept_code").unwrap_or_default(),
        kind: "all".into(),
    };
    let url = call(&settings, paths::list_recognitions(&list))
        .ok()
        .and_then(|body| parse_data::<ListAnswer>(&body).ok())
        .map(|a| a.url);
    JsonB(json!({"status": "ok", "duplicate": true, "url": url, "matches": matches}))
}

/// 精准互认信息: by organisation, item (local codes are mapped), date range.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn query_recognitions_json(filter: JsonB) -> JsonB {
    let f = filter.0;
    if !f.is_object() {
        bad_argument("hmr: the filter must be a JSON object".into());
    }
    let kind = opt_text(&f, "type");
    if kind.as_deref().is_some_and(|k| !matches!(k, "lab" | "exam" | "all")) {
        bad_argument("hmr: filter.type must be lab, exam or all".into());
    }
    let mut data_codes: Vec<String> = f
        .get("data_codes")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    if let Some(locals) = f.get("item_codes").and_then(Value::as_array) {
        for local in locals.iter().filter_map(Value::as_str) {
            let types: &[&str] = match kind.as_deref() {
                Some("lab") => &["lab"],
                Some("exam") => &["exam"],
                _ => &["lab", "exam"],
            };
            let asked: Vec<(&str, &str)> = types.iter().map(|t| (*t, local)).collect();
            data_codes.extend(map_items(&asked).into_iter().flatten());
        }
        if data_codes.is_empty() {
            // Local items outside the catalog can never be recognised: nothing to ask.
            return JsonB(json!({"status": "ok", "items": []}));
        }
    }
    let query = PreciseQuery {
        id_type: text_arg(&f, "id_type", "filter"),
        id_no: hmr_protocol::checks::normalise_id_no(&text_arg(&f, "id_no", "filter")),
        org_code: opt_text(&f, "org_code"),
        org_name: opt_text(&f, "org_name"),
        data_codes: (!data_codes.is_empty()).then_some(data_codes),
        item_name: opt_text(&f, "item_name"),
        from: opt_text(&f, "from").map(|d| whole_day(&d, false)),
        to: opt_text(&f, "to").map(|d| whole_day(&d, true)),
        kind,
    };
    let settings = match settings_or("hmr.platform is not configured") {
        Ok(s) => s,
        Err(mut v) => {
            v["items"] = json!([]);
            return JsonB(v);
        }
    };
    JsonB(match call(&settings, paths::precise_query(&query)) {
        Ok(body) => match parse_data::<ItemsAnswer>(&body) {
            Ok(a) => json!({"status": "ok", "items": a.items.iter().map(item_json).collect::<Vec<_>>()}),
            Err(e) => json!({"status": "unavailable", "reason": format!("unreadable answer: {e}"), "items": []}),
        },
        Err(CallError::Refused { status, message }) => refused(status, &message),
        Err(CallError::Unavailable(reason) | CallError::NotFound(reason)) => {
            json!({"status": "unavailable", "reason": reason, "items": []})
        }
    })
}

/// A check as recorded in `hmr.checks`.
struct CheckRow {
    check_id: String,
    /// ok | unavailable (the platform could not be asked) | unchecked (it refused to check:
    /// a data problem; the save is not stopped for it)
    status: &'static str,
    visit: Value,
    orders: Value,
    matches: Value,
    url: Option<String>,
    reason: Option<String>,
}

/// Where checks and prompts are kept outside any transaction, until the worker has moved
/// them into hmr.checks / hmr.prompts: `$PGDATA/hmr/{checks,prompts}/<check_id>.json`.
/// A refused save rolls back everything it wrote in the database; these files stay (a check
/// is needed by the decision, usually taken on another pooled connection).
fn kept_dir(what: &str) -> std::path::PathBuf {
    // SAFETY: DataDir is set by the postmaster before any backend runs and never changes.
    let data = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) };
    std::path::Path::new(&*data.to_string_lossy()).join("hmr").join(what)
}

/// Check ids come from the platform: only a safe file name is kept as one.
fn safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.')
}

thread_local! {
    /// The directories this backend has made sure exist (one `mkdir -p` per backend).
    static MADE: std::cell::RefCell<Vec<&'static str>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Writes `value` as `<dir>/<id>.json`; `durable`: through a temporary file, renamed, fsync'd
/// (prompts). A check file is written in place (one open and one write on the path a doctor
/// waits on): a torn file after an OS crash fails to parse and is left aside by the ingest.
fn keep_file(what: &'static str, id: &str, value: &Value, durable: bool) -> std::io::Result<()> {
    use std::io::Write;
    let dir = kept_dir(what);
    if !MADE.with(|m| m.borrow().contains(&what)) {
        std::fs::create_dir_all(&dir)?;
        MADE.with(|m| m.borrow_mut().push(what));
    }
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    if !durable {
        return std::fs::write(dir.join(format!("{id}.json")), bytes);
    }
    let tmp = dir.join(format!(".{id}.{}.tmp", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(format!("{id}.json")))?;
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(())
}

fn read_file(what: &str, id: &str) -> Option<Value> {
    if !safe_id(id) {
        return None;
    }
    let bytes = std::fs::read(kept_dir(what).join(format!("{id}.json"))).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The check as the row of hmr.checks, in JSON (`jsonb_populate_record`).
fn check_record(row: &CheckRow) -> Value {
    let v = &row.visit;
    json!({
        "check_id": row.check_id,
        "status": row.status,
        "patient_id": opt_text(v, "patient_id"),
        "id_type": opt_text(v, "id_type"),
        "id_no_masked": opt_text(v, "id_no").map(|n| mask_id(&n)),
        "visit_type": opt_text(v, "visit_type"),
        "visit_no": opt_text(v, "visit_no"),
        "doctor_no": opt_text(v, "doctor_no"),
        "dept_code": opt_text(v, "dept_code"),
        "orders": row.orders,
        "matches": row.matches,
        "url": row.url,
        "reason": row.reason,
    })
}

fn now_text() -> String {
    Spi::get_one::<String>("SELECT pg_catalog.clock_timestamp()::text")
        .ok()
        .flatten()
        .unwrap_or_default()
}

fn session_user() -> String {
    Spi::get_one::<String>("SELECT pg_catalog.session_user()::text")
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// A check's row from its record (a file's JSON), once.
const INSERT_CHECK_SQL: &str =
    "INSERT INTO hmr.checks SELECT * FROM pg_catalog.jsonb_populate_record(NULL::hmr.checks, $1)
     ON CONFLICT (check_id) DO NOTHING";

/// A prompt's row from its record, once (and only for a check on record).
const INSERT_PROMPT_SQL: &str = "INSERT INTO hmr.prompts (check_id, prompted_at, undecided, prompted_by)
     SELECT r.check_id, r.prompted_at, r.undecided, r.prompted_by
       FROM pg_catalog.jsonb_populate_record(NULL::hmr.prompts, $1) r
      WHERE EXISTS (SELECT 1 FROM hmr.checks c WHERE c.check_id OPERATOR(pg_catalog.=) r.check_id)
     ON CONFLICT (check_id, prompted_at) DO NOTHING";

fn insert_check(record: &Value) {
    Spi::run_with_args(INSERT_CHECK_SQL, &[JsonB(record.clone()).into()])
        .unwrap_or_else(|e| error!("hmr: cannot record the check: {e}"));
}

/// A check's row: a lock held until this transaction ends (the worker leaves the check's
/// file alone meanwhile: it would otherwise wait on this transaction's uncommitted row), and
/// the row, its columns as parameters (no record built and parsed on the doctor's path).
const RECORD_CHECK_SQL: &str =
    "INSERT INTO hmr.checks (check_id, status, patient_id, id_type, id_no_masked, visit_type, visit_no,
                             doctor_no, dept_code, orders, matches, url, reason, checked_at, checked_by)
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
            $14::pg_catalog.timestamptz, $15
       FROM (SELECT pg_catalog.pg_advisory_xact_lock_shared(716684, pg_catalog.hashtext($1))) l
     ON CONFLICT (check_id) DO NOTHING";

/// The session's user (`session_user`), as `hmr.checks.checked_by` keeps it.
fn session_user_name() -> String {
    // SAFETY: the session user exists while its session runs; the name is copied at once.
    unsafe {
        let name = pg_sys::GetUserNameFromId(pg_sys::GetSessionUserId(), false);
        std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}

/// Records a check in hmr.checks (this transaction) and in its file (whatever becomes of
/// this transaction), so a decision can be taken from any connection.
fn record_check(row: &CheckRow) {
    let mut record = check_record(row);
    record["checked_at"] = json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    record["checked_by"] = json!(session_user_name());
    let text = |k: &str| record[k].as_str();
    use plans::{JSONB, TEXT};
    plans::write(
        RECORD_CHECK_SQL,
        &[
            TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, JSONB, JSONB, TEXT, TEXT, TEXT, TEXT,
        ],
        &[
            text("check_id").into(),
            text("status").into(),
            text("patient_id").into(),
            text("id_type").into(),
            text("id_no_masked").into(),
            text("visit_type").into(),
            text("visit_no").into(),
            text("doctor_no").into(),
            text("dept_code").into(),
            JsonB(row.orders.clone()).into(),
            JsonB(row.matches.clone()).into(),
            text("url").into(),
            text("reason").into(),
            text("checked_at").into(),
            text("checked_by").into(),
        ],
    )
    .unwrap_or_else(|e| error!("hmr: cannot record the check: {e}"));
    if safe_id(&row.check_id) {
        // Written to its file only if this (sub)transaction aborts (a refused save): a
        // committed check is in the table, and creating a file on the doctor's path costs
        // more than the rest of the call on some disks.
        ensure_callbacks();
        // SAFETY: plain getter of the current subtransaction's id.
        let subid = unsafe { pg_sys::GetCurrentSubTransactionId() };
        PENDING.with(|p| p.borrow_mut().push((subid, row.check_id.clone(), record)));
    }
}

thread_local! {
    /// Checks recorded in the open transaction: (subtransaction, check id, record).
    static PENDING: std::cell::RefCell<Vec<(pg_sys::SubTransactionId, String, Value)>> =
        const { std::cell::RefCell::new(Vec::new()) };
    static CALLBACKS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn ensure_callbacks() {
    if CALLBACKS.with(|c| c.replace(true)) {
        return;
    }
    // SAFETY: registering transaction callbacks is allowed at any time in a backend; the
    // callbacks stay valid (functions of this library, which is never unloaded).
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}

/// Writes the files of the pending checks `which` selects, and forgets them. Runs inside
/// PostgreSQL's abort processing: nothing here may raise; a failure is only lost durability.
fn spill(which: impl Fn(pg_sys::SubTransactionId) -> bool) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        PENDING.with(|p| {
            p.borrow_mut().retain(|(subid, id, record)| {
                if which(*subid) {
                    let _ = keep_file("checks", id, record, false);
                    false
                } else {
                    true
                }
            })
        })
    }));
}

unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => spill(|_| true),
        pg_sys::XactEvent::XACT_EVENT_COMMIT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            let _ = std::panic::catch_unwind(|| PENDING.with(|p| p.borrow_mut().clear()));
        }
        _ => {}
    }
}

unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => spill(|subid| subid == my),
        pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB => {
            let _ = std::panic::catch_unwind(|| {
                PENDING.with(|p| {
                    for entry in p.borrow_mut().iter_mut().filter(|e| e.0 == my) {
                        entry.0 = parent;
                    }
                })
            });
        }
        _ => {}
    }
}

/// 4413**********1234: enough to recognise, not enough to identify.
pub fn mask_id(id_no: &str) -> String {
    hmr_protocol::mask::id_no(id_no)
}

/// Makes sure a check is in `hmr.checks` (from its kept file when the transaction that
/// asked rolled it back, on whatever connection that was). False when it is unknown.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn ensure_check(check_id: &str) -> bool {
    let known = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM hmr.checks WHERE check_id OPERATOR(pg_catalog.=) $1)",
        &[check_id.into()],
    )
    .unwrap_or_else(|e| error!("hmr: cannot read hmr.checks: {e}"))
    .unwrap_or(false);
    if known {
        return true;
    }
    match read_file("checks", check_id) {
        Some(record) => {
            insert_check(&record);
            true
        }
        None => false,
    }
}

/// The gate is refusing a save (HM001): the prompt (提醒) is kept durably, with the orders
/// still undecided, whatever becomes of the refused transaction.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn keep_prompt(check_id: &str, undecided: JsonB) -> bool {
    if !safe_id(check_id) || !ensure_check(check_id) {
        return false;
    }
    let record = json!({
        "check_id": check_id,
        "prompted_at": now_text(),
        "undecided": undecided.0,
        "prompted_by": session_user(),
    });
    Spi::run_with_args(INSERT_PROMPT_SQL, &[JsonB(record.clone()).into()])
        .unwrap_or_else(|e| error!("hmr: cannot record the prompt: {e}"));
    let id = format!("{check_id}.{}", uuid::Uuid::new_v4().simple());
    keep_file("prompts", &id, &record, true)
        .map(|_| true)
        .unwrap_or_else(|e| {
            warning!("hmr: cannot keep the prompt of check {check_id}: {e}");
            false
        })
}

/// Moves kept checks and prompts into their tables (the worker calls this every few
/// seconds). A file goes only once its row is committed: a second call removes what the
/// first one inserted. Returns the rows inserted.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn ingest_kept() -> i32 {
    ingest(true)
}

/// `remove`: the worker's call, in its own short transaction — it skips checks a transaction
/// still open is writing (their advisory lock) and removes the files of committed rows. The
/// doctor's own transaction (`learn_page_decisions`) only inserts: a row it can see may be
/// its own, not yet committed.
fn ingest(remove: bool) -> i32 {
    let mut inserted = 0;
    for what in ["checks", "prompts"] {
        let Ok(entries) = std::fs::read_dir(kept_dir(what)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let Some(record) = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            else {
                continue;
            };
            if remove {
                let free = Spi::get_one_with_args::<bool>(
                    "SELECT pg_catalog.pg_try_advisory_xact_lock(716684,
                            pg_catalog.hashtext($1 OPERATOR(pg_catalog.->>) 'check_id'))",
                    &[JsonB(record.clone()).into()],
                )
                .unwrap_or_else(|e| error!("hmr: cannot ingest kept {what}: {e}"))
                .unwrap_or(false);
                if !free {
                    continue; // a transaction writing this check is still open: next time
                }
            }
            let (exists, insert) = if what == "checks" {
                (
                    "SELECT EXISTS (SELECT 1 FROM hmr.checks c WHERE c.check_id OPERATOR(pg_catalog.=) ($1 OPERATOR(pg_catalog.->>) 'check_id'))",
                    INSERT_CHECK_SQL,
                )
            } else {
                (
                    "SELECT EXISTS (SELECT 1 FROM hmr.prompts p, pg_catalog.jsonb_populate_record(NULL::hmr.prompts, $1) r
                                     WHERE p.check_id OPERATOR(pg_catalog.=) r.check_id
                                       AND p.prompted_at OPERATOR(pg_catalog.=) r.prompted_at)",
                    INSERT_PROMPT_SQL,
                )
            };
            let committed = Spi::get_one_with_args::<bool>(exists, &[JsonB(record.clone()).into()])
                .unwrap_or_else(|e| error!("hmr: cannot read kept {what}: {e}"))
                .unwrap_or(false);
            if committed {
                if remove {
                    let _ = std::fs::remove_file(&path);
                }
            } else {
                Spi::run_with_args(insert, &[JsonB(record).into()])
                    .unwrap_or_else(|e| error!("hmr: cannot ingest kept {what}: {e}"));
                inserted += 1;
            }
        }
    }
    inserted
}

/// 处方保存互认逻辑校验: maps local item codes, asks the platform, records the check.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn check_prescription_json(visit: JsonB, orders: JsonB) -> JsonB {
    let visit = visit.0;
    let checked = catalog_orders(orders.0);
    let local_of: HashMap<String, String> = checked
        .iter()
        .map(|o| (o.order_id.clone(), o.local_item_code.clone()))
        .collect();
    if checked.is_empty() {
        return JsonB(json!({"status": "ok", "duplicate": false, "check_id": null, "url": null, "matches": []}));
    }
    let request = PrescriptionCheck {
        id_type: text_arg(&visit, "id_type", "visit"),
        id_no: hmr_protocol::checks::normalise_id_no(&text_arg(&visit, "id_no", "visit")),
        patient_id: text_arg(&visit, "patient_id", "visit"),
        visit_type: text_arg(&visit, "visit_type", "visit"),
        visit_no: text_arg(&visit, "visit_no", "visit"),
        doctor_no: text_arg(&visit, "doctor_no", "visit"),
        dept_code: text_arg(&visit, "dept_code", "visit"),
        orders: checked,
    };
    let orders_json = json!(request
        .orders
        .iter()
        .map(
            |o| json!({"order_id": o.order_id, "item_code": o.local_item_code, "data_code": o.data_code,
                        "type": o.report_type.as_str()})
        )
        .collect::<Vec<_>>());
    let outcome = match Settings::load() {
        None => Err(CallError::Unavailable("hmr.platform is not configured".into())),
        Some(settings) => call(&settings, paths::prescription_check(&request)),
    };
    let row = match outcome.and_then(|body| {
        parse_data::<CheckAnswer>(&body).map_err(|e| CallError::Unavailable(format!("unreadable answer: {e}")))
    }) {
        Ok(a) => {
            let matches = json!(a
                .matches
                .iter()
                .map(|m| json!({
                    "order_id": m.order_id,
                    "data_code": m.data_code,
                    "item_code": local_of.get(&m.order_id),
                    "reports": m.reports.iter().map(item_json).collect::<Vec<_>>(),
                }))
                .collect::<Vec<_>>());
            CheckRow {
                check_id: a.check_id,
                status: "ok",
                visit,
                orders: orders_json,
                matches,
                url: Some(a.url),
                reason: None,
            }
        }
        // A data problem (the patient not at the platform yet, an identity number it refuses,
        // a refusal code) never stops care: the save goes on, the check is recorded with why.
        Err(e) => {
            if matches!(e, CallError::NotFound(_)) {
                // The patient has not reached the platform: send it ahead of the queue.
                let pid = request.patient_id.clone();
                let _ = Spi::run_with_args("SELECT hmr.hurry('patient', $1)", &[pid.as_str().into()]);
            }
            let (status, reason) = e.status_and_reason();
            not_checked(status, reason, visit, orders_json)
        }
    };
    record_check(&row);
    let mut answer = json!({
        "status": row.status,
        "duplicate": row.matches.as_array().is_some_and(|m| !m.is_empty()),
        "check_id": row.check_id,
        "url": row.url,
        "matches": row.matches,
    });
    if let Some(reason) = &row.reason {
        answer["reason"] = json!(reason);
    }
    JsonB(answer)
}

fn not_checked(status: &'static str, reason: String, visit: Value, orders: Value) -> CheckRow {
    CheckRow {
        check_id: format!("{status}-{}", uuid::Uuid::new_v4()),
        status,
        visit,
        orders,
        matches: json!([]),
        url: None,
        reason: Some(hmr_protocol::mask::scrub(&reason)),
    }
}

/// Asks the platform what was decided for a check (its page, §6) and records the decisions
/// taken on the page in hmr.decisions (source `page`); a check decided completely on the
/// page counts as delivered (its decisions are not uploaded again). Returns the answer and
/// how many decisions were recorded now.
fn learn_check(settings: &Settings, check_id: &str) -> Result<(CheckDecisions, i64), CallError> {
    let body = call(settings, paths::check_decisions(check_id))?;
    let answer: CheckDecisions =
        parse_data(&body).map_err(|e| CallError::Unavailable(format!("unreadable answer: {e}")))?;
    let mut recorded = 0;
    for d in answer.decisions.iter().filter(|d| d.source == DecisionSource::Page) {
        recorded += Spi::get_one_with_args::<i64>(
            "WITH c AS (SELECT k.dept_code, k.doctor_no FROM hmr.checks k WHERE k.check_id OPERATOR(pg_catalog.=) $1),
                  ins AS (
                    INSERT INTO hmr.decisions (check_id, order_id, report_id, recognise, reason_code, reason_text,
                                               doctor_no, dept_code, decided_at, source)
                    SELECT $1, $2, $3, $4, $5, $6, coalesce(nullif($7, ''), c.doctor_no),
                           coalesce(c.dept_code, ''), $8::timestamptz, 'page'
                      FROM c
                     WHERE NOT EXISTS (SELECT 1 FROM hmr.current_decisions x
                                        WHERE x.check_id OPERATOR(pg_catalog.=) $1 AND x.order_id OPERATOR(pg_catalog.=) $2
                                          AND x.report_id OPERATOR(pg_catalog.=) $3 AND x.recognise OPERATOR(pg_catalog.=) $4)
                    RETURNING 1)
             SELECT pg_catalog.count(*) FROM ins",
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
        .unwrap_or(0);
    }
    if answer.complete && answer.decisions.iter().all(|d| d.source == DecisionSource::Page) {
        // Taken on the page: the platform has them; nothing to upload.
        Spi::run_with_args(
            "INSERT INTO hmr.delivered (kind, key, version, content_hash) VALUES ('decision', $1, 1, 'page')
             ON CONFLICT (kind, key) DO NOTHING",
            &[check_id.into()],
        )
        .unwrap_or_else(|e| error!("hmr: cannot record the page decisions: {e}"));
    }
    Ok((answer, recorded))
}

/// 互认页面操作结果: what the doctor decided on the platform's page for this check, recorded
/// here (the HIS polls it while the page is open).
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn page_decisions_json(check_id: &str) -> JsonB {
    if !ensure_check(check_id) {
        bad_argument(format!("hmr: unknown check {check_id}"));
    }
    let Some(settings) = Settings::load() else {
        return JsonB(json!({"status": "unavailable", "reason": "hmr.platform is not configured"}));
    };
    JsonB(match learn_check(&settings, check_id) {
        Ok((a, recorded)) => json!({
            "status": "ok",
            "check_id": check_id,
            "complete": a.complete,
            "recorded": recorded,
            "decisions": a.decisions.iter().map(|d| json!({
                "order_id": d.order_id, "report_id": d.report_id, "recognise": d.recognise,
                "reason_code": d.reason_code, "reason_text": d.reason_text, "doctor_no": d.doctor_no,
                "decided_at": d.decided_at,
                "source": if d.source == DecisionSource::Page { "page" } else { "upload" },
            })).collect::<Vec<_>>(),
        }),
        Err(e) => {
            let (status, reason) = e.status_and_reason();
            json!({"status": status, "reason": reason})
        }
    })
}

/// For the gate, before it refuses a save: decisions the doctor took on the page of an
/// earlier check of these orders (the page of the previous refusal). Returns how many were
/// recorded; the platform being down only means none were learnt.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn learn_page_decisions(undecided: JsonB) -> i64 {
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
fn decision_problem(recognise: bool, reason_code: Option<&str>, reason_text: Option<&str>) -> Option<String> {
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

/// Downloads a recognised report from the platform and keeps it; NULL when the platform is
/// unavailable. Called by hmr_download_report() when the kept copy is missing.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn fetch_report(report_id: &str, format: &str) -> Option<Vec<u8>> {
    let settings = Settings::load()?;
    match call(&settings, paths::download(report_id, format)) {
        Ok(body) => {
            let bytes = if format == "json" {
                // Keep the structured report itself, not the envelope around it.
                parse_data::<Value>(&body)
                    .map(|v| serde_json::to_vec(&v).unwrap_or_default())
                    .unwrap_or(body)
            } else {
                body
            };
            keep_report(report_id, format, &bytes);
            Some(bytes)
        }
        Err(CallError::Refused { status: 403, .. }) => {
            bad_argument(format!("互认平台拒绝下载报告 {report_id}：本院未互认该报告"))
        }
        Err(CallError::NotFound(_)) => bad_argument(format!("互认平台没有报告 {report_id} 的 {format} 文件")),
        Err(CallError::Refused { status, message }) => refused(status, &message),
        Err(CallError::Unavailable(_)) => None,
    }
}

fn keep_report(report_id: &str, format: &str, bytes: &[u8]) {
    let sha = hex::encode(sha2::Sha256::digest(bytes));
    let org = report_id.split(':').next().unwrap_or_default().to_string();
    Spi::run_with_args(
        "INSERT INTO hmr.retained_reports (report_id, format, bytes, sha256, source_org)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (report_id, format) DO NOTHING",
        &[
            report_id.into(),
            format.into(),
            bytes.to_vec().into(),
            sha.into(),
            org.into(),
        ],
    )
    .unwrap_or_else(|e| error!("hmr: cannot keep the report: {e}"));
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn decision_rules_in_chinese() {
        let p = |sql: &str| Spi::get_one::<String>(sql).unwrap();
        assert_eq!(p("SELECT hmr.decision_problem(true, NULL, NULL)"), None);
        assert_eq!(
            p("SELECT hmr.decision_problem(false, NULL, NULL)").as_deref(),
            Some("选择“不互认”时必须选择原因（01–06）")
        );
        assert!(p("SELECT hmr.decision_problem(false, '06', NULL)")
            .unwrap()
            .contains("具体说明"));
        assert_eq!(p("SELECT hmr.decision_problem(false, '02', NULL)"), None);
        assert!(p("SELECT hmr.decision_problem(false, '09', NULL)")
            .unwrap()
            .contains("无效"));
    }

    #[pg_test]
    fn unconfigured_platform_is_unavailable_not_an_error() {
        let v =
            Spi::get_one::<pgrx::JsonB>("SELECT hmr_list_recognitions('01', '11010519491231002X', 'V1', 'D1', 'K1')")
                .unwrap()
                .unwrap()
                .0;
        assert_eq!(v["status"], "unavailable");
        assert_eq!(v["count"], 0);
    }

    #[pg_test]
    fn ids_are_masked() {
        assert_eq!(super::mask_id("441302198003151233"), "4413**********1233");
    }
}
