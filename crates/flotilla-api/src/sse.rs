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

/// Longest line kept; a longer one (no newline in 1 MiB) is dropped, not buffered forever.
pub const MAX_LINE_BYTES: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
    /// How far `buf` is known to hold no newline, so each byte is scanned once.
    scanned: usize,
    /// Inside a line longer than [`MAX_LINE_BYTES`], skipping to its end.
    skipping: bool,
    event: Option<String>,
    data: Vec<String>,
}

impl SseDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes and returns every event they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            let Some(rel) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') else {
                self.scanned = self.buf.len();
                if self.buf.len() > MAX_LINE_BYTES {
                    self.buf.clear();
                    self.scanned = 0;
                    self.skipping = true;
                }
                break;
            };
            let pos = self.scanned + rel;
            let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
            self.scanned = 0;
            if std::mem::take(&mut self.skipping) {
                continue;
            }
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if line.is_empty() {
                if !self.data.is_empty() {
                    out.push(SseEvent {
                        event: self.event.take(),
                        data: self.data.join("\n"),
                    });
                    self.data.clear();
                }
                self.event = None;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f.to_owned(), v.strip_prefix(' ').unwrap_or(v).to_owned()),
                None => (line.clone(), String::new()),
            };
            match field.as_str() {
                "data" => self.data.push(value),
                "event" => self.event = Some(value),
                _ => {}
            }
        }
        out
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
