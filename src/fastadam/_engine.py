"""The engine: an optimizer's bookkeeping, written once for every front end.

Layers (docs/design.md): front ends (fastadam.optim, .torch, .keras, .distributed) turn
their framework's objects into the engine's inputs; the engine keeps the state; the
validation layer (fastadam._validation) checks; the kernels (fastadam._kernels) compute.
Front ends never compute Adam math, never keep state of their own and never call each
other's privates.

An :class:`Engine` holds, per tensor (a registered parameter, as an N-d NumPy view of its
memory, with the number of its group):

* its state: ``exp_avg``, ``exp_avg_sq`` and AMSGrad's ``max_exp_avg_sq``, 1-D views into
  blocks the engine allocates (one block per group, dtype and key, the keys at staggered
  page offsets so that state never 4K-aliases the params or each other), or memory a
  front end adopts (Keras owns its variables);
* its step count, in one int64 array; front ends that show steps as floats (torch's
  ``state["step"]``) get float32 mirrors whose in-place edits the next step adopts;
* master weights (a bfloat16 or float16 tensor registered with ``master=True``): a
  float32 ``master_param``, copied from the param when its moments are allocated, with
  float32 moments. The kernels update the master and write the param rounded to nearest
  even in the same pass;
* or bfloat16 moments of a float32 tensor (registered with ``state_dtype``): read and
  written as bfloat16, computed in float32.

With ``rounding_seed`` set (an int), bfloat16 params without a master are rounded
stochastically (reproducibly: per seed, step and tensor position).

A step (:meth:`Engine.step` with arrays, :meth:`Engine.step_pointers` with addresses a
compiled gather took) checks everything first, scans for non-finite values if asked,
allocates missing state (moments on a tensor's first gradient, AMSGrad's buffer when its
group turns AMSGrad on), and only then runs the kernels: a rejected step changes nothing.
Row-sparse gradients have their duplicate rows summed here.

Thread-safety: none of its own; every front end serialises calls with its own lock.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from fastadam._memory import STATE_PAGE_OFFSETS, zeros_at
from fastadam._rows import sum_duplicate_rows
from fastadam._table import AdamTable
from fastadam._threads import threads_for
from fastadam._validation import (
    BFLOAT16_BITS,
    MAX_STEP,
    Hyperparameters,
    check_bfloat16_state,
    check_grads,
    check_master_weights,
    check_no_overlap,
    check_step_count,
    edited_counts,
    sorted_ranges,
)

STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
MOMENT_KEYS = STATE_KEYS[:2]
MASTER_DTYPE = np.dtype(np.float32)
# Stands in for the state of a tensor that has none yet: the table never touches it
# (such a tensor has no gradient in that pass, or gets its state before the pass runs).
_NO_STATE = np.zeros(0, np.float32)


class Engine:
    """Tensors, their state and step counts, and the one-pass step over all of them."""

    def __init__(self) -> None:
        self.params: List[np.ndarray] = []
        self.names: List[str] = []
        self.master: List[bool] = []  # per tensor: updated through a float32 master copy
        self.state_types: List[Optional[np.dtype]] = []  # per tensor: None, or bfloat16 moments
        self._rounding_seed: Optional[int] = None
        self.group_of: List[int] = []
        self.state: List[Dict[str, np.ndarray]] = []  # 1-D views; a missing key: not allocated
        self.steps = np.zeros(0, np.int64)
        # At least every step count (counts written here are re-read; a pass adds one):
        # a step looks at the counts only when this nears the int64 limit.
        self._step_ceiling = 0
        self._size = 0  # elements of all params
        self.generation = 0  # bumped whenever state is allocated, adopted or loaded
        self._mirror: Optional[np.ndarray] = None  # float32 steps, for front ends that show them
        self._table: Optional[AdamTable] = None
        self._written: Optional[np.ndarray] = None
        self._without_moments = 0  # tensors without exp_avg yet
        self._amsgrad_ready: set = set()  # groups whose every tensor has max_exp_avg_sq
        self._first_of_group: Dict[int, int] = {}
        self._dtypes: Dict[int, Tuple[np.dtype, ...]] = {}  # per group, for range checks

    def __len__(self) -> int:
        return len(self.params)

    def __getstate__(self) -> Dict[str, Any]:
        # A copy rebuilds its kernel table (raw pointers into the original's memory).
        return {**self.__dict__, "_table": None, "_written": None}

    @property
    def size(self) -> int:
        return self._size

    @property
    def rounding_seed(self) -> Optional[int]:
        """None (round to nearest even), or the seed of stochastic rounding of bfloat16
        params (a checked int64)."""
        return self._rounding_seed

    @rounding_seed.setter
    def rounding_seed(self, seed: Optional[int]) -> None:
        self._rounding_seed = seed
        self._invalidate()

    # --- registration --------------------------------------------------------------------

    def add(self, arrays: Sequence[np.ndarray], group: int, names: Sequence[str],
            master: bool = False, state_dtype: Optional[np.dtype] = None) -> range:
        """Register validated, aligned, writable N-d arrays of group ``group`` (with
        ``master``, 16-bit arrays updated through float32 master copies; with
        ``state_dtype`` (bfloat16), float32 arrays with bfloat16 moments); raises
        ValueError, changing nothing, if one overlaps another parameter or any state
        the engine holds (an ``exp_avg`` given back as a parameter, say)."""
        if master:
            check_master_weights(arrays, names)
        if state_dtype is not None:
            check_bfloat16_state(arrays, names)
        self._check_clear_of_everything(list(arrays), list(names))
        first = len(self.params)
        if len(arrays):
            self._first_of_group.setdefault(group, first)
            self._dtypes[group] = tuple(sorted(set(self._dtypes.get(group, ())) |
                                               {a.dtype for a in arrays}, key=str))
        self.params += list(arrays)
        self._size += sum(a.size for a in arrays)
        self.names += list(names)
        self.master += [master] * len(arrays)
        self.state_types += [state_dtype] * len(arrays)
        self.group_of += [group] * len(arrays)
        self.state += [{} for _ in arrays]
        self.steps = np.concatenate([self.steps, np.zeros(len(arrays), np.int64)])
        self._without_moments += len(arrays)
        self._amsgrad_ready.discard(group)
        self._invalidate()
        return range(first, first + len(arrays))

    def rebind(self, i: int, array: np.ndarray) -> None:
        """Point tensor ``i`` at new memory (its framework replaced the storage). With
        state, the dtype and shape must stay (ValueError otherwise); without, anything
        the validation layer accepted goes."""
        old = self.params[i]
        if "exp_avg" in self.state[i] and (array.dtype != old.dtype or array.shape != old.shape):
            raise ValueError(
                f"{self.names[i]} changed from {old.dtype.name} {old.shape} to "
                f"{array.dtype.name} {array.shape} after the optimizer had state for it; the "
                "state no longer fits: convert the model before creating the optimizer, or "
                "create a new one")
        if self.master[i]:
            check_master_weights([array], [self.names[i]])
        if self.state_types[i] is not None:
            check_bfloat16_state([array], [self.names[i]])
        others = [j for j in range(len(self.params)) if j != i]
        check_no_overlap(
            [self.params[j].reshape(-1) for j in others] + self._state_arrays() + [array.reshape(-1)],
            [self.names[j] for j in others]
            + [f"the optimizer's {label}" for label in self._state_labels()] + [self.names[i]])
        self._size += array.size - self.params[i].size
        self.params[i] = array
        group = self.group_of[i]
        self._dtypes[group] = tuple(sorted({self.params[j].dtype for j, g in enumerate(self.group_of)
                                            if g == group}, key=str))
        self._invalidate()

    def _check_clear_of_everything(self, arrays: List[np.ndarray], names: List[str]) -> None:
        # the new arrays last: first_overlap names the later of two, so the message's
        # subject is the array being added
        check_no_overlap(
            [a.reshape(-1) for a in self.params] + self._state_arrays()
            + [a.reshape(-1) for a in arrays],
            self.names + [f"the optimizer's {label}" for label in self._state_labels()] + names)

    def _state_arrays(self) -> List[np.ndarray]:
        return [a for s in self.state for a in s.values()]

    def _state_labels(self) -> List[str]:
        return [f"{key} of {self.names[i]}" for i, s in enumerate(self.state) for key in s]

    def _invalidate(self) -> None:
        self._table = None
        self._written = None

    # --- state ---------------------------------------------------------------------------

    def has_moments(self, i: int) -> bool:
        return "exp_avg" in self.state[i]

    def state_dtype(self, i: int) -> np.dtype:
        """The element type of tensor ``i``'s state: float32 with a master copy, the
        type it was registered with (bfloat16), else the param's."""
        if self.master[i]:
            return MASTER_DTYPE
        state_type = self.state_types[i]
        return self.params[i].dtype if state_type is None else state_type

    def allocate(self, indices: Iterable[int], keys: Sequence[str] = MOMENT_KEYS) -> None:
        """Zeroed state ``keys`` for these tensors where missing: one block per (group,
        dtype) and key, in index order (adjacent params get adjacent state), at the
        key's page offset. A tensor with master weights gets its master copy (of the
        param's current values) with its moments."""
        indices = list(indices)
        if "exp_avg" in keys:
            keys = tuple(keys) + ("master_param",)
        for key in keys:
            blocks: Dict[Tuple[int, np.dtype], List[int]] = {}
            for i in indices:
                if key not in self.state[i] and (key != "master_param" or self.master[i]):
                    blocks.setdefault((self.group_of[i], self.state_dtype(i)), []).append(i)
            for (_, dtype), members in blocks.items():
                block = zeros_at(sum(self.params[i].size for i in members), dtype,
                                 STATE_PAGE_OFFSETS[key])
                offset = 0
                for i in members:
                    size = self.params[i].size
                    self.state[i][key] = block[offset:offset + size]
                    if key == "master_param":
                        self.state[i][key][...] = _as_float32(self.params[i].reshape(-1))
                    offset += size
                if key == "exp_avg":
                    self._without_moments -= len(members)
                self.generation += 1
                self._invalidate()

    def adopt(self, i: int, key: str, array: np.ndarray) -> None:
        """Use ``array`` (validated: the param's dtype and size, contiguous, writable,
        clear of every other buffer) as tensor ``i``'s state ``key``."""
        if key == "exp_avg" and key not in self.state[i]:
            self._without_moments -= 1
        self.state[i][key] = array.reshape(-1)
        self.generation += 1
        self._invalidate()

    def load(self, i: int, step: int, arrays: Dict[str, Any]) -> None:
        """Tensor ``i``'s state from checked values (``step`` a valid count; ``arrays``
        key -> array-like of the param's shape): copied in; keys not given are zeroed
        where they exist."""
        missing = [k for k in arrays if k not in self.state[i]]
        if missing:
            self.allocate([i], [k for k in STATE_KEYS if k in missing or k in MOMENT_KEYS])
        for key, array in self.state[i].items():
            if key in arrays:
                np.copyto(array, np.asarray(arrays[key]).reshape(-1))
            elif key == "master_param":  # a state saved without one: the param's values
                array[...] = _as_float32(self.params[i].reshape(-1))
            else:
                array.fill(0)
        self.steps[i] = step
        self._steps_written()
        self.generation += 1

    def zero(self) -> None:
        """Forget every moment and step count (the buffers stay; master copies take the
        params' current values)."""
        for i, state in enumerate(self.state):
            for key, array in state.items():
                if key == "master_param":
                    array[...] = _as_float32(self.params[i].reshape(-1))
                else:
                    array.fill(0)
        self.steps.fill(0)
        self._steps_written()

    def float_steps(self) -> np.ndarray:
        """A float32 array mirroring every tensor's step count (torch shows steps as
        float32 tensors): the kernel table updates it with the counts, in the same C
        loop, so an interrupt never leaves the two apart; an element a front end edits
        in place is adopted by the next step. Call it once all tensors are registered."""
        if self._mirror is None or self._mirror.size != len(self.params):
            self._mirror = self.steps.astype(np.float32)
            self._invalidate()
        return self._mirror

    def set_steps(self, step: int) -> None:
        """Give every tensor the step count ``step`` (Keras counts one for all)."""
        self.steps.fill(step)
        self._steps_written()

    def _adopt_step_edits(self) -> None:
        mirror = self._mirror
        if mirror is None:
            return
        edited = edited_counts(mirror, self.steps)
        for i in edited:  # rare: a user restarting a schedule
            self.steps[i] = check_step_count(float(mirror[i]), f"the step count of {self.names[i]}")
        if edited:
            self._steps_written()

    def _steps_written(self) -> None:
        """After counts were written here: the mirrors and the ceiling follow them."""
        if self._mirror is not None:
            self._mirror[...] = self.steps
        self._step_ceiling = int(self.steps.max()) if len(self.steps) else 0

    # --- stepping ------------------------------------------------------------------------

    def group_dtypes(self, group: int) -> Tuple[np.dtype, ...]:
        """The element types of a group's tensors (what its hyperparameters are cast to)."""
        return self._dtypes.get(group, ())

    def dtypes(self) -> Tuple[np.dtype, ...]:
        """The element types of all tensors."""
        return tuple(sorted({d for ds in self._dtypes.values() for d in ds}, key=str))

    def group_step(self, group: int) -> int:
        """The next step number of ``group`` (its first tensor's count + 1): what lr
        schedules are called with."""
        first = self._first_of_group.get(group)
        return 1 if first is None else int(self.steps[first]) + 1

    def written_ranges(self) -> np.ndarray:
        """The sorted memory ranges of every buffer a step writes (params and state)."""
        if self._written is None:
            self._written = sorted_ranges([p.reshape(-1) for p in self.params] + self._state_arrays())
        return self._written

    def step(self, grads: List[Any], hypers: List[Hyperparameters], *, grad_scale: float,
             num_threads: Optional[int], skip_if_nonfinite: bool = False,
             names: Optional[Sequence[str]] = None, allow_none: bool = False) -> bool:
        """One pass over every tensor with a gradient (``grads`` in tensor order: buffers,
        ``(rows, values)`` row-sparse pairs, or with ``allow_none`` None for no gradient).
        ``hypers``: one validated record per group. Returns False, changing nothing, when
        ``skip_if_nonfinite`` finds NaN or Inf."""
        self._adopt_step_edits()
        checked, untouched, rows_given = check_grads(grads, self.params, self.written_ranges(),
                                                     names=names, allow_none=allow_none,
                                                     master=self.master)
        if rows_given:  # sum duplicate rows (in fastadam's own copy); count the rows left out
            checked = [_summed(g) if type(g) is tuple else g for g in checked]
            untouched += sum(p.size - g[1].size for p, g in zip(self.params, checked)
                             if type(g) is tuple)
        if self._step_ceiling >= MAX_STEP:
            self._check_can_advance([i for i, g in enumerate(checked) if g is not None])
        threads = threads_for(num_threads, self._size - untouched)
        if skip_if_nonfinite and self._table_as_is().count_nonfinite(checked, threads):
            return False
        if self._state_missing(hypers):
            self._allocate_missing([i for i, g in enumerate(checked) if g is not None], hypers)
        self._table_as_is().step(checked, hypers, grad_scale, threads)
        self._step_ceiling += 1
        return True

    def step_pointers(self, addresses: np.ndarray, active_elements: int,
                      hypers: List[Hyperparameters], *, grad_scale: float,
                      num_threads: Optional[int], skip_if_nonfinite: bool = False) -> bool:
        """:meth:`step` with dense gradients given as int64 addresses (0: none), which a
        front end's compiled gather took from gradients it checked against each tensor's
        dtype, shape and layout (fastadam._torch_gather)."""
        self._adopt_step_edits()
        if self._step_ceiling >= MAX_STEP:
            self._check_can_advance(np.flatnonzero(addresses).tolist())
        threads = threads_for(num_threads, active_elements)
        if skip_if_nonfinite and self._table_as_is().count_nonfinite_pointers(addresses, threads):
            return False
        if self._state_missing(hypers):
            self._allocate_missing(np.flatnonzero(addresses).tolist(), hypers)
        self._table_as_is().step_pointers(addresses, hypers, grad_scale, threads)
        self._step_ceiling += 1
        return True

    def count_nonfinite(self, grads: List[Any], num_threads: Optional[int]) -> int:
        """How many elements of these gradients (checked as :meth:`step` checks them)
        are NaN or Inf; nothing is written."""
        checked, untouched, _ = check_grads(grads, self.params, self.written_ranges(),
                                            master=self.master)
        return self._table_as_is().count_nonfinite(checked, threads_for(num_threads,
                                                                        self.size - untouched))

    def _check_can_advance(self, active: List[int]) -> None:
        """Refuse, before anything is written, a pass that would take a step count past
        the int64 range (a loaded count of 2**63 - 1). Called when the ceiling of the
        counts is there: the usual step never builds ``active``."""
        if int(self.steps.max()) >= MAX_STEP:
            for i in active:
                if self.steps[i] >= MAX_STEP:
                    raise ValueError(f"the step count of {self.names[i]} is {MAX_STEP} (2**63 - 1), "
                                     "the largest an int64 step count can hold: it cannot "
                                     "advance; load a smaller step count (or zero_state)")

    def _state_missing(self, hypers: List[Hyperparameters]) -> bool:
        """May a tensor lack state this pass needs? (a loop, not a comprehension: this
        runs on every step, and the answer is almost always no)"""
        if self._without_moments:
            return True
        for k, hyper in enumerate(hypers):
            if hyper.amsgrad and k not in self._amsgrad_ready:
                return True
        return False

    def _allocate_missing(self, indices: List[int], hypers: List[Hyperparameters]) -> None:
        """Allocate what the active tensors (``indices``) miss: moments on a tensor's
        first gradient, AMSGrad's buffer where its group uses AMSGrad."""
        pending = [k for k, h in enumerate(hypers) if h.amsgrad and k not in self._amsgrad_ready]
        self.allocate([i for i in indices if "exp_avg" not in self.state[i]])
        for k in pending:
            self.allocate([i for i in indices if self.group_of[i] == k], ("max_exp_avg_sq",))
            if all("max_exp_avg_sq" in self.state[i]
                   for i, g in enumerate(self.group_of) if g == k):
                self._amsgrad_ready.add(k)

    def _table_as_is(self) -> AdamTable:
        """The kernel table over the current tensors and state (built when they changed;
        a tensor without state stands on a placeholder it is never run with)."""
        if self._table is None:
            self._table = AdamTable(
                self.params,
                [s.get("exp_avg", _NO_STATE) for s in self.state],
                [s.get("exp_avg_sq", _NO_STATE) for s in self.state],
                [s.get("max_exp_avg_sq") for s in self.state],
                self.steps,
                self.group_of,
                self._mirror,
                [s.get("master_param") for s in self.state],
                self._rounding_seed,
            )
        return self._table

    @property
    def table(self) -> AdamTable:
        """The kernel table over the current tensors (its runs, its last pass's records)."""
        return self._table_as_is()


def _as_float32(array: np.ndarray) -> np.ndarray:
    """A 16-bit array's values in float32 (exact): a master copy's starting point."""
    if array.dtype == BFLOAT16_BITS:  # the bits of bfloat16 are float32's high half
        return (array.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return array.astype(MASTER_DTYPE)


def _summed(grad: Tuple[np.ndarray, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """A checked row-sparse gradient with its duplicate rows summed (unique rows)."""
    rows, values = grad
    return sum_duplicate_rows(rows, values, values.size // rows.size if rows.size else 0)
