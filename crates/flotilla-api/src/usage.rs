//! Token usage in one shape whatever the provider reported, and prices per million tokens.

use serde::{Deserialize, Serialize};

/// Tokens one request used. `prompt` counts every prompt token, cached ones included;
/// `cached_prompt` says how many of them were read from the provider's prompt cache (and
/// are priced at the cached rate), `cache_write_prompt` how many were written to it
/// (Anthropic's `cache_creation_input_tokens`, priced at the cache-write rate).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    pub prompt: u64,
    pub completion: u64,
    pub cached_prompt: u64,
    #[serde(default)]
    pub cache_write_prompt: u64,
}

/// OpenAI's `usage` object as read from answers and final chunks.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct OpenAiUsage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct PromptDetails {
    #[serde(default)]
    pub cached_tokens: Option<u64>,
}

impl From<OpenAiUsage> for TokenUsage {
    fn from(u: OpenAiUsage) -> Self {
        TokenUsage {
            prompt: u.prompt_tokens,
            completion: u.completion_tokens,
            cached_prompt: u
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0)
                .min(u.prompt_tokens),
            // OpenAI's API bills no cache writes.
            cache_write_prompt: 0,
        }
    }
}

/// US dollars per million tokens. Any price left unset is unknown, and so is the cost of a
/// request that needs it: never $0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    #[serde(default)]
    pub input_usd_per_mtok: Option<f64>,
    #[serde(default)]
    pub output_usd_per_mtok: Option<f64>,
    /// Prompt tokens read from the provider's cache.
    #[serde(default)]
    pub cached_input_usd_per_mtok: Option<f64>,
    /// Prompt tokens written to the provider's cache. Unset = the input price; for an
    /// Anthropic provider the config fills in 1.25x the input price, Anthropic's price of a
    /// 5-minute cache write (`ProviderKind::complete_price` in flotilla-providers).
    #[serde(default)]
    pub cache_write_usd_per_mtok: Option<f64>,
}

impl Price {
    /// The cost of `u`, or None when a price it needs is unknown. Uncached prompt tokens
    /// are priced at the input rate, cache reads at the cached rate, cache writes at the
    /// cache-write rate (the input rate when unset), completion tokens at the output rate.
    /// A request with cached tokens and no cached price has an unknown cost rather than a
    /// guessed one.
    pub fn cost(&self, u: &TokenUsage) -> Option<f64> {
        let cached = u.cached_prompt.min(u.prompt);
        let written = u.cache_write_prompt.min(u.prompt - cached);
        let fresh = u.prompt - cached - written;
        // Nothing is priced that was not used: an unknown price only matters when needed.
        let priced = |n: u64, price: Option<f64>| match n {
            0 => Some(0.0),
            n => price.map(|p| p * n as f64),
        };
        let input = priced(fresh, self.input_usd_per_mtok)?;
        let cached_cost = priced(cached, self.cached_input_usd_per_mtok)?;
        let write_price = self.cache_write_usd_per_mtok.or(self.input_usd_per_mtok);
        let written_cost = priced(written, write_price)?;
        let output = priced(u.completion, self.output_usd_per_mtok)?;
        Some((input + cached_cost + written_cost + output) / 1e6)
    }

    /// The most a request of `prompt` tokens and at most `completion` tokens can cost
    /// (no cache discount assumed); None when a price is unknown.
    pub fn max_cost(&self, prompt: u64, completion: u64) -> Option<f64> {
        // Cache writes dearer than input (Anthropic's 1.25x): the whole prompt may be one.
        let writes_dearer = matches!(
            (self.cache_write_usd_per_mtok, self.input_usd_per_mtok),
            (Some(w), Some(i)) if w > i
        );
        self.cost(&TokenUsage {
            prompt,
            completion,
            cached_prompt: 0,
            cache_write_prompt: if writes_dearer { prompt } else { 0 },
        })
    }

    /// Each unset price taken from `fallback`.
    pub fn or(&self, fallback: &Price) -> Price {
        Price {
            input_usd_per_mtok: self.input_usd_per_mtok.or(fallback.input_usd_per_mtok),
            output_usd_per_mtok: self.output_usd_per_mtok.or(fallback.output_usd_per_mtok),
            cached_input_usd_per_mtok: self
                .cached_input_usd_per_mtok
                .or(fallback.cached_input_usd_per_mtok),
            cache_write_usd_per_mtok: self
                .cache_write_usd_per_mtok
                .or(fallback.cache_write_usd_per_mtok),
        }
    }

    /// Names of the prices that are negative or not numbers.
    pub fn invalid(&self) -> Vec<&'static str> {
        [
            ("input_usd_per_mtok", self.input_usd_per_mtok),
            ("output_usd_per_mtok", self.output_usd_per_mtok),
            ("cached_input_usd_per_mtok", self.cached_input_usd_per_mtok),
            ("cache_write_usd_per_mtok", self.cache_write_usd_per_mtok),
        ]
        .into_iter()
        .filter(|(_, v)| v.is_some_and(|p| !(p >= 0.0 && p.is_finite())))
        .map(|(k, _)| k)
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_tokens_are_priced_at_their_own_rate() {
        let p = Price {
            input_usd_per_mtok: Some(2.0),
            output_usd_per_mtok: Some(8.0),
            cached_input_usd_per_mtok: Some(0.5),
            cache_write_usd_per_mtok: None,
        };
        let u = TokenUsage {
            prompt: 1000,
            completion: 100,
            cached_prompt: 400,
            cache_write_prompt: 0,
        };
        // 600 fresh at $2, 400 cached at $0.50, 100 out at $8, per million.
        let want = (600.0 * 2.0 + 400.0 * 0.5 + 100.0 * 8.0) / 1e6;
        assert!((p.cost(&u).unwrap() - want).abs() < 1e-12);
    }

    #[test]
    fn cache_writes_are_priced_at_their_own_rate_or_the_input_rate() {
        let u = TokenUsage {
            prompt: 1000,
            completion: 100,
            cached_prompt: 300,
            cache_write_prompt: 200,
        };
        let p = Price {
            input_usd_per_mtok: Some(3.0),
            output_usd_per_mtok: Some(15.0),
            cached_input_usd_per_mtok: Some(0.3),
            cache_write_usd_per_mtok: Some(3.75),
        };
        // 500 uncached at $3, 300 read at $0.30, 200 written at $3.75, 100 out at $15.
        let want = (500.0 * 3.0 + 300.0 * 0.3 + 200.0 * 3.75 + 100.0 * 15.0) / 1e6;
        assert!((p.cost(&u).unwrap() - want).abs() < 1e-12);
        // Unset: written tokens cost what any input token does.
        let plain = Price {
            cache_write_usd_per_mtok: None,
            ..p
        };
        let want = (700.0 * 3.0 + 300.0 * 0.3 + 100.0 * 15.0) / 1e6;
        assert!((plain.cost(&u).unwrap() - want).abs() < 1e-12);
        // More writes reported than uncached tokens are capped, never an underflow.
        let odd = TokenUsage {
            cache_write_prompt: 5000,
            ..u
        };
        let want = (700.0 * 3.75 + 300.0 * 0.3 + 100.0 * 15.0) / 1e6;
        assert!((p.cost(&odd).unwrap() - want).abs() < 1e-12);
        assert_eq!(
            Price {
                input_usd_per_mtok: None,
                ..plain
            }
            .cost(&TokenUsage {
                cached_prompt: 0,
                cache_write_prompt: 10,
                prompt: 10,
                completion: 0
            }),
            None,
            "a write with neither price known has an unknown cost"
        );
    }

    #[test]
    fn a_usage_without_cache_writes_still_reads() {
        let u: TokenUsage =
            serde_json::from_str(r#"{"prompt":3,"completion":1,"cached_prompt":0}"#).unwrap();
        assert_eq!(u.cache_write_prompt, 0);
    }

    #[test]
    fn an_unknown_price_is_an_unknown_cost_not_zero() {
        let p = Price {
            input_usd_per_mtok: Some(2.0),
            output_usd_per_mtok: None,
            cached_input_usd_per_mtok: None,
            cache_write_usd_per_mtok: None,
        };
        let u = TokenUsage {
            prompt: 10,
            completion: 1,
            cached_prompt: 0,
            cache_write_prompt: 0,
        };
        assert_eq!(p.cost(&u), None);
        let cached = TokenUsage {
            prompt: 10,
            completion: 0,
            cached_prompt: 5,
            cache_write_prompt: 0,
        };
        assert_eq!(p.cost(&cached), None);
        assert_eq!(Price::default().cost(&TokenUsage::default()), Some(0.0));
    }

    #[test]
    fn openai_usage_reads_cached_tokens() {
        let u: OpenAiUsage = serde_json::from_str(
            r#"{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":8}}"#,
        )
        .unwrap();
        assert_eq!(
            TokenUsage::from(u),
            TokenUsage {
                prompt: 9,
                completion: 2,
                cached_prompt: 8,
                cache_write_prompt: 0,
            }
        );
    }
}
