//! Who may call: terminals' JWTs (ES384, RS384), sessions, and each caller's rate budget.

use super::*;

/// A token bucket per terminal: `burst` calls at once, then `per_minute`.
pub struct RateLimits {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimits {
    pub fn new(per_minute: u32, burst: u32) -> RateLimits {
        RateLimits {
            per_second: f64::from(per_minute.max(1)) / 60.0,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one call from `key`'s budget, or says how long until the next one is allowed.
    pub fn take(&self, key: &str, now: Instant) -> Result<(), Duration> {
        self.bucket(key, now, true)
    }

    /// Whether `key` has a call left, without taking it.
    pub fn has(&self, key: &str, now: Instant) -> Result<(), Duration> {
        self.bucket(key, now, false)
    }

    fn bucket(&self, key: &str, now: Instant, take: bool) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().expect("rate buckets");
        // Keyed by source address too: forget full buckets before the map grows without end.
        if buckets.len() > MAX_BUCKETS {
            let (rate, burst) = (self.per_second, self.burst);
            buckets.retain(|_, (tokens, last)| {
                *tokens + now.saturating_duration_since(*last).as_secs_f64() * rate < burst
            });
        }
        let (tokens, last) = buckets.entry(key.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * self.per_second).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            if take {
                *tokens -= 1.0;
            }
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.per_second))
        }
    }
}

/// Budgets kept before full ones are forgotten.
const MAX_BUCKETS: usize = 10_000;

// ------------------------------------------------------------------ authentication

/// The longest a terminal's token may live, in seconds (CDS Hooks: five minutes).
pub(super) const MAX_TOKEN_LIFE: i64 = 300;

/// The terminals allowed to call, and the `jti`s already used (until their token expires).
pub struct Auth {
    audience: Option<String>,
    /// iss → (name, public key)
    terminals: std::collections::HashMap<String, (String, TerminalKey)>,
    seen: std::sync::Mutex<std::collections::HashMap<String, i64>>,
}

/// A terminal's public key, and so the one algorithm its tokens may carry (a token cannot
/// choose how it is checked).
pub(super) enum TerminalKey {
    /// ES384: the P-384 point, uncompressed.
    Es384(Vec<u8>),
    /// RS384: modulus and exponent, big-endian. An RSA signature checks in a tenth of the
    /// time of a P-384 one (BENCHMARKS.md §6).
    Rs384 { n: Vec<u8>, e: Vec<u8> },
}

impl TerminalKey {
    pub(super) fn from_jwk(iss: &str, jwk: &crate::config::Jwk) -> Result<TerminalKey, WorkerError> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let bad = |what: &str| WorkerError::Config(format!("serve.terminals {iss}: {what}"));
        let field = |v: &Option<String>, name: &str| {
            v.as_deref()
                .and_then(|c| b64.decode(c).ok())
                .ok_or_else(|| bad(&format!("the JWK's {name} is missing or not base64url")))
        };
        match (jwk.kty.as_str(), jwk.crv.as_deref()) {
            ("EC", Some("P-384")) => {
                let (x, y) = (field(&jwk.x, "x")?, field(&jwk.y, "y")?);
                if x.len() != 48 || y.len() != 48 {
                    return Err(bad("bad JWK coordinate"));
                }
                Ok(TerminalKey::Es384([&[4u8][..], &x, &y].concat()))
            }
            ("RSA", None) => {
                let n = field(&jwk.n, "n")?;
                let e = field(&jwk.e, "e")?;
                // 2048 to 8192 bits and an odd exponent of at most 32 bits, as the verification
                // accepts them (a key it would refuse is refused now, not at every call).
                let bits = |v: &[u8]| {
                    let v: Vec<u8> = v.iter().copied().skip_while(|b| *b == 0).collect();
                    v.first()
                        .map_or(0, |first| 8 * (v.len() - 1) + (8 - first.leading_zeros() as usize))
                };
                if !(2048..=8192).contains(&bits(&n)) {
                    return Err(bad("an RSA key must have 2048 to 8192 bits"));
                }
                if !(2..=32).contains(&bits(&e)) || e.last().is_none_or(|b| b % 2 == 0) {
                    return Err(bad("an RSA key's exponent must be odd, 3 or more, at most 32 bits"));
                }
                Ok(TerminalKey::Rs384 { n, e })
            }
            _ => Err(bad("the key must be an EC P-384 JWK (ES384) or an RSA JWK (RS384)")),
        }
    }

    pub(super) fn alg(&self) -> &'static str {
        match self {
            TerminalKey::Es384(_) => "ES384",
            TerminalKey::Rs384 { .. } => "RS384",
        }
    }

    pub(super) fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        use aws_lc_rs::signature;
        match self {
            TerminalKey::Es384(point) => signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                .verify(message, signature)
                .is_ok(),
            TerminalKey::Rs384 { n, e } => signature::RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA384, message, signature)
                .is_ok(),
        }
    }
}

/// The calling terminal, once its token or session is verified (`name` `None`: no terminals
/// configured); `session`: the widget session it calls with.
#[derive(Clone, Default)]
pub struct Caller {
    pub name: Option<String>,
    pub session: Option<String>,
}

/// Whose rate budget a call takes: a terminal's (by `iss`), a widget session's own (one browser
/// cannot spend its terminal's), or the one of an anonymous service.
pub(super) fn rate_key(iss: Option<&str>, session: Option<&str>) -> String {
    match (iss, session) {
        (_, Some(token)) => format!("session:{token}"),
        (Some(iss), None) => format!("terminal:{iss}"),
        (None, None) => "anonymous".into(),
    }
}

impl Caller {
    /// The name recorded with its calls and decisions.
    pub(super) fn workstation<'a>(&'a self, otherwise: &'a str) -> &'a str {
        self.name.as_deref().unwrap_or(otherwise)
    }
}

impl Auth {
    pub fn new(cfg: &crate::config::ServeConfig) -> Result<Auth, WorkerError> {
        let mut terminals = std::collections::HashMap::new();
        for t in &cfg.terminals {
            let key = TerminalKey::from_jwk(&t.iss, &t.jwk)?;
            if terminals.insert(t.iss.clone(), (t.name.clone(), key)).is_some() {
                return Err(WorkerError::Config(format!(
                    "serve.terminals: iss {} is listed twice",
                    t.iss
                )));
            }
        }
        Ok(Auth {
            audience: cfg.audience.clone(),
            terminals,
            seen: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    pub fn required(&self) -> bool {
        !self.terminals.is_empty()
    }

    /// The configured terminal a token claims to come from, before anything is verified.
    pub fn claimed<'a>(&'a self, token: &str) -> Option<&'a str> {
        use base64::Engine as _;
        let payload = token.split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
        let claims: Value = serde_json::from_slice(&bytes).ok()?;
        let iss = claims["iss"].as_str()?;
        self.terminals.get_key_value(iss).map(|(k, _)| k.as_str())
    }

    /// The terminal's name, or why the token is refused.
    #[cfg(test)]
    pub fn verify(&self, token: &str, now: i64) -> Result<String, String> {
        self.verify_claims(token, now).map(|v| v.name)
    }

    /// The verified token: its terminal, and the `jti` to claim in the database (a replay after
    /// a restart, which this process's memory cannot see); or why it is refused.
    pub fn verify_claims(&self, token: &str, now: i64) -> Result<Verified, String> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err("not a JWT".into());
        };
        let json = |s: &str| -> Result<Value, String> {
            let bytes = b64.decode(s).map_err(|_| "not base64url".to_string())?;
            serde_json::from_slice(&bytes).map_err(|_| "not JSON".to_string())
        };
        let header = json(h)?;
        let claims = json(p)?;
        let iss = claims["iss"].as_str().ok_or("no iss")?;
        let (name, key) = self
            .terminals
            .get(iss)
            .ok_or_else(|| format!("unknown terminal {iss}"))?;
        // The terminal's key decides the algorithm, never the token's header.
        if header["alg"] != key.alg() {
            return Err(format!(
                "alg {} ({} expected from this terminal)",
                header["alg"],
                key.alg()
            ));
        }
        let signature = b64.decode(sig).map_err(|_| "signature not base64url".to_string())?;
        if !key.verifies(format!("{h}.{p}").as_bytes(), &signature) {
            return Err("bad signature".into());
        }
        if let Some(aud) = &self.audience {
            let ok = match &claims["aud"] {
                Value::String(a) => a == aud,
                Value::Array(a) => a.iter().any(|x| x == aud),
                _ => false,
            };
            if !ok {
                return Err("wrong aud".into());
            }
        }
        let exp = claims["exp"].as_i64().ok_or("no exp")?;
        if exp <= now {
            return Err("expired".into());
        }
        // CDS Hooks: a token lives at most five minutes (and its jti is remembered that long).
        if exp > now + MAX_TOKEN_LIFE + 60 {
            return Err("exp more than 5 minutes ahead".into());
        }
        if claims["iat"].as_i64().is_none_or(|iat| iat > now + 60) {
            return Err("iat missing or in the future".into());
        }
        let jti = claims["jti"].as_str().ok_or("no jti")?;
        let mut seen = self.seen.lock().expect("jti set");
        seen.retain(|_, until| *until > now);
        if seen.insert(format!("{iss}/{jti}"), exp).is_some() {
            return Err(REPLAY.into());
        }
        Ok(Verified {
            name: name.clone(),
            iss: iss.to_string(),
            jti: jti.to_string(),
            exp,
        })
    }
}

const REPLAY: &str = "jti already used (a replay)";

/// A token whose signature and claims are good.
pub struct Verified {
    pub name: String,
    pub iss: String,
    pub jti: String,
    pub exp: i64,
}

/// The source address of a request's connection (set per connection by `run`).
#[derive(Clone, Copy)]
pub(super) struct ClientAddr(pub std::net::IpAddr);

/// The budget of refused tokens from one source address in one terminal's name: forgeries
/// cost a signature check each, so they are limited where they come from, never on the
/// terminal alone (a forger without its key, elsewhere, must not lock it out). Clients that
/// share an address (behind one proxy) share this budget per terminal they name.
pub(super) fn failure_key(request: &axum::extract::Request, claimed: Option<&str>) -> String {
    let from = match request.extensions().get::<ClientAddr>() {
        Some(ClientAddr(ip)) => ip.to_string(),
        None => "unknown".into(),
    };
    format!("refused:{from}:{}", claimed.unwrap_or("?"))
}

pub(super) async fn authenticate(
    State(s): State<Arc<Service>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    // The discovery and the widget's three files hold no patient data.
    let open = request.method() == axum::http::Method::GET && (path == "/cds-services" || path.starts_with("/widget"));
    if open {
        request.extensions_mut().insert(Caller::default());
        return next.run(request).await;
    }
    let refused = |why: String| (StatusCode::UNAUTHORIZED, Json(json!({"error": why}))).into_response();
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let over_budget = |key: String| match s.limits.take(&key, Instant::now()) {
        Ok(()) => None,
        Err(wait) => {
            let seconds = wait.as_secs() + 1;
            Some(
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, seconds.to_string())],
                    Json(json!({"error": format!("too many calls from this terminal: try again in {seconds} s")})),
                )
                    .into_response(),
            )
        }
    };
    let caller = match authorization.as_deref().and_then(|v| v.split_once(' ')) {
        Some(("Session", token)) => match s.sessions.terminal(token) {
            Some(terminal) => {
                if let Some(answer) = over_budget(rate_key(None, Some(token))) {
                    return answer;
                }
                Caller {
                    name: Some(terminal),
                    session: Some(token.to_string()),
                }
            }
            None => return refused("the session is unknown or has ended: open a new one".into()),
        },
        Some(("Bearer", token)) if s.auth.required() => {
            // Only a verified token takes its terminal's budget; refused ones take their source
            // address's, and past it the address is refused before any signature check.
            let failures = failure_key(&request, s.auth.claimed(token));
            if let Err(wait) = s.failures.has(&failures, Instant::now()) {
                let seconds = wait.as_secs() + 1;
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, seconds.to_string())],
                    Json(json!({"error": format!("too many refused tokens from this address: try again in {seconds} s")})),
                )
                    .into_response();
            }
            let refuse = |why: String| {
                let _ = s.failures.take(&failures, Instant::now());
                refused(format!("token refused: {why}"))
            };
            let verified = match s.auth.verify_claims(token, chrono::Utc::now().timestamp()) {
                Ok(verified) => verified,
                Err(why) => return refuse(why),
            };
            if let Some(answer) = over_budget(rate_key(Some(&verified.iss), None)) {
                return answer;
            }
            // Used jtis are kept in the database too: a replay after serve restarts is refused.
            match s.claim_jti(&verified).await {
                Ok(true) => {}
                Ok(false) => return refuse(REPLAY.into()),
                Err(e) => return db_answer(e).into_response(),
            }
            Caller {
                name: Some(verified.name),
                session: None,
            }
        }
        _ if !s.auth.required() => {
            if let Some(answer) = over_budget(rate_key(None, None)) {
                return answer;
            }
            Caller::default()
        }
        _ => return refused("a Bearer token (CDS Hooks JWT, ES384 or RS384) or a widget session is required".into()),
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}
