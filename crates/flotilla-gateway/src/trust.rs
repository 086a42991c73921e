//! Who may reach the scheduler beyond its API keys: the exposure check at start, where
//! heartbeats may come from and which node a heartbeat may speak for, and how many failed
//! authentications one address may make.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use flotilla_api::{ApiError, ErrorKind};
use tokio_util::sync::CancellationToken;

use crate::config::{AuthMode, SchedulerConfig};
use crate::state::AppState;

/// How often a scheduler running exposed with `allow_insecure` says so again.
pub(crate) const INSECURE_WARN_EVERY: Duration = Duration::from_secs(600);
/// Largest heartbeat body read: a report of many GPUs and models is a few KiB.
pub(crate) const HEARTBEAT_MAX_BYTES: usize = 256 * 1024;
/// The window failed authentications are counted over.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered; past this, windows that ended are dropped, then all.
const FAILURE_ENTRIES: usize = 65_536;

/// What is unsafe about serving on `addr` with this config; empty on loopback.
pub fn exposure_problems(cfg: &SchedulerConfig, addr: SocketAddr) -> Vec<String> {
    if addr.ip().is_loopback() {
        return Vec::new();
    }
    let mut problems = Vec::new();
    if cfg.cluster_token.is_none() {
        problems.push(
            "no cluster token (scheduler.cluster_token_env): anyone who reaches the port can \
             register an agent and be sent users' prompts"
                .to_owned(),
        );
    }
    if cfg.auth == AuthMode::None {
        problems.push(
            "auth = \"none\": anyone who reaches the port can use it, the admin API included"
                .to_owned(),
        );
    }
    problems
}

/// Refuses an exposed listener with `problems` unless the config allows it; then warns.
pub(crate) fn check_exposure(
    cfg: &SchedulerConfig,
    addr: SocketAddr,
) -> Result<(), crate::GatewayError> {
    let problems = exposure_problems(cfg, addr);
    if problems.is_empty() {
        return Ok(());
    }
    if !cfg.allow_insecure {
        return Err(crate::GatewayError::Insecure { addr, problems });
    }
    warn_insecure(addr, &problems);
    Ok(())
}

fn warn_insecure(addr: SocketAddr, problems: &[String]) {
    tracing::warn!(
        %addr,
        problems = %problems.join("; "),
        "serving beyond loopback insecurely because scheduler.allow_insecure is set"
    );
}

/// Repeats the warning every [`INSECURE_WARN_EVERY`] while the scheduler runs exposed.
pub(crate) async fn keep_warning(state: AppState, addr: SocketAddr, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(INSECURE_WARN_EVERY) => {}
        }
        let problems = exposure_problems(&state.inner.config(), addr);
        if problems.is_empty() {
            return;
        }
        warn_insecure(addr, &problems);
    }
}

/// Whether a heartbeat from `peer` may be heard: `agent_networks` empty, or holding it.
pub(crate) fn check_agent_source(
    cfg: &SchedulerConfig,
    peer: Option<IpAddr>,
) -> Result<(), ApiError> {
    if cfg.agent_networks.is_empty() {
        return Ok(());
    }
    let Some(ip) = peer.map(|ip| ip.to_canonical()) else {
        return Err(refused_source("an unknown address"));
    };
    if cfg.agent_networks.iter().any(|n| n.contains(&ip)) {
        Ok(())
    } else {
        tracing::warn!(peer = %ip, "heartbeat refused: not from scheduler.agent_networks");
        Err(refused_source(&ip.to_string()))
    }
}

fn refused_source(from: &str) -> ApiError {
    ApiError::new(
        ErrorKind::Unauthorized,
        format!("heartbeats from {from} are not accepted (scheduler.agent_networks)"),
    )
    .with_code("agent_network")
}

/// The credential a heartbeat presented, hashed: what a node's later heartbeats from a
/// new address must present again.
pub(crate) fn credential(h: &HeaderMap) -> Option<String> {
    let v = h.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let token = v.strip_prefix("Bearer ")?.trim();
    (!token.is_empty()).then(|| flotilla_state::hash_secret(token))
}

/// The credential each node registered with, so a heartbeat claiming a live node from
/// another address must hold it.
#[derive(Default)]
pub(crate) struct NodeClaims {
    by_node: Mutex<HashMap<String, Option<String>>>,
}

impl NodeClaims {
    /// Whether a heartbeat for `node_id` at `base_url` presenting `cred` may stand for the
    /// node. `registered` is the node's current base URL and whether it is live. A live
    /// node moves to a new address only with the credential it registered with; the move
    /// is logged either way.
    pub(crate) fn admit(
        &self,
        node_id: &str,
        base_url: &str,
        cred: Option<String>,
        registered: Option<(String, bool)>,
    ) -> Result<(), ApiError> {
        let mut map = self.by_node.lock().unwrap_or_else(|p| p.into_inner());
        // Some(held): the credential it registered with here; None: a node this replica
        // heard of from another, or a new one.
        let held = map.get(node_id).cloned();
        match registered {
            Some((old_url, live)) if old_url != base_url => {
                if live && held.as_ref().is_some_and(|h| h.is_none() || *h != cred) {
                    tracing::warn!(
                        node_id, registered = %old_url, claimed = %base_url,
                        "heartbeat refused: a live node claimed from another address without its token"
                    );
                    return Err(ApiError::new(
                        ErrorKind::Unauthorized,
                        format!(
                            "node `{node_id}` is registered at another address; only the token \
                             it registered with can move it while it is live"
                        ),
                    )
                    .with_code("node_claimed"));
                }
                tracing::warn!(node_id, from = %old_url, to = %base_url, "node moved to a new address");
                map.insert(node_id.to_owned(), cred);
            }
            // Live where it is: it keeps the credential it registered with, so a heartbeat
            // from someone else at its address cannot re-key it for a later move.
            Some((_, true)) if held.is_some() => {}
            _ => {
                map.insert(node_id.to_owned(), cred);
            }
        }
        Ok(())
    }

    /// Whether `cred` may deregister `node_id`: the credential it registered with, if any.
    pub(crate) fn may_remove(&self, node_id: &str, cred: &Option<String>) -> bool {
        let map = self.by_node.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(node_id) {
            Some(Some(held)) => cred.as_ref() == Some(held),
            _ => true,
        }
    }

    pub(crate) fn forget(&self, node_id: &str) {
        self.by_node
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node_id);
    }
}

/// Failed authentications per client address (an IPv6 client by its /64, which one host
/// is usually given whole) in a fixed one-minute window.
#[derive(Default)]
pub(crate) struct AuthFailures {
    by_addr: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// Entries in the map: zero (the usual case) skips the lock on every request.
    entries: AtomicUsize,
}

/// The address failures are counted under.
fn counted_as(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

impl AuthFailures {
    /// Whether any address has failed lately (one atomic load: the usual answer is no).
    pub(crate) fn any(&self) -> bool {
        self.entries.load(Ordering::Relaxed) > 0
    }

    /// How long `ip` must wait when it has used up its failures; None when it may try.
    /// A window that has ended is forgotten here.
    pub(crate) fn blocked(&self, ip: IpAddr, limit: u32, now: Instant) -> Option<Duration> {
        if !self.any() {
            return None;
        }
        let ip = counted_as(ip);
        let mut map = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        let (start, n) = *map.get(&ip)?;
        let ends = start + FAILURE_WINDOW;
        if now >= ends {
            map.remove(&ip);
            self.entries.store(map.len(), Ordering::Relaxed);
            return None;
        }
        (n >= limit).then(|| ends - now)
    }

    pub(crate) fn note(&self, ip: IpAddr, now: Instant) {
        let ip = counted_as(ip);
        let mut map = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= FAILURE_ENTRIES && !map.contains_key(&ip) {
            map.retain(|_, (start, _)| now < *start + FAILURE_WINDOW);
            // Still full of live windows: a new address goes uncounted rather than
            // clearing the blocks of others (which a sender of many addresses could force).
            if map.len() >= FAILURE_ENTRIES {
                self.entries.store(map.len(), Ordering::Relaxed);
                return;
            }
        }
        let e = map.entry(ip).or_insert((now, 0));
        if now >= e.0 + FAILURE_WINDOW {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
        self.entries.store(map.len(), Ordering::Relaxed);
    }
}

/// The 429 an address that failed authentication too often gets.
pub(crate) fn too_many_failures(wait: Duration) -> ApiError {
    ApiError::new(
        ErrorKind::RateLimited,
        format!(
            "too many failed authentications from this address; retry in {} s",
            wait.as_secs().max(1)
        ),
    )
    .with_code("too_many_auth_failures")
    .with_retry_after(wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_block_an_address_for_the_rest_of_its_minute() {
        let f = AuthFailures::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(f.blocked(a, 3, t0), None);
            f.note(a, t0);
        }
        let wait = f.blocked(a, 3, t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(wait, Duration::from_secs(50));
        assert_eq!(f.blocked(b, 3, t0), None, "another address is not blocked");
        assert_eq!(
            f.blocked(a, 3, t0 + FAILURE_WINDOW),
            None,
            "the window ends"
        );
        f.note(a, t0 + FAILURE_WINDOW);
        assert_eq!(
            f.blocked(a, 3, t0 + FAILURE_WINDOW),
            None,
            "and starts anew"
        );
        // One IPv6 host's /64 is one address: rotating within it does not help.
        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        for i in 1..=3 {
            f.note(v6(&format!("2001:db8:1:2::{i}")), t0);
        }
        assert!(f.blocked(v6("2001:db8:1:2:ffff::9"), 3, t0).is_some());
        assert!(f.blocked(v6("2001:db8:1:3::1"), 3, t0).is_none());
    }

    #[test]
    fn a_live_node_moves_only_with_the_token_it_registered_with() {
        let c = NodeClaims::default();
        let tok = Some("h1".to_owned());
        c.admit("n", "http://a", tok.clone(), None).unwrap();
        let here = Some(("http://a".to_owned(), true));
        // The same address: fine, whatever it presents.
        c.admit("n", "http://a", tok.clone(), here.clone()).unwrap();
        let e = c.admit("n", "http://evil", Some("h2".into()), here.clone());
        assert_eq!(e.unwrap_err().code.as_deref(), Some("node_claimed"));
        let e = c.admit("n", "http://evil", None, here.clone());
        assert!(e.is_err());
        // Its own token moves it; a silent node can be taken over.
        c.admit("n", "http://b", tok.clone(), here).unwrap();
        c.admit("n", "http://c", None, Some(("http://b".into(), false)))
            .unwrap();
        assert!(c.may_remove("n", &None));
        // Re-keying it from its own address first does not help.
        c.admit("k", "http://a", tok.clone(), None).unwrap();
        let at_a = Some(("http://a".to_owned(), true));
        c.admit("k", "http://a", None, at_a.clone()).unwrap();
        assert!(c.admit("k", "http://evil", None, at_a).is_err());
        // A node heard of from another replica has no claim here: it may move.
        c.admit(
            "elsewhere",
            "http://b",
            None,
            Some(("http://a".into(), true)),
        )
        .unwrap();
        // Registered without a token: a live node cannot be moved at all.
        let e = c.admit("n", "http://d", None, Some(("http://c".into(), true)));
        assert!(e.is_err());
        c.admit("m", "http://a", tok.clone(), None).unwrap();
        assert!(!c.may_remove("m", &None));
        assert!(c.may_remove("m", &tok));
    }
}
