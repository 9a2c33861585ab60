//! Explore mode: a lock operation's scheduling point made in the core, without Python.
//!
//! A managed thread's acquire or release of a schedulable lock (locks.rs) went through the
//! Python hooks (pytest_ftrace/ftrace/coop.py `_acquire_hook`, `_release_hook`) at every
//! operation: the caller's file told whether the operation is a point (the user's code, not
//! threading's, queue's or the plugin's), the classifier (`Classifier.lock_step`) told what the
//! step from the point does, then the point, the lock's try and the happens-before edge.
//! Here the same is done natively while `explore_lock_points` has the classifier installed:
//! the caller's file is judged once per code object, and the step's safety once per call site
//! (and chain of callers, when the classifier followed a return into them) from the
//! classifier's `lock_step_how(frame)`; the step's key is the lock's number in the round
//! (visits.rs, shared with the Python path). A contended acquire still goes to the Python
//! hook (its wait in the scheduler), told that the point was made.
//!
//! With `explore_visit_counts(True)` every native answer is compared with Python's
//! `lock_step` (counted with the other native answers, visits.rs).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::{accesses, engine, hooks, visits};

/// Whether the native lock points are on (an explore-mode test's classifier is installed).
static ON: AtomicBool = AtomicBool::new(false);

struct Setup {
    /// `Classifier.lock_step_how(frame) -> (safe, how)`.
    how: Py<PyAny>,
    /// `Classifier.lock_step(frame, lock, released) -> (kind, key)` (the check).
    step: Py<PyAny>,
    /// Files whose lock operations are not points (threading's, queue's, coop.py).
    skip: Vec<String>,
    /// The plugin's directory: its own lock operations are neither points nor edges.
    here: String,
}

static SETUP: Mutex<Option<Setup>> = Mutex::new(None);

/// A code object's file, judged: (the code kept alive, a point here, the plugin's own).
type Files = HashMap<usize, (Py<PyAny>, bool, bool)>;
static FILES: Mutex<Option<Files>> = Mutex::new(None);

/// What a call site's step safety depends on.
enum Safety {
    /// The call site only.
    Site(bool),
    /// Also the chain of callers' (code, offset).
    Chain(HashMap<Vec<(usize, i32)>, bool>),
    /// Objects in the frames: the classifier is asked at every visit.
    Visit,
}

/// (code address, offset) -> (the code kept alive, its safety).
type Steps = HashMap<(usize, i32), (Py<PyAny>, Safety)>;
static STEPS: Mutex<Option<Steps>> = Mutex::new(None);

/// Of the native answers checked against Python's (`explore_visit_counts(True)`): how many
/// were lock steps, and how many of those differed (`explore_lock_counts`).
static LOCK_CHECKED: AtomicU64 = AtomicU64::new(0);
static LOCK_DIFFERED: AtomicU64 = AtomicU64::new(0);

/// explore_lock_counts() -> (lock steps checked against Python's, differed), since the start.
#[pyfunction]
fn explore_lock_counts() -> (u64, u64) {
    (
        LOCK_CHECKED.load(Ordering::Relaxed),
        LOCK_DIFFERED.load(Ordering::Relaxed),
    )
}

/// How many frames a chain of callers covers (as the classifier's `_chain_from`).
const CHAIN: usize = 5;

/// explore_lock_points(how, step, skip_files, here) / explore_lock_points(None, ...): install
/// or remove the classifier's functions for the native lock points (see the module's doc).
#[pyfunction]
#[pyo3(signature = (how, step=None, skip_files=None, here=None))]
fn explore_lock_points(
    py: Python<'_>,
    how: Option<Py<PyAny>>,
    step: Option<Py<PyAny>>,
    skip_files: Option<&Bound<'_, PyAny>>,
    here: Option<String>,
) -> PyResult<()> {
    let setup = match (how, step, skip_files, here) {
        (Some(how), Some(step), Some(skip), Some(here)) => {
            let mut files = Vec::new();
            for f in skip.try_iter()? {
                files.push(f?.extract::<String>()?);
            }
            Some(Setup {
                how,
                step,
                skip: files,
                here,
            })
        }
        _ => None,
    };
    ON.store(false, Ordering::SeqCst);
    let on = setup.is_some();
    let old = std::mem::replace(&mut *SETUP.lock(), setup);
    let files = FILES.lock().take();
    let steps = STEPS.lock().take();
    // the references are dropped attached, outside the maps' locks
    drop((old, files, steps));
    let _ = py;
    ON.store(on, Ordering::SeqCst);
    Ok(())
}

/// Whether the native lock points are on.
#[inline]
pub fn on() -> bool {
    ON.load(Ordering::Acquire)
}

/// The calling thread's top Python frame (borrowed) and its code (a new reference).
unsafe fn caller(py: Python<'_>) -> Option<(*mut ffi::PyFrameObject, Bound<'_, PyAny>)> {
    // SAFETY: attached (the caller's contract).
    unsafe {
        let frame = ffi::PyEval_GetFrame();
        if frame.is_null() {
            return None;
        }
        let code = ffi::PyFrame_GetCode(frame);
        let code = Bound::from_owned_ptr_or_opt(py, code.cast::<ffi::PyObject>())?;
        Some((frame, code))
    }
}

/// (a point here, the plugin's own) for `code`'s file.
fn judged(code: &Bound<'_, PyAny>) -> Option<(bool, bool)> {
    let at = code.as_ptr() as usize;
    if let Some(&(_, point, ours)) = FILES.lock().as_ref().and_then(|m| m.get(&at)) {
        return Some((point, ours));
    }
    let file = code.getattr("co_filename").ok()?;
    let file = file.cast::<PyString>().ok()?.to_str().ok()?.to_owned();
    let (point, ours) = {
        let setup = SETUP.lock();
        let setup = setup.as_ref()?;
        let ours = file.starts_with(&setup.here);
        (!ours && !setup.skip.contains(&file), ours)
    };
    FILES
        .lock()
        .get_or_insert_with(HashMap::new)
        .insert(at, (code.clone().unbind(), point, ours));
    Some((point, ours))
}

/// The chain of (code, offset) from `frame` up (CHAIN frames).
///
/// # Safety
/// Attached; `frame` is live.
unsafe fn chain(frame: *mut ffi::PyFrameObject) -> Vec<(usize, i32)> {
    let mut out = Vec::with_capacity(CHAIN);
    // SAFETY: attached; each frame is held while it is looked at.
    unsafe {
        ffi::Py_INCREF(frame.cast());
        let mut f = frame;
        while !f.is_null() && out.len() < CHAIN {
            let code = ffi::PyFrame_GetCode(f);
            out.push((code as usize, ffi::PyFrame_GetLasti(f)));
            ffi::Py_DECREF(code.cast());
            let back = ffi::PyFrame_GetBack(f);
            ffi::Py_DECREF(f.cast());
            f = back;
        }
        if !f.is_null() {
            ffi::Py_DECREF(f.cast());
        }
    }
    out
}

/// Whether the step from the point at `frame` (running `code`) is safe: from the kept answer
/// when it fits, else the classifier's (kept as it says it may be). None: not installed.
///
/// # Safety
/// Attached; `frame` is live and runs `code`.
unsafe fn safe(
    py: Python<'_>,
    frame: *mut ffi::PyFrameObject,
    code: &Bound<'_, PyAny>,
) -> PyResult<Option<bool>> {
    // SAFETY: attached; `frame` is live.
    let site = (code.as_ptr() as usize, unsafe {
        ffi::PyFrame_GetLasti(frame)
    });
    let mut callers = None;
    // 0 unknown, 1 kept per chain of callers; a kept answer of the site is returned at once
    let kept = match STEPS.lock().as_ref().and_then(|m| m.get(&site)) {
        Some((_, Safety::Site(s))) => return Ok(Some(*s)),
        Some((_, Safety::Chain(_))) => 1,
        _ => 0,
    };
    if kept == 1 {
        // SAFETY: as this function's (the chain is made outside the map's lock).
        let c = unsafe { chain(frame) };
        if let Some((_, Safety::Chain(known))) = STEPS.lock().as_ref().and_then(|m| m.get(&site)) {
            if let Some(&s) = known.get(&c) {
                return Ok(Some(s));
            }
        }
        callers = Some(c);
    }
    let Some(how) = SETUP.lock().as_ref().map(|s| s.how.clone_ref(py)) else {
        return Ok(None);
    };
    // SAFETY: a borrowed frame of this thread, made a new reference.
    let frame_obj = unsafe { Bound::from_borrowed_ptr(py, frame.cast::<ffi::PyObject>()) };
    let (is_safe, depends): (bool, u8) = how.call1(py, (frame_obj,))?.extract(py)?;
    let mut steps = STEPS.lock();
    let map = steps.get_or_insert_with(HashMap::new);
    match depends {
        0 => {
            map.insert(site, (code.clone().unbind(), Safety::Site(is_safe)));
        }
        1 => {
            // SAFETY: as this function's.
            let c = callers.unwrap_or_else(|| unsafe { chain(frame) });
            let entry = map
                .entry(site)
                .or_insert_with(|| (code.clone().unbind(), Safety::Chain(HashMap::new())));
            if let Safety::Chain(known) = &mut entry.1 {
                known.insert(c, is_safe);
            } else {
                entry.1 = Safety::Chain(HashMap::from([(c, is_safe)]));
            }
        }
        _ => {
            map.entry(site)
                .or_insert_with(|| (code.clone().unbind(), Safety::Visit));
        }
    }
    Ok(Some(is_safe))
}

/// The point before an acquire or after a release of `lock` by a managed thread, when the
/// caller is the user's code. Returns None when the native lock points are off (the Python
/// hook does it all), else (whether the point was made, whether the caller is the plugin's).
fn point(lock: &Bound<'_, PyAny>, released: bool) -> PyResult<Option<(bool, bool)>> {
    let py = lock.py();
    if !on() {
        return Ok(None);
    }
    // SAFETY: attached (a method of a Python object runs).
    let Some((frame, code)) = (unsafe { caller(py) }) else {
        return Ok(None);
    };
    let Some((user, ours)) = judged(&code) else {
        return Ok(None);
    };
    if !user {
        return Ok(Some((false, ours)));
    }
    // SAFETY: attached; the frame is the caller's, live while it calls us.
    let Some(is_safe) = (unsafe { safe(py, frame, &code)? }) else {
        return Ok(None);
    };
    let (kind, key) = if !is_safe {
        (0u8, String::new())
    } else if released {
        (5, String::new())
    } else {
        // SAFETY: attached; `lock` is live.
        let n = unsafe { visits::object_number(lock.as_ptr()) };
        (4, format!("lock:\x01{n}\x01"))
    };
    visits::counted(true);
    if visits::checking() {
        let step = SETUP.lock().as_ref().map(|s| s.step.clone_ref(py));
        if let Some(step) = step {
            // SAFETY: as above.
            let frame_obj = unsafe { Bound::from_borrowed_ptr(py, frame.cast::<ffi::PyObject>()) };
            let python: (u8, String) = step.call1(py, (frame_obj, lock, released))?.extract(py)?;
            let same = python == (kind, key.clone());
            visits::compared(same);
            LOCK_CHECKED.fetch_add(1, Ordering::Relaxed);
            if !same {
                LOCK_DIFFERED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let at = accesses::synthetic(accesses::from_answer(kind, &key));
    let made = engine::with_managed(|core, tid| (core.clone(), tid));
    let Some((core, tid)) = made else {
        return Ok(None);
    };
    hooks::detached(py, move || core.point_at(tid, at));
    Ok(Some((true, ours)))
}

/// Before a managed thread's acquire of `lock`: None when the Python hook does it all, else
/// (whether the point was made, whether the caller is the plugin's own code).
pub fn before_acquire(lock: &Bound<'_, PyAny>) -> PyResult<Option<(bool, bool)>> {
    point(lock, false)
}

/// A managed thread acquired `lock` without waiting (the happens-before edge, as the hook's).
pub fn acquired(lock: &Bound<'_, PyAny>, ours: bool) {
    if !ours {
        crate::hb::races_lock(lock.py(), lock.as_ptr() as u64, true);
    }
}

/// After a managed thread's release of `lock` (`waiting`: a managed thread waits for it):
/// false when the Python hook is to be called instead.
pub fn after_release(lock: &Bound<'_, PyAny>, waiting: bool) -> PyResult<bool> {
    let py = lock.py();
    if !on() {
        return Ok(false);
    }
    // SAFETY: attached.
    let Some((_, code)) = (unsafe { caller(py) }) else {
        return Ok(false);
    };
    let Some((_, ours)) = judged(&code) else {
        return Ok(false);
    };
    if !ours {
        crate::hb::races_lock(py, lock.as_ptr() as u64, false);
    }
    if waiting {
        let id = lock.as_ptr() as u64;
        engine::with_managed(|core, _| core.wake(id));
    }
    point(lock, true)?;
    Ok(true)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(explore_lock_points, m)?)?;
    m.add_function(wrap_pyfunction!(explore_lock_counts, m)?)?;
    Ok(())
}
