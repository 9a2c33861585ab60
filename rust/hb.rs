//! Happens-before tracking for exact mode (`--ftrace-races`): vector clocks per managed thread
//! and per synchronisation object, and per accessed location (object and attribute, container
//! and key, module global) the last write and the reads since, so that two accesses of
//! different threads, at least one a write, that happens-before does not order are a
//! **conflict**.
//!
//! Exact mode runs one managed thread at a time, so the accesses of a round reach this module
//! in the order they happen: the state is one mutex that is never contended in a round.
//!
//! What orders accesses ("strong" edges): a lock's release and a later acquire of it (the
//! conditions, events, semaphores, barriers and queues of `threading` and `queue` are built
//! on those locks), a thread's start (the parent's past goes to the child) and its join (the
//! child's past goes to the joiner). An operation of a built-in container (dict, list, set,
//! deque: a subscript, `in`, or a method) is atomic by design, so it orders too, but only
//! through that container ("weak" edges).
//!
//! Besides the pairs, a write whose thread read the location before another thread's write to
//! it, and not since, is a **stale write** (a lost update or a check-then-act): reported when
//! strong edges do not order the three accesses, whatever the container operations between
//! them did.
//!
//! Cost: an access looks its code location up in a table (filled from Python, which decodes
//! the bytecode: `pytest_ftrace/ftrace/accesses.py`), finds the accessed object in the frame,
//! and updates that location; vector clocks are joined only at synchronisation, and a location
//! touched by one thread only never compares clocks.
//!
//! A location must name one object for the round, though the object may die in it and its
//! address go to another one (a free list hands it on at once). It does not keep the object
//! alive (the test's objects die when their last reference goes, weak references' callbacks
//! and `__del__` run then, as without the plugin): it keeps a weak reference, and an access
//! whose object is not the one a location's weak reference names (dead: another object has
//! the address now) starts a new location, the old one retired with its label, computed when
//! it was made. A list, a dict or a closure cell (no weak references) is watched instead:
//! `deaths.rs` notes its death, which retires its locations. Other objects without weak
//! references (an instance of `__slots__` without `__weakref__`, a subclass of list or dict
//! with `__slots__`) are held until the round ends.
//! A location's key is of a simple type (a str, an int, a tuple of them: `simple_hash`), which
//! holds nothing of the test's.

use std::collections::{HashMap as StdHashMap, HashSet as StdHashSet};
use std::ffi::CStr;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::raw::c_char;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::engine;

extern "C" {
    // Public C API since 3.12 (pyo3-ffi declares it for 3.12+ targets only): a new reference
    // to the frame's variable `name` (a local, cell or free variable), or NULL with NameError.
    pub(crate) fn PyFrame_GetVar(
        frame: *mut ffi::PyFrameObject,
        name: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject;
}

/// A fast hash for the maps an access looks up (addresses, offsets, small integers; the std
/// SipHash took more time than the rest of an access's lookups). Multiply-rotate per word,
/// rotated at the end so the low bits (the bucket) depend on every input bit.
#[derive(Default)]
pub(crate) struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    fn write_u8(&mut self, v: u8) {
        self.write_u64(v as u64);
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(v as u64);
    }
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0xf135_7aea_2e62_a9c5);
    }
}

type HashMap<K, V> = StdHashMap<K, V, BuildHasherDefault<FastHasher>>;
type HashSet<K> = StdHashSet<K, BuildHasherDefault<FastHasher>>;

/// Whether accesses are tracked (set from Python for exact-mode tests).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// At most this many distinct conflicts are kept per round.
const MAX_CONFLICTS: usize = 64;
/// At most this many rounds with conflicts are kept per run.
const MAX_ROUNDS: usize = 256;

// Operations of a spec.
const OP_READ: u8 = 0;
const OP_WRITE: u8 = 1;
const OP_DELETE: u8 = 2;
const OP_METHOD: u8 = 3;
/// A loop's step over a container (`FOR_ITER`): a read of its contents, by one iteration.
const OP_ITER: u8 = 4;
/// A spec keyed `offset | EXTRA`: a second access of the instruction at `offset`, made by the
/// builtin it loads (`len(x)` reads the container `x`, `next(g)` resumes the generator `g`).
const EXTRA: u32 = 1 << 31;
/// A spec keyed `offset | BEFORE`: an access made, since the thread's last point, by an
/// instruction that is no point (a container's truth test, `if items:`), applied before the
/// point at `offset`; its `call_offset` is where that instruction is.
const BEFORE: u32 = 1 << 30;
/// The key of a generator's resumptions (`next(g)`, `g.send(v)`): a write of the generator.
const RESUME_KEY: &CStr = c"<resume>";
// Where the accessed object comes from.
const OWNER_LOCAL: u8 = 1;
const OWNER_GLOBAL: u8 = 2;
const OWNER_GLOBALS: u8 = 3;
/// A cell variable itself (`nonlocal x`): the key is its index in the frame's locals.
const OWNER_CELL: u8 = 4;
// What the key is.
const KEY_ATTR: u8 = 0;
const KEY_CONST: u8 = 1;
const KEY_LOCAL: u8 = 2;
const KEY_NONE: u8 = 3;

/// The access at one instruction, as decoded from the bytecode. The pointers are borrowed
/// from the Python objects [`SPECS`] keeps for the code object.
#[derive(Clone, Copy)]
struct Spec {
    op: u8,
    check: bool,
    owner_kind: u8,
    owner_name: *mut ffi::PyObject,
    owner_attr: *mut ffi::PyObject,
    key_kind: u8,
    key: *mut ffi::PyObject,
    method: *mut ffi::PyObject,
    /// A method's call instruction (u32::MAX: not known).
    call_offset: u32,
}

// SAFETY: the pointers are only dereferenced with the interpreter attached, and the objects
// they point to are kept alive by the entry of SPECS that holds the spec.
unsafe impl Send for Spec {}

/// The specs of one point (one instruction offset): its own access, the second access of the
/// builtin it loads ([`EXTRA`]) and the access made before it by an instruction that is no
/// point ([`BEFORE`]). One lookup per point finds all three.
#[derive(Default)]
pub(crate) struct PointSpecs {
    main: Option<Spec>,
    extra: Option<Spec>,
    before: Option<Spec>,
}

struct CodeSpecs {
    _keep: Py<PyAny>,
    _code: Py<PyAny>,
    /// Boxed: its address stays the same for the life of the process (an entry of [`SPECS`]
    /// is never replaced nor removed, nor is its map changed once made), so a thread may keep
    /// a pointer to it ([`LAST_SPECS`]) or to one of its values ([`Specs`]).
    by_offset: Box<HashMap<u32, PointSpecs>>,
}

static SPECS: parking_lot::Mutex<Option<HashMap<usize, CodeSpecs>>> = parking_lot::Mutex::new(None);
/// How many [`BEFORE`] specs [`SPECS`] holds (none: a point looks none up).
static BEFORE_SPECS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

type OffsetSpecs = HashMap<u32, PointSpecs>;

thread_local! {
    /// (code object address, its specs) of this thread's last access: consecutive accesses
    /// are mostly in one code object, and the shared lock cost more than the rest of the
    /// lookup (its cache line moves between CPUs at every hand-over).
    static LAST_SPECS: std::cell::Cell<(usize, *const OffsetSpecs)> =
        const { std::cell::Cell::new((0, std::ptr::null())) };
}

/// The specs of one point, looked up once ([`specs_of`]) for [`before_point`] and
/// [`on_access`]. Empty when tracking is off or the point has no spec.
#[derive(Clone, Copy)]
pub struct Specs(*const PointSpecs);

impl Specs {
    pub const NONE: Specs = Specs(std::ptr::null());

    fn get(&self) -> Option<&PointSpecs> {
        // SAFETY: the pointer is to a value of a map boxed in an entry of SPECS, which is never
        // replaced, removed nor changed, and the entry keeps the code object alive (so its
        // address names no other code object).
        unsafe { self.0.as_ref() }
    }
}

/// The specs of the point at `offset` of `code` (one hash probe for the three kinds).
pub fn specs_of(code: *mut ffi::PyObject, offset: u32) -> Specs {
    if !ENABLED.load(Ordering::Relaxed) {
        return Specs::NONE;
    }
    let code = code as usize;
    let cached = LAST_SPECS
        .try_with(|c| c.get())
        .unwrap_or((0, std::ptr::null()));
    let specs = if cached.0 == code && !cached.1.is_null() {
        cached.1
    } else {
        let all = SPECS.lock();
        let Some(found) = all
            .as_ref()
            .and_then(|all| all.get(&code))
            .map(|c| &*c.by_offset as *const OffsetSpecs)
        else {
            return Specs::NONE;
        };
        let _ = LAST_SPECS.try_with(|c| c.set((code, found)));
        found
    };
    // SAFETY: as in [`Specs::get`].
    match unsafe { (*specs).get(&offset) } {
        Some(p) => Specs(p),
        None => Specs::NONE,
    }
}

/// One access, as kept in a location and a conflict.
#[derive(Clone, Copy, Debug)]
struct Acc {
    tid: u32,
    /// The thread's own clock when it made the access.
    epoch: u32,
    /// The access's place in the round (accesses are numbered in the order they happen).
    seq: u32,
    code: usize,
    offset: u32,
    /// 0 read, 1 write, 2 delete.
    op: u8,
    check: bool,
    atomic: bool,
    /// A loop's step over a container ([`OP_ITER`]).
    iter: bool,
    /// A step's iterator (its address; see `Loc::iters` for why it names one iterator).
    ctx: usize,
    /// The calling frame (its address, code object and the offset of its call): a read in
    /// one helper feeds a write in another one called after it by the same frame
    /// (`if env.get(k) is None: env.set(k, v)`).
    parent: usize,
    parent_code: usize,
    parent_at: u32,
}

/// What tells a location's object from a later one at its address.
#[derive(Default)]
enum Guard {
    #[default]
    None,
    /// A weak reference to the object (it dies when the test lets go of it).
    Weak(Py<PyAny>),
    /// A list, dict or cell whose death `deaths.rs` watches (retired: [`Guard::None`]).
    Watched,
    /// The object itself, for another type without weak references (held until the round
    /// ends).
    Strong(Py<PyAny>),
}

impl Guard {
    /// A guard for `obj`, and the owner name of its label when the guard is weak (the
    /// object may be gone when the label is needed). Makes objects: call it outside the
    /// state's lock (an allocation may collect, and a finalizer may run hooked code).
    fn new(obj: &Bound<'_, PyAny>, kind: u8) -> (Guard, Option<OwnerName>) {
        let ptr = obj.as_ptr();
        // SAFETY: attached (a bound object); the new reference is owned by the guard.
        unsafe {
            if crate::deaths::watchable(ptr) {
                return (Guard::Watched, Some(OwnerName::of(obj, kind)));
            }
            if (*ffi::Py_TYPE(ptr)).tp_weaklistoffset != 0 {
                let w = ffi::PyWeakref_NewRef(ptr, std::ptr::null_mut());
                if !w.is_null() {
                    let text = OwnerName::of(obj, 0);
                    return (
                        Guard::Weak(Bound::from_owned_ptr(obj.py(), w).unbind()),
                        Some(text),
                    );
                }
                ffi::PyErr_Clear();
            }
        }
        (Guard::Strong(obj.clone().unbind()), None)
    }

    /// Whether the guard's object is `obj` (alive, at that address). No object is made.
    fn is(&self, obj: *mut ffi::PyObject) -> bool {
        match self {
            Guard::None => false,
            Guard::Watched => true,
            Guard::Strong(o) => o.as_ptr() == obj,
            // SAFETY: attached (the callers hold the interpreter); a referent found alive is
            // `obj` itself (two live objects never share an address), which the caller holds,
            // so the reference taken here is let go without freeing anything.
            Guard::Weak(w) => unsafe {
                let mut found: *mut ffi::PyObject = std::ptr::null_mut();
                match ffi::compat::PyWeakref_GetRef(w.as_ptr(), &mut found) {
                    1 => {
                        ffi::Py_DECREF(found);
                        found == obj
                    }
                    0 => false,
                    _ => {
                        ffi::PyErr_Clear();
                        false
                    }
                }
            },
        }
    }

    /// Another guard of the same object (a new reference: no object is made).
    fn clone_ref(&self, py: Python<'_>) -> Guard {
        match self {
            Guard::None => Guard::None,
            Guard::Watched => Guard::Watched,
            Guard::Weak(w) => Guard::Weak(w.clone_ref(py)),
            Guard::Strong(o) => Guard::Strong(o.clone_ref(py)),
        }
    }

    /// The object, when the guard holds it.
    fn held(&self) -> Option<&Py<PyAny>> {
        match self {
            Guard::Strong(o) => Some(o),
            _ => None,
        }
    }
}

/// The owner half of a location's label, kept as what it is made from (a str object, or a
/// static type's C name): the text is made only for a location whose label is shown (making
/// it for every new location cost more than the rest of making the location).
enum OwnerName {
    /// A module's `__name__` or a heap type's `__qualname__` (a str).
    Str(Py<PyAny>),
    /// A static type's `tp_name` ("module.Name": its `__qualname__` is the part after the
    /// last dot), alive as long as the process.
    Static(*const c_char),
    /// No name found.
    Fixed(&'static str),
}

// SAFETY: `Static` points to a static type's name, never freed nor changed; `Str` is only
// used with the interpreter attached.
unsafe impl Send for OwnerName {}

impl OwnerName {
    /// The name [`owner_text`] would give `owner` for a location of kind `kind`, not made
    /// into text yet. No Python code runs and no object is made.
    fn of(owner: &Bound<'_, PyAny>, kind: u8) -> OwnerName {
        let py = owner.py();
        let ptr = owner.as_ptr();
        // SAFETY: attached (a bound object); borrowed references are made strong before kept.
        unsafe {
            if kind == 3 {
                if ffi::PyDict_Check(ptr) == 0 {
                    return OwnerName::Fixed("?");
                }
                let name =
                    ffi::PyDict_GetItemWithError(ptr, pyo3::intern!(py, "__name__").as_ptr());
                if name.is_null() {
                    ffi::PyErr_Clear();
                    return OwnerName::Fixed("?");
                }
                if ffi::PyUnicode_Check(name) == 0 {
                    return OwnerName::Fixed("?");
                }
                return OwnerName::Str(Bound::from_borrowed_ptr(py, name).unbind());
            }
            let t = if ffi::PyType_Check(ptr) != 0 {
                ptr.cast::<ffi::PyTypeObject>()
            } else {
                ffi::Py_TYPE(ptr)
            };
            // (tp_flags is an atomic field on the free-threaded build: read through the API)
            if ffi::PyType_GetFlags(t) & ffi::Py_TPFLAGS_HEAPTYPE != 0 {
                let q = (*t.cast::<ffi::PyHeapTypeObject>()).ht_qualname;
                if q.is_null() || ffi::PyUnicode_Check(q) == 0 {
                    return OwnerName::Fixed("");
                }
                OwnerName::Str(Bound::from_borrowed_ptr(py, q).unbind())
            } else if (*t).tp_name.is_null() {
                OwnerName::Fixed("")
            } else {
                OwnerName::Static((*t).tp_name)
            }
        }
    }

    fn text(&self, py: Python<'_>) -> String {
        match self {
            OwnerName::Str(s) => s.bind(py).to_string(),
            // SAFETY: a static type's name: a NUL-terminated string that lives forever.
            OwnerName::Static(p) => unsafe { CStr::from_ptr(*p) }
                .to_string_lossy()
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_string(),
            OwnerName::Fixed(s) => s.to_string(),
        }
    }

    fn clone_ref(&self, py: Python<'_>) -> OwnerName {
        match self {
            OwnerName::Str(s) => OwnerName::Str(s.clone_ref(py)),
            OwnerName::Static(p) => OwnerName::Static(*p),
            OwnerName::Fixed(s) => OwnerName::Fixed(s),
        }
    }
}

#[derive(Default)]
struct Loc {
    /// What names the accessed object (see [`Guard`]) and the key (of a simple type).
    owner: Guard,
    /// The owner's name, taken with a weak guard (the object may be gone at the round's end).
    owner_text: Option<OwnerName>,
    key: Option<Py<PyAny>>,
    /// 0 attribute, 1 item, 2 whole container, 3 module global, 4 cell variable.
    kind: u8,
    first_tid: u32,
    shared: bool,
    last_write: Option<Acc>,
    /// The strong clock of the last write's thread when it wrote.
    write_svc: Vec<u32>,
    /// Reads since the last write, the latest per thread.
    reads: Vec<Acc>,
    /// Per thread: its reads since its own last write (the last [`READS_KEPT`]).
    pending: ReadsBy,
    /// Per thread: its latest loop step over this container. Its iterator (the step's `ctx`)
    /// is watched (`deaths.rs`: its death removes the entry, so that a later iteration's
    /// iterator at its address is not taken for it), or, for an iterator type that cannot be
    /// watched, kept alive here (with its container) until the round ends.
    iters: HashMap<u32, (Acc, Option<Py<PyAny>>)>,
    label: Option<(String, String)>,
}

/// Per thread: its reads since its own last write (a few threads: a list, not a map, which
/// would cost an allocation and a hash for every location read).
#[derive(Default)]
struct ReadsBy(Vec<(u32, Vec<Acc>)>);

impl ReadsBy {
    fn get(&self, tid: u32) -> Option<&Vec<Acc>> {
        self.0.iter().find(|(t, _)| *t == tid).map(|(_, r)| r)
    }

    fn entry(&mut self, tid: u32) -> &mut Vec<Acc> {
        let at = match self.0.iter().position(|(t, _)| *t == tid) {
            Some(at) => at,
            None => {
                self.0.push((tid, Vec::new()));
                self.0.len() - 1
            }
        };
        &mut self.0[at].1
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.0.iter().all(|(_, r)| r.is_empty())
    }

    /// Forget `tid`'s reads; its list keeps its room (a thread that writes and reads a
    /// location in turn allocates nothing).
    fn remove(&mut self, tid: u32) {
        if let Some((_, r)) = self.0.iter_mut().find(|(t, _)| *t == tid) {
            r.clear();
        }
    }

    fn clear(&mut self) {
        for (_, r) in &mut self.0 {
            r.clear();
        }
    }
}

impl Loc {
    /// Empty this location for another round's use (its lists keep their room); the Python
    /// references it held go to `refs`, to be released outside the state's lock.
    fn recycle(&mut self, refs: &mut Vec<Py<PyAny>>) {
        if let Guard::Weak(p) | Guard::Strong(p) = std::mem::take(&mut self.owner) {
            refs.push(p);
        }
        if let Some(OwnerName::Str(p)) = self.owner_text.take() {
            refs.push(p);
        }
        refs.extend(self.key.take());
        self.kind = 0;
        self.first_tid = 0;
        self.shared = false;
        self.last_write = None;
        self.write_svc.clear();
        self.reads.clear();
        self.pending.clear();
        refs.extend(self.iters.drain().filter_map(|(_, (_, it))| it));
        self.label = None;
    }
}

/// Emptied locations kept for the next rounds at most (their lists' room is what is reused).
const LOCS_KEPT: usize = 1 << 16;

#[derive(Clone, Debug)]
struct Conflict {
    loc: u32,
    first: Acc,
    second: Acc,
    /// A stale write: the read of `second`'s thread that `first` (another thread's write)
    /// made stale.
    read: Option<Acc>,
}

/// A conflict with its location named, kept after its round.
#[derive(Clone, Debug)]
struct Kept {
    kind: u8,
    owner: String,
    key: String,
    loc: u32,
    first: Acc,
    second: Acc,
    read: Option<Acc>,
}

#[derive(Default)]
struct Clocks {
    vc: Vec<u32>,
    svc: Vec<u32>,
    /// A synchronisation object's: the one thread whose releases made its clocks ([`NOBODY`]
    /// before the first, [`SEVERAL`] once a second thread released it). That thread's own
    /// clocks are at least these, so its acquire has nothing to join (a container one thread
    /// uses: an acquire and a release at each of its atomic operations).
    releaser: u32,
}

const NOBODY: u32 = u32::MAX;
const SEVERAL: u32 = u32::MAX - 1;

#[derive(Default)]
struct State {
    run: u64,
    generation: u64,
    iteration: Option<u64>,
    seq: u32,
    /// By thread id (a thread's clocks are empty until it is first seen in the round; emptied
    /// ones keep their room for the next round).
    threads: Vec<Clocks>,
    /// Synchronisation objects: (vector clock, strong vector clock).
    sync: HashMap<u64, Clocks>,
    locs: HashMap<(usize, u8, i64), u32>,
    /// Watched owners (see [`Guard::Watched`]) -> their locations.
    watched: HashMap<usize, Vec<u32>>,
    /// Watched loop iterators -> (location, thread) of the steps that name them.
    iter_watched: HashMap<usize, Vec<(u32, u32)>>,
    data: Vec<Loc>,
    /// Emptied locations of earlier rounds, reused by [`State::make`] (no allocation for a
    /// location's lists in a round like the ones before).
    spare: Vec<Loc>,
    conflicts: Vec<Conflict>,
    seen: HashSet<(u32, usize, u32, usize, u32, bool)>,
    /// (run, iteration) -> conflicts of that round.
    done: HashMap<(u64, u64), Vec<Kept>>,
    /// (generation, iteration) of the run's rounds, as sched_enter saw them.
    rounds: HashMap<(u64, u64), u64>,
    /// Accesses and the locations touched by more than one thread (for the statistics).
    accesses: u64,
    shared_locations: u64,
}

static STATE: parking_lot::Mutex<Option<State>> = parking_lot::Mutex::new(None);

fn join(into: &mut Vec<u32>, from: &[u32]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, &b) in into.iter_mut().zip(from) {
        if b > *a {
            *a = b;
        }
    }
}

/// Reads of one thread kept per location since its own last write.
const READS_KEPT: usize = 8;

fn keep_read(reads: &mut Vec<Acc>, acc: Acc) {
    if reads.len() >= READS_KEPT {
        // keep the earliest (a check, often) and the latest ones
        reads.remove(1);
    }
    reads.push(acc);
}

/// The read of `reads` (one thread's, since its own last write) that `write` acts on although
/// another thread's `w` came after it: none when the thread read the location again after
/// `w`. The read must feed the write: in the same code object, before it (not a read of a
/// loop's earlier pass, nor of a helper). A check (`if k not in d`) comes first, then the
/// latest such read.
fn feeding_read(reads: &[Acc], w: &Acc, write: &Acc) -> Option<Acc> {
    if reads.last()?.seq > w.seq {
        return None;
    }
    let feeds = |r: &&Acc| {
        let here = r.code == write.code && r.offset < write.offset;
        let helpers = r.code != write.code
            && r.parent != 0
            && r.parent == write.parent
            && r.parent_at < write.parent_at;
        r.seq < w.seq && (here || helpers) && !r.iter
    };
    reads
        .iter()
        .filter(feeds)
        .find(|r| r.check)
        .or_else(|| reads.iter().rev().find(|r| feeds(r)))
        .copied()
}

fn get(v: &[u32], i: u32) -> u32 {
    v.get(i as usize).copied().unwrap_or(0)
}

impl State {
    /// The clocks of `tid`, made on first sight (its own component starts at 1).
    fn clocks(&mut self, tid: u32) -> &mut Clocks {
        let t = tid as usize;
        if self.threads.len() <= t {
            self.threads.resize_with(t + 1, Clocks::default);
        }
        let c = &mut self.threads[t];
        if c.vc.len() <= t {
            // First seen in this round: its own component starts at 1.
            c.vc.clear();
            c.svc.clear();
            c.vc.resize(t + 1, 0);
            c.svc.resize(t + 1, 0);
            c.vc[t] = 1;
            c.svc[t] = 1;
        }
        c
    }

    /// The clocks of `tid`, if it has been seen in this round.
    fn clocks_of(&self, tid: u32) -> Option<&Clocks> {
        self.threads
            .get(tid as usize)
            .filter(|c| c.vc.len() > tid as usize)
    }

    fn release(&mut self, tid: u32, obj: u64, strong: bool) {
        self.clocks(tid);
        // The two tables are separate fields: join in place, no copy of a clock.
        let c = &mut self.threads[tid as usize];
        let s = self.sync.entry(obj).or_insert_with(|| Clocks {
            releaser: NOBODY,
            ..Clocks::default()
        });
        join(&mut s.vc, &c.vc);
        if strong {
            join(&mut s.svc, &c.svc);
        }
        s.releaser = match s.releaser {
            NOBODY => tid,
            r if r == tid => tid,
            _ => SEVERAL,
        };
        c.vc[tid as usize] += 1;
        c.svc[tid as usize] += 1;
    }

    fn acquire(&mut self, tid: u32, obj: u64, strong: bool) {
        self.clocks(tid);
        let Some(s) = self.sync.get(&obj) else {
            return;
        };
        if s.releaser == tid {
            return; // only this thread released it: nothing it does not know already
        }
        let c = &mut self.threads[tid as usize];
        join(&mut c.vc, &s.vc);
        if strong {
            join(&mut c.svc, &s.svc);
        }
    }

    /// Whether `a` happens before the current point of thread `tid` (all edges).
    fn ordered(&self, a: &Acc, tid: u32) -> bool {
        a.tid == tid
            || self
                .clocks_of(tid)
                .is_some_and(|c| a.epoch <= get(&c.vc, a.tid))
    }

    /// Whether `a` happens before the current point of thread `tid` by strong edges.
    fn strongly_ordered(&self, a: &Acc, tid: u32) -> bool {
        a.tid == tid
            || self
                .clocks_of(tid)
                .is_some_and(|c| a.epoch <= get(&c.svc, a.tid))
    }

    fn conflict(&mut self, loc: u32, first: Acc, second: Acc, read: Option<Acc>) {
        let key = (
            loc,
            first.code,
            first.offset,
            second.code,
            second.offset,
            read.is_some(),
        );
        if self.conflicts.len() >= MAX_CONFLICTS || !self.seen.insert(key) {
            return;
        }
        self.conflicts.push(Conflict {
            loc,
            first,
            second,
            read,
        });
    }

    /// A loop's step over the container of location `loc` (its contents): when another
    /// thread changed the contents since this thread's previous step of the same iteration,
    /// and no strong edge orders that change, the loop went on over a container mutated
    /// under it (a conflict whose `read` is the previous step).
    fn iteration_step(&mut self, loc: u32, acc: Acc) {
        let l = &self.data[loc as usize];
        let (Some((prev, _)), Some(w)) = (l.iters.get(&acc.tid), l.last_write) else {
            return;
        };
        let prev = *prev;
        if prev.ctx == acc.ctx
            && w.tid != acc.tid
            && w.seq > prev.seq
            && w.op != OP_READ
            && !self.strongly_ordered(&w, acc.tid)
        {
            self.conflict(loc, w, acc, Some(prev));
        }
    }

    /// A new location of the object at `obj` (guarded by `guard`); it replaces in [`State::locs`]
    /// a retired one of an object that had the address before.
    fn make(
        &mut self,
        at: (usize, u8, i64),
        guard: (Guard, Option<OwnerName>),
        key: Option<Py<PyAny>>,
        tid: u32,
    ) -> u32 {
        let l = self.data.len() as u32;
        if let Guard::Watched = guard.0 {
            crate::deaths::watch(crate::deaths::HB, at.0);
            self.watched.entry(at.0).or_default().push(l);
        }
        let mut loc = self.spare.pop().unwrap_or_default();
        loc.owner = guard.0;
        loc.owner_text = guard.1;
        loc.key = key;
        loc.kind = at.1;
        loc.first_tid = tid;
        self.data.push(loc);
        self.locs.insert(at, l);
        l
    }

    /// Retire the locations of the watched objects that died.
    fn retire_dead(&mut self) {
        if !crate::deaths::any_died(crate::deaths::HB) {
            return; // nothing died (most accesses): no list taken
        }
        for (addr, _) in crate::deaths::take(crate::deaths::HB) {
            for l in self.watched.remove(&addr).unwrap_or_default() {
                self.data[l as usize].owner = Guard::None;
            }
            for (l, tid) in self.iter_watched.remove(&addr).unwrap_or_default() {
                let iters = &mut self.data[l as usize].iters;
                if iters.get(&tid).is_some_and(|(a, _)| a.ctx == addr) {
                    iters.remove(&tid);
                }
            }
        }
    }

    /// Record an access of `tid` to location `loc`.
    fn access(&mut self, loc: u32, mut acc: Acc) {
        self.accesses += 1;
        let tid = acc.tid;
        acc.epoch = get(&self.clocks(tid).vc, tid);
        acc.seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let l = &mut self.data[loc as usize];
        if !l.shared && l.first_tid != tid {
            l.shared = true;
            self.shared_locations += 1;
        }
        if acc.iter {
            self.iteration_step(loc, acc);
        }
        if !self.data[loc as usize].shared {
            // One thread so far: no clock to compare, only the history to keep.
            let l = &mut self.data[loc as usize];
            if acc.op == OP_READ {
                l.reads.clear();
                l.reads.push(acc);
                if !acc.iter {
                    keep_read(l.pending.entry(tid), acc);
                }
            } else {
                l.last_write = Some(acc);
                l.reads.clear();
                l.pending.remove(tid);
            }
            return;
        }
        let last_write = self.data[loc as usize].last_write;
        let mut found: Vec<(Acc, Option<Acc>)> = Vec::new();
        if acc.op == OP_READ {
            if let Some(w) = last_write {
                if !self.ordered(&w, tid) {
                    found.push((w, None));
                }
            }
            let l = &mut self.data[loc as usize];
            l.reads.retain(|r| r.tid != tid);
            l.reads.push(acc);
            if !acc.iter {
                keep_read(l.pending.entry(tid), acc);
            }
        } else {
            let mut stale = None;
            if let Some(w) = last_write {
                // A stale write: this thread read the location before `w`, not since.
                if w.tid != tid {
                    let reads = self.data[loc as usize].pending.get(tid);
                    if let Some(read) = reads.and_then(|r| feeding_read(r, &w, &acc)) {
                        let svc = &self.data[loc as usize].write_svc;
                        let read_before_write = read.epoch <= get(svc, read.tid);
                        if !read_before_write || !self.strongly_ordered(&w, tid) {
                            stale = Some((w, Some(read)));
                        }
                    }
                }
                if stale.is_none() && !self.ordered(&w, tid) {
                    found.push((w, None));
                }
            }
            if let Some(s) = stale {
                found.push(s);
            }
            let mut reads = std::mem::take(&mut self.data[loc as usize].reads);
            for r in &reads {
                if !self.ordered(r, tid) {
                    found.push((*r, None));
                }
            }
            reads.clear(); // its room stays with the location
            self.data[loc as usize].reads = reads;
            self.clocks(tid);
            let svc = &self.threads[tid as usize].svc;
            let l = &mut self.data[loc as usize];
            l.last_write = Some(acc);
            l.write_svc.clear();
            l.write_svc.extend_from_slice(svc);
            l.pending.remove(tid);
        }
        for (first, read) in found {
            self.conflict(loc, first, acc, read);
        }
    }

    /// The round's conflicts, named, into `done`; forget the round's locations (emptied and
    /// kept for the next round's). The Python references they held are returned, to be
    /// dropped once the state's lock is released: dropping an object may run Python code.
    fn end_round(&mut self, py: Python<'_>) -> Vec<Py<PyAny>> {
        if let Some(iteration) = self.iteration {
            if !self.conflicts.is_empty() {
                let kept: Vec<Kept> = std::mem::take(&mut self.conflicts)
                    .into_iter()
                    .map(|c| {
                        let l = &mut self.data[c.loc as usize];
                        if l.label.is_none() {
                            l.label = Some(label(py, l));
                        }
                        let (owner, key) = l.label.clone().unwrap_or_default();
                        Kept {
                            kind: l.kind,
                            owner,
                            key,
                            loc: c.loc,
                            first: c.first,
                            second: c.second,
                            read: c.read,
                        }
                    })
                    .collect();
                if self.done.len() < MAX_ROUNDS {
                    self.done.insert((self.run, iteration), kept);
                }
            }
        }
        self.conflicts.clear();
        self.seen.clear();
        for c in &mut self.threads {
            // Emptied, with their room kept: the next round's threads are mostly the same ids.
            c.vc.clear();
            c.svc.clear();
        }
        self.sync.clear();
        self.locs.clear();
        self.watched.clear();
        self.iter_watched.clear();
        crate::deaths::clear(crate::deaths::HB);
        self.seq = 0;
        // The next round starts with room for as many locations (no regrowing, no moves),
        // and the locations themselves are kept, emptied, with their lists' room.
        let mut refs = Vec::new();
        for mut l in self.data.drain(..) {
            l.recycle(&mut refs);
            if self.spare.len() < LOCS_KEPT {
                self.spare.push(l);
            }
        }
        self.data.shrink_to(LOCS_KEPT);
        refs
    }
}

/// (owner text, key text) of a location: the type (or class, or module) and the attribute,
/// key or `*`.
fn label(py: Python<'_>, l: &Loc) -> (String, String) {
    let owner_text = match (&l.owner_text, l.owner.held()) {
        (Some(name), _) => name.text(py),
        (None, Some(owner)) => owner_text(owner.bind(py), l.kind),
        (None, None) => return ("?".into(), "?".into()),
    };
    let key = match (&l.key, l.kind) {
        (_, 2) | (None, _) => "*".to_string(),
        (Some(k), 0 | 3 | 4) => k.bind(py).to_string(),
        (Some(k), _) => k
            .bind(py)
            .repr()
            .map(|r| r.to_string())
            .unwrap_or_else(|_| "?".into()),
    };
    (owner_text, key)
}

/// The owner half of a location's label: the module of a globals dict (`kind` 3), a class's
/// own name, or the object's type.
fn owner_text(owner: &Bound<'_, PyAny>, kind: u8) -> String {
    if kind == 3 {
        owner
            .cast::<PyDict>()
            .ok()
            .and_then(|d| d.get_item("__name__").ok().flatten())
            .and_then(|n| n.extract::<String>().ok())
            .unwrap_or_else(|| "?".into())
    } else if let Ok(t) = owner.cast::<pyo3::types::PyType>() {
        t.qualname().map(|n| n.to_string()).unwrap_or_default()
    } else {
        owner
            .get_type()
            .qualname()
            .map(|n| n.to_string())
            .unwrap_or_default()
    }
}

/// The calling thread's (run, managed id, round generation), when it is managed.
fn me() -> Option<(u64, u32, u64)> {
    engine::with_managed(|core, tid| (engine::active_id(), tid, core.generation()))
}

/// Run `f` on the state of the round the calling (managed) thread is in.
fn with_round<T>(py: Python<'_>, f: impl FnOnce(&mut State, u32) -> T) -> Option<T> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    let (run, tid, generation) = me()?;
    let mut dropped = Vec::new();
    let out = {
        let mut guard = STATE.lock();
        let st = guard.get_or_insert_with(State::default);
        if st.run != run || st.generation != generation {
            dropped = st.end_round(py);
            if st.run != run {
                st.rounds.retain(|(r, _), _| *r == run);
            }
            st.run = run;
            st.generation = generation;
            st.iteration = st.rounds.get(&(run, generation)).copied();
        }
        if crate::deaths::any_died(crate::deaths::HB) {
            st.retire_dead();
        }
        f(st, tid)
    };
    // Released at once: the caller may be the INSTRUCTION callback, where pyo3 would keep
    // them in its pool (it does not know that the interpreter is attached there).
    for p in dropped {
        decref_now(py, p);
    }
    Some(out)
}

/// A synchronisation edge from the calling thread: it released `obj` (a lock; threads use
/// keys of their own).
fn release(py: Python<'_>, obj: u64) {
    with_round(py, |st, tid| st.release(tid, obj, true));
}

/// The calling thread acquired `obj`.
fn acquire(py: Python<'_>, obj: u64) {
    with_round(py, |st, tid| st.acquire(tid, obj, true));
}

const THREAD_START: u64 = 1 << 62;
const THREAD_END: u64 = 1 << 61;

/// The calling thread starts the thread that will be managed as `child`.
pub fn spawn(py: Python<'_>, child: u32) {
    release(py, THREAD_START | child as u64);
}

/// The calling thread is `child`, started: it has its parent's past.
pub fn started(py: Python<'_>) {
    flush_pending(py);
    with_round(py, |st, tid| {
        st.acquire(tid, THREAD_START | tid as u64, true)
    });
}

/// The calling thread ends.
pub fn exiting(py: Python<'_>) {
    flush_pending(py);
    with_round(py, |st, tid| st.release(tid, THREAD_END | tid as u64, true));
}

/// Round `iteration` of run `run` is the core's round `generation`.
pub fn note_round(run: u64, generation: u64, iteration: u64) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let mut guard = STATE.lock();
    let st = guard.get_or_insert_with(State::default);
    if st.run == run && st.generation == generation {
        st.iteration = Some(iteration);
    }
    if st.rounds.len() > 4096 {
        st.rounds.clear();
    }
    st.rounds.insert((run, generation), iteration);
}

unsafe fn type_name(obj: *mut ffi::PyObject) -> &'static CStr {
    // SAFETY: a live object's type has a NUL-terminated tp_name for the type's lifetime; the
    // name is only compared right away.
    unsafe { CStr::from_ptr((*ffi::Py_TYPE(obj)).tp_name as *const c_char) }
}

/// What kind of built-in container `obj` is: 1 dict, 2 list, 3 set, 4 deque, 0 none.
unsafe fn container(obj: *mut ffi::PyObject) -> u8 {
    // SAFETY: `obj` is live and the interpreter is attached.
    unsafe {
        if ffi::PyDict_Check(obj) != 0 {
            1
        } else if ffi::PyList_Check(obj) != 0 {
            2
        } else if ffi::PyAnySet_Check(obj) != 0 {
            3
        } else if type_name(obj) == c"collections.deque" {
            4
        } else {
            0
        }
    }
}

/// (op, keyed) of a container method: None when it is not one this module knows.
fn method_op(kind: u8, name: &str) -> Option<(u8, bool)> {
    let read = Some((OP_READ, false));
    let write = Some((OP_WRITE, false));
    match (kind, name) {
        (1, "get") => Some((OP_READ, true)),
        // setdefault checks and inserts in one step: no stale check of its own to act on.
        (1, "setdefault") => Some((OP_READ, true)),
        (1, "pop") => Some((OP_WRITE, true)),
        (1, "popitem" | "update" | "clear") => write,
        (1, "keys" | "values" | "items" | "copy") => read,
        (2, "append" | "extend" | "insert" | "pop" | "remove" | "clear" | "sort" | "reverse") => {
            write
        }
        (2, "count" | "index" | "copy") => read,
        (3, "add" | "discard" | "remove") => Some((OP_WRITE, true)),
        (3, "pop" | "clear" | "update" | "difference_update" | "intersection_update") => write,
        (3, "copy" | "issubset" | "issuperset" | "isdisjoint") => read,
        (
            4,
            "append" | "appendleft" | "pop" | "popleft" | "extend" | "extendleft" | "clear"
            | "remove" | "rotate",
        ) => write,
        (4, "count" | "index" | "copy") => read,
        // `len(x)` (accesses.py: an EXTRA spec at the load of `len`)
        (1..=4, "__len__") => read,
        _ => None,
    }
}

/// A new reference to the object a spec names in `frame`, or null (no error set).
unsafe fn lookup(
    frame: *mut ffi::PyFrameObject,
    kind: u8,
    name: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: attached; `frame` is the running frame and `name` a live str.
    unsafe {
        match kind {
            OWNER_LOCAL => {
                let v = PyFrame_GetVar(frame, name);
                if v.is_null() {
                    ffi::PyErr_Clear();
                }
                v
            }
            OWNER_GLOBAL | OWNER_GLOBALS => {
                let globals = ffi::PyFrame_GetGlobals(frame);
                if globals.is_null() {
                    ffi::PyErr_Clear();
                    return std::ptr::null_mut();
                }
                if kind == OWNER_GLOBALS {
                    return globals;
                }
                let mut v = ffi::PyDict_GetItemWithError(globals, name);
                if v.is_null() {
                    ffi::PyErr_Clear();
                    let builtins = ffi::PyFrame_GetBuiltins(frame);
                    if !builtins.is_null() {
                        if ffi::PyDict_Check(builtins) != 0 {
                            v = ffi::PyDict_GetItemWithError(builtins, name);
                            if v.is_null() {
                                ffi::PyErr_Clear();
                            }
                        }
                        ffi::Py_DECREF(builtins);
                    } else {
                        ffi::PyErr_Clear();
                    }
                }
                let v = if v.is_null() { v } else { ffi::Py_NewRef(v) };
                ffi::Py_DECREF(globals);
                v
            }
            _ => std::ptr::null_mut(),
        }
    }
}

/// The cell at index `index` of the running frame's locals (a borrowed reference), or null.
///
/// CPython 3.12 and 3.13 only (the Python side makes cell specs for those alone): the cell
/// sits in the interpreter frame, which the public C API does not show. The layout is
/// checked before it is trusted: the interpreter frame must point back to `frame` and to
/// `code`, and the slot must hold a cell.
///
/// # Safety
/// Attached; `frame` is the running frame, whose code object is `code`.
unsafe fn frame_cell(
    frame: *mut ffi::PyFrameObject,
    code: *mut ffi::PyObject,
    index: isize,
) -> *mut ffi::PyObject {
    // PyFrameObject: PyObject_HEAD, f_back, f_frame. _PyInterpreterFrame: f_code (or
    // f_executable), previous, f_funcobj, f_globals, f_builtins, f_locals, frame_obj,
    // prev_instr (instr_ptr), int stacktop, u16 return_offset, char owner, localsplus[].
    const WORD: usize = std::mem::size_of::<usize>();
    const LOCALSPLUS: usize = 8 * WORD + 8;
    // SAFETY: the reads are within a live PyFrameObject and its interpreter frame, checked
    // against the two pointers that must be there before the slot is read.
    unsafe {
        if index < 0 || ffi::PyCode_Check(code) == 0 {
            return std::ptr::null_mut();
        }
        let head = std::mem::size_of::<ffi::PyObject>();
        let iframe = *((frame as *const u8).add(head + WORD) as *const *const u8);
        if iframe.is_null() {
            return std::ptr::null_mut();
        }
        let f_code = *(iframe as *const *mut ffi::PyObject);
        let frame_obj = *(iframe.add(6 * WORD) as *const *mut ffi::PyFrameObject);
        if f_code != code || frame_obj != frame {
            return std::ptr::null_mut();
        }
        let slot = *(iframe.add(LOCALSPLUS + index as usize * WORD) as *const *mut ffi::PyObject);
        if slot.is_null() || type_name(slot) != c"cell" {
            return std::ptr::null_mut();
        }
        slot
    }
}

/// The attribute `name` of `obj` from its instance dict only (no descriptor, no user code),
/// a new reference or null.
pub(crate) unsafe fn instance_attr(
    obj: *mut ffi::PyObject,
    name: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: attached; `obj` live, `name` a str.
    unsafe {
        if ffi::PyType_Check(obj) != 0 || ffi::PyModule_Check(obj) != 0 {
            let d = if ffi::PyModule_Check(obj) != 0 {
                let d = ffi::PyModule_GetDict(obj);
                if d.is_null() {
                    ffi::PyErr_Clear();
                    return std::ptr::null_mut();
                }
                ffi::Py_NewRef(d)
            } else {
                ffi::PyObject_GetAttrString(obj, c"__dict__".as_ptr())
            };
            if d.is_null() {
                ffi::PyErr_Clear();
                return std::ptr::null_mut();
            }
            let v = ffi::PyObject_GetItem(d, name);
            ffi::Py_DECREF(d);
            if v.is_null() {
                ffi::PyErr_Clear();
            }
            return v;
        }
        let d = ffi::PyObject_GenericGetDict(obj, std::ptr::null_mut());
        if d.is_null() {
            ffi::PyErr_Clear();
            return std::ptr::null_mut();
        }
        let v = ffi::PyDict_GetItemWithError(d, name);
        let v = if v.is_null() {
            ffi::PyErr_Clear();
            v
        } else {
            ffi::Py_NewRef(v)
        };
        ffi::Py_DECREF(d);
        v
    }
}

/// A hash for a key of a simple built-in type (str, int, bytes, float, bool, None), None for
/// any other key (its hash could run the test's code).
unsafe fn simple_hash(key: *mut ffi::PyObject) -> Option<i64> {
    // SAFETY: attached; `key` live.
    unsafe {
        if ffi::PyTuple_CheckExact(key) != 0 {
            let n = ffi::PyTuple_Size(key);
            let mut h: i64 = 0x345678;
            for i in 0..n.min(8) {
                let item = ffi::PyTuple_GetItem(key, i);
                if item.is_null() || ffi::PyTuple_CheckExact(item) != 0 {
                    ffi::PyErr_Clear();
                    return None;
                }
                h = h.wrapping_mul(1_000_003) ^ simple_hash(item)?;
            }
            return (n <= 8).then_some(h ^ 0x7475_706c);
        }
        let simple = ffi::PyUnicode_CheckExact(key) != 0
            || ffi::PyLong_CheckExact(key) != 0
            || ffi::PyBytes_CheckExact(key) != 0
            || ffi::PyFloat_CheckExact(key) != 0
            || ffi::PyBool_Check(key) != 0
            || key == ffi::Py_None();
        if !simple {
            return None;
        }
        let h = ffi::PyObject_Hash(key);
        if h == -1 && !ffi::PyErr_Occurred().is_null() {
            ffi::PyErr_Clear();
            return None;
        }
        Some(h as i64 ^ ((*ffi::Py_TYPE(key)).tp_basicsize as i64).rotate_left(48))
    }
}

/// The hooked access at `offset` of `code`, made by the calling managed thread now that it
/// has its turn (and the second access of the instruction, when it has one: [`EXTRA`]).
///
/// # Safety
/// The interpreter is attached and `code` is the running frame's live code object.
pub unsafe fn on_access(code: *mut ffi::PyObject, offset: u32, specs: Specs) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let Some(p) = specs.get() else {
        return;
    };
    for s in [p.main, p.extra].into_iter().flatten() {
        // SAFETY: as this function's.
        unsafe { access_spec(code, offset, offset, s) };
    }
}

/// (address, code object, offset of the call being made) of the frame that called `frame`,
/// zeros when there is none.
///
/// # Safety
/// Attached; `frame` is a live frame.
unsafe fn caller(frame: *mut ffi::PyFrameObject) -> (usize, usize, u32) {
    // SAFETY: attached; the references made here are released before returning (the caller's
    // frame stays alive while `frame` runs).
    unsafe {
        let back = ffi::PyFrame_GetBack(frame);
        if back.is_null() {
            return (0, 0, 0);
        }
        let at = ffi::PyFrame_GetLasti(back);
        let code = ffi::PyFrame_GetCode(back);
        let code_addr = code as usize;
        if !code.is_null() {
            ffi::Py_DECREF(code.cast());
        }
        ffi::Py_DECREF(back.cast());
        (back as usize, code_addr, at.max(0) as u32)
    }
}

/// Whether `obj` is a generator or a coroutine.
unsafe fn resumable(obj: *mut ffi::PyObject) -> bool {
    // SAFETY: a type check on a live object.
    unsafe { ffi::PyGen_Check(obj) != 0 || ffi::PyCoro_CheckExact(obj) != 0 }
}

/// Whether a store or delete of `key` (or the container method `method`) changes which keys
/// or items the container `owner` of kind `kind` holds (an insertion, a removal).
unsafe fn changes_contents(
    owner: *mut ffi::PyObject,
    kind: u8,
    spec_op: u8,
    method: Option<&str>,
    key: *mut ffi::PyObject,
) -> bool {
    // SAFETY: attached; `owner` and `key` live; `key` is of a simple type (its hash and
    // equality run no code of the test's).
    let present = || unsafe {
        let found = match kind {
            1 => ffi::PyDict_Contains(owner, key),
            3 => ffi::PySet_Contains(owner, key),
            _ => -1,
        };
        if found < 0 {
            ffi::PyErr_Clear();
        }
        found
    };
    match (spec_op, kind, method) {
        (OP_WRITE, 1, None) => present() == 0,
        (OP_DELETE, 1, None) => present() == 1,
        (OP_DELETE, 2, None) => true,
        (OP_METHOD, 1, Some("pop")) => present() == 1,
        (OP_METHOD, 1, Some("setdefault")) => present() == 0,
        (OP_METHOD, 3, Some("add")) => present() == 0,
        (OP_METHOD, 3, Some("discard" | "remove")) => present() == 1,
        _ => false,
    }
}

/// The access `spec` describes, at the point at `offset` of `code`; `at` is the offset of the
/// instruction that makes it (the point's, or an earlier one's: [`BEFORE`]).
///
/// # Safety
/// The interpreter is attached and `code` is the running frame's live code object.
unsafe fn access_spec(code: *mut ffi::PyObject, offset: u32, at: u32, spec: Spec) {
    if spec.op == OP_METHOD
        && spec.key_kind == KEY_ATTR
        && spec.owner_kind != OWNER_GLOBALS
        && spec.owner_kind != OWNER_CELL
    {
        return; // a method of an object (not a container's): its own code makes the accesses
    }
    let py = unsafe { Python::assume_attached() };
    // SAFETY: attached (see above); every pointer made here is released below.
    unsafe {
        let frame = ffi::PyEval_GetFrame();
        if frame.is_null() {
            return;
        }
        let mut owner = if spec.owner_kind == OWNER_CELL {
            let index = ffi::PyLong_AsSsize_t(spec.key);
            if index == -1 && !ffi::PyErr_Occurred().is_null() {
                ffi::PyErr_Clear();
                return;
            }
            let cell = frame_cell(frame, code, index);
            if cell.is_null() {
                return;
            }
            ffi::Py_NewRef(cell)
        } else {
            lookup(frame, spec.owner_kind, spec.owner_name)
        };
        if owner.is_null() {
            return;
        }
        if !spec.owner_attr.is_null() {
            let inner = instance_attr(owner, spec.owner_attr);
            ffi::Py_DECREF(owner);
            owner = inner;
            if owner.is_null() {
                return;
            }
        }
        // Bound until the access is resolved: dropped right away on an early return (a `Py`
        // dropped here would wait in pyo3's pool: it does not know the callback is attached).
        let owner = Bound::<PyAny>::from_owned_ptr(py, owner);
        // The container kind, only for a subscript, `in`, a loop's step or a container method.
        let kind = if spec.owner_kind != OWNER_GLOBALS
            && spec.owner_kind != OWNER_CELL
            && spec.key_kind != KEY_ATTR
        {
            container(owner.as_ptr())
        } else {
            0
        };
        let mut op = spec.op;
        let mut keyed = true;
        let mut atomic = false;
        let mut iter = false;
        let mut resume = false;
        let mut hold = None;
        let mut method_name = None;
        let mut loc_kind = 0u8; // attribute
        if spec.owner_kind == OWNER_GLOBALS {
            loc_kind = 3;
        } else if spec.owner_kind == OWNER_CELL {
            loc_kind = 4;
        } else if spec.key_kind != KEY_ATTR {
            // A subscript, `in`, a loop's step, or a container method.
            if kind == 0 {
                // The object's own methods make their own accesses; a generator's resumption
                // is a write of the generator (two threads must not run it at once).
                let resumes = op == OP_METHOD
                    && resumable(owner.as_ptr())
                    && Bound::from_borrowed_ptr(py, spec.method)
                        .extract::<String>()
                        .is_ok_and(|m| matches!(m.as_str(), "__next__" | "send" | "throw"));
                if !resumes {
                    return;
                }
                op = OP_WRITE;
                resume = true;
            } else {
                atomic = true;
                loc_kind = 1;
            }
            if resume {
            } else if op == OP_METHOD {
                let method = Bound::from_borrowed_ptr(py, spec.method);
                let Ok(method) = method.cast_into::<pyo3::types::PyString>() else {
                    return;
                };
                let Ok(name) = method.to_str() else {
                    return;
                };
                let Some((o, k)) = method_op(kind, name) else {
                    return;
                };
                op = o;
                keyed = k;
                method_name = Some(method);
            } else if op == OP_ITER {
                let it = crate::iterpoints::iterator(code, offset);
                if it.is_null() {
                    return;
                }
                hold = Some(Bound::<PyAny>::from_borrowed_ptr(py, it).unbind());
                op = OP_READ;
                keyed = false;
                iter = true;
            } else if spec.check && op == OP_READ && (kind == 2 || kind == 4) {
                keyed = false; // `x in list`: the whole sequence
            }
        } else if op == OP_METHOD {
            return;
        }
        // The key.
        let mut key_obj: *mut ffi::PyObject = std::ptr::null_mut();
        match spec.key_kind {
            _ if resume => key_obj = ffi::PyUnicode_FromString(RESUME_KEY.as_ptr()),
            _ if spec.owner_kind == OWNER_CELL => key_obj = ffi::Py_NewRef(spec.owner_name),
            KEY_ATTR => key_obj = ffi::Py_NewRef(spec.key),
            KEY_CONST if keyed => key_obj = ffi::Py_NewRef(spec.key),
            KEY_NONE => {}
            KEY_LOCAL if keyed => {
                key_obj = PyFrame_GetVar(frame, spec.key);
                if key_obj.is_null() {
                    ffi::PyErr_Clear();
                }
            }
            _ => {}
        }
        if resume && key_obj.is_null() {
            ffi::PyErr_Clear();
            return;
        }
        let key_hash = if key_obj.is_null() {
            None
        } else {
            simple_hash(key_obj)
        };
        // An insertion or a removal changes the container's contents too (what its truth
        // value, `len()` and its loops read).
        let contents = loc_kind == 1
            && key_hash.is_some()
            && changes_contents(
                owner.as_ptr(),
                kind,
                spec.op,
                method_name.as_ref().and_then(|m| m.to_str().ok()),
                key_obj,
            );
        let key = if key_obj.is_null() {
            None
        } else {
            Some(Bound::<PyAny>::from_owned_ptr(py, key_obj))
        };
        let (loc_kind, hash, key) = match key_hash {
            Some(h) => (loc_kind, h, key),
            None if loc_kind == 1 => (2, 0, None), // the whole container
            None => return,
        };
        let (parent, parent_code, parent_at) = caller(frame);
        let acc = Acc {
            parent,
            parent_code,
            parent_at,
            tid: 0,
            epoch: 0,
            seq: 0,
            code: code as usize,
            offset: at,
            op: if op == OP_DELETE { 2 } else { op.min(1) },
            check: spec.check,
            atomic,
            iter,
            ctx: hold.as_ref().map_or(0, |h| h.as_ptr() as usize),
        };
        let resolved = Resolved {
            owner: owner.unbind(),
            key: key.map(Bound::unbind),
            loc_kind,
            hash,
            acc,
            contents,
            hold,
        };
        if spec.op == OP_METHOD && spec.call_offset != u32::MAX && !resume {
            // The container operation happens at the call, after the arguments are evaluated
            // (which may run code of their own): applied at this thread's next point after it.
            let full = PENDING
                .try_with(|p| {
                    let mut p = p.borrow_mut();
                    PENDING_COUNT.fetch_add(1, Ordering::Relaxed);
                    p.push(Pending {
                        frame: frame as usize,
                        // Kept alive while pending: its address is never another frame's.
                        _frame: Bound::from_borrowed_ptr(py, frame.cast()).unbind(),
                        call_offset: spec.call_offset,
                        resolved,
                    });
                    p.len() > 8
                })
                .unwrap_or(false);
            if full {
                flush_pending(py);
            }
            return;
        }
        apply(py, resolved);
    }
}

/// A resolved access, to apply.
struct Resolved {
    owner: Py<PyAny>,
    key: Option<Py<PyAny>>,
    loc_kind: u8,
    hash: i64,
    acc: Acc,
    /// The access inserts or removes: a write of the container's contents too.
    contents: bool,
    /// A loop step's iterator.
    hold: Option<Py<PyAny>>,
}

/// A container method call this thread has loaded but not yet made.
struct Pending {
    frame: usize,
    _frame: Py<PyAny>,
    call_offset: u32,
    resolved: Resolved,
}

/// Pending container calls of all threads (an upper bound: a thread that ends with some
/// pending leaves its count here): a point of a thread with none looks no further.
static PENDING_COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

thread_local! {
    /// Innermost last (a call in the arguments of another one).
    static PENDING: std::cell::RefCell<Vec<Pending>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Apply this thread's pending container calls (`keep` of them stay pending).
fn flush_pending_to(py: Python<'_>, keep: usize) {
    let pending = PENDING
        .try_with(|p| {
            p.try_borrow_mut()
                .map(|mut p| {
                    let at = keep.min(p.len());
                    p.split_off(at)
                })
                .unwrap_or_default()
        })
        .unwrap_or_default();
    if pending.is_empty() {
        return;
    }
    PENDING_COUNT.fetch_sub(pending.len(), Ordering::Relaxed);
    for p in pending.into_iter().rev() {
        apply(py, p.resolved);
        decref_now(py, p._frame);
    }
}

/// Apply every pending container call of this thread.
fn flush_pending(py: Python<'_>) {
    flush_pending_to(py, 0);
}

/// Before the calling thread's scheduling point at `offset` of `code`: when its pending
/// container call has been made by now (the frame that loaded the method is past the call,
/// or gone), apply it, so that it takes its place before another thread goes on.
///
/// # Safety
/// The interpreter is attached.
pub unsafe fn before_point(code: *mut ffi::PyObject, offset: u32, specs: Specs) {
    // SAFETY: as this function's.
    unsafe { flush_made(offset) };
    if BEFORE_SPECS.load(Ordering::Relaxed) == 0 || !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    if let Some(s) = specs.get().and_then(|p| p.before) {
        // SAFETY: attached, and `code` is the running frame's (the point's).
        unsafe { access_spec(code, offset, s.call_offset, s) };
    }
}

/// Apply the pending container calls of this thread that have been made by the point at
/// `offset` of the running frame.
///
/// # Safety
/// The interpreter is attached.
unsafe fn flush_made(offset: u32) {
    if PENDING_COUNT.load(Ordering::Relaxed) == 0 {
        return; // no thread has a pending call (the common case)
    }
    // The innermost pending calls that have been made by now go; the outer ones wait. Read
    // in place (no list made at every point while some thread has a call pending).
    let (keep, waiting) = PENDING
        .try_with(|p| {
            p.try_borrow()
                .map(|p| {
                    let mut keep = p.len();
                    while keep > 0 {
                        let w = &p[keep - 1];
                        // SAFETY: attached (see above); call_made reads frames only.
                        if !unsafe {
                            call_made(w.frame, w.resolved.acc.offset, w.call_offset, offset)
                        } {
                            break;
                        }
                        keep -= 1;
                    }
                    (keep, p.len())
                })
                .unwrap_or((0, 0))
        })
        .unwrap_or((0, 0));
    if keep < waiting {
        flush_pending_to(unsafe { Python::assume_attached() }, keep);
    }
}

/// Whether the method call at `call_offset` of the frame at `frame`, its method loaded at
/// `load_offset`, has been made, seen from a point at `offset` of the running frame: in that
/// frame, the points before the call are those of its arguments, between the two (a point
/// at a lower offset is one a loop went back to after the call).
///
/// # Safety
/// The interpreter is attached.
unsafe fn call_made(frame: usize, load_offset: u32, call_offset: u32, offset: u32) -> bool {
    // SAFETY: attached (see above).
    unsafe {
        let current = ffi::PyEval_GetFrame();
        if current.is_null() {
            true
        } else if current as usize == frame {
            offset > call_offset || offset <= load_offset
        } else {
            // Inside a call made while evaluating the arguments: the loading frame is below.
            let mut below = false;
            let mut f = ffi::PyFrame_GetBack(current);
            let mut depth = 0;
            while !f.is_null() {
                if f as usize == frame {
                    below = true;
                }
                let back = if below || depth > 64 {
                    std::ptr::null_mut()
                } else {
                    ffi::PyFrame_GetBack(f)
                };
                ffi::Py_DECREF(f.cast());
                f = back;
                depth += 1;
            }
            !below
        }
    }
}

/// Apply a resolved access in the calling thread's round.
fn apply(py: Python<'_>, r: Resolved) {
    let Resolved {
        owner,
        key,
        loc_kind,
        hash,
        acc,
        contents,
        mut hold,
    } = r;
    let atomic = acc.atomic;
    let mut key = key;
    let obj = owner.as_ptr();
    let container_key = obj as u64;
    let mut spare = None;
    let mut replaced = None;
    let mut spare_iter = None;
    // The guard of a new location, made outside the state's lock (see [`Guard::new`]): a
    // first pass finds the locations, or says one is to be made.
    let mut fresh: Option<(Guard, Option<OwnerName>)> = None;
    for _pass in 0..2 {
        let done = with_round(py, |st, tid| {
            // The live location of (this object, kind, hash), or None.
            let find = |st: &State, kind: u8, hash: i64| {
                st.locs
                    .get(&(obj as usize, kind, hash))
                    .copied()
                    .filter(|&l| st.data[l as usize].owner.is(obj))
            };
            let loc = match find(st, loc_kind, hash) {
                Some(l) => l,
                None => match fresh.take() {
                    Some(guard) => st.make((obj as usize, loc_kind, hash), guard, key.take(), tid),
                    None => return false,
                },
            };
            if atomic {
                st.acquire(tid, container_key, false);
            }
            let seq = st.seq;
            st.access(loc, Acc { tid, ..acc });
            if let Some(it) = hold.take() {
                let step = Acc { tid, seq, ..acc };
                let addr = it.as_ptr() as usize;
                let iters = &mut st.data[loc as usize].iters;
                match iters.get_mut(&tid) {
                    // The same iteration: its iterator is watched or kept already.
                    Some(prev) if prev.0.ctx == addr => {
                        prev.0 = step;
                        spare_iter = Some(it);
                    }
                    // SAFETY: attached; `it` is live.
                    _ if unsafe { crate::deaths::watch_type(ffi::Py_TYPE(it.as_ptr())) } => {
                        crate::deaths::watch(crate::deaths::HB, addr);
                        replaced = iters.insert(tid, (step, None));
                        st.iter_watched.entry(addr).or_default().push((loc, tid));
                        spare_iter = Some(it);
                    }
                    _ => replaced = iters.insert(tid, (step, Some(it))),
                }
            }
            if contents {
                let whole = match find(st, 2, 0) {
                    Some(l) => l,
                    None => {
                        let l = &st.data[loc as usize];
                        let name = l.owner_text.as_ref().map(|n| n.clone_ref(py));
                        let guard = (l.owner.clone_ref(py), name);
                        st.make((obj as usize, 2, 0), guard, None, tid)
                    }
                };
                let write = Acc {
                    tid,
                    op: OP_WRITE,
                    check: false,
                    ..acc
                };
                st.access(whole, write);
            }
            if atomic {
                st.release(tid, container_key, false);
            }
            if st.data.len() > 1 << 20 {
                spare = Some(st.end_round(py)); // a runaway round: forget, do not grow
            }
            true
        });
        if done != Some(false) || fresh.is_some() {
            break;
        }
        fresh = Some(Guard::new(owner.bind(py), loc_kind));
    }
    if let Some(spare) = spare {
        for p in spare {
            decref_now(py, p);
        }
    }
    // Released now, outside the state's lock (pyo3 would keep them in its pool: it does not
    // know that the INSTRUCTION callback is attached).
    if let Some((_, Some(it))) = replaced {
        decref_now(py, it);
    }
    if let Some(it) = spare_iter {
        decref_now(py, it);
    }
    if let Some(it) = hold {
        decref_now(py, it);
    }
    if let Some((guard, name)) = fresh {
        if let Guard::Weak(p) | Guard::Strong(p) = guard {
            decref_now(py, p);
        }
        if let Some(OwnerName::Str(p)) = name {
            decref_now(py, p);
        }
    }
    decref_now(py, owner);
    if let Some(key) = key {
        decref_now(py, key);
    }
}

/// Let go of a reference at once; the caller is attached (`py`).
fn decref_now(_py: Python<'_>, obj: Py<PyAny>) {
    // SAFETY: attached, and the reference is ours.
    unsafe { ffi::Py_DECREF(obj.into_ptr()) }
}

/// races_enable(on): track accesses in exact mode from now on (or stop).
#[pyfunction]
fn races_enable(py: Python<'_>, on: bool) {
    if on {
        crate::deaths::install();
    }
    ENABLED.store(on, Ordering::Relaxed);
    if !on {
        let dropped = {
            let mut guard = STATE.lock();
            guard.as_mut().map(|st| {
                st.iteration = None;
                st.end_round(py)
            })
        };
        drop(dropped);
    }
}

/// races_specs(code, specs): the accesses of `code`'s hooked instructions, {offset: (op,
/// check, owner kind, owner name, owner attribute or None, key kind, key, method or None)}.
#[pyfunction]
fn races_specs(code: Bound<'_, PyAny>, specs: Bound<'_, PyDict>) -> PyResult<()> {
    let mut by_offset: OffsetSpecs = HashMap::default();
    let mut before = 0;
    for (offset, spec) in specs.iter() {
        let offset: u32 = offset.extract()?;
        let t = spec.cast::<PyTuple>()?;
        if t.len() != 9 {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "an access spec has 9 items",
            ));
        }
        let ptr = |i: usize| -> PyResult<*mut ffi::PyObject> { Ok(t.get_item(i)?.as_ptr()) };
        let opt = |i: usize| -> PyResult<*mut ffi::PyObject> {
            let item = t.get_item(i)?;
            Ok(if item.is_none() {
                std::ptr::null_mut()
            } else {
                item.as_ptr()
            })
        };
        let spec = Spec {
            op: t.get_item(0)?.extract()?,
            check: t.get_item(1)?.extract()?,
            owner_kind: t.get_item(2)?.extract()?,
            owner_name: ptr(3)?,
            owner_attr: opt(4)?,
            key_kind: t.get_item(5)?.extract()?,
            key: ptr(6)?,
            method: opt(7)?,
            call_offset: t.get_item(8)?.extract::<Option<u32>>()?.unwrap_or(u32::MAX),
        };
        let point = by_offset.entry(offset & !(EXTRA | BEFORE)).or_default();
        match (offset & EXTRA != 0, offset & BEFORE != 0) {
            (false, false) => point.main = Some(spec),
            (true, false) => point.extra = Some(spec),
            (false, true) => {
                point.before = Some(spec);
                before += 1;
            }
            (true, true) => {} // no such spec: never looked up
        }
    }
    let mut all = SPECS.lock();
    // A code object's entry is never replaced: another thread may be using its specs (their
    // pointers borrow from the entry's objects).
    all.get_or_insert_with(HashMap::default)
        .entry(code.as_ptr() as usize)
        .or_insert_with(|| {
            BEFORE_SPECS.fetch_add(before, Ordering::Relaxed);
            CodeSpecs {
                _keep: specs.into_any().unbind(),
                _code: code.unbind(),
                by_offset: Box::new(by_offset),
            }
        });
    Ok(())
}

/// races_has_specs(code) -> bool
#[pyfunction]
fn races_has_specs(code: Bound<'_, PyAny>) -> bool {
    SPECS
        .lock()
        .as_ref()
        .is_some_and(|m| m.contains_key(&(code.as_ptr() as usize)))
}

fn acc_tuple<'py>(py: Python<'py>, a: &Acc) -> PyResult<Bound<'py, PyTuple>> {
    let code = crate::hooks::code_object(py, a.code);
    PyTuple::new(
        py,
        [
            a.tid.into_pyobject(py)?.into_any(),
            a.seq.into_pyobject(py)?.into_any(),
            code.into_pyobject(py)?.into_any(),
            a.offset.into_pyobject(py)?.into_any(),
            ["read", "write", "delete"][a.op.min(2) as usize]
                .into_pyobject(py)?
                .into_any(),
            pyo3::types::PyBool::new(py, a.check).to_owned().into_any(),
            pyo3::types::PyBool::new(py, a.atomic).to_owned().into_any(),
            pyo3::types::PyBool::new(py, a.iter).to_owned().into_any(),
            crate::hooks::code_object(py, a.parent_code)
                .into_pyobject(py)?
                .into_any(),
            a.parent_at.into_pyobject(py)?.into_any(),
        ],
    )
}

/// races_conflicts(run_id, iteration) -> [dict]: the conflicts of a finished round.
#[pyfunction]
fn races_conflicts<'py>(
    py: Python<'py>,
    run_id: u64,
    iteration: u64,
) -> PyResult<Bound<'py, PyList>> {
    let kept = {
        let mut guard = STATE.lock();
        let st = guard.get_or_insert_with(State::default);
        st.done
            .get(&(run_id, iteration))
            .cloned()
            .unwrap_or_default()
    };
    let out = PyList::empty(py);
    for k in kept {
        let d = PyDict::new(py);
        d.set_item(
            "kind",
            ["attribute", "item", "container", "global", "cell"][k.kind.min(4) as usize],
        )?;
        d.set_item("owner", k.owner)?;
        d.set_item("key", k.key)?;
        d.set_item("location", k.loc)?;
        d.set_item("first", acc_tuple(py, &k.first)?)?;
        d.set_item("second", acc_tuple(py, &k.second)?)?;
        match k.read {
            Some(r) => d.set_item("read", acc_tuple(py, &r)?)?,
            None => d.set_item("read", py.None())?,
        }
        out.append(d)?;
    }
    Ok(out)
}

/// races_rounds(run_id) -> [int]: the rounds of the run that had conflicts.
#[pyfunction]
fn races_rounds(run_id: u64) -> Vec<u64> {
    let guard = STATE.lock();
    let mut out: Vec<u64> = guard
        .as_ref()
        .map(|st| {
            st.done
                .keys()
                .filter(|(r, _)| *r == run_id)
                .map(|(_, i)| *i)
                .collect()
        })
        .unwrap_or_default();
    out.sort_unstable();
    out
}

/// races_finish(): the current round is over (its conflicts are kept).
#[pyfunction]
fn races_finish(py: Python<'_>) {
    let dropped = {
        let mut guard = STATE.lock();
        guard.as_mut().map(|st| {
            let d = st.end_round(py);
            st.iteration = None;
            st.generation = u64::MAX;
            d
        })
    };
    drop(dropped);
}

/// races_forget(run_id): drop the kept conflicts of a run.
#[pyfunction]
fn races_forget(run_id: u64) {
    let mut guard = STATE.lock();
    if let Some(st) = guard.as_mut() {
        st.done.retain(|(r, _), _| *r != run_id);
    }
}

/// races_lock(lock_id, acquired): the calling thread acquired (True) or released (False) the
/// lock `lock_id` (the lock hooks call it for the test's lock operations, not the plugin's).
#[pyfunction]
pub(crate) fn races_lock(py: Python<'_>, lock_id: u64, acquired: bool) {
    if acquired {
        acquire(py, lock_id);
    } else {
        release(py, lock_id);
    }
}

/// races_joined(tid): the calling thread joined managed thread `tid`.
#[pyfunction]
fn races_joined(py: Python<'_>, tid: u32) {
    flush_pending(py);
    with_round(py, |st, me| st.acquire(me, THREAD_END | tid as u64, true));
}

/// races_stats() -> (accesses, shared locations) since the start.
#[pyfunction]
fn races_stats() -> (u64, u64) {
    STATE
        .lock()
        .as_ref()
        .map_or((0, 0), |s| (s.accesses, s.shared_locations))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(races_enable, m)?)?;
    m.add_function(wrap_pyfunction!(races_specs, m)?)?;
    m.add_function(wrap_pyfunction!(races_has_specs, m)?)?;
    m.add_function(wrap_pyfunction!(races_conflicts, m)?)?;
    m.add_function(wrap_pyfunction!(races_rounds, m)?)?;
    m.add_function(wrap_pyfunction!(races_finish, m)?)?;
    m.add_function(wrap_pyfunction!(races_forget, m)?)?;
    m.add_function(wrap_pyfunction!(races_joined, m)?)?;
    m.add_function(wrap_pyfunction!(races_lock, m)?)?;
    m.add_function(wrap_pyfunction!(races_stats, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acc(tid: u32, op: u8, check: bool) -> Acc {
        Acc {
            tid,
            epoch: 0,
            seq: 0,
            code: 1,
            offset: 10 + op as u32,
            op,
            check,
            atomic: false,
            iter: false,
            ctx: 0,
            parent: 0,
            parent_code: 0,
            parent_at: 0,
        }
    }

    fn state_with(locations: usize) -> State {
        let mut st = State::default();
        for _ in 0..locations {
            st.data.push(Loc::default());
        }
        st
    }

    fn touch(st: &mut State, loc: u32, a: Acc) {
        if st.data[loc as usize].reads.is_empty()
            && st.data[loc as usize].last_write.is_none()
            && st.data[loc as usize].pending.is_empty()
        {
            st.data[loc as usize].first_tid = a.tid;
        }
        st.access(loc, a);
    }

    #[test]
    fn a_lost_update_is_a_stale_write() {
        let mut st = state_with(1);
        touch(&mut st, 0, acc(0, OP_READ, false));
        touch(&mut st, 0, acc(1, OP_READ, false));
        touch(&mut st, 0, acc(0, OP_WRITE, false));
        touch(&mut st, 0, acc(1, OP_WRITE, false));
        let stale: Vec<_> = st.conflicts.iter().filter(|c| c.read.is_some()).collect();
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].first.tid, 0);
        assert_eq!(stale[0].second.tid, 1);
        assert!(!stale[0].read.unwrap().check);
    }

    #[test]
    fn a_check_then_act_keeps_the_check() {
        let mut st = state_with(1);
        touch(&mut st, 0, acc(0, OP_READ, true));
        touch(&mut st, 0, acc(1, OP_READ, true));
        touch(&mut st, 0, acc(0, OP_WRITE, false));
        touch(&mut st, 0, acc(1, OP_WRITE, false));
        let stale = st.conflicts.iter().find(|c| c.read.is_some()).unwrap();
        assert!(stale.read.unwrap().check);
    }

    #[test]
    fn a_lock_orders_read_modify_writes() {
        let mut st = state_with(1);
        for tid in [0, 1, 0, 1] {
            st.acquire(tid, 7, true);
            touch(&mut st, 0, acc(tid, OP_READ, false));
            touch(&mut st, 0, acc(tid, OP_WRITE, false));
            st.release(tid, 7, true);
        }
        assert!(st.conflicts.is_empty(), "{:?}", st.conflicts);
    }

    #[test]
    fn without_the_lock_the_same_accesses_conflict() {
        let mut st = state_with(1);
        for tid in [0, 1, 0, 1] {
            touch(&mut st, 0, acc(tid, OP_READ, false));
            touch(&mut st, 0, acc(tid, OP_WRITE, false));
        }
        assert!(!st.conflicts.is_empty());
    }

    #[test]
    fn container_edges_order_pairs_but_not_stale_writes() {
        // Thread 0 writes location 0, then publishes through a container (weak edge); thread
        // 1 takes it from there and reads location 0: ordered.
        let mut st = state_with(2);
        touch(&mut st, 0, acc(0, OP_WRITE, false));
        st.release(0, 9, false);
        st.acquire(1, 9, false);
        touch(&mut st, 0, acc(1, OP_READ, false));
        assert!(st.conflicts.is_empty());
        // A read, another thread's write, then the write from the stale read, with container
        // edges between each: still a lost update.
        for (tid, op) in [(0, OP_READ), (1, OP_WRITE), (0, OP_WRITE)] {
            st.acquire(tid, 9, false);
            touch(&mut st, 1, acc(tid, op, false));
            st.release(tid, 9, false);
        }
        assert!(st.conflicts.iter().any(|c| c.loc == 1 && c.read.is_some()));
    }

    #[test]
    fn a_read_from_an_earlier_pass_of_a_loop_makes_no_stale_write() {
        let mut st = state_with(1);
        let later = |tid, op| Acc {
            offset: 40,
            ..acc(tid, op, false)
        };
        touch(&mut st, 0, later(0, OP_READ)); // the end of pass 1
        touch(&mut st, 0, acc(1, OP_WRITE, false));
        touch(&mut st, 0, acc(0, OP_WRITE, false)); // the start of pass 2: a blind write
        assert!(st.conflicts.iter().all(|c| c.read.is_none()));
        assert!(!st.conflicts.is_empty(), "still a data race");
    }

    #[test]
    fn a_read_in_one_helper_feeds_a_write_in_the_next_one() {
        // `if env.get(k) is None: env.set(k, v)`: the read (code 2) and the write (code 3)
        // are made in two helpers called one after the other by the same frame.
        let mut st = state_with(1);
        let helper = |tid, op, code, parent_at| Acc {
            code,
            parent: 77,
            parent_code: 5,
            parent_at,
            ..acc(tid, op, false)
        };
        touch(&mut st, 0, helper(0, OP_READ, 2, 10));
        touch(&mut st, 0, helper(1, OP_WRITE, 3, 20));
        touch(&mut st, 0, helper(0, OP_WRITE, 3, 20));
        assert!(st.conflicts.iter().any(|c| c.read.is_some()));
        // the same helpers called in the other order (the write's call first): no stale write
        let mut st = state_with(1);
        touch(&mut st, 0, helper(0, OP_READ, 2, 30));
        touch(&mut st, 0, helper(1, OP_WRITE, 3, 20));
        touch(&mut st, 0, helper(0, OP_WRITE, 3, 20));
        assert!(st.conflicts.iter().all(|c| c.read.is_none()));
    }

    #[test]
    fn a_recycled_location_keeps_its_room_and_nothing_else() {
        // A location two threads raced on, emptied at the round's end and made again for
        // another object: one thread's accesses to it conflict with nothing, and its lists
        // are the old ones (no allocation).
        let mut st = State::default();
        let l = st.make((100, 0, 0), (Guard::None, None), None, 0);
        for tid in [0, 1, 0, 1] {
            st.access(l, acc(tid, OP_READ, false));
            st.access(l, acc(tid, OP_WRITE, false));
        }
        st.access(l, acc(0, OP_READ, false));
        assert!(!st.conflicts.is_empty());
        let room = st.data[0].reads.capacity();
        assert!(room > 0);
        let mut refs = Vec::new();
        let mut old = st.data.pop().unwrap();
        old.recycle(&mut refs);
        assert!(refs.is_empty());
        st.spare.push(old);
        st.locs.clear();
        st.conflicts.clear();
        st.seen.clear();
        st.threads.clear();
        let shared = st.shared_locations;
        let l = st.make((200, 1, 5), (Guard::None, None), None, 2);
        assert!(st.spare.is_empty(), "the spare location was used");
        let loc = &st.data[l as usize];
        assert_eq!((loc.kind, loc.first_tid, loc.shared), (1, 2, false));
        assert!(loc.last_write.is_none() && loc.reads.is_empty() && loc.pending.is_empty());
        assert!(loc.write_svc.is_empty() && loc.iters.is_empty() && loc.label.is_none());
        assert_eq!(loc.reads.capacity(), room);
        for op in [OP_READ, OP_WRITE, OP_READ, OP_WRITE] {
            st.access(l, acc(2, op, false));
        }
        assert!(st.conflicts.is_empty(), "{:?}", st.conflicts);
        assert_eq!(st.shared_locations, shared);
    }

    #[test]
    fn a_thread_that_writes_and_reads_in_turn_reuses_its_read_list() {
        // A write forgets the thread's reads but keeps its (emptied) list with its room.
        let mut st = state_with(1);
        let room = |st: &State| st.data[0].pending.get(0).map_or(0, |r| r.capacity());
        for _ in 0..3 {
            touch(&mut st, 0, acc(0, OP_READ, false));
            assert!(room(&st) > 0);
            touch(&mut st, 0, acc(0, OP_WRITE, false));
            assert!(st.data[0].pending.is_empty());
            assert!(room(&st) > 0, "the list was dropped");
        }
    }

    #[test]
    fn one_thread_alone_never_conflicts() {
        let mut st = state_with(1);
        for op in [OP_READ, OP_WRITE, OP_READ, OP_WRITE] {
            touch(&mut st, 0, acc(3, op, false));
        }
        assert!(st.conflicts.is_empty());
        assert_eq!(st.shared_locations, 0);
    }
}
