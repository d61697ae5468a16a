//! Other real parts: PgBouncer (transaction pooling), MariaDB with mysql_fdw, a decoy
//! platform, identity-number generation in SQL.

use super::*;

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
        MariaDb::start_sized("32M")
    }

    /// With an InnoDB buffer pool of `buffer_pool` (`1G` for a HIS of real size).
    pub fn start_sized(buffer_pool: &str) -> Result<MariaDb> {
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
            .arg(format!("--innodb-buffer-pool-size={buffer_pool}"))
            .args(["--skip-log-bin", "--character-set-server=utf8mb4"])
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
