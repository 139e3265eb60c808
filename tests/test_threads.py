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
    for key in ("fastadam", "compiler", "compiler_flags", "simd", "baseline_isa", "openmp",
                "openmp_runtimes", "num_threads"):
        assert key in info
    assert info["fastadam"] == fastadam.__version__
    assert "-ffast-math" not in info["compiler_flags"]
    assert "-march=native" not in info["compiler_flags"]
    assert info["openmp"] == _kernels.openmp_enabled()
    assert fastadam.show_config() is None
    printed = capsys.readouterr().out
    assert "baseline_isa" in printed and "openmp" in printed
    # The baseline module's ISA is labelled as such, after the levels in use (issue 23: a
    # bare "vector_isa sse2" above "simd small_tensors=avx512" read as a contradiction).
    lines = printed.splitlines()
    simd = next(i for i, line in enumerate(lines) if line.startswith("simd "))
    baseline = next(i for i, line in enumerate(lines) if line.startswith("baseline_isa "))
    assert simd < baseline and "the baseline module" in lines[baseline]
    assert not any(line.startswith("vector_isa") for line in lines)
    with pytest.raises(ValueError, match="^mode must be"):
        fastadam.show_config(mode="json")


# --- many Python threads, one optimizer from two threads, fork after OpenMP ------------

def run_in_threads(count, target):
    """Start ``count`` threads on target(index) together (a barrier); re-raise any error."""
    barrier, errors = threading.Barrier(count), []

    def run(index):
        try:
            barrier.wait()
            target(index)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def seeded_problem(seed, size=70_000, dtype=np.float32):
    # Above the serial cutoff: every step runs an OpenMP team with the GIL released.
    rng = np.random.default_rng(seed)
    return rng.standard_normal(size).astype(dtype), [rng.standard_normal(size).astype(dtype)
                                                      for _ in range(4)]


def test_separate_optimizers_in_eight_threads_match_serial_runs():
    steps = 15

    def train(seed, amsgrad):
        param, grads = seeded_problem(seed)
        opt = fastadam.AdamW([param], lr=1e-2, amsgrad=amsgrad)
        for t in range(steps):
            opt.step([grads[t % len(grads)]])
        return param, opt.state_dict()["state"][0]

    serial = [train(i, i % 2 == 1) for i in range(8)]
    concurrent = [None] * 8

    def worker(index):
        concurrent[index] = train(index, index % 2 == 1)

    run_in_threads(8, worker)
    for (p_serial, s_serial), (p_threads, s_threads) in zip(serial, concurrent):
        np.testing.assert_array_equal(p_threads.view(np.uint32), p_serial.view(np.uint32))
        assert s_threads["step"] == s_serial["step"] == steps
        for key in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(s_threads[key], s_serial[key])


def test_one_optimizer_stepped_from_two_threads_equals_sequential_steps():
    # fastadam.Adam serialises step (and the other state methods) with a per-optimizer
    # lock. With the same gradient every step, the order of the steps cannot matter: two
    # threads doing N steps each must give exactly 2N sequential steps. Unserialised, the
    # two kernel calls (GIL released) would update the same buffers at once, and the
    # first step's AMSGrad allocation could happen twice.
    steps = 25
    param, grads = seeded_problem(7)
    reference = param.copy()
    sequential = fastadam.Adam([reference], lr=1e-2, amsgrad=True)
    for _ in range(2 * steps):
        sequential.step([grads[0]])
    shared = fastadam.Adam([param], lr=1e-2, amsgrad=True)

    def worker(index):
        for _ in range(steps):
            shared.step([grads[0]])

    run_in_threads(2, worker)
    np.testing.assert_array_equal(param.view(np.uint32), reference.view(np.uint32))
    got, want = shared.state_dict()["state"][0], sequential.state_dict()["state"][0]
    assert got["step"] == want["step"] == 2 * steps
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        np.testing.assert_array_equal(got[key], want[key])


def test_state_dict_taken_while_another_thread_steps_is_never_torn():
    # One thread steps (same gradient, so the state after k steps is one known value per
    # element); another takes state_dicts meanwhile. Each snapshot holds exactly the state
    # of the step count it reports: state_dict waits for a step in progress (whose kernel
    # runs without the GIL) instead of copying buffers half updated.
    steps, size = 60, 1 << 17
    reference = fastadam.Adam([np.zeros(1, np.float32)], lr=1e-2)
    expected = [(reference.state[0]["exp_avg"].copy(), reference.state[0]["exp_avg_sq"].copy())]
    for _ in range(steps):
        reference.step([np.full(1, 0.5, np.float32)])
        expected.append((reference.state[0]["exp_avg"].copy(), reference.state[0]["exp_avg_sq"].copy()))
    opt = fastadam.Adam([np.zeros(size, np.float32)], lr=1e-2, num_threads=1)
    grad, snapshots, done = np.full(size, 0.5, np.float32), [], threading.Event()

    def work(index):
        if index == 0:
            for _ in range(steps):
                opt.step([grad])
                time.sleep(0.0005)  # as a training loop computes the next gradient: a
                # lock is not fair, so without a pause the stepper could take it back
                # before the other thread wakes
            done.set()
        else:
            while not done.is_set():
                snapshots.append(opt.state_dict()["state"][0])

    run_in_threads(2, work)
    assert len({s["step"] for s in snapshots}) > 3  # the snapshots did interleave with steps
    for snapshot in snapshots:
        m, v = expected[snapshot["step"]]
        assert (snapshot["exp_avg"] == m).all() and (snapshot["exp_avg_sq"] == v).all()


def test_torch_adapter_stepped_from_two_threads_equals_sequential_steps():
    torch = pytest.importorskip("torch")
    fastadam_torch = pytest.importorskip("fastadam.torch")
    steps = 20
    param, grads = seeded_problem(8)

    def optimizer(values):
        tensor = torch.nn.Parameter(torch.from_numpy(values.copy()))
        tensor.grad = torch.from_numpy(grads[0])
        return tensor, fastadam_torch.Adam([tensor], lr=1e-2, amsgrad=True)

    reference, sequential = optimizer(param)
    for _ in range(2 * steps):
        sequential.step()
    shared_param, shared = optimizer(param)
    run_in_threads(2, lambda index: [shared.step() for _ in range(steps)])
    assert torch.equal(shared_param.detach(), reference.detach())
    assert shared.state[shared_param]["step"].item() == 2 * steps


def test_pickled_and_copied_optimizers_get_their_own_lock():
    import copy
    import pickle

    param, grads = seeded_problem(9, size=10)
    opt = fastadam.Adam([param])
    opt.step([grads[0]])
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone._lock is not opt._lock
        with opt._lock:  # held here: the clone must not wait for it
            clone.step([grads[1]])
        assert clone.state[0]["step"] == 2 and opt.state[0]["step"] == 1


FORK_AFTER_OPENMP = """
import multiprocessing, sys
import numpy as np
import fastadam

def update(num_threads):
    bufs = [np.full(1 << 20, 0.5, np.float32) for _ in range(4)]
    fastadam.adam_step(*bufs, step=1, num_threads=num_threads)
    return bufs[0]

def child(queue):
    queue.put((fastadam.get_num_threads(), update(2).tobytes() == expected.tobytes()))

if __name__ == "__main__":
    expected = update(2)  # the parent runs a two-thread team first
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,), daemon=True)  # killed at exit
    process.start()
    print(queue.get(timeout=30), fastadam.get_num_threads())
    process.join(30)
    sys.exit(process.exitcode)
"""


@requires_openmp
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_fork_after_an_openmp_team_ran_does_not_hang(tmp_path):
    # libgomp's thread pool does not survive fork: a child's first parallel region waited
    # forever. fastadam runs updates in a forked child on one thread (fastadam._threads).
    # A fresh interpreter, so the parent has really run a team; timeouts turn a hang into
    # a failure.
    script = tmp_path / "fork_after_openmp.py"
    script.write_text(FORK_AFTER_OPENMP)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=90, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(1,", "True)", "2"]  # child: 1 thread, same result


def test_team_size_is_capped_by_the_work_and_a_ceiling():
    from fastadam._threads import MAX_TEAM_SIZE, SERIAL_CUTOFF, threads_for

    chunk = _kernels.build_info()["chunk_elements"]
    assert threads_for(2, SERIAL_CUTOFF - 1) == 1
    assert threads_for(2, SERIAL_CUTOFF) == 2
    # no more threads than 4096-element pieces of work
    assert threads_for(10**6, SERIAL_CUTOFF) == SERIAL_CUTOFF // chunk
    assert threads_for(10**6, SERIAL_CUTOFF + 1) == SERIAL_CUTOFF // chunk + 1
    # and never more than the ceiling, however much work
    assert threads_for(2**31 - 1, 2**40) == MAX_TEAM_SIZE


def test_a_huge_num_threads_over_many_small_tensors_runs():
    # 70,000 one-element tensors make 70,000 chunks: uncapped, num_threads=100_000 asked
    # libgomp for 70,000 threads, and the process died (a segfault here). In a
    # subprocess, so that a crash is a failure with a message, not the end of the run.
    code = """
import numpy as np, fastadam
params = [np.ones(1, np.float32) for _ in range(70_000)]
opt = fastadam.Adam(params, lr=0.5, num_threads=100_000)
opt.step([np.ones(1, np.float32)] * len(params))
values = np.concatenate(params)
assert np.all(values == values[0]) and abs(values[0] - 0.5) < 1e-6, values[:3]
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", (result.returncode,
                                                                     result.stderr[-2000:])


# threads_per_rank: the CPUs a process may run on are faked (os.sched_getaffinity by pid:
# 0 is this rank, PARENT the launcher) and so is the launcher's environment.
PARENT = 4242


@pytest.fixture
def host(monkeypatch):
    """Set this rank's and its launcher's CPUs and the environment; clears every launcher
    variable first (the suite itself may run under one)."""
    for variable in _threads.LOCAL_WORLD_SIZE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(os, "getppid", lambda: PARENT)

    def configure(own, parent=None, **env):
        cpus = {0: set(own), PARENT: set(own if parent is None else parent)}

        def affinity(pid):
            if pid not in cpus:
                raise ProcessLookupError(pid)
            return cpus[pid]

        monkeypatch.setattr(os, "sched_getaffinity", affinity, raising=False)
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)

    return configure


@pytest.mark.parametrize("variable", _threads.LOCAL_WORLD_SIZE_VARIABLES)
def test_threads_per_rank_shares_the_hosts_cpus_among_the_launchers_local_ranks(host, variable):
    host(range(16), **{variable: "4"})  # not pinned: each rank may run on all 16
    assert fastadam.threads_per_rank() == 4
    host(range(16), **{variable: "3"})
    assert fastadam.threads_per_rank() == 5  # rounded down: 15 of 16 used, none twice


def test_threads_per_rank_is_what_the_rank_may_use_alone_without_a_launcher(host):
    host(range(8))
    assert fastadam.threads_per_rank() == 8
    host({2, 3}, parent=range(8))  # taskset -c 2,3 python train.py
    assert fastadam.threads_per_rank() == 2


def test_threads_per_rank_gives_ranks_pinned_to_disjoint_cpus_their_own(host):
    # mpiexec --bind-to core / NUMA binding: 4 ranks on 4 cores each of a 16-core host
    host({4, 5, 6, 7}, parent=range(16), LOCAL_WORLD_SIZE="4")
    assert fastadam.threads_per_rank() == 4
    # 2 ranks bound to 2 cores each: their own 2, not half of the host's 16
    host({0, 1}, parent=range(16), LOCAL_WORLD_SIZE="2")
    assert fastadam.threads_per_rank() == 2


def test_threads_per_rank_shares_a_socket_that_several_ranks_are_bound_to(host):
    # 4 ranks bound to sockets of 8 cores on a 16-core host: 2 ranks per socket, 4 threads each
    host(range(8, 16), parent=range(16), OMPI_COMM_WORLD_LOCAL_SIZE="4")
    assert fastadam.threads_per_rank() == 4


def test_threads_per_rank_is_at_least_one_and_ignores_omp_num_threads(host, monkeypatch):
    host(range(2), LOCAL_WORLD_SIZE="3")  # more ranks than CPUs
    assert fastadam.threads_per_rank() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's setting: what this replaces
    host(range(8), LOCAL_WORLD_SIZE="2")
    assert fastadam.threads_per_rank() == 4


def test_threads_per_rank_argument_wins_over_the_environment(host):
    host(range(12), LOCAL_WORLD_SIZE="2", MPI_LOCALNRANKS="4")
    assert fastadam.threads_per_rank() == 6  # torchrun's variable comes first
    assert fastadam.threads_per_rank(3) == 4
    assert fastadam.threads_per_rank(local_world_size=1) == 12


def test_threads_per_rank_without_a_readable_launcher_uses_the_ranks_own_cpus(host, monkeypatch):
    host(range(6), LOCAL_WORLD_SIZE="2")
    monkeypatch.setattr(os, "getppid", lambda: PARENT + 1)  # gone, or another user's
    assert fastadam.threads_per_rank() == 3


def test_threads_per_rank_is_the_cpu_count_where_affinity_is_unknown(host, monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert fastadam.threads_per_rank() == 3


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-2, ValueError), (2.0, TypeError),
                                      ("2", TypeError), (True, TypeError)])
def test_threads_per_rank_rejects_a_bad_local_world_size(host, bad, exc):
    host(range(4))
    with pytest.raises(exc, match="^local_world_size must be None or a positive integer"):
        fastadam.threads_per_rank(bad)


@pytest.mark.parametrize("value", ["0", "-1", "two", ""])
def test_threads_per_rank_names_a_bad_launcher_variable(host, value):
    host(range(4), LOCAL_SIZE=value)
    with pytest.raises(ValueError, match="^the environment variable LOCAL_SIZE must be a positive integer"):
        fastadam.threads_per_rank()


@pytest.mark.slow  # torchrun starts 2 processes
def test_threads_per_rank_under_torchrun_uses_the_rank_affinity(tmp_path):
    # the real thing, no fakes: 2 ranks started by torchrun on this machine
    pytest.importorskip("torch")
    script = tmp_path / "rank.py"
    script.write_text("import os, fastadam\n"
                      "print(os.environ['LOCAL_WORLD_SIZE'], len(os.sched_getaffinity(0)),"
                      " os.environ['OMP_NUM_THREADS'], fastadam.threads_per_rank(), flush=True)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(fastadam.__file__)), os.environ.get("PYTHONPATH", "")])}
    env.pop("OMP_NUM_THREADS", None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", str(script)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split() for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 2
    for ranks, cpus, omp, threads in lines:
        assert (ranks, omp) == ("2", "1")  # torchrun's: one thread per rank
        assert int(threads) == max(1, int(cpus) // 2)
