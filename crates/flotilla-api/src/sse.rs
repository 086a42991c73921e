//! An incremental decoder for `text/event-stream` bodies as OpenAI-compatible servers send
//! them: feed bytes as they arrive, take complete events out.

/// One event's `data` (multi-line data joined with `\n`) and its optional `event` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn is_done(&self) -> bool {
        self.data.trim() == "[DONE]"
    }
}

/// The default bound on one line, and on one event's data: 1 MiB.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// A stream that broke the decoder's bound ([`SseDecoder::try_feed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("the upstream sent an SSE line longer than max_sse_line_bytes ({limit} bytes)")]
    LineTooLong { limit: usize },
    #[error("the upstream sent an SSE event larger than max_sse_line_bytes ({limit} bytes)")]
    EventTooLarge { limit: usize },
}

#[derive(Debug)]
pub struct SseDecoder {
    buf: Vec<u8>,
    /// How far `buf` is known to hold no newline, so each byte is scanned once.
    scanned: usize,
    /// Inside a line longer than the bound, skipping to its end ([`SseDecoder::feed`]).
    skipping: bool,
    /// Inside an event whose data outgrew the bound, skipping to its end.
    skipping_event: bool,
    event: Option<String>,
    data: Vec<String>,
    /// Bytes in `data`, newlines between its lines included.
    data_bytes: usize,
    /// The longest line, and the most data one event may carry.
    max_line_bytes: usize,
    /// Set once [`SseDecoder::try_feed`] failed: the stream is broken for good.
    failed: Option<SseError>,
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::with_max_line_bytes(MAX_LINE_BYTES)
    }
}

impl SseDecoder {
    /// A decoder bounded at [`MAX_LINE_BYTES`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder that holds at most `max` bytes of one line, and of one event's data.
    pub fn with_max_line_bytes(max: usize) -> Self {
        SseDecoder {
            buf: Vec::new(),
            scanned: 0,
            skipping: false,
            skipping_event: false,
            event: None,
            data: Vec::new(),
            data_bytes: 0,
            max_line_bytes: max.max(1),
            failed: None,
        }
    }

    pub fn max_line_bytes(&self) -> usize {
        self.max_line_bytes
    }

    /// Appends bytes and returns every event they complete. Lenient, for streams we
    /// trust: a line that outgrows the bound before its newline is dropped, and so is an
    /// event whose data outgrows it, rather than buffered. An upstream's stream goes
    /// through [`SseDecoder::try_feed`] instead, where that is an error.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        // Lenient mode never fails.
        let _ = self.decode(bytes, &mut out, false);
        out
    }

    /// Appends bytes and pushes every event they complete into `out`. A line or an
    /// event's data larger than the bound is an error: the events before it are in
    /// `out`, nothing more is buffered, and every later call fails the same way.
    pub fn try_feed(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let r = self.decode(bytes, out, true);
        if let Err(e) = r {
            self.failed = Some(e);
            self.buf = Vec::new();
            self.data = Vec::new();
            self.data_bytes = 0;
            self.scanned = 0;
        }
        r
    }

    fn decode(
        &mut self,
        bytes: &[u8],
        out: &mut Vec<SseEvent>,
        strict: bool,
    ) -> Result<(), SseError> {
        let max = self.max_line_bytes;
        self.buf.extend_from_slice(bytes);
        // Whole lines are taken from the front of `buf`; what is left is one partial line.
        let mut start = 0;
        let result = loop {
            let Some(rel) = self.buf[start + self.scanned..]
                .iter()
                .position(|&b| b == b'\n')
            else {
                self.scanned = self.buf.len() - start;
                if self.skipping {
                    // The rest of a line already dropped: nothing of it is kept.
                    start = self.buf.len();
                    self.scanned = 0;
                    break Ok(());
                }
                // One byte of slack for the `\r` of a line ending `\r\n`.
                if self.scanned > max.saturating_add(1) {
                    if strict {
                        break Err(SseError::LineTooLong { limit: max });
                    }
                    start = self.buf.len();
                    self.scanned = 0;
                    self.skipping = true;
                }
                break Ok(());
            };
            let end = start + self.scanned + rel;
            let line_start = std::mem::replace(&mut start, end + 1);
            self.scanned = 0;
            if std::mem::take(&mut self.skipping) {
                continue;
            }
            let mut line = &self.buf[line_start..end];
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            if strict && line.len() > max {
                break Err(SseError::LineTooLong { limit: max });
            }
            if line.is_empty() {
                let data = std::mem::take(&mut self.data);
                self.data_bytes = 0;
                if !data.is_empty() && !std::mem::take(&mut self.skipping_event) {
                    out.push(SseEvent {
                        event: self.event.take(),
                        data: data.join("\n"),
                    });
                }
                self.skipping_event = false;
                self.event = None;
                continue;
            }
            if line.starts_with(b":") {
                continue;
            }
            let line = String::from_utf8_lossy(line);
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_ref(), ""),
            };
            match field {
                "data" => {
                    let added = value.len() + usize::from(!self.data.is_empty());
                    self.data_bytes = self.data_bytes.saturating_add(added);
                    if self.data_bytes > max {
                        if strict {
                            break Err(SseError::EventTooLarge { limit: max });
                        }
                        self.data.clear();
                        self.skipping_event = true;
                    } else if !self.skipping_event {
                        self.data.push(value.to_owned());
                    }
                }
                "event" => self.event = Some(value.to_owned()),
                _ => {}
            }
        };
        self.buf.drain(..start.min(self.buf.len()));
        result
    }

    /// Bytes received that do not yet form a complete line or event.
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty() || !self.data.is_empty()
    }
}

/// Frames one `data:` event.
pub fn data_event(data: &str) -> String {
    let mut s = String::with_capacity(data.len() + 8);
    for line in data.split('\n') {
        s.push_str("data: ");
        s.push_str(line);
        s.push('\n');
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_reads() {
        let mut d = SseDecoder::new();
        assert!(d.feed(b"data: {\"a\"").is_empty());
        let ev = d.feed(b":1}\n\ndata: [DONE]\r\n\r\n");
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].data, "{\"a\":1}");
        assert!(ev[1].is_done());
        assert!(!d.has_partial());
    }

    #[test]
    fn an_endless_line_is_dropped_not_buffered() {
        let mut d = SseDecoder::new();
        let junk = vec![b'x'; 64 * 1024];
        for _ in 0..20 {
            assert!(d.feed(&junk).is_empty());
        }
        assert!(d.buf.len() <= MAX_LINE_BYTES);
        let ev = d.feed(b"tail of the junk\ndata: ok\n\n");
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].data, "ok");
    }

    #[test]
    fn try_feed_fails_on_a_line_past_the_bound_whole_or_in_pieces() {
        let mut whole = SseDecoder::with_max_line_bytes(16);
        let mut out = Vec::new();
        let long = format!("data: ok\n\ndata: {}\n\n", "x".repeat(20));
        let err = whole.try_feed(long.as_bytes(), &mut out).unwrap_err();
        assert_eq!(err, SseError::LineTooLong { limit: 16 });
        assert_eq!(out.len(), 1, "the event before the long line is kept");
        assert_eq!(out[0].data, "ok");
        // Broken for good, and nothing more is held.
        assert_eq!(whole.try_feed(b"data: y\n\n", &mut out), Err(err));
        assert!(!whole.has_partial());

        let mut pieces = SseDecoder::with_max_line_bytes(16);
        let mut out = Vec::new();
        assert!(pieces.try_feed(b"data: xxxxxxxx", &mut out).is_ok());
        let err = pieces.try_feed(b"xxxxxxxxxx", &mut out).unwrap_err();
        assert_eq!(err, SseError::LineTooLong { limit: 16 });
        assert!(
            err.to_string().contains("max_sse_line_bytes (16 bytes)"),
            "{err}"
        );
    }

    #[test]
    fn a_line_at_the_bound_passes_with_its_crlf() {
        let mut d = SseDecoder::with_max_line_bytes(8);
        let mut out = Vec::new();
        d.try_feed(b"data: ab\r", &mut out).unwrap();
        d.try_feed(b"\n\r\n", &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].data, "ab");
    }

    #[test]
    fn an_event_of_many_short_lines_is_bounded_too() {
        let mut d = SseDecoder::with_max_line_bytes(32);
        let mut out = Vec::new();
        let many = "data: 0123456789\n".repeat(4);
        let err = d.try_feed(many.as_bytes(), &mut out).unwrap_err();
        assert_eq!(err, SseError::EventTooLarge { limit: 32 });
        assert!(out.is_empty());
        // Leniently, that event is dropped and the next one still comes.
        let mut lenient = SseDecoder::with_max_line_bytes(32);
        let ev = lenient.feed(format!("{many}\ndata: next\n\n").as_bytes());
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].data, "next");
    }

    #[test]
    fn comments_and_event_names() {
        let mut d = SseDecoder::new();
        let ev = d.feed(b": keep-alive\n\nevent: error\ndata: x\ndata: y\n\n");
        assert_eq!(
            ev,
            vec![SseEvent {
                event: Some("error".into()),
                data: "x\ny".into()
            }]
        );
    }

    #[test]
    fn framing_round_trips() {
        let mut d = SseDecoder::new();
        let ev = d.feed(data_event("a\nb").as_bytes());
        assert_eq!(ev[0].data, "a\nb");
    }
}
