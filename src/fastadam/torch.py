"""PyTorch front end: ``fastadam.torch.Adam`` and ``fastadam.torch.AdamW``.

Drop-in ``torch.optim.Optimizer`` subclasses with torch's signatures and defaults. Each
``step()`` hands every CPU float32/float64/bfloat16/float16 parameter that has a gradient
to fastadam's
engine in ONE call (all groups, one OpenMP team, GIL released), zero-copy. The adapter
computes no Adam math and keeps no state of its own: parameters are registered with the
engine (fastadam._engine) as views of their memory, and ``opt.state`` shows the engine's
state as torch tensors. The update is torch's fused CPU Adam's, bit for bit: by default
the numerics profile that matches ``torch.optim.Adam(fused=True)`` at the capability ATen
runs here ("torch", with the FMAs of its AVX2/AVX-512 kernel, or "exact" on its default
capability; see :func:`default_numerics` and docs/numerics-torch.md).

The per-step work over the parameters (finding each gradient, checking its dtype, shape,
strides and device, checking that the parameter and its ``opt.state`` entry are still
what the engine holds, taking the address) runs in one compiled loop
(fastadam._torch_gather). Anything it does not recognise sends that step down the
general path, which handles it (a parameter whose storage moved is re-pointed, state the
user replaced or loaded is copied in, a sparse gradient takes the row path) or refuses it
with an error naming the parameter, before anything is written.

State is torch tensors in torch's layout (``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``), so ``torch.save(opt.state_dict())`` works and state dicts move both
ways between these classes and ``torch.optim.Adam``/``AdamW``. The moment tensors are
views of blocks the engine allocates (one per group and dtype, at staggered page offsets,
so they never 4K-alias torch's own allocations), with the parameter's strides. ``step``
tensors are float32 views of the engine's mirror of its exact int64 counts: an in-place
edit (``state["step"].zero_()``) is honoured by the next step, as in torch.

Layouts: a parameter may have any dense, non-overlapping layout (contiguous,
``channels_last``, transposed): its state takes the same strides and its gradient must
have them too (autograd's gradients do; another layout is copied once per step). A
parameter with gaps in its memory (a strided slice of a larger tensor) is updated
through a dense copy, copied in before and back after each step; its state is
contiguous, as torch's is.

Sparse gradients: a gradient in sparse COO layout with one sparse dimension (what
``nn.Embedding(sparse=True)`` produces) takes fastadam's lazy row path, like
``torch.optim.SparseAdam``: only the rows it names, and their moments, change; duplicate
indices (an uncoalesced gradient) are summed first; the step count advances by one. Unlike
SparseAdam the update is Adam's full one (weight decay, AMSGrad, maximize) in the
paper's epsilon form, as for dense gradients; SparseAdam adds eps to the un-corrected
sqrt(v), so the two agree exactly in the math for eps=0 and differ by O(eps) otherwise.

16-bit parameters: bfloat16 and float16 parameters are updated as torch's fused Adam does
(state of the parameter's type, math in float32, rounded to nearest even), bit for bit.
``master_weights=True`` keeps a float32 master copy of each (``opt.state[p]
["master_param"]``) with float32 moments instead: each step updates the master and writes
the parameter rounded in the same pass, bit-identical to float32 Adam on ``grad.float()``
followed by ``p.copy_(master)``. ``stochastic_rounding=True`` (with ``seed``) rounds
bfloat16 parameters without a master stochastically, reproducibly. ``state_dtype=
torch.bfloat16`` keeps bfloat16 moments of float32 parameters (DeepSpeed's
``fp32_optimizer_states=False``): read and written as bfloat16, computed in float32.

DTensor parameters (FSDP2's ``fully_shard``, on a CPU device mesh or with
``CPUOffloadPolicy``): each rank's local shard is updated in place with its local shard of
the gradient, in the same one engine call per step, and the state is shown as DTensors
sharded like the parameter, so ``torch.distributed.checkpoint`` saves, loads and re-shards
it (fastadam._torch_dtensor; docs/guide/fsdp2.md). A step communicates nothing.

Differences from torch, by design: parameters must be CPU float32/float64/bfloat16/float16
(or complex) tensors (anything else is a TypeError naming the parameter); ``capturable=True`` and
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

import sys
import threading
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, cast

import numpy as np

from fastadam._hints import check_torch_params, missing_framework

try:
    import torch
except ImportError as exc:  # say what to install (issue 23), as fastadam.distributed does
    raise missing_framework("torch", exc) from exc
from torch.optim import Optimizer

from fastadam._engine import STATE_KEYS, Engine
from fastadam._threads import NumThreadsAttribute
from fastadam._torch_gather import Gather, torch_layout_guards
from fastadam._validation import (
    BFLOAT16_BITS,
    GroupMemo,
    Hyperparameters,
    check_flag,
    check_grad_scale_range,
    check_group_hyperparameters,
    check_group_in_full,
    check_numerics,
    check_seed,
    check_state_dtype,
    check_step_count,
    remembered_group,
)

__all__ = ["Adam", "AdamW", "UnsupportedParameter", "default_numerics"]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
HALF_DTYPES = (torch.bfloat16, torch.float16)  # may have master weights
# Updated as pairs of reals (torch.view_as_real), as torch's Adam does.
COMPLEX_DTYPES = (torch.complex64, torch.complex128)
# What torch.optim.Adam's __setstate__ fills in for groups saved before a key existed.
# The keys of a parameter's opt.state entry that fastadam publishes and adopts.
OWN_KEYS = ("step",) + STATE_KEYS
GROUP_DEFAULTS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                  "differentiable": False, "fused": None, "decoupled_weight_decay": False}


def _scalar(value: Any) -> Any:
    """A Python number for a 1-element tensor (torch allows tensor lr and betas)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"expected a 1-element tensor, got shape {tuple(value.shape)}")
        return value.item()
    return value


def default_numerics() -> str:
    """The numerics profile that reproduces ``torch.optim.Adam(fused=True)`` bit for bit in
    this process: "torch" (the FMAs of torch's vectorized fused kernel) where ATen runs its
    AVX2 or AVX-512 kernels, "exact" (no FMA) on its default capability
    (docs/numerics-torch.md)."""
    return "torch" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "exact"


def _fastadam_group(group: Dict[str, Any], numerics: str) -> Dict[str, Any]:
    """A torch param group's hyperparameters in fastadam's terms (on every step: the
    plain case first)."""
    lr, betas = group["lr"], group["betas"]
    if type(lr) is not float:
        lr = lr if callable(lr) and not isinstance(lr, torch.Tensor) else _scalar(lr)
    if type(betas) is not tuple or len(betas) != 2 or type(betas[0]) is not float or (
            type(betas[1]) is not float):
        betas = tuple(_scalar(b) for b in betas)
    return {
        "lr": lr,
        "betas": betas,
        "eps": group["eps"],
        "weight_decay": group["weight_decay"],
        "amsgrad": group["amsgrad"],
        "maximize": group["maximize"],
        "decoupled_weight_decay": group.get("decoupled_weight_decay", False),
        "eps_hat": False,
        "eps_root": 0.0,
        "numerics": numerics,
    }


class UnsupportedParameter(TypeError, RuntimeError):
    """A parameter fastadam.torch cannot update (device, dtype, layout): a TypeError, as
    every fastadam refusal of a kind is, and a RuntimeError, as torch's fused Adam raises
    for the same parameters (code written for torch catches it)."""


def _check_arguments_like_torch(**arguments: Any) -> None:
    """torch.optim.Adam's own checks of its constructor arguments, in its order, with its
    types and messages: torch's constructor itself runs them, on a placeholder parameter
    (so they follow the installed torch version)."""
    torch.optim.Adam([torch.empty(0, requires_grad=True)], **arguments)


_ANY_KEY = object()  # an edit that may touch any key


class _CountsEdits:
    """For dict types: each call that may change the dict first counts an edit (of one
    key, or of any), so that a step can tell nothing changed without looking inside.
    The dict types that take this pickle and copy as torch's own plain ones."""

    def _edited(self, key: Any = _ANY_KEY) -> None:
        raise NotImplementedError

    def __setitem__(self, key: Any, value: Any) -> None:
        self._edited(key)
        super().__setitem__(key, value)  # type: ignore[misc]

    def __delitem__(self, key: Any) -> None:
        self._edited(key)
        super().__delitem__(key)  # type: ignore[misc]

    def pop(self, key: Any, *default: Any) -> Any:
        self._edited(key)
        return super().pop(key, *default)  # type: ignore[misc]

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._edited(key)
        return super().setdefault(key, default)  # type: ignore[misc]

    def popitem(self) -> Any:
        self._edited()
        return super().popitem()  # type: ignore[misc]

    def clear(self) -> None:
        self._edited()
        super().clear()  # type: ignore[misc]

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._edited()
        super().update(*args, **kwargs)  # type: ignore[misc]

    def __ior__(self, other: Any) -> Any:
        self._edited()
        return super().__ior__(other)  # type: ignore[misc]


class _StateTable(_CountsEdits, defaultdict):
    """``opt.state``: torch's ``defaultdict(dict)``, counting the edits that add, remove
    or replace a parameter's entry, and (through its :class:`_Entry` dicts) the edits of
    fastadam's keys inside an entry. A step whose count is the one it last saw reads no
    entry: nothing in them changed."""

    def __init__(self, *args: Any) -> None:
        super().__init__(self._new_entry, *args)
        self.edits = 0

    def _new_entry(self) -> "_Entry":
        return _Entry(self)

    def _edited(self, key: Any = _ANY_KEY) -> None:
        self.edits += 1

    def __reduce__(self) -> Any:  # pickles as torch's own
        return (defaultdict, (dict,), None, None, iter(self.items()))

    def __copy__(self) -> Any:
        return defaultdict(dict, self)


class _Entry(_CountsEdits, dict):
    """One parameter's dict in ``opt.state``: a plain dict that adds to its table's edit
    count when one of fastadam's keys (``step``, the moments, the master copy) may
    change. Other code's keys (timm's Lookahead keeps its slow weights here) are free."""

    def __init__(self, table: _StateTable, *args: Any) -> None:
        super().__init__(*args)
        self.table = table

    def _edited(self, key: Any = _ANY_KEY) -> None:
        if key is _ANY_KEY or key in OWN_KEYS:
            self.table.edits += 1

    def __reduce__(self) -> Any:  # pickles and deep-copies as a plain dict
        return (dict, (dict(self),))

    def __copy__(self) -> Any:
        return dict(self)


class Adam(Optimizer):
    """Adam for PyTorch CPU tensors through fastadam's kernels (see the module docstring).

    Takes torch.optim.Adam's arguments, plus ``num_threads`` (OpenMP threads of each
    step; None follows :func:`fastadam.get_num_threads`) and ``numerics`` ("exact" or
    "torch"; None: :func:`default_numerics`, the profile that gives the bits of
    ``torch.optim.Adam(fused=True)`` in this process).
    """

    # torch.amp.GradScaler passes grad_scale= and found_inf= to step() instead of
    # unscaling the gradients itself, as it does for torch's fused optimizers.
    _step_supports_amp_scaling = True
    _forces_decoupled_weight_decay = False

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
        numerics: Optional[str] = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        state_dtype: Any = None,
    ) -> None:
        _check_arguments_like_torch(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            foreach=foreach, maximize=maximize, capturable=capturable,
            differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay)
        self.numerics = default_numerics() if numerics is None else numerics
        check_numerics(self.numerics, 0.0)
        self.master_weights = check_flag(master_weights, "master_weights")
        # None, or bfloat16 moments (of float32 parameters: checked as groups are added)
        self.bfloat16_state = check_state_dtype(
            "bfloat16" if state_dtype is torch.bfloat16 else state_dtype,
            self.master_weights) is not None
        self.rounding_seed = (check_seed(seed)
                              if check_flag(stochastic_rounding, "stochastic_rounding") else None)
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
        self._front: Optional[_Registry] = None
        self._recent: List[_Registry] = []  # see _registry
        super().__init__(params, defaults)
        self.state = _StateTable(self.state)

    num_threads = NumThreadsAttribute()
    _num_threads: Optional[int]  # the descriptor's storage

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        with self._lock:
            index = len(self.param_groups)
            candidate = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
            for flag in ("capturable", "differentiable"):
                if candidate.get(flag):
                    raise ValueError(f"param_groups[{index}]: {flag}=True is not supported by "
                                     "fastadam.torch")
            check_group_hyperparameters(_fastadam_group(candidate, self.numerics),
                                        f"param_groups[{index}]", 1)
            super().add_param_group(param_group)
            try:  # an int8 or sparse parameter fails here, named, not at the first step()
                check_torch_params(self.param_groups[-1], index, *self._param_dtypes())
                _check_one_kind(self.param_groups)
            except TypeError:
                self.param_groups.pop()  # a rejected call changes nothing
                raise
            self._front = None  # the next step registers the new parameters
            self._recent = []

    def _param_dtypes(self) -> Tuple[Tuple[torch.dtype, ...], str]:
        """The parameter dtypes this optimizer's options allow, and why, if restricted."""
        if self.master_weights:
            return HALF_DTYPES, ("master_weights=True keeps float32 masters of bfloat16 and "
                                 "float16 parameters")
        if self.bfloat16_state:
            return (torch.float32,), "state_dtype=torch.bfloat16 keeps bfloat16 moments of float32 parameters"
        return SUPPORTED_DTYPES + COMPLEX_DTYPES, ""

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        with self._lock:
            super().load_state_dict(state_dict)
            if self.master_weights:
                self._keep_float32_state(state_dict)
            # torch keeps the loaded tensors themselves (no copy when dtype and device
            # match): take a snapshot, so the source's later steps cannot leak in. The
            # next step copies the values into the engine.
            for key, state in self.state.items():  # (a post-hook may add other entries)
                if isinstance(state, dict):
                    self.state[key] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                       for k, v in state.items()}

    def _keep_float32_state(self, state_dict: Dict[str, Any]) -> None:
        """Undo torch's cast of loaded state to each parameter's dtype (bfloat16 here):
        master weights and their moments are float32, and must load bit for bit."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if not isinstance(saved, dict) or not isinstance(self.state.get(p), dict):
                continue
            for key in STATE_KEYS:
                if isinstance(saved.get(key), torch.Tensor):
                    self.state[p][key] = saved[key].detach().to(device="cpu")

    def state_dict(self) -> Dict[str, Any]:
        state_dict = super().state_dict()
        # Each entry as the plain dict torch's own gives (torch.load(weights_only=True)
        # takes no other type); its tensors are the state's, as torch's are.
        state_dict["state"] = {k: dict(v) if isinstance(v, _Entry) else v
                               for k, v in state_dict["state"].items()}
        # torch.optim.Adam(fused=True) resuming from this state dict takes the group's
        # "fused" value: None would send it down its slow path.
        for group in state_dict["param_groups"]:
            if group.get("fused") is None and group.get("foreach") is None:
                group["fused"] = True
        return state_dict

    def __getstate__(self) -> Dict[str, Any]:
        # torch's Optimizer.__getstate__ keeps only defaults, state and param_groups;
        # the copy's state tensors are its own (deepcopy/pickle copy them), so the copy
        # registers them with an engine of its own on its first step.
        return {**super().__getstate__(), "_num_threads": self._num_threads,
                "numerics": self.numerics, "master_weights": self.master_weights,
                "rounding_seed": self.rounding_seed, "bfloat16_state": self.bfloat16_state}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()  # a lock is never copied: each copy has its own
        self.__dict__.setdefault("_num_threads", None)
        self.__dict__.setdefault("numerics", default_numerics())
        self.__dict__.setdefault("master_weights", False)
        self.__dict__.setdefault("bfloat16_state", False)
        self.__dict__.setdefault("rounding_seed", None)
        self.state = _StateTable(self.state)
        self._front = None
        self._recent = []
        for group in self.param_groups:  # groups saved before a key existed (torch does so)
            for key, value in GROUP_DEFAULTS.items():
                group.setdefault(key, value)
            if self._forces_decoupled_weight_decay:
                group["decoupled_weight_decay"] = True

    # Under torch.compile the step runs eagerly as one opaque call: Dynamo cannot trace
    # the lock and the compiled kernels, and tracing into them cost 7 graph breaks and
    # made a compiled training step slower than eager.
    @torch.compiler.disable
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
        if found_inf is not None and float(found_inf) != 0.0:
            return
        scale = 1.0 if grad_scale is None else float(grad_scale)
        if not scale > 0.0 or scale != scale or scale == float("inf"):
            raise ValueError(f"grad_scale must be a finite number > 0, got {scale!r}")
        if type(self.state) is not _StateTable:  # replaced by the user: watched again
            self.state = _StateTable(self.state)
        front = self._front
        if front is None or not front.serves(self) or front.outdated(self):
            self._front = front = self._registry()
        front.step(self, scale)

    _KEPT_REGISTRIES = 8

    def _registry(self) -> _Registry:
        """The registry of the parameters the groups hold now: a recent one that holds
        exactly them, else a new one. torch's Adam reads ``group["params"]`` at every
        step, and DeepSpeed's ZeRO-3 puts each sub-group's parameter there in turn before
        stepping it: each set keeps its registry, and with it its state in place (state
        that another registry moved meanwhile is adopted from ``opt.state``)."""
        for k, front in enumerate(self._recent):
            if front.serves(self) and not front.outdated(self):
                self._recent.insert(0, self._recent.pop(k))
                return front
        front = _Registry(self)
        self._recent = [front] + self._recent[:self._KEPT_REGISTRIES - 1]
        return front


class AdamW(Adam):
    """AdamW (decoupled weight decay, default 1e-2) for PyTorch CPU tensors."""

    _forces_decoupled_weight_decay = True  # as torch.optim.AdamW, whatever a state dict says

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
        numerics: Optional[str] = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        state_dtype: Any = None,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=True, num_threads=num_threads,
                         numerics=numerics, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, seed=seed,
                         state_dtype=state_dtype)


class _Registry:
    """The optimizer's parameters as the engine's tensors: what this front end maps
    between torch's objects and the engine's inputs (and nothing else).

    Every parameter of every group that the engine can update (a dense CPU float32,
    float64, bfloat16 or float16 tensor) is registered at construction, in group order
    (with the optimizer's master weights and rounding); the others are
    checked at each step and refused once they have a gradient. State is created by
    the engine on a tensor's first gradient and shown in ``opt.state`` as torch views.
    """

    def __init__(self, opt: Adam) -> None:
        self.engine = Engine()
        self.engine.rounding_seed = opt.rounding_seed
        # What the engine updates: each parameter, or a DTensor parameter's local shard.
        self.params: List[torch.Tensor] = []
        # The parameters as the user gave them: the keys of opt.state, the holders of .grad.
        self.owners: List[torch.Tensor] = []
        self.names: List[str] = []
        self.unregistered: List[Tuple[str, torch.Tensor]] = []
        self.published: Dict[int, tuple] = {}  # what fastadam put into opt.state, per tensor
        # Parameters with gaps in their memory: the engine updates a dense copy of each,
        # copied in before and back after every step (torch's state for them is dense).
        self.staged: Dict[int, torch.Tensor] = {}
        self.published_generation = -1
        self.watched: Any = None  # the opt.state whose edit count was last seen (and that count)
        self.edits: Optional[int] = None
        # Loaded or copied state waits in opt.state: the first step copies it in.
        self.stale = any(opt.state.get(p) for g in opt.param_groups for p in g["params"])
        for g, group in enumerate(opt.param_groups):
            tensors, names = [], []
            for i, p in enumerate(group["params"]):
                name = f"param_groups[{g}]['params'][{i}]"
                if _refusal(p, name) is None:
                    tensors.append(p)
                    names.append(name)
                else:
                    self.unregistered.append((name, p))
            first = len(self.params)
            self.engine.add([self._engine_view_of(first + k, _local(p))
                             for k, p in enumerate(tensors)], g, names, master=opt.master_weights,
                            state_dtype=BFLOAT16_BITS if opt.bfloat16_state else None)
            self.params += [_local(p) for p in tensors]
            self.owners += tensors
            self.names += names
        self.sharded = any(p is not q for p, q in zip(self.owners, self.params))  # DTensors
        self.layouts = [_layout(p) for p in self.params]
        self.lists = [group["params"] for group in opt.param_groups]  # see serves
        self.members = [list(group["params"]) for group in opt.param_groups]
        self.memos = [GroupMemo() for _ in opt.param_groups]  # each group's last record
        self.addresses = np.zeros(len(self.params), np.int64)
        self.steps = torch.from_numpy(self.engine.float_steps())
        self.gather = self._new_gather()

    def _engine_view_of(self, i: int, p: torch.Tensor) -> np.ndarray:
        """The memory the engine updates for parameter i: its own, or a dense copy."""
        if _is_dense(p):
            self.staged.pop(i, None)
            return _engine_view(p)
        self.staged[i] = torch.empty(p.shape, dtype=p.dtype)
        return _engine_view(self.staged[i])

    def _new_gather(self) -> Gather:
        gather = Gather(self.params, [lay[1] for lay in self.layouts],
                        [lay[2] for lay in self.layouts],
                        [_state_strides(p) for p in self.params],
                        np.array([lay[0] for lay in self.layouts], np.int64),
                        np.array([p.numel() for p in self.params], np.int64), torch.Tensor,
                        torch_layout_guards())
        return gather

    def serves(self, opt: Adam) -> bool:
        """Do the optimizer's groups hold the parameters registered here? A group's list
        seen before is taken as it was (its in-place edits are not seen: add_param_group
        is the way to add parameters); a new list, as code that replaces
        ``group["params"]`` gives, is compared element by element."""
        groups = opt.param_groups
        if len(groups) != len(self.lists):
            return False
        for k, group in enumerate(groups):
            params = group["params"]
            if params is not self.lists[k]:
                if len(params) != len(self.members[k]) or any(
                        a is not b for a, b in zip(params, self.members[k])):
                    return False
                self.lists[k] = params
        return True

    def outdated(self, opt: Adam) -> bool:
        """Has a parameter the engine could not take before become one it can?"""
        return any(p.grad is not None and _refusal(p, name) is None
                   for name, p in self.unregistered)

    # --- a step ------------------------------------------------------------------------

    def step(self, opt: Adam, grad_scale: float) -> None:
        for name, p in self.unregistered:
            if p.grad is not None:
                problem = _refusal(p, name)
                if problem is not None:
                    raise problem
        hypers = self._hyperparameters(opt)
        if grad_scale != 1.0:  # a normal number of every element type it divides
            check_grad_scale_range(grad_scale, self.engine.dtypes())
        if (not self.stale and opt.state is self.watched and self.edits is not None
                and opt.state.edits == self.edits):  # no entry of opt.state changed: see _Entry
            first_irregular, active = self.gather.run(self.addresses, self._local_grads())
            if first_irregular < 0:
                if active or self.addresses.any():  # (gradients without elements count a step)
                    self._stage_in()
                    self.engine.step_pointers(self.addresses, active, hypers,
                                              grad_scale=grad_scale, num_threads=opt._num_threads)
                    self._stage_out()
                    self._publish(opt)
                return
        self.watched = None
        self._general_step(opt, hypers, grad_scale)

    def _local_grads(self) -> Optional[List[Any]]:
        """For DTensor parameters, their gradients' local shards, as the gather takes
        them (fastadam._torch_dtensor.local_grads); None: the gather reads ``.grad``."""
        return _dtensors().local_grads(self.owners, self.params) if self.sharded else None

    def _hyperparameters(self, opt: Adam) -> List[Hyperparameters]:
        return [self._group_hyperparameters(opt, g, group)
                for g, group in enumerate(opt.param_groups)]

    def _group_hyperparameters(self, opt: Adam, g: int, group: Dict[str, Any]) -> Hyperparameters:
        """A group's record for this step: while the torch group holds the objects of the
        last step, that step's record (a :class:`GroupMemo` per group, compared with
        torch's own dict, so no translated dict is built); else plain numbers seen valid
        before are looked up, and anything else (tensors, a schedule) is checked in full.
        (remembered_group's sequence, on torch's dict rather than the translated one.)"""
        dtypes = self.engine.group_dtypes(g)
        memo = self.memos[g]
        record = memo.lookup(group, dtypes)
        if record is not None and record.numerics == opt.numerics:
            return record
        fields = _fastadam_group(group, opt.numerics)
        record = remembered_group(fields, dtypes)
        if record is None:
            return check_group_in_full(fields, f"param_groups[{g}]", self.engine.group_step(g),
                                       dtypes)
        memo.keep(group, dtypes, record)
        return record

    def _general_step(self, opt: Adam, hypers: List[Hyperparameters], grad_scale: float) -> None:
        """The step for everything the compiled gather does not take: parameters whose
        storage moved, state replaced or loaded, sparse or differently laid out
        gradients. Each is handled, or refused before anything is written."""
        self._follow_shards()
        for i, p in enumerate(self.params):
            self._follow_storage(i, p)
        grads = [self._kernel_grad(i, p) for i, p in enumerate(self.params)]
        for i, p in enumerate(self.params):
            self._adopt_user_state(opt, i, p)
        self.stale = False
        names = [f"the gradient of {n}" for n in self.names]
        self._stage_in()
        self.engine.step(grads, hypers, grad_scale=grad_scale, num_threads=opt._num_threads,
                         names=names, allow_none=True)
        self._stage_out()
        self._publish(opt)

    def _stage_in(self) -> None:
        """Before a step: the dense copies of parameters with gaps take the parameters'
        values (after it, :meth:`_stage_out`; a refused step raises between the two and
        leaves the parameters as they were)."""
        for i, copy in self.staged.items():
            copy.copy_(self.params[i])

    def _stage_out(self) -> None:
        """After a step that ran: the parameters with gaps take their copies' values."""
        for i, copy in self.staged.items():
            self.params[i].copy_(copy)

    def _follow_shards(self) -> None:
        """Take the new local tensor of a DTensor parameter whose local tensor was
        replaced (FSDP2 does on ``load_state_dict(assign=True)`` or ``model.to()``);
        :meth:`_follow_storage` then re-points the engine if its memory moved."""
        replaced = [i for i, owner in enumerate(self.owners) if _local(owner) is not self.params[i]]
        for i in replaced:
            self.params[i] = _local(self.owners[i])
        if replaced:
            self.gather = self._new_gather()

    def _follow_storage(self, i: int, p: torch.Tensor) -> None:
        """Re-point the engine when the parameter's storage was replaced (``p.data =``,
        ``model.double()``, a resize); the engine refuses a new dtype or shape once it
        holds state for the parameter, and nothing is ever read past the new memory."""
        layout = _layout(p)
        if layout == self.layouts[i]:
            return
        problem = _refusal(p, self.names[i])
        if problem is not None:
            raise problem
        self.engine.rebind(i, self._engine_view_of(i, p))
        self.layouts[i] = layout
        self.gather = self._new_gather()

    def _kernel_grad(self, i: int, p: torch.Tensor) -> Any:
        """A NumPy view of the gradient's memory in the engine's order, (rows, values)
        views of a row-sparse COO gradient, or None; refuses anything else by name."""
        name = self.names[i]
        owner = self.owners[i]
        grad = p.grad if owner is p else _dtensors().local_grad(owner, name)
        if grad is None:
            return None
        if grad.device.type != "cpu":
            raise TypeError(f"{name} has a gradient on {grad.device}; fastadam.torch updates "
                            "CPU tensors only")
        if grad.layout == torch.sparse_coo:
            if grad.sparse_dim() != 1 or p.dim() == 0 or not p.is_contiguous() or p.is_complex():
                raise TypeError(f"{name} has a sparse gradient with {grad.sparse_dim()} sparse "
                                "dimensions; fastadam.torch takes row-sparse ones (sparse_dim=1, "
                                "as nn.Embedding(sparse=True) gives) for contiguous parameters")
            if grad.dtype != p.dtype:
                raise TypeError(f"{name} has a {grad.dtype} gradient for a {p.dtype} parameter")
            # Uncoalesced is fine: the engine sums duplicate rows itself (left to right).
            values = grad._values().resolve_neg().resolve_conj().contiguous()
            return (grad._indices()[0].numpy(), values.numpy())
        if grad.layout != torch.strided:
            raise TypeError(f"{name} has a {grad.layout} gradient; fastadam.torch takes dense "
                            "gradients and sparse COO ones (as nn.Embedding(sparse=True) gives)")
        if grad.dtype != p.dtype:
            raise TypeError(f"{name} has a {grad.dtype} gradient for a {p.dtype} parameter")
        if grad.shape != p.shape:
            raise ValueError(f"{name} has a gradient of shape {tuple(grad.shape)} for a "
                             f"parameter of shape {tuple(p.shape)}")
        strides = _state_strides(p)
        # Read in the engine's memory order, with a negative or conjugate view's values
        # in memory: one copy.
        if grad.stride() != strides or grad.is_neg() or grad.is_conj():
            grad = torch.empty_strided(p.shape, strides, dtype=p.dtype).copy_(grad)
        return _engine_view(grad)

    def _adopt_user_state(self, opt: Adam, i: int, p: torch.Tensor) -> None:
        """Copy into the engine what ``opt.state[p]`` holds when it is not what fastadam
        published (loaded, or replaced by the user), checked as torch would."""
        owner = self.owners[i]
        state = opt.state.get(owner)
        published = self.published.get(i)
        if published is not None and state is published[0] and _holds(published):
            return
        if not state:
            if published is not None:  # the user cleared it: start afresh, as torch does
                self.engine.load(i, 0, {})
                self.published.pop(i)
            return
        name = f"opt.state[{self.names[i]}]"
        if "step" not in state:
            raise ValueError(f"{name} has no 'step'")
        step = check_step_count(_scalar(state["step"]), f"{name}['step']")
        arrays = {}
        for key in STATE_KEYS:
            value = state.get(key)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name}['{key}'] must be a tensor, got {type(value).__name__}")
            if owner is not p:  # a DTensor parameter's state: its local shard
                value = _dtensors().local_state(value, owner, f"{name}['{key}']")
            if value.shape != p.shape:
                raise ValueError(f"{name}['{key}'] has shape {tuple(value.shape)}, the parameter "
                                 f"has {tuple(p.shape)}")
            arrays[key] = value.detach().to(device="cpu", dtype=self._state_dtype(i, p)).contiguous()
        if not {"exp_avg", "exp_avg_sq"} <= set(arrays):
            raise ValueError(f"{name} must have 'exp_avg' and 'exp_avg_sq' tensors")
        self.engine.load(i, step, _in_memory_order(arrays, p))
        self.published.pop(i, None)
        self.published_generation = -1

    def _state_dtype(self, i: int, p: torch.Tensor) -> torch.dtype:
        """The dtype of parameter i's state: float32 with a master copy, bfloat16 for
        bfloat16 moments, else p's."""
        if self.engine.master[i]:
            return torch.float32
        return torch.bfloat16 if self.engine.state_types[i] is not None else p.dtype

    # --- showing the engine's state in opt.state -------------------------------------

    def _publish(self, opt: Adam) -> None:
        """Put torch views of the engine's state into ``opt.state`` for tensors whose
        state is new since the last time (one dict per parameter, in torch's key order),
        then note ``opt.state``'s edit count: every edit up to now has been seen."""
        if self.engine.generation != self.published_generation:
            for i, p in enumerate(self.params):
                if self.engine.has_moments(i):
                    self._publish_one(opt, i, p)
            self.published_generation = self.engine.generation
        self.watched, self.edits = opt.state, getattr(opt.state, "edits", None)

    def _publish_one(self, opt: Adam, i: int, p: torch.Tensor) -> None:
        keys = ("step",) + tuple(k for k in STATE_KEYS if k in self.engine.state[i])
        entry = self.published.get(i)
        owner = self.owners[i]
        if entry is not None and entry[1] == keys and opt.state.get(owner) is entry[0] and _holds(entry):
            return
        views = [_torch_view(self.engine.state[i][k], p) for k in keys[1:]]
        if owner is not p:  # DTensors sharded like the parameter (torch's step stays plain)
            views = [_dtensors().as_state(view, owner) for view in views]
        tensors = (self.steps[i],) + tuple(views)
        table = cast(_StateTable, opt.state)  # (Adam._step keeps it one)
        state = table[owner]
        others = {k: v for k, v in state.items() if k not in OWN_KEYS}  # kept, as torch does
        if not (isinstance(state, _Entry) and state.table is table):
            # (a loaded or user-given plain dict: one whose edits the table counts)
            state = table[owner] = _Entry(table)
        state.clear()
        state.update(zip(keys, tensors))
        state.update(others)
        self.published[i] = (state, keys) + tensors


def _holds(entry: tuple) -> bool:
    """Does the dict entry[0] still hold fastadam's tensors entry[2:] under the keys
    entry[1], and none of fastadam's other keys? Keys that are not fastadam's belong to
    other code (timm's Lookahead keeps its slow weights in the entry): they are left alone."""
    state, keys = entry[0], entry[1]
    return (all(state.get(k) is t for k, t in zip(keys, entry[2:]))
            and not any(k in state for k in OWN_KEYS if k not in keys))


def _is_dtensor(p: Any) -> bool:
    """Is p a DTensor (torch.distributed.tensor's: FSDP2's parameters)? Found without
    importing torch.distributed: a DTensor exists only once its module is loaded."""
    if type(p) is torch.Tensor or type(p) is torch.nn.Parameter:
        return False
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(p, module.DTensor)


def _dtensors() -> Any:
    """fastadam._torch_dtensor, imported when first needed (it imports torch.distributed)."""
    from fastadam import _torch_dtensor
    return _torch_dtensor


def _local(p: torch.Tensor) -> torch.Tensor:
    """The tensor that holds p's elements in this process, which the engine updates in
    place: a DTensor's local shard, else p itself."""
    return p._local_tensor if _is_dtensor(p) else p  # type: ignore[attr-defined]


def _check_one_kind(param_groups: List[Dict[str, Any]]) -> None:
    """Refuse DTensor parameters mixed with plain tensors: torch's Adam refuses the mix
    (DTensor operations take no plain tensors), and under FSDP2 it means a module left
    out of ``fully_shard``, whose gradients no rank averages with the others'."""
    kinds: Dict[bool, str] = {}
    for g, group in enumerate(param_groups):
        for i, p in enumerate(group["params"]):
            kinds.setdefault(_is_dtensor(p), f"param_groups[{g}]['params'][{i}]")
    if len(kinds) > 1:
        raise TypeError(f"{kinds[True]} is a DTensor and {kinds[False]} a plain tensor: "
                        "fastadam.torch takes DTensor parameters (FSDP2's: apply fully_shard "
                        "to the root module too) or plain ones, not both in one optimizer")


def _refusal(p: Any, name: str) -> Optional[Exception]:
    """Why the engine cannot update this parameter in place (an exception to raise), or
    None when it can (a DTensor: when it can update its local shard)."""
    # (what torch's fused Adam says of such parameters, for code that matches on it)
    torch_says = ("`fused=True` requires all the params to be floating point Tensors of "
                  "supported devices")
    if not isinstance(p, torch.Tensor):
        return TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
    if _is_dtensor(p):
        problem = _dtensors().refusal(p, name, UnsupportedParameter)
        if problem is not None:
            return problem
        p = _local(p)
    elif type(p) not in (torch.Tensor, torch.nn.Parameter):
        return UnsupportedParameter(
            f"{name} is a {type(p).__name__}; fastadam.torch updates plain CPU tensors and "
            "DTensors (tensor subclasses other than DTensor are not supported)")
    if p.device.type != "cpu":
        return UnsupportedParameter(f"{name} is on {p.device}; fastadam.torch updates CPU "
                                    f"tensors only ({torch_says})")
    if p.dtype not in SUPPORTED_DTYPES + COMPLEX_DTYPES:
        return UnsupportedParameter(
            f"{name} has dtype {p.dtype}; fastadam.torch updates float32, float64, bfloat16, "
            f"float16, complex64 and complex128 parameters ({torch_says})")
    if p.layout != torch.strided:
        return UnsupportedParameter(f"{name} has layout {p.layout}; fastadam.torch updates "
                                    "dense (strided) parameters")
    return None


def _is_dense(t: torch.Tensor) -> bool:
    """Do the tensor's elements fill one range of memory, each once (any dimension order)?"""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1),
                               key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _state_strides(p: torch.Tensor) -> Tuple[int, ...]:
    """The strides of p's state and of the gradient the engine reads: p's own when its
    elements fill their memory (contiguous, channels_last, transposed), else contiguous
    (as torch's zeros_like gives for a parameter with gaps)."""
    return tuple(p.stride()) if _is_dense(p) else tuple(torch.empty(p.shape, device="meta").stride())


def _layout(p: torch.Tensor) -> Tuple[int, torch.dtype, torch.Size, Tuple[int, ...]]:
    """What the engine's view of a parameter depends on: address, dtype, shape, strides."""
    return (p.data_ptr(), p.dtype, p.shape, p.stride())


def _real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as pairs of reals (a view: shape + (2,)); others as they are."""
    return torch.view_as_real(t) if t.is_complex() else t


def _engine_view(t: torch.Tensor) -> np.ndarray:
    """The NumPy view the engine takes of a dense tensor (a complex one as pairs of
    reals; a bfloat16 one with fastadam's bfloat16 stand-in dtype, NumPy having none):
    the tensor itself when it is contiguous (row-sparse gradients need its rows), else
    its memory in memory order (1-D; its state and gradient are then laid out the same
    way)."""
    t = _real(t.detach())
    if not t.is_contiguous():
        t = t.as_strided((t.numel(),), (1,))
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BFLOAT16_BITS)
    return t.numpy()


def _torch_view(array: np.ndarray, p: torch.Tensor) -> torch.Tensor:
    """The engine's 1-D state of ``p`` as a torch tensor of p's shape and strides (and
    of the state's dtype: p's, or float32 for a master copy and its moments)."""
    if array.dtype == BFLOAT16_BITS:
        flat = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    else:
        flat = torch.from_numpy(array)
    strides = _state_strides(p)
    if not p.is_complex():
        return flat.view(p.shape) if p.is_contiguous() else flat.as_strided(p.shape, strides)
    pairs = flat.as_strided(tuple(p.shape) + (2,), tuple(2 * s for s in strides) + (1,))
    return torch.view_as_complex(pairs)


def _in_memory_order(arrays: Dict[str, torch.Tensor], p: torch.Tensor) -> Dict[str, np.ndarray]:
    """State tensors of p's shape and dtype as the engine stores them: in p's memory
    order, complex ones as pairs of reals."""
    out = {}
    for key, tensor in arrays.items():
        if not p.is_contiguous():
            tensor = torch.empty_strided(p.shape, _state_strides(p), dtype=tensor.dtype).copy_(tensor)
        out[key] = _engine_view(tensor)
    return out
