//! A small, portable pseudo-random generator.
//!
//! xoshiro256++ seeded through SplitMix64. It is implemented here rather
//! than taken from `rand` so that the bit stream for a seed is fixed by this
//! crate's source, not by a dependency's choice of algorithm.

use rand::RngCore;

/// Independent streams derived from one seed.
pub(crate) const STREAM_PROFILES: u64 = 1;
pub(crate) const STREAM_RECORDS: u64 = 2;
pub(crate) const STREAM_POOLS: u64 = 3;

/// SplitMix64 step: a good 64-bit mixer, also used to hash (seed, index).
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stable hash of a seed, a stream and an index.
pub(crate) fn mix(seed: u64, stream: u64, index: u64) -> u64 {
    let mut state = seed ^ stream.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    let a = splitmix64(&mut state);
    let mut state = a ^ index;
    splitmix64(&mut state)
}

/// xoshiro256++.
#[derive(Debug, Clone)]
pub(crate) struct Xoshiro {
    s: [u64; 4],
}

impl Xoshiro {
    /// A generator for one stream of one seed.
    pub(crate) fn new(seed: u64, stream: u64) -> Xoshiro {
        let mut state = seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F);
        let mut s = [0u64; 4];
        for word in &mut s {
            *word = splitmix64(&mut state);
        }
        if s == [0; 4] {
            s[0] = 1;
        }
        Xoshiro { s }
    }

    /// A uniform float in `[0, 1)` with 53 bits of precision.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform integer in `0..n` (`n > 0`), by Lemire's multiply-shift
    /// (the tiny bias is irrelevant here).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A uniform integer in `lo..=hi`.
    pub(crate) fn between(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        let span = (hi - lo) as u64 + 1;
        lo + self.below(span) as i64
    }
}

impl RngCore for Xoshiro {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        let result = self.s[0]
            .wrapping_add(self.s[3])
            .rotate_left(23)
            .wrapping_add(self.s[0]);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = {
            let mut r = Xoshiro::new(7, STREAM_RECORDS);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Xoshiro::new(7, STREAM_RECORDS);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let c: Vec<u64> = {
            let mut r = Xoshiro::new(7, STREAM_PROFILES);
            (0..4).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(mix(1, 1, 1), mix(1, 1, 2));
    }

    #[test]
    fn helpers_stay_in_range() {
        let mut r = Xoshiro::new(3, 9);
        for _ in 0..10_000 {
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
            assert!(r.below(7) < 7);
            let v = r.between(-3, 3);
            assert!((-3..=3).contains(&v));
        }
    }
}
