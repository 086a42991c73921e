//! What the policy needs to know about a request, read from its headers and body before
//! any upstream sees it: class, deadlines, routing preference, tag, an estimate of its
//! size, the capabilities it needs and a hash of its leading prompt for affinity.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use axum::http::HeaderMap;
use flotilla_api::{ApiError, headers};
use flotilla_scheduler::{Capability, Priority, RequestInfo, Strategy};
use serde_json::Value;

use crate::SchedulerConfig;
use crate::config::SplitBy;

/// About four characters a token for English text: an estimate for routing only.
const CHARS_PER_TOKEN: u64 = 4;
/// The leading part of a prompt that identifies its prefix (system prompt, few-shot).
const PREFIX_CHARS: usize = 512;

fn header<'a>(h: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.trim())).map_err(|_| {
            ApiError::invalid_param(name, format!("header `{name}` must be visible ASCII"))
        }),
    }
}

fn millis(h: &HeaderMap, name: &str) -> Result<Option<Duration>, ApiError> {
    match header(h, name)? {
        None => Ok(None),
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n > 0 && n <= 86_400_000 => Ok(Some(Duration::from_millis(n))),
            _ => Err(ApiError::invalid_param(
                name,
                format!(
                    "header `{name}` must be a number of milliseconds between 1 and 86400000, got `{v}`"
                ),
            )),
        },
    }
}

/// Reads the scheduling headers and the body's routing features.
pub(crate) fn request_info(
    cfg: &SchedulerConfig,
    body: &Value,
    h: &HeaderMap,
    request_id: &str,
    key: Option<&flotilla_state::ApiKey>,
) -> Result<RequestInfo, ApiError> {
    let defaults = key
        .and_then(|k| cfg.key_defaults.get(&k.name))
        .copied()
        .unwrap_or_default();
    let priority = match header(h, headers::PRIORITY)? {
        None => defaults.priority.unwrap_or(cfg.default_priority),
        Some(v) => Priority::parse(v).ok_or_else(|| {
            ApiError::invalid_param(
                headers::PRIORITY,
                format!(
                    "header `{}` must be `interactive` or `batch`, got `{v}`",
                    headers::PRIORITY
                ),
            )
        })?,
    };
    let strategy = match header(h, headers::ROUTE)? {
        None => defaults.strategy,
        Some(v) => Some(Strategy::parse(v).ok_or_else(|| {
            ApiError::invalid_param(
                headers::ROUTE,
                format!(
                    "header `{}` must be one of cost, latency, failover, weighted, local-only, cloud-only; got `{v}`",
                    headers::ROUTE
                ),
            )
        })?),
    };
    let tag = header(h, headers::TAG)?.map(str::to_owned);
    let class = cfg.class(priority);
    let ttft_deadline = millis(h, headers::TTFT_MS)?.or(class.ttft);
    let deadline = millis(h, headers::DEADLINE_MS)?.or(class.deadline);

    let mut text = 0u64;
    let mut lead = String::new();
    let mut needs = Vec::new();
    // The prefix is the first message (the system prompt, usually) or the prompt's start.
    let add_text = |s: &str, text: &mut u64, lead: &mut String, leading: bool| {
        *text = text.saturating_add(s.len() as u64);
        if leading && lead.len() < PREFIX_CHARS {
            lead.extend(s.chars().take(PREFIX_CHARS - lead.len()));
        }
    };
    if let Some(msgs) = body.get("messages").and_then(Value::as_array) {
        for (i, m) in msgs.iter().enumerate() {
            match m.get("content") {
                Some(Value::String(s)) => add_text(s, &mut text, &mut lead, i == 0),
                Some(Value::Array(parts)) => {
                    for p in parts {
                        match p.get("type").and_then(Value::as_str) {
                            Some("text") => add_text(
                                p.get("text").and_then(Value::as_str).unwrap_or(""),
                                &mut text,
                                &mut lead,
                                i == 0,
                            ),
                            Some("image_url" | "input_image" | "image")
                                if !needs.contains(&Capability::Vision) =>
                            {
                                needs.push(Capability::Vision);
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
    for key in ["prompt", "input"] {
        match body.get(key) {
            Some(Value::String(s)) => add_text(s, &mut text, &mut lead, true),
            Some(Value::Array(items)) => {
                for (n, i) in items.iter().enumerate() {
                    if let Some(s) = i.as_str() {
                        add_text(s, &mut text, &mut lead, n == 0);
                    } else if let Some(toks) = i.as_array() {
                        // Pre-tokenised input: the token count is exact.
                        text = text.saturating_add(toks.len() as u64 * CHARS_PER_TOKEN);
                    } else if i.is_number() {
                        text = text.saturating_add(CHARS_PER_TOKEN);
                    }
                }
            }
            _ => {}
        }
    }
    let non_empty = |k: &str| match body.get(k) {
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Null) | None => false,
        Some(_) => true,
    };
    if non_empty("tools") || non_empty("functions") {
        needs.push(Capability::Tools);
    }
    match body
        .get("response_format")
        .and_then(|f| f.get("type"))
        .and_then(Value::as_str)
    {
        Some("json_schema") => needs.push(Capability::JsonSchema),
        Some("json_object") => needs.push(Capability::JsonObject),
        _ => {}
    }
    needs.sort();

    let requested_max_tokens = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_u64));
    let max_tokens = requested_max_tokens.unwrap_or(cfg.default_max_tokens);
    let hash = |x: &str| {
        let mut hs = DefaultHasher::new();
        x.hash(&mut hs);
        hs.finish()
    };
    Ok(RequestInfo {
        priority,
        ttft_deadline,
        deadline,
        strategy,
        tag,
        // The scheduler's tokenizer where it has one (`usage_tokenizer`), else an estimate.
        prompt_tokens: if cfg.counter.is_tokenizer() {
            cfg.counter.count(&crate::accounting::prompt_text(body))
        } else {
            text.div_ceil(CHARS_PER_TOKEN)
        },
        max_tokens,
        requested_max_tokens,
        needs,
        // A prompt shorter than the prefix window is all prefix: still worth sticking to.
        prefix: (!lead.is_empty()).then(|| hash(&lead)),
        split_key: hash(split_identity(cfg.split_by, body, key).unwrap_or(request_id)),
        waited: Duration::ZERO,
    })
}

/// Who a weighted split keeps on one side: None = draw each request anew.
fn split_identity<'a>(
    by: SplitBy,
    body: &'a Value,
    key: Option<&'a flotilla_state::ApiKey>,
) -> Option<&'a str> {
    let key_name = key.map(|k| k.name.as_str());
    match by {
        SplitBy::Request => None,
        SplitBy::Key => key_name,
        SplitBy::User => body
            .get("user")
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty())
            .or(key_name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use serde_json::json;

    fn cfg() -> SchedulerConfig {
        crate::SchedulerSection::default().validate().unwrap()
    }

    #[test]
    fn headers_and_body_features() {
        let mut h = HeaderMap::new();
        h.insert(headers::PRIORITY, HeaderValue::from_static("batch"));
        h.insert(headers::TTFT_MS, HeaderValue::from_static("1500"));
        h.insert(headers::ROUTE, HeaderValue::from_static("latency"));
        h.insert(headers::TAG, HeaderValue::from_static("eval"));
        let body = json!({"messages": [
            {"role": "system", "content": "x".repeat(400)},
            {"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "image_url", "image_url": {"url": "u"}}]}
        ], "tools": [{"type": "function"}], "max_tokens": 7,
           "response_format": {"type": "json_schema"}});
        let r = request_info(&cfg(), &body, &h, "id", None).unwrap();
        assert_eq!(r.priority, Priority::Batch);
        assert_eq!(r.ttft_deadline, Some(Duration::from_millis(1500)));
        assert_eq!(r.strategy, Some(Strategy::Latency));
        assert_eq!(r.tag.as_deref(), Some("eval"));
        assert_eq!(r.prompt_tokens, 101);
        assert_eq!(r.max_tokens, 7);
        assert_eq!(
            r.needs,
            [
                Capability::Tools,
                Capability::Vision,
                Capability::JsonSchema
            ]
        );
        // Same system prompt, different question: same prefix.
        let other = json!({"messages": [
            {"role": "system", "content": "x".repeat(400)},
            {"role": "user", "content": "y".repeat(300)}
        ]});
        let body2 = json!({"messages": [
            {"role": "system", "content": "x".repeat(400)},
            {"role": "user", "content": "z".repeat(300)}
        ]});
        let a = request_info(&cfg(), &other, &HeaderMap::new(), "a", None).unwrap();
        let b = request_info(&cfg(), &body2, &HeaderMap::new(), "b", None).unwrap();
        assert_eq!(a.prefix, b.prefix);
        // Class defaults apply without headers.
        assert_eq!(a.priority, Priority::Interactive);
        assert_eq!(a.ttft_deadline, Some(Duration::from_secs(10)));
        assert_eq!(a.max_tokens, 256);
    }

    #[test]
    fn json_mode_max_tokens_and_sticky_splits() {
        let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9,
            "response_format": {"type": "json_object"}, "user": "ann"});
        let h = HeaderMap::new();
        let r = request_info(&cfg(), &body, &h, "id-1", None).unwrap();
        assert_eq!(r.needs, [Capability::JsonObject]);
        assert_eq!((r.max_tokens, r.requested_max_tokens), (9, Some(9)));
        let unset = request_info(&cfg(), &json!({"prompt": "x"}), &h, "id", None).unwrap();
        assert_eq!((unset.max_tokens, unset.requested_max_tokens), (256, None));
        // Per request by default; by the body's `user` when asked.
        let other = request_info(&cfg(), &body, &h, "id-2", None).unwrap();
        assert_ne!(r.split_key, other.split_key);
        let mut by_user = cfg();
        by_user.split_by = SplitBy::User;
        let a = request_info(&by_user, &body, &h, "id-1", None).unwrap();
        let b = request_info(&by_user, &body, &h, "id-2", None).unwrap();
        assert_eq!(a.split_key, b.split_key);
    }

    #[test]
    fn bad_headers_are_named() {
        for (name, value) in [
            (headers::PRIORITY, "urgent"),
            (headers::TTFT_MS, "soon"),
            (headers::DEADLINE_MS, "0"),
            (headers::ROUTE, "cheapest"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static(value));
            let e = request_info(&cfg(), &json!({}), &h, "id", None).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(name), "{e:?}");
            assert!(e.message.contains(value), "{}", e.message);
        }
    }
}
