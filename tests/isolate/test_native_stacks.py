"""Native stacks of a crashed or hung isolated test, written by the test process itself (the
core's handlers, rust/stacks.rs) when gdb is not there."""

import os
import re
import shutil
import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="the core takes native stacks on Linux"
)

RUN = ("-p", "no:cacheprovider")
CORE = "Native stacks (pytest-ftrace core, taken in the test process, most recent call first):"


@pytest.fixture(params=["no-gdb-on-path", "env-core"])
def without_gdb(request, monkeypatch, tmp_path):
    """gdb is not there: a PATH with only the interpreter, or FTRACE_NATIVE_STACKS=core."""
    if request.param == "no-gdb-on-path":
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        os.symlink(sys.executable, bin_dir / "python")
        monkeypatch.setenv("PATH", str(bin_dir))
        monkeypatch.delenv("FTRACE_NATIVE_STACKS", raising=False)
    else:
        monkeypatch.setenv("FTRACE_NATIVE_STACKS", "core")
    return request.param


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*RUN, *args, timeout=120)


def thread_sections(out: str) -> list[str]:
    """The threads of the native stacks in the report, each as its text."""
    text = out.partition(CORE)[2]
    assert text, out
    sections = []
    for line in text.splitlines():
        if line.startswith("Thread "):
            sections.append(line)
        elif line.startswith("  ") and sections:
            sections[-1] += "\n" + line
        elif sections and not line.strip():
            continue
        elif sections:
            break
    return sections


def test_segfault_shows_the_crashing_threads_native_stack(pytester, without_gdb):
    pytester.makepyfile(
        """
        import ctypes
        def test_segfault():
            ctypes.string_at(0)
        def test_after():
            pass
        """
    )
    result = run(pytester, "--ftrace-isolate")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "crashed: the test process was killed by SIGSEGV (Segmentation fault) during call",
            "Fatal Python error: Segmentation fault",
            CORE,
            "Thread 1 (LWP *, got SIGSEGV, main thread):",
            "  #0  *",
        ]
    )
    crashing = thread_sections(result.stdout.str())[0]
    # Resolved: the C function of ctypes that read address 0, named, with nothing of the
    # handler's own frames before it.
    assert "string_at" in crashing, crashing
    assert "stacks::" not in crashing and "backtrace::" not in crashing, crashing
    assert "Native stacks (gdb" not in result.stdout.str()


def test_crash_in_another_thread_shows_every_thread(pytester, without_gdb):
    pytester.makepyfile(
        """
        import ctypes, threading
        def test_segfault_in_a_thread():
            worker = threading.Thread(target=ctypes.string_at, args=(0,))
            worker.start()
            worker.join()
        """
    )
    result = run(pytester, "--ftrace-isolate")
    result.assert_outcomes(failed=1)
    sections = thread_sections(result.stdout.str())
    assert sections[0].startswith("Thread 1 (LWP "), sections
    assert ", got SIGSEGV):" in sections[0].splitlines()[0], sections
    assert "string_at" in sections[0], sections
    # The main thread, waiting for the worker, was asked for its stack and gave it.
    main = [section for section in sections if "main thread):" in section.splitlines()[0]]
    assert len(main) == 1, sections
    assert "  #0  " in main[0] and "did not answer" not in main[0], main


def test_crash_with_faulthandler_turned_off_still_has_native_stacks(pytester, without_gdb):
    pytester.makepyfile(
        """
        import ctypes, faulthandler
        def test_segfault():
            faulthandler.disable()
            ctypes.string_at(0)
        """
    )
    result = run(pytester, "--ftrace-isolate")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "crashed: the test process was killed by SIGSEGV (Segmentation fault) during call",
            "(no Python stacks: the process ended without a fatal-error dump)",
            CORE,
            "Thread 1 (LWP *, got SIGSEGV, main thread):",
        ]
    )
    assert "string_at" in thread_sections(result.stdout.str())[0]


def test_abort_keeps_its_signal(pytester, without_gdb):
    pytester.makepyfile(
        """
        import os
        def test_aborts():
            os.abort()
        """
    )
    result = run(pytester, "--ftrace-isolate")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "crashed: the test process was killed by SIGABRT (Aborted) during call",
            CORE,
            "Thread 1 (LWP *, got SIGABRT, main thread):",
        ]
    )
    assert "os_abort" in thread_sections(result.stdout.str())[0]


def test_a_process_forked_by_the_test_does_not_write_to_the_stacks(pytester, without_gdb):
    # The process the test forks inherits the handlers and the file: its crash is its own.
    pytester.makepyfile(
        """
        import ctypes, os
        def test_forks_then_crashes():
            pid = os.fork()
            if pid == 0:
                ctypes.string_at(0)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 11
            ctypes.string_at(0)
        """
    )
    result = run(pytester, "--ftrace-isolate")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "crashed: the test process was killed by SIGSEGV (Segmentation fault) during call",
            CORE,
            "Thread 1 (LWP *, got SIGSEGV, main thread):",
        ]
    )
    # one process's stacks (with CI set, pytest's short summary repeats the whole report)
    crashed = set(re.findall(r"\(LWP (\d+)[^)]*got SIGSEGV", result.stdout.str()))
    assert len(crashed) == 1, result.stdout.str()


def test_crash_inside_the_allocator_still_ends_by_its_signal(pytester, without_gdb):
    # glibc finds the double free with the heap's lock held and aborts: the dump, which
    # allocates to resolve symbols, blocks on that lock. The main process sees it stuck and
    # has the signal go on; the test fails as the crash it is, not as a timeout.
    pytester.makepyfile(
        """
        import ctypes
        def test_double_free():
            libc = ctypes.CDLL(None)
            libc.malloc.restype = ctypes.c_void_p
            libc.free.argtypes = [ctypes.c_void_p]
            block = libc.malloc(0x500)  # past the per-thread cache: freed under the heap's lock
            libc.malloc(0x20)
            libc.free(block)
            libc.free(block)
        def test_after():
            pass
        """
    )
    pytester.makeini("[pytest]\nftrace_timeout = 60\n")
    result = run(pytester, "--ftrace-isolate")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "crashed: the test process was killed by SIGABRT (Aborted) during call",
            "Fatal Python error: Aborted",
            "Native stacks (pytest-ftrace core*",
        ]
    )
    assert "timed out" not in result.stdout.str()


def test_hang_in_c_shows_every_threads_native_stack(pytester, without_gdb):
    # Blocked where the per-phase bound cannot interrupt it (the timer signal is blocked), in
    # C on both threads: the whole-test bound ends the child, which first writes its stacks.
    pytester.makepyfile(
        """
        import os, signal, threading, time
        def test_hangs():
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
            read_end, _ = os.pipe()
            os.read(read_end, 1)
        def test_after():
            pass
        """
    )
    pytester.makeini("[pytest]\nftrace_timeout = 0.5\n")
    result = run(pytester, "--ftrace-isolate")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "timed out: test_*.py::test_hangs did not finish within 3.5s *stopped during call",
            "Timeout (0:00:03*)!",
            CORE,
            "Thread 1 (LWP *, got the dump signal*",
        ]
    )
    sections = thread_sections(result.stdout.str())
    main = [section for section in sections if "main thread" in section.splitlines()[0]]
    assert len(main) == 1 and "os_read" in main[0], sections
    assert any("time_sleep" in section for section in sections if section not in main), sections
    assert not any("did not answer" in section for section in sections), sections


@pytest.mark.skipif(not shutil.which("gdb"), reason="compares with gdb")
def test_core_stacks_come_first_when_gdb_is_there_too(pytester, monkeypatch):
    monkeypatch.delenv("FTRACE_NATIVE_STACKS", raising=False)
    pytester.makepyfile(
        """
        import ctypes
        def test_segfault():
            ctypes.string_at(0)
        """
    )
    result = run(pytester, "--ftrace-isolate")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["crashed: the test process was killed by SIGSEGV (Segmentation fault) during call", CORE]
    )
    assert "Native stacks (gdb" not in result.stdout.str()


def test_off_means_no_native_stacks(pytester, monkeypatch):
    monkeypatch.setenv("FTRACE_NATIVE_STACKS", "0")
    pytester.makepyfile(
        """
        import ctypes
        def test_segfault():
            ctypes.string_at(0)
        """
    )
    result = run(pytester, "--ftrace-isolate")
    result.assert_outcomes(failed=1)
    assert "Native stacks" not in result.stdout.str()
