//! The seeded generator behind every split and resample. It is part of the file format (a map records its split
//! seed, and anyone can recompute which rows were held out), so it is specified exactly in docs/formats.md and
//! re-implemented by tests/scripts: SplitMix64, bounded draws by the 128-bit multiply-high, Fisher-Yates.

pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A draw in `0..m` (m > 0): the high 64 bits of next_u64() * m.
    pub fn below(&mut self, m: usize) -> usize {
        ((self.next_u64() as u128 * m as u128) >> 64) as usize
    }
    /// Uniform in [0, 1) with 53 random bits.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// A standard normal draw (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit_f64();
        let u2 = self.unit_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// A permutation of 0..n: Fisher-Yates from the top, `j = below(i + 1)` for i = n-1 down to 1.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed);
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        p.swap(i, j);
    }
    p
}

/// The train/held-out split of `n` rows: the first round(n * fraction) entries of `permutation(n, seed)` are
/// held out. Returns (train rows in permutation order, held-out rows ascending). Cross-validation folds are
/// `fold(train[i]) = i % k`.
pub fn split(n: usize, holdout_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let p = permutation(n, seed);
    let n_holdout = ((n as f64) * holdout_fraction).round() as usize;
    let mut holdout = p[..n_holdout].to_vec();
    holdout.sort_unstable();
    (p[n_holdout..].to_vec(), holdout)
}
