//! The platform's pages behind the URLs it hands out: a patient's list of recognisable reports,
//! and a check's page where the doctor takes 互认 / 不互认 for each matched order (contract §6).
//! What a doctor sees in a browser while the hospital rehearses go-live, so it is written as
//! the platform's page would be: in Chinese, with the reports' results before the choice.
//!
//! A URL is a one-time ticket. The first visit opens the page *in that browser*: a cookie
//! scoped to the page's path (HttpOnly, SameSite=Strict) lets reloads and the form's posts work
//! there for a day; the same URL in another browser (a copied or leaked link) is `410`. The
//! form posts every order's choice at once and answers with a redirect to the page (so a
//! reload never posts twice), which then shows what was decided.

use std::collections::HashMap;

use chrono::Duration;
use hmr_protocol::{ReportType, DECLINE_REASONS};

use crate::error::SimError;
use crate::recognition::{take_page_decision, PageChoice};
use crate::state::{OpenPage, ReportBody, ReportId, State, Ticket};

/// The cookie that ties an opened page to its browser.
const COOKIE: &str = "hmr_page";

/// How long an opened page keeps working in its browser.
const OPEN_HOURS: i64 = 24;

/// A page to answer: HTML, with the cookie to set the first time.
pub struct Page {
    pub html: String,
    pub set_cookie: Option<String>,
}

/// `GET /page/{ticket}`. `path` is the page's path as the browser sees it (the cookie's scope);
/// `cookie` the request's `Cookie` header.
pub fn open(st: &mut State, ticket: &str, path: &str, cookie: Option<&str>) -> Result<Page, SimError> {
    let now = st.now();
    st.pages.retain(|_, p| p.opened_at + Duration::hours(OPEN_HOURS) > now);
    if let Some(t) = st.tickets.remove(ticket) {
        st.used_tickets.insert(ticket.to_owned());
        if t.expires_at <= now {
            return Err(SimError::Gone("此互认页面链接已过期，请从 HIS 重新打开".into()));
        }
        let secret = uuid::Uuid::new_v4().simple().to_string();
        let html = render(st, ticket, &t, None);
        st.pages.insert(
            ticket.to_owned(),
            OpenPage {
                secret: secret.clone(),
                ticket: t,
                opened_at: now,
            },
        );
        return Ok(Page {
            html,
            set_cookie: Some(format!("{COOKIE}={secret}; Path={path}; HttpOnly; SameSite=Strict")),
        });
    }
    let page = opened(st, ticket, cookie)?;
    Ok(Page {
        html: render(st, ticket, &page.ticket, None),
        set_cookie: None,
    })
}

/// `POST /page/{ticket}/decide`: the choices of the page's form, each order at once (fields
/// `order_N`, `choice_N` = `recognise:<reportId>` or `decline`, `reason_code_N`,
/// `reason_text_N`), or one order (`order_id`, `report_id`, `choice`, `reason_code`,
/// `reason_text`, as a script would post). The doctor is the check's (`doctor_no` may name
/// another). Ok(None): recorded, redirect to the page; Ok(Some(page)): the page again with
/// what was wrong, nothing recorded.
pub fn decide(
    st: &mut State,
    ticket: &str,
    cookie: Option<&str>,
    form: &HashMap<String, String>,
) -> Result<Option<String>, SimError> {
    let page = opened(st, ticket, cookie)?;
    let ticket_data = clone_ticket(&page.ticket);
    let Some(check_id) = ticket_data.check_id.clone() else {
        return Err(SimError::NotFound("此页面不是处方互认校验页面".into()));
    };
    let field = |k: &str| form.get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    let mut choices = Vec::new();
    if let Some(order_id) = field("order_id") {
        let recognise = match field("choice").as_deref() {
            Some("recognise") => true,
            Some("decline") => false,
            _ => return Ok(Some(render(st, ticket, &ticket_data, Some("请选择“互认”或“不互认”")))),
        };
        choices.push(PageChoice {
            order_id,
            report_id: field("report_id").unwrap_or_default(),
            recognise,
            reason_code: field("reason_code"),
            reason_text: field("reason_text"),
        });
    } else {
        // The form's orders, in their order on the page (a browser posts them all; a script
        // may post one).
        let mut numbers: Vec<u32> = form
            .keys()
            .filter_map(|k| k.strip_prefix("order_")?.parse().ok())
            .collect();
        numbers.sort_unstable();
        for n in numbers {
            let Some(order_id) = field(&format!("order_{n}")) else {
                continue;
            };
            let choice = field(&format!("choice_{n}"));
            let (recognise, report_id) = match choice.as_deref() {
                Some(c) if c.starts_with("recognise:") => (true, c["recognise:".len()..].to_string()),
                Some("decline") => (false, String::new()),
                // Left for later: the doctor may decide order by order.
                _ => continue,
            };
            choices.push(PageChoice {
                order_id,
                report_id,
                recognise,
                reason_code: field(&format!("reason_code_{n}")),
                reason_text: field(&format!("reason_text_{n}")),
            });
        }
    }
    if choices.is_empty() {
        return Ok(Some(render(
            st,
            ticket,
            &ticket_data,
            Some("请至少为一条医嘱选择“互认”或“不互认”"),
        )));
    }
    let doctor_no = field("doctor_no");
    match take_page_decision(st, &check_id, &choices, doctor_no.as_deref()) {
        Ok(()) => Ok(None),
        Err(SimError::Invalid(errors)) => {
            let why = errors
                .iter()
                .map(|e| problem_text(&e.field, &e.reason))
                .collect::<Vec<_>>()
                .join("；");
            Ok(Some(render(st, ticket, &ticket_data, Some(&why))))
        }
        Err(SimError::Conflict { .. }) => Ok(Some(render(
            st,
            ticket,
            &ticket_data,
            Some("本次处方的互认选择已由 HIS 上传，不能在此更改"),
        ))),
        Err(e) => Err(e),
    }
}

/// The page opened in this browser (its cookie), or why not.
fn opened<'a>(st: &'a State, ticket: &str, cookie: Option<&str>) -> Result<&'a OpenPage, SimError> {
    match st.pages.get(ticket) {
        Some(p) if cookie_value(cookie) == Some(p.secret.as_str()) => Ok(p),
        Some(_) => Err(SimError::Gone(
            "此互认页面链接已在另一浏览器中打开过（一次性链接），请从 HIS 重新打开".into(),
        )),
        None if st.used_tickets.contains(ticket) => {
            Err(SimError::Gone("此互认页面链接已使用或已过期，请从 HIS 重新打开".into()))
        }
        None => Err(SimError::NotFound("无效的互认页面链接".into())),
    }
}

fn cookie_value(header: Option<&str>) -> Option<&str> {
    header?
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

fn clone_ticket(t: &Ticket) -> Ticket {
    Ticket {
        org: t.org.clone(),
        title: t.title.clone(),
        items: t.items.clone(),
        expires_at: t.expires_at,
        check_id: t.check_id.clone(),
    }
}

/// A field error of a page decision, in the doctor's words.
fn problem_text(field: &str, reason: &str) -> String {
    let what = match (field.rsplit('.').next().unwrap_or(field), reason) {
        ("reasonCode", "required") => "选择“不互认”时必须选择原因",
        ("reasonCode", _) => "不互认原因无效",
        ("reasonText", "required") => "原因为“其他情形确需复查”时必须填写说明",
        ("reasonText", "length") => "原因说明过长（最多 200 字）",
        ("reasonText", _) => "原因说明无效",
        ("reportId", _) => "所选报告不在本次可互认范围内",
        ("orderId", _) => "医嘱不在本次校验中",
        _ => "选择无效",
    };
    match field.split_once('.') {
        Some((order, _)) => format!("医嘱 {}：{what}", order),
        None => what.to_string(),
    }
}

fn render(st: &State, ticket: &str, t: &Ticket, error: Option<&str>) -> String {
    let body = match &t.check_id {
        Some(check_id) => check_page(st, t, check_id, ticket),
        None => list_page(t),
    };
    let error = error.map_or(String::new(), |e| {
        format!("<p class=\"error\" role=\"alert\">{}</p>\n", esc(e))
    });
    format!(
        "<!doctype html>\n<html lang=\"zh-CN\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title}</title>\
         <style>{STYLE}</style></head>\n<body>\n<h1>{title}</h1>\n{error}{body}</body></html>\n",
        title = esc(&t.title),
    )
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;max-width:60em}\
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:.25em .5em;text-align:left}\
fieldset{margin:1em 0;padding:.75em 1em;border:1px solid #888}legend{font-weight:bold}\
.report{border-top:1px dashed #ccc;padding:.5em 0}.decided{color:#155724;font-weight:bold}\
.declined{color:#8a4b00;font-weight:bold}.error{color:#b00020;font-weight:bold}\
.done{background:#e6f4ea;padding:.75em;border:1px solid #155724}.abnormal{color:#b00020}";

fn list_page(t: &Ticket) -> String {
    let mut rows = String::new();
    for i in &t.items {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} v{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            esc(&i.item_name),
            esc(&i.data_code),
            esc(&i.org_name),
            esc(&i.report_no),
            i.version,
            kind_text(i.report_type),
            esc(&i.reported_at),
            esc(&i.valid_until),
        ));
    }
    if t.items.is_empty() {
        rows.push_str("<tr><td colspan=\"7\">无可互认的检查检验结果</td></tr>\n");
    }
    format!(
        "<p>机构 {org} · {n} 项</p>\n<table>\n<tr><th>项目</th><th>互认代码</th><th>报告机构</th><th>报告单号</th>\
         <th>类型</th><th>报告时间</th><th>有效期至</th></tr>\n{rows}</table>\n",
        org = esc(&t.org),
        n = t.items.len(),
    )
}

fn kind_text(kind: ReportType) -> &'static str {
    match kind {
        ReportType::Lab => "检验",
        ReportType::Exam => "检查",
    }
}

/// Each matched order: its reports with their results, then 互认 (with which report) or
/// 不互认 with a reason; an order already decided shows its decision instead.
fn check_page(st: &State, t: &Ticket, check_id: &str, ticket: &str) -> String {
    let Some(check) = st.checks.get(check_id) else {
        return "<p>本次处方校验已失效（保留 7 天），请从 HIS 重新校验</p>\n".into();
    };
    let patient = st
        .orgs
        .get(&check.org)
        .and_then(|o| o.patients.get(&check.patient_id))
        .map_or(String::new(), |p| p.name.clone());
    let uploaded: HashMap<&str, &hmr_protocol::Decision> = check
        .decided
        .iter()
        .flat_map(|d| d.decisions.iter())
        .map(|d| (d.order_id.as_str(), d))
        .collect();
    let reasons: String = DECLINE_REASONS
        .iter()
        .map(|(code, text)| format!("<option value=\"{code}\">{code} {}</option>", esc(text)))
        .collect();
    let mut open_orders = 0;
    let mut orders = String::new();
    for (n, (order_id, offered)) in check.matched.iter().enumerate() {
        let item = |report_id: &str| t.items.iter().find(|i| i.report_id == report_id);
        let name = offered
            .first()
            .and_then(|r| item(r))
            .map_or("", |i| i.item_name.as_str());
        orders.push_str(&format!(
            "<fieldset class=\"order\" data-order-id=\"{o}\">\n<legend>医嘱 {o} · {name}</legend>\n",
            o = esc(order_id),
            name = esc(name),
        ));
        let decided = check
            .page
            .get(order_id)
            .map(|d| {
                (
                    d.recognise,
                    d.report_id.as_str(),
                    d.reason_code.as_deref(),
                    d.reason_text.as_deref(),
                    "本页面",
                )
            })
            .or_else(|| {
                uploaded.get(order_id.as_str()).map(|d| {
                    (
                        d.recognise,
                        d.report_id.as_str(),
                        d.reason_code.as_deref(),
                        d.reason_text.as_deref(),
                        "HIS",
                    )
                })
            });
        for report_id in offered {
            orders.push_str(&report_block(st, item(report_id), report_id));
        }
        match decided {
            Some((true, report_id, _, _, by)) => orders.push_str(&format!(
                "<p class=\"decided\">已互认：采用 {} 的报告（{by}选择）</p>\n",
                esc(item(report_id).map_or(report_id, |i| i.org_name.as_str())),
            )),
            Some((false, _, code, text, by)) => {
                let reason = DECLINE_REASONS
                    .iter()
                    .find(|(c, _)| Some(*c) == code)
                    .map_or(code.unwrap_or(""), |(_, t)| *t);
                let more = text.map_or(String::new(), |t| format!("：{}", esc(t)));
                orders.push_str(&format!(
                    "<p class=\"declined\">不互认：{}{more}（{by}选择）</p>\n",
                    esc(reason)
                ));
            }
            None => {
                open_orders += 1;
                orders.push_str(&format!(
                    "<input type=\"hidden\" name=\"order_{n}\" value=\"{}\">\n",
                    esc(order_id)
                ));
                for report_id in offered {
                    let org = item(report_id).map_or(report_id.as_str(), |i| i.org_name.as_str());
                    orders.push_str(&format!(
                        "<label><input type=\"radio\" name=\"choice_{n}\" value=\"recognise:{r}\"> 互认：采用 {org} 的结果，不重复检查</label><br>\n",
                        r = esc(report_id),
                        org = esc(org),
                    ));
                }
                orders.push_str(&format!(
                    "<label><input type=\"radio\" name=\"choice_{n}\" value=\"decline\"> 不互认，重新检查</label>\n\
                     <label>原因 <select name=\"reason_code_{n}\"><option value=\"\">请选择不互认原因</option>{reasons}</select></label>\n\
                     <label>说明 <input name=\"reason_text_{n}\" maxlength=\"200\" placeholder=\"原因为 06 时必填\"></label>\n"
                ));
            }
        }
        orders.push_str("</fieldset>\n");
    }
    let head = format!(
        "<p>患者 {patient} · 开单医生 {doctor} · 科室 {dept}</p>\n",
        patient = esc(&patient),
        doctor = esc(&check.doctor_no),
        dept = esc(&check.dept_code),
    );
    if open_orders == 0 {
        return format!(
            "{head}<p class=\"done\" role=\"status\">本次处方的互认选择已完成，请返回 HIS 保存医嘱。本页面可以关闭。</p>\n{orders}"
        );
    }
    format!(
        "{head}<p>请为每条医嘱选择“互认”（采用已有结果，不重复检查）或“不互认”（并选择原因），然后提交。</p>\n\
         <form method=\"post\" action=\"{action}\">\n{orders}<button type=\"submit\">提交互认选择</button>\n</form>\n",
        // Relative to /page/, so it holds behind a proxy's prefix too.
        action = esc(&format!("{ticket}/decide")),
    )
}

/// One offered report: where and when, and its results (检验 items, or 检查所见/结论).
fn report_block(st: &State, item: Option<&hmr_protocol::RecognitionItem>, report_id: &str) -> String {
    let Some(i) = item else {
        return String::new();
    };
    let mut out = format!(
        "<div class=\"report\" data-report-id=\"{id}\"><p>{kind} · {name} · {org} · 报告时间 {at} · 有效期至 {until}</p>\n",
        id = esc(report_id),
        kind = kind_text(i.report_type),
        name = esc(&i.item_name),
        org = esc(&i.org_name),
        at = esc(&i.reported_at),
        until = esc(&i.valid_until),
    );
    match ReportId::parse(report_id)
        .and_then(|id| st.version(&id))
        .map(|v| &v.body)
    {
        Some(ReportBody::Lab(lab)) => {
            out.push_str("<table><tr><th>项目</th><th>结果</th><th>单位</th><th>参考范围</th><th>提示</th></tr>\n");
            for r in &lab.items {
                let flag = r.abnormal_flag.as_deref().unwrap_or("");
                let class = if flag.is_empty() || flag == "N" {
                    ""
                } else {
                    " class=\"abnormal\""
                };
                out.push_str(&format!(
                    "<tr{class}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                    esc(&r.item_name),
                    esc(&r.result_value),
                    esc(r.result_unit.as_deref().unwrap_or("")),
                    esc(r.reference_range.as_deref().unwrap_or("")),
                    esc(flag),
                ));
            }
            out.push_str("</table>\n");
        }
        Some(ReportBody::Exam(exam)) => out.push_str(&format!(
            "<p>检查所见：{}</p>\n<p>检查结论：{}</p>\n",
            esc(&exam.findings),
            esc(&exam.impression),
        )),
        None => {}
    }
    out.push_str("</div>\n");
    out
}

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}
