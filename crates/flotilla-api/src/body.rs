//! Reading a request body within the size limit and parsing it as JSON, with every failure
//! mapped to an OpenAI-shaped 4xx.

use crate::{ApiError, ErrorKind};
use axum::body::Body;
use serde::de::DeserializeOwned;

/// Reads at most `limit` bytes; a longer body is 413.
pub async fn read_limited(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
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
