// Emits pyo3's cfgs (Py_GIL_DISABLED, Py_3_13, ...) for this crate too, so code can tell
// which interpreter it is built for.
fn main() {
    pyo3_build_config::use_pyo3_cfgs();
}
