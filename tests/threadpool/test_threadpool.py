"""--threadpool: distinct tests run concurrently in worker threads of one process.

Concurrency is proven with barriers that only open when two tests wait at once; "ran on its
own" with the thread a test runs on (tests run the usual way run on the main thread).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
from conftest import FREE_THREADED_BUILD, only_gil_build

# Put in a conftest.py of each pytester run: a barrier helper and thread bookkeeping.
CONFTEST = """
import threading
import pytest

BARRIERS = {}
LOCK = threading.Lock()
THREADS = {}

def meet(name, parties=2):
    with LOCK:
        barrier = BARRIERS.setdefault(name, threading.Barrier(parties, timeout=10))
    barrier.wait()

def on_worker():
    return threading.current_thread().name.startswith("ftrace-threadpool")

@pytest.fixture(autouse=True)
def _record_thread(request):
    THREADS[request.node.name] = on_worker()
    yield
"""


@pytest.fixture
def tp(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:randomly", *args)


def test_marked_tests_really_run_concurrently(tp):
    tp.makepyfile(
        test_conc="""
        import pytest
        from conftest import meet
        from pytest_ftrace.threadpool import parallelizable

        @parallelizable("children")
        class TestPair:
            def test_a(self):
                meet("class")
            def test_b(self):
                meet("class")

        @parallelizable("parameters")
        @pytest.mark.parametrize("n", [1, 2])
        def test_variants(n):
            meet("params")
        """
    )
    result = run(tp, "--threadpool", "2")
    result.assert_outcomes(passed=4)
    assert "ftrace threadpool: 2 workers" in result.stdout.str()
    # The usual progress: one dot per test on the file's line, then the percentage.
    result.stdout.re_match_lines([r"test_conc\.py \.{4}\s+\[100%\]$"])


def test_without_the_option_marked_tests_run_the_usual_way(tp):
    tp.makepyfile(
        test_plain="""
        import threading
        import pytest
        from pytest_ftrace.threadpool import parallelizable

        @parallelizable("children")
        class TestPair:
            def test_a(self):
                assert threading.current_thread() is threading.main_thread()
            def test_b(self):
                assert threading.current_thread() is threading.main_thread()
        """
    )
    run(tp, "--strict-markers").assert_outcomes(passed=2)


def test_unmarked_tests_run_alone_and_in_order_between_groups(tp):
    tp.makepyfile(
        test_order="""
        from conftest import meet, on_worker
        from pytest_ftrace.threadpool import parallelizable

        EVENTS = []

        @parallelizable("children")
        class TestFirst:
            def test_1(self):
                meet("first")
                EVENTS.append("first")
            def test_2(self):
                meet("first")
                EVENTS.append("first")

        def test_middle():
            assert not on_worker()
            assert EVENTS == ["first", "first"]
            EVENTS.append("middle")

        @parallelizable("children")
        class TestLast:
            def test_3(self):
                meet("last")
                assert EVENTS[:3] == ["first", "first", "middle"]
            def test_4(self):
                meet("last")
                assert EVENTS[:3] == ["first", "first", "middle"]
        """
    )
    result = run(tp, "--threadpool", "4", "-v")
    result.assert_outcomes(passed=5)
    # The unmarked test is reported in its place, between the groups.
    lines = [line for line in result.outlines if " PASSED" in line]
    names = [line.split("::")[-1].split()[0] for line in lines]
    assert names.index("test_middle") == 2, names


def test_marker_levels_and_priority(tp):
    tp.makepyfile(
        **{
            "pkg/__init__.py": "import pytest\n"
            "pytestmark = pytest.mark.parallelizable('children')\n",
            "pkg/test_from_package.py": """
            from conftest import meet
            def test_p1():
                meet("package")
            def test_p2():
                meet("package")
            """,
            "test_levels.py": """
            import pytest
            from conftest import THREADS, meet
            from pytest_ftrace.threadpool import not_parallelizable, parallelizable

            pytestmark = pytest.mark.parallelizable("parameters")

            def test_module_plain_1():
                pass  # "parameters" on the module: unparametrized tests run alone

            def test_module_plain_2():
                pass

            @pytest.mark.parametrize("n", [1, 2])
            def test_module_params(n):
                meet("module-params")

            @parallelizable("children")
            class TestClassWins:
                def test_c1(self):
                    meet("class")
                def test_c2(self):
                    meet("class")
                @not_parallelizable
                def test_opted_out(self):
                    pass

            @not_parallelizable
            class TestNot:
                @parallelizable("all")
                @pytest.mark.parametrize("n", [1, 2])
                def test_not_wins(self, n):
                    pass

            def test_zz_check():
                assert THREADS["test_module_plain_1"] is False
                assert THREADS["test_module_plain_2"] is False
                assert THREADS["test_module_params[1]"] is True
                assert THREADS["test_c1"] is True and THREADS["test_c2"] is True
                assert THREADS["test_opted_out"] is False
                assert THREADS["test_not_wins[1]"] is False
                assert THREADS["test_not_wins[2]"] is False
            """,
        }
    )
    result = run(tp, "--threadpool", "2", "test_levels.py", "pkg")
    result.assert_outcomes(passed=12)


def test_scopes_at_each_level(tp):
    """children, parameters and all on a function, a class, a module and a package."""
    tp.makepyfile(
        **{
            "pkg/__init__.py": "import pytest\n"
            "pytestmark = pytest.mark.parallelizable('parameters')\n",
            "pkg/test_pkg_params.py": """
            import pytest
            from conftest import THREADS, meet

            @pytest.mark.parametrize("n", [1, 2])
            def test_v(n):
                meet("pkg-params")

            def test_plain_1():
                pass

            def test_plain_2():
                pass

            def test_zz_check():
                assert THREADS["test_v[1]"] and THREADS["test_v[2]"]
                assert not THREADS["test_plain_1"] and not THREADS["test_plain_2"]
            """,
            "test_module_all.py": """
            import pytest
            from conftest import meet

            pytestmark = pytest.mark.parallelizable("all")

            # "all" on a module: every test below it, variants included, runs together.
            @pytest.mark.parametrize("n", [1, 2])
            def test_v(n):
                meet("module-all", 3)

            def test_other():
                meet("module-all", 3)
            """,
            "test_class_params.py": """
            import pytest
            from conftest import THREADS, meet
            from pytest_ftrace import parallelizable

            @parallelizable("parameters")
            class TestParams:
                @pytest.mark.parametrize("n", [1, 2])
                def test_v(self, n):
                    meet("class-params")

                def test_alone_1(self):
                    pass

                def test_alone_2(self):
                    pass

            def test_zz_check():
                assert THREADS["test_v[1]"] and THREADS["test_v[2]"]
                assert not THREADS["test_alone_1"] and not THREADS["test_alone_2"]
            """,
            "test_function_level.py": """
            import pytest
            from conftest import THREADS, meet
            from pytest_ftrace import parallelizable

            # On a function every scope means its parametrized variants.
            @parallelizable("children")
            @pytest.mark.parametrize("n", [1, 2])
            def test_children(n):
                meet("fn-children")

            @pytest.mark.parallelizable("parameters")
            @pytest.mark.parametrize("n", [1, 2])
            def test_parameters(n):
                meet("fn-parameters")

            @pytest.mark.parallelizable(scope="all")
            @pytest.mark.parametrize("n", [1, 2])
            def test_all(n):
                meet("fn-all")

            @parallelizable("children")
            def test_unparametrized_1():
                pass

            @parallelizable("children")
            def test_unparametrized_2():
                pass

            def test_zz_check():
                for name in ("test_children", "test_parameters", "test_all"):
                    assert THREADS[f"{name}[1]"] and THREADS[f"{name}[2]"], name
                assert not THREADS["test_unparametrized_1"]
                assert not THREADS["test_unparametrized_2"]
            """,
        }
    )
    result = run(tp, "--threadpool", "3")
    result.assert_outcomes(passed=5 + 3 + 5 + 9)


def test_own_marker_beats_class_beats_module_beats_package(tp):
    tp.makepyfile(
        **{
            "pkg/__init__.py": "import pytest\n"
            "pytestmark = pytest.mark.parallelizable('children')\n",
            "pkg/test_module_over_package.py": """
            import pytest
            from conftest import THREADS

            # The module's "parameters" beats the package's "children".
            pytestmark = pytest.mark.parallelizable("parameters")

            def test_m1():
                pass

            def test_m2():
                pass

            def test_zz_check():
                assert not THREADS["test_m1"] and not THREADS["test_m2"]
            """,
            "pkg/test_module_opts_out.py": """
            import pytest
            from conftest import THREADS
            from pytest_ftrace import not_parallelizable

            pytestmark = not_parallelizable

            @pytest.mark.parallelizable("children")
            @pytest.mark.parametrize("n", [1, 2])
            def test_v(n):
                pass

            def test_zz_check():
                assert not THREADS["test_v[1]"] and not THREADS["test_v[2]"]
            """,
            "pkg/test_inherits_package.py": """
            from conftest import meet

            def test_p1():
                meet("package")

            def test_p2():
                meet("package")
            """,
            "test_class_over_module.py": """
            import pytest
            from conftest import THREADS, meet

            pytestmark = pytest.mark.parallelizable("children")

            WAVES = {}

            def _wave(key, request):
                # The wave the worker threads run now (the runner counts the waves it starts).
                runner = request.config.pluginmanager.get_plugin("ftrace-threadpool").runner
                WAVES.setdefault(key, set()).add(runner.pool_serial)

            # The class's "parameters" beats the module's "children"...
            @pytest.mark.parallelizable("parameters")
            class TestNarrow:
                def test_c1(self):
                    pass

                def test_c2(self):
                    pass

            # ...and a method's own marker beats the class's: test_own's variants run with each
            # other, in a wave of their own, not with test_x and test_y.
            @pytest.mark.parallelizable("children")
            class TestOwn:
                def test_x(self, request):
                    meet("xy")
                    _wave("xy", request)

                def test_y(self, request):
                    meet("xy")
                    _wave("xy", request)

                @pytest.mark.parametrize("n", [1, 2])
                @pytest.mark.parallelizable("parameters")
                def test_own(self, n, request):
                    meet("own")
                    _wave("own", request)

            def test_zz_check():
                assert not THREADS["test_c1"] and not THREADS["test_c2"]
                assert THREADS["test_own[1]"] and THREADS["test_own[2]"]
                assert len(WAVES["xy"]) == len(WAVES["own"]) == 1, WAVES
                assert WAVES["xy"] != WAVES["own"], WAVES
            """,
        }
    )
    result = run(tp, "--threadpool", "2")
    result.assert_outcomes(passed=3 + 3 + 2 + 7)


def test_package_markers_inner_package_first_and_not_parallelizable_on_a_package(tp):
    tp.makepyfile(
        **{
            "outer/__init__.py": "import pytest\n"
            "pytestmark = pytest.mark.parallelizable('children')\n",
            "outer/test_outer.py": """
            from conftest import meet

            def test_o1():
                meet("outer")

            def test_o2():
                meet("outer")
            """,
            "outer/inner/__init__.py": "import pytest\n"
            "pytestmark = pytest.mark.parallelizable('parameters')\n",
            "outer/inner/test_inner.py": """
            import pytest
            from conftest import THREADS, meet

            # The inner package's "parameters" beats the outer package's "children".
            @pytest.mark.parametrize("n", [1, 2])
            def test_v(n):
                meet("inner-params")

            def test_plain_1():
                pass

            def test_plain_2():
                pass

            def test_zz_check():
                assert THREADS["test_v[1]"] and THREADS["test_v[2]"]
                assert not THREADS["test_plain_1"] and not THREADS["test_plain_2"]
            """,
            "closed/__init__.py": "import pytest\npytestmark = pytest.mark.not_parallelizable\n",
            "closed/test_closed.py": """
            import pytest
            from conftest import THREADS

            # not_parallelizable on the package beats the module's, class's and own markers.
            pytestmark = pytest.mark.parallelizable("children")

            @pytest.mark.parallelizable("children")
            class TestC:
                @pytest.mark.parallelizable("all")
                @pytest.mark.parametrize("n", [1, 2])
                def test_w(self, n):
                    pass

            def test_zz_closed():
                assert not THREADS["test_w[1]"] and not THREADS["test_w[2]"]
            """,
        }
    )
    run(tp, "--threadpool", "2").assert_outcomes(passed=3 + 2 + 5)


def test_default_scope_makes_unmarked_tests_parallelizable(tp):
    tp.makepyfile(
        test_default="""
        from conftest import meet
        def test_a():
            meet("default")
        def test_b():
            meet("default")
        """
    )
    run(tp, "--threadpool", "2", "--ftrace-threadpool-default", "children").assert_outcomes(
        passed=2
    )
    tp.makeini("[pytest]\nftrace_threadpool = 2\nftrace_threadpool_default = all\n")
    run(tp).assert_outcomes(passed=2)
    # The option beats the ini; not_parallelizable beats the default.
    tp.makepyfile(
        test_default="""
        import pytest
        from conftest import THREADS, meet
        def test_a():
            meet("default")
        def test_b():
            meet("default")
        @pytest.mark.not_parallelizable
        def test_out_1():
            pass
        @pytest.mark.not_parallelizable
        def test_out_2():
            pass
        def test_zz_check():
            assert THREADS["test_a"] and THREADS["test_b"]
            assert not THREADS["test_out_1"] and not THREADS["test_out_2"]
        """
    )
    run(tp, "test_default.py").assert_outcomes(passed=5)
    tp.makepyfile(
        test_override="""
        from conftest import THREADS
        def test_c():
            pass
        def test_d():
            pass
        def test_zz_check():
            assert not THREADS["test_c"] and not THREADS["test_d"]
        """
    )
    run(tp, "test_override.py").assert_outcomes(passed=2, failed=1)  # the ini's "all"
    run(tp, "--ftrace-threadpool-default", "none", "test_override.py").assert_outcomes(passed=3)


def test_ini_worker_count_and_auto(tp):
    tp.makepyfile(
        test_ini="""
        import pytest
        from conftest import meet
        pytestmark = pytest.mark.parallelizable("children")
        def test_a():
            meet("ini")
        def test_b():
            meet("ini")
        """
    )
    tp.makeini("[pytest]\nthreadpool = 2\n")  # the short ini alias
    result = run(tp)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["ftrace threadpool: 2 workers*"])
    from pytest_ftrace.options import usable_cpus

    result = run(tp, "--threadpool", "auto", "-k", "nothing")
    result.stdout.fnmatch_lines([f"ftrace threadpool: {usable_cpus()} workers*"])


def test_fixture_scopes(tp):
    tp.makepyfile(
        test_fixtures="""
        import threading
        import pytest
        from conftest import meet, on_worker

        LOG = []

        @pytest.fixture(scope="session")
        def whole_session():
            LOG.append(("session-setup", on_worker()))
            yield object()
            LOG.append(("session-teardown", on_worker()))

        @pytest.fixture(scope="package")
        def whole_package():
            LOG.append(("package-setup", on_worker()))
            yield object()

        @pytest.fixture(scope="module")
        def shared():
            LOG.append(("module-setup", on_worker()))
            yield object()
            LOG.append(("module-teardown", on_worker()))

        @pytest.fixture(scope="class")
        def per_class():
            LOG.append(("class-setup", on_worker()))
            yield object()
            LOG.append(("class-teardown", on_worker()))

        @pytest.fixture
        def own(request):
            LOG.append(("function-setup", on_worker()))
            yield request.node.name
            LOG.append(("function-teardown", on_worker()))

        SEEN = {}

        @pytest.mark.parallelizable("children")
        class TestGroup:
            @pytest.mark.parametrize("n", range(4))
            def test_member(
                self, n, whole_session, whole_package, shared, per_class, own, tmp_path, request
            ):
                meet("group")  # two at a time: two workers
                assert own == request.node.name
                SEEN.setdefault("session", set()).add(id(whole_session))
                SEEN.setdefault("package", set()).add(id(whole_package))
                SEEN.setdefault("shared", set()).add(id(shared))
                SEEN.setdefault("class", set()).add(id(per_class))
                (tmp_path / "mine").write_text(own)
                assert (tmp_path / "mine").read_text() == own

        def test_after():
            assert len(SEEN["shared"]) == 1 and len(SEEN["class"]) == 1
            assert len(SEEN["session"]) == 1 and len(SEEN["package"]) == 1
            assert LOG.count(("session-setup", False)) == 1
            assert LOG.count(("package-setup", False)) == 1
            assert LOG.index(("session-setup", False)) < LOG.index(("function-setup", True))
            assert LOG.count(("module-setup", False)) == 1
            assert LOG.count(("class-setup", False)) == 1
            assert LOG.count(("class-teardown", False)) == 1
            assert LOG.count(("function-setup", True)) == 4
            assert LOG.count(("function-teardown", True)) == 4
            assert ("module-teardown", False) not in LOG  # the module is not done yet
            assert LOG.index(("class-teardown", False)) > max(
                i for i, e in enumerate(LOG) if e[0] == "function-teardown"
            )
        """
    )
    run(tp, "--threadpool", "2").assert_outcomes(passed=5)


def test_a_conftest_hook_applies_only_below_its_directory(tp):
    """The runner caches each path's hook proxy; conftests below a path still count only there."""
    hook = """
def pytest_runtest_setup(item):
    item.stash.setdefault(SEEN, []).append(DIRECTORY)
"""
    tp.makepyfile(
        **{
            "a/conftest.py": "import pytest\nSEEN = pytest.StashKey()\nDIRECTORY = 'a'\n" + hook,
            "b/conftest.py": "import pytest\nSEEN = pytest.StashKey()\nDIRECTORY = 'b'\n" + hook,
            "a/test_a.py": """
            import pytest
            from conftest import meet
            pytestmark = pytest.mark.parallelizable("children")

            def _seen(node):
                import a.conftest
                import b.conftest
                return node.stash.get(a.conftest.SEEN, []) + node.stash.get(b.conftest.SEEN, [])

            @pytest.mark.parametrize("n", [1, 2])
            def test_a(n, request):
                meet("a")
                assert _seen(request.node) == ["a"]
            """,
            "b/test_b.py": """
            import pytest
            from conftest import meet
            pytestmark = pytest.mark.parallelizable("children")

            def _seen(node):
                import a.conftest
                import b.conftest
                return node.stash.get(a.conftest.SEEN, []) + node.stash.get(b.conftest.SEEN, [])

            @pytest.mark.parametrize("n", [1, 2])
            def test_b(n, request):
                meet("b")
                assert _seen(request.node) == ["b"]
            """,
            "a/__init__.py": "",
            "b/__init__.py": "",
        }
    )
    run(tp, "--threadpool", "2").assert_outcomes(passed=4)


def test_fixture_errors_are_reported_against_the_right_test(tp):
    tp.makepyfile(
        test_errors="""
        import pytest
        pytestmark = pytest.mark.parallelizable("children")

        @pytest.fixture(scope="module")
        def broken_module():
            raise RuntimeError("module fixture broke")

        @pytest.fixture(params=["good", "bad"])
        def param(request):
            if request.param == "bad":
                raise ValueError("bad param")
            return request.param

        @pytest.fixture
        def bad_teardown():
            yield
            raise KeyError("teardown broke")

        def test_uses_param(param):
            assert param == "good"

        def test_broken_1(broken_module):
            pass

        def test_broken_2(broken_module):
            pass

        def test_teardown(bad_teardown):
            pass

        def test_fine():
            pass
        """
    )
    result = run(tp, "--threadpool", "3", "-rA")
    result.assert_outcomes(passed=3, errors=4)
    result.stdout.fnmatch_lines_random(
        [
            "ERROR test_errors.py::test_uses_param?bad? - ValueError: bad param",
            "ERROR test_errors.py::test_broken_1 - RuntimeError: module fixture broke",
            "ERROR test_errors.py::test_broken_2 - RuntimeError: module fixture broke",
            "ERROR test_errors.py::test_teardown - KeyError: 'teardown broke'",
            "PASSED test_errors.py::test_uses_param?good?",
            "PASSED test_errors.py::test_fine",
        ]
    )


def test_capture_is_per_test(tp):
    tp.makepyfile(
        test_capture="""
        import logging
        import sys
        import time
        import warnings
        import pytest
        from conftest import meet

        pytestmark = pytest.mark.parallelizable("children")

        @pytest.mark.parametrize("who", ["alpha", "beta", "gamma"])
        def test_noisy(who):
            for _ in range(5):
                print(f"out-of-{who}")
                print(f"err-of-{who}", file=sys.stderr)
                logging.getLogger("t").warning(f"log-of-{who}")
                time.sleep(0.01)
            warnings.warn(f"warning-of-{who}")
            assert False, who

        # Both write, then both read: each sees only what its own test wrote.
        def test_capsys(capsys):
            meet("fixtures")
            print("mine")
            logging.getLogger("t").warning("logged by the capsys test")
            meet("written")
            assert capsys.readouterr() == ("mine\\n", "")
            print("left for the report")

        def test_caplog(caplog):
            meet("fixtures")
            print("printed by the caplog test")
            logging.getLogger("t").warning("only this one")
            meet("written")
            assert [r.getMessage() for r in caplog.records] == ["only this one"]
            assert "printed by the caplog test" not in caplog.text

        def test_capsysbinary(capsysbinary):
            sys.stdout.write("bytes of mine")
            assert capsysbinary.readouterr().out == b"bytes of mine"
        """
    )
    result = run(tp, "--threadpool", "3", "-rA")
    result.assert_outcomes(failed=3, passed=3)
    text = result.stdout.str()
    for who in ["alpha", "beta", "gamma"]:
        block = _block(text, f"test_noisy[{who}]")
        for other in {"alpha", "beta", "gamma"} - {who}:
            for kind in ("out", "err", "log"):
                assert f"{kind}-of-{other}" not in block, (who, block)
        assert block.count(f"out-of-{who}") == 5
        assert block.count(f"err-of-{who}") == 5
        assert block.count(f"log-of-{who}") == 5
        assert f"test_capture.py::test_noisy[{who}]" in text.split("warnings summary")[1]
    block = _block(text, "test_capsys")
    assert "left for the report" in block and "mine" not in block


def _block(text: str, title: str) -> str:
    """The part of a pytest report under the "____ title ____" line."""
    start = text.index(f"_ {title} _")
    match = re.compile(r"^[_=]{3,}", re.M).search(text, text.index("\n", start))
    return text[start : match.start() if match else len(text)]


def test_dash_s_shows_live_output(tp):
    tp.makepyfile(
        test_live="""
        import pytest
        pytestmark = pytest.mark.parallelizable("children")
        def test_a(capsys):
            print("LIVE-A")
            with capsys.disabled():
                pass
        def test_b():
            print("LIVE-B")
            assert False
        """
    )
    result = run(tp, "--threadpool", "2", "-s")
    result.assert_outcomes(passed=1, failed=1)
    text = result.stdout.str()
    # Written to the terminal as the tests ran: before the failure report, and not kept in
    # a "Captured stdout" section of it.
    failures = text.index("= FAILURES =")
    assert "LIVE-A" in text[:failures] and "LIVE-B" in text[:failures]
    assert "Captured stdout" not in text


def test_each_report_appears_as_its_test_finishes(tp):
    """test_slow can only end after the report of test_fast has been logged."""
    tp.makeconftest(
        CONFTEST
        + """
FAST_REPORTED = threading.Event()

def pytest_runtest_logreport(report):
    if report.nodeid.endswith("test_fast") and report.when == "teardown":
        assert threading.current_thread() is threading.main_thread()
        FAST_REPORTED.set()
"""
    )
    tp.makepyfile(
        test_live_reports="""
        import pytest
        from conftest import FAST_REPORTED
        pytestmark = pytest.mark.parallelizable("children")

        def test_slow():
            assert FAST_REPORTED.wait(30), "test_fast was not reported while this test ran"

        def test_fast():
            pass

        def test_after():
            pass
        """
    )
    result = run(tp, "--threadpool", "2", "-v")
    result.assert_outcomes(passed=3)
    names = [line.split("::")[-1].split()[0] for line in result.outlines if " PASSED" in line]
    assert names.index("test_fast") < names.index("test_slow"), names


def test_exitfirst_stops_scheduling(tp):
    tp.makepyfile(
        test_x="""
        import time
        import pytest
        pytestmark = pytest.mark.parallelizable("children")

        def test_fails():
            assert False

        @pytest.mark.parametrize("n", range(12))
        def test_slow(n):
            time.sleep(0.2)

        def test_never_reached():
            pass
        """
    )
    result = run(tp, "--threadpool", "2", "-x")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] == 1
    assert outcomes.get("passed", 0) <= 2
    not_run = 14 - 1 - outcomes.get("passed", 0)
    result.stdout.fnmatch_lines(
        [f"ftrace threadpool: {not_run} tests not run (the session stopped)", "*stopping after 1*"]
    )


def test_junitxml_lists_each_test_once(tp):
    tp.makepyfile(
        test_junit="""
        import pytest
        pytestmark = pytest.mark.parallelizable("all")

        @pytest.mark.parametrize("n", range(6))
        def test_n(n):
            print(f"printed {n}")
            assert n != 3

        @pytest.fixture
        def broken():
            yield
            raise RuntimeError("teardown")

        def test_td(broken):
            pass
        """
    )
    run(tp, "--threadpool", "3", "--junitxml=out.xml", "-o", "junit_logging=system-out")
    root = ET.parse(tp.path / "out.xml").getroot()
    cases = [case.get("name") for case in root.iter("testcase")]
    assert sorted(cases) == sorted([f"test_n[{n}]" for n in range(6)] + ["test_td"])
    by_name = {case.get("name"): case for case in root.iter("testcase")}
    assert by_name["test_n[3]"].find("failure") is not None
    assert by_name["test_td"].find("error") is not None
    assert "printed 3" in ET.tostring(by_name["test_n[3]"], encoding="unicode")
    assert "printed 4" not in ET.tostring(by_name["test_n[3]"], encoding="unicode")


def test_last_failed_and_keyword_selection(tp):
    tp.makepyfile(
        test_sel="""
        import pytest
        pytestmark = pytest.mark.parallelizable("children")
        def test_ok_1(): pass
        def test_ok_2(): pass
        def test_bad_1(): assert False
        def test_bad_2(): assert False
        """
    )
    run(tp, "--threadpool", "2").assert_outcomes(passed=2, failed=2)
    result = run(tp, "--threadpool", "2", "--lf", "-v")
    result.assert_outcomes(failed=2)
    assert "test_ok_1" not in result.stdout.str()
    result = run(tp, "--threadpool", "2", "-k", "ok")
    result.assert_outcomes(passed=2, deselected=2)


def test_a_hanging_test_times_out_and_the_session_goes_on(tp):
    tp.makepyfile(
        test_hang="""
        import threading
        import pytest
        pytestmark = pytest.mark.parallelizable("children")

        def test_hangs():
            print("before the hang")
            threading.Event().wait()

        def test_fine_1(): pass
        def test_fine_2(): pass
        """
    )
    result = run(tp, "--threadpool", "2", "--ftrace-timeout", "1")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Timeout: test_hang.py::test_hangs was still in its call after 1 s*",
            "*in test_hangs",
            "*threading.Event().wait()",
            "*before the hang*",
            "*leaked worker thread ftrace-threadpool-*, still in the call of "
            "test_hang.py::test_hangs*",
        ]
    )


def test_a_timed_out_worker_is_replaced_in_its_wave_and_after_it(tp):
    tp.makeconftest(
        CONFTEST
        + """
TIMED_OUT = threading.Event()

def pytest_runtest_logreport(report):
    if report.nodeid.endswith("test_hangs") and report.failed:
        TIMED_OUT.set()
"""
    )
    tp.makepyfile(
        test_replaced="""
        import threading
        import time
        import pytest
        from conftest import TIMED_OUT, meet
        pytestmark = pytest.mark.parallelizable("children")

        def test_hangs():
            threading.Event().wait()

        # The other worker is kept busy until the hung test has timed out (each of these
        # runs for less than the timeout)...
        def test_busy_1():
            time.sleep(1)

        def test_busy_2():
            assert TIMED_OUT.wait(30)

        # ...so these two can only meet if the hung worker was replaced at once.
        def test_meet_1():
            meet("same wave")

        def test_meet_2():
            meet("same wave")

        # And the next wave has both workers too.
        class TestNextWave:
            def test_x(self):
                meet("next wave")

            def test_y(self):
                meet("next wave")
        """
    )
    result = tp.runpytest_subprocess(
        "-p", "no:randomly", "--threadpool", "2", "--ftrace-timeout", "3", timeout=120
    )
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(["*leaked worker thread ftrace-threadpool-*test_hangs*"])


def test_workers_the_starter_thread_cannot_start_are_started_by_the_main_thread(tp):
    tp.makeconftest(
        CONFTEST
        + """
import time

_start = threading.Thread.start

def _start_on_main_only(self):
    if self.name.startswith("ftrace-threadpool") and (
        threading.current_thread() is not threading.main_thread()
    ):
        time.sleep(0.5)  # fail after the wave has been handed to the pool
        raise RuntimeError("can't start new thread")
    return _start(self)

threading.Thread.start = _start_on_main_only
"""
    )
    tp.makepyfile(
        test_start="""
        import pytest
        from conftest import meet
        pytestmark = pytest.mark.parallelizable("children")
        def test_a():
            meet("started")
        def test_b():
            meet("started")
        """
    )
    result = tp.runpytest_subprocess("-p", "no:randomly", "--threadpool", "2", timeout=60)
    result.assert_outcomes(passed=2)


def test_pytest_exit_in_a_worker_ends_the_session(tp):
    tp.makepyfile(
        test_exit="""
        import pytest
        pytestmark = pytest.mark.parallelizable("children")
        def test_a(): pytest.exit("leaving now", returncode=3)
        def test_b(): pass
        """
    )
    result = run(tp, "--threadpool", "2")
    assert result.ret == 3
    assert "leaving now" in result.stdout.str()
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


@pytest.mark.parametrize(
    "value, message",
    [
        ("0", "--threadpool must be >= 1, not 0"),
        ("-3", "--threadpool must be >= 1, not -3"),
        ("abc", "--threadpool must be a whole number from 1 to 1024 or 'auto', not 'abc'"),
    ],
)
@pytest.mark.parametrize("spelling", ["separate", "equals"])
def test_bad_worker_count_is_a_usage_error(tp, value, message, spelling):
    args = ["--threadpool", value] if spelling == "separate" else [f"--threadpool={value}"]
    result = run(tp, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_bad_ini_values_are_usage_errors(tp):
    tp.makeini("[pytest]\nftrace_threadpool = many\n")
    result = run(tp)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini key ftrace_threadpool*'many'*"])
    tp.makeini("[pytest]\nftrace_threadpool = 2\nftrace_threadpool_default = lots\n")
    result = run(tp)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ftrace_threadpool_default*'lots'*"])


def test_unknown_scope_is_a_usage_error_naming_it(tp):
    tp.makepyfile(
        test_scope="""
        import pytest
        @pytest.mark.parallelizable("everything")
        def test_a(): pass
        """
    )
    result = run(tp, "--threadpool", "2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_scope.py::test_a*unknown parallelizable scope*everything*"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_unknown_scope_on_a_module_or_class_names_it(tp):
    tp.makepyfile(
        test_mod_scope="""
        import pytest
        pytestmark = pytest.mark.parallelizable(scope="sideways")
        def test_a(): pass
        """
    )
    result = run(tp, "--threadpool", "2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_mod_scope.py*unknown parallelizable scope*sideways*"])
    tp.makepyfile(
        test_mod_scope="""
        import pytest
        @pytest.mark.parallelizable("children", "extra")
        class TestC:
            def test_a(self): pass
        """
    )
    result = run(tp, "--threadpool", "2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_mod_scope.py::TestC*parallelizable() takes one scope*"])


def test_parallelizable_helper_rejects_unknown_scope():
    from pytest_ftrace.threadpool import parallelizable

    with pytest.raises(ValueError, match="'sideways'"):
        parallelizable("sideways")


@pytest.mark.skipif(not FREE_THREADED_BUILD, reason="needs a free-threaded build")
def test_combines_with_require_gil_disabled(tp):
    tp.makepyfile(
        test_gil="""
        import sys
        import pytest
        from conftest import meet
        pytestmark = pytest.mark.parallelizable("children")
        def test_a():
            meet("gil")
            assert not sys._is_gil_enabled()
        def test_b():
            meet("gil")
        """
    )
    run(tp, "--threadpool", "2", "--require-gil-disabled").assert_outcomes(passed=2)


@only_gil_build
def test_require_gil_disabled_on_a_gil_build_is_a_usage_error(tp):
    tp.makepyfile(
        test_gil="""
        import pytest
        pytestmark = pytest.mark.parallelizable("children")
        def test_a(): pass
        def test_b(): pass
        """
    )
    result = run(tp, "--threadpool", "8", "--require-gil-disabled")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "GIL" in result.stderr.str()
    assert "passed" not in result.stdout.str()


def test_importable_from_the_package():
    import pytest_ftrace
    from pytest_ftrace.threadpool import not_parallelizable, parallelizable

    assert pytest_ftrace.parallelizable is parallelizable
    assert pytest_ftrace.not_parallelizable is not_parallelizable
    assert parallelizable("parameters").mark.args == ("parameters",)
    assert not_parallelizable.mark.name == "not_parallelizable"


def test_a_broken_worker_ends_the_session_instead_of_hanging(tp):
    tp.makeconftest(
        CONFTEST
        + """
from pytest_ftrace.threadpool import runner as threadpool_runner

def _broken(self, wave):
    raise RuntimeError("worker machinery broke")

threadpool_runner.Runner._work_loop = _broken
"""
    )
    tp.makepyfile(
        test_broken="""
        import pytest
        pytestmark = pytest.mark.parallelizable("children")
        def test_a(): pass
        def test_b(): pass
        """
    )
    result = tp.runpytest_subprocess("-p", "no:randomly", "--threadpool", "2", timeout=120)
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR
    assert "worker machinery broke" in result.stdout.str() + result.stderr.str()


def test_closing_a_routing_stream_leaves_the_original_alone():
    """A stand-in stream can outlive the stream under it (pytester's capture, closed at the
    end of an inner run); closing the stand-in, as its finalizer does when it is collected,
    must neither flush nor close the original (a closed one raised ValueError)."""
    import io

    from pytest_ftrace.threadpool.capture import RoutingStream

    closed_under = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    stand_in = RoutingStream(closed_under, 0)
    closed_under.close()
    stand_in.close()  # no ValueError: I/O operation on closed file
    still_open = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    RoutingStream(still_open, 1).close()
    assert not still_open.closed
