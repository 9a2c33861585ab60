//! The virtual clock for `datetime`: `datetime.datetime.now()` and `utcnow()` read the wall
//! clock in C (not through `time.time`), so the stand-ins of `clock.rs` do not reach them.
//! `pytest_ftrace.ftrace.vclock` puts two stand-ins of our own in the C type's namespace for
//! an `--ftrace` session and puts the real ones back when it ends. The type itself stays the
//! one type it is (`isinstance`, `type(x) is datetime`, pickling, `repr`, arithmetic,
//! `datetime.max` are untouched), and code that took the class before the plugin loaded
//! (`from datetime import datetime`) gets the stand-ins too: they live on the class.
//!
//! Each stand-in is a class-method descriptor with the real one's name, signature and
//! documentation. In a managed thread of a round it builds the result from the virtual wall
//! clock through the real `fromtimestamp` of the class it is called on (the same C path
//! `now` takes: local time with its fold, or `tz.fromutc`); everywhere else it calls the real
//! method with the same arguments. `date.today()` and `datetime.today()` already read
//! `time.time` (the module's attribute) and need nothing here.

use std::ffi::CString;
use std::sync::OnceLock;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple, PyType};

use crate::clock;

/// The real methods, the stand-ins and what they need; made once per process (the C type
/// lives as long as the process).
struct Parts {
    /// The `datetime.datetime` type the stand-ins were made for.
    cls: Py<PyType>,
    real_now: Py<PyAny>,
    real_utcnow: Py<PyAny>,
    real_fromtimestamp: Py<PyAny>,
    utc: Py<PyAny>,
    now: Py<PyAny>,
    utcnow: Py<PyAny>,
}

static PARTS: OnceLock<Parts> = OnceLock::new();
/// Sessions that installed the stand-ins and have not ended (pytester nests them).
static DEPTH: parking_lot::Mutex<usize> = parking_lot::Mutex::new(0);

/// The virtual wall clock as a timestamp, floored to microseconds as `now()` does; None when
/// the calling thread reads the real clock.
fn virtual_timestamp() -> Option<f64> {
    let ns = std::panic::catch_unwind(|| clock::virtual_ns(clock::WALL)).ok()??;
    let us = ns.div_euclid(1_000);
    // A float this size is exact to well under half a microsecond: `fromtimestamp` rounds it
    // back to these very microseconds.
    Some(us.div_euclid(1_000_000) as f64 + us.rem_euclid(1_000_000) as f64 / 1e6)
}

/// `descr` (a class method of the real type) bound to `cls` and called with a vectorcall's
/// arguments.
///
/// # Safety
/// The interpreter is attached; the pointers are live.
unsafe fn call_real(
    descr: *mut ffi::PyObject,
    cls: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let Some(get) = (*ffi::Py_TYPE(descr)).tp_descr_get else {
        return ffi::PyObject_Vectorcall(descr, args, nargs as usize, kwnames);
    };
    let bound = get(descr, std::ptr::null_mut(), cls);
    if bound.is_null() {
        return bound;
    }
    let out = ffi::PyObject_Vectorcall(bound, args, nargs as usize, kwnames);
    ffi::Py_DECREF(bound);
    out
}

/// `cls.fromtimestamp(ts, tz)` through the real method (a subclass's override is not
/// called, as the real `now` does not call it either).
fn from_timestamp<'py>(
    py: Python<'py>,
    parts: &Parts,
    cls: &Bound<'py, PyAny>,
    ts: f64,
    tz: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let bound = parts
        .real_fromtimestamp
        .bind(py)
        .call_method1("__get__", (py.None(), cls))?;
    bound.call1((ts, tz))
}

/// The `now` stand-in (`METH_FASTCALL | METH_KEYWORDS | METH_CLASS`, as the real one).
///
/// # Safety
/// Called by CPython with the interpreter attached.
unsafe extern "C" fn now_fn(
    cls: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let Some(parts) = PARTS.get() else {
        ffi::PyErr_SetString(
            ffi::PyExc_RuntimeError,
            c"pytest-ftrace: no datetime".as_ptr(),
        );
        return std::ptr::null_mut();
    };
    if let Some(ts) = virtual_timestamp() {
        let py = Python::assume_attached();
        let nkw = if kwnames.is_null() {
            0
        } else {
            ffi::PyTuple_GET_SIZE(kwnames)
        };
        // `now()`, `now(tz)`, `now(tz=tz)`; anything else goes to the real method, which
        // refuses it as always.
        let tz = match (nargs, nkw) {
            (0, 0) => Some(py.None().into_bound(py)),
            (1, 0) => Some(Bound::from_borrowed_ptr(py, *args)),
            (0, 1) => {
                let name = Bound::from_borrowed_ptr(py, ffi::PyTuple_GET_ITEM(kwnames, 0));
                let is_tz = name.cast::<PyString>().is_ok_and(|n| n == "tz");
                is_tz.then(|| Bound::from_borrowed_ptr(py, *args))
            }
            _ => None,
        };
        if let Some(tz) = tz {
            let cls = Bound::from_borrowed_ptr(py, cls);
            return match from_timestamp(py, parts, &cls, ts, &tz) {
                Ok(value) => value.into_ptr(),
                Err(err) => {
                    err.restore(py);
                    std::ptr::null_mut()
                }
            };
        }
    }
    call_real(parts.real_now.as_ptr(), cls, args, nargs, kwnames)
}

/// The virtual `cls.utcnow()`: the UTC fields of the virtual time, as a naive `cls`.
fn virtual_utcnow<'py>(
    py: Python<'py>,
    parts: &Parts,
    cls: &Bound<'py, PyAny>,
    ts: f64,
) -> PyResult<Bound<'py, PyAny>> {
    let base = parts.cls.bind(py).clone().into_any();
    let aware = from_timestamp(py, parts, &base, ts, parts.utc.bind(py))?;
    let mut fields = Vec::with_capacity(7);
    for name in [
        "year",
        "month",
        "day",
        "hour",
        "minute",
        "second",
        "microsecond",
    ] {
        fields.push(aware.getattr(name)?);
    }
    cls.call1(PyTuple::new(py, fields)?)
}

/// The `utcnow` stand-in (`METH_NOARGS | METH_CLASS`, as the real one).
///
/// # Safety
/// Called by CPython with the interpreter attached.
unsafe extern "C" fn utcnow_fn(
    cls: *mut ffi::PyObject,
    _unused: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let Some(parts) = PARTS.get() else {
        ffi::PyErr_SetString(
            ffi::PyExc_RuntimeError,
            c"pytest-ftrace: no datetime".as_ptr(),
        );
        return std::ptr::null_mut();
    };
    // The real method runs in every case: its deprecation warning (3.12+) is given, or
    // raised under an "error" filter, exactly as without the plugin.
    let real = call_real(
        parts.real_utcnow.as_ptr(),
        cls,
        std::ptr::null(),
        0,
        std::ptr::null_mut(),
    );
    if real.is_null() {
        return real;
    }
    let Some(ts) = virtual_timestamp() else {
        return real;
    };
    ffi::Py_DECREF(real);
    let py = Python::assume_attached();
    let cls = Bound::from_borrowed_ptr(py, cls);
    match virtual_utcnow(py, parts, &cls, ts) {
        Ok(value) => value.into_ptr(),
        Err(err) => {
            err.restore(py);
            std::ptr::null_mut()
        }
    }
}

/// A class-method descriptor of `cls` named `name` calling `meth` with `flags`, documented
/// (signature included) as `real` is.
fn stand_in<'py>(
    cls: &Bound<'py, PyType>,
    real: &Bound<'py, PyAny>,
    name: &str,
    meth: ffi::PyMethodDefPointer,
    flags: std::os::raw::c_int,
) -> PyResult<Bound<'py, PyAny>> {
    let py = cls.py();
    let doc: Option<String> = real.getattr("__doc__")?.extract()?;
    let signature: Option<String> = real.getattr("__text_signature__")?.extract()?;
    let mut text = String::new();
    if let Some(signature) = signature {
        text = format!("{name}{signature}\n--\n\n");
    }
    text.push_str(&doc.unwrap_or_default());
    let text = text.replace('\0', "");
    // The definition and its strings live as long as the descriptor: the whole process
    // (made once, see PARTS).
    let name = CString::new(name)?.into_raw();
    let doc = CString::new(text)?.into_raw();
    let def = Box::leak(Box::new(ffi::PyMethodDef {
        ml_name: name,
        ml_meth: meth,
        ml_flags: flags | ffi::METH_CLASS,
        ml_doc: doc,
    }));
    // SAFETY: `def` is leaked (static); `cls` is a live type.
    unsafe {
        let descr = ffi::PyDescr_NewClassMethod(cls.as_ptr().cast(), def);
        Bound::from_owned_ptr_or_err(py, descr)
    }
}

fn make_parts(cls: &Bound<'_, PyType>, namespace: &Bound<'_, PyDict>) -> PyResult<Parts> {
    let py = cls.py();
    let get = |name: &str| -> PyResult<Bound<'_, PyAny>> {
        namespace.get_item(name)?.ok_or_else(|| {
            pyo3::exceptions::PyValueError::new_err(format!("datetime has no {name}"))
        })
    };
    let real_now = get("now")?;
    let real_utcnow = get("utcnow")?;
    let now = stand_in(
        cls,
        &real_now,
        "now",
        ffi::PyMethodDefPointer {
            PyCFunctionFastWithKeywords: now_fn,
        },
        ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
    )?;
    let utcnow = stand_in(
        cls,
        &real_utcnow,
        "utcnow",
        ffi::PyMethodDefPointer {
            PyCFunction: utcnow_fn,
        },
        ffi::METH_NOARGS,
    )?;
    let utc = py.import("datetime")?.getattr("timezone")?.getattr("utc")?;
    Ok(Parts {
        cls: cls.clone().unbind(),
        real_fromtimestamp: get("fromtimestamp")?.unbind(),
        real_now: real_now.unbind(),
        real_utcnow: real_utcnow.unbind(),
        utc: utc.unbind(),
        now: now.unbind(),
        utcnow: utcnow.unbind(),
    })
}

/// The type's own namespace (the dict behind its read-only `__dict__`).
fn namespace<'py>(cls: &Bound<'py, PyType>) -> PyResult<Bound<'py, PyDict>> {
    let t: *mut ffi::PyTypeObject = cls.as_ptr().cast();
    // SAFETY: `cls` is a live type; both ways give a new reference (the interpreters this
    // is built for have PyType_GetDict; `cargo test` may build against an older one).
    let dict = unsafe {
        #[cfg(Py_3_12)]
        let ptr = ffi::PyType_GetDict(t);
        #[cfg(not(Py_3_12))]
        let ptr = ffi::Py_XNewRef((*t).tp_dict);
        Bound::from_owned_ptr_or_err(cls.py(), ptr)?
    };
    Ok(dict.cast_into::<PyDict>()?)
}

/// Whether `cls` is the C `datetime` type (the pure-Python one reads `time.time`, which is
/// virtual already).
fn is_c_type(namespace: &Bound<'_, PyDict>) -> PyResult<bool> {
    Ok(match namespace.get_item("now")? {
        Some(now) => now.get_type().name()? == "classmethod_descriptor",
        None => false,
    })
}

/// install_datetime_clock(datetime_type) -> bool: put the stand-ins of `now` and `utcnow` on
/// the C `datetime.datetime` type for a session (nested sessions count); False when the type
/// is not the C one (nothing to do) or is another one than the first session's.
#[pyfunction]
fn install_datetime_clock(cls: &Bound<'_, PyType>) -> PyResult<bool> {
    let py = cls.py();
    let namespace = namespace(cls)?;
    let mut depth = DEPTH.lock();
    let parts = match PARTS.get() {
        Some(parts) => parts,
        None => {
            if !is_c_type(&namespace)? {
                return Ok(false);
            }
            let made = make_parts(cls, &namespace)?;
            let _ = PARTS.set(made);
            PARTS.get().expect("set above")
        }
    };
    if !parts.cls.bind(py).is(cls) {
        return Ok(false);
    }
    if *depth == 0 {
        namespace.set_item("now", parts.now.bind(py))?;
        namespace.set_item("utcnow", parts.utcnow.bind(py))?;
        // SAFETY: a live type whose namespace changed.
        unsafe { ffi::PyType_Modified(cls.as_ptr().cast()) };
    }
    *depth += 1;
    Ok(true)
}

/// uninstall_datetime_clock(datetime_type): a session that installed the stand-ins ends;
/// the last one puts the real methods back (a name replaced meanwhile is left alone).
#[pyfunction]
fn uninstall_datetime_clock(cls: &Bound<'_, PyType>) -> PyResult<()> {
    let py = cls.py();
    let mut depth = DEPTH.lock();
    let Some(parts) = PARTS.get() else {
        return Ok(());
    };
    if *depth == 0 || !parts.cls.bind(py).is(cls) {
        return Ok(());
    }
    *depth -= 1;
    if *depth == 0 {
        let namespace = namespace(cls)?;
        for (name, ours, real) in [
            ("now", &parts.now, &parts.real_now),
            ("utcnow", &parts.utcnow, &parts.real_utcnow),
        ] {
            if namespace
                .get_item(name)?
                .is_some_and(|current| current.is(ours.bind(py)))
            {
                namespace.set_item(name, real.bind(py))?;
            }
        }
        // SAFETY: a live type whose namespace changed.
        unsafe { ffi::PyType_Modified(cls.as_ptr().cast()) };
    }
    Ok(())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(install_datetime_clock, m)?)?;
    m.add_function(wrap_pyfunction!(uninstall_datetime_clock, m)?)?;
    Ok(())
}
