//! Simulated agents: slots, prefill and decode throughput, a prefix cache, and outages.
//!
//! A sequence starts when a slot is free; its TTFT is its prompt, less the part a cached
//! prefix covers, over the prefill rate; it then decodes at the per-sequence rate for the
//! batch size at its start. A prefix is cached once its prefill is done, and the least
//! recently used prefixes go when the cache is full.
//!
//! Outages: at its start the agent's running requests break (the gateway sees the answer
//! cut and tries the next target: the simulator models answers that are not yet streaming
//! to the client, or `mid_stream = "continue"`) and its cache empties. The fleet keeps
//! listing it until `gateway.node_ttl_ms` after its last heartbeat, or until a connection
//! to it is refused (the gateway then marks it unreachable), whichever comes first; a
//! request sent there meanwhile is refused at once and goes on down its plan. At the
//! outage's end it heartbeats again and is listed, empty.

use std::collections::BTreeMap;
use std::time::Duration;

use super::config::SimAgent;
use super::engine::SimPolicy;
use super::engine::{Event, Served, Sim, arrival, secs};
use crate::{Outcome, TargetHealth};

/// Cached prefixes by id, least recently used first out.
#[derive(Debug, Default)]
struct PrefixCache {
    capacity: u64,
    used: u64,
    /// id -> (tokens, last use, when its prefill is done)
    entries: BTreeMap<u64, (u64, Duration, Duration)>,
}

impl PrefixCache {
    /// Tokens of prefix `id` the cache holds at `now` (0 = a miss); a hit counts as a use.
    fn hit(&mut self, id: u64, now: Duration) -> u64 {
        match self.entries.get_mut(&id) {
            Some((tokens, used, ready)) if *ready <= now => {
                *used = now;
                *tokens
            }
            _ => 0,
        }
    }

    /// Keeps `tokens` of prefix `id` from `ready` on, evicting the least recently used.
    fn insert(&mut self, id: u64, tokens: u64, now: Duration, ready: Duration) {
        if let Some((_, used, at)) = self.entries.get_mut(&id) {
            *used = now;
            *at = (*at).min(ready);
            return;
        }
        if tokens > self.capacity {
            return;
        }
        while self.used + tokens > self.capacity {
            // By last use, then id: deterministic on ties.
            let Some((&old, &(n, _, _))) = self
                .entries
                .iter()
                .min_by_key(|(id, (_, used, _))| (*used, **id))
            else {
                break;
            };
            self.entries.remove(&old);
            self.used -= n;
        }
        self.entries.insert(id, (tokens, now, ready));
        self.used += tokens;
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.used = 0;
    }
}

pub(super) struct Agent<'a> {
    pub spec: &'a SimAgent,
    pub running: u64,
    busy_since: Option<Duration>,
    pub busy: Duration,
    pub health: TargetHealth,
    /// Gone since then (None: up).
    down_since: Option<Duration>,
    /// A connection to it was refused since its last heartbeat.
    suspect: bool,
    cache: PrefixCache,
    /// The requests running on it.
    on: Vec<usize>,
}

impl<'a> Agent<'a> {
    pub fn new(spec: &'a SimAgent) -> Self {
        Agent {
            spec,
            running: 0,
            busy_since: None,
            busy: Duration::ZERO,
            health: TargetHealth::new(0),
            down_since: None,
            suspect: false,
            cache: PrefixCache {
                capacity: spec.prefix_cache_tokens,
                ..PrefixCache::default()
            },
            on: Vec::new(),
        }
    }

    /// Whether the fleet lists it at `now` (it may be gone and not yet noticed).
    pub fn listed(&self, now: Duration, ttl: Duration) -> bool {
        !self.suspect && self.down_since.is_none_or(|d| now < d + ttl)
    }

    fn stop_busy(&mut self, now: Duration) {
        if let Some(since) = self.busy_since.take() {
            self.busy += now.saturating_sub(since);
        }
    }
}

impl<'a> Sim<'a> {
    pub(super) fn ttl(&self) -> Duration {
        Duration::from_millis(self.cfg.gateway.node_ttl_ms)
    }

    pub(super) fn listed(&self, a: usize) -> bool {
        self.agents[a].listed(self.now, self.ttl())
    }

    /// Listed, and (under `flotilla`) admitted by its health: what the gateway's queue
    /// pump hands slots on.
    pub(super) fn usable(&self, a: usize) -> bool {
        self.listed(a)
            && (self.policy != SimPolicy::Flotilla
                || self.agents[a].health.admit(&self.hc, self.at()).allowed())
    }

    pub(super) fn start_local(&mut self, a: usize, i: usize) {
        let r = &self.trace[i];
        let now = self.now;
        let at = self.at();
        let q = &mut self.reqs[i];
        q.attempts += 1;
        q.tries += 1;
        let tries = q.tries;
        let ag = &mut self.agents[a];
        ag.health.start(&self.hc, at);
        if ag.down_since.is_some() {
            // Connection refused: the gateway marks the agent unreachable and goes on.
            ag.health.finish(&self.hc, Outcome::Failure, at);
            ag.suspect = true;
            self.counts.agent_failures += 1;
            self.advance(i);
            return;
        }
        ag.running += 1;
        ag.busy_since.get_or_insert(now);
        ag.on.push(i);
        let cached = match (r.prefix_id, r.prefix_tokens) {
            (Some(id), Some(n)) => {
                let hit = ag.cache.hit(id, now).min(n);
                // The prefix's KV exists once its prefill is done.
                let rest = r.prompt_tokens.saturating_sub(hit);
                let done = now + secs(rest as f64 / ag.spec.prefill_tokens_per_s);
                ag.cache.insert(id, n, now, done);
                if self.policy == SimPolicy::Flotilla {
                    self.affinity.insert(id, a);
                }
                hit
            }
            _ => 0,
        };
        if cached > 0 {
            self.counts.prefix_hits += 1;
            self.counts.prefix_tokens_saved += cached;
        }
        // At least the last prompt token is computed, even on a full hit.
        let prefill_tokens = r.prompt_tokens.saturating_sub(cached).max(1);
        let prefill = secs(prefill_tokens as f64 / ag.spec.prefill_tokens_per_s);
        let latency = prefill + secs(r.completion_tokens as f64 / ag.spec.decode_rate(ag.running));
        self.reqs[i].pending = Some(Served {
            ttft: (now + prefill).saturating_sub(arrival(r)),
            finish: now + latency,
            cloud: None,
            agent: Some(a),
            cost_usd: 0.0,
            svc_ttft: prefill,
            svc_latency: latency,
        });
        self.schedule(
            now + latency,
            Event::LocalDone {
                agent: a,
                req: i,
                tries,
            },
        );
    }

    pub(super) fn local_done(&mut self, a: usize, i: usize, tries: u32) {
        // An answer that broke when the agent went was handled then.
        if self.reqs[i].tries != tries || !self.agents[a].on.contains(&i) {
            return;
        }
        let at = self.at();
        let now = self.now;
        let served = self.reqs[i].pending.take();
        let ag = &mut self.agents[a];
        ag.on.retain(|&r| r != i);
        ag.running = ag.running.saturating_sub(1);
        if ag.running == 0 {
            ag.stop_busy(now);
        }
        if let Some(s) = served {
            let outcome = Outcome::Success {
                ttft: Some(s.svc_ttft),
                latency: s.svc_latency,
                tokens: Some(self.trace[i].completion_tokens),
            };
            ag.health.finish(&self.hc, outcome, at);
        }
        self.reqs[i].done = served;
        self.fill_slots();
    }

    /// The agent goes: what runs there breaks and tries the next target.
    pub(super) fn agent_down(&mut self, a: usize) {
        let now = self.now;
        let at = self.at();
        let ag = &mut self.agents[a];
        if ag.down_since.is_some() {
            return;
        }
        ag.down_since = Some(now);
        ag.stop_busy(now);
        ag.running = 0;
        ag.cache.clear();
        let broken = std::mem::take(&mut ag.on);
        for &i in &broken {
            ag.health.finish(&self.hc, Outcome::Failure, at);
            self.reqs[i].pending = None;
        }
        self.counts.agent_failures += broken.len() as u64;
        for i in broken {
            self.advance(i);
        }
        // The fleet stops listing it after the heartbeat TTL: the queue may then have to
        // reconsider.
        let ttl = self.ttl();
        self.schedule(now + ttl, Event::FleetChange);
        // The broken requests released their slots, which wakes the gateway's queue pump.
        self.fill_slots();
    }

    /// The agent heartbeats again: listed, empty, cold.
    pub(super) fn agent_up(&mut self, a: usize) {
        let ag = &mut self.agents[a];
        if ag.down_since.is_none() || ag.spec.down_at(self.now) {
            return;
        }
        ag.down_since = None;
        ag.suspect = false;
        self.fill_slots();
    }
}

#[cfg(test)]
mod tests {
    use super::PrefixCache;
    use std::time::Duration;

    #[test]
    fn prefix_cache_hits_after_prefill_and_evicts_least_recently_used() {
        let s = Duration::from_secs;
        let mut c = PrefixCache {
            capacity: 1000,
            ..PrefixCache::default()
        };
        c.insert(1, 600, s(0), s(1));
        assert_eq!(c.hit(1, s(0)), 0, "its prefill is not done yet");
        assert_eq!(c.hit(1, s(1)), 600);
        c.insert(2, 300, s(2), s(2));
        assert_eq!(c.hit(1, s(3)), 600, "1 is now the most recently used");
        c.insert(3, 300, s(4), s(4));
        assert_eq!(
            (c.hit(2, s(5)), c.hit(1, s(5)), c.hit(3, s(5))),
            (0, 600, 300)
        );
        assert!(c.used <= c.capacity);
        c.insert(4, 5000, s(6), s(6));
        assert_eq!(c.hit(4, s(7)), 0, "larger than the cache: not kept");
    }
}
