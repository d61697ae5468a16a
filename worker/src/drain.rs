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
use hmr_protocol::paths::{self, Request};
use hmr_protocol::source;
use hmr_protocol::{
    validate, BatchAnswer, Department, ExamReport, FieldError, LabReport, Outcome, Patient, ProtocolError,
    RecordStatus, ReportType, Revoke, Staff,
};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::config::Config;
use crate::error::WorkerError;
use crate::platform::Platform;
use crate::store::{Delivered, Event, Finish, ReportInput, Store};

/// Namespace of request ids: UUIDv5 of the event, its retry generation and the step.
const REQUEST_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a8f_4c1e_9b2d_4e57_a3c0_5d1f_7e92_b604);

/// `last_error` of an event quarantined behind a quarantined dependency: the prefix, then
/// `kind:key` of the dependency (the finish statement releases it when that is delivered).
pub const DEPENDENCY_PREFIX: &str = "waiting for quarantined ";

pub fn request_id(name: &str) -> Uuid {
    Uuid::new_v5(&REQUEST_ID_NAMESPACE, name.as_bytes())
}

/// The frozen requests of one report event, and what the platform holds once they succeed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Plan {
    requests: Vec<Request>,
    version: i32,
    content_hash: String,
    revoked: bool,
    /// For download steps: the report id and format whose answer is kept.
    #[serde(default)]
    keep: Vec<Option<(String, String)>>,
}

impl Plan {
    /// The request that uploads a PDF: its body is frozen as bytes beside the plan (in
    /// `plan_pdf`), not hex-encoded inside it.
    fn pdf_step(&self) -> Option<usize> {
        self.requests
            .iter()
            .position(|r| r.content_type.as_deref() == Some(paths::CONTENT_PDF))
    }

    /// The plan as frozen: JSON without the PDF body, and the PDF body.
    fn freeze(&self) -> (Value, Option<Vec<u8>>) {
        let mut stored = self.clone();
        let pdf = stored.pdf_step().map(|i| std::mem::take(&mut stored.requests[i].body));
        (serde_json::to_value(&stored).expect("plans serialize"), pdf)
    }

    fn thaw(frozen: &Value, pdf: Option<&Vec<u8>>) -> Result<Plan, String> {
        let mut plan: Plan = serde_json::from_value(frozen.clone()).map_err(|e| e.to_string())?;
        if let Some(i) = plan.pdf_step() {
            if plan.requests[i].body.is_empty() {
                plan.requests[i].body = pdf.cloned().ok_or("the frozen PDF is missing")?;
            }
        }
        Ok(plan)
    }
}

pub struct Drainer {
    pub store: Arc<Store>,
    pub platform: Arc<Platform>,
    pub config: Arc<Config>,
    /// Renders report PDFs when the source has none (`pdf.render`).
    pub pdf_renderer: Option<Arc<hmr_pdf::Renderer>>,
}

/// Keys whose source read failed, with the error.
type Failed = HashMap<String, String>;

/// A rendered PDF, or why it could not be.
type Rendered = Option<Result<Vec<u8>, hmr_pdf::PdfError>>;

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
        // Dependencies first: departments before staff, patients before reports.
        let mut by_kind: Vec<(String, Vec<Event>)> = Vec::new();
        for e in events {
            match by_kind.iter_mut().find(|(k, _)| *k == e.kind) {
                Some((_, list)) => list.push(e),
                None => by_kind.push((e.kind.clone(), vec![e])),
            }
        }
        let rank = |k: &str| {
            ["department", "staff", "patient"]
                .iter()
                .position(|d| *d == k)
                .unwrap_or(3)
        };
        by_kind.sort_by_key(|(k, _)| rank(k));
        for (kind, events) in by_kind {
            match kind.as_str() {
                "patient" | "department" | "staff" => self.master_data(&kind, events).await?,
                _ => self.reports(&kind, events).await?,
            }
        }
        Ok(claimed)
    }

    /// Reports and decisions, one request each, many in flight. What they need from the
    /// database is read for the whole batch at once; finished events are recorded in groups
    /// as they complete, so a slow one (a hanging request) does not keep the others claimed.
    async fn reports(&self, kind: &str, events: Vec<Event>) -> Result<(), WorkerError> {
        let (mut inputs, failed) = if kind == "decision" {
            (HashMap::new(), HashMap::new())
        } else {
            self.prefetch(kind, &events).await?
        };
        let ready = self.hold_failed(events, &failed).await?;
        let mut done = stream::iter(ready)
            .map(|e| {
                let input = inputs.remove(&e.key).unwrap_or_default();
                async move {
                    let (id, attempts, kind) = (e.id, e.attempts, e.kind.clone());
                    match self.report(e, input).await {
                        // One report's source failing holds back that report only.
                        Err(error) if error.is_source_error() && !self.store.is_closed() => {
                            self.source_failed_id(id, attempts, &kind, &error.to_string()).await
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
        kind: &str,
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
        self.source_failed_id(event.id, event.attempts, &event.kind, error)
            .await
    }

    async fn source_failed_id(&self, id: i64, attempts: i32, kind: &str, error: &str) -> Result<Step, WorkerError> {
        self.store
            .metrics()
            .source_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let message = format!(
            "reading the source of {kind} ({}): {error}",
            self.store.source_names(kind)
        );
        tracing::warn!(kind, event = id, attempts, error = %message, "source read failed; the event waits");
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
    async fn report(&self, event: Event, input: ReportInput) -> Result<Step, WorkerError> {
        let plan = match &event.plan {
            Some(frozen) => Plan::thaw(frozen, event.plan_pdf.as_ref())
                .map_err(|e| WorkerError::Answer(format!("event {}: unreadable frozen plan: {e}", event.id)))?,
            None => {
                let built = if event.kind == "decision" {
                    self.build_decision_plan(&event).await?
                } else {
                    self.build_report_plan(&event, input).await?
                };
                let plan = match built {
                    Ok(plan) => plan,
                    Err(step) => return Ok(step),
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
            let id = request_id(&format!("{}:{}:{}", event.id, event.generation, index));
            let (outcome, answer) = self.platform.execute(request, id).await;
            if let Some(Some((report_id, format))) = plan.keep.get(index) {
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
                        self.store.keep_report(report_id, format, &bytes, &event.key).await?;
                    }
                    Outcome::Retry { .. } | Outcome::RefreshToken => return self.not_done(&event, outcome).await,
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
                other => return self.not_done(&event, other).await,
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
            detail: None,
        }))
    }

    /// The decisions of a check, once every matched order has one; then the recognised
    /// reports' downloads, kept in `hmr.retained_reports`.
    async fn build_decision_plan(&self, event: &Event) -> Result<Result<Plan, Step>, WorkerError> {
        let Some(decisions) = self.store.decisions(&event.key).await? else {
            return Ok(Err(Step::Finished(self.finished(
                event,
                "skipped",
                "no decisions recorded",
            ))));
        };
        if let Err(errors) = validate::decisions(&decisions, &self.now()) {
            return Ok(Err(self
                .quarantine_invalid(event, &ProtocolError::Invalid(errors))
                .await?));
        }
        let hash = source::content_hash(&decisions);
        let mut requests = vec![paths::decisions(&decisions)];
        let mut keep = vec![None];
        for d in decisions.decisions.iter().filter(|d| d.recognise) {
            for format in ["pdf", "json"] {
                requests.push(paths::download(&d.report_id, format));
                keep.push(Some((d.report_id.clone(), format.to_string())));
            }
        }
        Ok(Ok(Plan {
            requests,
            version: 1,
            content_hash: hash,
            revoked: false,
            keep,
        }))
    }

    /// Reads the report as it is now and decides: upload a new version, revoke the one the
    /// platform holds, or nothing. `Err` carries an event already dealt with.
    async fn build_report_plan(&self, event: &Event, input: ReportInput) -> Result<Result<Plan, Step>, WorkerError> {
        let row = input.row;
        let held = input.held;
        let report_type = if event.kind == "lab_report" {
            ReportType::Lab
        } else {
            ReportType::Exam
        };

        let Some(Value::Object(row)) = row else {
            // The report no longer qualifies (deleted, un-audited): revoke what the platform holds.
            return Ok(match held {
                Some(h) if !h.revoked => {
                    let said = self.store.revocation(&event.kind, &event.key).await?;
                    let revoke = Revoke {
                        version: h.version as u32,
                        reason: said
                            .as_ref()
                            .and_then(|r| r.reason.clone())
                            .unwrap_or_else(|| "取消审核".into()),
                        revoked_at: said
                            .as_ref()
                            .and_then(|r| r.revoked_at.clone())
                            .unwrap_or_else(|| hmr_protocol::checks::format_time(&self.now())),
                        operator_no: said
                            .and_then(|r| r.operator_no)
                            .unwrap_or_else(|| self.config.platform.revoke_operator_no.clone()),
                    };
                    Ok(Plan {
                        requests: vec![paths::revoke(report_type, &event.key, &revoke)],
                        version: h.version,
                        content_hash: h.content_hash,
                        revoked: true,
                        keep: vec![],
                    })
                }
                _ => Err(Step::Finished(self.finished(
                    event,
                    "skipped",
                    "not in the source view, nothing held",
                ))),
            });
        };

        let mut row = row;
        self.map_item_code(report_type, &event.key, &mut row).await?;
        let version = held.as_ref().map_or(1, |h| h.version + 1);
        let mut extra = Map::new();
        extra.insert("version".into(), json!(version));
        let built: Result<(Request, String, String, Rendered), ProtocolError> = if report_type == ReportType::Lab {
            let items: Vec<Value> = input
                .items
                .into_iter()
                .map(|i| match i {
                    Value::Object(m) => Value::Object(source::LAB_ITEM.to_fields(&m)),
                    other => other,
                })
                .collect();
            extra.insert("items".into(), Value::Array(items));
            source::LAB_REPORT.record::<LabReport>(&row, extra).and_then(|r| {
                validate::lab_report(&r, &self.now()).map_err(ProtocolError::Invalid)?;
                let pdf = self.pdf_renderer.as_ref().map(|p| p.lab(&r, &self.pdf_context()));
                Ok((
                    paths::lab_report(&r),
                    source::content_hash(&r),
                    r.patient_id.clone(),
                    pdf,
                ))
            })
        } else {
            source::EXAM_REPORT.record::<ExamReport>(&row, extra).and_then(|r| {
                validate::exam_report(&r, &self.now()).map_err(ProtocolError::Invalid)?;
                let pdf = self.pdf_renderer.as_ref().map(|p| p.exam(&r, &self.pdf_context()));
                Ok((
                    paths::exam_report(&r),
                    source::content_hash(&r),
                    r.patient_id.clone(),
                    pdf,
                ))
            })
        };
        let (request, hash, patient_id, rendered) = match built {
            Ok(b) => b,
            Err(e) => return Ok(Err(self.quarantine_invalid(event, &e).await?)),
        };
        if let Some(h) = &held {
            if h.content_hash == hash && !h.revoked {
                return Ok(Err(Step::Finished(self.finished(
                    event,
                    "unchanged",
                    "same content as delivered",
                ))));
            }
        }
        // The platform refuses a report whose patient it has not received: send it first.
        // (Read again when the batch's read did not find it: it may have arrived since.)
        if !input.patient_held
            && self
                .store
                .delivered("patient", std::slice::from_ref(&patient_id))
                .await?
                .is_empty()
        {
            return Ok(Err(self.wait_for_dependency(event, "patient", &patient_id).await?));
        }
        // The PDF: the source's own when it has one, else rendered from the template.
        let mut requests = vec![request];
        let pdf = match self.source_pdf(&event.kind, &event.key, &row).await? {
            Some(bytes) => Some(bytes),
            None => match rendered {
                Some(Ok(bytes)) => Some(bytes),
                Some(Err(e)) => {
                    let message = format!("rendering the PDF failed: {e}");
                    self.store.quarantine(event.id, "pdf", "render", &message).await?;
                    return Ok(Err(Step::Quarantined));
                }
                None => None,
            },
        };
        if let Some(bytes) = pdf {
            if !bytes.starts_with(b"%PDF-") || bytes.len() > hmr_protocol::checks::MAX_PDF_BYTES {
                let reason = if bytes.len() > hmr_protocol::checks::MAX_PDF_BYTES {
                    "too-large"
                } else {
                    "not-a-pdf"
                };
                self.store
                    .quarantine(event.id, "pdf", reason, "the source's PDF cannot be uploaded")
                    .await?;
                return Ok(Err(Step::Quarantined));
            }
            requests.push(paths::pdf(report_type, &event.key, version as u32, bytes));
        }
        Ok(Ok(Plan {
            requests,
            version,
            content_hash: hash,
            revoked: false,
            keep: vec![],
        }))
    }

    fn pdf_context(&self) -> hmr_pdf::Context {
        hmr_pdf::Context {
            hospital_name: self.config.pdf.hospital_name.clone(),
            ..Default::default()
        }
    }

    /// A PDF the source supplies: a `pdf` bytea column, or a `pdf_path` the worker can read.
    async fn source_pdf(
        &self,
        kind: &str,
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

    /// Maps a local item code (`local_item_code`) to the platform's `data_code` through
    /// `hmr.item_map` when the source gives no data code; an unmapped code is recorded for
    /// the DBA and the report goes up without one (shared, never recognised).
    async fn map_item_code(&self, t: ReportType, key: &str, row: &mut Map<String, Value>) -> Result<(), WorkerError> {
        if row.get("data_code").is_some_and(|v| !v.is_null()) {
            return Ok(());
        }
        let Some(local) = row.get("local_item_code").and_then(Value::as_str).map(str::to_string) else {
            return Ok(());
        };
        let name = row.get("local_item_name").and_then(Value::as_str).map(str::to_string);
        if let Some(code) = self.store.map_item(t.as_str(), &local, name.as_deref(), key).await? {
            row.insert("data_code".into(), Value::String(code));
        }
        Ok(())
    }

    async fn wait_for_dependency(&self, event: &Event, kind: &str, key: &str) -> Result<Step, WorkerError> {
        let field = if kind == "patient" { "patient_id" } else { "dept_code" };
        // The record needed is quarantined: this one waits in the quarantine too, and goes by
        // itself once the DBA's fix of that record is delivered (see Store::finish).
        if self.store.is_quarantined(kind, key).await? {
            let message = format!("{DEPENDENCY_PREFIX}{kind}:{key}");
            self.store
                .quarantine(event.id, field, "dependency-quarantined", &message)
                .await?;
            return Ok(Step::Quarantined);
        }
        if event.attempts >= self.config.worker.max_dependency_attempts {
            self.store
                .quarantine(
                    event.id,
                    field,
                    "dependency-not-delivered",
                    &format!("{kind} {key} has not reached the platform (is it quarantined?)"),
                )
                .await?;
            return Ok(Step::Quarantined);
        }
        self.store.ensure_enqueued(kind, key).await?;
        // Short first waits: the dependency is usually delivered within one round.
        let delay = Duration::from_millis(100)
            .saturating_mul(event.attempts.max(1) as u32)
            .min(self.backoff(event.attempts));
        self.store
            .reschedule(&[event.id], delay, &format!("waiting for {kind} {key}"))
            .await?;
        Ok(Step::Rescheduled)
    }

    async fn not_done(&self, event: &Event, outcome: Outcome) -> Result<Step, WorkerError> {
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
                    .source_rows(&event.kind, std::slice::from_ref(&event.key))
                    .await?
                    .remove(&event.key)
                {
                    if let Some(pid) = row.get("patient_id").and_then(Value::as_str) {
                        self.store.forget_delivered("patient", pid).await?;
                        self.store.ensure_enqueued("patient", pid).await?;
                    }
                }
                if event.attempts >= self.config.worker.max_dependency_attempts {
                    self.store
                        .quarantine(event.id, "patient_id", "not-found", &reason)
                        .await?;
                    return Ok(Step::Quarantined);
                }
                self.store
                    .reschedule(&[event.id], self.backoff(event.attempts), &format!("404: {reason}"))
                    .await?;
                Ok(Step::Rescheduled)
            }
            // The platform refused the doctor's decisions (the report was revoked, superseded
            // or expired since the check; or another decision was taken on its page): nothing
            // for the DBA to fix. The check is marked refused, its decisions stop counting, and
            // the doctor's next save asks again.
            Outcome::Permanent {
                status: 409,
                code,
                message,
                errors,
            } if event.kind == "decision" => {
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
                let first = errors
                    .first()
                    .cloned()
                    .unwrap_or_else(|| FieldError::new("", format!("http-{status}")));
                let column = source::column_for_field(&event.kind, &first.field);
                tracing::warn!(kind = %event.kind, event = event.id, status, %code, field = %column, reason = %first.reason, "quarantined");
                self.store
                    .quarantine(
                        event.id,
                        &column,
                        &first.reason,
                        &format!("HTTP {status} {code} {message}"),
                    )
                    .await?;
                Ok(Step::Quarantined)
            }
        }
    }

    async fn quarantine_invalid(&self, event: &Event, e: &ProtocolError) -> Result<Step, WorkerError> {
        let (field, reason) = e.field_and_reason();
        let column = match e {
            ProtocolError::Invalid(_) => source::column_for_field(&event.kind, &field),
            _ => field,
        };
        tracing::warn!(kind = %event.kind, event = event.id, field = %column, %reason, "invalid record quarantined");
        self.store
            .quarantine(event.id, &column, &reason, &format!("refused before sending: {e}"))
            .await?;
        Ok(Step::Quarantined)
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
    pub async fn recheck_kept(&self, every: Duration) -> Result<(), WorkerError> {
        for report_id in self.store.kept_to_recheck(every, 50).await? {
            // A GET is a new request each time (a reused id would replay the first answer).
            let (outcome, _) = self
                .platform
                .execute(&paths::download(&report_id, "json"), Uuid::new_v4())
                .await;
            match outcome {
                Outcome::Done => self.store.kept_rechecked(&report_id, None).await?,
                Outcome::Permanent {
                    status: 409,
                    message,
                    errors,
                    ..
                } if errors.iter().any(|e| e.reason == "revoked") => {
                    tracing::warn!(report = %report_id, "a kept report was revoked at its source");
                    self.store.kept_rechecked(&report_id, Some(&message)).await?;
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
    async fn master_data(&self, kind: &str, events: Vec<Event>) -> Result<(), WorkerError> {
        let keys: Vec<String> = events.iter().map(|e| e.key.clone()).collect();
        let (rows, failed) = self
            .read_each(&keys, |keys| async move { self.store.source_rows(kind, &keys).await })
            .await?;
        let events = self.hold_failed(events, &failed).await?;
        let held = self.store.delivered(kind, &keys).await?;
        let now = self.now();
        let mut finished = Vec::new();
        let mut built: Vec<(Event, Master)> = Vec::new();
        for event in events {
            let Some(Value::Object(row)) = rows.get(&event.key) else {
                finished.push(self.finished(&event, "skipped", "not in the source view"));
                continue;
            };
            match Master::build(kind, row, &now, &self.config.platform.campus_codes) {
                Ok(record) => built.push((event, record)),
                Err(e) => {
                    self.quarantine_invalid(&event, &e).await?;
                }
            }
        }
        // Departments go before the staff who reference them.
        let needed: Vec<String> = built.iter().filter_map(|(_, r)| r.department()).collect();
        let departments = if needed.is_empty() {
            HashMap::new()
        } else {
            self.store.delivered("department", &needed).await?
        };
        let mut to_send: Vec<(Event, Master, String, i32)> = Vec::new();
        for (event, record) in built {
            let hash = record.hash();
            let previous = held.get(&event.key);
            if previous.is_some_and(|h| h.content_hash == hash) {
                finished.push(self.finished(&event, "unchanged", "same content as delivered"));
                continue;
            }
            if let Some(dept) = record.department().filter(|d| !departments.contains_key(d)) {
                self.wait_for_dependency(&event, "department", &dept).await?;
                continue;
            }
            let version = previous.map_or(1, |h| h.version + 1);
            to_send.push((event, record, hash, version));
        }
        self.store.finish(kind, &finished).await?;

        let mut chunks: Vec<Vec<(Event, Master, String, i32)>> = Vec::new();
        for item in to_send {
            match chunks.last_mut() {
                Some(c) if c.len() < hmr_protocol::checks::MAX_BATCH => c.push(item),
                _ => chunks.push(vec![item]),
            }
        }
        let results: Vec<Result<(), WorkerError>> = stream::iter(chunks)
            .map(|chunk| self.send_batch(kind, chunk))
            .buffer_unordered(self.config.worker.concurrency.clamp(1, 4))
            .collect()
            .await;
        results.into_iter().collect()
    }

    async fn send_batch(&self, kind: &str, chunk: Vec<(Event, Master, String, i32)>) -> Result<(), WorkerError> {
        let request = Master::batch_request(chunk.iter().map(|(_, r, _, _)| r));
        // Derived from the events (with their attempt, since a record the platform refused
        // for a missing department is sent again after it) and the body: a lost answer is
        // replayed, and a re-send of master data is an upsert with no second effect.
        let ids: Vec<String> = chunk
            .iter()
            .map(|(e, _, _, _)| format!("{}.{}.{}", e.id, e.generation, e.attempts))
            .collect();
        let body_hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&request.body));
        let id = request_id(&format!("{kind}:{}:{body_hash}", ids.join(",")));
        let (outcome, answer) = self.platform.execute(&request, id).await;
        let event_ids: Vec<i64> = chunk.iter().map(|(e, _, _, _)| e.id).collect();
        let max_attempts = chunk.iter().map(|(e, _, _, _)| e.attempts).max().unwrap_or(1);
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
                            tracing::warn!(kind, events = event_ids.len(), %reason, "batch retry later");
                            self.store
                                .reschedule(&event_ids, self.backoff(max_attempts), &reason)
                                .await?;
                            return Ok(());
                        }
                    };
                let mut finished = Vec::new();
                for (index, (event, record, hash, version)) in chunk.iter().enumerate() {
                    match answer.results.iter().find(|r| r.index == index) {
                        Some(r) if r.status == RecordStatus::Accepted => finished.push(Finish {
                            id: event.id,
                            outcome: "delivered",
                            delivered: Some(Delivered {
                                version: *version,
                                content_hash: hash.clone(),
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
                            if let (Some(dept), "unknown-dept") = (record.department(), first.reason.as_str()) {
                                // Our record of the department is stale: send it again first.
                                self.store.forget_delivered("department", &dept).await?;
                                self.wait_for_dependency(event, "department", &dept).await?;
                                continue;
                            }
                            let column = source::column_for_field(kind, &first.field);
                            let message = format!("rejected by the platform: {}", FieldError::join(&r.errors));
                            self.store
                                .quarantine(event.id, &column, &first.reason, &message)
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
                let first = errors
                    .first()
                    .cloned()
                    .unwrap_or_else(|| FieldError::new("", format!("http-{status}")));
                let column = source::column_for_field(kind, &first.field);
                for event_id in event_ids {
                    self.store
                        .quarantine(
                            event_id,
                            &column,
                            &first.reason,
                            &format!("HTTP {status} {code} {message}"),
                        )
                        .await?;
                }
            }
            Outcome::Retry { after, reason } => {
                let delay = after.unwrap_or_else(|| self.backoff(max_attempts));
                tracing::info!(kind, events = event_ids.len(), ?delay, %reason, "batch retry later");
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

/// A master-data record, built from its source row and checked.
#[derive(Debug, Clone)]
enum Master {
    Patient(Patient),
    Department(Department),
    Staff(Staff),
}

impl Master {
    fn build(
        kind: &str,
        row: &Map<String, Value>,
        now: &chrono::DateTime<chrono::FixedOffset>,
        campus_codes: &[String],
    ) -> Result<Master, ProtocolError> {
        let invalid = ProtocolError::Invalid;
        Ok(match kind {
            "patient" => {
                let r: Patient = source::PATIENT.record(row, Map::new())?;
                validate::patient(&r, now).map_err(invalid)?;
                Master::Patient(r)
            }
            "department" => {
                let r: Department = source::DEPARTMENT.record(row, Map::new())?;
                validate::department(&r, now).map_err(invalid)?;
                // A campus the hospital did not configure is a mapping mistake, not a new campus.
                if !campus_codes.is_empty() && !campus_codes.contains(&r.campus_code) {
                    return Err(ProtocolError::Shape {
                        field: "campus_code".into(),
                        reason: "unknown-campus".into(),
                    });
                }
                Master::Department(r)
            }
            _ => {
                let r: Staff = source::STAFF.record(row, Map::new())?;
                validate::staff(&r, now).map_err(invalid)?;
                Master::Staff(r)
            }
        })
    }

    fn hash(&self) -> String {
        match self {
            Master::Patient(r) => source::content_hash(r),
            Master::Department(r) => source::content_hash(r),
            Master::Staff(r) => source::content_hash(r),
        }
    }

    /// The department a staff record references.
    fn department(&self) -> Option<String> {
        match self {
            Master::Staff(s) => Some(s.dept_code.clone()),
            _ => None,
        }
    }

    /// One batch request; all records are of one kind (a round groups events by kind).
    fn batch_request<'a>(records: impl Iterator<Item = &'a Master>) -> Request {
        let records: Vec<&Master> = records.collect();
        /// The records of one variant, cloned into the platform type.
        fn of<T: Clone>(records: &[&Master], pick: impl Fn(&Master) -> Option<&T>) -> Vec<T> {
            records.iter().filter_map(|r| pick(r)).cloned().collect()
        }
        match records.first() {
            Some(Master::Patient(_)) => {
                paths::patients(&of(
                    &records,
                    |r| if let Master::Patient(p) = r { Some(p) } else { None },
                ))
            }
            Some(Master::Department(_)) => paths::departments(&of(&records, |r| {
                if let Master::Department(d) = r {
                    Some(d)
                } else {
                    None
                }
            })),
            _ => paths::staff(&of(&records, |r| if let Master::Staff(s) = r { Some(s) } else { None })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frozen_plan_keeps_its_pdf_as_bytes_beside_the_json() {
        let pdf = b"%PDF-1.7 \xff\xfe binary".to_vec();
        let plan = Plan {
            requests: vec![
                Request {
                    method: paths::Method::Post,
                    path: "/data".into(),
                    scope: None,
                    content_type: Some("application/json".into()),
                    headers: vec![],
                    body: b"{}".to_vec(),
                },
                paths::pdf(ReportType::Lab, "L1", 1, pdf.clone()),
            ],
            version: 1,
            content_hash: "h".into(),
            revoked: false,
            keep: vec![],
        };
        let (json, stored) = plan.freeze();
        assert_eq!(stored.as_deref(), Some(pdf.as_slice()));
        assert!(json.to_string().len() < 1000, "no PDF inside the JSON: {json}");
        let thawed = Plan::thaw(&json, stored.as_ref()).unwrap();
        assert_eq!(thawed.requests, plan.requests);
        assert!(
            Plan::thaw(&json, None).is_err(),
            "a missing PDF is an error, not an empty upload"
        );
    }

    #[test]
    fn request_ids_are_stable_and_distinct() {
        assert_eq!(request_id("5:0:0"), request_id("5:0:0"));
        assert_ne!(request_id("5:0:0"), request_id("5:1:0"));
        assert_ne!(request_id("5:0:0"), request_id("5:0:1"));
        assert_eq!(request_id("5:0:0").get_version_num(), 5);
    }
}
