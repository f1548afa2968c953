//! Python bindings for `ratewarden`, imported from Python as `ratewarden._native`.
//!
//! The public Python API lives in `python/ratewarden/__init__.py`; this module
//! is an implementation detail. Keep `python/ratewarden/_native.pyi` in sync.

use pyo3::prelude::*;

/// Return the version of the ratewarden core library.
#[pyfunction]
fn version() -> &'static str {
    ratewarden::VERSION
}

/// The `ratewarden._native` extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add("__version__", ratewarden::VERSION)?;
    Ok(())
}
