//! 互认 statistics: a generated month of prompts and decisions, its expected figures computed
//! here independently, against `hmr.recognition_stats` and `hmr.recognition_totals`; and the
//! list calls (调阅) kept in `hmr.list_log`.

use std::collections::BTreeMap;

use anyhow::Result;
use hmr_e2e::*;
use serde_json::json;

/// A small deterministic generator (no dependency, same figures on every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[derive(Default, Debug, PartialEq)]
struct Figures {
    prompts: i64,
    recognised: i64,
    declined: i64,
    reasons: [i64; 6],
}

#[tokio::test(flavor = "multi_thread")]
async fn a_generated_month_gives_the_figures_computed_independently() -> Result<()> {
    let cluster = Cluster::start_empty().await?;
    let his = cluster.connect("his").await?;
    his.batch_execute("INSERT INTO hmr.item_prices VALUES ('JY0001', 25.50), ('JC0001', 180.00)")
        .await?;
    let items = ["JY0001", "JY0004", "JC0001"];
    let doctors = [("D001", "0301"), ("D002", "0502"), ("D003", "0301")];
    let mut rng = Lcg(20261130);
    let mut expected: BTreeMap<(String, String, String, String), Figures> = BTreeMap::new();
    let mut sql = String::new();
    for n in 0..400u64 {
        // November 2026 in Beijing time; every 50th check at 2026-11-30 20:xx UTC, which is
        // already December there.
        let (month, at) = if n % 50 == 49 {
            ("2026-12-01", format!("2026-11-30 20:{:02}:00+00", n % 60))
        } else {
            (
                "2026-11-01",
                format!("2026-11-{:02} 09:{:02}:00+08", 1 + n % 29, n % 60),
            )
        };
        let (doctor, dept) = doctors[rng.next(3) as usize];
        let check = format!("c{n}");
        let orders = 1 + rng.next(2);
        let refused = rng.next(20) == 0;
        let mut matches = Vec::new();
        for o in 0..orders {
            let item = items[rng.next(3) as usize];
            matches.push(
                json!({"order_id": format!("{check}-o{o}"), "data_code": item, "item_code": item,
                                "reports": [{"report_id": format!("R{n}-{o}")}]}),
            );
        }
        sql.push_str(&format!(
            "INSERT INTO hmr.checks (check_id, status, doctor_no, dept_code, orders, matches, checked_at, refused_at)
             VALUES ('{check}', 'ok', '{doctor}', '{dept}', '[]', '{m}', '{at}', {refused});\n",
            m = serde_json::Value::Array(matches.clone()),
            refused = if refused { "now()" } else { "NULL" }
        ));
        // A prompt for the orders the doctor had not decided when saving (most checks).
        if rng.next(4) != 0 {
            sql.push_str(&format!(
                "INSERT INTO hmr.prompts (check_id, prompted_at, undecided, prompted_by)
                 VALUES ('{check}', '{at}', '{m}', 'his');\n",
                m = serde_json::Value::Array(matches.clone())
            ));
            for m in &matches {
                let key = (
                    month.to_string(),
                    dept.to_string(),
                    doctor.to_string(),
                    m["data_code"].as_str().unwrap().to_string(),
                );
                expected.entry(key).or_default().prompts += 1;
            }
        }
        for m in &matches {
            let order = m["order_id"].as_str().unwrap();
            let item = m["data_code"].as_str().unwrap();
            // 0: none, 1: 互认, 2..=7: 不互认 with reason 01..06; sometimes a first decision
            // the doctor changed (the newest counts).
            let choice = rng.next(8);
            if choice == 0 {
                continue;
            }
            if rng.next(5) == 0 {
                sql.push_str(&format!(
                    "INSERT INTO hmr.decisions (check_id, order_id, report_id, recognise, reason_code, doctor_no, dept_code, decided_at)
                     VALUES ('{check}', '{order}', 'x', {}, {}, '{doctor}', '{dept}', '{at}'::timestamptz - interval '1 second');\n",
                    choice != 1,
                    if choice == 1 { "'01'" } else { "NULL" }
                ));
            }
            let reason = if choice == 1 {
                "NULL".to_string()
            } else {
                format!("'0{}'", choice - 1)
            };
            sql.push_str(&format!(
                "INSERT INTO hmr.decisions (check_id, order_id, report_id, recognise, reason_code, doctor_no, dept_code, decided_at)
                 VALUES ('{check}', '{order}', 'x', {}, {reason}, '{doctor}', '{dept}', '{at}');\n",
                choice == 1
            ));
            if refused {
                continue;
            }
            let f = expected
                .entry((
                    month.to_string(),
                    dept.to_string(),
                    doctor.to_string(),
                    item.to_string(),
                ))
                .or_default();
            if choice == 1 {
                f.recognised += 1;
            } else {
                f.declined += 1;
                f.reasons[(choice - 2) as usize] += 1;
            }
        }
    }
    his.batch_execute(&format!("BEGIN; {sql} COMMIT;")).await?;

    let rows = his
        .query(
            "SELECT month::text, dept_code, doctor_no, data_code, prompts, recognised, declined,
                    declined_01, declined_02, declined_03, declined_04, declined_05, declined_06,
                    recognition_rate::float8, repeats_avoided, saved::float8, item_name
               FROM hmr.recognition_stats",
            &[],
        )
        .await?;
    let mut got: BTreeMap<(String, String, String, String), Figures> = BTreeMap::new();
    for r in &rows {
        let key: (String, String, String, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
        let f = Figures {
            prompts: r.get(4),
            recognised: r.get(5),
            declined: r.get(6),
            reasons: [r.get(7), r.get(8), r.get(9), r.get(10), r.get(11), r.get(12)],
        };
        let rate: Option<f64> = r.get(13);
        let decided = f.recognised + f.declined;
        match rate {
            Some(rate) => assert!((rate - f.recognised as f64 / decided as f64).abs() < 1e-4, "{key:?}"),
            None => assert_eq!(decided, 0, "{key:?}"),
        }
        assert_eq!(r.get::<_, i64>(14), f.recognised, "repeats avoided = recognised");
        let saved: Option<f64> = r.get(15);
        let price = match key.3.as_str() {
            "JY0001" => Some(25.5),
            "JC0001" => Some(180.0),
            _ => None,
        };
        assert_eq!(saved, price.map(|p| p * f.recognised as f64), "{key:?}");
        assert!(r.get::<_, Option<String>>(16).is_some(), "the item's catalog name");
        got.insert(key, f);
    }
    assert_eq!(got, expected);
    assert!(
        expected.keys().any(|k| k.0 == "2026-12-01"),
        "the Beijing month boundary is exercised"
    );

    // Totals per month agree with the details.
    let totals = his
        .query(
            "SELECT month::text, prompts::bigint, recognised::bigint, declined::bigint FROM hmr.recognition_totals ORDER BY month",
            &[],
        )
        .await?;
    for t in &totals {
        let month: String = t.get(0);
        let sum = |f: fn(&Figures) -> i64| {
            expected
                .iter()
                .filter(|(k, _)| k.0 == month)
                .map(|(_, v)| f(v))
                .sum::<i64>()
        };
        assert_eq!(
            (t.get::<_, i64>(1), t.get::<_, i64>(2), t.get::<_, i64>(3)),
            (sum(|f| f.prompts), sum(|f| f.recognised), sum(|f| f.declined)),
            "{month}"
        );
    }
    println!(
        "{} rows of statistics, {} months; e.g. {:?}",
        got.len(),
        totals.len(),
        got.iter().next()
    );
    Ok(())
}

/// Every badge/list call is kept (调阅): who, for whom (masked), what it showed, cached
/// or not; the month's list calls appear in the totals.
#[tokio::test(flavor = "multi_thread")]
async fn list_calls_are_kept_for_the_statistics() -> Result<()> {
    const P0001_ID: &str = "441302198003151233";
    let cluster = Cluster::start().await?;
    let his = cluster.connect("his").await?;
    load_sample_data(&his).await?;
    let sim = platform_with(&his, &[(P0001_ID, "1980-03-15", "W-CBC-1", "JY0001", 1)]).await?;
    for _ in 0..2 {
        his.query_one(
            &format!("SELECT hmr_list_recognitions('01', '{P0001_ID}', 'MZ001', 'D001', '0301', workstation => '门诊医生站')"),
            &[],
        )
        .await?;
    }
    // A read-only screen still works; its call is not kept.
    his.batch_execute(&format!(
        "BEGIN READ ONLY; SELECT hmr_list_recognitions('01', '{P0001_ID}', 'MZ001', 'D001', '0301', use_cache => false); COMMIT;"
    ))
    .await?;
    let rows = his
        .query(
            "SELECT doctor_no, dept_code, visit_no, id_no_masked, shown, status, cached, workstation
               FROM hmr.list_log ORDER BY id",
            &[],
        )
        .await?;
    assert_eq!(rows.len(), 2);
    for (r, cached) in rows.iter().zip([false, true]) {
        assert_eq!(
            (r.get::<_, &str>(0), r.get::<_, &str>(1), r.get::<_, &str>(2)),
            ("D001", "0301", "MZ001")
        );
        let masked: &str = r.get(3);
        assert!(!masked.contains("198003151"), "masked: {masked}");
        assert_eq!((r.get::<_, Option<i32>>(4), r.get::<_, &str>(5)), (Some(1), "ok"));
        assert_eq!(r.get::<_, bool>(6), cached);
        assert_eq!(r.get::<_, Option<&str>>(7), Some("门诊医生站"));
    }
    assert_eq!(
        count(
            &his,
            "SELECT list_calls_with_results::bigint FROM hmr.recognition_totals"
        )
        .await?,
        2
    );

    // The same totals as Prometheus counters from the worker's /metrics.
    his.batch_execute(
        "INSERT INTO hmr.checks (check_id, status, doctor_no, dept_code, orders, matches)
         VALUES ('m1', 'ok', 'D001', '0301', '[]', '[{\"order_id\": \"o1\", \"data_code\": \"JY0001\"}, {\"order_id\": \"o2\", \"data_code\": \"JY0004\"}]');
         INSERT INTO hmr.prompts (check_id, prompted_at, undecided, prompted_by)
         VALUES ('m1', now(), (SELECT matches FROM hmr.checks WHERE check_id = 'm1'), 'his');
         INSERT INTO hmr.decisions (check_id, order_id, report_id, recognise, reason_code, doctor_no, dept_code)
         VALUES ('m1', 'o1', 'x', true, NULL, 'D001', '0301'), ('m1', 'o2', 'x', false, '04', 'D001', '0301');",
    )
    .await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let _worker = Worker::start(
        &cluster,
        &sim,
        &WorkerOptions {
            metrics_listen: Some(format!("127.0.0.1:{port}")),
            ..Default::default()
        },
    )?;
    let url = format!("http://127.0.0.1:{port}/metrics");
    let expected = [
        "hmr_prompts_total 2",
        "hmr_list_calls_total 2",
        "hmr_decisions_total{outcome=\"recognised\"} 1",
        "hmr_decisions_total{outcome=\"declined\",reason=\"04\"} 1",
        "# TYPE hmr_decisions_total counter",
        "hmr_uploads_on_time_total",
    ];
    wait_until(
        std::time::Duration::from_secs(30),
        "the statistics' counters",
        || async {
            let text = match reqwest::get(&url).await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => return Ok(false),
            };
            Ok(expected.iter().all(|e| text.contains(e)))
        },
    )
    .await?;
    // The Grafana dashboard shipped with the worker uses only metrics the worker exports.
    let text = reqwest::get(&url).await?.text().await?;
    let dashboard = std::fs::read_to_string(repo_root().join("worker/deploy/grafana-dashboard.json"))?;
    let mut names: Vec<&str> = dashboard
        .match_indices("hmr_")
        .map(|(i, _)| {
            let rest = &dashboard[i..];
            &rest[..rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len())]
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 10, "{names:?}");
    for name in names {
        assert!(
            text.contains(name),
            "the dashboard uses {name}, which /metrics does not export"
        );
    }
    Ok(())
}

/// Per month and kind: uploaded, not uploaded, on time (24 h), revokes, within 1 min / 10 min
/// / 1 h / 24 h / 72 h, on time (2 h).
type Uploads = (i64, i64, i64, i64, [i64; 5], i64);

/// Upload statistics (上传率, 及时率, revokes, the time to the platform) from a generated
/// history, against figures computed here; they survive the history's purge (rolled up by day
/// first).
#[tokio::test(flavor = "multi_thread")]
async fn upload_statistics_survive_the_history_purge() -> Result<()> {
    let cluster = Cluster::start_empty().await?;
    let his = cluster.connect("his").await?;
    let delays = [30i64, 300, 1800, 3 * 3600, 30 * 3600, 100 * 3600]; // seconds
    let mut rng = Lcg(7);
    let mut expected: BTreeMap<(String, String), Uploads> = BTreeMap::new();
    let mut sql = String::from("BEGIN;");
    for n in 0..600i64 {
        let kind = if n % 3 == 0 { "exam_report" } else { "lab_report" };
        let (month, created) = if n % 40 == 39 {
            (
                "2026-12-01",
                format!("2026-11-30 18:00:00+00 + interval '{} seconds'", n),
            )
        } else {
            (
                "2026-11-01",
                format!("2026-11-{:02} 10:00:00+08 + interval '{} seconds'", 1 + n % 28, n),
            )
        };
        let delay = delays[rng.next(6) as usize];
        let outcome = [
            "delivered",
            "delivered",
            "delivered",
            "discarded",
            "unchanged",
            "skipped",
        ][rng.next(6) as usize];
        let revoke = outcome == "delivered" && rng.next(5) == 0;
        sql.push_str(&format!(
            "INSERT INTO hmr.outbox_history (id, kind, key, op, xid, created_at, finished_at, outcome, version, attempts, detail)
             VALUES ({id}, '{kind}', 'R{n}', 'U', pg_current_xact_id(), timestamptz '{c0}' {c1},
                     timestamptz '{c0}' {c1} + interval '{delay} seconds', '{outcome}', 1, 1, {detail});",
            id = 1_000_000 + n,
            c0 = created.split(" + ").next().unwrap(),
            c1 = created.split_once(" + ").map(|(_, r)| format!("+ {r}")).unwrap_or_default(),
            detail = if revoke { "'revoke'" } else { "NULL" }
        ));
        let e = expected.entry((month.to_string(), kind.to_string())).or_default();
        match outcome {
            "delivered" => {
                e.0 += 1;
                if delay <= 24 * 3600 {
                    e.2 += 1;
                }
                if revoke {
                    e.3 += 1;
                }
                for (i, limit) in [60, 600, 3600, 24 * 3600, 72 * 3600].into_iter().enumerate() {
                    if delay <= limit {
                        e.4[i] += 1;
                    }
                }
                if delay <= 2 * 3600 {
                    e.5 += 1;
                }
            }
            "discarded" => e.1 += 1,
            _ => {}
        }
    }
    // Still waiting (pending or quarantined): not uploaded.
    for n in 0..7i64 {
        sql.push_str(&format!(
            "INSERT INTO hmr.outbox (kind, key, op, created_at) VALUES ('lab_report', 'W{n}', 'U', '2026-11-20 10:00:00+08');"
        ));
        expected
            .entry(("2026-11-01".into(), "lab_report".into()))
            .or_default()
            .1 += 1;
    }
    sql.push_str("COMMIT;");
    his.batch_execute(&sql).await?;

    let read = |limit: &'static str| {
        let his = &his;
        async move {
            let rows = his
                .query(
                    &format!(
                        "SELECT month::text, kind, uploaded, not_uploaded, uploaded_on_time, revokes, within_1min,
                                within_10min, within_1h, within_24h, within_72h, upload_rate::float8, on_time_rate::float8
                           FROM hmr.upload_stats('{limit}')"
                    ),
                    &[],
                )
                .await?;
            let mut got = BTreeMap::new();
            for r in rows {
                let (up, not, on): (i64, i64, i64) = (r.get(2), r.get(3), r.get(4));
                let rate: f64 = r.get(11);
                assert!((rate - up as f64 / (up + not) as f64).abs() < 1e-4);
                let on_rate: f64 = r.get(12);
                assert!((on_rate - on as f64 / up as f64).abs() < 1e-4);
                got.insert(
                    (r.get::<_, String>(0), r.get::<_, String>(1)),
                    (
                        up,
                        not,
                        on,
                        r.get::<_, i64>(5),
                        [r.get(6), r.get(7), r.get(8), r.get(9), r.get(10)],
                    ),
                );
            }
            anyhow::Ok(got)
        }
    };
    let want = |e: &Uploads, on: i64| (e.0, e.1, on, e.3, e.4);
    let expected_24h: BTreeMap<_, _> = expected.iter().map(|(k, e)| (k.clone(), want(e, e.2))).collect();
    let expected_2h: BTreeMap<_, _> = expected.iter().map(|(k, e)| (k.clone(), want(e, e.5))).collect();
    assert_eq!(read("24 hours").await?, expected_24h);
    assert_eq!(
        read("2 hours").await?,
        expected_2h,
        "an exact limit on the live history"
    );

    // The history is purged; the figures stay (24 h is one of the kept boundaries).
    let removed: i64 = his
        .query_one("SELECT hmr.purge_history('0 seconds')", &[])
        .await?
        .get(0);
    assert_eq!(removed, 600);
    assert_eq!(count(&his, "SELECT count(*) FROM hmr.outbox_history").await?, 0);
    assert_eq!(read("24 hours").await?, expected_24h, "after the purge");
    println!("upload statistics: {expected_24h:?}");
    Ok(())
}

/// `hmr-worker report`: the month's figures as one HTML page with SVG charts and as CSV; the
/// page rendered by headless Chromium (a real browser) shows the charts' bars.
#[tokio::test(flavor = "multi_thread")]
async fn the_monthly_report_renders_with_its_charts() -> Result<()> {
    let cluster = Cluster::start_empty().await?;
    let his = cluster.connect("his").await?;
    let mut sql = String::from("BEGIN;");
    for (n, (dept, doctor)) in [("0301", "D001"), ("0502", "D002"), ("0301", "D003")]
        .iter()
        .cycle()
        .take(30)
        .enumerate()
    {
        let at = format!("2026-11-{:02} 09:00:00+08", 1 + n % 28);
        sql.push_str(&format!(
            "INSERT INTO hmr.checks (check_id, status, doctor_no, dept_code, orders, matches, checked_at)
             VALUES ('r{n}', 'ok', '{doctor}', '{dept}', '[]', '[{{\"order_id\": \"o{n}\", \"data_code\": \"JY0001\"}}]', '{at}');
             INSERT INTO hmr.prompts (check_id, prompted_at, undecided, prompted_by)
             VALUES ('r{n}', '{at}', '[{{\"order_id\": \"o{n}\", \"data_code\": \"JY0001\"}}]', 'his');
             INSERT INTO hmr.decisions (check_id, order_id, report_id, recognise, reason_code, doctor_no, dept_code, decided_at)
             VALUES ('r{n}', 'o{n}', 'x', {rec}, {reason}, '{doctor}', '{dept}', '{at}');
             INSERT INTO hmr.outbox_history (id, kind, key, op, xid, created_at, finished_at, outcome, version, attempts)
             VALUES ({id}, 'lab_report', 'L{n}', 'U', pg_current_xact_id(), '{at}', timestamptz '{at}' + interval '{secs} seconds',
                     'delivered', 1, 1);",
            rec = n % 3 != 0,
            reason = if n % 3 == 0 { format!("'0{}'", 1 + n % 6) } else { "NULL".into() },
            id = 5_000_000 + n,
            secs = [20, 400, 5000, 90_000][n % 4],
        ));
    }
    // The HIS's names for departments and doctors (the source views), and a department code
    // written as a spreadsheet formula through a decision: in the CSV it must stay text.
    sql.push_str(
        "CREATE SCHEMA IF NOT EXISTS hmr_src;
         DROP VIEW IF EXISTS hmr_src.department CASCADE; DROP VIEW IF EXISTS hmr_src.staff CASCADE;
         CREATE VIEW hmr_src.department AS SELECT * FROM (VALUES ('0301', '内科'), ('0502', '外科')) v(dept_code, dept_name);
         CREATE VIEW hmr_src.staff AS SELECT * FROM (VALUES ('D001', '张伟'), ('D002', '李娜')) v(staff_no, name);
         INSERT INTO hmr.checks (check_id, status, doctor_no, dept_code, orders, matches, checked_at)
         VALUES ('rx', 'ok', 'D003', '=cmd|'' /C calc''!A0', '[]', '[{\"order_id\": \"ox\", \"data_code\": \"JY0001\"}]',
                 '2026-11-15 09:00:00+08');
         INSERT INTO hmr.decisions (check_id, order_id, report_id, recognise, doctor_no, dept_code, decided_at)
         VALUES ('rx', 'ox', 'x', true, 'D003', '=cmd|'' /C calc''!A0', '2026-11-15 09:00:00+08');",
    );
    sql.push_str("INSERT INTO hmr.item_prices VALUES ('JY0001', 25.50); COMMIT;");
    his.batch_execute(&sql).await?;

    let sim = Sim::start()?;
    let worker = Worker::start(&cluster, &sim, &WorkerOptions::default())?;
    let dir = std::env::temp_dir().join(format!("hmr-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let html_path = dir.join("report.html");
    let out = std::process::Command::new(bin_dir().join("hmr-worker"))
        .arg("--config")
        .arg(&worker.config_path)
        .args(["report", "--month", "2026-11", "--out"])
        .arg(&html_path)
        .arg("--csv")
        .arg(dir.join("csv"))
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let html = std::fs::read_to_string(&html_path)?;
    for needle in [
        "检查检验结果互认月报",
        "<figure id=\"chart-departments\"><svg",
        "<figure id=\"chart-reasons\"><svg",
        "<figure id=\"chart-uploads\"><svg",
        "各科室提醒、互认与不互认",
        "不互认原因分布",
        "<td>互认</td><td>21</td>",
        "<td>不互认</td><td>10</td>",
        "<td>互认率</td><td>67.7%</td>",
        "<td>节省费用 (元)</td><td>535.50</td>",
        // Departments and doctors by name (with the code), a table per doctor.
        "<td>内科（0301）</td>",
        "<td>外科（0502）</td>",
        "<table id=\"doctors\">",
        "<td>张伟（D001）</td>",
        "<td>D003</td>",
    ] {
        assert!(html.contains(needle), "{needle} missing from the report");
    }
    for english in ["list calls", "prompts"] {
        assert!(!html.contains(english), "an English label in the report: {english}");
    }
    assert!(html.matches("<rect").count() > 10, "the charts have bars");
    let uploads = std::fs::read_to_string(dir.join("csv/uploads-2026-11.csv"))?;
    assert!(uploads.contains("lab_report,30,0,1,"), "{uploads}");
    let depts = std::fs::read_to_string(dir.join("csv/departments-2026-11.csv"))?;
    assert!(depts.contains("0301,20,") && depts.contains("0502,10,"), "{depts}");
    assert!(depts.contains(",内科\n"), "{depts}");
    // The formula stays text: quoted, and prefixed with ' so no spreadsheet runs it.
    assert!(depts.contains("\n'=cmd|' /C calc'!A0,0,1,0,"), "{depts}");
    assert!(!depts.lines().any(|l| l.starts_with('=')), "{depts}");
    let doctors = std::fs::read_to_string(dir.join("csv/doctors-2026-11.csv"))?;
    assert!(doctors.contains(",张伟\n") && doctors.contains("D003,"), "{doctors}");

    // A real browser renders it: the bars' colours are on the screenshot.
    let png_path = dir.join("report.png");
    let status = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=900,2200",
        ])
        .arg(format!("--screenshot={}", png_path.display()))
        .arg(format!("file://{}", html_path.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    assert!(status.success(), "chromium (Debian package chromium) renders the page");
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png_path)?));
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf)?;
    let channels = info.color_type.samples();
    let near = |p: &[u8], c: (u8, u8, u8)| {
        (p[0] as i32 - c.0 as i32).abs() < 12
            && (p[1] as i32 - c.1 as i32).abs() < 12
            && (p[2] as i32 - c.2 as i32).abs() < 12
    };
    let pixels: Vec<&[u8]> = buf[..info.buffer_size()].chunks(channels).collect();
    let green = pixels.iter().filter(|p| near(p, (46, 139, 87))).count();
    let red = pixels.iter().filter(|p| near(p, (205, 92, 92))).count();
    let blue = pixels.iter().filter(|p| near(p, (70, 130, 180))).count();
    assert!(
        green > 500 && red > 500 && blue > 500,
        "bars on the page: green {green}, red {red}, blue {blue} pixels ({})",
        png_path.display()
    );
    println!("report: {} ({green}/{red}/{blue} bar pixels)", png_path.display());
    Ok(())
}
