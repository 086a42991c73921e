//! Token sampling: greedy, temperature, nucleus (top-p), with a seedable RNG.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::types::SamplingParams;

pub(crate) struct Sampler {
    rng: StdRng,
    temperature: f64,
    top_p: f64,
    top_logprobs: Option<usize>,
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
    pub(crate) fn new(params: &SamplingParams, _prompt_ids: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Sampler {
            rng,
            temperature: params.temperature,
            top_p: params.top_p,
            top_logprobs: params.logprobs.then_some(params.top_logprobs),
        }
    }

    /// Picks the next token and records it in the sampler's history.
    pub(crate) fn sample(&mut self, logits: &[f32]) -> Sampled {
        let token = self.pick(logits);
        let (logprob, top) = match self.top_logprobs {
            None => (0.0, Vec::new()),
            Some(k) => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
                let mut top: Vec<(u32, f32)> = logits
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (i as u32, l - lse))
                    .collect();
                top.sort_by(|a, b| b.1.total_cmp(&a.1));
                top.truncate(k);
                (logits[token as usize] - lse, top)
            }
        };
        Sampled {
            token,
            logprob,
            top,
        }
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, (f64::from(l - max) / self.temperature).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        if !total.is_finite() || total <= 0.0 {
            return argmax(logits);
        }
        if self.top_p < 1.0 {
            // Stable sort keeps ties in id order so seeded runs are reproducible.
            probs.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                mass += p.1 / total;
                if mass >= self.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let kept: f64 = probs.iter().map(|p| p.1).sum();
        let mut u = self.rng.random::<f64>() * kept;
        for &(id, p) in &probs {
            if u < p {
                return id;
            }
            u -= p;
        }
        probs.last().map_or(0, |p| p.0)
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
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

    #[test]
    fn greedy_picks_max() {
        let mut s = Sampler::new(&params(0.0, 1.0, 1), &[]);
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0]).token, 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_varied() {
        let logits = vec![0.0f32; 50];
        let draw = |seed| {
            let mut s = Sampler::new(&params(1.0, 1.0, seed), &[]);
            (0..20).map(|_| s.sample(&logits).token).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_p_restricts_to_nucleus() {
        // Token 2 holds ~88% of the mass; top_p 0.5 must always pick it.
        let logits = [0.0f32, 0.0, 4.0, 0.0];
        let mut s = Sampler::new(&params(1.0, 0.5, 3), &[]);
        assert!((0..100).all(|_| s.sample(&logits).token == 2));
        let mut s = Sampler::new(&params(1.0, 1.0, 3), &[]);
        assert!((0..200).any(|_| s.sample(&logits).token != 2));
    }
}
