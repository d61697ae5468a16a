//! Section 2: the token endpoint (password and signature grants) and token checks.

use axum::http::{header, HeaderMap};
use chrono::{DateTime, Duration, FixedOffset};
use hmr_protocol::checks::FUTURE_SLACK_SECS;
use hmr_protocol::{Scope, TokenAnswer, TokenRequest};
use rand::RngCore;
use serde_json::Value;

use crate::error::SimError;
use crate::handler::{Rendered, Trace};
use crate::journal::Effect;
use crate::state::{State, TokenInfo};
use crate::{wire, OrgConfig, SimConfig};

/// `POST /api/v1/auth/token`. `org` is the already-checked `X-Org-Code`.
pub fn issue(
    st: &mut State,
    cfg: &SimConfig,
    org: &str,
    headers: &HeaderMap,
    body: &[u8],
    now: DateTime<FixedOffset>,
    trace: &mut Trace,
) -> Result<Rendered, SimError> {
    let value = wire::json_value(headers, body)?;
    precheck(&value)?;
    let request: TokenRequest = wire::typed(value)?;
    let scope = request.scope();
    trace.scope = Some(scope);
    let Some(account) = cfg.orgs.iter().find(|o| o.code == org) else {
        return Err(SimError::Unauthorized(format!(
            "org {org} has no account on this platform"
        )));
    };
    match &request {
        TokenRequest::Password { username, password, .. } => {
            require_text(&[("username", username), ("password", password)])?;
            if username != &account.username || password != &account.password {
                return Err(SimError::Unauthorized("wrong username or password for this org".into()));
            }
        }
        TokenRequest::Signature {
            app_id,
            timestamp,
            nonce,
            sign_alg,
            sign,
            ..
        } => {
            require_text(&[("appId", app_id), ("nonce", nonce), ("sign", sign)])?;
            check_signature(st, account, app_id, *timestamp, nonce, *sign_alg, sign, now)?;
        }
    }
    let ttl = st.faults.spec.token_ttl_secs.unwrap_or(cfg.token_ttl_secs);
    let token = new_token();
    st.tokens.insert(
        token.clone(),
        TokenInfo {
            org: org.to_owned(),
            scope,
            expires_at: now + Duration::seconds(ttl as i64),
        },
    );
    let answer = TokenAnswer {
        access_token: token,
        token_type: "Bearer".into(),
        expires_in: ttl,
    };
    Ok(Rendered::ok(
        &answer,
        Effect::Auth,
        format!("token for {} issued, {ttl} s", scope.as_str()),
    ))
}

#[allow(clippy::too_many_arguments)]
fn check_signature(
    st: &mut State,
    account: &OrgConfig,
    app_id: &str,
    timestamp: i64,
    nonce: &str,
    alg: hmr_protocol::SignAlg,
    sign: &str,
    now: DateTime<FixedOffset>,
) -> Result<(), SimError> {
    if app_id != account.app_id {
        return Err(SimError::Unauthorized("unknown appId for this org".into()));
    }
    // Lower-case hex only (section 7); verify compares exactly.
    if !hmr_protocol::sign::verify(alg, &account.app_secret, app_id, timestamp, nonce, sign) {
        return Err(SimError::Unauthorized("signature does not verify".into()));
    }
    if (timestamp - now.timestamp_millis()).abs() > FUTURE_SLACK_SECS * 1000 {
        return Err(SimError::Unauthorized(
            "timestamp more than 300 s from the platform clock".into(),
        ));
    }
    // Remembered only once the signature verified, so forged requests cannot burn nonces.
    if !st.nonces.insert((app_id.to_owned(), nonce.to_owned())) {
        return Err(SimError::Unauthorized("nonce already used".into()));
    }
    Ok(())
}

/// The token request is an internally tagged enum, whose serde errors lose the field path:
/// check the tag, the scope and the integer timestamp first so errors name their field.
fn precheck(value: &Value) -> Result<(), SimError> {
    let Some(obj) = value.as_object() else {
        return Err(SimError::invalid("body", "type"));
    };
    match obj.get("grantType") {
        None => return Err(SimError::invalid("grantType", "required")),
        Some(Value::String(g)) if g == "password" || g == "signature" => {}
        Some(Value::String(_)) => return Err(SimError::invalid("grantType", "code")),
        Some(_) => return Err(SimError::invalid("grantType", "type")),
    }
    match obj.get("scope") {
        None => return Err(SimError::invalid("scope", "required")),
        Some(Value::String(s)) if Scope::parse(s).is_some() => {}
        Some(Value::String(_)) => return Err(SimError::invalid("scope", "code")),
        Some(_) => return Err(SimError::invalid("scope", "type")),
    }
    if let Some(ts) = obj.get("timestamp") {
        if !ts.is_i64() {
            return Err(SimError::invalid("timestamp", "type"));
        }
    }
    if let Some(alg) = obj.get("signAlg") {
        if !matches!(alg.as_str(), Some("HMAC-SHA256" | "HMAC-SM3")) {
            return Err(SimError::invalid("signAlg", "code"));
        }
    }
    for key in ["username", "password", "appId", "nonce", "sign"] {
        if obj.get(key).is_some_and(|v| !v.is_string()) {
            return Err(SimError::invalid(key, "type"));
        }
    }
    Ok(())
}

fn require_text(fields: &[(&str, &String)]) -> Result<(), SimError> {
    let errors: Vec<_> = fields
        .iter()
        .filter(|(_, v)| v.trim().is_empty())
        .map(|(f, _)| hmr_protocol::FieldError::new(*f, "required"))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(SimError::Invalid(errors))
    }
}

fn new_token() -> String {
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("sim.{}", hex::encode(bytes))
}

/// The bearer token of a contract call: known, unexpired, of the org in `X-Org-Code`
/// (else `403`) and of the scope the endpoint belongs to (else `403`).
pub fn authenticate(
    st: &mut State,
    headers: &HeaderMap,
    org: &str,
    scope: Scope,
    now: DateTime<FixedOffset>,
) -> Result<TokenInfo, SimError> {
    let raw = wire::header(headers, header::AUTHORIZATION.as_str())
        .ok_or_else(|| SimError::Unauthorized("Authorization header missing".into()))?;
    let token = match raw.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("Bearer") && !t.trim().is_empty() => t.trim(),
        _ => return Err(SimError::Unauthorized("Authorization is not a Bearer token".into())),
    };
    let Some(info) = st.tokens.get(token).cloned() else {
        return Err(SimError::Unauthorized("unknown token".into()));
    };
    if info.expires_at <= now {
        st.tokens.remove(token);
        return Err(SimError::Unauthorized("token expired".into()));
    }
    if info.org != org {
        return Err(SimError::Forbidden(format!(
            "token belongs to {}, X-Org-Code is {org}",
            info.org
        )));
    }
    if info.scope != scope {
        return Err(SimError::Forbidden(format!(
            "token scope {} may not call this ({} needed)",
            info.scope.as_str(),
            scope.as_str()
        )));
    }
    Ok(info)
}

/// `expire_tokens_now`: every token issued so far stops working.
pub fn expire_all(st: &mut State) {
    st.tokens.clear();
}
