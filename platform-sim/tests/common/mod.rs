//! Shared fixtures: a simulator behind `oneshot`, requests built by `hmr_protocol::paths`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Mutex;

use axum::body::{Body, Bytes};
use axum::http::{self, HeaderMap};
use axum::Router;
use chrono::{Duration, Utc};
use hmr_platform_sim::{Catalog, OrgConfig, Sim, SimConfig};
use hmr_protocol::checks::{format_time, id_card_check_char};
use hmr_protocol::paths::{self, Method};
use hmr_protocol::*;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

pub const CATALOG: &str = "dataCode,type,name,validityDays\n\
JY0001,lab,血常规,7\nJY0004,lab,肝功能,14\nJY0005,lab,肾功能,14\n\
JC0002,exam,胸部CT平扫,30\nJC0006,exam,胸部DR正位片,30\n";

pub struct Harness {
    pub sim: Sim,
    pub app: Router,
    pub hz1: OrgConfig,
    pub hz2: OrgConfig,
    tokens: Mutex<HashMap<(String, Scope), String>>,
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub json: Value,
}

impl Resp {
    /// `data.errors` as `(field, reason)` pairs.
    pub fn errors(&self) -> Vec<(String, String)> {
        self.json["data"]["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        (
                            e["field"].as_str().unwrap().to_owned(),
                            e["reason"].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
    pub fn data(&self) -> &Value {
        &self.json["data"]
    }
}

pub fn rid() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with(|_| {})
    }

    pub fn with(adjust: impl FnOnce(&mut SimConfig)) -> Harness {
        let mut config = SimConfig::new(Catalog::from_csv(CATALOG).unwrap());
        config.public_url = Some("http://sim.test".into());
        adjust(&mut config);
        let sim = Sim::new(config).unwrap();
        let orgs = OrgConfig::demo();
        Harness {
            app: sim.router(),
            sim,
            hz1: orgs[0].clone(),
            hz2: orgs[1].clone(),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    pub async fn raw(&self, req: http::Request<Body>) -> Resp {
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
            json,
        }
    }

    /// A contract request as the worker would send it.
    pub fn build(&self, r: &paths::Request, org: &str, token: Option<&str>, request_id: &str) -> http::Request<Body> {
        let mut b = http::Request::builder()
            .method(r.method.as_str())
            .uri(&r.path)
            .header("X-Org-Code", org)
            .header("X-Request-Id", request_id);
        if let Some(t) = token {
            b = b.header("Authorization", format!("Bearer {t}"));
        }
        if let Some(ct) = &r.content_type {
            b = b.header("Content-Type", ct);
        }
        for (k, v) in &r.headers {
            b = b.header(k, v);
        }
        if r.method != Method::Get {
            b = b.header("Content-Length", r.body.len());
        }
        b.body(Body::from(r.body.clone())).unwrap()
    }

    pub async fn password_token(&self, org: &OrgConfig, scope: Scope) -> Resp {
        let req = paths::token(&TokenRequest::Password {
            username: org.username.clone(),
            password: org.password.clone(),
            scope,
        });
        self.raw(self.build(&req, &org.code, None, &rid())).await
    }

    pub async fn token(&self, org: &OrgConfig, scope: Scope) -> String {
        if let Some(t) = self.tokens.lock().unwrap().get(&(org.code.clone(), scope)) {
            return t.clone();
        }
        let r = self.password_token(org, scope).await;
        assert_eq!(r.status, 200, "{:?}", r.json);
        let t = r.data()["accessToken"].as_str().unwrap().to_owned();
        self.tokens.lock().unwrap().insert((org.code.clone(), scope), t.clone());
        t
    }

    pub fn forget_tokens(&self) {
        self.tokens.lock().unwrap().clear();
    }

    pub async fn send_id(&self, org: &OrgConfig, r: &paths::Request, request_id: &str) -> Resp {
        let token = self.token(org, r.scope.expect("contract request")).await;
        self.raw(self.build(r, &org.code, Some(&token), request_id)).await
    }

    pub async fn send(&self, org: &OrgConfig, r: &paths::Request) -> Resp {
        self.send_id(org, r, &rid()).await
    }

    /// `GET`/`POST`/`DELETE` on the control API.
    pub async fn control(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let b = http::Request::builder()
            .method(method)
            .uri(path)
            .header("Content-Type", "application/json");
        let body = body.map(|v| Body::from(v.to_string())).unwrap_or_else(Body::empty);
        self.raw(b.body(body).unwrap()).await
    }

    pub async fn journal(&self) -> Vec<Value> {
        self.control("GET", "/_sim/requests", None).await.json["requests"]
            .as_array()
            .unwrap()
            .clone()
    }

    pub async fn last_effect(&self) -> String {
        self.journal().await.last().unwrap()["effect"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Uploads the patient (and one department) for `org`.
    pub async fn setup_patient(&self, org: &OrgConfig, p: &Patient) {
        let r = self.send(org, &paths::patients(std::slice::from_ref(p))).await;
        assert_eq!(r.status, 200, "{:?}", r.json);
        assert_eq!(r.data()["results"][0]["status"], "accepted", "{:?}", r.json);
    }
}

pub fn ago(days: i64, hours: i64) -> String {
    format_time(
        &(Utc::now() - Duration::days(days) - Duration::hours(hours)).with_timezone(&hmr_platform_sim::state::cst()),
    )
}

pub fn id_no(birth: &str, seq: &str) -> String {
    let first = format!("441302{birth}{seq}");
    format!("{first}{}", id_card_check_char(&first))
}

pub fn patient(pid: &str, idno: &str) -> Patient {
    Patient {
        patient_id: pid.into(),
        id_type: "01".into(),
        id_no: idno.into(),
        name: "张三".into(),
        gender_code: "1".into(),
        birth_date: format!("{}-{}-{}", &idno[6..10], &idno[10..12], &idno[12..14]),
        phone: None,
        registered_at: ago(30, 0),
        updated_at: ago(1, 0),
    }
}

pub fn dept(code: &str, parent: Option<&str>) -> Department {
    Department {
        dept_code: code.into(),
        dept_name: format!("科室{code}"),
        std_dept_code: "A03".into(),
        campus_code: "01".into(),
        parent_code: parent.map(Into::into),
        status: Some("1".into()),
        updated_at: ago(1, 0),
    }
}

pub fn staff(no: &str, dept: &str) -> Staff {
    Staff {
        staff_no: no.into(),
        name: "李医生".into(),
        gender_code: None,
        dept_code: dept.into(),
        title_code: None,
        practice_cert_no: None,
        role: Some("doctor".into()),
        status: Some("1".into()),
        external: None,
        updated_at: ago(1, 0),
    }
}

pub fn lab(no: &str, version: u32, p: &Patient, data_code: Option<&str>, reported_at: String) -> LabReport {
    LabReport {
        report_no: no.into(),
        version,
        patient_id: p.patient_id.clone(),
        id_type: p.id_type.clone(),
        id_no: p.id_no.clone(),
        name: p.name.clone(),
        visit_type: Some("1".into()),
        visit_no: Some("V1".into()),
        order_no: None,
        dept_code: None,
        request_doctor_no: None,
        specimen_code: None,
        specimen_name: Some("血".into()),
        specimen_no: None,
        sampled_at: None,
        reported_at,
        audited_at: None,
        auditor_no: "D01".into(),
        category_code: None,
        category_name: None,
        data_code: data_code.map(Into::into),
        items: vec![LabItem {
            item_code: "WBC".into(),
            item_name: "白细胞".into(),
            loinc: None,
            result_value: "6.5".into(),
            result_unit: Some("10^9/L".into()),
            reference_range: Some("3.5-9.5".into()),
            abnormal_flag: Some("1".into()),
            critical_flag: Some(false),
            method: None,
        }],
    }
}

pub fn exam(no: &str, version: u32, p: &Patient, data_code: Option<&str>, reported_at: String) -> ExamReport {
    ExamReport {
        report_no: no.into(),
        version,
        patient_id: p.patient_id.clone(),
        id_type: p.id_type.clone(),
        id_no: p.id_no.clone(),
        name: p.name.clone(),
        visit_type: Some("3".into()),
        visit_no: None,
        order_no: None,
        dept_code: None,
        request_doctor_no: None,
        exam_class: "CT".into(),
        exam_item_code: None,
        exam_item_name: Some("胸部CT平扫".into()),
        body_part_code: None,
        body_part_name: None,
        data_code: data_code.map(Into::into),
        accession_no: None,
        study_instance_uid: None,
        findings: "双肺纹理清晰".into(),
        impression: "未见异常".into(),
        examined_at: None,
        reported_at,
        audited_at: None,
        reporter_no: None,
        auditor_no: "D02".into(),
        critical_flag: None,
        image_url: None,
    }
}

pub fn pdf_bytes(tag: &str) -> Vec<u8> {
    format!("%PDF-1.4\n% {tag}\n%%EOF\n").into_bytes()
}
