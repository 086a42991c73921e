//! Credentials that must never reach a log line, an error body or a metric label.

use std::fmt;

/// A credential. It has no `Display`, and its `Debug` never shows the value, so it cannot
/// leak into logs or error messages by formatting.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads the named environment variable; unset or empty is an error naming the variable
    /// (never a value).
    pub fn from_env(var: &str) -> Result<Secret, String> {
        match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(Secret(v)),
            _ => Err(format!("environment variable `{var}` is not set or empty")),
        }
    }

    /// Compares without an early exit, so the time taken does not reveal how much of a
    /// guess matched.
    pub fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// Checks an `Authorization: Bearer ...` value against the token a server requires; no
/// token configured means no check. 401 names `what` was missing, never the value.
pub fn check_bearer(
    expected: Option<&Secret>,
    authorization: Option<&str>,
    what: &str,
) -> Result<(), crate::ApiError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let given = authorization
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if expected.matches(given) {
        Ok(())
    } else {
        Err(crate::ApiError::new(
            crate::ErrorKind::Unauthorized,
            format!("missing or wrong {what}"),
        )
        .with_code("invalid_token"))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_formats_and_compares_exactly() {
        let s = Secret::new("sk-very-secret".into());
        assert!(!format!("{s:?}").contains("sk-"));
        assert!(s.matches("sk-very-secret"));
        assert!(!s.matches("sk-very-secreT"));
        assert!(!s.matches("sk-very"));
        assert!(
            Secret::from_env("FLOTILLA_SURELY_UNSET_VARIABLE")
                .unwrap_err()
                .contains("FLOTILLA_SURELY_UNSET_VARIABLE")
        );
    }
}
