use thiserror::Error;

/// Errors of the worker. A record the platform refuses is not an error here: it is an
/// outcome, quarantined in the database.
#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("platform unreachable: {0}")]
    Transport(String),
    #[error("platform answer: {0}")]
    Answer(String),
    #[error("token refused: {0}")]
    Token(String),
}
