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

/// The lines of SQL a DBA writes: neither blank nor a comment (the "≤ 40 lines" of the
/// vendor recipes).
pub fn sql_lines(sql: &str) -> usize {
    sql.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("--"))
        .count()
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

pub mod faults;
pub mod figures;

mod cluster;
mod parts;
mod serve;
mod sim;
mod worker;
mod workstations;

pub use cluster::*;
pub use parts::*;
pub use serve::*;
pub use sim::*;
pub use worker::*;
pub use workstations::*;
