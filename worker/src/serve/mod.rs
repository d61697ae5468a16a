//! `hmr-worker serve`: the recognition services for terminals that cannot call SQL, as an
//! HL7 CDS Hooks 2.0 service (`docs/design/cds-hooks.md`) over the same SQL functions the HIS
//! calls — one set of checks, prompts, decisions and outbox:
//!
//! - `GET  /cds-services`: discovery;
//! - `POST /cds-services/hmr-recognitions` (`patient-view`): the badge as a card;
//! - `POST /cds-services/hmr-order-check` (`order-sign`): a card per order that duplicates a
//!   recognisable report, with the suggestion 互认 and the six 不互认 reasons as override
//!   reasons;
//! - `POST /cds-services/hmr-order-select` (`order-select`): a card per selected order that has
//!   recognisable results (the precise query), before the doctor signs;
//! - `POST /cds-services/hmr-order-check/feedback`: the doctor's choice, recorded as a decision.
//!
//! And a small JSON API for terminals that do not speak CDS Hooks (`docs/openapi.yaml`):
//! `GET /api/badge`, `POST /api/query`, `POST /api/check`, `POST /api/decide`,
//! `GET /api/reports/{report_id}`, `POST /api/sessions` (a session for the widget).
//!
//! The reference widget (`/widget/`, static HTML + JS, `src/serve/widget/`): the badge, the list,
//! the forced 互认/不互认 dialog at sign, downloads; embedded by URL with a session.
//!
//! Authentication (`[serve] terminals`): every call but the discovery and the widget's static
//! files carries a CDS Hooks JWT (`Authorization: Bearer`, ES384, or RS384 for an RSA key) signed by a configured
//! terminal: `iss` known, `aud` the configured audience, `exp` in the future, `iat` not in the
//! future, `jti` never seen before (replays refused); or a widget session
//! (`Authorization: Session`) a terminal opened for one patient, visit and doctor, which
//! reaches only that patient's badge, checks and reports. The terminal's name is recorded with
//! its badge calls and its decisions. Each terminal has its own rate budget (429 beyond it).
//! Without terminals configured nothing is checked; without TLS (`tls_cert`, `tls_key`,
//! rustls) the service listens on loopback only, and a non-loopback address needs both.
//! Identifiers: the FHIR `patientId` is the HIS patient id (`hmr_src.patient`), `encounterId`
//! the visit number, `userId` `Practitioner/<staff no>` (department from `hmr_src.staff`).
//!
//! Rooms: this file starts the service (listener, connections, database pool) and holds what
//! every handler shares (what a call names, the database's answers as HTTP); `auth.rs` who may
//! call (JWTs, sessions, rate budgets), `hooks.rs` the CDS Hooks services, `api.rs` the JSON
//! API, `sessions.rs` the widget's sessions, `widget.rs` the widget's files and framing,
//! `tls.rs` the certificate.

use std::net::SocketAddr;
use std::sync::Arc;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use hmr_protocol::answers::{ListResult, PrescriptionCheckResult, QueryResult};
use hmr_protocol::checks::OUTPATIENT;

use crate::error::WorkerError;

const SOURCE: &str = "检查检验结果互认平台";
/// The 不互认 reasons (platform codes 01–06) as CDS Hooks override reasons.
const REASON_SYSTEM: &str = "urn:hmr:decline-reason";

struct Service {
    pool: deadpool_postgres::Pool,
    auth: Auth,
    limits: RateLimits,
    /// Refused tokens per source address (`auth::failure_key`).
    failures: RateLimits,
    /// The `Host` names the service answers to (`[serve] allowed_hosts`).
    allowed_hosts: Vec<String>,
    /// How long a request's body may take (`[serve] body_timeout_secs`).
    body_timeout: Duration,
    sessions: Sessions,
    /// The patient and the doctor's department from the source views (`hmr.kinds.source_view`):
    /// alone, and folded into the badge and the check, so those take one round trip.
    statements: Statements,
    /// CSP `frame-ancestors` of the widget's pages.
    frame_ancestors: String,
    /// `[serve] item_system`: the FHIR system of the HIS's item codes.
    item_system: String,
}

/// Why the database did not answer: no connection to be had, or the statement failed.
#[derive(Debug)]
enum DbError {
    Pool(String),
    Sql(tokio_postgres::Error),
    /// The SQL function answered JSON this build cannot read (an extension of another version).
    Reply(String),
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::Sql(e)
    }
}

impl DbError {
    fn sqlstate(&self) -> Option<&str> {
        match self {
            DbError::Sql(e) => e.code().map(|c| c.code()),
            DbError::Pool(_) | DbError::Reply(_) => None,
        }
    }

    /// The recognition function refused this call (a data problem: HMxxx, class 22), as
    /// opposed to the service's database failing (no connection, a missing grant or view). A
    /// hook answers the first with no cards (care goes on) and the second with an error, so a
    /// broken service never reads as "no duplicates".
    fn refused_by_function(&self) -> bool {
        self.sqlstate()
            .is_some_and(|c| c.starts_with("HM") || c.starts_with("22"))
    }
}

/// Where the service may listen, and who may call: terminals with their JWTs, or nobody but
/// this machine (`anonymous = true`, for a rehearsal or the demo: loopback only). A
/// non-loopback address needs TLS as well (patients' data never crosses a network in clear).
pub fn listen_allowed(listen: SocketAddr, cfg: &crate::config::ServeConfig) -> Result<(), String> {
    match (cfg.terminals.is_empty(), cfg.anonymous) {
        (true, false) => {
            return Err(
                "[serve] lists no terminals: add [[serve.terminals]] (or anonymous = true for a \
                        rehearsal on this machine only)"
                    .into(),
            )
        }
        (false, true) => return Err("[serve] anonymous = true and terminals: choose one".into()),
        (false, false) if cfg.audience.is_none() => {
            return Err("[serve] audience is required with terminals (the aud of their tokens)".into())
        }
        _ => {}
    }
    if listen.ip().is_loopback() {
        return Ok(());
    }
    if cfg.anonymous {
        return Err(format!(
            "serve without terminals (anonymous) listens on loopback only, not {listen}"
        ));
    }
    if cfg.tls_cert.is_none() || cfg.tls_key.is_none() {
        return Err(format!(
            "serve listens on {listen} only with TLS: set [serve] tls_cert and tls_key, or listen on loopback behind a TLS proxy"
        ));
    }
    Ok(())
}

/// Connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 256;
/// Connections the service keeps to the database.
const DB_CONNECTIONS: usize = 4;

pub async fn run(url: &str, listen: SocketAddr, serve: &crate::config::ServeConfig) -> Result<(), WorkerError> {
    listen_allowed(listen, serve).map_err(WorkerError::Config)?;
    if serve.tls_cert.is_some() != serve.tls_key.is_some() {
        return Err(WorkerError::Config("[serve] tls_cert and tls_key go together".into()));
    }
    let tls = match (&serve.tls_cert, &serve.tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
        _ => None,
    };
    let auth = Auth::new(serve)?;
    let pg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| WorkerError::Config(format!("database.url: {e}")))?;
    let manager = deadpool_postgres::Manager::from_config(
        pg,
        NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(DB_CONNECTIONS)
        .wait_timeout(Some(Duration::from_secs(10)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| WorkerError::Config(format!("database pool: {e}")))?;
    let db = pool
        .get()
        .await
        .map_err(|e| WorkerError::Config(format!("cannot connect to the database: {e}")))?;
    let mut views = Vec::new();
    for kind in ["patient", "staff"] {
        let row = db
            .query_one(
                "SELECT to_regclass(source_view)::text FROM hmr.kinds WHERE kind = $1",
                &[&kind],
            )
            .await?;
        views.push(row.get::<_, Option<String>>(0).ok_or_else(|| {
            WorkerError::Config(format!("the {kind} source view (hmr.kinds.source_view) does not exist"))
        })?);
    }
    drop(db);
    let statements = Statements::new(&views[0], &views[1]);
    let service = Arc::new(Service {
        pool,
        auth,
        limits: RateLimits::new(serve.rate_per_minute, serve.burst),
        failures: RateLimits::new(serve.rate_per_minute, serve.burst),
        allowed_hosts: allowed_hosts(listen, serve)?,
        body_timeout: Duration::from_secs(u64::from(serve.body_timeout_secs.max(1))),
        sessions: Sessions::new(Duration::from_secs(u64::from(serve.session_minutes) * 60)),
        statements,
        frame_ancestors: frame_ancestors(&serve.embed_origins)?,
        item_system: serve.item_system.clone(),
    });
    let app = Router::new()
        .route("/cds-services", get(discovery))
        .route("/cds-services/{id}", post(hook))
        .route("/cds-services/{id}/feedback", post(feedback))
        .route("/api/badge", get(api_list))
        .route("/api/query", post(api_query))
        .route("/api/check", post(api_check))
        .route("/api/decide", post(api_decide))
        .route("/api/reports/{report_id}", get(api_report))
        .route("/api/sessions", post(api_session))
        .route("/widget", get(widget_root))
        .route(
            "/widget/",
            get(|State(s): State<Arc<Service>>| widget_file(s, "index.html".into())),
        )
        .route(
            "/widget/{file}",
            get(|State(s): State<Arc<Service>>, Path(file): Path<String>| widget_file(s, file)),
        )
        // Innermost first: the body is read only for a caller that passed the Host check and
        // authentication.
        .layer(axum::middleware::from_fn_with_state(service.clone(), read_body))
        .layer(axum::middleware::from_fn_with_state(service.clone(), authenticate))
        .layer(axum::middleware::from_fn_with_state(service.clone(), host_allowed))
        .with_state(service);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| WorkerError::Config(format!("cannot listen on {listen}: {e}")))?;
    tracing::info!(%listen, tls = tls.is_some(), "serving CDS Hooks, the JSON API and the widget");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let admission = Arc::new(Admission::new(serve.max_connections_per_client));
    loop {
        let slot = slots.clone().acquire_owned().await.expect("never closed");
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait a moment rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // One source address holds at most its share: beyond it the connection is closed at
        // once (its slot freed), so a client that hoards idle sockets starves only itself.
        let Some(admitted) = admission.admit(peer.ip()) else {
            drop(tcp);
            continue;
        };
        // Answers go out whole, not held back for the previous segment's acknowledgement.
        let _ = tcp.set_nodelay(true);
        let (tls, app) = (tls.clone(), app.clone());
        tokio::spawn(async move {
            let (_slot, _admitted) = (slot, admitted);
            match tls {
                Some(tls) => {
                    // A client that never finishes its handshake holds nothing for long.
                    if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await {
                        serve_connection(stream, app, peer).await;
                    }
                }
                None => serve_connection(tcp, app, peer).await,
            }
        });
    }
}

/// One connection, plain or TLS: a client that sends nothing (or dribbles its headers) holds
/// nothing for long, and no connection lives longer than CONNECTION_LIFETIME (clients reconnect).
async fn serve_connection<I>(io: I, app: Router, peer: SocketAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    let app = hyper_util::service::TowerToHyperService::new(app);
    // Each request knows its connection's source address (refused tokens are budgeted by it).
    let service = hyper::service::service_fn(move |mut request: axum::http::Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(ClientAddr(peer.ip()));
        hyper::service::Service::call(&app, request)
    });
    let connection = http.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
}

/// The longest a connection is kept (keep-alive included).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(600);

/// The connections each source address holds (`[serve] max_connections_per_client`).
struct Admission {
    per_client: usize,
    held: Mutex<HashMap<std::net::IpAddr, usize>>,
    /// When a refusal was last logged: a flood is logged once a minute, not per connection.
    warned: Mutex<Option<Instant>>,
}

impl Admission {
    fn new(per_client: u32) -> Admission {
        Admission {
            per_client: per_client.max(1) as usize,
            held: Mutex::new(HashMap::new()),
            warned: Mutex::new(None),
        }
    }

    /// A connection of `ip`, or None when it already holds its share.
    fn admit(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<Admitted> {
        let mut held = self.held.lock().expect("admission");
        let n = held.entry(ip).or_insert(0);
        if *n >= self.per_client {
            drop(held);
            let mut warned = self.warned.lock().expect("admission");
            if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                *warned = Some(Instant::now());
                tracing::warn!(client = %ip, limit = self.per_client,
                               "a client holds its share of connections: closing its further ones");
            }
            return None;
        }
        *n += 1;
        Some(Admitted {
            admission: self.clone(),
            ip,
        })
    }
}

/// One admitted connection; its share is given back when it ends.
struct Admitted {
    admission: Arc<Admission>,
    ip: std::net::IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut held = self.admission.held.lock().expect("admission");
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// The largest request body read (axum's own default for a JSON body).
const MAX_BODY: usize = 2 * 1024 * 1024;

/// Reads the whole body within `[serve] body_timeout_secs` before the handler runs: a client
/// that announces a body and never sends it is answered 408 and its connection closed, instead
/// of holding it for the connection's lifetime.
async fn read_body(
    State(s): State<Arc<Service>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let close = [(header::CONNECTION, "close")];
    match tokio::time::timeout(s.body_timeout, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => next.run(axum::extract::Request::from_parts(parts, bytes.into())).await,
        Ok(Err(_)) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            close,
            Json(json!({"error": format!("the request body could not be read (at most {MAX_BODY} bytes)")})),
        )
            .into_response(),
        Err(_) => (
            StatusCode::REQUEST_TIMEOUT,
            close,
            Json(json!({"error": format!("the request body did not arrive within {} s", s.body_timeout.as_secs())})),
        )
            .into_response(),
    }
}

/// The `Host` names the service answers to: `[serve] allowed_hosts`, or by default the listen
/// address, this machine's loopback names and the host of `audience` (lower case, IPv6
/// without brackets).
fn allowed_hosts(listen: SocketAddr, serve: &crate::config::ServeConfig) -> Result<Vec<String>, WorkerError> {
    if !serve.allowed_hosts.is_empty() {
        return Ok(serve.allowed_hosts.iter().map(|h| host_name(h)).collect());
    }
    let mut hosts: Vec<String> = vec![
        listen.ip().to_string(),
        "localhost".into(),
        "127.0.0.1".into(),
        "::1".into(),
    ];
    if let Some(audience) = &serve.audience {
        let uri: axum::http::Uri = audience
            .parse()
            .map_err(|e| WorkerError::Config(format!("[serve] audience {audience:?} is not a URL: {e}")))?;
        if let Some(host) = uri.host() {
            hosts.push(host_name(host));
        }
    }
    Ok(hosts)
}

/// A host name as compared: lower case, no IPv6 brackets, no trailing dot.
fn host_name(host: &str) -> String {
    host.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// The name a request's `Host` header gives, without its port; None without one (HTTP/1.0:
/// no browser sends that, so it cannot be a rebound page); Err for a malformed one.
fn request_host(request: &axum::extract::Request) -> Result<Option<String>, ()> {
    let Some(value) = request.headers().get(header::HOST) else {
        return Ok(None);
    };
    let authority: axum::http::uri::Authority = value.to_str().map_err(|_| ())?.parse().map_err(|_| ())?;
    Ok(Some(host_name(authority.host())))
}

/// DNS rebinding: a page of `attacker.example` whose name is made to resolve to this service
/// would call it from the doctor's browser as its own origin; the browser still says
/// `Host: attacker.example`, which is refused here (421) before anything else.
async fn host_allowed(
    State(s): State<Arc<Service>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match request_host(&request) {
        Ok(None) => next.run(request).await,
        Ok(Some(host)) if s.allowed_hosts.contains(&host) => next.run(request).await,
        Ok(Some(host)) => (
            StatusCode::MISDIRECTED_REQUEST,
            Json(json!({"error": format!(
                "Host {host} is not a name of this service: call it by one of its names ([serve] allowed_hosts)"
            )})),
        )
            .into_response(),
        Err(()) => bad("the Host header is malformed").into_response(),
    }
}

/// Why a request cannot be answered (CDS Hooks: a 4xx with a reason).
fn bad(message: impl Into<String>) -> (StatusCode, Json<Value>) {
    (StatusCode::BAD_REQUEST, Json(json!({"error": message.into()})))
}

type Reply = Result<Json<Value>, (StatusCode, Json<Value>)>;

/// What a call names: the patient, the visit and the doctor, as the HIS knows them (a hook's
/// context, the JSON API's fields). Nothing is looked up yet.
struct Ask {
    patient_id: String,
    visit_no: String,
    doctor_no: String,
}

impl Ask {
    /// From a hook's context (`patientId`, `encounterId`, `userId` as `Practitioner/<id>`).
    fn from_context(context: &Value) -> Result<Ask, (StatusCode, Json<Value>)> {
        let text = |k: &str| context.get(k).and_then(Value::as_str).map(str::to_string);
        let patient_id = text("patientId").ok_or_else(|| bad("context.patientId is required"))?;
        let doctor_no = text("userId")
            .map(|u| u.rsplit('/').next().unwrap_or_default().to_string())
            .ok_or_else(|| bad("context.userId is required"))?;
        Ok(Ask {
            patient_id,
            visit_no: text("encounterId").unwrap_or_default(),
            doctor_no,
        })
    }

    /// From the JSON API's field names (`patient_id`, `visit_no`, `doctor_no`).
    fn from_body(body: &Value) -> Result<Ask, (StatusCode, Json<Value>)> {
        Ask::from_context(
            &json!({"patientId": body["patient_id"], "encounterId": body["visit_no"],
                                  "userId": body["doctor_no"]}),
        )
    }

    fn unknown(&self) -> (StatusCode, Json<Value>) {
        bad(format!("patient {} is not in the HIS", self.patient_id))
    }
}

/// The HIS identifiers behind a call, looked up.
struct Visit {
    patient_id: String,
    id_type: String,
    id_no: String,
    visit_no: String,
    doctor_no: String,
}

/// The statements that look up a call's patient (its identity) and, for the badge and the
/// check, its doctor (the department; a doctor not in the staff view has none, and the
/// platform's check then names none). The badge's and the check's functions run inside the
/// lookup, only for a patient the HIS has: one round trip instead of two, on the path a
/// doctor waits on (BENCHMARKS.md §6).
struct Statements {
    who: String,
    list: String,
    check: String,
}

impl Statements {
    fn new(patient: &str, staff: &str) -> Statements {
        let dept = format!(
            "coalesce((SELECT s.dept_code::text FROM {staff} s WHERE s.staff_no::text = $2::text LIMIT 1), '')"
        );
        // A patient without an identity number cannot be asked about: as if unknown.
        let from = format!(
            "FROM {patient} p WHERE p.patient_id::text = $1::text
               AND p.id_type IS NOT NULL AND p.id_no IS NOT NULL LIMIT 1"
        );
        Statements {
            who: format!("SELECT p.id_type::text, p.id_no::text {from}"),
            list: format!(
                "SELECT hmr_list_recognitions(p.id_type::text, p.id_no::text, $3::text, $2::text, {dept},
                                              workstation => $4::text) {from}"
            ),
            check: format!(
                "SELECT hmr_check_prescription(
                          jsonb_build_object('id_type', p.id_type::text, 'id_no', p.id_no::text,
                                             'patient_id', $1::text, 'visit_type', $3::text,
                                             'visit_no', $4::text, 'doctor_no', $2::text,
                                             'dept_code', {dept}),
                          $5::jsonb) {from}"
            ),
        }
    }
}

impl Service {
    async fn who(&self, ask: &Ask) -> Result<Visit, (StatusCode, Json<Value>)> {
        let row = self
            .opt(&self.statements.who, &[&ask.patient_id])
            .await
            .map_err(db_answer)?
            .ok_or_else(|| ask.unknown())?;
        Ok(Visit {
            patient_id: ask.patient_id.clone(),
            id_type: row.try_get(0).map_err(|e| db_answer(e.into()))?,
            id_no: row.try_get(1).map_err(|e| db_answer(e.into()))?,
            visit_no: ask.visit_no.clone(),
            doctor_no: ask.doctor_no.clone(),
        })
    }

    /// One row of a statement prepared once per connection, on a connection of the pool.
    async fn one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, DbError> {
        let db = self.pool.get().await.map_err(pool_error)?;
        let statement = db.prepare_cached(sql).await?;
        Ok(db.query_one(&statement, params).await?)
    }

    async fn opt(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>, DbError> {
        let db = self.pool.get().await.map_err(pool_error)?;
        let statement = db.prepare_cached(sql).await?;
        Ok(db.query_opt(&statement, params).await?)
    }

    /// The badge, as `hmr_list_recognitions` answers it (kept in `hmr.list_log` with the
    /// calling `workstation`); None for a patient the HIS does not have.
    async fn list(&self, ask: &Ask, workstation: &str) -> Result<Option<ListResult>, DbError> {
        let row = self
            .opt(
                &self.statements.list,
                &[&ask.patient_id, &ask.doctor_no, &ask.visit_no, &workstation],
            )
            .await?;
        row.map(|r| typed(r.try_get(0)?)).transpose()
    }

    /// The prescription check (`hmr_check_prescription`); None for a patient the HIS does
    /// not have.
    async fn check(
        &self,
        ask: &Ask,
        visit_type: &str,
        orders: &Value,
    ) -> Result<Option<PrescriptionCheckResult>, DbError> {
        let row = self
            .opt(
                &self.statements.check,
                &[&ask.patient_id, &ask.doctor_no, &visit_type, &ask.visit_no, orders],
            )
            .await?;
        row.map(|r| typed(r.try_get(0)?)).transpose()
    }

    /// Claims a verified token's `jti` for good (until its expiry): false when it was used
    /// before, by this process or an earlier one (`hmr.claim_jti`).
    async fn claim_jti(&self, token: &Verified) -> Result<bool, DbError> {
        let row = self
            .one(
                "SELECT hmr.claim_jti($1, $2, to_timestamp($3::float8))",
                &[&token.iss, &token.jti, &(token.exp as f64)],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// The precise query (`hmr_query_recognitions`) for a filter naming the patient.
    async fn query(&self, filter: &Value) -> Result<QueryResult, DbError> {
        let row = self.one("SELECT hmr_query_recognitions($1)", &[filter]).await?;
        typed(row.try_get(0)?)
    }
}

/// A SQL function's answer as its type (`hmr_protocol::answers`).
fn typed<T: serde::de::DeserializeOwned>(answer: Value) -> Result<T, DbError> {
    serde_json::from_value(answer).map_err(|e| DbError::Reply(e.to_string()))
}

/// A database error as the terminal sees it: hmr's own refusals (HMxxx, 22023) with their
/// Chinese message, written for the doctor; anything else with its SQLSTATE only (a database
/// message may quote a patient or name the HIS's tables).
fn db_answer(e: DbError) -> (StatusCode, Json<Value>) {
    match &e {
        DbError::Sql(sql) => match sql.as_db_error() {
            Some(d) if d.code().code().starts_with("HM") || d.code().code() == "22023" => (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"sqlstate": d.code().code(), "error": d.message()})),
            ),
            Some(d) => {
                tracing::warn!(sqlstate = d.code().code(), "database refused a call");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"sqlstate": d.code().code(), "error": "数据库暂不可用，请稍后重试"})),
                )
            }
            None => unavailable(&e),
        },
        DbError::Pool(_) | DbError::Reply(_) => unavailable(&e),
    }
}

/// Why the pool has no connection to give, with the server's SQLSTATE and message when it
/// refused one (a connection's refusal names no patient).
fn pool_error(e: deadpool_postgres::PoolError) -> DbError {
    let why = match &e {
        deadpool_postgres::PoolError::Backend(b) => match b.as_db_error() {
            Some(d) => format!("{e}: {} {}", d.code().code(), d.message()),
            None => format!(
                "{e}: {}",
                std::error::Error::source(b).map(|s| s.to_string()).unwrap_or_default()
            ),
        },
        _ => e.to_string(),
    };
    DbError::Pool(why)
}

fn unavailable(e: &DbError) -> (StatusCode, Json<Value>) {
    match e {
        // A connection's failure (no patient data in it).
        DbError::Pool(why) => tracing::warn!(error = %why, "no database connection"),
        DbError::Sql(_) => tracing::warn!("the database connection failed"),
        DbError::Reply(why) => {
            tracing::error!(error = %why, "a recognition function answered what this serve cannot read (extension and worker of different versions?)")
        }
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": "数据库暂不可用，请稍后重试"})),
    )
}

fn forbidden(message: impl Into<String>) -> (StatusCode, Json<Value>) {
    (StatusCode::FORBIDDEN, Json(json!({"error": message.into()})))
}

mod api;
mod auth;
mod hooks;
mod sessions;
#[cfg(test)]
mod tests;
mod tls;
mod widget;

use api::*;
use auth::*;
use hooks::*;
use sessions::*;
use tls::*;
use widget::*;
