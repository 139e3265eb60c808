"""Every rejection: the right exception, a message naming the argument, and no byte written."""

import math

import numpy as np
import pytest

import fastadam
from fastadam import _checks

N = 16


def buffers(dtype=np.float32):
    rng = np.random.default_rng(0)
    return {
        "param": rng.standard_normal(N).astype(dtype),
        "grad": rng.standard_normal(N).astype(dtype),
        "exp_avg": rng.standard_normal(N).astype(dtype),
        "exp_avg_sq": rng.random(N).astype(dtype),
        "max_exp_avg_sq": rng.random(N).astype(dtype),
    }


def call(bufs, **kwargs):
    args = dict(bufs)
    args.update(kwargs)
    args.setdefault("step", 1)
    positional = [args.pop(k) for k in ("param", "grad", "exp_avg", "exp_avg_sq")]
    fastadam.adam_step(*positional, **args)


def assert_rejected(exc_type, match, bufs=None, **kwargs):
    bufs = buffers() if bufs is None else bufs
    arrays = [a for a in list(bufs.values()) + list(kwargs.values()) if isinstance(a, np.ndarray)]
    snapshot = [a.tobytes() for a in arrays]
    with pytest.raises(exc_type, match=match):
        call(bufs, **kwargs)
    for before, array in zip(snapshot, arrays):
        assert array.tobytes() == before, "a rejected call wrote to a buffer"


# --- buffers ---------------------------------------------------------------------------

NON_BUFFERS = {"list": [1.0] * N, "None": None, "str": "x" * N, "float": 3.0}


@pytest.mark.parametrize("name, bad", [
    pytest.param(name, bad, id=f"{name}-{kind}")
    for name in ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    for kind, bad in NON_BUFFERS.items()
    if not (name == "max_exp_avg_sq" and bad is None)  # None there means "not AMSGrad"
])
def test_non_buffers_are_type_errors(name, bad):
    assert_rejected(TypeError, rf"^{name} must be a NumPy array or an object supporting the buffer protocol.*got",
                    **{name: bad})


@pytest.mark.parametrize("name", ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
@pytest.mark.parametrize("dtype", [np.int64, np.int16, np.complex64, np.int32, np.uint8])
def test_non_float_dtypes_are_type_errors(name, dtype):
    assert_rejected(TypeError, rf"^{name} must have dtype float32, float64, bfloat16 or float16, got {np.dtype(dtype).name}",
                    **{name: np.zeros(N, dtype)})


def test_non_native_byte_order_is_a_type_error():
    swapped = np.zeros(N, np.dtype(np.float32).newbyteorder())
    assert_rejected(TypeError, r"^param must have dtype float32, float64, bfloat16 or float16, got float32 in non-native byte order",
                    param=swapped)


@pytest.mark.parametrize("name", ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
@pytest.mark.parametrize("swap", ["all", "one"])
def test_bfloat16_in_non_native_byte_order_is_a_type_error(name, swap):
    # the kernels read native words: swapped bfloat16 was read as native (a param of 1.0
    # came out as -1.1e-25), and every buffer swapped passed as one bfloat16 dtype
    bf16 = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    swapped_type = bf16.newbyteorder()
    bufs = {key: array.astype(swapped_type if swap == "all" else bf16)
            for key, array in buffers().items()}
    bufs[name] = bufs[name].astype(swapped_type)
    first = "param" if swap == "all" else name
    assert_rejected(TypeError, rf"^{first} must have dtype float32, float64, bfloat16 or float16, "
                    r"got bfloat16 in non-native byte order", bufs=bufs)
    with pytest.raises(TypeError, match="^dtype must be one of .* non-native byte order"):
        fastadam.adam_step(*(bytearray(8) for _ in range(4)), step=1, dtype=swapped_type)
    with pytest.raises(TypeError, match=r"non-native byte order"):
        fastadam.Adam([np.zeros(N, swapped_type)])


@pytest.mark.parametrize("name", ["grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
def test_mixed_dtypes_are_type_errors(name):
    assert_rejected(TypeError, rf"^{name} must have param's dtype float32, got float64",
                    **{name: np.zeros(N, np.float64)})


@pytest.mark.parametrize("name", ["grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
@pytest.mark.parametrize("size", [N - 1, N + 1, 0])
def test_element_count_mismatch_is_a_value_error(name, size):
    assert_rejected(ValueError, rf"^{name} must have {N} elements like param, got {size}",
                    **{name: np.zeros(size, np.float32)})


@pytest.mark.parametrize("name", ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
def test_strided_buffers_are_value_errors(name):
    assert_rejected(ValueError, rf"^{name} must be C-contiguous",
                    **{name: np.zeros(2 * N, np.float32)[::2]})


def test_negative_strides_and_fortran_order_are_value_errors():
    assert_rejected(ValueError, r"^param must be C-contiguous", param=np.zeros(N, np.float32)[::-1])
    fortran = np.zeros((4, 4), np.float32, order="F")
    assert_rejected(ValueError, r"^exp_avg must be C-contiguous", exp_avg=fortran)


@pytest.mark.parametrize("name", ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
def test_read_only_outputs_are_value_errors(name):
    bufs = buffers()
    bufs[name].flags.writeable = False
    assert_rejected(ValueError, rf"^{name} is updated in place and must be writable", bufs)


def test_read_only_grad_is_accepted():
    bufs = buffers()
    bufs["grad"].flags.writeable = False
    call(bufs)


@pytest.mark.parametrize("a, b", [("param", "exp_avg"), ("param", "grad"), ("exp_avg", "exp_avg_sq"),
                                  ("exp_avg_sq", "max_exp_avg_sq"), ("grad", "max_exp_avg_sq")])
def test_the_same_buffer_twice_is_a_value_error(a, b):
    bufs = buffers()
    bufs[b] = bufs[a]
    assert_rejected(ValueError, rf"^{b} overlaps {a} in memory", bufs)


def test_partially_overlapping_views_are_value_errors():
    block = np.zeros(2 * N, np.float32)
    bufs = buffers()
    bufs["exp_avg"], bufs["exp_avg_sq"] = block[:N], block[N // 2: N // 2 + N]
    assert_rejected(ValueError, r"^exp_avg_sq overlaps exp_avg in memory", bufs)


def test_adjacent_views_of_one_block_are_accepted():
    block = np.zeros(4 * N, np.float32)
    bufs = buffers()
    bufs["param"][...] = 1.0
    bufs.update(param=block[:N], exp_avg=block[N:2 * N], exp_avg_sq=block[2 * N:3 * N],
                max_exp_avg_sq=block[3 * N:])
    call(bufs)


# --- hyperparameters ---------------------------------------------------------------------

@pytest.mark.parametrize("step", [1.0, "1", None, True, np.float64(2.0)])
def test_non_integer_steps_are_type_errors(step):
    assert_rejected(TypeError, r"^step must be an integer", step=step)


@pytest.mark.parametrize("step", [0, -1, 2**63, -(2**70)])
def test_out_of_range_steps_are_value_errors(step):
    assert_rejected(ValueError, rf"^step must be an integer in \[1, 2\*\*63 - 1\], got {step}", step=step)


def test_numpy_integer_step_is_accepted():
    call(buffers(), step=np.int64(7))


@pytest.mark.parametrize("name", ["lr", "beta1", "beta2", "eps", "weight_decay", "eps_root", "grad_scale"])
@pytest.mark.parametrize("bad", ["0.1", None, True, 1j, [0.1]], ids=["str", "None", "bool", "complex", "list"])
def test_non_real_hyperparameters_are_type_errors(name, bad):
    assert_rejected(TypeError, rf"^{name} must be a real number, got", **{name: bad})


@pytest.mark.parametrize("name", ["lr", "beta1", "beta2", "eps", "weight_decay", "eps_root", "grad_scale"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_hyperparameters_are_value_errors(name, bad):
    assert_rejected(ValueError, rf"^{name} must be finite, got", **{name: bad})


@pytest.mark.parametrize("name, bad, expected", [
    ("lr", -1e-3, r"lr must be >= 0.0, got -0.001"),
    ("beta1", 1.0, r"beta1 must be in \[0, 1\), got 1.0"),
    ("beta1", -0.1, r"beta1 must be in \[0, 1\), got -0.1"),
    ("beta2", 1.0, r"beta2 must be in \[0, 1\), got 1.0"),
    ("beta2", 1.5, r"beta2 must be in \[0, 1\), got 1.5"),
    ("eps", -1e-8, r"eps must be >= 0.0, got -1e-08"),
    ("eps_root", -1e-8, r"eps_root must be >= 0.0, got -1e-08"),
    ("weight_decay", -0.1, r"weight_decay must be >= 0.0, got -0.1"),
    ("grad_scale", 0.0, r"grad_scale must be > 0.0, got 0.0"),
    ("grad_scale", -2.0, r"grad_scale must be > 0.0, got -2.0"),
])
def test_out_of_range_hyperparameters_are_value_errors(name, bad, expected):
    assert_rejected(ValueError, "^" + expected, **{name: bad})


@pytest.mark.parametrize("name", ["decoupled_weight_decay", "maximize", "eps_hat"])
@pytest.mark.parametrize("bad", [1, "yes", None, 0.0])
def test_non_bool_flags_are_type_errors(name, bad):
    assert_rejected(TypeError, rf"^{name} must be a bool, got", **{name: bad})


def test_eps_hat_with_eps_root_is_a_value_error():
    assert_rejected(ValueError, r"^eps_hat=True and eps_root > 0 select two different epsilon forms",
                    eps_hat=True, eps_root=1e-8)


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-2, ValueError), (1.5, TypeError),
                                      ("2", TypeError), (True, TypeError)])
def test_bad_num_threads_are_rejected(bad, exc):
    assert_rejected(exc, r"^num_threads must be None or a positive integer", num_threads=bad)


def test_keyword_only_step_is_required():
    bufs = buffers()
    with pytest.raises(TypeError, match="step"):
        fastadam.adam_step(bufs["param"], bufs["grad"], bufs["exp_avg"], bufs["exp_avg_sq"])


def test_overlap_helper_refuses_non_arrays():
    with pytest.raises(TypeError):
        _checks.first_overlap([None, None])


def test_remembered_hyperparameters_never_let_a_bad_value_through():
    # adam_step remembers which exact-float/bool hyperparameters were valid; a value of
    # another type that compares equal (True == 1.0) is still checked, and so is every
    # invalid one.
    p, g, m, v = (np.ones(8, np.float32) for _ in range(4))
    fastadam.adam_step(p, g, m, v, step=1, lr=1.0)
    with pytest.raises(TypeError, match="lr must be a real number, got bool"):
        fastadam.adam_step(p, g, m, v, step=2, lr=True)
    fastadam.adam_step(p, g, m, v, step=2, beta1=0.5)
    with pytest.raises(ValueError, match=r"beta1 must be in \[0, 1\)"):
        fastadam.adam_step(p, g, m, v, step=3, beta1=1.5)
    with pytest.raises(ValueError, match=r"beta1 must be in \[0, 1\)"):
        fastadam.adam_step(p, g, m, v, step=3, beta1=1.5)  # twice: errors are not remembered


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_the_plain_array_path_and_the_general_path_give_the_same_bits(dtype):
    dtype = np.dtype(pytest.importorskip("ml_dtypes").bfloat16) if dtype == "bfloat16" \
        else np.dtype(dtype)
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(1000).astype(dtype) for _ in range(2)]
    plain = [values[0].copy(), values[1].copy(), np.zeros(1000, dtype), np.zeros(1000, dtype)]
    assert _checks.plain_buffers(*plain, None)
    # the bits as raw bytes, read as ``dtype``: the general checks
    general = [memoryview(bytearray(a.tobytes())) for a in plain]
    assert not _checks.plain_buffers(*general, None)
    for t in range(1, 4):
        fastadam.adam_step(*plain, step=t, lr=0.01, weight_decay=0.1)
        fastadam.adam_step(*general, step=t, lr=0.01, weight_decay=0.1, dtype=dtype)
    for a, b in zip(plain, general):
        assert a.tobytes() == bytes(b)


def test_the_plain_array_path_takes_one_stored_type_only():
    bf16 = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    f32 = [np.zeros(8, np.float32) for _ in range(4)]
    assert not _checks.plain_buffers(*f32[:2], np.zeros(8, bf16), np.zeros(8, bf16), None)
    assert not _checks.plain_buffers(*(np.zeros(8, np.int16) for _ in range(4)), None)
    assert not _checks.plain_buffers(*(np.zeros(8, np.uint16) for _ in range(4)), None)
    assert not _checks.plain_buffers(*(np.zeros(8, np.complex64) for _ in range(4)), None)
    assert not _checks.plain_buffers(*(np.zeros(8, bf16.newbyteorder()) for _ in range(4)), None)
    float8 = pytest.importorskip("ml_dtypes").float8_e4m3fn  # another user-defined type
    assert not _checks.plain_buffers(*(np.zeros(8, float8) for _ in range(4)), None)


# --- hyperparameters against the element type (issue 19, item 5) ----------------------------
# Finite as doubles but not in float32: eps=1e-50 rounds to 0 (a zero gradient gave 0/0 =
# NaN), grad_scale=1e-300 rounds to 0 (g/0 = Inf), lr=1e39 makes the step coefficient Inf
# (Inf * 0 = NaN). They were accepted, then the parameters were NaN or Inf.

FLOAT32_MISFITS = [
    ("eps", {"eps": 1e-50}, "eps"),
    ("eps_root", {"eps_root": 1e-50}, "eps_root"),
    ("eps_too_big", {"eps": 1e39}, "eps"),
    ("grad_scale", {"grad_scale": 1e-300}, "grad_scale"),
    ("grad_scale_subnormal", {"grad_scale": 1e-40}, "grad_scale"),
    ("grad_scale_too_big", {"grad_scale": 1e39}, "grad_scale"),
    ("lr", {"lr": 1e39}, "lr"),
    ("lr_over_bias_correction", {"lr": 1e38, "beta1": 0.9}, "lr"),  # 1e38 / (1 - 0.9) = 1e39
    ("l2_decay", {"weight_decay": 1e39}, "weight_decay"),
    ("decoupled_decay", {"weight_decay": 1e30, "lr": 1e10, "decoupled_weight_decay": True},
     "weight_decay"),
]


@pytest.mark.parametrize("case, kwargs, name", FLOAT32_MISFITS, ids=[c[0] for c in FLOAT32_MISFITS])
def test_hyperparameters_beyond_float32_are_value_errors_naming_argument_and_type(case, kwargs, name):
    kwargs = dict(kwargs)
    assert_rejected(ValueError, rf"^{name}\b.*float32", **kwargs)
    bufs = buffers(np.float32)
    table = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match=rf"^{name}\b.*float32"):
        fastadam.adam_step_rows(table, np.ones((1, 4), np.float32), [2], np.zeros(16, np.float32),
                                np.zeros(16, np.float32), step=1, **kwargs)
    assert not table.any()
    step_kwargs = {"grad_scale": kwargs.pop("grad_scale")} if "grad_scale" in kwargs else {}
    if "beta1" in kwargs:
        kwargs["betas"] = (kwargs.pop("beta1"), 0.999)
    param = bufs["param"].copy()
    if step_kwargs:
        opt = fastadam.Adam([param], **kwargs)
        with pytest.raises(ValueError, match=r"^grad_scale\b.*float32"):
            opt.step([bufs["grad"]], **step_kwargs)
    else:
        with pytest.raises(ValueError, match=rf"^defaults\['{name}'\]|^param_groups\[0\]\['{name}'\].*float32"):
            fastadam.Adam([param], **kwargs)
    assert param.tobytes() == bufs["param"].tobytes()


@pytest.mark.parametrize("case, kwargs, name", FLOAT32_MISFITS, ids=[c[0] for c in FLOAT32_MISFITS])
def test_the_same_values_are_fine_in_float64(case, kwargs, name):
    bufs = buffers(np.float64)
    call(bufs, **kwargs)  # (the values are finite doubles, normal where they divide)


def test_edited_and_scheduled_values_are_checked_at_each_step():
    param = np.zeros(4, np.float32)
    opt = fastadam.Adam([param])
    opt.step([np.ones(4, np.float32)])
    opt.param_groups[0]["eps"] = 1e-50
    with pytest.raises(ValueError, match=r"^param_groups\[0\]\['eps'\] must be 0 or.*float32.*rounds to 0"):
        opt.step([np.zeros(4, np.float32)])
    opt.param_groups[0]["eps"] = 1e-8
    opt.param_groups[0]["lr"] = lambda step: 1e39 if step == 3 else 1e-3
    opt.step([np.ones(4, np.float32)])
    before = param.copy()
    with pytest.raises(ValueError, match=r"^param_groups\[0\]\['lr'\].*float32.*at step 3"):
        opt.step([np.ones(4, np.float32)])
    assert param.tobytes() == before.tobytes() and opt.state[0]["step"] == 2
    mixed = fastadam.Adam([np.zeros(2, np.float64), np.zeros(2, np.float32)])
    with pytest.raises(ValueError, match=r"^grad_scale must be a normal number of float32"):
        mixed.step([np.ones(2, np.float64), np.ones(2, np.float32)], grad_scale=1e-300)


def test_a_group_memo_stands_only_while_the_group_holds_the_same_objects():
    from fastadam._validation import GroupMemo, remembered_group

    f32 = (np.dtype(np.float32),)
    betas = [0.9, 0.999]
    group = {"lr": 1e-3, "betas": betas, "eps": 1e-8, "weight_decay": 0.0,
             "decoupled_weight_decay": False, "amsgrad": False, "maximize": False,
             "eps_hat": False, "eps_root": 0.0}
    memo = GroupMemo()
    assert memo.lookup(group, f32) is None
    record = remembered_group(group, f32, memo)
    assert memo.lookup(group, f32) is record
    assert memo.lookup(group, (np.dtype(np.float64),)) is None  # other element types
    assert memo.lookup(dict(group), f32) is record  # the same objects in another dict
    # Any value that is another object, even an equal one, or a key added or removed,
    # and betas' items edited in place, misses.
    equal = float("0.001")  # 1e-3, another object
    assert equal == group["lr"] and equal is not group["lr"]
    edits = [("lr", equal), ("lr", 0.002), ("amsgrad", 0), ("numerics", "exact"),
             ("betas", (0.9, 0.999)), ("eps", np.float64(1e-8))]
    for key, value in edits:
        assert memo.lookup({**group, key: value}, f32) is None, key
    betas[0] = 0.5
    assert memo.lookup(group, f32) is None
    assert remembered_group(group, f32, memo).beta1 == 0.5
    betas.append(0.1)
    assert memo.lookup(group, f32) is None
    # Values that may change in place are never kept: a tensor lr, a schedule, an array.
    for lr in [np.array(1e-3), lambda step: 1e-3]:
        changing = {**group, "betas": (0.9, 0.999), "lr": lr}
        memo.keep(changing, f32, record)
        assert memo.lookup(changing, f32) is None
    # Through an optimizer: an edited value is read and checked at the next step.
    param = np.zeros(4, np.float32)
    opt = fastadam.Adam([param], betas=[0.9, 0.999])
    opt.step([np.ones(4, np.float32)])
    opt.step([np.ones(4, np.float32)])
    opt.param_groups[0]["betas"] = [1.5, 0.999]
    before = param.copy()
    with pytest.raises(ValueError, match=r"^param_groups\[0\]\['betas'\]"):
        opt.step([np.ones(4, np.float32)])
    assert param.tobytes() == before.tobytes()
    listed = opt.param_groups[0]["betas"] = [0.9, 0.999]
    opt.step([np.ones(4, np.float32)])
    listed[1] = 2.0  # in place, the same list object
    with pytest.raises(ValueError, match=r"^param_groups\[0\]\['betas'\]"):
        opt.step([np.ones(4, np.float32)])
    assert opt.state[0]["step"] == 3


def test_remembered_group_records_are_looked_up_only_for_plain_values():
    from fastadam._validation import remembered_group_record

    f32 = (np.dtype(np.float32),)
    plain = (1e-3, 0.9, 0.999, 1e-8, 0, False, False, False, False, 0.0, "exact")
    first = remembered_group_record(*plain, f32)
    assert first == remembered_group_record(*plain, f32) == (
        1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False, False, 0.0, "exact")
    assert type(first.weight_decay) is float
    # Only validity is remembered: the record holds the values given, signed zeros too,
    # and ints stand for their floats wherever a float goes.
    signed = remembered_group_record(-0.0, 0, 0.999, 1e-8, -0.0, False, False, False, False,
                                     0.0, "exact", f32)
    assert math.copysign(1, signed.lr) == -1 and math.copysign(1, signed.weight_decay) == -1
    assert type(signed.beta1) is float and signed.beta1 == 0.0
    # Other types that compare equal, objects whose value may change in place, and
    # invalid values: never from the memory (None: the full check decides and names).
    for k, other in [(0, np.float64(1e-3)), (0, lambda step: 1e-3), (5, 0), (6, 1),
                     (1, 1.5), (3, -1.0), (10, "bogus")]:
        values = list(plain)
        values[k] = other
        assert remembered_group_record(*values, f32) is None, (k, other)
    # Valid at step 1, where the step coefficient lr / (1 - beta1) is largest, is valid
    # at every step; a group valid only at later steps takes the full check each time.
    huge = (1e38,) + plain[1:]
    assert remembered_group_record(*huge, f32) is None
    assert remembered_group_record(*huge, (np.dtype(np.float64),)) is not None
    group = dict(zip(["lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "amsgrad",
                      "maximize", "eps_hat", "eps_root"],
                     [1e38, (0.9, 0.999), 1e-8, 0.0, False, False, False, False, 0.0]))
    from fastadam._validation import check_group_hyperparameters
    assert check_group_hyperparameters(group, "g", 100, f32).lr == 1e38
    with pytest.raises(ValueError, match="at step 1"):
        check_group_hyperparameters(group, "g", 1, f32)


def test_edited_counts_finds_every_count_shown_otherwise():
    counts = np.array([0, 5, 2**24 + 1, 7, 9], np.int64)
    shown = counts.astype(np.float32)  # 2**24 + 1 shows as 2**24, as NumPy rounds it
    assert _checks.edited_counts(shown, counts) == []
    shown[1], shown[3], shown[4] = 0.0, np.nan, 9.5
    assert _checks.edited_counts(shown, counts) == [1, 3, 4]
    with pytest.raises(ValueError, match="shown has 4 counts, counts has 5"):
        _checks.edited_counts(shown[:4].copy(), counts)


def test_edge_values_that_fit_float32_are_accepted_and_stay_finite():
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    normal = float(np.finfo(np.float32).tiny)
    for kwargs in ({"eps": tiny}, {"eps": 0.0}, {"grad_scale": normal}, {"lr": 1e30},
                   {"eps_root": tiny, "eps": 1e-8}, {"weight_decay": 1e30}):
        bufs = buffers(np.float32)
        bufs["grad"][:4] = 0.0
        bufs["exp_avg"][:4] = bufs["exp_avg_sq"][:4] = 0.0
        call(bufs, **kwargs)
        if kwargs.get("eps", 1.0) != 0.0:  # (eps=0 with a zero gradient is 0/0, as in torch)
            assert np.isfinite(bufs["param"][:4]).all(), kwargs


# --- step counts at the int64 limit (issue 19, item 4) --------------------------------------


def test_a_step_count_that_cannot_advance_is_refused():
    # Loading step = 2**63 - 2 was accepted; two steps later the count was negative and the
    # parameter moved by NaN.
    param = np.ones(3, np.float32)
    opt = fastadam.Adam([param], lr=0.1)
    state = opt.state_dict()
    state["state"][0] = {"step": 2**63 - 2, "exp_avg": np.zeros(3, np.float32),
                         "exp_avg_sq": np.zeros(3, np.float32)}
    opt.load_state_dict(state)
    opt.step([np.ones(3, np.float32)])  # to 2**63 - 1, the largest int64
    assert opt.state[0]["step"] == 2**63 - 1 and np.isfinite(param).all()
    before = param.copy(), opt.state[0]["exp_avg"].copy()
    with pytest.raises(ValueError, match=r"^the step count of param_groups\[0\]\['params'\]\[0\] is 9223372036854775807 "
                                         r"\(2\*\*63 - 1\).*cannot advance"):
        opt.step([np.ones(3, np.float32)])
    assert param.tobytes() == before[0].tobytes()
    assert opt.state[0]["exp_avg"].tobytes() == before[1].tobytes()
    assert opt.state[0]["step"] == 2**63 - 1
    opt.zero_state()
    opt.step([np.ones(3, np.float32)])  # and the optimizer still works
    assert opt.state[0]["step"] == 1


def test_the_step_count_check_names_the_parameter():
    params = [np.zeros(2, np.float32) for _ in range(2000)]
    opt = fastadam.Adam(params)
    state = opt.state_dict()
    state["state"][1234]["step"] = 2**63 - 2
    opt.load_state_dict(state)
    opt.step([np.ones(2, np.float32)] * 2000)  # to 2**63 - 1
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1234\] is "
                                         r"9223372036854775807 \(2\*\*63 - 1\)"):
        opt.step([np.ones(2, np.float32)] * 2000)
    assert all(p.tobytes() == b.tobytes() for p, b in zip(params, before))
