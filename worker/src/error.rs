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
    #[error("platform answer: {0}")]
    Answer(String),
    #[error("token refused: {0}")]
    Token(String),
}

/// tokio-postgres prints only "db error"; the server's code and message say what happened.
fn describe_db(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}
