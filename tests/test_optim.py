"""fastadam.Adam / AdamW: groups, one-pass steps, all-or-nothing, state dicts."""

from fractions import Fraction

import numpy as np
import pytest

import fastadam
from fastadam import schedules

SHAPES = [(3,), (17, 5), (1000,), (2, 3, 4), (9000,)]


def make_params(dtype=np.float32, shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def make_grads(params, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


def snapshot(opt, params):
    """Every byte of params, state and step counts."""
    return ([p.tobytes() for p in params],
            [{k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
             for s in opt.state])


class Reference:
    """The same training with one fastadam.adam_step call per tensor."""

    def __init__(self, params, **hp):
        self.params = [p.copy() for p in params]
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.vmax = [np.zeros_like(p) for p in params] if hp.pop("amsgrad", False) else None
        self.hp, self.t = hp, 0

    def step(self, grads, **extra):
        self.t += 1
        for i, (p, g) in enumerate(zip(self.params, grads)):
            fastadam.adam_step(p, g, self.m[i], self.v[i], step=self.t,
                               max_exp_avg_sq=None if self.vmax is None else self.vmax[i],
                               **{**self.hp, **extra})


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("hp", [
    {},
    {"amsgrad": True, "weight_decay": 0.1},
    {"maximize": True, "eps_hat": True, "lr": 0.01},
    {"eps_root": 1e-12, "betas": (0.3, 0.99)},
], ids=["defaults", "amsgrad-l2", "maximize-eps_hat", "eps_root-beta0.3"])
def test_step_equals_repeated_adam_step(dtype, hp, num_threads):
    params = make_params(dtype)
    opt = fastadam.Adam(params, num_threads=num_threads, **hp)
    kw = dict(hp)
    beta1, beta2 = kw.pop("betas", (0.9, 0.999))
    ref = Reference(params, beta1=beta1, beta2=beta2, **kw)
    for t in range(4):
        grads = make_grads(params, t)
        assert opt.step(grads) is True
        ref.step(grads)
    for p, r in zip(params, ref.params):
        np.testing.assert_array_equal(p, r)
    assert [s["step"] for s in opt.state] == [4] * len(params)


def test_adamw_is_decoupled_with_default_decay():
    params = make_params()
    opt = fastadam.AdamW(params)
    assert opt.param_groups[0]["weight_decay"] == 1e-2
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    ref = Reference(params, weight_decay=1e-2, decoupled_weight_decay=True)
    for t in range(3):
        grads = make_grads(params, t)
        opt.step(grads)
        ref.step(grads)
    for p, r in zip(params, ref.params):
        np.testing.assert_array_equal(p, r)


def test_param_groups_with_own_hyperparameters_and_dtypes():
    a, b = make_params(np.float32, [(100,), (7, 7)]), make_params(np.float64, [(50,)])
    opt = fastadam.Adam([{"params": a}, {"params": b, "lr": 0.1, "amsgrad": True}], lr=0.01)
    ref_a, ref_b = Reference(a, lr=0.01), Reference(b, lr=0.1, amsgrad=True)
    for t in range(3):
        ga, gb = make_grads(a, t), make_grads(b, t + 10)
        opt.step(ga + gb)
        ref_a.step(ga)
        ref_b.step(gb)
    for p, r in zip(a + b, ref_a.params + ref_b.params):
        np.testing.assert_array_equal(p, r)


def test_editing_param_groups_takes_effect_next_step():
    params = make_params()
    opt = fastadam.Adam(params, lr=0.01)
    ref = Reference(params, lr=0.01)
    opt.step(make_grads(params, 0))
    ref.step(make_grads(params, 0))
    opt.param_groups[0]["lr"] = 0.5
    opt.param_groups[0]["betas"] = (0.8, 0.99)
    opt.step(make_grads(params, 1))
    ref.step(make_grads(params, 1), lr=0.5, beta1=0.8, beta2=0.99)
    for p, r in zip(params, ref.params):
        np.testing.assert_array_equal(p, r)


def test_turning_on_amsgrad_later_allocates_its_state():
    params = make_params()
    opt = fastadam.Adam(params)
    opt.step(make_grads(params, 0))
    assert "max_exp_avg_sq" not in opt.state[0]
    opt.param_groups[0]["amsgrad"] = True
    opt.step(make_grads(params, 1))
    assert "max_exp_avg_sq" in opt.state[0]


def test_schedule_is_called_with_the_group_step():
    calls = []

    def lr(step):
        calls.append(step)
        return 0.1 / step

    params = make_params()
    opt = fastadam.Adam(params, lr=lr)
    calls.clear()
    ref = Reference(params)
    for t in range(1, 4):
        grads = make_grads(params, t)
        opt.step(grads)
        ref.step(grads, lr=0.1 / t)
    assert calls == [1, 2, 3]
    for p, r in zip(params, ref.params):
        np.testing.assert_array_equal(p, r)


def test_library_schedule_and_bad_schedule_value():
    params = make_params()
    opt = fastadam.Adam(params, lr=schedules.inverse_sqrt(0.1))
    ref = Reference(params)
    for t in range(1, 4):
        grads = make_grads(params, t)
        opt.step(grads)
        ref.step(grads, lr=0.1 / np.sqrt(t))
    for p, r in zip(params, ref.params):
        np.testing.assert_array_equal(p, r)
    opt.param_groups[0]["lr"] = lambda step: -1.0
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] \(the schedule's value at step 4\) must be >= 0"):
        opt.step(make_grads(params, 9))
    assert snapshot(opt, params) == before


def test_add_param_group_starts_fresh():
    a, b = make_params(shapes=[(10,)]), make_params(shapes=[(20,)], seed=5)
    opt = fastadam.Adam(a, lr=0.01)
    opt.step(make_grads(a, 0))
    opt.add_param_group({"params": b, "lr": 0.02})
    opt.step(make_grads(a, 1) + make_grads(b, 2))
    assert [s["step"] for s in opt.state] == [2, 1]
    assert opt.param_groups[1]["lr"] == 0.02 and opt.param_groups[1]["betas"] == (0.9, 0.999)
    with pytest.raises(ValueError, match=r"param_groups\[2\]\['params'\]\[0\] overlaps param_groups\[0\]\['params'\]\[0\]"):
        opt.add_param_group({"params": [a[0]]})
    assert len(opt.param_groups) == 2


def test_zero_state_forgets_moments_and_steps():
    params = make_params()
    opt = fastadam.Adam(params, amsgrad=True)
    opt.step(make_grads(params, 0))
    opt.zero_state()
    for s in opt.state:
        assert s["step"] == 0
        assert not s["exp_avg"].any() and not s["exp_avg_sq"].any() and not s["max_exp_avg_sq"].any()
    fresh = Reference(params, amsgrad=True)
    opt.step(make_grads(params, 1))
    fresh.step(make_grads(params, 1))
    for p, r in zip(params, fresh.params):
        np.testing.assert_array_equal(p, r)


def test_step_counts_are_exact_beyond_2_to_the_24():
    params = make_params(shapes=[(64,)])
    opt = fastadam.Adam(params)
    sd = opt.state_dict()
    sd["state"][0]["step"] = 2**24 + 1
    opt.load_state_dict(sd)
    expected = params[0].copy()
    grads = make_grads(params, 0)
    fastadam.adam_step(expected, grads[0], np.zeros(64, np.float32), np.zeros(64, np.float32),
                       step=2**24 + 2)
    opt.step(grads)
    assert opt.state[0]["step"] == 2**24 + 2
    np.testing.assert_array_equal(params[0], expected)


def test_buffer_protocol_params_and_grads():
    data = [memoryview(bytearray(400)).cast("f"), np.zeros(10, np.float32)]
    opt = fastadam.Adam(data, lr=0.1)
    opt.step([np.ones(100, np.float32), memoryview(np.ones(10, np.float32))])
    np.testing.assert_allclose(np.asarray(data[0]), -0.1, rtol=1e-5)
    np.testing.assert_allclose(data[1], -0.1, rtol=1e-5)


# --- all or nothing ------------------------------------------------------------------------

def bad_grads_cases(params):
    good = make_grads(params, 0)
    f64 = [g.astype(np.float64) for g in good]
    return {
        "too few": (good[:-1], ValueError, r"^grads must have one gradient per param \(5\), got 4"),
        "too many": (good + [good[0]], ValueError, r"^grads must have one gradient per param"),
        "dtype": (good[:2] + [f64[2]] + good[3:], TypeError, r"^grads\[2\] must have the dtype of params\[2\] \(float32\), got float64"),
        "shape": (good[:1] + [good[1].reshape(5, 17)] + good[2:], ValueError, r"^grads\[1\] must have the shape of params\[1\] \(17, 5\), got \(5, 17\)"),
        "layout": (good[:2] + [np.zeros(2000, np.float32)[::2]] + good[3:], ValueError, r"^grads\[2\] must be C-contiguous"),
        "None": (good[:4] + [None], TypeError, r"^grads\[4\] must be a NumPy array"),
        "overlap": (good[:3] + [params[3]] + good[4:], ValueError, r"^grads\[3\] overlaps a parameter or optimizer-state buffer"),
        "int": (good[:1] + [np.zeros(17 * 5, np.int32).reshape(17, 5)] + good[2:], TypeError, r"^grads\[1\] must have dtype float32, float64, bfloat16 or float16"),
        "not a sequence": (good[0], TypeError, r"^grads must be a sequence"),
    }


@pytest.mark.parametrize("case", list(bad_grads_cases(make_params())))
def test_rejected_step_changes_nothing(case):
    params = make_params()
    opt = fastadam.Adam(params, amsgrad=True)
    opt.step(make_grads(params, 7))
    grads, exc, match = bad_grads_cases(params)[case]
    before = snapshot(opt, params)
    with pytest.raises(exc, match=match):
        opt.step(grads)
    assert snapshot(opt, params) == before


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_skip_if_nonfinite_changes_nothing_and_counts(dtype, bad_value):
    params = make_params(dtype, shapes=[(10,), (70000,)])
    opt = fastadam.Adam(params, num_threads=2)
    opt.step(make_grads(params, 0))
    grads = make_grads(params, 1)
    grads[1][54321] = bad_value
    before = snapshot(opt, params)
    assert opt.step(grads, skip_if_nonfinite=True) is False
    assert snapshot(opt, params) == before
    assert opt.skipped_steps == 1
    assert opt.step(make_grads(params, 2), skip_if_nonfinite=True) is True
    assert opt.state[0]["step"] == 2


def test_a_skipped_first_amsgrad_step_allocates_no_state():
    # Found by tests/test_fuzz.py: the skip used to come after max_exp_avg_sq was allocated.
    params = make_params(shapes=[(4,)])
    opt = fastadam.Adam(params, amsgrad=True)
    before = opt.state
    assert opt.step([np.full(4, np.nan, np.float32)], skip_if_nonfinite=True) is False
    assert opt.state[0].keys() == before[0].keys() == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.step(make_grads(params, 0), skip_if_nonfinite=True) is True
    assert opt.state[0]["max_exp_avg_sq"].any()


def test_nonfinite_grads_propagate_without_the_flag():
    params = make_params(shapes=[(4,)])
    opt = fastadam.Adam(params)
    opt.step([np.array([np.nan, 1, 1, 1], np.float32)])
    assert np.isnan(params[0][0]) and np.isfinite(params[0][1:]).all()


def test_grad_scale_divides_gradients():
    params = make_params()
    opt = fastadam.Adam(params)
    ref = Reference(params)
    grads = make_grads(params, 0)
    opt.step([g * 1024 for g in grads], grad_scale=1024.0)
    ref.step(grads)
    for p, r in zip(params, ref.params):
        np.testing.assert_array_equal(p, r)
    with pytest.raises(ValueError, match="^grad_scale must be > 0.0"):
        opt.step(grads, grad_scale=0.0)


# --- construction errors ---------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, match", [
    ({"lr": -1.0}, ValueError, r"^lr must be >= 0.0"),
    ({"betas": (0.9, 1.0)}, ValueError, r"^betas\[1\] must be in \[0, 1\)"),
    ({"betas": 0.9}, TypeError, r"^betas must be a pair"),
    ({"eps": float("nan")}, ValueError, r"^eps must be finite"),
    ({"weight_decay": -0.1}, ValueError, r"^weight_decay must be >= 0.0"),
    ({"amsgrad": "yes"}, TypeError, r"^amsgrad must be a bool"),
    ({"num_threads": 0}, ValueError, r"num_threads must be None or a positive integer"),
    ({"eps_hat": True, "eps_root": 1e-8}, ValueError, r"two different epsilon forms"),
])
def test_bad_hyperparameters_are_rejected(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastadam.Adam(make_params(), **kwargs)


def test_bad_params_are_rejected():
    p = make_params()
    with pytest.raises(TypeError, match="wrap a single array in a list"):
        fastadam.Adam(p[0])
    with pytest.raises(ValueError, match="at least one parameter"):
        fastadam.Adam([])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] overlaps param_groups\[0\]\['params'\]\[0\]"):
        fastadam.Adam([p[0], p[0]])
    with pytest.raises(ValueError, match=r"must be writable"):
        ro = p[1].copy()
        ro.flags.writeable = False
        fastadam.Adam([ro])
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] must have dtype float32, float64, bfloat16 or float16"):
        fastadam.Adam([np.zeros(3, np.int64)])
    unaligned = np.frombuffer(bytearray(41), np.float32, count=10, offset=1)
    with pytest.raises(ValueError, match="must be aligned"):
        fastadam.Adam([unaligned])
    with pytest.raises(ValueError, match="unknown keys"):
        fastadam.Adam([{"params": p[:1], "learning_rate": 0.1}])


# --- state dicts -----------------------------------------------------------------------------

def test_state_dict_layout_is_pytorchs():
    params = make_params()
    opt = fastadam.Adam([{"params": params[:2]}, {"params": params[2:], "amsgrad": True}])
    opt.step(make_grads(params, 0))
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert sd["param_groups"][0]["params"] == [0, 1] and sd["param_groups"][1]["params"] == [2, 3, 4]
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(sd["state"][3]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert sd["state"][1]["exp_avg"].shape == (17, 5)
    sd["state"][0]["exp_avg"][...] = 123  # a snapshot, not a view
    assert not (opt.state[0]["exp_avg"] == 123).any()


def test_state_dict_round_trip_continues_identically():
    params = make_params()
    opt = fastadam.Adam(params, amsgrad=True, lr=0.01)
    for t in range(3):
        opt.step(make_grads(params, t))
    clone_params = [p.copy() for p in params]
    clone = fastadam.Adam(clone_params, amsgrad=False, lr=0.5)
    clone.load_state_dict(opt.state_dict())
    assert clone.param_groups[0]["lr"] == 0.01 and clone.param_groups[0]["amsgrad"] is True
    for t in range(3, 6):
        grads = make_grads(params, t)
        opt.step(grads)
        clone.step(grads)
    for p, c in zip(params, clone_params):
        np.testing.assert_array_equal(p, c)


@pytest.mark.parametrize("mutate, match", [
    (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), r"state_dict has 2 param groups, the optimizer has 1"),
    (lambda sd: sd["param_groups"][0]["params"].pop(), r"has 4 params, the optimizer's group 0 has 5"),
    (lambda sd: sd["state"][1].update(exp_avg=np.zeros((5, 17), np.float32)), r"\['exp_avg'\] has shape \(5, 17\), parameter 1 has \(17, 5\)"),
    (lambda sd: sd["state"][2].update(exp_avg_sq=np.zeros(1000, np.float64)), r"\['exp_avg_sq'\] has dtype float64, parameter 2's state has float32"),
    (lambda sd: sd["state"][0].update(step=-1), r"\['step'\] must be a whole number in \[0, 2\*\*63 - 2\], got -1"),
    (lambda sd: sd["state"][0].update(step=float("inf")), r"\['step'\] must be a whole number >= 0, got inf"),
    (lambda sd: sd["param_groups"][0].update(params=[0, 0, 1, 2, 3]), r"repeats the parameter id 0"),
    (lambda sd: sd["state"][0].update(step=1.5), r"\['step'\] must be a whole number >= 0"),
    # found by tests/test_fuzz.py: an OverflowError before
    (lambda sd: sd["state"][0].update(step=Fraction(10**400, 3)), r"must be a whole number >= 0"),
    (lambda sd: sd["state"][0].pop("exp_avg"), r"must have 'step', 'exp_avg' and 'exp_avg_sq'"),
    (lambda sd: sd["state"][0].pop("max_exp_avg_sq"), r"lacks 'max_exp_avg_sq' but its group uses amsgrad"),
    (lambda sd: sd["state"].update({99: sd["state"][0]}), r"belongs to no parameter"),
    (lambda sd: sd["param_groups"][0].update(betas=(0.9, 2.0)), r"\['betas'\]\[1\] must be in \[0, 1\)"),
])
def test_load_state_dict_rejects_mismatches_and_changes_nothing(mutate, match):
    params = make_params()
    opt = fastadam.Adam(params, amsgrad=True)
    opt.step(make_grads(params, 0))
    sd = opt.state_dict()
    opt.step(make_grads(params, 1))
    mutate(sd)
    before = snapshot(opt, params), [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert (snapshot(opt, params), [dict(g) for g in opt.param_groups]) == before


@pytest.mark.parametrize("position", [0, 3, 6])
def test_nonfinite_scan_finds_every_position_and_spares_extreme_finite_values(dtype, position):
    finfo = np.finfo(dtype)
    params = make_params(dtype, shapes=[(7,)])
    opt = fastadam.Adam(params)
    extreme = np.array([finfo.max, -finfo.max, finfo.tiny, finfo.smallest_subnormal, -0.0, 0.0, 1.0], dtype)
    assert opt.step([extreme], skip_if_nonfinite=True) is True
    grad = np.ones(7, dtype)
    grad[position] = np.nan
    assert opt.step([grad], skip_if_nonfinite=True) is False


# --- groups edited in ways the state cannot follow, and other misuse ----------------------

def two_group_optimizer():
    a, b = make_params(shapes=[(3,)]), make_params(shapes=[(5,)], seed=1)
    opt = fastadam.Adam([{"params": a}, {"params": b, "lr": 0.1}])
    opt.step(make_grads(a + b, 0))
    return a + b, opt


@pytest.mark.parametrize("edit, match", [
    (lambda groups: groups.pop(), r"param_groups has 1 groups, the optimizer was built with 2"),
    (lambda groups: groups.reverse(), r"param_groups\[0\]\['params'\] was replaced or the groups reordered"),
    (lambda groups: groups[1].update(params=(np.zeros(5, np.float32),)), r"param_groups\[1\]\['params'\] was replaced"),
])
def test_structural_edits_of_param_groups_are_refused(edit, match):
    params, opt = two_group_optimizer()
    edit(opt.param_groups)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=match):
        opt.step(make_grads(params, 1))
    assert snapshot(opt, params) == before


def test_group_params_are_a_tuple():
    params, opt = two_group_optimizer()
    assert isinstance(opt.param_groups[0]["params"], tuple)
    with pytest.raises(AttributeError):
        opt.param_groups[0]["params"].append(np.zeros(3, np.float32))


def test_a_rejected_step_allocates_no_amsgrad_state():
    params = make_params()
    opt = fastadam.Adam(params)
    opt.step(make_grads(params, 0))
    opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(ValueError):
        opt.step(make_grads(params, 1)[:-1])
    assert "max_exp_avg_sq" not in opt.state[0]
    assert set(opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"lr": 10**400}, ValueError, r"^lr must be finite"),
    ({"num_threads": 2**40}, ValueError, r"num_threads must be None or a positive integer up to 2147483647"),
])
def test_huge_values_are_value_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastadam.Adam(make_params(), **kwargs)


def test_num_threads_attribute_is_validated():
    opt = fastadam.Adam(make_params())
    with pytest.raises(ValueError, match="num_threads"):
        opt.num_threads = -3
    opt.num_threads = 2
    assert opt.num_threads == 2


def test_schedule_overflow_is_a_clear_error():
    params = make_params()
    opt = fastadam.Adam(params, lr=schedules.exponential(1.0, decay_rate=10.0))
    sd = opt.state_dict()
    for entry in sd["state"].values():
        entry["step"] = 400  # 10.0 ** 401 overflows a double
    opt.load_state_dict(sd)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] \(the schedule's value at step 401\) must be finite"):
        opt.step(make_grads(params, 0))


@pytest.mark.parametrize("step", [np.int64(3), 3.0, np.float32(3.0), np.array(3.0), 2**63 - 2])
def test_saved_steps_in_every_whole_number_form_load(step):
    params = make_params(shapes=[(4,)])
    opt = fastadam.Adam(params)
    sd = opt.state_dict()
    sd["state"][0]["step"] = step
    opt.load_state_dict(sd)
    assert opt.state[0]["step"] == int(step)


@pytest.mark.parametrize("steps_before", [1, 3])
def test_a_count_that_reaches_the_int64_limit_is_refused_by_name(steps_before):
    # A step looks at the counts only near the limit (the engine keeps a ceiling of
    # them): a count stepped up to 2**63 - 1 from a loaded one is still caught, and the
    # refused step changes nothing.
    params = make_params(shapes=[(4,), (3,)])
    opt = fastadam.Adam(params)
    sd = opt.state_dict()
    sd["state"][1]["step"] = 2**63 - 1 - steps_before
    opt.load_state_dict(sd)
    for k in range(steps_before):
        opt.step(make_grads(params, k))
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match=r"the step count of param_groups\[0\]\['params'\]\[1\] is 9223372036854775807"):
        opt.step(make_grads(params, 5))
    assert all(np.array_equal(p, q) for p, q in zip(params, before))
    assert [e["step"] for e in opt.state] == [steps_before, 2**63 - 1]


@pytest.mark.parametrize("state_dict, exc", [
    ({"state": [], "param_groups": []}, TypeError),
    ({"state": {}, "param_groups": [3]}, TypeError),
    ({"state": {}, "param_groups": "ab"}, TypeError),
    ([], TypeError),
])
def test_malformed_state_dicts_are_type_errors(state_dict, exc):
    opt = fastadam.Adam(make_params(shapes=[(4,)]))
    with pytest.raises(exc):
        opt.load_state_dict(state_dict)


def test_saved_step_as_string_is_a_type_error():
    opt = fastadam.Adam(make_params(shapes=[(4,)]))
    sd = opt.state_dict()
    sd["state"][0]["step"] = "5"
    with pytest.raises(TypeError, match=r"\['step'\] must be a whole number, got str"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("grads", ["abcde", {0: 1}], ids=["str", "dict"])
def test_grads_must_be_a_real_sequence(grads):
    opt = fastadam.Adam(make_params())
    with pytest.raises(TypeError, match="^grads must be a sequence"):
        opt.step(grads)


def test_skip_flag_accepts_numpy_bools():
    params = make_params()
    opt = fastadam.Adam(params)
    assert opt.step(make_grads(params, 0), skip_if_nonfinite=np.True_) is True
    with pytest.raises(TypeError, match="^skip_if_nonfinite must be a bool"):
        opt.step(make_grads(params, 0), skip_if_nonfinite=1)


def test_flat_grad_for_nd_param_is_rejected_on_the_fast_path_too():
    params = make_params()
    grads = make_grads(params, 0)
    grads[1] = grads[1].reshape(-1)
    opt = fastadam.Adam(params)
    with pytest.raises(ValueError, match=r"grads\[1\] must have the shape of params\[1\]"):
        opt.step(grads)


def test_deepcopy_after_steps_is_independent():
    import copy
    params = make_params()
    opt = fastadam.Adam(params)
    opt.step(make_grads(params, 0))
    clone = copy.deepcopy(opt)
    clone.step(make_grads(params, 1))  # steps the clone's own copies of the params
    assert opt.state[0]["step"] == 1 and clone.state[0]["step"] == 2


def test_empty_tensor_sharing_an_address_does_not_borrow_another_groups_settings():
    base = np.zeros(8)
    empty = np.ndarray((0,), np.float64, buffer=base, offset=32)  # the address of base[4]
    opt = fastadam.Adam([{"params": [base[:4], empty], "lr": 0.1}, {"params": [base[4:]], "lr": 0.0}])
    opt.step([np.ones(4), np.ones(0), np.ones(4)])
    np.testing.assert_allclose(base[:4], -0.1, rtol=1e-6)
    np.testing.assert_array_equal(base[4:], 0.0)  # lr 0: unchanged


# --- issue 19, items 7 and 9 (the engine's part) ----------------------------------------------

def test_a_parameter_that_is_the_optimizers_own_state_is_refused():
    # add_param_group accepted a parameter that was another parameter's live exp_avg, and
    # the results were wrong: the engine's overlap check covers the memory it owns.
    param = np.ones(8, np.float32)
    opt = fastadam.Adam([param], lr=0.1)
    opt.step([np.ones(8, np.float32)])
    for key in ("exp_avg", "exp_avg_sq"):
        with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] overlaps the "
                                             rf"optimizer's {key} of param_groups\[0\]"):
            opt.add_param_group({"params": [opt.state[0][key]]})
    assert len(opt.param_groups) == 1 and len(opt.state) == 1  # nothing was added


@pytest.mark.parametrize("copy_kind", ["deepcopy", "pickle"])
def test_a_copy_of_an_optimizer_over_foreign_buffers_updates_its_own_buffers(copy_kind):
    # A copy of fastadam.Adam over array.array parameters: the copy's param_groups hold
    # copies of the buffers, and the copy updates exactly those (it used to update a
    # private array and leave its own param_groups unchanged); the original is untouched.
    import array
    import copy
    import pickle

    param = array.array("f", [1.0] * 8)
    opt = fastadam.Adam([param], lr=0.1)
    opt.step([np.ones(8, np.float32)])
    clone = copy.deepcopy(opt) if copy_kind == "deepcopy" else pickle.loads(pickle.dumps(opt))
    theirs = clone.param_groups[0]["params"][0]
    assert isinstance(theirs, array.array) and theirs is not param
    before = list(param)
    clone.step([np.ones(8, np.float32)])
    assert list(param) == before  # the original's buffer: untouched
    reference = array.array("f", before)
    twin = fastadam.Adam([reference], lr=0.1)
    twin.load_state_dict(opt.state_dict())
    twin.step([np.ones(8, np.float32)])
    assert list(theirs) == list(reference) != before  # the copy's own buffer moved
