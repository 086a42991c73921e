//! How much of an upstream's answer is read: an upstream is not trusted to keep its
//! answers, errors or stream events to a sane size, and each is held in memory whole.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};

/// The most bytes read from one upstream answer, per kind of read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// A whole (non-streaming) answer. Past it the read stops and the attempt fails with
    /// a retryable [`crate::ProviderError::TooLarge`]; a `Content-Length` above it fails at
    /// once, unread.
    pub max_response_bytes: usize,
    /// An error answer's body: what came up to here makes the error's message, the rest
    /// is not read.
    pub max_error_bytes: usize,
    /// One SSE line, and one event's data, in a stream ([`crate::Upstream::sse_decoder`]).
    pub max_sse_line_bytes: usize,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_response_bytes: 16 << 20,
            max_error_bytes: 64 << 10,
            max_sse_line_bytes: flotilla_api::sse::MAX_LINE_BYTES,
        }
    }
}

/// A body read up to a bound.
#[derive(Debug, Default)]
pub(crate) struct Capped {
    /// The first chunk, kept as it came while it is the only one (no copy).
    first: Bytes,
    /// Everything, once a second chunk came.
    rest: BytesMut,
    /// The body went on past the bound; what is held is its first `limit` bytes.
    pub over: bool,
}

impl Capped {
    pub fn len(&self) -> usize {
        if self.rest.is_empty() {
            self.first.len()
        } else {
            self.rest.len()
        }
    }

    /// Appends `data`; `expect` is the whole body's length when known (0 when not).
    fn push(&mut self, data: Bytes, expect: usize) {
        if self.first.is_empty() && self.rest.is_empty() {
            self.first = data;
        } else {
            if self.rest.is_empty() {
                self.rest.reserve(expect.max(self.first.len() + data.len()));
                self.rest
                    .extend_from_slice(&std::mem::take(&mut self.first));
            }
            self.rest.extend_from_slice(&data);
        }
    }

    pub fn into_bytes(self) -> Bytes {
        if self.rest.is_empty() {
            self.first
        } else {
            self.rest.freeze()
        }
    }
}

/// Reads `body` into `into` until it ends or holds `limit` bytes, whichever comes first;
/// past the bound it stops reading and sets `over`. `into` keeps what came when the
/// future is dropped (a timeout).
pub(crate) async fn read_capped(
    mut body: Incoming,
    limit: usize,
    into: &mut Capped,
) -> Result<(), hyper::Error> {
    // hyper's size hint is the `Content-Length`, when there is one.
    let expect = usize::try_from(body.size_hint().lower())
        .unwrap_or(limit)
        .min(limit);
    while let Some(frame) = body.frame().await {
        // Trailers carry nothing we read.
        let Ok(mut data) = frame?.into_data() else {
            continue;
        };
        let room = limit - into.len();
        if data.len() > room {
            data.truncate(room);
            into.push(data, expect);
            into.over = true;
            return Ok(());
        }
        into.push(data, expect);
    }
    Ok(())
}
