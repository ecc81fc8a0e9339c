//! SplitMix64's finaliser: the one 64-bit mixer of the workspace (the sparse table's key
//! hash and the seeded initial values of rows, models and dropout masks).

/// SplitMix64's finaliser: a bijection on 64 bits whose output bits each depend on
/// every input bit (neighbouring inputs give unrelated outputs).
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
