//! The error taxonomy every crate classifies into, and the OpenAI-shaped error body.

use serde::{Deserialize, Serialize};

/// What kind of failure happened; decides the HTTP status (in exactly one place,
/// [`ErrorKind::http_status`]) and doubles as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    InvalidRequest,
    /// The client did not send its request in time.
    RequestTimeout,
    PayloadTooLarge,
    Unauthorized,
    NotFound,
    RateLimited,
    CapacityExhausted,
    Unavailable,
    DeadlineExceeded,
    Upstream,
    Internal,
}

impl ErrorKind {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequest => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::NotFound => 404,
            ErrorKind::RequestTimeout => 408,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::RateLimited => 429,
            ErrorKind::Internal => 500,
            ErrorKind::Upstream => 502,
            ErrorKind::CapacityExhausted | ErrorKind::Unavailable => 503,
            ErrorKind::DeadlineExceeded => 504,
        }
    }

    /// The `error.type` string OpenAI clients expect.
    pub fn openai_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest
            | ErrorKind::RequestTimeout
            | ErrorKind::PayloadTooLarge
            | ErrorKind::NotFound => "invalid_request_error",
            ErrorKind::Unauthorized => "authentication_error",
            ErrorKind::RateLimited => "rate_limit_error",
            ErrorKind::CapacityExhausted | ErrorKind::Unavailable => "service_unavailable",
            ErrorKind::DeadlineExceeded => "timeout",
            ErrorKind::Upstream => "upstream_error",
            ErrorKind::Internal => "server_error",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::NotFound => "not_found",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::CapacityExhausted => "capacity_exhausted",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Upstream => "upstream",
            ErrorKind::Internal => "internal",
        }
    }
}

/// An error as a client sees it: kind, message and the optional OpenAI `param`/`code`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
    /// Sent as `Retry-After` (whole seconds, rounded up) with a 429 or 503.
    pub retry_after: Option<std::time::Duration>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }
    pub fn with_retry_after(mut self, d: std::time::Duration) -> Self {
        self.retry_after = Some(d);
        self
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
    }
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(message).with_param(param)
    }
    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_owned());
        self
    }
    pub fn with_code(mut self, code: &str) -> Self {
        self.code = Some(code.to_owned());
        self
    }
    pub fn model_not_found(model: &str) -> Self {
        ApiError::new(
            ErrorKind::NotFound,
            format!("The model `{model}` does not exist or is not served here."),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                r#type: self.kind.openai_type().to_owned(),
                param: self.param.clone(),
                code: self.code.clone(),
            },
        }
    }
}

/// `{"error": {"message", "type", "param", "code"}}` as OpenAI sends it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type", default)]
    pub r#type: String,
    #[serde(default)]
    pub param: Option<String>,
    #[serde(default, deserialize_with = "code_as_string")]
    pub code: Option<String>,
}

/// Providers send `code` as a string, a number or null.
fn code_as_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    Ok(match v {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s),
        Some(other) => Some(other.to_string()),
    })
}

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        let status = axum::http::StatusCode::from_u16(self.kind.http_status())
            .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, axum::Json(self.body())).into_response();
        if let Some(d) = self.retry_after {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            if let Ok(v) = axum::http::HeaderValue::from_str(&secs.max(1).to_string()) {
                resp.headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_openai_shape() {
        let e = ApiError::model_not_found("nope");
        let v = serde_json::to_value(e.body()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(e.kind.http_status(), 404);
    }

    #[test]
    fn numeric_codes_parse() {
        let b: ErrorBody =
            serde_json::from_str(r#"{"error":{"message":"x","type":"t","code":429}}"#).unwrap();
        assert_eq!(b.error.code.as_deref(), Some("429"));
    }
}
