use flotilla_api::ErrorKind;

/// Everything this crate can fail with. Messages never carry a connection password or an API
/// key secret.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StateError {
    /// The database refused or could not be reached; the message is sqlx's, scrubbed.
    #[error("database error: {0}")]
    Db(String),
    /// The caller asked for something malformed (a bad cursor, an empty key name).
    #[error("{0}")]
    InvalidInput(String),
    /// The schema could not be brought up to date.
    #[error("database migration failed: {0}")]
    Migrate(String),
}

impl StateError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            StateError::InvalidInput(_) => ErrorKind::InvalidRequest,
            StateError::Db(_) | StateError::Migrate(_) => ErrorKind::Internal,
        }
    }

    /// A database error may pass (a restart, a lock); bad input and a schema from a newer
    /// build will not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StateError::Db(_))
    }
}

impl From<sqlx::Error> for StateError {
    fn from(e: sqlx::Error) -> Self {
        StateError::Db(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_bad_input_to_400_and_the_rest_to_500() {
        assert_eq!(
            StateError::InvalidInput("x".into()).kind().http_status(),
            400
        );
        assert_eq!(StateError::Db("x".into()).kind().http_status(), 500);
        assert_eq!(StateError::Migrate("x".into()).kind().http_status(), 500);
        assert!(StateError::Db("x".into()).is_retryable());
        assert!(!StateError::InvalidInput("x".into()).is_retryable());
    }
}
