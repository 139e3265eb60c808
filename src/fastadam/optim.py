"""Adam and AdamW over NumPy arrays and buffer-protocol objects: the NumPy front end.

It turns buffers into validated NumPy views and param-group dicts into hyperparameter
records; everything else (state, step counts, the one-pass step) is the engine's
(fastadam._engine), as for every other front end. One ``step()`` validates everything
first, then makes a single call into the kernels for all tensors of all groups: one GIL
release, one OpenMP team, per-tensor coefficients computed in C.
"""

from __future__ import annotations

import functools
import threading
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    TypeVar,
    Union,
    cast,
)

import numpy as np

from fastadam._engine import STATE_KEYS, Engine
from fastadam._hints import keyword_names
from fastadam._threads import NumThreadsAttribute
from fastadam._validation import (
    HYPERPARAMETER_KEYS,
    OPTIONAL_KEYS,
    GroupMemo,
    Hyperparameters,
    as_array,
    check_at_least,
    check_flag,
    check_grad_scale_range,
    check_group_hyperparameters,
    check_group_in_full,
    check_params,
    check_seed,
    check_sequence,
    check_state_dtype,
    check_step_count,
    remembered_group,
    type_name,
)

LearningRate = Union[float, Callable[[int], float]]
Method = TypeVar("Method", bound=Callable[..., Any])


def _serialised(method: Method) -> Method:
    """Run ``method`` holding the optimizer's lock. The kernels release the GIL, so
    without it two threads stepping one optimizer would update the same buffers at once
    and count both steps; with it they take turns, as if called one after the other."""
    @functools.wraps(method)
    def locked(self: "Adam", *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return cast(Method, locked)


class Adam:
    """Adam (Kingma & Ba, 2015) over NumPy arrays and buffer-protocol objects.

    Parameters
    ----------
    params : sequence of buffers, or of param-group dicts
        The parameters, updated in place: float32 or float64, C-contiguous, aligned,
        writable and not overlapping. Param groups are dicts ``{"params": [...], "lr":
        ...}`` whose keys override the defaults below, as in PyTorch.
    lr : float or callable
        A learning rate, or a schedule ``step -> lr`` (see :mod:`fastadam.schedules`)
        called once per group per step with the group's 1-based step number (the step
        count of the group's first parameter).
    betas, eps, weight_decay, amsgrad, maximize, eps_hat, eps_root, decoupled_weight_decay, numerics
        As in :func:`fastadam.adam_step` (each may differ per group).
    num_threads : int, optional
        OpenMP threads for each step; None follows :func:`fastadam.get_num_threads`.
    master_weights : bool
        For bfloat16/float16 params: keep a float32 master copy of each (``master_param``
        in its state, taken from the param when the optimizer is built) and float32
        moments; each step updates the master and writes the param rounded to nearest
        even, in one pass. Gradients come in the param's type, or in float32 (summed
        or accumulated in float32: read as they are, without a rounding to 16 bits).
    stochastic_rounding, seed
        Round bfloat16 params (without master weights) stochastically, reproducibly for
        a given ``seed`` (see :func:`fastadam.adam_step`).
    state_dtype : None or "bfloat16"
        The moments' element type: None, the params' (float32 with master weights); or
        "bfloat16" for float32 params (DeepSpeed's ``fp32_optimizer_states=False``): the
        moments are read and written as bfloat16 (rounded to nearest even) and computed
        in float32, 20 instead of 28 bytes per element per step and half the state's
        memory.

    Attributes
    ----------
    param_groups : list of dict
        PyTorch-style groups. Hyperparameters may be edited between steps; the groups
        themselves and their ``params`` (a tuple) are fixed once added: use
        :meth:`add_param_group` for more.
    state : list of dict
        Per parameter (in group order): ``step`` and live views of ``exp_avg``,
        ``exp_avg_sq`` (and ``max_exp_avg_sq``), shaped like the parameter.
    skipped_steps : int
        Steps refused by ``skip_if_nonfinite``.

    Notes
    -----
    The state of each group is allocated as one block per dtype, so parameters that lie
    back to back in memory (as :class:`fastadam.FlatParams` lays them out) are updated as
    one stream. Thread-safety: ``step``, ``zero_state``, ``add_param_group``,
    ``state_dict``, ``load_state_dict`` (and pickling) hold a per-optimizer lock, so calls
    from several threads take turns, each applied whole; separate optimizers on separate
    parameters run in parallel (the GIL is released in the kernels).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        maximize: bool = False,
        eps_hat: bool = False,
        eps_root: float = 0.0,
        num_threads: Optional[int] = None,
        *,
        decoupled_weight_decay: bool = False,
        numerics: str = "exact",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        state_dtype: Optional[str] = None,
    ) -> None:
        self.defaults: Dict[str, Any] = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, eps_hat=eps_hat, eps_root=eps_root,
            decoupled_weight_decay=decoupled_weight_decay, numerics=numerics,
        )
        with keyword_names():  # errors name the keyword: betas, not defaults['betas']
            check_group_hyperparameters(self.defaults, "defaults", 1)
        self.defaults["betas"] = tuple(betas)
        self._lock = threading.RLock()  # re-entrant: a subclass's locked method may call ours
        self.num_threads = num_threads
        self.param_groups: List[Dict[str, Any]] = []
        self.skipped_steps = 0
        self.engine = Engine()
        self.master_weights = check_flag(master_weights, "master_weights")
        self.state_dtype = check_state_dtype(state_dtype, self.master_weights)
        if check_flag(stochastic_rounding, "stochastic_rounding"):
            self.engine.rounding_seed = check_seed(seed)
        self._group_params: List[tuple] = []  # each group's params tuple, to detect edits
        self._group_memos: List[GroupMemo] = []  # each group's last checked record

        params = check_sequence(params, "params", "buffers or of param-group dicts "
                                "(wrap a single array in a list)")
        groups = params if params and all(isinstance(p, Mapping) for p in params) else [{"params": params}]
        for group in groups:
            self.add_param_group(group)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {key}: {group[key]!r}" for key in HYPERPARAMETER_KEYS]
        return "\n".join(lines + [")"])

    @_serialised
    def __getstate__(self) -> Dict[str, Any]:
        # A lock cannot be copied: the copy gets its own (__setstate__). The engine
        # copies without its kernel table (raw pointers), rebuilt on the copy's next step.
        state = dict(self.__dict__)
        del state["_lock"], state["_group_memos"]  # (the copy checks its groups afresh)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._group_memos = [GroupMemo() for _ in self._group_params]
        # A copy updates the buffers of its own param_groups: re-point the engine at
        # them (for a buffer that is not an ndarray, the engine's view was copied apart
        # from the copied buffer, and the copy would otherwise update a private array).
        i = 0
        for g, params in enumerate(self._group_params):
            for k, obj in enumerate(params):
                view = as_array(obj, f"param_groups[{g}]['params'][{k}]", writable=True,
                                flatten=False)
                if view is not self.engine.params[i]:
                    self.engine.rebind(i, view)
                i += 1

    num_threads = NumThreadsAttribute()
    _num_threads: Optional[int]  # the descriptor's storage

    # --- groups ------------------------------------------------------------------------

    @_serialised
    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """Add a group of parameters (a dict with ``params`` and optional hyperparameters);
        its state starts fresh at step 0."""
        if not isinstance(param_group, Mapping) or "params" not in param_group:
            raise TypeError(f"param_group must be a dict with a 'params' entry, got {param_group!r:.80}")
        index = len(self.param_groups)
        name = f"param_groups[{index}]"
        unknown = set(param_group) - set(HYPERPARAMETER_KEYS) - {"params"}
        if unknown:
            raise ValueError(f"{name} has unknown keys {sorted(unknown)}; "
                             f"expected 'params' and any of {list(HYPERPARAMETER_KEYS)}")
        group = {**self.defaults, **param_group}
        params = group["params"]
        if isinstance(params, (np.ndarray, memoryview)):  # a single tensor, as torch allows
            params = [params]
        params = tuple(check_sequence(params, f"{name}['params']", "buffers"))
        arrays = check_params(list(params), f"{name}['params']")
        dtypes = tuple(sorted({a.dtype for a in arrays}, key=str))
        check_group_hyperparameters(group, name, 1, dtypes)

        group["params"] = params
        group["betas"] = tuple(group["betas"])
        names = [f"{name}['params'][{i}]" for i in range(len(arrays))]
        # refuses overlap with params and state, and master weights of other than 16-bit params
        added = self.engine.add(arrays, index, names, master=self.master_weights,
                                state_dtype=self.state_dtype)
        self.engine.allocate(added)  # moments from the start (AMSGrad's on first use)
        self.param_groups.append(group)
        self._group_params.append(params)
        self._group_memos.append(GroupMemo())

    # --- stepping ----------------------------------------------------------------------

    def step(self, grads: Iterable[Any], *, grad_scale: Optional[float] = None,
             skip_if_nonfinite: bool = False) -> bool:
        """One Adam step of every parameter, all groups in one pass through the kernels.

        ``grads`` holds one gradient per parameter, in order (buffers of the parameter's
        dtype and shape; float32 is also accepted for a parameter with master weights). A gradient may instead be row-sparse, a tuple
        ``(rows, values)`` for a parameter with rows (its first axis; an embedding):
        only those rows and their moments change, as with :func:`fastadam.adam_step_rows`
        (``values`` shaped ``(len(rows),) + param.shape[1:]``, duplicate rows summed).
        The parameter's step count still advances by one: it is the tensor's step, which
        the bias corrections of every row use (LazyAdam and SparseAdam do the same).

        ``grad_scale`` divides every gradient first (loss scaling). With
        ``skip_if_nonfinite=True`` the gradients (row-sparse values included) are
        scanned first and, if any element is NaN or Inf, nothing changes and False is
        returned. Any invalid argument, in any gradient, raises before anything is
        written. Returns True when the step was applied.
        """
        with self._lock:  # as @_serialised does, inline: one call less on the hot path
            hypers = self._hyperparameters()
            scale = 1.0 if grad_scale is None else check_at_least(grad_scale, "grad_scale", 0.0,
                                                                  strict=True)
            if scale != 1.0:  # a normal number of every element type it divides
                check_grad_scale_range(scale, self.engine.dtypes())
            applied = self.engine.step(check_sequence(grads, "grads", "buffers, one per param"),
                                       hypers, grad_scale=scale,
                                       num_threads=self._num_threads,
                                       skip_if_nonfinite=check_flag(skip_if_nonfinite,
                                                                    "skip_if_nonfinite"))
            if not applied:
                self.skipped_steps += 1
            return applied

    @_serialised
    def zero_state(self) -> None:
        """Forget the moments and step counts (keeps the parameters and groups)."""
        self.engine.zero()
        self.skipped_steps = 0

    def _hyperparameters(self) -> List[Hyperparameters]:
        """Every group's values for this step; refuses groups edited in ways the state
        cannot follow (removed, reordered, params replaced)."""
        if len(self.param_groups) != len(self._group_params):
            raise ValueError(f"param_groups has {len(self.param_groups)} groups, the optimizer "
                             f"was built with {len(self._group_params)}; add groups with "
                             "add_param_group and never remove them")
        hypers = []
        for index, group in enumerate(self.param_groups):
            if group.get("params") is not self._group_params[index]:
                raise ValueError(f"param_groups[{index}]['params'] was replaced or the groups "
                                 "reordered; the params of a group are fixed once added")
            dtypes = self.engine.group_dtypes(index)
            record = remembered_group(group, dtypes, self._group_memos[index])  # the usual case
            hypers.append(record if record is not None else check_group_in_full(
                group, f"param_groups[{index}]", self.engine.group_step(index), dtypes))
        return hypers

    # --- state -------------------------------------------------------------------------

    @property
    def state(self) -> List[Dict[str, Any]]:
        """Per parameter, in group order: ``step`` and live views of its state, shaped
        like the parameter."""
        engine = self.engine
        return [{"step": int(engine.steps[i]),
                 **{key: array.reshape(engine.params[i].shape)
                    for key, array in engine.state[i].items()}}
                for i in range(len(engine))]

    @_serialised
    def state_dict(self) -> Dict[str, Any]:
        """A snapshot in PyTorch's layout: ``{"state": {i: {"step", "exp_avg",
        "exp_avg_sq"[, "max_exp_avg_sq"]}}, "param_groups": [{..., "params": [i, ...]}]}``.
        Arrays are copies shaped like their parameters."""
        state = {i: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in entry.items()}
                 for i, entry in enumerate(self.state)}
        groups, first = [], 0
        for group in self.param_groups:
            count = len(group["params"])
            groups.append({**{k: group[k] for k in HYPERPARAMETER_KEYS},
                           "params": list(range(first, first + count))})
            first += count
        return {"state": state, "param_groups": groups}

    @_serialised
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (ours, or PyTorch's layout with NumPy arrays).

        Everything is checked first (group and parameter counts, ids, shapes, dtypes,
        steps, hyperparameters); a mismatch raises ValueError (TypeError for a malformed
        dict) naming it, and changes nothing. Parameters without saved state start fresh.
        """
        groups, states = self._check_state_dict(state_dict)
        for group, saved in zip(self.param_groups, groups):
            group.update(saved)
        for i in range(len(self.engine)):
            entry = states.get(i, {"step": 0})
            self.engine.load(i, entry["step"], {k: v for k, v in entry.items() if k != "step"})

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Raise as :meth:`load_state_dict` would for ``state_dict``, loading nothing."""
        with self._lock:
            self._check_state_dict(state_dict)

    def _check_state_dict(self, state_dict: Any) -> tuple:
        """Check a state dict against this optimizer completely; return what
        load_state_dict applies: (per-group hyperparameters, {param index: {"step": int,
        key: array}})."""
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise TypeError("state_dict must be a mapping with 'state' and 'param_groups' entries")
        saved_groups = check_sequence(state_dict["param_groups"], "state_dict['param_groups']", "dicts")
        if not isinstance(state_dict["state"], Mapping):
            raise TypeError(f"state_dict['state'] must be a mapping, got {type(state_dict['state']).__name__}")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, "
                             f"the optimizer has {len(self.param_groups)}")
        groups, index_map, first = [], {}, 0
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            name = f"state_dict['param_groups'][{g}]"
            if not isinstance(saved, Mapping):
                raise TypeError(f"{name} must be a dict, got {type(saved).__name__}")
            ids = check_sequence(saved.get("params", ()), f"{name}['params']", "parameter ids")
            if len(ids) != len(group["params"]):
                raise ValueError(f"{name} has {len(ids)} params, the optimizer's group {g} has "
                                 f"{len(group['params'])}")
            missing = [k for k in HYPERPARAMETER_KEYS if k not in saved and k not in OPTIONAL_KEYS]
            if missing:
                raise ValueError(f"{name} lacks {missing}")
            values = {k: saved[k] for k in HYPERPARAMETER_KEYS if k in saved}
            check_group_hyperparameters({**group, **values}, name, 1)
            values["betas"] = tuple(values["betas"])
            groups.append(values)
            for offset, saved_id in enumerate(ids):
                try:
                    duplicate = saved_id in index_map
                except TypeError:
                    raise TypeError(f"{name}['params'][{offset}] must be a hashable id, got "
                                    f"{type(saved_id).__name__}") from None
                if duplicate:
                    raise ValueError(f"{name}['params'] repeats the parameter id {saved_id!r}")
                index_map[saved_id] = first + offset
            first += len(ids)

        states = {}
        for saved_id, entry in state_dict["state"].items():
            name = f"state_dict['state'][{saved_id!r}]"
            if saved_id not in index_map:
                raise ValueError(f"{name} belongs to no parameter of state_dict['param_groups']")
            i = index_map[saved_id]
            param = self.engine.params[i]
            if not isinstance(entry, Mapping) or not {"step", "exp_avg", "exp_avg_sq"} <= set(entry):
                raise ValueError(f"{name} must have 'step', 'exp_avg' and 'exp_avg_sq'")
            staged: Dict[str, Any] = {"step": check_step_count(entry["step"], f"{name}['step']")}
            if "master_param" in entry and not self.engine.master[i]:
                raise ValueError(f"{name} has a 'master_param', but the optimizer keeps no "
                                 "master weights (master_weights=False)")
            for key in STATE_KEYS:
                if key not in entry:
                    continue
                array = np.asarray(entry[key])
                expected = self.engine.state_dtype(i)
                if array.dtype != expected:
                    raise ValueError(f"{name}['{key}'] has dtype {type_name(array.dtype)}, "
                                     f"parameter {i}'s state has {type_name(expected)}")
                if array.shape != param.shape:
                    raise ValueError(f"{name}['{key}'] has shape {array.shape}, parameter {i} has "
                                     f"{param.shape}")
                staged[key] = array
            g = self.engine.group_of[i]
            amsgrad = {**self.param_groups[g], **groups[g]}["amsgrad"]
            if amsgrad and staged["step"] > 0 and "max_exp_avg_sq" not in staged:
                raise ValueError(f"{name} lacks 'max_exp_avg_sq' but its group uses amsgrad")
            states[i] = staged
        return groups, states


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), default 1e-2."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: LearningRate = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        eps_hat: bool = False,
        eps_root: float = 0.0,
        num_threads: Optional[int] = None,
        *,
        numerics: str = "exact",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        state_dtype: Optional[str] = None,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize, eps_hat,
                         eps_root, num_threads, decoupled_weight_decay=True, numerics=numerics,
                         master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                         seed=seed, state_dtype=state_dtype)
