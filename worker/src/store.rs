//! Everything the worker asks of the database: claiming events with a lease, reading the
//! DBA's source views, and finishing, rescheduling or quarantining events. Each change is
//! one statement, so a crash between two leaves nothing half done.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use std::sync::Mutex;
use tokio::sync::Notify;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, NoTls, Row, Statement};

use hmr_protocol::Kind;

use crate::error::WorkerError;
pub use crate::plan::{Delivered, Revocation};

#[derive(Debug, Clone)]
pub struct Event {
    pub id: i64,
    pub kind: Kind,
    pub key: String,
    pub attempts: i32,
    pub generation: i32,
    pub plan: Option<Value>,
    /// The frozen PDF body, when the plan has one (`Plan::pdf_step`).
    pub plan_pdf: Option<Vec<u8>>,
    pub step: i32,
}

/// How an event ends.
#[derive(Debug, Clone)]
pub struct Finish {
    pub id: i64,
    /// `delivered`, `unchanged` or `skipped`.
    pub outcome: &'static str,
    /// The platform's new state of the record, when it changed.
    pub delivered: Option<Delivered>,
    pub detail: Option<String>,
}

/// Where the kind's source rows come from, resolved once from `hmr.kinds`.
#[derive(Debug, Clone)]
pub struct KindSource {
    pub relation: String,
    pub key_column: String,
    pub item_relation: Option<String>,
}

pub struct Store {
    metrics: Arc<crate::metrics::Metrics>,
    client: Client,
    /// Statements prepared once per connection: a query text sent anew costs a Parse round
    /// trip and a fresh plan every time.
    statements: Mutex<HashMap<String, Statement>>,
    worker_id: String,
    lease: Duration,
    sources: HashMap<Kind, KindSource>,
    /// `hmr_src.revocation`, when the DBA provides it (reason and operator of an un-audit).
    revocation_view: Option<String>,
}

/// One report's inputs, read for a batch at once (`Store::report_inputs`).
#[derive(Debug, Clone, Default)]
pub struct ReportInput {
    pub row: Option<Value>,
    pub items: Vec<Value>,
    pub held: Option<Delivered>,
    /// Whether the platform holds the report's patient.
    pub patient_held: bool,
}

/// Names a rendered PDF prints, looked up for a batch of reports: patient → (gender code,
/// birth date), department code → name, staff number → name.
#[derive(Debug, Clone, Default)]
pub struct PdfNames {
    pub patients: HashMap<String, (Option<String>, Option<String>)>,
    pub departments: HashMap<String, String>,
    pub staff: HashMap<String, String>,
}

impl Store {
    /// Connects, sets the session up, and forwards NOTIFYs on `hmr_outbox` to `wake`.
    pub async fn connect(
        url: &str,
        timezone: &str,
        worker_id: &str,
        lease: Duration,
        wake: Arc<Notify>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Store, WorkerError> {
        let (client, mut connection) = tokio_postgres::connect(url, NoTls).await?;
        // NOTIFYs arrive only if we poll the connection ourselves.
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => wake.notify_one(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "database connection ended");
                        break;
                    }
                }
            }
            wake.notify_one();
        });
        client
            .batch_execute(&format!(
                "SET application_name = 'hmr-worker'; SET TimeZone = {}; LISTEN hmr_outbox;
                 SET synchronous_commit = on; SET jit = off",
                quote_literal(timezone)
            ))
            .await?;
        // (synchronous_commit: a plan must be on disk before its first request leaves. Where
        // the server commits asynchronously, a crash could otherwise forget a plan already
        // sent, and the rebuilt one would go under the same request id with another body.
        // jit: a batch's read of 2,000 reports costs enough to cross jit_above_cost, and
        // compiling it took 300 of its 460 ms, every batch (#26); these statements never run
        // long enough to win it back.)
        // Our statements carry patients' data as parameters (frozen reports, source rows): keep
        // them out of the server log even where slow statements are logged.
        if let Err(e) = client.batch_execute("SET log_parameter_max_length = 0").await {
            tracing::warn!(
                error = %WorkerError::from(e),
                "cannot turn off logging of statement parameters: GRANT SET ON PARAMETER log_parameter_max_length to this role"
            );
        }
        let mut sources = HashMap::new();
        for row in client
            .query(
                // A view missing now is still the view to read: its events wait with the
                // error (42P01) instead of being taken as "not in the source view".
                "SELECT kind, coalesce(to_regclass(source_view)::text, source_view), key_column,
                        coalesce(to_regclass(item_view)::text, item_view) FROM hmr.kinds",
                &[],
            )
            .await?
        {
            // A kind this worker does not know waits for a worker that does.
            let kind = Kind::parse(row.get(0));
            let relation: Option<String> = row.get(1);
            if let (Some(kind), Some(relation)) = (kind, relation) {
                sources.insert(
                    kind,
                    KindSource {
                        relation,
                        key_column: row.get(2),
                        item_relation: row.get(3),
                    },
                );
            }
        }
        let revocation_view: Option<String> = client
            .query_one("SELECT to_regclass('hmr_src.revocation')::text", &[])
            .await?
            .get(0);
        Ok(Store {
            metrics,
            client,
            statements: Mutex::new(HashMap::new()),
            worker_id: worker_id.into(),
            lease,
            sources,
            revocation_view,
        })
    }

    async fn statement(&self, sql: &str) -> Result<Statement, WorkerError> {
        if let Some(found) = self.statements.lock().expect("statement cache").get(sql) {
            return Ok(found.clone());
        }
        let prepared = self.client.prepare(sql).await?;
        self.statements
            .lock()
            .expect("statement cache")
            .insert(sql.to_string(), prepared.clone());
        Ok(prepared)
    }

    async fn query_cached(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, WorkerError> {
        let statement = self.statement(sql).await?;
        Ok(self.client.query(&statement, params).await?)
    }

    /// A batch's read of the hospital's views, planned for this call rather than kept: a kept
    /// plan is made from the statistics of its moment, and one made while a table was nearly
    /// empty (a go-live, a bulk load) scanned the whole table for every key until autovacuum
    /// analysed it again — 0.9 s per batch of reports in the backlog benchmark (#26). Planning
    /// costs about 1 ms, once per batch.
    async fn query_planned(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, WorkerError> {
        Ok(self.client.query(sql, params).await?)
    }

    async fn query_one_cached(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, WorkerError> {
        let statement = self.statement(sql).await?;
        Ok(self.client.query_one(&statement, params).await?)
    }

    async fn query_opt_cached(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>, WorkerError> {
        let statement = self.statement(sql).await?;
        Ok(self.client.query_opt(&statement, params).await?)
    }

    async fn execute_cached(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, WorkerError> {
        let statement = self.statement(sql).await?;
        Ok(self.client.execute(&statement, params).await?)
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Claims the oldest eligible events (see `hmr.claim`): captured events are moved into
    /// the outbox first. `going_to_sleep` announces that this worker will wait for a NOTIFY
    /// (for that long at most) if nothing is found.
    pub async fn claim(&self, limit: i64, going_to_sleep: Option<Duration>) -> Result<Vec<Event>, WorkerError> {
        let kinds: Vec<&str> = Kind::ALL
            .into_iter()
            .filter(|k| self.sources.contains_key(k))
            .map(Kind::as_str)
            .collect();
        let rows = self
            .query_cached(
                "SELECT id, kind, key, attempts, generation, plan, step, plan_pdf FROM hmr.claim($1, $2, $3, $4, $5, $6)",
                &[
                    &self.worker_id,
                    &kinds,
                    &(limit as i32),
                    &self.lease.as_secs_f64(),
                    &going_to_sleep.is_some(),
                    &going_to_sleep.unwrap_or_default().as_secs_f64(),
                ],
            )
            .await?;
        let mut events: Vec<Event> = rows
            .iter()
            .filter_map(|r| {
                Some(Event {
                    id: r.get(0),
                    // Claimed only for the kinds asked for, all of them known.
                    kind: Kind::parse(r.get(1))?,
                    key: r.get(2),
                    attempts: r.get(3),
                    generation: r.get(4),
                    plan: r.get(5),
                    step: r.get(6),
                    plan_pdf: r.get(7),
                })
            })
            .collect();
        events.sort_by_key(|e| e.id);
        Ok(events)
    }

    /// Current rows of the kind's source view for these keys, as `column → value` objects.
    pub async fn source_rows(&self, kind: Kind, keys: &[String]) -> Result<HashMap<String, Value>, WorkerError> {
        let Some(src) = self.sources.get(&kind) else {
            return Ok(HashMap::new());
        };
        let key = quote_ident(&src.key_column);
        let sql = format!(
            "SELECT v.{key}::text, to_jsonb(v) FROM {} v WHERE v.{key}::text = ANY($1)",
            src.relation
        );
        let rows = self.query_planned(&sql, &[&keys]).await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, Value>(1)))
            .collect())
    }

    /// What a batch of reports needs, in one round trip (hmr.delivered is probed by key for
    /// each report, LATERAL … LIMIT 1: joined, a plan from statistics of a nearly empty table
    /// scanned every delivered record for every report, 470 ms a batch after a backfill; #26): each report's source row, its items
    /// (in `seq` order when the view has one), what the platform holds of it, and whether
    /// the platform holds its patient.
    pub async fn report_inputs(
        &self,
        kind: Kind,
        keys: &[String],
    ) -> Result<HashMap<String, ReportInput>, WorkerError> {
        let Some(src) = self.sources.get(&kind) else {
            return Ok(HashMap::new());
        };
        let items = match &src.item_relation {
            Some(relation) => format!(
                "(SELECT jsonb_agg(to_jsonb(i) ORDER BY to_jsonb(i) -> 'seq', to_jsonb(i) ->> 'item_code')
                    FROM {relation} i WHERE i.report_no::text = k.key)"
            ),
            None => "NULL::jsonb".into(),
        };
        // A report view without the patient's identity (id_type, id_no, patient_name) gets
        // it from the patient view by key, here: a view joining the two makes a foreign
        // patient table be read whole for every report (#31). Skipped (a one-time filter)
        // for a row that has all three (`whole`, from the row's JSON made once: recomputed in
        // the filter it cost 5 % of the report drain). Named even when the patient view is missing (made
        // after the worker started): the reports then wait with 42P01, as for any missing
        // view, rather than go without the patient's identity.
        let identity = match self.sources.get(&Kind::Patient) {
            Some(patients) => format!(
                "(SELECT to_jsonb(pv) FROM {} pv
                   WHERE NOT r.whole AND pv.{}::text = r.patient_id LIMIT 1)",
                patients.relation,
                quote_ident(&patients.key_column)
            ),
            None => "NULL::jsonb".into(),
        };
        let sql = format!(
            "SELECT k.key, r.row, {items}, d.version, d.content_hash, d.revoked, p.key IS NOT NULL, {identity}
               FROM unnest($1::text[]) AS k(key)
               LEFT JOIN LATERAL (SELECT x.j AS row, x.j ->> 'patient_id' AS patient_id,
                                         x.j ?& ARRAY['id_type', 'id_no', 'patient_name'] AS whole
                                    FROM (SELECT to_jsonb(v) AS j FROM {relation} v
                                           WHERE v.{key}::text = k.key LIMIT 1) x
                                   -- kept a subquery: flattened, patient_id would reach the
                                   -- patient lookup as an expression an FDW cannot send
                                   LIMIT 1) r ON true
               LEFT JOIN LATERAL (SELECT d.version, d.content_hash, d.revoked FROM hmr.delivered d
                                   WHERE d.kind = $2 AND d.key = k.key LIMIT 1) d ON true
               LEFT JOIN LATERAL (SELECT p.key FROM hmr.delivered p
                                   WHERE p.kind = 'patient' AND p.key = r.patient_id LIMIT 1) p ON true",
            relation = src.relation,
            key = quote_ident(&src.key_column),
        );
        let mut inputs = HashMap::new();
        for r in self.query_planned(&sql, &[&keys, &kind.as_str()]).await? {
            let items: Option<Value> = r.get(2);
            let version: Option<i32> = r.get(3);
            let mut row: Option<Value> = r.get(1);
            if let (Some(Value::Object(row)), Some(Value::Object(patient))) = (&mut row, r.get::<_, Option<Value>>(7)) {
                hmr_protocol::source::fill_identity(row, &patient);
            }
            inputs.insert(
                r.get::<_, String>(0),
                ReportInput {
                    row,
                    items: match items {
                        Some(Value::Array(items)) => items,
                        _ => vec![],
                    },
                    held: version.map(|version| Delivered {
                        version,
                        content_hash: r.get(4),
                        revoked: r.get(5),
                    }),
                    patient_held: r.get(6),
                },
            );
        }
        Ok(inputs)
    }

    /// The patients', departments' and staff members' names the batch's rows refer to, from
    /// the kinds' views. A view that is missing or fails only leaves names out (the PDF then
    /// prints codes): a report is never held back for a name.
    pub async fn pdf_names<'a>(&self, rows: impl Iterator<Item = &'a Value>) -> PdfNames {
        let mut patients = Vec::new();
        let mut departments = Vec::new();
        let mut staff = Vec::new();
        for row in rows {
            let get = |c: &str| row.get(c).and_then(Value::as_str).map(str::to_string);
            patients.extend(get("patient_id"));
            departments.extend(get("dept_code"));
            for c in ["request_doctor_no", "tester_no", "auditor_no", "reporter_no"] {
                staff.extend(get(c));
            }
        }
        let mut names = PdfNames::default();
        let read = |kind: Kind, keys: Vec<String>, columns: &'static [&'static str]| async move {
            let src = self.sources.get(&kind)?;
            let picks: Vec<String> = columns.iter().map(|c| format!("to_jsonb(v) ->> '{c}'")).collect();
            let sql = format!(
                "SELECT v.{key}::text, {picks} FROM {relation} v WHERE v.{key}::text = ANY($1)",
                key = quote_ident(&src.key_column),
                picks = picks.join(", "),
                relation = src.relation
            );
            match self.query_planned(&sql, &[&keys]).await {
                Ok(rows) => Some(rows),
                Err(e) => {
                    tracing::warn!(%kind, error = %e, "names for rendered PDFs not read; codes are printed");
                    None
                }
            }
        };
        if let Some(rows) = read(Kind::Patient, patients, &["gender_code", "birth_date"]).await {
            names.patients = rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect();
        }
        if let Some(rows) = read(Kind::Department, departments, &["dept_name"]).await {
            names.departments = rows
                .iter()
                .filter_map(|r| Some((r.get(0), r.get::<_, Option<String>>(1)?)))
                .collect();
        }
        if let Some(rows) = read(Kind::Staff, staff, &["name"]).await {
            names.staff = rows
                .iter()
                .filter_map(|r| Some((r.get(0), r.get::<_, Option<String>>(1)?)))
                .collect();
        }
        names
    }

    /// The source's own PDF of a report (its `pdf` bytea column).
    pub async fn source_pdf(&self, kind: Kind, key: &str) -> Result<Option<Vec<u8>>, WorkerError> {
        let Some(src) = self.sources.get(&kind) else {
            return Ok(None);
        };
        let sql = format!(
            "SELECT v.pdf FROM {} v WHERE v.{}::text = $1",
            src.relation,
            quote_ident(&src.key_column)
        );
        Ok(self
            .query_opt_cached(&sql, &[&key])
            .await?
            .and_then(|r| r.get::<_, Option<Vec<u8>>>(0)))
    }

    /// The latest un-audit the source records for a report, if it keeps them.
    pub async fn revocation(&self, kind: Kind, key: &str) -> Result<Option<Revocation>, WorkerError> {
        let Some(view) = &self.revocation_view else {
            return Ok(None);
        };
        let sql = format!(
            "SELECT to_jsonb(r) FROM {view} r WHERE r.kind = $1 AND r.report_no::text = $2 ORDER BY r.revoked_at DESC LIMIT 1"
        );
        let row = self.query_opt_cached(&sql, &[&kind.as_str(), &key]).await?;
        Ok(row.and_then(|r| serde_json::from_value(r.get::<_, Value>(0)).ok()))
    }

    /// `hmr.item_map` lookup; an unmapped code is counted in `hmr.unmapped_items`.
    pub async fn map_item(
        &self,
        t: &str,
        local: &str,
        name: Option<&str>,
        kind: Kind,
        key: &str,
    ) -> Result<(Option<String>, bool), WorkerError> {
        // One round trip: the mapping, or the report noted under its unmapped code (so adding
        // the mapping releases or resends it: hmr.item_map's trigger); and the kind's policy.
        let row = self
            .query_one_cached(
                "WITH m AS (SELECT data_code FROM hmr.item_map WHERE type = $1 AND local_code = $2),
                      u AS (INSERT INTO hmr.unmapped_reports (kind, key, type, local_code, local_name)
                            SELECT $4, $5, $1, $2, $3 WHERE NOT EXISTS (SELECT 1 FROM m)
                            ON CONFLICT (kind, key) DO UPDATE
                               SET type = EXCLUDED.type, local_code = EXCLUDED.local_code, last_seen = now(),
                                   local_name = coalesce(EXCLUDED.local_name, hmr.unmapped_reports.local_name)
                            RETURNING 1)
                 SELECT (SELECT data_code FROM m),
                        coalesce((SELECT k.unmapped = 'hold' FROM hmr.kinds k WHERE k.kind = $4), true),
                        (SELECT count(*) FROM u)",
                &[&t, &local, &name, &kind.as_str(), &key],
            )
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// The current decisions of a check, as the platform wants them (one per matched order).
    pub async fn decisions(&self, check_id: &str) -> Result<Option<hmr_protocol::Decisions>, WorkerError> {
        let rows = self
            .query_cached(
                "SELECT order_id, report_id, recognise, reason_code, reason_text, doctor_no, dept_code,
                        to_jsonb(decided_at) #>> '{}'
                   FROM hmr.current_decisions WHERE check_id = $1 ORDER BY decided_at, order_id",
                &[&check_id],
            )
            .await?;
        let Some(last) = rows.last() else { return Ok(None) };
        Ok(Some(hmr_protocol::Decisions {
            check_id: check_id.into(),
            doctor_no: last.get(5),
            dept_code: last.get(6),
            decided_at: last.get(7),
            decisions: rows
                .iter()
                .map(|r| hmr_protocol::Decision {
                    order_id: r.get(0),
                    report_id: r.get(1),
                    recognise: r.get(2),
                    reason_code: r.get(3),
                    reason_text: r.get(4),
                })
                .collect(),
        }))
    }

    /// Keeps a recognised report downloaded from the platform.
    pub async fn retain_report(
        &self,
        report_id: &str,
        format: &str,
        bytes: &[u8],
        check_id: &str,
    ) -> Result<(), WorkerError> {
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes));
        let org = report_id.split(':').next().unwrap_or_default();
        self.execute_cached(
            "INSERT INTO hmr.retained_reports (report_id, format, bytes, sha256, source_org, check_id)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (report_id, format) DO NOTHING",
            &[&report_id, &format, &bytes, &sha, &org, &check_id],
        )
        .await?;
        Ok(())
    }

    /// Kept reports not asked about for `every`, oldest first.
    pub async fn retained_to_recheck(&self, every: Duration, limit: i64) -> Result<Vec<String>, WorkerError> {
        Ok(self
            .query_cached(
                // Every kept copy, pdf-only ones too (a report first downloaded on demand).
                "SELECT report_id FROM hmr.retained_reports
                  WHERE revoked_at IS NULL
                  GROUP BY report_id
                 HAVING min(coalesce(rechecked_at, fetched_at)) < now() - make_interval(secs => $1)
                  ORDER BY min(coalesce(rechecked_at, fetched_at)) LIMIT $2",
                &[&every.as_secs_f64(), &limit],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// What the platform said of a kept report now: still valid, or revoked at its source.
    pub async fn retained_rechecked(&self, report_id: &str, revoked: Option<&str>) -> Result<(), WorkerError> {
        self.execute_cached(
            "UPDATE hmr.retained_reports
                SET rechecked_at = now(),
                    revoked_at = CASE WHEN $2::text IS NULL THEN revoked_at ELSE coalesce(revoked_at, now()) END,
                    revoked_note = coalesce($2, revoked_note)
              WHERE report_id = $1",
            &[&report_id, &revoked],
        )
        .await?;
        if revoked.is_some() {
            // The HIS performs the orders recognised on it after all (hmr.orders_to_perform).
            self.execute_cached("SELECT pg_notify('hmr_report_revoked', $1)", &[&report_id])
                .await?;
        }
        Ok(())
    }

    /// Removes finished events older than the retention, in batches.
    pub async fn purge_history(&self, days: i32) -> Result<i64, WorkerError> {
        Ok(self
            .query_one_cached("SELECT hmr.purge_history(make_interval(days => $1))", &[&days])
            .await?
            .get(0))
    }

    /// The operator's facts (`hmr.status`) as metric name → value.
    pub async fn status(&self) -> Result<Vec<(String, f64)>, WorkerError> {
        let row = self
            .query_one_cached(
                "SELECT pending::float8, in_flight::float8, quarantined::float8,
                        coalesce(extract(epoch FROM oldest_event_age), 0)::float8, stuck_records::float8,
                        coalesce(outbox_dead_rows, 0)::float8, held_unmapped::float8
                   FROM hmr.status",
                &[],
            )
            .await?;
        let names = [
            "outbox_pending",
            "outbox_in_flight",
            "outbox_quarantined",
            "oldest_event_age_seconds",
            "stuck_records",
            "outbox_dead_rows",
            "reports_held_unmapped",
        ];
        Ok(names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), row.get::<_, f64>(i)))
            .collect())
    }

    /// The statistics' totals, as Prometheus counters (`Metrics::set_statistics`).
    pub async fn statistics(&self) -> Result<Vec<(&'static str, String, f64)>, WorkerError> {
        let mut out = Vec::new();
        let row = self
            .query_one_cached(
                "SELECT (SELECT count(*) FROM hmr.prompts p, jsonb_array_elements(p.undecided))::float8,
                        (SELECT count(*) FROM hmr.list_log)::float8,
                        coalesce(sum(u.uploaded), 0)::float8, coalesce(sum(u.uploaded_on_time), 0)::float8
                   FROM hmr.upload_stats() u",
                &[],
            )
            .await?;
        out.push(("prompts_total", String::new(), row.get(0)));
        out.push(("list_calls_total", String::new(), row.get(1)));
        out.push(("uploads_total", String::new(), row.get(2)));
        out.push(("uploads_on_time_total", String::new(), row.get(3)));
        for r in self
            .query_cached(
                "SELECT CASE WHEN d.recognise THEN 'recognised' ELSE 'declined' END, coalesce(d.reason_code, ''),
                        count(*)::float8
                   FROM hmr.current_decisions d JOIN hmr.checks c ON c.check_id = d.check_id AND c.refused_at IS NULL
                  GROUP BY 1, 2 ORDER BY 1, 2",
                &[],
            )
            .await?
        {
            let (outcome, reason): (String, String) = (r.get(0), r.get(1));
            let labels = if reason.is_empty() {
                format!("{{outcome=\"{outcome}\"}}")
            } else {
                format!("{{outcome=\"{outcome}\",reason=\"{reason}\"}}")
            };
            out.push(("decisions_total", labels, r.get(2)));
        }
        Ok(out)
    }

    /// Reads the polled sources (exam systems without triggers) into the outbox.
    pub async fn poll_sources(&self) -> Result<i32, WorkerError> {
        Ok(self.query_one_cached("SELECT hmr.poll_sources()", &[]).await?.get(0))
    }

    pub async fn save_step(&self, id: i64, step: i32) -> Result<(), WorkerError> {
        self.execute_cached(
            "UPDATE hmr.outbox SET step = $3 WHERE id = $1 AND lease_owner = $2",
            &[&id, &self.worker_id, &step],
        )
        .await?;
        Ok(())
    }

    pub async fn delivered(&self, kind: Kind, keys: &[String]) -> Result<HashMap<String, Delivered>, WorkerError> {
        // Planned per call: hmr.delivered grows from empty at go-live (a backfill fills it in
        // minutes), and a kept plan from then would scan it for every batch.
        let rows = self
            .query_planned(
                "SELECT key, version, content_hash, revoked FROM hmr.delivered WHERE kind = $1 AND key = ANY($2)",
                &[&kind.as_str(), &keys],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    Delivered {
                        version: r.get(1),
                        content_hash: r.get(2),
                        revoked: r.get(3),
                    },
                )
            })
            .collect())
    }

    /// Freezes the requests of an event before the first is sent. False when this worker no
    /// longer holds the event (its lease expired and another worker took it): then it must
    /// not send anything, or two bodies could go out under one request id.
    pub async fn save_plan(&self, id: i64, plan: &Value, pdf: Option<&[u8]>) -> Result<bool, WorkerError> {
        let n = self
            .execute_cached(
                "UPDATE hmr.outbox SET plan = $3, plan_pdf = $5, step = 0, lease_until = now() + make_interval(secs => $4)
                  WHERE id = $1 AND lease_owner = $2 AND plan IS NULL",
                &[&id, &self.worker_id, plan, &self.lease.as_secs_f64(), &pdf],
            )
            .await?;
        Ok(n == 1)
    }

    /// Ends events: out of the outbox into the history, the delivery state updated, and
    /// earlier quarantined events of the same records marked superseded, in one statement.
    pub async fn finish(&self, kind: Kind, done: &[Finish]) -> Result<(), WorkerError> {
        if done.is_empty() {
            return Ok(());
        }
        // Only patients and departments have dependents waiting in the quarantine; finding
        // those scans the outbox, which a report's finish need not pay for.
        let releases = if kind.has_dependents() {
            "UPDATE hmr.outbox o
                SET state = 'pending', plan = NULL, plan_pdf = NULL, step = 0, generation = o.generation + 1, attempts = 0,
                    next_attempt_at = '-infinity', last_error = NULL, error_field = NULL,
                    error_reason = NULL, failed_at = NULL, waits_for_kind = NULL, waits_for_key = NULL
               FROM d
              WHERE d.outcome = 'delivered' AND o.state = 'quarantined'
                AND o.waits_for_kind = d.kind AND o.waits_for_key = d.key"
        } else {
            "SELECT 1"
        };
        let ids: Vec<i64> = done.iter().map(|f| f.id).collect();
        let versions: Vec<Option<i32>> = done.iter().map(|f| f.delivered.as_ref().map(|d| d.version)).collect();
        let hashes: Vec<Option<String>> = done
            .iter()
            .map(|f| f.delivered.as_ref().map(|d| d.content_hash.clone()))
            .collect();
        let revoked: Vec<bool> = done
            .iter()
            .map(|f| f.delivered.as_ref().is_some_and(|d| d.revoked))
            .collect();
        let outcomes: Vec<&str> = done.iter().map(|f| f.outcome).collect();
        let details: Vec<Option<String>> = done.iter().map(|f| f.detail.clone()).collect();
        let rows = self
            .query_cached(
                &format!(
                    "WITH f AS (
                    SELECT * FROM unnest($2::bigint[], $3::int[], $4::text[], $5::bool[], $6::text[], $7::text[])
                      AS f(id, version, hash, revoked, outcome, detail)),
                 d AS (
                    DELETE FROM hmr.outbox o USING f
                     WHERE o.id = f.id AND o.lease_owner = $1
                    RETURNING o.id, o.kind, o.key, o.op, o.xid, o.created_at, o.attempts,
                              f.version, f.hash, f.revoked, f.outcome, f.detail),
                 s AS (
                    INSERT INTO hmr.delivered (kind, key, version, content_hash, revoked)
                    SELECT kind, key, version, hash, revoked FROM d WHERE hash IS NOT NULL
                    ON CONFLICT (kind, key) DO UPDATE
                       SET version = EXCLUDED.version, content_hash = EXCLUDED.content_hash,
                           revoked = EXCLUDED.revoked, delivered_at = now()),
                 q AS (
                    DELETE FROM hmr.outbox o USING d
                     WHERE o.kind = d.kind AND o.key = d.key AND o.id < d.id AND o.state = 'quarantined'
                    RETURNING o.*),
                 qh AS (
                    INSERT INTO hmr.outbox_history (id, kind, key, op, xid, created_at, outcome, attempts, detail)
                    SELECT id, kind, key, op, xid, created_at, 'superseded', attempts,
                           'a later event of the same record finished' FROM q),
                 -- Records that waited in the quarantine for this one go again by themselves.
                 released AS ({releases})
                 INSERT INTO hmr.outbox_history (id, kind, key, op, xid, created_at, outcome, version, attempts, detail)
                 SELECT id, kind, key, op, xid, created_at, outcome, version, attempts, detail FROM d
                 RETURNING kind, outcome"
                ),
                &[&self.worker_id, &ids, &versions, &hashes, &revoked, &outcomes, &details],
            )
            .await?;
        for row in &rows {
            if row.get::<_, &str>(1) == "delivered" {
                self.metrics.delivered(row.get(0), 1);
            }
        }
        Ok(())
    }

    /// Puts events back to wait `delay` (backoff, Retry-After, a dependency).
    pub async fn reschedule(&self, ids: &[i64], delay: Duration, error: &str) -> Result<(), WorkerError> {
        self.metrics
            .retries
            .fetch_add(ids.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let error = hmr_protocol::mask::scrub(error);
        let error = error.as_str();
        self.execute_cached(
            "UPDATE hmr.outbox
                    SET state = 'pending', lease_owner = NULL, lease_until = NULL,
                        next_attempt_at = now() + make_interval(secs => $3), last_error = $4
                  WHERE id = ANY($2) AND lease_owner = $1",
            &[&self.worker_id, &ids, &delay.as_secs_f64(), &error],
        )
        .await?;
        Ok(())
    }

    /// Parks an event for the DBA with the offending column (or platform field) and reason,
    /// and the record it waits for, if any (released when that is delivered: `finish`).
    pub async fn quarantine(&self, id: i64, q: &crate::plan::Quarantine) -> Result<(), WorkerError> {
        self.metrics
            .quarantined
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A platform's message may quote the record: no full identity number is kept.
        let message = hmr_protocol::mask::scrub(&q.message);
        let (waits_kind, waits_key) = match q.waits_for.as_ref().map(crate::plan::WaitsFor::columns) {
            Some((kind, key)) => (Some(kind), Some(key)),
            None => (None, None),
        };
        self.execute_cached(
            "WITH q AS (
                    UPDATE hmr.outbox
                       SET state = 'quarantined', lease_owner = NULL, lease_until = NULL,
                           error_field = $3, error_reason = $4, last_error = $5, failed_at = now(),
                           waits_for_kind = $6, waits_for_key = $7
                     WHERE id = $1 AND lease_owner = $2
                    RETURNING id, kind, key),
                 -- One row per record in the quarantine: the newest says what is wrong now.
                 old AS (
                    DELETE FROM hmr.outbox o USING q
                     WHERE o.kind = q.kind AND o.key = q.key AND o.id < q.id AND o.state = 'quarantined'
                    RETURNING o.*)
                 INSERT INTO hmr.outbox_history (id, kind, key, op, xid, created_at, outcome, attempts, detail)
                 SELECT id, kind, key, op, xid, created_at, 'superseded', attempts,
                        'a later event of the same record was quarantined' FROM old",
            &[
                &id,
                &self.worker_id,
                &q.field,
                &q.reason,
                &message,
                &waits_kind,
                &waits_key,
            ],
        )
        .await?;
        Ok(())
    }

    /// Makes sure a record the platform needs first (a patient, a department) is on its way.
    /// A quarantined one stays as it is: the DBA fixes and retries it, then this one follows.
    pub async fn ensure_enqueued(&self, kind: Kind, key: &str) -> Result<(), WorkerError> {
        self.execute_cached(
            "INSERT INTO hmr.outbox (kind, key, op)
                 SELECT $1, $2, 'S'
                  WHERE NOT EXISTS (SELECT 1 FROM hmr.outbox WHERE kind = $1 AND key = $2)",
            &[&kind.as_str(), &key],
        )
        .await?;
        Ok(())
    }

    /// Whether the record has a quarantined event (its DBA must fix it first).
    pub async fn is_quarantined(&self, kind: Kind, key: &str) -> Result<bool, WorkerError> {
        Ok(self
            .query_one_cached(
                "SELECT EXISTS (SELECT 1 FROM hmr.outbox WHERE kind = $1 AND key = $2 AND state = 'quarantined')",
                &[&kind.as_str(), &key],
            )
            .await?
            .get(0))
    }

    /// Forgets what we believed the platform holds of a record (it said it lacks it).
    pub async fn forget_delivered(&self, kind: Kind, key: &str) -> Result<(), WorkerError> {
        self.execute_cached(
            "DELETE FROM hmr.delivered WHERE kind = $1 AND key = $2",
            &[&kind.as_str(), &key],
        )
        .await?;
        Ok(())
    }

    /// Takes this worker off `hmr.sleepers` (shutdown; a claim does it otherwise).
    pub async fn awake(&self) -> Result<(), WorkerError> {
        self.execute_cached("DELETE FROM hmr.sleepers WHERE worker = $1", &[&self.worker_id])
            .await?;
        Ok(())
    }

    /// Records the decisions taken on the platform's page for a check (§6) as the check's
    /// current ones (`source = 'page'`); returns how many were new. A HIS decision for the same
    /// order that differs is superseded by the page's, which the platform already holds.
    pub async fn adopt_page_decisions(&self, answer: &hmr_protocol::CheckDecisions) -> Result<u64, WorkerError> {
        let mut adopted = 0;
        for d in answer
            .decisions
            .iter()
            .filter(|d| d.source == hmr_protocol::DecisionSource::Page)
        {
            let row = self
                .query_one_cached(
                    "SELECT hmr.adopt_page_decision($1, $2, $3, $4, $5, $6, $7, $8::text::timestamptz)",
                    &[
                        &answer.check_id,
                        &d.order_id,
                        &d.report_id,
                        &d.recognise,
                        &d.reason_code,
                        &d.reason_text,
                        &d.doctor_no,
                        &d.decided_at,
                    ],
                )
                .await?;
            adopted += u64::try_from(row.get::<_, i32>(0)).unwrap_or(0);
        }
        Ok(adopted)
    }

    /// Drops an event's frozen plan so that it is planned again from the records' current
    /// state, under new request ids (a new generation): what the platform refused as already
    /// decided is sent again merged with the page's decisions.
    pub async fn replan(&self, id: i64, why: &str) -> Result<(), WorkerError> {
        self.execute_cached(
            "UPDATE hmr.outbox SET state = 'pending', plan = NULL, plan_pdf = NULL, step = 0,
                    generation = generation + 1, lease_owner = NULL, lease_until = NULL,
                    next_attempt_at = now(), last_error = $3
              WHERE id = $2 AND lease_owner = $1",
            &[&self.worker_id, &id, &why],
        )
        .await?;
        Ok(())
    }

    /// The platform refused a check's decisions: they stop counting (hmr.order_recognitions).
    pub async fn refuse_check(&self, check_id: &str, reason: &str) -> Result<(), WorkerError> {
        self.execute_cached(
            "UPDATE hmr.checks SET refused_at = now(), refused_reason = $2 WHERE check_id = $1",
            &[&check_id, &reason],
        )
        .await?;
        Ok(())
    }

    /// Moves checks and prompts kept outside their transactions into their tables.
    pub async fn ingest_kept(&self) -> Result<i32, WorkerError> {
        Ok(self.query_one_cached("SELECT hmr.ingest_kept()", &[]).await?.get(0))
    }

    /// Shares this worker's 429 pause with the SQL calls and returns the org's (shared memory,
    /// `hmr.note_rate_limit`), so both honour a Retry-After whoever received it.
    pub async fn share_pause(&self, seconds: f64) -> Result<f64, WorkerError> {
        Ok(self
            .query_one_cached("SELECT hmr.note_rate_limit($1)", &[&seconds])
            .await?
            .get(0))
    }

    /// Seconds until the next pending event is due (None: nothing pending).
    pub async fn next_due(&self) -> Result<Option<f64>, WorkerError> {
        let row = self
            .query_opt_cached(
                // Only events that can be claimed: a new event ('-infinity') behind a backing-off
                // one of its record is due when that one is. Clamped to now, so an infinite time
                // never reaches the subtraction (22008).
                "SELECT extract(epoch FROM greatest(m, now()) - now())::float8
                   FROM (SELECT min(least(CASE WHEN o.state = 'pending' THEN o.next_attempt_at END,
                                          CASE WHEN o.state = 'claimed' THEN o.lease_until END)) AS m
                           FROM hmr.outbox o
                          WHERE o.state <> 'quarantined'
                            AND NOT EXISTS (SELECT 1 FROM hmr.outbox e
                                             WHERE e.kind = o.kind AND e.key = o.key AND e.id < o.id
                                               AND e.state <> 'quarantined')) d
                  WHERE m IS NOT NULL",
                &[],
            )
            .await?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// Returns this worker's unfinished claims to the queue (graceful shutdown).
    pub async fn release_claims(&self) -> Result<u64, WorkerError> {
        self.execute_cached(
            "UPDATE hmr.outbox SET state = 'pending', lease_owner = NULL, lease_until = NULL,
                    attempts = greatest(attempts - 1, 0)
              WHERE lease_owner = $1 AND state = 'claimed'",
            &[&self.worker_id],
        )
        .await
    }

    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The views a kind is read from, for messages.
    pub fn source_names(&self, kind: Kind) -> String {
        match self.sources.get(&kind) {
            Some(KindSource {
                relation,
                item_relation: Some(items),
                ..
            }) => format!("{relation}, {items}"),
            Some(src) => src.relation.clone(),
            None => format!("no source view configured for {kind}"),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
