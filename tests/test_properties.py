"""Property tests: random sizes, dtypes, flags and hyperparameters, extremes included.

Three kinds of evidence (RELIABILITY.md lists which test proves what):

* Against the float64 reference (tests/reference.py) within an error bound derived
  from the operations, for random cases whose values stay in the element type's normal
  range (the bound is explained at ``error_bounds``).
* Exact properties that hold bit for bit: lr=0 leaves the parameter unchanged,
  beta1=0 makes exp_avg the gradient.
* Where float32 cannot represent the float64 result (overflow to Inf, subnormals, 0/0
  with eps=0) or the input is not finite (NaN/Inf gradients): the docs/design.md formula in
  the element type (the same-dtype reference), and torch.optim.Adam(fused=True)'s kernel,
  compared bitwise (NaN payloads aside).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastadam

from conftest import default_capability_mark
from reference import adam_reference

DTYPES = [np.float32, np.float64]
# The beta2 closest to 1 whose 1 - beta2 is still exact in the element type: float32's
# spacing below 1 is 2**-24; in float64, 1 - 1e-12 (1 - beta2 is then 1e-12 to ~1e-4).
BETA2_NEAR_ONE = {np.float32: 1.0 - 2.0**-24, np.float64: 1.0 - 1e-12}
# Decimal exponents of the magnitudes drawn for params, grads and moments: in float32,
# g * g * (1 - beta2) for |g| >= 1e-7 and 1 - beta2 >= 2**-24 stays above the smallest
# normal float32 (1.2e-38) and below the largest (3.4e38), so every intermediate is a
# normal number and the relative error bound below holds. Outside this range, see the
# extreme-value tests further down.
EXPONENTS = {np.float32: (-7, 7), np.float64: (-60, 60)}
# Operations between an input and a result: at most ~8 roundings (grad_scale, L2 decay,
# lerp, the sqrt, the divisions, the final add), each at most half an ulp, plus the
# per-step constants cast once from double to the element type. 8 ulps of the element
# type covers them with room to spare; a wrong operation order or a missing term shows
# as errors of order 1, not ulps.
ULPS = 8


def values(rng, size, dtype, exponent, zeros=True):
    """Random magnitudes 10**exponent * [0.5, 2), random signs, some exact zeros."""
    x = rng.uniform(0.5, 2.0, size) * 10.0**exponent * rng.choice([-1.0, 1.0], size)
    if zeros:
        x[rng.random(size) < 0.1] = 0.0
    return x.astype(dtype)


@st.composite
def random_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    low, high = EXPONENTS[dtype]
    size = draw(st.integers(0, 70))
    kwargs = {
        "lr": draw(st.sampled_from([0.0, 1e-3, draw(st.floats(0.0, 1.0))])),
        "beta1": draw(st.sampled_from([0.0, 0.9, draw(st.floats(0.0, 0.999))])),
        "beta2": draw(st.sampled_from([0.0, 0.999, BETA2_NEAR_ONE[dtype],
                                       draw(st.floats(0.0, 0.9999))])),
        "eps": draw(st.sampled_from([1e-8, draw(st.floats(1e-10, 1e-2))])),
        "weight_decay": draw(st.sampled_from([0.0, draw(st.floats(0.0, 0.5))])),
        "decoupled_weight_decay": draw(st.booleans()),
        "maximize": draw(st.booleans()),
        "grad_scale": draw(st.sampled_from([1.0, 65536.0, draw(st.floats(1e-3, 1e4))])),
    }
    form = draw(st.sampled_from(["default", "eps_hat", "eps_root"]))
    if form == "eps_hat":
        kwargs["eps_hat"] = True
    elif form == "eps_root":
        kwargs["eps_root"] = draw(st.floats(1e-16, 1e-4))
    amsgrad = draw(st.booleans())
    exponents = [draw(st.integers(low, high)) for _ in range(3)]  # param, grad, moments
    step = draw(st.sampled_from([1, 2, draw(st.integers(1, 10**6))]))
    seed = draw(st.integers(0, 2**32 - 1))
    return dtype, size, kwargs, amsgrad, exponents, step, seed


def make_case(dtype, size, amsgrad, exponents, seed):
    rng = np.random.default_rng(seed)
    p_exp, g_exp, m_exp = exponents
    param = values(rng, size, dtype, p_exp)
    grad = values(rng, size, dtype, g_exp)
    m = values(rng, size, dtype, m_exp)
    v = (values(rng, size, np.float64, m_exp) ** 2).astype(dtype)  # v >= 0, as m * m
    vmax = (v * rng.uniform(0.5, 1.5, size)).astype(dtype) if amsgrad else None
    return param, grad, m, v, vmax


def error_bounds(param, grad, m, v, vmax, expected, *, step, lr, beta1, beta2, eps,
                 weight_decay=0.0, decoupled_weight_decay=False, grad_scale=1.0,
                 eps_hat=False, eps_root=0.0, maximize=False):
    """Per-element bounds of |float32/64 result - float64 result| (arrays, in float64).

    u is ULPS units of roundoff of the element type. The effective gradient g/scale + wd*p
    can cancel, so its error is u times the magnitudes |g|/scale + wd*|p| (g_mag). m = m +
    w*(g - m) can cancel too (and 1 - w, with w cast to the element type, loses relative
    precision when beta1 is small): its error is u * (|m| + g_mag). v = beta2*v +
    (1-beta2)*g*g adds non-negative terms: u * v plus the gradient's error carried
    through g*g, u * 2(1-beta2) g_mag^2, plus the cast of a beta2 that is subnormal in the
    element type (an absolute error of the subnormal spacing, times |v|). The denominator's error follows from v's through
    the square root (sqrt(a + d) - sqrt(a) <= min(d / sqrt(a), sqrt(d))); the update's
    error is m's error over the denominator plus the update times the denominator's
    relative error; the parameter adds its own rounding (relative to |p| and the update).
    """
    u = ULPS * np.finfo(param.dtype).eps
    p0, g0, m0, v0 = (np.abs(x.astype(np.float64)) for x in (param, grad, m, v))
    g_mag = g0 / grad_scale + (0.0 if decoupled_weight_decay else weight_decay * p0)
    p_new, m_new, v_new, vmax_new = (None if x is None else np.abs(x) for x in expected)
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    v_used = v_new if vmax_new is None else vmax_new
    if eps_root > 0.0:
        denominator = np.sqrt(v_used / bc2 + eps_root) + eps
    elif eps_hat:
        denominator = (np.sqrt(v_used) + eps) / np.sqrt(bc2)
    else:
        denominator = np.sqrt(v_used) / np.sqrt(bc2) + eps
    # Results, the step coefficient cast to the element type and the update's numerator
    # (s * m, before the division) are also rounded to its subnormal spacing (a tiny lr
    # can make them subnormal, or 0, in float32): an absolute floor, carried through the
    # division for the numerator.
    floor = np.finfo(param.dtype).smallest_subnormal
    m_error = u * (m0 + g_mag) + floor
    # beta2 cast to the element type is off by up to half the subnormal spacing when it
    # is itself subnormal there (beta2=4e-43 in float32: 0.2% off), an error of v's size
    v_error = u * (v_new + 2.0 * (1.0 - beta2) * g_mag**2) + floor * (1.0 + v0)
    vmax_error = None if vmax is None else u * vmax_new + v_error
    used_error = v_error if vmax is None else vmax_error
    with np.errstate(divide="ignore", invalid="ignore"):
        sqrt_error = np.minimum(np.where(v_used > 0, used_error / np.sqrt(v_used), np.inf),
                                np.sqrt(used_error))
    denominator_error = sqrt_error / np.sqrt(bc2) + u * denominator
    s = lr / bc1
    update = s * m_new / denominator
    near = np.maximum(denominator - denominator_error, np.finfo(np.float64).tiny)
    p_error = (u * (p0 + p_new + update) + s * m_error / denominator
               + s * (m_new + m_error) * denominator_error / (denominator * near)
               + floor * (1.0 + (2.0 + m_new) / (denominator * np.sqrt(bc2))))
    return p_error, m_error, v_error, vmax_error


def assert_within(got, expected, bounds):
    for name, a, b, bound in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
                                 got, expected, bounds):
        if a is None:
            continue
        error = np.abs(a.astype(np.float64) - b)
        worst = np.argmax(error - bound) if a.size else 0
        assert np.all(error <= bound), (
            f"{name}[{worst}]: got {a[worst]!r}, float64 {b[worst]!r}, bound {bound[worst]!r}")


@settings(max_examples=150, deadline=None)
@given(random_cases())
def test_random_cases_agree_with_float64_reference(case):
    dtype, size, kwargs, amsgrad, exponents, step, seed = case
    param, grad, m, v, vmax = make_case(dtype, size, amsgrad, exponents, seed)
    inputs = [None if x is None else x.copy() for x in (param, grad, m, v, vmax)]
    expected = adam_reference(*inputs, step=step, dtype=np.float64, **kwargs)
    fastadam.adam_step(param, grad, m, v, max_exp_avg_sq=vmax, step=step, **kwargs)
    assert_within((param, m, v, vmax), expected, error_bounds(*inputs, expected, step=step, **kwargs))


@settings(max_examples=40, deadline=None)
@given(random_cases())
def test_multi_step_optimizer_agrees_with_float64_reference(case):
    # Three steps of fastadam.Adam (the optimizer path, not adam_step): each step's
    # result is compared with the float64 reference applied to the previous step's
    # float result, so the bound stays a one-step bound.
    dtype, size, kwargs, amsgrad, exponents, _, seed = case
    param, _, _, _, _ = make_case(dtype, size, amsgrad, exponents, seed)
    opt = fastadam.Adam([param], lr=kwargs["lr"], betas=(kwargs["beta1"], kwargs["beta2"]),
                        eps=kwargs["eps"], weight_decay=kwargs["weight_decay"],
                        amsgrad=amsgrad, maximize=kwargs["maximize"],
                        eps_hat=kwargs.get("eps_hat", False), eps_root=kwargs.get("eps_root", 0.0),
                        decoupled_weight_decay=kwargs["decoupled_weight_decay"])
    rng = np.random.default_rng(seed + 1)
    for step in (1, 2, 3):
        state = opt.state[0]
        grad = values(rng, size, dtype, exponents[1])
        vmax = state.get("max_exp_avg_sq", np.zeros_like(param)) if amsgrad else None
        before = [param.copy(), grad.copy(), state["exp_avg"].copy(), state["exp_avg_sq"].copy(),
                  None if vmax is None else vmax.copy()]
        expected = adam_reference(*before, step=step, dtype=np.float64, **kwargs)
        opt.step([grad], grad_scale=kwargs["grad_scale"])
        state = opt.state[0]  # AMSGrad's state is allocated by the first step
        got = (param, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"))
        assert_within(got, expected, error_bounds(*before, expected, step=step, **kwargs))


# --- exact properties ----------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(random_cases())
def test_lr_zero_leaves_param_bit_identical_but_moments_update(case):
    dtype, size, kwargs, amsgrad, exponents, step, seed = case
    kwargs["lr"] = 0.0
    param, grad, m, v, vmax = make_case(dtype, size, amsgrad, exponents, seed)
    before = param.copy()
    expected = adam_reference(param, grad, m, v, vmax, step=step, dtype=dtype, **kwargs)
    fastadam.adam_step(param, grad, m, v, max_exp_avg_sq=vmax, step=step, **kwargs)
    np.testing.assert_array_equal(param.view(np.uint8), before.view(np.uint8))
    np.testing.assert_array_equal(m, expected[1])  # the moments still take the gradient in
    np.testing.assert_array_equal(v, expected[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("maximize", [False, True])
def test_beta1_zero_makes_exp_avg_the_gradient(dtype, maximize):
    rng = np.random.default_rng(3)
    param, grad, m, v, _ = make_case(dtype, 1000, False, EXPONENTS[dtype][:1] * 3, 3)
    grad = values(rng, 1000, dtype, 0)
    grad[:4] = [np.finfo(dtype).max, np.finfo(dtype).smallest_subnormal, -0.0, 0.0]
    fastadam.adam_step(param, grad, m, v, step=5, beta1=0.0, maximize=maximize)
    # w = 1: m = g - (g - m) * 0 is g exactly (a zero comes out as +0 whatever its sign)
    np.testing.assert_array_equal(m, -grad if maximize else grad)
    nonzero = grad != 0
    np.testing.assert_array_equal(m[nonzero].view(np.uint8),
                                  (-grad if maximize else grad)[nonzero].view(np.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_beta2_near_one_first_step_moves_each_param_by_lr(dtype):
    # Kingma & Ba sec. 3: the bias correction makes the first step sign(g) * lr even when
    # 1 - beta2 is as small as the element type allows (bc2 = 1 - beta2 then).
    rng = np.random.default_rng(4)
    param = values(rng, 500, dtype, 0, zeros=False)
    grad = values(rng, 500, dtype, 0, zeros=False)
    start = param.astype(np.float64)
    m, v = np.zeros_like(param), np.zeros_like(param)
    fastadam.adam_step(param, grad, m, v, step=1, lr=1e-2, beta2=BETA2_NEAR_ONE[dtype], eps=0.0)
    np.testing.assert_allclose(param - start, -1e-2 * np.sign(grad),
                               rtol=ULPS * np.finfo(dtype).eps, atol=ULPS * np.finfo(dtype).eps)


# --- beyond the element type's normal range, and non-finite gradients -------------------

try:
    import torch
except ImportError:  # a test-only dependency: the tests above still run without it
    torch = None
needs_default_capability = default_capability_mark(torch)

TORCH_FLAGS = [
    {},
    {"amsgrad": True},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
    {"maximize": True},
]


def torch_fused_step(param, grad, m, v, vmax, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.0, decoupled_weight_decay=False, maximize=False):
    """One step of torch's fused CPU Adam/AdamW kernel on copies; returns (p, m, v, vmax)."""
    tensors = [torch.from_numpy(x.copy()) for x in (param, grad, m, v)]
    vmaxes = [] if vmax is None else [torch.from_numpy(vmax.copy())]
    kernel = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
    kernel([tensors[0]], [tensors[1]], [tensors[2]], [tensors[3]], vmaxes,
           [torch.tensor(float(step))], lr=lr, beta1=beta1, beta2=beta2,
           weight_decay=weight_decay, eps=eps, amsgrad=vmax is not None, maximize=maximize)
    return (tensors[0].numpy(), tensors[2].numpy(), tensors[3].numpy(),
            vmaxes[0].numpy() if vmaxes else None)


def fastadam_step(param, grad, m, v, vmax, **kwargs):
    copies = [None if x is None else x.copy() for x in (param, grad, m, v, vmax)]
    fastadam.adam_step(copies[0], copies[1], copies[2], copies[3], max_exp_avg_sq=copies[4], **kwargs)
    return copies[0], copies[2], copies[3], copies[4]


def formula_in_dtype(*args, **kwargs):
    """The same-dtype reference, where overflow and 0/0 are the expected outcome."""
    with np.errstate(all="ignore"):
        return adam_reference(*args, dtype=args[0].dtype, **kwargs)


def assert_same_bits_nan_aside(got, expected):
    """Equal bit for bit, except that any NaN matches any NaN (payloads and signs of NaN
    are not specified by IEEE 754 arithmetic, nor by either library)."""
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), got, expected):
        if a is None:
            assert b is None
            continue
        b = np.asarray(b, a.dtype)
        nan = np.isnan(a)
        np.testing.assert_array_equal(nan, np.isnan(b), err_msg=f"{name}: NaN positions differ")
        np.testing.assert_array_equal(a[~nan].view(np.uint8), b[~nan].view(np.uint8),
                                      err_msg=f"{name} differs bitwise")


def extreme_case(dtype, grad_values, *, size=64, amsgrad=False, seed=5):
    """Ordinary params and moments with ``grad_values`` placed at the front of the grad."""
    rng = np.random.default_rng(seed)
    param, grad, m, v, vmax = make_case(dtype, size, amsgrad, (0, 0, -1), seed)
    grad[:len(grad_values)] = grad_values
    rng.shuffle(grad)
    return param, grad, m, v, vmax


def special_values(dtype):
    info = np.finfo(dtype)
    return {
        "huge": [1e30, -1e30, info.max, -info.max, info.max / 2, np.sqrt(info.max)],
        "tiny": [info.smallest_subnormal, -info.smallest_subnormal, info.smallest_normal,
                 info.smallest_normal / 3, 1e-30, 1e-40 if dtype == np.float32 else 1e-310],
        "nonfinite": [np.nan, np.inf, -np.inf, np.nan, 1.0, -np.inf],
    }


@needs_default_capability
@pytest.mark.parametrize("flags", TORCH_FLAGS, ids=lambda f: "-".join(f) or "plain")
@pytest.mark.parametrize("kind", ["huge", "tiny", "nonfinite"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_and_nonfinite_grads_follow_the_formula_and_torch_fused(dtype, kind, flags):
    # Huge grads overflow g*g to Inf in float32: v = Inf, the step is (m * s) / Inf = 0 or
    # NaN where m is Inf too. Subnormal grads round in the element type. NaN and Inf
    # propagate through m, v and the param. In every case fastadam computes docs/design.md's
    # formula in the element type (the same-dtype reference), which is torch's fused
    # kernel's arithmetic: both agree bit for bit, NaN positions included.
    # One documented exception: where the gradient is NaN, torch's vectorized body
    # computes max_exp_avg_sq = maximum(vmax, NaN) = NaN while its scalar tail (std::max)
    # and docs/design.md's "vmax = v if vmax < v else vmax" keep the old vmax. The param is NaN
    # there either way (m is NaN), in both libraries.
    param, grad, m, v, vmax = extreme_case(dtype, special_values(dtype)[kind],
                                           amsgrad=flags.get("amsgrad", False))
    kwargs = {k: v for k, v in flags.items() if k != "amsgrad"}
    got = fastadam_step(param, grad, m, v, vmax, step=3, lr=1e-2, **kwargs)
    assert_same_bits_nan_aside(got, formula_in_dtype(param, grad, m, v, vmax, step=3, lr=1e-2, **kwargs))
    expected = torch_fused_step(param, grad, m, v, vmax, step=3, lr=1e-2, **kwargs)
    if vmax is not None:
        assert np.isnan(got[0][np.isnan(grad)]).all() and np.isnan(expected[0][np.isnan(grad)]).all()
        expected[3][np.isnan(grad)] = got[3][np.isnan(grad)]  # the exception above
    assert_same_bits_nan_aside(got, expected)


@needs_default_capability
def test_amsgrad_with_a_nan_second_moment_but_finite_gradients_is_as_documented():
    # Issue 19, item 10 (RELIABILITY.md's NaN paragraph claimed the param is NaN in both
    # libraries; here it is not). AMSGrad, beta2=0, float32: at step 1, g*g overflows, so
    # v = vmax = Inf and the step is m / Inf = 0; at step 2, v = Inf * 0 + g*g = NaN with a
    # finite gradient, and m is finite. docs/design.md's "vmax = v if vmax < v else vmax" keeps
    # vmax = Inf: the step is 0 again and the param stays 1.0 (and stays put while vmax is
    # Inf). torch's fused kernel does that in its scalar tail (std::max), but its
    # vectorized body stores vmax = maximum(Inf, NaN) = NaN and the param becomes NaN.
    size = 67  # torch's vector body and a scalar tail
    param, m, v, vmax = (np.full(size, 1.0, np.float32), np.zeros(size, np.float32),
                         np.zeros(size, np.float32), np.zeros(size, np.float32))
    ours, theirs = (param, m, v, vmax), (param, m, v, vmax)
    for step, g in ((1, 1e20), (2, 1.0)):
        grad = np.full(size, g, np.float32)
        expected = formula_in_dtype(*ours[:1], grad, *ours[1:], step=step, lr=0.1, beta2=0.0)
        ours = fastadam_step(ours[0], grad, ours[1], ours[2], ours[3], step=step, lr=0.1, beta2=0.0)
        assert_same_bits_nan_aside(ours, expected)  # docs/design.md's arithmetic, bit for bit
        theirs = torch_fused_step(theirs[0], grad, theirs[1], theirs[2], theirs[3], step=step,
                                  lr=0.1, beta2=0.0)
    p, m, v, vmax = ours
    assert np.isnan(v).all() and np.isfinite(m).all()
    assert (p == 1.0).all() and np.isposinf(vmax).all()
    body = np.isnan(theirs[3])  # torch: NaN vmax and NaN param in the vector body only
    assert body.any() and not body.all()
    np.testing.assert_array_equal(np.isnan(theirs[0]), body)
    assert (theirs[0][~body] == 1.0).all() and np.isposinf(theirs[3][~body]).all()


@needs_default_capability
@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_and_huge_params_follow_the_formula_and_torch_fused(dtype):
    info = np.finfo(dtype)
    param, grad, m, v, _ = extreme_case(dtype, [])
    param[:8] = [info.smallest_subnormal, -info.smallest_subnormal, info.smallest_normal / 5,
                 0.0, -0.0, info.max, -info.max, 1e30]
    m[:3] = [info.smallest_subnormal, info.max, -info.max]
    v[:3] = [info.smallest_subnormal, info.max, 0.0]
    for kwargs in ({}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True}):
        got = fastadam_step(param, grad, m, v, None, step=2, lr=1e-3, **kwargs)
        assert_same_bits_nan_aside(got, formula_in_dtype(param, grad, m, v, None, step=2, lr=1e-3, **kwargs))
        assert_same_bits_nan_aside(got, torch_fused_step(param, grad, m, v, None, step=2,
                                                         lr=1e-3, **kwargs))


@needs_default_capability
@pytest.mark.parametrize("dtype", DTYPES)
def test_eps_zero_with_zero_grads_is_nan_exactly_like_torch_fused(dtype):
    # eps=0 is allowed (docs/design.md rejects only eps < 0). With a zero gradient and zero
    # moments the update is (-s * 0) / (sqrt(0) / r2 + 0) = 0/0 = NaN: the param becomes
    # NaN, as in torch's fused kernel. Where the gradient or v is nonzero it is finite.
    rng = np.random.default_rng(6)
    param = values(rng, 100, dtype, 0)
    grad = values(rng, 100, dtype, 0)
    grad[::3] = 0.0
    m, v = np.zeros_like(param), np.zeros_like(param)
    got = fastadam_step(param, grad, m, v, None, step=1, eps=0.0, lr=1e-3)
    np.testing.assert_array_equal(np.isnan(got[0]), grad == 0)
    assert_same_bits_nan_aside(got, formula_in_dtype(param, grad, m, v, step=1, eps=0.0, lr=1e-3))
    assert_same_bits_nan_aside(got, torch_fused_step(param, grad, m, v, None, step=1, eps=0.0,
                                                     lr=1e-3))


@st.composite
def nonfinite_steps(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shapes = draw(st.lists(st.integers(1, 3000), min_size=1, max_size=4))
    tensor = draw(st.integers(0, len(shapes) - 1))
    position = draw(st.integers(0, shapes[tensor] - 1))
    bad = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return dtype, shapes, tensor, position, bad, draw(st.booleans())


@settings(max_examples=60, deadline=None)
@given(nonfinite_steps())
def test_skip_if_nonfinite_leaves_every_byte_and_counts(case):
    dtype, shapes, tensor, position, bad, amsgrad = case
    rng = np.random.default_rng(position)
    params = [values(rng, n, dtype, 0) for n in shapes]
    groups = [{"params": params[:1]}] + [{"params": params[1:], "amsgrad": amsgrad}] * (len(params) > 1)
    opt = fastadam.Adam(groups)
    opt.step([values(rng, n, dtype, 0) for n in shapes])
    grads = [values(rng, n, dtype, 0) for n in shapes]
    grads[tensor][position] = bad

    def snapshot():
        state = opt.state_dict()["state"]
        return ([p.tobytes() for p in params],
                [(e["step"], [e[k].tobytes() for k in sorted(e) if k != "step"]) for e in state.values()])

    before = snapshot()
    assert opt.step(grads, skip_if_nonfinite=True) is False
    assert snapshot() == before and opt.skipped_steps == 1
    grads[tensor][position] = np.finfo(dtype).max  # finite, however large: applied
    assert opt.step(grads, skip_if_nonfinite=True) is True
    assert opt.skipped_steps == 1 and opt.state[0]["step"] == 2
