"""numerics="fast": the paper form with one division per element instead of two.

The exact order computes ``(step_coef * m) / (sqrt(v) / sqrt(bc2) + eps)``: a square root
and two divisions per element, which bound the update in cache (2^17-2^20 elements) by
the divider rather than by memory. "fast" multiplies by ``1 / sqrt(bc2)`` (rounded once,
in double) instead of dividing, as DeepSpeed's CPU Adam does. It is tested here against
the float64 reference with test_properties' derived bound, and for its other promises:
bit-identical for every thread count and SIMD level, not an eps_root form.
"""

import numpy as np
import pytest
from hypothesis import given, settings

import fastadam
from fastadam import _simd

from reference import adam_reference
from test_properties import assert_within, error_bounds, make_case, random_cases


@settings(max_examples=200, deadline=None)
@given(random_cases())
def test_fast_numerics_agree_with_float64_reference(case):
    # One multiplication (and the rounding of 1/sqrt(bc2)) replaces one division: the
    # count of roundings per result stays within test_properties' bound (~8 of the
    # element type). There is no fast eps_root form: those cases use the paper form.
    dtype, size, kwargs, amsgrad, exponents, step, seed = case
    kwargs.pop("eps_root", None)
    param, grad, m, v, vmax = make_case(dtype, size, amsgrad, exponents, seed)
    inputs = [None if x is None else x.copy() for x in (param, grad, m, v, vmax)]
    expected = adam_reference(*inputs, step=step, dtype=np.float64, **kwargs)
    fastadam.adam_step(param, grad, m, v, max_exp_avg_sq=vmax, step=step, numerics="fast",
                       **kwargs)
    assert_within((param, m, v, vmax), expected,
                  error_bounds(*inputs, expected, step=step, **kwargs))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_fast_step_is_within_two_ulps_of_the_exact_update(dtype):
    # The documented bound: |p_fast - p_exact| <= 2 ulp(|update|) + ulp(|p|) per step
    # (the update's denominator is rounded once more or less; adding it to p rounds).
    rng = np.random.default_rng(0)
    n = 100_003
    p0, g = (rng.standard_normal(n).astype(dtype) for _ in range(2))
    m0 = rng.standard_normal(n).astype(dtype) * dtype(0.1)
    v0 = np.abs(rng.standard_normal(n).astype(dtype)) * dtype(0.01)
    runs = {}
    for numerics in ("exact", "fast"):
        p, m, v = p0.copy(), m0.copy(), v0.copy()
        fastadam.adam_step(p, g, m, v, step=7, lr=1e-2, numerics=numerics)
        runs[numerics] = p
    update = np.abs(runs["exact"].astype(np.float64) - p0)
    diff = np.abs(runs["fast"].astype(np.float64) - runs["exact"])
    bound = 2 * np.spacing(update.astype(dtype)) + np.spacing(np.abs(runs["exact"]))
    assert np.all(diff <= bound)
    assert np.any(diff > 0)  # a different order, not the same one


@pytest.mark.parametrize("level", _simd.available_levels())
def test_fast_bits_do_not_depend_on_threads_or_simd_level(restore_levels, level):
    rng = np.random.default_rng(1)
    values = [rng.standard_normal(300_007).astype(np.float32) for _ in range(2)]
    results = []
    for threads in (1, 2):
        for chosen in ("baseline", level):
            _simd.use(chosen)
            p, m, v = values[0].copy(), np.zeros_like(values[0]), np.zeros_like(values[0])
            fastadam.adam_step(p, values[1], m, v, step=3, numerics="fast", num_threads=threads)
            results.append(p)
    for got in results[1:]:
        assert got.tobytes() == results[0].tobytes()


def test_fast_has_no_eps_root_form_and_bad_names_are_refused():
    p, g, m, v = (np.ones(4, np.float32) for _ in range(4))
    before = [a.copy() for a in (p, m, v)]
    with pytest.raises(ValueError, match="numerics='fast' has no eps_root form"):
        fastadam.adam_step(p, g, m, v, step=1, numerics="fast", eps_root=1e-8)
    with pytest.raises(ValueError, match=r"numerics must be one of \('exact', 'torch', 'fast'\)"):
        fastadam.adam_step(p, g, m, v, step=1, numerics="quick")
    for a, b in zip((p, m, v), before):
        assert a.tobytes() == b.tobytes()


def test_optimizers_take_numerics_per_group():
    rng = np.random.default_rng(2)
    params = [rng.standard_normal(1000).astype(np.float32) for _ in range(2)]
    grads = [rng.standard_normal(1000).astype(np.float32) for _ in range(2)]
    mixed = [p.copy() for p in params]
    opt = fastadam.Adam([{"params": [mixed[0]], "numerics": "fast"}, {"params": [mixed[1]]}],
                        lr=0.01)
    opt.step(grads)
    refs = [p.copy() for p in params]
    for ref, grad, numerics in zip(refs, grads, ("fast", "exact")):
        fastadam.adam_step(ref, grad, np.zeros_like(ref), np.zeros_like(ref), step=1, lr=0.01,
                           numerics=numerics)
    for got, want in zip(mixed, refs):
        assert got.tobytes() == want.tobytes()
    assert opt.state_dict()["param_groups"][0]["numerics"] == "fast"
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['numerics'\] must be one of"):
        opt.param_groups[1]["numerics"] = "quick"
        opt.step(grads)
