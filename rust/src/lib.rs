//! daunce-store's compute kernels. The kernel logic lives in plain-Rust modules with their own unit
//! tests; `python` holds the thin PyO3 wrappers; this file only registers them.

pub mod chunks;
pub mod draws;
pub mod read;
pub mod stats;
pub mod topk;
pub mod vlen;
mod python;

use pyo3::prelude::*;

#[pymodule]
fn _kernel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    python::register(m)
}
