"""Bad input is a usage error (exit 4) or a collection error naming the culprit."""

import json
import re

import pytest

RUN = ("-p", "no:cacheprovider")


def run(pytester, *args):
    return pytester.runpytest_subprocess(*RUN, *args, timeout=120)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--threads", "0"), "*argument --ftrace-threads*--threads must be >= 1, not 0*"),
        (("--threads", "abc"), "*--threads must be a whole number from 1 to 1024 or*'abc'*"),
        (("--iterations", "-1"), "*argument --ftrace-iterations*--iterations must be >= 1, not -1"),
        (("--iterations", "many"), "*--iterations must be a whole number from 1 to 10*'many'*"),
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
        ("ftrace_threads = zero", "*ini key ftrace_threads: ftrace_threads must be a whole*"),
        ("ftrace_iterations = 0", "*ini key ftrace_iterations: ftrace_iterations must be >= 1*"),
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
        ("ftrace(threads=0)", "*test_m: @pytest.mark.ftrace: threads must be a whole number*"),
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


# --- every bad value is a usage error (exit 4) naming the option or ini key ---------------

FAILING = "def test_fails():\n    assert False\n"


def _usage_error(result, *lines):
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, output
    assert "INTERNALERROR" not in output
    result.stderr.fnmatch_lines(list(lines))


@pytest.mark.parametrize(
    "args, message",
    [
        (("--ftrace-timeout", "inf"), "*--ftrace-timeout must be a finite number, not 'inf'*"),
        (("--ftrace-timeout", "nan"), "*--ftrace-timeout must be a finite number*"),
        (("--ftrace-timeout", "1e10"), "*--ftrace-timeout must be <= 1e+09, not 1e10*"),
        (("--ftrace-timeout", "1e400"), "*--ftrace-timeout must be a finite number*"),
        (("--ftrace-timeout", ""), "*--ftrace-timeout must be a number, not ''*"),
        (("--threads", "99999999999999999999"), "*--threads must be <= 1024*"),
        (("--iterations", "1e3"), "*--iterations must be a whole number*'1e3'*"),
        (("--ftrace-shrink", "-1", "--ftrace"), "*--ftrace-shrink must be >= 0, not -1*"),
        (("--ftrace-shrink", "inf", "--ftrace"), "*--ftrace-shrink must be a finite*"),
        (("--ftrace-replay-runs", "0", "--ftrace"), "*--ftrace-replay-runs must be >= 1*"),
        (("--ftrace", "--ftrace-policy", "max_spin_ns=-1"), "*max_spin_ns must be >= 0, not -1*"),
        (
            ("--ftrace", "--ftrace-policy", "max_spin_ns=99999999999999999999"),
            "*--ftrace-policy max_spin_ns must be <= *",
        ),
        (("--ftrace", "--ftrace-policy", "max_sleep_us=4000000000"), "*max_sleep_us must be <=*"),
        (("--ftrace", "--ftrace-policy", "yield_probability=nan"), "*yield_probability*finite*"),
        (("--ftrace", "--ftrace-policy", "sleep_share=-0.5"), "*sleep_share must be >= 0*"),
        (
            ("--ftrace", "--ftrace-scheduler", "mix99999999999999999999"),
            "*--ftrace-scheduler mix budget must be <= 4294967295*",
        ),
        (
            ("--ftrace", "--ftrace-scheduler", "pct99999999999999999999"),
            "*--ftrace-scheduler pct depth must be <=*",
        ),
        (("--ftrace", "--ftrace-scheduler", "aligned101"), "*aligned stay percent must be <= 100*"),
        (
            ("--ftrace", "--seed", "1", "--ftrace-replay", "t4i18446744073709551616"),
            "*--ftrace-replay t4i18446744073709551616: round must be <= 18446744073709551615*",
        ),
        (
            ("--ftrace", "--ftrace-replay", "t4i0k99999999999999999999999"),
            "*--ftrace-replay t4i0k99999999999999999999999: step estimate k must be <=*",
        ),
        (("--ftrace", "--ftrace-replay", "t0i0"), "*--ftrace-replay t0i0: threads must be >= 1*"),
        (("--ftrace", "--ftrace-replay", "t99999i0"), "*threads must be <= 1024*"),
        (("--ftrace", "--seed", "18446744073709551616"), "*--seed must be a whole number*"),
    ],
)
def test_out_of_range_values_are_usage_errors(pytester, args, message):
    pytester.makepyfile(FAILING)
    _usage_error(pytester.runpytest(*RUN, *args), message)


@pytest.mark.parametrize(
    "ini, message",
    [
        ("ftrace_timeout = inf", "ERROR: ini key ftrace_timeout: *finite number, not 'inf'*"),
        ("ftrace_timeout = 1e10", "ERROR: ini key ftrace_timeout: * <= 1e+09*"),
        ("ftrace_threads = 1.5", "ERROR: ini key ftrace_threads: *'1.5'*"),
        ("ftrace_iterations = 99999999999", "ERROR: ini key ftrace_iterations: *<= 1000000000*"),
        ("threadpool = -1", "ERROR: ini key threadpool: threadpool must be >= 1, not -1"),
        (
            "ftrace_scheduler = mix99999999999999999999",
            "ERROR: ini key ftrace_scheduler: *mix budget must be <= 4294967295*",
        ),
        ("ftrace_scheduler = pct0", "ERROR: ini key ftrace_scheduler: *pct depth must be >= 1*"),
        (
            "ftrace_policy = max_spin_ns=-1",
            "ERROR: ini key ftrace_policy: *max_spin_ns must be >= 0*",
        ),
        (
            "ftrace_policy = max_sleep_us=99999999999",
            "ERROR: ini key ftrace_policy: *max_sleep_us must be <=*",
        ),
        ("ftrace_seed = -1", "ERROR: ini key ftrace_seed: *whole number between 0 and 2**64-1*"),
        ("ftrace_require_gil_disabled = maybe", "ERROR: ini key ftrace_require_gil_disabled: *"),
    ],
)
def test_out_of_range_ini_values_are_usage_errors(pytester, ini, message):
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(FAILING)
    _usage_error(pytester.runpytest(*RUN, "--ftrace"), message)


def test_a_seed_with_leading_zeros_is_a_whole_number(pytester):
    pytester.makepyfile(FAILING)
    for args in (("--seed", "010"), ("--seed=0010",)):
        result = pytester.runpytest(*RUN, "--ftrace", *args)
        result.stdout.fnmatch_lines(["ftrace: seed=10 mode=exact*"])
        result.assert_outcomes(failed=1)
    pytester.makeini("[pytest]\nftrace_seed = 010\n")
    pytester.runpytest(*RUN, "--ftrace").stdout.fnmatch_lines(["ftrace: seed=10 mode=exact*"])


@pytest.mark.parametrize(
    "args",
    [
        ("--seed", "3"),
        ("--ftrace-seed=3",),
        ("--ftrace-mode", "chaos"),
        ("--ftrace-policy", "yield_probability=0.5"),
        ("--ftrace-replay", "t4i0"),
        ("--ftrace-scheduler", "random"),
        ("--ftrace-replay-runs", "3"),
        ("--ftrace-shrink", "0"),
        ("--ftrace-include", "mypkg.*"),
        ("--threads", "2", "--ftrace-mode=chaos"),
    ],
)
def test_ftrace_options_without_ftrace_are_usage_errors(pytester, args):
    pytester.makepyfile(FAILING)
    name = next(a for a in args if a.startswith("--ftrace-") or a == "--seed").split("=")[0]
    _usage_error(
        pytester.runpytest(*RUN, *args),
        f"ERROR: {name} only means something with --ftrace, which is missing*",
    )


def test_ftrace_options_from_the_ini_or_with_ftrace_are_fine(pytester, monkeypatch):
    pytester.makepyfile(FAILING)
    # an ini file may hold them for the project's --ftrace runs; plain runs ignore them
    pytester.makeini("[pytest]\naddopts = --ftrace-mode chaos --seed 3\nftrace_seed = 4\n")
    pytester.runpytest(*RUN).assert_outcomes(failed=1)
    result = pytester.runpytest(*RUN, "--ftrace")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["ftrace: seed=3 mode=chaos*"])
    # PYTEST_ADDOPTS is a command line too; so is --ftrace in it
    monkeypatch.setenv("PYTEST_ADDOPTS", "--ftrace-scheduler random")
    pytester.makeini("[pytest]\n")
    _usage_error(pytester.runpytest(*RUN), "*--ftrace-scheduler only means something with*")
    monkeypatch.setenv("PYTEST_ADDOPTS", "--ftrace")
    pytester.runpytest(*RUN, "--seed", "5").assert_outcomes(failed=1)


def test_an_option_name_another_plugin_owns_is_left_to_it(pytester):
    """Another plugin that defines --seed (loaded first, with -p) keeps it: our --seed alias is
    not registered, and its --seed without --ftrace is no error of ours."""
    pytester.makepyfile(
        seedplugin="""
        def pytest_addoption(parser):
            parser.addoption("--seed", dest="their_seed")
        def pytest_report_header(config):
            return f"their seed: {config.option.their_seed}"
        """
    )
    pytester.makepyfile(FAILING)
    pytester.syspathinsert()
    result = pytester.runpytest(*RUN, "-p", "seedplugin", "--seed", "7")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["their seed: 7"])
    result = pytester.runpytest(*RUN, "-p", "seedplugin", "--seed", "7", "--ftrace-seed", "9")
    _usage_error(result, "*--ftrace-seed only means something with --ftrace*")


def test_all_bad_markers_of_a_module_are_reported(pytester):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.ftrace(threads=0)
        def test_a():
            pass
        @pytest.mark.iterations("x")
        def test_b():
            pass
        def test_fine():
            pass
        @pytest.mark.ftrace(iterations=10**20)
        def test_c():
            pass
        """
    )
    result = run(pytester, "--threads", "2")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        [
            "*ERROR collecting*",
            "test_a: @pytest.mark.ftrace: threads must be *, not 0",
            "test_b: @pytest.mark.iterations: n must be *, not 'x'",
            "test_c: @pytest.mark.ftrace: iterations must be *, not 100000000000000000000",
        ]
    )


def test_no_free_monitoring_tool_id_is_a_usage_error(pytester):
    pytester.makeconftest(
        """
        import sys
        for tool in range(6):
            if sys.monitoring.get_tool(tool) is None:
                sys.monitoring.use_tool_id(tool, "hog")
        """
    )
    pytester.makepyfile(FAILING)
    result = run(pytester, "--ftrace")
    _usage_error(result, "ERROR: pytest-ftrace: no free sys.monitoring tool id for --ftrace;*")


# --- a corrupt cache is ignored with a note; a replay that cannot replay says so first ------

TWO_FAILING = """
import json
import re

import pytest
def test_x():
    assert False
def test_y():
    assert False
@pytest.mark.ftrace(threads=2)
def test_two():
    assert False
@pytest.mark.thread_unsafe
def test_alone():
    assert False
"""


def _cache_file(pytester, key: str):
    return pytester.path / ".pytest_cache" / "v" / key


def _first_failure(pytester, *args) -> str:
    """Run test_x once under --ftrace (seed 5) and return its replay token."""
    result = pytester.runpytest("--ftrace", "--seed", "5", "test_two_failing.py::test_x", *args)
    result.assert_outcomes(failed=1)
    line = next(line for line in result.stdout.lines if "replay: pytest " in line)
    return line.split("--ftrace-replay ", 1)[1].split()[0]


@pytest.mark.parametrize("value", ['"abc"', "[1, 2]", "18446744073709551616", "-5", "true", "{"])
def test_a_corrupt_cached_seed_is_ignored(pytester, value):
    pytester.makepyfile(test_two_failing=TWO_FAILING)
    _first_failure(pytester)
    _cache_file(pytester, "ftrace/seed").write_text(value)
    result = pytester.runpytest("--ftrace", "--seed", "last", "test_two_failing.py::test_x")
    assert result.ret != pytest.ExitCode.INTERNAL_ERROR
    if value == "{":  # not JSON: pytest's cache reads it as missing
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        return
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["ftrace: --seed last has nothing usable*(cached value ignored); this run uses a fresh*"]
    )
    seed = int(re.search(r"^ftrace: seed=(\d+)", result.stdout.str(), re.M).group(1))
    assert json.loads(_cache_file(pytester, "ftrace/seed").read_text()) == seed  # a good one


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"nodeid": "test_two_failing.py::test_x", "token": "zzz", "seed": 5}, "unusable token"),
        ({"nodeid": "test_two_failing.py::test_x", "token": "t4i0k9" + "9" * 30}, "no usable seed"),
        ({"token": "t4i0", "seed": 5, "mode": "exact"}, "names no test"),
        ({"nodeid": "", "token": "t4i0", "seed": 5}, "names no test"),
        (
            {"nodeid": "test_two_failing.py::test_x", "token": "t4i0", "seed": 5, "mode": "warp"},
            "unknown mode",
        ),
        ({"nodeid": "test_two_failing.py::test_x", "token": "t4i0", "seed": -1}, "no usable seed"),
        ([1, 2], "is not a record"),
        ("t4i0", "is not a record"),
    ],
)
def test_a_corrupt_replay_record_is_ignored(pytester, record, problem):
    pytester.makepyfile(test_two_failing=TWO_FAILING)
    _first_failure(pytester)
    _cache_file(pytester, "ftrace/replay/last").write_text(json.dumps(record))
    result = pytester.runpytest("--ftrace", "--ftrace-replay", "last", "-k", "test_x")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.assert_outcomes(failed=1, deselected=3)
    result.stdout.fnmatch_lines(
        [f"ftrace: --ftrace-replay last has nothing usable:*{problem}*(cached value ignored)*"]
    )
    assert "reproduced" not in result.stdout.str()
    # the failure of this run is recorded anew, in good order
    again = json.loads(_cache_file(pytester, "ftrace/replay/last").read_text())
    assert again["nodeid"] == "test_two_failing.py::test_x"


@pytest.mark.parametrize(
    "stored",
    [{"nodeid": "N", "decisions": [0, -1, 2]}, {"nodeid": "N", "decisions": "01"}, [0, 1], 7],
)
def test_a_corrupt_recorded_schedule_is_ignored(pytester, stored):
    pytester.makepyfile(test_two_failing=TWO_FAILING)
    token = _first_failure(pytester)
    key = token.split("x", 1)[1]
    if isinstance(stored, dict):
        stored["nodeid"] = "test_two_failing.py::test_x"
        stored["threads"] = 4
    _cache_file(pytester, f"ftrace/replay/{key}").write_text(json.dumps(stored))
    result = pytester.runpytest(
        "--ftrace", "--seed", "5", "test_two_failing.py::test_x", "--ftrace-replay", token
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*rescheduled from the seed*"])
    result.stdout.fnmatch_lines(
        [f"ftrace: ftrace/replay/{key}: the cached schedule * (cached value ignored)"]
    )


def test_a_replay_that_cannot_replay_in_this_run_is_a_usage_error(pytester):
    pytester.makepyfile(test_two_failing=TWO_FAILING)
    token = _first_failure(pytester)
    assert token.startswith("t4i0")
    # the token's schedule belongs to another test
    result = pytester.runpytest(
        "--ftrace", "--seed", "5", "test_two_failing.py::test_y", "--ftrace-replay", token
    )
    _usage_error(
        result,
        f"ERROR: --ftrace-replay {token}: its schedule was recorded for "
        "'test_two_failing.py::test_x', which this run does not select*",
    )
    # a thread count other than the token's, from the command line or a marker
    result = pytester.runpytest(
        "--ftrace", "test_two_failing.py::test_x", "--threads", "2", "--ftrace-replay", token
    )
    _usage_error(
        result, f"*--ftrace-replay {token} replays a round of 4 threads, but *x runs in 2*"
    )
    result = pytester.runpytest(
        "--ftrace", "test_two_failing.py::test_two", "--ftrace-replay", "t4i0"
    )
    _usage_error(result, "*replays a round of 4 threads, but *test_two runs in 2 (its marker)*")
    # a token whose schedule says otherwise
    _cache_file(pytester, f"ftrace/replay/{token.split('x')[1]}").write_text(
        json.dumps({"nodeid": "test_two_failing.py::test_x", "threads": 2, "decisions": [0]})
    )
    result = pytester.runpytest("--ftrace", "test_two_failing.py::test_x", "--ftrace-replay", token)
    _usage_error(result, "*the token says 4 threads, but its schedule was recorded with 2*")
    # a test that runs on one thread has nothing to replay
    result = pytester.runpytest(
        "--ftrace", "test_two_failing.py::test_alone", "--ftrace-replay", "t4i0"
    )
    _usage_error(
        result, "*test_alone runs on one thread (marked thread_unsafe): nothing to replay*"
    )
    # the same token, where it belongs, replays
    result = pytester.runpytest("--ftrace", "test_two_failing.py", "--ftrace-replay", "t2i0")
    result.assert_outcomes(failed=4)


def test_replay_last_of_a_test_that_is_gone_says_which(pytester):
    pytester.makepyfile(test_two_failing=TWO_FAILING)
    _first_failure(pytester)
    pytester.makepyfile(test_two_failing="def test_renamed():\n    assert False\n")
    result = pytester.runpytest("--ftrace", "--ftrace-replay", "last")
    _usage_error(
        result,
        "ERROR: --ftrace-replay last: the last failure recorded is 'test_two_failing.py::test_x', "
        "which this run did not collect*",
    )
