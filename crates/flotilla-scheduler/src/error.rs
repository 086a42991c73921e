use flotilla_api::{ApiError, ErrorKind};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SchedulerError {
    #[error(
        "no target can serve model `{model}`: no healthy agent serves it and it has no cloud target"
    )]
    NoTarget { model: String },
}

impl SchedulerError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SchedulerError::NoTarget { .. } => ErrorKind::Unavailable,
        }
    }
    pub fn is_retryable(&self) -> bool {
        true
    }
}

impl From<SchedulerError> for ApiError {
    fn from(e: SchedulerError) -> Self {
        ApiError::new(e.kind(), e.to_string()).with_code("no_target_available")
    }
}
