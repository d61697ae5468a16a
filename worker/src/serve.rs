//! `hmr-worker serve`: the recognition services for terminals that cannot call SQL, as an
//! HL7 CDS Hooks 2.0 service (`docs/design/cds-hooks.md`) over the same SQL functions the HIS
//! calls — one set of checks, prompts, decisions and outbox:
//!
//! - `GET  /cds-services`: discovery;
//! - `POST /cds-services/hmr-recognitions` (`patient-view`): the badge as a card;
//! - `POST /cds-services/hmr-order-check` (`order-sign`): a card per order that duplicates a
//!   recognisable report, with the suggestion 互认 and the six 不互认 reasons as override
//!   reasons;
//! - `POST /cds-services/hmr-order-check/feedback`: the doctor's choice, recorded as a decision.
//!
//! And a small JSON API for terminals that do not speak CDS Hooks (`docs/openapi.yaml`):
//! `GET /api/badge`, `POST /api/query`, `POST /api/check`, `POST /api/decide`,
//! `GET /api/reports/{report_id}`.
//!
//! Authentication (`[serve] terminals`): every call but the discovery carries a CDS Hooks JWT
//! (`Authorization: Bearer`, ES384) signed by a configured terminal: `iss` known, `aud` the
//! configured audience, `exp` in the future, `iat` not in the future, `jti` never seen before
//! (replays refused). The terminal's name is recorded with its badge calls. Without terminals
//! configured nothing is checked, and the service listens on loopback only.
//!
//! Part of issue #19: no TLS, rate limits or widget yet.
//! Identifiers: the FHIR `patientId` is the HIS patient id (`hmr_src.patient`), `encounterId`
//! the visit number, `userId` `Practitioner/<staff no>` (department from `hmr_src.staff`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls};

use crate::error::WorkerError;

const SOURCE: &str = "检查检验结果互认平台";
/// The 不互认 reasons (platform codes 01–06) as CDS Hooks override reasons.
const REASON_SYSTEM: &str = "urn:hmr:decline-reason";

struct Service {
    db: Client,
    auth: Auth,
    /// Views the identifiers are looked up in (`hmr.kinds.source_view`).
    patient_view: String,
    staff_view: String,
}

pub async fn run(url: &str, listen: SocketAddr, serve: &crate::config::ServeConfig) -> Result<(), WorkerError> {
    let auth = Auth::new(serve)?;
    let (db, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let view = |kind: &'static str| {
        let db = &db;
        async move {
            let row = db
                .query_one(
                    "SELECT coalesce(to_regclass(source_view)::text, source_view) FROM hmr.kinds WHERE kind = $1",
                    &[&kind],
                )
                .await?;
            Ok::<String, WorkerError>(row.get(0))
        }
    };
    let (patient_view, staff_view) = (view("patient").await?, view("staff").await?);
    let service = Arc::new(Service {
        db,
        auth,
        patient_view,
        staff_view,
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
        .layer(axum::middleware::from_fn_with_state(service.clone(), authenticate))
        .with_state(service);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| WorkerError::Config(format!("cannot listen on {listen}: {e}")))?;
    tracing::info!(%listen, "serving CDS Hooks");
    axum::serve(listener, app)
        .await
        .map_err(|e| WorkerError::Config(format!("serving: {e}")))
}

async fn discovery() -> Json<Value> {
    Json(json!({"services": [
        {"hook": "patient-view", "id": "hmr-recognitions", "title": "检查检验结果互认提示",
         "description": "打开病历时提示本患者可互认的检查检验结果数量"},
        {"hook": "order-sign", "id": "hmr-order-check", "title": "处方保存互认校验",
         "description": "签署医嘱时逐条提示重复的检查检验，互认或选择不互认原因"}
    ]}))
}

/// Why a request cannot be answered (CDS Hooks: a 4xx with a reason).
fn bad(message: impl Into<String>) -> (StatusCode, Json<Value>) {
    (StatusCode::BAD_REQUEST, Json(json!({"error": message.into()})))
}

type Answer = Result<Json<Value>, (StatusCode, Json<Value>)>;

/// The HIS identifiers behind a hook's context.
struct Who {
    patient_id: String,
    id_type: String,
    id_no: String,
    visit_no: String,
    doctor_no: String,
    dept_code: String,
}

impl Service {
    async fn who(&self, context: &Value) -> Result<Who, (StatusCode, Json<Value>)> {
        let text = |k: &str| context.get(k).and_then(Value::as_str).map(str::to_string);
        let patient_id = text("patientId").ok_or_else(|| bad("context.patientId is required"))?;
        let doctor_no = text("userId")
            .map(|u| u.rsplit('/').next().unwrap_or_default().to_string())
            .ok_or_else(|| bad("context.userId is required"))?;
        let visit_no = text("encounterId").unwrap_or_default();
        let patient = self
            .db
            .query_opt(
                &format!(
                    "SELECT id_type::text, id_no::text FROM {} WHERE patient_id::text = $1 LIMIT 1",
                    self.patient_view
                ),
                &[&patient_id],
            )
            .await
            .map_err(db_answer)?
            .ok_or_else(|| bad(format!("patient {patient_id} is not in the HIS")))?;
        let dept_code: String = self
            .db
            .query_opt(
                &format!(
                    "SELECT dept_code::text FROM {} WHERE staff_no::text = $1 LIMIT 1",
                    self.staff_view
                ),
                &[&doctor_no],
            )
            .await
            .map_err(db_answer)?
            .map(|r| r.get(0))
            .unwrap_or_default();
        Ok(Who {
            patient_id,
            id_type: patient.get(0),
            id_no: patient.get(1),
            visit_no,
            doctor_no,
            dept_code,
        })
    }

    /// The badge for `who`, as `hmr_list_recognitions` answers it (kept in `hmr.list_log` with
    /// the calling `workstation`).
    async fn list(&self, who: &Who, workstation: &str) -> Result<Value, tokio_postgres::Error> {
        let row = self
            .db
            .query_one(
                "SELECT hmr_list_recognitions($1, $2, $3, $4, $5, workstation => $6)",
                &[
                    &who.id_type,
                    &who.id_no,
                    &who.visit_no,
                    &who.doctor_no,
                    &who.dept_code,
                    &workstation,
                ],
            )
            .await?;
        Ok(row.get(0))
    }
}

impl Who {
    /// The `visit` argument of `hmr_check_prescription`.
    fn visit(&self, visit_type: &str) -> Value {
        json!({"id_type": self.id_type, "id_no": self.id_no, "patient_id": self.patient_id,
               "visit_type": visit_type, "visit_no": self.visit_no, "doctor_no": self.doctor_no,
               "dept_code": self.dept_code})
    }
}

async fn hook(
    State(s): State<Arc<Service>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    Json(request): Json<Value>,
) -> Answer {
    let context = request.get("context").cloned().unwrap_or(Value::Null);
    let who = s.who(&context).await?;
    let cards = match id.as_str() {
        "hmr-recognitions" => badge(&s, &who, caller.0.as_deref().unwrap_or("cds-hooks")).await,
        "hmr-order-check" => order_sign(&s, &who, &context).await?,
        other => {
            return Err((
                StatusCode::NOT_FOUND,
                Json(json!({"error": format!("no service {other}")})),
            ))
        }
    };
    Ok(Json(json!({"cards": cards})))
}

/// patient-view: the badge. A platform that cannot be asked gives no card (care goes on).
async fn badge(s: &Service, who: &Who, workstation: &str) -> Vec<Value> {
    let answer = match s.list(who, workstation).await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(error = %e, "badge not available");
            return vec![];
        }
    };
    let count = answer["count"].as_i64().unwrap_or(0);
    if answer["status"] != "ok" || count == 0 {
        return vec![];
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
    vec![card]
}

/// order-sign: the draft orders (ServiceRequests) checked as a prescription; a card per
/// duplicate. The card's uuid carries the check and the order, so the feedback can record
/// the decision.
async fn order_sign(s: &Service, who: &Who, context: &Value) -> Result<Vec<Value>, (StatusCode, Json<Value>)> {
    let entries = context["draftOrders"]["entry"].as_array().cloned().unwrap_or_default();
    let orders: Vec<Value> = entries
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == "ServiceRequest")
        .filter_map(|r| {
            let id = r["id"].as_str()?;
            let code = r["code"]["coding"].as_array()?.first()?["code"].as_str()?;
            // 检验 (laboratory) or 检查 (imaging and the rest), by the request's category.
            let lab = r["category"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c.to_string().contains("108252007") || c.to_string().contains("laboratory"))
            });
            Some(json!({"order_id": id, "item_code": code, "type": if lab { "lab" } else { "exam" }}))
        })
        .collect();
    if orders.is_empty() {
        return Ok(vec![]);
    }
    let visit = who.visit("1");
    let answer: Value = match s
        .db
        .query_one(
            "SELECT hmr_check_prescription($1, $2)",
            &[&visit, &Value::Array(orders)],
        )
        .await
    {
        Ok(row) => row.get(0),
        Err(e) => {
            tracing::warn!(error = %e, "prescription check not available");
            return Ok(vec![]);
        }
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
async fn feedback(State(s): State<Arc<Service>>, Path(_id): Path<String>, Json(body): Json<Value>) -> Answer {
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
                s.db.query_one("SELECT hmr_record_decision($1, $2, true)", &[&check_id, &order_id])
                    .await
            }
            Some("overridden") => {
                let code = f["overrideReason"]["reason"]["code"].as_str().unwrap_or("06");
                let comment = f["overrideReason"]["userComment"].as_str();
                s.db.query_one(
                    "SELECT hmr_record_decision($1, $2, false, $3, $4)",
                    &[&check_id, &order_id, &code, &comment],
                )
                .await
            }
            _ => return Err(bad("outcome is accepted or overridden")),
        };
        if let Err(e) = result {
            let message = e
                .as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string());
            return Err((StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"error": message}))));
        }
    }
    Ok(Json(json!({})))
}

// ------------------------------------------------------------------ the plain JSON API

/// A database error as the terminal sees it: the SQLSTATE and the (Chinese) message.
fn db_answer(e: tokio_postgres::Error) -> (StatusCode, Json<Value>) {
    match e.as_db_error() {
        Some(d) => {
            let status = if d.code().code().starts_with("HM") || d.code().code() == "22023" {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, Json(json!({"sqlstate": d.code().code(), "error": d.message()})))
        }
        None => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": e.to_string()}))),
    }
}

/// `?patient_id=&visit_no=&doctor_no=`: the badge (`hmr_list_recognitions`).
async fn api_badge(
    State(s): State<Arc<Service>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Answer {
    let workstation = caller.0.unwrap_or_else(|| "api".into());
    let context = json!({
        "patientId": q.get("patient_id"),
        "encounterId": q.get("visit_no"),
        "userId": q.get("doctor_no"),
    });
    let who = s.who(&context).await?;
    Ok(Json(s.list(&who, &workstation).await.map_err(db_answer)?))
}

/// `{patient_id, doctor_no, …filter}`: the precise query (`hmr_query_recognitions`).
async fn api_query(State(s): State<Arc<Service>>, Json(body): Json<Value>) -> Answer {
    let who = s
        .who(&json!({"patientId": body["patient_id"], "userId": body["doctor_no"]}))
        .await?;
    let mut filter = body.clone();
    filter["id_type"] = json!(who.id_type);
    filter["id_no"] = json!(who.id_no);
    if let Some(f) = filter.as_object_mut() {
        f.remove("patient_id");
        f.remove("doctor_no");
    }
    let row =
        s.db.query_one("SELECT hmr_query_recognitions($1)", &[&filter])
            .await
            .map_err(db_answer)?;
    Ok(Json(row.get(0)))
}

/// `{patient_id, visit_no, doctor_no, visit_type?, orders: [{order_id, item_code, type}]}`:
/// the prescription check (`hmr_check_prescription`).
async fn api_check(State(s): State<Arc<Service>>, Json(body): Json<Value>) -> Answer {
    let who = s
        .who(&json!({"patientId": body["patient_id"], "encounterId": body["visit_no"], "userId": body["doctor_no"]}))
        .await?;
    let visit = who.visit(body["visit_type"].as_str().unwrap_or("1"));
    let orders = body.get("orders").cloned().ok_or_else(|| bad("orders is required"))?;
    let row =
        s.db.query_one("SELECT hmr_check_prescription($1, $2)", &[&visit, &orders])
            .await
            .map_err(db_answer)?;
    Ok(Json(row.get(0)))
}

/// `{check_id, order_id, recognise, reason_code?, reason_text?}`: a decision
/// (`hmr_record_decision`).
async fn api_decide(State(s): State<Arc<Service>>, Json(body): Json<Value>) -> Answer {
    let text = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
    let (Some(check), Some(order), Some(recognise)) = (text("check_id"), text("order_id"), body["recognise"].as_bool())
    else {
        return Err(bad("check_id, order_id and recognise are required"));
    };
    let row =
        s.db.query_one(
            "SELECT hmr_record_decision($1, $2, $3, $4, $5)",
            &[&check, &order, &recognise, &text("reason_code"), &text("reason_text")],
        )
        .await
        .map_err(db_answer)?;
    Ok(Json(row.get(0)))
}

/// `?format=pdf|json`: a report recognised here (`hmr_download_report`).
async fn api_report(
    State(s): State<Arc<Service>>,
    Path(report_id): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let format = q.get("format").map_or("pdf", String::as_str).to_string();
    match s
        .db
        .query_one("SELECT hmr_download_report($1, $2)", &[&report_id, &format])
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

// ------------------------------------------------------------------ authentication

/// The terminals allowed to call, and the `jti`s already used (until their token expires).
pub struct Auth {
    audience: Option<String>,
    /// iss → (name, P-384 public key as an uncompressed point)
    terminals: std::collections::HashMap<String, (String, Vec<u8>)>,
    seen: std::sync::Mutex<std::collections::HashMap<String, i64>>,
}

/// The calling terminal, once its token is verified (`None`: no terminals configured).
#[derive(Clone)]
pub struct Caller(pub Option<String>);

impl Auth {
    pub fn new(cfg: &crate::config::ServeConfig) -> Result<Auth, WorkerError> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut terminals = std::collections::HashMap::new();
        for t in &cfg.terminals {
            if t.jwk.kty != "EC" || t.jwk.crv != "P-384" {
                return Err(WorkerError::Config(format!(
                    "serve.terminals {}: the key must be an EC P-384 JWK (ES384)",
                    t.iss
                )));
            }
            let coord = |c: &str| {
                b64.decode(c)
                    .ok()
                    .filter(|v| v.len() == 48)
                    .ok_or_else(|| WorkerError::Config(format!("serve.terminals {}: bad JWK coordinate", t.iss)))
            };
            let mut point = vec![4u8];
            point.extend(coord(&t.jwk.x)?);
            point.extend(coord(&t.jwk.y)?);
            terminals.insert(t.iss.clone(), (t.name.clone(), point));
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
        if header["alg"] != "ES384" {
            return Err(format!("alg {} (ES384 expected)", header["alg"]));
        }
        let claims = json(p)?;
        let iss = claims["iss"].as_str().ok_or("no iss")?;
        let (name, key) = self
            .terminals
            .get(iss)
            .ok_or_else(|| format!("unknown terminal {iss}"))?;
        let signature = b64.decode(sig).map_err(|_| "signature not base64url".to_string())?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P384_SHA384_FIXED, key)
            .verify(format!("{h}.{p}").as_bytes(), &signature)
            .map_err(|_| "bad signature".to_string())?;
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
    let open = request.method() == axum::http::Method::GET && request.uri().path() == "/cds-services";
    if !s.auth.required() || open {
        request.extensions_mut().insert(Caller(None));
        return next.run(request).await;
    }
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let now = chrono::Utc::now().timestamp();
    match token.map(|t| s.auth.verify(t, now)) {
        Some(Ok(name)) => {
            request.extensions_mut().insert(Caller(Some(name)));
            next.run(request).await
        }
        Some(Err(why)) => (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": format!("token refused: {why}")})),
        )
            .into_response(),
        None => (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "a Bearer token (CDS Hooks JWT, ES384) is required"})),
        )
            .into_response(),
    }
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
            crv: "P-384".into(),
            x: b64.encode(&public[1..49]),
            y: b64.encode(&public[49..]),
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
        let t = token(&pair, claims("g"), "ES384");
        let tampered = t.replacen('.', ".e30", 1);
        assert!(auth.verify(&tampered, now).is_err(), "a changed payload");
    }
}
