//! End-to-end harness: a throwaway PostgreSQL 15 cluster (initdb in a temp dir as user
//! `postgres`, unix socket only), the platform simulator and the worker as real processes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The hospital the worker serves in tests, and a second one for shared reports.
pub const ORG_CODE: &str = "124413004567890125";
pub const ORG_NAME: &str = "惠州市第一人民医院";
pub const OTHER_ORG_CODE: &str = "124413004567890200";
pub const OTHER_ORG_NAME: &str = "惠州市中心人民医院";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// The cargo target directory holding the built binaries (…/target/debug).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/<test> or target/debug/<bin> → target/debug
    let dir = exe.parent().expect("a directory");
    if dir.ends_with("deps") {
        dir.parent().expect("target/debug")
    } else {
        dir
    }
    .to_path_buf()
}

pub fn unique_dir(prefix: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A directory of the PostgreSQL installation (`pg_config --sharedir` …).
pub fn pg_config(what: &str) -> Result<String> {
    let out = Command::new(format!("{PG_BIN}/pg_config")).arg(what).output()?;
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// The extension's objects as lines of text (one per object: what it is and its full
/// definition, owner-independent; grants as a set, since their order means nothing), to
/// compare an upgraded database with a fresh install.
pub async fn extension_schema(client: &Client) -> Result<Vec<String>> {
    let rows = client
        .query(
            "WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'hmr'),
             members AS (
                SELECT d.classid, d.objid FROM pg_depend d, ext
                 WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e')
             SELECT pg_describe_object(m.classid, m.objid, 0) || E'\n' || coalesce(CASE m.classid
               WHEN 'pg_proc'::regclass THEN
                 (SELECT CASE WHEN p.prokind = 'a' THEN 'aggregate' ELSE pg_get_functiondef(p.oid) END
                         || ' acl=' || coalesce((SELECT string_agg(a::text, ',' ORDER BY a::text) FROM unnest(p.proacl) a), '-')
                    FROM pg_proc p WHERE p.oid = m.objid)
               WHEN 'pg_class'::regclass THEN
                 (SELECT c.relkind::text || ' options=' || coalesce(c.reloptions::text, '-')
                         || ' acl=' || coalesce((SELECT string_agg(a::text, ',' ORDER BY a::text) FROM unnest(c.relacl) a), '-')
                         || ' rls=' || c.relrowsecurity
                         || E'\ncolumns: ' || coalesce((SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                                 || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
                                 || coalesce(' default ' || pg_get_expr(ad.adbin, ad.adrelid), '')
                                 || ' storage=' || a.attstorage::text, ', ' ORDER BY a.attnum)
                              FROM pg_attribute a LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
                             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '')
                         || E'\nconstraints: ' || coalesce((SELECT string_agg(co.conname || ' ' || pg_get_constraintdef(co.oid), '; ' ORDER BY co.conname)
                              FROM pg_constraint co WHERE co.conrelid = c.oid), '')
                         || E'\nindexes: ' || coalesce((SELECT string_agg(pg_get_indexdef(i.indexrelid), '; ' ORDER BY pg_get_indexdef(i.indexrelid))
                              FROM pg_index i WHERE i.indrelid = c.oid), '')
                         || E'\ntriggers: ' || coalesce((SELECT string_agg(pg_get_triggerdef(t.oid) || ' ' || t.tgenabled::text, '; ' ORDER BY t.tgname)
                              FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal), '')
                         || E'\nview: ' || CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) ELSE '' END
                         || E'\ncomment: ' || coalesce(obj_description(c.oid, 'pg_class'), '')
                    FROM pg_class c WHERE c.oid = m.objid)
               WHEN 'pg_type'::regclass THEN
                 (SELECT format_type(t.oid, NULL) || ' ' || t.typtype::text || ' '
                         || coalesce((SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder) FROM pg_enum e WHERE e.enumtypid = t.oid), '')
                    FROM pg_type t WHERE t.oid = m.objid)
               WHEN 'pg_namespace'::regclass THEN
                 (SELECT 'acl=' || coalesce((SELECT string_agg(a::text, ',' ORDER BY a::text) FROM unnest(n.nspacl) a), '-')
                    FROM pg_namespace n WHERE n.oid = m.objid)
               END, '')
             FROM members m
             UNION ALL
             SELECT 'dumped with the database: ' || coalesce((SELECT string_agg(c::regclass::text || coalesce(' ' || w, ''), ', ' ORDER BY c::regclass::text)
                       FROM unnest(e.extconfig, e.extcondition) AS u(c, w)), '')
               FROM pg_extension e WHERE e.extname = 'hmr'",
            &[],
        )
        .await?;
    let mut lines: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    lines.sort();
    Ok(lines)
}

/// Runs a PostgreSQL program (pg_dump, psql, …) as user `postgres`.
pub fn run_as_postgres_pub(args: &[&str]) -> Result<()> {
    run_as_postgres(args)
}

fn run_as_postgres(args: &[&str]) -> Result<()> {
    let is_root = unsafe_geteuid() == 0;
    let mut cmd = if is_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]);
        c.args(args);
        c
    } else {
        let mut c = Command::new(args[0]);
        c.args(&args[1..]);
        c
    };
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn unsafe_geteuid() -> u32 {
    // Read it from /proc rather than link libc for one call.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// A throwaway cluster with database `his`, the extension and the sample HIS schema.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    /// The PostgreSQL programs it runs with (a private installation: `start_with_scripts`).
    bin: PathBuf,
}

impl Cluster {
    pub async fn start() -> Result<Cluster> {
        Self::start_with(true).await
    }

    /// A cluster with the extension and the catalog but no sample HIS (for other vendors).
    pub async fn start_empty() -> Result<Cluster> {
        Self::start_with(false).await
    }

    /// A cluster with an empty database `his` (no extension), run from a private copy of
    /// the PostgreSQL installation whose extension directory also holds `scripts` (name,
    /// text): upgrade tests install old versions without writing into the system's
    /// share directory. (PostgreSQL finds its share directory relative to its binary.)
    pub async fn start_with_scripts(scripts: &[(&str, &str)]) -> Result<Cluster> {
        let dir = unique_dir("hmr-e2e-pg");
        let install = dir.join("install");
        let real_share = PathBuf::from(pg_config("--sharedir")?);
        let real_bin = PathBuf::from(pg_config("--bindir")?);
        let real_lib = PathBuf::from(pg_config("--pkglibdir")?);
        let rel = |p: &Path| install.join(p.strip_prefix("/").expect("absolute"));
        let (bin, share, lib) = (rel(&real_bin), rel(&real_share), rel(&real_lib));
        std::fs::create_dir_all(&bin)?;
        std::fs::create_dir_all(share.join("extension"))?;
        std::fs::create_dir_all(lib.parent().expect("lib has a parent"))?;
        // Copies, not links: PostgreSQL resolves a link to its real place.
        for program in ["postgres", "pg_ctl"] {
            std::fs::copy(real_bin.join(program), bin.join(program))?;
        }
        std::os::unix::fs::symlink(&real_lib, &lib)?;
        for entry in std::fs::read_dir(&real_share)? {
            let entry = entry?;
            if entry.file_name() != "extension" {
                std::os::unix::fs::symlink(entry.path(), share.join(entry.file_name()))?;
            }
        }
        for entry in std::fs::read_dir(real_share.join("extension"))? {
            let entry = entry?;
            std::os::unix::fs::symlink(entry.path(), share.join("extension").join(entry.file_name()))?;
        }
        for (name, text) in scripts {
            std::fs::write(share.join("extension").join(name), text)?;
        }
        let cluster = Self::init(dir, bin).await?;
        let admin = cluster.connect("postgres").await?;
        admin.batch_execute("CREATE DATABASE his").await?;
        Ok(cluster)
    }

    async fn start_with(demo: bool) -> Result<Cluster> {
        let cluster = Self::init(unique_dir("hmr-e2e-pg"), PathBuf::from(PG_BIN)).await?;
        let admin = cluster.connect("postgres").await?;
        admin.batch_execute("CREATE DATABASE his").await?;
        let his = cluster.connect("his").await?;
        his.batch_execute("CREATE EXTENSION hmr")
            .await
            .context("CREATE EXTENSION hmr (is it installed?)")?;
        let catalog = std::fs::read_to_string(repo_root().join("sql/catalog-sample.csv"))?;
        his.execute("SELECT hmr.load_catalog($1)", &[&catalog])
            .await
            .context("loading the catalog")?;
        if demo {
            for file in ["01_his_schema.sql", "02_hmr_sources.sql"] {
                let sql = std::fs::read_to_string(repo_root().join("sql/demo").join(file))?;
                his.batch_execute(&sql).await.with_context(|| file.to_string())?;
            }
        }
        Ok(cluster)
    }

    /// initdb in `dir/data` and start, with the programs in `bin`.
    async fn init(dir: PathBuf, bin: PathBuf) -> Result<Cluster> {
        Command::new("chown")
            .args(["-R", "postgres", dir.to_str().unwrap()])
            .status()?;
        let data = dir.join("data");
        let port = 5432;
        run_as_postgres(&[
            &format!("{PG_BIN}/initdb"),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
            "-D",
            data.to_str().unwrap(),
        ])?;
        let cluster = Cluster { dir, port, bin };
        cluster.pg_ctl_start()?;
        Ok(cluster)
    }

    fn pg_ctl_start(&self) -> Result<()> {
        // HMR_E2E_MAX_CONNECTIONS: for benchmarks with hundreds of sessions.
        let max_connections = std::env::var("HMR_E2E_MAX_CONNECTIONS").unwrap_or_else(|_| "50".into());
        // HMR_E2E_PG_OPTIONS: more server options, for profiling (e.g. `-c
        // shared_preload_libraries=pg_stat_statements`).
        let extra = std::env::var("HMR_E2E_PG_OPTIONS").unwrap_or_default();
        let opts = format!(
            "-p {} -k {} -c listen_addresses='' -c fsync=off -c synchronous_commit=off -c max_connections={max_connections} {extra}",
            self.port,
            self.dir.display()
        );
        run_as_postgres(&[
            self.bin.join("pg_ctl").to_str().unwrap(),
            "-w",
            "-D",
            self.dir.join("data").to_str().unwrap(),
            "-l",
            self.dir.join("postgres.log").to_str().unwrap(),
            "-o",
            &opts,
            "start",
        ])
    }

    /// `pg_ctl -D <data> <args>` as postgres.
    fn pg_ctl(&self, args: &[&str]) -> Result<()> {
        let pg_ctl = self.bin.join("pg_ctl");
        let data = self.dir.join("data");
        let mut all = vec![pg_ctl.to_str().unwrap(), "-D", data.to_str().unwrap()];
        all.extend_from_slice(args);
        run_as_postgres(&all)
    }

    /// `pg_ctl stop -m immediate` then start again: a crash of the database.
    pub fn crash_and_restart(&self) -> Result<()> {
        self.fail()?;
        self.pg_ctl_start()
    }

    /// A streaming replica of this cluster (`pg_basebackup -R`), started as a hot standby on
    /// its own socket directory.
    pub fn replica(&self) -> Result<Cluster> {
        let dir = unique_dir("hmr-e2e-pg-replica");
        Command::new("chown")
            .args(["-R", "postgres", dir.to_str().unwrap()])
            .status()?;
        run_as_postgres(&[
            self.bin.join("pg_basebackup").to_str().unwrap(),
            "-h",
            self.dir.to_str().unwrap(),
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-D",
            dir.join("data").to_str().unwrap(),
            "-R",
            "-X",
            "stream",
            "--checkpoint=fast",
            "--no-sync",
        ])?;
        let replica = Cluster {
            dir,
            port: self.port,
            bin: self.bin.clone(),
        };
        replica.pg_ctl_start()?;
        Ok(replica)
    }

    /// `pg_ctl stop -m immediate`: the server is gone, as when its machine fails. The clusters
    /// run with `synchronous_commit = off`, so a transaction committed moments before may be
    /// gone after the restart, as on such a real server: setup a test relies on after the
    /// crash commits with `synchronous_commit = on`.
    pub fn fail(&self) -> Result<()> {
        self.pg_ctl(&["-m", "immediate", "stop"])
    }

    /// `pg_ctl stop -m fast`.
    pub fn stop(&self) -> Result<()> {
        self.pg_ctl(&["-m", "fast", "stop"])
    }

    /// Starts a stopped cluster again.
    pub fn start_again(&self) -> Result<()> {
        self.pg_ctl_start()
    }

    /// Promotes a standby to primary and waits until it takes writes.
    pub fn promote(&self) -> Result<()> {
        self.pg_ctl(&["-w", "promote"])
    }

    /// A streaming replica made this cluster's synchronous standby (`synchronous_standby_names`
    /// = '*'), once it is one; `his` is a connection to this cluster.
    pub async fn synchronous_replica(&self, his: &Client) -> Result<Cluster> {
        let replica = self.replica()?;
        his.batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            .await?;
        his.batch_execute("SELECT pg_reload_conf()").await?;
        wait_until(Duration::from_secs(20), "a synchronous standby", || async {
            Ok(count(
                his,
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
            )
            .await?
                == 1)
        })
        .await?;
        Ok(replica)
    }

    /// Waits until this cluster's standby has replayed all it wrote; `his` is a connection to
    /// this cluster.
    pub async fn replica_caught_up(&self, his: &Client) -> Result<()> {
        wait_until(Duration::from_secs(20), "the replica caught up", || async {
            Ok(count(
                his,
                "SELECT count(*) FROM pg_stat_replication WHERE replay_lsn = pg_current_wal_lsn()",
            )
            .await?
                == 1)
        })
        .await
    }

    /// A connection string naming this cluster and `other` (this one first), used by whichever
    /// takes writes: what a HIS and a worker are given for a failover.
    pub fn url_with(&self, other: &Cluster, db: &str) -> String {
        format!(
            "host={},{} port={},{} user=postgres dbname={db} target_session_attrs=read-write",
            self.dir.display(),
            other.dir.display(),
            self.port,
            other.port
        )
    }

    pub fn url_as(&self, db: &str, user: &str) -> String {
        format!("host={} port={} user={user} dbname={db}", self.dir.display(), self.port)
    }

    pub async fn connect_as(&self, db: &str, user: &str) -> Result<Client> {
        let (client, connection) = tokio_postgres::connect(&self.url_as(db, user), NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    pub fn url(&self, db: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={db}",
            self.dir.display(),
            self.port
        )
    }

    pub async fn connect(&self, db: &str) -> Result<Client> {
        let (client, connection) = tokio_postgres::connect(&self.url(db), NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.fail();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The platform simulator as a process on a loopback port.
pub struct Sim {
    child: Child,
    pub log_path: PathBuf,
    pub base: String,
    http: reqwest::Client,
}

impl Sim {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn start() -> Result<Sim> {
        let org = |code: &str, name: &str, user: &str| {
            format!("{code},{name},{user},{user}-secret,{user}-app,{user}-app-secret")
        };
        let log_path = unique_dir("hmr-e2e-sim").join("sim.log");
        let mut child = Command::new(bin_dir().join("hmr-platform-sim"))
            .args(["--listen", "127.0.0.1:0", "--catalog"])
            .arg(repo_root().join("sql/catalog-sample.csv"))
            .args([
                "--org",
                &org(ORG_CODE, ORG_NAME, "hz1"),
                "--org",
                &org(OTHER_ORG_CODE, OTHER_ORG_NAME, "hz2"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()
            .context("starting hmr-platform-sim (is it built?)")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let base = line.trim().rsplit(' ').next().unwrap_or_default().to_string();
        if !base.starts_with("http://") {
            bail!(
                "unexpected first line from the simulator: {line:?}; its log: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        Ok(Sim {
            child,
            log_path,
            base,
            http: reqwest::Client::new(),
        })
    }

    /// A successful answer to `GET path`.
    async fn get_ok(&self, path: &str) -> Result<reqwest::Response> {
        Ok(self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await?
            .error_for_status()?)
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        Ok(self.get_ok(path).await?.json().await?)
    }

    /// A control endpoint's raw answer (a stored PDF).
    pub async fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
        Ok(self.get_ok(path).await?.bytes().await?.to_vec())
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value> {
        let text = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn faults(&self, body: Value) -> Result<()> {
        self.post("/_sim/faults", body).await.map(|_| ())
    }

    pub async fn clear_faults(&self) -> Result<()> {
        self.http
            .delete(format!("{}/_sim/faults", self.base))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Every contract request the simulator received.
    pub async fn requests(&self) -> Result<Vec<Value>> {
        let v = self.get("/_sim/requests").await?;
        Ok(match v {
            Value::Array(a) => a,
            Value::Object(mut m) => m
                .remove("requests")
                .and_then(|r| r.as_array().cloned())
                .unwrap_or_default(),
            _ => vec![],
        })
    }

    /// Requests whose path starts with `prefix` and whose effect is `effect`.
    pub async fn requests_with(&self, prefix: &str, effect: &str) -> Result<Vec<Value>> {
        Ok(self
            .requests()
            .await?
            .into_iter()
            .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with(prefix)) && r["effect"] == effect)
            .collect())
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    /// `worker.recheck_kept_secs`.
    pub recheck_kept_secs: u64,
    /// A whole connection string instead of the cluster's (several hosts, for a failover).
    pub url: Option<String>,
    /// `worker.metrics_listen` (Prometheus `/metrics`), e.g. `127.0.0.1:9187`.
    pub metrics_listen: Option<String>,
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
            recheck_kept_secs: 21600,
            url: None,
            metrics_listen: None,
            extra_config: None,
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
poll_sources_ms = 300
backoff_base_ms = {bb}
backoff_max_ms = {bm}
lease_secs = {lease}
batch_size = {batch}
shutdown_grace_secs = 2
recheck_kept_secs = {recheck}
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
            bm = options.backoff_max_ms,
            lease = options.lease_secs,
            batch = options.batch_size,
            render = options.render_pdf,
            recheck = options.recheck_kept_secs,
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

fn spawn_worker(config: &Path, log: &Path) -> Result<Child> {
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

/// The basic scenario: our hospital with the sample HIS and its sample data, the simulator,
/// and a worker draining to it.
pub struct Hospital {
    pub cluster: Cluster,
    pub his: Client,
    pub sim: Sim,
    pub worker: Worker,
}

impl Hospital {
    pub async fn start(options: &WorkerOptions) -> Result<Hospital> {
        let cluster = Cluster::start().await?;
        let his = cluster.connect("his").await?;
        load_sample_data(&his).await?;
        let sim = Sim::start()?;
        let worker = Worker::start(&cluster, &sim, options)?;
        Ok(Hospital {
            cluster,
            his,
            sim,
            worker,
        })
    }
}

/// The simulator, the platform configured for SQL calls, and `reports` of another hospital
/// there (for the recognition services to find).
pub async fn platform_with(his: &Client, reports: &[ElsewhereReport<'_>]) -> Result<Sim> {
    let sim = Sim::start()?;
    configure_platform(his, &sim).await?;
    let other = OtherHospital::new(&sim);
    for (id_no, birth, report_no, data_code, days_ago) in reports {
        other.lab_report(id_no, birth, report_no, data_code, *days_ago).await?;
    }
    Ok(sim)
}

/// The doctors' workstations scenario: our hospital with the sample HIS, the example order
/// table with its gate and the workstation SQL (`sql/examples/`), the platform configured for
/// SQL calls, the other hospital's `reports`, a worker, and our three patients delivered.
pub struct Workstations {
    pub cluster: Cluster,
    pub his: Client,
    pub sim: Sim,
    pub worker: Worker,
}

impl Workstations {
    pub async fn start(reports: &[ElsewhereReport<'_>], options: &WorkerOptions) -> Result<Workstations> {
        let cluster = Cluster::start().await?;
        let his = cluster.connect("his").await?;
        load_sample_data(&his).await?;
        for file in ["01_orders.sql", "02_workstation.sql"] {
            his.batch_execute(&std::fs::read_to_string(repo_root().join("sql/examples").join(file))?)
                .await?;
        }
        let sim = platform_with(&his, reports).await?;
        let worker = Worker::start(&cluster, &sim, options)?;
        wait_until(Duration::from_secs(20), "our patients delivered", || async {
            Ok(count(&his, "SELECT count(*) FROM hmr.delivered WHERE kind = 'patient'").await? == 3)
        })
        .await?;
        Ok(Workstations {
            cluster,
            his,
            sim,
            worker,
        })
    }
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    loop {
        if check().await? {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The database's clock now (`clock_timestamp()`).
pub async fn db_clock(his: &Client) -> Result<std::time::SystemTime> {
    Ok(his.query_one("SELECT clock_timestamp()", &[]).await?.get(0))
}

/// Waits until every enabled polled source was polled by a transaction that began after
/// `since` (the database's clock, `db_clock`): that poll saw whatever was committed before.
pub async fn wait_sources_polled_since(his: &Client, since: std::time::SystemTime) -> Result<()> {
    wait_until(Duration::from_secs(30), "every enabled source polled again", || async {
        let polled: Option<bool> = his
            .query_one(
                "SELECT bool_and(coalesce(polled_at > $1, false)) FROM hmr.polled_sources WHERE enabled",
                &[&since],
            )
            .await?
            .get(0);
        Ok(polled.unwrap_or(true))
    })
    .await
}

/// Inserts the three sample patients and their draft reports.
pub async fn load_sample_data(his: &Client) -> Result<()> {
    let sql = std::fs::read_to_string(repo_root().join("sql/demo/03_sample_data.sql"))?;
    his.batch_execute(&sql).await?;
    Ok(())
}

/// Waits until the worker has kept `report_id`, recognised here (`hmr.retained_reports`).
pub async fn wait_report_kept(his: &Client, report_id: &str) -> Result<()> {
    wait_until(Duration::from_secs(30), "the recognised report kept", || async {
        Ok(count(
            his,
            &format!("SELECT count(*) FROM hmr.retained_reports WHERE report_id = '{report_id}'"),
        )
        .await?
            >= 1)
    })
    .await
}

pub async fn count(his: &Client, sql: &str) -> Result<i64> {
    Ok(his.query_one(sql, &[]).await?.get(0))
}

/// Points the extension's SQL calls at the simulator, as our hospital (password grant).
pub async fn configure_platform(his: &Client, sim: &Sim) -> Result<()> {
    his.execute(
        "SELECT hmr.configure_platform($1, $2, 'hz1', 'hz1-secret')",
        &[&sim.base, &ORG_CODE],
    )
    .await?;
    Ok(())
}

/// Events still to deliver (captured, pending or in flight; quarantined ones do not count).
pub async fn undelivered(his: &Client) -> Result<i64> {
    count(his, "SELECT pending + in_flight FROM hmr.status").await
}

/// Whether every event is finished or quarantined.
pub async fn outbox_empty(his: &Client) -> Result<bool> {
    Ok(undelivered(his).await? == 0)
}

/// The second hospital, talking to the simulator directly (built with the protocol crate's
/// own request builders): it uploads the reports our doctors may recognise.
pub struct OtherHospital<'a> {
    sim: &'a Sim,
    http: reqwest::Client,
}

impl<'a> OtherHospital<'a> {
    pub fn new(sim: &'a Sim) -> Self {
        OtherHospital {
            sim,
            http: reqwest::Client::new(),
        }
    }

    async fn send(&self, req: &hmr_protocol::paths::Request) -> Result<(u16, Value)> {
        let scope = req.scope;
        let token = match scope {
            Some(scope) => {
                let t = hmr_protocol::paths::token(&hmr_protocol::TokenRequest::Password {
                    username: "hz2".into(),
                    password: "hz2-secret".into(),
                    scope,
                });
                let (_, body) = Box::pin(self.send(&t)).await?;
                Some(body["data"]["accessToken"].as_str().unwrap_or_default().to_string())
            }
            None => None,
        };
        let method = match req.method {
            hmr_protocol::paths::Method::Get => reqwest::Method::GET,
            hmr_protocol::paths::Method::Post => reqwest::Method::POST,
            hmr_protocol::paths::Method::Put => reqwest::Method::PUT,
        };
        let mut b = self
            .http
            .request(method, format!("{}{}", self.sim.base, req.path))
            .header("X-Org-Code", OTHER_ORG_CODE)
            .header("X-Request-Id", uuid::Uuid::new_v4().to_string());
        if let Some(t) = token {
            b = b.bearer_auth(t);
        }
        if let Some(ct) = &req.content_type {
            b = b.header("Content-Type", ct);
        }
        for (k, v) in &req.headers {
            b = b.header(k, v);
        }
        if req.method != hmr_protocol::paths::Method::Get {
            b = b.body(req.body.clone());
        }
        let r = b.send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// Registers a patient there (same person: same id number) and uploads a lab report of
    /// `data_code`, reported `days_ago`, with a PDF; returns the report's number.
    pub async fn lab_report(
        &self,
        id_no: &str,
        birth: &str,
        report_no: &str,
        data_code: &str,
        days_ago: i64,
    ) -> Result<()> {
        use hmr_protocol::*;
        let now = hmr_protocol::checks::china_now();
        let at = checks::format_time(&(now - chrono::Duration::days(days_ago)));
        let patient = Patient {
            patient_id: format!("X-{id_no}"),
            id_type: "01".into(),
            id_no: id_no.into(),
            name: "外院患者".into(),
            gender_code: "1".into(),
            birth_date: birth.into(),
            phone: None,
            registered_at: at.clone(),
            updated_at: at.clone(),
        };
        let (status, body) = self.send(&paths::patients(&[patient])).await?;
        anyhow::ensure!(status == 200, "patient upload: {status} {body}");
        let report = LabReport {
            report_no: report_no.into(),
            version: 1,
            patient_id: format!("X-{id_no}"),
            id_type: "01".into(),
            id_no: id_no.into(),
            name: "外院患者".into(),
            visit_type: Some("1".into()),
            visit_no: None,
            order_no: None,
            dept_code: None,
            request_doctor_no: None,
            specimen_code: None,
            specimen_name: None,
            specimen_no: None,
            sampled_at: None,
            reported_at: at,
            audited_at: None,
            auditor_no: "Z001".into(),
            category_code: None,
            category_name: None,
            data_code: Some(data_code.into()),
            items: vec![LabItem {
                item_code: "WBC".into(),
                item_name: "白细胞计数".into(),
                loinc: None,
                result_value: "5.0".into(),
                result_unit: Some("10^9/L".into()),
                reference_range: None,
                abnormal_flag: Some("1".into()),
                critical_flag: None,
                method: None,
            }],
        };
        let (status, body) = self.send(&paths::lab_report(&report)).await?;
        anyhow::ensure!(status == 200, "report upload: {status} {body}");
        let pdf = format!("%PDF-1.4 report {report_no} of {OTHER_ORG_NAME}").into_bytes();
        let (status, body) = self.send(&paths::pdf(ReportType::Lab, report_no, 1, pdf)).await?;
        anyhow::ensure!(status == 200, "pdf upload: {status} {body}");
        Ok(())
    }

    pub async fn revoke_lab(&self, report_no: &str) -> Result<()> {
        use hmr_protocol::*;
        let now = hmr_protocol::checks::china_now();
        let body = Revoke {
            version: 1,
            reason: "取消审核".into(),
            revoked_at: checks::format_time(&now),
            operator_no: "Z001".into(),
        };
        let (status, answer) = self.send(&paths::revoke(ReportType::Lab, report_no, &body)).await?;
        anyhow::ensure!(status == 200, "revoke: {status} {answer}");
        Ok(())
    }
}
pub mod faults;
pub mod figures;

/// PgBouncer in transaction pooling mode in front of a cluster (unix socket only), as HIS
/// application servers use it: consecutive transactions of one client may run on different
/// server connections.
pub struct Bouncer {
    child: Child,
    pub dir: PathBuf,
    pub port: u16,
}

impl Bouncer {
    pub async fn start(cluster: &Cluster, pool_size: u32, users: &[&str]) -> Result<Bouncer> {
        let dir = unique_dir("hmr-e2e-pgbouncer");
        let port = 6432;
        let auth: String = users.iter().map(|u| format!("\"{u}\" \"\"\n")).collect();
        std::fs::write(dir.join("users.txt"), auth)?;
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host={cluster_dir} port={cluster_port}\n\n[pgbouncer]\nlisten_addr =\n\
                 unix_socket_dir = {dir}\nlisten_port = {port}\nauth_type = trust\nauth_file = {dir}/users.txt\n\
                 pool_mode = transaction\ndefault_pool_size = {pool_size}\nmax_client_conn = 200\n\
                 server_reset_query =\nignore_startup_parameters = extra_float_digits,application_name\n\
                 logfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n",
                cluster_dir = cluster.dir.display(),
                cluster_port = cluster.port,
                dir = dir.display(),
            ),
        )?;
        Command::new("chown")
            .args(["-R", "postgres", dir.to_str().unwrap_or_default()])
            .status()?;
        let program = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("pgbouncer is not installed (scripts/bootstrap.sh installs it)")?;
        let ini = dir.join("pgbouncer.ini");
        let child = if unsafe_geteuid() == 0 {
            Command::new("runuser")
                .args(["-u", "postgres", "--", program])
                .arg(&ini)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?
        } else {
            Command::new(program).arg(&ini).stdin(Stdio::null()).spawn()?
        };
        let bouncer = Bouncer { child, dir, port };
        let socket = bouncer.dir.join(format!(".s.PGSQL.{port}"));
        let started = Instant::now();
        while !socket.exists() {
            if started.elapsed() > Duration::from_secs(10) {
                bail!(
                    "pgbouncer did not start: {}",
                    std::fs::read_to_string(bouncer.dir.join("pgbouncer.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(bouncer)
    }

    /// A client connection through PgBouncer. Use the simple query protocol with it
    /// (`simple_query`, `batch_execute`): PgBouncer 1.18 keeps no prepared statements.
    pub async fn connect(&self, db: &str, user: &str) -> Result<Client> {
        let url = format!("host={} port={} user={user} dbname={db}", self.dir.display(), self.port);
        let (client, connection) = tokio_postgres::connect(&url, NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        // The child is `runuser`: killing it leaves pgbouncer running, so stop pgbouncer by
        // its pid file first.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The first column of each row of a simple query (text).
pub async fn simple_values(client: &Client, sql: &str) -> Result<Vec<Option<String>>> {
    Ok(client
        .simple_query(sql)
        .await?
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
            _ => None,
        })
        .collect())
}

/// Another host on loopback (127.0.0.2) that counts every byte sent to it: nothing may be.
pub struct Decoy {
    pub base: String,
    bytes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Decoy {
    pub async fn start() -> Result<Decoy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let bytes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = bytes.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await {
                        if n == 0 {
                            break;
                        }
                        counted.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                    }
                });
            }
        });
        Ok(Decoy { base, bytes })
    }

    pub fn received(&self) -> usize {
        self.bytes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// `pg_temp.id_no(n)`: the n-th valid 居民身份证 number (GB 11643 check digit), born on
/// `date '1940-01-01' + n % 25000` — for loading many patients in one statement.
pub async fn create_id_no_generator(his: &Client) -> Result<()> {
    his.batch_execute(
        "CREATE FUNCTION pg_temp.id_no(n bigint) RETURNS text LANGUAGE sql AS $$
            SELECT d || substr('10X98765432',
                   (SELECT sum(substr(d, i::int, 1)::int * w)
                      FROM unnest(ARRAY[7,9,10,5,8,4,2,1,6,3,7,9,10,5,8,4,2]) WITH ORDINALITY AS t(w, i))::int % 11 + 1, 1)
              FROM (SELECT '441302' || to_char(date '1940-01-01' + (n % 25000)::int, 'YYYYMMDD')
                           || lpad((n % 1000)::text, 3, '0') AS d) s $$",
    )
    .await?;
    Ok(())
}

/// A throwaway MariaDB server: a HIS that is not on PostgreSQL, reached through mysql_fdw.
/// Started by the test (mariadb-install-db in a temporary directory, `mariadbd` on a free
/// loopback port), never the system's.
pub struct MariaDb {
    pub dir: PathBuf,
    pub port: u16,
    child: Child,
}

/// The login the foreign server uses.
pub const MARIADB_USER: &str = "hmr";
pub const MARIADB_PASSWORD: &str = "hmr-fdw-secret";

impl MariaDb {
    pub fn start() -> Result<MariaDb> {
        let dir = unique_dir("hmr-e2e-mariadb");
        let data = dir.join("data");
        let out = Command::new("mariadb-install-db")
            .args([
                "--no-defaults",
                "--user=root",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
            ])
            .arg(format!("--datadir={}", data.display()))
            .output()
            .context("mariadb-install-db (Debian package mariadb-server)")?;
        if !out.status.success() {
            bail!("mariadb-install-db failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let child = Command::new("mariadbd")
            .args([
                "--no-defaults",
                "--user=root",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
            ])
            .args([
                "--innodb-buffer-pool-size=32M",
                "--skip-log-bin",
                "--character-set-server=utf8mb4",
            ])
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", dir.join("mysql.sock").display()))
            .arg(format!("--pid-file={}", dir.join("mariadb.pid").display()))
            .arg(format!("--log-error={}", dir.join("error.log").display()))
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("mariadbd")?;
        let db = MariaDb { dir, port, child };
        let started = std::time::Instant::now();
        while db.sql("SELECT 1").is_err() {
            if started.elapsed() > Duration::from_secs(60) {
                bail!(
                    "MariaDB did not start: {}",
                    std::fs::read_to_string(db.dir.join("error.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        db.sql(&format!(
            "CREATE USER '{MARIADB_USER}'@'127.0.0.1' IDENTIFIED BY '{MARIADB_PASSWORD}';
             GRANT ALL ON *.* TO '{MARIADB_USER}'@'127.0.0.1';"
        ))?;
        Ok(db)
    }

    /// Runs SQL as root over the socket; returns the rows, tab-separated.
    pub fn sql(&self, sql: &str) -> Result<String> {
        let out = Command::new("mariadb")
            .args([
                "--no-defaults",
                "-u",
                "root",
                "-N",
                "-B",
                "--default-character-set=utf8mb4",
            ])
            .arg(format!("--socket={}", self.dir.join("mysql.sock").display()))
            .arg("-e")
            .arg(sql)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("{sql}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The simulator's requests concerning one report, as `(kind of call, version)` in order.
pub async fn history_of(sim: &Sim, base: &str, report: &str) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for r in sim.requests().await? {
        let path = r["path"].as_str().unwrap_or_default();
        if r["effect"] != "applied" || !path.starts_with(base) {
            continue;
        }
        if path == base && r["body"]["reportNo"] == report {
            out.push(("data".to_string(), r["body"]["version"].as_u64().unwrap_or(0)));
        } else if path == format!("{base}/{report}/revoke") {
            out.push(("revoke".to_string(), r["body"]["version"].as_u64().unwrap_or(0)));
        } else if let Some(v) = path
            .strip_prefix(&format!("{base}/{report}/versions/"))
            .and_then(|rest| rest.strip_suffix("/pdf"))
        {
            out.push(("pdf".to_string(), v.parse().unwrap_or(0)));
        }
    }
    Ok(out)
}

/// Whether the simulator holds a master-data record (`what`: patients, departments, staff).
pub async fn held(sim: &Sim, what: &str, key: &str) -> Result<bool> {
    let state = sim.get("/_sim/state").await?;
    Ok(!state["orgs"][ORG_CODE][what][key].is_null())
}

// ------------------------------------------------------------------ hmr-worker serve

/// `hmr-worker serve` on a free loopback port, with the worker's configuration.
pub struct Serve {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT` (or https with TLS).
    pub base: String,
    /// A client for it (trusting the test's certificate with TLS).
    pub http: reqwest::Client,
    /// What it logged (stderr).
    pub log: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `hmr-worker serve` with the worker's configuration, logged in as `serve_app`: a
/// login in `hmr_his` that reads the patient and staff source views, nothing else (as README
/// says to run it). `tls_root`: the PEM certificate its `[serve] tls_cert` was issued by (the
/// client trusts it and speaks https).
pub async fn serve(w: &Workstations, tls_root: Option<&Path>) -> Result<Serve> {
    w.his
        .batch_execute(
            // Durable before it returns: the throwaway clusters commit asynchronously, and a
            // test that crashes the cluster (`Cluster::fail`) moments after serve starts lost
            // this role under load; serve then met "role does not exist" for good.
            "BEGIN; SET LOCAL synchronous_commit = on;
             DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'serve_app') THEN
                     CREATE ROLE serve_app LOGIN IN ROLE hmr_his;
                 END IF;
             END $$;
             GRANT USAGE ON SCHEMA hmr_src TO serve_app;
             GRANT SELECT ON hmr_src.patient, hmr_src.staff TO serve_app;
             COMMIT;",
        )
        .await?;
    let config = std::fs::read_to_string(&w.worker.config_path)?;
    anyhow::ensure!(config.contains("user=postgres"), "the worker's url names its user");
    let config_path = w.worker.config_path.with_file_name("serve.toml");
    std::fs::write(&config_path, config.replace("user=postgres", "user=serve_app"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o600))?;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = std::process::Command::new(bin_dir().join("hmr-worker"))
        .arg("--config")
        .arg(&config_path)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(config_path.with_file_name("serve.log"))?)
        .spawn()?;
    let mut http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
    let scheme = match tls_root {
        Some(pem) => {
            http = http.add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(pem)?)?);
            "https"
        }
        None => "http",
    };
    let s = Serve {
        child,
        base: format!("{scheme}://127.0.0.1:{port}"),
        http: http.build()?,
        log: config_path.with_file_name("serve.log"),
    };
    wait_until(Duration::from_secs(20), "the CDS service", || async {
        Ok(s.http.get(format!("{}/cds-services", s.base)).send().await.is_ok())
    })
    .await
    .with_context(|| std::fs::read_to_string(config_path.with_file_name("serve.log")).unwrap_or_default())?;
    Ok(s)
}

/// A terminal of `hmr-worker serve`: its P-384 key, the `[serve]` configuration naming it,
/// and CDS Hooks JWTs (ES384) signed with it.
pub struct Terminal {
    key: TerminalKey,
    pub iss: String,
    pub audience: String,
}

/// How a terminal signs: ES384 (P-384) or RS384 (RSA 2048), the two CDS Hooks recommends.
enum TerminalKey {
    Es384(ring::signature::EcdsaKeyPair),
    Rs384(aws_lc_rs::signature::RsaKeyPair),
}

impl Terminal {
    /// A terminal signing ES384.
    pub fn new(iss: &str, audience: &str) -> Terminal {
        use ring::signature::{EcdsaKeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng).expect("key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8.as_ref(), &rng).expect("key");
        Terminal {
            key: TerminalKey::Es384(pair),
            iss: iss.into(),
            audience: audience.into(),
        }
    }

    /// A terminal signing RS384 (an RSA key of 2048 bits).
    pub fn rsa(iss: &str, audience: &str) -> Terminal {
        let pair = aws_lc_rs::signature::RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("key");
        Terminal {
            key: TerminalKey::Rs384(pair),
            iss: iss.into(),
            audience: audience.into(),
        }
    }

    /// `[serve]` with `audience` and `more` lines of it, then this terminal (called `name`).
    pub fn config(&self, name: &str, more: &str) -> String {
        format!(
            "[serve]\naudience = \"{}\"\n{more}\n{}",
            self.audience,
            self.entry(name)
        )
    }

    /// This terminal as a `[[serve.terminals]]` entry (its public key as a JWK).
    pub fn entry(&self, name: &str) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwk = match &self.key {
            TerminalKey::Es384(pair) => {
                use ring::signature::KeyPair as _;
                let public = pair.public_key().as_ref();
                format!(
                    "{{ kty = \"EC\", crv = \"P-384\", x = \"{}\", y = \"{}\" }}",
                    b64.encode(&public[1..49]),
                    b64.encode(&public[49..])
                )
            }
            TerminalKey::Rs384(pair) => {
                use aws_lc_rs::signature::KeyPair as _;
                let public = pair.public_key();
                format!(
                    "{{ kty = \"RSA\", n = \"{}\", e = \"{}\" }}",
                    b64.encode(public.modulus().big_endian_without_leading_zero()),
                    b64.encode(public.exponent().big_endian_without_leading_zero())
                )
            }
        };
        format!(
            "\n[[serve.terminals]]\niss = \"{}\"\nname = \"{name}\"\njwk = {jwk}\n",
            self.iss
        )
    }

    /// A fresh token (`jti` unique), valid five minutes.
    pub fn token(&self) -> String {
        self.token_with(&uuid::Uuid::new_v4().to_string())
    }

    pub fn token_with(&self, jti: &str) -> String {
        let now = chrono::Utc::now().timestamp();
        self.sign(&json!({"iss": self.iss, "aud": self.audience, "exp": now + 300, "iat": now, "jti": jti}))
    }

    pub fn sign(&self, claims: &Value) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let alg = match self.key {
            TerminalKey::Es384(_) => "ES384",
            TerminalKey::Rs384(_) => "RS384",
        };
        let h = b64.encode(json!({"alg": alg, "typ": "JWT"}).to_string());
        let p = b64.encode(claims.to_string());
        let message = format!("{h}.{p}");
        let sig = match &self.key {
            TerminalKey::Es384(pair) => pair
                .sign(&ring::rand::SystemRandom::new(), message.as_bytes())
                .expect("sign")
                .as_ref()
                .to_vec(),
            TerminalKey::Rs384(pair) => {
                let mut sig = vec![0; pair.public_modulus_len()];
                pair.sign(
                    &aws_lc_rs::signature::RSA_PKCS1_SHA384,
                    &aws_lc_rs::rand::SystemRandom::new(),
                    message.as_bytes(),
                    &mut sig,
                )
                .expect("sign");
                sig
            }
        };
        format!("{message}.{}", b64.encode(sig))
    }
}

/// A test CA and a server certificate it issued for 127.0.0.1 (`openssl`), PEM files in
/// `dir`: (the CA's certificate, the server's certificate, its key). (webpki refuses a CA
/// certificate as the server's own, so the server's is a separate end-entity certificate.)
pub fn test_certificates(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let ca = dir.join("ca.crt");
    let (cert, key) = (dir.join("serve.crt"), dir.join("serve.key"));
    let ext = dir.join("leaf.ext");
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
    )?;
    let steps: [Vec<std::ffi::OsString>; 3] = [
        [
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=hmr test CA",
            "-keyout",
        ]
        .iter()
        .map(Into::into)
        .chain([dir.join("ca.key").into(), "-out".into(), ca.clone().into()])
        .collect(),
        [
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
        ]
        .iter()
        .map(Into::into)
        .chain([key.clone().into(), "-out".into(), dir.join("serve.csr").into()])
        .collect(),
        ["x509", "-req", "-days", "2", "-set_serial", "2", "-in"]
            .iter()
            .map(Into::into)
            .chain([
                dir.join("serve.csr").into(),
                "-CA".into(),
                ca.clone().into(),
                "-CAkey".into(),
                dir.join("ca.key").into(),
                "-extfile".into(),
                ext.clone().into(),
                "-out".into(),
                cert.clone().into(),
            ])
            .collect(),
    ];
    for args in steps {
        let out = std::process::Command::new("openssl").args(&args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((ca, cert, key))
}
