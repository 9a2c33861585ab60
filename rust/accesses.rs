//! What the step from a scheduling point does, for explore mode's partial-order reduction
//! (`sched/explore.rs`): an [`Access`] per location (code object, instruction offset).
//!
//! The classification itself is Python's (`pytest_ftrace.ftrace.modes.explore.Classifier`,
//! installed with `set_access_classifier`): it follows the bytecode from the point to every
//! next point and says whether the step only reads or writes one location key (a name, or
//! "a container item"), or is opaque (a call, a return to unknown code, anything else). It runs
//! once per location of a run, the first time a thread reaches it; the answer is kept here.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use parking_lot::Mutex;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::sched::explore::{
    Access, ANY_ITEM, ATTR_FAMILY, ATTR_NAME_BITS, ATTR_OBJECT, ITEM_FAMILY,
};
use crate::sched::Location;

/// Whether points record their access (an explore run is on).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Location -> (access, whether it depends on the callers: asked again at every visit).
static TABLE: Mutex<Option<HashMap<Location, (Access, bool)>>> = Mutex::new(None);

/// `classifier(code, offset) -> (0 opaque | 1 read | 2 write, key, depends on the callers)`.
static CLASSIFIER: Mutex<Option<Py<PyAny>>> = Mutex::new(None);

/// The locations made for accesses given at points in primitives ([`synthetic`]): one per
/// access, found without going over the whole table at every lock operation.
static SYNTHETIC: Mutex<Option<HashMap<Access, Location>>> = Mutex::new(None);

/// The step each managed thread is about to take, when its location's answer depends on the
/// visit (the object it works on): (thread, location, access).
static VISITS: Mutex<Vec<(u32, Location, Access)>> = Mutex::new(Vec::new());

/// Whether a worker's first step (from its round's start to its first point: the runner's code
/// and the start of the test's body) touches nothing shared.
static START_SAFE: AtomicBool = AtomicBool::new(false);

/// An explore run starts (`on`) or another kind of run does: the table starts empty (code
/// objects of earlier runs may be gone and their addresses reused).
pub fn reset(on: bool) {
    let mut table = TABLE.lock();
    *table = None;
    *SYNTHETIC.lock() = None;
    drop(table);
    VISITS.lock().clear();
    crate::visits::reset();
    ENABLED.store(on, Relaxed);
}

#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

/// The access of the step thread `tid` takes from `at`: its own visit's answer when the
/// location's depends on the visit, else the location's (opaque when unknown).
pub fn classify(tid: u32, at: Location) -> Access {
    if let Some(&(_, _, a)) = VISITS.lock().iter().find(|&&(t, w, _)| t == tid && w == at) {
        return a;
    }
    classify_at(at)
}

/// The access of the step from `at` (opaque when unknown).
pub fn classify_at(at: Location) -> Access {
    if at == crate::sched::AT_START && START_SAFE.load(Relaxed) {
        return Access::Start;
    }
    TABLE
        .lock()
        .as_ref()
        .and_then(|m| m.get(&at).map(|&(a, _)| a))
        .unwrap_or(Access::Opaque)
}

/// Install the Python classifier (None: none, every step is opaque), and say whether a
/// worker's first step is safe.
pub fn set_classifier(classifier: Option<Py<PyAny>>, start_safe: bool) {
    START_SAFE.store(start_safe && classifier.is_some(), Relaxed);
    let old = std::mem::replace(&mut *CLASSIFIER.lock(), classifier);
    drop(old);
    crate::visits::reset();
}

/// A key's hash: "item" (any container's items) is [`ANY_ITEM`], "item:N" (one container's)
/// is of [`ITEM_FAMILY`]; "attr:NAME" (the attribute of an object the classifier could not
/// find) and "attr:NAME@N" (of the round's object N) are of [`ATTR_FAMILY`], with the name's
/// hash and N + 1 (0 for any object); any other key is of neither.
fn hash_key(key: &str) -> u64 {
    if key == "item" {
        return ANY_ITEM;
    }
    let hash = |text: &str| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        h.finish()
    };
    if key.starts_with("item:") {
        return (hash(key) | ITEM_FAMILY).min(ANY_ITEM - 1);
    }
    if key.starts_with("attr:") {
        let (name, object) = match key.rsplit_once('@') {
            Some((name, n)) => match n.parse::<u64>() {
                Ok(n) => (name, (n + 1).min(ATTR_OBJECT >> ATTR_NAME_BITS)),
                Err(_) => (key, 0),
            },
            None => (key, 0),
        };
        let low = hash(name) & ((1 << ATTR_NAME_BITS) - 1);
        return ATTR_FAMILY | (object << ATTR_NAME_BITS) | low;
    }
    hash(key) & !(ITEM_FAMILY | ATTR_FAMILY)
}

/// An access from the classifier's answer: 1 a read, 2 a write of `key`; 3 a write of the two
/// keys of `key` separated by a NUL; 4 an operation on the lock `key`; 5 nothing shared (the
/// code after a release that uses only locals); 6 a read of the first of two keys and a write
/// of the second; anything else opaque.
pub fn from_answer(kind: u8, key: &str) -> Access {
    // An object's number in the key sits between two \x01 (`Classifier.object_key`).
    let stripped;
    let key = if key.contains('\x01') {
        stripped = key.replace('\x01', "");
        stripped.as_str()
    } else {
        key
    };
    match kind {
        1 => Access::Read(hash_key(key)),
        2 => Access::Write(hash_key(key)),
        3 => match key.split_once('\0') {
            Some((a, b)) => Access::Write2(hash_key(a), hash_key(b)),
            None => Access::Write(hash_key(key)),
        },
        4 => Access::Lock(hash_key(key)),
        6 => match key.split_once('\0') {
            Some((a, b)) => Access::ReadWrite(hash_key(a), hash_key(b)),
            None => Access::Write(hash_key(key)),
        },
        5 => Access::Local,
        _ => Access::Opaque,
    }
}

/// Locations that stand for an access given at a point in a primitive (`sched_point_as`):
/// (id, 1), ids from here up, far above any object's address; offset 1 shows the step as one
/// inside a lock, condition, join or sleep.
const SYNTHETIC_BASE: usize = 1 << 60;

/// The location of a point in a primitive whose step does `access` (see [`SYNTHETIC_BASE`]).
pub fn synthetic(access: Access) -> Location {
    let mut table = TABLE.lock();
    let mut synthetic = SYNTHETIC.lock();
    let made = synthetic.get_or_insert_with(HashMap::new);
    if let Some(&at) = made.get(&access) {
        return at;
    }
    let at = (SYNTHETIC_BASE + made.len(), 1);
    made.insert(access, at);
    table
        .get_or_insert_with(HashMap::new)
        .insert(at, (access, false));
    at
}

/// Record the access of the step from `offset` of `code`: once per location, or at every
/// visit when it depends on the callers (the step returns into them). A location whose visits
/// disagree is opaque from then on (a thread waiting there may have either answer).
///
/// # Safety
/// `code` is a live code object and the calling thread is attached to the interpreter.
pub unsafe fn note(code: *mut ffi::PyObject, offset: u32) {
    let at = (code as usize, offset);
    let known = TABLE
        .lock()
        .as_ref()
        .and_then(|m| m.get(&at).map(|&(_, dynamic)| dynamic));
    if known == Some(false) {
        return;
    }
    // A location whose answer depends on the visit: from a template of its, without Python
    // when the visit's objects and callers fit one (visits.rs).
    // SAFETY: attached; `code` runs in the top frame.
    let again = match known {
        Some(true) => unsafe { crate::visits::answer(code, at) },
        _ => None,
    };
    let (access, dynamic) = match again {
        Some((kind, key)) => {
            crate::visits::counted(true);
            if crate::visits::checking() {
                // SAFETY: as this function's.
                let python = unsafe { ask_only(code, at) };
                crate::visits::compared(python == Some((kind, key.clone())));
            }
            (from_answer(kind, &key), true)
        }
        None => {
            if known.is_some() {
                crate::visits::counted(false);
            }
            // SAFETY: as this function's.
            unsafe { ask(code, at) }
        }
    };
    if dynamic {
        // This visit's answer, for this thread's step (another thread at the same location
        // may work on another object).
        if let Some(tid) = crate::engine::with_managed(|_, t| t) {
            let mut visits = VISITS.lock();
            visits.retain(|&(t, _, _)| t != tid);
            visits.push((tid, at, access));
        }
    }
    let mut table = TABLE.lock();
    let entry = table
        .get_or_insert_with(HashMap::new)
        .entry(at)
        .or_insert((access, dynamic));
    if entry.0 != access {
        entry.0 = Access::Opaque;
    }
    entry.1 |= dynamic;
}

/// The Python classifier's answer for the step from `at` (keeping its template, if any).
///
/// # Safety
/// Attached; `code` is the running frame's live code object.
unsafe fn ask(code: *mut ffi::PyObject, at: Location) -> (Access, bool) {
    // SAFETY: attached (see above); `code` is borrowed for the length of this call.
    let py = unsafe { Python::assume_attached() };
    let classifier = CLASSIFIER.lock().as_ref().map(|c| c.clone_ref(py));
    classifier.map_or((Access::Opaque, false), |f| {
        // SAFETY: as above.
        let obj = unsafe { Bound::from_borrowed_ptr(py, code) };
        let answer = f
            .call1(py, (obj, at.1))
            .and_then(|r| r.extract::<(u8, String, bool, Py<PyAny>)>(py));
        match answer {
            Ok((kind, key, dynamic, template)) => {
                if dynamic && !template.is_none(py) {
                    // SAFETY: as this function's.
                    unsafe { crate::visits::keep(code, at, kind, &key, template.bind(py)) };
                }
                (from_answer(kind, &key), dynamic)
            }
            Err(_) => (Access::Opaque, false),
        }
    })
}

/// The Python classifier's (kind, key) for the step from `at`, its objects' numbers without
/// their marks, keeping nothing (a check of the templates' answers).
///
/// # Safety
/// Attached; `code` is the running frame's live code object.
unsafe fn ask_only(code: *mut ffi::PyObject, at: Location) -> Option<(u8, String)> {
    // SAFETY: as this function's.
    let py = unsafe { Python::assume_attached() };
    let f = CLASSIFIER.lock().as_ref().map(|c| c.clone_ref(py))?;
    // SAFETY: as above.
    let obj = unsafe { Bound::from_borrowed_ptr(py, code) };
    let (kind, key, _, _) = f
        .call1(py, (obj, at.1))
        .and_then(|r| r.extract::<(u8, String, bool, Py<PyAny>)>(py))
        .ok()?;
    Some((kind, key.replace('\x01', "")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::explore::{dependent, overlap};

    #[test]
    fn answers_make_accesses_keyed_by_name() {
        assert_eq!(from_answer(0, "attr:n"), Access::Opaque);
        let (Access::Read(a), Access::Write(b)) =
            (from_answer(1, "attr:n"), from_answer(2, "attr:n"))
        else {
            panic!("a read and a write");
        };
        assert_eq!(a, b);
        assert_ne!(from_answer(1, "attr:n"), from_answer(1, "attr:m"));
        assert_eq!(from_answer(7, "x"), Access::Opaque);
        // an attribute per object: one object's `n` is not another's, the `n` of an object
        // the classifier could not find may be any object's
        let (one, two, any) = (
            hash_key("attr:n@0"),
            hash_key("attr:n@1"),
            hash_key("attr:n"),
        );
        assert!(!overlap(one, two));
        assert!(overlap(one, any) && overlap(any, two) && overlap(one, one));
        assert!(!overlap(any, hash_key("attr:m")));
        assert!(!overlap(one, hash_key("attr:m@0")));
        assert!(!overlap(any, hash_key("global:n")) && !overlap(any, hash_key("item")));
        assert!(dependent(
            from_answer(2, "attr:n@3"),
            from_answer(1, "attr:n")
        ));
        assert!(!dependent(
            from_answer(2, "attr:n@3"),
            from_answer(2, "attr:n@4")
        ));
        assert_eq!(
            from_answer(3, "attr:n\0lock:1"),
            Access::Write2(hash_key("attr:n"), hash_key("lock:1"))
        );
    }

    #[test]
    fn an_objects_number_is_read_without_its_marks() {
        // `Classifier.object_key` marks an object's number (visits.rs fills it in afresh)
        assert_eq!(from_answer(1, "item:\x013\x01"), from_answer(1, "item:3"));
        assert_eq!(
            from_answer(3, "attr:n\0lock:\x011\x01"),
            Access::Write2(hash_key("attr:n"), hash_key("lock:1"))
        );
        assert_ne!(
            from_answer(4, "lock:\x011\x01"),
            from_answer(4, "lock:\x0112\x01")
        );
    }
}
