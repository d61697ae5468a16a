//! Injected faults (control API): latency, error statuses, hangs, rate limits and token
//! expiry, so clients can rehearse every failure the contract allows.

use std::collections::HashMap;

use chrono::{DateTime, Duration, FixedOffset};
use serde::{Deserialize, Serialize};

use crate::error::SimError;

/// `POST /_sim/faults`: every field optional; the set replaces the current one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// Delay every matching call by this much.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Answer matching calls with this status (with `count` and/or `fraction`; alone: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Only the next N matching calls get `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Only this fraction (0..=1) of matching calls get `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    /// Matching calls are held without an answer until the faults change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hang: Option<bool>,
    /// Tokens issued from now on live this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ttl_secs: Option<u64>,
    /// Expire every token issued so far (an action, applied once when posted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_tokens_now: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Apply latency, status, hang, rate limit and hostile answers only to paths starting
    /// with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Answer as a broken gateway or a hostile server would (with `count`/`fraction` like
    /// `status`), so clients can prove they believe only the platform's real answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostile: Option<Hostile>,
}

/// Answers that are not the platform's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum Hostile {
    /// `200 text/html` from a gateway; the request never reached the platform.
    HtmlOk,
    /// `200 {"result":"ok"}`: JSON, but not the envelope; not processed either.
    JsonOk,
    /// A redirect to `location` (plus the request's path); not processed.
    Redirect { location: String, status: u16 },
    /// Processed, then the answer trickles out at one byte a second.
    SlowBody,
    /// Processed, then the connection is cut in the middle of the answer.
    ResetMidBody,
    /// Processed, then an answer larger than any client reads (17 MiB).
    Oversized,
    /// Processed, then an envelope with the success code whose `data` is malformed.
    MalformedAnswer,
}

impl Hostile {
    /// Whether the platform processes the request before the answer goes wrong.
    pub fn processed(&self) -> bool {
        matches!(
            self,
            Hostile::SlowBody | Hostile::ResetMidBody | Hostile::Oversized | Hostile::MalformedAnswer
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    pub retry_after_secs: u64,
    /// The next N matching calls get `429`; absent: every call while set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

impl FaultSpec {
    pub fn check(&self) -> Result<(), SimError> {
        if let Some(s) = self.status {
            if !(400..=599).contains(&s) {
                return Err(SimError::invalid("status", "range"));
            }
        }
        if (self.count.is_some() || self.fraction.is_some()) && self.status.is_none() && self.hostile.is_none() {
            return Err(SimError::invalid("status", "required"));
        }
        if self.status.is_some() && self.hostile.is_some() {
            return Err(SimError::invalid("hostile", "not-allowed"));
        }
        if let Some(Hostile::Redirect { status, location }) = &self.hostile {
            if !(300..=399).contains(status) {
                return Err(SimError::invalid("hostile.status", "range"));
            }
            if location.is_empty() {
                return Err(SimError::invalid("hostile.location", "required"));
            }
        }
        if let Some(f) = self.fraction {
            if !(0.0..=1.0).contains(&f) {
                return Err(SimError::invalid("fraction", "range"));
            }
        }
        if self.token_ttl_secs == Some(0) {
            return Err(SimError::invalid("token_ttl_secs", "range"));
        }
        Ok(())
    }
}

/// The active fault set with its counters, and the org-wide `Retry-After` holds.
#[derive(Debug, Default)]
pub struct Faults {
    pub spec: FaultSpec,
    pub status_left: Option<u64>,
    pub rate_left: Option<u64>,
    /// org → end of its `Retry-After` window.
    pub holds: HashMap<String, DateTime<FixedOffset>>,
}

/// What the faults do to one call.
#[derive(Debug, Default, PartialEq)]
pub struct Injection {
    pub hang: bool,
    pub latency_ms: u64,
    pub answer: Option<Injected>,
    pub hostile: Option<Hostile>,
}

#[derive(Debug, PartialEq)]
pub enum Injected {
    Status(u16),
    RateLimited { retry_after_secs: u64 },
}

impl Faults {
    pub fn set(&mut self, spec: FaultSpec) {
        self.status_left = spec.count;
        self.rate_left = spec.rate_limit.as_ref().and_then(|r| r.count);
        self.spec = spec;
    }

    pub fn clear(&mut self) {
        *self = Faults::default();
    }

    fn matches(&self, path: &str) -> bool {
        self.spec.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
    }

    /// Whether calls on `path` are to be held (checked again whenever the faults change).
    pub fn hangs(&self, path: &str) -> bool {
        self.spec.hang == Some(true) && self.matches(path)
    }

    /// Decides, and counts down, what happens to one call of `org` on `path`.
    pub fn plan(&mut self, path: &str, org: &str, now: DateTime<FixedOffset>) -> Injection {
        let mut plan = Injection {
            hang: self.hangs(path),
            ..Injection::default()
        };
        if plan.hang {
            return plan;
        }
        // A Retry-After given to one request holds for the whole org, on every path.
        if let Some(until) = self.holds.get(org).copied() {
            if until > now {
                let secs = ((until - now).num_milliseconds().max(0) as u64).div_ceil(1000).max(1);
                plan.answer = Some(Injected::RateLimited { retry_after_secs: secs });
                return plan;
            }
            self.holds.remove(org);
        }
        if !self.matches(path) {
            return plan;
        }
        plan.latency_ms = self.spec.latency_ms.unwrap_or(0);
        if let Some(rate) = self.spec.rate_limit.clone() {
            if take(&mut self.rate_left) {
                let secs = rate.retry_after_secs;
                self.holds.insert(org.to_owned(), now + Duration::seconds(secs as i64));
                plan.answer = Some(Injected::RateLimited { retry_after_secs: secs });
                return plan;
            }
        }
        if let Some(hostile) = self.spec.hostile.clone() {
            let chosen = self.spec.fraction.is_none_or(|f| rand::random::<f64>() < f);
            if chosen && take(&mut self.status_left) {
                plan.hostile = Some(hostile);
            }
            return plan;
        }
        if let Some(status) = self.spec.status {
            let chosen = self.spec.fraction.is_none_or(|f| rand::random::<f64>() < f);
            if chosen && take(&mut self.status_left) {
                plan.answer = Some(Injected::Status(status));
            }
        }
        plan
    }
}

/// Takes one from a countdown; `None` means unlimited.
fn take(left: &mut Option<u64>) -> bool {
    match left {
        None => true,
        Some(0) => false,
        Some(n) => {
            *n -= 1;
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<FixedOffset> {
        hmr_protocol::checks::parse_time("2024-06-01T08:00:00+08:00").unwrap()
    }

    #[test]
    fn counts_prefixes_and_holds() {
        let mut f = Faults::default();
        f.set(FaultSpec {
            status: Some(503),
            count: Some(2),
            path_prefix: Some("/api/v1/lab".into()),
            ..Default::default()
        });
        assert_eq!(f.plan("/api/v1/patients", "A", now()).answer, None);
        assert_eq!(
            f.plan("/api/v1/lab-reports", "A", now()).answer,
            Some(Injected::Status(503))
        );
        assert_eq!(
            f.plan("/api/v1/lab-reports", "A", now()).answer,
            Some(Injected::Status(503))
        );
        assert_eq!(f.plan("/api/v1/lab-reports", "A", now()).answer, None);

        f.set(FaultSpec {
            rate_limit: Some(RateLimitSpec {
                retry_after_secs: 2,
                count: Some(1),
            }),
            ..Default::default()
        });
        assert_eq!(
            f.plan("/x", "A", now()).answer,
            Some(Injected::RateLimited { retry_after_secs: 2 })
        );
        // Held for the org, even though the count is spent; not for another org.
        assert!(matches!(
            f.plan("/y", "A", now() + Duration::seconds(1)).answer,
            Some(Injected::RateLimited { .. })
        ));
        assert_eq!(f.plan("/y", "B", now()).answer, None);
        assert_eq!(f.plan("/y", "A", now() + Duration::seconds(3)).answer, None);
    }

    #[test]
    fn spec_checks() {
        assert!(FaultSpec {
            count: Some(1),
            ..Default::default()
        }
        .check()
        .is_err());
        assert!(FaultSpec {
            status: Some(200),
            ..Default::default()
        }
        .check()
        .is_err());
        assert!(FaultSpec {
            status: Some(500),
            fraction: Some(1.5),
            ..Default::default()
        }
        .check()
        .is_err());
        assert!(FaultSpec {
            status: Some(500),
            fraction: Some(0.3),
            ..Default::default()
        }
        .check()
        .is_ok());
    }
}
