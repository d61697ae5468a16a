//! Worker configuration: a TOML file, then `HMR_*` environment overrides. Secrets are
//! wrapped so that no `Debug` or log line can print them.

use std::path::Path;

use serde::Deserialize;

use crate::error::WorkerError;

/// A secret string: prints as `***`.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub platform: PlatformConfig,
    #[serde(default)]
    pub worker: WorkerConfig,
    #[serde(default)]
    pub pdf: PdfConfig,
    #[serde(default)]
    pub serve: ServeConfig,
}

/// `hmr-worker serve`: the terminals allowed to call it. With none configured every call is
/// accepted (and the service listens on loopback only); with terminals, every call but the
/// discovery needs a CDS Hooks JWT (ES384 or RS384) signed by one of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// The `aud` the tokens must carry (the service's base URL as the terminals know it).
    pub audience: Option<String>,
    pub terminals: Vec<TerminalConfig>,
    /// HTTPS (rustls): the certificate chain and its private key, PEM files. Without them the
    /// service speaks plain HTTP and listens on loopback only (behind a TLS proxy).
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// Calls a terminal may make per minute (each terminal its own budget; 429 beyond it).
    pub rate_per_minute: u32,
    /// Calls a terminal may make at once before the per-minute rate applies.
    pub burst: u32,
    /// How long a widget session (`POST /api/sessions`) lasts, in minutes (a shift).
    pub session_minutes: u32,
    /// No terminals, nothing checked: for a rehearsal or the demo, on loopback only.
    pub anonymous: bool,
    /// Origins of the workstation pages that may frame the widget (CSP `frame-ancestors`).
    pub embed_origins: Vec<String>,
    /// The FHIR `system` of the HIS's own item codes in a draft ServiceRequest's `code.coding`
    /// (mapped through `hmr.item_map`): an order coded only in other systems (SNOMED, LOINC) is
    /// refused with 400 naming them, never answered as "no duplicate".
    pub item_system: String,
    /// Connections one source address may hold at once; more are accepted and closed at once,
    /// so one client cannot take the service's 256 from the others.
    pub max_connections_per_client: u32,
    /// Seconds a client has to send a request's body once its headers are in (408 beyond).
    pub body_timeout_secs: u32,
    /// The names the service answers to (the `Host` header, without port): a request naming
    /// another host is refused (421), so a page served under a rebound DNS name cannot read
    /// patients through a browser. Empty: the listen address, localhost, 127.0.0.1, [::1] and
    /// the host of `audience`.
    pub allowed_hosts: Vec<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            audience: None,
            terminals: Vec::new(),
            tls_cert: None,
            tls_key: None,
            rate_per_minute: 600,
            burst: 60,
            session_minutes: 480,
            anonymous: false,
            embed_origins: Vec::new(),
            item_system: "urn:hmr:item".into(),
            max_connections_per_client: 32,
            body_timeout_secs: 10,
            allowed_hosts: Vec::new(),
        }
    }
}

/// One terminal: its `iss` and its public key as a JWK: EC P-384 (its tokens are ES384) or
/// RSA of 2048 to 8192 bits (RS384), the two algorithms CDS Hooks recommends.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalConfig {
    pub iss: String,
    /// Recorded with its calls (`hmr.list_log.workstation`).
    pub name: String,
    pub jwk: Jwk,
}

/// A public JWK (RFC 7517): `kty` EC with `crv`, `x`, `y`, or `kty` RSA with `n`, `e`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Jwk {
    pub kty: String,
    #[serde(default)]
    pub crv: Option<String>,
    #[serde(default)]
    pub x: Option<String>,
    #[serde(default)]
    pub y: Option<String>,
    #[serde(default)]
    pub n: Option<String>,
    #[serde(default)]
    pub e: Option<String>,
}

/// Report PDFs: the source's own (a `pdf` bytea or `pdf_path` column), else rendered.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PdfConfig {
    /// Render a PDF from the template when the source has none (else upload data only).
    pub render: bool,
    /// The hospital's template (TOML); the built-in 报告单 layout when absent.
    pub template: Option<String>,
    /// A font with Chinese glyphs (.ttf/.ttc), embedded and subset into every PDF.
    pub font: String,
    /// Printed as the title of rendered reports.
    pub hospital_name: String,
    /// The hospital's 互认 statement, printed under rendered reports (`""`: none).
    pub recognition_statement: String,
}

impl Default for PdfConfig {
    fn default() -> Self {
        PdfConfig {
            render: true,
            template: None,
            font: hmr_pdf::DEFAULT_FONT.into(),
            hospital_name: "医院".into(),
            recognition_statement: "本报告已上传检查检验结果互认共享平台，在有效期内可供其他医疗机构互认。".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// libpq-style connection string; a password in it is a secret.
    pub url: Secret,
    /// Session time zone: times are sent with this offset.
    #[serde(default = "default_timezone")]
    pub timezone: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Password,
    Signature,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformConfig {
    pub base_url: String,
    /// The hospital's 统一社会信用代码.
    pub org_code: String,
    #[serde(default = "default_auth")]
    pub auth: AuthMode,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: Secret,
    #[serde(default)]
    pub app_id: String,
    #[serde(default)]
    pub app_secret: Secret,
    /// `HMAC-SHA256` or `HMAC-SM3`.
    #[serde(default = "default_sign_alg")]
    pub sign_alg: String,
    /// Extra CA certificates (PEM) for the city's TLS endpoint.
    #[serde(default)]
    pub ca_bundle: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The operator number sent with a revoke when the source does not name one.
    #[serde(default = "default_operator")]
    pub revoke_operator_no: String,
    /// 院区/分支机构代码 of the hospital's campuses (main campus included). When set, a
    /// department of another campus is quarantined as a mapping mistake.
    #[serde(default)]
    pub campus_codes: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Names this worker in leases; defaults to host name and process id.
    pub id: Option<String>,
    /// Events claimed per round.
    pub batch_size: i64,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// How long an idle worker waits before looking again without a NOTIFY.
    pub poll_interval_ms: u64,
    /// A claim not finished within this returns to the queue (a crashed worker's claims).
    pub lease_secs: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// Tries of a record whose dependency the platform lacks before quarantining it.
    pub max_dependency_attempts: i32,
    /// On SIGTERM, how long in-flight work may take before its claims are released.
    pub shutdown_grace_secs: u64,
    /// Log as JSON lines (for log collectors) instead of text.
    pub json_logs: bool,
    /// How often polled sources (`hmr.polled_sources`: exam systems without triggers) are read.
    pub poll_sources_ms: u64,
    /// `host:port` for Prometheus `/metrics` and `/health` (off when absent).
    pub metrics_listen: Option<String>,
    /// Finished events stay in `hmr.outbox_history` this many days (audit), then are removed.
    pub history_retention_days: i32,
    /// How often each kept report of another hospital is asked about again (revoked at its
    /// source since it was kept?). 240 s: with the 60 s tick, a revoke is noticed within 5 min.
    pub recheck_kept_secs: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            id: None,
            batch_size: 500,
            concurrency: 32,
            poll_interval_ms: 1000,
            lease_secs: 60,
            backoff_base_ms: 500,
            backoff_max_ms: 300_000,
            max_dependency_attempts: 20,
            shutdown_grace_secs: 10,
            json_logs: false,
            poll_sources_ms: 5000,
            metrics_listen: None,
            history_retention_days: 90,
            recheck_kept_secs: 240,
        }
    }
}

fn default_timezone() -> String {
    "Asia/Shanghai".into()
}
fn default_auth() -> AuthMode {
    AuthMode::Password
}
fn default_sign_alg() -> String {
    "HMAC-SHA256".into()
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_operator() -> String {
    "hmr".into()
}

impl Config {
    /// Reads the file (refusing one that others can read when it holds a secret), then
    /// applies environment overrides.
    pub fn load(path: &Path) -> Result<Config, WorkerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| WorkerError::Config(format!("cannot read {}: {e}", path.display())))?;
        let mut config: Config =
            toml::from_str(&text).map_err(|e| WorkerError::Config(format!("{}: {e}", path.display())))?;
        let holds_secret = !config.platform.password.expose().is_empty()
            || !config.platform.app_secret.expose().is_empty()
            || config.database.url.expose().contains("password");
        if holds_secret {
            check_private(path)?;
        }
        config.apply_env(|k| std::env::var(k).ok());
        config.validate()?;
        Ok(config)
    }

    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(v) = get("HMR_DATABASE_URL") {
            self.database.url = Secret::new(v);
        }
        if let Some(v) = get("HMR_PLATFORM_BASE_URL") {
            self.platform.base_url = v;
        }
        if let Some(v) = get("HMR_PLATFORM_ORG_CODE") {
            self.platform.org_code = v;
        }
        if let Some(v) = get("HMR_PLATFORM_USERNAME") {
            self.platform.username = v;
        }
        if let Some(v) = get("HMR_PLATFORM_PASSWORD") {
            self.platform.password = Secret::new(v);
        }
        if let Some(v) = get("HMR_PLATFORM_APP_ID") {
            self.platform.app_id = v;
        }
        if let Some(v) = get("HMR_PLATFORM_APP_SECRET") {
            self.platform.app_secret = Secret::new(v);
        }
        if let Some(v) = get("HMR_WORKER_ID") {
            self.worker.id = Some(v);
        }
    }

    fn validate(&self) -> Result<(), WorkerError> {
        if !hmr_protocol::checks::org_code_valid(&self.platform.org_code) {
            return Err(WorkerError::Config(format!(
                "platform.org_code {:?} is not a valid 统一社会信用代码 (18 characters, GB 32100 check character)",
                self.platform.org_code
            )));
        }
        match self.platform.auth {
            AuthMode::Password if self.platform.username.is_empty() || self.platform.password.expose().is_empty() => {
                Err(WorkerError::Config(
                    "auth = \"password\" needs platform.username and platform.password".into(),
                ))
            }
            AuthMode::Signature if self.platform.app_id.is_empty() || self.platform.app_secret.expose().is_empty() => {
                Err(WorkerError::Config(
                    "auth = \"signature\" needs platform.app_id and platform.app_secret".into(),
                ))
            }
            _ if !matches!(self.platform.sign_alg.as_str(), "HMAC-SHA256" | "HMAC-SM3") => Err(WorkerError::Config(
                "platform.sign_alg must be HMAC-SHA256 or HMAC-SM3".into(),
            )),
            _ => Ok(()),
        }
    }

    pub fn worker_id(&self) -> String {
        self.worker.id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}:{}", host.trim(), std::process::id())
        })
    }
}

#[cfg(unix)]
pub(crate) fn check_private(path: &Path) -> Result<(), WorkerError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| WorkerError::Config(e.to_string()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(WorkerError::Config(format!(
            "{} holds a secret but is readable by others (mode {:o}): chmod 600 it",
            path.display(),
            mode & 0o777
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
pub(crate) fn check_private(_path: &Path) -> Result<(), WorkerError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
        [database]
        url = "host=/tmp dbname=his"
        [platform]
        base_url = "http://127.0.0.1:8900"
        org_code = "91350100M000100Y43"
        username = "hz1"
        password = "s3cret"
    "#;

    #[test]
    fn secrets_never_print() {
        let config: Config = toml::from_str(SAMPLE).unwrap();
        let printed = format!("{config:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert_eq!(config.platform.password.expose(), "s3cret");
        assert_eq!(config.worker.batch_size, 500);
    }

    #[test]
    fn environment_overrides_file() {
        let mut config: Config = toml::from_str(SAMPLE).unwrap();
        config.apply_env(|k| (k == "HMR_PLATFORM_PASSWORD").then(|| "from-env".to_string()));
        assert_eq!(config.platform.password.expose(), "from-env");
        assert!(config.validate().is_ok());
        config.platform.org_code = "91350100M000100Y44".into();
        assert!(config.validate().is_err());
    }

    #[test]
    fn refuses_world_readable_secret_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("hmr-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("worker.toml");
        std::fs::write(&path, SAMPLE).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Config::load(&path).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
