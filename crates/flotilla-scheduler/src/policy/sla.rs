//! Deadlines at the tail. A target's TTFT is modelled as a lognormal variable fitted to its
//! measured mean and standard deviation (latencies are skewed: a normal fit would put the
//! tail too close to the mean). The policy asks two things of it: the TTFT that a target
//! stays within with the configured probability (`sla_attainment`, a quantile), and the
//! probability that it meets a given deadline.

use std::time::Duration;

/// Spread assumed for a target whose TTFT nothing has measured yet: standard deviation
/// over mean. At 0.5 the p99 is about 2.7 times the mean.
pub const PRIOR_CV: f64 = 0.5;

/// The least spread any target is credited with: one sample, or a few alike, say little
/// about its tail.
pub const MIN_CV: f64 = 0.05;

/// The longest duration the policy computes with: a figure past it is "never".
const NEVER_S: f64 = 1e9;

/// Seconds to a `Duration` without panicking on NaN, infinities or negatives: NaN and
/// anything past [`NEVER_S`] saturate to "never", negatives to zero.
pub fn duration_s(s: f64) -> Duration {
    if s.is_nan() || s >= NEVER_S {
        Duration::from_secs_f64(NEVER_S)
    } else if s <= 0.0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(s)
    }
}

/// The time to decode `tokens` at `tokens_per_s`, saturating for absurd inputs.
pub fn decode_time(tokens: u64, tokens_per_s: f64) -> Duration {
    duration_s(tokens as f64 / tokens_per_s.max(1e-9))
}

/// A TTFT distribution: lognormal with the given mean and standard deviation (seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tail {
    /// ln-space location and scale; `sigma` 0 = a fixed value.
    mu: f64,
    sigma: f64,
    mean: f64,
}

impl Tail {
    /// Fitted to a mean and a standard deviation (at least [`MIN_CV`] of the mean); no
    /// deviation = [`PRIOR_CV`] of the mean.
    pub fn fit(mean: Duration, dev: Option<Duration>) -> Tail {
        let m = mean.as_secs_f64().max(1e-6);
        let d = dev.map_or(m * PRIOR_CV, |d| d.as_secs_f64().max(m * MIN_CV));
        let cv2 = (d / m).powi(2);
        let sigma2 = if cv2.is_finite() { cv2.ln_1p() } else { 0.0 };
        Tail {
            mu: m.ln() - sigma2 / 2.0,
            sigma: sigma2.max(0.0).sqrt(),
            mean: m,
        }
    }

    pub fn mean(&self) -> Duration {
        duration_s(self.mean)
    }

    /// The TTFT not exceeded with probability `p`.
    pub fn quantile(&self, p: f64) -> Duration {
        duration_s((self.mu + self.sigma * inv_norm_cdf(p)).exp())
    }

    /// The probability that TTFT is at most `t`.
    pub fn prob_within(&self, t: Duration) -> f64 {
        let t = t.as_secs_f64();
        if t <= 0.0 {
            return 0.0;
        }
        if self.sigma == 0.0 {
            return if t.ln() >= self.mu { 1.0 } else { 0.0 };
        }
        norm_cdf((t.ln() - self.mu) / self.sigma)
    }
}

/// Standard normal CDF, through erf (Abramowitz and Stegun 7.1.26, error below 1.5e-7).
pub fn norm_cdf(z: f64) -> f64 {
    if z.is_nan() {
        return 0.0;
    }
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-x * x).exp();
    if z >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

/// Inverse of the standard normal CDF (Acklam's rational approximation, relative error
/// below 1.2e-9), for `p` clamped into (0, 1).
pub fn inv_norm_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let p = if p.is_nan() {
        0.5
    } else {
        p.clamp(1e-12, 1.0 - 1e-12)
    };
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.024_25 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.024_25 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_cdf_and_its_inverse_agree() {
        for p in [0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999] {
            let z = inv_norm_cdf(p);
            assert!((norm_cdf(z) - p).abs() < 1e-6, "p {p} z {z}");
        }
        assert!((inv_norm_cdf(0.99) - 2.326_348).abs() < 1e-5);
    }

    #[test]
    fn the_tail_of_a_spread_target_lies_far_past_its_mean() {
        let steady = Tail::fit(Duration::from_millis(400), Some(Duration::from_millis(20)));
        let spread = Tail::fit(Duration::from_millis(300), Some(Duration::from_millis(400)));
        // The spread one is faster on average and much slower at p99.
        assert!(spread.mean() < steady.mean());
        assert!(steady.quantile(0.99) < Duration::from_millis(460));
        assert!(spread.quantile(0.99) > Duration::from_millis(1500));
        assert!(steady.prob_within(Duration::from_millis(500)) > 0.999);
        assert!(spread.prob_within(Duration::from_millis(500)) < 0.9);
        // A measured spread of 0 still counts as a little.
        let fixed = Tail::fit(Duration::from_millis(100), Some(Duration::ZERO));
        let q = fixed.quantile(0.99);
        assert!(
            q > Duration::from_millis(105) && q < Duration::from_millis(115),
            "{q:?}"
        );
        assert!(fixed.prob_within(Duration::from_millis(80)) < 0.001);
    }

    #[test]
    fn absurd_inputs_saturate_instead_of_panicking() {
        assert_eq!(duration_s(f64::NAN), Duration::from_secs_f64(NEVER_S));
        assert_eq!(duration_s(-1.0), Duration::ZERO);
        assert_eq!(
            decode_time(u64::MAX, 1e-300),
            Duration::from_secs_f64(NEVER_S)
        );
        assert_eq!(decode_time(0, 0.0), Duration::ZERO);
        let t = Tail::fit(Duration::MAX, Some(Duration::MAX));
        let _ = t.quantile(0.99);
        let _ = t.prob_within(Duration::MAX);
    }
}
