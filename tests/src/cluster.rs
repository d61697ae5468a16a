//! Throwaway PostgreSQL 15 clusters (initdb as `postgres`, unix socket only), replicas, and
//! the extension's installed objects as text (the upgrade test compares them).

use super::*;

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

pub(crate) fn run_as_postgres(args: &[&str]) -> Result<()> {
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

pub(crate) fn unsafe_geteuid() -> u32 {
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
