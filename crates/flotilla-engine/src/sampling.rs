//! Token sampling, one `Sampler` per sequence: penalties (repetition, frequency, presence),
//! then greedy, or temperature with top-k, min-p and top-p filtering and a seedable draw.
//!
//! Order, as vLLM applies it: the repetition penalty (tokens of the prompt or the output),
//! then the frequency and presence penalties (output only), then temperature; top-k and
//! min-p (which commute: both keep the most likely tokens), then top-p over what they left,
//! renormalised. Every ranking breaks ties by the lower token id, so a seeded run draws the
//! same tokens from the same logits.
//!
//! Cost per token is a few linear passes over the vocabulary (up to ~150k), vectorised
//! where they do arithmetic, and no sort of it: top-k keeps a small buffer or selects, and
//! top-p selects by mass. On a busy 2-core box, for a 150k vocabulary: greedy ~50 µs,
//! top-k ~100 µs, plain temperature ~0.5 ms, top-p 0.9 over a flat distribution ~1.5 ms,
//! logprobs ~0.3 ms more.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::types::SamplingParams;

/// Temperatures below this decode greedily, as in vLLM: dividing by ~0 only sharpens the
/// distribution onto its maximum anyway.
const GREEDY_BELOW: f64 = 1e-5;

/// The smallest weight, relative to the best token's 1, that a draw considers: below it
/// even 150k tokens together hold under 1e-7 of the mass, which an f32 sum cannot resolve.
const WEIGHT_FLOOR: f32 = 9.357_623e-14; // e^-30

/// A top-k up to this is found with a small sorted buffer in one pass over the scores;
/// larger ones by selection over the candidates.
const BUFFERED_TOP_K: usize = 64;

pub(crate) struct Sampler {
    rng: StdRng,
    temperature: f64,
    top_p: f64,
    top_k: Option<usize>,
    /// Weight threshold relative to the most likely token (whose weight is 1).
    min_p: f32,
    repetition_penalty: f32,
    frequency_penalty: f32,
    presence_penalty: f32,
    /// `Some(n)`: report the chosen token's log-probability and the `n` best alternatives.
    top_logprobs: Option<usize>,
    /// Distinct tokens of the prompt and the output; kept only for a repetition penalty.
    seen: HashSet<u32>,
    /// Occurrences of each generated token; kept only for frequency/presence penalties.
    counts: HashMap<u32, u32>,
}

/// Vocabulary-sized buffers one draw works in. Per thread rather than per sequence: a
/// 150k vocabulary makes them ~2 MB, and a thread samples one sequence at a time.
#[derive(Default)]
struct Scratch {
    /// Penalised logits.
    scores: Vec<f32>,
    /// Weights relative to the best token.
    weights: Vec<f32>,
    /// (token, weight) candidates.
    cands: Vec<(u32, f32)>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// One sampling decision: the token, its log-probability under the raw logits, and the
/// `top_logprobs` most likely tokens with theirs (empty unless asked for).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sampled {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl Sampler {
    /// `prompt_ids` seed the repetition penalty's history.
    pub(crate) fn new(params: &SamplingParams, prompt_ids: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let repetition_penalty = params.repetition_penalty as f32;
        let seen = if repetition_penalty != 1.0 {
            prompt_ids.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Sampler {
            rng,
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k,
            min_p: params.min_p as f32,
            repetition_penalty,
            frequency_penalty: params.frequency_penalty as f32,
            presence_penalty: params.presence_penalty as f32,
            top_logprobs: params.logprobs.then_some(params.top_logprobs),
            seen,
            counts: HashMap::new(),
        }
    }

    /// Picks the next token from one position's raw logits and records it in the history.
    ///
    /// The reported log-probabilities are the log-softmax of the RAW logits, before any
    /// penalty or temperature: what vLLM reports by default, and what the model believed.
    pub(crate) fn sample(&mut self, logits: &[f32]) -> Sampled {
        let token = self.pick(logits);
        self.record(token);
        let (logprob, top) = match self.top_logprobs {
            None => (0.0, Vec::new()),
            Some(n) => {
                let lse = log_sum_exp(logits);
                let logprob = logits
                    .get(token as usize)
                    .map_or(f32::NEG_INFINITY, |&l| sane(l) - lse);
                let top = best_n(logits, n)
                    .into_iter()
                    .map(|(id, l)| (id, l - lse))
                    .collect();
                (logprob, top)
            }
        };
        Sampled {
            token,
            logprob,
            top,
        }
    }

    fn penalised(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
    }

    /// Takes up an answer where an earlier run left it: `earlier` are the tokens that run
    /// generated, now at the end of the prompt. Each drew once from the seeded generator and
    /// counts toward the penalties, so a seeded continuation draws what the uninterrupted
    /// run would have drawn next.
    pub(crate) fn resume(&mut self, earlier: &[u32]) {
        for &token in earlier {
            if self.temperature >= GREEDY_BELOW {
                let _ = self.rng.random::<f64>();
            }
            self.record(token);
        }
    }

    fn record(&mut self, token: u32) {
        if self.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
        if self.frequency_penalty != 0.0 || self.presence_penalty != 0.0 {
            *self.counts.entry(token).or_insert(0) += 1;
        }
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        SCRATCH.with_borrow_mut(|scratch| {
            let Scratch {
                scores,
                weights,
                cands,
            } = scratch;
            // The penalties touch only the tokens already seen, but on a copy: the raw
            // logits still give the reported log-probabilities.
            let source: &[f32] = if self.penalised() {
                scores.clear();
                scores.extend(logits.iter().copied().map(sane));
                self.apply_penalties(scores);
                scores
            } else {
                logits
            };
            if self.temperature < GREEDY_BELOW {
                argmax(source)
            } else {
                self.draw(source, weights, cands)
            }
        })
    }

    fn apply_penalties(&self, scores: &mut [f32]) {
        let rp = self.repetition_penalty;
        if rp != 1.0 {
            for &id in &self.seen {
                if let Some(s) = scores.get_mut(id as usize) {
                    *s = if *s > 0.0 { *s / rp } else { *s * rp };
                }
            }
        }
        for (&id, &count) in &self.counts {
            if let Some(s) = scores.get_mut(id as usize) {
                *s -= count as f32 * self.frequency_penalty + self.presence_penalty;
            }
        }
    }

    /// Temperature, top-k, min-p and top-p, then a draw from what is left.
    fn draw(&mut self, scores: &[f32], weights: &mut Vec<f32>, cands: &mut Vec<(u32, f32)>) -> u32 {
        let max = max_of(scores);
        if !max.is_finite() {
            return argmax(scores);
        }
        let inv_t = (1.0 / self.temperature) as f32;
        // min_p, and the floor below which weights are not worth drawing from. On a real
        // model's logits the floor alone often leaves far fewer candidates than the
        // vocabulary.
        let floor = self.min_p.max(WEIGHT_FLOOR);
        match self.top_k {
            Some(k) if k <= BUFFERED_TOP_K => {
                best_n_into(cands, scores, k.max(1));
                for c in cands.iter_mut() {
                    c.1 = exp_le0((c.1 - max) * inv_t);
                }
                cands.retain(|c| c.1 >= floor);
            }
            top_k => {
                weights.clear();
                weights.extend(scores.iter().map(|&s| exp_le0((s - max) * inv_t)));
                // Branch-free compaction: every weight is written, only those above the
                // floor advance the end.
                cands.clear();
                cands.resize(weights.len(), (0, 0.0));
                let mut end = 0;
                for (i, &w) in weights.iter().enumerate() {
                    cands[end] = (i as u32, w);
                    end += usize::from(w >= floor);
                }
                cands.truncate(end);
                if let Some(k) = top_k
                    && k < cands.len()
                {
                    cands.select_nth_unstable_by(k - 1, better);
                    cands.truncate(k);
                }
            }
        }
        let mut total = mass_of(cands);
        if self.top_p < 1.0 {
            let keep = nucleus(cands, self.top_p * total);
            cands.truncate(keep);
            total = mass_of(cands);
        }
        pick_by_weight(cands, self.rng.random::<f64>() * total).unwrap_or_else(|| argmax(scores))
    }
}

/// The candidate where the running weight passes `u`; the last one if rounding runs past
/// the end. Whole blocks are skipped by their (vectorised) sums.
fn pick_by_weight(cands: &[(u32, f32)], mut u: f64) -> Option<u32> {
    const BLOCK: usize = 256;
    for block in cands.chunks(BLOCK) {
        let m = mass_of(block);
        if u >= m {
            u -= m;
            continue;
        }
        for &(id, w) in block {
            let w = f64::from(w);
            if u < w {
                return Some(id);
            }
            u -= w;
        }
    }
    cands.last().map(|c| c.0)
}

/// NaN logits (a broken model) rank below everything instead of poisoning the sums.
fn sane(l: f32) -> f32 {
    if l.is_nan() { f32::NEG_INFINITY } else { l }
}

/// Ranking of (token, score): higher score first, then the lower id.
fn better(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The largest value, NaN ignored; -inf for none. Eight running maxima let the loop
/// vectorise.
fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for ch in chunks {
        for (a, &x) in acc.iter_mut().zip(ch) {
            *a = a.max(x);
        }
    }
    rest.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

/// The highest score; the lowest id among equals.
fn argmax(scores: &[f32]) -> u32 {
    let max = max_of(scores);
    scores.iter().position(|&s| s == max).unwrap_or(0) as u32
}

/// e^x for x <= 0 (larger x are read as 0), within ~1e-7 relative. Branch-free so loops
/// over it vectorise: `f32::exp` is a libm call per element, and a 150k vocabulary's worth
/// of them was most of a token's sampling time. Below e^-87 it returns ~1e-38, not 0:
/// as good as 0 in any sum here. NaN reads as -inf.
#[inline]
pub(crate) fn exp_le0(x: f32) -> f32 {
    // Cephes' expf: e^x = 2^n * e^r with n = round(x / ln 2) and |r| <= ln(2) / 2, ln 2
    // split in two so r keeps its precision. Adding 1.5 * 2^23 rounds to an integer and
    // leaves it in the low mantissa bits. The clamps (written so NaN fails them) keep 2^n
    // a normal float.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0;
    let x = if x >= -87.3 { x } else { -87.3 };
    let x = if x <= 0.0 { x } else { 0.0 };
    let z = x * std::f32::consts::LOG2_E + ROUND;
    let nf = z - ROUND;
    let n = z.to_bits().wrapping_sub(ROUND.to_bits());
    let r = x - nf * LN2_HI - nf * LN2_LO;
    let p = (((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * (r * r)
        + r
        + 1.0;
    p * f32::from_bits(n.wrapping_add(127) << 23)
}

/// Sum of the weights, in four running sums so the loop vectorises.
fn mass_of(cands: &[(u32, f32)]) -> f64 {
    let mut acc = [0.0f64; 4];
    let chunks = cands.chunks_exact(4);
    let rest = chunks.remainder();
    for ch in chunks {
        for (a, c) in acc.iter_mut().zip(ch) {
            *a += f64::from(c.1);
        }
    }
    acc.iter().sum::<f64>() + rest.iter().map(|c| f64::from(c.1)).sum::<f64>()
}

/// Moves the smallest set of best candidates whose weight reaches `target` to the front
/// and returns its size (at least one). A quickselect on mass whose pivot is read off a
/// sample as where the target is likely to be reached, so the first partition usually
/// leaves a range not much larger than the nucleus: about one pass over the candidates,
/// where sorting the nucleus of a flat distribution would cost most of a full sort.
fn nucleus(cands: &mut [(u32, f32)], target: f64) -> usize {
    // Ranges this small, or pivots that keep failing, are finished by a sort.
    const SORT_BELOW: usize = 64;
    const MAX_ROUNDS: usize = 32;
    const SAMPLE: usize = 64;
    let (mut lo, mut hi) = (0, cands.len());
    // Weight of cands[..lo]. Everything before `lo` outranks everything from it on, and
    // everything in cands[lo..hi] outranks everything from `hi` on.
    let mut mass = 0.0f64;
    let mut rounds = 0;
    while hi - lo > SORT_BELOW && rounds < MAX_ROUNDS {
        rounds += 1;
        let len = hi - lo;
        let mut sample: [usize; SAMPLE] = std::array::from_fn(|j| lo + j * len / SAMPLE);
        sample.sort_unstable_by(|&a, &b| better(&cands[a], &cands[b]));
        // Each sampled weight stands for len / SAMPLE candidates. The pivot is one sample
        // past the estimated boundary, so the nucleus most likely ranks above it.
        let scale = len as f64 / SAMPLE as f64;
        let mut estimate = mass;
        let mut pick = SAMPLE - 1;
        for (j, &i) in sample.iter().enumerate() {
            estimate += f64::from(cands[i].1) * scale;
            if estimate >= target {
                pick = (j + 1).min(SAMPLE - 1);
                break;
            }
        }
        cands.swap(lo, sample[pick]);
        let pivot = cands[lo];
        // Lomuto partition without branches: the candidates ranked above the pivot
        // gather at the front of `range`.
        let range = &mut cands[lo + 1..hi];
        let mut store = 0;
        for i in 0..range.len() {
            let c = range[i];
            let is_above = c.1 > pivot.1 || (c.1 == pivot.1 && c.0 < pivot.0);
            range[i] = range[store];
            range[store] = c;
            store += usize::from(is_above);
        }
        let above = mass_of(&range[..store]);
        let at = lo + store;
        cands.swap(lo, at);
        if mass + above >= target {
            hi = at;
        } else if mass + above + f64::from(pivot.1) >= target {
            return at + 1;
        } else {
            mass += above + f64::from(pivot.1);
            lo = at + 1;
        }
    }
    cands[lo..hi].sort_unstable_by(better);
    for (i, c) in cands[lo..hi].iter().enumerate() {
        mass += f64::from(c.1);
        if mass >= target {
            return lo + i + 1;
        }
    }
    // Only rounding gets here: the range's mass was found to reach the target.
    hi.max(1).min(cands.len())
}

/// ln of the sum of e^logit, NaN read as -inf. Blocks of eight f32 running sums let the
/// loop vectorise; adding the blocks in f64 keeps 150k terms exact to f32 precision.
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = max_of(logits);
    if !max.is_finite() {
        return max;
    }
    let mut total = 0.0f64;
    for block in logits.chunks(256) {
        let mut acc = [0.0f32; 8];
        let chunks = block.chunks_exact(8);
        let rest = chunks.remainder();
        for ch in chunks {
            for (a, &l) in acc.iter_mut().zip(ch) {
                *a += exp_le0(l - max);
            }
        }
        total += f64::from(acc.iter().sum::<f32>())
            + rest
                .iter()
                .map(|&l| f64::from(exp_le0(l - max)))
                .sum::<f64>();
    }
    max + total.ln() as f32
}

/// The `n` highest logits, best first, ties to the lower id.
fn best_n(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut top = Vec::new();
    best_n_into(&mut top, logits, n);
    top
}

/// Fills `top` with the `n` highest scores, best first, ties to the lower id (NaN reads
/// as -inf). One pass keeping a small sorted buffer; once it is full, a block of scores
/// whose (vectorised) maximum cannot enter it is skipped whole, which is most of them.
fn best_n_into(top: &mut Vec<(u32, f32)>, scores: &[f32], n: usize) {
    const BLOCK: usize = 64;
    top.clear();
    if n == 0 {
        return;
    }
    if n >= scores.len() {
        top.extend(scores.iter().enumerate().map(|(i, &l)| (i as u32, sane(l))));
        top.sort_unstable_by(better);
        return;
    }
    top.reserve(n + 1);
    for (b, block) in scores.chunks(BLOCK).enumerate() {
        if top.len() == n && top.last().is_some_and(|w| max_of(block) <= w.1) {
            continue;
        }
        for (j, &l) in block.iter().enumerate() {
            let l = sane(l);
            // Ids arrive in increasing order, so an equal score never displaces an
            // earlier one.
            if top.len() == n && top.last().is_some_and(|w| l <= w.1) {
                continue;
            }
            let at = top.partition_point(|c| c.1 >= l);
            top.insert(at, ((b * BLOCK + j) as u32, l));
            top.truncate(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_p: f64, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    /// Token ids drawn `draws` times from the same logits.
    fn draws(p: &SamplingParams, logits: &[f32], draws: usize) -> Vec<u32> {
        // A fresh sampler per draw: no penalty history builds up.
        (0..draws)
            .map(|i| {
                let mut p = p.clone();
                p.seed = p.seed.map(|s| s.wrapping_add(i as u64));
                Sampler::new(&p, &[]).sample(logits).token
            })
            .collect()
    }

    #[test]
    fn greedy_picks_max_and_lowest_id_on_ties() {
        let mut s = Sampler::new(&params(0.0, 1.0, 1), &[]);
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0]).token, 1);
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, f32::NAN]).token, 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_varied() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.1).collect();
        let p = SamplingParams {
            top_k: Some(30),
            top_p: 0.9,
            min_p: 0.01,
            ..params(1.0, 1.0, 0)
        };
        let draw = |seed| {
            let mut s = Sampler::new(
                &SamplingParams {
                    seed: Some(seed),
                    ..p.clone()
                },
                &[],
            );
            (0..20).map(|_| s.sample(&logits).token).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn a_resumed_sampler_draws_what_the_first_would_have_drawn_next() {
        let p = SamplingParams {
            top_k: Some(30),
            frequency_penalty: 0.4,
            presence_penalty: 0.2,
            seed: Some(11),
            ..params(0.9, 0.95, 0)
        };
        let logits: Vec<Vec<f32>> = (0..24)
            .map(|step| {
                (0..60)
                    .map(|i| ((i * 7 + step * 3) % 11) as f32 * 0.15)
                    .collect()
            })
            .collect();
        let mut first = Sampler::new(&p, &[1, 2, 3]);
        let whole: Vec<u32> = logits.iter().map(|l| first.sample(l).token).collect();
        for cut in [1, 5, 12, 23] {
            let mut resumed = Sampler::new(&p, &[1, 2, 3]);
            resumed.resume(&whole[..cut]);
            let rest: Vec<u32> = logits[cut..]
                .iter()
                .map(|l| resumed.sample(l).token)
                .collect();
            assert_eq!(rest, whole[cut..], "cut at {cut}");
        }
    }

    #[test]
    fn top_p_restricts_to_nucleus() {
        // Token 2 holds ~88% of the mass; top_p 0.5 must always pick it.
        let logits = [0.0f32, 0.0, 4.0, 0.0];
        assert!(
            draws(&params(1.0, 0.5, 3), &logits, 100)
                .iter()
                .all(|&t| t == 2)
        );
        assert!(
            draws(&params(1.0, 1.0, 3), &logits, 200)
                .iter()
                .any(|&t| t != 2)
        );
    }

    #[test]
    fn top_p_on_a_flat_distribution_keeps_the_lowest_ids() {
        // 1000 equal tokens: top_p 0.5 keeps the 500 lowest ids (ties by id), which takes
        // the nucleus past its first sorted batch.
        let logits = vec![0.0f32; 1000];
        let picked = draws(&params(1.0, 0.5, 11), &logits, 400);
        assert!(picked.iter().all(|&t| t < 500), "{picked:?}");
        assert!(picked.iter().any(|&t| t >= 400));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..300).map(|i| ((i * 37) % 101) as f32 * 0.01).collect();
        let greedy = Sampler::new(&params(0.0, 1.0, 0), &[])
            .sample(&logits)
            .token;
        let k1 = SamplingParams {
            top_k: Some(1),
            ..params(1.5, 1.0, 5)
        };
        assert!(draws(&k1, &logits, 100).iter().all(|&t| t == greedy));
        // Without top_k the same temperature wanders off the maximum.
        assert!(
            draws(&params(1.5, 1.0, 5), &logits, 100)
                .iter()
                .any(|&t| t != greedy)
        );
    }

    #[test]
    fn top_k_keeps_only_the_k_best() {
        let logits: Vec<f32> = (0..100).map(|i| i as f32 * 0.01).collect();
        let p = SamplingParams {
            top_k: Some(3),
            ..params(1.0, 1.0, 9)
        };
        let picked = draws(&p, &logits, 300);
        assert!(picked.iter().all(|&t| t >= 97), "{picked:?}");
        for t in 97..100 {
            assert!(picked.contains(&t));
        }
    }

    #[test]
    fn top_k_larger_than_the_buffer_keeps_only_the_k_best() {
        // Ids 0..100 score highest, in a scrambled order.
        let logits: Vec<f32> = (0..1000)
            .map(|i| {
                let rank = (i * 337) % 1000;
                if rank < 100 {
                    5.0 + rank as f32 * 1e-3
                } else {
                    0.0
                }
            })
            .collect();
        let p = SamplingParams {
            top_k: Some(BUFFERED_TOP_K + 36),
            ..params(1.0, 1.0, 2)
        };
        let picked = draws(&p, &logits, 300);
        assert!(
            picked.iter().all(|&t| logits[t as usize] >= 5.0),
            "{picked:?}"
        );
    }

    #[test]
    fn best_n_matches_a_sort() {
        let mut rng = StdRng::seed_from_u64(8);
        let logits: Vec<f32> = (0..5000)
            .map(|_| f32::from(rng.random_range(0u16..400)) * 0.05)
            .collect();
        let mut sorted: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        sorted.sort_by(better);
        for n in [1, 5, 20, 64, 200] {
            assert_eq!(best_n(&logits, n), sorted[..n], "n={n}");
        }
    }

    #[test]
    fn min_p_excludes_low_tokens() {
        // Weights relative to the top: 1, e^-1 ~ 0.37, e^-3 ~ 0.05.
        let logits = [3.0f32, 2.0, 0.0, 0.0, 0.0, 0.0];
        let p = SamplingParams {
            min_p: 0.2,
            ..params(1.0, 1.0, 4)
        };
        let picked = draws(&p, &logits, 300);
        assert!(picked.iter().all(|&t| t <= 1), "{picked:?}");
        assert!(picked.contains(&1));
        assert!(
            draws(&params(1.0, 1.0, 4), &logits, 300)
                .iter()
                .any(|&t| t > 1)
        );
    }

    #[test]
    fn repetition_penalty_changes_the_greedy_pick_from_prompt_history() {
        let logits = [2.0f32, 1.5, 0.1];
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0, 1.0, 0)
        };
        // Token 0 is in the prompt: 2.0 / 2 = 1.0 < 1.5.
        assert_eq!(Sampler::new(&p, &[0]).sample(&logits).token, 1);
        assert_eq!(Sampler::new(&p, &[2]).sample(&logits).token, 0);
        // Negative logits are multiplied, so they also drop.
        let neg = [-1.0f32, -1.5];
        assert_eq!(Sampler::new(&p, &[0]).sample(&neg).token, 1);
    }

    #[test]
    fn repetition_penalty_counts_generated_tokens() {
        let p = SamplingParams {
            repetition_penalty: 4.0,
            ..params(0.0, 1.0, 0)
        };
        let mut s = Sampler::new(&p, &[]);
        let logits = [2.0f32, 1.0, 0.9];
        assert_eq!(s.sample(&logits).token, 0);
        assert_eq!(s.sample(&logits).token, 1);
        assert_eq!(s.sample(&logits).token, 2);
    }

    #[test]
    fn presence_penalty_applies_to_generated_tokens_only() {
        let p = SamplingParams {
            presence_penalty: 1.0,
            ..params(0.0, 1.0, 0)
        };
        let logits = [2.0f32, 1.5, 0.0];
        // Token 0 in the prompt is not penalised.
        let mut s = Sampler::new(&p, &[0, 0, 0]);
        assert_eq!(s.sample(&logits).token, 0);
        // Once generated, it is: 2.0 - 1.0 < 1.5. Only once, whatever the count.
        assert_eq!(s.sample(&logits).token, 1);
        assert_eq!(s.sample(&logits).token, 0);
        assert_eq!(s.sample(&logits).token, 0);
    }

    #[test]
    fn frequency_penalty_grows_with_the_count() {
        let p = SamplingParams {
            frequency_penalty: 0.3,
            ..params(0.0, 1.0, 0)
        };
        let logits = [2.0f32, 1.5];
        let mut s = Sampler::new(&p, &[0, 0]);
        let picks: Vec<u32> = (0..5).map(|_| s.sample(&logits).token).collect();
        // 2.0, then 1.7, 1.4 (< 1.5): token 1 takes over after two zeros.
        assert_eq!(&picks[..3], &[0, 0, 1]);
    }

    #[test]
    fn logprobs_are_of_the_raw_logits_and_sum_to_one() {
        let logits: Vec<f32> = (0..40)
            .map(|i| ((i * 13) % 17) as f32 * 0.3 - 2.0)
            .collect();
        let p = SamplingParams {
            logprobs: true,
            top_logprobs: logits.len(),
            // A penalty and temperature do not change what is reported.
            presence_penalty: 2.0,
            ..params(0.7, 1.0, 1)
        };
        let mut s = Sampler::new(&p, &[]);
        let first = s.sample(&logits).top;
        for _ in 0..3 {
            let out = s.sample(&logits);
            // The penalised history changes the draw, never the report.
            assert_eq!(out.top, first);
            assert_eq!(out.top.len(), logits.len());
            let sum: f32 = out.top.iter().map(|t| t.1.exp()).sum();
            assert!((sum - 1.0).abs() < 1e-4, "{sum}");
            assert!(out.top.windows(2).all(|w| w[0].1 >= w[1].1));
            let (_, chosen) = out.top.iter().find(|t| t.0 == out.token).unwrap();
            assert_eq!(*chosen, out.logprob);
            assert!(out.logprob <= 0.0);
        }
    }

    #[test]
    fn top_logprobs_are_the_best_n_best_first() {
        let logits = [0.5f32, 3.0, 1.0, 3.0, -2.0, 2.0];
        let p = SamplingParams {
            logprobs: true,
            top_logprobs: 3,
            ..params(0.0, 1.0, 0)
        };
        let out = Sampler::new(&p, &[]).sample(&logits);
        let ids: Vec<u32> = out.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 5]);
        assert_eq!(out.token, 1);
        assert_eq!(out.logprob, out.top[0].1);
        let none = Sampler::new(&params(0.0, 1.0, 0), &[]).sample(&logits);
        assert_eq!((none.logprob, none.top.len()), (0.0, 0));
        let zero = SamplingParams {
            top_logprobs: 0,
            ..p
        };
        let out = Sampler::new(&zero, &[]).sample(&logits);
        assert!(out.top.is_empty() && out.logprob < 0.0);
    }

    #[test]
    fn fast_exp_matches_libm() {
        let mut worst = 0.0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let want = f64::from(x).exp();
            let got = f64::from(exp_le0(x));
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_le0(0.0), 1.0);
        assert!(exp_le0(f32::NEG_INFINITY) < 1e-37);
        assert!(exp_le0(f32::NAN) < 1e-37);
    }

    #[test]
    fn nucleus_keeps_the_same_set_as_a_sort() {
        let mut rng = StdRng::seed_from_u64(5);
        for round in 0..200 {
            let n = 1 + round * 23;
            // Coarse weights, so that ties (broken by id) are common, or a long tail.
            let cands: Vec<(u32, f32)> = (0..n)
                .map(|i| {
                    let w = if round % 2 == 0 {
                        f32::from(rng.random_range(1u8..=20)) / 20.0
                    } else {
                        (-rng.random_range(0.0f32..12.0)).exp()
                    };
                    (i as u32, w)
                })
                .collect();
            let total: f64 = cands.iter().map(|c| f64::from(c.1)).sum();
            let top_p = rng.random_range(0.01..1.0);
            let mut sorted = cands.clone();
            sorted.sort_by(better);
            let mut mass = 0.0;
            let want = sorted
                .iter()
                .position(|c| {
                    mass += f64::from(c.1);
                    mass >= top_p * total
                })
                .map_or(n, |i| i + 1);
            let mut got = cands.clone();
            let keep = nucleus(&mut got, top_p * total);
            let mut kept: Vec<u32> = got[..keep].iter().map(|c| c.0).collect();
            kept.sort_unstable();
            let mut expected: Vec<u32> = sorted[..want].iter().map(|c| c.0).collect();
            expected.sort_unstable();
            assert_eq!(kept, expected, "n={n} top_p={top_p}");
        }
    }

    #[test]
    fn degenerate_logits_do_not_panic() {
        let p = SamplingParams {
            logprobs: true,
            top_logprobs: 2,
            top_k: Some(5),
            top_p: 0.5,
            min_p: 0.5,
            repetition_penalty: 1.3,
            ..params(1.0, 1.0, 0)
        };
        let mut s = Sampler::new(&p, &[7, 100_000]);
        for logits in [
            vec![f32::NEG_INFINITY; 8],
            vec![f32::NAN; 8],
            vec![0.0, f32::INFINITY, 1.0],
            vec![1.0],
        ] {
            let out = s.sample(&logits);
            assert!((out.token as usize) < logits.len());
        }
    }
}
