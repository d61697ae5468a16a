//! Section 3: HIS master data batches (patients, departments, staff), answered per record.

use chrono::{DateTime, FixedOffset};
use hmr_protocol::checks::{parse_time, MAX_BATCH};
use hmr_protocol::{validate, Batch, BatchAnswer, FieldError, RecordResult, RecordStatus};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::SimError;
use crate::handler::{Call, Rendered};
use crate::journal::Effect;
use crate::state::{OrgData, State};
use crate::wire;

/// What applying one record did.
enum Applied {
    Changed,
    Unchanged,
}

type Outcome = Result<Applied, Vec<FieldError>>;

pub fn patients(st: &mut State, call: &Call) -> Result<Rendered, SimError> {
    batch(st, call, "patients", |org, p: hmr_protocol::Patient, now| {
        validate::patient(&p, now)?;
        if let Some(held) = org.patients.get(&p.patient_id) {
            if older(&p.updated_at, &held.updated_at) || held == &p {
                return Ok(Applied::Unchanged);
            }
        }
        org.patients.insert(p.patient_id.clone(), p);
        Ok(Applied::Changed)
    })
}

pub fn departments(st: &mut State, call: &Call) -> Result<Rendered, SimError> {
    batch(st, call, "departments", |org, d: hmr_protocol::Department, now| {
        validate::department(&d, now)?;
        // Held already, or accepted earlier in this batch (records apply in order).
        if let Some(parent) = &d.parent_code {
            if !org.departments.contains_key(parent) || parent == &d.dept_code {
                return Err(vec![FieldError::new("parentCode", "unknown-parent")]);
            }
        }
        if let Some(held) = org.departments.get(&d.dept_code) {
            if older(&d.updated_at, &held.updated_at) || held == &d {
                return Ok(Applied::Unchanged);
            }
        }
        org.departments.insert(d.dept_code.clone(), d);
        Ok(Applied::Changed)
    })
}

pub fn staff(st: &mut State, call: &Call) -> Result<Rendered, SimError> {
    batch(st, call, "staff", |org, s: hmr_protocol::Staff, now| {
        validate::staff(&s, now)?;
        if !org.departments.contains_key(&s.dept_code) {
            return Err(vec![FieldError::new("deptCode", "unknown-dept")]);
        }
        if let Some(held) = org.staff.get(&s.staff_no) {
            if older(&s.updated_at, &held.updated_at) || held == &s {
                return Ok(Applied::Unchanged);
            }
        }
        org.staff.insert(s.staff_no.clone(), s);
        Ok(Applied::Changed)
    })
}

/// Reads the batch, then types, validates and applies each record on its own: a refused
/// record (even one with an unknown field) does not fail the others.
fn batch<T: DeserializeOwned>(
    st: &mut State,
    call: &Call,
    what: &str,
    mut apply: impl FnMut(&mut OrgData, T, &DateTime<FixedOffset>) -> Outcome,
) -> Result<Rendered, SimError> {
    let value = wire::json_value(call.headers, call.body)?;
    let batch: Batch<Value> = wire::typed(value)?;
    if batch.records.len() > MAX_BATCH {
        return Err(SimError::TooLarge(format!(
            "{} records, at most {MAX_BATCH} per batch",
            batch.records.len()
        )));
    }
    if batch.records.is_empty() {
        return Err(SimError::invalid("records", "required"));
    }
    let org = st.org_mut(call.org);
    let (mut changed, mut unchanged, mut rejected) = (0, 0, 0);
    let mut results = Vec::with_capacity(batch.records.len());
    for (index, record) in batch.records.into_iter().enumerate() {
        let outcome = wire::typed::<T>(record).and_then(|r| apply(org, r, &call.now));
        let (status, errors) = match outcome {
            Ok(Applied::Changed) => {
                changed += 1;
                (RecordStatus::Accepted, vec![])
            }
            Ok(Applied::Unchanged) => {
                unchanged += 1;
                (RecordStatus::Accepted, vec![])
            }
            Err(errors) => {
                rejected += 1;
                (RecordStatus::Rejected, errors)
            }
        };
        results.push(RecordResult { index, status, errors });
    }
    let effect = if changed > 0 {
        Effect::Applied
    } else {
        Effect::Unchanged
    };
    let message = format!("{what}: {changed} applied, {unchanged} unchanged, {rejected} rejected");
    let answer = BatchAnswer { results };
    let mut a = Rendered::ok(&answer, effect, message);
    a.results = Some(answer.results);
    Ok(a)
}

/// Strictly older: only such a record is ignored (equal times apply).
fn older(new: &str, held: &str) -> bool {
    match (parse_time(new), parse_time(held)) {
        (Some(n), Some(h)) => n < h,
        _ => false,
    }
}
