//! The HTTP client of the platform: tokens per scope (cached, refreshed before expiry and
//! on 401), the org-wide `Retry-After` pause, and answer bodies read within a size limit.
//! It sends protocol-built requests; it does not know any field or path itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmr_protocol::envelope::{parse_data, MAX_ANSWER_BYTES};
use hmr_protocol::paths::{self, Request, HEADER_RETRY_AFTER};
use hmr_protocol::{classify_answer, sign, Outcome, Scope, TokenAnswer, TokenRequest};
use tokio::sync::Mutex as AsyncMutex;
use uuid::Uuid;

use crate::config::{AuthMode, PlatformConfig};
use crate::error::WorkerError;
use crate::metrics::Metrics;

/// A raw answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub retry_after: Option<String>,
    /// Where a 3xx pointed (never followed).
    pub location: Option<String>,
    pub body: Vec<u8>,
}

#[derive(Clone)]
struct Token {
    value: String,
    refresh_at: Instant,
}

pub struct Platform {
    http: reqwest::Client,
    config: PlatformConfig,
    tokens: HashMap<Scope, AsyncMutex<Option<Token>>>,
    paused_until: std::sync::Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

impl Platform {
    pub fn new(config: PlatformConfig, metrics: Arc<Metrics>) -> Result<Arc<Platform>, WorkerError> {
        let mut builder = reqwest::Client::builder()
            // Never follow a redirect: the request (a report, identity numbers, the token)
            // would go to another host, and its answer is not the platform's.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_millis(config.timeout_ms.min(5_000)))
            .pool_max_idle_per_host(64)
            .use_rustls_tls();
        if let Some(path) = &config.ca_bundle {
            let pem = std::fs::read(path).map_err(|e| WorkerError::Config(format!("ca_bundle {path}: {e}")))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| WorkerError::Config(format!("ca_bundle {path}: {e}")))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| WorkerError::Config(e.to_string()))?;
        let tokens = Scope::ALL.into_iter().map(|s| (s, AsyncMutex::new(None))).collect();
        Ok(Arc::new(Platform {
            http,
            config,
            tokens,
            paused_until: std::sync::Mutex::new(None),
            metrics,
        }))
    }

    /// Sends one request with the given id; transport failures are errors, answers are not.
    pub async fn send(&self, req: &Request, request_id: Uuid, token: Option<&str>) -> Result<Response, WorkerError> {
        let method = match req.method {
            paths::Method::Get => reqwest::Method::GET,
            paths::Method::Post => reqwest::Method::POST,
            paths::Method::Put => reqwest::Method::PUT,
        };
        let mut builder = self.http.request(method, req.url(&self.config.base_url));
        for (k, v) in req.wire_headers(&self.config.org_code, &request_id.to_string(), token) {
            builder = builder.header(k, v);
        }
        if req.method != paths::Method::Get {
            builder = builder.body(req.body.clone());
        }
        let mut response = builder.send().await.map_err(|e| WorkerError::Transport(describe(e)))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(HEADER_RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| WorkerError::Transport(describe(e)))?
        {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(WorkerError::Answer(format!(
                    "answer larger than {MAX_ANSWER_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Response {
            status,
            retry_after,
            location,
            body,
        })
    }

    /// Sends with the scope's token, refreshing it once on 401, and says what to do next.
    pub async fn execute(&self, req: &Request, request_id: Uuid) -> (Outcome, Option<Response>) {
        if let Some(wait) = self.paused() {
            return (
                Outcome::Retry {
                    after: Some(wait),
                    reason: "platform asked to wait (429)".into(),
                },
                None,
            );
        }
        let scope = req.scope.unwrap_or(Scope::HisUpload);
        for attempt in 0..2 {
            let token = match self.token(scope).await {
                Ok(t) => t,
                Err(e) => {
                    return (
                        Outcome::Retry {
                            after: None,
                            reason: e.to_string(),
                        },
                        None,
                    )
                }
            };
            let answer = match self.send(req, request_id, Some(&token)).await {
                Ok(a) => a,
                Err(e) => {
                    return (
                        Outcome::Retry {
                            after: None,
                            reason: e.to_string(),
                        },
                        None,
                    )
                }
            };
            let outcome = match classify_answer(req, answer.status, answer.retry_after.as_deref(), &answer.body) {
                Outcome::Retry { after, .. } if (300..400).contains(&answer.status) => {
                    self.metrics
                        .unexpected_answers
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let host = answer
                        .location
                        .as_deref()
                        .map_or_else(|| "?".to_string(), paths::location_host);
                    tracing::warn!(status = answer.status, %host, "the platform redirected; not followed");
                    Outcome::Retry {
                        after,
                        reason: format!("HTTP {}: redirect to {host}, not followed", answer.status),
                    }
                }
                Outcome::Retry { after, reason } if reason.starts_with(hmr_protocol::envelope::NOT_AN_ENVELOPE) => {
                    self.metrics
                        .unexpected_answers
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(status = answer.status, %reason, "an answer that is not the platform's");
                    Outcome::Retry {
                        after,
                        reason: format!("HTTP {} {reason}", answer.status),
                    }
                }
                other => other,
            };
            match outcome {
                Outcome::RefreshToken if attempt == 0 => {
                    self.forget_token(scope, &token).await;
                    continue;
                }
                Outcome::RefreshToken => {
                    return (
                        Outcome::Retry {
                            after: None,
                            reason: "token refused twice".into(),
                        },
                        Some(answer),
                    )
                }
                Outcome::Retry { after: Some(after), .. } if answer.status == 429 => {
                    self.pause(after);
                    return (outcome, Some(answer));
                }
                _ => return (outcome, Some(answer)),
            }
        }
        unreachable!("the loop returns on its second pass")
    }

    fn paused(&self) -> Option<Duration> {
        let guard = self.paused_until.lock().expect("pause lock");
        guard.and_then(|until| until.checked_duration_since(Instant::now()))
    }

    /// Seconds the org still waits (0: none).
    pub fn paused_secs(&self) -> f64 {
        self.paused().map_or(0.0, |d| d.as_secs_f64())
    }

    /// A 429's Retry-After holds for the whole org.
    pub fn pause(&self, after: Duration) {
        let mut guard = self.paused_until.lock().expect("pause lock");
        let until = Instant::now() + after;
        if guard.is_none_or(|u| u < until) {
            *guard = Some(until);
        }
    }

    async fn forget_token(&self, scope: Scope, refused: &str) {
        let mut slot = self.tokens[&scope].lock().await;
        if slot.as_ref().is_some_and(|t| t.value == refused) {
            *slot = None;
        }
    }

    /// The scope's token: cached until 80 % of its lifetime, fetched by one task at a time.
    pub async fn token(&self, scope: Scope) -> Result<String, WorkerError> {
        let mut slot = self.tokens[&scope].lock().await;
        if let Some(t) = slot.as_ref() {
            if Instant::now() < t.refresh_at {
                return Ok(t.value.clone());
            }
        }
        let request = self.token_request(scope);
        let answer = self.send(&paths::token(&request), Uuid::new_v4(), None).await?;
        // A 429 holds the whole org (§7), the token endpoint's included.
        if answer.status == 429 {
            if let Outcome::Retry { after: Some(after), .. } =
                hmr_protocol::envelope::classify(answer.status, answer.retry_after.as_deref(), &answer.body)
            {
                self.pause(after);
            }
        }
        if answer.status != 200 {
            return Err(WorkerError::Token(format!(
                "HTTP {} for scope {}",
                answer.status,
                scope.as_str()
            )));
        }
        let data: TokenAnswer = parse_data(&answer.body).map_err(|e| WorkerError::Token(e.to_string()))?;
        let lifetime = Duration::from_secs(data.expires_in);
        tracing::info!(scope = scope.as_str(), expires_in = data.expires_in, "token obtained");
        let token = Token {
            value: data.access_token,
            refresh_at: Instant::now() + lifetime.mul_f64(0.8),
        };
        *slot = Some(token.clone());
        Ok(token.value)
    }

    fn token_request(&self, scope: Scope) -> TokenRequest {
        let c = &self.config;
        match c.auth {
            AuthMode::Password => TokenRequest::Password {
                username: c.username.clone(),
                password: c.password.expose().into(),
                scope,
            },
            AuthMode::Signature => sign::signature_grant(
                sign::alg_named(&c.sign_alg),
                &c.app_id,
                c.app_secret.expose(),
                scope,
                chrono::Utc::now().timestamp_millis(),
                Uuid::new_v4().simple().to_string(),
            ),
        }
    }
}

/// What `hmr-worker check` found when it asked for a token.
#[derive(Debug, PartialEq, Eq)]
pub enum Reachability {
    Ok,
    /// No connection (refused, timed out, name not found).
    Unreachable(String),
    /// A connection, but no TLS session (certificate, CA, protocol).
    Tls(String),
    /// The platform answered 401: username/password or app id/secret refused.
    CredentialsRefused,
    /// The platform answered 403: this org may not use the scope.
    ScopeMissing,
    /// Something answered, but not as the platform does.
    Unexpected(String),
}

impl std::fmt::Display for Reachability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reachability::Ok => write!(f, "ok"),
            Reachability::Unreachable(e) => write!(f, "unreachable ({e})"),
            Reachability::Tls(e) => write!(f, "TLS failure ({e}); check platform.ca_bundle and base_url"),
            Reachability::CredentialsRefused => write!(
                f,
                "credentials refused (401): check username/password or app_id/app_secret"
            ),
            Reachability::ScopeMissing => write!(
                f,
                "scope missing (403): ask the platform to grant this scope to the org"
            ),
            Reachability::Unexpected(e) => write!(f, "answered, but not as the platform: {e}"),
        }
    }
}

impl Platform {
    /// Asks for a token of `scope` and says plainly what stands in the way, if anything.
    pub async fn probe(&self, scope: Scope) -> Reachability {
        let request = paths::token(&self.token_request(scope));
        match self.send(&request, Uuid::new_v4(), None).await {
            Err(WorkerError::Transport(e)) => {
                let lower = e.to_lowercase();
                if [
                    "certificate",
                    "tls",
                    "handshake",
                    "ssl",
                    "peer",
                    "corrupt message",
                    "alert",
                ]
                .iter()
                .any(|w| lower.contains(w))
                {
                    Reachability::Tls(e)
                } else {
                    Reachability::Unreachable(e)
                }
            }
            Err(e) => Reachability::Unexpected(e.to_string()),
            Ok(a) => match a.status {
                200 => match parse_data::<TokenAnswer>(&a.body) {
                    Ok(_) => Reachability::Ok,
                    Err(_) => {
                        Reachability::Unexpected(format!("HTTP 200 {}", hmr_protocol::envelope::preview(&a.body)))
                    }
                },
                401 => Reachability::CredentialsRefused,
                403 => Reachability::ScopeMissing,
                s => Reachability::Unexpected(format!("HTTP {s} {}", hmr_protocol::envelope::preview(&a.body))),
            },
        }
    }
}

/// A transport error without the URL's query (which could carry an identity number).
fn describe(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    };
    let e = e.without_url();
    // reqwest's own text is generic ("error sending request"): the causes say what failed.
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    format!("{kind}: {text}")
}
