//! The watcher of exact mode: a plain OS thread (it never touches the interpreter) that looks
//! at the active run's core every [`POLL`] and lets a running thread that blocks where the
//! core cannot see (a socket, `select`, a real lock, a C extension's wait, a child process)
//! run free, so the other threads go on being scheduled (see [`Core::watch`]).
//!
//! Whether a thread sleeps in the kernel or computes is read from
//! `/proc/self/task/<tid>/stat` (Linux); elsewhere the state is unknown and only a long
//! silence lets a thread run free.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Core, SHUTDOWN};

/// How often the watcher looks while a run is active.
pub const POLL: Duration = Duration::from_millis(2);
/// How often it looks for an active run otherwise.
const IDLE_POLL: Duration = Duration::from_millis(20);
/// How often it looks while a thread that came back from C waits for the turn (see
/// [`Core::watch`]): a thread that holds the turn and blocks in C (the other end of a socket
/// or a pipe, say) is seen at once, not after a poll or the quiet time.
pub const FAST_POLL: Duration = Duration::from_micros(200);

/// The watcher thread, for [`kick`] (only tried, never waited for: a kick that finds the
/// lock taken is skipped, and the watcher looks at its next poll anyway).
static WATCHER: parking_lot::RwLock<Option<std::thread::Thread>> = parking_lot::RwLock::new(None);

/// Let the watcher look now (a thread came back from running free and waits for the turn).
pub fn kick() {
    if let Some(watcher) = WATCHER.try_read() {
        if let Some(thread) = watcher.as_ref() {
            thread.unpark();
        }
    }
}

static STARTED: AtomicBool = AtomicBool::new(false);
/// Set around a fork: the watcher holds no lock then (a child would inherit it held).
static PAUSED: AtomicBool = AtomicBool::new(false);
/// True while the watcher may hold a lock (between its pause check and the end of a look).
static BUSY: AtomicBool = AtomicBool::new(false);

/// Before a fork: returns once the watcher holds no lock, and keeps it so until `resume`.
pub fn pause() {
    PAUSED.store(true, Ordering::SeqCst);
    while BUSY.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
}

/// After a fork, in the process that forked.
pub fn resume() {
    PAUSED.store(false, Ordering::SeqCst);
}

/// After a fork, in the child: the watcher thread did not come along; start one of its own.
pub fn restart_in_child(active: fn() -> Option<Arc<Core>>) {
    forget_taking();
    BUSY.store(false, Ordering::SeqCst);
    PAUSED.store(false, Ordering::SeqCst);
    if STARTED.swap(false, Ordering::AcqRel) {
        start(active);
    }
}

/// Bumped when the garbage collector starts and when it stops (`gc.callbacks`): a thread
/// parked while the collector runs (the world is stopped on a free-threaded build, the GIL is
/// held on the others) is not blocked in C; the watcher starts over after a collection.
static GC_EPOCH: AtomicU64 = AtomicU64::new(0);
static GC_RUNNING: AtomicBool = AtomicBool::new(false);

/// The collector starts (`running`) or stops.
pub fn gc_phase(running: bool) {
    GC_RUNNING.store(running, Ordering::Release);
    GC_EPOCH.fetch_add(1, Ordering::AcqRel);
}

/// (collections started or stopped so far, whether one runs now).
pub fn gc_state() -> (u64, bool) {
    (
        GC_EPOCH.load(Ordering::Acquire),
        GC_RUNNING.load(Ordering::Acquire),
    )
}

/// Start the watcher (once per process): `active` gives the core of the active run, if any.
pub fn start(active: fn() -> Option<Arc<Core>>) {
    if STARTED.swap(true, Ordering::AcqRel) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("ftrace-watcher".into())
        .spawn(move || loop {
            if let Some(mut watcher) = WATCHER.try_write() {
                if watcher.as_ref().map(|t| t.id()) != Some(std::thread::current().id()) {
                    *watcher = Some(std::thread::current());
                }
            }
            if SHUTDOWN.load(Ordering::Acquire) {
                return;
            }
            // Paused around a fork (see `pause`): take no lock while a child may be made.
            BUSY.store(true, Ordering::SeqCst);
            if PAUSED.load(Ordering::SeqCst) {
                BUSY.store(false, Ordering::SeqCst);
                std::thread::sleep(POLL);
                continue;
            }
            match active() {
                Some(core) => {
                    let hurry = core.watch(Instant::now());
                    drop(core);
                    BUSY.store(false, Ordering::SeqCst);
                    std::thread::park_timeout(if hurry { FAST_POLL } else { POLL });
                }
                None => {
                    BUSY.store(false, Ordering::SeqCst);
                    std::thread::sleep(IDLE_POLL);
                }
            }
        });
    if spawned.is_err() {
        STARTED.store(false, Ordering::Release);
    }
}

/// The OS id of the thread that was given the turn and is taking the interpreter back (the
/// GIL, or on a free-threaded build its thread state, which a stop-the-world may hold up), 0:
/// none. A thread that waits for the interpreter is not blocked in C: the thread holding the
/// interpreter lets go of it within a switch interval, however long the OS takes to run it on
/// a loaded machine (see [`Core::watch`]). Set by the core's turn when the caller said it
/// waits with the interpreter released ([`will_take_back`]); cleared by that thread once it
/// holds the interpreter again ([`taken_back`]).
static TAKING: AtomicU64 = AtomicU64::new(0);

/// The futex words the interpreter's own lock waits on (the GIL's condition variable and
/// mutex), learned from threads seen asleep on a futex while they took the interpreter back:
/// a later wait on one of them, anywhere, is a wait for the interpreter too (a thread that
/// let go of the GIL for another one and wants it back). Never learned on a free-threaded
/// build, where a thread waits for the interpreter on its own semaphore, the one its real
/// lock waits use too.
const GIL_WORDS: usize = 8;
static GIL_FUTEX: [AtomicU64; GIL_WORDS] = [const { AtomicU64::new(0) }; GIL_WORDS];

thread_local! {
    /// This thread waits in the core with the interpreter released (it takes it back after).
    static TAKES_BACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// This thread's OS id, once asked.
    static NATIVE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn my_native() -> u64 {
    NATIVE
        .try_with(|n| {
            if n.get() == 0 {
                n.set(native_id());
            }
            n.get()
        })
        .unwrap_or(0)
}

/// The calling thread lets go of the interpreter to wait in the core: a turn it is given
/// there is followed by taking the interpreter back.
pub fn will_take_back() {
    let _ = TAKES_BACK.try_with(|t| t.set(true));
}

/// The calling thread holds the interpreter again (or did not let go of it after all).
pub fn taken_back() {
    let _ = TAKES_BACK.try_with(|t| t.set(false));
    let me = my_native();
    if me != 0 {
        let _ = TAKING.compare_exchange(me, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// The core gives the calling thread (OS id `native`) the turn: when it takes the interpreter
/// back next, the watcher knows that wait for what it is.
pub fn given_turn(native: u64) {
    if native != 0 && TAKES_BACK.try_with(|t| t.get()).unwrap_or(false) {
        TAKING.store(native, Ordering::Release);
    }
}

/// The calling thread leaves the core (whatever the wait came to: its turn, a turn it kept,
/// the round running free) and takes the interpreter back next, when it let go of it.
pub fn retaking() {
    if TAKES_BACK.try_with(|t| t.get()).unwrap_or(false) {
        let me = my_native();
        if me != 0 {
            TAKING.store(me, Ordering::Release);
        }
    }
}

/// Whether thread `native` (`sleeping` in the kernel) waits for the interpreter: it was given
/// the turn and has not taken the interpreter back yet, or it sleeps on one of the
/// interpreter's own futex words. A futex word seen in the first case is learned for the
/// second.
pub fn waits_for_interpreter(native: u64, sleeping: bool) -> bool {
    if native == 0 {
        return false;
    }
    let taking = TAKING.load(Ordering::Acquire) == native;
    if !sleeping {
        return taking;
    }
    let word = futex_word(native);
    if taking {
        if let (Some(word), false) = (word, cfg!(Py_GIL_DISABLED)) {
            learn_gil_word(word);
        }
        return true;
    }
    word.is_some_and(|w| {
        GIL_FUTEX.iter().any(|known| {
            let known = known.load(Ordering::Acquire);
            known != 0 && known.abs_diff(w) <= GIL_SPAN
        })
    })
}

/// How far from a learned word another futex word of the interpreter's lock may be: the
/// GIL's state holds its condition variable and mutex, and next to them the condition
/// variable and mutex of a forced switch (a thread that dropped the GIL for another one
/// sleeps on that condition until the other takes it: a wait for the interpreter too, never
/// seen while taking it back, so never learned). A few hundred bytes of the runtime's own
/// state, where no lock of the user's code lives.
const GIL_SPAN: u64 = 256;

/// The interpreter's futex words learned so far (for another process of the same interpreter
/// memory: a forked child, whose learning would otherwise end with it).
pub fn gil_words() -> Vec<u64> {
    GIL_FUTEX
        .iter()
        .map(|w| w.load(Ordering::Acquire))
        .filter(|&w| w != 0)
        .collect()
}

/// Learn words another process of this interpreter's memory learned ([`gil_words`]).
pub fn learn_gil_words(words: &[u64]) {
    for &word in words.iter().filter(|&&w| w != 0) {
        learn_gil_word(word);
    }
}

fn learn_gil_word(word: u64) {
    for slot in &GIL_FUTEX {
        match slot.compare_exchange(0, word, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return,
            Err(known) if known == word => return,
            Err(_) => {}
        }
    }
}

/// After a fork, in the child: its threads have other ids (the futex words stay: the child's
/// memory is a copy).
fn forget_taking() {
    TAKING.store(0, Ordering::Release);
}

/// The futex word thread `native` sleeps on, when it waits in `futex` (Linux x86_64 and
/// aarch64: the first argument in `/proc/self/task/<tid>/syscall`).
pub fn futex_word(native: u64) -> Option<u64> {
    if !cfg!(target_os = "linux") || native == 0 {
        return None;
    }
    let futex = futex_call()?;
    let text = std::fs::read_to_string(format!("/proc/self/task/{native}/syscall")).ok()?;
    parse_futex_word(&text, futex)
}

/// The `futex` system call's number here (None: not a platform the watcher reads).
fn futex_call() -> Option<i64> {
    if cfg!(target_arch = "x86_64") {
        Some(202)
    } else if cfg!(target_arch = "aarch64") {
        Some(98)
    } else {
        None
    }
}

fn parse_futex_word(text: &str, futex: i64) -> Option<u64> {
    let mut fields = text.split_whitespace();
    if parse_syscall(fields.next()?)? != futex {
        return None;
    }
    let addr = fields.next()?;
    u64::from_str_radix(addr.strip_prefix("0x").unwrap_or(addr), 16).ok()
}

/// What the kernel says a thread is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadState {
    /// Waiting in the kernel (`S` or `D`): blocked in a system call.
    Sleeping,
    /// Running or ready to run (`R`), with the CPU time it has used (clock ticks).
    Running { cpu_ticks: u64 },
    /// Stopped, traced, a zombie: leave it alone.
    Other,
}

/// The calling thread's id for the kernel (`threading.get_native_id()`), 0 when unknown.
pub fn native_id() -> u64 {
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    {
        extern "C" {
            fn syscall(number: std::os::raw::c_long, ...) -> std::os::raw::c_long;
        }
        #[cfg(target_arch = "x86_64")]
        const SYS_GETTID: std::os::raw::c_long = 186;
        #[cfg(target_arch = "aarch64")]
        const SYS_GETTID: std::os::raw::c_long = 178;
        // SAFETY: gettid takes no arguments, cannot fail and touches no memory.
        let tid = unsafe { syscall(SYS_GETTID) };
        if tid > 0 {
            return tid as u64;
        }
    }
    0
}

/// Whether thread `native` of this process waits in the kernel in a system call that is not
/// a futex wait (a socket, a pipe, `select`/`poll`, a child process, a sleep in C): a wait
/// for something outside the process's locks. A futex wait may be a wait for the GIL, which a
/// thread gets back within a switch interval. None when it cannot be read
/// (`/proc/self/task/<tid>/syscall`, Linux on x86_64 and aarch64).
pub fn blocked_in_io(native: u64) -> Option<bool> {
    if !cfg!(target_os = "linux") || native == 0 {
        return None;
    }
    let futex: &[i64] = if cfg!(target_arch = "x86_64") {
        &[202, 449] // futex, futex_waitv
    } else if cfg!(target_arch = "aarch64") {
        &[98, 449]
    } else {
        return None;
    };
    let text = std::fs::read_to_string(format!("/proc/self/task/{native}/syscall")).ok()?;
    Some(parse_syscall(&text).is_some_and(|n| n >= 0 && !futex.contains(&n)))
}

/// The system call number of a `syscall` file's line (`running`, and `-1 ...` for a thread
/// blocked outside a system call, give None and -1).
fn parse_syscall(text: &str) -> Option<i64> {
    text.split_whitespace().next()?.parse().ok()
}

/// The state of thread `native` of this process; None when it cannot be read.
pub fn thread_state(native: u64) -> Option<ThreadState> {
    if !cfg!(target_os = "linux") || native == 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/self/task/{native}/stat")).ok()?;
    parse_stat(&text)
}

/// Parse a `stat` line: `pid (comm) state ppid ... utime stime ...` (the command name may
/// hold spaces and parentheses: the state follows the last `)`).
fn parse_stat(text: &str) -> Option<ThreadState> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    let state = fields.first()?.chars().next()?;
    Some(match state {
        'S' | 'D' => ThreadState::Sleeping,
        'R' => {
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            ThreadState::Running {
                cpu_ticks: utime + stime,
            }
        }
        _ => ThreadState::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_are_read_past_odd_command_names() {
        let line = "12 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14";
        assert_eq!(parse_stat(line), Some(ThreadState::Sleeping));
        let line = "12 (x) R 1 2 3 4 5 6 7 8 9 10 70 5 13 14";
        assert_eq!(
            parse_stat(line),
            Some(ThreadState::Running { cpu_ticks: 75 })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    #[cfg(unix)]
    fn a_thread_blocked_on_a_socket_is_seen_in_io() {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        if !cfg!(target_os = "linux") {
            return;
        }
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let h = std::thread::spawn(move || {
            tx.send(native_id()).unwrap();
            let mut buf = [0u8; 1];
            a.read_exact(&mut buf).unwrap();
        });
        let native = rx.recv().unwrap();
        let mut seen = None;
        for _ in 0..200 {
            seen = blocked_in_io(native);
            if seen == Some(true) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        b.write_all(b"x").unwrap();
        h.join().unwrap();
        if seen.is_some() {
            assert_eq!(seen, Some(true)); // None: no syscall file (an older kernel)
        }
    }

    #[test]
    fn futex_lines_give_the_word_waited_on() {
        let line = "202 0x7f3a5c1e2a48 0x189 0x0 0x0 0x0 0xffffffff 0x7ffd 0x7f3a";
        assert_eq!(parse_futex_word(line, 202), Some(0x7f3a5c1e2a48));
        assert_eq!(parse_futex_word("7 0x55 0x1 0x0", 202), None);
        assert_eq!(parse_futex_word("running", 202), None);
        assert_eq!(parse_futex_word("-1 0x7ffd 0x7f12", 202), None);
    }

    #[test]
    fn syscall_lines_give_the_call_number() {
        assert_eq!(
            parse_syscall("45 0x3 0x7f 0x1 0x0 0x0 0x0 0x7f 0x7f"),
            Some(45)
        );
        assert_eq!(parse_syscall("-1 0x7ffd 0x7f12"), Some(-1));
        assert_eq!(parse_syscall("running"), None);
        assert_eq!(parse_syscall(""), None);
    }

    #[test]
    fn a_thread_blocked_in_the_kernel_is_seen_sleeping() {
        if !cfg!(target_os = "linux") {
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            tx.send(native_id()).unwrap();
            let _ = stop_rx.recv_timeout(Duration::from_secs(5));
        });
        let native = rx.recv().unwrap();
        assert_ne!(native, 0);
        let mut seen = None;
        for _ in 0..200 {
            seen = thread_state(native);
            if seen == Some(ThreadState::Sleeping) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(seen, Some(ThreadState::Sleeping));
        assert_ne!(blocked_in_io(native), Some(true), "a futex wait is not I/O");
        drop(stop_tx);
        h.join().unwrap();
        assert!(matches!(
            thread_state(native_id()),
            Some(ThreadState::Running { .. })
        ));
    }
}
