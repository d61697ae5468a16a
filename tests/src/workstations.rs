//! A hospital's whole setting: the HIS database with hmr, the simulator, the worker; and the
//! SQL helpers tests use on it.

use super::*;

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
    platform_on(Sim::start()?, his, reports).await
}

/// As `platform_with`, on a simulator already started (`Sim::start_named`).
pub async fn platform_on(sim: Sim, his: &Client, reports: &[ElsewhereReport<'_>]) -> Result<Sim> {
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
        Workstations::start_on(Sim::start()?, reports, options).await
    }

    /// As `start`, with the platform simulator `sim` (e.g. `Sim::start_named`).
    pub async fn start_on(sim: Sim, reports: &[ElsewhereReport<'_>], options: &WorkerOptions) -> Result<Workstations> {
        let cluster = Cluster::start().await?;
        let his = cluster.connect("his").await?;
        load_sample_data(&his).await?;
        for file in ["01_orders.sql", "02_workstation.sql"] {
            his.batch_execute(&std::fs::read_to_string(repo_root().join("sql/examples").join(file))?)
                .await?;
        }
        let sim = platform_on(sim, &his, reports).await?;
        // The worker logs in as a member of hmr_worker, as in a hospital (what it may do is
        // what the extension grants that role), unless a test names another role. Durable:
        // some tests crash the cluster.
        his.batch_execute(
            "SET synchronous_commit = on;
             CREATE ROLE worker_app LOGIN IN ROLE hmr_worker;
             GRANT USAGE ON SCHEMA hmr_src TO hmr_worker;
             GRANT SELECT ON ALL TABLES IN SCHEMA hmr_src TO hmr_worker;
             RESET synchronous_commit;",
        )
        .await?;
        let mut options = options.clone();
        if options.db_user == "postgres" {
            options.db_user = "worker_app";
        }
        let worker = Worker::start(&cluster, &sim, &options)?;
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
