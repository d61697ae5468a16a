//! `hmr.check_sources()`: checks the DBA's source views against the canonical columns and
//! validates sample rows with the same code the worker uses before sending.

use hmr_protocol::source::{self, SourceView};
use hmr_protocol::{validate, FieldError, Kind, ProtocolError};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Map, Value};

use crate::gucs;

/// One problem: where (kind, view, record key, column), what (the reason), and for data
/// problems the offending value (identity numbers masked), the rule and the allowed values;
/// a hint that fixes it in the view when there is one.
#[derive(Default)]
struct Problem {
    kind: String,
    source: String,
    key: Option<String>,
    field: Option<String>,
    problem: String,
    value: Option<String>,
    rule: Option<String>,
    allowed: Option<String>,
    hint: Option<String>,
}

fn problem(kind: &str, source: &str, key: Option<String>, field: Option<String>, text: String) -> Problem {
    Problem {
        kind: kind.into(),
        source: source.into(),
        key,
        field,
        problem: text,
        ..Problem::default()
    }
}

type ProblemRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// One row per problem: the kind, the source view, the record key (for row problems), the
/// column, the problem, and for data problems the value, the rule, the allowed values and a
/// hint. No rows means the sources of the connected kinds are ready; a kind whose view does
/// not exist and that nothing captures or polls is "not connected" and not listed (ask for it
/// by name to see why; `hmr.source_readiness` says per kind).
#[pg_extern]
#[allow(clippy::type_complexity)] // the column list is the SQL signature
fn check_sources(
    kind: default!(Option<&str>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(kind, String),
        name!(source, String),
        name!(key, Option<String>),
        name!(field, Option<String>),
        name!(problem, String),
        name!(value, Option<String>),
        name!(rule, Option<String>),
        name!(allowed, Option<String>),
        name!(hint, Option<String>),
    ),
> {
    let kinds: Vec<(String, String, Option<String>, String, bool)> = Spi::connect(|client| {
        client
            .select(
                "SELECT k.kind, k.source_view, k.item_view, k.key_column,
                        to_regclass(k.source_view) IS NOT NULL
                        OR EXISTS (SELECT 1 FROM hmr.watches w WHERE w.kind = k.kind)
                        OR EXISTS (SELECT 1 FROM hmr.polled_sources p WHERE p.kind = k.kind)
                   FROM hmr.kinds k WHERE k.kind <> 'decision' ORDER BY k.kind",
                None,
                &[],
            )?
            .map(|row| {
                Ok((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<String>(2)?.unwrap_or_default(),
                    row.get::<String>(3)?,
                    row.get::<String>(4)?.unwrap_or_default(),
                    row.get::<bool>(5)?.unwrap_or(false),
                ))
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })
    .unwrap_or_else(|e| error!("hmr: cannot read hmr.kinds: {e}"));

    // Reports may take the patient's identity from the patient view (as the worker does), by
    // the patient kind's key.
    let patient_view: Option<(String, String)> = Spi::connect(|client| {
        let row = client
            .select(
                "SELECT to_regclass(source_view)::text, key_column FROM hmr.kinds WHERE kind = 'patient'",
                None,
                &[],
            )?
            .first();
        Ok::<_, pgrx::spi::Error>(match (row.get::<String>(1)?, row.get::<String>(2)?) {
            (Some(view), Some(key)) => Some((view, key)),
            _ => None,
        })
    })
    .unwrap_or(None);
    let mut problems: Vec<Problem> = Vec::new();
    for (k, view_name, item_view, key_column, connected) in kinds {
        if kind.is_some_and(|wanted| wanted != k) {
            continue;
        }
        // Not set up yet (a hospital connecting lab first has no exam view): not an error.
        if kind.is_none() && !connected {
            continue;
        }
        let Some((parsed, canonical)) = Kind::parse(&k).and_then(|p| Some((p, p.view()?))) else {
            continue;
        };
        let columns_ok = check_columns(&k, &view_name, canonical, patient_view.is_some(), &mut problems);
        let items_ok = match &item_view {
            Some(items) => check_columns(&k, items, &source::LAB_ITEM, false, &mut problems),
            None => true,
        };
        if columns_ok {
            // Items are read only from an item view that is there (its absence is reported above).
            let items = item_view.as_deref().filter(|_| items_ok);
            check_rows(
                parsed,
                &view_name,
                items,
                canonical,
                patient_view.as_ref(),
                &mut problems,
            );
            check_whole_view(&k, &view_name, canonical, &mut problems);
            // Planned with the key the worker reads by (hmr.kinds.key_column).
            let report = parsed.report_type().is_some();
            check_read_by_key(&k, &view_name, &key_column, report, &mut problems);
        }
        if let (Some(items), true) = (&item_view, items_ok) {
            check_read_by_key(&k, items, "report_no", false, &mut problems);
        }
    }
    check_polls(kind, &mut problems);
    TableIterator::new(problems.into_iter().map(|p| -> ProblemRow {
        (
            p.kind, p.source, p.key, p.field, p.problem, p.value, p.rule, p.allowed, p.hint,
        )
    }))
}

/// The view's columns and their types; false when the view is missing or unusable.
fn check_columns(
    kind: &str,
    view: &str,
    canonical: &SourceView,
    patient_view: bool,
    problems: &mut Vec<Problem>,
) -> bool {
    let columns: Option<Vec<(String, String)>> = Spi::connect(|client| {
        if relation_of(client, view)?.is_none() {
            return Ok::<_, pgrx::spi::Error>(None);
        }
        let cols = client
            .select(
                "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
                 WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
                None,
                &[view.into()],
            )?
            .map(|row| {
                Ok((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<String>(2)?.unwrap_or_default(),
                ))
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()?;
        Ok(Some(cols))
    })
    .unwrap_or_else(|e| error!("hmr: cannot inspect {view}: {e}"));

    let Some(columns) = columns else {
        problems.push(problem(
            kind,
            view,
            None,
            None,
            format!("source view {view} does not exist: create it with the columns listed in the README"),
        ));
        return false;
    };
    let mut usable = true;
    let key_columns: &[&str] = if canonical.kind == "lab_item" {
        &["report_no"]
    } else {
        &[canonical.key]
    };
    for key in key_columns {
        if !columns.iter().any(|(n, _)| n == key) && !canonical.columns.iter().any(|c| c.name == *key) {
            problems.push(problem(
                kind,
                view,
                None,
                Some((*key).into()),
                "key column is missing".into(),
            ));
            usable = false;
        }
    }
    for c in canonical.columns {
        match columns.iter().find(|(n, _)| n == c.name) {
            // The worker reads it from the patient view by patient_id.
            None if patient_view && source::from_patient(canonical, c.name) => {}
            None if c.required => {
                problems.push(problem(
                    kind,
                    view,
                    None,
                    Some(c.name.into()),
                    "required column is missing".into(),
                ));
                usable = false;
            }
            None => {}
            Some((_, actual)) if !type_matches(c.sql_type, actual) => {
                let hint = cast_hint(c.name, c.sql_type, actual);
                let mut p = problem(
                    kind,
                    view,
                    None,
                    Some(c.name.into()),
                    format!("column is {actual}, expected {} (in the view: {hint})", c.sql_type),
                );
                p.rule = Some(format!("the column's type must be {}", c.sql_type));
                p.hint = Some(hint);
                problems.push(p);
                usable = false;
            }
            Some((_, actual)) if c.sql_type == "timestamptz" && actual == "timestamp without time zone" => {
                // Accepted by PostgreSQL's cast, but read in the reading session's zone.
                let hint = cast_hint(c.name, c.sql_type, actual);
                let mut p = problem(
                    kind,
                    view,
                    None,
                    Some(c.name.into()),
                    format!("column is timestamp without time zone: its zone is ambiguous (in the view: {hint})"),
                );
                p.hint = Some(hint);
                problems.push(p);
            }
            Some(_) => {}
        }
    }
    usable
}

/// A cast that works for the source's type (and does not depend on the session's zone).
fn cast_hint(column: &str, expected: &str, actual: &str) -> String {
    let number = matches!(actual, "smallint" | "integer" | "bigint") || actual.starts_with("numeric");
    let text = actual == "text" || actual.starts_with("character");
    match expected {
        "boolean" if number => format!("({column} <> 0) AS {column}"),
        "boolean" if text => format!("hmr.flag({column}) AS {column}"),
        "timestamptz" if actual == "timestamp without time zone" => {
            format!("({column} AT TIME ZONE 'Asia/Shanghai') AS {column}")
        }
        "timestamptz" if actual == "date" || text => {
            format!("({column}::timestamp AT TIME ZONE 'Asia/Shanghai') AS {column}")
        }
        "date" if actual.starts_with("timestamp") => format!("{column}::date AS {column}"),
        "date" if text => format!("to_date({column}, 'YYYY-MM-DD') AS {column}"),
        "text" => format!("{column}::text AS {column}"),
        "integer" if text => format!("{column}::integer AS {column}"),
        _ => format!("{column}::{expected} AS {column}"),
    }
}

/// The code map that turns the words hospitals use into a field's codes (`hmr.code`).
fn code_domain(field: &str) -> Option<&'static str> {
    Some(match field.rsplit('.').next().unwrap_or(field) {
        "genderCode" => "gender",
        "idType" => "id_type",
        "visitType" => "visit_type",
        "abnormalFlag" => "abnormal_flag",
        "status" => "active",
        "role" => "role",
        "examClass" => "exam_class",
        "titleCode" => "title",
        _ => return None,
    })
}

fn type_matches(expected: &str, actual: &str) -> bool {
    match expected {
        "text" => actual == "text" || actual.starts_with("character varying") || actual.starts_with("character("),
        "timestamptz" => actual == "timestamp with time zone",
        "date" => actual == "date",
        "boolean" => actual == "boolean",
        "integer" => matches!(actual, "integer" | "smallint" | "bigint"),
        _ => false,
    }
}

/// The view's name as the catalog quotes it (so a name cannot inject SQL); None when it does
/// not exist.
fn relation_of(client: &pgrx::spi::SpiClient<'_>, view: &str) -> Result<Option<String>, pgrx::spi::Error> {
    client
        .select("SELECT to_regclass($1)::text", None, &[view.into()])?
        .first()
        .get_one::<String>()
}

/// The foreign scans of a query's plan (`EXPLAIN (VERBOSE, FORMAT JSON)`: nothing runs), as
/// (remote table, remote query, filtered here). EXPLAIN is refused in SPI's read-only mode, so
/// the plan is asked in read-write mode.
fn foreign_scans_of(query: &str) -> Vec<(String, String, bool)> {
    let plan = Spi::connect_mut(|client| {
        client
            .update(&format!("EXPLAIN (VERBOSE, FORMAT JSON) {query}"), None, &[])?
            .first()
            .get_one::<pgrx::Json>()
    });
    let Ok(Some(pgrx::Json(plan))) = plan else {
        return vec![];
    };
    let mut scans = Vec::new();
    foreign_scans(&plan, &mut scans);
    scans
        .into_iter()
        .map(|scan| {
            let remote = scan["Remote SQL"]
                .as_str()
                .or_else(|| scan["Remote query"].as_str())
                .unwrap_or("");
            (
                scan["Relation Name"].as_str().unwrap_or("?").to_string(),
                remote.to_string(),
                scan.get("Filter").is_some(),
            )
        })
        .collect()
}

/// The worker reads each changed record by key (reports one by one, master data in batches):
/// every foreign table that read touches must get the key (or a join parameter) in its remote
/// query. A view joining two views over foreign tables does not: the remote server is asked
/// for every row of one of them at each read (a report view joined to a UNION of patient
/// tables fetched every patient per report, #31).
fn check_read_by_key(kind: &str, view: &str, key: &str, report_view: bool, problems: &mut Vec<Problem>) {
    const PROBE: &str = "hmr-check-key";
    let Ok(Some(relation)) = Spi::connect(|client| relation_of(client, view)) else {
        return;
    };
    let query = format!(
        "SELECT to_jsonb(v) FROM {relation} v WHERE v.{k}::text = ANY(ARRAY['{PROBE}'])",
        k = pgrx::spi::quote_identifier(key)
    );
    for (table, remote, _) in foreign_scans_of(&query) {
        // mysql_fdw sends parameters as `?`, postgres_fdw as `$1`.
        if remote.contains(PROBE) || remote.contains('?') || remote.contains("$1") {
            continue;
        }
        let hint = if report_view {
            "a report view joined to the patient view reads every patient per report: leave id_type, id_no \
             and patient_name out of the report view (the worker takes them from hmr_src.patient by patient_id)"
                .to_string()
        } else {
            format!(
                "read {table} in a view of its own, or join it by a column the remote server gets \
                 with the key; check with EXPLAIN VERBOSE {query}"
            )
        };
        problems.push(Problem {
            rule: Some(format!(
                "each read of {view} by {key} (the worker reading a changed {kind}, or a poll's un-audit check) \
                 reads every row of the remote table {table} (remote query: {remote})"
            )),
            hint: Some(hint),
            ..problem(
                kind,
                view,
                None,
                Some(key.into()),
                "read-by-key-reads-whole-table".into(),
            )
        });
    }
}

/// What only the whole view shows (it reads the key and time columns of every row, so on a
/// large HIS it takes as long as a scan of the view): keys that name two rows (a patient in
/// both the outpatient and the inpatient table of a UNION; the worker would read either), and
/// a newest change or report time in the future or hours old, the sign of a time read in the
/// wrong zone (a Beijing wall-clock column read as UTC comes out 8 h early).
fn check_whole_view(kind: &str, view: &str, canonical: &SourceView, problems: &mut Vec<Problem>) {
    let found = Spi::connect(|client| {
        let relation = relation_of(client, view)?.unwrap_or_default();
        // The first of these the view has (audited_at is optional in a report view).
        let time = client
            .select(
                "SELECT t FROM unnest(ARRAY['updated_at', 'audited_at', 'reported_at']) WITH ORDINALITY AS u(t, n)
                  WHERE EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = to_regclass($1)
                                   AND a.attname = u.t AND NOT a.attisdropped)
                  ORDER BY n LIMIT 1",
                None,
                &[view.into()],
            )?
            .first()
            .get_one::<String>()?;
        let key = pgrx::spi::quote_identifier(canonical.key);
        let duplicates = client
            .select(
                &format!(
                    "SELECT {key}::text, count(*) FROM {relation} WHERE {key} IS NOT NULL
                      GROUP BY 1 HAVING count(*) > 1 ORDER BY 2 DESC, 1 LIMIT 5"
                ),
                None,
                &[],
            )?
            .map(|r| Ok((r.get::<String>(1)?.unwrap_or_default(), r.get::<i64>(2)?.unwrap_or(0))))
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()?;
        let newest = match &time {
            Some(t) => client
                .select(
                    &format!(
                        "SELECT extract(epoch FROM max({col}) - now())::float8 FROM {relation}",
                        col = pgrx::spi::quote_identifier(t)
                    ),
                    None,
                    &[],
                )?
                .first()
                .get_one::<f64>()?,
            None => None,
        };
        Ok::<_, pgrx::spi::Error>((time, duplicates, newest))
    });
    let Ok((time, duplicates, newest)) = found else {
        return;
    };
    for (key, rows) in duplicates {
        problems.push(Problem {
            rule: Some(format!("a key names one row; this one names {rows}")),
            hint: Some(format!(
                "keep one row per {k}: UNION (not UNION ALL) of identical rows, or prefer one table (NOT EXISTS), \
                 or prefix the keys of each table",
                k = canonical.key
            )),
            ..problem(
                kind,
                view,
                Some(key),
                Some(canonical.key.into()),
                "duplicate-key".into(),
            )
        });
    }
    if let (Some(t), Some(ahead)) = (time.as_deref(), newest) {
        let hours = ahead / 3600.0;
        let zone_hint = format!("({t} AT TIME ZONE 'Asia/Shanghai') AS {t} for a timestamp without time zone; check with SELECT max({t}), now() FROM {view}");
        if ahead > 300.0 {
            problems.push(Problem {
                rule: Some(format!("the newest {t} lies {hours:.1} h in the future")),
                hint: Some(zone_hint),
                ..problem(kind, view, None, Some(t.into()), "clock".into())
            });
        } else if (-9.5..=-6.5).contains(&hours) && matches!(kind, "patient" | "lab_report" | "exam_report") {
            problems.push(Problem {
                rule: Some(format!(
                    "the newest {t} is {:.1} h old: if records changed since, the column is read 8 h off",
                    -hours
                )),
                hint: Some(zone_hint),
                ..problem(kind, view, None, Some(t.into()), "clock".into())
            });
        }
    }
}

/// A polled source over a foreign table must send its bounds to the remote server: a poll
/// that reads the whole remote table works on ten rows and fails on a HIS's ten million. The
/// poll's query is planned (`EXPLAIN VERBOSE`, nothing runs) and every foreign scan in it is
/// looked at: one whose remote query has no WHERE, or that filters here, reads every row.
fn check_polls(kind: Option<&str>, problems: &mut Vec<Problem>) {
    let sources: Vec<(String, String, String, String, String)> = Spi::connect(|client| {
        client
            .select(
                "SELECT p.name, p.kind, coalesce(p.source_view, k.source_view), p.time_column, k.key_column
                   FROM hmr.polled_sources p JOIN hmr.kinds k USING (kind)
                  WHERE p.enabled AND p.time_column IS NOT NULL
                    AND to_regclass(coalesce(p.source_view, k.source_view)) IS NOT NULL
                  ORDER BY p.name",
                None,
                &[],
            )?
            .map(|r| {
                Ok((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<String>(2)?.unwrap_or_default(),
                    r.get::<String>(3)?.unwrap_or_default(),
                    r.get::<String>(4)?.unwrap_or_default(),
                    r.get::<String>(5)?.unwrap_or_default(),
                ))
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })
    .unwrap_or_default();
    for (name, k, view, time, key) in sources {
        if kind.is_some_and(|wanted| wanted != k) {
            continue;
        }
        let typ_relation = Spi::connect(|client| {
            let relation = relation_of(client, &view)?.unwrap_or_default();
            let typ = client
                .select(
                    "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                      WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
                    None,
                    &[view.as_str().into(), time.as_str().into()],
                )?
                .first()
                .get_one::<String>()?
                .unwrap_or_default();
            Ok::<_, pgrx::spi::Error>((relation, typ))
        });
        let Ok((relation, typ)) = typ_relation else {
            continue;
        };
        // The poll's candidate query, with bounds of the column's own type (as poll_source
        // binds them).
        let bound = if typ == "timestamp without time zone" {
            "'2026-01-01 00:00:00'::timestamp"
        } else {
            "'2026-01-01 00:00:00+08'::timestamptz"
        };
        let t = pgrx::spi::quote_identifier(&time);
        let query = format!(
            "SELECT v.{k}::text, v.{t} FROM {relation} v WHERE v.{t} > {bound} AND v.{t} <= {bound}",
            k = pgrx::spi::quote_identifier(&key)
        );
        // A report source's poll also asks its view for the reports delivered lately (the
        // un-audit check): by key, so that read is planned too.
        if matches!(k.as_str(), "lab_report" | "exam_report") {
            check_read_by_key(&k, &view, &key, false, problems);
        }
        for (table, remote, filtered_here) in foreign_scans_of(&query) {
            if remote.to_uppercase().contains("WHERE") && !filtered_here {
                continue;
            }
            problems.push(Problem {
                rule: Some(format!(
                    "each poll of source {name} reads every row of the remote table {table}: its change \
                     filter on {time} is evaluated here, not by the remote server (remote query: {remote})"
                )),
                hint: Some(format!(
                    "poll a view that gives the remote column raw (no AT TIME ZONE, no cast, no function), \
                     e.g. CREATE VIEW hmr_src.{k}_changes AS SELECT <key> AS {key}, <raw time column> AS {time} \
                     FROM <foreign table> WHERE <status filter>; UPDATE hmr.polled_sources SET source_view = \
                     'hmr_src.{k}_changes' WHERE name = '{name}' (a wall-clock column is read in \
                     polled_sources.time_zone)"
                )),
                ..problem(&k, &view, None, Some(time.clone()), "poll-reads-whole-table".into())
            });
        }
    }
}

/// The foreign scans of an `EXPLAIN (FORMAT JSON)` plan, at any depth.
fn foreign_scans<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| foreign_scans(x, out)),
        Value::Object(o) => {
            if o.get("Node Type").and_then(Value::as_str) == Some("Foreign Scan") {
                out.push(v);
            }
            o.values().for_each(|x| foreign_scans(x, out));
        }
        _ => {}
    }
}

/// Converts and validates up to `hmr.check_sample_rows` rows.
fn check_rows(
    parsed: Kind,
    view: &str,
    item_view: Option<&str>,
    canonical: &SourceView,
    patient_view: Option<&(String, String)>,
    problems: &mut Vec<Problem>,
) {
    let kind = parsed.as_str();
    let limit = i64::from(gucs::CHECK_SAMPLE_ROWS.get());
    if limit == 0 {
        return;
    }
    // Quoting comes from regclass's own output, so a view name cannot inject SQL.
    let rows: Vec<Value> = Spi::connect(|client| {
        let relation = relation_of(client, view)?;
        let query = format!(
            "SELECT to_jsonb(v) FROM {} v LIMIT {limit}",
            relation.unwrap_or_default()
        );
        client
            .select(&query, None, &[])?
            .map(|row| Ok(row.get::<JsonB>(1)?.map(|j| j.0).unwrap_or(Value::Null)))
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })
    .unwrap_or_else(|e| error!("hmr: cannot read {view}: {e}"));

    let now = hmr_protocol::checks::china_now();
    for row in rows {
        let Value::Object(mut row) = row else { continue };
        if let (Some((patients, key)), true) = (patient_view, parsed.report_type().is_some()) {
            fill_identity(patients, key, &mut row);
        }
        let key = row
            .get(canonical.key)
            .map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
        let mut extra = Map::new();
        if parsed.report_type().is_some() {
            extra.insert("version".into(), json!(1));
        }
        let items: Vec<Value> = match (item_view, key.as_deref()) {
            (Some(view), Some(k)) => read_items(view, k),
            _ => vec![],
        };
        if item_view.is_some() {
            extra.insert("items".into(), Value::Array(items.clone()));
        }
        let outcome: Result<(), ProtocolError> = match parsed {
            Kind::Decision => Ok(()),
            kind => source::Record::read(kind, &row, extra, &now).map(|_| ()),
        };
        match outcome {
            Ok(()) => {}
            Err(ProtocolError::Invalid(errors)) => {
                for FieldError { field, reason } in errors {
                    let column = source::column_for_field(kind, &field);
                    let value = field_value(&row, &items, &field, &column);
                    let shown = value.as_deref().map(|v| {
                        if column.ends_with("id_no") {
                            hmr_protocol::mask::id_no(v)
                        } else {
                            hmr_protocol::mask::scrub(v)
                        }
                    });
                    let allowed = validate::allowed_values(&field).map(|a| a.join(", "));
                    let bare = column.rsplit('.').next().unwrap_or(&column).to_string();
                    let hint = match reason.as_str() {
                        // The view may call hmr.code already: then the word is not in the map,
                        // and a row of hmr.code_map is the fix (words match trimmed, lower-cased).
                        "code" => code_domain(&field).map(|d| {
                            let word = value.as_deref().unwrap_or("").trim().to_lowercase().replace('\'', "''");
                            format!(
                                "hmr.code('{d}', {bare}) AS {bare}; if the view has it, map the word: \
                                 INSERT INTO hmr.code_map (domain, word, code) VALUES ('{d}', '{word}', '<code>')"
                            )
                        }),
                        "format" if value.as_deref().is_some_and(|v| v.ends_with('x')) => {
                            Some(format!("upper({bare}) AS {bare}"))
                        }
                        "future" => Some(format!(
                            "a time read in the wrong zone? ({bare} AT TIME ZONE 'Asia/Shanghai') AS {bare}"
                        )),
                        "required" if value.as_deref().is_some_and(|v| v.trim().is_empty()) => {
                            Some(format!("nullif(trim({bare}), '') AS {bare}"))
                        }
                        _ => None,
                    };
                    problems.push(Problem {
                        kind: kind.into(),
                        source: view.into(),
                        key: key.clone(),
                        field: Some(column),
                        problem: reason.clone(),
                        value: shown,
                        rule: Some(validate::rule_of(&reason).to_string()),
                        allowed,
                        hint,
                    });
                }
            }
            Err(e) => {
                let (field, reason) = e.field_and_reason();
                problems.push(problem(kind, view, key.clone(), Some(field), reason));
            }
        }
    }
}

/// A report row without the patient's identity columns gets them from its patient's row,
/// as the worker reads it.
fn fill_identity(patient_view: &str, patient_key: &str, row: &mut Map<String, Value>) {
    if source::PATIENT_IDENTITY.iter().all(|(c, _)| row.contains_key(*c)) {
        return;
    }
    let Some(patient_id) = row.get("patient_id").and_then(Value::as_str).map(str::to_string) else {
        return;
    };
    let patient = Spi::connect(|client| {
        let relation = relation_of(client, patient_view)?.unwrap_or_default();
        client
            .select(
                &format!(
                    "SELECT to_jsonb(p) FROM {relation} p WHERE p.{}::text = $1 LIMIT 1",
                    pgrx::spi::quote_identifier(patient_key)
                ),
                None,
                &[patient_id.into()],
            )?
            .first()
            .get_one::<JsonB>()
    });
    if let Ok(Some(JsonB(Value::Object(patient)))) = patient {
        source::fill_identity(row, &patient);
    }
}

/// The value a problem is about: a column of the row, or a field of one of its items
/// (`items[2].resultValue`, items being in platform field names).
fn field_value(row: &Map<String, Value>, items: &[Value], field: &str, column: &str) -> Option<String> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if let Some(rest) = field.strip_prefix("items[") {
        let (index, name) = rest.split_once("].")?;
        let item = items.get(index.parse::<usize>().ok()?)?;
        return item.get(name).map(text);
    }
    row.get(column).filter(|v| !v.is_null()).map(text)
}

/// Items of one report in platform field names, ordered by `seq` when the view has it.
fn read_items(item_view: &str, report_no: &str) -> Vec<Value> {
    Spi::connect(|client| {
        let relation = relation_of(client, item_view)?;
        let query = format!(
            "SELECT to_jsonb(i) FROM {} i WHERE i.report_no = $1 ORDER BY to_jsonb(i) -> 'seq', to_jsonb(i) ->> 'item_code'",
            relation.unwrap_or_default()
        );
        client
            .select(&query, None, &[report_no.into()])?
            .map(|row| {
                let v = row.get::<JsonB>(1)?.map(|j| j.0).unwrap_or(Value::Null);
                Ok(match v {
                    Value::Object(m) => Value::Object(source::LAB_ITEM.to_fields(&m)),
                    other => other,
                })
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })
    .unwrap_or_else(|e| error!("hmr: cannot read {item_view}: {e}"))
}
