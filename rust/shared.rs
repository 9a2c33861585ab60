//! The signal behind `--ftrace-budget`: did a round touch one object from two threads, at least
//! one of them writing? A test whose rounds never do has nothing to interleave, and stops
//! after a few rounds; one that does runs on to its time budget.
//!
//! The object an access works on is on the frame's value stack (an attribute's owner, a
//! subscript's container, `in`'s right-hand side), in a cell (closure variables), or is the
//! frame's globals with a name. `pytest_ftrace.ftrace.sharing` computes, once per code object,
//! where that object lies for each hooked instruction (a flow analysis of the bytecode, as for
//! loop steps in `iterpoints`) and registers it here; the frame is read through the same
//! layout (`_PyInterpreterFrame` of 3.12 and 3.13).
//!
//! The signal errs on the side of "shared", never the other way: an access whose object
//! cannot be found, a table that overflows, or a reused address count as sharing. A method
//! loaded from a mutable object counts as a write (the call may change it in C). A generator
//! step writes its frame; a loop step over a container reads the container.
//!
//! Cheap by construction: only while Python has tracking on (the first rounds of a test
//! whose round count is not fixed), and within a round only until the first sharing is seen.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::iterpoints;
use crate::opcodes::Kind;

extern "C" {
    // The type of closure cells (public C API, `cellobject.h`); pyo3-ffi does not declare it.
    static mut PyCell_Type: ffi::PyTypeObject;
}

/// A multiplicative hash of addresses (looked up at every tracked access).
#[derive(Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(7) ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(v as u64);
    }
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
}

type Fast = BuildHasherDefault<AddrHasher>;

/// Where the object of one hooked instruction is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Owner {
    /// `HOW_*` and flag bits.
    how: u32,
    /// Index in `localsplus` (a stack slot or a cell).
    index: u32,
    /// The global's name (an interned string, kept alive by the code object).
    name: usize,
}

/// The object is `localsplus[index]`.
const HOW_LOCAL: u32 = 0;
/// The object is the frame's globals, the location (globals, name).
const HOW_GLOBAL: u32 = 1;
const HOW_MASK: u32 = 0xf;
/// The instruction writes the location.
const FLAG_WRITE: u32 = 0x10;
/// The instruction loads a method: a write unless the owner is immutable.
const FLAG_METHOD: u32 = 0x20;
/// The method only reads a builtin container (a read when the owner is one).
const FLAG_READS: u32 = 0x40;

/// (code object address, offset) -> where its object is.
type AccessMap = HashMap<(usize, u32), Owner, Fast>;
static ACCESS: RwLock<Option<AccessMap>> = RwLock::new(None);

/// On while a test wants the signal.
static TRACKING: AtomicBool = AtomicBool::new(false);
/// This round has touched a location from two threads (or could not tell).
static ROUND_SHARED: AtomicBool = AtomicBool::new(false);
/// Tracked events (for the overhead bench and the tests).
static EVENTS: AtomicU64 = AtomicU64::new(0);

/// Objects one round may remember before it counts as sharing (bounded memory).
const MAX_OBJECTS: usize = 1 << 16;

/// Touched by one thread so far, written by it.
const WRITTEN: u8 = 1;
/// Touched by more than one thread (read only so far).
const MANY: u8 = 2;

/// What keeps an entry's address meaning the object first seen there (objects die within a
/// round, and their memory, or a free list, hands the address to the next one): a weak
/// reference (dead: the address was reused), or, for lists, dicts and closure cells (no weak
/// references; free lists reuse lists and dicts at once), a watch of `deaths.rs`, whose noted
/// death removes the entry (holding them would keep what they hold alive: the test's weak
/// references' callbacks and `__del__` would run late). A strong reference until the round's
/// record is dropped only if the watch is not in place.
#[derive(Clone, Copy)]
enum Guard {
    None,
    Weak(usize),
    Watched,
    Strong(usize),
}

struct Entry {
    tid: u64,
    flags: u8,
    guard: Guard,
}

struct Seen {
    /// Object address (or global location) -> who touched it, how.
    objects: HashMap<usize, Entry, Fast>,
    /// Why the round counts as shared (the first reason).
    why: Option<&'static str>,
}

static SEEN: Mutex<Option<Seen>> = Mutex::new(None);

static NEXT_TID: AtomicUsize = AtomicUsize::new(1);
thread_local! {
    static TID: u64 = NEXT_TID.fetch_add(1, Ordering::Relaxed) as u64;
    /// This thread is inside [`touch`] (a collection it triggers may run hooked code).
    static INSIDE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether accesses are being tracked now (one atomic load).
#[inline]
pub fn tracking() -> bool {
    TRACKING.load(Ordering::Relaxed) && !ROUND_SHARED.load(Ordering::Relaxed)
}

fn mark(why: &'static str) {
    ROUND_SHARED.store(true, Ordering::Relaxed);
    if INSIDE.try_with(|i| i.get()).unwrap_or(true) {
        return; // the record is ours already, up the stack
    }
    let mut seen = SEEN.lock();
    let s = seen.get_or_insert_with(new_seen);
    if s.why.is_none() {
        s.why = Some(why);
    }
}

fn new_seen() -> Seen {
    Seen {
        objects: HashMap::default(),
        why: None,
    }
}

/// Make the guard of a first touch of `obj`.
///
/// # Safety
/// `obj` is a live object; attached.
unsafe fn guard_of(obj: *mut ffi::PyObject) -> Guard {
    unsafe {
        let ty = ffi::Py_TYPE(obj);
        if crate::deaths::watchable(obj) {
            crate::deaths::watch(crate::deaths::SHARED, obj as usize);
            return Guard::Watched;
        }
        if ty == std::ptr::addr_of_mut!(ffi::PyList_Type)
            || ty == std::ptr::addr_of_mut!(ffi::PyDict_Type)
            || ty == std::ptr::addr_of_mut!(PyCell_Type)
        {
            ffi::Py_INCREF(obj);
            return Guard::Strong(obj as usize);
        }
        if (*ty).tp_weaklistoffset != 0 {
            let w = ffi::PyWeakref_NewRef(obj, std::ptr::null_mut());
            if w.is_null() {
                ffi::PyErr_Clear();
                return Guard::None;
            }
            return Guard::Weak(w as usize);
        }
        Guard::None
    }
}

/// Whether the object an entry was made for has died (its address may hold another now).
///
/// # Safety
/// Attached.
unsafe fn dead(guard: Guard) -> bool {
    match guard {
        Guard::Weak(w) => unsafe {
            let mut obj: *mut ffi::PyObject = std::ptr::null_mut();
            match ffi::compat::PyWeakref_GetRef(w as *mut ffi::PyObject, &mut obj) {
                1 => {
                    ffi::Py_DECREF(obj);
                    false
                }
                0 => true,
                _ => {
                    ffi::PyErr_Clear();
                    false
                }
            }
        },
        _ => false,
    }
}

/// Let go of the guards of a record (outside the lock: dropping a list may free objects
/// whose finalizers run hooked code).
///
/// # Safety
/// Attached.
unsafe fn release(seen: Option<Seen>) {
    let Some(seen) = seen else { return };
    for (_, entry) in seen.objects {
        match entry.guard {
            Guard::Weak(p) | Guard::Strong(p) => unsafe { ffi::Py_DECREF(p as *mut ffi::PyObject) },
            Guard::None | Guard::Watched => {}
        }
    }
}

/// One access to the location `key` (the object `obj`, when it is one) by this thread.
///
/// # Safety
/// `obj` is null or a live object; attached.
unsafe fn touch(key: usize, obj: *mut ffi::PyObject, write: bool) {
    EVENTS.fetch_add(1, Ordering::Relaxed);
    if INSIDE.try_with(|i| i.replace(true)).unwrap_or(true) {
        ROUND_SHARED.store(true, Ordering::Relaxed); // re-entered: cannot tell, so shared
        return;
    }
    let tid = TID.try_with(|t| *t).unwrap_or(0);
    let mut old = Guard::None;
    {
        let mut guard = SEEN.lock();
        let seen = guard.get_or_insert_with(new_seen);
        // The watched objects that died: their addresses may be another object's now.
        for (addr, ty) in crate::deaths::take(crate::deaths::SHARED) {
            seen.objects.remove(&(addr ^ ty.rotate_left(29)));
        }
        if seen.why.is_none() {
            let full = seen.objects.len() >= MAX_OBJECTS;
            let reused = match seen.objects.get(&key) {
                Some(e) => unsafe { dead(e.guard) },
                None => false,
            };
            if reused {
                old = seen.objects.remove(&key).map_or(Guard::None, |e| e.guard);
            }
            let shared = match seen.objects.get_mut(&key) {
                None => {
                    if full {
                        seen.why = Some("too many objects to tell");
                        true
                    } else {
                        let guard = if obj.is_null() {
                            Guard::None
                        } else {
                            unsafe { guard_of(obj) }
                        };
                        let flags = if write { WRITTEN } else { 0 };
                        seen.objects.insert(key, Entry { tid, flags, guard });
                        false
                    }
                }
                Some(e) => {
                    if e.tid == tid && e.flags & MANY == 0 {
                        if write {
                            e.flags |= WRITTEN;
                        }
                        false
                    } else if write || e.flags & WRITTEN != 0 {
                        seen.why = Some("a location touched by two threads, one writing");
                        true
                    } else {
                        e.flags |= MANY;
                        false
                    }
                }
            };
            if shared {
                ROUND_SHARED.store(true, Ordering::Relaxed);
            }
        }
    }
    if let Guard::Weak(p) | Guard::Strong(p) = old {
        unsafe { ffi::Py_DECREF(p as *mut ffi::PyObject) };
    }
    let _ = INSIDE.try_with(|i| i.set(false));
}

/// Whether a method loaded from `obj` cannot change it (modules, classes, immutable builtins).
///
/// # Safety
/// `obj` is a live object; attached to the interpreter.
unsafe fn immutable(obj: *mut ffi::PyObject) -> bool {
    unsafe {
        let ty = ffi::Py_TYPE(obj);
        ffi::PyType_Check(obj) != 0
            || ty == std::ptr::addr_of_mut!(ffi::PyModule_Type)
            || ty == std::ptr::addr_of_mut!(ffi::PyUnicode_Type)
            || ty == std::ptr::addr_of_mut!(ffi::PyBytes_Type)
            || ty == std::ptr::addr_of_mut!(ffi::PyLong_Type)
            || ty == std::ptr::addr_of_mut!(ffi::PyFloat_Type)
            || ty == std::ptr::addr_of_mut!(ffi::PyTuple_Type)
            || ty == std::ptr::addr_of_mut!(ffi::PyFrozenSet_Type)
            || ty == std::ptr::addr_of_mut!(ffi::PyBool_Type)
            || obj == ffi::Py_None()
    }
}

/// Whether `obj` is exactly a builtin container whose read-only methods `sharing.py` names.
///
/// # Safety
/// `obj` is a live object.
unsafe fn builtin_container(obj: *mut ffi::PyObject) -> bool {
    unsafe {
        let ty = ffi::Py_TYPE(obj);
        ty == std::ptr::addr_of_mut!(ffi::PyList_Type)
            || ty == std::ptr::addr_of_mut!(ffi::PyDict_Type)
            || ty == std::ptr::addr_of_mut!(ffi::PySet_Type)
            || ty == std::ptr::addr_of_mut!(ffi::PyByteArray_Type)
            || immutable(obj)
    }
}

/// A hooked point of `kind` at `offset` of `code` (not a loop step: see [`on_iterator`]).
///
/// # Safety
/// Called from the INSTRUCTION callback: attached, `code` the code of the frame executing now.
pub unsafe fn on_point(code: *mut ffi::PyObject, offset: u32, kind: Kind) {
    unsafe {
        let Some(iframe) = iterpoints::current_frame(code) else {
            mark("an access outside a known frame");
            return;
        };
        match kind {
            // The generator's frame lives in the generator: two threads stepping one
            // generator meet at its frame.
            Kind::Generator => {
                let frame = ffi::PyEval_GetFrame();
                let gen = if frame.is_null() {
                    std::ptr::null_mut()
                } else {
                    ffi::PyFrame_GetGenerator(frame)
                };
                if gen.is_null() {
                    ffi::PyErr_Clear();
                    touch(iframe as usize, std::ptr::null_mut(), true);
                } else {
                    touch(gen as usize, gen, true);
                    ffi::Py_DECREF(gen);
                }
            }
            Kind::Iteration => {}
            Kind::Access => {
                let owner = ACCESS
                    .read()
                    .as_ref()
                    .and_then(|m| m.get(&(code as usize, offset)).copied());
                let Some(owner) = owner else {
                    mark("an access whose object is not known");
                    return;
                };
                let mut write = owner.how & FLAG_WRITE != 0;
                let mut obj = std::ptr::null_mut();
                let key = match owner.how & HOW_MASK {
                    HOW_GLOBAL => {
                        ((*iframe).f_globals as usize).wrapping_mul(31) ^ owner.name.rotate_left(17)
                    }
                    HOW_LOCAL => {
                        obj = iterpoints::local(iframe, owner.index as usize);
                        if obj.is_null() {
                            mark("an access whose object is not known");
                            return;
                        }
                        if owner.how & FLAG_METHOD != 0
                            && !immutable(obj)
                            && !(owner.how & FLAG_READS != 0 && builtin_container(obj))
                        {
                            write = true;
                        }
                        obj as usize ^ (ffi::Py_TYPE(obj) as usize).rotate_left(29)
                    }
                    _ => {
                        mark("an access whose object is not known");
                        return;
                    }
                };
                touch(key, obj, write);
            }
        }
    }
}

unsafe extern "C" fn first_referent(obj: *mut ffi::PyObject, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` points at the caller's slot; `obj` is a live object during traversal.
    unsafe {
        if obj.is_null() || ffi::PyType_Check(obj) != 0 {
            return 0; // a heap type's instances visit their type first
        }
        *(arg as *mut *mut ffi::PyObject) = obj;
    }
    1
}

/// A loop step over a container iterator: a read of the container (the first object the
/// iterator's traversal visits: a list, dict, set or deque iterator's container).
///
/// # Safety
/// `iter` is a live iterator on this thread's frame; attached.
pub unsafe fn on_iterator(iter: *mut ffi::PyObject) {
    unsafe {
        let ty = ffi::Py_TYPE(iter);
        let traverse = (*ty).tp_traverse;
        let mut found: *mut ffi::PyObject = std::ptr::null_mut();
        if let Some(traverse) = traverse {
            traverse(
                iter,
                first_referent,
                std::ptr::addr_of_mut!(found) as *mut c_void,
            );
        }
        if found.is_null() {
            // An exhausted iterator has let go of its container: nothing left to race on.
            return;
        }
        touch(
            found as usize ^ (ffi::Py_TYPE(found) as usize).rotate_left(29),
            found,
            false,
        );
    }
}

/// set_access_slots(code, entries): where the object of each hooked instruction of `code` is,
/// as [(offset, how, index, name_id)] (see `pytest_ftrace.ftrace.sharing`). The caller keeps
/// `code` alive until clear_access_slots().
#[pyfunction]
fn set_access_slots(code: &Bound<'_, PyAny>, entries: Vec<(u32, u32, u32, usize)>) -> PyResult<()> {
    // SAFETY: a type check on a live object.
    if unsafe { ffi::PyCode_Check(code.as_ptr()) } == 0 {
        return Err(pyo3::exceptions::PyTypeError::new_err(
            "set_access_slots() needs a code object",
        ));
    }
    let mut map = ACCESS.write();
    let m = map.get_or_insert_with(HashMap::default);
    for (offset, how, index, name) in entries {
        m.insert((code.as_ptr() as usize, offset), Owner { how, index, name });
    }
    Ok(())
}

/// clear_access_slots(): forget every registered entry (the code objects may go away).
#[pyfunction]
fn clear_access_slots() {
    *ACCESS.write() = None;
}

/// shared_track(on): track accesses from now on (True) or not; either way the round's record
/// starts empty.
#[pyfunction]
fn shared_track(_py: Python<'_>, on: bool) {
    if on {
        crate::deaths::install();
    }
    let old = SEEN.lock().take();
    crate::deaths::clear(crate::deaths::SHARED);
    ROUND_SHARED.store(false, Ordering::Relaxed);
    TRACKING.store(on, Ordering::Relaxed);
    // SAFETY: attached (a Python token is held).
    unsafe { release(old) };
}

/// shared_take(): why the round since the last call counts as shared (None: nothing was
/// touched from two threads); the record starts empty again.
#[pyfunction]
fn shared_take(_py: Python<'_>) -> Option<&'static str> {
    let old = SEEN.lock().take();
    crate::deaths::clear(crate::deaths::SHARED);
    let why = old.as_ref().and_then(|s| s.why);
    let forced = ROUND_SHARED.swap(false, Ordering::Relaxed);
    // SAFETY: attached (a Python token is held).
    unsafe { release(old) };
    why.or(if forced {
        Some("an access that could not be told apart")
    } else {
        None
    })
}

/// shared_events(): accesses tracked so far in this process.
#[pyfunction]
fn shared_events() -> u64 {
    EVENTS.load(Ordering::Relaxed)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(set_access_slots, m)?)?;
    m.add_function(wrap_pyfunction!(clear_access_slots, m)?)?;
    m.add_function(wrap_pyfunction!(shared_track, m)?)?;
    m.add_function(wrap_pyfunction!(shared_take, m)?)?;
    m.add_function(wrap_pyfunction!(shared_events, m)?)?;
    Ok(())
}
