//! `hmr.load_catalog(csv)`: the recognition catalog is data (the province publishes it);
//! this loads it from CSV text with the columns `dataCode,type,name,validityDays`.

use pgrx::prelude::*;

/// Loads (upserts) catalog rows from CSV text with a header line; returns the rows loaded.
/// With `replace`, items absent from the CSV are removed (unless item_map still uses them).
#[pg_extern]
fn load_catalog(csv_text: &str, replace: default!(bool, false)) -> i64 {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(csv_text.as_bytes());
    let headers = reader
        .headers()
        .cloned()
        .unwrap_or_else(|e| catalog_error(0, &e.to_string()));
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h.eq_ignore_ascii_case(name))
            .unwrap_or_else(|| catalog_error(1, &format!("missing column {name}")))
    };
    let (code_at, type_at, name_at, days_at) = (
        column("dataCode"),
        column("type"),
        column("name"),
        column("validityDays"),
    );
    let mut rows: Vec<(String, String, String, i32)> = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let record = record.unwrap_or_else(|e| catalog_error(line, &e.to_string()));
        let field = |at: usize| record.get(at).unwrap_or_default().to_string();
        let kind = field(type_at);
        if kind != "lab" && kind != "exam" {
            catalog_error(line, &format!("type must be lab or exam, not {kind:?}"));
        }
        let days: i32 = field(days_at)
            .parse()
            .ok()
            .filter(|d| *d > 0)
            .unwrap_or_else(|| catalog_error(line, "validityDays must be a positive integer"));
        let code = field(code_at);
        if code.is_empty() {
            catalog_error(line, "dataCode is empty");
        }
        rows.push((code, kind, field(name_at), days));
    }
    let codes: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    Spi::connect_mut(|client| {
        for (code, kind, name, days) in &rows {
            client.update(
                "INSERT INTO hmr.catalog (data_code, type, name, validity_days) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (data_code) DO UPDATE
                    SET type = EXCLUDED.type, name = EXCLUDED.name, validity_days = EXCLUDED.validity_days,
                        loaded_at = now()",
                None,
                &[
                    code.as_str().into(),
                    kind.as_str().into(),
                    name.as_str().into(),
                    (*days).into(),
                ],
            )?;
        }
        if replace {
            client.update(
                "DELETE FROM hmr.catalog WHERE data_code <> ALL($1)",
                None,
                &[codes.clone().into()],
            )?;
        }
        Ok::<_, pgrx::spi::Error>(())
    })
    .unwrap_or_else(|e| error!("hmr: loading the catalog failed: {e}"));
    rows.len() as i64
}

fn catalog_error(line: usize, problem: &str) -> ! {
    ereport!(
        PgLogLevel::ERROR,
        PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
        format!("hmr: catalog CSV line {line}: {problem}"),
        "Expected a header line dataCode,type,name,validityDays and one item per line."
    );
    unreachable!("ereport(ERROR) does not return")
}
