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
pub fn argmax(x: &[f32]) -> usize {
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
