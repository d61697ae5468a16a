//! `hmr-worker backfill`: enqueues every existing record of a kind through the outbox, page
//! by page (`hmr.backfill_page`, which commits each page with its checkpoint). Interrupted,
//! it stops after the current page; run again, it resumes where it stopped.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use crate::error::WorkerError;

pub struct Summary {
    pub id: i64,
    pub enqueued: i64,
    pub total: i64,
    pub finished: bool,
    pub elapsed: Duration,
}

pub async fn run(url: &str, kind: hmr_protocol::Kind, since: Option<&str>, page: i32) -> Result<Summary, WorkerError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let since_param: Option<String> = since.map(str::to_string);
    // Two statements: a row the function inserts is not visible to the statement calling it.
    let id: i64 = client
        .query_one(
            "SELECT hmr.backfill_start($1, $2::text::timestamptz)",
            &[&kind.as_str(), &since_param],
        )
        .await?
        .get(0);
    let row = client
        .query_one(
            "SELECT id, enqueued, total, last_key IS NOT NULL FROM hmr.backfills WHERE id = $1",
            &[&id],
        )
        .await?;
    let (id, mut enqueued, total, resumed): (i64, i64, i64, bool) = (row.get(0), row.get(1), row.get(2), row.get(3));
    if resumed {
        tracing::info!(backfill = id, %kind, enqueued, total, "resuming backfill");
    } else {
        tracing::info!(backfill = id, %kind, total, "backfill started");
    }

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            interrupted.store(true, Ordering::SeqCst);
        });
    }
    let progress = Progress::new(total, enqueued);
    let started = Instant::now();
    let mut finished = false;
    while !interrupted.load(Ordering::SeqCst) {
        let n: i32 = client
            .query_one("SELECT hmr.backfill_page($1, $2)", &[&id, &page])
            .await?
            .get(0);
        enqueued += i64::from(n);
        progress.show(enqueued);
        if n < page {
            finished = true;
            break;
        }
    }
    progress.done();
    Ok(Summary {
        id,
        enqueued,
        total,
        finished,
        elapsed: started.elapsed(),
    })
}

/// A progress bar with rate and ETA on a terminal; a log line every few seconds otherwise.
struct Progress {
    total: i64,
    start_count: i64,
    started: Instant,
    last_line: std::sync::Mutex<Instant>,
    tty: bool,
}

impl Progress {
    fn new(total: i64, start_count: i64) -> Progress {
        let now = Instant::now();
        Progress {
            total,
            start_count,
            started: now,
            last_line: std::sync::Mutex::new(now),
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn show(&self, done: i64) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = (done - self.start_count) as f64 / secs;
        let left = (self.total - done).max(0);
        let eta = if rate > 0.0 { left as f64 / rate } else { 0.0 };
        let pct = if self.total > 0 {
            100.0 * done as f64 / self.total as f64
        } else {
            100.0
        };
        if self.tty {
            let filled = ((pct / 100.0) * 30.0).round().clamp(0.0, 30.0) as usize;
            let _ = write!(
                std::io::stderr(),
                "\r[{}{}] {pct:5.1}% {done}/{} {rate:.0}/s ETA {eta:.0}s   ",
                "#".repeat(filled),
                ".".repeat(30 - filled),
                self.total
            );
        } else {
            let mut last = self.last_line.lock().expect("progress lock");
            if last.elapsed() >= Duration::from_secs(2) {
                *last = Instant::now();
                tracing::info!(
                    enqueued = done,
                    total = self.total,
                    rate = rate as u64,
                    eta_secs = eta as u64,
                    "backfill progress"
                );
            }
        }
    }

    fn done(&self) {
        if self.tty {
            let _ = writeln!(std::io::stderr());
        }
    }
}
