//! Deterministic pseudo-random numbers that do not depend on any crate's version.
//!
//! Parameter initialisation, batch sampling and generation all draw from SplitMix64 streams
//! derived from `(seed, purpose, index)`, so a resumed run re-creates exactly the stream an
//! uninterrupted run would have used, with no RNG state to save.

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, statistically solid for our purposes.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A stream keyed by several integers, e.g. `(seed, step, micro_step)`.
    pub fn keyed(parts: &[u64]) -> Self {
        let mut h = 0x9E37_79B9_7F4A_7C15u64;
        for &p in parts {
            h = mix(h ^ p.wrapping_mul(0xBF58_476D_1CE4_E5B9));
        }
        Self::new(h)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.state)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n); n must be > 0.
    pub fn below(&mut self, n: u64) -> u64 {
        // Lemire's multiply-shift; the tiny bias is irrelevant for sampling windows.
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Standard normal via Box-Muller.
    pub fn normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// The order in which epoch `epoch` visits n items (Fisher-Yates on a keyed stream).
pub fn permutation(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    let mut r = Rng::keyed(&[seed, epoch, 0x5F7]);
    for k in (1..n).rev() {
        perm.swap(k, r.below(k as u64 + 1) as usize);
    }
    perm
}

/// Item p of an endless stream of epochs, each a fresh permutation (cached per epoch).
pub struct Stream {
    seed: u64,
    n: usize,
    epoch: Option<(u64, Vec<usize>)>,
}

impl Stream {
    /// Items 0..n (n > 0), epochs keyed by `seed`.
    pub fn new(seed: u64, n: usize) -> Self {
        Self {
            seed,
            n,
            epoch: None,
        }
    }

    pub fn get(&mut self, p: usize) -> usize {
        let e = (p / self.n) as u64;
        if self.epoch.as_ref().is_none_or(|(k, _)| *k != e) {
            self.epoch = Some((e, permutation(self.seed, e, self.n)));
        }
        self.epoch.as_ref().map_or(0, |(_, perm)| perm[p % self.n])
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a, used for stable cache keys and per-parameter seeds (std's hasher is not stable).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = Fnv1a::new();
    h.bytes(bytes);
    h.finish()
}

/// FNV-1a fed piece by piece (checksums of weights and rollouts, without gathering the bytes).
pub struct Fnv1a(u64);

impl Fnv1a {
    pub fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    pub fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv1a {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| Rng::keyed(&[1, 2]).next_u64()).collect();
        assert!(a.iter().all(|&x| x == a[0]));
        assert_ne!(
            Rng::keyed(&[1, 2]).next_u64(),
            Rng::keyed(&[2, 1]).next_u64()
        );
    }

    #[test]
    fn normal_has_unit_variance() {
        let mut r = Rng::new(7);
        let xs: Vec<f64> = (0..100_000).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }
}
