//! Stop-string matching with hold-back, OpenAI semantics: the output ends just before the
//! first stop string, which is never emitted, and no streamed delta ever carries a prefix of
//! a stop string that might still complete.

#[derive(Debug, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    /// Text decoded but not yet released, because it may be the start of a stop string.
    pending: String,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct StopOutput {
    /// Text safe to emit now.
    pub emit: String,
    /// A stop string matched; `emit` ends right before it.
    pub stopped: bool,
}

impl StopMatcher {
    pub(crate) fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    pub(crate) fn push(&mut self, text: &str) -> StopOutput {
        self.pending.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(pos) = first {
            let emit = self.pending[..pos].to_string();
            self.pending.clear();
            return StopOutput {
                emit,
                stopped: true,
            };
        }
        let hold = self.holdback_len();
        let cut = self.pending.len() - hold;
        let emit = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopOutput {
            emit,
            stopped: false,
        }
    }

    /// Releases held-back text when generation ends for another reason.
    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Bytes at the end of `pending` that form a proper prefix of some stop string.
    fn holdback_len(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            for (start, _) in self.pending.char_indices() {
                let tail = &self.pending[start..];
                if tail.len() <= best {
                    break;
                }
                if tail.len() < stop.len() && stop.starts_with(tail) {
                    best = tail.len();
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds a fake token stream and returns (deltas, stopped).
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = Vec::new();
        for p in pieces {
            let o = m.push(p);
            if !o.emit.is_empty() {
                out.push(o.emit);
            }
            if o.stopped {
                return (out, true);
            }
        }
        let rest = m.finish();
        if !rest.is_empty() {
            out.push(rest);
        }
        (out, false)
    }

    #[test]
    fn stop_split_across_tokens_is_never_emitted() {
        let (deltas, stopped) = run(&["END"], &["hello ", "wor", "ld E", "N", "D more"]);
        assert!(stopped);
        assert_eq!(deltas.concat(), "hello world ");
        for d in &deltas {
            assert!(
                !d.contains('E'),
                "delta {d:?} leaked part of the stop string"
            );
        }
    }

    #[test]
    fn false_prefix_is_released() {
        let (deltas, stopped) = run(&["END"], &["a E", "N", "x", "y"]);
        assert!(!stopped);
        assert_eq!(deltas.concat(), "a ENxy");
        assert_eq!(deltas[0], "a ");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (deltas, stopped) = run(&["zz", "b"], &["aaazzb"]);
        assert!(stopped);
        assert_eq!(deltas.concat(), "aaa");
        let (deltas, stopped) = run(&["\n\n", "."], &["one", " two", "\n", "\nthree"]);
        assert!(stopped);
        assert_eq!(deltas.concat(), "one two");
    }

    #[test]
    fn multibyte_holdback_is_char_safe() {
        let (deltas, stopped) = run(&["éé!"], &["caf", "é", "é", "?"]);
        assert!(!stopped);
        assert_eq!(deltas.concat(), "caféé?");
        let (deltas, stopped) = run(&["éé!"], &["caf", "é", "é", "!"]);
        assert!(stopped);
        assert_eq!(deltas, vec!["caf".to_string()]);
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let (deltas, stopped) = run(&[""], &["ab", "c"]);
        assert!(!stopped);
        assert_eq!(deltas, vec!["ab".to_string(), "c".to_string()]);
    }
}
