//! Logging for the `flotilla` binaries: `tracing` lines to stderr, written by a thread of
//! their own instead of the thread that logged.
//!
//! The scheduler logs one line per request. Written straight to stderr, that line was a
//! `write` syscall on the request path, and with formatting about 10 µs of a request's
//! CPU under load (BENCHMARKS.md, "Gateway load"). Here a line is appended to a buffer; a
//! writer thread collects lines for up to [`COLLECT`] and writes them together. Warnings
//! and errors are written at once. A line that would grow the buffer past [`MAX_BUFFER`]
//! (stderr blocked) is dropped and counted, and the count is written when stderr drains.
//!
//! Progress bars ([`byte_bar`]: weights being read) share stderr with the lines: the
//! writer hides them while it writes, so a line never lands in the middle of a bar. They
//! are drawn only at a terminal with text logs.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::{Level, Metadata};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// How long the writer gathers lines before one write.
pub const COLLECT: Duration = Duration::from_millis(10);
/// Bytes of log lines held while stderr does not take them.
pub const MAX_BUFFER: usize = 8 << 20;

/// Every bar on stderr; hidden until `init` finds a terminal and text logs.
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::hidden()))
}

/// A bar counting `total` bytes, labelled `what` (a model's name): drawn on stderr when the
/// process logs text to a terminal, a cheap no-op otherwise. Finish it with
/// `finish_and_clear` so the log line saying what happened replaces it.
pub fn byte_bar(total: u64, what: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{msg:>20} [{bar:30}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} {eta:>4}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bars().add(
        ProgressBar::new(total)
            .with_style(style)
            .with_message(format!("loading {what}")),
    )
}

/// Whether bars are drawn (text logs to a terminal): other bars, such as hf-hub's
/// download bars, follow the same rule.
pub fn bars_drawn() -> bool {
    !bars().is_hidden()
}

/// Stderr, with the bars lifted while lines are written.
struct BarAwareStderr;

impl Write for BarAwareStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        bars().suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    dropped: u64,
    urgent: bool,
    closed: bool,
}

struct Sink {
    state: Mutex<State>,
    wake: Condvar,
}

impl Sink {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, line: &[u8], urgent: bool) {
        let mut st = self.state();
        if st.buf.len() + line.len() > MAX_BUFFER {
            st.dropped += 1;
            return;
        }
        let was_empty = st.buf.is_empty();
        st.buf.extend_from_slice(line);
        st.urgent |= urgent;
        drop(st);
        // The writer only sleeps on an empty buffer: one wake-up per batch of lines.
        if was_empty || urgent {
            self.wake.notify_one();
        }
    }

    /// The writer thread: waits for lines, gathers for `COLLECT` unless one is urgent,
    /// writes them in one go. Returns once closed and empty.
    fn run(&self, out: &mut dyn Write) {
        let mut st = self.state();
        loop {
            while st.buf.is_empty() && !st.closed {
                st = self.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            if st.buf.is_empty() {
                return;
            }
            if !st.urgent && !st.closed {
                drop(st);
                std::thread::sleep(COLLECT);
                st = self.state();
            }
            let lines = std::mem::take(&mut st.buf);
            let dropped = std::mem::take(&mut st.dropped);
            st.urgent = false;
            drop(st);
            // Nowhere to report a failing stderr; the lines are gone either way.
            let _ = out.write_all(&lines);
            if dropped > 0 {
                let _ = writeln!(
                    out,
                    "flotilla: {dropped} log lines dropped: stderr did not keep up"
                );
            }
            let _ = out.flush();
            st = self.state();
        }
    }
}

/// What `tracing_subscriber` writes each formatted event to.
#[derive(Clone)]
struct SinkHandle(Arc<Sink>);

pub struct SinkWriter<'a> {
    sink: &'a Sink,
    urgent: bool,
}

impl Write for SinkWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sink.push(buf, self.urgent);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for SinkHandle {
    type Writer = SinkWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        SinkWriter {
            sink: &self.0,
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        SinkWriter {
            sink: &self.0,
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

/// Keep it until the process ends: dropping it writes every buffered line.
pub struct LogGuard {
    sink: Arc<Sink>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.sink.state().closed = true;
        self.sink.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start(out: Box<dyn Write + Send>) -> (SinkHandle, LogGuard) {
    let sink = Arc::new(Sink {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
    });
    let writer = Arc::clone(&sink);
    let mut out = out;
    let thread = std::thread::Builder::new()
        .name("flotilla-log".into())
        .spawn(move || writer.run(&mut *out))
        .ok();
    (SinkHandle(Arc::clone(&sink)), LogGuard { sink, thread })
}

/// Installs the global subscriber: the filter from `FLOTILLA_LOG` (or `RUST_LOG`, default
/// `info`), text (coloured only at a terminal) or JSON lines, to stderr through the writer
/// thread. If that thread cannot start, lines go to stderr directly.
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_env("FLOTILLA_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if ansi && format == LogFormat::Text {
        bars().set_draw_target(ProgressDrawTarget::stderr());
    }
    let (handle, guard) = start(Box::new(BarAwareStderr));
    if guard.thread.is_none() {
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(ansi);
        match format {
            LogFormat::Text => builder.init(),
            LogFormat::Json => builder.json().init(),
        }
        return guard;
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(handle)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_in_order_and_closing_writes_the_rest() {
        let out = Shared::default();
        let (handle, guard) = start(Box::new(out.clone()));
        for i in 0..1000 {
            let mut w = handle.make_writer();
            writeln!(w, "line {i}").unwrap();
        }
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1000);
        assert_eq!(lines[0], "line 0");
        assert_eq!(lines[999], "line 999");
    }

    #[test]
    fn a_warning_is_written_without_waiting_for_more_lines() {
        let out = Shared::default();
        let (handle, _guard) = start(Box::new(out.clone()));
        let mut w = SinkWriter {
            sink: &handle.0,
            urgent: true,
        };
        writeln!(w, "WARN something").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while out.0.lock().unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "warning never written"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(&*out.0.lock().unwrap(), b"WARN something\n");
    }

    #[test]
    fn a_full_buffer_drops_lines_and_says_how_many() {
        let sink = Sink {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        };
        let big = vec![b'x'; MAX_BUFFER - 1];
        sink.push(&big, false);
        sink.push(b"one\n", false);
        sink.push(b"two\n", false);
        sink.state().closed = true;
        let mut out = Vec::new();
        sink.run(&mut out);
        let tail = String::from_utf8_lossy(&out[MAX_BUFFER - 1..]).into_owned();
        assert_eq!(
            tail,
            "flotilla: 2 log lines dropped: stderr did not keep up\n"
        );
    }
}
