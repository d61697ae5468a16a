//! What must outlive the caller's transaction: a check and its prompt, written from files
//! when the transaction that asked rolled back (`spill`, `ingest_kept`), and the reports a
//! doctor recognised, kept for download.

use super::*;

/// A check as recorded in `hmr.checks`.
pub(super) struct CheckRow {
    pub(super) check_id: String,
    /// ok | unavailable (the platform could not be asked) | unchecked (it refused to check:
    /// a data problem; the save is not stopped for it)
    pub(super) status: &'static str,
    pub(super) visit: Value,
    pub(super) orders: Value,
    pub(super) matches: Value,
    pub(super) url: Option<String>,
    pub(super) reason: Option<String>,
}

/// Where checks and prompts are kept outside any transaction, until the worker has moved
/// them into hmr.checks / hmr.prompts: `$PGDATA/hmr/{checks,prompts}/<check_id>.json`.
/// A refused save rolls back everything it wrote in the database; these files stay (a check
/// is needed by the decision, usually taken on another pooled connection).
pub(super) fn spool_dir(what: &str) -> std::path::PathBuf {
    // SAFETY: DataDir is set by the postmaster before any backend runs and never changes.
    let data = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) };
    std::path::Path::new(&*data.to_string_lossy()).join("hmr").join(what)
}

/// Check ids come from the platform: only a safe file name is kept as one.
pub(super) fn safe_id(id: &str) -> bool {
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
pub(super) fn spool_file(what: &'static str, id: &str, value: &Value, durable: bool) -> std::io::Result<()> {
    use std::io::Write;
    let dir = spool_dir(what);
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

pub(super) fn read_file(what: &str, id: &str) -> Option<Value> {
    if !safe_id(id) {
        return None;
    }
    let bytes = std::fs::read(spool_dir(what).join(format!("{id}.json"))).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The check as the row of hmr.checks, in JSON (`jsonb_populate_record`).
pub(super) fn check_record(row: &CheckRow) -> Value {
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

/// A check's row from its record (a file's JSON), once.
pub(super) const INSERT_CHECK_SQL: &str =
    "INSERT INTO hmr.checks SELECT * FROM pg_catalog.jsonb_populate_record(NULL::hmr.checks, $1)
     ON CONFLICT (check_id) DO NOTHING";

/// A prompt's row from its record, once (and only for a check on record).
pub(super) const INSERT_PROMPT_SQL: &str = "INSERT INTO hmr.prompts (check_id, prompted_at, undecided, prompted_by)
     SELECT r.check_id, r.prompted_at, r.undecided, r.prompted_by
       FROM pg_catalog.jsonb_populate_record(NULL::hmr.prompts, $1) r
      WHERE EXISTS (SELECT 1 FROM hmr.checks c WHERE c.check_id OPERATOR(pg_catalog.=) r.check_id)
        AND NOT EXISTS (SELECT 1 FROM hmr.prompts p WHERE p.check_id OPERATOR(pg_catalog.=) r.check_id)
     ON CONFLICT (check_id, prompted_at) DO NOTHING";

pub(super) fn insert_check(record: &Value) {
    Spi::run_with_args(INSERT_CHECK_SQL, &[JsonB(record.clone()).into()])
        .unwrap_or_else(|e| error!("hmr: cannot record the check: {e}"));
}

/// A check's row: a lock held until this transaction ends (the worker leaves the check's
/// file alone meanwhile: it would otherwise wait on this transaction's uncommitted row), and
/// the row, its columns as parameters (no record built and parsed on the doctor's path).
pub(super) const RECORD_CHECK_SQL: &str =
    "INSERT INTO hmr.checks (check_id, status, patient_id, id_type, id_no_masked, visit_type, visit_no,
                             doctor_no, dept_code, orders, matches, url, reason, checked_at, checked_by)
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
            $14::pg_catalog.timestamptz, $15
       FROM (SELECT pg_catalog.pg_advisory_xact_lock_shared(716684, pg_catalog.hashtext($1))) l
     ON CONFLICT (check_id) DO NOTHING";

/// The session's user (`session_user`), as `hmr.checks.checked_by` keeps it.
pub(super) fn session_user_name() -> String {
    // SAFETY: the session user exists while its session runs; the name is copied at once.
    unsafe {
        let name = pg_sys::GetUserNameFromId(pg_sys::GetSessionUserId(), false);
        std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}

/// Records a check in hmr.checks (this transaction) and in its file (whatever becomes of
/// this transaction), so a decision can be taken from any connection.
pub(super) fn record_check(row: &CheckRow) {
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

pub(super) fn ensure_callbacks() {
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
pub(super) fn spool_aborted_checks(which: impl Fn(pg_sys::SubTransactionId) -> bool) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        PENDING.with(|p| {
            p.borrow_mut().retain(|(subid, id, record)| {
                if which(*subid) {
                    let _ = spool_file("checks", id, record, false);
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
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => {
            spool_aborted_checks(|_| true)
        }
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
        pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => spool_aborted_checks(|subid| subid == my),
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

/// Makes sure a check is in `hmr.checks` (from its kept file when the transaction that
/// asked rolled it back, on whatever connection that was). False when it is unknown.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
pub(super) fn ensure_check(check_id: &str) -> bool {
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
pub(super) fn keep_prompt(check_id: &str, undecided: JsonB) -> bool {
    if !safe_id(check_id) || !ensure_check(check_id) {
        return false;
    }
    // The hospital is assessed on its 提醒, and a HIS login may call this (the gate runs as
    // the saving role): a prompt counts only orders the platform matched in this check, with
    // the check's own matches as its content, and a check prompts once.
    let named: std::collections::HashSet<&str> = undecided
        .0
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["order_id"].as_str()).collect())
        .unwrap_or_default();
    let (matches, prompted) = Spi::get_two_with_args::<JsonB, bool>(
        "SELECT c.matches, EXISTS (SELECT 1 FROM hmr.prompts p WHERE p.check_id OPERATOR(pg_catalog.=) c.check_id)
           FROM hmr.checks c WHERE c.check_id OPERATOR(pg_catalog.=) $1 AND c.status OPERATOR(pg_catalog.=) 'ok'",
        &[check_id.into()],
    )
    .unwrap_or((None, None));
    let undecided: Vec<Value> = matches
        .and_then(|JsonB(m)| m.as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m["order_id"].as_str().is_some_and(|o| named.contains(o)))
        .collect();
    if undecided.is_empty() || prompted.unwrap_or(false) {
        return false;
    }
    let record = json!({
        "check_id": check_id,
        "prompted_at": now_text(),
        "undecided": undecided,
        "prompted_by": session_user(),
    });
    Spi::run_with_args(INSERT_PROMPT_SQL, &[JsonB(record.clone()).into()])
        .unwrap_or_else(|e| error!("hmr: cannot record the prompt: {e}"));
    // One file per check: a second refused save of the same check replaces it.
    let id = format!("{check_id}.prompt");
    spool_file("prompts", &id, &record, true)
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
pub(super) fn ingest_kept() -> i32 {
    ingest(true)
}

/// `remove`: the worker's call, in its own short transaction — it skips checks a transaction
/// still open is writing (their advisory lock) and removes the files of committed rows. The
/// doctor's own transaction (`learn_page_decisions`) only inserts: a row it can see may be
/// its own, not yet committed.
pub(super) fn ingest(remove: bool) -> i32 {
    let mut inserted = 0;
    for what in ["checks", "prompts"] {
        let Ok(entries) = std::fs::read_dir(spool_dir(what)) else {
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

/// Downloads a recognised report from the platform and keeps it; NULL when the platform is
/// unavailable. Called by hmr_download_report() when the kept copy is missing.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
pub(super) fn fetch_report(report_id: &str, format: &str) -> Option<Vec<u8>> {
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
            retain_report(report_id, format, &bytes);
            Some(bytes)
        }
        Err(CallError::Refused { status: 403, .. }) => {
            bad_argument(format!("互认平台拒绝下载报告 {report_id}：本院未互认该报告"))
        }
        Err(CallError::NotFound(_)) => bad_argument(format!("互认平台没有报告 {report_id} 的 {format} 文件")),
        Err(CallError::Refused { status, message, .. }) => refused(status, &message),
        Err(CallError::Unavailable(_)) => None,
    }
}

pub(super) fn retain_report(report_id: &str, format: &str, bytes: &[u8]) {
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
