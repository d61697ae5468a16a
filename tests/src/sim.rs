//! The platform simulator as a process, the other hospital that uploads through it, and what
//! the simulator holds.

use super::*;

/// The platform simulator as a process on a loopback port.
pub struct Sim {
    child: Child,
    pub log_path: PathBuf,
    pub base: String,
    http: reqwest::Client,
}

impl Sim {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn start() -> Result<Sim> {
        Sim::start_named(OTHER_ORG_NAME)
    }

    /// The simulator with the other hospital (`OTHER_ORG_CODE`, hz2) named `other_org_name`
    /// (no commas): the platform's text a hostile or broken org puts in front of our doctors.
    pub fn start_named(other_org_name: &str) -> Result<Sim> {
        let org = |code: &str, name: &str, user: &str| {
            format!("{code},{name},{user},{user}-secret,{user}-app,{user}-app-secret")
        };
        let log_path = unique_dir("hmr-e2e-sim").join("sim.log");
        let mut child = Command::new(bin_dir().join("hmr-platform-sim"))
            .args(["--listen", "127.0.0.1:0", "--catalog"])
            .arg(repo_root().join("sql/catalog-sample.csv"))
            .args([
                "--org",
                &org(ORG_CODE, ORG_NAME, "hz1"),
                "--org",
                &org(OTHER_ORG_CODE, other_org_name, "hz2"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()
            .context("starting hmr-platform-sim (is it built?)")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let base = line.trim().rsplit(' ').next().unwrap_or_default().to_string();
        if !base.starts_with("http://") {
            bail!(
                "unexpected first line from the simulator: {line:?}; its log: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        Ok(Sim {
            child,
            log_path,
            base,
            http: reqwest::Client::new(),
        })
    }

    /// A successful answer to `GET path`.
    async fn get_ok(&self, path: &str) -> Result<reqwest::Response> {
        Ok(self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await?
            .error_for_status()?)
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        Ok(self.get_ok(path).await?.json().await?)
    }

    /// A control endpoint's raw answer (a stored PDF).
    pub async fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
        Ok(self.get_ok(path).await?.bytes().await?.to_vec())
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value> {
        let text = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn faults(&self, body: Value) -> Result<()> {
        self.post("/_sim/faults", body).await.map(|_| ())
    }

    pub async fn clear_faults(&self) -> Result<()> {
        self.http
            .delete(format!("{}/_sim/faults", self.base))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Every contract request the simulator received.
    pub async fn requests(&self) -> Result<Vec<Value>> {
        let v = self.get("/_sim/requests").await?;
        Ok(match v {
            Value::Array(a) => a,
            Value::Object(mut m) => m
                .remove("requests")
                .and_then(|r| r.as_array().cloned())
                .unwrap_or_default(),
            _ => vec![],
        })
    }

    /// Requests whose path starts with `prefix` and whose effect is `effect`.
    pub async fn requests_with(&self, prefix: &str, effect: &str) -> Result<Vec<Value>> {
        Ok(self
            .requests()
            .await?
            .into_iter()
            .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with(prefix)) && r["effect"] == effect)
            .collect())
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The second hospital, talking to the simulator directly (built with the protocol crate's
/// own request builders): it uploads the reports our doctors may recognise.
pub struct OtherHospital<'a> {
    sim: &'a Sim,
    http: reqwest::Client,
}

impl<'a> OtherHospital<'a> {
    pub fn new(sim: &'a Sim) -> Self {
        OtherHospital {
            sim,
            http: reqwest::Client::new(),
        }
    }

    async fn send(&self, req: &hmr_protocol::paths::Request) -> Result<(u16, Value)> {
        let scope = req.scope;
        let token = match scope {
            Some(scope) => {
                let t = hmr_protocol::paths::token(&hmr_protocol::TokenRequest::Password {
                    username: "hz2".into(),
                    password: "hz2-secret".into(),
                    scope,
                });
                let (_, body) = Box::pin(self.send(&t)).await?;
                Some(body["data"]["accessToken"].as_str().unwrap_or_default().to_string())
            }
            None => None,
        };
        let method = match req.method {
            hmr_protocol::paths::Method::Get => reqwest::Method::GET,
            hmr_protocol::paths::Method::Post => reqwest::Method::POST,
            hmr_protocol::paths::Method::Put => reqwest::Method::PUT,
        };
        let mut b = self
            .http
            .request(method, format!("{}{}", self.sim.base, req.path))
            .header("X-Org-Code", OTHER_ORG_CODE)
            .header("X-Request-Id", uuid::Uuid::new_v4().to_string());
        if let Some(t) = token {
            b = b.bearer_auth(t);
        }
        if let Some(ct) = &req.content_type {
            b = b.header("Content-Type", ct);
        }
        for (k, v) in &req.headers {
            b = b.header(k, v);
        }
        if req.method != hmr_protocol::paths::Method::Get {
            b = b.body(req.body.clone());
        }
        let r = b.send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// Registers a patient there (same person: same id number) and uploads a lab report of
    /// `data_code`, reported `days_ago`, with a PDF; returns the report's number.
    pub async fn lab_report(
        &self,
        id_no: &str,
        birth: &str,
        report_no: &str,
        data_code: &str,
        days_ago: i64,
    ) -> Result<()> {
        use hmr_protocol::*;
        let now = hmr_protocol::checks::china_now();
        let at = checks::format_time(&(now - chrono::Duration::days(days_ago)));
        let patient = Patient {
            patient_id: format!("X-{id_no}"),
            id_type: "01".into(),
            id_no: id_no.into(),
            name: "外院患者".into(),
            gender_code: "1".into(),
            birth_date: birth.into(),
            phone: None,
            registered_at: at.clone(),
            updated_at: at.clone(),
        };
        let (status, body) = self.send(&paths::patients(&[patient])).await?;
        anyhow::ensure!(status == 200, "patient upload: {status} {body}");
        let report = LabReport {
            report_no: report_no.into(),
            version: 1,
            patient_id: format!("X-{id_no}"),
            id_type: "01".into(),
            id_no: id_no.into(),
            name: "外院患者".into(),
            visit_type: Some("1".into()),
            visit_no: None,
            order_no: None,
            dept_code: None,
            request_doctor_no: None,
            specimen_code: None,
            specimen_name: None,
            specimen_no: None,
            sampled_at: None,
            reported_at: at,
            audited_at: None,
            auditor_no: "Z001".into(),
            category_code: None,
            category_name: None,
            data_code: Some(data_code.into()),
            items: vec![LabItem {
                item_code: "WBC".into(),
                item_name: "白细胞计数".into(),
                loinc: None,
                result_value: "5.0".into(),
                result_unit: Some("10^9/L".into()),
                reference_range: None,
                abnormal_flag: Some("1".into()),
                critical_flag: None,
                method: None,
            }],
        };
        let (status, body) = self.send(&paths::lab_report(&report)).await?;
        anyhow::ensure!(status == 200, "report upload: {status} {body}");
        let pdf = format!("%PDF-1.4 report {report_no} of {OTHER_ORG_NAME}").into_bytes();
        let (status, body) = self.send(&paths::pdf(ReportType::Lab, report_no, 1, pdf)).await?;
        anyhow::ensure!(status == 200, "pdf upload: {status} {body}");
        Ok(())
    }

    pub async fn revoke_lab(&self, report_no: &str) -> Result<()> {
        use hmr_protocol::*;
        let now = hmr_protocol::checks::china_now();
        let body = Revoke {
            version: 1,
            reason: "取消审核".into(),
            revoked_at: checks::format_time(&now),
            operator_no: "Z001".into(),
        };
        let (status, answer) = self.send(&paths::revoke(ReportType::Lab, report_no, &body)).await?;
        anyhow::ensure!(status == 200, "revoke: {status} {answer}");
        Ok(())
    }
}

/// The simulator's requests concerning one report, as `(kind of call, version)` in order.
pub async fn history_of(sim: &Sim, base: &str, report: &str) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for r in sim.requests().await? {
        let path = r["path"].as_str().unwrap_or_default();
        if r["effect"] != "applied" || !path.starts_with(base) {
            continue;
        }
        if path == base && r["body"]["reportNo"] == report {
            out.push(("data".to_string(), r["body"]["version"].as_u64().unwrap_or(0)));
        } else if path == format!("{base}/{report}/revoke") {
            out.push(("revoke".to_string(), r["body"]["version"].as_u64().unwrap_or(0)));
        } else if let Some(v) = path
            .strip_prefix(&format!("{base}/{report}/versions/"))
            .and_then(|rest| rest.strip_suffix("/pdf"))
        {
            out.push(("pdf".to_string(), v.parse().unwrap_or(0)));
        }
    }
    Ok(out)
}

/// Whether the simulator holds a master-data record (`what`: patients, departments, staff).
pub async fn held(sim: &Sim, what: &str, key: &str) -> Result<bool> {
    let state = sim.get("/_sim/state").await?;
    Ok(!state["orgs"][ORG_CODE][what][key].is_null())
}

/// A doctor's browser on one of the platform's pages (a check's or a list's `url`): the URL is
/// a one-time ticket that opens the page once; the page's cookie keeps it open in this browser
/// (reloads, the form's posts).
#[derive(Clone)]
pub struct PlatformPage {
    http: reqwest::Client,
    pub url: String,
    cookie: String,
}

impl PlatformPage {
    /// Opens the page (spends the ticket): the page and its HTML.
    pub async fn open(url: &str) -> Result<(PlatformPage, String)> {
        let http = reqwest::Client::new();
        let r = http.get(url).send().await?.error_for_status()?;
        let cookie = r
            .headers()
            .get(reqwest::header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .context("the page sets its cookie")?
            .to_string();
        let html = r.text().await?;
        Ok((
            PlatformPage {
                http,
                url: url.to_string(),
                cookie,
            },
            html,
        ))
    }

    /// The page again, in this browser.
    pub async fn reload(&self) -> Result<(u16, String)> {
        let r = self.http.get(&self.url).header("Cookie", &self.cookie).send().await?;
        Ok((r.status().as_u16(), r.text().await?))
    }

    /// Posts the page's form; follows the redirect back to the page: its status and HTML.
    pub async fn post(&self, form: &[(&str, String)]) -> Result<(u16, String)> {
        let r = self
            .http
            .post(format!("{}/decide", self.url))
            .header("Cookie", &self.cookie)
            .form(form)
            .send()
            .await?;
        Ok((r.status().as_u16(), r.text().await?))
    }

    /// Decides `order` as a doctor does in this browser: reloads the page, finds the order's
    /// fieldset, chooses 互认 with its first report (`reason` None) or 不互认 with that reason,
    /// and submits. The page shown after (its status and HTML).
    pub async fn decide(&self, order: &str, reason: Option<&str>) -> Result<(u16, String)> {
        let (status, html) = self.reload().await?;
        anyhow::ensure!(status == 200, "the page reloads: {status} {html}");
        let hidden = html
            .match_indices("<input type=\"hidden\" name=\"order_")
            .map(|(i, _)| &html[i..])
            .find(|tail| {
                tail.split('>')
                    .next()
                    .is_some_and(|tag| tag.contains(&format!("value=\"{order}\"")))
            })
            .with_context(|| format!("order {order} is open on the page: {html}"))?;
        let n: String = hidden["<input type=\"hidden\" name=\"order_".len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let choice = match reason {
            None => {
                let key = format!("name=\"choice_{n}\" value=\"recognise:");
                let at = html.find(&key).context("a report to recognise")? + key.len();
                format!("recognise:{}", &html[at..at + html[at..].find('"').context("value")?])
            }
            Some(_) => "decline".to_string(),
        };
        let mut form = vec![
            (format!("order_{n}"), order.to_string()),
            (format!("choice_{n}"), choice),
        ];
        if let Some(code) = reason {
            form.push((format!("reason_code_{n}"), code.to_string()));
        }
        let form: Vec<(&str, String)> = form.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        self.post(&form).await
    }
}
