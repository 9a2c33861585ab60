"""Bad input is a usage error (exit 4) or a collection error naming the culprit."""

import pytest

RUN = ("-p", "no:cacheprovider")


def run(pytester, *args):
    return pytester.runpytest_subprocess(*RUN, *args, timeout=120)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--threads", "0"), "*argument --ftrace-threads*--threads must be >= 1, not 0*"),
        (("--threads", "abc"), "*--threads must be a whole number >= 1 or 'auto', not 'abc'*"),
        (("--iterations", "-1"), "*argument --ftrace-iterations*--iterations must be >= 1, not -1"),
        (("--iterations", "many"), "*--iterations must be a whole number >= 1, not 'many'*"),
        (("--ftrace-timeout", "0"), "*--ftrace-timeout must be > 0, not 0*"),
        (("--parallel-threads", "x"), "*argument --ftrace-threads*not 'x'*"),
    ],
)
def test_bad_options_are_usage_errors(pytester, args, message):
    pytester.makepyfile("def test_ok(): pass")
    result = run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "INTERNALERROR" not in result.stderr.str() + result.stdout.str()


def test_auto_threads_means_usable_cpus(pytester):
    pytester.makepyfile(
        """
        import os
        def test_n(num_parallel_threads):
            assert num_parallel_threads == len(os.sched_getaffinity(0))
        """
    )
    run(pytester, "--threads", "auto").assert_outcomes(passed=1)


def test_aliases(pytester):
    pytester.makepyfile(
        """
        def test_n(num_parallel_threads, num_iterations):
            assert (num_parallel_threads, num_iterations) == (3, 2)
        """
    )
    run(pytester, "--parallel-threads", "3", "--executions", "2").assert_outcomes(passed=1)
    run(pytester, "--ftrace-threads", "3", "--ftrace-iterations", "2").assert_outcomes(passed=1)


@pytest.mark.parametrize(
    "ini, message",
    [
        ("ftrace_threads = zero", "*ini key ftrace_threads: threads must be a whole number*"),
        ("ftrace_iterations = 0", "*ini key ftrace_iterations: iterations must be >= 1, not 0*"),
        ("ftrace_timeout = -5", "*ini key ftrace_timeout: ftrace_timeout must be > 0*"),
    ],
)
def test_bad_ini_values_are_usage_errors(pytester, ini, message):
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_ok(): pass")
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


@pytest.mark.parametrize(
    "marker, message",
    [
        ("ftrace(threads=0)", "*test_m: @pytest.mark.ftrace: threads must be a whole number >= 1*"),
        ("ftrace(threads='x')", "*@pytest.mark.ftrace: threads must be * not 'x'*"),
        ("ftrace(iterations=-2)", "*@pytest.mark.ftrace: iterations must be * not -2*"),
        ("ftrace(thread=2)", "*@pytest.mark.ftrace got an unexpected argument 'thread'*"),
        ("parallel_threads()", "*@pytest.mark.parallel_threads: n must be * not None*"),
        ("iterations('3')", "*@pytest.mark.iterations: n must be * not '3'*"),
        ("freethreaded(threads=1.5)", "*@pytest.mark.freethreaded: threads must be * not 1.5*"),
        ("thread_unsafe(1, 2)", "*@pytest.mark.thread_unsafe takes at most 1 positional*"),
    ],
)
def test_bad_markers_are_collection_errors(pytester, marker, message):
    pytester.makepyfile(
        f"""
        import pytest
        @pytest.mark.{marker}
        def test_m():
            pass
        def test_other():
            pass
        """
    )
    result = run(pytester, "--threads", "2")
    assert result.ret == pytest.ExitCode.INTERRUPTED  # collection errors stop the session
    result.stdout.fnmatch_lines(["*ERROR collecting*", message])
    assert "INTERNALERROR" not in result.stdout.str()


@pytest.mark.parametrize("where", ["class", "module"])
def test_bad_marker_on_a_class_or_module_is_a_collection_error(pytester, where):
    marker = "@pytest.mark.ftrace(threads=-3)"
    pytester.makepyfile(
        f"""
        import pytest
        {"pytestmark = " + marker[1:] if where == "module" else ""}
        {marker if where == "class" else ""}
        class TestGroup:
            def test_inner(self):
                pass
        def test_other():
            pass
        """
    )
    result = run(pytester, "--threads", "2")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        ["*ERROR collecting*", "*@pytest.mark.ftrace: threads must be * not -3*"]
    )
    assert "INTERNALERROR" not in result.stdout.str()


def test_require_gil_disabled_on_a_gil_build(pytester):
    from conftest import FREE_THREADED_BUILD

    if FREE_THREADED_BUILD:
        pytest.skip("a GIL build refuses; this is a free-threaded build")
    pytester.makepyfile("def test_ok(): pass")
    for args in (("--require-gil-disabled",), ("--ftrace-require-gil-disabled",)):
        result = run(pytester, *args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*--require-gil-disabled: this is a GIL build (Python 3.1*"])
    pytester.makeini("[pytest]\nftrace_require_gil_disabled = true\n")
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
