//! `pytest_ftrace._native`: the Rust core of pytest-ftrace.
//!
//! The module is declared free-threading safe (`gil_used = false`): importing it on a
//! free-threaded CPython must leave the GIL disabled. Every piece of state it keeps is
//! either immutable, atomic, thread-local or behind its own lock.

use pyo3::prelude::*;

mod accesses;
mod clock;
mod deaths;
pub mod engine;
mod hb;
mod hooks;
mod iterpoints;
mod locks;
mod lockstep;
pub mod opcodes;
pub mod policy;
pub mod sched;
pub mod seed;
mod shared;
#[cfg(target_os = "linux")]
pub mod stacks;
pub mod stats;
mod vdatetime;
mod visits;

/// Facts about how this extension was built, for the terminal header and for tests.
#[pyfunction]
fn build_info(py: Python<'_>) -> PyResult<Bound<'_, pyo3::types::PyDict>> {
    let info = pyo3::types::PyDict::new(py);
    info.set_item("version", env!("CARGO_PKG_VERSION"))?;
    info.set_item("pyo3", "0.28")?;
    info.set_item("free_threaded_build", cfg!(Py_GIL_DISABLED))?;
    info.set_item("debug", cfg!(debug_assertions))?;
    Ok(info)
}

#[pymodule(gil_used = false)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    hooks::register(m)?;
    #[cfg(target_os = "linux")]
    stacks::register(m)?;
    clock::register(m)?;
    locks::register(m)?;
    lockstep::register(m)?;
    vdatetime::register(m)?;
    Ok(())
}
