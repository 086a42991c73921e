//! Draining: stop taking new work, let what runs finish, then leave the fleet. Started by
//! SIGTERM (the caller's shutdown token) or `POST /admin/drain`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub(crate) struct Drain {
    draining: AtomicBool,
    /// A drain asked for over HTTP.
    requested: CancellationToken,
    /// Inference requests whose response (a stream included) has not ended.
    in_flight: AtomicU64,
    /// Woken when the last in-flight request ends during a drain.
    idle: Notify,
    /// Woken when draining starts, so the heartbeat goes out at once.
    pub started: Notify,
}

impl Drain {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn request(&self) {
        self.requested.cancel();
    }

    pub async fn requested(&self) {
        self.requested.cancelled().await
    }

    /// Counts a request in until the guard drops. Counted before the draining check, so a
    /// drain that finds zero in flight cannot miss a request that got past it.
    pub fn enter(self: &Arc<Self>) -> Option<WorkGuard> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = WorkGuard(self.clone());
        (!self.is_draining()).then_some(guard)
    }

    pub fn start(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            // A stored permit: the heartbeat task may be mid-send, not waiting.
            self.started.notify_one();
        }
    }

    /// Returns once nothing is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

pub(crate) struct WorkGuard(Arc<Drain>);

impl Drop for WorkGuard {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Ends a drain from outside: what `POST /admin/drain` does, for tests and supervisors in
/// the same process.
#[derive(Clone)]
pub struct DrainHandle(pub(crate) Arc<Drain>);

impl DrainHandle {
    pub fn drain(&self) {
        self.0.request();
    }

    pub fn is_draining(&self) -> bool {
        self.0.is_draining()
    }

    pub fn in_flight(&self) -> u64 {
        self.0.in_flight()
    }
}
