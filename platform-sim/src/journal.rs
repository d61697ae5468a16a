//! The record of every contract request, for `GET /_sim/requests` and the summary.

use std::collections::VecDeque;

use hmr_protocol::RecordResult;
use serde::Serialize;
use serde_json::Value;

/// Oldest entries are dropped past this many (a long rehearsal must not eat the memory).
const KEEP: usize = 100_000;

/// What a request did to the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// Changed state.
    Applied,
    /// Accepted with no change (older record, same version same content, a read).
    Unchanged,
    /// An idempotent replay of a remembered answer.
    Replayed,
    /// Refused: validation, auth, conflict, unknown reference.
    Rejected,
    /// An injected fault answered it.
    Fault,
    /// A token was issued.
    Auth,
}

#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub seq: u64,
    pub time: String,
    /// The token's org, else the `X-Org-Code` header as sent.
    pub org: Option<String>,
    pub method: String,
    pub path: String,
    pub request_id: Option<String>,
    pub scope: Option<String>,
    pub status: u16,
    pub effect: Effect,
    /// Why it was refused or what it did, in a few words.
    pub message: String,
    /// The JSON body; for other bodies `{"size", "sha256"}`; `null` when empty.
    pub body: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub results: Option<Vec<RecordResult>>,
}

#[derive(Default)]
pub struct Journal {
    entries: VecDeque<Entry>,
    next_seq: u64,
}

impl Journal {
    /// Appends, assigning the next sequence number (from 1).
    pub fn push(&mut self, mut entry: Entry) -> u64 {
        self.next_seq += 1;
        entry.seq = self.next_seq;
        self.entries.push_back(entry);
        if self.entries.len() > KEEP {
            self.entries.pop_front();
        }
        self.next_seq
    }

    pub fn since(&self, seq: u64) -> Vec<Entry> {
        self.entries.iter().filter(|e| e.seq > seq).cloned().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    pub fn last_seq(&self) -> u64 {
        self.next_seq
    }
}

/// How a body is shown in the journal.
pub fn body_summary(content_type: Option<&str>, body: &[u8]) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    let is_json = content_type.is_some_and(|c| c.to_ascii_lowercase().starts_with("application/json"));
    if is_json {
        if let Ok(v) = serde_json::from_slice::<Value>(body) {
            return v;
        }
    }
    serde_json::json!({ "size": body.len(), "sha256": crate::wire::sha256_hex(body) })
}
