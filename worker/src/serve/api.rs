//! The JSON API for terminals that do not speak CDS Hooks (docs/openapi.yaml).

use super::*;
use hmr_protocol::answers::{Decided, OrderToPerform};

/// `?patient_id=&visit_no=&doctor_no=`: the badge (`hmr_list_recognitions`).
pub(super) async fn api_list(
    State(s): State<Arc<Service>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> Reply {
    let mut asked =
        json!({"patient_id": q.get("patient_id"), "visit_no": q.get("visit_no"), "doctor_no": q.get("doctor_no")});
    s.sessions.bind(&caller, &mut asked)?;
    let ask = Ask::from_body(&asked)?;
    let mut answer = s
        .list(&ask, caller.workstation("api"))
        .await
        .map_err(db_answer)?
        .ok_or_else(|| ask.unknown())?;
    // One connection for both reads: the badge is the reception's hot path.
    let db = s.pool.get().await.map_err(pool_error).map_err(db_answer)?;
    answer.to_perform = to_perform(&db, &ask.patient_id).await.map_err(db_answer)?;
    mark(&db, &mut answer).await.map_err(db_answer)?;
    drop(db);
    s.sessions.remember(&caller, &answer);
    Ok(Json(json_of(&answer)))
}

/// Marks each listed report with this hospital's decision on it (已互认 / 不互认), read now
/// (`hmr.report_marks`): the widget offers 下载报告 on the recognised ones.
async fn mark(db: &deadpool_postgres::Client, answer: &mut hmr_protocol::answers::ListResult) -> Result<(), DbError> {
    if answer.items.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = answer.items.iter().map(|i| i.report_id.clone()).collect();
    let statement = db
        .prepare_cached("SELECT report_id, decided FROM hmr.report_marks($1)")
        .await?;
    let marks: HashMap<String, String> = db
        .query(&statement, &[&ids])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for item in &mut answer.items {
        item.decided = match marks.get(&item.report_id).map(String::as_str) {
            Some("recognised") => Some(Decided::Recognised),
            Some(_) => Some(Decided::Declined),
            None => None,
        };
    }
    Ok(())
}

/// The patient's orders recognised here whose report its hospital revoked since: the widget
/// shows them beside the list, to be performed after all.
async fn to_perform(db: &deadpool_postgres::Client, patient_id: &str) -> Result<Vec<OrderToPerform>, DbError> {
    let statement = db
        .prepare_cached(
            "SELECT order_id, report_id, item_name,
                    to_char(revoked_at AT TIME ZONE 'Asia/Shanghai', 'YYYY-MM-DD\"T\"HH24:MI:SS\"+08:00\"')
               FROM hmr.patient_orders_to_perform($1)",
        )
        .await?;
    Ok(db
        .query(&statement, &[&patient_id])
        .await?
        .iter()
        .map(|r| OrderToPerform {
            order_id: r.get(0),
            report_id: r.get(1),
            item_name: r.get(2),
            revoked_at: r.get(3),
        })
        .collect())
}

/// `{patient_id, doctor_no, …filter}`: the precise query (`hmr_query_recognitions`).
pub(super) async fn api_query(
    State(s): State<Arc<Service>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Json(mut body): Json<Value>,
) -> Reply {
    refuse_nul(&body)?;
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
    let answer = s.query(&filter).await.map_err(db_answer)?;
    s.sessions.remember(&caller, &answer);
    Ok(Json(json_of(&answer)))
}

/// `{patient_id, visit_no, doctor_no, visit_type?, orders: [{order_id, item_code, type}]}`:
/// the prescription check (`hmr_check_prescription`).
pub(super) async fn api_check(
    State(s): State<Arc<Service>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Json(mut body): Json<Value>,
) -> Reply {
    refuse_nul(&body)?;
    s.sessions.bind(&caller, &mut body)?;
    let ask = Ask::from_body(&body)?;
    let orders = body.get("orders").ok_or_else(|| bad("orders is required"))?;
    let answer = s
        .check(&ask, body["visit_type"].as_str().unwrap_or(OUTPATIENT), orders)
        .await
        .map_err(db_answer)?
        .ok_or_else(|| ask.unknown())?;
    s.sessions.remember(&caller, &answer);
    Ok(Json(json_of(&answer)))
}

/// A NUL character cannot reach the database (PostgreSQL text cannot hold it): refused here
/// with the field named (400), not answered as the database being unavailable.
fn refuse_nul(body: &Value) -> Result<(), (StatusCode, Json<Value>)> {
    fn find(v: &Value, at: &str) -> Option<String> {
        match v {
            Value::String(s) if s.contains('\0') => Some(at.to_string()),
            Value::Array(a) => a.iter().enumerate().find_map(|(i, x)| find(x, &format!("{at}[{i}]"))),
            Value::Object(o) => o.iter().find_map(|(k, x)| {
                let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                find(x, &path)
            }),
            _ => None,
        }
    }
    match find(body, "") {
        Some(field) => Err((
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("{field} 含有不可见的控制字符（NUL），请重新输入"), "field": field})),
        )),
        None => Ok(()),
    }
}

/// An answer as JSON, as the SQL function gave it.
fn json_of(answer: &impl serde::Serialize) -> Value {
    serde_json::to_value(answer).expect("answers serialize")
}

/// `{check_id, order_id, recognise, reason_code?, reason_text?}`: a decision
/// (`hmr_record_decision`), kept with the terminal's name.
pub(super) async fn api_decide(
    State(s): State<Arc<Service>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Json(body): Json<Value>,
) -> Reply {
    refuse_nul(&body)?;
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
pub(super) async fn api_report(
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
pub(super) async fn api_session(
    State(s): State<Arc<Service>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Json(body): Json<Value>,
) -> Reply {
    if caller.session.is_some() {
        return Err(forbidden("a session cannot open another"));
    }
    let text = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let who = s.who(&Ask::from_body(&body)?).await?;
    let visit_type = Some(text("visit_type"))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| OUTPATIENT.into());
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

#[cfg(test)]
mod nul_tests {
    use super::*;

    #[test]
    fn a_nul_is_refused_naming_its_field() {
        let (status, Json(answer)) = refuse_nul(&json!({"check_id": "C", "reason_text": "术前\u{0}复查"})).unwrap_err();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(answer["field"], "reason_text");
        let (_, Json(answer)) =
            refuse_nul(&json!({"orders": [{"order_id": "A"}, {"item_code": "\u{0}"}]})).unwrap_err();
        assert_eq!(answer["field"], "orders[1].item_code");
        assert!(refuse_nul(&json!({"reason_text": "术前复查", "n": 1})).is_ok());
    }
}
