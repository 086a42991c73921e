//! Which queued request gets the next free local slot: interactive before batch, first come
//! first served within a class, and batch work that has waited `age_boost` or longer counts
//! as interactive so it never starves.

use std::time::{Duration, Instant};

use crate::Priority;

/// One request waiting for a local slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    pub priority: Priority,
    pub enqueued_at: Instant,
}

/// The class a waiting request competes in at `now`.
pub fn effective_priority(w: &Waiting, now: Instant, age_boost: Duration) -> Priority {
    match w.priority {
        Priority::Batch if now.saturating_duration_since(w.enqueued_at) >= age_boost => {
            Priority::Interactive
        }
        p => p,
    }
}

/// Index of the request to dispatch next, or None when nothing waits.
pub fn pick_next(waiting: &[Waiting], now: Instant, age_boost: Duration) -> Option<usize> {
    waiting
        .iter()
        .enumerate()
        .min_by_key(|(i, w)| {
            let class = match effective_priority(w, now, age_boost) {
                Priority::Interactive => 0u8,
                Priority::Batch => 1,
            };
            (class, w.enqueued_at, *i)
        })
        .map(|(i, _)| i)
}

/// How many of `waiting` would be served before a new request of `priority` arriving now.
pub fn ahead_of(waiting: &[Waiting], priority: Priority, now: Instant, age_boost: Duration) -> u64 {
    waiting
        .iter()
        .filter(|w| match priority {
            Priority::Batch => true,
            Priority::Interactive => effective_priority(w, now, age_boost) == Priority::Interactive,
        })
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interactive_first_then_fifo_and_batch_ages_up() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let q = [
            Waiting {
                priority: Priority::Batch,
                enqueued_at: t0,
            },
            Waiting {
                priority: Priority::Interactive,
                enqueued_at: t0 + s(2),
            },
            Waiting {
                priority: Priority::Interactive,
                enqueued_at: t0 + s(1),
            },
        ];
        assert_eq!(pick_next(&q, t0 + s(3), s(30)), Some(2));
        assert_eq!(ahead_of(&q, Priority::Interactive, t0 + s(3), s(30)), 2);
        assert_eq!(ahead_of(&q, Priority::Batch, t0 + s(3), s(30)), 3);
        // After 30 s the batch request competes as interactive and is the oldest.
        assert_eq!(pick_next(&q, t0 + s(30), s(30)), Some(0));
        assert_eq!(ahead_of(&q, Priority::Interactive, t0 + s(30), s(30)), 3);
        assert_eq!(pick_next(&[], t0, s(30)), None);
    }
}
