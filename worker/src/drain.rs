//! Draining: turns claimed events into platform requests and records how each ended.
//!
//! Reports go one per request, with their requests frozen in the event before the first
//! is sent, so a retry (after a crash, a timeout, a lost answer) sends the same bytes
//! under the same request id. Master data goes in batches whose request id is derived
//! from the events and the body.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use hmr_protocol::paths;
use hmr_protocol::source;
use hmr_protocol::{BatchAnswer, FieldError, Kind, Outcome, RecordStatus};
use rand::Rng;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::config::Config;
use crate::error::WorkerError;
use crate::plan::{
    self, Dependency, Ending, ItemCode, Master, MasterSend, Plan, Quarantine, Reference, ReportFacts, Rules, Verdict,
};
use crate::platform::Platform;
use crate::store::{Delivered, Event, Finish, PdfNames, ReportInput, Store};

use crate::plan::request_id;

pub struct Drainer {
    pub store: Arc<Store>,
    pub platform: Arc<Platform>,
    pub config: Arc<Config>,
    /// Renders report PDFs when the source has none (`pdf.render`).
    pub pdf_renderer: Option<Arc<hmr_pdf::Renderer>>,
}

/// Keys whose source read failed, with the error.
type Failed = HashMap<String, String>;

/// What happened to one event in a round.
enum Step {
    Finished(Finish),
    Rescheduled,
    Quarantined,
}

impl Drainer {
    /// One round: claim a batch, deliver it, record the outcomes. Returns events claimed.
    /// `going_to_sleep`: see `Store::claim`.
    pub async fn round(&self, going_to_sleep: Option<Duration>) -> Result<usize, WorkerError> {
        let events = self.store.claim(self.config.worker.batch_size, going_to_sleep).await?;
        let claimed = events.len();
        if claimed == 0 {
            return Ok(0);
        }
        // Dependencies first: departments before staff, patients before reports (the
        // order of `Kind`).
        let mut by_kind: Vec<(Kind, Vec<Event>)> = Vec::new();
        for e in events {
            match by_kind.iter_mut().find(|(k, _)| *k == e.kind) {
                Some((_, list)) => list.push(e),
                None => by_kind.push((e.kind, vec![e])),
            }
        }
        by_kind.sort_by_key(|(k, _)| *k);
        for (kind, events) in by_kind {
            if kind.is_master_data() {
                self.master_data(kind, events).await?
            } else {
                self.reports(kind, events).await?
            }
        }
        Ok(claimed)
    }

    /// Reports and decisions, one request each, many in flight. What they need from the
    /// database is read for the whole batch at once; finished events are recorded in groups
    /// as they complete, so a slow one (a hanging request) does not keep the others claimed.
    async fn reports(&self, kind: Kind, events: Vec<Event>) -> Result<(), WorkerError> {
        let (mut inputs, failed) = if kind == Kind::Decision {
            (HashMap::new(), HashMap::new())
        } else {
            self.prefetch(kind, &events).await?
        };
        let ready = self.hold_failed(events, &failed).await?;
        let names = if self.pdf_renderer.is_some() && kind != Kind::Decision {
            self.store
                .pdf_names(inputs.values().filter_map(|i| i.row.as_ref()))
                .await
        } else {
            PdfNames::default()
        };
        let names = &names;
        let mut done = stream::iter(ready)
            .map(|e| {
                let input = inputs.remove(&e.key).unwrap_or_default();
                async move {
                    let (id, attempts, kind) = (e.id, e.attempts, e.kind);
                    match self.report(e, input, names).await {
                        // One report's source failing holds back that report only.
                        Err(error) if error.is_source_error() && !self.store.is_closed() => {
                            self.source_failed_id(id, attempts, kind, &error.to_string()).await
                        }
                        other => other,
                    }
                }
            })
            .buffer_unordered(self.config.worker.concurrency.max(1))
            .ready_chunks(256);
        let mut first_error = None;
        while let Some(results) = done.next().await {
            let mut finished = Vec::new();
            for result in results {
                match result {
                    Ok(Step::Finished(f)) => finished.push(f),
                    Ok(_) => {}
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            self.store.finish(kind, &finished).await?;
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Source rows, items, delivery state and the referenced patients of a batch of reports;
    /// and the reports whose source failed to read, with the error. A failing batch read is
    /// read again one report at a time, so one bad row holds back only its own report.
    async fn prefetch(
        &self,
        kind: Kind,
        events: &[Event],
    ) -> Result<(HashMap<String, ReportInput>, Failed), WorkerError> {
        let keys: Vec<String> = events
            .iter()
            .filter(|e| e.plan.is_none())
            .map(|e| e.key.clone())
            .collect();
        if keys.is_empty() {
            return Ok((HashMap::new(), HashMap::new()));
        }
        self.read_each(&keys, |keys| async move { self.store.report_inputs(kind, &keys).await })
            .await
    }

    /// Reads `keys` in one go with `read`; when that fails on a source error, one key at a
    /// time, so that only the keys that fail wait (returned with their error).
    async fn read_each<V, F, Fut>(&self, keys: &[String], read: F) -> Result<(HashMap<String, V>, Failed), WorkerError>
    where
        F: Fn(Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Result<HashMap<String, V>, WorkerError>>,
    {
        match read(keys.to_vec()).await {
            Ok(all) => Ok((all, HashMap::new())),
            Err(e) if e.is_source_error() && !self.store.is_closed() => {
                let mut found = HashMap::new();
                let mut failed = HashMap::new();
                for key in keys {
                    match read(vec![key.clone()]).await {
                        Ok(one) => found.extend(one),
                        Err(e) if e.is_source_error() && !self.store.is_closed() => {
                            failed.insert(key.clone(), e.to_string());
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok((found, failed))
            }
            Err(e) => Err(e),
        }
    }

    /// The events whose source read failed wait (`source_failed`); the others are returned.
    async fn hold_failed(&self, events: Vec<Event>, failed: &Failed) -> Result<Vec<Event>, WorkerError> {
        let mut ready = Vec::with_capacity(events.len());
        for event in events {
            match failed.get(&event.key) {
                Some(error) => {
                    self.source_failed(&event, error).await?;
                }
                None => ready.push(event),
            }
        }
        Ok(ready)
    }

    /// A record whose source could not be read: it backs off with the view's error in
    /// `last_error` (and so shows in hmr.stuck_records); the others go on.
    async fn source_failed(&self, event: &Event, error: &str) -> Result<Step, WorkerError> {
        self.source_failed_id(event.id, event.attempts, event.kind, error).await
    }

    async fn source_failed_id(&self, id: i64, attempts: i32, kind: Kind, error: &str) -> Result<Step, WorkerError> {
        self.store
            .metrics()
            .source_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let message = format!(
            "reading the source of {kind} ({}): {error}",
            self.store.source_names(kind)
        );
        tracing::warn!(%kind, event = id, attempts, error = %message, "source read failed; the event waits");
        self.store.reschedule(&[id], self.backoff(attempts), &message).await?;
        Ok(Step::Rescheduled)
    }

    fn now(&self) -> chrono::DateTime<chrono::FixedOffset> {
        hmr_protocol::checks::china_now()
    }

    /// Exponential backoff with jitter: base·2^(attempts−1), capped, then 50–100 % of it.
    fn backoff(&self, attempts: i32) -> Duration {
        let w = &self.config.worker;
        let exp = w
            .backoff_base_ms
            .saturating_mul(1u64 << attempts.clamp(1, 20).saturating_sub(1) as u32);
        let capped = exp.min(w.backoff_max_ms);
        Duration::from_millis(rand::thread_rng().gen_range(capped / 2..=capped.max(1)))
    }

    // ------------------------------------------------------------------ reports

    /// `input`: the report's rows as read for its batch (unused once the plan is frozen).
    async fn report(&self, event: Event, input: ReportInput, names: &PdfNames) -> Result<Step, WorkerError> {
        let plan = match &event.plan {
            Some(frozen) => Plan::thaw(frozen, event.plan_pdf.as_ref())
                .map_err(|e| WorkerError::Answer(format!("event {}: unreadable frozen plan: {e}", event.id)))?,
            None => {
                let decision = if event.kind == Kind::Decision {
                    // Read the check first (§6): decisions taken on the platform's page are
                    // adopted, and only the HIS's others are uploaded with them.
                    let read = match self.read_check(&event.key).await? {
                        CheckRead::Failed(outcome) => return self.settle_failure(&event, outcome).await,
                        read => read,
                    };
                    let decisions = self.store.decisions(&event.key).await?;
                    match plan::decisions(decisions, &self.rules()) {
                        // Decided wholly on the page: the platform holds the decisions; only the
                        // recognised reports are fetched and kept.
                        Verdict::Send(plan) if matches!(read, CheckRead::DecidedOnPage) => {
                            match plan::retain_only(plan) {
                                Some(plan) => Verdict::Send(plan),
                                None => Verdict::Finish(Ending::Unchanged, "decided on the page"),
                            }
                        }
                        other => other,
                    }
                } else {
                    let facts = self.report_facts(&event, input, names).await?;
                    let rules = Rules {
                        renderer: self.pdf_renderer.as_deref(),
                        ..self.rules()
                    };
                    plan::report(facts, &rules)
                };
                let plan = match decision {
                    Verdict::Send(plan) => plan,
                    other => return self.carry_out(&event, other).await,
                };
                let (frozen, pdf) = plan.freeze();
                if !self.store.save_plan(event.id, &frozen, pdf.as_deref()).await? {
                    // Another worker took the event (our lease expired): it sends, not us.
                    tracing::info!(event = event.id, "lease lost before sending");
                    return Ok(Step::Rescheduled);
                }
                plan
            }
        };
        let steps = plan.requests.len();
        for (index, request) in plan.requests.iter().enumerate().skip(event.step.max(0) as usize) {
            let id = plan.request_id(event.id, event.generation, index);
            let (outcome, answer) = self.platform.execute(request, id).await;
            if let Some(Some((report_id, format))) = plan.retain.get(index) {
                // A recognised report: keep what the platform gives; a missing file (404) or a
                // refusal does not undo the delivered decision.
                match outcome {
                    Outcome::Done => {
                        let body = answer.map(|a| a.body).unwrap_or_default();
                        let bytes = if format == "json" {
                            hmr_protocol::envelope::parse_data::<Value>(&body)
                                .map(|v| serde_json::to_vec(&v).unwrap_or_default())
                                .unwrap_or(body)
                        } else {
                            body
                        };
                        self.store.retain_report(report_id, format, &bytes, &event.key).await?;
                    }
                    Outcome::Retry { .. } | Outcome::RefreshToken => return self.settle_failure(&event, outcome).await,
                    Outcome::MissingDependency { .. } | Outcome::Permanent { .. } => {
                        tracing::info!(report = %report_id, format = %format, "recognised report not downloadable");
                    }
                }
                if index + 1 < steps {
                    self.store.save_step(event.id, index as i32 + 1).await?;
                }
                continue;
            }
            match outcome {
                // Remember progress between steps (data, then PDF): a retry starts at the PDF.
                Outcome::Done if index + 1 < steps => self.store.save_step(event.id, index as i32 + 1).await?,
                Outcome::Done => {}
                other => return self.settle_failure(&event, other).await,
            }
        }
        tracing::debug!(kind = %event.kind, key = %event.key, version = plan.version, "delivered");
        Ok(Step::Finished(Finish {
            id: event.id,
            outcome: "delivered",
            delivered: Some(Delivered {
                version: plan.version,
                content_hash: plan.content_hash,
                revoked: plan.revoked,
            }),
            // Counted apart in the upload statistics (hmr.upload_stats).
            detail: plan.revoked.then(|| "revoke".to_string()),
        }))
    }

    /// The rules' settings (no renderer: reports add theirs).
    fn rules(&self) -> Rules<'_> {
        Rules {
            now: self.now(),
            revoke_operator_no: &self.config.platform.revoke_operator_no,
            max_dependency_attempts: self.config.worker.max_dependency_attempts,
            renderer: None,
        }
    }

    /// Reads what a report's delivery depends on beyond its batch's read: the un-audit the
    /// source records (only when there is something to revoke), the item map, the patient's
    /// state (only when the batch's read did not find it held), the source's own PDF.
    async fn report_facts(
        &self,
        event: &Event,
        input: ReportInput,
        names: &PdfNames,
    ) -> Result<ReportFacts, WorkerError> {
        let row = match input.row {
            Some(Value::Object(row)) => Some(row),
            _ => None,
        };
        let mut facts = ReportFacts {
            kind: event.kind,
            key: event.key.clone(),
            row: None,
            items: input.items,
            held: input.held,
            revocation: None,
            item_code: ItemCode::AsSource,
            patient: Dependency::Held,
            source_pdf: None,
            pdf: None,
            attempts: event.attempts,
        };
        let Some(row) = row else {
            if facts.held.as_ref().is_some_and(|h| !h.revoked) {
                facts.revocation = self.store.revocation(event.kind, &event.key).await?;
            }
            return Ok(facts);
        };
        facts.item_code = self.item_code(event, &row).await?;
        if !input.patient_held {
            if let Some(patient) = ReportFacts::patient_id(&row) {
                // Read again: it may have been delivered since the batch's read.
                facts.patient = self.dependency_state(Kind::Patient, patient).await?;
            }
        }
        facts.source_pdf = self.source_pdf(event.kind, &event.key, &row).await?;
        if facts.source_pdf.is_none() && self.pdf_renderer.is_some() {
            facts.pdf = Some(self.pdf_context(&row, names));
        }
        facts.row = Some(row);
        Ok(facts)
    }

    /// Whether the platform holds a record this one needs; if not, whether it is quarantined,
    /// on its way (in its source view) or absent. A source that cannot be read counts as on
    /// its way: the record waits rather than being refused for a read error.
    async fn dependency_state(&self, kind: Kind, key: &str) -> Result<Dependency, WorkerError> {
        let keys = [key.to_string()];
        if !self.store.delivered(kind, &keys).await?.is_empty() {
            return Ok(Dependency::Held);
        }
        if self.store.is_quarantined(kind, key).await? {
            return Ok(Dependency::Quarantined);
        }
        Ok(match self.store.source_rows(kind, &keys).await {
            Ok(rows) if rows.is_empty() => Dependency::Absent,
            Ok(_) => Dependency::Missing,
            Err(e) if e.is_source_error() && !self.store.is_closed() => Dependency::Missing,
            Err(e) => return Err(e),
        })
    }

    /// Carries out a decision that sends nothing now.
    async fn carry_out<S>(&self, event: &Event, decision: Verdict<S>) -> Result<Step, WorkerError> {
        match decision {
            Verdict::Send(_) => unreachable!("sent by the caller"),
            Verdict::Finish(ending, detail) => Ok(Step::Finished(self.finished(event, ending.as_str(), detail))),
            Verdict::Quarantine(q) => {
                tracing::warn!(kind = %event.kind, event = event.id, field = %q.field, reason = %q.reason, "quarantined");
                self.store.quarantine(event.id, &q).await?;
                Ok(Step::Quarantined)
            }
            Verdict::Wait(kind, key) => {
                self.store.ensure_enqueued(kind, &key).await?;
                // Short first waits: the dependency is usually delivered within one round.
                let delay = Duration::from_millis(100)
                    .saturating_mul(event.attempts.max(1) as u32)
                    .min(self.backoff(event.attempts));
                self.store
                    .reschedule(&[event.id], delay, &format!("waiting for {kind} {key}"))
                    .await?;
                Ok(Step::Rescheduled)
            }
        }
    }

    /// What a rendered PDF prints beyond the report: the names the source view gives in its
    /// optional columns (`dept_name`, `request_doctor_name`, `tester_name`, `auditor_name`,
    /// `reporter_name`, `received_at`), else those looked up in the patient, department and
    /// staff views for the batch; the hospital's name and 互认 statement.
    fn pdf_context(&self, row: &Map<String, Value>, names: &PdfNames) -> hmr_pdf::Context {
        let text = |column: &str| {
            row.get(column)
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let staff = |name_column: &str, no_column: &str| {
            text(name_column).or_else(|| text(no_column).and_then(|no| names.staff.get(&no).cloned()))
        };
        let patient = text("patient_id").and_then(|p| names.patients.get(&p));
        let statement = self.config.pdf.recognition_statement.trim();
        hmr_pdf::Context {
            hospital_name: self.config.pdf.hospital_name.clone(),
            department_name: text("dept_name")
                .or_else(|| text("dept_code").and_then(|d| names.departments.get(&d).cloned())),
            gender: None,
            gender_code: text("gender_code").or_else(|| patient.and_then(|p| p.0.clone())),
            age: None,
            birth_date: text("birth_date").or_else(|| patient.and_then(|p| p.1.clone())),
            request_doctor_name: staff("request_doctor_name", "request_doctor_no"),
            tester_name: staff("tester_name", "tester_no"),
            auditor_name: staff("auditor_name", "auditor_no"),
            reporter_name: staff("reporter_name", "reporter_no"),
            received_at: text("received_at"),
            recognition_statement: (!statement.is_empty()).then(|| statement.to_string()),
        }
    }

    /// A PDF the source supplies: a `pdf` bytea column, or a `pdf_path` the worker can read.
    async fn source_pdf(
        &self,
        kind: Kind,
        key: &str,
        row: &Map<String, Value>,
    ) -> Result<Option<Vec<u8>>, WorkerError> {
        if row.get("pdf").is_some_and(|v| !v.is_null()) {
            return self.store.source_pdf(kind, key).await;
        }
        match row.get("pdf_path").and_then(Value::as_str) {
            Some(path) => std::fs::read(path)
                .map(Some)
                .map_err(|e| WorkerError::Source(format!("cannot read the report's pdf_path {path}: {e}"))),
            None => Ok(None),
        }
    }

    /// The platform's item code for a source that gives a local code (`local_item_code`)
    /// and no `data_code`, through `hmr.item_map`; an unmapped code is recorded for the DBA,
    /// with the kind's policy (hold or send).
    async fn item_code(&self, event: &Event, row: &Map<String, Value>) -> Result<ItemCode, WorkerError> {
        if row.get("data_code").is_some_and(|v| !v.is_null()) {
            return Ok(ItemCode::AsSource);
        }
        let Some(local) = row.get("local_item_code").and_then(Value::as_str) else {
            return Ok(ItemCode::AsSource);
        };
        let Some(report_type) = event.kind.report_type() else {
            return Ok(ItemCode::AsSource);
        };
        let name = row.get("local_item_name").and_then(Value::as_str);
        let (code, hold) = self
            .store
            .map_item(report_type.as_str(), local, name, event.kind, &event.key)
            .await?;
        Ok(match code {
            Some(code) => ItemCode::Mapped(code),
            None => ItemCode::Unmapped {
                local: local.to_string(),
                hold,
            },
        })
    }

    /// A record needed first (a staff member's department, a department's parent, the
    /// platform says it lacks).
    async fn wait_for_dependency(&self, event: &Event, on: &Reference) -> Result<Step, WorkerError> {
        let state = self.dependency_state(on.kind, &on.key).await?;
        let decision: Verdict<()> = plan::dependency(on, state, event.attempts, &self.rules());
        self.carry_out(event, decision).await
    }

    /// Reads a check's decisions from the platform (§6 GET, a fresh request id per read as the
    /// contract asks of polls) and adopts those taken on the page.
    async fn read_check(&self, check_id: &str) -> Result<CheckRead, WorkerError> {
        let request = hmr_protocol::paths::check_decisions(check_id);
        let (outcome, answer) = self.platform.execute(&request, uuid::Uuid::new_v4()).await;
        match outcome {
            Outcome::Done => {}
            failed @ (Outcome::Retry { .. } | Outcome::RefreshToken) => return Ok(CheckRead::Failed(failed)),
            // Unknown to the platform (expired after 7 days): the upload says what it makes of it.
            Outcome::MissingDependency { .. } | Outcome::Permanent { .. } => return Ok(CheckRead::Unknown),
        }
        let body = answer.map(|a| a.body).unwrap_or_default();
        let Ok(read) = hmr_protocol::envelope::parse_data::<hmr_protocol::CheckDecisions>(&body) else {
            return Ok(CheckRead::Unknown);
        };
        let adopted = self.store.adopt_page_decisions(&read).await?;
        if adopted > 0 {
            tracing::info!(check = %check_id, adopted, "decisions taken on the page adopted");
        }
        let on_page = |d: &hmr_protocol::CheckDecision| d.source == hmr_protocol::DecisionSource::Page;
        Ok(if read.complete && read.decisions.iter().all(on_page) {
            CheckRead::DecidedOnPage
        } else {
            CheckRead::Read
        })
    }

    async fn settle_failure(&self, event: &Event, outcome: Outcome) -> Result<Step, WorkerError> {
        match outcome {
            Outcome::Done => unreachable!("handled by the caller"),
            Outcome::Retry { after, reason } => {
                let delay = after.unwrap_or_else(|| self.backoff(event.attempts));
                tracing::info!(kind = %event.kind, event = event.id, attempts = event.attempts, ?delay, %reason, "retry later");
                self.store.reschedule(&[event.id], delay, &reason).await?;
                Ok(Step::Rescheduled)
            }
            Outcome::RefreshToken => {
                self.store
                    .reschedule(&[event.id], self.backoff(event.attempts), "token refused")
                    .await?;
                Ok(Step::Rescheduled)
            }
            Outcome::MissingDependency { reason } => {
                // Our record of the patient is stale (the platform lost it, or it was never
                // sent): send it again, then this report.
                if let Some(Value::Object(row)) = self
                    .store
                    .source_rows(event.kind, std::slice::from_ref(&event.key))
                    .await?
                    .remove(&event.key)
                {
                    if let Some(pid) = ReportFacts::patient_id(&row) {
                        self.store.forget_delivered(Kind::Patient, pid).await?;
                        self.store.ensure_enqueued(Kind::Patient, pid).await?;
                    }
                }
                if event.attempts >= self.config.worker.max_dependency_attempts {
                    self.store
                        .quarantine(event.id, &Quarantine::new("patient_id", "not-found", &reason))
                        .await?;
                    return Ok(Step::Quarantined);
                }
                self.store
                    .reschedule(&[event.id], self.backoff(event.attempts), &format!("404: {reason}"))
                    .await?;
                Ok(Step::Rescheduled)
            }
            // Decided otherwise on the page after this upload was planned: adopt the page's
            // decisions and plan the upload again (never a blocked save).
            Outcome::Permanent {
                status: 409, errors, ..
            } if event.kind == Kind::Decision && errors.iter().any(|e| e.reason == "already-decided") => {
                match self.read_check(&event.key).await? {
                    CheckRead::Failed(_) => {
                        // Read it at the next attempt (the frozen plan meets the 409 again).
                        self.store
                            .reschedule(
                                &[event.id],
                                self.backoff(event.attempts),
                                "409 already-decided; the check could not be read",
                            )
                            .await?;
                        return Ok(Step::Rescheduled);
                    }
                    CheckRead::DecidedOnPage => {
                        return self
                            .carry_out::<Plan>(event, Verdict::Finish(Ending::Unchanged, "decided on the page"))
                            .await
                    }
                    CheckRead::Read | CheckRead::Unknown => {}
                }
                tracing::info!(check = %event.key, "decided otherwise on the page: planned again with the page's decisions");
                self.store
                    .replan(event.id, "409 already-decided: the page's decisions adopted")
                    .await?;
                Ok(Step::Rescheduled)
            }
            // The platform refused the doctor's decisions (the report was revoked, superseded
            // or expired since the check): nothing for the DBA to fix. The check is marked
            // refused, its decisions stop counting, and the doctor's next save asks again.
            Outcome::Permanent {
                status: 409,
                code,
                message,
                errors,
            } if event.kind == Kind::Decision => {
                let why = errors
                    .first()
                    .map_or_else(|| format!("{code} {message}"), |e| format!("{}: {}", e.field, e.reason));
                tracing::warn!(check = %event.key, reason = %why, "the platform refused the decisions");
                self.store.refuse_check(&event.key, &why).await?;
                Ok(Step::Finished(self.finished(event, "refused", &why)))
            }
            Outcome::Permanent {
                status,
                code,
                message,
                errors,
            } => {
                let q = Quarantine::refused(event.kind, status, &code, &message, &errors);
                tracing::warn!(kind = %event.kind, event = event.id, status, %code, field = %q.field, reason = %q.reason, "quarantined");
                self.store.quarantine(event.id, &q).await?;
                Ok(Step::Quarantined)
            }
        }
    }

    fn finished(&self, event: &Event, outcome: &'static str, detail: &str) -> Finish {
        Finish {
            id: event.id,
            outcome,
            delivered: None,
            detail: Some(detail.into()),
        }
    }

    /// Asks again about kept reports of other hospitals: one revoked at its source since is
    /// marked, so `hmr_download_report` refuses it (HM009).
    pub async fn recheck_retained(&self, every: Duration) -> Result<(), WorkerError> {
        for report_id in self.store.retained_to_recheck(every, 500).await? {
            // A GET is a new request each time (a reused id would replay the first answer).
            let (outcome, _) = self
                .platform
                .execute(&paths::download(&report_id, "json"), Uuid::new_v4())
                .await;
            match outcome {
                Outcome::Done => self.store.retained_rechecked(&report_id, None).await?,
                Outcome::Permanent {
                    status: 409,
                    message,
                    errors,
                    ..
                } if errors.iter().any(|e| e.reason == "revoked") => {
                    tracing::warn!(report = %report_id, "a kept report was revoked at its source");
                    self.store.retained_rechecked(&report_id, Some(&message)).await?;
                }
                // Unavailable now, or refused otherwise: asked again next time.
                _ => {}
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------ master data

    /// Patients, departments, staff: read all rows at once, skip unchanged, send the rest in
    /// batches and settle each record by the platform's per-record answer.
    async fn master_data(&self, kind: Kind, events: Vec<Event>) -> Result<(), WorkerError> {
        let keys: Vec<String> = events.iter().map(|e| e.key.clone()).collect();
        let (rows, failed) = self
            .read_each(&keys, |keys| async move { self.store.source_rows(kind, &keys).await })
            .await?;
        let events = self.hold_failed(events, &failed).await?;
        let held = self.store.delivered(kind, &keys).await?;
        let rules = self.rules();
        let mut finished = Vec::new();
        let mut built: Vec<(Event, Result<Master, hmr_protocol::ProtocolError>)> = Vec::new();
        for event in events {
            let Some(Value::Object(row)) = rows.get(&event.key) else {
                finished.push(self.finished(&event, "skipped", "not in the source view"));
                continue;
            };
            let record = Master::build(kind, row, &rules.now, &self.config.platform.campus_codes);
            built.push((event, record));
        }
        // The records they name (departments): held, quarantined, on their way or absent. A
        // parent in this batch goes first in it (`parents_first`): the platform accepts that.
        let in_batch: std::collections::HashSet<String> = built
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(e, _)| e.key.clone())
            .collect();
        let mut states: HashMap<(Kind, String), Dependency> = HashMap::new();
        for on in built
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok().and_then(Master::depends_on))
        {
            if on.kind == kind && in_batch.contains(&on.key) {
                states.insert((on.kind, on.key), Dependency::Held);
            } else if let std::collections::hash_map::Entry::Vacant(e) = states.entry((on.kind, on.key.clone())) {
                e.insert(self.dependency_state(on.kind, &on.key).await?);
            }
        }
        let mut to_send: Vec<(Event, MasterSend)> = Vec::new();
        for (event, record) in built {
            let depends = record
                .as_ref()
                .ok()
                .and_then(Master::depends_on)
                .map(|on| states[&(on.kind, on.key)]);
            match plan::master(record, kind, held.get(&event.key), depends, event.attempts, &rules) {
                Verdict::Send(send) => to_send.push((event, send)),
                Verdict::Finish(ending, detail) => finished.push(self.finished(&event, ending.as_str(), detail)),
                other => {
                    self.carry_out(&event, other).await?;
                }
            }
        }
        self.store.finish(kind, &finished).await?;
        let to_send = plan::parents_first(to_send, |(_, s)| &s.record);

        let mut chunks: Vec<Vec<(Event, MasterSend)>> = Vec::new();
        for item in to_send {
            match chunks.last_mut() {
                Some(c) if c.len() < hmr_protocol::checks::MAX_BATCH => c.push(item),
                _ => chunks.push(vec![item]),
            }
        }
        // Departments one batch after the other: a parent sent in an earlier batch must have
        // arrived before its children's batch.
        let concurrency = if kind == Kind::Department {
            1
        } else {
            self.config.worker.concurrency.clamp(1, 4)
        };
        let results: Vec<Result<(), WorkerError>> = stream::iter(chunks)
            .map(|chunk| self.send_batch(kind, chunk))
            .buffer_unordered(concurrency)
            .collect()
            .await;
        results.into_iter().collect()
    }

    async fn send_batch(&self, kind: Kind, chunk: Vec<(Event, MasterSend)>) -> Result<(), WorkerError> {
        let request = Master::batch_request(chunk.iter().map(|(_, s)| &s.record));
        // Derived from the events (with their attempt, since a record the platform refused
        // for a missing department is sent again after it) and the body: a lost answer is
        // replayed, and a re-send of master data is an upsert with no second effect.
        let ids: Vec<String> = chunk
            .iter()
            .map(|(e, _)| format!("{}.{}.{}", e.id, e.generation, e.attempts))
            .collect();
        let body_hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&request.body));
        let id = request_id(&format!("{kind}:{}:{body_hash}", ids.join(",")));
        let (outcome, answer) = self.platform.execute(&request, id).await;
        let event_ids: Vec<i64> = chunk.iter().map(|(e, _)| e.id).collect();
        let max_attempts = chunk.iter().map(|(e, _)| e.attempts).max().unwrap_or(1);
        match outcome {
            Outcome::Done => {
                let answer: BatchAnswer =
                    match hmr_protocol::envelope::parse_data(&answer.map(|a| a.body).unwrap_or_default()) {
                        Ok(a) => a,
                        Err(e) => {
                            // Not an answer we can settle records by: the batch goes again
                            // (same events, same body: the same request id, replayed).
                            self.store
                                .metrics()
                                .unexpected_answers
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let reason = format!("unreadable {kind} batch answer: {e}");
                            tracing::warn!(%kind, events = event_ids.len(), %reason, "batch retry later");
                            self.store
                                .reschedule(&event_ids, self.backoff(max_attempts), &reason)
                                .await?;
                            return Ok(());
                        }
                    };
                let mut finished = Vec::new();
                for (index, (event, send)) in chunk.iter().enumerate() {
                    match answer.results.iter().find(|r| r.index == index) {
                        Some(r) if r.status == RecordStatus::Accepted => finished.push(Finish {
                            id: event.id,
                            outcome: "delivered",
                            delivered: Some(Delivered {
                                version: send.version,
                                content_hash: send.hash.clone(),
                                revoked: false,
                            }),
                            detail: None,
                        }),
                        Some(r) => {
                            let first = r
                                .errors
                                .first()
                                .cloned()
                                .unwrap_or_else(|| FieldError::new("", "rejected"));
                            if let (Some(on), "unknown-dept" | "unknown-parent") =
                                (send.record.depends_on(), first.reason.as_str())
                            {
                                // Our record of the department is stale (or it was refused in
                                // this batch): send it again first, or wait with it.
                                self.store.forget_delivered(on.kind, &on.key).await?;
                                self.wait_for_dependency(event, &on).await?;
                                continue;
                            }
                            let column = source::column_for_field(kind.as_str(), &first.field);
                            let message = format!("rejected by the platform: {}", FieldError::join(&r.errors));
                            self.store
                                .quarantine(event.id, &Quarantine::new(column, &first.reason, message))
                                .await?;
                        }
                        None => {
                            self.store
                                .reschedule(&[event.id], self.backoff(event.attempts), "no result for record")
                                .await?;
                        }
                    }
                }
                self.store.finish(kind, &finished).await?;
            }
            Outcome::Permanent {
                status,
                code,
                message,
                errors,
            } => {
                let q = Quarantine::refused(kind, status, &code, &message, &errors);
                for event_id in event_ids {
                    self.store.quarantine(event_id, &q).await?;
                }
            }
            Outcome::Retry { after, reason } => {
                let delay = after.unwrap_or_else(|| self.backoff(max_attempts));
                tracing::info!(%kind, events = event_ids.len(), ?delay, %reason, "batch retry later");
                self.store.reschedule(&event_ids, delay, &reason).await?;
            }
            Outcome::RefreshToken | Outcome::MissingDependency { .. } => {
                self.store
                    .reschedule(
                        &event_ids,
                        self.backoff(max_attempts),
                        "platform answered 401/404 to a batch",
                    )
                    .await?;
            }
        }
        Ok(())
    }
}

/// What reading a check on the platform (§6) found.
enum CheckRead {
    /// Read; the page's decisions (if any) adopted.
    Read,
    /// Every matched order was decided on the page: the platform holds them, nothing to upload.
    DecidedOnPage,
    /// The platform does not know the check (or answered what cannot be read).
    Unknown,
    /// Could not be read now: try later.
    Failed(Outcome),
}
