//! How long an upstream asks to be left alone after a 429 or 503.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

/// The longest wait an upstream's answer is taken at. A hostile or broken upstream could
/// otherwise park a target for days with one header (`Retry-After: 99999999`, or a date
/// years ahead); past this it is tried again and may ask again.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// OpenAI's and Azure's wait in milliseconds (may be fractional), more precise than
/// `Retry-After`'s seconds.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// How long the upstream asked us to wait, at most [`MAX_RETRY_AFTER`]: `retry-after-ms`
/// when it is there and readable, else `Retry-After` (RFC 9110) as delay-seconds or as
/// an HTTP-date (IMF-fixdate, or the obsolete RFC 850 and asctime forms) counted from
/// `now`; a date in the past is no wait. None when neither header is there or readable:
/// garbage is ignored, never an error.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let wait = text(RETRY_AFTER_MS).and_then(millis).or_else(|| {
        text(http::header::RETRY_AFTER.as_str()).and_then(|v| seconds_or_date(v, now))
    })?;
    Some(wait.min(MAX_RETRY_AFTER))
}

fn millis(v: &str) -> Option<Duration> {
    let ms: f64 = v.parse().ok()?;
    if !(ms.is_finite() && ms >= 0.0) {
        return None;
    }
    // Past the cap the exact figure does not matter (and from_secs_f64 would panic on it).
    Some(Duration::try_from_secs_f64(ms / 1e3).unwrap_or(MAX_RETRY_AFTER))
}

fn seconds_or_date(v: &str, now: SystemTime) -> Option<Duration> {
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // Digits too many for a u64 are a wait longer than the cap.
        return Some(v.parse().map_or(MAX_RETRY_AFTER, Duration::from_secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110's example date.
    fn example_now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777)
    }

    fn wait(pairs: &[(&str, &str)]) -> Option<Duration> {
        retry_after(&headers(pairs), example_now())
    }

    #[test]
    fn delay_seconds() {
        assert_eq!(wait(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(wait(&[("Retry-After", " 0 ")]), Some(Duration::ZERO));
    }

    #[test]
    fn http_dates_in_all_three_forms() {
        let ahead = Some(Duration::from_secs(30));
        for date in [
            "Sun, 06 Nov 1994 08:50:07 GMT",
            "Sunday, 06-Nov-94 08:50:07 GMT",
            "Sun Nov  6 08:50:07 1994",
        ] {
            assert_eq!(wait(&[("retry-after", date)]), ahead, "{date}");
        }
    }

    #[test]
    fn a_date_in_the_past_is_no_wait() {
        assert_eq!(
            wait(&[("retry-after", "Sun, 06 Nov 1994 08:00:00 GMT")]),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn retry_after_ms_wins_and_may_be_fractional() {
        assert_eq!(
            wait(&[("retry-after-ms", "1500.5"), ("retry-after", "9")]),
            Some(Duration::from_micros(1_500_500))
        );
        assert_eq!(
            wait(&[("retry-after-ms", "20")]),
            Some(Duration::from_millis(20))
        );
        // An unreadable one gives way to Retry-After.
        assert_eq!(
            wait(&[("retry-after-ms", "soon"), ("retry-after", "9")]),
            Some(Duration::from_secs(9))
        );
    }

    #[test]
    fn garbage_is_ignored() {
        for bad in [
            "",
            "-5",
            "1.5",
            "soon",
            "NaN",
            "Sun, 32 Nov 1994 08:50:07 GMT",
            "Sun, 06 Nov 1994 25:50:07 GMT",
        ] {
            assert_eq!(wait(&[("retry-after", bad)]), None, "{bad:?}");
        }
        for bad in ["-1", "NaN", "inf", "-inf", "1e", "ten"] {
            assert_eq!(wait(&[("retry-after-ms", bad)]), None, "{bad:?}");
        }
        assert_eq!(wait(&[]), None);
        // A value that is not visible ASCII is no header text at all.
        let mut h = HeaderMap::new();
        h.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
        );
        assert_eq!(retry_after(&h, example_now()), None);
    }

    #[test]
    fn absurd_waits_are_capped_at_an_hour() {
        for (name, v) in [
            ("retry-after", "86400"),
            ("retry-after", "99999999999999999999999"),
            ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT"),
            ("retry-after-ms", "1e300"),
            ("retry-after-ms", "99999999999"),
        ] {
            assert_eq!(wait(&[(name, v)]), Some(MAX_RETRY_AFTER), "{name}: {v}");
        }
    }
}
