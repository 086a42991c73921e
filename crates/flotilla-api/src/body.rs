//! Reading a request body within the size limit and parsing it as JSON, with every failure
//! mapped to an OpenAI-shaped 4xx.

use crate::{ApiError, ErrorKind};
use axum::body::Body;
use serde::de::DeserializeOwned;

/// The default for how long a client may take to send its whole body. A slower one gets
/// 408 and the server task back, instead of holding it forever.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads at most `limit` bytes within `timeout`; a longer body is 413, a slower one 408.
pub async fn read_limited(
    body: Body,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<axum::body::Bytes, ApiError> {
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit));
    let Ok(result) = read.await else {
        return Err(ApiError::new(
            ErrorKind::RequestTimeout,
            format!(
                "request body not received within {} ms",
                timeout.as_millis()
            ),
        ));
    };
    result.map_err(|e| {
        // to_bytes reports the limit as http-body-util's LengthLimitError ("length limit
        // exceeded") somewhere in the source chain.
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = src {
            if s.to_string().contains("length limit exceeded") {
                return ApiError::new(
                    ErrorKind::PayloadTooLarge,
                    format!("request body is larger than the limit of {limit} bytes"),
                )
                .with_code("request_too_large");
            }
            src = s.source();
        }
        ApiError::invalid(format!("could not read the request body: {e}"))
    })
}

/// Parses JSON into `T`, naming the position and the problem on failure.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::invalid(
            "request body is empty; expected a JSON object",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "malformed JSON"
        } else {
            "invalid request"
        };
        ApiError::invalid(format!("{what}: {e}"))
    })
}
