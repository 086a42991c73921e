use std::time::Duration;

use flotilla_api::error::ErrorBody;
use flotilla_api::{ApiError, ErrorKind};

/// One failed attempt at one upstream.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{target}: connection failed: {reason}")]
    Connect { target: String, reason: String },
    #[error("{target}: no response within {after:?}")]
    Timeout { target: String, after: Duration },
    #[error("{target}: HTTP {status}: {message}")]
    Status {
        target: String,
        status: u16,
        message: String,
        /// The upstream's own OpenAI-shaped body, passed to the client for 4xx answers.
        body: Option<Box<ErrorBody>>,
        retry_after: Option<Duration>,
    },
    #[error("{target}: reading the response failed: {reason}")]
    Body { target: String, reason: String },
    /// A whole answer past [`crate::ReadLimits::max_response_bytes`]: the read stopped
    /// there (or never began, when its `Content-Length` said so) and the next target is
    /// tried.
    #[error("{target}: answer larger than max_response_bytes ({limit} bytes)")]
    TooLarge { target: String, limit: usize },
    #[error("{target}: API key variable `{var}` is not set")]
    MissingKey { target: String, var: String },
    /// The request asks for something this provider's API cannot express.
    #[error("{target}: {message}")]
    Unsupported {
        target: String,
        param: Option<String>,
        message: String,
    },
}

impl ProviderError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProviderError::Connect { .. } => ErrorKind::Unavailable,
            ProviderError::Timeout { .. } => ErrorKind::DeadlineExceeded,
            ProviderError::Status { status, .. } => match *status {
                429 => ErrorKind::RateLimited,
                401 | 403 => ErrorKind::Upstream,
                404 => ErrorKind::NotFound,
                413 => ErrorKind::PayloadTooLarge,
                400..=499 => ErrorKind::InvalidRequest,
                _ => ErrorKind::Upstream,
            },
            ProviderError::Body { .. } | ProviderError::TooLarge { .. } => ErrorKind::Upstream,
            ProviderError::MissingKey { .. } => ErrorKind::Unavailable,
            ProviderError::Unsupported { .. } => ErrorKind::InvalidRequest,
        }
    }

    /// Whether the next target should be tried: the request itself was not at fault.
    /// Connection errors, timeouts before the first byte, 5xx, 429 and upstream auth
    /// failures (our key, not the client's) are; other 4xx answers are the client's to see.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => {
                matches!(*status, 401 | 403 | 404 | 408 | 409 | 429 | 500..=599)
            }
            // Another target may well take it (an OpenAI-compatible one, say).
            ProviderError::Unsupported { .. } => true,
            // Another target's answer to the same request may well be smaller.
            ProviderError::TooLarge { .. } => true,
            _ => true,
        }
    }

    /// A 400 that says the target cannot take this request as asked (a parameter it does
    /// not support, a context too short), not that the request is wrong: another target
    /// may well take it.
    pub fn refuses_fit(&self) -> bool {
        let ProviderError::Status {
            status: 400,
            body: Some(body),
            ..
        } = self
        else {
            return matches!(self, ProviderError::Unsupported { .. });
        };
        matches!(
            body.error.code.as_deref(),
            Some("unsupported_parameter" | "context_length_exceeded")
        )
    }

    pub fn target(&self) -> &str {
        match self {
            ProviderError::Connect { target, .. }
            | ProviderError::Timeout { target, .. }
            | ProviderError::Status { target, .. }
            | ProviderError::Body { target, .. }
            | ProviderError::TooLarge { target, .. }
            | ProviderError::MissingKey { target, .. }
            | ProviderError::Unsupported { target, .. } => target,
        }
    }

    /// What the client sees when this is the final answer: a non-retryable 4xx keeps the
    /// upstream's message, type, param and code.
    pub fn to_api_error(&self) -> ApiError {
        if let ProviderError::Status {
            body: Some(body),
            status,
            ..
        } = self
            && (400..500).contains(status)
        {
            return ApiError {
                kind: self.kind(),
                message: body.error.message.clone(),
                param: body.error.param.clone(),
                code: body.error.code.clone(),
                retry_after: None,
            };
        }
        if let ProviderError::Unsupported { param, message, .. } = self {
            return ApiError {
                kind: ErrorKind::InvalidRequest,
                message: message.clone(),
                param: param.clone(),
                code: None,
                retry_after: None,
            };
        }
        ApiError::new(self.kind(), self.to_string())
    }
}
