//! Iteration points: whether a `FOR_ITER` step in hooked code is a scheduling point, decided by
//! the type of the iterator it advances (dict, list, set and deque iterators are; `range` and
//! everything else is not).
//!
//! The iterator is on the frame's value stack, which no API reaches: `pytest_ftrace.genpoints`
//! computes, once per code object, the index in the frame's `localsplus` of the iterator each
//! `FOR_ITER` advances (a flow analysis of the bytecode) and registers it here. The frame is
//! read through the layout of `_PyInterpreterFrame` of CPython 3.12 and 3.13 (identical in the
//! fields used here, with and without the GIL); Python registers slots on those versions only,
//! and every read is checked against the code object the event names first.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::raw::{c_char, c_int};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyType;

/// A multiplicative hash of a (code address, offset) key: looked up at every loop step, where
/// SipHash's strength against chosen keys buys nothing.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(v as u64);
    }
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
}

type SlotMap = HashMap<(usize, u32), u32, BuildHasherDefault<KeyHasher>>;

/// (code object address, FOR_ITER offset) -> index in `localsplus` of the iterator.
static SLOTS: RwLock<Option<SlotMap>> = RwLock::new(None);
/// Entries in [`SLOTS`], read without the lock: 0 means no loop is a point.
static SLOT_COUNT: AtomicUsize = AtomicUsize::new(0);

const MAX_TYPES: usize = 16;
#[allow(clippy::declare_interior_mutable_const)]
const NO_TYPE: AtomicPtr<ffi::PyTypeObject> = AtomicPtr::new(std::ptr::null_mut());
/// Iterator types whose steps are points, then (after a null) types whose loops are quiet.
static POINT_TYPES: [AtomicPtr<ffi::PyTypeObject>; MAX_TYPES] = [NO_TYPE; MAX_TYPES];
static QUIET_TYPES: [AtomicPtr<ffi::PyTypeObject>; MAX_TYPES] = [NO_TYPE; MAX_TYPES];
/// Keeps the registered types alive.
static KEEP: Mutex<Vec<Py<PyType>>> = Mutex::new(Vec::new());

/// The head of `PyFrameObject` (3.12, 3.13).
#[repr(C)]
pub(crate) struct FrameObject {
    ob_base: ffi::PyObject,
    f_back: *mut ffi::PyObject,
    f_frame: *mut InterpreterFrame,
}

/// `_PyInterpreterFrame` of 3.12 and 3.13, up to the start of `localsplus`.
#[repr(C)]
pub(crate) struct InterpreterFrame {
    f_code: *mut ffi::PyObject,
    previous: *mut InterpreterFrame,
    f_funcobj: *mut ffi::PyObject,
    pub(crate) f_globals: *mut ffi::PyObject,
    f_builtins: *mut ffi::PyObject,
    f_locals: *mut ffi::PyObject,
    frame_obj: *mut ffi::PyObject,
    instr_ptr: *mut u16,
    stacktop: c_int,
    return_offset: u16,
    owner: c_char,
    localsplus: [*mut ffi::PyObject; 1],
}

/// The interpreter frame executing `code` on this thread now, or None (no frame, or the
/// current frame runs other code).
///
/// # Safety
/// Attached to the interpreter (called from the INSTRUCTION callback).
pub(crate) unsafe fn current_frame(code: *mut ffi::PyObject) -> Option<*mut InterpreterFrame> {
    unsafe {
        let frame = ffi::PyEval_GetFrame() as *mut FrameObject;
        if frame.is_null() {
            ffi::PyErr_Clear();
            return None;
        }
        let iframe = (*frame).f_frame;
        if iframe.is_null() || (*iframe).f_code != code {
            return None;
        }
        Some(iframe)
    }
}

/// Slot `index` of `iframe`'s locals and value stack (the caller checked it is in range).
///
/// # Safety
/// `iframe` is a live frame and `index` lies within its `localsplus`.
pub(crate) unsafe fn local(iframe: *mut InterpreterFrame, index: usize) -> *mut ffi::PyObject {
    unsafe {
        let base = std::ptr::addr_of!((*iframe).localsplus) as *const *mut ffi::PyObject;
        *base.add(index)
    }
}

/// What to do with a `FOR_ITER` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A scheduling point (a container iterator).
    Point,
    /// Not a point, and never at this offset again in this activation (`range`, or no slot).
    Disable,
    /// Not a point this time (another iterator; the same loop may iterate a container later).
    Skip,
}

fn listed(types: &[AtomicPtr<ffi::PyTypeObject>], ty: *mut ffi::PyTypeObject) -> bool {
    for t in types {
        let p = t.load(Ordering::Relaxed);
        if p.is_null() {
            return false;
        }
        if p == ty {
            return true;
        }
    }
    false
}

/// Decide a `FOR_ITER` event at `offset` of `code`.
///
/// # Safety
/// Called from the sys.monitoring INSTRUCTION callback: attached to the interpreter, `code`
/// the code object of the frame executing now.
pub unsafe fn step(code: *mut ffi::PyObject, offset: u32) -> Step {
    if SLOT_COUNT.load(Ordering::Acquire) == 0 {
        return Step::Disable;
    }
    let slot = match SLOTS
        .read()
        .as_ref()
        .and_then(|m| m.get(&(code as usize, offset)))
    {
        Some(&s) => s as usize,
        None => return Step::Disable,
    };
    // SAFETY: the current frame is the one executing `code` (checked below before any read
    // beyond its head); `slot` lies within its locals and value stack (genpoints checks it
    // against co_stacksize), below the top of the stack at this FOR_ITER.
    unsafe {
        let frame = ffi::PyEval_GetFrame() as *mut FrameObject;
        if frame.is_null() {
            ffi::PyErr_Clear();
            return Step::Skip;
        }
        let iframe = (*frame).f_frame;
        if iframe.is_null() || (*iframe).f_code != code {
            return Step::Skip;
        }
        let base = std::ptr::addr_of!((*iframe).localsplus) as *const *mut ffi::PyObject;
        let obj = *base.add(slot);
        if obj.is_null() {
            return Step::Skip;
        }
        let ty = ffi::Py_TYPE(obj);
        if listed(&POINT_TYPES, ty) {
            if crate::shared::tracking() {
                crate::shared::on_iterator(obj);
            }
            Step::Point
        } else if listed(&QUIET_TYPES, ty) {
            Step::Disable
        } else {
            Step::Skip
        }
    }
}

/// The iterator the `FOR_ITER` at `offset` of `code` advances (borrowed), or null: for
/// happens-before tracking, which tells one iteration of a loop from the next by it.
///
/// # Safety
/// As [`step`]'s: attached, `code` the code object of the frame executing now.
pub(crate) unsafe fn iterator(code: *mut ffi::PyObject, offset: u32) -> *mut ffi::PyObject {
    let Some(slot) = SLOTS
        .read()
        .as_ref()
        .and_then(|m| m.get(&(code as usize, offset)).copied())
    else {
        return std::ptr::null_mut();
    };
    // SAFETY: as in `step`: the frame runs `code`, and `slot` lies within its locals and stack.
    unsafe {
        match current_frame(code) {
            Some(iframe) => local(iframe, slot as usize),
            None => std::ptr::null_mut(),
        }
    }
}

/// set_iter_types(points, quiet): the iterator types whose steps are points, and those whose
/// loops stop being checked at their first step.
#[pyfunction]
fn set_iter_types(points: Vec<Bound<'_, PyType>>, quiet: Vec<Bound<'_, PyType>>) -> PyResult<()> {
    if points.len() >= MAX_TYPES || quiet.len() >= MAX_TYPES {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "at most {} types of each kind",
            MAX_TYPES - 1
        )));
    }
    let mut keep = KEEP.lock();
    for (table, types) in [(&POINT_TYPES, &points), (&QUIET_TYPES, &quiet)] {
        for (i, t) in table.iter().enumerate() {
            let p = types
                .get(i)
                .map_or(std::ptr::null_mut(), |ty| ty.as_type_ptr());
            t.store(p, Ordering::Relaxed);
        }
    }
    keep.extend(points.into_iter().chain(quiet).map(Bound::unbind));
    Ok(())
}

/// set_iter_slots(code, slots): the FOR_ITER offsets of `code` whose steps may be points, with
/// the index in the frame's `localsplus` of the iterator each advances ([(offset, index)]).
/// The caller keeps `code` alive until clear_iter_slots().
#[pyfunction]
fn set_iter_slots(code: &Bound<'_, PyAny>, slots: Vec<(u32, u32)>) -> PyResult<()> {
    // SAFETY: a type check on a live object.
    if unsafe { ffi::PyCode_Check(code.as_ptr()) } == 0 {
        return Err(pyo3::exceptions::PyTypeError::new_err(
            "set_iter_slots() needs a code object",
        ));
    }
    if slots.is_empty() {
        return Ok(());
    }
    let mut map = SLOTS.write();
    let m = map.get_or_insert_with(SlotMap::default);
    for (offset, index) in slots {
        m.insert((code.as_ptr() as usize, offset), index);
    }
    SLOT_COUNT.store(m.len(), Ordering::Release);
    Ok(())
}

/// clear_iter_slots(): forget every registered slot (the code objects may go away).
#[pyfunction]
fn clear_iter_slots() {
    let mut map = SLOTS.write();
    *map = None;
    SLOT_COUNT.store(0, Ordering::Release);
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(set_iter_types, m)?)?;
    m.add_function(wrap_pyfunction!(set_iter_slots, m)?)?;
    m.add_function(wrap_pyfunction!(clear_iter_slots, m)?)?;
    Ok(())
}
