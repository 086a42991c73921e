//! Per-key limits the gateway enforces: request and token rates over a sliding minute, and
//! budgets with reservations so concurrent requests cannot overspend. In memory (std Mutex)
//! by default; with a shared store the same rules run in Redis as Lua scripts, and the
//! in-memory figures carry on while the store is down.

mod budget;
mod rate;

pub use budget::{BudgetExceeded, Budgets, Reservation};
pub use rate::RateLimiter;

/// Locks, recovering from poisoning: the guarded state is plain counters, valid after any
/// panic in another holder.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
