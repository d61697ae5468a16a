//! The capture trigger, in Rust because it runs inside every HIS transaction that changes a
//! watched row: it appends (id, kind, key, op, xid, time) straight into the heap of
//! `hmr.captured` (no executor, no index, no SPI), and sends a NOTIFY only when a worker
//! said it is asleep (a flag in shared memory, read with one atomic load).
//!
//! `hmr.captured` is append-only and index-free on purpose: the worker moves its rows into
//! `hmr.outbox` (indexed, with delivery state) in batches, so the HIS transaction never pays
//! for index maintenance or delivery bookkeeping.

use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;

// SAFETY: the declaration matches commands/sequence.h of PostgreSQL 15
// (`int64 nextval_internal(Oid relid, bool check_permissions)`); calls go through
// pg_guard_ffi_boundary so an ERROR inside becomes a Rust panic handled by pgrx.
unsafe extern "C-unwind" {
    // commands/sequence.h (not in pgrx's bindings). The sequence belongs to the extension;
    // the HIS role writing the row needs no USAGE on it, as with the table.
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

/// The NOTIFY channel workers LISTEN on.
const CHANNEL: &CStr = c"hmr_outbox";

#[repr(C)]
struct WakeState {
    /// 1 while a worker may be asleep waiting for a NOTIFY; the first capture that sees it
    /// swaps it back to 0 and notifies, so a busy system pays one atomic load per event.
    sleeping: AtomicU32,
}

/// This backend's pointer into shared memory (found or created on first use).
static WAKE: AtomicPtr<WakeState> = AtomicPtr::new(std::ptr::null_mut());

/// The shared wake-up flag. Created lazily in the shared memory PostgreSQL keeps spare for
/// add-ins (as pg_prewarm does), so `shared_preload_libraries` is not needed.
fn wake_state() -> &'static WakeState {
    let found_here = WAKE.load(Ordering::Acquire);
    if !found_here.is_null() {
        // SAFETY: set below from shmem_struct's 'static reference into shared memory, which
        // stays mapped for the life of the backend; the struct holds atomics only.
        return unsafe { &*found_here };
    }
    let state = crate::shared::shmem_struct(c"hmr wake-up", || WakeState {
        sleeping: AtomicU32::new(0),
    });
    WAKE.store(std::ptr::from_ref(state).cast_mut(), Ordering::Release);
    state
}

/// The columns the trigger writes, in order: a tuple is formed for exactly this shape.
const CAPTURED_SHAPE: [(&str, pg_sys::Oid); 6] = [
    ("id", pg_sys::INT8OID),
    ("kind", pg_sys::TEXTOID),
    ("key", pg_sys::TEXTOID),
    ("op", pg_sys::CHAROID),
    ("xid", pg_sys::XID8OID),
    ("created_at", pg_sys::TIMESTAMPTZOID),
];

/// Where each of `CAPTURED_SHAPE`'s columns sits in the table (dropped columns, left by an
/// `ADD COLUMN` undone with `DROP COLUMN`, are skipped and written as NULL).
#[derive(Clone, Copy)]
struct Layout {
    relid: pg_sys::Oid,
    natts: usize,
    positions: [usize; 6],
}

thread_local! {
    /// The layout of the `hmr.captured` last found right; forgotten by the relcache callback
    /// whenever that relation changes, so an ALTER TABLE is seen at the next capture.
    static LAYOUT: std::cell::Cell<Option<Layout>> = const { std::cell::Cell::new(None) };
}
static CALLBACK_REGISTERED: AtomicU32 = AtomicU32::new(0);

/// # Safety
/// A relcache invalidation callback: PostgreSQL calls it with its registered argument.
unsafe extern "C-unwind" fn forget_layout(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    // Called during invalidation processing: only a store, nothing that can fail.
    LAYOUT.with(|l| {
        if relid == pg_sys::InvalidOid || l.get().is_some_and(|layout| layout.relid == relid) {
            l.set(None);
        }
    });
}

/// The layout of `rel` if it is a table this trigger may write straight into, or why not.
///
/// # Safety
/// `rel` is an open relation.
unsafe fn captured_layout(rel: pg_sys::Relation) -> Result<Layout, String> {
    // SAFETY: an open relation has a valid rd_rel and rd_att with natts attributes
    // (caller's contract).
    unsafe {
        let form = &*(*rel).rd_rel;
        if form.relkind != pg_sys::RELKIND_RELATION as std::ffi::c_char {
            return Err("it is not a plain table".into());
        }
        if form.relam != pg_sys::HEAP_TABLE_AM_OID {
            return Err("it does not use the heap access method".into());
        }
        // relhasindex can stay set after an index is gone (until VACUUM): then ask the relcache.
        if form.relhasindex && !pg_sys::RelationGetIndexList(rel).is_null() {
            // Rows written here bypass index maintenance: an index would silently miss them.
            return Err("it has an index (rows are written straight into its heap)".into());
        }
        if form.relchecks > 0 {
            return Err("it has a CHECK constraint (rows are written straight into its heap)".into());
        }
        let desc = &*(*rel).rd_att;
        let attrs = desc.attrs.as_slice(desc.natts as usize);
        let live: Vec<(usize, &pg_sys::FormData_pg_attribute)> =
            attrs.iter().enumerate().filter(|(_, a)| !a.attisdropped).collect();
        if live.len() != CAPTURED_SHAPE.len() {
            return Err(format!(
                "it has {} columns, expected {}",
                live.len(),
                CAPTURED_SHAPE.len()
            ));
        }
        let mut positions = [0usize; 6];
        for (n, ((at, attr), (name, type_oid))) in live.iter().zip(CAPTURED_SHAPE).enumerate() {
            let actual = CStr::from_ptr(attr.attname.data.as_ptr()).to_string_lossy();
            if actual != name || attr.atttypid != type_oid {
                return Err(format!(
                    "column {} is {actual} (type oid {}), expected {name} (type oid {})",
                    n + 1,
                    attr.atttypid.to_u32(),
                    type_oid.to_u32()
                ));
            }
            positions[n] = *at;
        }
        Ok(Layout {
            relid: (*rel).rd_id,
            natts: attrs.len(),
            positions,
        })
    }
}

/// The layout to form tuples for, or an ERROR (nothing written) when `rel` has another shape.
///
/// # Safety
/// `rel` is an open relation.
unsafe fn checked_layout(rel: pg_sys::Relation) -> Layout {
    // SAFETY: rel is open (caller's contract); registering a relcache callback is allowed at
    // any time in a backend and is done once (a backend has 10 slots).
    unsafe {
        let relid = (*rel).rd_id;
        if let Some(layout) = LAYOUT.with(|l| l.get()).filter(|l| l.relid == relid) {
            return layout;
        }
        if CALLBACK_REGISTERED.swap(1, Ordering::Relaxed) == 0 {
            pg_sys::CacheRegisterRelcacheCallback(Some(forget_layout), pg_sys::Datum::from(0usize));
        }
        match captured_layout(rel) {
            Ok(layout) => {
                LAYOUT.with(|l| l.set(Some(layout)));
                layout
            }
            Err(problem) => {
                pg_sys::table_close(rel, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
                pgrx::pg_sys::panic::ErrorReport::new(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("hmr.captured has the wrong shape: {problem}"),
                    "hmr.capture",
                )
                .set_detail(
                    "The capture trigger writes (id bigint, kind text, key text, op \"char\", xid xid8, \
                     created_at timestamptz) straight into the table's heap, with no index or constraint; \
                     nothing was written.",
                )
                .set_hint(
                    "Undo the change to hmr.captured (or reinstall the extension); the HIS change is rolled back.",
                )
                .report(PgLogLevel::ERROR);
                unreachable!("ERROR does not return")
            }
        }
    }
}

/// Called by a worker just before it waits for a NOTIFY.
#[pg_extern]
fn worker_sleeping() {
    wake_state().sleeping.store(1, Ordering::SeqCst);
}

/// NOTIFYs the workers if one is asleep (the capture trigger, and SQL that enqueues outside
/// it). The first caller to see the flag takes it down, so a sleep costs one NOTIFY; while
/// the flag is down this is one atomic load.
#[pg_extern]
pub(crate) fn wake_workers() -> bool {
    let state = wake_state();
    let asleep = state.sleeping.load(Ordering::Relaxed) != 0 && state.sleeping.swap(0, Ordering::SeqCst) != 0;
    if asleep {
        // SAFETY: pg_notify is a builtin taking (text, text), called with two text datums;
        // it queues the NOTIFY for commit.
        unsafe {
            pgrx::direct_function_call::<()>(
                pg_sys::pg_notify,
                &[CHANNEL.to_str().ok().into_datum(), "".into_datum()],
            );
        }
    }
    asleep
}

#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_hmr_capture() -> &'static pg_sys::Pg_finfo_record {
    const V1_API: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1_API
}

/// `hmr.capture(kind, key_column)`: AFTER INSERT OR UPDATE OR DELETE, FOR EACH ROW.
///
/// # Safety
/// Called by PostgreSQL's trigger manager with a `TriggerData` context.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn hmr_capture(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: the trigger manager passes a valid fcinfo whose context is checked to be
    // TriggerData before use; tuples and descriptors come from that TriggerData and live for
    // the call; the tuple written into hmr.captured is formed only after the relation's shape
    // was checked against CAPTURED_SHAPE (checked_layout).
    unsafe {
        let context = (*fcinfo).context;
        if context.is_null() || (*context).type_ != pg_sys::NodeTag::T_TriggerData {
            error!("hmr.capture() is a trigger function: attach it with hmr.watch()");
        }
        let data = &*context.cast::<pg_sys::TriggerData>();
        let event = data.tg_event;
        if event & pg_sys::TRIGGER_EVENT_ROW == 0 || event & pg_sys::TRIGGER_EVENT_TIMINGMASK != 0 {
            error!("hmr.capture() must run AFTER ... FOR EACH ROW: attach it with hmr.watch()");
        }
        let trigger = &*data.tg_trigger;
        if trigger.tgnargs != 2 {
            error!("hmr.capture() takes two arguments (kind, key column): attach it with hmr.watch()");
        }
        let args = std::slice::from_raw_parts(trigger.tgargs, 2);
        let kind = args[0];
        let desc = (*data.tg_relation).rd_att;
        let column = pg_sys::SPI_fnumber(desc, args[1]);
        if column <= 0 {
            error!(
                "hmr.capture(): the table has no column \"{}\"",
                CStr::from_ptr(args[1]).to_string_lossy()
            );
        }
        let key_of = |tuple: pg_sys::HeapTuple| -> *mut c_char { pg_sys::SPI_getvalue(tuple, desc, column) };

        let op = event & pg_sys::TRIGGER_EVENT_OPMASK;
        let (new_key, old_key) = match op {
            pg_sys::TRIGGER_EVENT_INSERT => (key_of(data.tg_trigtuple), std::ptr::null_mut()),
            pg_sys::TRIGGER_EVENT_UPDATE => (key_of(data.tg_newtuple), key_of(data.tg_trigtuple)),
            _ => (std::ptr::null_mut(), key_of(data.tg_trigtuple)),
        };
        let op_char = match op {
            pg_sys::TRIGGER_EVENT_INSERT => b'I',
            pg_sys::TRIGGER_EVENT_UPDATE => b'U',
            _ => b'D',
        };

        let namespace = pg_sys::get_namespace_oid(c"hmr".as_ptr(), false);
        let table = pg_sys::get_relname_relid(c"captured".as_ptr(), namespace);
        let sequence = pg_sys::get_relname_relid(c"event_id_seq".as_ptr(), namespace);
        if table == pg_sys::InvalidOid || sequence == pg_sys::InvalidOid {
            error!("hmr.captured or hmr.event_id_seq is missing: reinstall the extension");
        }
        let rel = pg_sys::table_open(table, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let layout = checked_layout(rel);
        let xid = pg_sys::GetTopFullTransactionId().value;
        let at = pg_sys::GetCurrentTransactionStartTimestamp();
        let append = |key: *mut c_char, op: u8| {
            let id = pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| nextval_internal(sequence, false));
            let row = [
                pg_sys::Datum::from(id),
                pg_sys::Datum::from(pg_sys::cstring_to_text(kind)),
                pg_sys::Datum::from(pg_sys::cstring_to_text(key)),
                pg_sys::Datum::from(op as i8),
                pg_sys::Datum::from(xid),
                pg_sys::Datum::from(at),
            ];
            // One slot per attribute of the table as it is (dropped ones NULL).
            let mut values = vec![pg_sys::Datum::from(0usize); layout.natts];
            let mut nulls = vec![true; layout.natts];
            for (value, &at) in row.iter().zip(&layout.positions) {
                values[at] = *value;
                nulls[at] = false;
            }
            let tuple = pg_sys::heap_form_tuple((*rel).rd_att, values.as_mut_ptr(), nulls.as_mut_ptr());
            pg_sys::simple_heap_insert(rel, tuple);
            pg_sys::heap_freetuple(tuple);
        };
        if !new_key.is_null() {
            append(new_key, op_char);
        }
        // A key that changed (or a deleted row) leaves the old record to reconcile too.
        if !old_key.is_null() && (new_key.is_null() || CStr::from_ptr(old_key) != CStr::from_ptr(new_key)) {
            append(old_key, b'D');
        }
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);

        wake_workers();
        pg_sys::Datum::from(0usize) // AFTER trigger: the result is ignored
    }
}
