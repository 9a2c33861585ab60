//! Native stacks of the threads of an isolated test process, taken in the process itself.
//!
//! Under `--ftrace-isolate` each test runs in a forked child. When the child crashes or hangs,
//! the main process wants every thread's native stack; gdb gives them when it is installed.
//! Without gdb the child writes them itself: [`install`] (called only in isolation children)
//! puts a handler on the fatal signals (SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL) and on a
//! "dump stacks" signal ([`dump_signal`]) that the main process sends to a child that does
//! not finish in time.
//!
//! The thread that gets the signal coordinates: it unwinds its own stack from the interrupted
//! instruction, resolves and writes it, then asks each other thread of the process in turn
//! (`tgkill` with the dump signal, threads listed from `/proc/self/task`) to unwind its own
//! stack into a shared table, and resolves and writes that too. A thread that does not answer
//! within [`ANSWER_WAIT`] is named and skipped. The text ends with [`END`].
//!
//! Resolving symbols allocates and reads files, which is not async-signal-safe: accepted for a
//! process that is about to die, with guards: only one dump per process ([`DUMPING`]), only the
//! coordinator resolves (the other threads only unwind), a panic stops the dump, and a fatal
//! signal inside the dump goes straight on to the handler that was there before ours (so the
//! process still ends by its signal, and faulthandler still writes the Python stacks).
//!
//! The fatal handler is installed twice around `faulthandler.enable()`: once before it (the
//! "inner" layer, which faulthandler passes the signal on to, and which a test that turns
//! faulthandler off puts back), once after it (the "outer" layer, which runs first and so sees
//! the faulting instruction itself). Whichever runs first dumps; each passes the signal on to
//! what it replaced.

use std::ffi::{c_int, c_void, CStr};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Frames written per thread (gdb's `bt 25` in the gdb path).
pub const MAX_FRAMES: usize = 25;
/// Frames unwound per thread: the handler's own frames come first and are cut off.
const RAW_FRAMES: usize = 96;
/// How long the coordinator waits for one thread to unwind its stack.
const ANSWER_WAIT: Duration = Duration::from_secs(2);
/// The last line of a complete dump.
pub const END: &str = "(end of native stacks)";

/// The file descriptor the stacks are written to; -1 until [`install`].
static FD: AtomicI32 = AtomicI32::new(-1);
/// The process the handlers were installed in. A process forked from it (by the test) keeps
/// the handlers, and the descriptor, but not the job: there they only pass signals on.
static OWNER: AtomicI32 = AtomicI32::new(0);

/// Whether this is the process the handlers were installed for.
fn owner() -> bool {
    // SAFETY: getpid(2) cannot fail.
    OWNER.load(Ordering::SeqCst) == unsafe { libc::getpid() }
}

/// Set by the first thread that starts a dump; never cleared (one dump per process).
static DUMPING: AtomicBool = AtomicBool::new(false);
/// The thread the coordinator asked for its stack; its negation once that thread claimed the
/// table; 0 when nobody is asked.
static TARGET: AtomicI32 = AtomicI32::new(0);
/// The frames of the asked thread (instruction addresses, the interrupted one first).
static TABLE: [AtomicUsize; RAW_FRAMES] = [const { AtomicUsize::new(0) }; RAW_FRAMES];
/// How many entries of [`TABLE`] are filled; [`PENDING`] until the asked thread is done.
static FILLED: AtomicUsize = AtomicUsize::new(PENDING);
const PENDING: usize = usize::MAX;
/// The fatal signal being dumped for (0: none, or a dump asked for) and the layer whose handler
/// took it: what a rescue passes on (see [`on_dump`]).
static FATAL_SIGNAL: AtomicI32 = AtomicI32::new(0);
static FATAL_LAYER: AtomicUsize = AtomicUsize::new(0);
/// The first line of a dump, written before anything that can block: a file with it and
/// without [`END`] is a dump under way, or stuck.
pub const STARTED: &str = "(native stacks: being written)";
/// Written when the main process rescues a stuck dump.
const CUT: &str = "(native stacks: stuck, cut short by the main process)";

/// Which of the signal's frames to show: from the interrupted instruction `pc` on (the frames
/// before it are the signal handler's own). When `pc` is not among the frames (0: unknown, or
/// an unwinder that reports it differently), all of them.
pub fn start_of(frames: &[usize], pc: usize) -> usize {
    if pc == 0 {
        return 0;
    }
    frames.iter().position(|&ip| ip == pc).unwrap_or(0)
}

/// One frame as gdb prints it after `_short_frame`: `#3  name at file:line`, or
/// `#3  name from /lib/libfoo.so` without line information, `??` for a name not known.
pub fn frame_line(
    index: usize,
    name: Option<&str>,
    file: Option<(&str, u32)>,
    module: Option<&str>,
) -> String {
    let mut line = format!("#{index:<3}{}", name.unwrap_or("??"));
    if let Some((file, lineno)) = file {
        let _ = write!(line, " at {file}:{lineno}");
    } else if let Some(module) = module {
        let _ = write!(line, " from {module}");
    }
    line
}

/// The header line of one thread's stack.
pub fn thread_line(number: usize, tid: i32, name: &str, note: &str) -> String {
    let mut line = format!("Thread {number} (LWP {tid}");
    if !name.is_empty() {
        let _ = write!(line, " \"{name}\"");
    }
    if !note.is_empty() {
        let _ = write!(line, ", {note}");
    }
    line.push_str("):");
    line
}

/// The short name of a signal, for the header of the thread that got it.
pub fn signal_name(signal: c_int) -> String {
    let known = [
        (libc::SIGSEGV, "SIGSEGV"),
        (libc::SIGBUS, "SIGBUS"),
        (libc::SIGABRT, "SIGABRT"),
        (libc::SIGFPE, "SIGFPE"),
        (libc::SIGILL, "SIGILL"),
    ];
    match known.iter().find(|(number, _)| *number == signal) {
        Some((_, name)) => (*name).to_string(),
        None => format!("signal {signal}"),
    }
}

/// Unwind the calling thread's stack into `out`: the number of addresses written.
fn unwind(out: &mut [usize; RAW_FRAMES]) -> usize {
    let mut count = 0;
    // SAFETY: the unsynchronized variant takes no lock, so it cannot deadlock with a thread
    // that the signal interrupted inside the crate; the closure only writes to `out`.
    unsafe {
        backtrace::trace_unsynchronized(|frame| {
            let ip = frame.ip() as usize;
            if ip == 0 {
                return false; // the end of the stack
            }
            out[count] = ip;
            count += 1;
            count < RAW_FRAMES
        });
    }
    count
}

/// The resolved lines of the frames (at most [`MAX_FRAMES`]).
fn resolve(frames: &[usize]) -> Vec<String> {
    let mut lines = Vec::new();
    for (position, &ip) in frames.iter().enumerate() {
        if lines.len() >= MAX_FRAMES {
            break;
        }
        // The first address is the interrupted instruction itself; the others are return
        // addresses, which the crate moves back by one byte into the call instruction: move
        // the first one forward so that it lands where it was.
        let lookup = if position == 0 { ip + 1 } else { ip };
        let module = module_of(ip);
        let mut found = false;
        let mut last_name: Option<String> = None;
        // SAFETY: only the coordinating thread resolves, one address at a time.
        unsafe {
            backtrace::resolve_unsynchronized(lookup as *mut c_void, |symbol| {
                if lines.len() >= MAX_FRAMES {
                    return;
                }
                let name = symbol.name().map(|name| format!("{name:#}"));
                if found && name.is_some() && name == last_name {
                    return; // an inlined piece of the same function: shown once, innermost
                }
                found = true;
                last_name.clone_from(&name);
                let file = symbol.filename().map(|path| path.display().to_string());
                let file = file.as_deref().zip(symbol.lineno());
                lines.push(frame_line(
                    lines.len(),
                    name.as_deref(),
                    file,
                    module.0.as_deref(),
                ));
            });
        }
        if !found {
            lines.push(frame_line(
                lines.len(),
                module.1.as_deref(),
                None,
                module.0.as_deref(),
            ));
        }
    }
    lines
}

/// The file of the loaded object that holds `ip`, and the nearest exported symbol (dladdr).
fn module_of(ip: usize) -> (Option<String>, Option<String>) {
    // SAFETY: dladdr only reads the loader's tables and fills `info`.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(ip as *const c_void, &mut info) == 0 {
            return (None, None);
        }
        let text = |pointer: *const libc::c_char| {
            (!pointer.is_null()).then(|| CStr::from_ptr(pointer).to_string_lossy().into_owned())
        };
        (text(info.dli_fname), text(info.dli_sname))
    }
}

fn write_all(fd: c_int, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: write(2) from a valid buffer.
        let written = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if written > 0 {
            bytes = &bytes[written as usize..];
        } else if written < 0 && errno() == libc::EINTR {
            continue;
        } else {
            return;
        }
    }
}

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn gettid() -> i32 {
    // SAFETY: gettid(2) cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

fn thread_name(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .map(|name| name.trim_end().to_string())
        .unwrap_or_default()
}

/// Whether thread `tid` blocks signal `signal` (it would never answer).
fn blocks(tid: i32, signal: c_int) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigBlk:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| (1..=64).contains(&signal) && mask & (1u64 << (signal - 1)) != 0)
}

/// The dump itself, run by the thread that got the signal. `pc`: the instruction the signal
/// interrupted (0 if not known); `fatal`: the fatal signal, if that is what it is.
fn coordinate(pc: usize, fatal: Option<c_int>) {
    let fd = FD.load(Ordering::Acquire);
    if fd < 0 {
        return;
    }
    let mut raw = [0usize; RAW_FRAMES];
    let count = unwind(&mut raw);
    let me = gettid();
    // SAFETY: getpid(2) cannot fail.
    let pid = unsafe { libc::getpid() };
    let mut text = String::new();
    let mut note = match fatal {
        Some(signal) => format!("got {}", signal_name(signal)),
        None => "got the dump signal".to_string(),
    };
    if me == pid {
        note.push_str(", main thread");
    }
    let _ = writeln!(text, "\n{}", thread_line(1, me, &thread_name(me), &note));
    let own = &raw[..count];
    for line in resolve(&own[start_of(own, pc)..]) {
        let _ = writeln!(text, "  {line}");
    }
    write_all(fd, text.as_bytes());

    let mut tids: Vec<i32> = std::fs::read_dir("/proc/self/task")
        .map(|dir| {
            dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    tids.sort_unstable();
    let signal = dump_signal();
    let mut number = 1;
    let mut silent = 0;
    for tid in tids.into_iter().filter(|&tid| tid != me) {
        if blocks(tid, signal) {
            silent += 1;
            continue;
        }
        number += 1;
        let note = if tid == pid { "main thread" } else { "" };
        let mut text = format!("\n{}\n", thread_line(number, tid, &thread_name(tid), note));
        match ask(pid, tid, signal) {
            // The asked thread's frames start in its handler too: cut them at the instruction
            // its own signal interrupted, which it put first.
            Some(table) => {
                let (pc, frames) = (table[0], &table[1..]);
                for line in resolve(&frames[start_of(frames, pc)..]) {
                    let _ = writeln!(text, "  {line}");
                }
            }
            None => text.push_str("  (did not answer the dump signal)\n"),
        }
        write_all(fd, text.as_bytes());
    }
    let mut text = String::new();
    if silent > 0 {
        let _ = writeln!(
            text,
            "\n({silent} other thread(s) block signals, as faulthandler's timer thread does: their \
             stacks are not shown)"
        );
    }
    let _ = writeln!(text, "{END}");
    write_all(fd, text.as_bytes());
}

/// Ask thread `tid` for its frames: `[interrupted pc, frames...]`, or None if it did not
/// answer in time.
fn ask(pid: i32, tid: i32, signal: c_int) -> Option<Vec<usize>> {
    FILLED.store(PENDING, Ordering::SeqCst);
    TARGET.store(tid, Ordering::SeqCst);
    // SAFETY: tgkill(2) with plain numbers.
    let sent = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal) };
    let deadline = Instant::now() + ANSWER_WAIT;
    let answered = sent == 0
        && loop {
            if FILLED.load(Ordering::Acquire) != PENDING {
                break true;
            }
            if Instant::now() >= deadline {
                // Withdraw the question; if the thread claimed the table meanwhile, it is
                // writing it now: wait for that.
                if TARGET
                    .compare_exchange(tid, 0, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    break false;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        };
    TARGET.store(0, Ordering::SeqCst);
    if !answered {
        return None;
    }
    let filled = FILLED.load(Ordering::Acquire).min(RAW_FRAMES);
    Some(
        TABLE[..filled]
            .iter()
            .map(|cell| cell.load(Ordering::Relaxed))
            .collect(),
    )
}

/// In an asked thread: put `[pc, frames...]` in the table, if it is still wanted.
fn answer(pc: usize) {
    let me = gettid();
    let mut raw = [0usize; RAW_FRAMES];
    let count = unwind(&mut raw);
    if TARGET
        .compare_exchange(me, -me, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return; // withdrawn: the coordinator went on without this thread
    }
    TABLE[0].store(pc, Ordering::Relaxed);
    let count = count.min(RAW_FRAMES - 1);
    for (cell, &ip) in TABLE[1..].iter().zip(&raw[..count]) {
        cell.store(ip, Ordering::Relaxed);
    }
    FILLED.store(count + 1, Ordering::Release);
}

/// The signal the main process sends to a child that does not finish, for its stacks.
pub fn dump_signal() -> c_int {
    libc::SIGRTMAX() - 3
}

/// The fatal signals a handler is put on.
const FATAL: [c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGABRT,
    libc::SIGFPE,
    libc::SIGILL,
];

/// What each fatal signal's handler was before ours, per layer (0: inner, 1: outer).
struct Previous(std::cell::UnsafeCell<[[Option<libc::sigaction>; FATAL.len()]; 2]>);
// SAFETY: written by `install` (one thread, before the handler that reads the entry is in
// place), read-only afterwards.
unsafe impl Sync for Previous {}
static PREVIOUS: Previous = Previous(std::cell::UnsafeCell::new([[None; FATAL.len()]; 2]));

/// Where the interrupted thread was: the instruction pointer of a signal's context.
#[cfg(target_arch = "x86_64")]
fn context_pc(context: *mut c_void) -> usize {
    let context = context as *const libc::ucontext_t;
    // SAFETY: the kernel's ucontext for this signal, when there is one.
    unsafe { context.as_ref() }.map_or(0, |context| {
        context.uc_mcontext.gregs[libc::REG_RIP as usize] as usize
    })
}

/// Where the interrupted thread was: the instruction pointer of a signal's context.
#[cfg(target_arch = "aarch64")]
fn context_pc(context: *mut c_void) -> usize {
    let context = context as *const libc::ucontext_t;
    // SAFETY: the kernel's ucontext for this signal, when there is one.
    unsafe { context.as_ref() }.map_or(0, |context| context.uc_mcontext.pc as usize)
}

/// Not known on this architecture: every frame is shown, the handler's own too.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn context_pc(_context: *mut c_void) -> usize {
    0
}

fn guarded(work: impl FnOnce()) {
    let saved = errno();
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
    // SAFETY: restores the interrupted code's errno.
    unsafe { *libc::__errno_location() = saved };
}

extern "C" fn on_fatal_inner(signal: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    on_fatal(0, signal, info, context);
}

extern "C" fn on_fatal_outer(signal: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    on_fatal(1, signal, info, context);
}

fn on_fatal(layer: usize, signal: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    if owner() && !DUMPING.swap(true, Ordering::SeqCst) {
        FATAL_LAYER.store(layer, Ordering::SeqCst);
        FATAL_SIGNAL.store(signal, Ordering::SeqCst);
        started();
        guarded(|| coordinate(context_pc(context), Some(signal)));
    }
    pass_on(layer, signal, info, context);
}

/// The first line of a dump: a plain write(2), before anything that could block.
fn started() {
    let fd = FD.load(Ordering::Acquire);
    if fd >= 0 {
        write_all(fd, STARTED.as_bytes());
        write_all(fd, b"\n");
    }
}

/// Hand the signal to what our handler replaced: another handler, or the default action
/// (then the process ends by the signal, as it would have without us).
fn pass_on(layer: usize, signal: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    let index = FATAL.iter().position(|&s| s == signal);
    // SAFETY: read-only after install.
    let previous = index.and_then(|index| unsafe { (*PREVIOUS.0.get())[layer][index] });
    let handler = previous.map_or(libc::SIG_DFL, |action| action.sa_sigaction);
    if handler == libc::SIG_IGN {
        return;
    }
    if handler == libc::SIG_DFL {
        // SAFETY: plain signal calls; our handlers run with SA_NODEFER, so the raised signal
        // is delivered at once (and a fault that is returned to faults again).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = libc::SIG_DFL;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
            libc::raise(signal);
        }
        return;
    }
    let previous = previous.expect("a handler other than SIG_DFL was recorded");
    // SAFETY: the previous handler, called the way it was installed.
    unsafe {
        if previous.sa_flags & libc::SA_SIGINFO != 0 {
            let call: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) =
                std::mem::transmute(handler);
            call(signal, info, context);
        } else {
            let call: extern "C" fn(c_int) = std::mem::transmute(handler);
            call(signal);
        }
    }
}

/// The dump signal: from the coordinator of a dump (`tgkill`, this process), a request for
/// this thread's frames; from another process (the main process), a request for a dump, or,
/// while a fatal signal's dump is under way, a rescue: that dump is stuck (resolving symbols
/// allocates, and the crash may have happened inside the allocator, with its lock held), so
/// the fatal signal goes on from here, to faulthandler and to the default action.
extern "C" fn on_dump(_signal: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    if !owner() {
        return;
    }
    // SAFETY: getpid(2) cannot fail; the kernel's siginfo for this signal, when there is one.
    let external = unsafe {
        info.as_ref()
            .is_some_and(|info| info.si_pid() != libc::getpid())
    };
    let fatal = FATAL_SIGNAL.load(Ordering::SeqCst);
    if external && fatal != 0 {
        let fd = FD.load(Ordering::Acquire);
        if fd >= 0 {
            write_all(fd, b"\n");
            write_all(fd, CUT.as_bytes());
            write_all(fd, b"\n");
        }
        pass_on(FATAL_LAYER.load(Ordering::SeqCst), fatal, info, context);
        return;
    }
    guarded(|| {
        let pc = context_pc(context);
        if TARGET.load(Ordering::SeqCst) == gettid() {
            answer(pc);
        } else if !DUMPING.swap(true, Ordering::SeqCst) {
            started();
            coordinate(pc, None);
        }
    });
}

fn set_handler(
    signal: c_int,
    handler: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void),
    flags: c_int,
) -> std::io::Result<libc::sigaction> {
    // SAFETY: sigaction(2) with a zeroed, filled-in action.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | flags;
        libc::sigemptyset(&mut action.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(signal, &action, &mut old) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(old)
    }
}

/// An alternate signal stack for the calling thread, large enough to resolve symbols on (the
/// one faulthandler sets up is a few pages): the handler then runs even after a stack overflow.
/// Its lowest page is a guard: overflowing it faults instead of writing over other memory.
fn alternate_stack() {
    const SIZE: usize = 1 << 20;
    // SAFETY: a fresh anonymous mapping, kept for the life of the process.
    unsafe {
        let memory = libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if memory == libc::MAP_FAILED {
            return;
        }
        let page = usize::try_from(libc::sysconf(libc::_SC_PAGESIZE)).unwrap_or(4096);
        libc::mprotect(memory, page, libc::PROT_NONE);
        let stack = libc::stack_t {
            ss_sp: memory,
            ss_flags: 0,
            ss_size: SIZE,
        };
        libc::sigaltstack(&stack, std::ptr::null_mut());
    }
}

/// Install the handlers (see the module's documentation): `outer` false before
/// `faulthandler.enable()`, true after it. The dump signal's handler and the alternate stack
/// come with the inner layer.
pub fn install(fd: c_int, outer: bool) -> std::io::Result<()> {
    FD.store(fd, Ordering::Release);
    // SAFETY: getpid(2) cannot fail.
    OWNER.store(unsafe { libc::getpid() }, Ordering::SeqCst);
    let layer = usize::from(outer);
    if outer {
        // After faulthandler.enable(), which sets up its own small one when it is the first.
        alternate_stack();
    } else {
        set_handler(dump_signal(), on_dump, libc::SA_RESTART)?;
    }
    let handler = if outer {
        on_fatal_outer
    } else {
        on_fatal_inner
    };
    for (index, &signal) in FATAL.iter().enumerate() {
        // Record first, so that the entry is there by the time the handler can run.
        // SAFETY: see `Previous`; the handler of this layer is not installed for `signal` yet.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(signal, std::ptr::null(), &mut old);
            (*PREVIOUS.0.get())[layer][index] = Some(old);
        }
        set_handler(signal, handler, libc::SA_NODEFER)?;
    }
    Ok(())
}

/// Write the stacks of every thread now, from an ordinary call (for tests): only the dump
/// signal's handler must be installed.
pub fn dump_now(fd: c_int) -> std::io::Result<()> {
    FD.store(fd, Ordering::Release);
    // SAFETY: getpid(2) cannot fail.
    OWNER.store(unsafe { libc::getpid() }, Ordering::SeqCst);
    set_handler(dump_signal(), on_dump, libc::SA_RESTART)?;
    if DUMPING.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    coordinate(0, None);
    Ok(())
}

/// stacks_install(fd, outer): in an isolation child, write native stacks to `fd` on a fatal
/// signal or on the dump signal (see the module's documentation for `outer`).
#[pyo3::pyfunction]
fn stacks_install(fd: c_int, outer: bool) -> pyo3::PyResult<()> {
    install(fd, outer).map_err(|error| pyo3::exceptions::PyOSError::new_err(error.to_string()))
}

/// stacks_signal(): the signal number that asks a child for its native stacks.
#[pyo3::pyfunction]
fn stacks_signal() -> c_int {
    dump_signal()
}

pub fn register(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
    use pyo3::prelude::*;
    m.add_function(pyo3::wrap_pyfunction!(stacks_install, m)?)?;
    m.add_function(pyo3::wrap_pyfunction!(stacks_signal, m)?)?;
    m.add("STACKS_END", END)?;
    m.add("STACKS_STARTED", STARTED)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_start_at_the_interrupted_instruction() {
        assert_eq!(start_of(&[10, 20, 30, 40], 30), 2);
        assert_eq!(start_of(&[10, 20, 30], 99), 0);
        assert_eq!(start_of(&[10, 20, 30], 0), 0);
    }

    #[test]
    fn lines_look_like_gdb_trimmed() {
        assert_eq!(
            frame_line(
                0,
                Some("string_at"),
                Some(("_ctypes.c", 12)),
                Some("/x/_ctypes.so")
            ),
            "#0  string_at at _ctypes.c:12"
        );
        assert_eq!(
            frame_line(11, Some("read"), None, Some("/lib/libc.so.6")),
            "#11 read from /lib/libc.so.6"
        );
        assert_eq!(frame_line(2, None, None, None), "#2  ??");
        assert_eq!(
            thread_line(1, 42, "python3", "got SIGSEGV, main thread"),
            "Thread 1 (LWP 42 \"python3\", got SIGSEGV, main thread):"
        );
        assert_eq!(thread_line(3, 7, "", ""), "Thread 3 (LWP 7):");
        assert_eq!(signal_name(libc::SIGSEGV), "SIGSEGV");
        assert_eq!(signal_name(1), "signal 1");
    }

    #[inline(never)]
    fn parked_here(ready: std::sync::mpsc::Sender<()>, stop: std::sync::mpsc::Receiver<()>) {
        ready.send(()).unwrap();
        let _ = stop.recv();
    }

    #[test]
    fn a_dump_has_every_thread_with_resolved_frames() {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel();
        let parked = std::thread::Builder::new()
            .name("parked".into())
            .spawn(move || parked_here(ready_tx, stop_rx))
            .unwrap();
        ready_rx.recv().unwrap();
        let mut pipe = [0; 2];
        // SAFETY: a pipe for the dump; read after it is written (it fits the pipe's buffer).
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        dump_now(pipe[1]).unwrap();
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(pipe[1]) };
        let mut text = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            // SAFETY: read(2) into a local buffer.
            let got = unsafe { libc::read(pipe[0], buffer.as_mut_ptr().cast(), buffer.len()) };
            if got <= 0 {
                break;
            }
            text.extend_from_slice(&buffer[..got as usize]);
        }
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(pipe[0]) };
        stop_tx.send(()).unwrap();
        parked.join().unwrap();
        let text = String::from_utf8_lossy(&text);
        assert!(text.starts_with("\nThread 1 (LWP "), "{text}");
        assert!(text.contains("got the dump signal"), "{text}");
        assert!(text.contains("\"parked\""), "{text}");
        assert!(text.contains("parked_here"), "{text}");
        assert!(!text.contains("did not answer"), "{text}");
        assert!(text.trim_end().ends_with(END), "{text}");
    }
}
