//! `hmr-platform-sim`: runs the platform simulator. Prints exactly one line to stdout,
//! `hmr-platform-sim listening on http://ADDR`, once it accepts connections; logs go to stderr.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use hmr_platform_sim::{Catalog, OrgConfig, Sim, SimConfig};

#[derive(Parser, Debug)]
#[command(
    name = "hmr-platform-sim",
    version,
    about = "Simulator of the city mutual-recognition platform"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8900")]
    listen: SocketAddr,
    /// The recognition catalog CSV (dataCode,type,name,validityDays).
    #[arg(long, default_value = "sql/catalog-sample.csv")]
    catalog: PathBuf,
    /// An org account: CODE,NAME,USERNAME,PASSWORD,APP_ID,APP_SECRET (repeatable).
    /// Without it, two demo Huizhou hospitals (hz1, hz2).
    #[arg(long = "org", value_name = "SPEC")]
    orgs: Vec<String>,
    /// `expiresIn` of issued tokens.
    #[arg(long, default_value_t = 7200)]
    token_ttl_secs: u64,
    /// Base URL of the page links handed out (default: http://LISTEN-ADDRESS).
    #[arg(long)]
    public_url: Option<String>,
    /// Do not offer an org its own reports for recognition.
    #[arg(long)]
    exclude_own_reports: bool,
    /// Let non-loopback callers use the /_sim/ control API.
    #[arg(long)]
    control_from_anywhere: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let catalog = Catalog::load(&args.catalog)?;
    let orgs = if args.orgs.is_empty() {
        OrgConfig::demo()
    } else {
        args.orgs
            .iter()
            .map(|s| OrgConfig::parse(s))
            .collect::<Result<_, _>>()?
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let addr = listener.local_addr()?;
    let config = SimConfig {
        orgs,
        catalog,
        token_ttl_secs: args.token_ttl_secs,
        public_url: Some(args.public_url.unwrap_or_else(|| format!("http://{addr}"))),
        own_reports_recognisable: !args.exclude_own_reports,
        control_from_anywhere: args.control_from_anywhere,
    };
    for o in &config.orgs {
        tracing::info!(code = %o.code, name = %o.name, username = %o.username, app_id = %o.app_id, "org account");
    }
    tracing::info!(entries = config.catalog.len(), path = %args.catalog.display(), "catalog loaded");
    let sim = Sim::new(config)?;

    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "hmr-platform-sim listening on http://{addr}")?;
    stdout.flush()?;
    drop(stdout);

    tokio::select! {
        result = sim.serve(listener) => result,
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted, stopping");
            Ok(())
        }
    }
}
