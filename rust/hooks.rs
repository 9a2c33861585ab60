//! The Python face of the engine: the sys.monitoring INSTRUCTION callback, the `Run` class
//! (one per test), seed derivation and the opcode table.
//!
//! `pytest_ftrace.instrument` owns the sys.monitoring side (tool id, which code objects get
//! INSTRUCTION events, when); this module only answers events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyDict, PyInt, PyString, PyTuple};

use crate::accesses;
use crate::engine::{self, RunShared};
use crate::iterpoints;
use crate::opcodes;
use crate::policy::{Decision, Policy, PolicyConfig};
use crate::sched::{self, Core, Status, Wait};
use crate::seed::{self, Part};

extern "C" {
    // Public (non-limited) C API since 3.11: the deoptimised bytecode (`co_code`) of a code
    // object, a new reference. CPython caches it on the code object, so this is a lookup.
    // Declared here because pyo3-ffi does not declare it; the argument is a PyCodeObject*.
    fn PyCode_GetCode(code: *mut ffi::PyObject) -> *mut ffi::PyObject;
    // Stable C API: the calling thread's identifier (`threading.get_ident()`).
    fn PyThread_get_thread_ident() -> std::os::raw::c_ulong;
}

static DISABLE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Threads that have let go of the interpreter to wait in the core (or to sleep or spin for
/// chaos mode) and have not taken it back yet. At interpreter shutdown, a daemon thread that
/// takes the interpreter back is ended with `pthread_exit`, whose unwinding must never pass
/// through Rust frames (the process aborts with "FATAL: exception not rethrown"): `release_all`
/// (run at exit) makes every wait return and then waits for this count to reach 0.
static INSIDE: AtomicUsize = AtomicUsize::new(0);

/// Whether the calling thread may let go of the interpreter to wait: counts it in [`INSIDE`]
/// (the caller calls [`leave`] once it holds the interpreter again), or false once the
/// interpreter shuts down (then it must not wait at all).
pub(crate) fn may_wait() -> bool {
    INSIDE.fetch_add(1, Ordering::SeqCst);
    if sched::SHUTDOWN.load(Ordering::SeqCst) {
        INSIDE.fetch_sub(1, Ordering::SeqCst);
        return false;
    }
    sched::watch::will_take_back();
    true
}

pub(crate) fn leave() {
    sched::watch::taken_back();
    INSIDE.fetch_sub(1, Ordering::SeqCst);
}

/// Run `f` (a wait in the core) with the interpreter released, counted in [`INSIDE`]; with it
/// held once the interpreter shuts down (every core is closed then, so `f` does not wait).
pub(crate) fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
    if !may_wait() {
        return f();
    }
    let out = py.detach(|| {
        let out = f();
        sched::watch::retaking();
        out
    });
    leave();
    out
}

/// release_all(): the interpreter is about to shut down: close every core (no thread waits in
/// one again, and none lets go of the interpreter in a hook). Returns the threads still
/// inside (the caller waits for them to come back, with the interpreter released).
#[pyfunction]
fn release_all() -> usize {
    sched::SHUTDOWN.store(true, Ordering::SeqCst);
    INSIDE.load(Ordering::SeqCst)
}

/// threads_inside() -> int: threads waiting in the native core (or in a chaos delay) now.
#[pyfunction]
fn threads_inside() -> usize {
    INSIDE.load(Ordering::SeqCst)
}

fn disable_object(py: Python<'_>) -> PyResult<&Py<PyAny>> {
    DISABLE.get_or_try_init(py, || {
        Ok(py
            .import("sys")?
            .getattr("monitoring")?
            .getattr("DISABLE")?
            .unbind())
    })
}

/// What the instruction at `offset` of code object `ptr` is, when the table hooks it.
///
/// # Safety
/// `ptr` is a live object and the calling thread is attached to the interpreter.
unsafe fn code_kind(ptr: *mut ffi::PyObject, offset: usize) -> Option<opcodes::Kind> {
    // PyCode_GetCode is only called on a code object and returns a new reference to a bytes
    // object (or NULL with an error set), alive while its buffer is read, released after.
    unsafe {
        if ffi::PyCode_Check(ptr) == 0 {
            return None;
        }
        let bytes = PyCode_GetCode(ptr);
        if bytes.is_null() {
            ffi::PyErr_Clear();
            return None;
        }
        let len = ffi::PyBytes_Size(bytes);
        let data = ffi::PyBytes_AsString(bytes);
        let kind = if !data.is_null() && len >= 0 {
            opcodes::kind(
                std::slice::from_raw_parts(data.cast::<u8>(), len as usize),
                offset,
            )
        } else {
            None
        };
        ffi::Py_DECREF(bytes);
        kind
    }
}

/// What an INSTRUCTION event is.
enum Event {
    /// A point: the run's decision.
    Point(Decision),
    /// Not a point; never report this offset again (in this activation).
    Disable,
    /// Not a point this time.
    Skip,
}

/// The sys.monitoring INSTRUCTION callback.
///
/// An instruction that is not hooked gets `sys.monitoring.DISABLE`, so CPython stops
/// reporting that offset (until the tool's events are switched off and on again). A hooked
/// one is counted, and the active run's generator decides whether to continue, yield or
/// delay; yields and delays run with the interpreter released (the GIL, on a GIL build).
///
/// A bare `METH_FASTCALL` C function rather than a `#[pyfunction]`: without PyO3's argument
/// layer an event costs about 13 ns less (benches/bench_overhead.py).
///
/// # Safety
/// Called by CPython only, with the interpreter attached and `args` holding `nargs` objects.
unsafe extern "C" fn on_instruction(
    _module: *mut ffi::PyObject,
    args: *mut *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    if nargs != 2 {
        ffi::PyErr_SetString(
            ffi::PyExc_TypeError,
            c"on_instruction(code, offset) takes 2 arguments".as_ptr(),
        );
        return std::ptr::null_mut();
    }
    let code = *args;
    let offset = ffi::PyLong_AsSsize_t(*args.add(1));
    if offset < 0 {
        if !ffi::PyErr_Occurred().is_null() {
            return std::ptr::null_mut();
        }
        return ffi::Py_NewRef(ffi::Py_None());
    }
    // A panic must not unwind into CPython: treat it as "not hooked".
    let event = std::panic::catch_unwind(|| {
        let Some(kind) = code_kind(code, offset as usize) else {
            return Event::Disable;
        };
        if kind == opcodes::Kind::Iteration {
            match iterpoints::step(code, offset as u32) {
                iterpoints::Step::Point => {}
                iterpoints::Step::Disable => return Event::Disable,
                iterpoints::Step::Skip => return Event::Skip,
            }
        } else if crate::shared::tracking() {
            crate::shared::on_point(code, offset as u32, kind);
        }
        Event::Point(engine::on_point(kind))
    })
    .unwrap_or(Event::Disable);
    match event {
        Event::Point(Decision::Schedule) => {
            keep_code(code);
            if accesses::enabled() {
                accesses::note(code, offset as u32);
            }
            // The point's access specs, looked up once for before and after the turn.
            let specs = crate::hb::specs_of(code, offset as u32);
            let _ =
                std::panic::catch_unwind(|| crate::hb::before_point(code, offset as u32, specs));
            let at = (code as usize, offset as u32);
            // Most points keep the turn: decided without letting go of the interpreter.
            // A hand-over wakes the next thread only once this one has let go of the GIL.
            let (kept, handed) = match std::panic::catch_unwind(|| engine::schedule_point_try(at)) {
                Ok((kept, handed)) => (Ok(kept), handed),
                Err(e) => (Err(e), false),
            };
            let mut turn = matches!(kept, Ok(Some(Wait::Turn)));
            if !matches!(kept, Ok(Some(_))) && may_wait() {
                let state = ffi::PyEval_SaveThread();
                let waited = std::panic::catch_unwind(|| engine::schedule_wait(handed));
                sched::watch::retaking();
                ffi::PyEval_RestoreThread(state);
                leave();
                turn = matches!(waited, Ok(Wait::Turn | Wait::Woken));
            } else if handed {
                let _ = std::panic::catch_unwind(engine::schedule_notify);
            }
            if turn {
                // The access happens now, in the schedule's order: happens-before tracking.
                let _ =
                    std::panic::catch_unwind(|| crate::hb::on_access(code, offset as u32, specs));
            }
            ffi::Py_NewRef(ffi::Py_None())
        }
        Event::Skip => ffi::Py_NewRef(ffi::Py_None()),
        Event::Point(d) => {
            if d != Decision::Continue && may_wait() {
                let state = ffi::PyEval_SaveThread();
                let _ = std::panic::catch_unwind(|| d.wait());
                ffi::PyEval_RestoreThread(state);
                leave();
            }
            ffi::Py_NewRef(ffi::Py_None())
        }
        Event::Disable => match DISABLE_PTR.load(Ordering::Acquire) {
            p if p.is_null() => ffi::Py_NewRef(ffi::Py_None()),
            p => ffi::Py_NewRef(p),
        },
    }
}

/// Exact mode: the code objects whose accesses the recorded steps name, kept alive (by
/// address) so a lane view can resolve them; emptied when an exact run is made.
static CODES: parking_lot::Mutex<Option<HashMap<usize, Py<PyAny>>>> = parking_lot::Mutex::new(None);

/// Bumped whenever [`CODES`] is emptied, so that [`LAST_KEPT`] of an older run never counts.
static CODES_GENERATION: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// (generation of [`CODES`], code object address) last kept by this thread.
    static LAST_KEPT: std::cell::Cell<(u64, usize)> = const { std::cell::Cell::new((u64::MAX, 0)) };
}

/// Keep `code` alive for the lane view.
///
/// # Safety
/// `code` is a live object and the calling thread is attached to the interpreter.
unsafe fn keep_code(code: *mut ffi::PyObject) {
    // Consecutive points are mostly in one code object: skip the shared map for those.
    let generation = CODES_GENERATION.load(Ordering::Acquire);
    if LAST_KEPT.with(|k| k.get()) == (generation, code as usize) {
        return;
    }
    let mut codes = CODES.lock();
    if CODES_GENERATION.load(Ordering::Acquire) != generation {
        return; // emptied meanwhile by a new exact run; this point belongs to the old one
    }
    LAST_KEPT.with(|k| k.set((generation, code as usize)));
    let map = codes.get_or_insert_with(HashMap::new);
    map.entry(code as usize).or_insert_with(|| {
        // SAFETY: attached, and `code` is a live object (see above); a new strong reference.
        unsafe { Bound::from_borrowed_ptr(Python::assume_attached(), code).unbind() }
    });
}

/// The code object at `addr` that a recorded step names, if it is kept.
pub(crate) fn code_object(py: Python<'_>, addr: usize) -> Option<Py<PyAny>> {
    CODES
        .lock()
        .as_ref()
        .and_then(|m| m.get(&addr))
        .map(|o| o.clone_ref(py))
}

/// `sys.monitoring.DISABLE`, kept alive by [`DISABLE`] (set once at module init).
static DISABLE_PTR: AtomicPtr<ffi::PyObject> = AtomicPtr::new(std::ptr::null_mut());

struct MethodDef(ffi::PyMethodDef);
// SAFETY: the definition is immutable after construction and only read by CPython.
unsafe impl Sync for MethodDef {}

static ON_INSTRUCTION: MethodDef = MethodDef(ffi::PyMethodDef {
    ml_name: c"on_instruction".as_ptr(),
    ml_meth: ffi::PyMethodDefPointer {
        PyCFunctionFast: on_instruction,
    },
    ml_flags: ffi::METH_FASTCALL,
    ml_doc: c"on_instruction(code, offset): the sys.monitoring INSTRUCTION callback of --ftrace"
        .as_ptr(),
});

/// Read a seed: an int in -2**63 .. 2**64-1 (a negative one is taken modulo 2**64).
fn seed_arg(obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    if obj.is_instance_of::<PyBool>() || !obj.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "a seed must be an int, not {}",
            obj.get_type().name()?
        )));
    }
    match obj.extract::<i128>() {
        Ok(v) if (seed::INT_MIN..=seed::INT_MAX).contains(&v) => Ok(v as u64),
        _ => Err(PyValueError::new_err(format!(
            "a seed must be between -2**63 and 2**64-1, not {obj}"
        ))),
    }
}

/// derive_seed(seed, *parts) -> int
///
/// A 64-bit seed derived from `seed` and a path of `parts` (each a str or an int in
/// -2**63 .. 2**64-1). The same on every platform and release: see rust/seed.rs for the
/// algorithm (SplitMix64 over a typed encoding of the parts).
#[pyfunction]
#[pyo3(signature = (seed, *parts))]
fn derive_seed(seed: &Bound<'_, PyAny>, parts: &Bound<'_, PyTuple>) -> PyResult<u64> {
    enum Owned<'py> {
        Int(i128),
        Str(Bound<'py, PyString>),
    }
    let seed = seed_arg(seed)?;
    let mut owned = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        if let Ok(s) = part.cast::<PyString>() {
            owned.push(Owned::Str(s.clone()));
        } else if part.is_instance_of::<PyInt>() && !part.is_instance_of::<PyBool>() {
            let v = part.extract::<i128>().map_err(|_| {
                PyValueError::new_err(format!("part {i} ({part}) is outside -2**63 .. 2**64-1"))
            })?;
            owned.push(Owned::Int(v));
        } else {
            return Err(PyTypeError::new_err(format!(
                "part {i} must be a str or an int, not {}",
                part.get_type().name()?
            )));
        }
    }
    let path = owned
        .iter()
        .map(|p| match p {
            Owned::Int(v) => Ok(Part::Int(*v)),
            Owned::Str(s) => s.to_str().map(Part::Str),
        })
        .collect::<PyResult<Vec<Part<'_>>>>()?;
    seed::derive(seed, &path).map_err(PyValueError::new_err)
}

/// set_hooked_opcodes(table): install the 256-entry opcode table (see rust/opcodes.rs).
#[pyfunction]
fn set_hooked_opcodes(table: Vec<u16>) -> PyResult<()> {
    opcodes::set_table(&table).map_err(PyValueError::new_err)
}

/// set_access_classifier(f, start_safe=False): explore mode's step classifier, f(code,
/// offset) -> (0 opaque | 1 read | 2 write, key), or None; start_safe: a worker's first step
/// touches nothing shared (see accesses.rs).
#[pyfunction]
#[pyo3(signature = (classifier, start_safe=false))]
fn set_access_classifier(classifier: Option<Py<PyAny>>, start_safe: bool) {
    accesses::set_classifier(classifier, start_safe);
}

/// explore_object_number(obj) -> int: the number of `obj` (a lock, a container) in explore's
/// round under way: its order of first use (see visits.rs), the object kept until the round
/// ends.
#[pyfunction]
fn explore_object_number(obj: &Bound<'_, PyAny>) -> u64 {
    // SAFETY: attached (a Python call); `obj` is live.
    unsafe { crate::visits::object_number(obj.as_ptr()) }
}

/// explore_new_round(): explore's next round starts; its objects are numbered afresh.
#[pyfunction]
fn explore_new_round() {
    crate::visits::new_round();
}

/// explore_visit_counts(check=None) -> (from a template, from Python, checked, differed):
/// the visits of explore's locations whose answer depends on the visit, answered without
/// Python or by it; `check` True zeroes the counts and turns on a comparison of each templated
/// answer with Python's (for tests: it asks Python at every such visit), False turns it off.
#[pyfunction]
#[pyo3(signature = (check=None))]
fn explore_visit_counts(check: Option<bool>) -> (u64, u64, u64, u64) {
    if let Some(on) = check {
        crate::visits::set_checking(on);
    }
    crate::visits::counts()
}

/// hooked_opcodes() -> list[int]: the installed table.
#[pyfunction]
fn hooked_opcodes() -> Vec<u16> {
    opcodes::table()
}

/// Id of the active run, 0 when none is.
#[pyfunction]
fn active_run_id() -> u64 {
    engine::active_id()
}

/// The default injection policy, as keyword arguments of `Run`.
#[pyfunction]
fn policy_defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let c = PolicyConfig::default();
    let d = PyDict::new(py);
    d.set_item("yield_probability", c.yield_probability)?;
    d.set_item("delay_probability", c.delay_probability)?;
    d.set_item("sleep_share", c.sleep_share)?;
    d.set_item("max_spin_ns", c.max_spin_ns)?;
    d.set_item("max_sleep_us", c.max_sleep_us)?;
    Ok(d)
}

/// Run(seed, *, yield_probability, delay_probability, sleep_share, max_spin_ns, max_sleep_us,
///     mode, scheduler, pct_depth, stay_percent, switch_budget, sched_k, replay)
///
/// One test run: its seed (already derived for the test), its injection policy and its
/// statistics. At most one run is active in the process at a time. In exact mode,
/// `scheduler` picks the policy (`switch_budget`: the mix policy's hand-overs in a long
/// round), `sched_k` fixes every round's step estimate (a replay from the seed), and
/// `replay` is a decision list every round follows.
#[pyclass(frozen, module = "pytest_ftrace._native")]
struct Run {
    shared: Arc<RunShared>,
}

#[pymethods]
impl Run {
    #[new]
    #[pyo3(signature = (seed, *, yield_probability=None, delay_probability=None,
                        sleep_share=None, max_spin_ns=None, max_sleep_us=None,
                        mode="chaos", scheduler="random", pct_depth=3, stay_percent=50,
                        switch_budget=sched::DEFAULT_SWITCH_BUDGET, sched_k=None, replay=None,
                        explore_bound=2))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        seed: &Bound<'_, PyAny>,
        yield_probability: Option<f64>,
        delay_probability: Option<f64>,
        sleep_share: Option<f64>,
        max_spin_ns: Option<u32>,
        max_sleep_us: Option<u32>,
        mode: &str,
        scheduler: &str,
        pct_depth: u32,
        stay_percent: u32,
        switch_budget: u32,
        sched_k: Option<u64>,
        replay: Option<Vec<u32>>,
        explore_bound: u32,
    ) -> PyResult<Run> {
        let d = PolicyConfig::default();
        let config = PolicyConfig {
            yield_probability: yield_probability.unwrap_or(d.yield_probability),
            delay_probability: delay_probability.unwrap_or(d.delay_probability),
            sleep_share: sleep_share.unwrap_or(d.sleep_share),
            max_spin_ns: max_spin_ns.unwrap_or(d.max_spin_ns),
            max_sleep_us: max_sleep_us.unwrap_or(d.max_sleep_us),
        };
        let policy = Policy::new(config).map_err(PyValueError::new_err)?;
        let seed = seed_arg(seed)?;
        let core = match (mode, scheduler, replay) {
            ("chaos", _, _) => None,
            ("exact", _, Some(list)) => Some(Core::new(seed, sched::Policy::Replay(list))),
            ("exact", "random", None) => Some(Core::new(seed, sched::Policy::Random)),
            ("exact", "explore", None) => Some(Core::new(
                seed,
                sched::Policy::Explore(sched::explore::Shared::new(explore_bound)),
            )),
            ("exact", "mix", None) if switch_budget >= 1 => Some(Core::new(
                seed,
                sched::Policy::Mix {
                    budget: switch_budget,
                },
            )),
            ("exact", "aligned", None) => Some(Core::new(
                seed,
                sched::Policy::Aligned {
                    stay_percent: stay_percent.min(100),
                },
            )),
            ("exact", "pct", None) if pct_depth >= 1 => {
                Some(Core::new(seed, sched::Policy::Pct { depth: pct_depth }))
            }
            ("exact", other, None) => {
                return Err(PyValueError::new_err(format!(
                    "scheduler must be 'random', 'mix', 'aligned', 'pct' (pct_depth >= 1) or 'explore', not {other:?}"
                )))
            }
            (other, _, _) => {
                return Err(PyValueError::new_err(format!(
                    "mode must be 'chaos' or 'exact', not {other:?}"
                )))
            }
        };
        let core = core.map(|c| c.with_k(sched_k));
        if core.is_some() {
            accesses::reset(matches!(
                core.as_ref().map(Core::policy),
                Some(sched::Policy::Explore(_))
            ));
            sched::watch::start(engine::active_core);
            let mut codes = CODES.lock();
            *codes = None;
            CODES_GENERATION.fetch_add(1, Ordering::AcqRel);
        }
        Ok(Run {
            shared: RunShared::with_core(seed, policy, core),
        })
    }

    /// "exact" or "chaos".
    #[getter]
    fn mode(&self) -> &'static str {
        if self.shared.core().is_some() {
            "exact"
        } else {
            "chaos"
        }
    }

    /// Exact mode: the calling worker `tid` starts round `iteration` of `expected` workers;
    /// returns (the interpreter released) when it is its turn: "turn" or "free". The round's
    /// scheduler is seeded from `seed_round` (default: `iteration`).
    #[pyo3(signature = (tid, iteration, expected, seed_round=None))]
    fn sched_enter(
        &self,
        py: Python<'_>,
        tid: u32,
        iteration: u64,
        expected: usize,
        seed_round: Option<u64>,
    ) -> PyResult<&'static str> {
        let (core, _) = engine::exact_slot(&self.shared).map_err(PyRuntimeError::new_err)?;
        engine::set_managed(&self.shared, Some(tid)).map_err(PyRuntimeError::new_err)?;
        let ident = thread_ident();
        let seed_round = seed_round.unwrap_or(iteration);
        let wait = detached(py, {
            let core = Arc::clone(&core);
            move || core.enter(tid, ident, iteration, seed_round, expected)
        });
        // Managed in the round it entered (whose generation the enter may have started).
        engine::set_managed(&self.shared, Some(tid)).map_err(PyRuntimeError::new_err)?;
        crate::hb::note_round(self.shared.id(), core.generation(), iteration);
        Ok(wait.name())
    }

    /// Exact mode: a thread the test started, given `tid` by sched_spawn in round generation
    /// `generation` (sched_generation), starts running.
    fn sched_attach(&self, py: Python<'_>, tid: u32, generation: u64) -> PyResult<&'static str> {
        let (core, _) = engine::exact_slot(&self.shared).map_err(PyRuntimeError::new_err)?;
        if generation != core.generation() {
            return Ok(Wait::Free.name()); // its round is over: it runs unmanaged
        }
        engine::set_managed(&self.shared, Some(tid)).map_err(PyRuntimeError::new_err)?;
        let ident = thread_ident();
        let wait = detached(py, move || core.attach(tid, ident, generation));
        crate::hb::started(py);
        Ok(wait.name())
    }

    /// Exact mode: the current round's generation (see sched_attach).
    fn sched_generation(&self) -> u64 {
        self.shared.core().map_or(0, |c| c.generation())
    }

    /// Exact mode: the calling thread leaves the round (no-op when it is not managed).
    fn sched_exit(&self, py: Python<'_>) -> PyResult<()> {
        let (core, tid) = engine::exact_slot(&self.shared).map_err(PyRuntimeError::new_err)?;
        if let Some(tid) = tid {
            crate::hb::exiting(py);
            engine::set_managed(&self.shared, None).map_err(PyRuntimeError::new_err)?;
            core.exit(tid);
        }
        Ok(())
    }

    /// Exact mode: the calling thread's id, None when it is not managed.
    fn sched_me(&self) -> Option<u32> {
        engine::managed_id(&self.shared)
    }

    /// Exact mode: an explicit scheduling point; "turn" or "free".
    fn sched_point(&self, py: Python<'_>) -> PyResult<&'static str> {
        let (core, tid) = engine::exact_slot(&self.shared).map_err(PyRuntimeError::new_err)?;
        let Some(tid) = tid else { return Ok("free") };
        Ok(detached(py, move || core.point(tid)).name())
    }

    /// Explore mode: a scheduling point in a primitive whose step does `kind` to `key` (as
    /// accesses::from_answer reads them; a lock's operation is kind 4); as sched_point.
    fn sched_point_as(&self, py: Python<'_>, kind: u8, key: &str) -> PyResult<&'static str> {
        let (core, tid) = engine::exact_slot(&self.shared).map_err(PyRuntimeError::new_err)?;
        let Some(tid) = tid else { return Ok("free") };
        let at = accesses::synthetic(accesses::from_answer(kind, key));
        Ok(detached(py, move || core.point_at(tid, at)).name())
    }

    /// Exact mode: block the calling thread on `resource` until it is woken (or, `timed`, until
    /// nothing else can run; of several such threads, the one whose `timeout` in seconds ends
    /// first on the round's virtual clock): "woken", "timeout", "deadlock" or "free".
    /// `patient` (untimed): a stall of every managed thread ends it as "timeout", never as a
    /// deadlock (see Core::block_patient); its `timeout`, if given, is the deadline no other
    /// timed block may be timed out past while it waits.
    #[pyo3(signature = (resource, timed, timeout=None, patient=false))]
    fn sched_block(
        &self,
        py: Python<'_>,
        resource: u64,
        timed: bool,
        timeout: Option<f64>,
        patient: bool,
    ) -> PyResult<&'static str> {
        let (core, tid) = engine::exact_slot(&self.shared).map_err(PyRuntimeError::new_err)?;
        let Some(tid) = tid else { return Ok("free") };
        let nanos = |seconds: f64| {
            if seconds.is_finite() && seconds > 0.0 {
                (seconds * 1e9).min(u64::MAX as f64 / 2.0) as u64
            } else {
                0
            }
        };
        if patient && !timed {
            let deadline_ns = timeout.map(nanos);
            return Ok(detached(py, move || core.block_patient(tid, resource, deadline_ns)).name());
        }
        let timeout_ns = timed.then(|| nanos(timeout.unwrap_or(0.0)));
        Ok(detached(py, move || core.block_for(tid, resource, timeout_ns)).name())
    }

    /// Exact mode: make the threads blocked on `resource` runnable; returns how many.
    fn sched_wake(&self, resource: u64) -> usize {
        self.shared.core().map_or(0, |c| c.wake(resource))
    }

    /// Exact mode: an id for a thread the calling (managed) thread is about to start.
    fn sched_spawn(&self, py: Python<'_>) -> Option<u32> {
        let child = self.shared.core()?.spawn()?;
        crate::hb::spawn(py, child);
        Some(child)
    }

    /// Exact mode: whether managed thread `tid` is in the round and not finished.
    fn sched_live(&self, tid: u32) -> bool {
        self.shared.core().is_some_and(|c| c.is_live(tid))
    }

    /// Exact mode: the test is over: release every thread waiting in the core, and let every
    /// later wait return at once (threads the test left running never wait here again).
    fn sched_close(&self) {
        if let Some(c) = self.shared.core() {
            c.close();
        }
    }

    /// Exact mode: the deadlock the core declared was not one; the round runs free for `reason`.
    fn sched_not_deadlock(&self, reason: &str) {
        if let Some(c) = self.shared.core() {
            c.not_deadlock(reason);
        }
    }

    /// Exact mode: let the round run free (the watchdog calls this with the reason).
    fn sched_release(&self, reason: &str) {
        if let Some(c) = self.shared.core() {
            c.release(reason);
        }
    }

    /// Exact mode: (running id, its thread ident, progress, waiting, free, started).
    fn sched_status(&self) -> Option<(Option<u32>, u64, u64, usize, bool, bool)> {
        self.shared.core().map(|c| c.status())
    }

    /// Exact mode: [(id, thread ident, status, resource)] of the round's managed threads.
    fn sched_threads(&self) -> Vec<(u32, u64, &'static str, u64)> {
        let Some(core) = self.shared.core() else {
            return Vec::new();
        };
        core.threads()
            .into_iter()
            .map(|(id, ident, st)| match st {
                Status::Runnable => (id, ident, "runnable", 0),
                Status::Blocked { resource, .. } => (id, ident, "blocked", resource),
                Status::Finished => (id, ident, "finished", 0),
            })
            .collect()
    }

    /// Exact mode: the record of round `iteration` (None before it finished): decisions,
    /// preemptions, exact, deadlock, divergences, reason.
    fn sched_round<'py>(
        &self,
        py: Python<'py>,
        iteration: u64,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(rec) = self.shared.core().and_then(|c| c.round(iteration)) else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("decisions", rec.decisions)?;
        d.set_item("preemptions", rec.preemptions)?;
        d.set_item("exact", rec.exact)?;
        d.set_item("deadlock", rec.deadlock)?;
        d.set_item("divergences", rec.divergences)?;
        d.set_item("reason", rec.reason)?;
        d.set_item("k", rec.k)?;
        d.set_item("released", rec.released)?;
        // The thread that ran outside the schedule and made the round not exact: (thread,
        // code object or None, offset) of where it was when it left (as in sched_steps).
        let free_run = rec.free_run.map(|(tid, (code, offset))| {
            let codes = CODES.lock();
            let obj = codes
                .as_ref()
                .and_then(|m| m.get(&code))
                .map(|o| o.clone_ref(py));
            (tid, obj, offset)
        });
        d.set_item("free_run", free_run)?;
        Ok(Some(d))
    }

    /// Exact mode: (points, hand-overs, preemptions, exact, deadlock) of round `iteration`
    /// (None before it finished), counted in place: the statistics and the end-of-test notes
    /// need no list of the round's decisions.
    fn sched_counts(&self, iteration: u64) -> Option<(usize, usize, u64, bool, bool)> {
        self.shared.core()?.with_round(iteration, |rec| {
            let d = &rec.decisions;
            let handovers = d.windows(2).filter(|w| w[0] != w[1]).count();
            (d.len(), handovers, rec.preemptions, rec.exact, rec.deadlock)
        })
    }

    /// Exact mode: where each chosen thread went on from in round `iteration`:
    /// [(thread id, code object or None, offset)]; None with offset 0: the thread's start,
    /// with offset 1: inside a lock, condition, join or sleep.
    fn sched_steps(&self, py: Python<'_>, iteration: u64) -> Vec<(u32, Option<Py<PyAny>>, u32)> {
        let Some(rec) = self.shared.core().and_then(|c| c.round(iteration)) else {
            return Vec::new();
        };
        let codes = CODES.lock();
        rec.decisions
            .iter()
            .zip(rec.steps.iter())
            .map(|(&tid, &(code, offset))| {
                let obj = codes
                    .as_ref()
                    .and_then(|m| m.get(&code))
                    .map(|o| o.clone_ref(py));
                (tid, obj, offset)
            })
            .collect()
    }

    /// Explore: the exploration's counts so far (None: not an explore run): executions,
    /// pending, pruned, over_bound, redundant, divergences, retried, done, bound (of the pass under
    /// way), target (asked for), pass_executions, longest.
    fn explore_progress<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(sched::Policy::Explore(tree)) = self.shared.core().map(|c| c.policy()) else {
            return Ok(None);
        };
        let p = tree.0.lock().progress();
        let d = PyDict::new(py);
        d.set_item("executions", p.executions)?;
        d.set_item("pending", p.pending)?;
        d.set_item("pruned", p.pruned)?;
        d.set_item("over_bound", p.over_bound)?;
        d.set_item("redundant", p.redundant)?;
        d.set_item("divergences", p.divergences)?;
        d.set_item("retried", p.retried)?;
        d.set_item("done", p.done)?;
        d.set_item("bound", p.bound)?;
        d.set_item("target", p.target)?;
        d.set_item("pass_executions", p.pass_executions)?;
        d.set_item("longest", p.longest)?;
        Ok(Some(d))
    }

    /// Explore: the whole search tree as bytes (None: not an explore run), for
    /// `explore_resume` in another process of the test (a forked execution) or back here.
    fn explore_state<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        let Some(sched::Policy::Explore(tree)) = self.shared.core().map(|c| c.policy()) else {
            return None;
        };
        let words = tree.0.lock().to_words();
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        Some(PyBytes::new(py, &bytes))
    }

    /// Explore: go on from the tree `explore_state` gave (between rounds); ValueError when
    /// `state` is not such a tree or this is not an explore run.
    fn explore_resume(&self, state: &[u8]) -> PyResult<()> {
        let Some(sched::Policy::Explore(tree)) = self.shared.core().map(|c| c.policy()) else {
            return Err(PyValueError::new_err("not an explore run"));
        };
        let words: Vec<u64> = state
            .chunks(8)
            .map(|c| <[u8; 8]>::try_from(c).map(u64::from_le_bytes))
            .collect::<Result<_, _>>()
            .map_err(|_| PyValueError::new_err("not an explore tree"))?;
        let found = sched::explore::Tree::from_words(&words)
            .ok_or_else(|| PyValueError::new_err("not an explore tree"))?;
        *tree.0.lock() = found;
        Ok(())
    }

    /// Exact mode: what the scheduler learned from the rounds so far and the next rounds are
    /// made with (the longest round's steps), for `sched_learn` in another process of the
    /// test (a forked round's) or back here.
    fn sched_learned(&self) -> u64 {
        self.shared.core().map_or(0, |c| c.learned_steps())
    }

    /// Exact mode: learn what `sched_learned` gave in another process of the test.
    fn sched_learn(&self, steps: u64) {
        if let Some(core) = self.shared.core() {
            core.learn_steps(steps);
        }
    }

    /// Exact mode: decisions made so far in the current round.
    fn sched_step(&self) -> u64 {
        self.shared.core().map_or(0, |c| c.step())
    }

    #[getter]
    fn seed(&self) -> u64 {
        self.shared.seed()
    }

    #[getter]
    fn id(&self) -> u64 {
        self.shared.id()
    }

    /// Make this the active run: hooked accesses on any thread now inject.
    fn activate(&self) -> PyResult<()> {
        engine::activate(&self.shared).map_err(PyRuntimeError::new_err)
    }

    /// Stop injecting; returns whether this run was the active one.
    fn deactivate(&self) -> bool {
        engine::deactivate(&self.shared)
    }

    /// The calling thread is worker `thread_index`: it gets that worker's stream.
    fn thread_enter(&self, thread_index: u64) -> PyResult<()> {
        engine::thread_enter(&self.shared, thread_index).map_err(PyRuntimeError::new_err)
    }

    /// The calling worker starts round `iteration`: its stream is reseeded.
    fn round_start(&self, iteration: u64) -> PyResult<()> {
        engine::round_start(&self.shared, iteration).map_err(PyRuntimeError::new_err)
    }

    /// The calling thread leaves the run; its counts are added.
    fn thread_exit(&self) -> PyResult<()> {
        engine::thread_exit(&self.shared).map_err(PyRuntimeError::new_err)
    }

    /// Record one round's latency, in seconds.
    fn record_round(&self, seconds: f64) {
        self.shared.stats.record_round(seconds);
    }

    /// Counters and round latency percentiles (see rust/stats.rs).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        engine::flush_current(&self.shared);
        let s = self.shared.stats.snapshot();
        let d = PyDict::new(py);
        d.set_item("threads", s.threads)?;
        d.set_item("foreign_threads", s.foreign_threads)?;
        d.set_item("executions", s.executions)?;
        d.set_item("rounds", s.rounds)?;
        d.set_item("hooked", s.hooked)?;
        d.set_item("generator_points", s.generator)?;
        d.set_item("iteration_points", s.iteration)?;
        d.set_item("yields", s.yields)?;
        d.set_item("delays", s.delays)?;
        d.set_item("delay_ns", s.delay_ns)?;
        d.set_item("round_p50_us", s.round_p50_us)?;
        d.set_item("round_p99_us", s.round_p99_us)?;
        d.set_item("round_max_us", s.round_max_us)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "<Run id={} seed={:#018x}>",
            self.shared.id(),
            self.shared.seed()
        )
    }
}

/// The calling thread's identifier, as `threading.get_ident()` gives it.
fn thread_ident() -> u64 {
    // SAFETY: no preconditions; returns the current OS thread's identifier.
    unsafe { PyThread_get_thread_ident() as u64 }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Fetch sys.monitoring.DISABLE now, so the first event does no import.
    let disable = disable_object(m.py())?;
    DISABLE_PTR.store(disable.as_ptr(), Ordering::Release);
    // SAFETY: the definition is static; the new function object is owned by `callback`.
    let callback = unsafe {
        let f = ffi::PyCFunction_NewEx(
            &ON_INSTRUCTION.0 as *const ffi::PyMethodDef as *mut ffi::PyMethodDef,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        Bound::from_owned_ptr_or_err(m.py(), f)?
    };
    m.add("on_instruction", callback)?;
    m.add_function(wrap_pyfunction!(derive_seed, m)?)?;
    m.add_function(wrap_pyfunction!(fork_prepare, m)?)?;
    m.add_function(wrap_pyfunction!(fork_parent, m)?)?;
    m.add_function(wrap_pyfunction!(fork_child, m)?)?;
    m.add_function(wrap_pyfunction!(interpreter_waits, m)?)?;
    m.add_function(wrap_pyfunction!(learn_interpreter_waits, m)?)?;
    m.add_function(wrap_pyfunction!(set_hooked_opcodes, m)?)?;
    m.add_function(wrap_pyfunction!(hooked_opcodes, m)?)?;
    m.add_function(wrap_pyfunction!(set_access_classifier, m)?)?;
    m.add_function(wrap_pyfunction!(explore_object_number, m)?)?;
    m.add_function(wrap_pyfunction!(explore_new_round, m)?)?;
    m.add_function(wrap_pyfunction!(explore_visit_counts, m)?)?;
    m.add_function(wrap_pyfunction!(active_run_id, m)?)?;
    m.add_function(wrap_pyfunction!(policy_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(release_all, m)?)?;
    m.add_function(wrap_pyfunction!(threads_inside, m)?)?;
    m.add_class::<Run>()?;
    iterpoints::register(m)?;
    crate::shared::register(m)?;
    crate::hb::register(m)?;
    Ok(())
}

/// Before `os.fork()` of a forked round: the core's watcher thread holds no lock until
/// `fork_parent` / `fork_child` (a child inherits every lock as it was at the fork).
#[pyfunction]
fn fork_prepare(py: Python<'_>) {
    py.detach(sched::watch::pause);
}

/// After `os.fork()`, in the process that forked.
#[pyfunction]
fn fork_parent() {
    sched::watch::resume();
}

/// After `os.fork()`, in the child: its own watcher thread.
#[pyfunction]
fn fork_child() {
    sched::watch::restart_in_child(engine::active_core);
}

/// interpreter_waits() -> list[int]: the futex words the watcher learned the interpreter's
/// own lock waits on (a thread asleep on one waits for the GIL, not in C), to hand to a forked
/// process and back, so that what one child learned is not lost with it.
#[pyfunction]
fn interpreter_waits() -> Vec<u64> {
    sched::watch::gil_words()
}

/// learn_interpreter_waits(words): learn the words `interpreter_waits` gave in another
/// process of the test (forked from this one, or from its snapshot).
#[pyfunction]
fn learn_interpreter_waits(words: Vec<u64>) {
    sched::watch::learn_gil_words(&words);
}
