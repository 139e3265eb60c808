"""bfloat16 and float16 storage (issue 20): pure 16-bit updates, master weights and
stochastic rounding, through adam_step, fastadam.Adam and checkpoints.

The reference of a 16-bit update is the float32 update of the widened values
(tests/reference.py in float32, bit-exact for the kernels' float32 math), rounded to the
storage type to nearest even by NumPy/ml_dtypes; it is also checked against the float64
reference of the formulas, within the storage type's rounding."""

import importlib

import numpy as np
import pytest

import fastadam
from fastadam import _simd
from fastadam._memory import zeros_at

from conftest import TAIL_SIZES, VARIANT_SUBSET, make_state, variant_id, variant_kwargs
from reference import adam_reference

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
LOW = [BF16, F16]
SIZES = TAIL_SIZES + [1000, _simd.SMALL_TENSOR_ELEMENTS + 77]


def bits(a):
    return None if a is None else np.asarray(a).view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def assert_same_bits(actual, expected):
    np.testing.assert_array_equal(bits(actual), bits(expected))


def low_state(size, dtype, amsgrad, seed=0):
    p, m, v, vmax = make_state(size, np.float32, amsgrad=amsgrad, seed=seed)
    return [None if a is None else a.astype(dtype) for a in (p, m, v, vmax)]


def reference_16bit(p, g, m, v, vmax, dtype, **kwargs):
    """The float32 update of the widened values, rounded to ``dtype``."""
    out = adam_reference(*(None if a is None else a.astype(np.float32) for a in (p, g, m, v)),
                         None if vmax is None else vmax.astype(np.float32),
                         dtype=np.float32, **kwargs)
    return [None if a is None else a.astype(dtype) for a in out]


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("variant", VARIANT_SUBSET, ids=variant_id)
def test_pure_16bit_update_is_float32_math_rounded_to_nearest_even(dtype, size, variant):
    amsgrad = variant["amsgrad"]
    kwargs = variant_kwargs(variant)
    p, m, v, vmax = low_state(size, dtype, amsgrad)
    rng = np.random.default_rng(5)
    for step in (1, 2, 3):
        g = rng.standard_normal(size).astype(dtype)
        expected = reference_16bit(p, g, m, v, vmax, dtype, step=step, **kwargs)
        fastadam.adam_step(p, g, m, v, max_exp_avg_sq=vmax, step=step, **kwargs)
        for actual, want in zip((p, m, v, vmax), expected):
            if actual is not None:
                assert_same_bits(actual, want)


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
def test_pure_16bit_update_is_within_rounding_of_the_float64_formulas(dtype):
    size = 5000
    p, m, v, _ = low_state(size, dtype, False)
    g = np.random.default_rng(3).standard_normal(size).astype(dtype)
    exact = adam_reference(p.astype(np.float64), g.astype(np.float64), m.astype(np.float64),
                           v.astype(np.float64), step=4, lr=1e-2)
    fastadam.adam_step(p, g, m, v, step=4, lr=1e-2)
    spacing = np.spacing(np.abs(exact[0]).astype(np.float32)) * (2**16 if dtype == BF16 else 2**13)
    # at most the storage type's rounding (half a spacing) plus float32's own error
    assert np.all(np.abs(p.astype(np.float64) - exact[0]) <= 0.5 * spacing + 1e-6 * np.abs(exact[0]))


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("grad_type", ["model", "float32"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_master_weights_equal_a_float32_step_then_a_rounded_copy(dtype, grad_type, amsgrad):
    size = _simd.SMALL_TENSOR_ELEMENTS + 77
    state = fastadam.adam_state(np.zeros(size, dtype), amsgrad=amsgrad, master_weights=True)
    rng = np.random.default_rng(7)
    state["master_param"][...] = rng.standard_normal(size).astype(np.float32)
    param = state["master_param"].astype(dtype)
    twin = {k: v.copy() for k, v in state.items()}
    for step in (1, 2, 3):
        grad = rng.standard_normal(size).astype(dtype)
        given = grad if grad_type == "model" else grad.astype(np.float32)
        fastadam.adam_step(param, given, state["exp_avg"], state["exp_avg_sq"], step=step,
                           max_exp_avg_sq=state.get("max_exp_avg_sq"),
                           master_param=state["master_param"], lr=1e-2, weight_decay=0.1,
                           decoupled_weight_decay=True)
        fastadam.adam_step(twin["master_param"], grad.astype(np.float32), twin["exp_avg"],
                           twin["exp_avg_sq"], max_exp_avg_sq=twin.get("max_exp_avg_sq"),
                           step=step, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)
        for key in state:
            assert_same_bits(state[key], twin[key])
        assert_same_bits(param, twin["master_param"].astype(dtype))


def test_adam_state_with_master_weights_copies_the_param():
    param = np.arange(6, dtype=np.float32).reshape(2, 3).astype(BF16)
    state = fastadam.adam_state(param, master_weights=True)
    assert state["master_param"].dtype == np.float32 and state["master_param"].shape == (2, 3)
    np.testing.assert_array_equal(state["master_param"], param.astype(np.float32))
    assert state["exp_avg"].dtype == np.float32
    with pytest.raises(TypeError, match="master_weights is for a bfloat16 or float16 param"):
        fastadam.adam_state(np.zeros(3, np.float32), master_weights=True)


def run_everywhere(dtype, **kwargs):
    """The same 16-bit update on every SIMD level and thread count: {(level, threads): param}."""
    results = {}
    for level in _simd.available_levels():
        _simd.use(level)
        for threads in (1, 2):
            p, m, v, _ = low_state(_simd.SMALL_TENSOR_ELEMENTS * 4 + 77, dtype, False)
            g = np.random.default_rng(2).standard_normal(p.size).astype(dtype)
            fastadam.adam_step(p, g, m, v, step=3, lr=1e-2, num_threads=threads, **kwargs)
            results[level, threads] = (p, m, v)
    return results


@pytest.mark.parametrize("dtype, kwargs", [
    (BF16, {}), (F16, {}), (BF16, {"stochastic_rounding": True, "seed": 11}),
    (BF16, {"numerics": "torch"}), (F16, {"numerics": "fast"}),
], ids=["bfloat16", "float16", "bfloat16-stochastic", "bfloat16-torch", "float16-fast"])
def test_16bit_results_do_not_depend_on_simd_level_or_threads(restore_levels, dtype, kwargs):
    results = list(run_everywhere(dtype, **kwargs).values())
    for other in results[1:]:
        for actual, expected in zip(other, results[0]):
            assert_same_bits(actual, expected)


def stochastic_step(seed, size=20000, step=1):
    p = np.full(size, 1.0, BF16)
    m, v = np.zeros(size, BF16), np.zeros(size, BF16)
    fastadam.adam_step(p, np.ones(size, BF16), m, v, step=step, lr=1e-4,
                       stochastic_rounding=True, seed=seed)
    return p, m, v


def test_stochastic_rounding_is_reproducible_and_unbiased():
    p, m, v = stochastic_step(seed=1)
    again, m2, v2 = stochastic_step(seed=1)
    assert_same_bits(p, again)
    other, _, _ = stochastic_step(seed=2)
    assert not np.array_equal(bits(p), bits(other))
    later, _, _ = stochastic_step(seed=1, step=2)   # a new stream each step
    assert not np.array_equal(bits(p), bits(later))
    # 1 - 1e-4 lies between the bfloat16 neighbours 1 - 2**-8 and 1: each element rounds
    # down with probability 1e-4 / 2**-8 = 0.0256; the mean keeps the float32 value
    values = p.astype(np.float64)
    assert set(np.unique(values)) == {1.0 - 2**-8, 1.0}
    exact = 1.0 - 1e-4
    standard_error = 2**-8 * np.sqrt(0.0256 * (1 - 0.0256) / values.size)
    assert abs(values.mean() - exact) < 4 * standard_error
    # the moments are rounded to nearest even (only the param is stochastic)
    assert_same_bits(m, m2)
    nearest = np.full(v.size, 1.0, BF16)
    fastadam.adam_step(nearest, np.ones(v.size, BF16), np.zeros(v.size, BF16),
                       np.zeros(v.size, BF16), step=1, lr=1e-4)
    assert np.all(nearest.astype(np.float32) == 1.0)  # nearest rounding loses the update


def test_stochastic_rounding_through_the_optimizer_is_per_tensor_and_reproducible():
    def run(seed):
        params = [np.full(3000, 1.0, BF16), np.full(3000, 1.0, BF16)]
        opt = fastadam.Adam(params, lr=1e-4, stochastic_rounding=True, seed=seed)
        for _ in range(3):
            opt.step([np.ones(3000, BF16), np.ones(3000, BF16)])
        return params
    a, b = run(5), run(5)
    for x, y in zip(a, b):
        assert_same_bits(x, y)
    assert not np.array_equal(bits(a[0]), bits(a[1]))  # each tensor has its own stream


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
def test_nonfinite_16bit_gradients_are_found(dtype):
    params = [np.ones(100, dtype)]
    opt = fastadam.Adam(params)
    grad = np.ones(100, dtype)
    grad[37] = np.inf
    before = params[0].copy()
    assert opt.step([grad], skip_if_nonfinite=True) is False
    assert_same_bits(params[0], before)
    grad[37] = np.nan
    assert opt.step([grad], skip_if_nonfinite=True) is False
    assert opt.step([np.ones(100, dtype)], skip_if_nonfinite=True) is True


@pytest.mark.parametrize("call, exc, match", [
    (lambda b: fastadam.adam_step(b["p"], np.zeros(8, np.float64), b["m"], b["v"], step=1),
     TypeError, r"^grad must have param's dtype bfloat16, got float64"),
    (lambda b: fastadam.adam_step(b["p"], b["g"], np.zeros(8, np.float32), b["v"], step=1),
     TypeError, r"^exp_avg must have param's dtype bfloat16, got float32"),
    (lambda b: fastadam.adam_step(b["p"], b["g"], b["m"], b["v"], step=1,
                                  master_param=np.zeros(8, np.float32)),
     TypeError, r"^exp_avg must be float32 with master_param"),
    (lambda b: fastadam.adam_step(np.zeros(8, np.float32), np.zeros(8, np.float32),
                                  np.zeros(8, np.float32), np.zeros(8, np.float32), step=1,
                                  master_param=np.zeros(8, np.float32)),
     TypeError, r"^master_param is for a bfloat16 or float16 param"),
    (lambda b: fastadam.adam_step(b["p"], np.zeros(8, np.float16), np.zeros(8, np.float32),
                                  np.zeros(8, np.float32), step=1,
                                  master_param=np.zeros(8, np.float32)),
     TypeError, r"^grad must have param's dtype bfloat16 or be float32, got float16"),
    (lambda b: fastadam.adam_step(b["p"], b["g"], b["m"], b["v"], step=1,
                                  master_param=np.zeros(8, np.float64)),
     TypeError, r"^master_param must be float32"),
    (lambda b: fastadam.adam_step(np.zeros(8, np.float16), np.zeros(8, np.float16),
                                  np.zeros(8, np.float16), np.zeros(8, np.float16), step=1,
                                  stochastic_rounding=True),
     ValueError, r"^stochastic_rounding is for a bfloat16 param without master_param, got a float16"),
    (lambda b: fastadam.adam_step(b["p"], b["g"], b["m"], b["v"], step=1,
                                  stochastic_rounding=True, seed=1.5),
     TypeError, r"^seed must be an int"),
    (lambda b: fastadam.adam_step(b["p"], b["g"], b["m"], b["v"], step=1,
                                  stochastic_rounding=True, seed=2**63),
     ValueError, r"^seed must fit in an int64"),
    (lambda b: fastadam.adam_step_rows(np.zeros((4, 2), BF16), np.zeros((1, 2), BF16), [0],
                                       np.zeros(8, BF16), np.zeros(8, BF16), step=1),
     TypeError, r"^grad_rows is row-sparse, which fastadam updates for float32 and float64"),
])
def test_bad_combinations_are_refused_and_change_nothing(call, exc, match):
    buffers = {"p": np.ones(8, BF16), "g": np.ones(8, BF16), "m": np.ones(8, BF16),
               "v": np.ones(8, BF16)}
    before = {k: v.copy() for k, v in buffers.items()}
    with pytest.raises(exc, match=match):
        call(buffers)
    for key in buffers:
        assert_same_bits(buffers[key], before[key])


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
def test_optimizer_with_master_weights_round_trips_through_checkpoints(tmp_path, dtype):
    rng = np.random.default_rng(0)
    shapes = [(40, 3), (7,)]

    def make():
        return [rng.standard_normal(s).astype(dtype) for s in shapes]

    params = make()
    opt = fastadam.AdamW(params, lr=1e-2, master_weights=True, amsgrad=True)
    grads = [[g for g in make()] for _ in range(4)]
    opt.step(grads[0])
    opt.step(grads[1])
    fastadam.save(opt, tmp_path / "ckpt.npz")
    resumed_params = [p.copy() for p in params]
    resumed = fastadam.AdamW(resumed_params, lr=1e-2, master_weights=True, amsgrad=True)
    fastadam.load(resumed, tmp_path / "ckpt.npz")
    for a, b in zip(opt.state, resumed.state):
        assert a.keys() == b.keys() == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq",
                                        "master_param"}
        for key in a:
            if key != "step":
                assert b[key].dtype == np.float32
                assert_same_bits(a[key], b[key])
    for g in grads[2:]:
        opt.step(g)
        resumed.step(g)
    for a, b in zip(params, resumed_params):
        assert_same_bits(a, b)


def test_pure_bfloat16_optimizer_round_trips_through_checkpoints(tmp_path):
    params = [np.linspace(-1, 1, 50).astype(BF16)]
    opt = fastadam.Adam(params, lr=1e-2)
    opt.step([np.full(50, 0.5, BF16)])
    fastadam.save(opt, tmp_path / "ckpt.npz")
    again = fastadam.Adam([params[0].copy()], lr=1e-2)
    fastadam.load(again, tmp_path / "ckpt.npz")
    assert again.state[0]["exp_avg"].dtype == BF16
    assert_same_bits(again.state[0]["exp_avg_sq"], opt.state[0]["exp_avg_sq"])


def test_master_weights_are_refused_for_float32_params_and_state_is_checked():
    with pytest.raises(TypeError, match=r"master_weights is for bfloat16 and float16 params, but "
                                        r"param_groups\[0\]\['params'\]\[1\] is float32"):
        fastadam.Adam([np.zeros(3, BF16), np.zeros(3, np.float32)], master_weights=True)
    opt = fastadam.Adam([np.zeros(3, BF16)], master_weights=True)
    state = opt.state_dict()
    state["state"][0]["master_param"] = np.zeros(3, np.float64)
    with pytest.raises(ValueError, match=r"\['master_param'\] has dtype float64, parameter 0's "
                                         r"state has float32"):
        opt.load_state_dict(state)
    plain = fastadam.Adam([np.zeros(3, BF16)])
    with pytest.raises(ValueError, match="has a 'master_param', but the optimizer keeps no master"):
        plain.load_state_dict(opt.state_dict())


def test_a_state_dict_without_master_weights_starts_the_master_from_the_param():
    source = fastadam.Adam([np.full(4, 0.5, BF16)])
    source.step([np.ones(4, BF16)])
    target_param = np.full(4, 0.25, BF16)
    target = fastadam.Adam([target_param], master_weights=True)
    saved = source.state_dict()
    saved["state"][0] = {k: (v.astype(np.float32) if k != "step" else v)
                         for k, v in saved["state"][0].items()}
    target.load_state_dict(saved)
    np.testing.assert_array_equal(target.state[0]["master_param"], np.full(4, 0.25, np.float32))
    assert target.state[0]["step"] == 1


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("make", [bytearray, lambda data: np.frombuffer(bytearray(data), np.uint16)],
                         ids=["bytearray", "uint16-bits"])
def test_raw_buffers_are_read_as_the_dtype_given(dtype, make):
    values, grad = low_state(33, dtype, False)[:2]
    expected, reference_grad = values.copy(), grad.copy()
    state = fastadam.adam_state(expected)
    fastadam.adam_step(expected, reference_grad, state["exp_avg"], state["exp_avg_sq"],
                       step=1, lr=0.1)
    p, g = make(values.tobytes()), make(grad.tobytes())
    m, v = make(bytes(2 * 33)), make(bytes(2 * 33))
    fastadam.adam_step(p, g, m, v, step=1, lr=0.1, dtype=dtype.name)
    assert bytes(p) == expected.tobytes()
    assert bytes(m) == state["exp_avg"].tobytes()


def test_raw_16bit_buffers_beside_a_float32_master():
    model = np.linspace(-1, 1, 20).astype(BF16)
    state = fastadam.adam_state(model, master_weights=True)
    raw = bytearray(model.tobytes())
    fastadam.adam_step(raw, bytearray(np.ones(20, BF16).tobytes()), state["exp_avg"],
                       state["exp_avg_sq"], master_param=state["master_param"], step=1, lr=0.1,
                       dtype="bfloat16")
    assert bytes(raw) == state["master_param"].astype(BF16).tobytes()


@pytest.mark.parametrize("dtype, buffers, exc, match", [
    ("float16", [bytearray(3)] * 4, ValueError, r"^param holds 3 bytes, not a whole number of float16"),
    ("int8", [bytearray(4)] * 4, TypeError, r"^dtype must be one of float32, float64, bfloat16 or float16"),
    (object(), [bytearray(4)] * 4, TypeError, r"^dtype must name an element type"),
])
def test_bad_dtype_arguments_are_refused(dtype, buffers, exc, match):
    buffers = [bytearray(b) for b in buffers]
    with pytest.raises(exc, match=match):
        fastadam.adam_step(*buffers, step=1, dtype=dtype)
    assert all(b == bytearray(len(b)) for b in buffers)


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
def test_every_16bit_value_survives_a_round_trip_on_every_level(restore_levels, dtype):
    """lr=0 and a zero gradient: the kernels widen every finite value of the type and
    round it back (F16C at the avx2/avx512 levels, integer sequences elsewhere)."""
    values = np.arange(65536, dtype=np.uint16).view(dtype)
    values = values[np.isfinite(values.astype(np.float32))]
    for level in _simd.available_levels():
        _simd.use(level, level)
        p = values.copy()
        zeros = np.zeros_like(p)
        fastadam.adam_step(p, zeros, zeros.copy(), zeros.copy(), step=1, lr=0.0, eps=1.0)
        np.testing.assert_array_equal(p.astype(np.float32), values.astype(np.float32))
        assert_same_bits(p[p != 0], values[values != 0])


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
def test_optimizer_with_master_weights_takes_float32_gradients_as_they_are(dtype):
    # A gradient summed or accumulated in float32 (fastadam.distributed's reduce-scatter
    # of a 16-bit model) is read without a rounding to 16 bits: as adam_step reads it.
    rng = np.random.default_rng(11)
    flat = fastadam.FlatParams([(3, 5), 40], dtype)  # one 16-bit block, one stream
    flat.data[...] = rng.standard_normal(flat.data.size).astype(dtype)
    twin = {"param": flat.data.copy(), **fastadam.adam_state(flat.data, master_weights=True)}
    opt = fastadam.Adam(flat.params, lr=1e-2, master_weights=True)
    other = fastadam.Adam([np.zeros(3, dtype)], master_weights=True)
    for step in (1, 2):
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in flat.params]
        assert opt.step(grads, grad_scale=3.0, skip_if_nonfinite=True)
        fastadam.adam_step(twin["param"], np.concatenate([g.reshape(-1) for g in grads]),
                           twin["exp_avg"], twin["exp_avg_sq"], step=step, lr=1e-2,
                           grad_scale=3.0, master_param=twin["master_param"])
    assert_same_bits(flat.data, twin["param"])
    assert_same_bits(np.concatenate([s["master_param"].reshape(-1) for s in opt.state]),
                     twin["master_param"])
    with pytest.raises(TypeError, match=r"grads\[0\] must have the dtype of params\[0\] "
                                        r"\((bfloat16|float16)\) or be float32, got float64"):
        other.step([np.zeros(3)])
    no_master = fastadam.Adam([np.zeros(3, dtype)])
    with pytest.raises(TypeError, match=r"\((bfloat16|float16)\), got float32"):
        no_master.step([np.zeros(3, np.float32)])
    assert opt.state[0]["step"] == 2 and other.state[0]["step"] == 0


# --- bfloat16 moments beside float32 params (DeepSpeed's fp32_optimizer_states=False) ----------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("variant", VARIANT_SUBSET, ids=variant_id)
def test_bfloat16_moments_of_a_float32_param_are_float32_math_rounded(size, variant):
    amsgrad = variant["amsgrad"]
    kwargs = variant_kwargs(variant)
    p, m, v, vmax = make_state(size, np.float32, amsgrad=amsgrad, seed=2)
    m, v, vmax = (None if a is None else a.astype(BF16) for a in (m, v, vmax))
    rng = np.random.default_rng(6)
    for step in (1, 2, 3):
        g = rng.standard_normal(size).astype(np.float32)
        want = adam_reference(p, g, m.astype(np.float32), v.astype(np.float32),
                              None if vmax is None else vmax.astype(np.float32),
                              dtype=np.float32, step=step, **kwargs)
        fastadam.adam_step(p, g, m, v, max_exp_avg_sq=vmax, step=step, **kwargs)
        assert_same_bits(p, want[0])  # the param stays float32, unrounded
        for actual, expected in zip((m, v, vmax), want[1:]):
            if actual is not None:
                assert actual.dtype == BF16
                assert_same_bits(actual, expected.astype(BF16))  # rounded to nearest even


def test_optimizer_with_bfloat16_moments_is_adam_step_and_round_trips_through_checkpoints(tmp_path):
    rng = np.random.default_rng(4)
    flat = fastadam.FlatParams([(30, 4), 9])
    flat.data[...] = rng.standard_normal(flat.data.size)
    twin = flat.data.copy()
    state = fastadam.adam_state(twin, amsgrad=True, state_dtype="bfloat16")
    assert {a.dtype for a in state.values()} == {BF16}
    opt = fastadam.AdamW(flat.params, lr=1e-2, amsgrad=True, state_dtype="bfloat16")
    for step in (1, 2):
        flat.grad_data[...] = rng.standard_normal(flat.data.size)
        opt.step(flat.grads)
        fastadam.adam_step(twin, flat.grad_data, state["exp_avg"], state["exp_avg_sq"], step=step,
                           max_exp_avg_sq=state["max_exp_avg_sq"], lr=1e-2, weight_decay=1e-2,
                           decoupled_weight_decay=True)
    assert_same_bits(flat.data, twin)
    for key in state:
        assert opt.state[0][key].dtype == BF16
        assert_same_bits(np.concatenate([s[key].reshape(-1) for s in opt.state]), state[key])
    assert sum(v.nbytes for s in opt.state for k, v in s.items() if k != "step") == flat.data.size * 6
    fastadam.save(opt, tmp_path / "ckpt.npz")
    resumed_params = [p.copy() for p in flat.params]
    resumed = fastadam.AdamW(resumed_params, lr=1e-2, amsgrad=True, state_dtype="bfloat16")
    fastadam.load(resumed, tmp_path / "ckpt.npz")
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in flat.params]
    opt.step(grads)
    resumed.step(grads)
    for a, b in zip(flat.params, resumed_params):
        assert_same_bits(a, b)
    float32_state = fastadam.AdamW([p.copy() for p in flat.params], lr=1e-2, amsgrad=True)
    with pytest.raises(ValueError, match=r"\['exp_avg'\] has dtype bfloat16, parameter 0's state "
                                         r"has float32"):
        float32_state.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("call, exc, match", [
    (lambda: fastadam.Adam([np.zeros(3)], state_dtype="bfloat16"), TypeError,
     r"state_dtype='bfloat16' is for float32 params, but param_groups\[0\]\['params'\]\[0\] is float64"),
    (lambda: fastadam.Adam([np.zeros(3, BF16)], state_dtype="bfloat16"), TypeError,
     "is for float32 params, but .* is bfloat16"),
    (lambda: fastadam.Adam([np.zeros(3, np.float32)], state_dtype="float16"), ValueError,
     r"state_dtype must be None \(the params' type\) or 'bfloat16', got float16"),
    (lambda: fastadam.Adam([np.zeros(3, BF16)], master_weights=True, state_dtype="bfloat16"),
     ValueError, "state_dtype must be None with master_weights=True"),
    (lambda: fastadam.adam_state(np.zeros(3), state_dtype="bfloat16"), TypeError,
     "is for float32 params, but param is float64"),
    (lambda: fastadam.adam_step(np.zeros(4, np.float32), np.zeros(4, np.float32),
                                np.zeros(4, BF16), np.zeros(4, np.float32), step=1),
     TypeError, "exp_avg must have param's dtype float32, got bfloat16"),  # (all or none)
])
def test_bfloat16_moments_are_refused_where_they_do_not_apply(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bfloat16_moments_equal_float32_adam_with_the_moments_rounded_after_each_step():
    # What examples/fashion_mnist_torch.py --precision fp32-bf16-moments emulates to
    # measure this mode's accuracy: the same bits.
    rng = np.random.default_rng(8)
    params = [rng.standard_normal(300).astype(np.float32), rng.standard_normal(33).astype(np.float32)]
    emulated = [p.copy() for p in params]
    opt = fastadam.Adam(params, lr=1e-2, state_dtype="bfloat16")
    plain = fastadam.Adam(emulated, lr=1e-2)
    for _ in range(4):
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
        opt.step(grads)
        plain.step(grads)
        for state in plain.state:
            for key in ("exp_avg", "exp_avg_sq"):
                state[key][...] = state[key].astype(BF16).astype(np.float32)
    for a, b in zip(params, emulated):
        assert_same_bits(a, b)


def test_the_low_precision_benchmark_times_every_fastadam_mode():
    # benchmarks/low_precision.py, tiny and once: every mode of fastadam runs and is reported
    # (the figures of docs/guide/mixed-precision.md come from its default run)
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "low_precision.py"
    result = subprocess.run([sys.executable, str(script), "--sizes", "2^12", "--threads", "1",
                             "--repeats", "1", "--target-ms", "1", "--retries", "0",
                             "--quiet-wait", "0"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line for line in result.stdout.splitlines()
            if line.startswith("| fastadam")}
    assert set(rows) == {"fastadam f32", "fastadam bf16", "fastadam f16",
                         "fastadam bf16 stochastic", "fastadam master weights (bf16 param+grad)",
                         "fastadam f32 param, bf16 moments"}
    for line in rows.values():
        assert float(line.split(" | ")[1]) > 0


IN_REGISTER_FLAGS = [{}, {"grad_scale": 3.0}, {"weight_decay": 0.1},
                     {"weight_decay": 0.1, "decoupled_weight_decay": True}, {"beta1": 0.3},
                     {"beta1": 0.3, "weight_decay": 0.1, "grad_scale": 0.5, "maximize": True},
                     {"eps_hat": True}, {"amsgrad": True}, {"eps_root": 1e-8}]


def cpu_has_bfloat16_rounding():
    """Does /proc/cpuinfo list AVX-512 BF16 (None where there is no such file)?"""
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512_bf16" in f.read()
    except OSError:
        return None


IN_REGISTER_MODES = [("pure", F16), ("pure", BF16), ("stochastic", BF16), ("master", F16),
                     ("master", BF16)]  # (stochastic rounding is for bfloat16 params)


@pytest.mark.parametrize("mode,dtype", IN_REGISTER_MODES,
                         ids=[f"{mode}-{np.dtype(t).name}" for mode, t in IN_REGISTER_MODES])
@pytest.mark.parametrize("numerics", ["exact", "torch", "fast"])
@pytest.mark.parametrize("kwargs", IN_REGISTER_FLAGS,
                         ids=[",".join(k) or "plain" for k in IN_REGISTER_FLAGS])
def test_16bit_in_registers_gives_the_bits_of_the_other_paths(restore_levels, mode, dtype,
                                                             numerics, kwargs):
    # The avx512 and avx2 levels update tensors with float16 grads, and avx512 those with
    # bfloat16 grads where the CPU has AVX-512 BF16, in registers (_vectors16.h, each
    # mode, flag and form a specialization): param and moments of the grad's type
    # ("pure"; bfloat16 rounded stochastically: "stochastic"), or float32 ones with a
    # model copy ("master"). The baseline widens them into float32 blocks, and pure
    # bfloat16 runs through _update's loop elsewhere. A float32 result one unit off in
    # its last place rarely changes its 16-bit rounding (FMA against multiply-add in one
    # moment update: a few elements in 2^20), so this catches a wrong operation, constant
    # or branch, a wrong random bit, and the NaN payload test below the float16
    # conversions; many elements, moments that start away from zero, a size whose torch
    # tail is not a whole vector, and for bfloat16 gradients whose squares are subnormal
    # floats and NaNs (which vcvtneps2bf16 rounds otherwise).
    if kwargs.get("eps_root") and numerics != "exact":
        pytest.skip("only the exact profile has an eps_root form")
    if len(_simd.available_levels()) < 2:
        pytest.skip("this CPU has only the baseline level: every tensor takes the other paths")
    levels = _simd.available_levels()
    modules = [importlib.import_module(_simd.MODULES[level]) for level in levels]
    assert [m.FLOAT16_IN_REGISTERS for m in modules] == [level != "baseline" for level in levels]
    has_bf16 = cpu_has_bfloat16_rounding()  # (few CI machines have it; this one does)
    assert [m.BFLOAT16_IN_REGISTERS for m in modules] == [
        level == "avx512" and (has_bf16 if has_bf16 is not None else m.BFLOAT16_IN_REGISTERS)
        for level, m in zip(levels, modules)]
    n = (1 << 18) + 45  # torch's scalar tail: 13 elements, more than an avx2 vector
    rng = np.random.default_rng(5)
    values = rng.standard_normal(n).astype(np.float32)
    state_type = np.float32 if mode == "master" else dtype
    first_m = (rng.standard_normal(n) * 0.1).astype(dtype).astype(state_type)
    first_v = (rng.random(n) * 0.01).astype(dtype).astype(state_type)
    offset = np.full(n, 0.01, np.float32)
    if dtype is BF16:  # moments that become subnormal floats (from zero), NaNs
        tiny = rng.integers(0, n, 300)
        values[tiny], first_m[tiny], first_v[tiny], offset[tiny] = 2e-38, 0, 0, 0
    if dtype is BF16 or mode == "master":  # NaNs with a payload (float16's: see below)
        values[rng.integers(0, n, 20)] = np.uint32(0x7FD5A000).view(np.float32)

    def run(level):
        _simd.use(level)
        options = dict(kwargs)
        amsgrad = options.pop("amsgrad", False)
        if mode == "stochastic":
            options.update(stochastic_rounding=True, seed=23)
        master = values.copy() if mode == "master" else None
        p = values.astype(dtype)
        m, v = first_m.copy(), first_v.copy()
        vmax = first_v.copy() if amsgrad else None
        for t in range(1, 5):
            g = (values * np.float32(t % 3 - 1.1) + offset * np.float32(t)).astype(dtype)
            fastadam.adam_step(p, g, m, v, max_exp_avg_sq=vmax, step=t + 10, lr=1e-2,
                               numerics=numerics, num_threads=1, master_param=master,
                               **options)
        return [a.view(np.uint16 if a.itemsize == 2 else np.uint32).copy()
                for a in (p, m, v, vmax, master) if a is not None]

    baseline = run("baseline")
    for level in levels[1:]:
        names = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
        names = [name for name in names if name != "max_exp_avg_sq" or kwargs.get("amsgrad")]
        for name, ours, theirs in zip(names, run(level), baseline):
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{level} {name}")


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("numerics", ["exact", "torch"])
def test_a_masters_model_copy_at_any_offset_has_the_same_bits(restore_levels, dtype, numerics):
    # The loop in registers takes whole vectors of a master from wherever a chunk starts;
    # the blocks take what it leaves, and torch's scalar tail (a float32 master's last
    # size % 8 elements) must stay where it is whatever a block's start. Model copies at
    # every 2-byte offset of a 64-byte line, on one and two threads (two chunks), against
    # the baseline level (blocks only): model, master and moments.
    if len(_simd.available_levels()) < 2:
        pytest.skip("this CPU has only the baseline level")
    n = (1 << 20) + 37
    rng = np.random.default_rng(9)
    start = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(4)]

    def run(level, shift, threads):
        _simd.use(level)
        storage = zeros_at(n + 32, dtype)  # 64-byte aligned
        model = storage[shift:shift + n]
        master = start.copy()
        m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
        for t, g in enumerate(grads, 1):
            fastadam.adam_step(model, g, m, v, step=t, lr=1e-2, master_param=master,
                               weight_decay=0.1, numerics=numerics, num_threads=threads)
        return storage.view(np.uint16).copy(), master, m, v

    for shift in range(32):
        expected = run("baseline", shift, 1)
        assert np.any(expected[0][shift:shift + n] != 0)
        for level in _simd.available_levels()[1:]:
            for threads in (1, 2):
                for name, ours, theirs in zip(("model", "master", "exp_avg", "exp_avg_sq"),
                                              run(level, shift, threads), expected):
                    np.testing.assert_array_equal(ours.view(np.uint16), theirs.view(np.uint16),
                                                  err_msg=f"{level} {shift} {threads} {name}")


def test_16bit_loops_in_registers_take_whole_vectors_short_of_torchs_tail():
    # Which elements the loop of _vectors16.h takes at each level (the bits are the same
    # either way, so the test above cannot tell): whole vectors from the chunk's start,
    # never into torch's scalar tail (the last size % 16 elements), nothing with AMSGrad
    # or eps_root, and bfloat16 only where the CPU rounds it in one instruction.
    for level in _simd.available_levels():
        module = importlib.import_module(_simd.MODULES[level])
        lanes = {"avx512": 16, "avx2": 8}.get(level)
        for dtype in ("float16", "bfloat16"):
            active = lanes is not None and (dtype == "float16" or module.BFLOAT16_IN_REGISTERS)
            end = module.vector_end
            assert end(dtype, 1005, 0, 1005) == (1005 // lanes * lanes if active else 0), level
            assert end(dtype, 1005, 32, 1005) == (32 + 973 // lanes * lanes if active else 32)
            assert end(dtype, 1005, 0, 1005, "torch") == (992 if active else 0), level
            assert end(dtype, 1005, 0, 1005, "fast") == (1005 // lanes * lanes if active else 0)
            assert end(dtype, 1005, 0, 1005, amsgrad=True) == 0
            assert end(dtype, 1005, 0, 1005, eps_root=True) == 0
            assert end(dtype, 1005, 992, 1005, "torch") == 992   # all of it torch's tail
            assert end(dtype, 1005, 0, 7) == 0                   # less than one vector
            # a float32 master and moments: torch's tail is that of its float32 loop
            whole = 1005 // lanes * lanes if active else 0
            assert end(dtype, 1005, 0, 1005, master_weights=True) == whole
            assert end(dtype, 1005, 0, 1005, "torch", master_weights=True) == (
                min(whole, 1000) if active else 0)
            assert end(dtype, 1005, 0, 1005, amsgrad=True, master_weights=True) == 0
            assert end(dtype, 1005, 0, 1005, stochastic=True, master_weights=True) == 0
            # stochastic rounding: bfloat16 only, and never across a multiple of 2**32
            sr = lanes is not None and dtype == "bfloat16" and module.BFLOAT16_IN_REGISTERS
            assert end(dtype, 1005, 0, 1005, stochastic=True) == (whole if sr else 0)
            first = (1 << 32) - 40
            assert end(dtype, 1 << 33, first, first + 1000, stochastic=True) == (
                first + 32 if sr else first)


@pytest.mark.parametrize("numerics", ["exact", "torch", "fast"])
def test_float16_blocks_give_the_same_bits_at_every_level_nan_payloads_included(restore_levels,
                                                                              numerics):
    # the float16 blocks are widened and rounded with F16C (avx2: 8 lanes) or AVX-512 (16
    # lanes), each with its own NaN fix-up before vcvtps2ph; the scalar code elsewhere
    rng = np.random.default_rng(0)
    n = 1000
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, 6e-8, -6e-8, 1e-7, 65504, 7e4, -7e4] * 4,
                       np.float32)
    values = np.concatenate([rng.standard_normal(n - special.size).astype(np.float32)
                             * np.float32(10) ** rng.integers(-9, 5, n - special.size), special])
    rng.shuffle(values)

    def run(level):
        _simd.use(level)
        with np.errstate(over="ignore"):
            p, g = values.astype(F16), values[::-1].astype(F16)
        g.view(np.uint16)[::97] = 0x7E55    # NaNs with payloads, both signs
        g.view(np.uint16)[1::89] = 0xFD21
        m, v = np.zeros(n, F16), np.zeros(n, F16)
        for t in range(1, 4):
            fastadam.adam_step(p, g, m, v, step=t, lr=1e-2, numerics=numerics, num_threads=1)
        return [a.view(np.uint16).copy() for a in (p, m, v)]

    baseline = run("baseline")
    for level in _simd.available_levels()[1:]:
        for ours, theirs in zip(run(level), baseline):
            np.testing.assert_array_equal(ours, theirs, err_msg=level)
