//! CDS Hooks: discovery, the hooks (patient-view, order-select, order-sign) and feedback.

use super::*;
use hmr_protocol::answers::CallStatus;

pub(super) async fn discovery() -> Json<Value> {
    Json(json!({"services": [
        {"hook": "patient-view", "id": "hmr-recognitions", "title": "检查检验结果互认提示",
         "description": "打开病历时提示本患者可互认的检查检验结果数量"},
        {"hook": "order-select", "id": "hmr-order-select", "title": "开单互认提示",
         "description": "选择检查检验项目时提示该项目已有的可互认结果（精准查询）"},
        {"hook": "order-sign", "id": "hmr-order-check", "title": "处方保存互认校验",
         "description": "签署医嘱时逐条提示重复的检查检验，互认或选择不互认原因"}
    ]}))
}

pub(super) async fn hook(
    State(s): State<Arc<Service>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    Json(request): Json<Value>,
) -> Reply {
    if caller.session.is_some() {
        return Err(forbidden("a widget session calls the JSON API only"));
    }
    let context = request.get("context").cloned().unwrap_or(Value::Null);
    let ask = Ask::from_context(&context)?;
    let cards = match id.as_str() {
        "hmr-recognitions" => patient_view(&s, &ask, caller.workstation("cds-hooks")).await?,
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
pub(super) fn hook_answer<T>(
    result: Result<Option<T>, DbError>,
    ask: &Ask,
    what: &str,
) -> Result<Option<T>, (StatusCode, Json<Value>)> {
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
pub(super) async fn patient_view(
    s: &Service,
    ask: &Ask,
    workstation: &str,
) -> Result<Vec<Value>, (StatusCode, Json<Value>)> {
    let Some(answer) = hook_answer(s.list(ask, workstation).await, ask, "badge")? else {
        return Ok(vec![]);
    };
    let count = answer.count;
    if answer.status != CallStatus::Ok || count == 0 {
        return Ok(vec![]);
    }
    let mut card = json!({
        "uuid": uuid::Uuid::new_v4().to_string(),
        "summary": format!("本患者有 {count} 项可互认的检查检验结果"),
        "indicator": "info",
        "source": {"label": SOURCE},
    });
    if let Some(url) = &answer.url {
        card["links"] = json!([{"label": "查看可互认结果", "url": url, "type": "absolute"}]);
    }
    Ok(vec![card])
}

/// The draft `ServiceRequest`s of a hook's context as hmr's orders `{order_id, item_code,
/// type}`; `selected`: only those named in `context.selections` (order-select). The item code
/// is the coding in the HIS's item system (`[serve] item_system`); an order coded only in other
/// systems is refused (400 naming them): an empty answer would read as "no duplicate".
pub(super) fn draft_orders(context: &Value, selected: bool, item_system: &str) -> Result<Vec<Value>, String> {
    let selections: Vec<&str> = context["selections"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let entries = context["draftOrders"]["entry"].as_array().cloned().unwrap_or_default();
    let mut orders = vec![];
    for r in entries
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == "ServiceRequest")
    {
        let Some(id) = r["id"].as_str() else { continue };
        if selected && !selections.contains(&format!("ServiceRequest/{id}").as_str()) {
            continue;
        }
        let codings = r["code"]["coding"].as_array().cloned().unwrap_or_default();
        let Some(code) = codings
            .iter()
            .find(|c| c["system"] == item_system)
            .and_then(|c| c["code"].as_str())
        else {
            let systems: Vec<&str> = codings.iter().filter_map(|c| c["system"].as_str()).collect();
            return Err(format!(
                "ServiceRequest/{id}: no code in the HIS item system {item_system} (coded in: {})",
                if systems.is_empty() {
                    "nothing".to_string()
                } else {
                    systems.join(", ")
                }
            ));
        };
        // 检验 (laboratory) or 检查 (imaging and the rest), by the request's category.
        let lab = r["category"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c.to_string().contains("108252007") || c.to_string().contains("laboratory"))
        });
        orders.push(json!({"order_id": id, "item_code": code, "type": if lab { "lab" } else { "exam" }}));
    }
    Ok(orders)
}

/// order-select: for each newly selected order, the recognisable results of its item (the
/// precise query) as an information card; the decision itself comes at sign.
pub(super) async fn order_select(
    s: &Service,
    who: &Visit,
    context: &Value,
) -> Result<Vec<Value>, (StatusCode, Json<Value>)> {
    if !context["selections"].is_array() {
        return Err(bad("context.selections is required"));
    }
    let mut cards = Vec::new();
    for order in draft_orders(context, true, &s.item_system).map_err(bad)? {
        let filter = json!({"id_type": who.id_type, "id_no": who.id_no, "item_codes": [order["item_code"]],
                            "type": order["type"]});
        let answer = match s.query(&filter).await {
            Ok(answer) => answer,
            Err(e) => {
                tracing::warn!(sqlstate = ?e.sqlstate(), "precise query not available");
                continue;
            }
        };
        let items = answer.items;
        let Some(newest) = items.first() else { continue };
        let item = card_text(&newest.item_name);
        let detail: Vec<String> = items
            .iter()
            .map(|i| {
                format!(
                    "- {} {} {}",
                    card_text(&i.org_name),
                    card_text(i.reported_at.get(..10).unwrap_or_default()),
                    card_text(&i.item_name)
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

/// order-sign: the draft orders (ServiceRequests) checked as a prescription; a card per
/// duplicate. The card's uuid carries the check and the order, so the feedback can record
/// the decision.
pub(super) async fn order_sign(
    s: &Service,
    ask: &Ask,
    context: &Value,
) -> Result<Vec<Value>, (StatusCode, Json<Value>)> {
    let orders = draft_orders(context, false, &s.item_system).map_err(bad)?;
    if orders.is_empty() {
        return Ok(vec![]);
    }
    let checked = s.check(ask, OUTPATIENT, &Value::Array(orders)).await;
    let Some(answer) = hook_answer(checked, ask, "prescription check")? else {
        return Ok(vec![]);
    };
    let check_id = answer.check_id.clone().unwrap_or_default();
    let reasons: Vec<Value> = hmr_protocol::DECLINE_REASONS
        .iter()
        .map(|(code, display)| json!({"system": REASON_SYSTEM, "code": code, "display": display}))
        .collect();
    let mut cards = Vec::new();
    for m in &answer.matches {
        let order = &m.order_id;
        let Some(report) = m.reports.first() else { continue };
        let (item, org, at) = (
            card_text(&report.item_name),
            card_text(&report.org_name),
            card_text(&report.reported_at),
        );
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
        if let Some(url) = &answer.url {
            card["links"] = json!([{"label": "互认平台页面", "url": url, "type": "absolute"}]);
        }
        cards.push(card);
    }
    Ok(cards)
}

/// The platform's text (another hospital's name, an item's name, a time) as it may go into a
/// card: `detail` is Markdown (CDS Hooks), and an EHR may render `summary` as Markdown or HTML.
/// So HTML's `<>&"'` become entities and every other ASCII punctuation is backslash-escaped:
/// no tag, link, image, emphasis or autolink can come from the platform's text (an escaped
/// `:` or `.` also stops GFM from making `http://…` or `www.…` a link). It reads the same.
pub(super) fn card_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // A line break would end the Markdown list item (or start a heading).
            '\n' | '\r' => out.push(' '),
            c if c.is_ascii_punctuation() => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// The doctor's choice on a card: the suggestion taken is 互认; dismissing the card with a
/// reason is 不互认 with that reason (06: the comment is its text).
pub(super) async fn feedback(
    State(s): State<Arc<Service>>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(_id): Path<String>,
    Json(body): Json<Value>,
) -> Reply {
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
