//! `hmr.check_sources()`: checks the DBA's source views against the canonical columns and
//! validates sample rows with the same code the worker uses before sending.

use hmr_protocol::source::{self, SourceView};
use hmr_protocol::{validate, FieldError, ProtocolError};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Map, Value};

use crate::gucs;

type Problem = (String, String, Option<String>, Option<String>, String);

/// One row per problem: the kind, the source view, the record key (for row problems), the
/// column, and the problem in plain words. No rows means the sources are ready.
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
    ),
> {
    let kinds: Vec<(String, String, Option<String>)> = Spi::connect(|client| {
        client
            .select(
                "SELECT kind, source_view, item_view FROM hmr.kinds WHERE kind <> 'decision' ORDER BY kind",
                None,
                &[],
            )?
            .map(|row| {
                Ok((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<String>(2)?.unwrap_or_default(),
                    row.get::<String>(3)?,
                ))
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })
    .unwrap_or_else(|e| error!("hmr: cannot read hmr.kinds: {e}"));

    let mut problems: Vec<Problem> = Vec::new();
    for (k, view_name, item_view) in kinds {
        if kind.is_some_and(|wanted| wanted != k) {
            continue;
        }
        let Some(canonical) = source::view_for(&k) else {
            continue;
        };
        let columns_ok = check_columns(&k, &view_name, canonical, &mut problems);
        if let Some(items) = &item_view {
            check_columns(&k, items, &source::LAB_ITEM, &mut problems);
        }
        if columns_ok {
            check_rows(&k, &view_name, item_view.as_deref(), canonical, &mut problems);
        }
    }
    TableIterator::new(problems)
}

/// The view's columns and their types; false when the view is missing or unusable.
fn check_columns(kind: &str, view: &str, canonical: &SourceView, problems: &mut Vec<Problem>) -> bool {
    let columns: Option<Vec<(String, String)>> = Spi::connect(|client| {
        let exists = client
            .select("SELECT to_regclass($1) IS NOT NULL", None, &[view.into()])?
            .first()
            .get_one::<bool>()?;
        if exists != Some(true) {
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
        problems.push((
            kind.into(),
            view.into(),
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
            problems.push((
                kind.into(),
                view.into(),
                None,
                Some((*key).into()),
                "key column is missing".into(),
            ));
            usable = false;
        }
    }
    for c in canonical.columns {
        match columns.iter().find(|(n, _)| n == c.name) {
            None if c.required => {
                problems.push((
                    kind.into(),
                    view.into(),
                    None,
                    Some(c.name.into()),
                    "required column is missing".into(),
                ));
                usable = false;
            }
            None => {}
            Some((_, actual)) if !type_matches(c.sql_type, actual) => {
                problems.push((
                    kind.into(),
                    view.into(),
                    None,
                    Some(c.name.into()),
                    format!(
                        "column is {actual}, expected {} (cast it in the view: {}::{})",
                        c.sql_type, c.name, c.sql_type
                    ),
                ));
                usable = false;
            }
            Some(_) => {}
        }
    }
    usable
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

/// Converts and validates up to `hmr.check_sample_rows` rows.
fn check_rows(kind: &str, view: &str, item_view: Option<&str>, canonical: &SourceView, problems: &mut Vec<Problem>) {
    let limit = i64::from(gucs::CHECK_SAMPLE_ROWS.get());
    if limit == 0 {
        return;
    }
    // Quoting comes from regclass's own output, so a view name cannot inject SQL.
    let rows: Vec<Value> = Spi::connect(|client| {
        let relation = client
            .select("SELECT to_regclass($1)::text", None, &[view.into()])?
            .first()
            .get_one::<String>()?;
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
        let Value::Object(row) = row else { continue };
        let key = row
            .get(canonical.key)
            .map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
        let mut extra = Map::new();
        if matches!(kind, "lab_report" | "exam_report") {
            extra.insert("version".into(), json!(1));
        }
        if let (Some(items), Some(k)) = (item_view, key.as_deref()) {
            extra.insert("items".into(), Value::Array(read_items(items, k)));
        }
        let outcome: Result<(), ProtocolError> = match kind {
            "patient" => canonical
                .record(&row, extra)
                .and_then(|p| validate::patient(&p, &now).map_err(ProtocolError::Invalid)),
            "department" => canonical
                .record(&row, extra)
                .and_then(|d| validate::department(&d, &now).map_err(ProtocolError::Invalid)),
            "staff" => canonical
                .record(&row, extra)
                .and_then(|s| validate::staff(&s, &now).map_err(ProtocolError::Invalid)),
            "lab_report" => canonical
                .record(&row, extra)
                .and_then(|l| validate::lab_report(&l, &now).map_err(ProtocolError::Invalid)),
            "exam_report" => canonical
                .record(&row, extra)
                .and_then(|e| validate::exam_report(&e, &now).map_err(ProtocolError::Invalid)),
            _ => Ok(()),
        };
        match outcome {
            Ok(()) => {}
            Err(ProtocolError::Invalid(errors)) => {
                for FieldError { field, reason } in errors {
                    let column = source::column_for_field(kind, &field);
                    problems.push((kind.into(), view.into(), key.clone(), Some(column), reason));
                }
            }
            Err(e) => {
                let (field, reason) = e.field_and_reason();
                problems.push((kind.into(), view.into(), key.clone(), Some(field), reason));
            }
        }
    }
}

/// Items of one report in platform field names, ordered by `seq` when the view has it.
fn read_items(item_view: &str, report_no: &str) -> Vec<Value> {
    Spi::connect(|client| {
        let relation = client.select("SELECT to_regclass($1)::text", None, &[item_view.into()])?.first().get_one::<String>()?;
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
