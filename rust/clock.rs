//! The virtual clock of exact mode, as Python sees it: stand-ins for `time.time`,
//! `time.monotonic`, `time.perf_counter` (and their `_ns` variants) and `time.sleep` that
//! `pytest_ftrace.vclock` puts in the `time` module under `--ftrace`, before the test modules
//! are imported (so `from time import monotonic` gets them too).
//!
//! In a managed thread of a round, every clock reads the one virtual timeline of the round's
//! core (see `Core::clock_now`): it starts at the real time at a test's first round (a later
//! round goes on from where the last one stopped), moves on by a tick at each read, by each
//! sleep and each timed wait that ends, and never goes back; a sleep is a timed block in the
//! core. Every other thread, and every thread outside a round,
//! gets exactly what the real function gives: the stand-in calls it (one atomic load and a
//! thread-local read first).
//!
//! Each stand-in is a bare C function whose `self` is the real function it stands in for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::engine;
use crate::hooks;
use crate::sched::{self, Core, Wait};

/// The real clocks' readings (ns) at [`sched::clock_anchor`]: wall, monotonic, perf_counter.
static BASES: OnceLock<[i128; 3]> = OnceLock::new();

pub(crate) const WALL: usize = 0;
const MONOTONIC: usize = 1;
const PERF: usize = 2;

/// Sleeps block on resources of their own, never woken (a timed block that ends).
const SLEEP_RESOURCE: u64 = 1 << 63;
static SLEEPS: AtomicU64 = AtomicU64::new(0);

/// The virtual reading of clock `which` (ns) for the calling thread, None when it reads the
/// real clock.
#[inline]
pub(crate) fn virtual_ns(which: usize) -> Option<i128> {
    let bases = BASES.get()?;
    let timeline = engine::with_managed(|core, tid| core.clock_now(tid)).flatten()?;
    Some(bases[which] + i128::from(timeline))
}

/// A clock stand-in: `slf` is the real function.
///
/// # Safety
/// Called by CPython with the interpreter attached.
unsafe fn clock(slf: *mut ffi::PyObject, which: usize, ns: bool) -> *mut ffi::PyObject {
    match std::panic::catch_unwind(|| virtual_ns(which)) {
        Ok(Some(value)) if ns => ffi::PyLong_FromLongLong(value as i64),
        Ok(Some(value)) => ffi::PyFloat_FromDouble(value as f64 / 1e9),
        _ => ffi::PyObject_CallNoArgs(slf),
    }
}

macro_rules! clock_fn {
    ($name:ident, $which:expr, $ns:expr) => {
        unsafe extern "C" fn $name(
            slf: *mut ffi::PyObject,
            _args: *mut ffi::PyObject,
        ) -> *mut ffi::PyObject {
            clock(slf, $which, $ns)
        }
    };
}

clock_fn!(time_fn, WALL, false);
clock_fn!(time_ns_fn, WALL, true);
clock_fn!(monotonic_fn, MONOTONIC, false);
clock_fn!(monotonic_ns_fn, MONOTONIC, true);
clock_fn!(perf_counter_fn, PERF, false);
clock_fn!(perf_counter_ns_fn, PERF, true);

/// What a managed thread's sleep came to: None when the real sleep must run.
fn managed_sleep(py: Python<'_>, core: Arc<Core>, tid: u32, seconds: f64) -> Option<()> {
    if seconds == 0.0 {
        hooks::detached(py, move || core.point(tid));
        return Some(());
    }
    let ns = (seconds * 1e9).min(u64::MAX as f64 / 2.0) as u64;
    let resource = SLEEP_RESOURCE | SLEEPS.fetch_add(1, Ordering::Relaxed);
    match hooks::detached(py, move || core.block_for(tid, resource, Some(ns))) {
        Wait::Free => None, // the round runs free: a real sleep
        _ => Some(()),
    }
}

/// The `time.sleep` stand-in: `slf` is the real `time.sleep`.
///
/// # Safety
/// Called by CPython with the interpreter attached and `arg` a live object.
unsafe extern "C" fn sleep_fn(
    slf: *mut ffi::PyObject,
    arg: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let managed = engine::with_managed(|core, tid| (Arc::clone(core), tid));
    if let Some((core, tid)) = managed {
        // Only a plain int or float, finite and not negative, sleeps on the virtual clock;
        // anything else goes to the real function, which accepts or refuses it as always.
        let number = ffi::PyFloat_Check(arg) != 0 || ffi::PyLong_CheckExact(arg) != 0;
        if number {
            let seconds = ffi::PyFloat_AsDouble(arg);
            if seconds == -1.0 && !ffi::PyErr_Occurred().is_null() {
                ffi::PyErr_Clear();
            } else if seconds.is_finite() && seconds >= 0.0 {
                let py = Python::assume_attached();
                let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    managed_sleep(py, core, tid, seconds)
                }));
                if let Ok(Some(())) = done {
                    return ffi::Py_NewRef(ffi::Py_None());
                }
            }
        }
    }
    ffi::PyObject_CallOneArg(slf, arg)
}

struct MethodDef(ffi::PyMethodDef);
// SAFETY: the definitions are immutable after construction and only read by CPython.
unsafe impl Sync for MethodDef {}

macro_rules! noargs {
    ($name:literal, $f:ident, $doc:literal) => {
        MethodDef(ffi::PyMethodDef {
            ml_name: $name.as_ptr(),
            ml_meth: ffi::PyMethodDefPointer { PyCFunction: $f },
            ml_flags: ffi::METH_NOARGS,
            ml_doc: $doc.as_ptr(),
        })
    };
}

static DEFS: [(&str, MethodDef); 7] = [
    (
        "time",
        noargs!(
            c"time",
            time_fn,
            c"time.time; the virtual clock in a managed thread of --ftrace"
        ),
    ),
    (
        "time_ns",
        noargs!(
            c"time_ns",
            time_ns_fn,
            c"time.time_ns; the virtual clock in a managed thread of --ftrace"
        ),
    ),
    (
        "monotonic",
        noargs!(
            c"monotonic",
            monotonic_fn,
            c"time.monotonic; the virtual clock in a managed thread of --ftrace"
        ),
    ),
    (
        "monotonic_ns",
        noargs!(
            c"monotonic_ns",
            monotonic_ns_fn,
            c"time.monotonic_ns; the virtual clock in a managed thread of --ftrace"
        ),
    ),
    (
        "perf_counter",
        noargs!(
            c"perf_counter",
            perf_counter_fn,
            c"time.perf_counter; the virtual clock in a managed thread of --ftrace"
        ),
    ),
    (
        "perf_counter_ns",
        noargs!(
            c"perf_counter_ns",
            perf_counter_ns_fn,
            c"time.perf_counter_ns; the virtual clock in a managed thread of --ftrace"
        ),
    ),
    (
        "sleep",
        MethodDef(ffi::PyMethodDef {
            ml_name: c"sleep".as_ptr(),
            ml_meth: ffi::PyMethodDefPointer {
                PyCFunction: sleep_fn,
            },
            ml_flags: ffi::METH_O,
            ml_doc:
                c"time.sleep; a timed block on the virtual clock in a managed thread of --ftrace"
                    .as_ptr(),
        }),
    ),
];

/// The real clocks' readings now, through the real functions in `real` (a dict by name).
fn read_bases(real: &Bound<'_, PyDict>) -> PyResult<[i128; 3]> {
    let read = |name: &str| -> PyResult<i128> {
        real.get_item(name)?
            .ok_or_else(|| PyValueError::new_err(format!("no real time.{name} given")))?
            .call0()?
            .extract::<i128>()
    };
    let wall = read("time_ns")?;
    let mono = read("monotonic_ns")?;
    let perf = read("perf_counter_ns")?;
    let since = sched::clock_anchor().elapsed().as_nanos() as i128;
    Ok([wall - since, mono - since, perf - since])
}

/// The stand-ins' state, kept here rather than in `pytest_ftrace.vclock` (pytester sessions
/// drop and import again the plugin's Python modules; this module stays).
struct Installed {
    /// Sessions that installed the stand-ins and have not ended (pytester nests them).
    depth: usize,
    real: Py<PyDict>,
    stand_ins: Py<PyDict>,
}

static INSTALLED: parking_lot::Mutex<Option<Installed>> = parking_lot::Mutex::new(None);

/// The stand-ins for the real functions in `real`; the first call takes the real clocks'
/// readings the virtual ones start from.
fn make_stand_ins<'py>(real: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyDict>> {
    let py = real.py();
    sched::clock_anchor();
    if BASES.get().is_none() {
        let bases = read_bases(real)?;
        let _ = BASES.set(bases);
    }
    let out = PyDict::new(py);
    for (name, def) in &DEFS {
        let original = real
            .get_item(*name)?
            .ok_or_else(|| PyValueError::new_err(format!("no real time.{name} given")))?;
        // SAFETY: the definition is static; `original` is kept alive by the new function
        // (its `self`), which is owned by `f`.
        let f = unsafe {
            let f = ffi::PyCFunction_NewEx(
                &def.0 as *const ffi::PyMethodDef as *mut ffi::PyMethodDef,
                original.as_ptr(),
                std::ptr::null_mut(),
            );
            Bound::from_owned_ptr_or_err(py, f)?
        };
        out.set_item(*name, f)?;
    }
    Ok(out)
}

/// install_clock(time_module): put the stand-ins in `time_module` (the `time` module) for a
/// session; nested sessions count, the first one makes them.
#[pyfunction]
fn install_clock(time_module: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = time_module.py();
    let mut installed = INSTALLED.lock();
    if installed.is_none() {
        let real = PyDict::new(py);
        for (name, _) in &DEFS {
            real.set_item(*name, time_module.getattr(*name)?)?;
        }
        let stand_ins = make_stand_ins(&real)?;
        *installed = Some(Installed {
            depth: 0,
            real: real.unbind(),
            stand_ins: stand_ins.unbind(),
        });
    }
    let state = installed.as_mut().expect("made above");
    if state.depth == 0 {
        for (name, f) in state.stand_ins.bind(py).iter() {
            time_module.setattr(name.cast::<pyo3::types::PyString>()?, f)?;
        }
    }
    state.depth += 1;
    Ok(())
}

/// uninstall_clock(time_module) -> bool: a session that installed the stand-ins ends; the
/// last one puts the real functions back (a name someone else replaced meanwhile is left
/// alone) and gets True.
#[pyfunction]
fn uninstall_clock(time_module: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = time_module.py();
    let mut installed = INSTALLED.lock();
    let Some(state) = installed.as_mut() else {
        return Ok(false);
    };
    if state.depth == 0 {
        return Ok(false);
    }
    state.depth -= 1;
    if state.depth == 0 {
        let stand_ins = state.stand_ins.bind(py);
        for (name, real) in state.real.bind(py).iter() {
            let name = name.cast::<pyo3::types::PyString>()?;
            let current = time_module.getattr(name)?;
            if let Some(ours) = stand_ins.get_item(name)? {
                if current.is(&ours) {
                    time_module.setattr(name, real)?;
                }
            }
        }
        return Ok(true);
    }
    Ok(false)
}

/// gc_event(phase, info): a `gc.callbacks` entry: the watcher of exact mode does not take a
/// thread the collector parked for one blocked in C.
#[pyfunction]
fn gc_event(phase: &str, info: &Bound<'_, PyAny>) {
    let _ = info;
    sched::watch::gc_phase(phase == "start");
}

/// real_clock(name) -> the real `time.<name>` the stand-ins were made for, or None before
/// they were.
#[pyfunction]
fn real_clock(py: Python<'_>, name: &str) -> PyResult<Option<Py<PyAny>>> {
    let installed = INSTALLED.lock();
    let Some(state) = installed.as_ref() else {
        return Ok(None);
    };
    Ok(state.real.bind(py).get_item(name)?.map(Bound::unbind))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(install_clock, m)?)?;
    m.add_function(wrap_pyfunction!(uninstall_clock, m)?)?;
    m.add_function(wrap_pyfunction!(real_clock, m)?)?;
    m.add_function(wrap_pyfunction!(gc_event, m)?)?;
    Ok(())
}
