//! Thin PyO3 wrappers: take read-only numpy views, release the GIL, return owned numpy arrays.

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray2, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use std::collections::HashMap;
use std::sync::Arc;

use crate::chunks::{ChunkBytes, LocalDir, ObjectStoreChunks};
use crate::draws;
use crate::read;
use crate::stats;
use crate::topk::{Measure, SideResult, TopKAccumulator, TopKError};
use crate::vlen;

fn contiguous<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    a: &'a numpy::PyReadonlyArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| PyValueError::new_err(format!("{what} must be a C-contiguous float32 array")))
}

fn to_py_err(e: TopKError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

pyo3::create_exception!(
    _kernel,
    ChunkReadError,
    PyValueError,
    "A chunk the reader needed is missing, has a failed checksum or wrong size, or holds NaN; args: (kind, key, message)."
);

/// Which chunks make up a block: for each block column, the array column it comes from, grouped by
/// chunk file (one `read::ChunkColumns` per array and column chunk). Built once per scan.
#[pyclass(module = "daunce_store._kernel", name = "ChunkPlan")]
#[derive(Default)]
struct PyChunkPlan {
    sources: Vec<read::ChunkColumns>,
}

#[pymethods]
impl PyChunkPlan {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Block column `block_column` is column `column` of the array at `array` (its path in the store),
    /// whose chunks are (chunk_rows, chunk_cols) float32 + crc32c.
    fn add_column(&mut self, array: String, chunk_rows: usize, chunk_cols: usize, column: u64, block_column: usize) -> PyResult<()> {
        if chunk_rows == 0 || chunk_cols == 0 {
            return Err(PyValueError::new_err(format!("array {array} has an empty chunk shape ({chunk_rows}, {chunk_cols})")));
        }
        let col_chunk = column / chunk_cols as u64;
        let pair = ((column % chunk_cols as u64) as usize, block_column);
        match self.sources.iter_mut().find(|s| s.array == array && s.col_chunk == col_chunk) {
            Some(s) if (s.chunk_rows, s.chunk_cols) != (chunk_rows, chunk_cols) => {
                return Err(PyValueError::new_err(format!("array {array} was added with chunks ({}, {})", s.chunk_rows, s.chunk_cols)));
            }
            Some(s) => s.pairs.push(pair),
            None => self.sources.push(read::ChunkColumns { array, chunk_rows, chunk_cols, col_chunk, pairs: vec![pair] }),
        }
        Ok(())
    }

    /// The chunk height of each chunk file of a row chunk (one entry per array and column chunk).
    #[getter]
    fn chunk_heights(&self) -> Vec<usize> {
        self.sources.iter().map(|s| s.chunk_rows).collect()
    }

    /// The block's columns (as many as were added).
    #[getter]
    fn ncols(&self) -> usize {
        self.sources.iter().map(|s| s.pairs.len()).sum()
    }
}

/// A client of a store on an object store, for `read_block` and `push_chunks` (see `chunks.rs`).
#[pyclass(module = "daunce_store._kernel", name = "ObjectStoreChunks", frozen)]
struct PyObjectStoreChunks {
    inner: Arc<ObjectStoreChunks>,
}

#[pymethods]
impl PyObjectStoreChunks {
    #[new]
    fn new(url: &str, options: HashMap<String, String>) -> PyResult<Self> {
        let inner = ObjectStoreChunks::new(url, options.into_iter().collect()).map_err(PyValueError::new_err)?;
        Ok(PyObjectStoreChunks { inner: Arc::new(inner) })
    }

    /// How many chunk GETs this client has sent.
    #[getter]
    fn gets(&self) -> u64 {
        self.inner.gets()
    }
}

/// Where `read_block` and `push_chunks` read chunks: a local store's root or an object-store client.
enum Where {
    Local(std::path::PathBuf),
    Object(Arc<ObjectStoreChunks>),
}

impl Where {
    fn extract(source: &Bound<'_, PyAny>) -> PyResult<Self> {
        if let Ok(client) = source.cast::<PyObjectStoreChunks>() {
            return Ok(Where::Object(client.get().inner.clone()));
        }
        source.extract::<std::path::PathBuf>().map(Where::Local).map_err(|_| {
            PyValueError::new_err(format!("chunks are read from a local store's root path or an ObjectStoreChunks, not {}", source.get_type()))
        })
    }
}

/// Fill `out`, a C-contiguous float32 (r1 - r0, ncols) array, with rows `r0 .. r1` of the block
/// `plan` assembles from the Zarr chunks under `source` (a local root: `read::read_block_into`; an
/// object store: `read::read_block_from`), checksums verified, on `threads` threads (default: the
/// kernel's lanes), the GIL released.
#[pyfunction]
#[pyo3(signature = (source, plan, r0, r1, out, threads = None))]
fn read_block(
    py: Python<'_>, source: &Bound<'_, PyAny>, plan: PyRef<'_, PyChunkPlan>, r0: usize, r1: usize, mut out: PyReadwriteArray2<'_, f32>,
    threads: Option<usize>,
) -> PyResult<()> {
    let source = Where::extract(source)?;
    let sources = plan.sources.clone();
    let threads = threads.unwrap_or_else(crate::topk::num_lanes);
    let shape = out.shape().to_vec();
    if shape[0] != r1.saturating_sub(r0) {
        return Err(PyValueError::new_err(format!("out has {} rows, not the {} of rows {r0}:{r1}", shape[0], r1.saturating_sub(r0))));
    }
    let ncols = shape[1];
    let data = out.as_slice_mut().map_err(|_| PyValueError::new_err("out must be a C-contiguous float32 array"))?;
    py.detach(|| match &source {
        Where::Local(root) => read::read_block_into(root, &sources, r0, r1, ncols, threads, data),
        Where::Object(client) => read::read_block_from(client.as_ref(), &sources, r0, r1, ncols, threads, data),
    })
    .map_err(read_error)
}

fn read_error(e: read::ReadError) -> PyErr {
    match e {
        read::ReadError::Invalid(why) => PyValueError::new_err(why),
        e => ChunkReadError::new_err((e.kind(), e.key().unwrap_or_default().to_string(), e.to_string())),
    }
}

/// Per-row variance (ddof = 1) of a C-contiguous float32 (R, K) block.
/// The strings at `positions` of a decoded Zarr `vlen-utf8` chunk (see `vlen::take`), building only those.
#[pyfunction]
fn vlen_utf8_take(data: &[u8], positions: Vec<usize>) -> PyResult<Vec<String>> {
    vlen::take(data, &positions)
        .map(|items| items.into_iter().map(str::to_owned).collect())
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

#[pyfunction]
fn row_variance<'py>(py: Python<'py>, block: PyReadonlyArray2<'py, f32>) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let k = block.shape()[1];
    let data = contiguous(&block, "block")?;
    let out = py.detach(|| stats::row_variance(data, k));
    Ok(out.into_pyarray(py))
}

/// SplitMix64 uniforms U[0, 1) of rows `r0 .. r0 + count` of stream `key` (the perturbation draws).
#[pyfunction]
fn splitmix64_uniforms<'py>(py: Python<'py>, key: u64, r0: u64, count: usize) -> Bound<'py, PyArray1<f64>> {
    py.detach(|| draws::uniforms(key, r0, count)).into_pyarray(py)
}

/// The linearized perturbation weights of rows `r0 .. r0 + count` and how many are in the subset
/// (see `draws::linear_weights`).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn draw_linear_weights<'py>(
    py: Python<'py>, key_subset: u64, key_xi: u64, ratio: f64, base: f64, rho: f64, shift: f64, blackbox: bool, r0: u64, count: usize,
) -> (Bound<'py, PyArray1<f64>>, u64) {
    let col = draws::ColumnDraw { key_subset, key_xi, ratio, base, rho, shift, blackbox };
    let (w, members) = py.detach(|| {
        let mut w = vec![0.0; count];
        let members = draws::linear_weights(&col, r0, &mut w);
        (w, members)
    });
    (w.into_pyarray(py), members)
}

type WeightsBlock<'py> = (Bound<'py, PyArray2<f32>>, Bound<'py, PyArray1<u64>>);

/// The weights of rows `r0 .. r0 + rows` of K perturbations at once: a row-major float32 (rows, K)
/// block and each column's subset count (see `draws::weights_block`); one entry per column in each array.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn draw_weights_block<'py>(
    py: Python<'py>,
    key_subset: PyReadonlyArray1<'py, u64>,
    key_xi: PyReadonlyArray1<'py, u64>,
    ratio: PyReadonlyArray1<'py, f64>,
    base: PyReadonlyArray1<'py, f64>,
    rho: PyReadonlyArray1<'py, f64>,
    shift: PyReadonlyArray1<'py, f64>,
    blackbox: PyReadonlyArray1<'py, bool>,
    r0: u64,
    rows: usize,
) -> PyResult<WeightsBlock<'py>> {
    let cols: Vec<draws::ColumnDraw> = {
        let (ks, kx, ra, ba, rh, sh, bb) = (
            contiguous(&key_subset, "key_subset")?, contiguous(&key_xi, "key_xi")?, contiguous(&ratio, "ratio")?,
            contiguous(&base, "base")?, contiguous(&rho, "rho")?, contiguous(&shift, "shift")?, contiguous(&blackbox, "blackbox")?,
        );
        let k = ks.len();
        if [kx.len(), ra.len(), ba.len(), rh.len(), sh.len(), bb.len()].iter().any(|&l| l != k) || k == 0 {
            return Err(PyValueError::new_err("every draw parameter needs one entry per column (K >= 1)"));
        }
        (0..k)
            .map(|j| draws::ColumnDraw { key_subset: ks[j], key_xi: kx[j], ratio: ra[j], base: ba[j], rho: rh[j], shift: sh[j], blackbox: bb[j] })
            .collect()
    };
    let k = cols.len();
    let (out, members) = py.detach(|| {
        let mut out = vec![0.0f32; rows * k];
        let mut members = vec![0u64; k];
        draws::weights_block(&cols, r0, &mut out, &mut members);
        (out, members)
    });
    let block = Array2::from_shape_vec((rows, k), out).expect("rows * K weights").into_pyarray(py);
    Ok((block, members.into_pyarray(py)))
}

/// Streaming top-k: feed row blocks with `push_block(offset, block)`, then `finish()`.
#[pyclass(module = "daunce_store._kernel", name = "TopKAccumulator")]
struct PyTopKAccumulator {
    inner: Option<TopKAccumulator>,
    ncols: usize,
    k: usize,
}

impl PyTopKAccumulator {
    fn acc(&mut self) -> PyResult<&mut TopKAccumulator> {
        self.inner.as_mut().ok_or_else(|| PyRuntimeError::new_err("this accumulator is finished; make a new one"))
    }
}

#[pymethods]
impl PyTopKAccumulator {
    #[new]
    #[pyo3(signature = (queries, k, measure = "cov", pos = true, neg = true, queries_prepared = false))]
    fn new(
        py: Python<'_>,
        queries: PyReadonlyArray2<'_, f32>,
        k: usize,
        measure: &str,
        pos: bool,
        neg: bool,
        queries_prepared: bool,
    ) -> PyResult<Self> {
        let measure = Measure::parse(measure)
            .ok_or_else(|| PyValueError::new_err(format!("measure must be cov or corr, not {measure:?}")))?;
        let ncols = queries.shape()[1];
        let q = contiguous(&queries, "queries")?;
        let inner = py
            .detach(|| TopKAccumulator::new(q, ncols, k, measure, pos, neg, queries_prepared))
            .map_err(to_py_err)?;
        Ok(PyTopKAccumulator { inner: Some(inner), ncols, k })
    }

    /// Score every row pushed from now on as `center(x) @ transform` ((K, K) float32), then prepared as
    /// usual (the normalised preconditioned measures: transform = M^½).
    fn set_transform(&mut self, transform: PyReadonlyArray2<'_, f32>) -> PyResult<()> {
        let ncols = self.ncols;
        if transform.shape() != [ncols, ncols] {
            return Err(PyValueError::new_err(format!("the transform must be ({ncols}, {ncols}), not {:?}", transform.shape())));
        }
        let t = contiguous(&transform, "transform")?.to_vec();
        self.acc()?.set_transform(&t).map_err(to_py_err)
    }

    /// Multiply every score of train row i pushed from now on by `scales[i]` ((n,) float32, one per
    /// train row): the normalised preconditioned measures scored as cov rows with their persisted
    /// self-score norms, no transform per row.
    fn set_row_scales(&mut self, scales: PyReadonlyArray1<'_, f32>) -> PyResult<()> {
        let s = contiguous(&scales, "scales")?.to_vec();
        self.acc()?.set_row_scales(s);
        Ok(())
    }

    /// Fold rows `offset .. offset + R` of a C-contiguous float32 (R, K) block.
    fn push_block(&mut self, py: Python<'_>, offset: u64, block: PyReadonlyArray2<'_, f32>) -> PyResult<()> {
        let ncols = self.ncols;
        if block.shape()[1] != ncols {
            return Err(PyValueError::new_err(format!(
                "block has {} columns but the queries have {ncols}; score with the columns both have",
                block.shape()[1]
            )));
        }
        let data = contiguous(&block, "block")?;
        let acc = self.acc()?;
        py.detach(|| acc.push_block(offset, data)).map_err(to_py_err)
    }

    /// Fold rows `r0 .. r1` of the block `plan` assembles from the chunks under `source` (as for
    /// `read_block`), each segment scored while it is in cache (`read::visit_chunks`; an object store's
    /// chunks fetched ahead), the GIL released. On a `ChunkReadError` the accumulator is void: make a
    /// new one.
    fn push_chunks(&mut self, py: Python<'_>, source: &Bound<'_, PyAny>, plan: PyRef<'_, PyChunkPlan>, r0: usize, r1: usize) -> PyResult<()> {
        let ncols = self.ncols;
        let source = Where::extract(source)?;
        let sources = plan.sources.clone();
        let acc = self.acc()?;
        if let Some(limit) = acc.row_limit() {
            if r1 as u64 > limit {
                return Err(PyValueError::new_err(format!("rows {r0}..{r1} pushed, but the row scales cover rows 0..{limit}")));
            }
        }
        let rows = r1.saturating_sub(r0) as u64;
        let store: Box<dyn ChunkBytes + Send> = match source {
            Where::Local(root) => Box::new(LocalDir(root)),
            Where::Object(client) => Box::new(client),
        };
        py.detach(|| acc.push_with(rows, |lanes, fold| read::visit_chunks(store.as_ref(), &sources, r0, r1, ncols, lanes, fold)))
            .map_err(read_error)
    }

    /// Fold precomputed scores (R,) of rows `offset .. offset + R` (single-query accumulators).
    fn push_scores(&mut self, py: Python<'_>, offset: u64, scores: PyReadonlyArray1<'_, f32>) -> PyResult<()> {
        let data = contiguous(&scores, "scores")?;
        let acc = self.acc()?;
        py.detach(|| acc.push_scores(offset, data)).map_err(to_py_err)
    }

    #[getter]
    fn rows_seen(&self) -> u64 {
        self.inner.as_ref().map_or(0, |a| a.rows_seen())
    }

    /// `{side: (indices (m, k) int64, scores (m, k) float32)}`, best first; ends the accumulator.
    fn finish<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let acc = self.inner.take().ok_or_else(|| PyRuntimeError::new_err("this accumulator is already finished"))?;
        let m = acc.num_queries();
        let k = self.k;
        let (pos, neg) = py.detach(|| acc.finish()).map_err(to_py_err)?;
        let out = PyDict::new(py);
        for (name, side) in [("pos", pos), ("neg", neg)] {
            if let Some(SideResult { indices, scores }) = side {
                let idx = Array2::from_shape_vec((m, k), indices).expect("m * k indices").into_pyarray(py);
                let sc = Array2::from_shape_vec((m, k), scores).expect("m * k scores").into_pyarray(py);
                out.set_item(name, (idx, sc))?;
            }
        }
        Ok(out)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(row_variance, m)?)?;
    m.add_function(wrap_pyfunction!(splitmix64_uniforms, m)?)?;
    m.add_function(wrap_pyfunction!(draw_linear_weights, m)?)?;
    m.add_function(wrap_pyfunction!(draw_weights_block, m)?)?;
    m.add_function(wrap_pyfunction!(read_block, m)?)?;
    m.add_function(wrap_pyfunction!(vlen_utf8_take, m)?)?;
    m.add("ChunkReadError", m.py().get_type::<ChunkReadError>())?;
    m.add_class::<PyTopKAccumulator>()?;
    m.add_class::<PyChunkPlan>()?;
    m.add_class::<PyObjectStoreChunks>()?;
    Ok(())
}
