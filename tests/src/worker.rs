//! The worker as a process: its configuration, start, stop, metrics and rounds.

use super::*;

/// Options of a worker under test.
#[derive(Clone)]
pub struct WorkerOptions {
    pub poll_interval_ms: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub lease_secs: u64,
    pub timeout_ms: u64,
    pub batch_size: i64,
    pub auth: &'static str,
    /// The database role the worker logs in as.
    pub db_user: &'static str,
    /// Render report PDFs when the source has none.
    pub render_pdf: bool,
    /// The database the worker serves (default `his`).
    pub database: Option<&'static str>,
    /// `worker.recheck_kept_secs`; None leaves it out (the product's default).
    pub recheck_kept_secs: Option<u64>,
    /// A whole connection string instead of the cluster's (several hosts, for a failover).
    pub url: Option<String>,
    /// `worker.metrics_listen` (Prometheus `/metrics`), e.g. `127.0.0.1:9187`.
    pub metrics_listen: Option<String>,
    /// `worker.poll_sources_ms`: the worker's housekeeping tick (polled sources, kept checks).
    pub poll_sources_ms: u64,
    /// More TOML appended to the configuration (other sections, e.g. `[serve]`).
    pub extra_config: Option<String>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            poll_interval_ms: 200,
            backoff_base_ms: 50,
            backoff_max_ms: 1000,
            lease_secs: 5,
            timeout_ms: 3000,
            batch_size: 200,
            auth: "password",
            db_user: "postgres",
            render_pdf: true,
            database: None,
            // Rechecks of kept copies stay out of the way of tests that count calls.
            recheck_kept_secs: Some(21600),
            url: None,
            metrics_listen: None,
            extra_config: None,
            poll_sources_ms: 300,
        }
    }
}

impl WorkerOptions {
    /// These options with the worker's `/metrics` on a free loopback port, so a test can wait
    /// on its drain loop (`Worker::wait_rounds`).
    pub fn with_metrics(self) -> Result<WorkerOptions> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Ok(WorkerOptions {
            metrics_listen: Some(format!("127.0.0.1:{port}")),
            ..self
        })
    }
}

pub struct Worker {
    child: Child,
    pub log_path: PathBuf,
    pub config_path: PathBuf,
    /// `http://…/metrics` when the options gave `metrics_listen`.
    metrics_url: Option<String>,
}

impl Worker {
    pub fn start(cluster: &Cluster, sim: &Sim, options: &WorkerOptions) -> Result<Worker> {
        let dir = unique_dir("hmr-e2e-worker");
        let config_path = dir.join("worker.toml");
        let config = format!(
            r#"[database]
url = "{url}"

[platform]
base_url = "{base}"
org_code = "{ORG_CODE}"
auth = "{auth}"
username = "hz1"
password = "hz1-secret"
app_id = "hz1-app"
app_secret = "hz1-app-secret"
timeout_ms = {timeout}

[worker]
poll_interval_ms = {poll}
poll_sources_ms = {poll_sources}
backoff_base_ms = {bb}
backoff_max_ms = {bm}
lease_secs = {lease}
batch_size = {batch}
shutdown_grace_secs = 2
{recheck}
{metrics}

[pdf]
render = {render}
hospital_name = "惠州市第一人民医院"

{extra}
"#,
            url = options.url.clone().unwrap_or_else(|| {
                cluster
                    .url(options.database.unwrap_or("his"))
                    .replace("user=postgres", &format!("user={}", options.db_user))
            }),
            base = sim.base,
            auth = options.auth,
            timeout = options.timeout_ms,
            poll = options.poll_interval_ms,
            bb = options.backoff_base_ms,
            poll_sources = options.poll_sources_ms,
            bm = options.backoff_max_ms,
            lease = options.lease_secs,
            batch = options.batch_size,
            render = options.render_pdf,
            recheck = options
                .recheck_kept_secs
                .map_or(String::new(), |s| format!("recheck_kept_secs = {s}")),
            extra = options.extra_config.clone().unwrap_or_default(),
            metrics = options
                .metrics_listen
                .as_ref()
                .map(|m| format!("metrics_listen = \"{m}\""))
                .unwrap_or_default(),
        );
        std::fs::write(&config_path, config)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o600))?;
        let log_path = dir.join("worker.log");
        let mut worker = Worker {
            child: spawn_worker(&config_path, &log_path)?,
            log_path,
            config_path,
            metrics_url: options.metrics_listen.as_ref().map(|m| format!("http://{m}/metrics")),
        };
        worker.ensure_running()?;
        Ok(worker)
    }

    fn ensure_running(&mut self) -> Result<()> {
        std::thread::sleep(Duration::from_millis(50));
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "worker exited at once ({status}): {}",
                std::fs::read_to_string(&self.log_path).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// SIGKILL: no chance to release anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a graceful exit.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        Ok(self.child.wait()?)
    }

    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.child = spawn_worker(&self.config_path, &self.log_path)?;
        self.ensure_running()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Turns of the drain loop begun so far (`hmr_drain_rounds_total`, counted as each turn
    /// starts); `None` while `/metrics` does not answer (not yet, or not within 2 s). Needs
    /// `WorkerOptions::with_metrics`.
    pub async fn rounds(&self) -> Result<Option<u64>> {
        let url = self
            .metrics_url
            .as_deref()
            .context("the worker has no /metrics: start it with WorkerOptions::with_metrics")?;
        // A stopped worker accepts the connection (the kernel does) but never answers.
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let Ok(text) = async { client.get(url).send().await?.error_for_status()?.text().await }.await else {
            return Ok(None);
        };
        let rounds = text
            .lines()
            .find_map(|l| l.strip_prefix("hmr_drain_rounds_total "))
            .with_context(|| format!("no hmr_drain_rounds_total in /metrics:\n{text}"))?;
        Ok(Some(rounds.trim().parse()?))
    }

    /// Waits until the drain loop has begun `turns` more turns than it had begun when this is
    /// called (the first answer of `/metrics` after the call). The turn under way then may have
    /// looked before the caller's change; with `turns` ≥ 2 at least one whole turn began after
    /// it (each turn claims and delivers everything due, and polls the sources when their
    /// interval is up), so the worker has had its chance to act on the change.
    pub async fn wait_rounds(&self, turns: u64) -> Result<()> {
        let start = Instant::now();
        let timeout = Duration::from_secs(30);
        let mut base = None;
        loop {
            let now = self.rounds().await?;
            match (base, now) {
                (None, Some(n)) => base = Some(n),
                (Some(b), Some(n)) if n >= b + turns => return Ok(()),
                _ => {}
            }
            if start.elapsed() > timeout {
                bail!(
                    "timed out after {timeout:?} waiting for {turns} turns of the worker's drain loop \
                     (turns begun: first {base:?}, now {now:?}); the end of its log:\n{}",
                    tail(&self.log(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub(crate) fn spawn_worker(config: &Path, log: &Path) -> Result<Child> {
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    Command::new(bin_dir().join("hmr-worker"))
        .arg("--config")
        .arg(config)
        .arg("run")
        .env("HMR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("starting hmr-worker (is it built?)")
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A report the other hospital holds for one of our patients: identity number, birth date,
/// report number, data code, reported this many days ago.
pub type ElsewhereReport<'a> = (&'a str, &'a str, &'a str, &'a str, i64);
