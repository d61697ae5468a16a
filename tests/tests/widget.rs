//! The reference widget (`hmr-worker serve`, `/widget/`) in a real browser: headless Chromium
//! driven through chromedriver (W3C WebDriver, the fantoccini crate), as a workstation embeds
//! it: a terminal opens a session for the patient, the widget shows the badge, the list, and at
//! sign the forced 互认/不互认 dialog; the decisions it records let the HIS save pass its gate.
//! Everything the doctor does here is done with the keyboard.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use hmr_e2e::*;
use serde_json::{json, Value};

const P0001_ID: &str = "441302198003151233";

/// chromedriver on a free loopback port, stopped with the test.
struct ChromeDriver {
    child: Child,
    url: String,
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn chromedriver() -> Result<ChromeDriver> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("chromedriver (Debian package chromium-driver)")?;
    let driver = ChromeDriver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    wait_until(Duration::from_secs(20), "chromedriver", || async {
        Ok(reqwest::get(format!("{}/status", driver.url)).await.is_ok())
    })
    .await?;
    Ok(driver)
}

async fn browser(driver: &ChromeDriver) -> Result<Client> {
    let binary = ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .context("chromium")?;
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": binary,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,800", "--lang=zh-CN"]
        }
    });
    let Value::Object(caps) = caps else { unreachable!() };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let client = ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&driver.url)
        .await?;
    client.set_window_size(1280, 800).await?;
    Ok(client)
}

/// Waits until `script` (an expression) evaluates to `want` in the page.
async fn wait_for(c: &Client, script: &str, want: Value) -> Result<()> {
    let started = std::time::Instant::now();
    loop {
        let got = c.execute(&format!("return {script};"), vec![]).await?;
        if got == want {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(20),
            "{script} is {got}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pixels of about `rgb` on a PNG screenshot.
fn pixels_of(png_bytes: &[u8], rgb: [u8; 3]) -> Result<usize> {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf)?;
    let channels = info.color_type.samples();
    Ok(buf[..info.buffer_size()]
        .chunks(channels)
        .filter(|p| p.len() >= 3 && (0..3).all(|i| p[i].abs_diff(rgb[i]) <= 6))
        .count())
}

fn lines(orders: &[&str]) -> String {
    json!(orders
        .iter()
        .map(
            |o| json!({"order_id": o, "patient_id": "P0001", "visit_type": "1", "visit_no": "MZ001",
                        "doctor_no": "D001", "dept_code": "0301", "item_type": "lab", "item_code": "JY0001"})
        )
        .collect::<Vec<_>>())
    .to_string()
}

async fn save(his: &tokio_postgres::Client, orders: &[&str]) -> Result<Value> {
    Ok(his
        .query_one("SELECT his.save_orders($1::text::jsonb)", &[&lines(orders)])
        .await?
        .get(0))
}

/// The widget of a session, loaded in headless Chromium, and what it runs against. (Fields
/// drop in this order: the browser first, the database last.)
struct Opened {
    c: Client,
    _driver: ChromeDriver,
    s: Serve,
    w: Workstations,
    terminal: Terminal,
}

/// Our hospital with the other hospital's 血常规 for 陈志明, `hmr-worker serve` with one
/// terminal (门诊医生站), and in Chromium the widget of a session that terminal opened for the
/// patient: the session token read, the badge green.
async fn opened_widget() -> Result<Opened> {
    opened_widget_with(WorkerOptions::default()).await
}

async fn opened_widget_with(options: WorkerOptions) -> Result<Opened> {
    let terminal = Terminal::new("clinic-ws", "https://hmr.hospital.example/cds-services");
    let w = Workstations::start(
        &[(P0001_ID, "1980-03-15", "W-CBC-1", "JY0001", 1)],
        &WorkerOptions {
            extra_config: Some(terminal.config("门诊医生站", "")),
            ..options
        },
    )
    .await?;
    let s = serve(&w, None).await?;
    let driver = chromedriver().await?;
    let c = browser(&driver).await?;

    // The workstation (server side, with its key) opens a session for the patient in front
    // of the doctor and embeds the widget's address.
    let opened: Value = s
        .http
        .post(format!("{}/api/sessions", s.base))
        .bearer_auth(terminal.token())
        .json(&json!({"patient_id": "P0001", "visit_no": "MZ001", "doctor_no": "D001"}))
        .send()
        .await?
        .json()
        .await?;
    let widget = opened["widget"].as_str().context("widget address")?;
    c.goto(&format!("{}{widget}", s.base)).await?;
    // The session token leaves the address bar once read.
    wait_for(&c, "window.location.hash", json!("")).await?;

    // The badge: green with the count.
    wait_for(&c, "document.body.dataset.hmrBadge", json!("ok")).await?;
    Ok(Opened {
        c,
        _driver: driver,
        s,
        w,
        terminal,
    })
}

/// The list, opened from the keyboard (Enter on the badge): its items.
async fn open_the_list(c: &Client) -> Result<Vec<fantoccini::elements::Element>> {
    let badge = c.find(Locator::Id("hmr-badge")).await?;
    badge.send_keys(&char::from(Key::Enter).to_string()).await?;
    wait_for(c, "document.getElementById('hmr-list').hidden", json!(false)).await?;
    Ok(c.find_all(Locator::Css("#hmr-list li.item")).await?)
}

/// Nothing about the patient in the service's log (with its warnings on).
fn assert_the_log_names_no_patient(s: &Serve) -> Result<()> {
    let log = std::fs::read_to_string(&s.log)?;
    assert!(log.contains("serving"), "the log is the service's: {log}");
    for secret in [P0001_ID, "陈志明", "P0001", "术前复查"] {
        assert!(!log.contains(secret), "{secret} in the log: {log}");
    }
    Ok(())
}

/// The badge, green with the count, and the list it opens.
#[tokio::test(flavor = "multi_thread")]
async fn the_badge_is_green_and_opens_the_list_from_the_keyboard() -> Result<()> {
    let Opened { c, s, w, .. } = &opened_widget().await?;
    let shots = unique_dir("widget-shots");

    let badge = c.find(Locator::Id("hmr-badge")).await?;
    assert_eq!(badge.text().await?, "可互认 1 项");
    assert!(badge.attr("class").await?.unwrap_or_default().contains("ok"));
    // The list, opened from the keyboard.
    let items = open_the_list(c).await?;
    assert_eq!(items.len(), 1);
    assert!(items[0].text().await?.contains("血常规"), "{}", items[0].text().await?);
    let shot = c.screenshot().await?;
    std::fs::write(shots.join("widget-list.png"), &shot)?;
    assert!(
        pixels_of(&shot, [0x1f, 0x8a, 0x4c])? > 300,
        "the green badge is on the screen"
    );
    // The call is kept for the statistics with the terminal's name.
    assert_eq!(
        count(
            &w.his,
            "SELECT count(*) FROM hmr.list_log WHERE workstation = '门诊医生站'"
        )
        .await?,
        1
    );
    assert_the_log_names_no_patient(s)?;
    println!("screenshots: {}", shots.display());
    c.clone().close().await?;
    Ok(())
}

/// At sign the forced 互认/不互认 dialog, which cannot be dismissed; the decisions it records
/// let the HIS save pass its gate.
#[tokio::test(flavor = "multi_thread")]
async fn the_forced_dialog_records_the_decisions_and_the_save_passes_the_gate() -> Result<()> {
    let Opened { c, s, w, .. } = &opened_widget().await?;
    let shots = unique_dir("widget-shots");

    // Saving the two duplicate orders before any decision: the gate refuses.
    let refused = save(&w.his, &["WO-1", "WO-2"]).await?;
    assert_eq!(refused["saved"], false, "{refused}");

    // Sign: the workstation hands the orders to the widget; the forced dialog opens.
    c.execute(
        "window.__signed = null;
         window.hmrWidget.sign(arguments[0]).then(r => { window.__signed = r; },
                                                   e => { window.__signed = {error: String(e)}; });
         return true;",
        vec![json!([{"order_id": "WO-1", "item_code": "JY0001", "type": "lab"},
                    {"order_id": "WO-2", "item_code": "JY0001", "type": "lab"}])],
    )
    .await?;
    wait_for(c, "document.body.dataset.hmrState", json!("deciding")).await?;
    wait_for(c, "document.getElementById('hmr-dialog').open", json!(true)).await?;
    assert_eq!(c.find_all(Locator::Css("fieldset.match")).await?.len(), 2);
    // The results before the choice: each order links to the check's platform page.
    let view = c.find(Locator::Css("fieldset.match .view-results a")).await?;
    assert_eq!(view.text().await?, "查看报告结果（互认平台）");
    assert!(view.attr("href").await?.unwrap_or_default().contains("/page/"));
    // It cannot be dismissed: Escape leaves it open; confirming needs every choice.
    // Escapes that reached the page (after the widget's handlers), and close events (counted
    // before the widget's own handler would open the dialog again), for the message.
    c.execute(
        "window.__escapes = 0; window.__closes = 0;
         document.addEventListener('keydown', e => { if (e.key === 'Escape') window.__escapes += 1; });
         window.addEventListener('close', () => { window.__closes += 1; }, true);
         return true;",
        vec![],
    )
    .await?;
    let escape = char::from(Key::Escape).to_string();
    c.active_element().await?.send_keys(&escape).await?;
    // The page handled the Escape, and a task queued after it ran (a close event it queued).
    wait_for(c, "window.__escapes", json!(1)).await?;
    c.execute_async("setTimeout(arguments[0], 0);", vec![]).await?;
    // Then a bounded wait for the dialog to close, which must not come.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(1) {
        let state = c
            .execute(
                "return {open: document.getElementById('hmr-dialog').open, closes: window.__closes};",
                vec![],
            )
            .await?;
        assert_eq!(state["open"], true, "Escape closed the dialog: {state}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let confirm = c.find(Locator::Id("hmr-confirm")).await?;
    assert!(confirm.attr("disabled").await?.is_some());

    // WO-1: 互认 — the first choice, focused when the dialog opened, taken with Space.
    let focused = c.active_element().await?;
    assert_eq!(focused.attr("value").await?.as_deref(), Some("recognise"));
    focused.send_keys(" ").await?;
    // WO-2: 不互认, reason 06 with its text.
    let wo2 = "fieldset.match[data-order-id='WO-2']";
    c.find(Locator::Css(&format!("{wo2} input[value='decline']")))
        .await?
        .send_keys(" ")
        .await?;
    let reason = c.find(Locator::Css(&format!("{wo2} select.reason"))).await?;
    assert!(reason.is_displayed().await?);
    reason.select_by_value("06").await?;
    assert!(confirm.attr("disabled").await?.is_some(), "06 needs its text");
    c.find(Locator::Css(&format!("{wo2} input.reason-text")))
        .await?
        .send_keys("术前复查凝血相关指标")
        .await?;
    wait_for(c, "document.getElementById('hmr-confirm').disabled", json!(false)).await?;
    let shot = c.screenshot().await?;
    std::fs::write(shots.join("widget-dialog.png"), &shot)?;
    confirm.send_keys(&char::from(Key::Enter).to_string()).await?;
    wait_for(c, "document.body.dataset.hmrState", json!("decided")).await?;
    wait_for(c, "document.getElementById('hmr-dialog').open", json!(false)).await?;
    let signed = c.execute("return window.__signed;", vec![]).await?;
    assert_eq!(signed["decisions"].as_array().map(Vec::len), Some(2), "{signed}");
    assert_eq!(signed["decisions"][1]["complete"], true, "{signed}");

    // Recorded as the SQL path records them, with the doctor and the terminal.
    let rows = w
        .his
        .query(
            "SELECT order_id, recognise, reason_code, reason_text, doctor_no, workstation
               FROM hmr.decisions WHERE order_id IN ('WO-1', 'WO-2') ORDER BY order_id",
            &[],
        )
        .await?;
    type Decision = (String, bool, Option<String>, Option<String>, String, Option<String>);
    let got: Vec<Decision> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    let ws = Some("门诊医生站".to_string());
    assert_eq!(
        got,
        [
            ("WO-1".into(), true, None, None, "D001".into(), ws.clone()),
            (
                "WO-2".into(),
                false,
                Some("06".into()),
                Some("术前复查凝血相关指标".into()),
                "D001".into(),
                ws
            ),
        ]
    );
    // And now the save passes the gate.
    let saved = save(&w.his, &["WO-1", "WO-2"]).await?;
    assert_eq!(saved["saved"], true, "{saved}");
    // The list, read again after the dialog, marks the report 已互认 (WO-1 recognised it).
    wait_for(
        c,
        "(document.querySelector('#hmr-list li.item') || {dataset: {}}).dataset.decided || null",
        json!("recognised"),
    )
    .await?;
    // The reason's text went to the database, not to the service's log.
    assert_the_log_names_no_patient(s)?;
    println!("screenshots: {}", shots.display());
    c.clone().close().await?;
    Ok(())
}

/// A report recognised for the patient is downloaded from the widget's list once the worker
/// has kept it — only then: before, the row says it can be downloaded after 互认. Once its
/// hospital revokes it, the list says the recognised order is to be performed after all.
#[tokio::test(flavor = "multi_thread")]
async fn the_recognised_report_downloads_from_the_list() -> Result<()> {
    let Opened { c, s, w, terminal, .. } = &opened_widget_with(WorkerOptions {
        recheck_kept_secs: Some(1),
        ..Default::default()
    })
    .await?;
    let items = open_the_list(c).await?;
    let report_id = items
        .first()
        .context("an item")?
        .attr("data-report-id")
        .await?
        .context("report id")?;
    // Not recognised yet: no download (the platform would refuse it), a note instead.
    assert!(c.find_all(Locator::Css("#hmr-list button.download")).await?.is_empty());
    assert_eq!(
        c.find(Locator::Css("#hmr-list li.item .download-note"))
            .await?
            .text()
            .await?,
        "互认后可下载报告"
    );
    // The 互认 of the 血常规 (the dialog's, tested above), made here by the workstation
    // through the JSON API with its key.
    let check: Value = s
        .http
        .post(format!("{}/api/check", s.base))
        .bearer_auth(terminal.token())
        .json(&json!({"patient_id": "P0001", "visit_no": "MZ001", "doctor_no": "D001",
                      "orders": [{"order_id": "WO-1", "item_code": "JY0001", "type": "lab"}]}))
        .send()
        .await?
        .json()
        .await?;
    anyhow::ensure!(check["duplicate"] == true, "no duplicate to recognise: {check}");
    let decided = s
        .http
        .post(format!("{}/api/decide", s.base))
        .bearer_auth(terminal.token())
        .json(&json!({"check_id": check["check_id"], "order_id": "WO-1", "recognise": true}))
        .send()
        .await?;
    anyhow::ensure!(decided.status().is_success(), "{}", decided.text().await?);

    // The recognised report, downloaded from the list once the worker has kept it; the row
    // marked 已互认 (the list read again, as the host page does after a decision).
    wait_report_kept(&w.his, &report_id).await?;
    c.execute("window.hmrWidget.refresh(); return true;", vec![]).await?;
    wait_for(
        c,
        "(document.querySelector('#hmr-list li.item') || {dataset: {}}).dataset.decided || null",
        json!("recognised"),
    )
    .await?;
    assert_eq!(
        c.find(Locator::Css("#hmr-list li.item .mark-recognised"))
            .await?
            .text()
            .await?,
        "已互认"
    );
    let before = count(&w.his, "SELECT count(*) FROM hmr.download_log").await?;
    c.find(Locator::Css("#hmr-list button.download"))
        .await?
        .send_keys(&char::from(Key::Enter).to_string())
        .await?;
    wait_until(Duration::from_secs(20), "the download", || async {
        Ok(count(&w.his, "SELECT count(*) FROM hmr.download_log").await? > before)
    })
    .await?;
    wait_for(
        c,
        "document.getElementById('hmr-status').textContent",
        json!("报告已下载"),
    )
    .await?;

    // Its hospital revokes it: the worker's recheck notices; the list shows the order to be
    // performed after all (and the report is no longer offered).
    OtherHospital::new(&w.sim).revoke_lab("W-CBC-1").await?;
    wait_until(Duration::from_secs(20), "the revoke noticed", || async {
        Ok(count(
            &w.his,
            "SELECT count(*) FROM hmr.orders_to_perform WHERE order_id = 'WO-1'",
        )
        .await?
            == 1)
    })
    .await?;
    c.execute("window.hmrWidget.refresh(); return true;", vec![]).await?;
    wait_for(c, "document.body.dataset.hmrToPerform", json!("1")).await?;
    wait_for(c, "document.getElementById('hmr-to-perform').hidden", json!(false)).await?;
    let row = c.find(Locator::Css("#hmr-to-perform li.to-perform")).await?;
    assert_eq!(row.attr("data-order-id").await?.as_deref(), Some("WO-1"));
    assert!(row.text().await?.contains("医嘱 WO-1"), "{}", row.text().await?);
    assert_the_log_names_no_patient(s)?;
    c.clone().close().await?;
    Ok(())
}

/// At zero the badge is grey, and a sign with nothing recognisable passes straight through.
#[tokio::test(flavor = "multi_thread")]
async fn grey_at_zero_and_no_dialog_without_a_duplicate() -> Result<()> {
    let w = Workstations::start(
        &[],
        &WorkerOptions {
            extra_config: Some("[serve]\nanonymous = true\n".into()),
            ..Default::default()
        },
    )
    .await?;
    let s = serve(&w, None).await?;
    let driver = chromedriver().await?;
    let c = browser(&driver).await?;
    c.goto(&format!(
        "{}/widget/?patient_id=P0001&visit_no=MZ001&doctor_no=D001",
        s.base
    ))
    .await?;
    wait_for(&c, "document.body.dataset.hmrBadge", json!("none")).await?;
    let badge = c.find(Locator::Id("hmr-badge")).await?;
    assert_eq!(badge.text().await?, "无可互认结果");
    let shot = c.screenshot().await?;
    assert!(pixels_of(&shot, [0x9a, 0xa0, 0xa6])? > 300, "the grey badge");
    assert_eq!(pixels_of(&shot, [0x1f, 0x8a, 0x4c])?, 0, "no green");
    // The grey badge is not clickable: a click opens no list.
    assert_eq!(badge.attr("aria-disabled").await?.as_deref(), Some("true"));
    badge.click().await?;
    let list_hidden = c
        .execute("return document.getElementById('hmr-list').hidden;", vec![])
        .await?;
    assert_eq!(list_hidden, json!(true), "a grey badge opens nothing");
    c.execute(
        "window.hmrWidget.sign(arguments[0]).then(r => { window.__signed = r; }); return true;",
        vec![json!([{"order_id": "Z-1", "item_code": "JY0001", "type": "lab"}])],
    )
    .await?;
    wait_for(&c, "document.body.dataset.hmrState", json!("clear")).await?;
    wait_for(&c, "document.getElementById('hmr-dialog').open", json!(false)).await?;
    let saved = save(&w.his, &["Z-1"]).await?;
    assert_eq!(saved["saved"], true, "{saved}");
    c.close().await?;
    Ok(())
}
