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

use crate::chunks::{ChunkBytes, LocalDir};

/// Bytes streamed per step of one chunk file (whole rows; at least one row).
const SEGMENT_BYTES: usize = 1 << 20;
/// About how many bytes of chunks an object-store scan keeps in flight, and in how many GETs at least
/// and at most: 64 MB hides a loopback or same-region round trip behind the scoring of the chunks
/// before it, at a few 16 MB packed chunks; 1 MB per-column chunks get more GETs at once.
const PREFETCH_BYTES: usize = 64 << 20;
const MIN_AHEAD: usize = 4;
const MAX_AHEAD: usize = 64;

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
    /// The object store did not answer a GET (after its client's retries); the chunk may be fine.
    Fetch { key: String, why: String },
}

impl ReadError {
    /// A short name of the kind: "invalid", "missing", "corrupt" or "nan".
    pub fn kind(&self) -> &'static str {
        match self {
            ReadError::Invalid(_) => "invalid",
            ReadError::Missing { .. } => "missing",
            ReadError::Corrupt { .. } => "corrupt",
            ReadError::Nan { .. } => "nan",
            ReadError::Fetch { .. } => "fetch",
        }
    }

    /// The chunk key, where the error is about one chunk.
    pub fn key(&self) -> Option<&str> {
        match self {
            ReadError::Invalid(_) => None,
            ReadError::Missing { key } | ReadError::Corrupt { key, .. } | ReadError::Nan { key, .. } | ReadError::Fetch { key, .. } => {
                Some(key)
            }
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
            ReadError::Fetch { key, why } => write!(f, "chunk '{key}' could not be fetched ({why})"),
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

/// The checks every read does before touching a file: a forward row range, non-empty chunk shapes,
/// and every destination column 0..ncols named by exactly one pair of one source.
fn check_request(sources: &[ChunkColumns], r0: usize, r1: usize, ncols: usize) -> Result<(), ReadError> {
    if r1 < r0 {
        return Err(ReadError::Invalid(format!("row range {r0}:{r1} is reversed")));
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
    Ok(())
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
    if out.len() != r1.saturating_sub(r0) * ncols {
        return Err(ReadError::Invalid(format!("the output holds {} values, not ({} rows) x ({ncols} columns)", out.len(), r1.saturating_sub(r0))));
    }
    check_request(sources, r0, r1, ncols)?;
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
    let (mut file, key) = open_chunk(root, src, row_chunk)?;
    let width = src.chunk_cols;
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
        read_values(&mut file, &key, &mut buf[..n * width], &mut crc)?;
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
    check_crc(&mut file, &key, crc)
}

/// A chunk file opened and its size checked (the full chunk shape of float32 plus the checksum).
fn open_chunk(root: &Path, src: &ChunkColumns, row_chunk: u64) -> Result<(File, String), ReadError> {
    let key = chunk_key(src, row_chunk);
    let path: PathBuf = root.join(&key);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(ReadError::Missing { key }),
        Err(e) => return Err(ReadError::Corrupt { key, why: format!("cannot open: {e}") }),
    };
    let size = file.metadata().map_err(|e| ReadError::Corrupt { key: key.clone(), why: format!("cannot stat: {e}") })?.len();
    check_size(src, &key, size)?;
    Ok((file, key))
}

/// The key of a source's chunk in row chunk `row_chunk`, relative to the store root.
fn chunk_key(src: &ChunkColumns, row_chunk: u64) -> String {
    format!("{}/c/{}/{}", src.array, row_chunk, src.col_chunk)
}

/// A chunk's size against the full chunk shape of float32 plus the checksum.
fn check_size(src: &ChunkColumns, key: &str, size: u64) -> Result<(), ReadError> {
    let data_bytes = src.chunk_rows * src.chunk_cols * 4;
    let corrupt = |why: String| ReadError::Corrupt { key: key.to_string(), why };
    if size != (data_bytes + 4) as u64 {
        return Err(corrupt(format!(
            "{size} bytes where a ({}, {}) float32 chunk and its checksum take {}",
            src.chunk_rows,
            src.chunk_cols,
            data_bytes + 4
        )));
    }
    Ok(())
}

/// Read `values.len()` float32 of a chunk (little endian as stored) and fold them into `crc`.
fn read_values(file: &mut impl Read, key: &str, values: &mut [f32], crc: &mut u32) -> Result<(), ReadError> {
    // SAFETY: f32 has no invalid bit patterns and u8 has alignment 1.
    let bytes = unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), values.len() * 4) };
    file.read_exact(bytes).map_err(|e| ReadError::Corrupt { key: key.to_string(), why: format!("read failed: {e}") })?;
    *crc = crc32c::crc32c_append(*crc, bytes);
    if cfg!(target_endian = "big") {
        for x in values.iter_mut() {
            *x = f32::from_bits(u32::from_le(x.to_bits()));
        }
    }
    Ok(())
}

/// The chunk's stored checksum (its last 4 bytes, read after the data) against the computed one.
fn check_crc(file: &mut impl Read, key: &str, crc: u32) -> Result<(), ReadError> {
    let corrupt = |why: String| ReadError::Corrupt { key: key.to_string(), why };
    let mut stored = [0u8; 4];
    file.read_exact(&mut stored).map_err(|e| corrupt(format!("read failed: {e}")))?;
    let stored = u32::from_le_bytes(stored);
    if stored != crc {
        return Err(corrupt(format!("stored crc32c {stored:#010x}, computed {crc:#010x}")));
    }
    Ok(())
}

/// Rows `r0 .. r1` of the block that [`read_block`] would assemble from `sources`, handed to `visit` a
/// segment at a time instead of written out: `visit(state, first_row, rows)` gets row-major
/// (R, ncols) rows of about [`SEGMENT_BYTES`] while they are in cache, so a consumer (the scoring
/// kernel) reads them from L2 rather than a block from DRAM: the fused read-and-score pass.
///
/// Runs on `states.len()` threads (at most one per row chunk), thread i passing `&mut states[i]`; the
/// segments of one row chunk come in order, row chunks in any order, every wanted row exactly once.
/// All sources must share one chunk height. Checksums, sizes and NaN are checked as by
/// [`read_block`], but a chunk's checksum only after its segments were visited: after an error the
/// states hold rows that may be damaged and must be discarded.
pub fn visit_segments<S, F>(
    root: &Path, sources: &[ChunkColumns], r0: usize, r1: usize, ncols: usize, states: &mut [S], visit: F,
) -> Result<(), ReadError>
where
    S: Send,
    F: Fn(&mut S, usize, &[f32]) + Sync,
{
    visit_chunks(&LocalDir(root.to_path_buf()), sources, r0, r1, ncols, states, visit)
}

/// [`read_block_into`] from any [`ChunkBytes`] (an object store), on `threads` threads; the sources must
/// share one chunk height (see [`visit_chunks`]).
pub fn read_block_from(
    store: &dyn ChunkBytes, sources: &[ChunkColumns], r0: usize, r1: usize, ncols: usize, threads: usize, out: &mut [f32],
) -> Result<(), ReadError> {
    if out.len() != r1.saturating_sub(r0) * ncols {
        return Err(ReadError::Invalid(format!("the output holds {} values, not ({} rows) x ({ncols} columns)", out.len(), r1.saturating_sub(r0))));
    }
    let shared = &SharedOut { ptr: out.as_mut_ptr(), len: out.len() };
    let mut lanes = vec![(); threads.max(1)];
    visit_chunks(store, sources, r0, r1, ncols, &mut lanes, |_, row, rows| {
        let at = (row - r0) * ncols;
        assert!(at + rows.len() <= shared.len);
        // SAFETY: in bounds (checked), and every row is visited exactly once (`visit_chunks`).
        unsafe { std::ptr::copy_nonoverlapping(rows.as_ptr(), shared.ptr.add(at), rows.len()) };
    })
}

/// [`visit_segments`] over the chunks of any [`ChunkBytes`]: the row chunks are asked for in order, so an
/// object store fetches ahead (about [`PREFETCH_BYTES`] in flight) while the threads verify and score
/// the chunks that have arrived, each taking the next row chunk's objects.
pub fn visit_chunks<S, F>(
    store: &dyn ChunkBytes, sources: &[ChunkColumns], r0: usize, r1: usize, ncols: usize, states: &mut [S], visit: F,
) -> Result<(), ReadError>
where
    S: Send,
    F: Fn(&mut S, usize, &[f32]) + Sync,
{
    check_request(sources, r0, r1, ncols)?;
    let sources: Vec<&ChunkColumns> = sources.iter().filter(|s| !s.pairs.is_empty()).collect();
    let Some(first) = sources.first() else { return Ok(()) };
    let chunk_rows = first.chunk_rows;
    if let Some(s) = sources.iter().find(|s| s.chunk_rows != chunk_rows) {
        return Err(ReadError::Invalid(format!(
            "a fused pass needs one chunk height; {} has {} rows per chunk, {} has {chunk_rows}",
            s.array, s.chunk_rows, first.array
        )));
    }
    if r0 == r1 || states.is_empty() {
        return Ok(());
    }
    let runs: Vec<Vec<Run>> = sources.iter().map(|s| runs_of(&s.pairs)).collect();
    // One source holding every block column in order: its segment is the block's, no scatter.
    let direct = sources.len() == 1 && runs[0].len() == 1 && runs[0][0].len == ncols && runs[0][0].src == 0 && runs[0][0].dst == 0;
    let owner: Vec<usize> = {
        let mut owner = vec![0; ncols];
        for (i, s) in sources.iter().enumerate() {
            for &(_, d) in &s.pairs {
                owner[d] = i;
            }
        }
        owner
    };
    let seg_rows = (SEGMENT_BYTES / (ncols * 4)).max(1);
    let chunks: Vec<usize> = ((r0 / chunk_rows)..=((r1 - 1) / chunk_rows)).collect();
    let keys: Vec<String> = chunks.iter().flat_map(|&rc| sources.iter().map(move |s| chunk_key(s, rc as u64))).collect();
    let largest = sources.iter().map(|s| s.chunk_rows * s.chunk_cols * 4 + 4).max().unwrap_or(1);
    let ahead = (PREFETCH_BYTES / largest).clamp(MIN_AHEAD, MAX_AHEAD).max(sources.len());
    // The chunks in key order and the index of the next row chunk; a thread takes one row chunk's
    // objects (one per source) at a time.
    let queue = Mutex::new((store.fetch(keys, ahead), 0usize));
    let stop = AtomicBool::new(false);
    let error: Mutex<Option<ReadError>> = Mutex::new(None);
    let lanes = states.len().min(chunks.len());
    let work = |state: &mut S| {
        let mut bufs: Vec<Vec<f32>> = sources.iter().map(|s| vec![0.0; seg_rows * s.chunk_cols]).collect();
        let mut seg: Vec<f32> = if direct { Vec::new() } else { vec![0.0; seg_rows * ncols] };
        while !stop.load(Ordering::Relaxed) {
            let result = (|| -> Result<bool, ReadError> {
                let (rc, mut files) = {
                    let mut queue = queue.lock().expect("chunk queue");
                    let Some(&rc) = chunks.get(queue.1) else { return Ok(false) };
                    queue.1 += 1;
                    let mut files = Vec::with_capacity(sources.len());
                    for s in &sources {
                        let key = chunk_key(s, rc as u64);
                        let chunk = match queue.0.next() {
                            Some(Ok(chunk)) => chunk,
                            Some(Err(e)) => {
                                // Recorded before the queue is let go: the next thread finds it ended.
                                stop.store(true, Ordering::Relaxed);
                                error.lock().expect("error slot").get_or_insert(e.clone());
                                return Err(e);
                            }
                            None => return Err(ReadError::Invalid(format!("the chunk store ended before {key}"))),
                        };
                        let size = chunk.len().map_err(|e| ReadError::Corrupt { key: key.clone(), why: format!("cannot stat: {e}") })?;
                        check_size(s, &key, size)?;
                        files.push((chunk, key));
                    }
                    (rc, files)
                };
                let mut crcs = vec![0u32; sources.len()];
                let c0 = rc * chunk_rows;
                let (want0, want1) = (r0.max(c0) - c0, r1.min(c0 + chunk_rows) - c0);
                let mut row = 0;
                while row < chunk_rows {
                    let n = seg_rows.min(chunk_rows - row);
                    for (i, s) in sources.iter().enumerate() {
                        let (file, key) = &mut files[i];
                        read_values(file, key, &mut bufs[i][..n * s.chunk_cols], &mut crcs[i])?;
                    }
                    let (a, b) = (want0.max(row), want1.min(row + n));
                    if a < b {
                        let rows: &[f32] = if direct {
                            &bufs[0][(a - row) * ncols..(b - row) * ncols]
                        } else {
                            for (i, s) in sources.iter().enumerate() {
                                let width = s.chunk_cols;
                                for local in a..b {
                                    let line = &bufs[i][(local - row) * width..(local - row + 1) * width];
                                    let dst = &mut seg[(local - a) * ncols..(local - a + 1) * ncols];
                                    for run in &runs[i] {
                                        dst[run.dst..run.dst + run.len].copy_from_slice(&line[run.src..run.src + run.len]);
                                    }
                                }
                            }
                            &seg[..(b - a) * ncols]
                        };
                        if has_nan(rows) {
                            let at = rows.iter().position(|x| x.is_nan()).unwrap_or(0);
                            let column = at % ncols;
                            return Err(ReadError::Nan { key: files[owner[column]].1.clone(), column, row: c0 + a + at / ncols });
                        }
                        visit(state, c0 + a, rows);
                    }
                    row += n;
                }
                for ((file, key), crc) in files.iter_mut().zip(crcs) {
                    check_crc(file, key, crc)?;
                }
                Ok(true)
            })();
            match result {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    error.lock().expect("error slot").get_or_insert(e);
                    break;
                }
            }
        }
    };
    match &mut states[..lanes] {
        [only] => work(only),
        [first, rest @ ..] => std::thread::scope(|scope| {
            let work = &work;
            for state in rest.iter_mut() {
                scope.spawn(move || work(state));
            }
            work(first);
        }),
        [] => {}
    }
    match error.into_inner().expect("error slot") {
        Some(e) => Err(e),
        None => Ok(()),
    }
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

    /// Every row `visit_segments` hands out, gathered into a block (per-thread states, then merged).
    fn visited(root: &Path, sources: &[ChunkColumns], r0: usize, r1: usize, ncols: usize, threads: usize) -> Result<Vec<f32>, ReadError> {
        let mut states: Vec<Vec<(usize, Vec<f32>)>> = (0..threads).map(|_| Vec::new()).collect();
        visit_segments(root, sources, r0, r1, ncols, &mut states, |state, row, rows| state.push((row, rows.to_vec())))?;
        let mut out = vec![f32::NAN; (r1 - r0) * ncols];
        let mut seen = vec![0u32; r1 - r0];
        for (row, rows) in states.into_iter().flatten() {
            out[(row - r0) * ncols..(row - r0) * ncols + rows.len()].copy_from_slice(&rows);
            for r in 0..rows.len() / ncols {
                seen[row - r0 + r] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "every row exactly once: {seen:?}");
        Ok(out)
    }

    #[test]
    fn segments_hold_the_rows_read_block_assembles() {
        let root = tempdir("segments");
        packed(&root, 23, 5, 4, 0);
        packed(&root, 23, 5, 4, 1);
        let scattered = [src(1, 5, 4, vec![(3, 0), (0, 2)]), src(0, 5, 4, vec![(1, 1), (2, 3), (3, 4)])];
        let direct = [src(0, 5, 4, vec![(0, 0), (1, 1), (2, 2), (3, 3)])];
        for (sources, ncols) in [(&scattered[..], 5), (&direct[..], 4)] {
            for (r0, r1) in [(0, 23), (3, 22), (7, 8), (5, 10)] {
                for threads in [1, 2, 3] {
                    let want = read_block(&root, sources, r0, r1, ncols, 1).unwrap();
                    assert_eq!(visited(&root, sources, r0, r1, ncols, threads).unwrap(), want);
                }
            }
        }
    }

    #[test]
    fn segments_name_damage_and_refuse_mixed_chunk_heights() {
        let root = tempdir("segments-damage");
        packed(&root, 10, 4, 2, 0);
        let s = [src(0, 4, 2, vec![(0, 0), (1, 1)])];
        let key = "a/c/1/0";
        let mut bytes = std::fs::read(root.join(key)).unwrap();
        bytes[9] ^= 0x40;
        std::fs::write(root.join(key), &bytes).unwrap();
        let e = visited(&root, &s, 0, 10, 2, 2).unwrap_err();
        assert_eq!((e.kind(), e.key()), ("corrupt", Some(key)));
        std::fs::remove_file(root.join(key)).unwrap();
        assert_eq!(visited(&root, &s, 0, 10, 2, 1).unwrap_err(), ReadError::Missing { key: key.into() });
        let mut vals: Vec<f32> = (0..8).map(|x| x as f32).collect();
        vals[5] = f32::NAN; // row 2 of the chunk, column 1
        write_chunk(&root, key, &vals);
        assert_eq!(visited(&root, &s, 4, 10, 2, 1).unwrap_err(), ReadError::Nan { key: key.into(), column: 1, row: 6 });
        let mixed = [src(0, 4, 2, vec![(0, 0)]), src(0, 5, 2, vec![(1, 1)])];
        assert_eq!(visited(&root, &mixed, 0, 4, 2, 1).unwrap_err().kind(), "invalid");
    }

    #[test]
    fn fused_scan_ranks_as_the_block_kernel() {
        use crate::topk::{Measure, TopKAccumulator};
        let root = tempdir("fused");
        let (n, rows, w): (usize, usize, usize) = (3000, 512, 8);
        // Pseudo-random losses (no two rows alike), two column chunks of width 8.
        for group in 0..2u64 {
            for rc in 0..n.div_ceil(rows) {
                let vals: Vec<f32> = (0..rows * w)
                    .map(|x| {
                        let (i, j) = ((rc * rows + x / w) as u64, (x % w) as u64 + 8 * group);
                        (((i * 2654435761 + j * 40503 + i * j * 97) % 10007) as f32) / 1000.0
                    })
                    .collect();
                write_chunk(&root, &format!("a/c/{rc}/{group}"), &vals);
            }
        }
        let sources = [src(0, rows, w, (0..w).map(|j| (j, j)).collect()), src(1, rows, w, (0..w).map(|j| (j, w + j)).collect())];
        let q: Vec<f32> = (0..3 * 16).map(|x| ((x * 7919) % 13) as f32 - 6.0 + (x as f32) * 0.01).collect();
        for measure in [Measure::Cov, Measure::Corr] {
            for (r0, r1) in [(0, n), (10, 2990)] {
                let block = read_block(&root, &sources, r0, r1, 16, 2).unwrap();
                let mut want = TopKAccumulator::new(&q, 16, 7, measure, true, true, false).unwrap();
                want.push_block(r0 as u64, &block).unwrap();
                let mut got = TopKAccumulator::new(&q, 16, 7, measure, true, true, false).unwrap();
                got.push_with((r1 - r0) as u64, |lanes, fold| visit_segments(&root, &sources, r0, r1, 16, lanes, fold)).unwrap();
                assert_eq!(got.rows_seen(), (r1 - r0) as u64);
                let (got, want) = (got.finish().unwrap(), want.finish().unwrap());
                for (g, w) in [(got.0.unwrap(), want.0.unwrap()), (got.1.unwrap(), want.1.unwrap())] {
                    assert_eq!(g.indices, w.indices);
                    for (a, b) in g.scores.iter().zip(&w.scores) {
                        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn an_object_store_reads_and_scans_as_the_local_files() {
        let root = tempdir("object");
        packed(&root, 23, 5, 4, 0);
        packed(&root, 23, 5, 4, 1);
        let objects: Vec<(String, Vec<u8>)> = (0..5)
            .flat_map(|rc| (0..2).map(move |g| format!("a/c/{rc}/{g}")))
            .map(|key| (key.clone(), std::fs::read(root.join(&key)).unwrap()))
            .collect();
        let client = crate::chunks::tests::in_memory("s3-prefix/s.zarr", objects);
        let scattered = [src(1, 5, 4, vec![(3, 0), (0, 2)]), src(0, 5, 4, vec![(1, 1), (2, 3), (3, 4)])];
        let direct = [src(0, 5, 4, vec![(0, 0), (1, 1), (2, 2), (3, 3)])];
        for (sources, ncols) in [(&scattered[..], 5), (&direct[..], 4)] {
            for (r0, r1) in [(0, 23), (3, 22), (7, 8)] {
                let want = read_block(&root, sources, r0, r1, ncols, 1).unwrap();
                for threads in [1, 3] {
                    let mut got = vec![f32::NAN; want.len()];
                    read_block_from(&client, sources, r0, r1, ncols, threads, &mut got).unwrap();
                    assert_eq!(got, want);
                }
            }
        }
        // Damage is named as on local files: a flipped byte, a missing object.
        let mut bad = std::fs::read(root.join("a/c/2/0")).unwrap();
        bad[9] ^= 0x40;
        let client = crate::chunks::tests::in_memory("p", vec![("a/c/0/0".into(), std::fs::read(root.join("a/c/0/0")).unwrap()), ("a/c/2/0".into(), bad)]);
        let mut out = vec![0.0; 5 * 4];
        let e = read_block_from(&client, &direct, 0, 5, 4, 1, &mut out).map(|_| ()).and_then(|_| read_block_from(&client, &direct, 10, 15, 4, 2, &mut out)).unwrap_err();
        assert_eq!((e.kind(), e.key()), ("corrupt", Some("a/c/2/0")));
        assert_eq!(read_block_from(&client, &direct, 5, 10, 4, 2, &mut out).unwrap_err(), ReadError::Missing { key: "a/c/1/0".into() });
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
