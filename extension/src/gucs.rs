//! Settings (GUCs) of the extension. Platform credentials are never GUCs: every role could
//! read them.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Rows per source view that `hmr.check_sources()` converts and validates.
pub static CHECK_SAMPLE_ROWS: GucSetting<i32> = GucSetting::<i32>::new(1000);

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
}
