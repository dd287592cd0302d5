//! Streaming top-k attribution (DESIGN §4), plain Rust on slices.
//!
//! Scores are dot products of prepared rows: every train row and query row is centered over the K
//! perturbation columns (for `corr` also scaled to unit norm; a constant row stays all zero, so its
//! correlation with anything is 0), and for `cov` the 1/(K - 1) is folded into the queries once. Then
//! cov(i, j) = <a_i, b_j> / (K - 1) and corr(i, j) = <a_i, b_j> (DESIGN §1).
//!
//! Per block: prepare a chunk of rows, one GEMM chunk × preparedQᵀ per tile of queries (so the score
//! tile stays in cache whatever m is), then fused selection: each query's scores are scanned against
//! its running k-th score and only the candidates that beat it are inserted into a small buffer,
//! which is cut back to k with a linear-time selection when it fills. No block is ever sorted.
//!
//! The accumulator keeps one independent state per worker thread ("lane"); a pushed block is split
//! into contiguous row ranges, one per lane, and the lanes are merged once in [`TopKAccumulator::finish`].
//! Memory is O(lanes · (chunk · K + m · k)), independent of the number of rows n.
//!
//! Order: `pos` = largest score first, `neg` = smallest first; equal scores go to the lower row index.

use rayon::prelude::*;
use std::cmp::Ordering;

/// Which score: covariance or Pearson correlation across the K perturbations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    Cov,
    Corr,
}

impl Measure {
    pub fn parse(s: &str) -> Option<Measure> {
        match s {
            "cov" => Some(Measure::Cov),
            "corr" => Some(Measure::Corr),
            _ => None,
        }
    }
}

/// Errors the kernel reports; the Python layer turns them into `DaunceStoreError`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopKError {
    Shape(String),
    TooFewRows { k: usize, n: u64 },
    /// A train row holds NaN or inf (the lowest such row seen).
    NonFinite { row: u64 },
    /// A score of this query (row of the queries) is inf or NaN: finite losses too large for float32.
    ScoreOverflow { query: usize },
}

impl std::fmt::Display for TopKError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopKError::Shape(s) => write!(f, "{s}"),
            TopKError::TooFewRows { k, n } => write!(f, "k={k} exceeds the number of rows {n}; use a smaller k"),
            TopKError::NonFinite { row } => write!(f, "train losses hold NaN or inf (row {row}); scores of NaN have no order"),
            // The words of daunce_store.scoring._numpy.score_overflow_error (every backend says the same).
            TopKError::ScoreOverflow { query } => write!(
                f,
                "scores of query {query} overflow float32 (inf or NaN): the losses are too large to score; a store \
                 refuses |loss| > 1e15 (MAX_ABS_LOSS), so such a column came from a diverged fine-tune appended before \
                 that check or written by other means: leave its columns out (columns=) or rescale the losses"
            ),
        }
    }
}

/// Sum in f64 with 8 independent accumulators (so it vectorizes; the order is fixed, so equal rows
/// give equal sums).
#[inline(always)]
fn sum_f64(xs: &[f32], sq: bool) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for t in 0..8 {
            let v = c[t] as f64;
            acc[t] += if sq { v * v } else { v };
        }
    }
    let mut tail = 0f64;
    for &x in rest {
        let v = x as f64;
        tail += if sq { v * v } else { v };
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Center `row` over its K values into `out`; for `corr` also scale to unit norm. Returns whether the
/// row is finite: its f64 sum is NaN or inf exactly when it holds a NaN or an inf (K float32 values
/// cannot overflow an f64), so the check costs nothing.
///
/// Follows the numpy reference: the mean is summed in f64 and rounded to f32, the subtraction is in
/// f32, the norm is summed in f64 from the f32 centered values. A norm below f32's smallest normal
/// (a row varying only in subnormals, e.g. losses ~1e-40) has a reciprocal beyond f32 (1/1e-42 = inf, and
/// inf × 0 = NaN): such rows are divided by the norm in f64 instead, which lands in [-1, 1].
#[inline(always)]
pub fn prepare_row(row: &[f32], measure: Measure, out: &mut [f32]) -> bool {
    let k = row.len();
    let sum = sum_f64(row, false);
    let mean = (sum / k as f64) as f32;
    for (o, &x) in out.iter_mut().zip(row) {
        *o = x - mean;
    }
    if measure == Measure::Corr {
        let norm = sum_f64(out, true).sqrt();
        if norm >= f32::MIN_POSITIVE as f64 {
            let scale = 1.0f32 / norm as f32;
            for o in out.iter_mut() {
                *o *= scale;
            }
        } else if norm > 0.0 {
            for o in out.iter_mut() {
                *o = (*o as f64 / norm) as f32;
            }
        } else {
            out.iter_mut().for_each(|o| *o = 0.0);
        }
    }
    sum.is_finite()
}

/// Prepare every row of a row-major (R × K) block into `out` (same shape); the first row holding NaN or
/// inf, if any.
#[inline(always)]
pub fn prepare_rows(x: &[f32], k: usize, measure: Measure, out: &mut [f32]) -> Option<usize> {
    let mut bad = None;
    for (i, (row, o)) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)).enumerate() {
        if !prepare_row(row, measure, o) && bad.is_none() {
            bad = Some(i);
        }
    }
    bad
}

/// Rows prepared at a time by [`prepare_rows_t`]: 16 rows, row-major in `scratch` (in L1), go out as
/// pairs of 8 × 8 tiles, so that each written run is a whole 64-byte line.
const GROUP: usize = 16;

/// Prepare every row of a row-major (R × K) block like [`prepare_rows`], but write them feature-major:
/// row r's value j at `out[j * ld + r]` (`ld` >= R; see [`feature_major_stride`]). The GEMM reads train
/// rows in this layout as they are; given row-major rows (and two or more queries) it repacks them with
/// a scalar gather on every call, which cost 18% of a 1M × 256 × 100 pass. `scratch`: 16 rows (`GROUP`).
#[inline(always)]
pub fn prepare_rows_t<const AVX: bool>(
    x: &[f32], k: usize, measure: Measure, out: &mut [f32], ld: usize, scratch: &mut Vec<f32>,
) -> Option<usize> {
    let r = x.len() / k;
    scratch.resize(GROUP * k, 0.0);
    let mut bad = None;
    let mut r0 = 0;
    while r0 < r {
        let g = GROUP.min(r - r0);
        if let Some(i) = prepare_rows(&x[r0 * k..(r0 + g) * k], k, measure, &mut scratch[..g * k]) {
            bad = bad.or(Some(r0 + i));
        }
        let mut j0 = 0;
        if AVX && g == GROUP {
            while j0 + 8 <= k {
                // SAFETY: AVX is only true in the copies compiled for AVX2/AVX-512 (see
                // `lane_pass_dispatch`) and where tests checked the CPU; the 16 rows of 8 values read and
                // the 8 runs of 16 written are inside `scratch` (16 × K) and `out` (K × ld, r0 + 16 <= R <= ld).
                debug_assert!(out.len() >= (k - 1) * ld + r && ld >= r);
                unsafe {
                    transpose8_avx(scratch.as_ptr().add(j0), k, out.as_mut_ptr().add(j0 * ld + r0), ld);
                    transpose8_avx(scratch.as_ptr().add(8 * k + j0), k, out.as_mut_ptr().add(j0 * ld + r0 + 8), ld);
                }
                j0 += 8;
            }
        }
        for j in j0..k {
            for t in 0..g {
                out[j * ld + r0 + t] = scratch[t * k + j];
            }
        }
        r0 += g;
    }
    bad
}

/// Queries from which train rows are prepared feature-major. From 2 queries on, the GEMM repacks
/// row-major rows (2.6× slower at m = 2); one query takes its vector path, which reads row-major rows
/// as they are, and there the transpose would be the extra cost (1M rows, K = 256: 0.068 s row-major,
/// 0.092 s feature-major; 0.019 / 0.024 s at K = 64).
const FEATURE_MAJOR_FROM_M: usize = 2;

/// Row stride of a feature-major chunk of `rows` rows: a whole number of cache lines, but not a
/// multiple of 4 KB, whose 8 rows written by one transpose would all land in one L1 set (at 1024
/// rows that made the transpose 2× slower).
pub fn feature_major_stride(rows: usize) -> usize {
    rows.next_multiple_of(16) + 16
}

/// `dst[u * dst_stride + t] = src[t * src_stride + u]` for t, u < 8: an 8 × 8 transpose in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn transpose8_avx(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
    use std::arch::x86_64::*;
    let r: [__m256; 8] = std::array::from_fn(|t| _mm256_loadu_ps(src.add(t * src_stride)));
    let a = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    let b = [
        _mm256_shuffle_ps::<0x44>(a[0], a[2]),
        _mm256_shuffle_ps::<0xEE>(a[0], a[2]),
        _mm256_shuffle_ps::<0x44>(a[1], a[3]),
        _mm256_shuffle_ps::<0xEE>(a[1], a[3]),
        _mm256_shuffle_ps::<0x44>(a[4], a[6]),
        _mm256_shuffle_ps::<0xEE>(a[4], a[6]),
        _mm256_shuffle_ps::<0x44>(a[5], a[7]),
        _mm256_shuffle_ps::<0xEE>(a[5], a[7]),
    ];
    for u in 0..4 {
        _mm256_storeu_ps(dst.add(u * dst_stride), _mm256_permute2f128_ps::<0x20>(b[u], b[u + 4]));
        _mm256_storeu_ps(dst.add((u + 4) * dst_stride), _mm256_permute2f128_ps::<0x31>(b[u], b[u + 4]));
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transpose8_avx(_: *const f32, _: usize, _: *mut f32, _: usize) {
    unreachable!("AVX is never set off x86-64")
}

/// Queries prepared like rows; for `cov` the 1/(K - 1) is folded in here, once.
pub fn prepare_queries(q: &[f32], k: usize, measure: Measure) -> Vec<f32> {
    let mut out = vec![0.0f32; q.len()];
    prepare_rows(q, k, measure, &mut out);
    if measure == Measure::Cov {
        let d = (k.max(2) - 1) as f32;
        for o in out.iter_mut() {
            *o /= d;
        }
    }
    out
}

/// One candidate: `key` is the score with the side's sign applied (larger is better on both sides).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Entry {
    key: f32,
    idx: u64,
}

/// Better-first order: larger key, then lower index.
#[inline]
fn better(a: &Entry, b: &Entry) -> Ordering {
    b.key.total_cmp(&a.key).then(a.idx.cmp(&b.idx))
}

/// The running top-k of one query on one side: a buffer cut back to k whenever it reaches `cap`.
/// Once it has held k entries, `thr` is the k-th best so far; a candidate must beat it to enter.
#[derive(Clone, Debug)]
struct Running {
    buf: Vec<Entry>,
    thr: Entry,
    full: bool,
    /// A NaN score was seen: it has no place in the order, so `finish` reports it instead of dropping it.
    nan: bool,
}

impl Running {
    fn new() -> Self {
        Running { buf: Vec::new(), thr: Entry { key: f32::NEG_INFINITY, idx: u64::MAX }, full: false, nan: false }
    }

    /// The smallest key that can still enter (ties are settled in `offer`).
    #[inline]
    fn floor(&self) -> f32 {
        if self.full {
            self.thr.key
        } else {
            f32::NEG_INFINITY
        }
    }

    #[inline]
    fn offer(&mut self, e: Entry, k: usize, cap: usize) {
        if self.full && better(&e, &self.thr) != Ordering::Less {
            return;
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(cap);
        }
        self.buf.push(e);
        if self.buf.len() >= cap {
            self.cut(k);
        }
    }

    fn cut(&mut self, k: usize) {
        // Linear-time selection: the k best end up in front, the k-th best at k - 1.
        self.buf.select_nth_unstable_by(k - 1, better);
        self.buf.truncate(k);
        self.thr = self.buf[k - 1];
        self.full = true;
    }
}

/// Buffer capacity for a top-k: k plus room for a batch of candidates between two cuts.
/// A cut costs O(k + extra) and happens every `extra` insertions; extra ≥ k/4 keeps that O(1) amortized
/// while the buffer stays within 1.25 k (+64) entries (memory matters when both m and k are large).
fn capacity_for(k: usize) -> usize {
    k + (k / 4).clamp(64, 4096)
}

/// Scratch and state of one worker thread (opaque outside this module: see [`TopKAccumulator::push_with`]).
pub struct Lane {
    pos: Vec<Running>,
    neg: Vec<Running>,
    prepared: Vec<f32>,
    scratch: Vec<f32>,
    scores: Vec<f32>,
    /// Rows centered and multiplied by the accumulator's transform (see [`TopKAccumulator::set_transform`]).
    centered: Vec<f32>,
    transformed: Vec<f32>,
    /// The lowest row holding NaN or inf this lane has seen.
    non_finite: Option<u64>,
}

/// Score tile: `out` (mt × rc, row-major) = `q` (mt × K) · `a` with `a` the rc prepared rows, value j of
/// row r at `a[r * a_row + j * a_col]`: row-major (`a_row` = K, `a_col` = 1) or feature-major (`a_row` =
/// 1, `a_col` = the stride of [`prepare_rows_t`]), single-threaded.
#[inline]
#[allow(clippy::too_many_arguments)]
fn gemm_tile(q: &[f32], a: &[f32], k: usize, mt: usize, rc: usize, a_row: usize, a_col: usize, out: &mut [f32]) {
    debug_assert!(q.len() >= mt * k && a.len() > (rc - 1) * a_row + (k - 1) * a_col && out.len() >= mt * rc);
    // SAFETY: the slices hold the (mt × K), (rc × K) and (mt × rc) matrices the strides describe.
    unsafe {
        gemm::gemm(
            mt,
            rc,
            k,
            out.as_mut_ptr(),
            1,
            rc as isize,
            false,
            q.as_ptr(),
            1,
            k as isize,
            a.as_ptr(),
            a_row as isize,
            a_col as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `out` (R × K) = `x` (R × K) · `t` (K × K), all row-major, single-threaded.
#[inline]
fn transform_rows(x: &[f32], t: &[f32], r: usize, k: usize, out: &mut [f32]) {
    debug_assert!(x.len() >= r * k && t.len() == k * k && out.len() >= r * k);
    // SAFETY: the slices hold the (R × K), (K × K) and (R × K) row-major matrices the strides describe.
    unsafe {
        gemm::gemm(
            r,
            k,
            k,
            out.as_mut_ptr(),
            1,
            k as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            t.as_ptr(),
            1,
            k as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Fold one query's scores for rows `base .. base + s.len()` into its running top-k: `pos` sees the
/// scores, `neg` their negation (so "larger key is better" holds on both sides). The tests are written
/// `!(x < floor)` so that a NaN score is a hit and gets noted (`Running::nan`), never silently skipped;
/// keys are `+ 0.0` so that -0 and +0 tie (as in the other backends) under `total_cmp`.
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)] // `!(x < floor)` is meant: NaN must test true (see above)
fn select_scores<const POS: bool, const NEG: bool>(s: &[f32], base: u64, k: usize, cap: usize, p: &mut Running, n: &mut Running) {
    const W: usize = 32;
    let mut c0 = 0;
    while c0 < s.len() {
        let c1 = (c0 + W).min(s.len());
        let chunk = &s[c0..c1];
        // A branch-free test over a short run (vectorizes); only runs holding a candidate are walked.
        let (pf, nf) = (p.floor(), -n.floor());
        let mut hit = false;
        if chunk.len() == W {
            let mut m = 0u32;
            for &x in chunk {
                m |= ((POS && !(x < pf)) as u32) | ((NEG && !(x > nf)) as u32);
            }
            hit = m != 0;
        } else {
            for &x in chunk {
                hit |= (POS && !(x < pf)) || (NEG && !(x > nf));
            }
        }
        if hit {
            for (t, &x) in chunk.iter().enumerate() {
                let idx = base + (c0 + t) as u64;
                if x.is_nan() {
                    p.nan |= POS;
                    n.nan |= NEG;
                    continue;
                }
                if POS && x >= p.floor() {
                    p.offer(Entry { key: x + 0.0, idx }, k, cap);
                }
                if NEG && -x >= n.floor() {
                    n.offer(Entry { key: -x + 0.0, idx }, k, cap);
                }
            }
        }
        c0 = c1;
    }
}

/// What one lane needs to fold rows `r0 .. r1` of a block.
struct Pass<'a> {
    block: &'a [f32],
    offset: u64,
    kc: usize,
    k: usize,
    cap: usize,
    m: usize,
    measure: Measure,
    rc: usize,
    mt: usize,
    pos: bool,
    neg: bool,
    queries: &'a [f32],
    transform: Option<&'a [f32]>,
    /// Per-row factors indexed by train row (see [`TopKAccumulator::set_row_scales`]).
    row_scales: Option<&'a [f32]>,
}

/// Prepare rows `r0 .. r1` chunk by chunk, score each chunk against every tile of queries, select.
#[inline(always)]
fn lane_pass<const AVX: bool>(lane: &mut Lane, p: &Pass<'_>, r0: usize, r1: usize) {
    let (kc, k, cap, m, rc, mt) = (p.kc, p.k, p.cap, p.m, p.rc, p.mt);
    // Feature-major rows cost a transpose in the preparation; they pay off where the GEMM would
    // otherwise repack them (see `FEATURE_MAJOR_FROM_M`).
    let feature_major = m >= FEATURE_MAJOR_FROM_M;
    let ld = feature_major_stride(rc);
    let (a_row, a_col) = if feature_major { (1, ld) } else { (kc, 1) };
    lane.prepared.resize(ld * kc, 0.0);
    lane.scores.resize(rc * mt.min(m), 0.0);
    let mut dummy = Running::new();
    let mut c0 = r0;
    while c0 < r1 {
        let c1 = (c0 + rc).min(r1);
        let nr = c1 - c0;
        let mut rows = &p.block[c0 * kc..c1 * kc];
        let mut bad_raw = None;
        if let Some(t) = p.transform {
            // The rows a preconditioned, normalised measure ranks: centered, then times M^½ (what
            // `Prepared.block` computes in numpy), prepared below as any rows.
            lane.centered.resize(nr * kc, 0.0);
            lane.transformed.resize(nr * kc, 0.0);
            bad_raw = prepare_rows(rows, kc, Measure::Cov, &mut lane.centered);
            transform_rows(&lane.centered, t, nr, kc, &mut lane.transformed);
            rows = &lane.transformed[..];
        }
        let prep = &mut lane.prepared[..];
        let bad = if feature_major {
            prepare_rows_t::<AVX>(rows, kc, p.measure, prep, ld, &mut lane.scratch)
        } else {
            prepare_rows(rows, kc, p.measure, &mut prep[..nr * kc])
        };
        let bad = match (bad_raw, bad) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let base = p.offset + c0 as u64;
        if let Some(i) = bad {
            let row = base + i as u64;
            lane.non_finite = Some(lane.non_finite.map_or(row, |r| r.min(row)));
        }
        let mut j0 = 0;
        while j0 < m {
            let j1 = (j0 + mt).min(m);
            let tile = &mut lane.scores[..(j1 - j0) * nr];
            gemm_tile(&p.queries[j0 * kc..j1 * kc], prep, kc, j1 - j0, nr, a_row, a_col, tile);
            for (t, s) in tile.chunks_exact_mut(nr).enumerate() {
                let j = j0 + t;
                if let Some(scales) = p.row_scales {
                    // The persisted self-score norms of the -corr measures: each row's score times its
                    // own factor, in place of a K × K transform per row.
                    for (x, &f) in s.iter_mut().zip(&scales[base as usize..base as usize + nr]) {
                        *x *= f;
                    }
                }
                let s = &*s;
                match (p.pos, p.neg) {
                    (true, true) => {
                        let (ps, ns) = (&mut lane.pos[j], &mut lane.neg[j]);
                        select_scores::<true, true>(s, base, k, cap, ps, ns)
                    }
                    (true, false) => select_scores::<true, false>(s, base, k, cap, &mut lane.pos[j], &mut dummy),
                    (false, true) => select_scores::<false, true>(s, base, k, cap, &mut dummy, &mut lane.neg[j]),
                    (false, false) => {}
                }
            }
            j0 = j1;
        }
        c0 = c1;
    }
}

// The crate is built for baseline x86-64 (SSE2); these copies of the row preparation and selection
// loops are compiled for wider vectors and picked at run time. (The GEMM crate dispatches itself.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
unsafe fn lane_pass_avx512(lane: &mut Lane, p: &Pass<'_>, r0: usize, r1: usize) {
    lane_pass::<true>(lane, p, r0, r1)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn lane_pass_avx2(lane: &mut Lane, p: &Pass<'_>, r0: usize, r1: usize) {
    lane_pass::<true>(lane, p, r0, r1)
}

fn lane_pass_dispatch(lane: &mut Lane, p: &Pass<'_>, r0: usize, r1: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            // SAFETY: the CPU has the features the function was compiled for.
            return unsafe { lane_pass_avx512(lane, p, r0, r1) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { lane_pass_avx2(lane, p, r0, r1) };
        }
    }
    lane_pass::<false>(lane, p, r0, r1)
}

/// Worker threads: `RAYON_NUM_THREADS` if set (the usual knob), else the cores this process may use.
pub fn num_lanes() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Run `f(lane_index, lane)` for every lane, lane 0 on the calling thread and the others on scoped
/// threads. Not a rayon pool on purpose: rayon's idle workers spin for a while after each job, and on
/// a small machine that steals the core the store's reader thread needs to prefetch the next block.
fn for_each_lane<F>(lanes: &mut [Lane], f: F)
where
    F: Fn(usize, &mut Lane) + Sync,
{
    match lanes {
        [] => {}
        [only] => f(0, only),
        [first, rest @ ..] => std::thread::scope(|scope| {
            let f = &f;
            for (i, lane) in rest.iter_mut().enumerate() {
                scope.spawn(move || f(i + 1, lane));
            }
            f(0, first);
        }),
    }
}

/// Result of one side: row-major (m × k) indices and scores (sign restored).
#[derive(Debug, Clone, PartialEq)]
pub struct SideResult {
    pub indices: Vec<i64>,
    pub scores: Vec<f32>,
}

/// Streaming top-k over row blocks, for m queries on one or both sides.
///
/// ```
/// use _kernel::topk::{Measure, TopKAccumulator};
/// let q = [1.0f32, 0.0, -1.0];
/// let mut acc = TopKAccumulator::new(&q, 3, 1, Measure::Cov, true, false, false).unwrap();
/// acc.push_block(0, &[1.0, 0.0, -1.0, -1.0, 0.0, 1.0]).unwrap();
/// let (pos, _) = acc.finish().unwrap();
/// assert_eq!(pos.unwrap().indices, vec![0]);
/// ```
pub struct TopKAccumulator {
    k: usize,
    cap: usize,
    ncols: usize,
    measure: Measure,
    m: usize,
    queries: Vec<f32>,
    pos: bool,
    neg: bool,
    lanes: Vec<Lane>,
    rows_seen: u64,
    /// Rows per chunk (prepared chunk + score tile stay in L2) and queries per tile.
    chunk_rows: usize,
    query_tile: usize,
    /// A (K × K) row-major matrix T: every pushed row x is scored as prepare(center(x) · T).
    transform: Option<Vec<f32>>,
    /// One factor per train row: row i's scores are multiplied by `row_scales[i]`.
    row_scales: Option<Vec<f32>>,
}

impl TopKAccumulator {
    /// `queries`: row-major (m × K). With `queries_prepared` they are used as given (already through
    /// [`prepare_queries`], or a mean of such rows for aggregate influence).
    pub fn new(
        queries: &[f32],
        ncols: usize,
        k: usize,
        measure: Measure,
        pos: bool,
        neg: bool,
        queries_prepared: bool,
    ) -> Result<Self, TopKError> {
        if ncols == 0 || !queries.len().is_multiple_of(ncols) {
            return Err(TopKError::Shape(format!(
                "queries hold {} values, not a whole number of rows of K={ncols}",
                queries.len()
            )));
        }
        if k == 0 {
            return Err(TopKError::Shape("k must be >= 1".into()));
        }
        if !pos && !neg {
            return Err(TopKError::Shape("ask for at least one side (pos or neg)".into()));
        }
        let m = queries.len() / ncols;
        let queries = if queries_prepared { queries.to_vec() } else { prepare_queries(queries, ncols, measure) };
        let nlanes = num_lanes();
        let lanes = (0..nlanes)
            .map(|_| Lane {
                pos: if pos { vec![Running::new(); m] } else { Vec::new() },
                neg: if neg { vec![Running::new(); m] } else { Vec::new() },
                prepared: Vec::new(),
                scratch: Vec::new(),
                scores: Vec::new(),
                centered: Vec::new(),
                transformed: Vec::new(),
                non_finite: None,
            })
            .collect();
        let chunk_rows = (65536 / ncols).clamp(64, 1024);
        Ok(TopKAccumulator {
            k,
            cap: capacity_for(k),
            ncols,
            measure,
            m,
            queries,
            pos,
            neg,
            lanes,
            rows_seen: 0,
            chunk_rows,
            query_tile: 128,
            transform: None,
            row_scales: None,
        })
    }

    /// Score every row pushed from now on as `center(x) · t` (`t`: K × K, row-major), prepared by the
    /// measure as usual: the normalised preconditioned measures (`t` = M^½), so that their rows go
    /// through the fused read-and-score pass too.
    pub fn set_transform(&mut self, t: &[f32]) -> Result<(), TopKError> {
        if t.len() != self.ncols * self.ncols {
            return Err(TopKError::Shape(format!("the transform holds {} values, not K × K = {}", t.len(), self.ncols * self.ncols)));
        }
        self.transform = Some(t.to_vec());
        Ok(())
    }

    /// Multiply every score of train row i pushed from now on by `scales[i]` (one value per train row;
    /// rows pushed must lie below `scales.len()`): the normalised preconditioned measures with their
    /// per-row self-score norms persisted, scored as cov rows against queries prepared with M.
    pub fn set_row_scales(&mut self, scales: Vec<f32>) {
        self.row_scales = Some(scales);
    }

    /// Rows pushed must lie below this (the row scales' length), if set.
    pub fn row_limit(&self) -> Option<u64> {
        self.row_scales.as_ref().map(|s| s.len() as u64)
    }

    pub fn num_queries(&self) -> usize {
        self.m
    }

    pub fn rows_seen(&self) -> u64 {
        self.rows_seen
    }

    /// Fold rows `offset .. offset + R` (a row-major R × K block) into the running top-k.
    pub fn push_block(&mut self, offset: u64, block: &[f32]) -> Result<(), TopKError> {
        let kc = self.ncols;
        if !block.len().is_multiple_of(kc) {
            return Err(TopKError::Shape(format!(
                "block holds {} values, not a whole number of rows of K={kc}; blocks and queries need the same columns",
                block.len()
            )));
        }
        let r = block.len() / kc;
        if r == 0 {
            return Ok(());
        }
        if let Some(limit) = self.row_limit() {
            if offset + r as u64 > limit {
                return Err(TopKError::Shape(format!(
                    "rows {offset}..{} pushed, but the row scales cover rows 0..{limit}",
                    offset + r as u64
                )));
            }
        }
        self.rows_seen += r as u64;
        let nlanes = self.lanes.len();
        // Contiguous row ranges, one per lane, rounded to whole chunks where possible.
        let per = r.div_ceil(nlanes);
        let pass = Pass {
            block,
            offset,
            kc,
            k: self.k,
            cap: self.cap,
            m: self.m,
            measure: self.measure,
            rc: self.chunk_rows,
            mt: self.query_tile,
            pos: self.pos,
            neg: self.neg,
            queries: &self.queries,
            transform: self.transform.as_deref(),
            row_scales: self.row_scales.as_deref(),
        };
        for_each_lane(&mut self.lanes, |li, lane| {
            let r0 = (li * per).min(r);
            let r1 = ((li + 1) * per).min(r);
            if r0 < r1 {
                lane_pass_dispatch(lane, &pass, r0, r1);
            }
        });
        self.check_finite()
    }

    /// `NonFinite` naming the lowest row holding NaN or inf seen so far (each lane notes its own while
    /// preparing rows, at no cost: see [`prepare_row`]).
    fn check_finite(&self) -> Result<(), TopKError> {
        match self.lanes.iter().filter_map(|l| l.non_finite).min() {
            Some(row) => Err(TopKError::NonFinite { row }),
            None => Ok(()),
        }
    }

    /// Fold `rows` rows that `feed` streams in, one lane per feeding thread, instead of a block:
    /// `feed(lanes, fold)` must call `fold(lane, offset, rows)` (row-major, K columns) for every row
    /// exactly once, each lane from one thread at a time. The fused read-and-score pass
    /// (`read::visit_segments`) feeds rows while they are in cache. An error of `feed` leaves the
    /// accumulator holding an unknown part of the rows: discard it.
    pub fn push_with<E>(
        &mut self, rows: u64, feed: impl FnOnce(&mut [Lane], &(dyn Fn(&mut Lane, usize, &[f32]) + Sync)) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut lanes = std::mem::take(&mut self.lanes);
        let kc = self.ncols;
        let (k, cap, m, measure, rc, mt, pos, neg) =
            (self.k, self.cap, self.m, self.measure, self.chunk_rows, self.query_tile, self.pos, self.neg);
        let queries = &self.queries;
        let transform = self.transform.as_deref();
        let row_scales = self.row_scales.as_deref();
        let fold = |lane: &mut Lane, offset: usize, block: &[f32]| {
            let pass = Pass { block, offset: offset as u64, kc, k, cap, m, measure, rc, mt, pos, neg, queries, transform, row_scales };
            lane_pass_dispatch(lane, &pass, 0, block.len() / kc);
        };
        let result = feed(&mut lanes, &fold);
        self.lanes = lanes;
        self.rows_seen += rows;
        result
    }

    /// Fold precomputed scores of rows `offset .. offset + R` for a single query (m = 1), e.g. the
    /// self-influence var(i) = cov(i, i), which needs no GEMM but the same selection.
    pub fn push_scores(&mut self, offset: u64, scores: &[f32]) -> Result<(), TopKError> {
        if self.m != 1 {
            return Err(TopKError::Shape(format!("push_scores needs exactly one query, this accumulator has {}", self.m)));
        }
        let r = scores.len();
        if r == 0 {
            return Ok(());
        }
        self.rows_seen += r as u64;
        let per = r.div_ceil(self.lanes.len());
        let (k, cap, pos, neg) = (self.k, self.cap, self.pos, self.neg);
        for_each_lane(&mut self.lanes, |li, lane| {
            let (r0, r1) = ((li * per).min(r), ((li + 1) * per).min(r));
            if r0 >= r1 {
                return;
            }
            let (s, base) = (&scores[r0..r1], offset + r0 as u64);
            let mut dummy = Running::new();
            match (pos, neg) {
                (true, true) => {
                    let (p, n) = (&mut lane.pos[0], &mut lane.neg[0]);
                    select_scores::<true, true>(s, base, k, cap, p, n)
                }
                (true, false) => select_scores::<true, false>(s, base, k, cap, &mut lane.pos[0], &mut dummy),
                (false, true) => select_scores::<false, true>(s, base, k, cap, &mut dummy, &mut lane.neg[0]),
                (false, false) => {}
            }
        });
        Ok(())
    }

    /// Merge the lanes: `(pos, neg)` results, each row-major (m × k), best first.
    pub fn finish(self) -> Result<(Option<SideResult>, Option<SideResult>), TopKError> {
        self.check_finite()?; // rows fed by `push_with`
        if self.rows_seen < self.k as u64 {
            return Err(TopKError::TooFewRows { k: self.k, n: self.rows_seen });
        }
        let (k, m) = (self.k, self.m);
        let mut lanes = self.lanes;
        // A NaN score (noted while selecting) or an infinite one (kept in the top-k) is an error naming the
        // first such query: neither has a place in a ranking, nor in the JSON the results are written to.
        let nan_query = (0..m).find(|&j| lanes.iter().any(|l| l.pos.get(j).is_some_and(|r| r.nan) || l.neg.get(j).is_some_and(|r| r.nan)));
        if let Some(query) = nan_query {
            return Err(TopKError::ScoreOverflow { query });
        }
        let merge = |lanes: &mut [Lane], positive: bool| -> SideResult {
            let mut parts: Vec<Vec<Running>> =
                lanes.iter_mut().map(|l| std::mem::take(if positive { &mut l.pos } else { &mut l.neg })).collect();
            let mut indices = vec![0i64; m * k];
            let mut scores = vec![0f32; m * k];
            // Gather query j's buffers from every lane (take, so memory is released as we go).
            let per_query: Vec<Vec<Entry>> = (0..m)
                .map(|j| {
                    let mut all = Vec::new();
                    for p in parts.iter_mut() {
                        all.append(&mut p[j].buf);
                        p[j].buf = Vec::new();
                    }
                    all
                })
                .collect();
            drop(parts);
            indices
                .par_chunks_mut(k)
                .zip(scores.par_chunks_mut(k))
                .zip(per_query.into_par_iter())
                .for_each(|((idx, sc), mut all)| {
                    if all.len() > k {
                        all.select_nth_unstable_by(k - 1, better);
                        all.truncate(k);
                    }
                    all.sort_unstable_by(better);
                    for (t, e) in all.iter().enumerate() {
                        idx[t] = e.idx as i64;
                        sc[t] = if positive { e.key } else { -e.key };
                    }
                });
            SideResult { indices, scores }
        };
        let pos = if self.pos { Some(merge(&mut lanes, true)) } else { None };
        let neg = if self.neg { Some(merge(&mut lanes, false)) } else { None };
        for side in [&pos, &neg].into_iter().flatten() {
            if let Some(at) = side.scores.iter().position(|s| !s.is_finite()) {
                return Err(TopKError::ScoreOverflow { query: at / k });
            }
        }
        Ok((pos, neg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force in f64 on prepared rows: (score, index) sorted by the side's order.
    fn brute(x: &[f32], q: &[f32], kc: usize, k: usize, measure: Measure, positive: bool) -> Vec<Vec<(i64, f32)>> {
        let n = x.len() / kc;
        let mut xp = vec![0.0; x.len()];
        prepare_rows(x, kc, measure, &mut xp);
        let qp = prepare_queries(q, kc, measure);
        qp.chunks_exact(kc)
            .map(|qr| {
                let mut s: Vec<(i64, f32)> = (0..n)
                    .map(|i| {
                        let d: f64 = xp[i * kc..(i + 1) * kc].iter().zip(qr).map(|(&a, &b)| a as f64 * b as f64).sum();
                        (i as i64, d as f32)
                    })
                    .collect();
                s.sort_by(|a, b| {
                    let (ka, kb) = if positive { (a.1, b.1) } else { (-a.1, -b.1) };
                    kb.total_cmp(&ka).then(a.0.cmp(&b.0))
                });
                s.truncate(k);
                s
            })
            .collect()
    }

    /// A tiny deterministic generator (no extra dev-dependency).
    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn run(x: &[f32], q: &[f32], kc: usize, k: usize, measure: Measure, block: usize) -> (SideResult, SideResult) {
        let mut acc = TopKAccumulator::new(q, kc, k, measure, true, true, false).unwrap();
        let n = x.len() / kc;
        let mut r0 = 0;
        while r0 < n {
            let r1 = (r0 + block).min(n);
            acc.push_block(r0 as u64, &x[r0 * kc..r1 * kc]).unwrap();
            r0 = r1;
        }
        let (p, n) = acc.finish().unwrap();
        (p.unwrap(), n.unwrap())
    }

    fn check(x: &[f32], q: &[f32], kc: usize, k: usize, measure: Measure, block: usize) {
        let (p, n) = run(x, q, kc, k, measure, block);
        for (res, positive) in [(p, true), (n, false)] {
            let want = brute(x, q, kc, k, measure, positive);
            for (j, w) in want.iter().enumerate() {
                for (t, &(wi, ws)) in w.iter().enumerate() {
                    let (gi, gs) = (res.indices[j * k + t], res.scores[j * k + t]);
                    assert!((gs - ws).abs() <= 1e-4 * (1.0 + ws.abs()), "query {j} rank {t}: {gs} vs {ws}");
                    // Indices must agree unless the brute-force scores are a near tie.
                    let tied = w.iter().any(|&(i2, s2)| i2 != wi && (s2 - ws).abs() <= 1e-4);
                    if !tied {
                        assert_eq!(gi, wi, "query {j} rank {t}");
                    }
                }
            }
        }
    }

    #[test]
    fn random_matches_brute_force() {
        let mut seed = 1;
        // m = 1 prepares rows row-major, m >= 2 feature-major (`FEATURE_MAJOR_FROM_M`); K = 20 leaves a
        // remainder after the 8-wide transposes.
        for (m, kc) in [(7, 16), (1, 16), (2, 20)] {
            let n = 5000;
            let x: Vec<f32> = (0..n * kc).map(|_| lcg(&mut seed)).collect();
            let q: Vec<f32> = (0..m * kc).map(|_| lcg(&mut seed)).collect();
            for &(k, block) in &[(1, 5000), (10, 777), (100, 64), (4999, 1000), (5000, 3000)] {
                check(&x, &q, kc, k, Measure::Cov, block);
                check(&x, &q, kc, k, Measure::Corr, block);
            }
        }
    }

    #[test]
    fn row_scales_multiply_each_rows_scores() {
        // Scores with row scales s equal the scores of the rows multiplied by s (centering is linear),
        // in blocks pushed out of order; a row pushed beyond the scales is an error.
        let (n, kc, m, k) = (3000, 12, 3, 25);
        let mut seed = 7;
        let x: Vec<f32> = (0..n * kc).map(|_| lcg(&mut seed)).collect();
        let q: Vec<f32> = (0..m * kc).map(|_| lcg(&mut seed)).collect();
        let s: Vec<f32> = (0..n).map(|i| if i % 97 == 0 { 0.0 } else { 0.1 + lcg(&mut seed).abs() * 3.0 }).collect();
        let scaled: Vec<f32> = x.chunks_exact(kc).zip(&s).flat_map(|(r, &f)| r.iter().map(move |v| v * f)).collect();
        let (want_p, want_n) = run(&scaled, &q, kc, k, Measure::Cov, 3000);
        let mut acc = TopKAccumulator::new(&q, kc, k, Measure::Cov, true, true, false).unwrap();
        acc.set_row_scales(s.clone());
        acc.push_block(1000, &x[1000 * kc..]).unwrap();
        acc.push_block(0, &x[..1000 * kc]).unwrap();
        let (p, ng) = acc.finish().unwrap();
        for (got, want) in [(p.unwrap(), want_p), (ng.unwrap(), want_n)] {
            assert_eq!(got.indices, want.indices);
            for (a, b) in got.scores.iter().zip(&want.scores) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
        let mut acc = TopKAccumulator::new(&q, kc, k, Measure::Cov, true, true, false).unwrap();
        acc.set_row_scales(s[..10].to_vec());
        assert!(acc.push_block(5, &x[..10 * kc]).is_err());
    }

    #[test]
    fn a_transform_scores_the_transformed_rows() {
        // Pushing x with transform T ranks exactly as pushing center(x) · T (computed here in f64, then
        // f32) without one, for m = 1 (row-major rows) and m >= 2 (feature-major), cov and corr.
        let mut seed = 5;
        for (m, kc) in [(1, 12), (3, 12), (2, 20)] {
            let n = 3000;
            let x: Vec<f32> = (0..n * kc).map(|_| 5.0 + lcg(&mut seed)).collect();
            let q: Vec<f32> = (0..m * kc).map(|_| lcg(&mut seed)).collect();
            let t: Vec<f32> = (0..kc * kc).map(|_| lcg(&mut seed)).collect();
            let mut centered = vec![0f32; x.len()];
            prepare_rows(&x, kc, Measure::Cov, &mut centered);
            let y: Vec<f32> = (0..n * kc)
                .map(|i| {
                    let (r, c) = (i / kc, i % kc);
                    (0..kc).map(|j| centered[r * kc + j] as f64 * t[j * kc + c] as f64).sum::<f64>() as f32
                })
                .collect();
            for measure in [Measure::Cov, Measure::Corr] {
                let mut acc = TopKAccumulator::new(&q, kc, 7, measure, true, true, false).unwrap();
                acc.set_transform(&t).unwrap();
                acc.push_block(0, &x[..1000 * kc]).unwrap();
                acc.push_block(1000, &x[1000 * kc..]).unwrap();
                let (p, nres) = acc.finish().unwrap();
                let (wp, wn) = run(&y, &q, kc, 7, measure, 3000);
                for (got, want) in [(p.unwrap(), wp), (nres.unwrap(), wn)] {
                    assert_eq!(got.indices, want.indices, "m = {m}, K = {kc}, {measure:?}");
                    for (a, b) in got.scores.iter().zip(&want.scores) {
                        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
                    }
                }
            }
        }
        let mut acc = TopKAccumulator::new(&[1.0, 2.0], 2, 1, Measure::Cov, true, true, false).unwrap();
        assert!(acc.set_transform(&[1.0; 3]).is_err());
    }

    #[test]
    fn many_queries_span_tiles() {
        let mut seed = 7;
        let (n, m, kc) = (700, 300, 8);
        let x: Vec<f32> = (0..n * kc).map(|_| lcg(&mut seed)).collect();
        let q: Vec<f32> = (0..m * kc).map(|_| lcg(&mut seed)).collect();
        check(&x, &q, kc, 5, Measure::Corr, 256);
    }

    #[test]
    fn feature_major_prepare_is_the_transpose() {
        let mut seed = 11u64;
        for (r, kc) in [(1, 1), (7, 13), (8, 8), (19, 64), (256, 256), (33, 250)] {
            let x: Vec<f32> = (0..r * kc).map(|_| lcg(&mut seed)).collect();
            for measure in [Measure::Cov, Measure::Corr] {
                let mut rows = vec![0f32; r * kc];
                prepare_rows(&x, kc, measure, &mut rows);
                for ld in [r, feature_major_stride(r)] {
                    // Cells past R in each feature row stay untouched (NaN), so compare the bits.
                    let want: Vec<u32> = (0..kc * ld)
                        .map(|i| if i % ld < r { rows[(i % ld) * kc + i / ld].to_bits() } else { f32::NAN.to_bits() })
                        .collect();
                    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<u32>>();
                    let mut plain = vec![f32::NAN; kc * ld];
                    prepare_rows_t::<false>(&x, kc, measure, &mut plain, ld, &mut Vec::new());
                    assert_eq!(bits(plain), want, "R={r} K={kc} ld={ld}");
                    #[cfg(target_arch = "x86_64")]
                    if std::arch::is_x86_feature_detected!("avx") {
                        let mut avx = vec![f32::NAN; kc * ld];
                        prepare_rows_t::<true>(&x, kc, measure, &mut avx, ld, &mut Vec::new());
                        assert_eq!(bits(avx), want, "R={r} K={kc} ld={ld}, AVX");
                    }
                }
            }
        }
    }

    #[test]
    fn nan_or_inf_rows_are_named() {
        let mut seed = 9u64;
        let (n, kc) = (3000, 12);
        for m in [1, 3] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut x: Vec<f32> = (0..n * kc).map(|_| lcg(&mut seed)).collect();
                let q: Vec<f32> = (0..m * kc).map(|_| lcg(&mut seed)).collect();
                x[2211 * kc + 5] = bad;
                x[2900 * kc] = bad;
                let mut acc = TopKAccumulator::new(&q, kc, 5, Measure::Cov, true, true, false).unwrap();
                assert_eq!(acc.push_block(0, &x[..1000 * kc]), Ok(()));
                assert_eq!(acc.push_block(1000, &x[1000 * kc..]), Err(TopKError::NonFinite { row: 2211 }), "m={m}");
                // Rows streamed in by `push_with` are reported by `finish`.
                let mut acc = TopKAccumulator::new(&q, kc, 5, Measure::Corr, true, false, false).unwrap();
                acc.push_with::<()>(n as u64, |lanes, fold| {
                    fold(&mut lanes[0], 0, &x);
                    Ok(())
                })
                .unwrap();
                assert_eq!(acc.finish().err(), Some(TopKError::NonFinite { row: 2211 }), "m={m}");
            }
        }
    }

    #[test]
    fn ties_go_to_lower_index() {
        // Every row identical: all scores tie, so the top-k is rows 0..k on both sides.
        let kc = 4;
        let row = [1.0f32, 2.0, 0.0, 5.0];
        let x: Vec<f32> = (0..300).flat_map(|_| row).collect();
        let (p, n) = run(&x, &[0.0, 1.0, 0.0, 3.0], kc, 10, Measure::Cov, 64);
        assert_eq!(p.indices, (0..10).collect::<Vec<i64>>());
        assert_eq!(n.indices, (0..10).collect::<Vec<i64>>());
    }

    #[test]
    fn ties_with_blocks_pushed_out_of_order() {
        let kc = 4;
        let x: Vec<f32> = (0..100).flat_map(|_| [1.0f32, 0.0, 0.0, 0.0]).collect();
        let mut acc = TopKAccumulator::new(&[1.0, 0.0, 0.0, 0.0], kc, 3, Measure::Corr, true, false, false).unwrap();
        acc.push_block(50, &x[50 * kc..]).unwrap();
        acc.push_block(0, &x[..50 * kc]).unwrap();
        let (p, _) = acc.finish().unwrap();
        assert_eq!(p.unwrap().indices, vec![0, 1, 2]);
    }

    #[test]
    fn pushed_scores_select_like_blocks() {
        let s: Vec<f32> = vec![3.0, 1.0, 3.0, -2.0, 0.5, -2.0, 7.0];
        let mut acc = TopKAccumulator::new(&[0.0, 1.0], 2, 3, Measure::Cov, true, true, true).unwrap();
        acc.push_scores(0, &s[..4]).unwrap();
        acc.push_scores(4, &s[4..]).unwrap();
        let (p, n) = acc.finish().unwrap();
        let (p, n) = (p.unwrap(), n.unwrap());
        assert_eq!((p.indices, p.scores), (vec![6, 0, 2], vec![7.0, 3.0, 3.0]));
        assert_eq!((n.indices, n.scores), (vec![3, 5, 4], vec![-2.0, -2.0, 0.5]));
    }

    #[test]
    fn constant_rows_have_zero_correlation() {
        let mut out = [9.0f32; 3];
        prepare_row(&[2.0, 2.0, 2.0], Measure::Corr, &mut out);
        assert_eq!(out, [0.0, 0.0, 0.0]);
    }

    #[test]
    fn subnormal_rows_have_finite_correlation() {
        // Losses ~1e-40 vary by subnormals: the f32 reciprocal of their norm is inf (and inf × 0 NaN).
        let row = [1.0e-40f32, 1.2e-40, 0.9e-40, 1.1e-40];
        let mut out = [0f32; 4];
        prepare_row(&row, Measure::Corr, &mut out);
        assert!(out.iter().all(|v| v.is_finite() && v.abs() <= 1.0), "{out:?}");
        let norm: f64 = out.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "{norm}");
        // Such rows score finitely against each other, on both sides, and -0 ties +0 (all cov scores underflow).
        let mut seed = 5u64;
        let x: Vec<f32> = (0..200 * 4).map(|_| 1.0e-40 + lcg(&mut seed) * 1.0e-41).collect();
        for measure in [Measure::Cov, Measure::Corr] {
            let (p, n) = run(&x, &x[..8], 4, 5, measure, 64);
            assert!(p.scores.iter().chain(&n.scores).all(|s| s.is_finite()), "{measure:?}");
            if measure == Measure::Cov {
                assert_eq!(p.indices[..5], [0, 1, 2, 3, 4]);
                assert_eq!(n.indices[..5], [0, 1, 2, 3, 4]);
            }
        }
    }

    #[test]
    fn scores_beyond_f32_are_an_error() {
        // Finite losses whose products overflow f32: cov scores of ±inf (with FMA an inf accumulator stays
        // inf; without, infs of both signs meet as NaN). None is ranked (an inf would print as `Infinity`, a
        // NaN be skipped silently): finish names the query, on whichever side the inf would top.
        let kc = 4;
        let x: Vec<f32> = (0..100)
            .flat_map(|i| match i {
                37 => [3.0e38, -3.0e38, 0.0, 0.0],
                61 => [-3.0e38, 3.0e38, 0.0, 0.0],
                _ => [i as f32, 1.0, -1.0, 0.5],
            })
            .collect();
        let q = [0.0f32, 1.0, 0.0, 0.0, 3.0e38, -3.0e38, 0.0, 0.0]; // query 1: +inf at row 37, -inf at row 61
        for (pos, neg) in [(true, true), (true, false), (false, true)] {
            let mut acc = TopKAccumulator::new(&q, kc, 3, Measure::Cov, pos, neg, false).unwrap();
            acc.push_block(0, &x).unwrap();
            let got = acc.finish();
            assert_eq!(got.as_ref().err(), Some(&TopKError::ScoreOverflow { query: 1 }), "pos={pos} neg={neg} {got:?}");
        }
        // A NaN among pushed scores, and an inf, likewise.
        for bad in [f32::NAN, f32::INFINITY] {
            let mut acc = TopKAccumulator::new(&[0.0, 1.0], 2, 2, Measure::Cov, true, true, true).unwrap();
            acc.push_scores(0, &[1.0, bad, 2.0, 0.5]).unwrap();
            assert_eq!(acc.finish().err(), Some(TopKError::ScoreOverflow { query: 0 }), "{bad}");
        }
    }

    #[test]
    fn too_few_rows_is_an_error() {
        let mut acc = TopKAccumulator::new(&[1.0, 2.0], 2, 5, Measure::Cov, true, true, false).unwrap();
        acc.push_block(0, &[1.0, 2.0, 3.0, 1.0]).unwrap();
        assert_eq!(acc.finish().unwrap_err(), TopKError::TooFewRows { k: 5, n: 2 });
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(TopKAccumulator::new(&[1.0, 2.0, 3.0], 2, 1, Measure::Cov, true, true, false).is_err());
        let mut acc = TopKAccumulator::new(&[1.0, 2.0], 2, 1, Measure::Cov, true, true, false).unwrap();
        assert!(acc.push_block(0, &[1.0, 2.0, 3.0]).is_err());
    }
}

#[cfg(test)]
mod profile {
    use super::*;
    use std::time::Instant;

    /// `cargo test --release -- --ignored --nocapture profile`: where the time of one pass goes.
    #[test]
    #[ignore]
    fn profile_parts() {
        let (n, kc, m, k) = (1usize << 20, 64usize, 100usize, 100usize);
        let mut seed = 3u64;
        let x: Vec<f32> = (0..n * kc).map(|_| tests_lcg(&mut seed)).collect();
        let q: Vec<f32> = (0..m * kc).map(|_| tests_lcg(&mut seed)).collect();
        let qp = prepare_queries(&q, kc, Measure::Cov);
        let rc = 1024;
        let ld = feature_major_stride(rc);
        let mut prep = vec![0f32; ld * kc];
        let mut out = vec![0f32; rc * m];
        let t = Instant::now();
        for c in x.chunks_exact(rc * kc) {
            unsafe { prep_v4(c, kc, &mut prep) };
        }
        println!("prepare {:?}", t.elapsed());
        let t = Instant::now();
        for _ in 0..n / rc {
            gemm_tile(&qp, &prep, kc, m, rc, 1, ld, &mut out);
        }
        println!("gemm (1 thread) {:?}  {:.1} GFLOP/s", t.elapsed(), 2.0 * (n * kc * m) as f64 / t.elapsed().as_secs_f64() / 1e9);
        let t = Instant::now();
        for _ in 0..n / rc {
            // The alternative GEMM crate, same shapes and strides.
            unsafe {
                matrixmultiply::sgemm(m, kc, rc, 1.0, qp.as_ptr(), kc as isize, 1, prep.as_ptr(), ld as isize, 1, 0.0, out.as_mut_ptr(), rc as isize, 1);
            }
        }
        println!("matrixmultiply (1 thread) {:?}  {:.1} GFLOP/s", t.elapsed(), 2.0 * (n * kc * m) as f64 / t.elapsed().as_secs_f64() / 1e9);
        let t = Instant::now();
        let mut ps: Vec<Running> = vec![Running::new(); m];
        let mut ns: Vec<Running> = vec![Running::new(); m];
        let cap = capacity_for(k);
        for c in 0..n / rc {
            unsafe { sel_v4(&out, rc, m, (c * rc) as u64, k, cap, &mut ps, &mut ns) };
        }
        println!("select {:?}", t.elapsed());
        let t = Instant::now();
        let mut acc = TopKAccumulator::new(&q, kc, k, Measure::Cov, true, true, false).unwrap();
        for (b, c) in x.chunks(65536 * kc).enumerate() {
            acc.push_block((b * 65536) as u64, c).unwrap();
        }
        acc.finish().unwrap();
        println!("accumulator ({} threads) {:?}", num_lanes(), t.elapsed());
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
    unsafe fn prep_v4(c: &[f32], kc: usize, prep: &mut [f32]) {
        prepare_rows_t::<true>(c, kc, Measure::Cov, prep, feature_major_stride(c.len() / kc), &mut Vec::new());
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn sel_v4(out: &[f32], rc: usize, m: usize, base: u64, k: usize, cap: usize, ps: &mut [Running], ns: &mut [Running]) {
        for j in 0..m {
            select_scores::<true, true>(&out[j * rc..(j + 1) * rc], base, k, cap, &mut ps[j], &mut ns[j]);
        }
    }

    fn tests_lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}
