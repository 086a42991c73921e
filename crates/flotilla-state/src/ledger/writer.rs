//! The batching writer: an actor that owns the receiving end of a bounded channel and writes
//! what arrives in one transaction per batch, on a timer or when a batch fills, so the
//! request path only ever pushes onto a queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio::time::MissedTickBehavior;

use super::Ledger;
use super::insert;
use super::record::RequestRecord;
use crate::error::StateError;

/// Rows waiting for the writer before `record` has to wait: ~64k requests, a few seconds of
/// a busy gateway's traffic while the database is slow.
const CHANNEL_CAPACITY: usize = 65_536;
/// Pause before retrying a failed batch once.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// Sends records to the writer task. Clones share the task; `close` on any clone shuts it
/// down for all.
#[derive(Clone)]
pub struct LedgerWriter {
    tx: mpsc::Sender<RequestRecord>,
    shared: Arc<Shared>,
}

struct Shared {
    closing: AtomicBool,
    close: Notify,
    written: AtomicU64,
    failed: AtomicU64,
    /// Set once by the task when it has written everything: Ok, or the last error.
    done: watch::Receiver<Option<Result<(), StateError>>>,
}

impl std::fmt::Debug for LedgerWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerWriter")
            .field("written", &self.written())
            .field("failed", &self.failed())
            .field("closing", &self.shared.closing.load(Ordering::Relaxed))
            .finish()
    }
}

pub(crate) fn spawn(ledger: Ledger, flush: Duration, batch: usize) -> LedgerWriter {
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (done_tx, done_rx) = watch::channel(None);
    let shared = Arc::new(Shared {
        closing: AtomicBool::new(false),
        close: Notify::new(),
        written: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        done: done_rx,
    });
    let task = Task {
        ledger,
        rx,
        shared: shared.clone(),
        // tokio's interval panics on a zero period.
        flush: flush.max(Duration::from_millis(1)),
        batch: batch.max(1),
    };
    tokio::spawn(async move {
        let result = task.run().await;
        done_tx.send_replace(Some(result));
    });
    LedgerWriter { tx, shared }
}

impl LedgerWriter {
    /// Queues `r` without waiting; hands it back when the queue is full or the writer closed.
    // The record comes back whole so the caller can fall back to `record` (as mpsc's
    // TrySendError does); boxing it would cost an allocation per request.
    #[allow(clippy::result_large_err)]
    pub fn try_record(&self, r: RequestRecord) -> Result<(), RequestRecord> {
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(r);
        }
        self.tx.try_send(r).map_err(|e| match e {
            mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
        })
    }

    /// Queues `r`, waiting for room when the queue is full (backpressure; nothing is
    /// dropped). A record arriving after `close` cannot be written: it is counted in
    /// `failed` and logged.
    pub async fn record(&self, r: RequestRecord) {
        if self.shared.closing.load(Ordering::Acquire) {
            self.refuse(&r);
            return;
        }
        if let Err(mpsc::error::SendError(r)) = self.tx.send(r).await {
            self.refuse(&r);
        }
    }

    fn refuse(&self, r: &RequestRecord) {
        self.shared.failed.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            request_id = %r.request_id,
            "ledger writer is closed; request record not written"
        );
    }

    /// Stops accepting records, writes everything queued and returns once it is written (or
    /// with the error that kept some rows out). Any clone may call it; calls after the first
    /// finished return its outcome at once.
    pub async fn close(&self) -> Result<(), StateError> {
        self.shared.closing.store(true, Ordering::Release);
        // notify_one keeps a permit if the task is busy writing, so the request is not lost.
        self.shared.close.notify_one();
        let mut done = self.shared.done.clone();
        match done.wait_for(Option::is_some).await {
            Ok(result) => result.clone().unwrap_or(Ok(())),
            Err(_) => Err(StateError::Db("ledger writer task ended abnormally".into())),
        }
    }

    /// Rows written so far (including duplicates the database skipped).
    pub fn written(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Rows that could not be written, after a retry.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }
}

struct Task {
    ledger: Ledger,
    rx: mpsc::Receiver<RequestRecord>,
    shared: Arc<Shared>,
    flush: Duration,
    batch: usize,
}

impl Task {
    async fn run(mut self) -> Result<(), StateError> {
        let mut buf: Vec<RequestRecord> = Vec::with_capacity(self.batch);
        let mut tick = tokio::time::interval(self.flush);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            // Never past `batch`: a record waits at most one flush interval.
            let room = self.batch - buf.len();
            tokio::select! {
                // The timer before the channel, so a steady trickle cannot starve it.
                biased;
                _ = self.shared.close.notified() => break,
                _ = tick.tick() => {
                    if !buf.is_empty() {
                        // A failure is logged and counted in `failed` by write; close()
                        // reports those of the final drain.
                        let _ = self.write(&mut buf).await;
                    }
                }
                n = self.rx.recv_many(&mut buf, room) => {
                    // 0: every sender is gone; write what is left and stop.
                    if n == 0 {
                        break;
                    }
                    if buf.len() >= self.batch {
                        let _ = self.write(&mut buf).await;
                    }
                }
            }
        }

        // Drain: no new records, everything already queued is written.
        self.rx.close();
        let mut last_error = None;
        loop {
            let room = self.batch.saturating_sub(buf.len());
            if room > 0 && self.rx.recv_many(&mut buf, room).await == 0 && buf.is_empty() {
                break;
            }
            if let Err(e) = self.write(&mut buf).await {
                last_error = Some(e);
            }
        }
        match last_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Writes and empties `buf`: one transaction, retried once; when the retry fails on
    /// something the database refused (not an outage), row by row, so one bad row does not
    /// take the batch with it.
    async fn write(&self, buf: &mut Vec<RequestRecord>) -> Result<(), StateError> {
        let rows = std::mem::take(buf);
        buf.reserve(self.batch);
        let ledger = &self.ledger;
        let Err(first) = insert::insert(ledger, &rows).await else {
            self.count_written(rows.len());
            return Ok(());
        };
        tracing::warn!(rows = rows.len(), error = %first, "ledger batch failed; retrying once");
        tokio::time::sleep(RETRY_AFTER).await;
        let Err(second) = insert::insert(ledger, &rows).await else {
            self.count_written(rows.len());
            return Ok(());
        };
        if rows.len() > 1 && matches!(second, sqlx::Error::Database(_)) {
            let mut failed = 0;
            let mut last = None;
            for row in &rows {
                match insert::insert(ledger, std::slice::from_ref(row)).await {
                    Ok(()) => self.count_written(1),
                    Err(e) => {
                        failed += 1;
                        tracing::error!(request_id = %row.request_id, error = %e, "ledger row not written");
                        last = Some(e);
                    }
                }
            }
            self.shared.failed.fetch_add(failed, Ordering::Relaxed);
            return match last {
                Some(e) => Err(e.into()),
                None => Ok(()),
            };
        }
        self.shared
            .failed
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        tracing::error!(rows = rows.len(), error = %second, "ledger batch not written after a retry");
        Err(second.into())
    }

    fn count_written(&self, n: usize) {
        self.shared.written.fetch_add(n as u64, Ordering::Relaxed);
    }
}
