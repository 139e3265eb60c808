"""PyTorch adapter: ``fastadam.torch.Adam`` and ``fastadam.torch.AdamW``.

Drop-in ``torch.optim.Optimizer`` subclasses with torch's signatures and defaults. Each
``step()`` hands every CPU float32/float64 parameter that has a gradient to fastadam's
kernels in ONE call (all groups, one OpenMP team, GIL released), zero-copy: NumPy views of
the tensors' memory. The adapter computes no Adam math; the update is DESIGN.md's, the
operation order of torch's fused CPU Adam (bit-identical to ``fused=True`` on ATen's
default CPU capability).

State is torch tensors in torch's layout (``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``), so ``torch.save(opt.state_dict())`` works and state dicts move both
ways between these classes and ``torch.optim.Adam``/``AdamW``. The moment tensors are
views of blocks fastadam allocates (one per group and dtype, at staggered page offsets),
and ``step`` tensors are float32 views kept in step with exact int64 counters.

Sparse gradients: a gradient in sparse COO layout with one sparse dimension (what
``nn.Embedding(sparse=True)`` produces) takes fastadam's lazy row path, like
``torch.optim.SparseAdam``: only the rows it names, and their moments, change; duplicate
indices (an uncoalesced gradient) are summed first; the step count advances by one. Unlike
SparseAdam the update is Adam's full one (weight decay, AMSGrad, maximize) in the
paper's epsilon form, as for dense gradients; SparseAdam adds eps to the un-corrected
sqrt(v), so the two agree exactly in the math for eps=0 and differ by O(eps) otherwise.
Dense gradients in the same step are unaffected (still bit-identical to ``fused=True``).

Differences from torch, by design: parameters must be dense CPU float32/float64 tensors
(anything else is a TypeError naming the parameter); gradients dense or sparse COO (other
sparse layouts are refused); ``capturable=True`` and
``differentiable=True`` are refused (they concern CUDA graphs and autograd through the
step); ``foreach`` and ``fused`` are accepted and change nothing. With ``grad_scale``
(as ``torch.amp.GradScaler`` passes it) the gradients are divided inside the kernel and
``.grad`` is left as it was (torch's fused kernel overwrites it with the unscaled values).

Threads: torch's optimizers are not thread-safe. Here ``step``, ``add_param_group`` and
``load_state_dict`` hold a per-optimizer lock, so two threads stepping one optimizer take
turns (the kernels release the GIL: unserialised, both would update the same buffers at
once). ``state_dict()`` is torch's: it returns the live state tensors.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from torch.optim import Optimizer

from fastadam import _kernels
from fastadam._memory import STATE_PAGE_OFFSETS, zeros_at
from fastadam._threads import NumThreadsAttribute, threads_for
from fastadam._validation import (
    check_grad_scale_range,
    check_grads,
    check_group_hyperparameters,
    check_no_overlap,
    check_step_count,
    check_steps_advance,
)

__all__ = ["Adam", "AdamW"]

SUPPORTED_DTYPES = (torch.float32, torch.float64)
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _scalar(value: Any) -> Any:
    """A Python number for a 1-element tensor (torch allows tensor lr and betas)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"expected a 1-element tensor, got shape {tuple(value.shape)}")
        return value.item()
    return value


def _fastadam_group(group: Dict[str, Any]) -> Dict[str, Any]:
    """A torch param group's hyperparameters in fastadam's terms."""
    lr = group["lr"]
    return {
        "lr": lr if callable(lr) and not isinstance(lr, torch.Tensor) else _scalar(lr),
        "betas": tuple(_scalar(b) for b in group["betas"]),
        "eps": group["eps"],
        "weight_decay": group["weight_decay"],
        "amsgrad": group["amsgrad"],
        "maximize": group["maximize"],
        "decoupled_weight_decay": group.get("decoupled_weight_decay", False),
        "eps_hat": False,
        "eps_root": 0.0,
    }


class Adam(Optimizer):
    """Adam for PyTorch CPU tensors through fastadam's kernels (see the module docstring).

    Takes torch.optim.Adam's arguments, plus ``num_threads`` (OpenMP threads of each
    step; None follows :func:`fastadam.get_num_threads`).
    """

    # torch.amp.GradScaler passes grad_scale= and found_inf= to step() instead of
    # unscaling the gradients itself, as it does for torch's fused optimizers.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: Any = 1e-3,
        betas: Tuple[Any, Any] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
        num_threads: Optional[int] = None,
    ) -> None:
        if capturable:
            raise ValueError("capturable=True is for CUDA graph capture; fastadam.torch updates "
                             "CPU tensors (use torch.optim.Adam for GPU parameters)")
        if differentiable:
            raise ValueError("differentiable=True needs autograd through the update; "
                             "fastadam's in-place kernels do not record it")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        self.num_threads = num_threads
        self._lock = threading.RLock()
        self._engine: Optional[_Engine] = None
        self._slots: Dict[int, _Slot] = {}  # id(param) -> its fastadam-owned state
        super().__init__(params, defaults)

    num_threads = NumThreadsAttribute()
    _num_threads: Optional[int]  # the descriptor's storage

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        with self._lock:
            self._add_param_group(param_group)

    def _add_param_group(self, param_group: Dict[str, Any]) -> None:
        index = len(self.param_groups)
        candidate = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        for flag in ("capturable", "differentiable"):
            if candidate.get(flag):
                raise ValueError(f"param_groups[{index}]: {flag}=True is not supported by fastadam.torch")
        check_group_hyperparameters(_fastadam_group(candidate), f"param_groups[{index}]", 1)
        super().add_param_group(param_group)
        self._engine = None

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        with self._lock:
            self._load_state_dict(state_dict)

    def _load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch keeps the loaded tensors themselves (no copy when dtype and device
        # match): take a snapshot, so the source's later steps cannot leak in. The
        # values move into fastadam's blocks on the next step.
        for p, state in self.state.items():
            self.state[p] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        self._engine = None

    def __getstate__(self) -> Dict[str, Any]:
        # torch's Optimizer.__getstate__ keeps only defaults, state and param_groups
        return {**super().__getstate__(), "_num_threads": self._num_threads, "_engine": None,
                "_slots": {}}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()  # a lock is never copied: each copy has its own
        self.__dict__.setdefault("_num_threads", None)
        self.__dict__.setdefault("_engine", None)
        self.__dict__.setdefault("_slots", {})

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, *,
             grad_scale: Optional[torch.Tensor] = None,
             found_inf: Optional[torch.Tensor] = None) -> Any:
        """One Adam step of every parameter that has a gradient (torch semantics).

        ``closure`` re-evaluates the model and returns the loss. ``grad_scale`` and
        ``found_inf`` are what ``torch.amp.GradScaler`` passes: gradients are divided by
        ``grad_scale``, and a nonzero ``found_inf`` skips the step entirely.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._lock:
            self._step(grad_scale, found_inf)
        return loss

    def _step(self, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
        # GradScaler hands these over as attributes (torch.optim.Adam reads them so too).
        grad_scale = getattr(self, "grad_scale", None) if grad_scale is None else grad_scale
        found_inf = getattr(self, "found_inf", None) if found_inf is None else found_inf
        entries = self._with_grads()
        if not entries:
            return
        if found_inf is not None and float(found_inf) != 0.0:
            return
        scale = 1.0 if grad_scale is None else float(grad_scale)
        if not scale > 0.0 or scale != scale or scale == float("inf"):
            raise ValueError(f"grad_scale must be a finite number > 0, got {scale!r}")
        engine = self._engine_for(entries)   # checks everything; commits state only then
        check_steps_advance(engine.steps, engine.names)
        engine.step(self, [e[2] for e in entries], scale, self._num_threads)

    def _with_grads(self) -> List[Tuple[int, torch.Tensor, torch.Tensor]]:
        """(group, param, grad) of every param with a gradient, checked for what the
        kernels can update: dense, CPU, float32/float64, grad matching the param, dense
        or sparse COO with one sparse dimension (row-sparse)."""
        entries = []
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                name = f"param_groups[{g}]['params'][{i}]"
                grad = p.grad
                if p.device.type != "cpu" or grad.device.type != "cpu":
                    raise TypeError(f"{name} is on {p.device}; fastadam.torch updates CPU tensors only")
                if p.dtype not in SUPPORTED_DTYPES:
                    raise TypeError(f"{name} has dtype {p.dtype}; fastadam.torch updates float32 "
                                    "and float64 parameters")
                if p.layout != torch.strided:
                    raise TypeError(f"{name} has layout {p.layout}; fastadam.torch updates dense "
                                    "(strided) parameters")
                if grad.layout not in (torch.strided, torch.sparse_coo):
                    raise TypeError(f"{name} has a {grad.layout} gradient; fastadam.torch takes dense "
                                    "gradients and sparse COO ones (as nn.Embedding(sparse=True) gives)")
                if grad.is_sparse and (grad.sparse_dim() != 1 or p.dim() == 0):
                    raise TypeError(f"{name} has a sparse gradient with {grad.sparse_dim()} sparse "
                                    "dimensions; fastadam.torch takes row-sparse ones (sparse_dim=1, "
                                    "as nn.Embedding(sparse=True) gives)")
                if grad.dtype != p.dtype:
                    raise TypeError(f"{name} has a {grad.dtype} gradient for a {p.dtype} parameter")
                if grad.shape != p.shape:
                    raise ValueError(f"{name} has a gradient of shape {tuple(grad.shape)} for a "
                                     f"parameter of shape {tuple(p.shape)}")
                if not p.is_contiguous():
                    raise ValueError(f"{name} is not contiguous; fastadam.torch updates contiguous "
                                     "parameters in place")
                entries.append((g, p, grad if grad.is_sparse or grad.is_contiguous() else grad.contiguous()))
        return entries

    def _engine_for(self, entries: List[Tuple[int, torch.Tensor, torch.Tensor]]) -> "_Engine":
        """The kernel table for this step's (group, param, grad) entries, rebuilt when the
        params with grads, their storage, a group's AMSGrad flag, or a param's state
        tensors (replaced by the user or by load_state_dict) changed. Moments stay where
        they are across rebuilds: only the table of pointers is new."""
        key = [(g, id(p), p.data_ptr(), bool(self.param_groups[g]["amsgrad"])) for g, p, _ in entries]
        if self._engine is not None and self._engine.key == key and all(
                id(p) in self._slots and self._slots[id(p)].owns(self.state.get(p, {}))
                for _, p, _ in entries):
            return self._engine
        self._engine = _Engine(self, entries, key)
        return self._engine


class AdamW(Adam):
    """AdamW (decoupled weight decay, default 1e-2) for PyTorch CPU tensors."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: Any = 1e-3,
        betas: Tuple[Any, Any] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        num_threads: Optional[int] = None,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=True, num_threads=num_threads)


class _Slot:
    """One parameter's state as fastadam keeps it: moments in fastadam-allocated blocks
    (NumPy views for the kernels, torch views for ``opt.state``), the float32 ``step``
    tensor torch's layout wants, and the exact int64 step count behind it."""

    def __init__(self, moments: Dict[str, Tuple[np.ndarray, torch.Tensor]], step: int):
        self.arrays = {k: a for k, (a, _) in moments.items()}
        self.tensors = {k: t for k, (_, t) in moments.items()}
        self.step = step
        self.step_tensor = torch.tensor(float(step), dtype=torch.float32)

    def owns(self, state: Dict[str, Any]) -> bool:
        """Is ``state`` still exactly what this slot put there?"""
        return (state.get("step") is self.step_tensor
                and all(state.get(k) is t for k, t in self.tensors.items())
                and set(state) <= {"step", *self.tensors})

    def commit(self, state: Dict[str, Any]) -> None:
        state.clear()
        state.update(self.tensors, step=self.step_tensor)


def _param_names(opt: Optimizer) -> Dict[int, str]:
    """id(param) -> "param_groups[g]['params'][i]", for messages."""
    return {id(p): f"param_groups[{g}]['params'][{i}]"
            for g, group in enumerate(opt.param_groups) for i, p in enumerate(group["params"])}


class _Engine:
    """The kernel table of one step's (group, param, grad) entries.

    Building it checks everything the kernels assume (no two params overlap; hyper-
    parameters valid) and prepares slots for params whose state fastadam does not hold
    yet (new params, or state replaced by the user or a loaded state dict: their values
    are copied in). New slots are written into ``opt.state`` only by :meth:`step`, after
    every check passed, so a rejected step changes nothing.
    """

    def __init__(self, opt: Adam, entries: List[Tuple[int, torch.Tensor, torch.Tensor]], key: list):
        self.key = key
        names = _param_names(opt)
        self.names = [names[id(p)] for _, p, _ in entries]
        self.params = [p.detach().numpy() for _, p, _ in entries]
        check_no_overlap([a.reshape(-1) for a in self.params], self.names)
        self.groups = sorted({g for g, _, _ in entries})
        dense = {g: k for k, g in enumerate(self.groups)}
        self.group_of = [dense[g] for g, _, _ in entries]
        self.first_of_group = [self.group_of.index(k) for k in range(len(self.groups))]  # schedules' step
        self.group_dtypes = [tuple(sorted({a.dtype for a, k in zip(self.params, self.group_of) if k == group},
                                          key=str)) for group in range(len(self.groups))]
        self.entries = entries
        self.slots: List[_Slot] = []
        self.new_slots: Dict[int, _Slot] = {}
        kept: Dict[int, _Slot] = {}
        fresh = []
        for i, (g, p, _) in enumerate(entries):
            slot = opt._slots.get(id(p))
            state = opt.state.get(p, {})  # .get: a rejected step must not add entries
            amsgrad = bool(opt.param_groups[g]["amsgrad"]) or "max_exp_avg_sq" in state
            if slot is None or not slot.owns(state) or (amsgrad and "max_exp_avg_sq" not in slot.arrays):
                fresh.append((i, amsgrad))
            else:
                kept[i] = slot
        allocated = self._allocate(opt, fresh)
        for i, slot in allocated.items():
            self.new_slots[id(entries[i][1])] = slot
        self.slots = [kept[i] if i in kept else allocated[i] for i in range(len(entries))]
        self.steps = np.array([s.step for s in self.slots], np.int64)
        self.table = _kernels.AdamTable(
            self.params,
            [s.arrays["exp_avg"] for s in self.slots],
            [s.arrays["exp_avg_sq"] for s in self.slots],
            [s.arrays.get("max_exp_avg_sq") for s in self.slots],
            self.steps, self.group_of)
        self.size = sum(p.size for p in self.params)

    def _allocate(self, opt: Adam, fresh: List[Tuple[int, bool]]) -> Dict[int, _Slot]:
        """Slots for these entries: zeroed blocks per (group, dtype) and key, in entry
        order so that adjacent params get adjacent state; existing values copied in."""
        moments: Dict[int, Dict[str, Tuple[np.ndarray, torch.Tensor]]] = {i: {} for i, _ in fresh}
        for key in MOMENT_KEYS:
            by_block: Dict[tuple, List[int]] = {}
            for i, amsgrad in fresh:
                if key != "max_exp_avg_sq" or amsgrad:
                    g, p, _ = self.entries[i]
                    by_block.setdefault((g, p.dtype), []).append(i)
            for members in by_block.values():
                block = zeros_at(sum(self.params[i].size for i in members), self.params[members[0]].dtype,
                                 STATE_PAGE_OFFSETS[key])
                tensor_block, offset = torch.from_numpy(block), 0
                for i in members:
                    p, size = self.entries[i][1], self.params[i].size
                    view = tensor_block[offset:offset + size].view(p.shape)
                    old = opt.state.get(p, {}).get(key)
                    if old is not None:
                        view.copy_(old)
                    moments[i][key] = (block[offset:offset + size], view)
                    offset += size
        slots = {}
        for i, _ in fresh:
            p = self.entries[i][1]
            old_step = opt.state.get(p, {}).get("step")
            step = 0 if old_step is None else check_step_count(_scalar(old_step), f"the state of {self.names[i]}['step']")
            slots[i] = _Slot(moments[i], step)
        return slots

    def step(self, opt: Adam, grads: List[torch.Tensor], grad_scale: float,
             num_threads: Optional[int]) -> None:
        hyper = [check_group_hyperparameters(_fastadam_group(opt.param_groups[g]), f"param_groups[{g}]",
                                             int(self.steps[self.first_of_group[k]]) + 1,
                                             self.group_dtypes[k])
                 for k, g in enumerate(self.groups)]
        if grad_scale != 1.0:
            check_grad_scale_range(grad_scale, {d for ds in self.group_dtypes for d in ds})
        arrays, untouched = check_grads(self.table, [_kernel_grad(g) for g in grads], self.params,
                                        names=[f"the gradient of {n}" for n in self.names])
        for (_, p, _), slot in zip(self.entries, self.slots):  # every check passed: commit
            if id(p) in self.new_slots:
                slot.commit(opt.state[p])
                opt._slots[id(p)] = slot
        self.new_slots = {}
        self.table.step(arrays, hyper, grad_scale, threads_for(num_threads, self.size - untouched))
        for slot, step in zip(self.slots, self.steps):
            slot.step = int(step)
        torch._foreach_add_([s.step_tensor for s in self.slots], 1.0)


def _kernel_grad(grad: torch.Tensor) -> Any:
    """A NumPy view of a dense gradient, or (rows, values) views of a row-sparse COO one.
    Uncoalesced is fine: fastadam sums duplicate rows itself (left to right)."""
    if grad.is_sparse:
        return (grad._indices()[0].numpy(), grad._values().contiguous().numpy())
    return grad.numpy()
