//! Calls to the platform from SQL, for what a doctor is waiting for. The HTTP request runs
//! on its own thread with a hard timeout; the backend waits in short slices, checking for
//! interrupts, so `pg_cancel_backend` and `statement_timeout` end the call at once. The
//! thread touches no Postgres memory: it owns copies of everything it needs, and the shared
//! platform state (`shared.rs`: one token for all backends, the org-wide 429 pause).

use std::io::Read;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hmr_protocol::envelope::{parse_data, MAX_ANSWER_BYTES};
use hmr_protocol::paths::{self, Request};
use hmr_protocol::{classify_answer, sign, Outcome, Scope, TokenAnswer, TokenRequest};
use pgrx::prelude::*;
use sha2::Digest;

use crate::plans;
use crate::shared::{self, SharedPlatform, TokenWait};

/// The platform settings (`hmr.platform`), read by SECURITY DEFINER code only.
#[derive(Clone)]
pub struct Settings {
    pub base_url: String,
    pub org_code: String,
    auth: String,
    username: String,
    password: String,
    app_id: String,
    app_secret: String,
    sign_alg: String,
    /// `hmr.policy`'s hard limit of one call: the hospital's, not the calling session's.
    pub timeout_ms: u64,
}

const SETTINGS_SQL: &str =
    "SELECT p.base_url, p.org_code, p.auth, coalesce(p.username, ''), coalesce(p.password, ''), \
            coalesce(p.app_id, ''), coalesce(p.app_secret, ''), p.sign_alg, \
            (SELECT e.platform_timeout_ms FROM hmr.effective_policy e)::int8 \
       FROM hmr.platform p";

impl Settings {
    pub fn load() -> Option<Settings> {
        plans::read(SETTINGS_SQL, &[], &[], |rows| {
            let mut found = None;
            for row in rows {
                let get = |i: usize| row.get::<String>(i).ok().flatten().unwrap_or_default();
                found = Some(Settings {
                    base_url: get(1),
                    org_code: get(2),
                    auth: get(3),
                    username: get(4),
                    password: get(5),
                    app_id: get(6),
                    app_secret: get(7),
                    sign_alg: get(8),
                    timeout_ms: row.get::<i64>(9).ok().flatten().unwrap_or(3000).max(1) as u64,
                });
            }
            Ok::<_, pgrx::spi::Error>(found)
        })
        .unwrap_or_else(|e| error!("hmr: cannot read hmr.platform: {e}"))
    }
}

/// Why a call did not produce an answer.
#[derive(Debug)]
pub enum CallError {
    /// Timeout, connection refused, platform fault, bad answer: the platform is unavailable.
    Unavailable(String),
    /// The platform refused the request itself (4xx other than 401/404); `fields`: the
    /// platform's names of the fields it refused.
    Refused {
        status: u16,
        message: String,
        fields: Vec<String>,
    },
    /// The platform does not know what we referenced (404).
    NotFound(String),
}

impl Settings {
    /// Which credentials these are (a token obtained with others is not used).
    fn fingerprint(&self) -> u64 {
        let mut h = sha2::Sha256::new();
        for part in [
            &self.base_url,
            &self.org_code,
            &self.auth,
            &self.username,
            &self.password,
            &self.app_id,
            &self.app_secret,
            &self.sign_alg,
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
    }
}

/// Sends a request with the recognition token and returns the answer body of a 2xx.
/// Blocks the backend at most `hmr.policy.platform_timeout_ms`, interruptibly.
pub fn call(settings: &Settings, request: Request) -> Result<Vec<u8>, CallError> {
    let timeout = Duration::from_millis(settings.timeout_ms);
    let deadline = Instant::now() + timeout;
    let settings = settings.clone();
    // On this (the backend's) thread: it may create the shared segment.
    let shared = shared::platform();
    if let Some(wait) = shared.paused_for() {
        return Err(CallError::Unavailable(format!(
            "rate-limited: the platform asked to wait {} s more",
            wait.as_secs_f64().ceil()
        )));
    }
    let rx = off_thread(Box::new(move || exchange(shared, &settings, &request, deadline)))?;
    loop {
        match rx.recv_timeout(Duration::from_micros(500)) {
            Ok(result) => return result,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(CallError::Unavailable("the call ended without an answer".into()))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // pg_cancel_backend / statement_timeout raise here; the thread is left to
                // finish on its own timeout and its answer is dropped.
                check_for_interrupts!();
                if Instant::now() >= deadline + Duration::from_millis(20) {
                    return Err(CallError::Unavailable(format!(
                        "no answer within {} ms",
                        timeout.as_millis()
                    )));
                }
            }
        }
    }
}

type Work = Box<dyn FnOnce() -> CallResult + Send>;
type CallResult = Result<Vec<u8>, CallError>;
type Reply = mpsc::Receiver<CallResult>;
/// A call for the call thread: the work, and where its answer goes.
type Job = (Work, mpsc::Sender<CallResult>);

/// The backend's call thread, kept between calls (starting a thread per call cost ~80 µs
/// here, BENCHMARKS.md §4). `idle` is set before each answer is sent, so a call that has its
/// answer finds the thread free for the next one.
struct CallThread {
    work: mpsc::Sender<Job>,
    idle: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

thread_local! {
    static CALL_THREAD: std::cell::RefCell<Option<CallThread>> = const { std::cell::RefCell::new(None) };
}

/// Runs `work` on the call thread, or on a new one when it is still busy with a call the
/// backend gave up on (a timeout, a cancel): a new call never waits behind an old one. The
/// busy thread ends once its call does.
fn off_thread(work: Work) -> Result<Reply, CallError> {
    use std::sync::atomic::Ordering;
    let (reply, answer) = mpsc::channel();
    CALL_THREAD.with(|kept| {
        let mut kept = kept.borrow_mut();
        let mut work = work;
        if let Some(t) = kept.as_ref() {
            if t.idle.swap(false, Ordering::AcqRel) {
                match t.work.send((work, reply.clone())) {
                    Ok(()) => return Ok(answer),
                    // The thread is gone (it panicked): start another.
                    Err(mpsc::SendError((w, _))) => work = w,
                }
            }
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let idle = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = idle.clone();
        std::thread::Builder::new()
            .name("hmr-platform-call".into())
            .spawn(move || {
                for (work, reply) in rx {
                    let result = work();
                    flag.store(true, Ordering::Release);
                    let _ = reply.send(result);
                }
            })
            .map_err(|e| CallError::Unavailable(format!("cannot start the call: {e}")))?;
        tx.send((work, reply))
            .map_err(|_| CallError::Unavailable("the call thread ended at once".into()))?;
        *kept = Some(CallThread { work: tx, idle });
        Ok(answer)
    })
}

/// The HTTP exchange, on the call's own thread: token (cached), request, one refresh on 401.
fn exchange(
    shared: &SharedPlatform,
    settings: &Settings,
    request: &Request,
    deadline: Instant,
) -> Result<Vec<u8>, CallError> {
    // One id for the call: the retry after a 401 is the same request (contract §7).
    let request_id = uuid::Uuid::new_v4().to_string();
    for attempt in 0..2 {
        let token = token(shared, settings, deadline)?;
        let (status, retry_after, body) = send(settings, request, Some(&token), deadline, &request_id)?;
        match classify_answer(request, status, retry_after.as_deref(), &body) {
            Outcome::Done => return Ok(body),
            Outcome::RefreshToken if attempt == 0 => {
                shared.forget_token(&token);
                continue;
            }
            Outcome::RefreshToken => return Err(CallError::Unavailable("token refused".into())),
            Outcome::Retry {
                after: Some(after),
                reason,
            } if status == 429 => {
                // For the whole org: every backend (and the worker) waits.
                shared.pause(after);
                return Err(CallError::Unavailable(format!("rate-limited: {reason}")));
            }
            Outcome::Retry { reason, .. } => return Err(CallError::Unavailable(reason)),
            Outcome::MissingDependency { reason } => return Err(CallError::NotFound(reason)),
            Outcome::Permanent {
                status,
                code,
                message,
                errors,
            } => {
                let detail = hmr_protocol::FieldError::join(&errors);
                return Err(CallError::Refused {
                    status,
                    message: format!("{code} {message} {detail}").trim().into(),
                    fields: errors.iter().map(|e| e.field.clone()).collect(),
                });
            }
        }
    }
    unreachable!("the loop returns on its second pass")
}

impl CallError {
    /// What a recognition function answers for it: `unavailable` (the platform could not be
    /// asked) or `unchecked` (it refused to answer: a data problem), and why.
    pub fn status_and_reason(self) -> (&'static str, String) {
        match self {
            CallError::Unavailable(reason) => ("unavailable", reason),
            CallError::NotFound(reason) => ("unchecked", format!("HTTP 404: {reason}")),
            CallError::Refused { status, message, .. } => ("unchecked", format!("HTTP {status}: {message}")),
        }
    }
}

/// The recognition token shared by every backend: fetched by one of them when missing or
/// due for refresh (the others use the current one meanwhile, or wait for the first).
fn token(shared: &SharedPlatform, settings: &Settings, deadline: Instant) -> Result<String, CallError> {
    let fingerprint = settings.fingerprint();
    loop {
        match shared.token(fingerprint) {
            Ok(t) => return Ok(t),
            Err(TokenWait::Fetch) => break,
            Err(TokenWait::Wait) if shared::wait_a_moment(deadline) => {}
            Err(TokenWait::Wait) => return Err(CallError::Unavailable("waiting for the token".into())),
        }
    }
    match fetch_token(settings, deadline) {
        Ok((t, lifetime)) => {
            shared.store_token(fingerprint, &t, lifetime);
            Ok(t)
        }
        Err(e) => {
            shared.fetch_failed();
            Err(e)
        }
    }
}

fn fetch_token(settings: &Settings, deadline: Instant) -> Result<(String, Duration), CallError> {
    let scope = Scope::Recognition;
    let request = if settings.auth == "signature" {
        sign::signature_grant(
            sign::alg_named(&settings.sign_alg),
            &settings.app_id,
            &settings.app_secret,
            scope,
            chrono::Utc::now().timestamp_millis(),
            uuid::Uuid::new_v4().simple().to_string(),
        )
    } else {
        TokenRequest::Password {
            username: settings.username.clone(),
            password: settings.password.clone(),
            scope,
        }
    };
    let (status, _, body) = send(
        settings,
        &paths::token(&request),
        None,
        deadline,
        &uuid::Uuid::new_v4().to_string(),
    )?;
    if status != 200 {
        return Err(CallError::Unavailable(format!("token: HTTP {status}")));
    }
    let answer: TokenAnswer = parse_data(&body).map_err(|e| CallError::Unavailable(format!("token answer: {e}")))?;
    Ok((answer.access_token, Duration::from_secs(answer.expires_in)))
}

/// Every agent that talks to the platform: it never follows a redirect (a 3xx is not the
/// platform's answer, and following it would send the request, identity numbers and the
/// token, to another host).
fn agent_builder() -> ureq::AgentBuilder {
    ureq::AgentBuilder::new().redirects(0)
}

/// The backend's one HTTP agent: its connections to the platform stay open between calls, so
/// a doctor's check does not pay a TCP (and TLS) handshake each time.
fn agent() -> &'static ureq::Agent {
    static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
    AGENT.get_or_init(|| agent_builder().max_idle_connections_per_host(2).build())
}

fn send(
    settings: &Settings,
    request: &Request,
    token: Option<&str>,
    deadline: Instant,
    request_id: &str,
) -> Result<(u16, Option<String>, Vec<u8>), CallError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(CallError::Unavailable("timeout".into()));
    }
    let url = request.url(&settings.base_url);
    let headers = request.wire_headers(&settings.org_code, request_id, token);
    let attempt = |agent: &ureq::Agent, left: Duration| {
        let mut req = agent.request(request.method.as_str(), &url).timeout(left);
        for (k, v) in &headers {
            req = req.set(k, v);
        }
        if request.method == paths::Method::Get {
            req.call().map_err(Box::new)
        } else {
            req.send_bytes(&request.body).map_err(Box::new)
        }
    };
    let mut result = attempt(agent(), left);
    if matches!(&result, Err(e) if matches!(**e, ureq::Error::Transport(_))) {
        // A kept connection the platform closed meanwhile fails like this: once more on a new
        // connection, with the same request id (the platform takes it as the same request).
        let left = deadline.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            let fresh = agent_builder().max_idle_connections(0).build();
            result = attempt(&fresh, left);
        }
    }
    let response = match result.map_err(|e| *e) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(ureq::Error::Transport(t)) => return Err(CallError::Unavailable(format!("{:?}", t.kind()))),
    };
    let status = response.status();
    let retry_after = response.header("Retry-After").map(str::to_string);
    if (300..400).contains(&status) {
        let host = response
            .header("Location")
            .map_or_else(|| "?".to_string(), paths::location_host);
        return Err(CallError::Unavailable(format!(
            "HTTP {status}: the platform redirected to {host}; redirects are not followed"
        )));
    }
    let mut body = Vec::new();
    response
        .into_reader()
        .take(MAX_ANSWER_BYTES as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| CallError::Unavailable(format!("reading the answer: {e}")))?;
    if body.len() > MAX_ANSWER_BYTES {
        return Err(CallError::Unavailable("answer too large".into()));
    }
    Ok((status, retry_after, body))
}
