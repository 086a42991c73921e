use flotilla_api::{ApiError, ErrorKind};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SchedulerError {
    #[error(
        "no target can serve model `{model}` under strategy `{strategy}`: no healthy agent serves it and it has no cloud target"
    )]
    NoTarget {
        model: String,
        strategy: &'static str,
    },
    /// Every target that could serve the model is out of the request's reach (capabilities,
    /// context length): another attempt would be refused the same way.
    #[error("no target for model `{model}` can take this request: {detail}")]
    Unfit {
        model: String,
        detail: String,
        /// The request field that asked for what no target has.
        param: Option<&'static str>,
        /// Every target that has what it needs is too short for it.
        too_long: bool,
    },
    #[error("every target for model `{model}` is rate-limited; retry later")]
    RateLimited { model: String },
    #[error("every target for model `{model}` is unavailable: {detail}")]
    AllUnhealthy { model: String, detail: String },
    #[error(
        "the local queue for model `{model}` is full ({depth} waiting) and it has no cloud target"
    )]
    QueueFull { model: String, depth: u64 },
    #[error("waited {waited_ms} ms for a local slot for model `{model}`; none came")]
    QueueTimeout { model: String, waited_ms: u64 },
}

impl SchedulerError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SchedulerError::NoTarget { .. } | SchedulerError::AllUnhealthy { .. } => {
                ErrorKind::Unavailable
            }
            SchedulerError::Unfit { .. } => ErrorKind::InvalidRequest,
            SchedulerError::RateLimited { .. } => ErrorKind::RateLimited,
            SchedulerError::QueueFull { .. } => ErrorKind::CapacityExhausted,
            SchedulerError::QueueTimeout { .. } => ErrorKind::DeadlineExceeded,
        }
    }
    pub fn is_retryable(&self) -> bool {
        !matches!(self, SchedulerError::Unfit { .. })
    }
    fn code(&self) -> &'static str {
        match self {
            // No context holds the prompt and the answer: OpenAI's code for it.
            SchedulerError::Unfit { too_long: true, .. } => "context_length_exceeded",
            SchedulerError::Unfit { .. } => "no_fitting_target",
            SchedulerError::RateLimited { .. } => "rate_limited",
            SchedulerError::QueueFull { .. } => "queue_full",
            SchedulerError::QueueTimeout { .. } => "queue_timeout",
            SchedulerError::NoTarget { .. } | SchedulerError::AllUnhealthy { .. } => {
                "no_target_available"
            }
        }
    }
}

impl From<SchedulerError> for ApiError {
    fn from(e: SchedulerError) -> Self {
        let code = e.code();
        let mut err = ApiError::new(e.kind(), e.to_string()).with_code(code);
        if let SchedulerError::Unfit { param: Some(p), .. } = e {
            err.param = Some(p.to_owned());
        }
        err
    }
}
