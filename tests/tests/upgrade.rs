//! Upgrades ship as `hmr--A--B.sql`: `ALTER EXTENSION hmr UPDATE` moves a database forward
//! and keeps the outbox, the history and the delivery state. (The first release will ship a
//! real script; this test installs a throwaway one next to the installed extension.)

use anyhow::Result;
use hmr_e2e::*;

struct Script(std::path::PathBuf);

impl Drop for Script {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn alter_extension_update_keeps_everything() -> Result<()> {
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    let from: String = his
        .query_one("SELECT extversion FROM pg_extension WHERE extname = 'hmr'", &[])
        .await?
        .get(0);
    let to = format!("{from}-upgrade-test-{}", std::process::id());
    let sharedir = String::from_utf8(
        std::process::Command::new(format!("{PG_BIN}/pg_config"))
            .arg("--sharedir")
            .output()?
            .stdout,
    )?;
    let _script = Script(std::path::Path::new(sharedir.trim()).join(format!("extension/hmr--{from}--{to}.sql")));
    std::fs::write(
        &_script.0,
        "-- a throwaway upgrade: one new object, one changed comment\n\
         CREATE VIEW hmr.upgrade_probe AS SELECT count(*) AS events FROM hmr.outbox;\n\
         COMMENT ON TABLE hmr.outbox IS 'which record changed and how';\n",
    )?;
    let event: i64 = his.query_one("SELECT hmr.enqueue('patient', 'P1')", &[]).await?.get(0);
    his.batch_execute("INSERT INTO hmr.delivered (kind, key, version, content_hash) VALUES ('patient', 'P0', 1, 'h')")
        .await?;

    his.batch_execute(&format!("ALTER EXTENSION hmr UPDATE TO '{to}'"))
        .await?;
    let now: String = his
        .query_one("SELECT extversion FROM pg_extension WHERE extname = 'hmr'", &[])
        .await?
        .get(0);
    assert_eq!(now, to);
    assert_eq!(count(&his, "SELECT events FROM hmr.upgrade_probe").await?, 1);
    assert_eq!(
        count(&his, &format!("SELECT count(*) FROM hmr.outbox WHERE id = {event}")).await?,
        1
    );
    assert_eq!(count(&his, "SELECT count(*) FROM hmr.delivered").await?, 1);
    // The new object belongs to the extension (dropped with it, dumped as part of it).
    assert_eq!(
        count(
            &his,
            "SELECT count(*) FROM pg_depend d JOIN pg_class c ON c.oid = d.objid
              WHERE c.relname = 'upgrade_probe' AND d.deptype = 'e'"
        )
        .await?,
        1
    );
    // Capture still works after the upgrade.
    his.batch_execute("INSERT INTO his.patient (patient_id, id_no, name, sex, birthday) VALUES ('P9', '441302198003151233', 'x', 1, '1980-03-15')").await?;
    assert_eq!(
        count(&his, "SELECT count(*) FROM hmr.captured WHERE key = 'P9'").await?,
        1
    );
    Ok(())
}
