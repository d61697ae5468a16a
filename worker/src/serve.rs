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
//! The reference widget (`/widget/`, static HTML + JS, `src/widget/`): the badge, the list,
//! the forced 互认/不互认 dialog at sign, downloads; embedded by URL with a session.
//!
//! Authentication (`[serve] terminals`): every call but the discovery and the widget's static
//! files carries a CDS Hooks JWT (`Authorization: Bearer`, ES384) signed by a configured
//! terminal: `iss` known, `aud` the configured audience, `exp` in the future, `iat` not in the
//! future, `jti` never seen before (replays refused); or a widget session
//! (`Authorization: Session`) a terminal opened for one patient, visit and doctor, which
//! reaches only that patient's badge, checks and reports. The terminal's name is recorded with
//! its badge calls and its decisions. Each terminal has its own rate budget (429 beyond it).
//! Without terminals configured nothing is checked; without TLS (`tls_cert`, `tls_key`,
//! rustls) the service listens on loopback only, and a non-loopback address needs both.
//! Identifiers: the FHIR `patientId` is the HIS patient id (`hmr_src.patient`), `encounterId`
//! the visit number, `userId` `Practitioner/<staff no>` (department from `hmr_src.staff`).

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

use crate::error::WorkerError;

const SOURCE: &str = "检查检验结果互认平台";
/// The 不互认 reasons (platform codes 01–06) as CDS Hooks override reasons.
const REASON_SYSTEM: &str = "urn:hmr:decline-reason";

struct Service {
    pool: deadpool_postgres::Pool,
    auth: Auth,
    limits: RateLimits,
    sessions: Sessions,
    /// The patient and the doctor's department from the source views (`hmr.kinds.source_view`):
    /// alone, and folded into the badge and the check, so those take one round trip.
    statements: Statements,
    /// CSP `frame-ancestors` of the widget's pages.
    frame_ancestors: String,
}

/// Why the database did not answer: no connection to be had, or the statement failed.
#[derive(Debug)]
enum DbError {
    Pool(String),
    Sql(tokio_postgres::Error),
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
            DbError::Pool(_) => None,
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
        sessions: Sessions::new(Duration::from_secs(u64::from(serve.session_minutes) * 60)),
        statements,
        frame_ancestors: frame_ancestors(&serve.embed_origins)?,
    });
    let app = Router::new()
        .route("/cds-services", get(discovery))
        .route("/cds-services/{id}", post(hook))
        .route("/cds-services/{id}/feedback", post(feedback))
        .route("/api/badge", get(api_badge))
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
        .layer(axum::middleware::from_fn_with_state(service.clone(), authenticate))
        .with_state(service);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| WorkerError::Config(format!("cannot listen on {listen}: {e}")))?;
    tracing::info!(%listen, tls = tls.is_some(), "serving CDS Hooks, the JSON API and the widget");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = slots.clone().acquire_owned().await.expect("never closed");
        let (tcp, _peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait a moment rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Answers go out whole, not held back for the previous segment's acknowledgement.
        let _ = tcp.set_nodelay(true);
        let (tls, app) = (tls.clone(), app.clone());
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                Some(tls) => {
                    // A client that never finishes its handshake holds nothing for long.
                    if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await {
                        serve_connection(stream, app).await;
                    }
                }
                None => serve_connection(tcp, app).await,
            }
        });
    }
}

/// One connection, plain or TLS: a client that sends nothing (or dribbles its headers) holds
/// nothing for long, and no connection lives longer than CONNECTION_LIFETIME (clients reconnect).
async fn serve_connection<I>(io: I, app: Router)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    let service = hyper_util::service::TowerToHyperService::new(app);
    let connection = http.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
}

/// The longest a connection is kept (keep-alive included).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(600);

/// The widget may be framed by this service's pages and the configured workstation origins.
fn frame_ancestors(origins: &[String]) -> Result<String, WorkerError> {
    let mut policy = String::from("'self'");
    for origin in origins {
        let ok = (origin.starts_with("https://") || origin.starts_with("http://"))
            && !origin.contains([' ', ';', ',', '\'', '"']);
        if !ok {
            return Err(WorkerError::Config(format!(
                "[serve] embed_origins: {origin:?} is not an origin like https://his.example"
            )));
        }
        policy.push(' ');
        policy.push_str(origin);
    }
    Ok(policy)
}

/// TLS for the listener (rustls, TLS 1.2 and 1.3, HTTP/1.1) from PEM files.
fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<tokio_rustls::TlsAcceptor, WorkerError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &std::path::Path, e: &dyn std::fmt::Display| {
        WorkerError::Config(format!("[serve] {}: {e}", what.display()))
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, &e))?;
    if chain.is_empty() {
        return Err(bad(cert, &"no certificate in the file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(cert, &e))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| bad(key, &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

// ------------------------------------------------------------------ the widget's files

/// The widget is part of the binary: what was tested is what is served.
fn widget_asset(file: &str) -> Option<(&'static str, &'static str)> {
    Some(match file {
        "index.html" => ("text/html; charset=utf-8", include_str!("widget/index.html")),
        "widget.js" => ("text/javascript; charset=utf-8", include_str!("widget/widget.js")),
        "widget.css" => ("text/css; charset=utf-8", include_str!("widget/widget.css")),
        _ => return None,
    })
}

/// `/widget?…` → `/widget/?…` (relative addresses in the page need the slash).
async fn widget_root(axum::extract::RawQuery(query): axum::extract::RawQuery) -> axum::response::Redirect {
    axum::response::Redirect::permanent(&match query {
        Some(q) => format!("/widget/?{q}"),
        None => "/widget/".into(),
    })
}

async fn widget_file(s: Arc<Service>, file: String) -> Response {
    match widget_asset(&file) {
        Some((content_type, body)) => (
            [
                (header::CONTENT_TYPE, content_type.to_string()),
                // Its own scripts and styles only, nothing but this service to talk to, and
                // framed only by the workstations configured.
                (
                    header::CONTENT_SECURITY_POLICY,
                    format!(
                        "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors {}",
                        s.frame_ancestors
                    ),
                ),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
                (header::REFERRER_POLICY, "no-referrer".to_string()),
                (header::CACHE_CONTROL, "no-cache".to_string()),
            ],
            body,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn discovery() -> Json<Value> {
    Json(json!({"services": [
        {"hook": "patient-view", "id": "hmr-recognitions", "title": "检查检验结果互认提示",
         "description": "打开病历时提示本患者可互认的检查检验结果数量"},
        {"hook": "order-select", "id": "hmr-order-select", "title": "开单互认提示",
         "description": "选择检查检验项目时提示该项目已有的可互认结果（精准查询）"},
        {"hook": "order-sign", "id": "hmr-order-check", "title": "处方保存互认校验",
         "description": "签署医嘱时逐条提示重复的检查检验，互认或选择不互认原因"}
    ]}))
}

/// Why a request cannot be answered (CDS Hooks: a 4xx with a reason).
fn bad(message: impl Into<String>) -> (StatusCode, Json<Value>) {
    (StatusCode::BAD_REQUEST, Json(json!({"error": message.into()})))
}

type Answer = Result<Json<Value>, (StatusCode, Json<Value>)>;

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
struct Who {
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
    async fn who(&self, ask: &Ask) -> Result<Who, (StatusCode, Json<Value>)> {
        let row = self
            .opt(&self.statements.who, &[&ask.patient_id])
            .await
            .map_err(db_answer)?
            .ok_or_else(|| ask.unknown())?;
        Ok(Who {
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
    async fn list(&self, ask: &Ask, workstation: &str) -> Result<Option<Value>, DbError> {
        let row = self
            .opt(
                &self.statements.list,
                &[&ask.patient_id, &ask.doctor_no, &ask.visit_no, &workstation],
            )
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// The prescription check (`hmr_check_prescription`); None for a patient the HIS does
    /// not have.
    async fn check(&self, ask: &Ask, visit_type: &str, orders: &Value) -> Result<Option<Value>, DbError> {
        let row = self
            .opt(
                &self.statements.check,
                &[&ask.patient_id, &ask.doctor_no, &visit_type, &ask.visit_no, orders],
            )
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }
}

async fn hook(
    State(s): State<Arc<Service>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    Json(request): Json<Value>,
) -> Answer {
    if caller.session.is_some() {
        return Err(forbidden("a widget session calls the JSON API only"));
    }
    let context = request.get("context").cloned().unwrap_or(Value::Null);
    let ask = Ask::from_context(&context)?;
    let cards = match id.as_str() {
        "hmr-recognitions" => badge(&s, &ask, caller.workstation("cds-hooks")).await?,
        "hmr-order-select" => order_select(&s, &s.who(&ask).await?, &context).await?,
        "hmr-order-check" => order_sign(&s, &ask, &context).await?,
        other => {
            return Err((
                StatusCode::NOT_FOUND,
                Json(json!({"error": format!("no service {other}")})),
            ))
        }
    };
    Ok(Json(json!({"cards": cards})))
}

/// What a hook makes of its SQL function's answer: the answer; `None` when the function
/// refused the call (no cards: care goes on); an error for a patient the HIS does not have or
/// a failing database.
fn hook_answer(
    result: Result<Option<Value>, DbError>,
    ask: &Ask,
    what: &str,
) -> Result<Option<Value>, (StatusCode, Json<Value>)> {
    match result {
        Ok(Some(answer)) => Ok(Some(answer)),
        Ok(None) => Err(ask.unknown()),
        Err(e) if e.refused_by_function() => {
            // The SQLSTATE only: a database message may quote the patient.
            tracing::warn!(sqlstate = ?e.sqlstate(), "{what} not available");
            Ok(None)
        }
        Err(e) => Err(db_answer(e)),
    }
}

/// patient-view: the badge. A platform that cannot be asked gives no card (care goes on).
async fn badge(s: &Service, ask: &Ask, workstation: &str) -> Result<Vec<Value>, (StatusCode, Json<Value>)> {
    let Some(answer) = hook_answer(s.list(ask, workstation).await, ask, "badge")? else {
        return Ok(vec![]);
    };
    let count = answer["count"].as_i64().unwrap_or(0);
    if answer["status"] != "ok" || count == 0 {
        return Ok(vec![]);
    }
    let mut card = json!({
        "uuid": uuid::Uuid::new_v4().to_string(),
        "summary": format!("本患者有 {count} 项可互认的检查检验结果"),
        "indicator": "info",
        "source": {"label": SOURCE},
    });
    if let Some(url) = answer["url"].as_str() {
        card["links"] = json!([{"label": "查看可互认结果", "url": url, "type": "absolute"}]);
    }
    Ok(vec![card])
}

/// order-sign: the draft orders (ServiceRequests) checked as a prescription; a card per
/// duplicate. The card's uuid carries the check and the order, so the feedback can record
/// the decision.
/// The draft `ServiceRequest`s of a hook's context as hmr's orders `{order_id, item_code,
/// type}`; `selected`: only those named in `context.selections` (order-select).
fn draft_orders(context: &Value, selected: bool) -> Vec<Value> {
    let selections: Vec<&str> = context["selections"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let entries = context["draftOrders"]["entry"].as_array().cloned().unwrap_or_default();
    entries
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == "ServiceRequest")
        .filter_map(|r| {
            let id = r["id"].as_str()?;
            if selected && !selections.contains(&format!("ServiceRequest/{id}").as_str()) {
                return None;
            }
            let code = r["code"]["coding"].as_array()?.first()?["code"].as_str()?;
            // 检验 (laboratory) or 检查 (imaging and the rest), by the request's category.
            let lab = r["category"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c.to_string().contains("108252007") || c.to_string().contains("laboratory"))
            });
            Some(json!({"order_id": id, "item_code": code, "type": if lab { "lab" } else { "exam" }}))
        })
        .collect()
}

/// order-select: for each newly selected order, the recognisable results of its item (the
/// precise query) as an information card; the decision itself comes at sign.
async fn order_select(s: &Service, who: &Who, context: &Value) -> Result<Vec<Value>, (StatusCode, Json<Value>)> {
    if !context["selections"].is_array() {
        return Err(bad("context.selections is required"));
    }
    let mut cards = Vec::new();
    for order in draft_orders(context, true) {
        let filter = json!({"id_type": who.id_type, "id_no": who.id_no, "item_codes": [order["item_code"]],
                            "type": order["type"]});
        let answer: Value = match s.one("SELECT hmr_query_recognitions($1)", &[&filter]).await {
            Ok(row) => row.get(0),
            Err(e) => {
                tracing::warn!(sqlstate = ?e.sqlstate(), "precise query not available");
                continue;
            }
        };
        let items = answer["items"].as_array().cloned().unwrap_or_default();
        let Some(newest) = items.first() else { continue };
        let item = newest["item_name"].as_str().unwrap_or_default();
        let detail: Vec<String> = items
            .iter()
            .map(|i| {
                format!(
                    "- {} {} {}",
                    i["org_name"].as_str().unwrap_or_default(),
                    i["reported_at"]
                        .as_str()
                        .unwrap_or_default()
                        .get(..10)
                        .unwrap_or_default(),
                    i["item_name"].as_str().unwrap_or_default()
                )
            })
            .collect();
        cards.push(json!({
            "uuid": uuid::Uuid::new_v4().to_string(),
            "summary": format!("{item}：已有 {} 份可互认结果", items.len()),
            "detail": format!("有效期内的结果：\n{}\n签署时可选择互认，不重复检查。", detail.join("\n")),
            "indicator": "info",
            "source": {"label": SOURCE},
        }));
    }
    Ok(cards)
}

async fn order_sign(s: &Service, ask: &Ask, context: &Value) -> Result<Vec<Value>, (StatusCode, Json<Value>)> {
    let orders = draft_orders(context, false);
    if orders.is_empty() {
        return Ok(vec![]);
    }
    let checked = s.check(ask, "1", &Value::Array(orders)).await;
    let Some(answer) = hook_answer(checked, ask, "prescription check")? else {
        return Ok(vec![]);
    };
    let check_id = answer["check_id"].as_str().unwrap_or_default().to_string();
    let reasons: Vec<Value> = hmr_protocol::DECLINE_REASONS
        .iter()
        .map(|(code, display)| json!({"system": REASON_SYSTEM, "code": code, "display": display}))
        .collect();
    let mut cards = Vec::new();
    for m in answer["matches"].as_array().cloned().unwrap_or_default() {
        let order = m["order_id"].as_str().unwrap_or_default();
        let report = &m["reports"][0];
        let item = report["item_name"].as_str().unwrap_or_default();
        let org = report["org_name"].as_str().unwrap_or_default();
        let at = report["reported_at"].as_str().unwrap_or_default();
        let mut card = json!({
            "uuid": format!("{check_id}|{order}"),
            "summary": format!("{item}：{org}已有可互认结果"),
            "detail": format!("{org} {at} 出具的{item}结果在有效期内，可互认而不重复检查；如需复查请选择不互认原因。"),
            "indicator": "warning",
            "source": {"label": SOURCE},
            "selectionBehavior": "at-most-one",
            "suggestions": [{
                "label": "互认（采用已有结果，不重复开单）",
                "uuid": format!("{check_id}|{order}|recognise"),
                "isRecommended": true,
                "actions": [{"type": "delete", "description": "撤下重复的医嘱", "resourceId": [format!("ServiceRequest/{order}")]}]
            }],
            "overrideReasons": reasons,
        });
        if let Some(url) = answer["url"].as_str() {
            card["links"] = json!([{"label": "互认平台页面", "url": url, "type": "absolute"}]);
        }
        cards.push(card);
    }
    Ok(cards)
}

/// The doctor's choice on a card: the suggestion taken is 互认; dismissing the card with a
/// reason is 不互认 with that reason (06: the comment is its text).
async fn feedback(
    State(s): State<Arc<Service>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(_id): Path<String>,
    Json(body): Json<Value>,
) -> Answer {
    if caller.session.is_some() {
        return Err(forbidden("a widget session calls the JSON API only"));
    }
    let workstation = caller.workstation("cds-hooks");
    let items = body["feedback"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        return Err(bad("feedback is required"));
    }
    for f in items {
        let card = f["card"].as_str().unwrap_or_default();
        let Some((check_id, order_id)) = card.split_once('|') else {
            return Err(bad(format!("card {card} is not one of this service's")));
        };
        let result = match f["outcome"].as_str() {
            Some("accepted") => {
                s.one(
                    "SELECT hmr_record_decision($1, $2, true, workstation => $3)",
                    &[&check_id, &order_id, &workstation],
                )
                .await
            }
            Some("overridden") => {
                let code = f["overrideReason"]["reason"]["code"].as_str().unwrap_or("06");
                let comment = f["overrideReason"]["userComment"].as_str();
                s.one(
                    "SELECT hmr_record_decision($1, $2, false, $3, $4, workstation => $5)",
                    &[&check_id, &order_id, &code, &comment, &workstation],
                )
                .await
            }
            _ => return Err(bad("outcome is accepted or overridden")),
        };
        if let Err(e) = result {
            return Err(db_answer(e));
        }
    }
    Ok(Json(json!({})))
}

// ------------------------------------------------------------------ the plain JSON API

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
        DbError::Pool(_) => unavailable(&e),
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
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": "数据库暂不可用，请稍后重试"})),
    )
}

fn forbidden(message: impl Into<String>) -> (StatusCode, Json<Value>) {
    (StatusCode::FORBIDDEN, Json(json!({"error": message.into()})))
}

/// `?patient_id=&visit_no=&doctor_no=`: the badge (`hmr_list_recognitions`).
async fn api_badge(
    State(s): State<Arc<Service>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> Answer {
    let mut asked =
        json!({"patient_id": q.get("patient_id"), "visit_no": q.get("visit_no"), "doctor_no": q.get("doctor_no")});
    s.sessions.bind(&caller, &mut asked)?;
    let ask = Ask::from_body(&asked)?;
    let answer = s
        .list(&ask, caller.workstation("api"))
        .await
        .map_err(db_answer)?
        .ok_or_else(|| ask.unknown())?;
    s.sessions.remember(&caller, &answer);
    Ok(Json(answer))
}

/// `{patient_id, doctor_no, …filter}`: the precise query (`hmr_query_recognitions`).
async fn api_query(
    State(s): State<Arc<Service>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Json(mut body): Json<Value>,
) -> Answer {
    s.sessions.bind(&caller, &mut body)?;
    let who = s.who(&Ask::from_body(&body)?).await?;
    let mut filter = body.clone();
    filter["id_type"] = json!(who.id_type);
    filter["id_no"] = json!(who.id_no);
    if let Some(f) = filter.as_object_mut() {
        for k in ["patient_id", "doctor_no", "visit_no"] {
            f.remove(k);
        }
    }
    let row = s
        .one("SELECT hmr_query_recognitions($1)", &[&filter])
        .await
        .map_err(db_answer)?;
    let answer: Value = row.get(0);
    s.sessions.remember(&caller, &answer);
    Ok(Json(answer))
}

/// `{patient_id, visit_no, doctor_no, visit_type?, orders: [{order_id, item_code, type}]}`:
/// the prescription check (`hmr_check_prescription`).
async fn api_check(
    State(s): State<Arc<Service>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Json(mut body): Json<Value>,
) -> Answer {
    s.sessions.bind(&caller, &mut body)?;
    let ask = Ask::from_body(&body)?;
    let orders = body.get("orders").ok_or_else(|| bad("orders is required"))?;
    let answer = s
        .check(&ask, body["visit_type"].as_str().unwrap_or("1"), orders)
        .await
        .map_err(db_answer)?
        .ok_or_else(|| ask.unknown())?;
    s.sessions.remember(&caller, &answer);
    Ok(Json(answer))
}

/// `{check_id, order_id, recognise, reason_code?, reason_text?}`: a decision
/// (`hmr_record_decision`), kept with the terminal's name.
async fn api_decide(
    State(s): State<Arc<Service>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Json(body): Json<Value>,
) -> Answer {
    let text = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
    let (Some(check), Some(order), Some(recognise)) = (text("check_id"), text("order_id"), body["recognise"].as_bool())
    else {
        return Err(bad("check_id, order_id and recognise are required"));
    };
    if !s.sessions.allows(&caller, Seen::Check, &check) {
        return Err(forbidden("this session did not make that check"));
    }
    let row = s
        .one(
            "SELECT hmr_record_decision($1, $2, $3, $4, $5, workstation => $6)",
            &[
                &check,
                &order,
                &recognise,
                &text("reason_code"),
                &text("reason_text"),
                &caller.workstation("api"),
            ],
        )
        .await
        .map_err(db_answer)?;
    Ok(Json(row.get(0)))
}

/// `?format=pdf|json`: a report recognised here (`hmr_download_report`).
async fn api_report(
    State(s): State<Arc<Service>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(report_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if !s.sessions.allows(&caller, Seen::Report, &report_id) {
        return forbidden("this session was not shown that report").into_response();
    }
    let format = q.get("format").map_or("pdf", String::as_str).to_string();
    match s
        .one("SELECT hmr_download_report($1, $2)", &[&report_id, &format])
        .await
    {
        Ok(row) => {
            let bytes: Vec<u8> = row.get(0);
            let content_type = if format == "json" {
                "application/json"
            } else {
                "application/pdf"
            };
            ([(header::CONTENT_TYPE, content_type)], bytes).into_response()
        }
        Err(e) => db_answer(e).into_response(),
    }
}

/// `{patient_id, visit_no, doctor_no, visit_type?}` from a terminal (its JWT): a session for
/// the widget, bound to that patient, visit and doctor, and the widget's address with it.
async fn api_session(
    State(s): State<Arc<Service>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Json(body): Json<Value>,
) -> Answer {
    if caller.session.is_some() {
        return Err(forbidden("a session cannot open another"));
    }
    let text = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let who = s.who(&Ask::from_body(&body)?).await?;
    let visit_type = Some(text("visit_type"))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "1".into());
    let (token, expires) = s.sessions.open(Session {
        terminal: caller.workstation("widget").to_string(),
        patient_id: who.patient_id.clone(),
        visit_no: who.visit_no.clone(),
        doctor_no: who.doctor_no.clone(),
        visit_type: visit_type.clone(),
        until: Instant::now(),
        seen: HashSet::new(),
    });
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query
        .append_pair("patient_id", &who.patient_id)
        .append_pair("visit_no", &who.visit_no)
        .append_pair("doctor_no", &who.doctor_no)
        .append_pair("visit_type", &visit_type);
    if let Some(origin) = body["host_origin"].as_str() {
        query.append_pair("host_origin", origin);
    }
    let expires_at = chrono::Utc::now() + chrono::Duration::from_std(expires).unwrap_or_default();
    Ok(Json(json!({
        "session": token,
        "expires_at": expires_at.to_rfc3339(),
        "widget": format!("/widget/?{}#session={token}", query.finish()),
    })))
}

// ------------------------------------------------------------------ widget sessions

/// What a session was shown, and so may act on.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Seen {
    Check,
    Report,
}

struct Session {
    /// The terminal that opened it (recorded with its calls and decisions).
    terminal: String,
    patient_id: String,
    visit_no: String,
    doctor_no: String,
    visit_type: String,
    until: Instant,
    seen: HashSet<(Seen, String)>,
}

/// Sessions live in the service's memory: a restart ends them, and the workstation opens a
/// new one (as it does for every patient).
struct Sessions {
    lasts: Duration,
    open: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    fn new(lasts: Duration) -> Sessions {
        Sessions {
            lasts,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn open(&self, mut session: Session) -> (String, Duration) {
        use rand::RngCore as _;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let token = hex::encode(bytes);
        let now = Instant::now();
        session.until = now + self.lasts;
        let mut open = self.open.lock().expect("sessions");
        open.retain(|_, s| s.until > now);
        open.insert(token.clone(), session);
        (token, self.lasts)
    }

    /// The terminal behind a live session.
    fn terminal(&self, token: &str) -> Option<String> {
        let now = Instant::now();
        let mut open = self.open.lock().expect("sessions");
        open.retain(|_, s| s.until > now);
        open.get(token).map(|s| s.terminal.clone())
    }

    /// A session's request is about its own patient, visit and doctor: missing fields are
    /// filled in, other values refused.
    fn bind(&self, caller: &Caller, body: &mut Value) -> Result<(), (StatusCode, Json<Value>)> {
        let Some(token) = &caller.session else { return Ok(()) };
        let Some(fields) = body.as_object_mut() else {
            return Err(bad("the request is a JSON object"));
        };
        let open = self.open.lock().expect("sessions");
        let session = open.get(token).ok_or_else(|| forbidden("the session has ended"))?;
        for (field, value) in [
            ("patient_id", &session.patient_id),
            ("visit_no", &session.visit_no),
            ("doctor_no", &session.doctor_no),
            ("visit_type", &session.visit_type),
        ] {
            match fields.get(field) {
                None | Some(Value::Null) => {
                    fields.insert(field.into(), json!(value));
                }
                Some(v) if v.as_str() == Some(value.as_str()) => {}
                Some(_) => return Err(forbidden(format!("this session is for another {field}"))),
            }
        }
        Ok(())
    }

    /// Keeps the checks and reports an answer showed the session.
    fn remember(&self, caller: &Caller, answer: &Value) {
        let Some(token) = &caller.session else { return };
        let mut open = self.open.lock().expect("sessions");
        let Some(session) = open.get_mut(token) else { return };
        if let Some(check) = answer["check_id"].as_str() {
            session.seen.insert((Seen::Check, check.to_string()));
        }
        let items = answer["items"].as_array().into_iter().flatten();
        let matched = answer["matches"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|m| m["reports"].as_array().into_iter().flatten());
        for report in items.chain(matched) {
            if let Some(id) = report["report_id"].as_str() {
                session.seen.insert((Seen::Report, id.to_string()));
            }
        }
    }

    /// May this caller act on `id`? Terminals may; a session only on what it was shown.
    fn allows(&self, caller: &Caller, what: Seen, id: &str) -> bool {
        let Some(token) = &caller.session else { return true };
        let open = self.open.lock().expect("sessions");
        open.get(token)
            .is_some_and(|s| s.seen.contains(&(what, id.to_string())))
    }
}

// ------------------------------------------------------------------ rate limits

/// A token bucket per terminal: `burst` calls at once, then `per_minute`.
pub struct RateLimits {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimits {
    pub fn new(per_minute: u32, burst: u32) -> RateLimits {
        RateLimits {
            per_second: f64::from(per_minute.max(1)) / 60.0,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one call from `key`'s budget, or says how long until the next one is allowed.
    pub fn take(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().expect("rate buckets");
        let (tokens, last) = buckets.entry(key.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * self.per_second).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.per_second))
        }
    }
}

// ------------------------------------------------------------------ authentication

/// The longest a terminal's token may live, in seconds (CDS Hooks: five minutes).
const MAX_TOKEN_LIFE: i64 = 300;

/// The terminals allowed to call, and the `jti`s already used (until their token expires).
pub struct Auth {
    audience: Option<String>,
    /// iss → (name, public key)
    terminals: std::collections::HashMap<String, (String, TerminalKey)>,
    seen: std::sync::Mutex<std::collections::HashMap<String, i64>>,
}

/// A terminal's public key, and so the one algorithm its tokens may carry (a token cannot
/// choose how it is checked).
enum TerminalKey {
    /// ES384: the P-384 point, uncompressed.
    Es384(Vec<u8>),
    /// RS384: modulus and exponent, big-endian. An RSA signature checks in a tenth of the
    /// time of a P-384 one (BENCHMARKS.md §6).
    Rs384 { n: Vec<u8>, e: Vec<u8> },
}

impl TerminalKey {
    fn from_jwk(iss: &str, jwk: &crate::config::Jwk) -> Result<TerminalKey, WorkerError> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let bad = |what: &str| WorkerError::Config(format!("serve.terminals {iss}: {what}"));
        let field = |v: &Option<String>, name: &str| {
            v.as_deref()
                .and_then(|c| b64.decode(c).ok())
                .ok_or_else(|| bad(&format!("the JWK's {name} is missing or not base64url")))
        };
        match (jwk.kty.as_str(), jwk.crv.as_deref()) {
            ("EC", Some("P-384")) => {
                let (x, y) = (field(&jwk.x, "x")?, field(&jwk.y, "y")?);
                if x.len() != 48 || y.len() != 48 {
                    return Err(bad("bad JWK coordinate"));
                }
                Ok(TerminalKey::Es384([&[4u8][..], &x, &y].concat()))
            }
            ("RSA", None) => {
                let n = field(&jwk.n, "n")?;
                let e = field(&jwk.e, "e")?;
                // 2048 to 8192 bits and an odd exponent of at most 32 bits, as the verification
                // accepts them (a key it would refuse is refused now, not at every call).
                let bits = |v: &[u8]| {
                    let v: Vec<u8> = v.iter().copied().skip_while(|b| *b == 0).collect();
                    v.first()
                        .map_or(0, |first| 8 * (v.len() - 1) + (8 - first.leading_zeros() as usize))
                };
                if !(2048..=8192).contains(&bits(&n)) {
                    return Err(bad("an RSA key must have 2048 to 8192 bits"));
                }
                if !(2..=32).contains(&bits(&e)) || e.last().is_none_or(|b| b % 2 == 0) {
                    return Err(bad("an RSA key's exponent must be odd, 3 or more, at most 32 bits"));
                }
                Ok(TerminalKey::Rs384 { n, e })
            }
            _ => Err(bad("the key must be an EC P-384 JWK (ES384) or an RSA JWK (RS384)")),
        }
    }

    fn alg(&self) -> &'static str {
        match self {
            TerminalKey::Es384(_) => "ES384",
            TerminalKey::Rs384 { .. } => "RS384",
        }
    }

    fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        use aws_lc_rs::signature;
        match self {
            TerminalKey::Es384(point) => signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                .verify(message, signature)
                .is_ok(),
            TerminalKey::Rs384 { n, e } => signature::RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA384, message, signature)
                .is_ok(),
        }
    }
}

/// The calling terminal, once its token or session is verified (`name` `None`: no terminals
/// configured); `session`: the widget session it calls with.
#[derive(Clone, Default)]
pub struct Caller {
    pub name: Option<String>,
    pub session: Option<String>,
}

/// Whose rate budget a call takes: a terminal's (by `iss`), a widget session's own (one browser
/// cannot spend its terminal's), or the one of an anonymous service.
fn rate_key(iss: Option<&str>, session: Option<&str>) -> String {
    match (iss, session) {
        (_, Some(token)) => format!("session:{token}"),
        (Some(iss), None) => format!("terminal:{iss}"),
        (None, None) => "anonymous".into(),
    }
}

impl Caller {
    /// The name recorded with its calls and decisions.
    fn workstation<'a>(&'a self, otherwise: &'a str) -> &'a str {
        self.name.as_deref().unwrap_or(otherwise)
    }
}

impl Auth {
    pub fn new(cfg: &crate::config::ServeConfig) -> Result<Auth, WorkerError> {
        let mut terminals = std::collections::HashMap::new();
        for t in &cfg.terminals {
            let key = TerminalKey::from_jwk(&t.iss, &t.jwk)?;
            if terminals.insert(t.iss.clone(), (t.name.clone(), key)).is_some() {
                return Err(WorkerError::Config(format!(
                    "serve.terminals: iss {} is listed twice",
                    t.iss
                )));
            }
        }
        Ok(Auth {
            audience: cfg.audience.clone(),
            terminals,
            seen: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    pub fn required(&self) -> bool {
        !self.terminals.is_empty()
    }

    /// The configured terminal a token claims to come from, before anything is verified (so
    /// that a terminal's rate budget is taken before the signature is checked).
    pub fn claimed<'a>(&'a self, token: &str) -> Option<&'a str> {
        use base64::Engine as _;
        let payload = token.split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
        let claims: Value = serde_json::from_slice(&bytes).ok()?;
        let iss = claims["iss"].as_str()?;
        self.terminals.get_key_value(iss).map(|(k, _)| k.as_str())
    }

    /// The terminal's name, or why the token is refused.
    pub fn verify(&self, token: &str, now: i64) -> Result<String, String> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err("not a JWT".into());
        };
        let json = |s: &str| -> Result<Value, String> {
            let bytes = b64.decode(s).map_err(|_| "not base64url".to_string())?;
            serde_json::from_slice(&bytes).map_err(|_| "not JSON".to_string())
        };
        let header = json(h)?;
        let claims = json(p)?;
        let iss = claims["iss"].as_str().ok_or("no iss")?;
        let (name, key) = self
            .terminals
            .get(iss)
            .ok_or_else(|| format!("unknown terminal {iss}"))?;
        // The terminal's key decides the algorithm, never the token's header.
        if header["alg"] != key.alg() {
            return Err(format!(
                "alg {} ({} expected from this terminal)",
                header["alg"],
                key.alg()
            ));
        }
        let signature = b64.decode(sig).map_err(|_| "signature not base64url".to_string())?;
        if !key.verifies(format!("{h}.{p}").as_bytes(), &signature) {
            return Err("bad signature".into());
        }
        if let Some(aud) = &self.audience {
            let ok = match &claims["aud"] {
                Value::String(a) => a == aud,
                Value::Array(a) => a.iter().any(|x| x == aud),
                _ => false,
            };
            if !ok {
                return Err("wrong aud".into());
            }
        }
        let exp = claims["exp"].as_i64().ok_or("no exp")?;
        if exp <= now {
            return Err("expired".into());
        }
        // CDS Hooks: a token lives at most five minutes (and its jti is remembered that long).
        if exp > now + MAX_TOKEN_LIFE + 60 {
            return Err("exp more than 5 minutes ahead".into());
        }
        if claims["iat"].as_i64().is_none_or(|iat| iat > now + 60) {
            return Err("iat missing or in the future".into());
        }
        let jti = claims["jti"].as_str().ok_or("no jti")?;
        let mut seen = self.seen.lock().expect("jti set");
        seen.retain(|_, until| *until > now);
        if seen.insert(format!("{iss}/{jti}"), exp).is_some() {
            return Err("jti already used (a replay)".into());
        }
        Ok(name.clone())
    }
}

async fn authenticate(
    State(s): State<Arc<Service>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    // The discovery and the widget's three files hold no patient data.
    let open = request.method() == axum::http::Method::GET && (path == "/cds-services" || path.starts_with("/widget"));
    if open {
        request.extensions_mut().insert(Caller::default());
        return next.run(request).await;
    }
    let refused = |why: String| (StatusCode::UNAUTHORIZED, Json(json!({"error": why}))).into_response();
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let over_budget = |key: String| match s.limits.take(&key, Instant::now()) {
        Ok(()) => None,
        Err(wait) => {
            let seconds = wait.as_secs() + 1;
            Some(
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, seconds.to_string())],
                    Json(json!({"error": format!("too many calls from this terminal: try again in {seconds} s")})),
                )
                    .into_response(),
            )
        }
    };
    let caller = match authorization.as_deref().and_then(|v| v.split_once(' ')) {
        Some(("Session", token)) => match s.sessions.terminal(token) {
            Some(terminal) => {
                if let Some(answer) = over_budget(rate_key(None, Some(token))) {
                    return answer;
                }
                Caller {
                    name: Some(terminal),
                    session: Some(token.to_string()),
                }
            }
            None => return refused("the session is unknown or has ended: open a new one".into()),
        },
        Some(("Bearer", token)) if s.auth.required() => {
            // Budget first, by the terminal the token names: a flood of forged tokens costs
            // that terminal's budget, not a signature check each.
            let Some(iss) = s.auth.claimed(token) else {
                return refused("token refused: not a token of a configured terminal".into());
            };
            if let Some(answer) = over_budget(rate_key(Some(iss), None)) {
                return answer;
            }
            match s.auth.verify(token, chrono::Utc::now().timestamp()) {
                Ok(name) => Caller {
                    name: Some(name),
                    session: None,
                },
                Err(why) => return refused(format!("token refused: {why}")),
            }
        }
        _ if !s.auth.required() => {
            if let Some(answer) = over_budget(rate_key(None, None)) {
                return answer;
            }
            Caller::default()
        }
        _ => return refused("a Bearer token (CDS Hooks JWT, ES384 or RS384) or a widget session is required".into()),
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};

    fn key() -> (EcdsaKeyPair, crate::config::Jwk) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        let public = pair.public_key().as_ref().to_vec();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwk = crate::config::Jwk {
            kty: "EC".into(),
            crv: Some("P-384".into()),
            x: Some(b64.encode(&public[1..49])),
            y: Some(b64.encode(&public[49..])),
            ..Default::default()
        };
        (pair, jwk)
    }

    fn token(pair: &EcdsaKeyPair, claims: Value, alg: &str) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let h = b64.encode(json!({"alg": alg, "typ": "JWT"}).to_string());
        let p = b64.encode(claims.to_string());
        let sig = pair
            .sign(&ring::rand::SystemRandom::new(), format!("{h}.{p}").as_bytes())
            .unwrap();
        format!("{h}.{p}.{}", b64.encode(sig.as_ref()))
    }

    #[test]
    fn a_terminal_past_its_budget_waits_and_others_go_on() {
        let limits = RateLimits::new(60, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limits.take("ward-app", t0), Ok(()));
        }
        let wait = limits.take("ward-app", t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert_eq!(limits.take("clinic", t0), Ok(()), "another terminal has its own budget");
        assert_eq!(
            limits.take("ward-app", t0 + Duration::from_secs(1)),
            Ok(()),
            "one a second comes back"
        );
        assert!(limits.take("ward-app", t0 + Duration::from_secs(1)).is_err());
        // Idle for long, it gets its burst back and no more.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(limits.take("ward-app", later), Ok(()));
        }
        assert!(limits.take("ward-app", later).is_err());
    }

    #[test]
    fn a_session_reaches_its_own_patient_and_what_it_was_shown_only() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let (token, _) = sessions.open(Session {
            terminal: "门诊医生站".into(),
            patient_id: "P0001".into(),
            visit_no: "MZ001".into(),
            doctor_no: "D001".into(),
            visit_type: "1".into(),
            until: Instant::now(),
            seen: HashSet::new(),
        });
        let caller = Caller {
            name: sessions.terminal(&token),
            session: Some(token.clone()),
        };
        assert_eq!(caller.name.as_deref(), Some("门诊医生站"));
        let mut body = json!({"orders": []});
        sessions.bind(&caller, &mut body).unwrap();
        assert_eq!(
            (body["patient_id"].as_str(), body["doctor_no"].as_str()),
            (Some("P0001"), Some("D001"))
        );
        let mut other = json!({"patient_id": "P0002"});
        assert_eq!(sessions.bind(&caller, &mut other).unwrap_err().0, StatusCode::FORBIDDEN);
        let mut inpatient = json!({"visit_type": "3"});
        assert_eq!(
            sessions.bind(&caller, &mut inpatient).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
        // Not an object: refused, and the sessions still work (no lock poisoned).
        assert_eq!(
            sessions.bind(&caller, &mut json!([])).unwrap_err().0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(sessions.terminal(&token).as_deref(), Some("门诊医生站"));
        assert!(!sessions.allows(&caller, Seen::Check, "C1"));
        assert!(!sessions.allows(&caller, Seen::Report, "R1"));
        sessions.remember(
            &caller,
            &json!({"check_id": "C1", "matches": [{"reports": [{"report_id": "R1"}]}]}),
        );
        sessions.remember(&caller, &json!({"items": [{"report_id": "R2"}]}));
        assert!(sessions.allows(&caller, Seen::Check, "C1"));
        assert!(
            !sessions.allows(&caller, Seen::Report, "C1"),
            "a check id is not a report id"
        );
        assert!(sessions.allows(&caller, Seen::Report, "R1") && sessions.allows(&caller, Seen::Report, "R2"));
        let terminal = Caller {
            name: Some("x".into()),
            session: None,
        };
        assert!(
            sessions.allows(&terminal, Seen::Report, "anything"),
            "a terminal's own token"
        );
        assert_eq!(sessions.terminal("not-a-session"), None);
        let ended = Sessions::new(Duration::ZERO);
        let (token, _) = ended.open(Session {
            terminal: "t".into(),
            patient_id: "P".into(),
            visit_no: String::new(),
            doctor_no: "D".into(),
            visit_type: "1".into(),
            until: Instant::now(),
            seen: HashSet::new(),
        });
        assert_eq!(ended.terminal(&token), None, "an ended session");
    }

    #[test]
    fn terminals_or_anonymous_on_loopback_and_tls_beyond() {
        let mut cfg = crate::config::ServeConfig::default();
        let local: SocketAddr = "127.0.0.1:8090".parse().unwrap();
        let wide: SocketAddr = "0.0.0.0:8443".parse().unwrap();
        assert!(
            listen_allowed(local, &cfg).unwrap_err().contains("no terminals"),
            "nobody to let in"
        );
        cfg.anonymous = true;
        assert!(listen_allowed(local, &cfg).is_ok(), "a rehearsal on this machine");
        cfg.tls_cert = Some("/etc/hmr/serve.crt".into());
        cfg.tls_key = Some("/etc/hmr/serve.key".into());
        assert!(
            listen_allowed(wide, &cfg).unwrap_err().contains("loopback only"),
            "anonymous, even with TLS"
        );
        cfg.terminals.push(crate::config::TerminalConfig {
            iss: "a".into(),
            name: "b".into(),
            jwk: crate::config::Jwk {
                kty: "EC".into(),
                crv: Some("P-384".into()),
                ..Default::default()
            },
        });
        assert!(listen_allowed(local, &cfg).unwrap_err().contains("choose one"));
        cfg.anonymous = false;
        assert!(listen_allowed(wide, &cfg).unwrap_err().contains("audience"));
        cfg.audience = Some("https://hmr.example".into());
        assert!(listen_allowed(wide, &cfg).is_ok());
        cfg.tls_key = None;
        assert!(listen_allowed(wide, &cfg).unwrap_err().contains("TLS"));
        assert!(listen_allowed(local, &cfg).is_ok(), "loopback behind a TLS proxy");
    }

    #[test]
    fn a_session_has_its_own_budget_and_a_terminal_is_known_by_its_iss() {
        assert_eq!(rate_key(Some("ward-app"), None), "terminal:ward-app");
        assert_eq!(rate_key(Some("ward-app"), Some("t1")), "session:t1");
        assert_ne!(rate_key(None, Some("t1")), rate_key(None, Some("t2")));
        assert_eq!(rate_key(None, None), "anonymous");
    }

    #[test]
    fn only_a_fresh_token_of_a_known_terminal_for_this_service_passes() {
        let (pair, jwk) = key();
        let (other, _) = key();
        let cfg = crate::config::ServeConfig {
            audience: Some("https://hmr.example/cds-services".into()),
            terminals: vec![crate::config::TerminalConfig {
                iss: "ward-app".into(),
                name: "病区移动查房".into(),
                jwk,
            }],
            ..Default::default()
        };
        let auth = Auth::new(&cfg).unwrap();
        let now = 1_800_000_000;
        let claims = |jti: &str| json!({"iss": "ward-app", "aud": "https://hmr.example/cds-services", "exp": now + 300, "iat": now, "jti": jti});
        assert_eq!(
            auth.verify(&token(&pair, claims("a"), "ES384"), now),
            Ok("病区移动查房".into())
        );
        assert!(auth
            .verify(&token(&pair, claims("a"), "ES384"), now)
            .unwrap_err()
            .contains("replay"));
        assert!(auth
            .verify(&token(&other, claims("b"), "ES384"), now)
            .unwrap_err()
            .contains("signature"));
        assert!(
            auth.verify(&token(&pair, claims("c"), "none"), now).is_err(),
            "alg none"
        );
        let mut expired = claims("d");
        expired["exp"] = json!(now - 1);
        assert!(auth
            .verify(&token(&pair, expired, "ES384"), now)
            .unwrap_err()
            .contains("expired"));
        let mut wrong_aud = claims("e");
        wrong_aud["aud"] = json!("https://elsewhere");
        assert!(auth
            .verify(&token(&pair, wrong_aud, "ES384"), now)
            .unwrap_err()
            .contains("aud"));
        let mut stranger = claims("f");
        stranger["iss"] = json!("someone");
        assert!(auth
            .verify(&token(&pair, stranger, "ES384"), now)
            .unwrap_err()
            .contains("unknown"));
        let mut long_lived = claims("h");
        long_lived["exp"] = json!(now + 3600);
        assert!(auth
            .verify(&token(&pair, long_lived, "ES384"), now)
            .unwrap_err()
            .contains("5 minutes"));
        assert_eq!(auth.claimed(&token(&other, claims("i"), "ES384")), Some("ward-app"));
        let mut stranger = claims("j");
        stranger["iss"] = json!("someone");
        assert_eq!(auth.claimed(&token(&pair, stranger, "ES384")), None);
        assert_eq!(auth.claimed("junk"), None);
        let t = token(&pair, claims("g"), "ES384");
        let tampered = t.replacen('.', ".e30", 1);
        assert!(auth.verify(&tampered, now).is_err(), "a changed payload");
    }

    fn rsa_key(bits: aws_lc_rs::rsa::KeySize) -> (aws_lc_rs::signature::RsaKeyPair, crate::config::Jwk) {
        use aws_lc_rs::signature::KeyPair as _;
        let pair = aws_lc_rs::signature::RsaKeyPair::generate(bits).unwrap();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let public = pair.public_key();
        let jwk = crate::config::Jwk {
            kty: "RSA".into(),
            n: Some(b64.encode(public.modulus().big_endian_without_leading_zero())),
            e: Some(b64.encode(public.exponent().big_endian_without_leading_zero())),
            ..Default::default()
        };
        (pair, jwk)
    }

    fn rsa_token(pair: &aws_lc_rs::signature::RsaKeyPair, claims: Value, alg: &str) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let h = b64.encode(json!({"alg": alg, "typ": "JWT"}).to_string());
        let p = b64.encode(claims.to_string());
        let mut sig = vec![0; pair.public_modulus_len()];
        pair.sign(
            &aws_lc_rs::signature::RSA_PKCS1_SHA384,
            &aws_lc_rs::rand::SystemRandom::new(),
            format!("{h}.{p}").as_bytes(),
            &mut sig,
        )
        .unwrap();
        format!("{h}.{p}.{}", b64.encode(sig))
    }

    #[test]
    fn an_rsa_terminal_signs_rs384_and_nothing_else() {
        let (pair, jwk) = rsa_key(aws_lc_rs::rsa::KeySize::Rsa2048);
        let (ec_pair, ec_jwk) = key();
        let cfg = crate::config::ServeConfig {
            audience: Some("https://hmr.example/cds-services".into()),
            terminals: vec![
                crate::config::TerminalConfig {
                    iss: "emr".into(),
                    name: "门诊电子病历".into(),
                    jwk,
                },
                crate::config::TerminalConfig {
                    iss: "ward-app".into(),
                    name: "病区移动查房".into(),
                    jwk: ec_jwk,
                },
            ],
            ..Default::default()
        };
        let auth = Auth::new(&cfg).unwrap();
        let now = 1_800_000_000;
        let claims = |iss: &str, jti: &str| json!({"iss": iss, "aud": "https://hmr.example/cds-services", "exp": now + 300, "iat": now, "jti": jti});
        assert_eq!(
            auth.verify(&rsa_token(&pair, claims("emr", "a"), "RS384"), now),
            Ok("门诊电子病历".into())
        );
        assert!(auth
            .verify(&rsa_token(&pair, claims("emr", "a"), "RS384"), now)
            .unwrap_err()
            .contains("replay"));
        // The algorithm is the key's: an EC terminal cannot be spoken to as RSA, nor the other
        // way round, and a header naming another algorithm is refused before any check.
        for (t, why) in [
            (
                rsa_token(&pair, claims("ward-app", "b"), "RS384"),
                "RS384 for an EC terminal",
            ),
            (
                token(&ec_pair, claims("emr", "c"), "ES384"),
                "ES384 for an RSA terminal",
            ),
            (rsa_token(&pair, claims("emr", "d"), "RS256"), "RS256"),
            (rsa_token(&pair, claims("emr", "e"), "HS384"), "HS384"),
        ] {
            assert!(auth.verify(&t, now).unwrap_err().contains("expected"), "{why}");
        }
        let (stranger, _) = rsa_key(aws_lc_rs::rsa::KeySize::Rsa2048);
        assert!(auth
            .verify(&rsa_token(&stranger, claims("emr", "f"), "RS384"), now)
            .unwrap_err()
            .contains("signature"));
        // Keys the verification would refuse are refused when the service starts.
        let small = crate::config::Jwk {
            kty: "RSA".into(),
            n: Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xffu8; 128])),
            e: Some("AQAB".into()),
            ..Default::default()
        };
        let mut weak = cfg.clone();
        weak.terminals[0].jwk = small;
        assert!(Auth::new(&weak).err().unwrap().to_string().contains("2048"));
        // 2047 bits: 256 bytes, the first below 0x80.
        let mut short = [0xffu8; 256];
        short[0] = 0x7f;
        weak.terminals[0].jwk.n = Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(short));
        assert!(Auth::new(&weak).err().unwrap().to_string().contains("2048"));
        let mut even = cfg.clone();
        even.terminals[0].jwk.e = Some("AQAA".into());
        assert!(Auth::new(&even).err().unwrap().to_string().contains("exponent"));
        let mut odd = cfg.clone();
        odd.terminals[0].jwk.kty = "OKP".into();
        assert!(Auth::new(&odd).is_err());
    }
}
