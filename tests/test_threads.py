"""Threads: the OpenMP build, thread-count controls, threadpoolctl, the GIL, show_config."""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import fastadam
from fastadam import _kernels, _threads

requires_openmp = pytest.mark.skipif(not _kernels.openmp_enabled(),
                                     reason="serial build (FASTADAM_OPENMP=0)")


def run_python(code, **env):
    full_env = dict(os.environ, **env)
    out = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(os.environ.get("FASTADAM_SKIP_OPENMP_CHECK") == "1",
                    reason="FASTADAM_SKIP_OPENMP_CHECK=1 (a deliberately serial build)")
def test_build_really_has_openmp():
    # A wheel silently built without OpenMP would pass every other test, only slower.
    assert _kernels.openmp_enabled()
    assert _kernels.openmp_version() >= 200505
    assert _kernels.team_size(2) == 2


@pytest.fixture
def restore_default():
    previous = fastadam.set_num_threads(None)
    yield
    fastadam.set_num_threads(previous)


@requires_openmp
def test_set_num_threads_returns_previous_and_none_restores(restore_default):
    assert fastadam.set_num_threads(3) is None
    assert fastadam.get_num_threads() == 3
    assert fastadam.set_num_threads(1) == 3
    assert fastadam.get_num_threads() == 1
    assert fastadam.set_num_threads(None) == 1
    assert fastadam.get_num_threads() == _kernels.max_threads()


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-1, ValueError), (2.0, TypeError), ("4", TypeError)])
def test_set_num_threads_rejects_bad_values(restore_default, bad, exc):
    with pytest.raises(exc, match="^num_threads must be None or a positive integer"):
        fastadam.set_num_threads(bad)
    assert fastadam.get_num_threads() == (_kernels.max_threads() if _kernels.openmp_enabled() else 1)


@requires_openmp
@pytest.mark.parametrize("value", ["1", "3"])
def test_omp_num_threads_is_honoured(value):
    assert run_python("import fastadam; print(fastadam.get_num_threads())",
                      OMP_NUM_THREADS=value) == value


def test_small_work_runs_on_one_thread():
    assert _threads.threads_for(8, _threads.SERIAL_CUTOFF - 1) == 1
    if _kernels.openmp_enabled():
        assert _threads.threads_for(2, _threads.SERIAL_CUTOFF) == 2
        assert _threads.threads_for(None, 10**7) == fastadam.get_num_threads()


@requires_openmp
def test_threadpoolctl_sees_fastadams_openmp_runtime():
    pytest.importorskip("threadpoolctl")
    # A fresh interpreter where fastadam is the only thing that loads an OpenMP runtime.
    out = run_python(
        "import fastadam, threadpoolctl\n"
        "print(sorted({i['internal_api'] for i in threadpoolctl.threadpool_info()"
        " if i['user_api'] == 'openmp'}))"
    )
    assert out == "['openmp']"


@requires_openmp
def test_threadpoolctl_limits_fastadam(restore_default):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = fastadam.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert fastadam.get_num_threads() == 1
    assert fastadam.get_num_threads() == before


def test_gil_is_released_while_the_kernel_runs():
    # While a large update runs in a worker thread, the main thread must be able to run
    # Python code. With the GIL held for the whole kernel, no main-thread timestamp could
    # fall strictly inside a kernel call.
    size = 1 << 23
    bufs = [np.ones(size, np.float64) for _ in range(4)]
    windows, samples, done = [], [], threading.Event()

    def worker():
        for step in range(1, 6):
            start = time.perf_counter()
            fastadam.adam_step(*bufs, step=step, num_threads=1)
            windows.append((start, time.perf_counter()))
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    while not done.is_set():
        samples.append(time.perf_counter())
    thread.join()
    inside = [t for t in samples for a, b in windows if a + 0.2 * (b - a) < t < b - 0.2 * (b - a)]
    assert inside, "the main thread never ran while adam_step was running: GIL not released"


def test_show_config_reports_build_and_runtime(capsys):
    info = fastadam.show_config(mode="dicts")
    for key in ("fastadam", "compiler", "compiler_flags", "vector_isa", "openmp",
                "openmp_runtimes", "num_threads"):
        assert key in info
    assert info["fastadam"] == fastadam.__version__
    assert "-ffast-math" not in info["compiler_flags"]
    assert "-march=native" not in info["compiler_flags"]
    assert info["openmp"] == _kernels.openmp_enabled()
    assert fastadam.show_config() is None
    printed = capsys.readouterr().out
    assert "vector_isa" in printed and "openmp" in printed
    with pytest.raises(ValueError, match="^mode must be"):
        fastadam.show_config(mode="json")
