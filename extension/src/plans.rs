//! Statements planned once per backend. On the paths a doctor waits on (a check, the
//! badge), planning the same few statements on every call cost more than running them
//! (`hmr-bench sql`, BENCHMARKS.md §4). A kept plan is PostgreSQL's own cached plan: it is
//! re-planned by PostgreSQL itself when a table it reads changes (ALTER, an upgrade).

use std::cell::RefCell;
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::ops::Deref;

use pgrx::datum::DatumWithOid;
use pgrx::spi::{OwnedPreparedStatement, Spi, SpiClient, SpiResult, SpiTupleTable};
use pgrx::{PgBuiltInOids, PgOid};

thread_local! {
    static PLANS: RefCell<HashMap<&'static str, OwnedPreparedStatement>> = RefCell::new(HashMap::new());
}

/// What a statement does: a read runs on the calling query's snapshot (read-only SPI), a
/// write with its own command id.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

/// A statement's parameter types.
pub const TEXT: PgOid = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);
pub const JSONB: PgOid = PgOid::BuiltIn(PgBuiltInOids::JSONBOID);
pub const BOOL: PgOid = PgOid::BuiltIn(PgBuiltInOids::BOOLOID);
pub const INT4: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT4OID);
pub const FLOAT8: PgOid = PgOid::BuiltIn(PgBuiltInOids::FLOAT8OID);

/// A kept plan, borrowed out of this backend's store for one execution (so a statement that
/// calls back into hmr cannot find the store borrowed). It goes back when dropped, also after
/// an error: a kept plan stays valid through an abort, as PL/pgSQL's do.
struct Prepared {
    sql: &'static str,
    plan: ManuallyDrop<OwnedPreparedStatement>,
}

impl Deref for Prepared {
    type Target = OwnedPreparedStatement;
    fn deref(&self) -> &OwnedPreparedStatement {
        &self.plan
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        // SAFETY: taken once, here, and never used again.
        let plan = unsafe { ManuallyDrop::take(&mut self.plan) };
        PLANS.with(|p| p.borrow_mut().insert(self.sql, plan));
    }
}

/// Runs the read `sql` (parameters of `types`) with `args`, and hands its rows to `rows`.
pub fn read<T>(
    sql: &'static str,
    types: &[PgOid],
    args: &[DatumWithOid<'_>],
    rows: impl FnOnce(SpiTupleTable<'_>) -> SpiResult<T>,
) -> SpiResult<T> {
    Spi::connect(|client| {
        let plan = plan(client, sql, types, Access::Read)?;
        rows(client.select(&*plan, None, args)?)
    })
}

/// Runs the write `sql` (parameters of `types`) with `args`.
pub fn write(sql: &'static str, types: &[PgOid], args: &[DatumWithOid<'_>]) -> SpiResult<()> {
    Spi::connect_mut(|client| {
        let plan = plan(client, sql, types, Access::Write)?;
        client.update(&*plan, None, args).map(drop)
    })
}

/// The plan of `sql` (with parameters of `types`), planned on first use in this backend.
fn plan(client: &SpiClient<'_>, sql: &'static str, types: &[PgOid], access: Access) -> SpiResult<Prepared> {
    let kept = PLANS.with(|p| p.borrow_mut().remove(sql));
    let plan = match kept {
        Some(plan) => plan,
        None => match access {
            Access::Read => client.prepare(sql, types)?.keep(),
            Access::Write => client.prepare_mut(sql, types)?.keep(),
        },
    };
    Ok(Prepared {
        sql,
        plan: ManuallyDrop::new(plan),
    })
}
