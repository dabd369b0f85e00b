//! The pages of bench/swap's hog, for the benches that store or pack them.

/// bench/swap-guest/swaphog.c's page: every word names its page and index,
/// and the last `random_pct` % of the words are hashed. lz4 packs them
/// 1.59:1 at 25 % (docs/BENCHMARKS.md, "Compressed pages").
pub fn hog_page(page: u64, random_pct: usize, out: &mut [u8]) {
    fn mix(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
    let words = out.len() / 8;
    let hashed_from = words - words * random_pct / 100;
    for (i, word) in out.chunks_exact_mut(8).enumerate() {
        let tag = (page << 9) ^ i as u64 ^ 0x5a5a_0000_0000_0000;
        let value = if i >= hashed_from { mix(tag) } else { tag };
        word.copy_from_slice(&value.to_ne_bytes());
    }
}
