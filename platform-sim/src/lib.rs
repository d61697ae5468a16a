//! `hmr-platform-sim`: an in-memory simulator of the city 检查检验结果互认共享平台,
//! implementing the contract of `platform-interface.md` (sections 1–7) with the wire types
//! and validation of `hmr-protocol`, plus a control API under `/_sim/` to inspect what
//! arrived and to inject faults.
//!
//! Embed it with [`spawn`] or [`serve`], or build the [`Sim`] and use [`Sim::router`]
//! directly (e.g. with `tower::ServiceExt::oneshot`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::{Path, Request, State as AxState};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use hmr_protocol::checks::{org_code_check_char, org_code_valid};
use hmr_protocol::paths::route;
use hmr_protocol::ReportType;
use tokio::net::TcpListener;
use tokio::sync::watch;

mod api;
mod auth;
pub mod catalog;
mod control;
pub mod error;
pub mod faults;
mod handler;
pub mod journal;
mod page;
mod recognition;
mod records;
mod reports;
pub mod state;
mod wire;

pub use catalog::{Catalog, CatalogEntry};
pub use error::SimError;
pub use faults::{FaultSpec, RateLimitSpec};

use api::Endpoint;

/// One hospital with an account on the platform.
#[derive(Debug, Clone, PartialEq)]
pub struct OrgConfig {
    /// 统一社会信用代码 (valid GB 32100).
    pub code: String,
    pub name: String,
    pub username: String,
    pub password: String,
    pub app_id: String,
    pub app_secret: String,
}

impl OrgConfig {
    /// Parses `CODE,NAME,USERNAME,PASSWORD,APP_ID,APP_SECRET` (the secret may hold commas).
    pub fn parse(spec: &str) -> Result<OrgConfig, SimError> {
        let parts: Vec<&str> = spec.splitn(6, ',').map(str::trim).collect();
        let [code, name, username, password, app_id, app_secret] = parts[..] else {
            return Err(SimError::OrgConfig(format!(
                "`{spec}`: expected CODE,NAME,USERNAME,PASSWORD,APP_ID,APP_SECRET"
            )));
        };
        if !org_code_valid(code) {
            return Err(SimError::OrgConfig(format!("`{code}` is not a valid GB 32100 code")));
        }
        if [name, username, password, app_id, app_secret]
            .iter()
            .any(|s| s.is_empty())
        {
            return Err(SimError::OrgConfig(format!("`{spec}`: empty field")));
        }
        Ok(OrgConfig {
            code: code.into(),
            name: name.into(),
            username: username.into(),
            password: password.into(),
            app_id: app_id.into(),
            app_secret: app_secret.into(),
        })
    }

    /// The two demo hospitals of Huizhou (行政区划 441300, 事业单位 `12`).
    pub fn demo() -> Vec<OrgConfig> {
        let org = |first17: &str, name: &str, user: &str| OrgConfig {
            code: complete_org_code(first17),
            name: name.into(),
            username: user.into(),
            password: format!("{user}-secret"),
            app_id: format!("{user}-app"),
            app_secret: format!("{user}-app-secret"),
        };
        vec![
            org("12441300455860011", "惠州市第一人民医院", "hz1"),
            org("12441300455860020", "惠州市中心人民医院", "hz2"),
        ]
    }
}

/// Appends the GB 32100 check character to 17 valid characters.
pub fn complete_org_code(first17: &str) -> String {
    let check = org_code_check_char(first17).expect("17 characters of the GB 32100 alphabet");
    format!("{first17}{check}")
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub orgs: Vec<OrgConfig>,
    pub catalog: Catalog,
    /// `expiresIn` of issued tokens (faults may shorten it).
    pub token_ttl_secs: u64,
    /// Base of the page URLs handed out (`{public_url}/page/{ticket}`); by default the
    /// address the simulator listens on.
    pub public_url: Option<String>,
    /// Whether an org's own reports are offered to it (the contract's default: yes).
    pub own_reports_recognisable: bool,
    /// Let non-loopback callers use `/_sim/` (off by default).
    pub control_from_anywhere: bool,
}

impl SimConfig {
    /// The demo orgs, a 7200 s token TTL, own reports recognisable.
    pub fn new(catalog: Catalog) -> SimConfig {
        SimConfig {
            orgs: OrgConfig::demo(),
            catalog,
            token_ttl_secs: 7200,
            public_url: None,
            own_reports_recognisable: true,
            control_from_anywhere: false,
        }
    }

    pub fn org_name(&self, code: &str) -> String {
        self.orgs
            .iter()
            .find(|o| o.code == code)
            .map_or_else(|| code.to_owned(), |o| o.name.clone())
    }

    fn public_base(&self) -> String {
        self.public_url
            .as_deref()
            .unwrap_or("http://127.0.0.1")
            .trim_end_matches('/')
            .to_owned()
    }
}

/// A running simulator: cheap to clone, all clones share the state.
#[derive(Clone)]
pub struct Sim {
    inner: Arc<Inner>,
}

struct Inner {
    config: SimConfig,
    state: Mutex<state::State>,
    /// Bumped whenever faults change, to wake held (hanging) requests.
    fault_changes: watch::Sender<u64>,
}

impl Sim {
    pub fn new(config: SimConfig) -> Result<Sim, SimError> {
        if config.orgs.is_empty() {
            return Err(SimError::OrgConfig("at least one org is needed".into()));
        }
        for (i, o) in config.orgs.iter().enumerate() {
            if config.orgs[..i]
                .iter()
                .any(|p| p.code == o.code || p.username == o.username || p.app_id == o.app_id)
            {
                return Err(SimError::OrgConfig(format!(
                    "org {} repeats a code, username or appId",
                    o.code
                )));
            }
        }
        let state = state::State::new(config.orgs.iter().map(|o| o.code.clone()));
        let (fault_changes, _) = watch::channel(0);
        Ok(Sim {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(state),
                fault_changes,
            }),
        })
    }

    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    /// The state lock; a panic in a handler must not wedge the simulator, so poisoning
    /// is ignored.
    /// A page's path as the browser sees it (under `public_url`'s path, if any).
    fn page_path(&self, ticket: &str) -> String {
        let base = self.inner.config.public_base();
        let after_scheme = base.split_once("://").map_or(base.as_str(), |(_, rest)| rest);
        let prefix = after_scheme.find('/').map_or("", |i| &after_scheme[i..]);
        format!("{prefix}/page/{ticket}")
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, state::State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn faults_changed(&self) {
        self.inner.fault_changes.send_modify(|g| *g += 1);
    }

    /// The whole HTTP surface: the contract, the pages, the control API.
    pub fn router(&self) -> Router {
        let api = Router::new()
            .route(route::TOKEN, post(|s, r| call(s, r, Endpoint::Token)))
            .route(route::PATIENTS, post(|s, r| call(s, r, Endpoint::Patients)))
            .route(route::DEPARTMENTS, post(|s, r| call(s, r, Endpoint::Departments)))
            .route(route::STAFF, post(|s, r| call(s, r, Endpoint::Staff)))
            .route(
                route::LAB_REPORTS,
                post(|s, r| call(s, r, Endpoint::Report(ReportType::Lab))),
            )
            .route(
                route::EXAM_REPORTS,
                post(|s, r| call(s, r, Endpoint::Report(ReportType::Exam))),
            )
            .route(
                route::LAB_REVOKE,
                post(|s, Path(no), r| call(s, r, Endpoint::Revoke(ReportType::Lab, no))),
            )
            .route(
                route::EXAM_REVOKE,
                post(|s, Path(no), r| call(s, r, Endpoint::Revoke(ReportType::Exam, no))),
            )
            .route(
                route::LAB_PDF,
                put(|s, Path((no, v)), r| call(s, r, Endpoint::Pdf(ReportType::Lab, no, v))),
            )
            .route(
                route::EXAM_PDF,
                put(|s, Path((no, v)), r| call(s, r, Endpoint::Pdf(ReportType::Exam, no, v))),
            )
            .route(route::RECOGNITIONS, get(|s, r| call(s, r, Endpoint::List)))
            .route(route::RECOGNITIONS_QUERY, post(|s, r| call(s, r, Endpoint::Query)))
            .route(route::PRESCRIPTION_CHECK, post(|s, r| call(s, r, Endpoint::Check)))
            .route(route::DECISIONS, post(|s, r| call(s, r, Endpoint::Decisions)))
            .route(
                route::DOWNLOAD,
                get(|s, Path(id), r| call(s, r, Endpoint::Download(id))),
            )
            .route(
                route::CHECK_DECISIONS,
                get(|s, Path(id), r| call(s, r, Endpoint::CheckDecisions(id))),
            );
        Router::new()
            .merge(api)
            .route("/page/{ticket}", get(page))
            .route("/page/{ticket}/decide", post(page_decide))
            .nest("/_sim", control::router(self.clone()))
            .fallback(not_found)
            .with_state(self.clone())
    }

    /// Serves on `listener` until the task is dropped or the listener fails.
    pub async fn serve(self, listener: TcpListener) -> anyhow::Result<()> {
        let app = self.router().into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(listener, app).await?;
        Ok(())
    }
}

async fn call(AxState(sim): AxState<Sim>, req: Request, ep: Endpoint) -> Response {
    sim.contract(ep, req).await
}

async fn page(AxState(sim): AxState<Sim>, Path(ticket): Path<String>, headers: header::HeaderMap) -> Response {
    let path = sim.page_path(&ticket);
    let cookie = headers.get(header::COOKIE).and_then(|v| v.to_str().ok());
    let result = page::open(&mut sim.lock(), &ticket, &path, cookie);
    match result {
        Ok(p) => {
            let mut r = html(StatusCode::OK, p.html);
            if let Some(c) = p.set_cookie.and_then(|c| header::HeaderValue::from_str(&c).ok()) {
                r.headers_mut().insert(header::SET_COOKIE, c);
            }
            r
        }
        Err(e) => page_error(&e),
    }
}

async fn page_decide(
    AxState(sim): AxState<Sim>,
    Path(ticket): Path<String>,
    headers: header::HeaderMap,
    axum::extract::Form(form): axum::extract::Form<std::collections::HashMap<String, String>>,
) -> Response {
    let cookie = headers.get(header::COOKIE).and_then(|v| v.to_str().ok());
    let result = page::decide(&mut sim.lock(), &ticket, cookie, &form);
    match result {
        // Post, redirect, get: a reload shows the page, never posts again.
        Ok(None) => (StatusCode::SEE_OTHER, [(header::LOCATION, sim.page_path(&ticket))]).into_response(),
        Ok(Some(again)) => html(StatusCode::BAD_REQUEST, again),
        Err(e) => page_error(&e),
    }
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

fn page_error(e: &SimError) -> Response {
    html(
        e.status(),
        format!(
            "<!doctype html>\n<html lang=\"zh-CN\"><head><meta charset=\"utf-8\"><title>互认平台</title></head>\n\
             <body><p role=\"alert\">{}</p></body></html>\n",
            page::esc(&e.detail())
        ),
    )
}

/// Unknown paths get the envelope's 404 too.
async fn not_found() -> Response {
    let e = SimError::NotFound("no such endpoint".into());
    let mut r = handler::Rendered::error(&e).into_response();
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}

/// Builds the simulator and serves it on `listener`. `public_url` defaults to the
/// listener's address.
pub async fn serve(mut config: SimConfig, listener: TcpListener) -> anyhow::Result<()> {
    if config.public_url.is_none() {
        config.public_url = Some(format!("http://{}", listener.local_addr()?));
    }
    Sim::new(config)?.serve(listener).await
}

/// Binds `addr` (port 0 allowed), starts serving on a task, and returns the bound address
/// and a handle on the simulator's state.
pub async fn spawn(
    mut config: SimConfig,
    addr: SocketAddr,
) -> anyhow::Result<(SocketAddr, Sim, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    if config.public_url.is_none() {
        config.public_url = Some(format!("http://{bound}"));
    }
    let sim = Sim::new(config)?;
    let task = tokio::spawn(sim.clone().serve(listener));
    Ok((bound, sim, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_orgs_have_valid_codes() {
        for o in OrgConfig::demo() {
            assert!(org_code_valid(&o.code), "{}", o.code);
            assert_eq!(
                OrgConfig::parse(&format!("{},{},u,p,a,s,t", o.code, o.name))
                    .unwrap()
                    .app_secret,
                "s,t"
            );
        }
        assert!(OrgConfig::parse("123,x,u,p,a,s").is_err());
        assert!(OrgConfig::parse("only,three,fields").is_err());
    }
}
