//! Row statistics over the K perturbation columns of a row-major (R x K) block.

/// Per-row unbiased variance (ddof = 1): the Daunce self-influence cov(i, i). Accumulates in f64.
pub fn row_variance(data: &[f32], k: usize) -> Vec<f32> {
    assert!(k >= 2 && data.len().is_multiple_of(k), "need K >= 2 columns and a whole number of rows");
    data.chunks_exact(k)
        .map(|row| {
            let mean = row.iter().map(|&x| x as f64).sum::<f64>() / k as f64;
            let ss: f64 = row.iter().map(|&x| (x as f64 - mean).powi(2)).sum();
            (ss / (k - 1) as f64) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variance_matches_hand_computation() {
        let v = row_variance(&[1.0, 2.0, 3.0, 5.0, 5.0, 5.0], 3);
        assert_eq!(v, vec![1.0, 0.0]);
    }
}
