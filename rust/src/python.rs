//! Thin PyO3 wrappers: take read-only numpy views, release the GIL, return owned numpy arrays.

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::stats;

/// Per-row variance (ddof = 1) of a C-contiguous float32 (R, K) block.
#[pyfunction]
fn row_variance<'py>(py: Python<'py>, block: PyReadonlyArray2<'py, f32>) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let k = block.shape()[1];
    let data = block.as_slice().map_err(|_| pyo3::exceptions::PyValueError::new_err("block must be C-contiguous"))?;
    let out = py.detach(|| stats::row_variance(data, k));
    Ok(out.into_pyarray(py))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(row_variance, m)?)?;
    Ok(())
}
