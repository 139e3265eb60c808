"""pytest-benchmark suite: regression history of fastadam's step times.

    pip install pytest-benchmark
    pytest benchmarks/test_benchmarks.py --benchmark-only [--benchmark-autosave]
    pytest-benchmark compare    # against saved runs

Not part of the test suite (tests/ is): timings are never asserted.
"""

import numpy as np
import pytest

import fastadam

pytest.importorskip("pytest_benchmark")

SIZES = [1 << 10, 1 << 14, 1 << 20, 1 << 22]
DTYPES = [np.float32, np.float64, np.float16]
try:  # bfloat16 arrays come from ml_dtypes, an optional dependency
    import ml_dtypes

    DTYPES.append(ml_dtypes.bfloat16)
except ImportError:
    pass


def buffers(size, dtype):
    rng = np.random.default_rng(0)
    param = rng.standard_normal(size).astype(dtype)
    state = fastadam.adam_state(param)
    return param, rng.standard_normal(size).astype(dtype), state["exp_avg"], state["exp_avg_sq"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"2^{n.bit_length() - 1}")
@pytest.mark.parametrize("num_threads", [1, 2])
def test_adam_step(benchmark, size, dtype, num_threads):
    param, grad, m, v = buffers(size, dtype)
    steps = iter(range(1, 10**9))
    benchmark(lambda: fastadam.adam_step(param, grad, m, v, step=next(steps), num_threads=num_threads))


@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"2^{n.bit_length() - 1}")
@pytest.mark.parametrize("num_threads", [1, 2])
def test_adam_step_master_weights(benchmark, size, num_threads):
    """A float16 param and grad with a float32 master and moments (one pass, 28 B/element)."""
    rng = np.random.default_rng(0)
    param = rng.standard_normal(size).astype(np.float16)
    grad = rng.standard_normal(size).astype(np.float16)
    state = fastadam.adam_state(param, master_weights=True)
    steps = iter(range(1, 10**9))
    benchmark(lambda: fastadam.adam_step(param, grad, state["exp_avg"], state["exp_avg_sq"],
                                         step=next(steps), master_param=state["master_param"],
                                         num_threads=num_threads))


@pytest.mark.parametrize("shapes", [[512] * 2000, [1 << 20]], ids=["2000x512", "1x2^20"])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_optimizer_step(benchmark, shapes, num_threads):
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    opt = fastadam.Adam(params, num_threads=num_threads)
    benchmark(opt.step, grads)


def test_flat_params_step(benchmark):
    flat = fastadam.FlatParams([512] * 2000)
    flat.grad_data[...] = np.random.default_rng(0).standard_normal(flat.grad_data.size)
    opt = fastadam.Adam(flat.params)
    benchmark(opt.step, flat.grads)
