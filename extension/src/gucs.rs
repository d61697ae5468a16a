//! Settings (GUCs) of the extension: conveniences a session may tune. Policy is not here:
//! what the gate does when the platform cannot be asked, and the hard timeout of its calls,
//! are the hospital's and live in `hmr.policy` (set by `hmr_admin`, validated, dumped with
//! the database, readable before any hmr function ran). Platform credentials are never
//! GUCs either: every role could read them.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Rows per source view that `hmr.check_sources()` converts and validates.
pub static CHECK_SAMPLE_ROWS: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// A record whose head event has been failing this long shows in `hmr.stuck_records`.
pub static STUCK_AFTER_SECONDS: GucSetting<i32> = GucSetting::<i32>::new(600);

/// Seconds a list answer is reused for the same patient and doctor (0: never).
pub static LIST_CACHE_SECONDS: GucSetting<i32> = GucSetting::<i32>::new(10);

/// `{setting, source}` of an hmr setting as PostgreSQL holds it (the setting in its base
/// unit: seconds, not "10min"). Being in the library, calling it loads the library first,
/// which turns a placeholder set before (`SET hmr.stuck_after_seconds = '10min'`) into the
/// real setting: views read settings through it, whether or not hmr was loaded yet.
#[pgrx::pg_extern(stable, parallel_safe)]
fn setting_of(name: &str) -> Option<Vec<Option<String>>> {
    use pgrx::prelude::*;
    Spi::connect(|client| {
        let row = client
            .select(
                "SELECT s.setting, s.source FROM pg_catalog.pg_settings s WHERE s.name OPERATOR(pg_catalog.=) $1",
                None,
                &[name.into()],
            )?
            .first();
        if row.is_empty() {
            return Ok::<_, pgrx::spi::Error>(None);
        }
        Ok(Some(vec![row.get::<String>(1)?, row.get::<String>(2)?]))
    })
    .unwrap_or_else(|e| pgrx::error!("hmr: cannot read setting {name}: {e}"))
}

pub fn init() {
    GucRegistry::define_int_guc(
        c"hmr.check_sample_rows",
        c"Rows per source view that hmr.check_sources() validates.",
        c"0 checks the columns only.",
        &CHECK_SAMPLE_ROWS,
        0,
        10_000_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"hmr.stuck_after_seconds",
        c"A record whose oldest event has failed for this long is listed in hmr.stuck_records.",
        c"",
        &STUCK_AFTER_SECONDS,
        1,
        86_400 * 30,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"hmr.list_cache_seconds",
        c"Seconds a recognition list answer is reused for the same patient (0: never).",
        c"",
        &LIST_CACHE_SECONDS,
        0,
        3600,
        GucContext::Userset,
        GucFlags::default(),
    );
    // Any other hmr.* name is a mistake (or a policy setting of an older version, such as
    // hmr.gate_on_unavailable): refuse it rather than keep a placeholder nobody reads.
    // SAFETY: called from _PG_init with a static C string, as PostgreSQL documents.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"hmr".as_ptr()) };
}
