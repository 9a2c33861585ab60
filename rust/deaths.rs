//! Deaths of watched objects of the types that have no weak references but hold the test's
//! objects: lists, dicts and closure cells, and the iterators of loops over containers
//! ([`watch_type`]). Race tracking (`hb.rs`) must know when the object
//! of a location dies (its address may go to another object at once: both types have free
//! lists), and must not keep it alive (its items would live on: the test's weak references'
//! callbacks and `__del__` would run late). A weak reference tells the first without the
//! second, for the types that have them; for these three, the types' `tp_dealloc` is wrapped,
//! once, when race tracking is first turned on: the wrapper notes the death of an address
//! that is watched, then deallocates as before. Nothing the test can see changes (the slot is
//! not visible from Python), and while nothing is watched the wrapper costs one atomic load.
//!
//! Two trackers watch, each with its own set ([`HB`]: race tracking, [`SHARED`]: the budget's
//! sharing signal), cleared at their round's end; a death is noted synchronously, before the
//! memory can be reused, so the tracker sees it before any access to a later object at the
//! address.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

use parking_lot::Mutex;
use pyo3::ffi;

extern "C" {
    // The type of closure cells (public C API, `cellobject.h`); pyo3-ffi does not declare it.
    static mut PyCell_Type: ffi::PyTypeObject;
}

/// The watcher of race tracking (`hb.rs`).
pub const HB: usize = 0;
/// The watcher of the budget's sharing signal (`shared.rs`).
pub const SHARED: usize = 1;

/// How many addresses are watched (0: the wrapper only calls the original).
static WATCHED_LEN: AtomicUsize = AtomicUsize::new(0);
/// Addresses of the watched objects alive -> the watchers (bit per watcher).
/// Keyed by address with the tracker's fast hash: every death of a list or dict looks here
/// while anything is watched.
static WATCHED: Mutex<Option<Watched>> = Mutex::new(None);

type Watched = HashMap<usize, u8, std::hash::BuildHasherDefault<crate::hb::FastHasher>>;
/// Per watcher: (address, type address) of its watched objects that died since its last
/// [`take`].
static DIED: [Mutex<Vec<(usize, usize)>>; 2] = [Mutex::new(Vec::new()), Mutex::new(Vec::new())];
static DIED_ANY: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];

/// The original deallocators of list, dict and cell (set once, before any wrapper runs).
static ORIGINAL: [AtomicUsize; 3] = [
    AtomicUsize::new(0),
    AtomicUsize::new(0),
    AtomicUsize::new(0),
];
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

fn noted(obj: *mut ffi::PyObject) {
    if WATCHED_LEN.load(Ordering::Acquire) == 0 {
        return;
    }
    let removed = WATCHED
        .lock()
        .as_mut()
        .and_then(|w| w.remove(&(obj as usize)));
    if let Some(bits) = removed {
        WATCHED_LEN.fetch_sub(1, Ordering::AcqRel);
        // SAFETY: the object is being deallocated: its type is still set.
        let ty = unsafe { ffi::Py_TYPE(obj) } as usize;
        for who in [HB, SHARED] {
            if bits & (1 << who) != 0 {
                DIED[who].lock().push((obj as usize, ty));
                DIED_ANY[who].store(true, Ordering::Release);
            }
        }
    }
}

/// # Safety
/// Called by the interpreter as the type's `tp_dealloc`.
unsafe fn forward(which: usize, obj: *mut ffi::PyObject) {
    noted(obj);
    let original = ORIGINAL[which].load(Ordering::Acquire);
    // SAFETY: set from the type's own slot before the wrapper was put in its place.
    unsafe {
        if original != 0 {
            let f = std::mem::transmute::<usize, ffi::destructor>(original);
            f(obj);
        }
    }
}

unsafe extern "C" fn list_dealloc(obj: *mut ffi::PyObject) {
    // SAFETY: as the slot's.
    unsafe { forward(0, obj) }
}

unsafe extern "C" fn dict_dealloc(obj: *mut ffi::PyObject) {
    // SAFETY: as the slot's.
    unsafe { forward(1, obj) }
}

unsafe extern "C" fn cell_dealloc(obj: *mut ffi::PyObject) {
    // SAFETY: as the slot's.
    unsafe { forward(2, obj) }
}

/// Other types watched (loop iterators): their original deallocators, found by type.
const MAX_OTHER: usize = 16;
#[allow(clippy::declare_interior_mutable_const)]
const NONE: AtomicUsize = AtomicUsize::new(0);
static OTHER_TYPES: [AtomicUsize; MAX_OTHER] = [NONE; MAX_OTHER];
static OTHER_ORIGINAL: [AtomicUsize; MAX_OTHER] = [NONE; MAX_OTHER];
static OTHER_LOCK: Mutex<()> = Mutex::new(());

unsafe extern "C" fn other_dealloc(obj: *mut ffi::PyObject) {
    noted(obj);
    // SAFETY: as the slot's; the type is one of the table's (only they have this wrapper),
    // and its original was stored before the wrapper was put in place.
    unsafe {
        let ty = ffi::Py_TYPE(obj) as usize;
        for (t, original) in OTHER_TYPES.iter().zip(&OTHER_ORIGINAL) {
            if t.load(Ordering::Acquire) == ty {
                let original = original.load(Ordering::Acquire);
                if original != 0 {
                    let f = std::mem::transmute::<usize, ffi::destructor>(original);
                    f(obj);
                }
                return;
            }
        }
    }
}

/// Whether deaths of instances of `ty` can be watched: a static type that cannot be
/// subclassed (a builtin iterator), its deallocator wrapped now if it was not yet (at most
/// [`MAX_OTHER`] types).
///
/// # Safety
/// `ty` is a live type; attached.
pub unsafe fn watch_type(ty: *mut ffi::PyTypeObject) -> bool {
    if !INSTALLED.load(Ordering::Acquire) {
        return false;
    }
    // SAFETY: a live type's fields; static types live for the process.
    unsafe {
        // (an atomic field on the free-threaded build: read through the API)
        let flags = ffi::PyType_GetFlags(ty);
        if flags & (ffi::Py_TPFLAGS_HEAPTYPE | ffi::Py_TPFLAGS_BASETYPE) != 0 {
            return false;
        }
        let _guard = OTHER_LOCK.lock();
        let mut free = None;
        for (i, t) in OTHER_TYPES.iter().enumerate() {
            match t.load(Ordering::Acquire) {
                0 if free.is_none() => free = Some(i),
                t if t == ty as usize => return true,
                _ => {}
            }
        }
        let (Some(i), Some(original)) = (free, (*ty).tp_dealloc) else {
            return false;
        };
        OTHER_ORIGINAL[i].store(original as usize, Ordering::Release);
        OTHER_TYPES[i].store(ty as usize, Ordering::Release);
        (*ty).tp_dealloc = Some(other_dealloc);
        true
    }
}

/// Put the wrappers in place (once per process). Attached.
pub fn install() {
    INSTALL.call_once(|| {
        // SAFETY: attached (the caller); the static types live for the process; each original
        // is stored before its wrapper can run.
        unsafe {
            let types = [
                std::ptr::addr_of_mut!(ffi::PyList_Type),
                std::ptr::addr_of_mut!(ffi::PyDict_Type),
                std::ptr::addr_of_mut!(PyCell_Type),
            ];
            let wrappers: [unsafe extern "C" fn(*mut ffi::PyObject); 3] =
                [list_dealloc, dict_dealloc, cell_dealloc];
            for (i, ty) in types.into_iter().enumerate() {
                let Some(original) = (*ty).tp_dealloc else {
                    return;
                };
                ORIGINAL[i].store(original as usize, Ordering::Release);
            }
            for (ty, w) in types.into_iter().zip(wrappers) {
                (*ty).tp_dealloc = Some(w);
            }
            INSTALLED.store(true, Ordering::Release);
        }
    });
}

/// Whether [`watch`] can tell when `obj` dies: exactly a list, a dict or a cell.
///
/// # Safety
/// `obj` is a live object.
pub unsafe fn watchable(obj: *mut ffi::PyObject) -> bool {
    if !INSTALLED.load(Ordering::Acquire) {
        return false;
    }
    // SAFETY: a live object's type.
    unsafe {
        let ty = ffi::Py_TYPE(obj);
        ty == std::ptr::addr_of_mut!(ffi::PyList_Type)
            || ty == std::ptr::addr_of_mut!(ffi::PyDict_Type)
            || ty == std::ptr::addr_of_mut!(PyCell_Type)
    }
}

/// Note for watcher `who` the death of the (live, [`watchable`]) object at `addr`.
pub fn watch(who: usize, addr: usize) {
    let mut w = WATCHED.lock();
    let bits = w
        .get_or_insert_with(Watched::default)
        .entry(addr)
        .or_insert_with(|| {
            WATCHED_LEN.fetch_add(1, Ordering::AcqRel);
            0
        });
    *bits |= 1 << who;
}

/// (address, type address) of the objects watched by `who` that died since its last call
/// (cheap when none did).
/// Whether an object watcher `who` watches has died since its last [`take`] (one atomic load:
/// callers look before they take).
pub fn any_died(who: usize) -> bool {
    DIED_ANY[who].load(Ordering::Acquire)
}

pub fn take(who: usize) -> Vec<(usize, usize)> {
    if !DIED_ANY[who].load(Ordering::Acquire) {
        return Vec::new();
    }
    let mut died = DIED[who].lock();
    DIED_ANY[who].store(false, Ordering::Release);
    std::mem::take(&mut *died)
}

/// Watcher `who` watches nothing (its round ends).
pub fn clear(who: usize) {
    let mut w = WATCHED.lock();
    if let Some(w) = w.as_mut() {
        if !w.is_empty() {
            w.retain(|_, bits| {
                *bits &= !(1 << who);
                *bits != 0
            });
        }
        WATCHED_LEN.store(w.len(), Ordering::Release);
    }
    drop(w);
    DIED[who].lock().clear();
    DIED_ANY[who].store(false, Ordering::Release);
}
