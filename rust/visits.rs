//! Explore mode's per-visit answers without Python: a step whose access depends on the objects
//! it works on (a container's subscript or method, a `with` block on a lock, ...) or on its
//! callers (a return into them) is described again at every visit of its location.
//!
//! The Python classifier (`Classifier.answer` in pytest_ftrace/ftrace/modes/explore.py) runs
//! once per location and shape; with its answer it gives a [`Template`]: the lookups it made in
//! the live frames (a local, a global, an attribute in a local's instance dict, at a frame
//! depth), the type each found, which lookups found the same object, and where the numbers of
//! the objects it named (by first use in the round, [`object_number`]) sit in the key. At the
//! next visits the core makes the same lookups itself; while the types, the sameness and (when
//! the answer followed a return into the callers) the callers' code and offsets are those of a
//! template, the answer is that template's, its objects numbered afresh in the same order.
//! Otherwise Python is asked again (and its new template kept beside the others).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::sched::Location;

/// The most templates kept per location (a location used with more shapes asks Python).
const MAX_TEMPLATES: usize = 16;
/// How many frames a chain of callers covers (as the Python classifier's `_chain`).
const CHAIN: usize = 5;

/// One lookup in a live frame.
struct Probe {
    /// 0: the frame of the step, 1: its caller, ...
    depth: usize,
    /// 0 a variable of the frame, 1 a global, 2 an attribute in the instance dict of a variable.
    how: u8,
    name: Py<PyAny>,
    attr: Option<Py<PyAny>>,
    /// The type of what it found (None: nothing, or None), kept alive so its address stays its.
    kind: Option<Py<PyAny>>,
    /// The first lookup that found the same object.
    same: usize,
}

enum Part {
    Text(String),
    /// The number of the object the lookup found.
    Object(usize),
}

/// A location's answer for one shape of its visits.
pub struct Template {
    /// The callers' (code, offset) when the answer depends on them.
    chain: Option<Vec<(usize, i32)>>,
    probes: Vec<Probe>,
    /// The lookups whose objects are numbered, in the order Python numbered them.
    order: Vec<usize>,
    kind: u8,
    key: Vec<Part>,
}

/// Counts of the visits of locations whose answer depends on the visit: answered from a
/// template, answered by Python; and with checking on (a test's), templated answers Python
/// was asked for too, and those that differed.
static FROM_TEMPLATE: AtomicU64 = AtomicU64::new(0);
static FROM_PYTHON: AtomicU64 = AtomicU64::new(0);
static CHECKED: AtomicU64 = AtomicU64::new(0);
static DIFFERED: AtomicU64 = AtomicU64::new(0);
static CHECKING: AtomicBool = AtomicBool::new(false);

/// A visit of a location whose answer depends on the visit: from a template or from Python.
pub fn counted(template: bool) {
    let c = if template {
        &FROM_TEMPLATE
    } else {
        &FROM_PYTHON
    };
    c.fetch_add(1, Relaxed);
}

/// Whether each templated answer is compared with Python's.
pub fn checking() -> bool {
    CHECKING.load(Relaxed)
}

pub fn compared(same: bool) {
    CHECKED.fetch_add(1, Relaxed);
    if !same {
        DIFFERED.fetch_add(1, Relaxed);
    }
}

/// Turn the check on (the counts zeroed) or off (`explore_visit_counts`).
pub fn set_checking(on: bool) {
    CHECKING.store(on, Relaxed);
    if on {
        for c in [&FROM_TEMPLATE, &FROM_PYTHON, &CHECKED, &DIFFERED] {
            c.store(0, Relaxed);
        }
    }
}

/// (from a template, from Python, checked, differed) since the last `set_checking`.
pub fn counts() -> (u64, u64, u64, u64) {
    (
        FROM_TEMPLATE.load(Relaxed),
        FROM_PYTHON.load(Relaxed),
        CHECKED.load(Relaxed),
        DIFFERED.load(Relaxed),
    )
}

/// Location -> its templates, newest first.
static TEMPLATES: Mutex<Option<HashMap<Location, Vec<Template>>>> = Mutex::new(None);

/// The objects named in the round under way (locks, containers): address -> (number, object).
/// The objects are kept until the round ends, so no address is reused in it.
static NUMBERS: Mutex<Option<Numbered>> = Mutex::new(None);

/// Address -> (number, the object kept).
type Numbered = HashMap<usize, (u64, Py<PyAny>)>;

/// The number of `obj` in the round: its order of first use.
///
/// # Safety
/// Attached; `obj` is a live object.
pub unsafe fn object_number(obj: *mut ffi::PyObject) -> u64 {
    let mut numbers = NUMBERS.lock();
    let map = numbers.get_or_insert_with(HashMap::new);
    let next = map.len() as u64;
    if let Some(&(n, _)) = map.get(&(obj as usize)) {
        return n;
    }
    // SAFETY: attached (see above); a new strong reference to a live object.
    let held = unsafe { Bound::from_borrowed_ptr(Python::assume_attached(), obj) }.unbind();
    map.insert(obj as usize, (next, held));
    next
}

/// A round starts: its objects are numbered afresh. Attached (the references are dropped).
pub fn new_round() {
    let old = NUMBERS.lock().take();
    drop(old); // outside the lock: a finaliser may run
}

/// An explore run starts or ends: no template or number of an earlier one is kept (the code
/// objects and types they name may be gone). Attached.
pub fn reset() {
    let old = TEMPLATES.lock().take();
    drop(old);
    new_round();
}

/// A new reference to what `probe` finds in `frame`, or null.
///
/// # Safety
/// Attached; `frame` is a live frame.
unsafe fn look(frame: *mut ffi::PyFrameObject, probe: &Probe) -> *mut ffi::PyObject {
    // SAFETY: attached; `frame` live; the names are str objects; nothing here runs Python code
    // of the test's (frame variables, a dict's str key, an instance dict).
    unsafe {
        match probe.how {
            1 => {
                let globals = ffi::PyFrame_GetGlobals(frame);
                if globals.is_null() {
                    ffi::PyErr_Clear();
                    return std::ptr::null_mut();
                }
                // a strong reference taken inside the dict's lookup (free-threaded: no window
                // in which another thread's store could free a borrowed value)
                let mut found = std::ptr::null_mut();
                if ffi::PyDict_Check(globals) != 0
                    && ffi::compat::PyDict_GetItemRef(globals, probe.name.as_ptr(), &mut found) < 0
                {
                    ffi::PyErr_Clear();
                    found = std::ptr::null_mut();
                }
                ffi::Py_DECREF(globals);
                found
            }
            how => {
                let var = crate::hb::PyFrame_GetVar(frame, probe.name.as_ptr());
                if var.is_null() {
                    ffi::PyErr_Clear();
                    return var;
                }
                if how == 0 {
                    return var;
                }
                let attr = match &probe.attr {
                    Some(a) => a.as_ptr(),
                    None => {
                        ffi::Py_DECREF(var);
                        return std::ptr::null_mut();
                    }
                };
                let found = crate::hb::instance_attr(var, attr);
                ffi::Py_DECREF(var);
                found
            }
        }
    }
}

/// Owned references, released when dropped.
struct Refs(Vec<*mut ffi::PyObject>);

impl Drop for Refs {
    fn drop(&mut self) {
        for &p in &self.0 {
            if !p.is_null() {
                // SAFETY: each is a reference this holds, released with the interpreter
                // attached (the visit's thread holds it throughout).
                unsafe { ffi::Py_DECREF(p) };
            }
        }
    }
}

/// The running frame and up to `depth` callers (new references; fewer when the stack ends).
///
/// # Safety
/// Attached.
unsafe fn frames(code: *mut ffi::PyObject, depth: usize) -> Option<Refs> {
    // SAFETY: attached; the frame objects are kept by the references taken here.
    unsafe {
        let top = ffi::PyEval_GetFrame();
        if top.is_null() {
            return None;
        }
        let top_code = ffi::PyFrame_GetCode(top);
        if top_code.is_null() {
            ffi::PyErr_Clear();
            return None;
        }
        ffi::Py_DECREF(top_code.cast());
        if top_code.cast::<ffi::PyObject>() != code {
            return None;
        }
        let mut out = Refs(vec![ffi::Py_NewRef(top.cast::<ffi::PyObject>())]);
        while out.0.len() <= depth {
            let back = ffi::PyFrame_GetBack((*out.0.last()?).cast::<ffi::PyFrameObject>());
            if back.is_null() {
                break;
            }
            out.0.push(back.cast());
        }
        Some(out)
    }
}

/// The (code, offset) of the frames in `frames` (at most [`CHAIN`]).
///
/// # Safety
/// Attached; the frames are live.
unsafe fn chain_of(frames: &Refs) -> Vec<(usize, i32)> {
    frames
        .0
        .iter()
        .take(CHAIN)
        .map(|&f| {
            // SAFETY: as this function's.
            unsafe {
                let frame = f.cast::<ffi::PyFrameObject>();
                let code = ffi::PyFrame_GetCode(frame);
                if !code.is_null() {
                    ffi::Py_DECREF(code.cast());
                }
                (code as usize, ffi::PyFrame_GetLasti(frame))
            }
        })
        .collect()
}

fn type_of(obj: *mut ffi::PyObject) -> usize {
    // SAFETY: a live object's type pointer (None and nothing count alike).
    if obj.is_null() || obj == unsafe { ffi::Py_None() } {
        0
    } else {
        unsafe { ffi::Py_TYPE(obj) as usize }
    }
}

/// The answer (kind, key) of the step from `at`, in `code` running in the calling thread's
/// top frame, from a template of the location's, or None (ask Python).
///
/// # Safety
/// Attached; `code` is the running frame's live code object.
pub unsafe fn answer(code: *mut ffi::PyObject, at: Location) -> Option<(u8, String)> {
    let templates = TEMPLATES.lock();
    let found = templates.as_ref()?.get(&at)?;
    let deepest = found
        .iter()
        .map(|t| {
            let probes = t.probes.iter().map(|p| p.depth).max().unwrap_or(0);
            if t.chain.is_some() {
                probes.max(CHAIN - 1)
            } else {
                probes
            }
        })
        .max()?;
    // SAFETY: attached; `code` runs in the top frame.
    let frames = unsafe { frames(code, deepest)? };
    let mut chain: Option<Vec<(usize, i32)>> = None;
    'templates: for t in found {
        if let Some(want) = &t.chain {
            // SAFETY: the frames are live (held).
            let have = chain.get_or_insert_with(|| unsafe { chain_of(&frames) });
            if have != want {
                continue;
            }
        }
        let mut objects = Refs(Vec::with_capacity(t.probes.len()));
        for (i, p) in t.probes.iter().enumerate() {
            let Some(&frame) = frames.0.get(p.depth) else {
                continue 'templates;
            };
            // SAFETY: attached; the frame is live.
            let obj = unsafe { look(frame.cast(), p) };
            objects.0.push(obj);
            let kind = p.kind.as_ref().map_or(0, |k| k.as_ptr() as usize);
            if type_of(obj) != kind {
                continue 'templates;
            }
            let norm = |o: *mut ffi::PyObject| if type_of(o) == 0 { 0 } else { o as usize };
            let first = objects.0[..=i]
                .iter()
                .position(|&o| norm(o) == norm(obj))
                .unwrap_or(i);
            if first != p.same {
                continue 'templates;
            }
        }
        let mut numbers = vec![0u64; t.probes.len()];
        for &p in &t.order {
            let obj = *objects.0.get(p)?;
            if obj.is_null() {
                continue 'templates;
            }
            // SAFETY: attached; `obj` is held.
            numbers[p] = unsafe { object_number(obj) };
        }
        let mut key = String::new();
        for part in &t.key {
            match part {
                Part::Text(s) => key.push_str(s),
                Part::Object(p) => key.push_str(&numbers[*p].to_string()),
            }
        }
        return Some((t.kind, key));
    }
    None
}

/// Keep the template Python gave with its answer (kind, key) for the step from `at` (see
/// `Classifier.answer` for its shape); an answer whose template cannot be read keeps none.
///
/// # Safety
/// Attached; `code` is the running frame's live code object.
pub unsafe fn keep(
    code: *mut ffi::PyObject,
    at: Location,
    kind: u8,
    key: &str,
    template: &Bound<'_, PyAny>,
) {
    // SAFETY: as this function's.
    if let Some(t) = unsafe { read(code, kind, key, template) } {
        let mut templates = TEMPLATES.lock();
        let list = templates
            .get_or_insert_with(HashMap::new)
            .entry(at)
            .or_default();
        list.insert(0, t);
        list.truncate(MAX_TEMPLATES);
    }
}

unsafe fn read(
    code: *mut ffi::PyObject,
    kind: u8,
    key: &str,
    template: &Bound<'_, PyAny>,
) -> Option<Template> {
    let t = template.cast::<PyTuple>().ok()?;
    if t.len() != 6 {
        return None;
    }
    let callers: bool = t.get_item(0).ok()?.extract().ok()?;
    let probes = t.get_item(1).ok()?;
    let probes = probes.cast::<PyList>().ok()?;
    let kinds = t.get_item(2).ok()?;
    let kinds = kinds.cast::<PyList>().ok()?;
    let same: Vec<usize> = t.get_item(3).ok()?.extract().ok()?;
    let numbers = t.get_item(4).ok()?;
    let numbers = numbers.cast::<PyDict>().ok()?;
    let order: Vec<usize> = t.get_item(5).ok()?.extract().ok()?;
    if kinds.len() != probes.len() || same.len() != probes.len() {
        return None;
    }
    let mut read = Vec::with_capacity(probes.len());
    for (i, p) in probes.iter().enumerate() {
        let p = p.cast::<PyTuple>().ok()?.clone();
        let depth: usize = p.get_item(0).ok()?.extract().ok()?;
        let how: u8 = p.get_item(1).ok()?.extract().ok()?;
        let name = p.get_item(2).ok()?;
        let attr = p.get_item(3).ok()?;
        if how > 2 || !name.is_instance_of::<pyo3::types::PyString>() {
            return None;
        }
        let attr = if attr.is_none() {
            None
        } else if attr.is_instance_of::<pyo3::types::PyString>() {
            Some(attr.unbind())
        } else {
            return None;
        };
        if how == 2 && attr.is_none() {
            return None;
        }
        let kind = kinds.get_item(i).ok()?;
        read.push(Probe {
            depth,
            how,
            name: name.unbind(),
            attr,
            kind: (!kind.is_none()).then(|| kind.unbind()),
            same: *same.get(i)?,
        });
    }
    if order.iter().any(|&p| p >= read.len()) {
        return None;
    }
    let mut parts = Vec::new();
    for (i, piece) in key.split('\x01').enumerate() {
        if i % 2 == 0 {
            parts.push(Part::Text(piece.to_string()));
        } else {
            let n: u64 = piece.parse().ok()?;
            let probe: usize = numbers.get_item(n).ok()??.extract().ok()?;
            if probe >= read.len() || !order.contains(&probe) {
                return None;
            }
            parts.push(Part::Object(probe));
        }
    }
    let chain = if callers {
        let deepest = CHAIN - 1;
        // SAFETY: attached; `code` runs in the top frame.
        let frames = unsafe { frames(code, deepest)? };
        // SAFETY: held frames.
        Some(unsafe { chain_of(&frames) })
    } else {
        None
    };
    Some(Template {
        chain,
        probes: read,
        order,
        kind,
        key: parts,
    })
}
