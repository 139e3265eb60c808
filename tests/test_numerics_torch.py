"""``adam_step(numerics="torch")``: bit-identical to torch's fused CPU Adam at the CPU
capability torch picks (AVX2 or AVX-512), where its kernel has FMAs (docs/numerics-torch.md).

conftest.py forces ATEN_CPU_CAPABILITY=default on this process before torch is imported,
so torch runs in a subprocess (tests/torch_native_worker.py) with that variable removed
(torch's own choice on this CPU) or set to "avx2" / "avx512"; the same inputs go through
fastadam here and every byte of the results is compared.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings

import fastadam
from fastadam import _kernels, _simd

from reference import adam_reference
from test_properties import assert_within, error_bounds, make_case, random_cases
from torch_native_worker import digest, make_inputs

torch = pytest.importorskip("torch")

WORKER = Path(__file__).with_name("torch_native_worker.py")
FMA_CAPABILITIES = ("AVX2", "AVX512")

DTYPES = ["float32", "float64"]
SMALL_SIZES = [0, 1, 7, 31, 1037]  # a tail only, a body and a tail, tails of every length
LARGE_SIZE = 1000003               # mod 8 and mod 16; 1000003: threads in both libraries
STEPS = 3


def _variants():
    axes = {
        "amsgrad": [False, True],
        "decay": ["none", "l2", "decoupled"],
        "maximize": [False, True],
        "grad_scale": [1.0, 1024.0, 3.0],
        "beta1": [0.9, 0.3],  # both branches of the moment lerp (1 - beta1 < 0.5 or not)
    }
    for values in itertools.product(*axes.values()):
        yield dict(zip(axes, values))


VARIANTS = list(_variants())
LARGE_VARIANTS = VARIANTS[::9]  # every value of every axis appears


def variant_id(v):
    return "-".join(["ams" if v["amsgrad"] else "plain", v["decay"],
                     "max" if v["maximize"] else "min", f"gs{v['grad_scale']:g}",
                     f"b1{v['beta1']:g}"])


def make_case_spec(variant, dtype, size, seed, steps=STEPS, **extra):
    return dict(dtype=dtype, size=size, seed=seed, steps=steps, amsgrad=variant["amsgrad"],
                decoupled_weight_decay=variant["decay"] == "decoupled",
                weight_decay=0.0 if variant["decay"] == "none" else 0.05,
                maximize=variant["maximize"], grad_scale=variant["grad_scale"],
                beta1=variant["beta1"], beta2=0.999, lr=1e-2, eps=1e-8, **extra)


# Every case the worker runs, keyed by (kind, dtype, variant index, size), in one list.
CASES = {}
for _d, (_i, _v), _n in itertools.product(DTYPES, enumerate(VARIANTS), SMALL_SIZES):
    CASES[("kernel", _d, _i, _n)] = make_case_spec(_v, _d, _n, seed=len(CASES))
for _d, (_i, _v) in itertools.product(DTYPES, enumerate(VARIANTS)):
    if _v in LARGE_VARIANTS:
        CASES[("kernel", _d, _i, LARGE_SIZE)] = make_case_spec(
            _v, _d, LARGE_SIZE, seed=len(CASES), steps=2, digest=True)
OPTIMIZER_SIZES = [1, 7, 8, 31, 64, 1037, 4099]
for _d, (_i, _v) in itertools.product(DTYPES, enumerate(VARIANTS)):
    if _v["grad_scale"] == 1.0 and _v["beta1"] == 0.9:  # the optimizer has no grad_scale here
        CASES[("optimizer", _d, _i, 0)] = make_case_spec(_v, _d, 0, seed=len(CASES), steps=5,
                                                         sizes=OPTIMIZER_SIZES)
# Edges of the hyperparameters: the lerp branch at 1 - beta1 == 0.5 and at beta1 = 0, a
# small beta2, lr = 0, a large L2 decay, a late step.
EDGES = [dict(beta1=0.5), dict(beta1=0.0), dict(beta1=0.99, beta2=0.5), dict(lr=0.0),
         dict(weight_decay=1.5), dict(decoupled_weight_decay=True, weight_decay=1.5),
         dict(eps=1e-3, step_offset=10**6)]
for _d, (_i, _e) in itertools.product(DTYPES, enumerate(EDGES)):
    CASES[("edge", _d, _i, 0)] = dict(make_case_spec(VARIANTS[_i % 2 * 36], _d, 1037,
                                                     seed=len(CASES)), **_e)
NONFINITE_SIZES = [7, 31, 1037]
for _d, (_i, _v), _n in itertools.product(DTYPES, enumerate(VARIANTS), NONFINITE_SIZES):
    if _v["grad_scale"] == 1.0 and not _v["maximize"]:
        CASES[("nonfinite", _d, _i, _n)] = make_case_spec(_v, _d, _n, seed=len(CASES),
                                                          nonfinite=True)
TRAINED = [i for i, v in enumerate(VARIANTS) if v["grad_scale"] == 1.0 and v["beta1"] == 0.9
           and not v["maximize"]]
for _d, _i in itertools.product(DTYPES, TRAINED):
    CASES[("train", _d, _i, 0)] = make_case_spec(VARIANTS[_i], _d, 0, seed=len(CASES),
                                                 steps=30, train=True)
CASE_INDEX = {key: k for k, key in enumerate(CASES)}


def torch_results(capability, tmp_path_factory):
    """The worker's results for every case at ``capability`` (None: torch's own choice)."""
    directory = tmp_path_factory.mktemp(f"torch_{capability or 'native'}")
    cases_file, out_file = directory / "cases.json", directory / "out.npz"
    cases_file.write_text(json.dumps(list(CASES.values())))
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    package_root = str(Path(fastadam.__file__).resolve().parents[1])  # fastadam, as here
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    subprocess.run([sys.executable, str(WORKER), str(cases_file), str(out_file)], env=env,
                   check=True, timeout=900)
    results = np.load(out_file)
    got = str(results["capability"])
    if got not in FMA_CAPABILITIES or (capability is not None and got != capability.upper()):
        pytest.skip(f"torch runs its {got} kernel here (asked for {capability or 'its choice'}); "
                    f"the torch profile reproduces its AVX2/AVX-512 kernels")
    return results


_RESULTS = {}


@pytest.fixture(scope="module", params=[None, "avx2", "avx512"],
                ids=["native", "avx2", "avx512"])
def torch_out(request, tmp_path_factory):
    if request.param not in _RESULTS:
        try:
            _RESULTS[request.param] = torch_results(request.param, tmp_path_factory)
        except pytest.skip.Exception as skip:
            _RESULTS[request.param] = skip
    if isinstance(_RESULTS[request.param], BaseException):
        pytest.skip(str(_RESULTS[request.param]))
    return _RESULTS[request.param]


def fastadam_run(case, numerics="torch", num_threads=None):
    param, exp_avg, exp_avg_sq, vmax, grads = make_inputs(case)
    for step, grad in enumerate(grads, start=1 + case.get("step_offset", 0)):
        fastadam.adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=vmax, step=step,
                           lr=case["lr"], beta1=case["beta1"], beta2=case["beta2"],
                           eps=case["eps"], weight_decay=case["weight_decay"],
                           decoupled_weight_decay=case["decoupled_weight_decay"],
                           maximize=case["maximize"], grad_scale=case["grad_scale"],
                           num_threads=num_threads, numerics=numerics)
    return [param, exp_avg, exp_avg_sq] + ([vmax] if vmax is not None else [])


def assert_bits(k, got, results, label):
    names = ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    for j, array in enumerate(got):
        name = names[j % 4] if len(got) <= 4 else f"tensor {j // len(names)} {names[j % 4]}"
        if f"{k}_digest_{j}" in results:
            assert digest(array) == str(results[f"{k}_digest_{j}"]), f"{label}: {name} differs"
            continue
        want = results[f"{k}_{j}"]
        assert array.shape == want.shape, f"{label}: {name} has shape {array.shape}"
        bytes_differ = array.view(np.uint8) != want.view(np.uint8)
        differ = np.flatnonzero(bytes_differ.reshape(array.size, -1).any(axis=1)) \
            if array.size else []
        assert len(differ) == 0, (f"{label}: {name} differs at elements {differ[:10]} of "
                                  f"{array.size}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", range(len(VARIANTS)),
                         ids=[variant_id(v) for v in VARIANTS])
def test_bit_identical_to_torch_fused_kernel_at_native_capability(torch_out, dtype, index):
    for size in SMALL_SIZES + [LARGE_SIZE]:
        key = ("kernel", dtype, index, size)
        if key in CASES:
            k = CASE_INDEX[key]
            assert_bits(k, fastadam_run(CASES[key]), torch_out, f"size {size}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", [i for i, v in enumerate(VARIANTS)
                                   if v["grad_scale"] == 1.0 and not v["maximize"]],
                         ids=lambda i: variant_id(VARIANTS[i]))
def test_nan_and_inf_grads_give_torchs_results(torch_out, dtype, index):
    # NaN/Inf reach every moment; AMSGrad's max follows ATen's vector maximum() (a NaN
    # in either operand gives NaN) except in torch's scalar tail (std::max keeps the old
    # value). max_exp_avg_sq is compared bit for bit, NaN bits too (which NaN a result
    # carries is not promised elsewhere: p, m and v must match with NaN at the same places).
    for size in NONFINITE_SIZES:
        key = ("nonfinite", dtype, index, size)
        got = fastadam_run(CASES[key])
        k = CASE_INDEX[key]
        for j, (name, array) in enumerate(zip(["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"], got)):
            want = torch_out[f"{k}_{j}"]
            if name == "max_exp_avg_sq":
                np.testing.assert_array_equal(array.view(np.uint8), want.view(np.uint8),
                                              err_msg=f"size {size}: {name}")
            else:
                np.testing.assert_array_equal(np.isnan(array), np.isnan(want),
                                              err_msg=f"size {size}: {name} NaN positions")
                finite = ~np.isnan(want)
                np.testing.assert_array_equal(array[finite].view(np.uint8), want[finite].view(np.uint8),
                                              err_msg=f"size {size}: {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", TRAINED, ids=lambda i: variant_id(VARIANTS[i]))
def test_training_an_mlp_matches_fused_adam_bit_for_bit(torch_out, dtype, index):
    # 30 steps of a small MLP, run entirely in torch's process (its gradients come from
    # torch's own kernels at that capability): torch.optim.Adam/AdamW(fused=True) against
    # fastadam.adam_step(numerics="torch") on each parameter (sizes 481, 37, 185, 5)
    k = CASE_INDEX[("train", dtype, index, 0)]
    arrays = [torch_out[f"{k}_{j}"] for j in range(8)]
    for j, (want, got) in enumerate(zip(arrays[:4], arrays[4:])):
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8),
                                      err_msg=f"parameter {j}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", range(len(EDGES)),
                         ids=lambda i: "-".join(f"{k}={v:g}" for k, v in EDGES[i].items()))
def test_bit_identical_to_torch_fused_kernel_at_hyperparameter_edges(torch_out, dtype, index):
    key = ("edge", dtype, index, 0)
    assert_bits(CASE_INDEX[key], fastadam_run(CASES[key]), torch_out, str(EDGES[index]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", [i for i, v in enumerate(VARIANTS)
                                   if v["grad_scale"] == 1.0 and v["beta1"] == 0.9],
                         ids=lambda i: variant_id(VARIANTS[i]))
def test_bit_identical_to_torch_fused_optimizer_on_many_tensors(torch_out, dtype, index):
    # torch.optim.Adam/AdamW(fused=True) from zero state: each tensor has its own tail
    case = CASES[("optimizer", dtype, index, 0)]
    rng = np.random.default_rng(case["seed"])
    params = [rng.standard_normal(n).astype(dtype) for n in case["sizes"]]
    states = [[np.zeros_like(p), np.zeros_like(p)] + ([np.zeros_like(p)] if case["amsgrad"] else [])
              for p in params]
    for step in range(1, case["steps"] + 1):
        for p, state in zip(params, states):  # same draw order as the worker
            grad = rng.standard_normal(p.size).astype(dtype)
            fastadam.adam_step(p, grad, state[0], state[1],
                               max_exp_avg_sq=state[2] if case["amsgrad"] else None,
                               step=step, lr=case["lr"], beta1=case["beta1"],
                               beta2=case["beta2"], eps=case["eps"],
                               weight_decay=case["weight_decay"],
                               decoupled_weight_decay=case["decoupled_weight_decay"],
                               maximize=case["maximize"], numerics="torch")
    got = [a for p, state in zip(params, states) for a in [p] + state]
    assert_bits(CASE_INDEX[("optimizer", dtype, index, 0)], got, torch_out, "optimizer")


@pytest.mark.parametrize("level", _simd.available_levels())
def test_thread_count_and_simd_level_do_not_change_the_bits(restore_levels, dtype, level):
    # the torch tail belongs to the tensor, not to fastadam's chunks or vector width
    case = make_case_spec(VARIANTS[5], np.dtype(dtype).name, 300007, seed=3)
    results = []
    for threads in (1, 2, 3):
        _simd.use("baseline")
        results.append(fastadam_run(case, num_threads=threads))
        _simd.use(level)
        results.append(fastadam_run(case, num_threads=threads))
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


# --- against the float64 reference, and "exact" unchanged -----------------------------

@settings(max_examples=150, deadline=None)
@given(random_cases())
def test_torch_numerics_agree_with_float64_reference(case):
    # Each FMA rounds once where the exact order rounds twice, so test_properties's bound
    # (at most ~8 roundings of the element type per result, derived at error_bounds)
    # holds for this order too. torch has no eps_root form: those cases use the paper form.
    dtype, size, kwargs, amsgrad, exponents, step, seed = case
    kwargs.pop("eps_root", None)
    param, grad, m, v, vmax = make_case(dtype, size, amsgrad, exponents, seed)
    inputs = [None if x is None else x.copy() for x in (param, grad, m, v, vmax)]
    expected = adam_reference(*inputs, step=step, dtype=np.float64, **kwargs)
    fastadam.adam_step(param, grad, m, v, max_exp_avg_sq=vmax, step=step, numerics="torch",
                       **kwargs)
    assert_within((param, m, v, vmax), expected, error_bounds(*inputs, expected, step=step, **kwargs))


@pytest.mark.parametrize("index", range(0, len(VARIANTS), 5), ids=lambda i: variant_id(VARIANTS[i]))
def test_exact_numerics_is_the_default_and_the_fma_free_order(dtype, index):
    case = make_case_spec(VARIANTS[index], np.dtype(dtype).name, 1037, seed=index)
    exact = fastadam_run(case, numerics="exact")
    param, exp_avg, exp_avg_sq, vmax, grads = make_inputs(case)
    state = [param, exp_avg, exp_avg_sq, vmax]
    expected = state
    for step, grad in enumerate(grads, start=1):
        kwargs = dict(step=step, lr=case["lr"], beta1=case["beta1"], beta2=case["beta2"],
                      eps=case["eps"], weight_decay=case["weight_decay"],
                      decoupled_weight_decay=case["decoupled_weight_decay"],
                      maximize=case["maximize"], grad_scale=case["grad_scale"])
        expected = adam_reference(expected[0], grad, *expected[1:], **kwargs, dtype=dtype)
        fastadam.adam_step(state[0], grad, state[1], state[2], max_exp_avg_sq=state[3], **kwargs)
    for a, b, c in zip(exact, state, expected):
        if a is None:
            continue
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))  # default == "exact"
        np.testing.assert_array_equal(a.view(np.uint8), c.view(np.uint8))  # no FMA anywhere
    torch_profile = fastadam_run(case, numerics="torch")
    assert not np.array_equal(torch_profile[2], exact[2]), "the torch profile changed no bit"


# --- validation --------------------------------------------------------------------------

def buffers(n=9):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(n).astype(np.float32) for _ in range(2)] + \
        [np.full(n, 0.1, np.float32), np.full(n, 0.01, np.float32)]


@pytest.mark.parametrize("value, error", [(1, TypeError), (None, TypeError), (b"torch", TypeError),
                                          ("quick", ValueError), ("Torch", ValueError),
                                          ("", ValueError)])
def test_bad_numerics_is_rejected_naming_it_and_writes_nothing(value, error):
    param, grad, m, v = buffers()
    before = [a.copy() for a in (param, grad, m, v)]
    with pytest.raises(error, match="numerics"):
        fastadam.adam_step(param, grad, m, v, step=1, numerics=value)
    for a, b in zip((param, grad, m, v), before):
        np.testing.assert_array_equal(a, b)


def test_torch_numerics_with_eps_root_is_rejected_naming_numerics():
    param, grad, m, v = buffers()
    before = [a.copy() for a in (param, grad, m, v)]
    with pytest.raises(ValueError, match="numerics='torch'.*eps_root"):
        fastadam.adam_step(param, grad, m, v, step=1, eps_root=1e-10, numerics="torch")
    for a, b in zip((param, grad, m, v), before):
        np.testing.assert_array_equal(a, b)


def test_torch_numerics_with_eps_hat_is_the_eps_hat_form_with_torchs_fmas():
    # eps_hat only changes the per-step coefficients: it composes with the torch order
    param, grad, m, v = buffers(1037)
    fastadam.adam_step(param, grad, m, v, step=3, eps_hat=True, numerics="torch")
    assert np.all(np.isfinite(param))


def test_the_profile_is_a_field_of_the_hyperparameter_record():
    # what the engine and every front end pass: the record's numerics field
    from fastadam._validation import check_hyperparameters

    param, grad, m, v = (a.astype(np.float64) for a in buffers(31))
    a = [x.copy() for x in (param, m, v)]
    b = [x.copy() for x in (param, m, v)]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05,
              decoupled_weight_decay=False, amsgrad=False, maximize=False, eps_hat=False,
              eps_root=0.0)
    exact, torch_order = check_hyperparameters(**kw), check_hyperparameters(**kw, numerics="torch")
    assert (exact.numerics, torch_order.numerics) == ("exact", "torch")
    _kernels.adam_step(a[0], grad, a[1], a[2], None, exact, 3.0, 1.0, 1)
    _kernels.adam_step(b[0], grad, b[1], b[2], None, torch_order, 3.0, 1.0, 1)
    fastadam.adam_step(param, grad, m, v, step=3, lr=1e-2, weight_decay=0.05, numerics="torch")
    for x, y in zip(b, (param, m, v)):
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))
    assert not np.array_equal(a[2], b[2])
