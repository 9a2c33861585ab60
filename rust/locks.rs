//! Schedulable locks: `Lock` and `RLock` types that stand in for `threading.Lock` and
//! `threading.RLock` (and `threading._allocate_lock`, which `Condition`, `Event`, `Semaphore`,
//! `Barrier` and `queue.Queue` build on) from the moment `--ftrace` is configured, so every
//! lock made afterwards is one exact mode can schedule (see `pytest_ftrace/locks.py`).
//!
//! Outside a round they are plain locks: an uncontended acquire or release is an atomic
//! operation on a `parking_lot` raw mutex with the interpreter held, and a contended blocking
//! acquire waits with the interpreter released, in slices, checking for signals between them
//! (as `_thread.lock` does). Semantics, errors and messages follow `_thread.lock` and
//! `_thread.RLock`.
//!
//! In a thread that exact mode manages, `acquire` hands over to the Python hook installed by
//! `set_lock_hooks` (which waits in the scheduler instead of in the OS), and `release` tells
//! the hook afterwards. A release wakes the scheduler's waiters of the lock only when a
//! managed thread waits on it (`waiters`, counted before its first try, so a release between
//! its failed try and its block is never missed).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::lock_api::{GuardNoSend, RawMutex as _, RawMutexTimed as _};
use parking_lot::RawMutex;
use pyo3::exceptions::{PyOverflowError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyFloat, PyTuple};

use crate::{engine, hooks, lockstep, sched};

extern "C" {
    fn PyThread_get_thread_ident() -> std::os::raw::c_ulong;
}

fn ident() -> u64 {
    // SAFETY: no preconditions.
    unsafe { PyThread_get_thread_ident() as u64 }
}

/// Whether the hooks are set (exact mode has a test installed).
static HOOKS_ON: AtomicBool = AtomicBool::new(false);
/// (acquire hook, release hook) while exact mode runs a test.
static HOOKS: parking_lot::RwLock<Option<(Py<PyAny>, Py<PyAny>)>> = parking_lot::RwLock::new(None);

/// set_lock_hooks(acquire, release) / set_lock_hooks(None, None): the functions a managed
/// thread's acquire and release go through. `acquire(lock, blocking, timeout) -> bool` does
/// the whole acquire (with `lock._ftrace_try()` and `lock._ftrace_waiting()`); `release(lock,
/// managed, waiting)` is called after a release by a managed thread, or by any thread when a managed
/// thread waits for the lock.
#[pyfunction]
#[pyo3(signature = (acquire, release))]
fn set_lock_hooks(acquire: Option<Py<PyAny>>, release: Option<Py<PyAny>>) {
    let mut hooks = HOOKS.write();
    match (acquire, release) {
        (Some(a), Some(r)) => {
            *hooks = Some((a, r));
            HOOKS_ON.store(true, Ordering::Release);
        }
        _ => {
            HOOKS_ON.store(false, Ordering::Release);
            *hooks = None;
        }
    }
}

/// Whether the calling thread's acquire goes through the hook.
#[inline]
fn managed_now() -> bool {
    HOOKS_ON.load(Ordering::Acquire) && engine::managed_now()
}

fn hook(py: Python<'_>, which: usize) -> Option<Py<PyAny>> {
    let _ = py;
    HOOKS.read().as_ref().map(|(a, r)| {
        if which == 0 {
            a.clone_ref(py)
        } else {
            r.clone_ref(py)
        }
    })
}

/// Parse `acquire(blocking, timeout)` as `_thread.lock` does: the timeout in seconds, or None
/// for no timeout; errors with CPython's messages.
fn parse_timeout(blocking: bool, timeout: &Bound<'_, PyAny>) -> PyResult<Option<f64>> {
    let t: f64 = if let Ok(f) = timeout.cast::<PyFloat>() {
        f.value()
    } else {
        match timeout.extract::<i64>() {
            Ok(i) => i as f64,
            Err(_) => match timeout.extract::<f64>() {
                Ok(f) if !timeout.is_instance_of::<pyo3::types::PyString>() => f,
                _ => {
                    return Err(PyTypeError::new_err(format!(
                        "'{}' object cannot be interpreted as an integer",
                        timeout.get_type().name()?
                    )))
                }
            },
        }
    };
    if !blocking && t != -1.0 {
        return Err(PyValueError::new_err(
            "can't specify a timeout for a non-blocking call",
        ));
    }
    if t < 0.0 && t != -1.0 {
        let msg = if cfg!(Py_3_13) {
            "timeout value must be a non-negative number"
        } else {
            "timeout value must be positive"
        };
        return Err(PyValueError::new_err(msg));
    }
    if t.is_nan() || t > 9.2e9 {
        return Err(PyOverflowError::new_err(
            "timestamp out of range for platform time_t",
        ));
    }
    Ok(if t < 0.0 { None } else { Some(t) })
}

/// OS idents of the threads waiting in a contended blocking acquire outside the scheduler
/// (exact mode tells a real deadlock from a wait for such a thread by it).
/// Entries: (thread ident, address of the raw mutex it waits for, whether the wait has a
/// timeout). A release of that mutex while a test runs takes the entries out: those threads
/// are about to go on.
static NATIVE_WAITERS: parking_lot::Mutex<Vec<(u64, usize, bool)>> =
    parking_lot::Mutex::new(Vec::new());
static NATIVE_COUNT: AtomicU32 = AtomicU32::new(0);

struct NativeWait(u64);

impl NativeWait {
    fn new(raw: &RawMutex, timed: bool) -> NativeWait {
        let me = ident();
        NATIVE_WAITERS
            .lock()
            .push((me, raw as *const RawMutex as usize, timed));
        NATIVE_COUNT.fetch_add(1, Ordering::SeqCst);
        NativeWait(me)
    }

    /// A slice of the wait ended without the lock: another thread took it after the release
    /// that took this waiter out of the list, so it waits again and is listed again.
    fn still_waiting(&self, raw: &RawMutex, timed: bool) {
        let mut w = NATIVE_WAITERS.lock();
        if !w.iter().any(|&(x, _, _)| x == self.0) {
            w.push((self.0, raw as *const RawMutex as usize, timed));
        }
    }
}

impl Drop for NativeWait {
    fn drop(&mut self) {
        let mut w = NATIVE_WAITERS.lock();
        if let Some(i) = w.iter().position(|&(x, _, _)| x == self.0) {
            w.swap_remove(i);
        }
        NATIVE_COUNT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `raw` was released: its native waiters are about to go on (see [`native_waiters`]). Also
/// outside a test (the stress runner's one-thread run asks whether the threads a test left
/// are blocked for good), and only while some thread waits natively at all.
fn released_native(raw: &RawMutex) {
    if NATIVE_COUNT.load(Ordering::SeqCst) > 0 {
        let addr = raw as *const RawMutex as usize;
        NATIVE_WAITERS.lock().retain(|&(_, a, _)| a != addr);
    }
}

/// native_waiters(untimed=False) -> list[int]: the threads waiting for a native lock outside
/// the scheduler that no release has let go on since; with `untimed`, only those whose wait
/// has no timeout (nothing but a release ends it: the stress runner does not wait for a
/// thread the test left blocked that way).
#[pyfunction]
#[pyo3(signature = (untimed=false))]
fn native_waiters(untimed: bool) -> Vec<u64> {
    NATIVE_WAITERS
        .lock()
        .iter()
        .filter(|&&(_, _, timed)| !(untimed && timed))
        .map(|&(x, _, _)| x)
        .collect()
}

/// The OS ident of the thread that imported the module (the main thread).
static MAIN: AtomicU64 = AtomicU64::new(0);

/// How long one slice of a blocking wait lasts: signals are checked between slices.
const SLICE: Duration = Duration::from_millis(20);

/// Lock `raw`, waiting with the interpreter released for at most `timeout` seconds (None:
/// forever). Ok(false): timed out.
fn lock_blocking(py: Python<'_>, raw: &RawMutex, timeout: Option<f64>) -> PyResult<bool> {
    if raw.try_lock().is_some() {
        return Ok(true);
    }
    if timeout == Some(0.0) {
        return Ok(false);
    }
    let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t));
    let waiting = NativeWait::new(raw, deadline.is_some());
    loop {
        let slice = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()).min(SLICE),
            None => SLICE,
        };
        // A thread that takes the interpreter back once it finalizes is ended by pthread_exit,
        // which must not unwind through these frames. So a wait is counted in the hooks'
        // INSIDE count (the exit handler waits for it to come back, before finalizing), and
        // once the interpreter shuts down a waiter that did not get the lock never takes the
        // interpreter back: it sleeps until the process exits (it would be ended anyway:
        // only daemon threads are left by then).
        // The main thread finalizes the interpreter itself and is never ended that way: it
        // waits as usual (an exit handler may wait for a lock).
        let main = ident() == MAIN.load(Ordering::Relaxed);
        let got = if main {
            py.detach(|| raw.try_lock_for(slice).is_some())
        } else {
            if !hooks::may_wait() {
                if raw.try_lock().is_some() {
                    return Ok(true);
                }
                py.detach(park_forever);
            }
            let got = py.detach(|| {
                let got = raw.try_lock_for(slice).is_some();
                if !got && sched::SHUTDOWN.load(Ordering::SeqCst) {
                    hooks::leave();
                    park_forever();
                }
                got
            });
            hooks::leave();
            got
        };
        if got {
            return Ok(true);
        }
        waiting.still_waiting(raw, deadline.is_some());
        py.check_signals()?;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(raw.try_lock().is_some());
        }
    }
}

fn park_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// "file:line" of the calling Python frame, recorded for a lock made while exact mode runs a
/// test (deadlock reports name it); None otherwise (no cost outside a test).
fn made_at(py: Python<'_>) -> Option<String> {
    if !HOOKS_ON.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: attached to the interpreter; the frame is borrowed, the code a new reference.
    unsafe {
        let frame = pyo3::ffi::PyEval_GetFrame();
        if frame.is_null() {
            return None;
        }
        let line = pyo3::ffi::PyFrame_GetLineNumber(frame);
        let code = pyo3::ffi::PyFrame_GetCode(frame);
        let code = Bound::from_owned_ptr_or_opt(py, code.cast::<pyo3::ffi::PyObject>())?;
        let file: String = code.getattr("co_filename").ok()?.extract().ok()?;
        Some(format!("{file}:{line}"))
    }
}

fn blocking_arg(blocking: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
    match blocking {
        None => Ok(true),
        Some(b) => b.is_truthy(),
    }
}

/// A schedulable `threading.Lock`.
#[pyclass(frozen, module = "pytest_ftrace._native", name = "lock", weakref)]
pub struct Lock {
    raw: RawMutex,
    /// OS ident of the thread that acquired it last while it is held (0: unlocked); for
    /// deadlock reports only (any thread may release a Lock).
    owner: AtomicU64,
    /// Managed threads waiting for it in the scheduler.
    waiters: AtomicU32,
    /// Where it was made, when that was during an exact-mode test.
    made: Option<String>,
}

impl Lock {
    fn new_unlocked(py: Python<'_>) -> Lock {
        Lock {
            raw: RawMutex::INIT,
            owner: AtomicU64::new(0),
            waiters: AtomicU32::new(0),
            made: made_at(py),
        }
    }

    fn do_acquire(
        slf: &Bound<'_, Self>,
        blocking: Option<&Bound<'_, PyAny>>,
        timeout: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let py = slf.py();
        let this = slf.get();
        let blocking = blocking_arg(blocking)?;
        let timeout = match timeout {
            Some(t) => parse_timeout(blocking, t)?,
            None => None,
        };
        if managed_now() {
            if let Some((pointed, ours)) = lockstep::before_acquire(slf.as_any())? {
                if this._ftrace_try() {
                    lockstep::acquired(slf.as_any(), ours);
                    return Ok(true);
                }
                if let Some(h) = hook(py, 0) {
                    return h.call1(py, (slf, blocking, timeout, pointed))?.extract(py);
                }
            }
            if let Some(h) = hook(py, 0) {
                return h.call1(py, (slf, blocking, timeout))?.extract(py);
            }
        }
        let got = if !blocking {
            this.raw.try_lock().is_some()
        } else {
            lock_blocking(py, &this.raw, timeout)?
        };
        if got {
            this.owner.store(ident(), Ordering::Relaxed);
        }
        Ok(got)
    }

    fn do_release(slf: &Bound<'_, Self>) -> PyResult<()> {
        let this = slf.get();
        if !this.raw.is_locked() {
            return Err(PyRuntimeError::new_err("release unlocked lock"));
        }
        this.owner.store(0, Ordering::Relaxed);
        // SAFETY: the mutex is locked (checked above); a Lock may be released by any thread.
        unsafe { this.raw.unlock(GuardNoSend::new()) };
        released_native(&this.raw);
        after_release(slf.as_any(), &this.waiters)
    }
}

/// After a release: the hook, when a managed thread released it or one waits for it.
fn after_release(lock: &Bound<'_, PyAny>, waiters: &AtomicU32) -> PyResult<()> {
    if !HOOKS_ON.load(Ordering::Acquire) {
        return Ok(());
    }
    let waiting = waiters.load(Ordering::SeqCst) > 0;
    let managed = engine::managed_now();
    if managed && lockstep::after_release(lock, waiting)? {
        return Ok(());
    }
    if waiting || managed {
        if let Some(h) = hook(lock.py(), 1) {
            h.call1(lock.py(), (lock, managed, waiting))?;
        }
    }
    Ok(())
}

#[pymethods]
impl Lock {
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn py_new(
        _args: &Bound<'_, PyTuple>,
        _kwargs: Option<&Bound<'_, pyo3::types::PyDict>>,
    ) -> PyResult<Lock> {
        if !_args.is_empty() || _kwargs.is_some_and(|k| !k.is_empty()) {
            return Err(PyTypeError::new_err("lock() takes no arguments"));
        }
        Ok(Lock::new_unlocked(_args.py()))
    }

    /// Where it was made (file:line), when that was during an exact-mode test.
    #[getter]
    fn _ftrace_made_at(&self) -> Option<String> {
        self.made.clone()
    }

    #[pyo3(signature = (blocking=None, timeout=None))]
    fn acquire(
        slf: &Bound<'_, Self>,
        blocking: Option<&Bound<'_, PyAny>>,
        timeout: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        Lock::do_acquire(slf, blocking, timeout)
    }

    #[pyo3(signature = (blocking=None, timeout=None))]
    fn acquire_lock(
        slf: &Bound<'_, Self>,
        blocking: Option<&Bound<'_, PyAny>>,
        timeout: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        Lock::do_acquire(slf, blocking, timeout)
    }

    fn __enter__(slf: &Bound<'_, Self>) -> PyResult<bool> {
        Lock::do_acquire(slf, None, None)
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(slf: &Bound<'_, Self>, _exc: &Bound<'_, PyTuple>) -> PyResult<()> {
        Lock::do_release(slf)
    }

    fn release(slf: &Bound<'_, Self>) -> PyResult<()> {
        Lock::do_release(slf)
    }

    fn release_lock(slf: &Bound<'_, Self>) -> PyResult<()> {
        Lock::do_release(slf)
    }

    fn locked(&self) -> bool {
        self.raw.is_locked()
    }

    fn locked_lock(&self) -> bool {
        self.raw.is_locked()
    }

    fn _at_fork_reinit(&self) {
        if self.raw.is_locked() {
            // SAFETY: after a fork only the calling thread exists; the lock is made unlocked.
            unsafe { self.raw.unlock(GuardNoSend::new()) };
        }
        self.owner.store(0, Ordering::Relaxed);
        self.waiters.store(0, Ordering::Relaxed);
    }

    /// Exact mode: take it if it is free (never waits); the hook's acquire uses this.
    fn _ftrace_try(&self) -> bool {
        let got = self.raw.try_lock().is_some();
        if got {
            self.owner.store(ident(), Ordering::Relaxed);
        }
        got
    }

    /// Exact mode: a managed thread starts (+1) or stops (-1) waiting for it.
    fn _ftrace_waiting(&self, delta: i32) {
        if delta > 0 {
            self.waiters.fetch_add(1, Ordering::SeqCst);
        } else {
            self.waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Exact mode: a plain blocking acquire (the round runs free).
    #[pyo3(signature = (timeout=None))]
    fn _ftrace_block(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let got = lock_blocking(py, &self.raw, timeout)?;
        if got {
            self.owner.store(ident(), Ordering::Relaxed);
        }
        Ok(got)
    }

    /// The OS ident of the thread holding it (0: unlocked).
    fn _ftrace_owner(&self) -> u64 {
        if self.raw.is_locked() {
            self.owner.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    fn __repr__(slf: &Bound<'_, Self>) -> String {
        let state = if slf.get().raw.is_locked() {
            "locked"
        } else {
            "unlocked"
        };
        format!(
            "<{state} _thread.lock object at {:#x}>",
            slf.as_ptr() as usize
        )
    }
}

/// A schedulable `threading.RLock`.
#[pyclass(frozen, module = "pytest_ftrace._native", name = "RLock", weakref)]
pub struct RLock {
    raw: RawMutex,
    /// OS ident of the owner (0: unlocked).
    owner: AtomicU64,
    count: AtomicU64,
    waiters: AtomicU32,
    made: Option<String>,
}

impl RLock {
    fn owned_by_me(&self, me: u64) -> bool {
        self.raw.is_locked() && self.owner.load(Ordering::Relaxed) == me
    }

    fn take(&self, me: u64, count: u64) {
        self.owner.store(me, Ordering::Relaxed);
        self.count.store(count, Ordering::Relaxed);
    }

    fn do_acquire(
        slf: &Bound<'_, Self>,
        blocking: Option<&Bound<'_, PyAny>>,
        timeout: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let py = slf.py();
        let this = slf.get();
        let blocking = blocking_arg(blocking)?;
        let timeout = match timeout {
            Some(t) => parse_timeout(blocking, t)?,
            None => None,
        };
        let me = ident();
        if this.owned_by_me(me) {
            let c = this.count.load(Ordering::Relaxed);
            if c == u64::MAX {
                return Err(PyOverflowError::new_err("Internal lock count overflowed"));
            }
            this.count.store(c + 1, Ordering::Relaxed);
            return Ok(true);
        }
        if managed_now() {
            if let Some((pointed, ours)) = lockstep::before_acquire(slf.as_any())? {
                if this._ftrace_try() {
                    lockstep::acquired(slf.as_any(), ours);
                    return Ok(true);
                }
                if let Some(h) = hook(py, 0) {
                    return h.call1(py, (slf, blocking, timeout, pointed))?.extract(py);
                }
            }
            if let Some(h) = hook(py, 0) {
                return h.call1(py, (slf, blocking, timeout))?.extract(py);
            }
        }
        let got = if !blocking {
            this.raw.try_lock().is_some()
        } else {
            lock_blocking(py, &this.raw, timeout)?
        };
        if got {
            this.take(me, 1);
        }
        Ok(got)
    }

    fn do_release(slf: &Bound<'_, Self>) -> PyResult<()> {
        let this = slf.get();
        if !this.owned_by_me(ident()) {
            return Err(PyRuntimeError::new_err("cannot release un-acquired lock"));
        }
        let c = this.count.load(Ordering::Relaxed) - 1;
        this.count.store(c, Ordering::Relaxed);
        if c > 0 {
            return Ok(());
        }
        this.owner.store(0, Ordering::Relaxed);
        // SAFETY: held by the calling thread (checked above).
        unsafe { this.raw.unlock(GuardNoSend::new()) };
        released_native(&this.raw);
        after_release(slf.as_any(), &this.waiters)
    }
}

#[pymethods]
impl RLock {
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn py_new(
        _args: &Bound<'_, PyTuple>,
        _kwargs: Option<&Bound<'_, pyo3::types::PyDict>>,
    ) -> RLock {
        RLock {
            raw: RawMutex::INIT,
            owner: AtomicU64::new(0),
            count: AtomicU64::new(0),
            waiters: AtomicU32::new(0),
            made: made_at(_args.py()),
        }
    }

    #[getter]
    fn _ftrace_made_at(&self) -> Option<String> {
        self.made.clone()
    }

    #[pyo3(signature = (blocking=None, timeout=None))]
    fn acquire(
        slf: &Bound<'_, Self>,
        blocking: Option<&Bound<'_, PyAny>>,
        timeout: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        RLock::do_acquire(slf, blocking, timeout)
    }

    fn __enter__(slf: &Bound<'_, Self>) -> PyResult<bool> {
        RLock::do_acquire(slf, None, None)
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(slf: &Bound<'_, Self>, _exc: &Bound<'_, PyTuple>) -> PyResult<()> {
        RLock::do_release(slf)
    }

    fn release(slf: &Bound<'_, Self>) -> PyResult<()> {
        RLock::do_release(slf)
    }

    fn _is_owned(&self) -> bool {
        self.owned_by_me(ident())
    }

    fn _recursion_count(&self) -> u64 {
        if self.owned_by_me(ident()) {
            self.count.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    /// Release it whatever the count (Condition.wait); returns (count, owner).
    fn _release_save(slf: &Bound<'_, Self>) -> PyResult<(u64, u64)> {
        let this = slf.get();
        if this.count.load(Ordering::Relaxed) == 0 || !this.raw.is_locked() {
            return Err(PyRuntimeError::new_err("cannot release un-acquired lock"));
        }
        let state = (
            this.count.load(Ordering::Relaxed),
            this.owner.load(Ordering::Relaxed),
        );
        this.count.store(0, Ordering::Relaxed);
        this.owner.store(0, Ordering::Relaxed);
        // SAFETY: locked (checked above).
        unsafe { this.raw.unlock(GuardNoSend::new()) };
        released_native(&this.raw);
        after_release(slf.as_any(), &this.waiters)?;
        Ok(state)
    }

    /// Take it back with the state `_release_save` returned.
    fn _acquire_restore(slf: &Bound<'_, Self>, state: (u64, u64)) -> PyResult<()> {
        let this = slf.get();
        let py = slf.py();
        if managed_now() {
            if let Some(h) = hook(py, 0) {
                h.call1(py, (slf, true, None::<f64>))?;
                this.take(state.1, state.0);
                return Ok(());
            }
        }
        lock_blocking(py, &this.raw, None)?;
        this.take(state.1, state.0);
        Ok(())
    }

    fn _at_fork_reinit(&self) {
        if self.raw.is_locked() {
            // SAFETY: after a fork only the calling thread exists; the lock is made unlocked.
            unsafe { self.raw.unlock(GuardNoSend::new()) };
        }
        self.owner.store(0, Ordering::Relaxed);
        self.count.store(0, Ordering::Relaxed);
        self.waiters.store(0, Ordering::Relaxed);
    }

    fn _ftrace_try(&self) -> bool {
        let got = self.raw.try_lock().is_some();
        if got {
            self.take(ident(), 1);
        }
        got
    }

    fn _ftrace_waiting(&self, delta: i32) {
        if delta > 0 {
            self.waiters.fetch_add(1, Ordering::SeqCst);
        } else {
            self.waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[pyo3(signature = (timeout=None))]
    fn _ftrace_block(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let got = lock_blocking(py, &self.raw, timeout)?;
        if got {
            self.take(ident(), 1);
        }
        Ok(got)
    }

    fn _ftrace_owner(&self) -> u64 {
        if self.raw.is_locked() {
            self.owner.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    fn __repr__(slf: &Bound<'_, Self>) -> String {
        let this = slf.get();
        let locked = this.raw.is_locked();
        let (owner, count) = if locked {
            (
                this.owner.load(Ordering::Relaxed),
                this.count.load(Ordering::Relaxed),
            )
        } else {
            (0, 0)
        };
        format!(
            "<{} _thread.RLock object owner={owner} count={count} at {:#x}>",
            if locked { "locked" } else { "unlocked" },
            slf.as_ptr() as usize
        )
    }
}

/// allocate_lock(): a new `lock` (the `_thread.allocate_lock` stand-in).
#[pyfunction]
fn allocate_lock(py: Python<'_>) -> Lock {
    Lock::new_unlocked(py)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    MAIN.store(ident(), Ordering::Relaxed);
    m.add_class::<Lock>()?;
    m.add_class::<RLock>()?;
    m.add_function(wrap_pyfunction!(allocate_lock, m)?)?;
    m.add_function(wrap_pyfunction!(set_lock_hooks, m)?)?;
    m.add_function(wrap_pyfunction!(native_waiters, m)?)?;
    Ok(())
}
