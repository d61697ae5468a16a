//! Settings (GUCs) of the extension. Platform credentials are never GUCs: every role could
//! read them.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Rows per source view that `hmr.check_sources()` converts and validates.
pub static CHECK_SAMPLE_ROWS: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// A record whose head event has been failing this long shows in `hmr.stuck_records`.
pub static STUCK_AFTER_SECONDS: GucSetting<i32> = GucSetting::<i32>::new(600);

/// Hard limit of one platform call from SQL (token included).
pub static PLATFORM_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(3000);

/// Seconds a list answer is reused for the same patient and doctor (0: never).
pub static LIST_CACHE_SECONDS: GucSetting<i32> = GucSetting::<i32>::new(10);

/// What the gate does when the platform cannot be asked: `allow` (save, log the skipped
/// check) or `block` (refuse the save with HM002).
pub static GATE_ON_UNAVAILABLE: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(Some(c"allow"));

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
        c"hmr.platform_timeout_ms",
        c"Hard timeout of one platform call from SQL, in milliseconds.",
        c"On timeout the answer says status unavailable.",
        &PLATFORM_TIMEOUT_MS,
        100,
        600_000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
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
    GucRegistry::define_string_guc(
        c"hmr.gate_on_unavailable",
        c"allow or block: what the order gate does when the platform is unavailable.",
        c"allow (default) saves and logs the skipped check; block refuses the save with HM002.",
        &GATE_ON_UNAVAILABLE,
        GucContext::Userset,
        GucFlags::default(),
    );
}
