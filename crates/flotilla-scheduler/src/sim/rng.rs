//! A small deterministic PRNG (SplitMix64) with the few distributions the simulator draws
//! from. Not for cryptography; identical on every platform.

/// SplitMix64 (Steele, Lea, Flood 2014): 64 bits of state, passes BigCrush, one multiply
/// chain per draw.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// A stream keyed by several numbers (seed, request, target, attempt), so one draw does
    /// not depend on how many others came before it: every policy sees the same cloud
    /// latency for the same request at the same target (common random numbers).
    pub fn keyed(parts: &[u64]) -> Self {
        let h = parts
            .iter()
            .fold(GOLDEN, |h, &p| mix(h ^ mix(p.wrapping_add(GOLDEN))));
        SplitMix64::new(h)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        // The top 53 bits fill an f64 mantissa exactly.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// Standard normal (Box-Muller; the second value is dropped to keep draws keyed).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: ln is finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Lognormal with the given median and log-space sigma.
    pub fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }
}

/// z such that P(N(0,1) <= z) = 0.99: converts a p99/p50 ratio to a lognormal sigma.
pub const Z99: f64 = 2.326_347_874;

/// Log-space sigma of a lognormal whose median is `p50` and 99th percentile `p99`.
pub fn lognormal_sigma(p50: f64, p99: f64) -> f64 {
    ((p99 / p50).ln() / Z99).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_lognormal_quantiles_match() {
        let a: Vec<u64> = (0..4).map(|_| SplitMix64::new(7).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            SplitMix64::keyed(&[1, 2]).next_u64(),
            SplitMix64::keyed(&[2, 1]).next_u64()
        );
        let sigma = lognormal_sigma(400.0, 2000.0);
        let mut r = SplitMix64::new(42);
        let mut xs: Vec<f64> = (0..20_000).map(|_| r.lognormal(400.0, sigma)).collect();
        xs.sort_by(f64::total_cmp);
        let p50 = xs[10_000];
        let p99 = xs[19_800];
        assert!((p50 / 400.0 - 1.0).abs() < 0.05, "p50 {p50}");
        assert!((p99 / 2000.0 - 1.0).abs() < 0.15, "p99 {p99}");
    }
}
