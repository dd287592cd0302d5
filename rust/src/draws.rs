//! The counter-based generator of the perturbation draws (daunce_store/store/_draws.py): SplitMix64
//! (Steele, Lea, Flood 2014) evaluated at counters, so any row range of a draw comes without the rest.
//! Integer arithmetic only, so the numpy fallback gives the same bits.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const M1: u64 = 0xBF58_476D_1CE4_E5B9;
const M2: u64 = 0x94D0_49BB_1331_11EB;

/// U[0, 1) with 53 random bits: the SplitMix64 output at `counter` for stream `key`.
#[inline]
pub fn uniform(key: u64, counter: u64) -> f64 {
    let mut x = key.wrapping_add(counter.wrapping_mul(GOLDEN));
    x = (x ^ (x >> 30)).wrapping_mul(M1);
    x = (x ^ (x >> 27)).wrapping_mul(M2);
    x ^= x >> 31;
    (x >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Uniforms of rows `r0 .. r0 + count` (row i uses counter i + 1).
pub fn uniforms(key: u64, r0: u64, count: usize) -> Vec<f64> {
    (0..count as u64).map(|i| uniform(key, r0 + i + 1)).collect()
}

/// One perturbation's draw: row i is in D_k when its `key_subset` uniform is below `ratio`; then its
/// weight is a = (base + rho (2 xi - 1)) - shift with xi its `key_xi` uniform (IF: base 1, shift gamma;
/// Fisher: base 0, shift 0), or -1 for black-box runs: the same operations, in the same order, as the
/// numpy path, so both give the same bits.
#[derive(Debug, Clone, Copy)]
pub struct ColumnDraw {
    pub key_subset: u64,
    pub key_xi: u64,
    pub ratio: f64,
    pub base: f64,
    pub rho: f64,
    pub shift: f64,
    pub blackbox: bool,
}

impl ColumnDraw {
    /// (whether the row at `counter` is in D_k, its weight a if it is). Both uniforms always, then the
    /// caller selects: membership is a coin flip, so a branch would mispredict.
    #[inline]
    fn weight(&self, counter: u64) -> (bool, f64) {
        let member = uniform(self.key_subset, counter) < self.ratio;
        let a = if self.blackbox { -1.0 } else { (self.base + self.rho * (2.0 * uniform(self.key_xi, counter) - 1.0)) - self.shift };
        (member, a)
    }
}

/// The linearized weights a_ik · 1[i ∈ D_k] of rows `r0 .. r0 + out.len()` into `out`, and how many of
/// those rows are in D_k.
pub fn linear_weights(col: &ColumnDraw, r0: u64, out: &mut [f64]) -> u64 {
    let mut members = 0;
    for (i, o) in out.iter_mut().enumerate() {
        let (member, a) = col.weight(r0 + i as u64 + 1);
        members += member as u64;
        *o = if member { a } else { 0.0 };
    }
    members
}

/// The weights of rows `r0 .. r0 + rows` for K perturbations at once, row-major (rows × K) in `out`
/// (f64 values rounded to f32, as numpy's cast does), adding each column's subset count to `members`.
pub fn weights_block(cols: &[ColumnDraw], r0: u64, out: &mut [f32], members: &mut [u64]) {
    let k = cols.len();
    assert!(k > 0 && out.len().is_multiple_of(k) && members.len() == k, "out must be rows x K and members K long");
    for (i, row) in out.chunks_exact_mut(k).enumerate() {
        let counter = r0 + i as u64 + 1;
        for ((o, c), count) in row.iter_mut().zip(cols).zip(members.iter_mut()) {
            let (member, a) = c.weight(counter);
            *count += member as u64;
            *o = if member { a as f32 } else { 0.0 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_splitmix64_reference_outputs() {
        // SplitMix64 seeded with 0 yields 0xE220A8397B1DCDAF first (the published reference sequence).
        assert_eq!(uniform(0, 1), (0xE220_A839_7B1D_CDAFu64 >> 11) as f64 / (1u64 << 53) as f64);
    }

    #[test]
    fn weights_follow_membership() {
        let mut w = vec![0.0; 1000];
        let col = ColumnDraw { key_subset: 1, key_xi: 2, ratio: 0.3, base: 1.0, rho: 1.0, shift: 1.0, blackbox: false };
        let members = linear_weights(&col, 0, &mut w);
        let member: Vec<bool> = uniforms(1, 0, 1000).iter().map(|&u| u < 0.3).collect();
        assert_eq!(members, member.iter().filter(|&&m| m).count() as u64);
        let xi = uniforms(2, 0, 1000);
        for i in 0..1000 {
            assert_eq!(w[i], if member[i] { (1.0 + (2.0 * xi[i] - 1.0)) - 1.0 } else { 0.0 });
        }
    }

    #[test]
    fn a_block_holds_each_columns_weights() {
        let cols = [
            ColumnDraw { key_subset: 1, key_xi: 2, ratio: 0.3, base: 1.0, rho: 1.0, shift: 1.0, blackbox: false },
            ColumnDraw { key_subset: 5, key_xi: 6, ratio: 0.9, base: 0.0, rho: 0.5, shift: 0.0, blackbox: true },
        ];
        let (rows, r0) = (500, 77);
        let mut out = vec![0.0f32; rows * 2];
        let mut members = vec![0u64; 2];
        weights_block(&cols, r0, &mut out, &mut members);
        for (j, c) in cols.iter().enumerate() {
            let mut w = vec![0.0; rows];
            let m = linear_weights(c, r0, &mut w);
            assert_eq!(members[j], m);
            for i in 0..rows {
                assert_eq!(out[i * 2 + j], w[i] as f32);
            }
        }
    }

    #[test]
    fn any_range_is_a_slice_of_the_whole() {
        let whole = uniforms(42, 0, 100);
        assert_eq!(&whole[37..60], uniforms(42, 37, 23).as_slice());
        assert!(whole.iter().all(|&u| (0.0..1.0).contains(&u)));
    }
}
