//! Per-key budgets: a request reserves its worst-case cost before it runs and settles the
//! real cost after, so requests in flight together cannot spend past the budget.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::lock;
use crate::shared::{Shared, spawn_detached};

#[derive(Debug, Default)]
struct Account {
    spent: f64,
    reserved: f64,
    /// Reservations outstanding; at zero `reserved` is reset to exactly 0, so float
    /// rounding from many add/subtract pairs cannot accumulate.
    open: u64,
}

type Accounts = Arc<Mutex<HashMap<String, Account>>>;

/// Per-key spend and reservations. With a shared store, reservations and spend live in
/// Redis (atomic across replicas, see [`Budgets::hold`]); while it is down each replica
/// holds against its own figures.
#[derive(Debug, Default)]
pub struct Budgets {
    accounts: Accounts,
    /// The store, and how long a reservation its replica never settled (it died) holds.
    shared: Option<(Shared, Duration)>,
}

/// A refused reservation, with the figures behind the refusal.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "budget of {} exhausted: {} spent, {} reserved by requests in flight, this request may cost up to {}",
    usd(*.budget_usd), usd(*.spent_usd), usd(*.reserved_usd), usd(*.requested_usd)
)]
pub struct BudgetExceeded {
    pub budget_usd: f64,
    pub spent_usd: f64,
    pub reserved_usd: f64,
    pub requested_usd: f64,
}

/// Dollars with cents; sub-cent amounts keep enough digits to be seen.
fn usd(x: f64) -> String {
    if x != 0.0 && x.abs() < 0.01 {
        let s = format!("{x:.6}");
        format!("${}", s.trim_end_matches('0'))
    } else {
        format!("${x:.2}")
    }
}

impl Budgets {
    pub fn new() -> Self {
        Budgets::default()
    }

    /// Budgets kept in the shared store; a reservation not settled within `ttl` is given
    /// back.
    pub fn with_shared(shared: Shared, ttl: Duration) -> Self {
        Budgets {
            accounts: Accounts::default(),
            shared: Some((shared, ttl)),
        }
    }

    /// [`Budgets::reserve`] across replicas when the store is up (one atomic step in Redis,
    /// so concurrent requests through any replicas never reserve past the budget), on this
    /// replica's own figures otherwise.
    pub async fn hold(
        &self,
        key: &str,
        budget_usd: f64,
        amount_usd: f64,
    ) -> Result<Reservation, BudgetExceeded> {
        let amount = amount_usd.max(0.0);
        if let Some((shared, ttl)) = &self.shared
            && let Some(r) = shared.reserve(key, budget_usd, amount, *ttl).await
        {
            return r.map(|id| Reservation {
                amount,
                open: true,
                holder: Holder::Shared {
                    shared: shared.clone(),
                    key: key.to_owned(),
                    id,
                },
            });
        }
        self.reserve(key, budget_usd, amount)
    }

    /// Records what the key has spent according to the database. Only ever raises the
    /// figure: spend settled here may not have reached the database yet.
    pub fn observe_spent(&self, key: &str, spent_usd: f64) {
        if !spent_usd.is_finite() {
            return;
        }
        if let Some((shared, _)) = &self.shared
            && shared.is_up()
        {
            let (shared, key) = (shared.clone(), key.to_owned());
            spawn_detached(async move {
                shared.observe_spent(&key, spent_usd).await;
            });
        }
        let mut accounts = lock(&self.accounts);
        let a = accounts.entry(key.to_string()).or_default();
        a.spent = a.spent.max(spent_usd);
    }

    /// Reserves `amount_usd` (negative or NaN counts as 0) under `budget_usd`; refused when
    /// spent + reserved + amount would exceed the budget.
    pub fn reserve(
        &self,
        key: &str,
        budget_usd: f64,
        amount_usd: f64,
    ) -> Result<Reservation, BudgetExceeded> {
        let amount = amount_usd.max(0.0);
        let mut accounts = lock(&self.accounts);
        let a = match accounts.get_mut(key) {
            Some(a) => a,
            None => accounts.entry(key.to_string()).or_default(),
        };
        // A NaN anywhere compares as None: refused rather than admitted.
        let total = a.spent + a.reserved + amount;
        if !matches!(
            total.partial_cmp(&budget_usd),
            Some(Ordering::Less | Ordering::Equal)
        ) {
            return Err(BudgetExceeded {
                budget_usd,
                spent_usd: a.spent,
                reserved_usd: a.reserved,
                requested_usd: amount,
            });
        }
        a.reserved += amount;
        a.open += 1;
        Ok(Reservation {
            amount,
            open: true,
            holder: Holder::Local {
                accounts: self.accounts.clone(),
                key: key.to_string(),
            },
        })
    }

    pub fn spent(&self, key: &str) -> f64 {
        lock(&self.accounts).get(key).map_or(0.0, |a| a.spent)
    }

    pub fn reserved(&self, key: &str) -> f64 {
        lock(&self.accounts).get(key).map_or(0.0, |a| a.reserved)
    }
}

/// An amount held against a key's budget while its request runs. Dropping it releases the
/// amount; `settle` turns the actual cost into spend.
#[derive(Debug)]
#[must_use = "dropping a reservation releases it at once"]
pub struct Reservation {
    amount: f64,
    open: bool,
    holder: Holder,
}

/// Where the amount is held.
#[derive(Debug)]
enum Holder {
    Local {
        accounts: Accounts,
        key: String,
    },
    /// In the shared store, under this reservation id.
    Shared {
        shared: Shared,
        key: String,
        id: String,
    },
}

impl Reservation {
    /// Releases the reservation and records `actual_usd` as spent; None (cost unknown)
    /// spends nothing.
    pub fn settle(mut self, actual_usd: Option<f64>) {
        self.release(actual_usd.filter(|c| c.is_finite() && *c > 0.0));
    }

    pub fn amount(&self) -> f64 {
        self.amount
    }

    fn release(&mut self, spend: Option<f64>) {
        if !std::mem::replace(&mut self.open, false) {
            return;
        }
        let (accounts, key) = match &self.holder {
            Holder::Local { accounts, key } => (accounts, key),
            Holder::Shared { shared, key, id } => {
                // Settled without waiting; if the store is down the reservation expires
                // there, and the spend reaches it from the ledger at the next key refresh.
                let (shared, key, id) = (shared.clone(), key.clone(), id.clone());
                spawn_detached(async move {
                    shared.settle(&key, &id, spend).await;
                });
                return;
            }
        };
        let mut accounts = lock(accounts);
        let a = accounts.entry(key.clone()).or_default();
        a.open = a.open.saturating_sub(1);
        a.reserved = if a.open == 0 {
            0.0
        } else {
            (a.reserved - self.amount).max(0.0)
        };
        if let Some(c) = spend {
            a.spent += c;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_budget_is_refused_with_the_numbers() {
        let b = Budgets::new();
        b.observe_spent("k", 9.5);
        let r = b.reserve("k", 10.0, 0.25).unwrap();
        assert_eq!(b.reserved("k"), 0.25);
        let e = b.reserve("k", 10.0, 0.5).unwrap_err();
        assert_eq!(
            e,
            BudgetExceeded {
                budget_usd: 10.0,
                spent_usd: 9.5,
                reserved_usd: 0.25,
                requested_usd: 0.5
            }
        );
        assert_eq!(
            e.to_string(),
            "budget of $10.00 exhausted: $9.50 spent, $0.25 reserved by requests in flight, \
             this request may cost up to $0.50"
        );
        assert!(
            BudgetExceeded {
                budget_usd: 1.0,
                spent_usd: 1.0,
                reserved_usd: 0.0,
                requested_usd: 0.0004
            }
            .to_string()
            .ends_with("up to $0.0004"),
        );
        // Exactly reaching the budget is allowed.
        let r2 = b.reserve("k", 10.0, 0.25).unwrap();
        drop((r, r2));
        assert_eq!(b.reserved("k"), 0.0);
    }

    #[test]
    fn settle_spends_drop_releases_unknown_spends_nothing() {
        let b = Budgets::new();
        let r = b.reserve("k", 1.0, 0.4).unwrap();
        assert_eq!(r.amount(), 0.4);
        r.settle(Some(0.1));
        assert_eq!((b.spent("k"), b.reserved("k")), (0.1, 0.0));
        let r = b.reserve("k", 1.0, 0.9).unwrap();
        assert!(b.reserve("k", 1.0, 0.1).is_err());
        drop(r);
        assert_eq!((b.spent("k"), b.reserved("k")), (0.1, 0.0));
        b.reserve("k", 1.0, 0.5).unwrap().settle(None);
        assert_eq!((b.spent("k"), b.reserved("k")), (0.1, 0.0));
        // The database's figure raises spend, never lowers it.
        b.observe_spent("k", 0.05);
        assert_eq!(b.spent("k"), 0.1);
        b.observe_spent("k", 0.75);
        assert_eq!(b.spent("k"), 0.75);
        assert!(b.reserve("k", 1.0, 0.5).is_err());
        assert!(b.reserve("k", f64::NAN, 0.0).is_err());
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_budget() {
        // 0.25 and 100 are exact in binary: exactly 400 reservations fit.
        const BUDGET: f64 = 100.0;
        const COST: f64 = 0.25;
        let budgets = Arc::new(Budgets::new());
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let budgets = budgets.clone();
                std::thread::spawn(move || {
                    let mut admitted = 0u32;
                    for i in 0..1000 {
                        match budgets.reserve("k", BUDGET, COST) {
                            Ok(r) => {
                                admitted += 1;
                                assert!(budgets.spent("k") + budgets.reserved("k") <= BUDGET);
                                // Some requests end with an unknown cost or fail: released.
                                if (t + i) % 5 == 0 {
                                    admitted -= 1;
                                    drop(r);
                                } else {
                                    r.settle(Some(COST));
                                }
                            }
                            Err(e) => assert!(e.spent_usd + e.reserved_usd + COST > BUDGET),
                        }
                    }
                    admitted
                })
            })
            .collect();
        let admitted: u32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(admitted, 400);
        assert_eq!(budgets.spent("k"), BUDGET);
        assert_eq!(budgets.reserved("k"), 0.0);
    }
}
