//! Incremental detokenisation: emits only the new suffix of the decoded text, and only once
//! it is complete UTF-8 (byte-level tokens can carry half a character).

use crate::error::EngineError;

/// Tokens kept before the read offset so that decoders which depend on context (leading
/// spaces in SentencePiece, byte fallback) decode the new tokens the same way as the whole.
const CONTEXT_TOKENS: usize = 5;

#[derive(Debug, Default)]
pub(crate) struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Adds one token and returns the text it completes (possibly empty).
    pub(crate) fn push<F>(&mut self, id: u32, decode: F) -> Result<String, EngineError>
    where
        F: Fn(&[u32]) -> Result<String, EngineError>,
    {
        self.ids.push(id);
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let new = match full.get(prefix.len()..) {
                Some(s) if full.starts_with(&prefix) => s.to_string(),
                // The decoder rewrote earlier text; fall back to the char-level difference.
                _ => full.chars().skip(prefix.chars().count()).collect(),
            };
            self.read_offset = self.ids.len();
            self.prefix_offset = self.read_offset.saturating_sub(CONTEXT_TOKENS);
            Ok(new)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back (an unfinished multi-byte char) at the end of generation.
    pub(crate) fn flush<F>(&mut self, decode: F) -> Result<String, EngineError>
    where
        F: Fn(&[u32]) -> Result<String, EngineError>,
    {
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fake byte-level vocabulary: token id = one byte.
    fn decode(ids: &[u32]) -> Result<String, EngineError> {
        let bytes: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    #[test]
    fn multibyte_chars_are_never_split() {
        let text = "naïve 日本 ok";
        let mut d = IncrementalDecoder::default();
        let mut deltas = Vec::new();
        for b in text.bytes() {
            let s = d.push(u32::from(b), decode).unwrap();
            assert!(!s.contains('\u{FFFD}'));
            deltas.push(s);
        }
        assert_eq!(deltas.concat(), text);
        // The first two bytes of 日 produce nothing, the third produces the whole char.
        let pos = text.find('日').unwrap();
        assert_eq!(deltas[pos], "");
        assert_eq!(deltas[pos + 1], "");
        assert_eq!(deltas[pos + 2], "日");
    }

    #[test]
    fn flush_releases_incomplete_tail() {
        let mut d = IncrementalDecoder::default();
        assert_eq!(d.push(u32::from(b'a'), decode).unwrap(), "a");
        assert_eq!(d.push(0xE6, decode).unwrap(), "");
        assert_eq!(d.flush(decode).unwrap(), "\u{FFFD}");
    }
}
