//! Next-token choice: greedy (temperature 0) or temperature + top-p (nucleus) sampling with a
//! seeded, platform-independent PRNG (SplitMix64).

/// SplitMix64: tiny, seedable, the same sequence everywhere.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A sampler: `temperature <= 0` is greedy (argmax, lowest id on ties).
#[derive(Debug, Clone)]
pub struct Sampler {
    pub temperature: f32,
    pub top_p: f32,
    rng: SplitMix64,
    /// `(token, weight)` of the candidates, reused across calls (a step allocates nothing once
    /// it holds a vocabulary).
    probs: Vec<(u32, f64)>,
}

/// Index of the largest value (lowest index on ties; NaN never wins).
///
/// Exactly the index of the loop `best = i if x[i] > x[best] or x[best] is NaN` (leading NaNs
/// are skipped; all NaN gives the last index, empty gives 0), in two passes that vectorize:
/// the largest non-NaN value over eight lanes (`f32::max` ignores NaN; `-0.0 == 0.0`, so
/// which zero it keeps does not matter), then its first position. A decode step calls this
/// on the whole vocabulary (49,152 logits for SmolLM2): the one-pass loop's dependency through
/// `x[best]` cost ~0.1 ms a token here.
pub fn argmax(x: &[f32]) -> usize {
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    let mut lanes = [f32::NAN; 8];
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    let m = lanes.iter().chain(rest).fold(f32::NAN, |m, &v| m.max(v));
    if m.is_nan() {
        return x.len().saturating_sub(1);
    }
    x.iter().position(|&v| v == m).unwrap_or(0)
}

/// The one-pass definition [`argmax`] is checked against.
#[cfg(test)]
fn argmax_reference(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] || x[best].is_nan() {
            best = i;
        }
    }
    best
}

impl Sampler {
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Sampler {
        Sampler {
            temperature,
            top_p,
            rng: SplitMix64::new(seed),
            probs: Vec::new(),
        }
    }

    /// Picks the next token from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 || logits.len() <= 1 {
            return argmax(logits) as u32;
        }
        let m = logits[argmax(logits)];
        let probs = &mut self.probs;
        probs.clear();
        probs.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, f64::from((l - m) / self.temperature).exp()))
                .filter(|&(_, p)| p > 0.0),
        );
        // Token ids are distinct, so no two entries compare equal: the unstable sort (which
        // needs no buffer) gives the one order a stable sort would.
        probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f64 = probs.iter().map(|p| p.1).sum();
        // Smallest prefix whose mass reaches top_p.
        let top_p = f64::from(self.top_p.clamp(0.0, 1.0));
        let mut keep = probs.len();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p.1 / total;
            if acc >= top_p {
                keep = i + 1;
                break;
            }
        }
        let probs = &probs[..keep.max(1)];
        let mass: f64 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.next_f64() * mass;
        for &(id, p) in probs {
            if r < p {
                return id;
            }
            r -= p;
        }
        probs[probs.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn special() -> impl Strategy<Value = f32> {
        prop_oneof![
            Just(f32::NAN),
            Just(f32::INFINITY),
            Just(f32::NEG_INFINITY),
            Just(0.0f32),
            Just(-0.0f32),
            Just(1.0f32),
            Just(-1.0f32),
            -4.0f32..4.0,
        ]
    }

    #[test]
    fn argmax_takes_the_lowest_index_on_ties_and_skips_nan_at_the_edges() {
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NAN; 11]), 10);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY, 2.0, 2.0]), 2);
        assert_eq!(argmax(&[-0.0, 0.0, -0.0]), 0);
        assert_eq!(
            argmax(&[1.0, 3.0, f32::NAN, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]),
            1
        );
    }

    proptest! {
        #[test]
        fn argmax_equals_the_one_pass_loop(x in proptest::collection::vec(special(), 0..70)) {
            prop_assert_eq!(argmax(&x), argmax_reference(&x));
        }
    }
}
