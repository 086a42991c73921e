//! The batching writer: an actor that takes what the request path queued and writes it in
//! one transaction per batch, on a timer or when a batch fills, so the request path only
//! ever pushes onto a queue.
//!
//! The queue is a vector behind a mutex rather than a channel: a channel wakes its receiver
//! for every record, and waking the writer's thread was a futex syscall on every request
//! (4% of the scheduler's CPU under load). Here a record wakes the writer only when it fills
//! a batch; otherwise the writer's timer collects it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::MissedTickBehavior;

use super::Ledger;
use super::insert;
use super::record::RequestRecord;
use crate::error::StateError;

/// Rows waiting for the writer before `record` has to wait: ~64k requests, a few seconds of
/// a busy gateway's traffic while the database is slow.
const CAPACITY: usize = 65_536;
/// Pause before retrying a failed batch once.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// Sends records to the writer task. Clones share the task; `close` on any clone shuts it
/// down for all.
#[derive(Clone)]
pub struct LedgerWriter {
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<Vec<RequestRecord>>,
    /// A batch is full (or the writer is closing): write now.
    ready: Notify,
    /// The writer took the queue: there is room again.
    room: Notify,
    batch: usize,
    closing: AtomicBool,
    written: AtomicU64,
    failed: AtomicU64,
    /// Set once by the task when it has written everything: Ok, or the last error.
    done: watch::Receiver<Option<Result<(), StateError>>>,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Vec<RequestRecord>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `r` unless the queue is full or closed.
    #[allow(clippy::result_large_err)]
    fn push(&self, r: RequestRecord) -> Result<(), RequestRecord> {
        let mut q = self.queue();
        // Under the lock, so the writer's final drain cannot miss a record.
        if self.closing.load(Ordering::Acquire) || q.len() >= CAPACITY {
            return Err(r);
        }
        q.push(r);
        let full = q.len() == self.batch;
        drop(q);
        if full {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Up to `batch` queued records; with `only_full`, none unless a whole batch waits.
    fn take(&self, batch: usize, only_full: bool) -> Vec<RequestRecord> {
        let mut q = self.queue();
        if only_full && q.len() < batch {
            return Vec::new();
        }
        let rows = if q.len() <= batch {
            std::mem::take(&mut *q)
        } else {
            q.drain(..batch).collect()
        };
        drop(q);
        self.room.notify_waiters();
        rows
    }
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
    let (done_tx, done_rx) = watch::channel(None);
    let batch = batch.max(1);
    let shared = Arc::new(Shared {
        queue: Mutex::new(Vec::with_capacity(batch)),
        ready: Notify::new(),
        room: Notify::new(),
        batch,
        closing: AtomicBool::new(false),
        written: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        done: done_rx,
    });
    let task = Task {
        ledger,
        shared: shared.clone(),
        // tokio's interval panics on a zero period.
        flush: flush.max(Duration::from_millis(1)),
        batch,
    };
    if task.ledger.sqlite.is_some() {
        // Its inserts are synchronous: a thread (and a small runtime for the timer) of its
        // own keeps them off the request path's workers.
        let spawned = std::thread::Builder::new()
            .name("flotilla-ledger".into())
            .spawn(move || {
                let result = match tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => rt.block_on(task.run()),
                    Err(e) => Err(StateError::Db(format!("ledger writer runtime: {e}"))),
                };
                done_tx.send_replace(Some(result));
            });
        if let Err(e) = spawned {
            panic!("cannot start the ledger writer thread: {e}");
        }
    } else {
        tokio::spawn(async move {
            let result = task.run().await;
            done_tx.send_replace(Some(result));
        });
    }
    LedgerWriter { shared }
}

impl LedgerWriter {
    /// Queues `r` without waiting; hands it back when the queue is full or the writer closed.
    // The record comes back whole so the caller can fall back to `record`; boxing it would
    // cost an allocation per request.
    #[allow(clippy::result_large_err)]
    pub fn try_record(&self, r: RequestRecord) -> Result<(), RequestRecord> {
        self.shared.push(r)
    }

    /// Queues `r`, waiting for room when the queue is full (backpressure; nothing is
    /// dropped). A record arriving after `close` cannot be written: it is counted in
    /// `failed` and logged.
    pub async fn record(&self, mut r: RequestRecord) {
        loop {
            // Registered before trying, so a `take` in between is not missed.
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.shared.push(r) {
                Ok(()) => return,
                Err(back) if self.shared.closing.load(Ordering::Acquire) => {
                    self.refuse(&back);
                    return;
                }
                Err(back) => {
                    r = back;
                    // The writer may be waiting for its timer with a full queue.
                    self.shared.ready.notify_one();
                    room.await;
                }
            }
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
        {
            // Under the queue's lock: no push can land after the writer's last look.
            let _q = self.shared.queue();
            self.shared.closing.store(true, Ordering::Release);
        }
        // notify_one keeps a permit if the task is busy writing, so the request is not lost.
        self.shared.ready.notify_one();
        // Writers waiting for room give up now.
        self.shared.room.notify_waiters();
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
    shared: Arc<Shared>,
    flush: Duration,
    batch: usize,
}

impl Task {
    async fn run(self) -> Result<(), StateError> {
        let mut tick = tokio::time::interval(self.flush);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            if self.shared.closing.load(Ordering::Acquire) {
                break;
            }
            // Woken for full batches, they are written; on the timer, everything queued, so
            // a record waits at most one interval.
            let only_full = tokio::select! {
                _ = self.shared.ready.notified() => true,
                _ = tick.tick() => false,
            };
            loop {
                let mut rows = self.shared.take(self.batch, only_full);
                if rows.is_empty() {
                    break;
                }
                let full = rows.len() == self.batch;
                // A failure is logged and counted in `failed` by write; close() reports
                // those of the final drain.
                let _ = self.write(&mut rows).await;
                if !full {
                    break;
                }
            }
        }

        // Drain: closing is set under the queue's lock, so nothing more arrives.
        let mut last_error = None;
        loop {
            let mut rows = self.shared.take(self.batch, false);
            if rows.is_empty() {
                break;
            }
            if let Err(e) = self.write(&mut rows).await {
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
        if rows.len() > 1 && second.refused {
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
