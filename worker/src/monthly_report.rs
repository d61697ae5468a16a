//! `hmr-worker report --month 2026-11 --out report.html [--csv DIR]`: the month's 互认 and
//! upload statistics for the hospital's 医务科, as one self-contained HTML page (tables and SVG
//! charts drawn with plotters, Chinese labels) and/or CSV files. Reads only the statistics
//! views (`hmr.recognition_totals`, `hmr.recognition_stats`, `hmr.upload_stats`).

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use tokio_postgres::NoTls;

use crate::error::WorkerError;

/// The figures of one month.
#[derive(Debug, Default)]
pub struct Month {
    pub month: String,
    pub totals: Vec<(String, String)>,
    /// Per department (code, name): prompts, 互认, 不互认.
    pub departments: Vec<(Named, i64, i64, i64)>,
    /// Per doctor (staff no, name): prompts, 互认, 不互认.
    pub doctors: Vec<(Named, i64, i64, i64)>,
    /// 不互认 by reason 01–06.
    pub reasons: [i64; 6],
    /// Per item: name, 互认, 不互认, repeats avoided, saved.
    pub items: Vec<(String, String, i64, i64, Option<f64>)>,
    pub uploads: Vec<Uploads>,
}

/// A department or a doctor: the code the statistics keep, and the name the HIS's source view
/// gives it (none when the view does not list it).
#[derive(Debug, Default, Clone)]
pub struct Named {
    pub code: String,
    pub name: Option<String>,
}

impl Named {
    /// `内科（0301）`, or the code alone.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("{n}（{}）", self.code),
            None => self.code.clone(),
        }
    }
}

/// Names by code from a kind's source view (`hmr.kinds.source_view`): departments and staff.
/// A view that is missing or unreadable gives no names (the report shows codes).
async fn names(
    client: &tokio_postgres::Client,
    kind: &str,
    code: &str,
    name: &str,
) -> std::collections::HashMap<String, String> {
    let Ok(Some(row)) = client
        .query_opt(
            "SELECT to_regclass(source_view)::text FROM hmr.kinds WHERE kind = $1",
            &[&kind],
        )
        .await
    else {
        return Default::default();
    };
    let Some(view) = row.get::<_, Option<String>>(0) else {
        return Default::default();
    };
    // `view` is a regclass's own text (quoted as needed); the columns are the documented ones.
    let sql = format!("SELECT {code}::text, {name}::text FROM {view}");
    match client.query(&sql, &[]).await {
        Ok(rows) => rows
            .iter()
            .filter_map(|r| Some((r.get::<_, Option<String>>(0)?, r.get::<_, Option<String>>(1)?)))
            .collect(),
        Err(e) => {
            tracing::warn!(kind, error = %crate::error::WorkerError::from(e), "names not read: the report shows codes");
            Default::default()
        }
    }
}

/// One report kind's uploads in the month.
#[derive(Debug, Default)]
pub struct Uploads {
    pub kind: String,
    pub uploaded: i64,
    pub not_uploaded: i64,
    /// 上传率
    pub rate: Option<f64>,
    pub on_time: i64,
    /// 及时率
    pub on_time_rate: Option<f64>,
    /// Accepted within 1 min, 10 min, 1 h, 24 h, 72 h of the approval.
    pub within: [i64; 5],
}

const REASONS: [&str; 6] = [
    "01 病情变化",
    "02 结果变化快",
    "03 重大医疗措施前",
    "04 急诊急救",
    "05 司法鉴定",
    "06 其他",
];

pub async fn read(url: &str, month: &str) -> Result<Month, WorkerError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let first = format!("{month}-01");
    let mut m = Month {
        month: month.to_string(),
        ..Month::default()
    };
    if let Some(r) = client
        .query_opt(
            "SELECT list_calls::text, list_calls_with_results::text, prompts::text, recognised::text, declined::text,
                    coalesce(round(recognition_rate * 100, 1)::text || '%', '-'), downloads::text,
                    repeats_avoided::text, coalesce(saved::text, '-')
               FROM hmr.recognition_totals WHERE month = $1::text::date",
            &[&first],
        )
        .await?
    {
        let labels = [
            "调阅次数",
            "有可互认结果的调阅",
            "提醒次数",
            "互认",
            "不互认",
            "互认率",
            "互认报告下载",
            "避免重复检查",
            "节省费用 (元)",
        ];
        m.totals = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.to_string(), r.get::<_, String>(i)))
            .collect();
    }
    let dept_names = names(&client, "department", "dept_code", "dept_name").await;
    for r in client
        .query(
            "SELECT coalesce(dept_code, '-'), sum(prompts)::bigint, sum(recognised)::bigint, sum(declined)::bigint
               FROM hmr.recognition_stats WHERE month = $1::text::date GROUP BY 1 ORDER BY 1",
            &[&first],
        )
        .await?
    {
        let code: String = r.get(0);
        let name = dept_names.get(&code).cloned();
        m.departments.push((Named { code, name }, r.get(1), r.get(2), r.get(3)));
    }
    let staff_names = names(&client, "staff", "staff_no", "name").await;
    for r in client
        .query(
            "SELECT coalesce(doctor_no, '-'), sum(prompts)::bigint, sum(recognised)::bigint, sum(declined)::bigint
               FROM hmr.recognition_stats WHERE month = $1::text::date GROUP BY 1 ORDER BY 1",
            &[&first],
        )
        .await?
    {
        let code: String = r.get(0);
        let name = staff_names.get(&code).cloned();
        m.doctors.push((Named { code, name }, r.get(1), r.get(2), r.get(3)));
    }
    if let Some(r) = client
        .query_opt(
            "SELECT sum(declined_01)::bigint, sum(declined_02)::bigint, sum(declined_03)::bigint,
                    sum(declined_04)::bigint, sum(declined_05)::bigint, sum(declined_06)::bigint
               FROM hmr.recognition_stats WHERE month = $1::text::date HAVING count(*) > 0",
            &[&first],
        )
        .await?
    {
        for (i, reason) in m.reasons.iter_mut().enumerate() {
            *reason = r.get(i);
        }
    }
    for r in client
        .query(
            "SELECT data_code, coalesce(max(item_name), data_code), sum(recognised)::bigint, sum(declined)::bigint,
                    sum(saved)::float8
               FROM hmr.recognition_stats WHERE month = $1::text::date GROUP BY 1 ORDER BY 3 DESC, 1",
            &[&first],
        )
        .await?
    {
        m.items.push((r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)));
    }
    for r in client
        .query(
            "SELECT kind, uploaded, not_uploaded, upload_rate::float8, uploaded_on_time, on_time_rate::float8,
                    within_1min, within_10min, within_1h, within_24h, within_72h
               FROM hmr.upload_stats('24 hours') WHERE month = $1::text::date ORDER BY kind",
            &[&first],
        )
        .await?
    {
        m.uploads.push(Uploads {
            kind: r.get(0),
            uploaded: r.get(1),
            not_uploaded: r.get(2),
            rate: r.get(3),
            on_time: r.get(4),
            on_time_rate: r.get(5),
            within: [r.get(6), r.get(7), r.get(8), r.get(9), r.get(10)],
        });
    }
    Ok(m)
}

/// Registers the Chinese font the charts' labels are measured with (plotters lays text out
/// itself; the browser draws it with its own font).
pub fn register_font(path: &Path) -> Result<(), WorkerError> {
    let bytes = std::fs::read(path).map_err(|e| WorkerError::Config(format!("font {}: {e}", path.display())))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| WorkerError::Config(format!("font {}: not a usable font", path.display())))
}

/// A bar chart as SVG text: one bar per label and series.
fn bars(title: &str, labels: &[String], series: &[(&str, Vec<i64>, RGBColor)]) -> Result<String, WorkerError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 320)).into_drawing_area();
        let draw = |e: &dyn std::fmt::Display| WorkerError::Config(format!("chart {title}: {e}"));
        root.fill(&WHITE).map_err(|e| draw(&e))?;
        let max = series
            .iter()
            .flat_map(|(_, v, _)| v.iter().copied())
            .max()
            .unwrap_or(0)
            .max(1);
        let n = labels.len().max(1);
        let groups = series.len().max(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            // Bars centred on whole numbers, where the axis puts its labels.
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..(max as f64 * 1.15))
            .map_err(|e| draw(&e))?;
        let names = labels.to_vec();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                if (x - x.round()).abs() < 0.01 && *x >= 0.0 {
                    names.get(x.round() as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            // Counts: whole numbers only on the axis.
            .y_label_formatter(&|y| {
                if (y - y.round()).abs() < 1e-9 {
                    format!("{}", y.round() as i64)
                } else {
                    String::new()
                }
            })
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| draw(&e))?;
        for (s, (name, values, color)) in series.iter().enumerate() {
            let color = *color;
            chart
                .draw_series(values.iter().enumerate().map(|(i, v)| {
                    let x0 = i as f64 - 0.4 + 0.8 * s as f64 / groups;
                    let x1 = x0 + 0.8 / groups;
                    Rectangle::new([(x0, 0.0), (x1, *v as f64)], color.filled())
                }))
                .map_err(|e| draw(&e))?
                .label(*name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        }
        if series.len() > 1 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .label_font(("sans-serif", 13))
                .draw()
                .map_err(|e| draw(&e))?;
        }
        root.present().map_err(|e| draw(&e))?;
    }
    Ok(svg)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.1}%", v * 100.0))
}

/// The page: self-contained (inline CSS and SVG), Chinese labels.
pub fn html(m: &Month, hospital: &str) -> Result<String, WorkerError> {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"zh-CN\"><head><meta charset=\"utf-8\"><title>{hospital} 检查检验结果互认月报 {month}</title>
<style>body{{font-family:'WenQuanYi Micro Hei','Noto Sans CJK SC',sans-serif;margin:24px;color:#222}}
table{{border-collapse:collapse;margin:8px 0 20px}}td,th{{border:1px solid #bbb;padding:4px 10px;text-align:right}}
th{{background:#eee}}td:first-child,th:first-child{{text-align:left}}figure{{margin:8px 0 24px}}</style></head><body>
<h1>{hospital} 检查检验结果互认月报</h1><p>统计月份：{month}（北京时间）</p>",
        hospital = esc(hospital),
        month = esc(&m.month)
    );
    h.push_str("<h2>一、互认总体情况</h2><table><tr><th>指标</th><th>数值</th></tr>");
    for (label, value) in &m.totals {
        let _ = write!(h, "<tr><td>{}</td><td>{}</td></tr>", esc(label), esc(value));
    }
    h.push_str("</table>");
    if m.totals.is_empty() {
        h.push_str("<p>本月无互认记录。</p>");
    }

    h.push_str("<h2>二、各科室互认情况</h2>");
    let depts: Vec<String> = m.departments.iter().map(|d| d.0.label()).collect();
    let _ = write!(
        h,
        "<figure id=\"chart-departments\">{}</figure>",
        bars(
            "各科室提醒、互认与不互认",
            &depts,
            &[
                (
                    "提醒",
                    m.departments.iter().map(|d| d.1).collect(),
                    RGBColor(150, 150, 150)
                ),
                (
                    "互认",
                    m.departments.iter().map(|d| d.2).collect(),
                    RGBColor(46, 139, 87)
                ),
                (
                    "不互认",
                    m.departments.iter().map(|d| d.3).collect(),
                    RGBColor(205, 92, 92)
                ),
            ],
        )?
    );
    h.push_str("<table><tr><th>科室</th><th>提醒</th><th>互认</th><th>不互认</th><th>互认率</th></tr>");
    for (dept, prompts, rec, dec) in &m.departments {
        let rate = (rec + dec > 0).then(|| *rec as f64 / (rec + dec) as f64);
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{prompts}</td><td>{rec}</td><td>{dec}</td><td>{}</td></tr>",
            esc(&dept.label()),
            pct(rate)
        );
    }
    h.push_str("</table>");
    h.push_str("<h3>各医生互认情况</h3><table id=\"doctors\"><tr><th>医生</th><th>提醒</th><th>互认</th><th>不互认</th><th>互认率</th></tr>");
    for (doctor, prompts, rec, dec) in &m.doctors {
        let rate = (rec + dec > 0).then(|| *rec as f64 / (rec + dec) as f64);
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{prompts}</td><td>{rec}</td><td>{dec}</td><td>{}</td></tr>",
            esc(&doctor.label()),
            pct(rate)
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>三、不互认原因</h2>");
    let reasons: Vec<String> = REASONS.iter().map(|r| r.to_string()).collect();
    let _ = write!(
        h,
        "<figure id=\"chart-reasons\">{}</figure>",
        bars(
            "不互认原因分布",
            &reasons,
            &[("不互认", m.reasons.to_vec(), RGBColor(205, 92, 92))]
        )?
    );

    h.push_str("<h2>四、各项目互认情况</h2><table><tr><th>项目代码</th><th>项目</th><th>互认</th><th>不互认</th><th>节省费用 (元)</th></tr>");
    for (code, name, rec, dec, saved) in &m.items {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{rec}</td><td>{dec}</td><td>{}</td></tr>",
            esc(code),
            esc(name),
            saved.map_or_else(|| "-".into(), |s| format!("{s:.2}"))
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>五、报告上传（上传率、及时率）</h2>");
    let buckets: Vec<String> = ["≤1分钟", "≤10分钟", "≤1小时", "≤24小时", "≤72小时"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let colors = [RGBColor(70, 130, 180), RGBColor(218, 165, 32)];
    let series: Vec<(&str, Vec<i64>, RGBColor)> = m
        .uploads
        .iter()
        .zip(colors.iter().cycle())
        .map(|(u, c)| {
            let name = if u.kind == "lab_report" { "检验" } else { "检查" };
            (name, u.within.to_vec(), *c)
        })
        .collect();
    let _ = write!(
        h,
        "<figure id=\"chart-uploads\">{}</figure>",
        bars("审核后上传平台用时（累计）", &buckets, &series)?
    );
    h.push_str(
        "<table><tr><th>报告</th><th>已上传</th><th>未上传</th><th>上传率</th><th>24小时内</th><th>及时率</th></tr>",
    );
    for u in &m.uploads {
        let name = if u.kind == "lab_report" {
            "检验报告"
        } else {
            "检查报告"
        };
        let _ = write!(
            h,
            "<tr><td>{name}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            u.uploaded,
            u.not_uploaded,
            pct(u.rate),
            u.on_time,
            pct(u.on_time_rate)
        );
    }
    h.push_str(
        "</table><p>数据来源：hmr.recognition_totals、hmr.recognition_stats、hmr.upload_stats。</p></body></html>\n",
    );
    Ok(h)
}

/// The same figures as CSV files in `dir`.
pub fn csv(m: &Month, dir: &Path) -> Result<(), WorkerError> {
    let io = |e: std::io::Error| WorkerError::Config(format!("writing CSV in {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let field = |s: &str| csv_cell(s);
    let mut t = String::from("指标,数值\n");
    for (l, v) in &m.totals {
        let _ = writeln!(t, "{},{}", field(l), field(v));
    }
    std::fs::write(dir.join(format!("totals-{}.csv", m.month)), t).map_err(io)?;
    let mut d = String::from("科室代码,提醒,互认,不互认,科室\n");
    for (dept, p, r, x) in &m.departments {
        let name = dept.name.as_deref().unwrap_or_default();
        let _ = writeln!(d, "{},{p},{r},{x},{}", field(&dept.code), field(name));
    }
    std::fs::write(dir.join(format!("departments-{}.csv", m.month)), d).map_err(io)?;
    let mut doc = String::from("医生工号,提醒,互认,不互认,医生\n");
    for (doctor, p, r, x) in &m.doctors {
        let name = doctor.name.as_deref().unwrap_or_default();
        let _ = writeln!(doc, "{},{p},{r},{x},{}", field(&doctor.code), field(name));
    }
    std::fs::write(dir.join(format!("doctors-{}.csv", m.month)), doc).map_err(io)?;
    let mut u = String::from("报告,已上传,未上传,上传率,24小时内,及时率\n");
    for x in &m.uploads {
        let _ = writeln!(
            u,
            "{},{},{},{},{},{}",
            x.kind,
            x.uploaded,
            x.not_uploaded,
            x.rate.map(|r| r.to_string()).unwrap_or_default(),
            x.on_time,
            x.on_time_rate.map(|r| r.to_string()).unwrap_or_default()
        );
    }
    std::fs::write(dir.join(format!("uploads-{}.csv", m.month)), u).map_err(io)?;
    Ok(())
}

/// One CSV cell. A cell a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, a tab or a
/// carriage return first: codes and names come from the HIS and from decisions) is prefixed
/// with `'` so that it stays text; commas, quotes and newlines are quoted.
fn csv_cell(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::csv_cell;

    #[test]
    fn csv_cells_never_run_as_formulas() {
        assert_eq!(csv_cell("0301"), "0301");
        assert_eq!(
            csv_cell("=HYPERLINK(\"http://x\")"),
            "\"'=HYPERLINK(\"\"http://x\"\")\""
        );
        assert_eq!(csv_cell("=cmd|' /C calc'!A0"), "'=cmd|' /C calc'!A0");
        assert_eq!(csv_cell("+1"), "'+1");
        assert_eq!(csv_cell("-1"), "'-1");
        assert_eq!(csv_cell("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
    }
}
