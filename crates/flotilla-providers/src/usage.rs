//! Our own token count for answers that came without usage; the usage and price types
//! live in flotilla-api, where the scheduler can read them too.

use std::path::Path;

pub use flotilla_api::usage::{OpenAiUsage, Price, PromptDetails, TokenUsage};

/// Our own token count, for answers whose provider reported none and to check those that
/// did: a tokenizer when one is configured, otherwise about four bytes a token.
#[derive(Default)]
pub enum TokenCounter {
    #[default]
    Estimate,
    Tokenizer(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenCounter::Estimate => f.write_str("TokenCounter::Estimate"),
            TokenCounter::Tokenizer(_) => f.write_str("TokenCounter::Tokenizer"),
        }
    }
}

impl TokenCounter {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        tokenizers::Tokenizer::from_file(path)
            .map(|t| TokenCounter::Tokenizer(Box::new(t)))
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn count(&self, text: &str) -> u64 {
        match self {
            TokenCounter::Estimate => estimate_tokens(text),
            TokenCounter::Tokenizer(t) => match t.encode_fast(text, false) {
                Ok(enc) => enc.len() as u64,
                Err(_) => estimate_tokens(text),
            },
        }
    }

    pub fn is_tokenizer(&self) -> bool {
        matches!(self, TokenCounter::Tokenizer(_))
    }
}

/// About four bytes a token, the rule of thumb for English BPE vocabularies.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_rounds_up() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("abcde"), 2);
    }
}
