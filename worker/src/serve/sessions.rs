//! Widget sessions: one patient, visit and doctor, and what the session was shown.

use super::*;

/// What a session was shown, and so may act on.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(super) enum Seen {
    Check,
    Report,
}

pub(super) struct Session {
    /// The terminal that opened it (recorded with its calls and decisions).
    pub(super) terminal: String,
    pub(super) patient_id: String,
    pub(super) visit_no: String,
    pub(super) doctor_no: String,
    pub(super) visit_type: String,
    pub(super) until: Instant,
    pub(super) seen: HashSet<(Seen, String)>,
}

/// Sessions live in the service's memory: a restart ends them, and the workstation opens a
/// new one (as it does for every patient).
pub(super) struct Sessions {
    lasts: Duration,
    open: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    pub(super) fn new(lasts: Duration) -> Sessions {
        Sessions {
            lasts,
            open: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn open(&self, mut session: Session) -> (String, Duration) {
        use rand::RngCore as _;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let token = hex::encode(bytes);
        let now = Instant::now();
        session.until = now + self.lasts;
        let mut open = self.open.lock().expect("sessions");
        open.retain(|_, s| s.until > now);
        open.insert(token.clone(), session);
        (token, self.lasts)
    }

    /// The terminal behind a live session.
    pub(super) fn terminal(&self, token: &str) -> Option<String> {
        let now = Instant::now();
        let mut open = self.open.lock().expect("sessions");
        open.retain(|_, s| s.until > now);
        open.get(token).map(|s| s.terminal.clone())
    }

    /// A session's request is about its own patient, visit and doctor: missing fields are
    /// filled in, other values refused.
    pub(super) fn bind(&self, caller: &Caller, body: &mut Value) -> Result<(), (StatusCode, Json<Value>)> {
        let Some(token) = &caller.session else { return Ok(()) };
        let Some(fields) = body.as_object_mut() else {
            return Err(bad("the request is a JSON object"));
        };
        let open = self.open.lock().expect("sessions");
        let session = open.get(token).ok_or_else(|| forbidden("the session has ended"))?;
        for (field, value) in [
            ("patient_id", &session.patient_id),
            ("visit_no", &session.visit_no),
            ("doctor_no", &session.doctor_no),
            ("visit_type", &session.visit_type),
        ] {
            match fields.get(field) {
                None | Some(Value::Null) => {
                    fields.insert(field.into(), json!(value));
                }
                Some(v) if v.as_str() == Some(value.as_str()) => {}
                Some(_) => return Err(forbidden(format!("this session is for another {field}"))),
            }
        }
        Ok(())
    }

    /// Keeps the checks and reports an answer showed the session.
    pub(super) fn remember(&self, caller: &Caller, answer: &impl hmr_protocol::answers::Shown) {
        let Some(token) = &caller.session else { return };
        let mut open = self.open.lock().expect("sessions");
        let Some(session) = open.get_mut(token) else { return };
        if let Some(check) = answer.check_id() {
            session.seen.insert((Seen::Check, check.to_string()));
        }
        for id in answer.report_ids() {
            session.seen.insert((Seen::Report, id.to_string()));
        }
    }

    /// May this caller act on `id`? Terminals may; a session only on what it was shown.
    pub(super) fn allows(&self, caller: &Caller, what: Seen, id: &str) -> bool {
        let Some(token) = &caller.session else { return true };
        let open = self.open.lock().expect("sessions");
        open.get(token)
            .is_some_and(|s| s.seen.contains(&(what, id.to_string())))
    }
}

// ------------------------------------------------------------------ rate limits
