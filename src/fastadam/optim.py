"""Adam and AdamW optimizer objects: param groups, state, step counts, schedules.

One ``step()`` validates everything first (fastadam._validation), then makes a single
call into the kernels for all tensors of all groups (fastadam._kernels.AdamTable): one
GIL release, one OpenMP team, per-tensor coefficients computed in C.
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

from fastadam import _kernels
from fastadam._memory import STATE_PAGE_OFFSETS, zeros_at
from fastadam._threads import NumThreadsAttribute, threads_for
from fastadam._validation import (
    HYPERPARAMETER_KEYS,
    GroupHyperparameters,
    check_at_least,
    check_flag,
    check_grad_scale_range,
    check_grads,
    check_group_hyperparameters,
    check_no_overlap,
    check_params,
    check_sequence,
    check_step_count,
    check_steps_advance,
)

LearningRate = Union[float, Callable[[int], float]]
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
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
    betas, eps, weight_decay, amsgrad, maximize, eps_hat, eps_root, decoupled_weight_decay
        As in :func:`fastadam.adam_step`.
    num_threads : int, optional
        OpenMP threads for each step; None follows :func:`fastadam.get_num_threads`.

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
    ) -> None:
        self.defaults: Dict[str, Any] = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, eps_hat=eps_hat, eps_root=eps_root,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        check_group_hyperparameters(self.defaults, "defaults", 1)
        self.defaults["betas"] = tuple(betas)
        self._lock = threading.RLock()  # re-entrant: a subclass's locked method may call ours
        self.num_threads = num_threads
        self.param_groups: List[Dict[str, Any]] = []
        self.skipped_steps = 0
        self._params: List[np.ndarray] = []   # N-d views, in group order
        self._state: List[Dict[str, Any]] = []  # np.ndarray, or None for an absent max_exp_avg_sq   # 1-D views into blocks
        self._steps = np.zeros(0, np.int64)
        self._group_of: List[int] = []
        self._group_params: List[tuple] = []  # each group's params tuple, to detect edits
        self._group_dtypes: List[tuple] = []  # each group's element types, for range checks
        self._table: Optional[_kernels.AdamTable] = None
        self._amsgrad_ready: set = set()       # groups whose max_exp_avg_sq is complete
        self._total_size = 0

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
        # The kernel table holds raw pointers: never copy it, rebuild it on the next step.
        # A lock cannot be copied: the copy gets its own (__setstate__).
        state = {**self.__dict__, "_table": None}
        del state["_lock"]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        if "_group_dtypes" not in state:  # pickled by a fastadam without it
            self._group_dtypes = [tuple(sorted({self._params[i].dtype for i in self._group_indices(g)}, key=str))
                                  for g in range(len(self._group_params))]

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
        names = [f"params[{i}]" for i in range(len(self._params) + len(arrays))]
        check_no_overlap([a.reshape(-1) for a in self._params + arrays], names)

        group["params"] = params
        group["betas"] = tuple(group["betas"])
        first = len(self._params)
        self.param_groups.append(group)
        self._group_params.append(params)
        self._group_dtypes.append(dtypes)
        self._params += arrays
        self._state += [{"max_exp_avg_sq": None} for _ in arrays]
        self._group_of += [index] * len(arrays)
        self._steps = np.concatenate([self._steps, np.zeros(len(arrays), np.int64)])
        self._total_size += sum(a.size for a in arrays)
        for key in ("exp_avg", "exp_avg_sq"):
            self._allocate_state(range(first, first + len(arrays)), key)
        self._table = None

    def _allocate_state(self, indices: Iterable[int], key: str) -> None:
        """Zeroed state ``key`` for these params: one block per dtype, in param order, at
        the key's page offset (fastadam._memory), so adjacent params get adjacent state."""
        by_dtype: Dict[np.dtype, List[int]] = {}
        for i in indices:
            by_dtype.setdefault(self._params[i].dtype, []).append(i)
        for dtype, members in by_dtype.items():
            block = zeros_at(sum(self._params[i].size for i in members), dtype, STATE_PAGE_OFFSETS[key])
            offset = 0
            for i in members:
                size = self._params[i].size
                self._state[i][key] = block[offset:offset + size]
                offset += size
        self._table = None

    def _group_indices(self, group: int) -> range:
        first = self._group_of.index(group)
        return range(first, first + len(self._group_params[group]))

    # --- stepping ----------------------------------------------------------------------

    def step(self, grads: Iterable[Any], *, grad_scale: Optional[float] = None,
             skip_if_nonfinite: bool = False) -> bool:
        """One Adam step of every parameter, all groups in one pass through the kernels.

        ``grads`` holds one gradient per parameter, in order (float32/float64 buffers of
        the parameter's dtype and shape). A gradient may instead be row-sparse, a tuple
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
            hyper = self._group_hyperparameters()
            scale = 1.0 if grad_scale is None else check_at_least(grad_scale, "grad_scale", 0.0,
                                                                  strict=True)
            if scale != 1.0:
                check_grad_scale_range(scale, {d for ds in self._group_dtypes for d in ds})
            check_steps_advance(self._steps)
            skip_if_nonfinite = check_flag(skip_if_nonfinite, "skip_if_nonfinite")
            grads, untouched = check_grads(self._current_table(), grads, self._params)
            threads = threads_for(self._num_threads, self._total_size - untouched)
            if skip_if_nonfinite and self._current_table().count_nonfinite(grads, threads):
                self.skipped_steps += 1  # before any AMSGrad state is allocated: nothing changes
                return False
            table = self._table_with_amsgrad_state(hyper)  # allocates only after every check
            table.step(grads, hyper, scale, threads)
            return True

    @_serialised
    def zero_state(self) -> None:
        """Forget the moments and step counts (keeps the parameters and groups)."""
        for state in self._state:
            for array in state.values():
                if array is not None:
                    array.fill(0)
        self._steps.fill(0)
        self.skipped_steps = 0

    def _group_hyperparameters(self) -> List[GroupHyperparameters]:
        """Every group's values for this step; refuses groups edited in ways the state
        cannot follow (removed, reordered, params replaced)."""
        if len(self.param_groups) != len(self._group_params):
            raise ValueError(f"param_groups has {len(self.param_groups)} groups, the optimizer "
                             f"was built with {len(self._group_params)}; add groups with "
                             "add_param_group and never remove them")
        hyper, first = [], 0
        for index, (group, params) in enumerate(zip(self.param_groups, self._group_params)):
            name = f"param_groups[{index}]"
            if group.get("params") is not params:
                raise ValueError(f"{name}['params'] was replaced or the groups reordered; the "
                                 "params of a group are fixed once added")
            hyper.append(check_group_hyperparameters(group, name, int(self._steps[first]) + 1,
                                                     self._group_dtypes[index]))
            first += len(params)
        return hyper

    def _current_table(self) -> _kernels.AdamTable:
        if self._table is None:
            self._table = _kernels.AdamTable(
                self._params,
                [s["exp_avg"] for s in self._state],
                [s["exp_avg_sq"] for s in self._state],
                [s["max_exp_avg_sq"] for s in self._state],
                self._steps,
                self._group_of,
            )
        return self._table

    def _table_with_amsgrad_state(self, hyper: List[GroupHyperparameters]) -> _kernels.AdamTable:
        """The table, after allocating AMSGrad state for groups that newly need it."""
        for group, h in enumerate(hyper):
            if h.amsgrad and group not in self._amsgrad_ready:
                missing = [i for i in self._group_indices(group)
                           if self._state[i]["max_exp_avg_sq"] is None]
                if missing:
                    self._allocate_state(missing, "max_exp_avg_sq")
                self._amsgrad_ready.add(group)
        return self._current_table()

    # --- state -------------------------------------------------------------------------

    @property
    def state(self) -> List[Dict[str, Any]]:
        result = []
        for param, state, step in zip(self._params, self._state, self._steps):
            entry: Dict[str, Any] = {"step": int(step)}
            for key in STATE_KEYS:
                if state[key] is not None:
                    entry[key] = state[key].reshape(param.shape)
            result.append(entry)
        return result

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
        groups, states = _stage_state_dict(self, state_dict)
        for group, saved in zip(self.param_groups, groups):
            group.update(saved)
        missing_max = [i for i, entry in states.items()
                       if "max_exp_avg_sq" in entry and self._state[i]["max_exp_avg_sq"] is None]
        if missing_max:
            self._allocate_state(missing_max, "max_exp_avg_sq")
        for i in range(len(self._params)):
            entry = states.get(i, {"step": 0})
            self._steps[i] = entry["step"]
            for key, array in self._state[i].items():
                if array is None:
                    continue
                if key in entry:
                    np.copyto(array, entry[key].reshape(-1))
                else:
                    array.fill(0)


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
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize, eps_hat,
                         eps_root, num_threads, decoupled_weight_decay=True)


def _stage_state_dict(opt: Adam, state_dict: Any) -> tuple:
    """Check a state dict against ``opt`` completely; return what load_state_dict applies:
    (per-group hyperparameters, {param index: {"step": int, key: array}})."""
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise TypeError("state_dict must be a mapping with 'state' and 'param_groups' entries")
    saved_groups = check_sequence(state_dict["param_groups"], "state_dict['param_groups']", "dicts")
    if not isinstance(state_dict["state"], Mapping):
        raise TypeError(f"state_dict['state'] must be a mapping, got {type(state_dict['state']).__name__}")
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param groups, "
                         f"the optimizer has {len(opt.param_groups)}")
    groups, index_map, first = [], {}, 0
    for g, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        name = f"state_dict['param_groups'][{g}]"
        if not isinstance(saved, Mapping):
            raise TypeError(f"{name} must be a dict, got {type(saved).__name__}")
        ids = check_sequence(saved.get("params", ()), f"{name}['params']", "parameter ids")
        if len(ids) != len(group["params"]):
            raise ValueError(f"{name} has {len(ids)} params, the optimizer's group {g} has "
                             f"{len(group['params'])}")
        missing = [k for k in HYPERPARAMETER_KEYS if k not in saved and k != "decoupled_weight_decay"]
        if missing:
            raise ValueError(f"{name} lacks {missing}")
        values = {k: saved[k] for k in HYPERPARAMETER_KEYS if k in saved}
        check_group_hyperparameters({**group, **values}, name, 1, opt._group_dtypes[g])
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
        param = opt._params[i]
        if not isinstance(entry, Mapping) or not {"step", "exp_avg", "exp_avg_sq"} <= set(entry):
            raise ValueError(f"{name} must have 'step', 'exp_avg' and 'exp_avg_sq'")
        staged: Dict[str, Any] = {"step": check_step_count(entry["step"], f"{name}['step']")}
        for key in STATE_KEYS:
            if key not in entry:
                continue
            array = np.asarray(entry[key])
            if array.dtype != param.dtype:
                raise ValueError(f"{name}['{key}'] has dtype {array.dtype}, parameter {i} has "
                                 f"{param.dtype}")
            if array.shape != param.shape:
                raise ValueError(f"{name}['{key}'] has shape {array.shape}, parameter {i} has "
                                 f"{param.shape}")
            staged[key] = array
        amsgrad = {**opt.param_groups[opt._group_of[i]], **groups[opt._group_of[i]]}["amsgrad"]
        if amsgrad and staged["step"] > 0 and "max_exp_avg_sq" not in staged:
            raise ValueError(f"{name} lacks 'max_exp_avg_sq' but its group uses amsgrad")
        states[i] = staged
    return groups, states
