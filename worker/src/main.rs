//! `hmr-worker`: drains the hmr outbox to the city mutual-recognition platform.

mod backfill;
mod config;
mod drain;
mod error;
mod metrics;
mod monthly_report;
mod plan;
mod platform;
mod serve;
mod store;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::Notify;

use crate::config::Config;
use crate::drain::Drainer;
use crate::platform::Platform;
use crate::store::Store;

#[derive(Parser)]
#[command(
    name = "hmr-worker",
    version,
    about = "Drains the hmr outbox to the city mutual-recognition platform"
)]
struct Cli {
    /// Configuration file (TOML); HMR_* environment variables override it.
    #[arg(long, short, env = "HMR_CONFIG", default_value = "/etc/hmr/worker.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Deliver events until SIGTERM or SIGINT (the default).
    Run,
    /// Backlog, oldest event, quarantine, stuck records, token state and platform reachability
    /// (also `check`: the database and a token, before go-live).
    #[command(visible_alias = "check")]
    Status,
    /// Enqueue every existing record of a kind (patients, departments, staff, lab, exam)
    /// through the outbox. Interrupt it at will: run it again to resume.
    Backfill {
        /// patients | departments | staff | lab | exam
        kind: String,
        /// Only records changed (reports: reported) since this time, e.g. 2024-01-01T00:00:00+08:00.
        #[arg(long)]
        since: Option<String>,
        /// Records per page (each page commits with its checkpoint).
        #[arg(long, default_value_t = 5000)]
        page: i32,
    },
    /// The recognition services for terminals that cannot call SQL: an HL7 CDS Hooks service
    /// (patient-view, order-select, order-sign, feedback), a JSON API and the widget. Over
    /// TLS with terminals configured on any address; otherwise on loopback only.
    Serve {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: std::net::SocketAddr,
    },
    /// The month's 互认 and upload statistics for the 医务科: an HTML page with charts and/or
    /// CSV files.
    Report {
        /// The month, e.g. 2026-11.
        #[arg(long)]
        month: String,
        /// The HTML page to write.
        #[arg(long)]
        out: Option<PathBuf>,
        /// A directory for CSV files.
        #[arg(long)]
        csv: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(&cli.config)?;
    init_logging(config.worker.json_logs);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Run) {
            Command::Run => run(config).await,
            Command::Status => status(config).await,
            Command::Serve { listen } => Ok(serve::run(config.database.url.expose(), listen, &config.serve).await?),
            Command::Report { month, out, csv } => {
                anyhow::ensure!(
                    month.len() == 7 && chrono::NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d").is_ok(),
                    "--month is a month like 2026-11, not {month:?}"
                );
                anyhow::ensure!(
                    out.is_some() || csv.is_some(),
                    "give --out report.html and/or --csv DIR"
                );
                let m = monthly_report::read(config.database.url.expose(), &month).await?;
                if let Some(out) = out {
                    monthly_report::register_font(std::path::Path::new(&config.pdf.font))?;
                    std::fs::write(&out, monthly_report::html(&m, &config.pdf.hospital_name)?)?;
                    println!("{}", out.display());
                }
                if let Some(dir) = csv {
                    monthly_report::csv(&m, &dir)?;
                    println!("{}", dir.display());
                }
                Ok(())
            }
            Command::Backfill { kind, since, page } => {
                let kind = hmr_protocol::Kind::from_word(&kind)
                    .filter(|k| *k != hmr_protocol::Kind::Decision)
                    .ok_or_else(|| {
                        anyhow::anyhow!("unknown kind {kind:?}: patients, departments, staff, lab or exam")
                    })?;
                let s = backfill::run(config.database.url.expose(), kind, since.as_deref(), page.max(1)).await?;
                let rate = s.enqueued as f64 / s.elapsed.as_secs_f64().max(1e-3);
                println!(
                    "backfill #{} {kind}: {} of {} enqueued{} ({rate:.0} records/s this run)",
                    s.id,
                    s.enqueued,
                    s.total,
                    if s.finished {
                        ", finished"
                    } else {
                        ", interrupted: run the same command again to resume"
                    }
                );
                Ok(())
            }
        }
    })
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HMR_LOG").unwrap_or_else(|_| "info".into());
    // Colours only for a person at a terminal: a file or the journal gets plain text.
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// What an operator asks first: backlog, oldest event, quarantine, stuck records, and
/// whether the platform gives us tokens.
async fn status(config: Config) -> anyhow::Result<()> {
    let wake = Arc::new(Notify::new());
    let metrics = Arc::new(metrics::Metrics::default());
    let store = Store::connect(
        config.database.url.expose(),
        &config.database.timezone,
        "status",
        Duration::from_secs(1),
        wake,
        metrics,
    )
    .await
    .context("database")?;
    println!("database: ok");
    for (name, value) in store.status().await? {
        println!("  {name:<26} {value}");
    }
    println!("backlog per kind (pending / in flight / quarantined, oldest):");
    for row in store
        .client()
        .query(
            "SELECT kind, pending, in_flight, quarantined, coalesce(oldest::text, '-') FROM hmr.backlog ORDER BY kind",
            &[],
        )
        .await?
    {
        let (kind, p, f, q, oldest): (String, i64, i64, i64, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        println!("  {kind:<12} {p:>8} {f:>8} {q:>8}  {oldest}");
    }
    let platform = Platform::new(config.platform.clone(), Arc::new(metrics::Metrics::default()))?;
    let mut worst = platform::Reachability::Ok;
    for scope in hmr_protocol::Scope::ALL {
        let found = platform.probe(scope).await;
        println!("token {:<12} {found}", scope.as_str());
        if worst == platform::Reachability::Ok {
            worst = found;
        }
    }
    println!("platform: {worst}");
    if worst != platform::Reachability::Ok {
        anyhow::bail!("the platform cannot be used: {worst}");
    }
    Ok(())
}

async fn run(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let worker_id = config.worker_id();
    let metrics = Arc::new(metrics::Metrics::default());
    let platform = Platform::new(config.platform.clone(), metrics.clone())?;
    let pdf_renderer = pdf_renderer(&config)?;
    if let Some(listen) = config.worker.metrics_listen.clone() {
        let healthy_within = Duration::from_millis(config.worker.poll_interval_ms * 3 + config.platform.timeout_ms * 2);
        tokio::spawn(metrics::serve(listen, metrics.clone(), healthy_within));
    }
    let stopping = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(Notify::new());
    {
        let (stopping, stop) = (stopping.clone(), stop.clone());
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("stopping: finishing what is in flight");
            notify_systemd("STOPPING=1");
            stopping.store(true, Ordering::SeqCst);
            stop.notify_waiters();
        });
    }
    tracing::info!(worker = %worker_id, platform = %config.platform.base_url, "hmr-worker started");
    notify_systemd("READY=1");
    let poll = Duration::from_millis(config.worker.poll_interval_ms);
    let lease = Duration::from_secs(config.worker.lease_secs);
    let mut reconnect_delay = Duration::from_millis(200);
    while !stopping.load(Ordering::SeqCst) {
        let wake = Arc::new(Notify::new());
        let store = match Store::connect(
            config.database.url.expose(),
            &config.database.timezone,
            &worker_id,
            lease,
            wake.clone(),
            metrics.clone(),
        )
        .await
        {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::warn!(error = %e, delay = ?reconnect_delay, "cannot connect to the database; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(reconnect_delay) => {}
                    _ = stop.notified() => {}
                }
                reconnect_delay = (reconnect_delay * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        let connected_at = std::time::Instant::now();
        let drainer = Drainer {
            store: store.clone(),
            platform: platform.clone(),
            config: config.clone(),
            pdf_renderer: pdf_renderer.clone(),
        };
        let result = drain_until_stopped(&drainer, &store, &wake, &stopping, &stop, poll, &metrics).await;
        match result {
            Ok(()) => {
                let released = store.release_claims().await.unwrap_or(0);
                let _ = store.awake().await;
                tracing::info!(released, "hmr-worker stopped");
                return Ok(());
            }
            Err(e) => {
                // A connection that served a while earns a quick reconnect; a failing one backs off.
                if connected_at.elapsed() > Duration::from_secs(30) {
                    reconnect_delay = Duration::from_millis(200);
                }
                // Which side failed: the database here (a platform failure is an outcome of a
                // delivery, retried without leaving this loop).
                let side = match &e {
                    error::WorkerError::Transport(_) | error::WorkerError::Answer(_) | error::WorkerError::Token(_) => {
                        "platform"
                    }
                    _ => {
                        metrics
                            .database_errors
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        "database"
                    }
                };
                tracing::warn!(error = %e, side, delay = ?reconnect_delay, "reconnecting to the database");
                tokio::select! {
                    _ = tokio::time::sleep(reconnect_delay) => {}
                    _ = stop.notified() => {}
                }
                reconnect_delay = (reconnect_delay * 2).min(Duration::from_secs(10));
            }
        }
    }
    Ok(())
}

/// Loads the report template and font once, at start: a bad template stops the worker
/// with a clear message instead of quarantining every report.
fn pdf_renderer(config: &Config) -> anyhow::Result<Option<Arc<hmr_pdf::Renderer>>> {
    if !config.pdf.render {
        return Ok(None);
    }
    let template = match &config.pdf.template {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("pdf.template {path}"))?;
            hmr_pdf::Template::from_toml(&text).with_context(|| format!("pdf.template {path}"))?
        }
        None => hmr_pdf::Template::builtin(),
    };
    let renderer = hmr_pdf::Renderer::from_font_file(template, std::path::Path::new(&config.pdf.font))
        .with_context(|| format!("pdf.font {}", config.pdf.font))?;
    Ok(Some(Arc::new(renderer)))
}

/// Tells systemd (Type=notify) about our state; a no-op outside systemd.
fn notify_systemd(state: &str) {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        if let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() {
            let _ = socket.send_to(state.as_bytes(), path);
        }
    }
}

/// Claims and delivers while there is work; sleeps (announced in `hmr.sleepers`, so the
/// capture trigger NOTIFYs) when there is none, at most `poll` or until the next retry is due.
async fn drain_until_stopped(
    drainer: &Drainer,
    store: &Store,
    wake: &Notify,
    stopping: &AtomicBool,
    stop: &Notify,
    poll: Duration,
    metrics: &metrics::Metrics,
) -> Result<(), error::WorkerError> {
    let grace = Duration::from_secs(drainer.config.worker.shutdown_grace_secs);
    let poll_sources_every = Duration::from_millis(drainer.config.worker.poll_sources_ms);
    let mut sources_polled: Option<std::time::Instant> = None;
    // The backlog figures count the outbox (seconds with a million events waiting): only when
    // someone can read them, and not on every poll.
    let serve_metrics = drainer.config.worker.metrics_listen.is_some();
    let mut measured: Option<std::time::Instant> = None;
    let mut housekept: Option<std::time::Instant> = None;
    let recheck_every = Duration::from_secs(drainer.config.worker.recheck_kept_secs.max(1));
    let mut rechecked: Option<std::time::Instant> = None;
    // The org's 429 pause as last shared with the database (shared memory: every backend's SQL
    // calls and every worker process honour it).
    let mut shared_until: Option<std::time::Instant> = None;
    let mut pause_read: Option<std::time::Instant> = None;
    loop {
        if stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        metrics.alive();
        // One 429 pause for the org (contract §7): a pause the drain has just received holds
        // the SQL calls at once, not at the next tick; one the SQL calls or another worker
        // received reaches this worker within a second.
        let paused = drainer.platform.paused_secs();
        let now = std::time::Instant::now();
        let news = paused > 0.0
            && shared_until
                .is_none_or(|until| now + Duration::from_secs_f64(paused) > until + Duration::from_millis(500));
        if news || pause_read.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            pause_read = Some(now);
            let shared = store.share_pause(paused).await?;
            if shared > 0.0 {
                drainer.platform.pause(Duration::from_secs_f64(shared));
                shared_until = Some(now + Duration::from_secs_f64(shared));
            }
        }
        if sources_polled.is_none_or(|t| t.elapsed() >= poll_sources_every) {
            sources_polled = Some(std::time::Instant::now());
            if serve_metrics && measured.is_none_or(|t| t.elapsed() >= Duration::from_secs(15)) {
                measured = Some(std::time::Instant::now());
                metrics.set_backlog(store.status().await?);
                // The statistics' totals; a database without them (an older extension) is not
                // an error for the drain.
                match store.statistics().await {
                    Ok(s) => metrics.set_statistics(s),
                    Err(e) => tracing::debug!(error = %e, "statistics not read"),
                }
            }
            if housekept.is_none_or(|t: std::time::Instant| t.elapsed() >= Duration::from_secs(3600)) {
                housekept = Some(std::time::Instant::now());
                let removed = store
                    .purge_history(drainer.config.worker.history_retention_days)
                    .await?;
                if removed > 0 {
                    tracing::info!(removed, "old history removed");
                }
            }
            if rechecked.is_none_or(|t: std::time::Instant| t.elapsed() >= recheck_every.min(Duration::from_secs(60))) {
                rechecked = Some(std::time::Instant::now());
                drainer.recheck_retained(recheck_every).await?;
            }
            // Checks and prompts a refused save kept outside its transaction.
            store.ingest_kept().await?;
            let found = store.poll_sources().await?;
            if found > 0 {
                tracing::info!(events = found, "polled sources");
            }
        }
        if store.is_closed() {
            return Err(error::WorkerError::DbLost("the server closed the connection".into()));
        }
        let round = drainer.round(None);
        let claimed = tokio::select! {
            r = round => r?,
            _ = async { stop.notified().await; tokio::time::sleep(grace).await } => return Ok(()),
        };
        if claimed > 0 {
            continue;
        }
        // Look once more while announcing the sleep: an event committed before the flag was
        // visible sent no NOTIFY.
        if drainer.round(Some(poll * 3)).await? > 0 {
            continue;
        }
        let due = store.next_due().await?.map(|s| Duration::from_secs_f64(s.max(0.0)));
        let wait = due.map_or(poll, |d| d.min(poll));
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.notified() => {}
        }
    }
}
