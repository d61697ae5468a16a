//! The calls a doctor's workstation makes through SQL: the badge's list, the precise query,
//! the check at ordering and the check at signing (with its prompt).

use super::*;

/// 互认信息列表: count, page URL and items for the reception badge.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::too_many_arguments)]
pub(super) fn list_recognitions_json(
    id_type: &str,
    id_no: &str,
    visit_no: &str,
    doctor_no: &str,
    dept_code: &str,
    kind: default!(&str, "'all'"),
    use_cache: default!(bool, true),
    workstation: default!(&str, "''"),
) -> JsonB {
    if !matches!(kind, "lab" | "exam" | "all") {
        bad_argument(format!("hmr: kind must be lab, exam or all, not {kind:?}"));
    }
    let query = ListQuery {
        id_type: id_type.trim().into(),
        id_no: hmr_protocol::checks::normalise_id_no(id_no),
        visit_no: visit_no.trim().into(),
        doctor_no: doctor_no.trim().into(),
        dept_code: dept_code.trim().into(),
        kind: kind.into(),
    };
    let cache_key = hex::encode(sha2::Sha256::digest(serde_json::to_vec(&query).unwrap_or_default()));
    // On a hot standby the (unlogged) cache cannot be read or written: the badge still works,
    // each call asking the platform.
    // SAFETY: reads a flag of this backend's shared-memory state; no arguments.
    let standby = unsafe { pg_sys::RecoveryInProgress() };
    // A read-only transaction (a screen that only reads) may read the cache, not write it.
    // SAFETY: reads a backend-local flag of the current transaction.
    let read_only = standby || unsafe { pg_sys::XactReadOnly };
    let ttl = if standby { 0 } else { gucs::LIST_CACHE_SECONDS.get() };
    if use_cache && ttl > 0 {
        const SQL: &str = "SELECT answer FROM hmr.list_cache
             WHERE cache_key OPERATOR(pg_catalog.=) $1 AND expires_at OPERATOR(pg_catalog.>) pg_catalog.clock_timestamp()";
        let hit = plans::read(SQL, &[plans::TEXT], &[cache_key.as_str().into()], |rows| {
            rows.first().get_one::<JsonB>()
        });
        if let Ok(Some(JsonB(hit))) = hit {
            log_list_call(&query, workstation, &hit, true, read_only);
            return JsonB(hit);
        }
    }
    let Some(settings) = Settings::load() else {
        return answer(&ListResult::unavailable("hmr.platform is not configured"));
    };
    let result = match call(&settings, paths::list_recognitions(&query)) {
        Ok(body) => match parse_data::<ListAnswer>(&body) {
            Ok(a) => ListResult {
                status: CallStatus::Ok,
                reason: None,
                count: a.count,
                url: Some(a.url),
                items: a.items.iter().map(|i| item_json(i, &settings.org_code)).collect(),
                to_perform: vec![],
            },
            Err(e) => ListResult::unavailable(format!("unreadable answer: {e}")),
        },
        // The platform refuses the patient's identity (an id_no it cannot accept): reception
        // shows a grey badge saying the identity needs correcting, instead of failing.
        Err(CallError::Refused { message, fields, .. }) if fields.iter().any(|f| f == "idNo" || f == "idType") => {
            ListResult {
                status: CallStatus::InvalidPatient,
                reason: Some(hmr_protocol::mask::scrub(&message)),
                count: 0,
                url: None,
                items: vec![],
                to_perform: vec![],
            }
        }
        Err(CallError::Refused { status, message, .. }) => refused(status, &message),
        Err(CallError::Unavailable(reason) | CallError::NotFound(reason)) => ListResult::unavailable(reason),
    };
    let ok = result.status == CallStatus::Ok;
    let answer = serde_json::to_value(&result).expect("answers serialize");
    if ok && ttl > 0 && !read_only {
        const SQL: &str = "INSERT INTO hmr.list_cache
             VALUES ($1, $2, pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => $3))
             ON CONFLICT (cache_key) DO UPDATE SET answer = EXCLUDED.answer, expires_at = EXCLUDED.expires_at";
        let _ = plans::write(
            SQL,
            &[plans::TEXT, plans::JSONB, plans::FLOAT8],
            &[
                cache_key.as_str().into(),
                JsonB(answer.clone()).into(),
                f64::from(ttl).into(),
            ],
        );
    }
    log_list_call(&query, workstation, &answer, false, read_only);
    JsonB(answer)
}

/// Keeps the call for the hospital's statistics (hmr.list_log: 调阅). Not on a standby or
/// in a read-only transaction (a screen that only reads must keep working).
pub(super) fn log_list_call(query: &ListQuery, workstation: &str, answer: &Value, cached: bool, read_only: bool) {
    if read_only {
        return;
    }
    let status = answer["status"].as_str().unwrap_or("unavailable");
    let shown = answer["count"].as_i64().map(|n| n as i32);
    const SQL: &str =
        "INSERT INTO hmr.list_log (doctor_no, dept_code, visit_no, id_no_masked, kind, shown, status, cached, workstation)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULLIF(pg_catalog.left($9, 32), ''))";
    use plans::{BOOL, INT4, TEXT};
    let _ = plans::write(
        SQL,
        &[TEXT, TEXT, TEXT, TEXT, TEXT, INT4, TEXT, BOOL, TEXT],
        &[
            query.doctor_no.as_str().into(),
            query.dept_code.as_str().into(),
            query.visit_no.as_str().into(),
            hmr_protocol::mask::id_no(&query.id_no).as_str().into(),
            query.kind.as_str().into(),
            shown.into(),
            status.into(),
            cached.into(),
            workstation.into(),
        ],
    );
}

/// A date alone (`2026-12-01`) means the whole day in UTC+8: from its first second, to its
/// last. Anything else is passed on as given (a full time).
pub(super) fn whole_day(value: &str, end: bool) -> String {
    let china = hmr_protocol::checks::china();
    let at = |d: chrono::NaiveDate, h, m, s| {
        d.and_hms_opt(h, m, s)
            .and_then(|t| t.and_local_timezone(china).single())
            .map(|t| hmr_protocol::checks::format_time(&t))
    };
    match chrono::NaiveDate::parse_from_str(value.trim(), "%Y-%m-%d") {
        Ok(d) if end => at(d, 23, 59, 59).unwrap_or_else(|| value.to_string()),
        Ok(d) => at(d, 0, 0, 0).unwrap_or_else(|| value.to_string()),
        Err(_) => value.to_string(),
    }
}

/// The orders of a call (`[{order_id, item_code, type}]`) whose items are in the catalog
/// (mapped through `hmr.item_map`): items outside it can never be recognised, so they are
/// not asked about.
pub(super) fn catalog_orders(orders: Value) -> Vec<CheckOrder> {
    let Value::Array(order_list) = orders else {
        bad_argument("hmr: orders must be a JSON array".into())
    };
    let mut asked = Vec::new();
    for o in &order_list {
        let order_id = text_arg(o, "order_id", "orders[]");
        let local = text_arg(o, "item_code", "orders[]");
        let kind = text_arg(o, "type", "orders[]");
        let Some(report_type) = ReportType::parse(&kind) else {
            bad_argument(format!("hmr: orders[].type must be lab or exam, not {kind:?}"))
        };
        asked.push((order_id, local, kind, report_type));
    }
    let codes = map_items(&asked.iter().map(|a| (a.2.as_str(), a.1.as_str())).collect::<Vec<_>>());
    asked
        .into_iter()
        .zip(codes)
        .filter_map(|((order_id, local, _, report_type), code)| {
            code.map(|data_code| CheckOrder {
                order_id,
                local_item_code: local,
                data_code,
                report_type,
            })
        })
        .collect()
}

/// The ordering step (seed 18.2/19.2): while the doctor orders, the precise query
/// (精准互认信息接口) for the ordered items; when one is a duplicate, the platform's page URL
/// (the list's one-time ticket), which the workstation must open and the doctor answer
/// (互认 / 不互认) before going on. The save gate runs the prescription check later.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
pub(super) fn order_check_json(visit: JsonB, orders: JsonB) -> JsonB {
    let visit = visit.0;
    // A visit that names the patient and the visit type is checked as a prescription of the
    // ordered items (seeds 18.2/19.2): a check whose page takes the doctor's 互认/不互认, and
    // whose decisions (there or through hmr_record_decision) satisfy the gate at save.
    if opt_text(&visit, "patient_id").is_some() && opt_text(&visit, "visit_type").is_some() {
        let JsonB(checked) = check_prescription_json(JsonB(visit), orders);
        let c: PrescriptionCheckResult = serde_json::from_value(checked).expect("the check's own answer");
        return answer(&OrderCheckResult {
            status: c.status,
            reason: c.reason,
            duplicate: c.duplicate,
            check_id: c.check_id.filter(|_| c.status == CallStatus::Ok),
            url: c.url,
            matches: c.matches,
        });
    }
    let wanted = catalog_orders(orders.0);
    let none = |status, reason| OrderCheckResult {
        status,
        reason,
        duplicate: false,
        check_id: None,
        url: None,
        matches: vec![],
    };
    if wanted.is_empty() {
        return answer(&none(CallStatus::Ok, None));
    }
    let id_type = text_arg(&visit, "id_type", "visit");
    let id_no = hmr_protocol::checks::normalise_id_no(&text_arg(&visit, "id_no", "visit"));
    let query = PreciseQuery {
        id_type: id_type.clone(),
        id_no: id_no.clone(),
        org_code: None,
        org_name: None,
        data_codes: Some(wanted.iter().map(|o| o.data_code.clone()).collect()),
        item_name: None,
        from: None,
        to: None,
        kind: None,
    };
    let Some(settings) = Settings::load() else {
        return answer(&none(
            CallStatus::Unavailable,
            Some("hmr.platform is not configured".into()),
        ));
    };
    let items = match call(&settings, paths::precise_query(&query)).and_then(|body| {
        parse_data::<ItemsAnswer>(&body).map_err(|e| CallError::Unavailable(format!("unreadable answer: {e}")))
    }) {
        Ok(a) => a.items,
        Err(e) => {
            let (status, reason) = e.status_and_reason();
            return answer(&none(call_status(status), Some(reason)));
        }
    };
    let matches: Vec<OrderMatch> = wanted
        .iter()
        .filter_map(|o| {
            let reports: Vec<ReportSummary> = items
                .iter()
                .filter(|i| i.data_code == o.data_code)
                .map(|i| item_json(i, &settings.org_code))
                .collect();
            (!reports.is_empty()).then(|| OrderMatch {
                order_id: o.order_id.clone(),
                item_code: Some(o.local_item_code.clone()),
                data_code: o.data_code.clone(),
                reports,
            })
        })
        .collect();
    if matches.is_empty() {
        return answer(&none(CallStatus::Ok, None));
    }
    // The page to force open: the list's URL for this patient (a one-time ticket).
    let list = ListQuery {
        id_type,
        id_no,
        visit_no: opt_text(&visit, "visit_no").unwrap_or_default(),
        doctor_no: opt_text(&visit, "doctor_no").unwrap_or_default(),
        dept_code: opt_text(&visit, "dept_code").unwrap_or_default(),
        kind: "all".into(),
    };
    let url = call(&settings, paths::list_recognitions(&list))
        .ok()
        .and_then(|body| parse_data::<ListAnswer>(&body).ok())
        .map(|a| a.url);
    answer(&OrderCheckResult {
        status: CallStatus::Ok,
        reason: None,
        duplicate: true,
        check_id: None,
        url,
        matches,
    })
}

/// 精准互认信息: by organisation, item (local codes are mapped), date range.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
pub(super) fn query_recognitions_json(filter: JsonB) -> JsonB {
    let f = filter.0;
    if !f.is_object() {
        bad_argument("hmr: the filter must be a JSON object".into());
    }
    let kind = opt_text(&f, "type");
    if kind.as_deref().is_some_and(|k| !matches!(k, "lab" | "exam" | "all")) {
        bad_argument("hmr: filter.type must be lab, exam or all".into());
    }
    let mut data_codes: Vec<String> = f
        .get("data_codes")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    if let Some(locals) = f.get("item_codes").and_then(Value::as_array) {
        for local in locals.iter().filter_map(Value::as_str) {
            let types: &[&str] = match kind.as_deref() {
                Some("lab") => &["lab"],
                Some("exam") => &["exam"],
                _ => &["lab", "exam"],
            };
            let asked: Vec<(&str, &str)> = types.iter().map(|t| (*t, local)).collect();
            data_codes.extend(map_items(&asked).into_iter().flatten());
        }
        if data_codes.is_empty() {
            // Local items outside the catalog can never be recognised: nothing to ask.
            return answer(&QueryResult {
                status: CallStatus::Ok,
                reason: None,
                items: vec![],
            });
        }
    }
    let query = PreciseQuery {
        id_type: text_arg(&f, "id_type", "filter"),
        id_no: hmr_protocol::checks::normalise_id_no(&text_arg(&f, "id_no", "filter")),
        org_code: opt_text(&f, "org_code"),
        org_name: opt_text(&f, "org_name"),
        data_codes: (!data_codes.is_empty()).then_some(data_codes),
        item_name: opt_text(&f, "item_name"),
        from: opt_text(&f, "from").map(|d| whole_day(&d, false)),
        to: opt_text(&f, "to").map(|d| whole_day(&d, true)),
        kind,
    };
    let unavailable = |reason: String| QueryResult {
        status: CallStatus::Unavailable,
        reason: Some(reason),
        items: vec![],
    };
    let Some(settings) = Settings::load() else {
        return answer(&unavailable("hmr.platform is not configured".into()));
    };
    answer(&match call(&settings, paths::precise_query(&query)) {
        Ok(body) => match parse_data::<ItemsAnswer>(&body) {
            Ok(a) => QueryResult {
                status: CallStatus::Ok,
                reason: None,
                items: a.items.iter().map(|i| item_json(i, &settings.org_code)).collect(),
            },
            Err(e) => unavailable(format!("unreadable answer: {e}")),
        },
        Err(CallError::Refused { status, message, .. }) => refused(status, &message),
        Err(CallError::Unavailable(reason) | CallError::NotFound(reason)) => unavailable(reason),
    })
}

/// 处方保存互认逻辑校验: maps local item codes, asks the platform, records the check.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
pub(super) fn check_prescription_json(visit: JsonB, orders: JsonB) -> JsonB {
    let visit = visit.0;
    let checked = catalog_orders(orders.0);
    let local_of: HashMap<String, String> = checked
        .iter()
        .map(|o| (o.order_id.clone(), o.local_item_code.clone()))
        .collect();
    if checked.is_empty() {
        return answer(&PrescriptionCheckResult {
            status: CallStatus::Ok,
            reason: None,
            duplicate: false,
            check_id: None,
            url: None,
            matches: vec![],
        });
    }
    let request = PrescriptionCheck {
        id_type: text_arg(&visit, "id_type", "visit"),
        id_no: hmr_protocol::checks::normalise_id_no(&text_arg(&visit, "id_no", "visit")),
        patient_id: text_arg(&visit, "patient_id", "visit"),
        visit_type: text_arg(&visit, "visit_type", "visit"),
        visit_no: text_arg(&visit, "visit_no", "visit"),
        doctor_no: text_arg(&visit, "doctor_no", "visit"),
        dept_code: text_arg(&visit, "dept_code", "visit"),
        orders: checked,
    };
    let orders_json = json!(request
        .orders
        .iter()
        .map(
            |o| json!({"order_id": o.order_id, "item_code": o.local_item_code, "data_code": o.data_code,
                        "type": o.report_type.as_str()})
        )
        .collect::<Vec<_>>());
    let settings = Settings::load();
    let own_org = settings.as_ref().map_or(String::new(), |s| s.org_code.clone());
    let outcome = match &settings {
        None => Err(CallError::Unavailable("hmr.platform is not configured".into())),
        Some(settings) => call(settings, paths::prescription_check(&request)),
    };
    let row = match outcome.and_then(|body| {
        parse_data::<CheckAnswer>(&body).map_err(|e| CallError::Unavailable(format!("unreadable answer: {e}")))
    }) {
        Ok(a) => {
            let matches: Vec<OrderMatch> = a
                .matches
                .iter()
                .map(|m| OrderMatch {
                    order_id: m.order_id.clone(),
                    data_code: m.data_code.clone(),
                    item_code: local_of.get(&m.order_id).cloned(),
                    reports: m.reports.iter().map(|i| item_json(i, &own_org)).collect(),
                })
                .collect();
            let matches = serde_json::to_value(matches).expect("answers serialize");
            CheckRow {
                check_id: a.check_id,
                status: "ok",
                visit,
                orders: orders_json,
                matches,
                url: Some(a.url),
                reason: None,
            }
        }
        // A data problem (the patient not at the platform yet, an identity number it refuses,
        // a refusal code) never stops care: the save goes on, the check is recorded with why.
        Err(e) => {
            if matches!(e, CallError::NotFound(_)) {
                // The patient has not reached the platform: send it ahead of the queue.
                let pid = request.patient_id.clone();
                let _ = Spi::run_with_args("SELECT hmr.hurry('patient', $1)", &[pid.as_str().into()]);
            }
            let (status, reason) = e.status_and_reason();
            not_checked(status, reason, visit, orders_json)
        }
    };
    record_check(&row);
    let matches: Vec<OrderMatch> = serde_json::from_value(row.matches).expect("the matches built above");
    answer(&PrescriptionCheckResult {
        status: call_status(row.status),
        reason: row.reason,
        duplicate: !matches.is_empty(),
        check_id: Some(row.check_id),
        url: row.url,
        matches,
    })
}

pub(super) fn not_checked(status: &'static str, reason: String, visit: Value, orders: Value) -> CheckRow {
    CheckRow {
        check_id: format!("{status}-{}", uuid::Uuid::new_v4()),
        status,
        visit,
        orders,
        matches: json!([]),
        url: None,
        reason: Some(hmr_protocol::mask::scrub(&reason)),
    }
}
