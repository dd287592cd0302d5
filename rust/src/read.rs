//! The store's local read path: row blocks assembled straight from Zarr v3 chunk files, plain Rust.
//!
//! A chunk of the loss arrays (`train/losses`, chunks (rows, 1); `train/packed`, chunks (rows, w)) is
//! stored as Zarr's `bytes` codec output (row-major float32, little endian, always the full chunk shape,
//! edge chunks included) followed by the `crc32c` codec's 4-byte checksum of those bytes (little-endian
//! u32, Castagnoli polynomial); its key is `<array path>/c/<row chunk>/<column chunk>` (the default
//! chunk key encoding). [`read_block`] reads the chunk files a row range needs, verifies every checksum
//! (over the whole chunk, as zarr does), and copies the wanted columns of the wanted rows into one
//! row-major (R, K) block. Any absent file, wrong size, failed checksum, or NaN among the copied values
//! (committed losses are finite: a NaN is damage) is an error naming the chunk; nothing is returned
//! half-checked.
//!
//! Chunk files are streamed through a small per-thread buffer (read, checksum and copy while the
//! segment is in cache: one pass over the page cache, one write of the block) on scoped threads, one
//! chunk file per task. Not a rayon pool, for the reason `topk::for_each_lane` gives: its idle workers
//! spin after each job and steal the core the scoring kernel needs.

use std::fmt;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Bytes streamed per step of one chunk file (whole rows; at least one row).
const SEGMENT_BYTES: usize = 1 << 20;

/// The columns one column chunk of one array contributes to the block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkColumns {
    /// The array's path in the store, e.g. `train/packed`.
    pub array: String,
    /// The array's chunk shape (rows, columns).
    pub chunk_rows: usize,
    pub chunk_cols: usize,
    /// Which column chunk (the second number of the chunk key).
    pub col_chunk: u64,
    /// (column within the chunk, destination column of the block) pairs.
    pub pairs: Vec<(usize, usize)>,
}

/// What went wrong with which chunk; `key` is the chunk's key relative to the store root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The request itself is inconsistent (a programming error of the caller).
    Invalid(String),
    /// The chunk file does not exist.
    Missing { key: String },
    /// The chunk file has the wrong size or a failed checksum, or could not be read.
    Corrupt { key: String, why: String },
    /// A copied value is NaN: the chunk holds the fill value where a committed column is finite.
    Nan { key: String, column: usize, row: usize },
}

impl ReadError {
    /// A short name of the kind: "invalid", "missing", "corrupt" or "nan".
    pub fn kind(&self) -> &'static str {
        match self {
            ReadError::Invalid(_) => "invalid",
            ReadError::Missing { .. } => "missing",
            ReadError::Corrupt { .. } => "corrupt",
            ReadError::Nan { .. } => "nan",
        }
    }

    /// The chunk key, where the error is about one chunk.
    pub fn key(&self) -> Option<&str> {
        match self {
            ReadError::Invalid(_) => None,
            ReadError::Missing { key } | ReadError::Corrupt { key, .. } | ReadError::Nan { key, .. } => Some(key),
        }
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Invalid(why) => write!(f, "{why}"),
            ReadError::Missing { key } => write!(f, "chunk '{key}' is missing"),
            ReadError::Corrupt { key, why } => write!(f, "chunk '{key}' is corrupt ({why})"),
            ReadError::Nan { key, column, row } => {
                write!(f, "chunk '{key}' holds NaN where a committed column has finite losses (block column {column}, row {row})")
            }
        }
    }
}

impl std::error::Error for ReadError {}

/// One chunk file to read: which source, which row chunk.
struct Task {
    source: usize,
    row_chunk: u64,
}

/// A run of consecutive source columns going to consecutive destination columns.
#[derive(Clone, Copy)]
struct Run {
    src: usize,
    dst: usize,
    len: usize,
}

fn runs_of(pairs: &[(usize, usize)]) -> Vec<Run> {
    let mut sorted = pairs.to_vec();
    sorted.sort_unstable();
    let mut runs: Vec<Run> = Vec::new();
    for (src, dst) in sorted {
        match runs.last_mut() {
            Some(r) if r.src + r.len == src && r.dst + r.len == dst => r.len += 1,
            _ => runs.push(Run { src, dst, len: 1 }),
        }
    }
    runs
}

/// The output block, shared by the worker threads: each task writes a disjoint set of (row, column)
/// cells (its row chunk's rows × its source's destination columns, which are distinct across sources).
struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: tasks write disjoint cells (checked by `read_block`: every destination column belongs to
// one source, and one task per (source, row chunk)), and the buffer outlives the scoped threads.
unsafe impl Sync for SharedOut {}

fn has_nan(values: &[f32]) -> bool {
    // Branch-free so that it vectorizes; NaN is the only value not equal to itself.
    values.iter().fold(false, |acc, &x| acc | x.is_nan())
}

/// Rows `r0 .. r1` of the block assembled from `sources`, row-major (r1 - r0, ncols), reading the
/// chunk files under `root` on `threads` threads. Every destination column 0..ncols must be named by
/// exactly one pair of one source.
pub fn read_block(root: &Path, sources: &[ChunkColumns], r0: usize, r1: usize, ncols: usize, threads: usize) -> Result<Vec<f32>, ReadError> {
    let mut out = vec![0.0f32; r1.saturating_sub(r0) * ncols];
    read_block_into(root, sources, r0, r1, ncols, threads, &mut out)?;
    Ok(out)
}

/// [`read_block`] into a caller's buffer of (r1 - r0) * ncols values, every one of which is written on
/// success (its contents are unspecified after an error). A buffer from numpy (`np.empty`) is backed
/// by huge pages where the kernel allows: filling a fresh 64 MB `Vec` instead costs ~16k page faults,
/// which measured slower than reading and checksumming the chunks themselves.
pub fn read_block_into(
    root: &Path, sources: &[ChunkColumns], r0: usize, r1: usize, ncols: usize, threads: usize, out: &mut [f32],
) -> Result<(), ReadError> {
    if r1 < r0 {
        return Err(ReadError::Invalid(format!("row range {r0}:{r1} is reversed")));
    }
    if out.len() != (r1 - r0) * ncols {
        return Err(ReadError::Invalid(format!("the output holds {} values, not ({} rows) x ({ncols} columns)", out.len(), r1 - r0)));
    }
    let mut seen = vec![false; ncols];
    for s in sources {
        if s.chunk_rows == 0 || s.chunk_cols == 0 {
            return Err(ReadError::Invalid(format!("array {} has an empty chunk shape", s.array)));
        }
        for &(c, d) in &s.pairs {
            if c >= s.chunk_cols || d >= ncols || std::mem::replace(&mut seen[d], true) {
                return Err(ReadError::Invalid(format!(
                    "pair ({c}, {d}) of {} is outside its chunk ({} columns) or the block ({ncols} columns), or repeats a column",
                    s.array, s.chunk_cols
                )));
            }
        }
    }
    if let Some(d) = seen.iter().position(|&b| !b) {
        return Err(ReadError::Invalid(format!("no source fills block column {d}")));
    }
    let rows = r1 - r0;
    if rows == 0 || ncols == 0 {
        return Ok(());
    }
    let runs: Vec<Vec<Run>> = sources.iter().map(|s| runs_of(&s.pairs)).collect();
    let mut tasks = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        if s.pairs.is_empty() {
            continue;
        }
        for rc in (r0 / s.chunk_rows)..=((r1 - 1) / s.chunk_rows) {
            tasks.push(Task { source: i, row_chunk: rc as u64 });
        }
    }
    let shared = SharedOut { ptr: out.as_mut_ptr(), len: out.len() };
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let error: Mutex<Option<ReadError>> = Mutex::new(None);
    let lanes = threads.clamp(1, tasks.len().max(1));
    let work = || {
        let mut buf: Vec<f32> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let t = next.fetch_add(1, Ordering::Relaxed);
            let Some(task) = tasks.get(t) else { break };
            let src = &sources[task.source];
            if let Err(e) = read_chunk(root, src, &runs[task.source], task.row_chunk, r0, r1, ncols, &shared, &mut buf) {
                stop.store(true, Ordering::Relaxed);
                error.lock().expect("error slot").get_or_insert(e);
                break;
            }
        }
    };
    if lanes == 1 {
        work();
    } else {
        std::thread::scope(|scope| {
            for _ in 1..lanes {
                scope.spawn(work);
            }
            work();
        });
    }
    match error.into_inner().expect("error slot") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Read, verify and scatter one chunk file.
#[allow(clippy::too_many_arguments)]
fn read_chunk(
    root: &Path, src: &ChunkColumns, runs: &[Run], row_chunk: u64, r0: usize, r1: usize, ncols: usize, out: &SharedOut,
    buf: &mut Vec<f32>,
) -> Result<(), ReadError> {
    let key = format!("{}/c/{}/{}", src.array, row_chunk, src.col_chunk);
    let path: PathBuf = root.join(&key);
    let corrupt = |why: String| ReadError::Corrupt { key: key.clone(), why };
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(ReadError::Missing { key }),
        Err(e) => return Err(corrupt(format!("cannot open: {e}"))),
    };
    let width = src.chunk_cols;
    let data_bytes = src.chunk_rows * width * 4;
    let size = file.metadata().map_err(|e| corrupt(format!("cannot stat: {e}")))?.len();
    if size != (data_bytes + 4) as u64 {
        return Err(corrupt(format!("{size} bytes where a ({}, {width}) float32 chunk and its checksum take {}", src.chunk_rows, data_bytes + 4)));
    }
    // The chunk's rows that the block wants, as chunk-local row numbers.
    let c0 = row_chunk as usize * src.chunk_rows;
    let (want0, want1) = (r0.max(c0) - c0, r1.min(c0 + src.chunk_rows) - c0);
    let full_width = runs.len() == 1 && runs[0].len == width;
    let seg_rows = (SEGMENT_BYTES / (width * 4)).max(1);
    buf.resize(seg_rows * width, 0.0);
    let mut crc = 0u32;
    let mut row = 0;
    while row < src.chunk_rows {
        let n = seg_rows.min(src.chunk_rows - row);
        let seg = &mut buf[..n * width];
        // SAFETY: f32 has no invalid bit patterns and u8 has alignment 1.
        let bytes = unsafe { std::slice::from_raw_parts_mut(seg.as_mut_ptr().cast::<u8>(), n * width * 4) };
        file.read_exact(bytes).map_err(|e| corrupt(format!("read failed: {e}")))?;
        crc = crc32c::crc32c_append(crc, bytes);
        if cfg!(target_endian = "big") {
            for x in seg.iter_mut() {
                *x = f32::from_bits(u32::from_le(x.to_bits()));
            }
        }
        // Copy the wanted rows of this segment.
        let (a, b) = (want0.max(row), want1.min(row + n));
        if a < b && full_width && ncols == width {
            // The block is exactly this chunk's columns, in order: one copy of the wanted rows.
            let seg = &buf[..n * width];
            let wanted = &seg[(a - row) * width..(b - row) * width];
            let at = (c0 + a - r0) * ncols;
            debug_assert!(at + wanted.len() <= out.len);
            // SAFETY: in bounds, and no other task writes these rows (see `SharedOut`).
            unsafe { std::ptr::copy_nonoverlapping(wanted.as_ptr(), out.ptr.add(at), wanted.len()) };
            if has_nan(wanted) {
                let i = wanted.iter().position(|x| x.is_nan()).unwrap_or(0);
                return Err(ReadError::Nan { key, column: i % width, row: c0 + a + i / width });
            }
        } else if a < b {
            let seg = &buf[..n * width];
            for local in a..b {
                let line = &seg[(local - row) * width..(local - row + 1) * width];
                let dst_row = c0 + local - r0;
                for run in runs {
                    let values = &line[run.src..run.src + run.len];
                    if !full_width && has_nan(values) {
                        let j = values.iter().position(|x| x.is_nan()).unwrap_or(0);
                        return Err(ReadError::Nan { key, column: run.dst + j, row: c0 + local });
                    }
                    let at = dst_row * ncols + run.dst;
                    debug_assert!(at + run.len <= out.len);
                    // SAFETY: in bounds (dst_row < r1 - r0, run.dst + run.len <= ncols), and no other
                    // task writes these cells (see `SharedOut`).
                    unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), out.ptr.add(at), run.len) };
                }
            }
            if full_width {
                let wanted = &seg[(a - row) * width..(b - row) * width];
                if has_nan(wanted) {
                    let i = wanted.iter().position(|x| x.is_nan()).unwrap_or(0);
                    return Err(ReadError::Nan { key, column: runs[0].dst + i % width, row: c0 + a + i / width });
                }
            }
        }
        row += n;
    }
    let mut stored = [0u8; 4];
    file.read_exact(&mut stored).map_err(|e| corrupt(format!("read failed: {e}")))?;
    let stored = u32::from_le_bytes(stored);
    if stored != crc {
        return Err(corrupt(format!("stored crc32c {stored:#010x}, computed {crc:#010x}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_chunk(root: &Path, key: &str, values: &[f32]) {
        let path = root.join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        std::fs::File::create(path).unwrap().write_all(&bytes).unwrap();
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("daunce-read-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A (n, w) array with chunks (rows, w), value(i, j) = i * 100 + j; edge chunks padded with NaN.
    fn packed(root: &Path, n: usize, rows: usize, w: usize, group: u64) {
        for rc in 0..n.div_ceil(rows) {
            let vals: Vec<f32> = (0..rows * w)
                .map(|x| {
                    let (i, j) = (rc * rows + x / w, x % w);
                    if i < n { (i * 100 + j) as f32 + group as f32 * 0.5 } else { f32::NAN }
                })
                .collect();
            write_chunk(root, &format!("a/c/{rc}/{group}"), &vals);
        }
    }

    fn src(col_chunk: u64, rows: usize, w: usize, pairs: Vec<(usize, usize)>) -> ChunkColumns {
        ChunkColumns { array: "a".into(), chunk_rows: rows, chunk_cols: w, col_chunk, pairs }
    }

    #[test]
    fn assembles_columns_in_any_order_and_rows_across_chunks() {
        let root = tempdir("assemble");
        packed(&root, 23, 5, 4, 0);
        packed(&root, 23, 5, 4, 1);
        let sources = [src(1, 5, 4, vec![(3, 0), (0, 2)]), src(0, 5, 4, vec![(1, 1), (2, 3), (3, 4)])];
        for threads in [1, 3] {
            let out = read_block(&root, &sources, 3, 22, 5, threads).unwrap();
            for (r, row) in out.chunks_exact(5).enumerate() {
                let i = (3 + r) as f32 * 100.0;
                assert_eq!(row, [i + 3.5, i + 1.0, i + 0.5, i + 2.0, i + 3.0]);
            }
        }
    }

    #[test]
    fn whole_width_and_one_wide() {
        let root = tempdir("whole");
        packed(&root, 10, 4, 3, 0);
        let out = read_block(&root, &[src(0, 4, 3, vec![(0, 0), (1, 1), (2, 2)])], 0, 10, 3, 2).unwrap();
        assert_eq!(out, (0..30).map(|x| ((x / 3) * 100 + x % 3) as f32).collect::<Vec<_>>());
        let one = tempdir("one");
        packed(&one, 10, 4, 1, 7);
        let out = read_block(&one, &[src(7, 4, 1, vec![(0, 0)])], 2, 9, 1, 2).unwrap();
        assert_eq!(out, (2..9).map(|i| (i * 100) as f32 + 3.5).collect::<Vec<_>>());
    }

    #[test]
    fn damage_is_named() {
        let root = tempdir("damage");
        packed(&root, 10, 4, 2, 0);
        let s = [src(0, 4, 2, vec![(0, 0), (1, 1)])];
        // The edge chunk's NaN padding is never copied.
        assert!(read_block(&root, &s, 0, 10, 2, 1).is_ok());
        let key = "a/c/1/0";
        let path = root.join(key);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[9] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let e = read_block(&root, &s, 0, 10, 2, 2).unwrap_err();
        assert_eq!((e.kind(), e.key()), ("corrupt", Some(key)));
        // Rows outside the damaged chunk still read.
        assert!(read_block(&root, &s, 0, 4, 2, 2).is_ok());
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(read_block(&root, &s, 5, 6, 2, 1).unwrap_err().kind(), "corrupt");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(read_block(&root, &s, 5, 6, 2, 1).unwrap_err(), ReadError::Missing { key: key.into() });
        // A NaN inside the wanted rows is damage, on the whole-width and the column-subset paths.
        let mut vals: Vec<f32> = (0..8).map(|x| x as f32).collect();
        vals[5] = f32::NAN; // row 2, column 1
        write_chunk(&root, key, &vals);
        let e = read_block(&root, &s, 4, 10, 2, 1).unwrap_err();
        assert_eq!(e, ReadError::Nan { key: key.into(), column: 1, row: 6 });
        let e = read_block(&root, &[src(0, 4, 2, vec![(1, 0)])], 4, 10, 1, 1).unwrap_err();
        assert_eq!(e, ReadError::Nan { key: key.into(), column: 0, row: 6 });
        assert!(read_block(&root, &[src(0, 4, 2, vec![(0, 0)])], 4, 10, 1, 1).is_ok());
    }

    #[test]
    fn refuses_inconsistent_requests() {
        let root = tempdir("invalid");
        let e = read_block(&root, &[src(0, 4, 2, vec![(0, 0), (1, 0)])], 0, 4, 2, 1).unwrap_err();
        assert_eq!(e.kind(), "invalid");
        let e = read_block(&root, &[src(0, 4, 2, vec![(0, 1)])], 0, 4, 2, 1).unwrap_err();
        assert_eq!(e.kind(), "invalid");
    }
}
