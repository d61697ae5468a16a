use thiserror::Error;

/// Errors of the worker. A record the platform refuses is not an error here: it is an
/// outcome, quarantined in the database.
#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("database: {}", describe_db(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("platform unreachable: {0}")]
    Transport(String),
    /// The HIS database closed the connection (a restart, a crash, a failover): the
    /// database's failure, named as such in the logs and metrics.
    #[error("database connection lost: {0}")]
    DbLost(String),
    #[error("platform answer: {0}")]
    Answer(String),
    #[error("token refused: {0}")]
    Token(String),
    #[error("source: {0}")]
    Source(String),
}

impl WorkerError {
    /// An error of one record's source read (a view that fails for its row, a dropped view,
    /// an unreadable `pdf_path`): that record's to wait for, not the connection's. Errors of
    /// the connection or the server (classes 08, 53, 57P, 58) are not.
    pub fn is_source_error(&self) -> bool {
        match self {
            WorkerError::Db(e) => e.as_db_error().is_some_and(|d| {
                let code = d.code().code();
                !(code.starts_with("08") || code.starts_with("53") || code.starts_with("57P") || code.starts_with("58"))
            }),
            WorkerError::Source(_) => true,
            _ => false,
        }
    }
}

/// tokio-postgres prints only "db error"; the server's code and message say what happened.
fn describe_db(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}
