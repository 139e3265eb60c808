"""JAX front end: ``fastadam.jax.adam`` / ``adamw``, an in-place Adam step for pytrees of
JAX CPU arrays that runs inside ``jax.jit``.

A step is ONE XLA custom call (``jax.ffi.ffi_call`` of fastadam's FFI handler,
fastadam._xla_ffi) per ``LEAVES_PER_CALL`` leaves of the tree (one for most models): the
kernels, threads and SIMD dispatch of ``fastadam.adam_step``, with the params, both
moments and the step count declared as outputs aliased to their inputs. When the caller's ``jax.jit`` donates params and
state (``donate_argnums``), XLA hands their buffers to the call and the update happens
in them: no copy, the same buffers step after step. Without donation XLA copies them
first (correct, only slower).

The interface has optax's shape, ``init(params) -> state`` and
``update(grads, state, params)``, except that ``update`` returns the new params rather
than updates to add: optax's ``apply_updates`` is folded into the step, which is what
lets it write in place (``p + u`` would read and write every parameter once more). The
state is ``AdamState(count, mu, nu)``, the fields of optax's ``ScaleByAdamState``.

Numerics: optax's ``adam``/``adamw`` (its ``eps`` and ``eps_root`` forms), within a few
ulps, and bit-identical to ``fastadam.adam_step`` on the same inputs.

Leaves may be float32, float64, bfloat16 or float16, one dtype per leaf for its param,
grad and moments (as optax keeps them by default). A 16-bit leaf is pure 16-bit: its
update is computed in float32 and param and moments are rounded to nearest even, as
``fastadam.adam_step`` and torch's fused Adam do (optax computes each operation in the
16-bit type; the two agree within a few of its ulps).
"""

from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Optional, Tuple

from fastadam._hints import missing_framework

try:
    import jax
    import jax.numpy as jnp
except ImportError as exc:  # say what to install (issue 23)
    raise missing_framework("jax", exc) from exc

import numpy as np

from fastadam import _xla_ffi
from fastadam._threads import threads_for
from fastadam._validation import (
    ELEMENT_TYPES,
    Hyperparameters,
    check_call_hyperparameters,
    check_element_type_range,
    check_num_threads,
    is_element_type,
    type_name,
)

__all__ = ["AdamState", "InPlaceTransformation", "adam", "adamw"]


def _register() -> None:
    """Register the handler with XLA for the CPU. XLA asks it for the FFI API version it
    was written against and refuses the registration if it does not support it."""
    try:
        jax.ffi.register_ffi_target(_xla_ffi.TARGET_NAME, _xla_ffi.handler(), platform="cpu",
                                    api_version=1)
    except Exception as exc:
        major, minor = _xla_ffi.api_version()
        raise ImportError(
            f"fastadam.jax: this jaxlib ({jax.__version__}) refused fastadam's XLA FFI "
            f"handler, written against XLA FFI API {major}.{minor}: {exc}") from exc


_register()


class AdamState(NamedTuple):
    """The optimizer state: optax's ``ScaleByAdamState`` fields.

    ``count``: int32 scalar, the steps taken. ``mu``, ``nu``: pytrees of the params'
    structure, shapes and dtypes (the moments; bfloat16 for a bfloat16 param)."""

    count: Any
    mu: Any
    nu: Any


class InPlaceTransformation(NamedTuple):
    """``init(params) -> AdamState``; ``update(grads, state, params) -> (new_params,
    new_state)``: one Adam step, in place when the caller's ``jax.jit`` donates
    ``params`` and ``state``; ``step``: ``update`` jitted with that donation."""

    init: Callable[[Any], AdamState]
    update: Callable[[Any, AdamState, Any], Tuple[Any, AdamState]]
    step: Callable[[Any, AdamState, Any], Tuple[Any, AdamState]]


def adam(learning_rate: Any = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         eps_root: float = 0.0, *, num_threads: Optional[int] = None,
         numerics: str = "exact") -> InPlaceTransformation:
    """Adam with optax's arguments and numerics (``optax.adam``), updating in place.

    Parameters
    ----------
    learning_rate : float or callable
        A number, or a schedule: a function of the step count (``state.count``, the
        steps already taken, as in optax) returning a float32 or float64 scalar, e.g. an
        ``optax.schedules`` function. A schedule's value is computed inside the step and
        checked when the step runs (finite, >= 0, and within the params' element type:
        else the call fails with XLA's error naming the learning rate).
    b1, b2, eps, eps_root : float
        As in ``optax.adam``.
    num_threads : int, optional
        OpenMP threads of each step; None follows :func:`fastadam.get_num_threads`. Read
        when ``jax.jit`` traces the step.
    numerics : {"exact", "fast"}
        fastadam's rounding profile (see the numerics guide).

    Raises
    ------
    TypeError, ValueError
        For a bad argument, naming it (here); for params, grads or state that do not fit
        each other (in ``init``/``update``, when traced).
    """
    return _transformation(learning_rate, b1, b2, eps, eps_root, 0.0, None, num_threads,
                           numerics)


def adamw(learning_rate: Any = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          eps_root: float = 0.0, weight_decay: float = 1e-4, mask: Any = None, *,
          num_threads: Optional[int] = None, numerics: str = "exact") -> InPlaceTransformation:
    """AdamW with optax's arguments and numerics (``optax.adamw``: decoupled weight decay,
    ``p -= learning_rate * weight_decay * p``), updating in place.

    ``mask``: as in optax, None (decay every leaf), or a pytree of the params' structure
    whose leaves are bools, or a function of the params returning one: leaves marked
    False are not decayed. The bools must be Python or NumPy bools (the leaves are sorted
    by them when the step is traced). The other arguments as in :func:`adam`.
    """
    return _transformation(learning_rate, b1, b2, eps, eps_root, weight_decay, mask,
                           num_threads, numerics)


def _transformation(learning_rate: Any, b1: Any, b2: Any, eps: Any, eps_root: Any,
                    weight_decay: Any, mask: Any, num_threads: Any,
                    numerics: Any) -> InPlaceTransformation:
    schedule = learning_rate if callable(learning_rate) else None
    hp = _hyperparameters(0.0 if schedule else learning_rate, b1, b2, eps, eps_root,
                          weight_decay, numerics)
    threads = check_num_threads(num_threads)

    def init(params: Any) -> AdamState:
        leaves, _ = _float_leaves(params, "params")
        tree = jax.tree.structure(params)
        return AdamState(count=jnp.zeros((), jnp.int32),
                         mu=jax.tree.unflatten(tree, [jnp.zeros_like(p) for p in leaves]),
                         nu=jax.tree.unflatten(tree, [jnp.zeros_like(p) for p in leaves]))

    def update(grads: Any, state: AdamState, params: Any) -> Tuple[Any, AdamState]:
        lr = None if schedule is None else schedule(state.count)
        decayed = None if mask is None else (mask(params) if callable(mask) else mask)
        return _step(grads, state, params, hp, lr, decayed, threads)

    # jax.jit pairs each donated input with the first free output of its shape and dtype,
    # in order: the donated arguments must come in the order of the results (params, then
    # state), or the pairs cross (a moment's buffer for a param) and XLA copies them all.
    jitted = jax.jit(lambda params, state, grads: update(grads, state, params),
                     donate_argnums=(0, 1))

    def step(grads: Any, state: AdamState, params: Any) -> Tuple[Any, AdamState]:
        return jitted(params, state, grads)

    return InPlaceTransformation(init, update, step)


def _hyperparameters(learning_rate: Any, b1: Any, b2: Any, eps: Any, eps_root: Any,
                     weight_decay: Any, numerics: Any) -> Hyperparameters:
    """The validated record, with errors in optax's argument names."""
    if isinstance(numerics, str) and numerics == "torch":  # torch's per-tensor FMA tails
        raise ValueError('numerics must be "exact" or "fast" in fastadam.jax, got "torch" '
                         "(the rounding of torch's fused kernel, for fastadam.torch)")
    try:
        return check_call_hyperparameters(learning_rate, b1, b2, eps, weight_decay,
                                          weight_decay != 0.0, False, False, False, eps_root,
                                          numerics)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        for ours, theirs in (("lr", "learning_rate"), ("beta1", "b1"), ("beta2", "b2")):
            if message.startswith(f"{ours} "):
                message = theirs + message[len(ours):]
        raise type(exc)(message) from None


def _float_leaves(tree: Any, name: str) -> Tuple[List[Any], List[str]]:
    """The leaves of ``tree`` and their paths, each a float32/float64/bfloat16/float16
    array (or tracer) on the CPU, else a TypeError naming the leaf."""
    with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    leaves, paths = [], []
    for path, leaf in with_paths:
        where = f"{name}{jax.tree_util.keystr(path)}"
        dtype = getattr(leaf, "dtype", None)
        if not isinstance(leaf, (jax.Array, np.ndarray)) or not is_element_type(np.dtype(dtype)):
            raise TypeError(f"{where} must be a {ELEMENT_TYPES} array, got "
                            f"{type(leaf).__name__}{'' if dtype is None else f' of {dtype}'}")
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            platforms = {device.platform for device in leaf.devices()}
            if platforms != {"cpu"}:
                raise TypeError(f"{where} is on {', '.join(sorted(platforms))}: fastadam.jax "
                                "updates CPU arrays only")
        leaves.append(leaf)
        paths.append(where)
    return leaves, paths


def _matching(tree: Any, name: str, structure: Any, params: List[Any]) -> List[Any]:
    """The leaves of ``tree``, which must have the params' structure, shapes and dtypes
    (no mixing: a float32 grad of a bfloat16 param is refused, as optax would cast it)."""
    if jax.tree.structure(tree) != structure:
        raise ValueError(f"{name} has another tree structure than params: "
                         f"{jax.tree.structure(tree)} against {structure}")
    leaves, paths = _float_leaves(tree, name)
    for leaf, where, param in zip(leaves, paths, params):
        if leaf.dtype != param.dtype:
            raise TypeError(f"{where} is {type_name(np.dtype(leaf.dtype))}, its param is "
                            f"{type_name(np.dtype(param.dtype))}: a leaf's param, grad and "
                            "moments must have one dtype")
        if leaf.shape != param.shape:
            raise ValueError(f"{where} is {leaf.dtype}{list(leaf.shape)}, its param is "
                             f"{param.dtype}{list(param.shape)}")
    return leaves


def _decay_order(mask: Any, structure: Any, n: int) -> List[int]:
    """The leaves' order in the call: those to decay first (all of them without a mask)."""
    if mask is None:
        return list(range(n))
    if jax.tree.structure(mask) != structure:
        raise ValueError(f"mask has another tree structure than params: "
                         f"{jax.tree.structure(mask)} against {structure}")
    flags = jax.tree.leaves(mask)
    if not all(isinstance(flag, (bool, np.bool_)) for flag in flags):
        raise TypeError("mask's leaves must be Python or NumPy bools")
    return [i for i in range(n) if flags[i]] + [i for i in range(n) if not flags[i]]


def _traced_lr(lr: Any) -> Any:
    lr = jnp.asarray(lr)
    if lr.shape != () or lr.dtype not in (jnp.float32, jnp.float64):
        raise TypeError(f"the learning-rate schedule must return a float32 or float64 scalar, "
                        f"got {lr.dtype}{list(lr.shape)}")
    return lr


def _step(grads: Any, state: AdamState, params: Any, hp: Hyperparameters, lr: Any,
          mask: Any, num_threads: Optional[int]) -> Tuple[Any, AdamState]:
    """One step of every leaf as one XLA custom call (fastadam._xla_ffi's operands).
    ``lr``: None (``hp.lr``) or a schedule's value; ``mask``: None or a pytree of bools."""
    if not isinstance(state, AdamState):
        raise TypeError(f"state must be a fastadam.jax.AdamState, got {type(state).__name__}")
    param_leaves, _ = _float_leaves(params, "params")
    structure = jax.tree.structure(params)
    grad_leaves = _matching(grads, "grads", structure, param_leaves)
    mu = _matching(state.mu, "state.mu", structure, param_leaves)
    nu = _matching(state.nu, "state.nu", structure, param_leaves)
    count = state.count
    if getattr(count, "shape", None) != () or np.dtype(getattr(count, "dtype", None)) not in (
            np.dtype(np.int32), np.dtype(np.int64)):
        raise TypeError("state.count must be an int32 or int64 scalar array")
    n = len(param_leaves)
    order = _decay_order(mask, structure, n)
    decayed = n if mask is None else sum(1 for flag in jax.tree.leaves(mask) if flag)
    lr = None if lr is None else _traced_lr(lr)
    p, g, m, v = ([leaves[i] for i in order] for leaves in (param_leaves, grad_leaves, mu, nu))
    count, p, m, v, _ = call_kernels(count, lr, p, g, m, v, None, hp, decayed, num_threads)

    def tree(leaves: List[Any]) -> Any:
        unsorted: List[Any] = [None] * n
        for position, i in enumerate(order):
            unsorted[i] = leaves[position]
        return jax.tree.unflatten(structure, unsorted)

    return tree(p), AdamState(count=count, mu=tree(m), nu=tree(v))


# Leaves per custom call. XLA's compile time grows faster than linearly with the number
# of aliased results of one instruction (in its fusion pass: one call over 100 leaves
# compiled in 0.5 s, over 400 in 14 s, over 2000 in minutes). In calls of 64 leaves,
# chained through the count, a step of 400 leaves compiles in 0.5 s and of 2000 in 4.7 s
# (optax.adam's: 2.6 s and 27 s; this machine, loaded). Each call is one kernel pass
# over its leaves.
LEAVES_PER_CALL = 64


def call_kernels(count: Any, lr: Any, params: List[Any], grads: List[Any], mu: List[Any],
                 nu: List[Any], nu_max: Optional[List[Any]], hp: Hyperparameters,
                 decayed: int, num_threads: Optional[int]) -> Tuple[Any, List[Any], List[Any],
                                                                    List[Any], List[Any]]:
    """The custom calls on checked leaves (each list in one order, of one shape and dtype
    per leaf; ``nu_max`` with ``hp.amsgrad``): (count + 1, params, mu, nu, nu_max), each
    list written into its input's buffers. ``lr``: None (``hp.lr``) or a float scalar
    array; weight decay applies to the first ``decayed`` leaves. For fastadam.jax and
    fastadam.keras on JAX."""
    check_element_type_range(hp, {np.dtype(p.dtype) for p in params})
    if hp.amsgrad:
        assert nu_max is not None, "amsgrad needs nu_max"
    blocks = [params, grads, mu, nu] + ([nu_max] if nu_max is not None and hp.amsgrad else [])
    if not params:
        return count + 1, [], [], [], []
    results: List[List[Any]] = [[] for _ in range(len(blocks) - 1)]
    for start in range(0, len(params), LEAVES_PER_CALL):
        stop = min(start + LEAVES_PER_CALL, len(params))
        # chained through the count: the last call increments it (see fastadam._xla_ffi)
        count, *out = _call(count, lr, [block[start:stop] for block in blocks], hp,
                            min(max(decayed - start, 0), stop - start), num_threads,
                            stop == len(params))
        for k, written in enumerate(out):
            results[k] += written
    return count, results[0], results[1], results[2], results[3] if len(results) > 3 else []


def _call(count: Any, lr: Any, blocks: List[List[Any]], hp: Hyperparameters, decayed: int,
          num_threads: Optional[int], increment: bool) -> List[Any]:
    """One custom call over the leaves of ``blocks`` ([params, grads, mu, nu(, nu_max)]):
    [count (+ 1 if ``increment``), new params, mu, nu(, nu_max)]."""
    n = len(blocks[0])
    lr_operand = [] if lr is None else [lr]
    total = sum(int(np.prod(p.shape)) for p in blocks[0])
    attributes = _xla_ffi.hyper_attributes(hp, threads_for(num_threads, total), lr is not None,
                                           decayed, increment)
    # args [count, (lr), params, grads, mu, nu, (nu_max)]; results [count, params, mu, nu,
    # (nu_max)], each aliased to its argument
    first = 1 + len(lr_operand)
    aliases = {0: 0}
    for i in range(n):
        aliases[first + i] = 1 + i
        for k in range(2, len(blocks)):
            aliases[first + k * n + i] = 1 + (k - 1) * n + i
    written = [count] + [a for k, block in enumerate(blocks) if k != 1 for a in block]
    results = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in written]
    call = jax.ffi.ffi_call(_xla_ffi.TARGET_NAME, results, input_output_aliases=aliases)
    out = call(count, *lr_operand, *(a for block in blocks for a in block), **attributes)
    return [out[0]] + [list(out[1 + k * n:1 + (k + 1) * n]) for k in range(len(blocks) - 1)]
