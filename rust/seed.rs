//! Seed derivation: one session seed fans out into a seed per test, per thread and per round.
//!
//! The derivation must give the same numbers on every platform, word size, endianness and
//! release of this crate (a seed printed by a failing run is replayed elsewhere), so it is
//! spelled out here and pinned by tests in Rust (`tests` below) and in Python
//! (`tests/test_native.py`). Changing it is a breaking change.
//!
//! # Algorithm
//!
//! `derive(seed, parts)` hashes a sequence of 64-bit words into a running state `h`:
//!
//! 1. `h = seed` (a negative Python seed is taken as its 64-bit two's complement).
//! 2. Each part contributes words:
//!    - an integer `v` (`-2^63 <= v < 2^64`): the tag word `0x01` for `v >= 0` or `0x02` for
//!      `v < 0`, then `v` as a 64-bit two's complement word;
//!    - a string `s`: the tag word `0x03`, then its UTF-8 length in bytes, then its UTF-8 bytes
//!      in 8-byte little-endian words (the last word zero-padded).
//! 3. Each word `w` is folded in as `h = mix64(h ^ w)`.
//! 4. Finally `h = mix64(h ^ n)` where `n` is the number of parts, and `h` is the result.
//!
//! `mix64` is the SplitMix64 output function (Steele, Lea, Flood: "Fast splittable
//! pseudorandom number generators", 2014): add `0x9E3779B97F4A7C15`, then
//! `z = (z ^ z>>30) * 0xBF58476D1CE4E5B9`, `z = (z ^ z>>27) * 0x94D049BB133111EB`,
//! `z ^ z>>31`, all wrapping. So `derive(0, [])` is `0xE220A8397B1DCDAF`, the first output of
//! SplitMix64 seeded with 0.
//!
//! A derived seed starts a PCG32 stream (`rand_pcg::Pcg32::new(seed, STREAM)`), whose output
//! `rand_pcg` documents as reproducible: see [`stream`].

use rand_pcg::Pcg32;

/// One component of a derivation path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part<'a> {
    Int(i128),
    Str(&'a str),
}

const TAG_UINT: u64 = 0x01;
const TAG_NEG_INT: u64 = 0x02;
const TAG_STR: u64 = 0x03;

/// The PCG stream (increment selector) of every generator this crate starts; fixed so that
/// the seed alone determines the sequence. It is PCG's own default stream.
pub const STREAM: u64 = 0x0a02_bdbf_7bb3_c0a7;

/// The SplitMix64 output function.
#[inline]
pub fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The smallest and largest integer a part may be: `-2^63 ..= 2^64 - 1`.
pub const INT_MIN: i128 = i64::MIN as i128;
pub const INT_MAX: i128 = u64::MAX as i128;

/// Derive a seed from `seed` and a path of parts (see the module docs for the algorithm).
///
/// Returns an error naming the part when an integer part is out of range.
pub fn derive(seed: u64, parts: &[Part<'_>]) -> Result<u64, String> {
    let mut h = seed;
    let mut fold = |w: u64| h = mix64(h ^ w);
    for (i, part) in parts.iter().enumerate() {
        match *part {
            Part::Int(v) => {
                if !(INT_MIN..=INT_MAX).contains(&v) {
                    return Err(format!("part {i} ({v}) is outside -2**63 .. 2**64-1"));
                }
                fold(if v < 0 { TAG_NEG_INT } else { TAG_UINT });
                fold(v as u64); // two's complement: the low 64 bits
            }
            Part::Str(s) => {
                let bytes = s.as_bytes();
                fold(TAG_STR);
                fold(bytes.len() as u64);
                for chunk in bytes.chunks(8) {
                    let mut word = [0u8; 8];
                    word[..chunk.len()].copy_from_slice(chunk);
                    fold(u64::from_le_bytes(word));
                }
            }
        }
    }
    Ok(mix64(h ^ parts.len() as u64))
}

/// `derive` for paths built by this crate, whose integers are always in range.
pub fn derive_ok(seed: u64, parts: &[Part<'_>]) -> u64 {
    derive(seed, parts).expect("integer parts built by the crate are in range")
}

/// The generator for a derived seed: PCG32 (XSH RR 64/32) with state `seed`, stream [`STREAM`].
pub fn stream(seed: u64) -> Pcg32 {
    Pcg32::new(seed, STREAM)
}

/// Seed of one test: `derive(session_seed, ["test", nodeid])`.
pub fn test_seed(session_seed: u64, nodeid: &str) -> u64 {
    derive_ok(session_seed, &[Part::Str("test"), Part::Str(nodeid)])
}

/// Stream of a worker thread before its first round: `derive(test_seed, ["thread", index])`.
pub fn thread_seed(test_seed: u64, thread_index: u64) -> u64 {
    derive_ok(
        test_seed,
        &[Part::Str("thread"), Part::Int(thread_index as i128)],
    )
}

/// Stream of a worker thread in one round: `derive(test_seed, ["round", index, iteration])`.
pub fn round_seed(test_seed: u64, thread_index: u64, iteration: u64) -> u64 {
    derive_ok(
        test_seed,
        &[
            Part::Str("round"),
            Part::Int(thread_index as i128),
            Part::Int(iteration as i128),
        ],
    )
}

/// Stream of the n-th thread that reached a hook without `thread_enter` (a thread the test
/// started itself, or the main thread): `derive(test_seed, ["foreign", n])`.
pub fn foreign_seed(test_seed: u64, n: u64) -> u64 {
    derive_ok(test_seed, &[Part::Str("foreign"), Part::Int(n as i128)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn mix64_is_splitmix64() {
        // The first outputs of SplitMix64 seeded with 0 (state advances by the golden gamma).
        assert_eq!(mix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(mix64(0x9E37_79B9_7F4A_7C15), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn pinned_values() {
        // These numbers are part of the replay format: they must never change.
        // tests/test_native.py pins the same values through the Python API.
        assert_eq!(derive_ok(0, &[]), 0xE220_A839_7B1D_CDAF);
        assert_eq!(derive_ok(1, &[]), 0x910A_2DEC_8902_5CC1);
        assert_eq!(
            derive_ok(42, &[Part::Str("test"), Part::Str("t.py::test_x")]),
            PIN_TEST
        );
        assert_eq!(derive_ok(42, &[Part::Int(7)]), PIN_INT7);
        assert_eq!(derive_ok(42, &[Part::Int(-1)]), PIN_NEG1);
        assert_eq!(
            derive_ok(u64::MAX, &[Part::Str("é∂"), Part::Int(1 << 40)]),
            PIN_MIXED
        );
        assert_eq!(test_seed(42, "t.py::test_x"), PIN_TEST);
    }

    const PIN_TEST: u64 = 0x565C_2EDD_78F9_7850;
    const PIN_INT7: u64 = 0x1EC3_E893_655B_233F;
    const PIN_NEG1: u64 = 0x3507_9696_5924_7E7D;
    const PIN_MIXED: u64 = 0xA742_C8D7_7473_CE50;

    #[test]
    fn parts_are_typed_and_ordered() {
        let a = derive_ok(5, &[Part::Int(1)]);
        assert_ne!(a, derive_ok(5, &[Part::Str("1")]));
        assert_ne!(a, derive_ok(5, &[Part::Int(-1)]));
        assert_ne!(
            derive_ok(5, &[Part::Int(1), Part::Int(2)]),
            derive_ok(5, &[Part::Int(2), Part::Int(1)])
        );
        // A string's length is hashed, so splitting a string differently changes the result.
        assert_ne!(
            derive_ok(5, &[Part::Str("ab"), Part::Str("c")]),
            derive_ok(5, &[Part::Str("a"), Part::Str("bc")])
        );
        assert_ne!(derive_ok(5, &[]), derive_ok(5, &[Part::Str("")]));
        // -1 and 2**64-1 have the same low 64 bits but different tags.
        assert_ne!(
            derive_ok(5, &[Part::Int(-1)]),
            derive_ok(5, &[Part::Int(INT_MAX)])
        );
    }

    #[test]
    fn out_of_range_ints_are_errors() {
        assert!(derive(0, &[Part::Int(INT_MAX + 1)]).is_err());
        assert!(derive(0, &[Part::Int(INT_MIN - 1)]).is_err());
        assert!(derive(0, &[Part::Int(INT_MIN)]).is_ok());
    }

    #[test]
    fn stream_is_pcg32_reference() {
        // PCG32's reference output for state 42, stream 54 (pcg32-demo from pcg-random.org),
        // which rand_pcg reproduces; guards against a silent generator change.
        let mut rng = Pcg32::new(42, 54);
        let got: Vec<u32> = (0..6).map(|_| rng.next_u32()).collect();
        assert_eq!(
            got,
            [0xa15c02b7, 0x7b47f409, 0xba1d3330, 0x83d2f293, 0xbfa4784b, 0xcbed606e]
        );
        let mut a = stream(thread_seed(1, 0));
        let mut b = stream(thread_seed(1, 1));
        assert_ne!(a.next_u64(), b.next_u64());
    }
}
