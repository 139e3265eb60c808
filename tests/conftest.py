import itertools
import os

# PyTorch's fused CPU Adam is bit-identical to fastadam only on its scalar-vector
# ("default") code path, which has no FMA. The variable is read when torch is first
# imported, so it is set here, before any test module can import torch.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "default")
# Keras 3 reads its backend once, at import: fastadam.keras's kernels run on torch's.
os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest

DTYPES = [np.float32, np.float64]


def default_capability_mark(torch):
    """skipif for the tests of bit parity with torch: they need torch (the module, or None
    when it is not installed) on ATen's default CPU capability, which the setdefault above
    gives unless torch was imported before this file."""
    return pytest.mark.skipif(
        torch is None or torch.backends.cpu.get_cpu_capability() != "DEFAULT",
        reason="needs torch on ATen's default CPU capability (ATEN_CPU_CAPABILITY=default, "
               "set in conftest.py before torch is imported)")

# Sizes that hit every vector-tail case (0, 1, 7, 31) and, with 1000003, many chunks
# split between threads with a remainder.
TAIL_SIZES = [0, 1, 7, 31]
LARGE_SIZE = 1000003


def _variants():
    """Every combination of the update's options, as adam_step keyword arguments."""
    axes = {
        "amsgrad": [False, True],
        "decay": ["none", "l2", "decoupled"],
        "maximize": [False, True],
        "form": ["default", "eps_hat", "eps_root"],
        "grad_scale": [1.0, 1024.0, 3.0],
        "beta1": [0.9, 0.3],
    }
    for values in itertools.product(*axes.values()):
        yield dict(zip(axes, values))


def variant_kwargs(variant):
    """Translate a variant dict into adam_step keyword arguments (without buffers)."""
    kwargs = {
        "maximize": variant["maximize"],
        "grad_scale": variant["grad_scale"],
        "beta1": variant["beta1"],
        "lr": 1e-2,
    }
    if variant["decay"] == "l2":
        kwargs["weight_decay"] = 0.05
    elif variant["decay"] == "decoupled":
        kwargs.update(weight_decay=0.05, decoupled_weight_decay=True)
    if variant["form"] == "eps_hat":
        kwargs["eps_hat"] = True
    elif variant["form"] == "eps_root":
        kwargs["eps_root"] = 1e-10
    return kwargs


def variant_id(variant):
    return "-".join(
        [
            "ams" if variant["amsgrad"] else "plain",
            variant["decay"],
            "max" if variant["maximize"] else "min",
            variant["form"],
            f"gs{variant['grad_scale']:g}",
            f"b1{variant['beta1']:g}",
        ]
    )


VARIANTS = list(_variants())
# A covering subset for the expensive sizes: every value of every axis appears.
VARIANT_SUBSET = [VARIANTS[i] for i in range(0, len(VARIANTS), 23)]


def make_state(size, dtype, *, amsgrad=False, seed=0):
    """Random (param, grad sequence generator seed, exp_avg, exp_avg_sq, max_exp_avg_sq)."""
    rng = np.random.default_rng(seed)
    param = rng.standard_normal(size).astype(dtype)
    exp_avg = (0.1 * rng.standard_normal(size)).astype(dtype)
    exp_avg_sq = (0.01 * rng.random(size)).astype(dtype)
    max_exp_avg_sq = (exp_avg_sq * rng.uniform(0.5, 1.5, size)).astype(dtype) if amsgrad else None
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


def make_grads(size, dtype, steps, *, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size).astype(dtype) for _ in range(steps)]


@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name)
def dtype(request):
    return request.param


@pytest.fixture
def restore_levels():
    """Give the SIMD dispatch back its default levels after a test that forced one."""
    yield
    from fastadam import _simd

    _simd.use(*_simd.default_levels())


# `python -m pytest -m quick`, README's quick test line: the core (kernels against the
# reference for every option, validation, optimizers, buffers, schedules, checkpoints) and
# the PyTorch and Keras adapters, in about 3 minutes on 2 busy cores (1.5 quiet). The full
# suite (`python -m pytest`, what .ci/run runs) adds the rest: large buffers, sparse rows,
# MPI, fuzzing, property tests, the examples and the packaging checks.
QUICK_MODULES = {
    "test_kernels.py", "test_validation.py", "test_optim.py", "test_buffers.py",
    "test_schedules.py", "test_flat.py", "test_checkpoint.py", "test_torch_adapter.py",
    "test_keras_adapter.py", "test_hints.py", "test_low_precision.py",
}
# 1000003-element buffers for every option: the bulk of test_kernels' time; the same
# options run on small buffers in the quick set, and the chunking on large ones in full.
QUICK_EXCLUDED_TESTS = {"test_large_buffer_matches_reference"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (item.path.name in QUICK_MODULES
                and getattr(item, "originalname", item.name) not in QUICK_EXCLUDED_TESTS
                and item.get_closest_marker("slow") is None):
            item.add_marker(pytest.mark.quick)
