//! Deterministic payload for transfers: a seeded xorshift stream, generated in place into any
//! buffer at several GB/s, so that senders never copy and receivers can check a SHA-256.

use sha2::{Digest, Sha256};

/// A seeded byte stream. `fill` continues where the previous call stopped.
#[derive(Debug, Clone)]
pub struct DataGen {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl DataGen {
    /// A stream for `seed`; every seed gives a different stream (the seed goes through
    /// splitmix64's finaliser, a bijection, so that neighbouring seeds start far apart).
    pub fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        DataGen {
            // xorshift's one forbidden state is 0; the one seed mapped there starts
            // elsewhere.
            state: if z == 0 { 0x9E37_79B9_7F4A_7C15 } else { z },
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x.to_le_bytes()
    }

    /// Write the next `dst.len()` bytes of the stream into `dst`.
    pub fn fill(&mut self, dst: &mut [u8]) {
        let mut i = 0;
        while self.used < 8 && i < dst.len() {
            dst[i] = self.word[self.used];
            self.used += 1;
            i += 1;
        }
        let mut chunks = dst[i..].chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_word());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            self.word = self.next_word();
            let n = rest.len();
            rest.copy_from_slice(&self.word[..n]);
            self.used = n;
        }
    }

    /// SHA-256 of the first `len` bytes of the stream for `seed`.
    pub fn digest(seed: u64, len: u64) -> [u8; 32] {
        DataGen::digest_with(seed, len, Check::Sha256)
    }
}

/// Which end-to-end integrity check a transfer computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Check {
    /// SHA-256: what `toemu demo` reports (about 1.5 GB/s per core with SHA-NI).
    #[default]
    Sha256,
    /// CRC32C (hardware accelerated, well over 10 GB/s): for benchmarks where the transport,
    /// not the hash, should set the pace. Detects corruption, not tampering.
    Crc32c,
}

/// A running integrity check; [`Checker::finish`] gives 32 bytes (CRC32C in the first four).
#[derive(Debug, Clone)]
pub enum Checker {
    /// SHA-256 state.
    Sha256(Box<Sha256>),
    /// CRC32C so far.
    Crc32c(u32),
}

impl Checker {
    /// A fresh checker of kind `c`.
    pub fn new(c: Check) -> Self {
        match c {
            Check::Sha256 => Checker::Sha256(Box::new(Sha256::new())),
            Check::Crc32c => Checker::Crc32c(0),
        }
    }
    /// Feed bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Checker::Sha256(h) => h.update(data),
            Checker::Crc32c(c) => *c = crc32c::crc32c_append(*c, data),
        }
    }
    /// The digest.
    pub fn finish(self) -> [u8; 32] {
        match self {
            Checker::Sha256(h) => (*h).finalize().into(),
            Checker::Crc32c(c) => {
                let mut d = [0u8; 32];
                d[..4].copy_from_slice(&c.to_le_bytes());
                d
            }
        }
    }
}

impl DataGen {
    /// The digest of kind `check` of the first `len` bytes of the stream for `seed`.
    pub fn digest_with(seed: u64, len: u64, check: Check) -> [u8; 32] {
        let mut g = DataGen::new(seed);
        let mut h = Checker::new(check);
        let mut buf = vec![0u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            g.fill(&mut buf[..n]);
            h.update(&buf[..n]);
            left -= n as u64;
        }
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_is_independent_of_chunking() {
        let mut a = DataGen::new(7);
        let mut whole = vec![0u8; 1000];
        a.fill(&mut whole);
        let mut b = DataGen::new(7);
        let mut parts = vec![0u8; 1000];
        let mut at = 0;
        for n in [1, 3, 8, 13, 64, 5, 906] {
            b.fill(&mut parts[at..at + n]);
            at += n;
        }
        assert_eq!(whole, parts);
        assert_ne!(whole[..8], whole[8..16]);
        let mut c = DataGen::new(8);
        let mut other = vec![0u8; 1000];
        c.fill(&mut other);
        assert_ne!(whole, other, "seed matters");
        let mut h = Sha256::new();
        h.update(&whole);
        let d: [u8; 32] = h.finalize().into();
        assert_eq!(DataGen::digest(7, 1000), d);
        assert_eq!(DataGen::digest_with(7, 1000, Check::Sha256), d);
        let mut c = Checker::new(Check::Crc32c);
        c.update(&whole[..10]);
        c.update(&whole[10..]);
        assert_eq!(c.finish(), DataGen::digest_with(7, 1000, Check::Crc32c));
        assert_ne!(
            DataGen::digest_with(7, 1000, Check::Crc32c),
            DataGen::digest_with(7, 999, Check::Crc32c)
        );
    }

    #[test]
    fn neighbouring_seeds_give_different_streams() {
        // Messages are seeded with consecutive numbers: seeds 2k and 2k + 1 once collided
        // (the low bit was forced), so two messages held the same bytes.
        let mut seen = std::collections::HashSet::new();
        for seed in (0..4096).chain([u64::MAX - 1, u64::MAX]) {
            let mut w = [0u8; 16];
            DataGen::new(seed).fill(&mut w);
            assert!(seen.insert(w), "seed {seed} repeats another seed's stream");
        }
    }
}
