"""The kernels against the NumPy reference of docs/design.md, for every option, dtype and size."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastadam

from conftest import (
    LARGE_SIZE,
    TAIL_SIZES,
    VARIANT_SUBSET,
    VARIANTS,
    make_grads,
    make_state,
    variant_id,
    variant_kwargs,
)
from reference import adam_reference

STEPS = 3


def run_fastadam(size, dtype, variant, *, num_threads, steps=STEPS, first_step=1):
    param, m, v, vmax = make_state(size, dtype, amsgrad=variant["amsgrad"])
    kwargs = variant_kwargs(variant)
    for k, grad in enumerate(make_grads(size, dtype, steps)):
        fastadam.adam_step(param, grad, m, v, max_exp_avg_sq=vmax, step=first_step + k,
                           num_threads=num_threads, **kwargs)
    return param, m, v, vmax


def run_reference(size, dtype, variant, *, compute_dtype, steps=STEPS, first_step=1):
    param, m, v, vmax = make_state(size, dtype, amsgrad=variant["amsgrad"])
    kwargs = variant_kwargs(variant)
    for k, grad in enumerate(make_grads(size, dtype, steps)):
        param, m, v, vmax = adam_reference(param, grad, m, v, vmax, step=first_step + k,
                                           dtype=compute_dtype, **kwargs)
    return param, m, v, vmax


def assert_bitwise_equal(got, expected):
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), got, expected):
        if a is None:
            assert b is None
            continue
        np.testing.assert_array_equal(a.view(np.uint8), np.asarray(b, a.dtype).view(np.uint8),
                                      err_msg=f"{name} differs bitwise")


def assert_close_to_float64(got, expected, ulps):
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), got, expected):
        if a is None:
            continue
        eps = np.finfo(a.dtype).eps
        scale = np.max(np.abs(b)) if b.size else 1.0
        np.testing.assert_allclose(a, b, rtol=ulps * eps, atol=ulps * eps * scale,
                                   err_msg=f"{name} is more than {ulps} ulps from float64")


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("size", TAIL_SIZES + [1000])
def test_bitwise_equal_to_same_dtype_reference(dtype, variant, size):
    got = run_fastadam(size, dtype, variant, num_threads=1)
    assert_bitwise_equal(got, run_reference(size, dtype, variant, compute_dtype=dtype))


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_agrees_with_float64_reference(dtype, variant):
    got = run_fastadam(1000, dtype, variant, num_threads=1)
    assert_close_to_float64(got, run_reference(1000, dtype, variant, compute_dtype=np.float64),
                            ulps=16)


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("variant", VARIANT_SUBSET, ids=variant_id)
def test_large_buffer_matches_reference(dtype, variant, num_threads):
    got = run_fastadam(LARGE_SIZE, dtype, variant, num_threads=num_threads, steps=2)
    expected = run_reference(LARGE_SIZE, dtype, variant, compute_dtype=dtype, steps=2)
    assert_bitwise_equal(got, expected)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_results_do_not_depend_on_thread_count(dtype, variant):
    size = 200_003  # several chunks, above the serial cutoff, with a ragged tail
    one = run_fastadam(size, dtype, variant, num_threads=1, steps=2)
    two = run_fastadam(size, dtype, variant, num_threads=2, steps=2)
    assert_bitwise_equal(two, one)


def test_variant_subset_covers_every_option():
    for axis in VARIANTS[0]:
        assert {v[axis] for v in VARIANT_SUBSET} == {v[axis] for v in VARIANTS}, axis


def test_late_steps_and_huge_step_numbers(dtype):
    # Bias corrections for large step counts (beta**step underflows to 0: no correction).
    variant = VARIANTS[0]
    for first_step in (1000, 2**40, 2**63 - 3):
        got = run_fastadam(64, dtype, variant, num_threads=1, first_step=first_step)
        expected = run_reference(64, dtype, variant, compute_dtype=dtype, first_step=first_step)
        assert_bitwise_equal(got, expected)


def test_paper_defaults(dtype):
    param, m, v, _ = make_state(33, dtype)
    grad = make_grads(33, dtype, 1)[0]
    expected = adam_reference(param, grad, m, v, step=1, lr=1e-3, beta1=0.9, beta2=0.999,
                              eps=1e-8, dtype=dtype)
    fastadam.adam_step(param, grad, m, v, step=1)
    assert_bitwise_equal((param, m, v, None), expected)


def test_first_step_moves_each_param_by_about_lr(dtype):
    # Kingma & Ba, section 2.1: with zero-initialised moments the first bias-corrected
    # step has magnitude ~lr in every coordinate, whatever the gradient's scale.
    param = np.zeros(100, dtype)
    grad = np.geomspace(1e-3, 1e3, 100).astype(dtype)
    m, v = np.zeros_like(param), np.zeros_like(param)
    fastadam.adam_step(param, grad, m, v, step=1, lr=0.01)
    np.testing.assert_allclose(param, -0.01, rtol=1e-3)


def test_lr_zero_leaves_params_unchanged(dtype):
    param, m, v, _ = make_state(100, dtype)
    before = param.copy()
    fastadam.adam_step(param, make_grads(100, dtype, 1)[0], m, v, step=1, lr=0.0)
    np.testing.assert_array_equal(param, before)


def test_grad_is_not_modified(dtype):
    param, m, v, vmax = make_state(1000, dtype, amsgrad=True)
    grad = make_grads(1000, dtype, 1)[0]
    before = grad.copy()
    fastadam.adam_step(param, grad, m, v, max_exp_avg_sq=vmax, step=1, grad_scale=8.0,
                       maximize=True, weight_decay=0.1)
    np.testing.assert_array_equal(grad, before)


def test_empty_buffers_are_a_no_op(dtype):
    empty = [np.empty(0, dtype) for _ in range(4)]
    assert fastadam.adam_step(*empty, step=1) is None


def test_nd_arrays_update_elementwise(dtype):
    param, m, v, _ = make_state(24, dtype)
    grad = make_grads(24, dtype, 1)[0]
    expected = adam_reference(param, grad, m, v, step=1, dtype=dtype)
    p3, m3, v3 = param.reshape(2, 3, 4), m.reshape(4, 6), v.reshape(24, 1)
    fastadam.adam_step(p3, grad.reshape(3, 8), m3, v3, step=1)
    assert_bitwise_equal((p3.ravel(), m3.ravel(), v3.ravel(), None), expected)


# --- property test: random hyperparameters and options --------------------------------

@st.composite
def adam_cases(draw):
    kwargs = {
        "lr": draw(st.floats(0.0, 1.0)),
        "beta1": draw(st.floats(0.0, 0.99)),
        "beta2": draw(st.floats(0.0, 0.9999)),
        "eps": draw(st.floats(1e-12, 1e-3)),
        "weight_decay": draw(st.sampled_from([0.0, draw(st.floats(0.0, 0.5))])),
        "decoupled_weight_decay": draw(st.booleans()),
        "maximize": draw(st.booleans()),
        "grad_scale": draw(st.sampled_from([1.0, draw(st.floats(1e-2, 1e4))])),
    }
    form = draw(st.sampled_from(["default", "eps_hat", "eps_root"]))
    if form == "eps_hat":
        kwargs["eps_hat"] = True
    elif form == "eps_root":
        kwargs["eps_root"] = draw(st.floats(1e-16, 1e-4))
    size = draw(st.integers(0, 300))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    step = draw(st.integers(1, 10**6))
    amsgrad = draw(st.booleans())
    return size, dtype, step, amsgrad, kwargs


@settings(max_examples=300, deadline=None)
@given(adam_cases())
def test_random_hyperparameters_match_reference_bitwise(case):
    size, dtype, step, amsgrad, kwargs = case
    param, m, v, vmax = make_state(size, dtype, amsgrad=amsgrad, seed=step)
    grad = make_grads(size, dtype, 1, seed=step + 1)[0]
    expected = adam_reference(param, grad, m, v, vmax, step=step, dtype=dtype, **kwargs)
    fastadam.adam_step(param, grad, m, v, max_exp_avg_sq=vmax, step=step, **kwargs)
    assert_bitwise_equal((param, m, v, vmax), expected)
