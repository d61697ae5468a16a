//! Prometheus `/metrics` and a `/health` endpoint on a small loopback HTTP listener. Counters
//! live in the process; the backlog comes from the database (`hmr.status`), sampled by the
//! drain loop, so a scrape never waits on the database.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Default)]
pub struct Metrics {
    delivered: Mutex<BTreeMap<String, u64>>,
    pub quarantined: AtomicU64,
    pub retries: AtomicU64,
    pub rounds: AtomicU64,
    /// 2xx answers that were not the platform's envelope, and redirects (never followed).
    pub unexpected_answers: AtomicU64,
    /// Events whose source view failed to read (the event waits; the others go on).
    pub source_errors: AtomicU64,
    /// The HIS database failed or went away (the worker reconnects): not the platform.
    pub database_errors: AtomicU64,
    /// `hmr.status` columns, as last sampled.
    backlog: Mutex<Vec<(String, f64)>>,
    /// Totals kept in the database (prompts, decisions, uploads), as last sampled: counters
    /// whoever recorded them (doctors' sessions, any worker), `(name, labels, value)`.
    statistics: Mutex<Vec<(&'static str, String, f64)>>,
    last_loop: Mutex<Option<Instant>>,
}

fn statistic_help(name: &str) -> &'static str {
    match name {
        "prompts_total" => "Duplicates a doctor was warned of (orders a refused save left undecided).",
        "decisions_total" => "Doctors' decisions that count, by outcome and 不互认 reason.",
        "list_calls_total" => "Recognition list calls (调阅).",
        "uploads_total" => "Report uploads the platform accepted (versions and revokes).",
        "uploads_on_time_total" => "Report uploads accepted within 24 hours of the approval.",
        _ => "",
    }
}

impl Metrics {
    pub fn delivered(&self, kind: &str, n: u64) {
        *self
            .delivered
            .lock()
            .expect("metrics")
            .entry(kind.to_string())
            .or_default() += n;
    }

    pub fn alive(&self) {
        *self.last_loop.lock().expect("metrics") = Some(Instant::now());
        self.rounds.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_backlog(&self, values: Vec<(String, f64)>) {
        *self.backlog.lock().expect("metrics") = values;
    }

    pub fn set_statistics(&self, values: Vec<(&'static str, String, f64)>) {
        *self.statistics.lock().expect("metrics") = values;
    }

    /// Healthy while the drain loop turned within the last `within`.
    pub fn healthy(&self, within: Duration) -> bool {
        self.last_loop
            .lock()
            .expect("metrics")
            .is_some_and(|t| t.elapsed() < within)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP hmr_events_delivered_total Events delivered to the platform, by kind."
        );
        let _ = writeln!(out, "# TYPE hmr_events_delivered_total counter");
        for (kind, n) in self.delivered.lock().expect("metrics").iter() {
            let _ = writeln!(out, "hmr_events_delivered_total{{kind=\"{kind}\"}} {n}");
        }
        for (name, help, v) in [
            (
                "hmr_events_quarantined_total",
                "Events quarantined by this worker.",
                &self.quarantined,
            ),
            (
                "hmr_retries_total",
                "Deliveries put back to wait (backoff, Retry-After, dependency).",
                &self.retries,
            ),
            ("hmr_drain_rounds_total", "Turns of the drain loop.", &self.rounds),
            (
                "hmr_unexpected_answers_total",
                "Answers that were not the platform's (2xx without its envelope, redirects): retried.",
                &self.unexpected_answers,
            ),
            (
                "hmr_source_errors_total",
                "Source-view reads that failed for one event (it backs off; the others go on).",
                &self.source_errors,
            ),
            (
                "hmr_database_errors_total",
                "The HIS database failed or closed the connection (the worker reconnects).",
                &self.database_errors,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        for (column, value) in self.backlog.lock().expect("metrics").iter() {
            let _ = writeln!(out, "# TYPE hmr_{column} gauge\nhmr_{column} {value}");
        }
        let mut family = "";
        for (name, labels, value) in self.statistics.lock().expect("metrics").iter() {
            if *name != family {
                family = name;
                let _ = writeln!(
                    out,
                    "# HELP hmr_{name} {}\n# TYPE hmr_{name} counter",
                    statistic_help(name)
                );
            }
            let _ = writeln!(out, "hmr_{name}{labels} {value}");
        }
        out
    }
}

/// Serves `/metrics` and `/health` until the process ends.
pub async fn serve(listen: String, metrics: std::sync::Arc<Metrics>, healthy_within: Duration) {
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%listen, error = %e, "metrics endpoint not started");
            return;
        }
    };
    tracing::info!(%listen, "metrics on /metrics, health on /health");
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/metrics" => ("200 OK", metrics.render()),
                "/health" if metrics.healthy(healthy_within) => ("200 OK", "ok\n".to_string()),
                "/health" => ("503 Service Unavailable", "the drain loop is not turning\n".to_string()),
                _ => ("404 Not Found", "try /metrics or /health\n".to_string()),
            };
            let answer = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(answer.as_bytes()).await;
        });
    }
}
