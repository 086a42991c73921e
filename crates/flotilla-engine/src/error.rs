use std::path::PathBuf;

/// Every failure the engine reports. Variants say where the cause is known: the request
/// (`InvalidRequest`, `ContextLengthExceeded`), the model files, or the runtime.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid request: {message}")]
    InvalidRequest {
        message: String,
        code: Option<&'static str>,
    },
    #[error(
        "this model's maximum context length is {context_length} tokens, but {prompt_tokens} prompt tokens plus max_tokens {max_tokens} were requested"
    )]
    ContextLengthExceeded {
        prompt_tokens: usize,
        max_tokens: usize,
        context_length: usize,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model files in {path}: {message}")]
    ModelFiles { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("model source `{source_name}`: {message}")]
    Source {
        source_name: String,
        message: String,
    },
    #[error("engine for model `{0}` has stopped")]
    EngineStopped(String),
    #[error("{0}")]
    Device(String),
    #[error("engine thread panicked: {0}")]
    Panicked(String),
}

impl EngineError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        EngineError::InvalidRequest {
            message: message.into(),
            code: None,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn files(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        EngineError::ModelFiles {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn tokenizer(err: impl std::fmt::Display) -> Self {
        EngineError::Tokenizer(err.to_string())
    }

    /// True when the caller sent something the model cannot serve (HTTP 400), false for
    /// failures on our side (HTTP 500).
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            EngineError::InvalidRequest { .. } | EngineError::ContextLengthExceeded { .. }
        )
    }

    /// OpenAI-style machine-readable error code, where one applies.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            EngineError::InvalidRequest { code, .. } => *code,
            EngineError::ContextLengthExceeded { .. } => Some("context_length_exceeded"),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let e = EngineError::ContextLengthExceeded {
            prompt_tokens: 10,
            max_tokens: 5,
            context_length: 12,
        };
        assert!(e.is_invalid_request());
        assert_eq!(e.code(), Some("context_length_exceeded"));
        assert!(e.to_string().contains("12"));
        let e = EngineError::EngineStopped("m".into());
        assert!(!e.is_invalid_request());
        assert_eq!(e.code(), None);
        assert!(EngineError::invalid("x").is_invalid_request());
    }
}
