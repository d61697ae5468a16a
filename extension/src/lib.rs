//! `hmr`: the hospital side of the city test-result mutual-recognition platform, inside the
//! HIS database. Most of it is SQL, one file per concern in `sql/` (the order below); Rust
//! holds what must agree with the worker (the contract's validation), the capture trigger's
//! wake-up, and the calls to the platform from SQL (`recognition.rs`, `platform.rs`).

use pgrx::prelude::*;

mod capture;
mod catalog;
mod gucs;
mod plans;
mod platform;
mod recognition;
mod shared;
mod sources;

::pgrx::pg_module_magic!(name, version);

// The SQL, one file per concern (pg_graphql's way), run by CREATE EXTENSION in this order:
// each file names the one before it. Up to polling.sql no file needs the library's functions;
// recognition.sql and operations.sql name the Rust functions their SQL functions and views call
// (pgrx puts them after those); grants.sql runs last.
extension_sql_file!("../sql/sources.sql", name = "sources", bootstrap);
extension_sql_file!("../sql/outbox.sql", name = "outbox", requires = ["sources"]);
extension_sql_file!("../sql/backfill.sql", name = "backfill", requires = ["outbox"]);
extension_sql_file!("../sql/catalog.sql", name = "catalog", requires = ["backfill"]);
extension_sql_file!("../sql/polling.sql", name = "polling", requires = ["catalog"]);
extension_sql_file!(
    "../sql/recognition.sql",
    name = "recognition",
    requires = [
        "polling",
        capture::wake_workers,
        recognition::calls::list_recognitions_json,
        recognition::calls::query_recognitions_json,
        recognition::calls::order_check_json,
        recognition::calls::check_prescription_json,
        recognition::kept::ensure_check,
        recognition::page::decision_problem,
        recognition::page::page_decisions_json,
        recognition::kept::fetch_report,
    ]
);
extension_sql_file!("../sql/gate.sql", name = "gate", requires = ["recognition"]);
extension_sql_file!(
    "../sql/operations.sql",
    name = "operations",
    requires = ["gate", gucs::setting_of, sources::check_sources]
);
extension_sql_file!("../sql/statistics.sql", name = "statistics", requires = ["operations"]);
extension_sql_file!("../sql/dump.sql", name = "dump", requires = ["statistics"]);
extension_sql_file!("../sql/grants.sql", name = "grants", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
}

/// Why a resident identity number (证件类型 01) is invalid (`format`, `checksum`,
/// `birth-date`, `birth-date-mismatch`), or NULL when it is valid.
#[pg_extern(immutable, parallel_safe)]
fn id_card_problem(id_no: &str, birth_date: default!(Option<pgrx::datum::Date>, "NULL")) -> Option<&'static str> {
    let birth = birth_date.map(|d| format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day()));
    hmr_protocol::checks::id_card_problem(id_no, birth.as_deref())
}

/// Whether a 统一社会信用代码 (GB 32100-2015) has a valid check character.
#[pg_extern(immutable, parallel_safe)]
fn org_code_valid(code: &str) -> bool {
    hmr_protocol::checks::org_code_valid(code)
}

/// Refuses anything but one boolean-valued expression (as `hmr.watch(update_when)` takes):
/// the text is parsed, never run, as the target of `SELECT (\n…\n)`, and must come out as
/// exactly that one target and nothing else (no second statement, no FROM, no WHERE …).
/// `hmr.watch` then writes the same `(\n…\n)` into the trigger's WHEN clause, where
/// PostgreSQL allows only OLD and NEW and no subquery. A syntax error is raised as it is.
#[pg_extern(immutable, parallel_safe)]
fn check_update_when(expr: &str) {
    let sql = std::ffi::CString::new(format!("SELECT (\n{expr}\n)"))
        .unwrap_or_else(|_| error!("hmr: update_when contains a NUL byte"));
    // SAFETY: raw_parser reads a NUL-terminated string and returns a List of RawStmt
    // allocated in the current memory context (or raises ERROR); the nodes are read only
    // after their tags are checked.
    let problem = unsafe {
        let stmts = pg_sys::raw_parser(sql.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        if stmts.is_null() || (*stmts).length != 1 {
            Some("it must be one expression, not several statements")
        } else {
            let raw = (*(*stmts).elements).ptr_value.cast::<pg_sys::RawStmt>();
            let stmt = (*raw).stmt;
            if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_SelectStmt {
                Some("it must be one expression")
            } else {
                let s = &*stmt.cast::<pg_sys::SelectStmt>();
                let target_count = if s.targetList.is_null() {
                    0
                } else {
                    (*s.targetList).length
                };
                let only_target = s.op == pg_sys::SetOperation::SETOP_NONE
                    && target_count == 1
                    && s.distinctClause.is_null()
                    && s.intoClause.is_null()
                    && s.fromClause.is_null()
                    && s.whereClause.is_null()
                    && s.groupClause.is_null()
                    && s.havingClause.is_null()
                    && s.windowClause.is_null()
                    && s.valuesLists.is_null()
                    && s.sortClause.is_null()
                    && s.limitOffset.is_null()
                    && s.limitCount.is_null()
                    && s.lockingClause.is_null()
                    && s.withClause.is_null();
                if !only_target {
                    Some("it must be one expression (its parentheses must balance; no FROM, WHERE, commas or further clauses)")
                } else {
                    let target = (*(*s.targetList).elements).ptr_value.cast::<pg_sys::ResTarget>();
                    (!(*target).name.is_null()).then_some("it must be an expression without an alias")
                }
            }
        }
    };
    // The trigger statement hmr.watch() writes, parsed too: it must be that one statement
    // (a syntax error is raised here, before any trigger is created).
    let trigger = std::ffi::CString::new(format!(
        "CREATE TRIGGER t AFTER UPDATE ON t FOR EACH ROW WHEN (\n{expr}\n) EXECUTE FUNCTION f()"
    ))
    .unwrap_or_else(|_| error!("hmr: update_when contains a NUL byte"));
    // SAFETY: as above; only the list's length is read.
    let problem = problem.or_else(|| unsafe {
        let stmts = pg_sys::raw_parser(trigger.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        (stmts.is_null() || (*stmts).length != 1).then_some("it must be one expression, not several statements")
    });
    if let Some(problem) = problem {
        ereport!(
            PgLogLevel::ERROR,
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("hmr: update_when is not one boolean expression over OLD and NEW: {problem}"),
            "e.g. 'OLD.status IS DISTINCT FROM NEW.status'"
        );
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn id_card_problems_in_sql() {
        assert_eq!(
            Spi::get_one::<&str>("SELECT hmr.id_card_problem('11010519491231002X', '1949-12-31')").unwrap(),
            None
        );
        assert_eq!(
            Spi::get_one::<&str>("SELECT hmr.id_card_problem('110105194912310021')").unwrap(),
            Some("checksum")
        );
        assert_eq!(
            Spi::get_one::<bool>("SELECT hmr.org_code_valid('91350100M000100Y43')").unwrap(),
            Some(true)
        );
    }

    #[pg_test]
    fn capture_records_which_row_changed() {
        Spi::run("CREATE TABLE lis_report (report_no text PRIMARY KEY, status text)").unwrap();
        Spi::run("SELECT hmr.watch('lab_report', 'lis_report', 'report_no', 'OLD.status IS DISTINCT FROM NEW.status')")
            .unwrap();
        Spi::run("INSERT INTO lis_report VALUES ('L1', 'new'), ('L2', 'new')").unwrap();
        Spi::run("UPDATE lis_report SET status = status WHERE report_no = 'L1'").unwrap(); // filtered out
        Spi::run("UPDATE lis_report SET status = 'audited' WHERE report_no = 'L1'").unwrap();
        Spi::run("UPDATE lis_report SET report_no = 'L3' WHERE report_no = 'L2'").unwrap(); // no status change
        Spi::run("DELETE FROM lis_report WHERE report_no = 'L1'").unwrap();
        let events = Spi::get_one::<String>(
            "SELECT string_agg(kind || ':' || key || ':' || op::text, ' ' ORDER BY id) FROM hmr.captured",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            events,
            "lab_report:L1:I lab_report:L2:I lab_report:L1:U lab_report:L1:D"
        );
        let watched = Spi::get_one::<i64>("SELECT count(*) FROM hmr.watches WHERE kind = 'lab_report'").unwrap();
        assert_eq!(watched, Some(2));
        Spi::run("SELECT hmr.unwatch('lab_report', 'lis_report')").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM hmr.watches").unwrap(),
            Some(0)
        );
    }

    #[pg_test]
    fn key_change_reconciles_the_old_record() {
        Spi::run("CREATE TABLE pat (pid int PRIMARY KEY, name text)").unwrap();
        Spi::run("SELECT hmr.watch('patient', 'pat', 'pid')").unwrap();
        Spi::run("INSERT INTO pat VALUES (7, 'a')").unwrap();
        Spi::run("UPDATE pat SET pid = 8").unwrap();
        let events = Spi::get_one::<String>("SELECT string_agg(key || op::text, ' ' ORDER BY id) FROM hmr.captured")
            .unwrap()
            .unwrap();
        assert_eq!(events, "7I 8U 7D");
    }

    #[pg_test]
    fn ingest_moves_captured_events_into_the_outbox_in_order() {
        Spi::run("CREATE TABLE pat_ingest (pid int PRIMARY KEY, name text)").unwrap();
        Spi::run("SELECT hmr.watch('patient', 'pat_ingest', 'pid')").unwrap();
        Spi::run("INSERT INTO pat_ingest SELECT g, 'x' FROM generate_series(1, 3) g").unwrap();
        let by_hand = Spi::get_one::<i64>("SELECT hmr.enqueue('patient', '9')")
            .unwrap()
            .unwrap();
        Spi::run("UPDATE pat_ingest SET name = 'y' WHERE pid = 2").unwrap();
        assert_eq!(Spi::get_one::<i32>("SELECT hmr.ingest()").unwrap(), Some(4));
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM hmr.captured").unwrap(),
            Some(0)
        );
        let events = Spi::get_one::<String>("SELECT string_agg(key || op::text, ' ' ORDER BY id) FROM hmr.outbox")
            .unwrap()
            .unwrap();
        // One id sequence: the hand-enqueued event sits between the captured ones; 2's insert
        // rides on its update, the newest event of the record (the worker reads the row as it
        // is when it claims it).
        assert_eq!(events, "1I 3I 9S 2U");
        assert_eq!(
            Spi::get_one::<i64>(&format!(
                "SELECT count(*) FROM hmr.outbox WHERE id > {by_hand} AND key = '2'"
            ))
            .unwrap(),
            Some(1)
        );
        assert_eq!(
            Spi::get_one::<String>("SELECT key || op::text || ' ' || outcome FROM hmr.outbox_history").unwrap(),
            Some("2I merged".into())
        );
        assert_eq!(Spi::get_one::<i64>("SELECT pending FROM hmr.status").unwrap(), Some(4));
    }

    #[pg_test]
    fn ingest_merges_only_into_an_event_not_yet_read() {
        Spi::run("CREATE TABLE rep_merge (no text, seq int)").unwrap();
        Spi::run("SELECT hmr.watch('lab_report', 'rep_merge', 'no')").unwrap();
        // A report and its five results in one transaction: one event, five merged into it.
        Spi::run("INSERT INTO rep_merge SELECT 'R1', g FROM generate_series(0, 5) g").unwrap();
        assert_eq!(Spi::get_one::<i32>("SELECT hmr.ingest()").unwrap(), Some(6));
        let carrier = Spi::get_one::<i64>("SELECT id FROM hmr.outbox WHERE key = 'R1'")
            .unwrap()
            .unwrap();
        assert_eq!(
            Spi::get_one::<i64>(&format!(
                "SELECT count(*) FROM hmr.outbox_history WHERE key = 'R1' AND outcome = 'merged' AND detail = 'into {carrier}'"
            ))
            .unwrap(),
            Some(5)
        );
        // Still pending and unread: a later correction rides on it too.
        Spi::run("UPDATE rep_merge SET seq = seq WHERE seq = 1").unwrap();
        Spi::run("SELECT hmr.ingest()").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM hmr.outbox WHERE key = 'R1'").unwrap(),
            Some(1)
        );
        // Claimed (the worker may have read the row already): the next change is an event of
        // its own, which waits for the claimed one.
        Spi::run(&format!("UPDATE hmr.outbox SET state = 'claimed' WHERE id = {carrier}")).unwrap();
        Spi::run("UPDATE rep_merge SET seq = seq WHERE seq = 2").unwrap();
        Spi::run("SELECT hmr.ingest()").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM hmr.outbox WHERE key = 'R1'").unwrap(),
            Some(2)
        );
        // Pending again but with a frozen plan (its requests were built from an earlier read):
        // not merged into either.
        Spi::run(&format!("DELETE FROM hmr.outbox WHERE key = 'R1' AND id <> {carrier}")).unwrap();
        Spi::run(&format!(
            "UPDATE hmr.outbox SET state = 'pending', plan = '{{}}' WHERE id = {carrier}"
        ))
        .unwrap();
        Spi::run("UPDATE rep_merge SET seq = seq WHERE seq = 3").unwrap();
        Spi::run("SELECT hmr.ingest()").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM hmr.outbox WHERE key = 'R1'").unwrap(),
            Some(2)
        );
        // Never into an older event: R3's first event is quarantined, its next one is in flight
        // (claimed, then frozen and rescheduled), and the first is released to pending again
        // (retried, or its patient arrived). A change now must follow the newest event, not ride
        // on the older one, which would deliver it first and then be superseded by the staler
        // newer one.
        Spi::run("INSERT INTO rep_merge VALUES ('R3', 0)").unwrap();
        Spi::run("SELECT hmr.ingest()").unwrap();
        Spi::run("UPDATE hmr.outbox SET state = 'quarantined' WHERE key = 'R3'").unwrap();
        Spi::run("UPDATE rep_merge SET seq = 1 WHERE no = 'R3'").unwrap();
        Spi::run("SELECT hmr.ingest()").unwrap();
        Spi::run("UPDATE hmr.outbox SET state = 'pending', plan = '{}' WHERE key = 'R3' AND state = 'pending'")
            .unwrap();
        Spi::run(
            "UPDATE hmr.outbox SET state = 'pending', plan = NULL, generation = generation + 1 WHERE key = 'R3' AND state = 'quarantined'",
        )
        .unwrap();
        Spi::run("UPDATE rep_merge SET seq = 2 WHERE no = 'R3'").unwrap();
        Spi::run("SELECT hmr.ingest()").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM hmr.outbox WHERE key = 'R3'").unwrap(),
            Some(3),
            "the change is an event of its own, after the one in flight"
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM hmr.outbox_history WHERE key = 'R3'").unwrap(),
            Some(0)
        );
        // Quarantined: a new change is a new event (it may be the fix).
        Spi::run("INSERT INTO rep_merge VALUES ('R2', 0)").unwrap();
        Spi::run("SELECT hmr.ingest()").unwrap();
        Spi::run("UPDATE hmr.outbox SET state = 'quarantined' WHERE key = 'R2'").unwrap();
        Spi::run("UPDATE rep_merge SET seq = 1 WHERE no = 'R2'").unwrap();
        Spi::run("SELECT hmr.ingest()").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM hmr.outbox WHERE key = 'R2'").unwrap(),
            Some(2)
        );
    }

    #[pg_test]
    fn ingest_empties_a_grown_event_table_with_truncate() {
        Spi::run("CREATE TABLE pat_many (pid int PRIMARY KEY)").unwrap();
        Spi::run("SELECT hmr.watch('patient', 'pat_many', 'pid')").unwrap();
        Spi::run("INSERT INTO pat_many SELECT generate_series(1, 20000)").unwrap();
        assert!(
            Spi::get_one::<i64>("SELECT pg_relation_size('hmr.captured')")
                .unwrap()
                .unwrap()
                > 1_048_576
        );
        assert_eq!(Spi::get_one::<i32>("SELECT hmr.ingest()").unwrap(), Some(20000));
        // (Other tests may be capturing at this instant: then the TRUNCATE waits for a later call.)
        for _ in 0..100 {
            if Spi::get_one::<i64>("SELECT pg_relation_size('hmr.captured')").unwrap() == Some(0) {
                break;
            }
            Spi::run("SELECT pg_sleep(0.1)").unwrap();
            assert_eq!(Spi::get_one::<i32>("SELECT hmr.ingest()").unwrap(), Some(0));
        }
        assert_eq!(
            Spi::get_one::<i64>("SELECT pg_relation_size('hmr.captured')").unwrap(),
            Some(0)
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM hmr.outbox").unwrap(),
            Some(20000)
        );
        // Capture goes on into the emptied table.
        Spi::run("UPDATE pat_many SET pid = pid WHERE pid = 1").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM hmr.captured").unwrap(),
            Some(1)
        );
    }

    #[pg_test]
    fn capture_wakes_a_sleeping_worker_once() {
        // No worker asleep: nothing to wake.
        assert_eq!(Spi::get_one::<bool>("SELECT hmr.wake_workers()").unwrap(), Some(false));
        Spi::run("SELECT hmr.worker_sleeping()").unwrap();
        Spi::run("CREATE TABLE pat_wake (pid int PRIMARY KEY)").unwrap();
        Spi::run("SELECT hmr.watch('patient', 'pat_wake', 'pid')").unwrap();
        Spi::run("INSERT INTO pat_wake VALUES (1)").unwrap();
        // The capture took the flag (and queued the NOTIFY): the next one pays nothing.
        assert_eq!(Spi::get_one::<bool>("SELECT hmr.wake_workers()").unwrap(), Some(false));
    }

    #[pg_test(error = "hmr.captured has the wrong shape: it has an index (rows are written straight into its heap)")]
    fn capture_refuses_an_indexed_event_table() {
        Spi::run("CREATE INDEX ON hmr.captured (id)").unwrap();
        Spi::run("CREATE TABLE pat_idx (pid int PRIMARY KEY)").unwrap();
        Spi::run("SELECT hmr.watch('patient', 'pat_idx', 'pid')").unwrap();
        Spi::run("INSERT INTO pat_idx VALUES (1)").unwrap();
    }

    #[pg_test]
    fn a_reshaped_event_table_is_refused_and_an_undone_change_recovers() {
        Spi::run("CREATE TABLE pat_shape (pid int PRIMARY KEY)").unwrap();
        Spi::run("SELECT hmr.watch('patient', 'pat_shape', 'pid')").unwrap();
        Spi::run("INSERT INTO pat_shape VALUES (1)").unwrap();
        Spi::run("ALTER TABLE hmr.captured ADD COLUMN note text").unwrap();
        let refused = PgTryBuilder::new(|| Spi::run("INSERT INTO pat_shape VALUES (2)").map(|_| String::new()))
            .catch_others(|e| match e {
                pg_sys::panic::CaughtError::PostgresError(r) | pg_sys::panic::CaughtError::ErrorReport(r) => {
                    Ok(r.message().to_string())
                }
                other => other.rethrow(),
            })
            .execute()
            .unwrap();
        assert_eq!(
            refused,
            "hmr.captured has the wrong shape: it has 7 columns, expected 6"
        );
        // Undone: the dropped column stays in the catalog; capture writes NULL into it.
        Spi::run("ALTER TABLE hmr.captured DROP COLUMN note").unwrap();
        Spi::run("INSERT INTO pat_shape VALUES (3)").unwrap();
        assert_eq!(
            Spi::get_one::<String>("SELECT string_agg(key, ',' ORDER BY id) FROM hmr.captured")
                .unwrap()
                .as_deref(),
            Some("1,3")
        );
    }

    #[pg_test]
    fn update_when_is_one_expression_never_spliced() {
        Spi::run("CREATE TABLE lis_uw (report_no text PRIMARY KEY, status text)").unwrap();
        for hostile in [
            "true) EXECUTE FUNCTION hmr.capture('lab_report', 'report_no'); CREATE TABLE pwned(); --",
            "true; CREATE TABLE pwned()",
            "true) OR (true",
            "NEW.status = 'a' --\n) EXECUTE FUNCTION hmr.capture('x', 'y'); CREATE TABLE pwned(); --",
            "NEW.status = 'a' /*",
            "true FROM pg_class",
            "1, 2",
            "(SELECT true)",
        ] {
            let refused = PgTryBuilder::new(|| {
                Spi::run_with_args(
                    "SELECT hmr.watch('lab_report', 'lis_uw', 'report_no', $1)",
                    &[hostile.into()],
                )
                .map(|_| None)
            })
            .catch_others(|e| match e {
                pg_sys::panic::CaughtError::PostgresError(r) | pg_sys::panic::CaughtError::ErrorReport(r) => {
                    Ok(Some(r.message().to_string()))
                }
                other => other.rethrow(),
            })
            .execute()
            .unwrap();
            assert!(refused.is_some(), "accepted: {hostile}");
        }
        assert_eq!(
            Spi::get_one::<bool>("SELECT to_regclass('pwned') IS NULL").unwrap(),
            Some(true)
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM hmr.watches WHERE tbl = 'lis_uw'::regclass").unwrap(),
            Some(0)
        );
        Spi::run("SELECT hmr.watch('lab_report', 'lis_uw', 'report_no', 'OLD.status IS DISTINCT FROM NEW.status')")
            .unwrap();
        assert_eq!(
            Spi::get_one::<String>(
                "SELECT string_agg(events, ' | ' ORDER BY events) FROM hmr.watches WHERE tbl = 'lis_uw'::regclass"
            )
            .unwrap()
            .as_deref(),
            Some("insert, delete | update")
        );
    }

    #[pg_test]
    fn an_event_that_commits_late_goes_after_the_record_in_flight() {
        // T1 changes K first (its event id is taken then) but commits late; T2's event of K,
        // with the higher id, is already claimed and its plan frozen when T1's arrives.
        let early = Spi::get_one::<i64>("SELECT nextval('hmr.event_id_seq')")
            .unwrap()
            .unwrap();
        Spi::run("SELECT hmr.enqueue('patient', 'K')").unwrap();
        let claim = |w: &str| {
            Spi::get_one::<String>(&format!(
                "SELECT string_agg(id::text, ',' ORDER BY id) FROM hmr.claim('{w}', ARRAY['patient'], 10, 5)"
            ))
            .unwrap()
            .unwrap_or_default()
        };
        let later: i64 = claim("w1").parse().unwrap();
        Spi::run(&format!(
            "UPDATE hmr.outbox SET plan = '{{}}'::jsonb WHERE id = {later}"
        ))
        .unwrap();
        Spi::run(&format!(
            "INSERT INTO hmr.captured (id, kind, key, op, xid, created_at) \
             VALUES ({early}, 'patient', 'K', 'U', pg_current_xact_id(), now())"
        ))
        .unwrap();
        Spi::run("SELECT hmr.ingest()").unwrap();
        // Numbered anew, after the event in flight.
        let late = Spi::get_one::<i64>(&format!("SELECT id FROM hmr.outbox WHERE key = 'K' AND id <> {later}"))
            .unwrap()
            .unwrap();
        assert!(late > later, "{late} after {later}");
        assert_eq!(claim("w2"), "", "two events of K in flight at once");
        // The frozen one fails and is rescheduled: it goes again first, not the late one
        // (which would send K's newer state, then be overtaken by the stale frozen plan).
        Spi::run(&format!(
            "UPDATE hmr.outbox SET state = 'pending', lease_owner = NULL, lease_until = NULL WHERE id = {later}"
        ))
        .unwrap();
        assert_eq!(claim("w2"), later.to_string());
        // Sent and finished: now the late one goes, and reads K as it is now.
        Spi::run(&format!("DELETE FROM hmr.outbox WHERE id = {later}")).unwrap();
        assert_eq!(claim("w3"), late.to_string());
    }

    #[pg_test]
    fn claim_takes_a_hurried_record_first_and_keeps_record_order() {
        for k in ["A", "B", "C"] {
            Spi::run(&format!("SELECT hmr.enqueue('patient', '{k}')")).unwrap();
        }
        Spi::run("SELECT hmr.enqueue('patient', 'A')").unwrap(); // a second event of A
        Spi::run("SELECT hmr.hurry('patient', 'C')").unwrap();
        let claimed = Spi::get_one::<String>(
            "SELECT string_agg(key, ',' ORDER BY key) FROM hmr.claim('w', ARRAY['patient'], 2, 5)",
        )
        .unwrap()
        .unwrap();
        // Two of four: the hurried C (the newest) and the oldest, A; not B.
        assert_eq!(claimed, "A,C");
        let more = Spi::get_one::<String>(
            "SELECT string_agg(key, ',' ORDER BY key) FROM hmr.claim('w2', ARRAY['patient'], 10, 5)",
        )
        .unwrap()
        .unwrap_or_default();
        assert!(
            !more.contains('A') || !claimed.contains('A'),
            "A's events claimed together: {claimed} / {more}"
        );
    }

    #[pg_test]
    fn policy_is_validated_and_visible() {
        assert_eq!(
            Spi::get_one::<String>("SELECT value FROM hmr.settings WHERE name = 'gate_on_unavailable'")
                .unwrap()
                .as_deref(),
            Some("allow")
        );
        Spi::run("SELECT hmr.set_policy(gate_on_unavailable => 'block', platform_timeout_ms => 1500)").unwrap();
        assert_eq!(
            Spi::get_one::<String>(
                "SELECT value || ' ' || source FROM hmr.settings WHERE name = 'gate_on_unavailable'"
            )
            .unwrap()
            .as_deref(),
            Some("block hmr.policy")
        );
        assert_eq!(
            Spi::get_one::<String>("SELECT value FROM hmr.settings WHERE name = 'hmr.stuck_after_seconds'")
                .unwrap()
                .as_deref(),
            Some("600")
        );
        Spi::run("SET hmr.stuck_after_seconds = '10min'").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM hmr.stuck_records").unwrap(),
            Some(0)
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT stuck_records FROM hmr.status").unwrap(),
            Some(0)
        );
    }

    #[pg_test(error = "hmr: gate_on_unavailable must be allow or block, not \"blok\"")]
    fn policy_refuses_a_misspelt_action() {
        Spi::run("SELECT hmr.set_policy(gate_on_unavailable => 'blok')").unwrap();
    }

    #[pg_test(error = "hmr: unknown kind \"labs\"")]
    fn watch_refuses_unknown_kind() {
        Spi::run("CREATE TABLE t (k text)").unwrap();
        Spi::run("SELECT hmr.watch('labs', 't', 'k')").unwrap();
    }

    #[pg_test]
    fn retry_and_discard_quarantined_events() {
        let id = Spi::get_one::<i64>("SELECT hmr.enqueue('patient', 'P1')")
            .unwrap()
            .unwrap();
        Spi::run(&format!(
            "UPDATE hmr.outbox SET state = 'quarantined', error_field = 'id_no', error_reason = 'checksum' WHERE id = {id}"
        ))
        .unwrap();
        assert_eq!(
            Spi::get_one::<String>("SELECT error_reason FROM hmr.quarantine")
                .unwrap()
                .as_deref(),
            Some("checksum")
        );
        Spi::run(&format!("SELECT hmr.retry({id})")).unwrap();
        assert_eq!(
            Spi::get_one::<i32>(&format!(
                "SELECT generation FROM hmr.outbox WHERE id = {id} AND state = 'pending'"
            ))
            .unwrap(),
            Some(1)
        );
        Spi::run(&format!("UPDATE hmr.outbox SET state = 'quarantined' WHERE id = {id}")).unwrap();
        Spi::run(&format!("SELECT hmr.discard({id}, 'duplicate registration, merged')")).unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM hmr.outbox").unwrap(), Some(0));
        assert_eq!(
            Spi::get_one::<String>(&format!("SELECT outcome FROM hmr.outbox_history WHERE id = {id}"))
                .unwrap()
                .as_deref(),
            Some("discarded")
        );
    }

    #[pg_test]
    fn check_sources_reports_in_plain_words() {
        Spi::run("CREATE SCHEMA IF NOT EXISTS hmr_src").unwrap();
        // gender_code as an integer and no id_no column: both must be reported.
        Spi::run(
            "CREATE VIEW hmr_src.patient AS SELECT 'P1'::text AS patient_id, '01'::text AS id_type, \
             '张三'::text AS name, 1 AS gender_code, date '1990-01-01' AS birth_date, \
             now() AS registered_at, now() AS updated_at",
        )
        .unwrap();
        let problems = Spi::get_one::<String>(
            "SELECT string_agg(coalesce(field, '-') || ': ' || problem, ' | ' ORDER BY field) \
             FROM hmr.check_sources('patient')",
        )
        .unwrap()
        .unwrap();
        assert!(
            problems.contains("gender_code: column is integer, expected text"),
            "{problems}"
        );
        assert!(problems.contains("id_no: required column is missing"), "{problems}");
        let missing = Spi::get_one::<String>("SELECT problem FROM hmr.check_sources('staff') LIMIT 1")
            .unwrap()
            .unwrap();
        assert!(missing.contains("hmr_src.staff does not exist"), "{missing}");
    }

    #[pg_test]
    fn catalog_loads_from_csv_and_reports_bad_lines() {
        let n = Spi::get_one::<i64>(
            "SELECT hmr.load_catalog(E'dataCode,type,name,validityDays\\nJY0001,lab,血常规,7\\nJC0002,exam,\"胸部CT平扫, 含增强\",30\\n')",
        )
        .unwrap();
        assert_eq!(n, Some(2));
        assert_eq!(
            Spi::get_one::<String>("SELECT name FROM hmr.catalog WHERE data_code = 'JC0002'")
                .unwrap()
                .as_deref(),
            Some("胸部CT平扫, 含增强")
        );
        // Loading again updates in place; `replace` drops what the new list lacks.
        Spi::run(
            "SELECT hmr.load_catalog(E'dataCode,type,name,validityDays\\nJY0001,lab,血常规,14\\n', replace => true)",
        )
        .unwrap();
        assert_eq!(
            Spi::get_one::<i32>("SELECT validity_days FROM hmr.catalog WHERE data_code = 'JY0001'").unwrap(),
            Some(14)
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM hmr.catalog").unwrap(),
            Some(1)
        );
    }

    #[pg_test(error = "hmr: catalog CSV line 2: validityDays must be a positive integer")]
    fn catalog_refuses_a_bad_line() {
        Spi::run("SELECT hmr.load_catalog(E'dataCode,type,name,validityDays\\nJY0001,lab,血常规,seven\\n')").unwrap();
    }

    #[pg_test]
    fn a_report_view_may_leave_the_patients_identity_to_the_patient_view() {
        Spi::run("CREATE SCHEMA IF NOT EXISTS hmr_src").unwrap();
        Spi::run(
            "CREATE VIEW hmr_src.lab_report AS SELECT 'J1'::text AS report_no, 'P2'::text AS patient_id, \
             now() - interval '1 hour' AS reported_at, '2001'::text AS auditor_no",
        )
        .unwrap();
        Spi::run(
            "CREATE VIEW hmr_src.lab_item AS SELECT 'J1'::text AS report_no, 1 AS seq, 'WBC'::text AS item_code, \
             '白细胞计数'::text AS item_name, '6.5'::text AS result_value",
        )
        .unwrap();
        let problems = |k: &str| {
            Spi::get_one::<String>(&format!(
                "SELECT string_agg(concat_ws(' ', key, field, problem), ';' ORDER BY field) FROM hmr.check_sources('{k}')"
            ))
            .unwrap()
            .unwrap_or_default()
        };
        // No patient view: nowhere to take them from.
        let without = problems("lab_report");
        assert!(without.contains("id_no required column is missing"), "{without}");
        assert!(without.contains("patient_name required column is missing"), "{without}");
        // With one, the row is checked as the worker sends it: P2's bad check digit is found.
        Spi::run(
            "CREATE VIEW hmr_src.patient AS SELECT * FROM (VALUES \
             ('P2', '01', '110105194912310021', '李四', '2', date '1949-12-31', NULL::text, now(), now())) \
             AS v(patient_id, id_type, id_no, name, gender_code, birth_date, phone, registered_at, updated_at)",
        )
        .unwrap();
        let with = problems("lab_report");
        assert!(!with.contains("column is missing"), "{with}");
        assert!(with.contains("J1 id_no checksum"), "{with}");
    }

    #[pg_test]
    fn check_sources_validates_rows() {
        Spi::run("CREATE SCHEMA IF NOT EXISTS hmr_src").unwrap();
        Spi::run(
            "CREATE VIEW hmr_src.patient AS SELECT * FROM (VALUES \
             ('P1', '01', '11010519491231002X', '张三', '1', date '1949-12-31', NULL::text, now(), now()), \
             ('P2', '01', '110105194912310021', '李四', '2', date '1949-12-31', NULL, now(), now())) \
             AS v(patient_id, id_type, id_no, name, gender_code, birth_date, phone, registered_at, updated_at)",
        )
        .unwrap();
        let rows = Spi::get_one::<String>(
            "SELECT string_agg(key || ' ' || field || ' ' || problem, ';') FROM hmr.check_sources('patient')",
        )
        .unwrap()
        .unwrap();
        assert_eq!(rows, "P2 id_no checksum");
    }

    #[pg_test]
    fn check_sources_names_value_rule_allowed_and_a_working_hint() {
        Spi::run("CREATE SCHEMA IF NOT EXISTS hmr_src").unwrap();
        // A vendor's shape: 男/女 words, a lower-case x, '' for no phone, a smallint flag,
        // timestamp without time zone.
        Spi::run(
            "CREATE TABLE vendor_pat (brid text, sfzh text, xm text, xb text, csrq date, dh text, jdsj timestamp, yx smallint)",
        )
        .unwrap();
        Spi::run(
            "INSERT INTO vendor_pat VALUES ('B1', '11010519491231002x', '张三', '男', '1949-12-31', '', '2024-01-01 08:00', 1), \
                                          ('B2', '11010519491231002X', '李四', '女的', '1949-12-31', '', '2024-01-01 08:00', 1)",
        )
        .unwrap();
        Spi::run(
            "CREATE VIEW hmr_src.patient AS SELECT brid AS patient_id, '01'::text AS id_type, sfzh AS id_no, xm AS name, \
                    hmr.code('gender', xb) AS gender_code, csrq AS birth_date, dh AS phone, \
                    jdsj AS registered_at, jdsj AS updated_at FROM vendor_pat",
        )
        .unwrap();
        let row = |sql: &str| Spi::get_one::<String>(sql).unwrap().unwrap_or_default();
        // The column type: flagged with a zone-independent hint.
        assert_eq!(
            row("SELECT hint FROM hmr.check_sources('patient') WHERE field = 'registered_at' AND key IS NULL"),
            "(registered_at AT TIME ZONE 'Asia/Shanghai') AS registered_at"
        );
        Spi::run("DROP VIEW hmr_src.patient").unwrap();
        Spi::run(
            "CREATE VIEW hmr_src.patient AS SELECT brid AS patient_id, '01'::text AS id_type, sfzh AS id_no, \
                    xm AS name, hmr.code('gender', xb) AS gender_code, csrq AS birth_date, dh AS phone, \
                    jdsj AT TIME ZONE 'Asia/Shanghai' AS registered_at, jdsj AT TIME ZONE 'Asia/Shanghai' AS updated_at \
               FROM vendor_pat",
        )
        .unwrap();
        let problems = row(
            "SELECT string_agg(concat_ws(' | ', key, field, problem, value, rule, allowed, hint), E'\n' ORDER BY key, field) \
               FROM hmr.check_sources('patient')",
        );
        // B1: 男 mapped; '' phone absent; lower-case x named with the fix, masked.
        assert!(
            problems.contains("B1 | id_no | format | 1101**********002x"),
            "{problems}"
        );
        assert!(problems.contains("upper(id_no) AS id_no"), "{problems}");
        assert!(!problems.contains("phone"), "'' is absent, not missing: {problems}");
        // B2: an unknown word, with the allowed codes and the map to use.
        assert!(
            problems.contains("B2 | gender_code | code | 女的 | must be one of the allowed codes | 0, 1, 2, 9 | hmr.code('gender', gender_code)"),
            "{problems}"
        );
        // The smallint flag's hint works where a cast would not.
        assert_eq!(
            Spi::get_one::<bool>("SELECT (yx <> 0) FROM vendor_pat LIMIT 1").unwrap(),
            Some(true)
        );
        assert_eq!(
            Spi::get_one::<String>("SELECT hmr.code('visit_type', '住院')")
                .unwrap()
                .as_deref(),
            Some("3")
        );
        assert_eq!(Spi::get_one::<bool>("SELECT hmr.flag('是'::text)").unwrap(), Some(true));
        assert_eq!(Spi::get_one::<bool>("SELECT hmr.flag(0)").unwrap(), Some(false));
        // Kinds without a view are not connected, not errors.
        assert_eq!(
            row("SELECT state FROM hmr.source_readiness WHERE kind = 'exam_report'"),
            "not connected"
        );
        assert_eq!(
            row("SELECT state FROM hmr.source_readiness WHERE kind = 'patient'"),
            "problems"
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM hmr.check_sources() WHERE kind = 'exam_report'").unwrap(),
            Some(0)
        );
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
