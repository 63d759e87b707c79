"""The suite's own guards, run on small inner test sessions: CI fails on non-GPU skips; Ray tests are leak-checked."""

from __future__ import annotations

import pathlib

import pytest

CONFTEST = pathlib.Path(__file__).resolve().parents[1] / "conftest.py"

SKIPS = """
import pytest

def test_runs():
    pass

@pytest.mark.gpu
def test_marked_gpu():
    pytest.skip("no device")

@pytest.mark.skipif(True, reason="needs two GPUs")
def test_two_gpus():
    pass

def test_needs_cuda():
    pytest.skip("needs CUDA")
"""

NON_GPU_SKIP = """
import pytest

def test_s3():
    pytest.importorskip("elastictrain_no_such_module_for_s3")
"""

MODULE_LEVEL_SKIP = """
import pytest
pytest.importorskip("elastictrain_no_such_module_for_kms")

def test_kms():
    pass
"""


@pytest.fixture
def inner(pytester, monkeypatch):
    """An inner session in a subprocess with this suite's conftest; returns a runner taking CI's value."""
    pytester.makeconftest(CONFTEST.read_text())

    def run(ci):
        if ci is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", ci)
        return pytester.runpytest_subprocess("-p", "no:cacheprovider")

    return run


def test_gpu_skips_pass_under_ci(pytester, inner):
    pytester.makepyfile(test_skips=SKIPS)
    result = inner("true")
    result.assert_outcomes(passed=1, skipped=3)
    assert result.ret == 0


@pytest.mark.parametrize("source", [NON_GPU_SKIP, MODULE_LEVEL_SKIP], ids=["in-test", "at-import"])
def test_a_non_gpu_skip_fails_under_ci_and_names_the_test(pytester, inner, source):
    pytester.makepyfile(test_skips=SKIPS, test_other=source)
    assert inner(None).ret == 0  # locally a skip stays a skip
    result = inner("true")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skips are failures under CI*", "*test_other.py*elastictrain_no_such_module*"])
    assert "test_needs_cuda" not in result.stdout.str()


LEAK = """
import threading
import pytest

@pytest.fixture(scope="module")
def ray_session():  # stands in for the real one: the name alone once turned the check off
    yield None

def test_leaks_a_thread(ray_session):
    threading.Thread(target=threading.Event().wait, name="leaked-by-driver", daemon=True).start()
"""

FOREIGN = """
import _thread
import threading
import pytest

@pytest.fixture(scope="module")
def ray_session():
    yield None

def test_a_foreign_thread_calls_into_python(ray_session):
    seen, done = [], threading.Event()

    def foreign():  # as a C++ thread of Ray's core worker calling back into Python
        seen.append(threading.current_thread())
        done.set()
        threading.Event().wait()  # still running at the check; the inner process's exit ends it

    _thread.start_new_thread(foreign, ())
    assert done.wait(10) and isinstance(seen[0], threading._DummyThread)
"""


def test_leak_check_covers_ray_session_tests(pytester, inner):
    pytester.makepyfile(test_leak=LEAK)
    result = inner(None)
    result.assert_outcomes(passed=1, errors=1)
    assert "test leaked threads: ['leaked-by-driver']" in result.stdout.str()


def test_leak_check_passes_over_threads_python_did_not_start(pytester, inner):
    pytester.makepyfile(test_foreign=FOREIGN)
    inner(None).assert_outcomes(passed=1)
