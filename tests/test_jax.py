"""fastadam.jax: one XLA custom call per step, in place, against fastadam.adam_step and optax."""

import functools
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastadam

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
fj = pytest.importorskip("fastadam.jax")

SHAPES = {"w": (37, 129), "b": (129,), "s": (), "big": (3, 5000)}  # "big": several chunks


def tree(seed, dtype=np.float32, shapes=SHAPES, scale=1.0):
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(dtype) for k, s in shapes.items()}


def as_jax(numpy_tree):
    return jax.tree.map(jnp.asarray, numpy_tree)


def random_state(seed, dtype, count):
    """A state with nonzero moments (nu > 0) at step ``count``: one step then tests the
    whole update, not only its first step from zeros."""
    mu, nu = tree(seed + 1, dtype), jax.tree.map(np.abs, tree(seed + 2, dtype))
    return mu, nu, count


def fastadam_steps(params, grads_per_step, mu, nu, count, **kwargs):
    """adam_step on NumPy copies, leaf by leaf: the reference fastadam.jax must equal."""
    params, mu, nu = (jax.tree.map(np.array, t) for t in (params, mu, nu))
    for grads in grads_per_step:
        count += 1
        for k in params:
            fastadam.adam_step(params[k], np.asarray(grads[k]), mu[k], nu[k], step=count, **kwargs)
    return params, mu, nu


def run(opt, params, grads_per_step, mu, nu, count, count_dtype=np.int32):
    state = fj.AdamState(jnp.asarray(count, count_dtype), as_jax(mu), as_jax(nu))
    p = as_jax(params)
    for grads in grads_per_step:
        p, state = opt.step(as_jax(grads), state, p)
    return p, state


def assert_trees_equal(a, b):
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


CONFIGS = [
    (dict(learning_rate=1e-2), dict(lr=1e-2)),
    (dict(learning_rate=3e-3, b1=0.8, b2=0.99, eps=1e-6), dict(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6)),
    (dict(learning_rate=1e-2, eps=0.0, eps_root=1e-8), dict(lr=1e-2, eps=0.0, eps_root=1e-8)),
    (dict(learning_rate=1e-2, eps_root=1e-12), dict(lr=1e-2, eps_root=1e-12)),
    (dict(learning_rate=1e-2, numerics="fast"), dict(lr=1e-2, numerics="fast")),
]
CONFIG_IDS = ["default", "betas", "eps_root", "both_eps", "fast"]


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("ours, theirs", CONFIGS, ids=CONFIG_IDS)
def test_bit_identical_to_adam_step_float32(ours, theirs, weight_decay):
    params, (mu, nu, count) = tree(0), random_state(0, np.float32, 7)
    grads = [tree(10 + i) for i in range(3)]
    if weight_decay:
        opt = fj.adamw(**ours, weight_decay=weight_decay)
        theirs = dict(theirs, weight_decay=weight_decay, decoupled_weight_decay=True)
    else:
        opt = fj.adam(**ours)
    p, state = run(opt, params, grads, mu, nu, count)
    ref_p, ref_mu, ref_nu = fastadam_steps(params, grads, mu, nu, count, **theirs)
    assert_trees_equal(p, ref_p)
    assert_trees_equal(state.mu, ref_mu)
    assert_trees_equal(state.nu, ref_nu)
    assert int(state.count) == count + 3 and state.count.dtype == jnp.int32


@pytest.mark.parametrize("ours, theirs", CONFIGS[:3], ids=CONFIG_IDS[:3])
def test_bit_identical_to_adam_step_float64_and_mixed_trees(ours, theirs):
    with jax.enable_x64(True):
        params = dict(tree(0, np.float64), f32=tree(1)["w"])
        mu = dict(random_state(0, np.float64, 0)[0], f32=np.zeros((37, 129), np.float32))
        nu = dict(random_state(0, np.float64, 0)[1], f32=np.zeros((37, 129), np.float32))
        grads = [dict(tree(10 + i, np.float64), f32=tree(20 + i)["w"]) for i in range(3)]
        p, state = run(fj.adam(**ours), params, grads, mu, nu, 41, count_dtype=np.int64)
        ref_p, ref_mu, ref_nu = fastadam_steps(params, grads, mu, nu, 41, **theirs)
        assert p["w"].dtype == jnp.float64 and p["f32"].dtype == jnp.float32
        assert_trees_equal(p, ref_p)
        assert_trees_equal(state.mu, ref_mu)
        assert int(state.count) == 44 and state.count.dtype == jnp.int64


def ulps(a, b):
    """Distance in units in the last place of the larger magnitude."""
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b) / np.spacing(np.maximum(np.abs(a), np.abs(b)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind, kwargs", [
    ("adam", dict(learning_rate=1e-2)),
    ("adam", dict(learning_rate=1e-2, eps=0.0, eps_root=1e-8)),
    ("adam", dict(learning_rate=1e-2, eps=1e-3, eps_root=1e-4)),
    ("adamw", dict(learning_rate=1e-2, weight_decay=0.1)),
    ("adamw", dict(learning_rate=1e-2, eps=0.0, eps_root=1e-8, weight_decay=0.1)),
], ids=["adam", "adam-eps_root", "adam-both", "adamw", "adamw-eps_root"])
@pytest.mark.parametrize("count", [0, 9, 999])
def test_within_a_few_ulps_of_optax(kind, kwargs, dtype, count):
    """One step from the same state, against optax computing in float64 (for float32
    leaves too: optax's own float32 step rounds its bias corrections in float32, from
    b2 rounded to float32, 1.3e-5 off at step 1 with b2=0.999, which fastadam, computing
    them in double, is not). The first moment is a lerp in fastadam,
    ``m + (1-b1)(g - m)``, and ``(1-b1) g + b1 m`` in optax: when g and m have opposite
    signs the sum cancels and the two roundings differ by an ulp of the inputs, which the
    update then scales up by lr / sqrt(v). So the moments here have the gradient's sign,
    and each quantity is compared in ulps of its own magnitude."""
    optax = pytest.importorskip("optax")
    params, grads = tree(0, dtype), jax.tree.map(np.abs, tree(5, dtype))
    if count:
        mu, nu = (jax.tree.map(np.abs, tree(seed, dtype, scale=0.1)) for seed in (1, 2))
    else:
        mu = nu = jax.tree.map(np.zeros_like, params)
    with jax.enable_x64(True):
        wide = functools.partial(jax.tree.map, lambda a: jnp.asarray(a, jnp.float64))
        theirs = getattr(optax, kind)(**kwargs)
        state = theirs.init(wide(params))
        state = (state[0]._replace(count=jnp.asarray(count, jnp.int32), mu=wide(mu), nu=wide(nu)),
                 *state[1:])
        updates, new_state = jax.jit(theirs.update)(wide(grads), state, wide(params))
        expected = jax.tree.map(np.asarray, optax.apply_updates(wide(params), updates))
        expected_mu, expected_nu = (jax.tree.map(np.asarray, t) for t in new_state[0][1:])
    with jax.enable_x64(dtype == np.float64):
        p, ours = run(getattr(fj, kind)(**kwargs), params, [grads], mu, nu, count)
    for k in params:
        assert ulps(ours.mu[k], expected_mu[k].astype(dtype)).max() <= 2, k
        assert ulps(ours.nu[k], expected_nu[k].astype(dtype)).max() <= 2, k
        # a few ulps of the largest of the param, its step and the result (AdamW's decay
        # is a factor in fastadam, a term of the update in optax)
        step = np.abs(expected[k] - params[k])
        scale = np.maximum(np.maximum(np.abs(params[k]), step), np.abs(expected[k])).astype(dtype)
        err = np.abs(np.asarray(p[k], np.float64) - expected[k])
        assert (err <= 4 * np.spacing(scale)).all(), (k, (err / np.spacing(scale)).max())


# --- bfloat16 and float16 leaves: pure 16-bit, float32 math --------------------------------------

HALF = [jnp.bfloat16, np.float16]


@pytest.mark.parametrize("dtype", HALF, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("kind, ours, theirs", [
    ("adam", dict(learning_rate=1e-2), dict(lr=1e-2)),
    ("adam", dict(learning_rate=1e-2, eps=0.0, eps_root=1e-8), dict(lr=1e-2, eps=0.0, eps_root=1e-8)),
    ("adamw", dict(learning_rate=1e-2, weight_decay=0.1),
     dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
], ids=["adam", "eps_root", "adamw"])
def test_16_bit_leaves_are_bit_identical_to_adam_step(dtype, kind, ours, theirs):
    dtype = np.dtype(dtype)
    params, (mu, nu, count) = tree(0, dtype), random_state(0, dtype, 7)
    # a float32 leaf beside them: each leaf keeps its own dtype in the one call
    params["f32"], mu["f32"], nu["f32"] = tree(9)["w"], np.zeros((37, 129), np.float32), \
        np.zeros((37, 129), np.float32)
    grads = [dict(tree(10 + i, dtype), f32=tree(20 + i)["w"]) for i in range(3)]
    p, state = run(getattr(fj, kind)(**ours), params, grads, mu, nu, count)
    ref_p, ref_mu, ref_nu = fastadam_steps(params, grads, mu, nu, count, **theirs)
    assert p["w"].dtype == dtype and state.mu["w"].dtype == dtype and p["f32"].dtype == jnp.float32
    for ours_tree, ref_tree in ((p, ref_p), (state.mu, ref_mu), (state.nu, ref_nu)):
        for k in ref_tree:  # bit for bit (the 16-bit values as their bits)
            np.testing.assert_array_equal(np.asarray(ours_tree[k]).reshape(-1).view(np.uint8),
                                          np.asarray(ref_tree[k]).reshape(-1).view(np.uint8),
                                          err_msg=k)
    assert int(state.count) == count + 3


def half_spacing(values, dtype):
    """The spacing of 16-bit ``dtype`` at the magnitudes ``values`` (float64)."""
    single = np.spacing(np.abs(values).astype(np.float32)).astype(np.float64)
    if np.dtype(dtype) == np.dtype(np.float16):
        return np.maximum(single * 2.0**13, 2.0**-24)  # (float16's subnormal spacing)
    return single * 2.0**16


@pytest.mark.parametrize("kind, kwargs", [
    ("adam", dict(learning_rate=1e-2)),
    ("adamw", dict(learning_rate=1e-2, weight_decay=0.1)),
], ids=["adam", "adamw"])
@pytest.mark.parametrize("count", [0, 9])
def test_bfloat16_leaves_are_within_a_few_ulps_of_optax_on_bfloat16_params(kind, kwargs, count):
    """One step from the same bfloat16 state against optax on the same bfloat16 params
    (which computes each operation in bfloat16, where fastadam computes in float32 and
    rounds once): param, mu and nu within a few units of bfloat16's last place. (Not
    float16: there optax's eps=1e-8 rounds to 0 and a gradient whose square underflows
    gives 0/0 = NaN, where fastadam's float32 math gives a finite step.)"""
    optax = pytest.importorskip("optax")
    dtype = np.dtype(jnp.bfloat16)
    params, grads = tree(0, dtype), jax.tree.map(np.abs, tree(5, dtype))
    if count:
        mu, nu = (jax.tree.map(np.abs, tree(seed, dtype, scale=0.1)) for seed in (1, 2))
    else:
        mu = nu = jax.tree.map(np.zeros_like, params)
    theirs = getattr(optax, kind)(**kwargs)
    state = theirs.init(as_jax(params))
    state = (state[0]._replace(count=jnp.asarray(count, jnp.int32), mu=as_jax(mu), nu=as_jax(nu)),
             *state[1:])
    updates, new_state = jax.jit(theirs.update)(as_jax(grads), state, as_jax(params))
    expected = optax.apply_updates(as_jax(params), updates)
    p, ours = run(getattr(fj, kind)(**kwargs), params, [grads], mu, nu, count)
    for k in params:
        assert p[k].dtype == expected[k].dtype == dtype, k
        before = np.asarray(params[k]).astype(np.float64)
        # (measured here: up to 2 ulps for the param, 1 for the moments)
        for mine, reference, allowed in [(p[k], expected[k], 3), (ours.mu[k], new_state[0].mu[k], 2),
                                         (ours.nu[k], new_state[0].nu[k], 2)]:
            a, b = (np.asarray(x).astype(np.float64) for x in (mine, reference))
            # in ulps of the largest magnitude involved (for the param: before and after
            # the step, and the step, as for float32 above)
            scale = np.maximum(np.abs(a), np.abs(b))
            if mine is p[k]:
                scale = np.maximum(scale, np.maximum(np.abs(before), np.abs(b - before)))
            err = np.abs(a - b) / half_spacing(scale, dtype)
            assert err.max() <= allowed, (k, err.max())


def train_step_factory(opt, donate=True):
    """The documented pattern: the whole train step jitted, params and state donated."""
    def loss(params, x, y):
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        return jnp.mean((h @ params["w2"] - y) ** 2)

    @functools.partial(jax.jit, donate_argnums=(0, 1) if donate else ())
    def train_step(params, state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        params, state = opt.update(grads, state, params)
        return params, state, value

    return train_step


def mlp(seed=0):
    rng = np.random.default_rng(seed)
    params = {"w1": rng.standard_normal((16, 64)).astype(np.float32) * 0.3,
              "b1": np.zeros(64, np.float32),
              "w2": rng.standard_normal((64, 1)).astype(np.float32) * 0.3}
    x = rng.standard_normal((128, 16)).astype(np.float32)
    y = np.sin(x[:, :1])
    return as_jax(params), jnp.asarray(x), jnp.asarray(y)


def leaf_pointers(*trees):
    return [leaf.unsafe_buffer_pointer() for t in trees for leaf in jax.tree.leaves(t)]


def test_train_step_updates_in_place_with_one_custom_call_and_no_copy():
    opt = fj.adam(1e-2)
    params, x, y = mlp()
    state = opt.init(params)
    train_step = train_step_factory(opt)
    hlo = train_step.lower(params, state, x, y).compile().as_text()
    assert hlo.count('custom_call_target="fastadam_adam"') == 1
    assert " copy(" not in hlo
    before = leaf_pointers(params, state)
    losses = []
    for _ in range(30):
        params, state, value = train_step(params, state, x, y)
        losses.append(float(value))
        assert leaf_pointers(params, state) == before  # the same buffers, step after step
    assert train_step._cache_size() == 1  # the count is traced: one compilation for all steps
    assert int(state.count) == 30
    assert losses[-1] < 0.5 * losses[0]


def test_without_donation_xla_copies_and_the_caller_keeps_its_arrays():
    opt = fj.adam(1e-2)
    params, x, y = mlp()
    state = opt.init(params)
    train_step = train_step_factory(opt, donate=False)
    assert " copy(" in train_step.lower(params, state, x, y).compile().as_text()
    kept = jax.tree.map(np.array, params)
    new_params, new_state, _ = train_step(params, state, x, y)
    assert_trees_equal(params, kept)  # the inputs are untouched
    assert not np.array_equal(np.asarray(new_params["w1"]), kept["w1"])
    assert int(state.count) == 0 and int(new_state.count) == 1


def test_step_and_grad_match_the_same_loop_on_numpy():
    # jax.grad around the step, against adam_step fed the same gradients
    opt = fj.adamw(3e-3, weight_decay=0.01)
    params, x, y = mlp()
    reference = jax.tree.map(np.array, params)
    ref_mu = jax.tree.map(np.zeros_like, reference)
    ref_nu = jax.tree.map(np.zeros_like, reference)
    state = opt.init(params)
    grad_fn = jax.jit(jax.grad(lambda p: jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2)))
    for step in range(1, 6):
        grads = grad_fn(as_jax(reference))
        for k in reference:
            fastadam.adam_step(reference[k], np.asarray(grads[k]), ref_mu[k], ref_nu[k], step=step,
                               lr=3e-3, weight_decay=0.01, decoupled_weight_decay=True)
        params, state = opt.step(grads, state, params)
    assert_trees_equal(params, reference)


def test_many_leaves_take_one_call_per_64_and_keep_their_buffers():
    opt = fj.adam(1e-3)
    params = as_jax({f"t{i:03}": np.full(64, float(i), np.float32) for i in range(300)})
    grads = jax.tree.map(jnp.ones_like, params)
    state = opt.init(params)
    train = jax.jit(lambda p, s, g: opt.update(g, s, p), donate_argnums=(0, 1))
    hlo = train.lower(params, state, grads).compile().as_text()
    assert hlo.count('custom_call_target="fastadam_adam"') == 5  # ceil(300 / LEAVES_PER_CALL)
    assert fj.LEAVES_PER_CALL == 64
    assert " copy(" not in hlo
    before = leaf_pointers(params, state)
    for _ in range(3):
        params, state = train(params, state, grads)
    assert leaf_pointers(params, state) == before
    assert int(state.count) == 3
    for i in (0, 63, 64, 299):
        np.testing.assert_allclose(np.asarray(params[f"t{i:03}"]), i - 3e-3, rtol=1e-6, atol=1e-6)


def test_empty_tree_and_zero_size_leaves():
    opt = fj.adam(1e-2)
    params, state = opt.step({}, opt.init({}), {})
    assert params == {} and int(state.count) == 1
    p = {"e": jnp.zeros((0, 3), jnp.float32), "x": jnp.ones(3, jnp.float32)}
    p, state = opt.step({"e": jnp.zeros((0, 3), jnp.float32), "x": jnp.ones(3, jnp.float32)},
                        opt.init(p), p)
    assert p["e"].shape == (0, 3)
    np.testing.assert_allclose(np.asarray(p["x"]), 1.0 - 1e-2, rtol=1e-6)


def test_threads_give_identical_results():
    params, grads = tree(3, shapes={"a": (300_000,)}), tree(4, shapes={"a": (300_000,)})
    zeros = jax.tree.map(np.zeros_like, params)
    one, _ = run(fj.adam(1e-2, num_threads=1), params, [grads], zeros, zeros, 0)
    two, _ = run(fj.adam(1e-2, num_threads=2), params, [grads], zeros, zeros, 0)
    assert_trees_equal(one, two)


def test_pickled_state_continues_bit_identically():
    opt = fj.adam(1e-2)
    params, x, y = mlp()
    train_step = train_step_factory(opt)
    params, state, _ = train_step(params, opt.init(params), x, y)
    saved = pickle.dumps(jax.tree.map(np.asarray, (params, state)))
    params, state, _ = train_step(params, state, x, y)
    loaded_params, loaded_state = pickle.loads(saved)
    loaded_state = fj.AdamState(*[as_jax(f) if isinstance(f, dict) else jnp.asarray(f)
                                  for f in loaded_state])
    again, again_state, _ = train_step(as_jax(loaded_params), loaded_state, x, y)
    assert_trees_equal(again, params)
    assert int(again_state.count) == 2


def test_a_schedule_is_computed_in_the_step_from_the_count():
    # lr = schedule(count), count = the steps already taken (optax's convention); one
    # compilation for every step, bit-identical to adam_step with that lr
    def schedule(count):
        return 1e-2 * 0.5 ** count.astype(jnp.float32)

    params, grads = tree(0), [tree(10 + i) for i in range(4)]
    zeros = jax.tree.map(np.zeros_like, params)
    opt = fj.adam(schedule)
    p, state = run(opt, params, grads, zeros, zeros, 0)
    reference = jax.tree.map(np.array, params)
    mu, nu = jax.tree.map(np.zeros_like, reference), jax.tree.map(np.zeros_like, reference)
    for t, g in enumerate(grads):
        lr = float(np.float32(1e-2) * np.float32(0.5) ** np.float32(t))
        for k in reference:
            fastadam.adam_step(reference[k], g[k], mu[k], nu[k], step=t + 1, lr=lr)
    assert_trees_equal(p, reference)


def test_an_optax_schedule_matches_optax():
    optax = pytest.importorskip("optax")
    with jax.enable_x64(True):
        schedule = optax.exponential_decay(1e-2, transition_steps=2, decay_rate=0.5)
        params, grads = tree(0, np.float64), [tree(10 + i, np.float64) for i in range(5)]
        theirs = optax.adamw(schedule, weight_decay=0.1)
        expected, state = as_jax(params), theirs.init(as_jax(params))
        for g in grads:
            updates, state = theirs.update(as_jax(g), state, expected)
            expected = optax.apply_updates(expected, updates)
        zeros = jax.tree.map(np.zeros_like, params)
        # optax's count is int32, so its schedule gives float32 values: so does ours
        p, _ = run(fj.adamw(schedule, weight_decay=0.1), params, grads, zeros, zeros, 0)
        for k in params:
            np.testing.assert_allclose(np.asarray(p[k]), np.asarray(expected[k]), rtol=1e-13,
                                       atol=1e-15)


@pytest.mark.parametrize("value, message", [
    (float("nan"), "the learning rate must be a float32 or float64 scalar, finite and >= 0"),
    (-1e-3, "the learning rate must be a float32 or float64 scalar, finite and >= 0"),
    (1e38, "the learning rate 9.99999968e\\+37 makes the step coefficient or the decay factor overflow float32"),
])
def test_a_bad_scheduled_learning_rate_is_refused_when_the_step_runs(value, message):
    opt = fj.adam(lambda count: jnp.asarray(value, jnp.float32))
    params = {"w": jnp.ones(3, jnp.float32)}
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(opt.update(params, opt.init(params), params))
    np.testing.assert_array_equal(np.asarray(params["w"]), 1.0)


def test_a_schedule_must_return_a_float_scalar():
    opt = fj.adam(lambda count: count)
    params = {"w": jnp.ones(3, jnp.float32)}
    with pytest.raises(TypeError, match=r"schedule must return a float32 or float64 scalar, got int32\[\]"):
        opt.update(params, opt.init(params), params)


@pytest.mark.parametrize("as_function", [False, True], ids=["tree", "function"])
def test_adamw_mask_decays_only_the_marked_leaves(as_function):
    params, grads = tree(0), [tree(10 + i) for i in range(3)]
    flags = {"w": True, "b": False, "s": np.bool_(False), "big": True}
    zeros = jax.tree.map(np.zeros_like, params)
    mask = (lambda p: flags) if as_function else flags
    p, state = run(fj.adamw(1e-2, weight_decay=0.3, mask=mask), params, grads, zeros, zeros, 0)
    reference = jax.tree.map(np.array, params)
    mu, nu = jax.tree.map(np.zeros_like, reference), jax.tree.map(np.zeros_like, reference)
    for t, g in enumerate(grads):
        for k in reference:
            fastadam.adam_step(reference[k], g[k], mu[k], nu[k], step=t + 1, lr=1e-2,
                               weight_decay=0.3 if flags[k] else 0.0, decoupled_weight_decay=True)
    assert_trees_equal(p, reference)
    assert_trees_equal(state.nu, nu)


@pytest.mark.parametrize("mask, error, message", [
    ({"w": True}, ValueError, r"mask has another tree structure than params"),
    ({"w": True, "b": jnp.asarray(False)}, TypeError, r"mask's leaves must be Python or NumPy bools"),
])
def test_a_bad_mask_is_refused(mask, error, message):
    opt = fj.adamw(1e-2, mask=mask)
    params = {"w": jnp.ones(3, jnp.float32), "b": jnp.ones(2, jnp.float32)}
    with pytest.raises(error, match=message):
        opt.update(params, opt.init(params), params)


# --- bad input: a clear error naming what is wrong, and nothing changed -----------------

@pytest.mark.parametrize("change, error, message", [
    (lambda p, g, s: (dict(p, w=p["w"].astype(jnp.int32)), g, s), TypeError,
     r"params\['w'\] must be a float32, float64, bfloat16 or float16 array, got .* of int32"),
    (lambda p, g, s: (dict(p, w=p["w"].astype(jnp.bfloat16)), g, s), TypeError,
     r"grads\['w'\] is float32, its param is bfloat16: a leaf's param, grad and moments must "
     r"have one dtype"),
    (lambda p, g, s: (p, dict(g, w=g["w"][:3]), s), ValueError,
     r"grads\['w'\] is float32\[3, 129\], its param is float32\[37, 129\]"),
    (lambda p, g, s: (p, {"w": g["w"]}, s), ValueError,
     r"grads has another tree structure than params"),
    (lambda p, g, s: (p, g, s._replace(mu=[s.mu["w"], s.mu["b"]])), ValueError,
     r"state.mu has another tree structure than params"),
    (lambda p, g, s: (p, g, s._replace(nu=dict(s.nu, b=s.nu["b"].astype(jnp.float16)))),
     TypeError, r"state.nu\['b'\] is float16, its param is float32"),
    (lambda p, g, s: (p, g, s._replace(count=jnp.zeros(2, jnp.int32))), TypeError,
     r"state.count must be an int32 or int64 scalar"),
    (lambda p, g, s: (p, g, tuple(s)), TypeError, r"state must be a fastadam.jax.AdamState"),
], ids=["int-param", "bfloat16-param", "grad-shape", "grad-tree", "state-tree", "state-dtype",
        "count-shape", "not-a-state"])
def test_bad_input_is_refused_when_traced_and_nothing_changes(change, error, message):
    opt = fj.adam(1e-2)
    params = as_jax(tree(0, shapes={"w": (37, 129), "b": (129,)}))
    grads = jax.tree.map(jnp.ones_like, params)
    params, grads, state = change(params, grads, opt.init(params))
    kept = jax.tree.map(np.array, params)
    train = jax.jit(lambda p, s, g: opt.update(g, s, p), donate_argnums=(0, 1))
    with pytest.raises(error, match=message):
        train(params, state, grads)
    assert_trees_equal(params, kept)  # still readable: the error came before any donation


def test_a_negative_count_is_refused_by_the_handler():
    opt = fj.adam(1e-2)
    params = {"w": jnp.ones(3, jnp.float32)}
    state = opt.init(params)._replace(count=jnp.asarray(-1, jnp.int32))
    with pytest.raises(Exception, match=r"step count must be an int32 or int64 scalar, >= 0"):
        jax.block_until_ready(opt.update(params, state, params))
    np.testing.assert_array_equal(np.asarray(params["w"]), 1.0)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(learning_rate=-1.0), ValueError, r"^learning_rate must be >= 0"),
    (dict(b1=1.0), ValueError, r"^b1 must be in \[0, 1\)"),
    (dict(b2=-0.1), ValueError, r"^b2 must be in \[0, 1\)"),
    (dict(eps=float("nan")), ValueError, r"^eps "),
    (dict(eps_root=-1.0), ValueError, r"^eps_root must be >= 0"),
    (dict(num_threads=0), ValueError, r"^num_threads must be"),
    (dict(numerics="quick"), ValueError, r"numerics"),
    (dict(numerics="torch"), ValueError, r'numerics must be "exact" or "fast" in fastadam.jax'),
])
def test_bad_hyperparameters_are_refused_by_name(kwargs, error, message):
    with pytest.raises(error, match=message):
        fj.adam(**kwargs)


def test_float32_range_of_the_hyperparameters_is_checked_when_traced():
    opt = fj.adam(1e-2, eps=1e-50)  # a valid double, 0 in float32
    params = {"w": jnp.ones(3, jnp.float32)}
    with pytest.raises(ValueError, match=r"eps"):
        opt.update(params, opt.init(params), params)


def test_handler_declares_the_ffi_api_version_it_was_written_against():
    from fastadam import _xla_ffi

    assert _xla_ffi.api_version() == (0, 1)
    assert _xla_ffi.TARGET_NAME == "fastadam_adam"


def test_importing_fastadam_does_not_import_jax():
    code = "import sys, fastadam; print('jax' in sys.modules, 'jaxlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_import_fastadam_jax_without_jax_says_what_to_install():
    code = ("import sys; sys.modules['jax'] = None\n"
            "try:\n    import fastadam.jax\n"
            "except ModuleNotFoundError as e:\n    print(e.name, '|', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("jax | fastadam.jax needs jax, which is not installed: pip install jax")


# --- fastadam.keras.Adam on Keras's JAX backend (issue 22, item 2) ------------------------

@pytest.mark.slow
def test_keras_adam_on_the_jax_backend_runs_one_xla_call_with_keras_numerics():
    pytest.importorskip("keras")
    import json
    import os
    from pathlib import Path

    worker = Path(__file__).with_name("keras_jax_worker.py")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    out = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = {r["case"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert set(results) == {"plain", "amsgrad", "weight_decay", "clipnorm", "ema",
                            "accumulation", "loss_scale", "schedule"}
    for name, r in results.items():
        # Keras computes its step coefficient in float32, fastadam in double: the same
        # tolerance as tests/test_keras_adapter.py's on the torch backend
        assert r["diff"] <= 2e-6, name
        assert r["traces"] == 1, name  # the train step was traced once, with fastadam's call
        assert r["iterations"] == (4 if name == "accumulation" else 8), name
    assert results["plain"]["in_place"]
    assert results["plain"]["loaded"] == "fastadam.keras.Adam"
    assert results["plain"]["loaded_traces"] == 1


# --- the benchmark's raveled parameters (benchmarks/jax_adapter.py, docs/guide/jax.md) ---------

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_a_step_on_raveled_params_gives_the_bits_of_the_step_on_the_tree():
    # the update is elementwise: one flat array through ravel_pytree changes nothing but the
    # number of arrays a jitted step passes in and out (the guide's advice for many leaves)
    from jax.flatten_util import ravel_pytree

    params, grads = as_jax(tree(0)), as_jax(tree(1, scale=1e-2))
    opt = fj.adam(1e-2)
    tree_params, tree_state = params, opt.init(params)
    flat, unravel = ravel_pytree(params)
    flat_grads, _ = ravel_pytree(grads)
    flat_params, flat_state = [flat], opt.init([flat])
    for _ in range(3):
        tree_params, tree_state = opt.step(grads, tree_state, tree_params)
        flat_params, flat_state = opt.step([flat_grads], flat_state, flat_params)
    for name in SHAPES:
        np.testing.assert_array_equal(np.asarray(unravel(flat_params[0])[name]),
                                      np.asarray(tree_params[name]))
    for moment in ("mu", "nu"):
        np.testing.assert_array_equal(np.asarray(ravel_pytree(getattr(tree_state, moment))[0]),
                                      np.asarray(getattr(flat_state, moment)[0]))


def test_the_jax_benchmark_runs_and_reports_its_rows():
    pytest.importorskip("optax")
    result = subprocess.run([sys.executable, str(BENCHMARKS / "jax_adapter.py"), "--threads", "1",
                             "--workloads", "2^10", "--repeats", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # one XLA thread: Eigen's pool off, and the process on one CPU (XLA sizes its pool by them)
    first = result.stdout.splitlines()[0]
    assert "--xla_cpu_multi_thread_eigen=false" in first
    assert ("pinned to CPUs [" in first) == (len(os.sched_getaffinity(0)) > 1)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 2^10")]
    assert [row.split(" | ")[1] for row in rows] == [
        "fastadam.jax.adam", "optax.adam (jax.jit)", "JAX floor: a jitted identity",
        "fastadam.adam_step (NumPy)"]
    assert all(float(row.split(" | ")[2]) > 0 for row in rows)
