"""Data-parallel Adam over MPI with the optimizer state sharded across ranks (ZeRO stage 1).

Every rank holds the whole model in one flat block (a :class:`fastadam.FlatParams`, a flat
buffer, or a PyTorch model's parameters moved into one) and computes gradients on its own
data. ``ShardedAdam.step()`` then runs three phases:

1. **reduce**: the gradient blocks are summed across ranks; each rank receives the sum only
   for its own *shard*, a contiguous slice of the flat block (``shard_bounds``);
2. **update**: each rank runs Adam on its shard with the state (``exp_avg``,
   ``exp_avg_sq``, AMSGrad's ``max_exp_avg_sq``) that it keeps for that shard only: one
   kernel record, the sum divided by the number of ranks inside the kernel;
3. **gather**: the updated shards are gathered in place (a ring of ``Sendrecv``, or MPI's
   ``Allgatherv``) so every rank holds the whole updated model again.

Optimizer memory per rank is therefore 1/ranks of a single process's; communication per
step is one reduce-scatter and one all-gather of the flat block (as much as one all-reduce).

Exactness. After every step, every rank's parameters equal, bit for bit, those of a single
process running :class:`fastadam.Adam` on the averaged gradient
``(((g_0 + g_1) + g_2) + ... + g_{p-1}) / p``: summed in rank order in the parameters'
dtype, then divided (correctly rounded) by the number of ranks p. MPI itself promises no
summation order: MPICH's reduce-scatter, for one, picks its algorithm by message size and
rank count (recursive halving for short messages, a pairwise exchange that starts each
rank's sum with its own contribution for long ones), so with three or more ranks its sums
differ in the last bits from the rank-order sum, and differently on different ranks.

Collectives. ``collectives="fastadam"`` (the default) runs fastadam's own, on MPI's
all-to-all and point-to-point calls: the reduce-scatter receives the other ranks' slices of
this rank's shard (``Alltoallv``, in rounds through a bounded scratch buffer) and adds them
in rank order; the all-gather is a ring (p - 1 ``Sendrecv`` steps of one shard each). Both
put as many bytes on the wire as MPI's ring algorithms, and on this project's machine (MPICH
5, 2 and 3 ranks, 2^20 to 2^24 float32) they took 0.5-1.15x the time of MPICH's
``Reduce_scatter`` and a third to a quarter of its ``Allgatherv``'s. ``collectives="mpi"`` calls MPI's ``Reduce_scatter`` and
``Allgatherv``: the library chooses algorithm and topology (which may pay on some
clusters), and the sum order is its own (with one or two ranks the result is the same:
a + b == b + a).

Shards. ``shard_bounds(total, world_size, align)`` splits the flat block like
``numpy.array_split`` splits blocks of ``align`` elements: ``b = ceil(total / align)``
blocks, the first ``b % world_size`` ranks get one block more than the others, and the last
non-empty shard ends at ``total``. ``ShardedAdam`` uses ``align`` = 64 bytes (16 float32 or
8 float64 elements), so every shard starts on a cache line of the 64-byte-aligned block.

Checkpoints. :func:`save` writes one file per rank with that rank's shard of the state,
then (the commit) an index naming them; :func:`load` restores them on the same number of
ranks, or re-shards on a different number (each rank reads the files covering its new
range). Both are collective. A crash during :func:`save` leaves the previous checkpoint
loadable. The parameters are not part of the optimizer checkpoint (as with
:func:`fastadam.save`): they are the same on every rank, so save them from one rank.

This module needs mpi4py (``pip install mpi4py mpich``, or mpi4py built against the
cluster's MPI); ``import fastadam`` never imports it. Run with ``mpiexec -n 4 python
train.py``. Thread-safety and collectives: ``step``, :func:`save` and :func:`load` are
collective (every rank of ``comm`` calls them, in the same order); one ShardedAdam must not
be stepped from two threads at once.

Errors on one rank. The constructor and ``step`` check everything first on each rank, then
the ranks agree before any collective that can block (``_agree_on``: one all-reduce of a
status and a fingerprint of the settings that must match: model size and dtype,
collectives, hyperparameters, step count, ``grad_scale``, ``skip_if_nonfinite``). A bad
argument on one rank, or a setting that differs between ranks, raises on every rank,
naming the rank (or each rank's values); no rank is left waiting in a collective.
:func:`save` and :func:`load` likewise raise on every rank when one rank fails.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

try:
    from mpi4py import MPI
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without mpi4py
    raise ImportError(
        "fastadam.distributed needs mpi4py and an MPI library: pip install mpi4py mpich (or "
        f"mpi4py built against your system's MPI); importing mpi4py.MPI failed: {exc}"
    ) from exc

from fastadam._hints import keyword_names
from fastadam._memory import ALIGNMENT, zeros_at
from fastadam._validation import (
    MAX_STEP,
    as_array,
    check_at_least,
    check_flag,
    check_grad_scale_range,
    check_group_hyperparameters,
    check_no_overlap,
    check_num_threads,
)
from fastadam.checkpoint import _json_hyperparameters, _state_dict, read_npz, write_npz_atomically
from fastadam.flat import GRAD_PAGE_OFFSET, FlatParams
from fastadam.optim import Adam, LearningRate

__all__ = ["ShardedAdam", "load", "save", "shard_bounds"]

COLLECTIVES = ("fastadam", "mpi")
_MPI_TYPES = {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE}
# fastadam's reduce-scatter receives the slices of its shard in rounds through a scratch buffer
# of about this many bytes (kept between steps): bounded memory whatever the model size,
# and messages of 16 MiB / ranks per peer and round (256 KiB at 64 ranks), far above the
# sizes where latency dominates.
ORDERED_SCRATCH_BYTES = 1 << 24

Bounds = List[Tuple[int, int]]


def shard_bounds(total: int, world_size: int, align: int = 1) -> Bounds:
    """The ``(start, stop)`` of each rank's shard of ``total`` elements (see the module
    docstring): contiguous, in rank order, covering ``[0, total)``; the starts are multiples
    of ``align``; shard sizes differ by at most ``align`` elements, except that the last
    non-empty shard may be shorter and trailing shards may be empty."""
    for value, name, low in ((total, "total", 0), (world_size, "world_size", 1), (align, "align", 1)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    total, world_size, align = int(total), int(world_size), int(align)
    blocks = -(-total // align)
    base, extra = divmod(blocks, world_size)
    bounds = []
    for rank in range(world_size):
        start = align * (rank * base + min(rank, extra))
        stop = start + align * (base + (rank < extra))
        bounds.append((min(start, total), min(stop, total)))
    return bounds


def _is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # never import torch here: only recognise its tensors
    return torch is not None and isinstance(obj, torch.Tensor)


def _is_buffer(obj: Any) -> bool:
    if isinstance(obj, np.ndarray):
        return True
    try:
        memoryview(obj)
    except TypeError:
        return False
    return True


class _TorchBinding:
    """A PyTorch model's parameters moved into a FlatParams: each ``p.data`` becomes a view
    of the flat block (zero-copy from then on); each step copies ``p.grad`` into the flat
    gradient block unless it already is a view of it."""

    @staticmethod
    def check(tensors: List[Any]) -> Tuple[int, np.dtype]:
        """The element count and dtype of these tensors, after checking they can be bound."""
        import torch

        for i, p in enumerate(tensors):
            name = f"params[{i}]"
            if p.device.type != "cpu" or p.layout != torch.strided:
                raise TypeError(f"{name} must be a dense CPU tensor, got {p.layout} on {p.device}")
            if p.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"{name} must have dtype float32 or float64, got {p.dtype}")
            if p.dtype != tensors[0].dtype:
                raise TypeError(f"{name} has dtype {p.dtype}, params[0] has {tensors[0].dtype}: "
                                "one ShardedAdam takes parameters of one dtype")
        arrays = [p.detach().numpy() for p in tensors]
        check_no_overlap([a.reshape(-1) for a in arrays], [f"params[{i}]" for i in range(len(arrays))])
        return sum(a.size for a in arrays), arrays[0].dtype

    def __init__(self, tensors: List[Any]):
        import torch

        self.tensors = tensors
        self.flat = FlatParams.from_arrays([p.detach().numpy() for p in tensors])
        for p, view, grad_view in zip(tensors, self.flat.params, self.flat.grads):
            p.data = torch.from_numpy(view)
            if p.grad is not None and not p.grad.is_sparse:
                grad_view[...] = p.grad.detach().numpy()
                p.grad = torch.from_numpy(grad_view)

    def collect_grads(self) -> None:
        """Bring every ``.grad`` into the flat gradient block (a missing grad counts as
        zero); refuse parameters that no longer live in the flat block."""
        for i, (p, view, grad_view) in enumerate(zip(self.tensors, self.flat.params, self.flat.grads)):
            if p.data_ptr() != view.ctypes.data or tuple(p.shape) != view.shape:
                raise ValueError(f"params[{i}] no longer lives in ShardedAdam's flat block (was it "
                                 "moved, resized or assigned a new .data?)")
            grad = p.grad
            # (torch itself keeps .grad's shape, dtype and device those of the param)
            if grad is None:
                grad_view.fill(0)
            elif grad.is_sparse:
                raise TypeError(f"params[{i}].grad is sparse; ShardedAdam takes dense gradients")
            elif grad.data_ptr() != grad_view.ctypes.data:
                grad_view[...] = grad.detach().numpy()


class ShardedAdam:
    """Adam over MPI ranks with each rank keeping the state of its shard only (ZeRO-1).

    Parameters
    ----------
    params : FlatParams, flat buffer, or sequence of torch tensors
        The whole model, the same size and dtype on every rank (rank 0's values are
        broadcast to the others here, as torch's DistributedDataParallel does). A
        :class:`fastadam.FlatParams` is used in place, its ``grad_data`` being the default
        gradient. A 1-D float32/float64 buffer (NumPy array, or anything exporting the
        buffer protocol: zero-copy) is updated in place; ``step`` then needs ``grads``. The
        parameters of a PyTorch model (dense CPU float32/float64 tensors of one dtype) are
        copied once into a FlatParams and each ``p.data`` becomes a view of it; ``step``
        reads their ``.grad``. A parameter whose ``.grad`` is None counts as having a zero
        gradient (its moments still decay and it may still move, where torch.optim would
        skip it): every rank must apply the same update to every element.
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that train together (default ``MPI.COMM_WORLD``).
    lr, betas, eps, weight_decay, amsgrad, maximize, eps_hat, eps_root, decoupled_weight_decay, numerics
        As in :class:`fastadam.Adam` (``lr`` may be a schedule).
    num_threads : int, optional
        OpenMP threads of each rank's update (None: :func:`fastadam.get_num_threads`). With
        several ranks on one machine, give each rank its share of the cores.
    collectives : {"fastadam", "mpi"}
        fastadam's reduce-scatter (rank-order sums: bit-identical to one process) and ring
        all-gather, or MPI's ``Reduce_scatter`` and ``Allgatherv`` (module docstring).

    Attributes
    ----------
    rank, world_size : int
        This process's rank in ``comm``, and the number of ranks.
    bounds : list of (int, int)
        Every rank's shard of the flat block (:func:`shard_bounds`); ``shard`` is this
        rank's.
    params, grads : numpy.ndarray
        The flat parameter block (1-D, updated in place) and the default gradient block
        (None for a bare buffer).
    flat : FlatParams or None
        The FlatParams given, or the one built for torch tensors.
    param_groups : list of dict
        One group whose hyperparameters may be edited between steps (on every rank alike).
    state : dict
        ``step`` and this rank's shard of ``exp_avg``, ``exp_avg_sq`` (``max_exp_avg_sq``).
    state_nbytes : int
        Bytes of optimizer state this rank holds. ``scratch_nbytes``: the other buffers
        of its own, one shard for the summed gradient and, with more than one rank and the
        fastadam's collectives, a receive buffer of at most 16 MiB (ORDERED_SCRATCH_BYTES).
    seconds : dict
        Cumulative wall time of the phases ``reduce``, ``update`` and ``gather``.
    skipped_steps : int
        Steps refused by ``skip_if_nonfinite`` (the same on every rank).
    """

    def __init__(
        self,
        params: Any,
        comm: Optional[Any] = None,
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
        collectives: str = "fastadam",
    ) -> None:
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm):  # (no communicator: this rank alone can tell)
            raise TypeError(f"comm must be an mpi4py.MPI.Intracomm, got {type(comm).__name__}")
        hyperparameters: Dict[str, Any] = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                               amsgrad=amsgrad, maximize=maximize, eps_hat=eps_hat,
                               eps_root=eps_root, decoupled_weight_decay=decoupled_weight_decay,
                               numerics=numerics)
        self.comm = comm
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()
        self.collectives = collectives
        self._torch: Optional[_TorchBinding] = None
        self.flat: Optional[FlatParams] = None
        self.grads: Optional[np.ndarray] = None
        # Everything is checked, and the ranks agree that it passed everywhere and on the
        # model and hyperparameters, before a tensor is moved or a collective can block.
        error, settings, tensors, total, dtype = None, None, None, 0, np.dtype(np.float64)
        try:
            tensors, total, dtype, settings = self._check_construction(
                params, hyperparameters, num_threads, collectives)
        except Exception as exc:  # raised on every rank by _agree_on, after it
            error = exc
        _agree_on(comm, error, settings, "construct ShardedAdam")
        if tensors is not None:
            self._torch = _TorchBinding(tensors)
            self.flat = self._torch.flat
            self.params, self.grads = self.flat.data, self.flat.grad_data

        self.bounds = shard_bounds(total, self.world_size, ALIGNMENT // dtype.itemsize)
        self.shard = self.bounds[self.rank]
        start, stop = self.shard
        self._counts = [b - a for a, b in self.bounds]
        self._displs = [a for a, _ in self.bounds]
        self._type = _MPI_TYPES[dtype]
        # The summed gradient of this rank's shard (one rank: the gradient itself, no copy).
        self._scratch: Optional[np.ndarray] = None  # of fastadam's reduce-scatter
        self._reduced = zeros_at(stop - start if self.world_size > 1 else 0, dtype, GRAD_PAGE_OFFSET)
        self._adam = Adam([self.params[start:stop]], num_threads=num_threads, **hyperparameters)
        self.skipped_steps = 0
        self.seconds = {"reduce": 0.0, "update": 0.0, "gather": 0.0}
        if self.world_size > 1:
            comm.Bcast([self.params, self._type], root=0)

    @staticmethod
    def _torch_tensors(params: Any) -> Optional[List[Any]]:
        """``params`` as a list of torch tensors, or None for a FlatParams or a buffer."""
        if _is_torch_tensor(params):  # one tensor, as torch.optim allows
            return [params]
        if isinstance(params, FlatParams) or _is_buffer(params) or not hasattr(params, "__iter__"):
            return None
        tensors = list(params)
        if not tensors or not all(_is_torch_tensor(p) for p in tensors):
            raise TypeError("params must be a FlatParams, a flat buffer or a sequence of torch "
                            "tensors; for NumPy arrays, use FlatParams.from_arrays(arrays)")
        return tensors

    def _check_construction(self, params: Any, hyperparameters: Dict[str, Any],
                            num_threads: Optional[int], collectives: Any) -> tuple:
        """This rank's checks of the constructor's arguments (no communication): (torch
        tensors or None, total elements, dtype, the settings every rank must share). Sets
        ``params``, ``grads`` and ``flat`` for a buffer or a FlatParams."""
        if collectives not in COLLECTIVES:
            raise ValueError(f"collectives must be one of {COLLECTIVES}, got {collectives!r}")
        with keyword_names():  # named as the constructor's arguments
            check_group_hyperparameters(hyperparameters, "defaults", 1)
        check_num_threads(num_threads)
        tensors = self._torch_tensors(params)
        if tensors is not None:
            total, dtype = _TorchBinding.check(tensors)
        elif isinstance(params, FlatParams):
            self.flat = params
            self.params, self.grads = params.data, params.grad_data
        else:
            self.params = as_array(params, "params", writable=True, flatten=False)
            if self.params.ndim != 1:
                raise ValueError(f"params must be a 1-D (flat) buffer, got shape {self.params.shape}")
        if tensors is None:
            total, dtype = self.params.size, self.params.dtype
        hyper = check_group_hyperparameters(hyperparameters, "defaults", 1, (dtype,))
        settings = {"params": f"{total} x {dtype.name}", "collectives": collectives,
                    **hyper._asdict()}  # (lr: a schedule's value at step 1)
        return tensors, total, dtype, settings

    def __repr__(self) -> str:
        start, stop = self.shard
        return (f"ShardedAdam(rank {self.rank} of {self.world_size}, shard [{start}, {stop}) of "
                f"{self.params.size} {self.params.dtype.name}, collectives={self.collectives!r})")

    # --- the three phases --------------------------------------------------------------

    def step(self, grads: Any = None, *, grad_scale: Optional[float] = None,
             skip_if_nonfinite: bool = False) -> bool:
        """One data-parallel Adam step (collective: every rank calls it).

        ``grads`` is this rank's flat gradient (a buffer like ``params``; default: the
        FlatParams' ``grad_data``, or the torch parameters' ``.grad``); it is only read.
        The update uses the average over ranks, ``sum / world_size``, further divided by
        ``grad_scale`` if given (one division by ``world_size * grad_scale``). With
        ``skip_if_nonfinite=True``, if the summed gradient has a NaN or Inf anywhere (on
        any rank's shard), no rank changes anything and every rank returns False.

        Before any collective that can block, the ranks agree (one small all-reduce):
        every rank's arguments passed their checks, and every rank has the same step
        count, hyperparameters (a schedule's value at this step), ``grad_scale`` and
        ``skip_if_nonfinite``. Otherwise every rank raises, naming the rank that failed
        (or the values that differ, rank by rank), and nothing changes anywhere.
        """
        error: Optional[BaseException] = None
        settings: Optional[Dict[str, Any]] = None
        try:
            grad, settings = self._check_step(grads, grad_scale, skip_if_nonfinite)
        except Exception as exc:  # raised on every rank by _agree_on, after it
            error = exc
        # Before any collective that can block: every rank passed its checks, with the
        # same step count, hyperparameters, grad_scale and skip_if_nonfinite.
        _agree_on(self.comm, error, settings, "step")
        assert settings is not None
        scale, skip_if_nonfinite = settings["grad_scale"], settings["skip_if_nonfinite"]

        t0 = time.perf_counter()
        reduced = self._reduce(grad)
        t1 = time.perf_counter()
        self.seconds["reduce"] += t1 - t0
        if skip_if_nonfinite and self._any_nonfinite(reduced):
            self.skipped_steps += 1
            return False
        self._adam.step([reduced], grad_scale=self.world_size * scale)
        t2 = time.perf_counter()
        self.seconds["update"] += t2 - t1
        self._gather()
        self.seconds["gather"] += time.perf_counter() - t2
        return True

    def _hyperparameters(self) -> Any:
        """The group's validated values for the next step (raises on a bad one)."""
        return check_group_hyperparameters(self.param_groups[0], "param_groups[0]",
                                           self._adam.engine.group_step(0), (self.params.dtype,))

    def _check_step(self, grads: Any, grad_scale: Any, skip_if_nonfinite: Any) -> tuple:
        """This rank's checks of a step (no communication): (the gradient block, the
        settings every rank must share)."""
        scale = 1.0 if grad_scale is None else check_at_least(grad_scale, "grad_scale", 0.0, strict=True)
        skip_if_nonfinite = check_flag(skip_if_nonfinite, "skip_if_nonfinite")
        grad = self._gradient_block(grads)
        hyper = self._hyperparameters()  # a bad hyperparameter raises before communicating
        step = self.state["step"]
        if step >= MAX_STEP:
            raise ValueError(f"the step count is {step} (2**63 - 1), the largest an int64 step "
                             "count can hold: it cannot advance")
        check_grad_scale_range(self.world_size * scale, (self.params.dtype,),
                               "grad_scale * world_size (the divisor of the summed gradient)")
        settings = {"step count": step, **hyper._asdict(), "grad_scale": scale,
                    "skip_if_nonfinite": skip_if_nonfinite}
        return grad, settings

    def _gradient_block(self, grads: Any) -> np.ndarray:
        if grads is None:
            if self.grads is None:
                raise ValueError("grads is required: this ShardedAdam was built on a bare buffer, "
                                 "which has no gradient block")
            if self._torch is not None:
                self._torch.collect_grads()
            return self.grads
        grad = as_array(grads, "grads", writable=False, flatten=False)
        if grad.dtype != self.params.dtype:
            raise TypeError(f"grads must have the dtype of params ({self.params.dtype.name}), got "
                            f"{grad.dtype.name}")
        if grad.ndim != 1 or grad.size != self.params.size:
            raise ValueError(f"grads must be a flat buffer of {self.params.size} elements like "
                             f"params, got shape {grad.shape}")
        check_no_overlap([self.params, grad], ["params", "grads"])
        return grad if grad.flags.aligned else grad.copy()

    def _reduce(self, grad: np.ndarray) -> np.ndarray:
        """This rank's shard of the sum of every rank's ``grad``."""
        start, stop = self.shard
        if self.world_size == 1:
            return grad[start:stop]
        if self.collectives == "mpi":
            self.comm.Reduce_scatter([grad, self._type], [self._reduced, self._type],
                                     self._counts, MPI.SUM)
        else:
            self._reduce_in_rank_order(grad)
        return self._reduced

    def _reduce_in_rank_order(self, grad: np.ndarray) -> None:
        """Receive every rank's slice of this shard (Alltoallv, in rounds through bounded
        scratch memory) and add them in rank order: ((g_0 + g_1) + g_2) + ...

        (Measured here against MPICH's Reduce_scatter, 2 and 3 ranks on one machine, 2^20
        to 2^24 float32: 0.5-1.15x its time, 0.7-0.93x from 2^22 on.)"""
        p, me = self.world_size, self.rank
        starts = np.array(self._displs, np.int64)
        lengths = np.array(self._counts, np.int64)
        longest = int(lengths.max())
        # elements per peer and round: the scratch budget's share, no more than a shard
        block = max(1, min(longest, max(1024, ORDERED_SCRATCH_BYTES // (p * grad.itemsize))))
        if self._scratch is None or self._scratch.size != p * block:
            self._scratch = np.empty(p * block, grad.dtype)
        scratch = self._scratch
        my_start = self.shard[0]
        for offset in range(0, longest, block):
            take = np.clip(lengths - offset, 0, block)
            n = int(take[me])
            send_counts, recv_counts = take.copy(), np.full(p, n, np.int64)
            send_counts[me] = recv_counts[me] = 0  # this rank's own slice is read in place
            send_displs = np.minimum(starts + offset, grad.size)
            recv_displs = np.arange(p, dtype=np.int64) * n
            self.comm.Alltoallv([grad, (send_counts.tolist(), send_displs.tolist()), self._type],
                                [scratch, (recv_counts.tolist(), recv_displs.tolist()), self._type])
            rows = [grad[my_start + offset:my_start + offset + n] if q == me
                    else scratch[q * n:(q + 1) * n] for q in range(p)]
            out = self._reduced[offset:offset + n]
            np.add(rows[0], rows[1], out=out)
            for row in rows[2:]:
                np.add(out, row, out=out)

    def _any_nonfinite(self, reduced: np.ndarray) -> bool:
        local = self._adam.engine.count_nonfinite([reduced], self._adam.num_threads)
        return bool(self.comm.allreduce(int(local > 0), op=MPI.MAX))

    def _gather(self) -> None:
        """Every rank's updated shard to every rank, in place."""
        p, me = self.world_size, self.rank
        if p == 1:
            return
        if self.collectives == "mpi":
            self.comm.Allgatherv(MPI.IN_PLACE, [self.params, (self._counts, self._displs), self._type])
            return
        # A ring: in step k each rank passes on the shard it got in step k - 1 (its own first).
        right, left = (me + 1) % p, (me - 1) % p
        for k in range(p - 1):
            send_start, send_stop = self.bounds[(me - k) % p]
            recv_start, recv_stop = self.bounds[(me - k - 1) % p]
            self.comm.Sendrecv([self.params[send_start:send_stop], self._type], dest=right,
                               recvbuf=[self.params[recv_start:recv_stop], self._type], source=left)

    # --- state -------------------------------------------------------------------------

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self._adam.param_groups

    @property
    def state(self) -> Dict[str, Any]:
        return self._adam.state[0]

    @property
    def state_nbytes(self) -> int:
        return sum(v.nbytes for k, v in self.state.items() if k != "step")

    @property
    def scratch_nbytes(self) -> int:
        return self._reduced.nbytes + (0 if self._scratch is None else self._scratch.nbytes)

    def zero_state(self) -> None:
        """Forget the moments and the step count (on this rank; call it on every rank)."""
        self._adam.zero_state()
        self.skipped_steps = 0


# --- agreement between ranks -----------------------------------------------------------------


def _fingerprint(settings: Dict[str, Any]) -> int:
    """A 62-bit hash of the settings' exact values (repr of a float is exact)."""
    digest = hashlib.blake2b(repr(sorted(settings.items())).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def _agree_on(comm: Any, error: Optional[BaseException], settings: Optional[Dict[str, Any]],
              action: str) -> None:
    """Collective, before any collective that can block: every rank learns whether every
    rank's checks passed (``error`` is None) and whether all ranks have the same
    ``settings``. If so, it returns; otherwise it raises on EVERY rank, so that no rank
    waits alone in a collective: the failing rank its own exception, the others one of the
    same kind (TypeError, else ValueError) naming the failing rank(s) and their error, or
    a ValueError naming the settings that differ and each rank's values.

    The common case costs one Allreduce of three int64 (a status and a fingerprint of
    the settings, as its maximum and its negated minimum); the details are gathered only
    when something is wrong (then every rank knows it, so every rank takes part)."""
    if comm.Get_size() == 1:
        if error is not None:
            raise error
        return
    fingerprint = 0 if settings is None else _fingerprint(settings)
    status = np.array([int(error is not None), fingerprint, -fingerprint], np.int64)
    comm.Allreduce(MPI.IN_PLACE, [status, MPI.INT64_T], op=MPI.MAX)
    if status[0] == 0 and status[1] == -status[2]:
        return
    mine = None if error is None else (type(error).__name__, str(error))
    reports = comm.allgather((mine, settings))
    if error is not None:
        raise error
    failed = [(rank, report) for rank, (report, _) in enumerate(reports) if report is not None]
    if failed:
        kind = TypeError if failed[0][1][0] == "TypeError" else ValueError
        described = "; ".join(f"rank {rank}: {name}: {message}" for rank, (name, message) in failed)
        ranks = ", ".join(str(rank) for rank, _ in failed)
        raise kind(f"{action} failed on rank {ranks} (every rank raises): {described}")
    everyone = [s for _, s in reports]
    differing = [key for key in everyone[0]  # (repr: -0.0 and 0.0 differ as they hash)
                 if any(repr(s.get(key)) != repr(everyone[0][key]) for s in everyone)]
    described = "; ".join(f"rank {rank}: " + ", ".join(f"{key}={s.get(key)!r}" for key in differing)
                          for rank, s in enumerate(everyone))
    raise ValueError(f"{action}: every rank must have the same {', '.join(differing)}, got {described}")


# --- checkpoints ---------------------------------------------------------------------------

FORMAT = "fastadam-sharded-checkpoint"
SHARD_FORMAT = "fastadam-sharded-checkpoint-shard"
VERSION = 1
INDEX = "index.npz"


def _shard_name(checkpoint_id: str, rank: int) -> str:
    return f"shard-{checkpoint_id}-{rank:05d}.npz"


def _check_sharded(opt: Any) -> None:
    if not isinstance(opt, ShardedAdam):
        raise TypeError(f"opt must be a fastadam.distributed.ShardedAdam, got {type(opt).__name__}")


def _agree(opt: ShardedAdam, error: Optional[BaseException], action: str,
           kind: type = ValueError) -> None:
    """Collective: raise on every rank if ``action`` failed on any (the failing rank
    re-raises its own exception, the others a ``kind`` naming it), so no rank goes on alone."""
    failures = opt.comm.allgather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for rank, failure in enumerate(failures):
        if failure is not None:
            raise kind(f"rank {rank} could not {action}: {failure}")


def save(opt: ShardedAdam, directory: Any) -> None:
    """Write ``opt``'s sharded state into ``directory`` (collective; see the module docstring).

    Each rank writes its shard atomically (``shard-<id>-<rank>.npz``); then rank 0 writes
    ``index.npz``, the commit, and removes the files of the checkpoint it replaces: the
    shards its index named, and shard files of interrupted saves (names fastadam makes,
    whose header says they are fastadam shards). Nothing else in ``directory`` is ever
    removed. If any rank fails, every rank raises (OSError; TypeError for a ``directory``
    that is not a path) and the previous checkpoint stays as it was. ``directory`` must be
    the same path on a file system every rank can reach.
    """
    _check_sharded(opt)
    checkpoint_id = opt.comm.bcast(secrets.token_hex(8), root=0)
    state = opt.state
    start, stop = opt.shard
    mine = None
    error: Optional[BaseException] = None
    try:
        directory = os.fspath(directory)
        mine = os.path.join(directory, _shard_name(checkpoint_id, opt.rank))
        os.makedirs(directory, exist_ok=True)
        write_npz_atomically(mine, {"format": SHARD_FORMAT, "version": VERSION, "id": checkpoint_id,
                                    "rank": opt.rank, "start": start, "stop": stop},
                             {f"state/0/{key}": value for key, value in state.items() if key != "step"})
    except Exception as exc:  # raised on every rank by _agree
        error = exc
    try:
        _agree(opt, error, "write its shard", OSError)
        if opt.rank == 0:
            try:
                error = _commit(opt, directory, checkpoint_id)
            except Exception as exc:  # (rank 0 alone: the others wait in _agree for it)
                error = exc
        _agree(opt, error, "commit the checkpoint index", OSError)
    except OSError:
        if mine is not None and os.path.exists(mine):  # uncommitted: the old checkpoint stays valid
            os.unlink(mine)
        raise


def _commit(opt: ShardedAdam, directory: str, checkpoint_id: str) -> Optional[OSError]:
    """Rank 0: write the index naming this checkpoint's shards, then remove the shards of
    the checkpoint it replaces (and of any interrupted save): only files fastadam wrote."""
    try:
        replaced = _our_old_shards(directory, checkpoint_id)  # (read before the index changes)
    except OSError:  # (an unlistable directory: nothing is removed)
        replaced = []
    state = opt.state
    header = {
        "format": FORMAT, "version": VERSION, "id": checkpoint_id,
        "world_size": opt.world_size, "total": int(opt.params.size),
        "dtype": opt.params.dtype.name, "bounds": [list(b) for b in opt.bounds],
        "param_groups": [{**_json_hyperparameters(opt.param_groups[0]), "params": [0]}],
        "steps": {"0": state["step"]}, "skipped_steps": opt.skipped_steps,
        "state_keys": [key for key in state if key != "step"],
    }
    try:
        write_npz_atomically(os.path.join(directory, INDEX), header, {})
    except OSError as exc:
        return exc
    for name in replaced:
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:  # already gone, or not ours to remove: the checkpoint is valid
            pass
    return None


_SHARD_NAME = re.compile(r"shard-([0-9a-f]{16})-([0-9]{5})\.npz")


def _our_old_shards(directory: str, checkpoint_id: str) -> List[str]:
    """The shard files in ``directory`` that fastadam wrote for another checkpoint: those
    the current index names, and those of interrupted saves (a name :func:`_shard_name`
    makes and a header that says so). Any other file is the user's, whatever its name
    (a ``shard-*`` glob once deleted a user's ``shard-00000-of-00002.tar``: issue 19)."""
    old: List[str] = []
    try:
        header, _ = read_npz(os.path.join(directory, INDEX), header_only=True)
        if isinstance(header, dict) and header.get("format") == FORMAT:
            old_id, count = header.get("id"), header.get("world_size")
            if isinstance(old_id, str) and isinstance(count, int) and 0 < count < 100_000:
                old = [_shard_name(old_id, rank) for rank in range(count)]
    except (OSError, ValueError):  # no index yet, or not readable: nothing of it to remove
        pass
    for name in os.listdir(directory):
        match = _SHARD_NAME.fullmatch(name)
        if match and match.group(1) != checkpoint_id and name not in old:
            try:
                shard, _ = read_npz(os.path.join(directory, name), header_only=True)
            except (OSError, ValueError):
                continue
            if isinstance(shard, dict) and shard.get("format") == SHARD_FORMAT and shard.get("id") == match.group(1):
                old.append(name)
    # (never the new checkpoint's, nor a name fastadam does not make)
    return [name for name in old if (m := _SHARD_NAME.fullmatch(name)) and m.group(1) != checkpoint_id]


def load(opt: ShardedAdam, directory: Any) -> None:
    """Restore a checkpoint written by :func:`save` (collective).

    With the rank count it was saved with, each rank reads its own shard file; with another,
    each rank reads the files covering its new shard (re-sharding). Raises
    FileNotFoundError if there is no checkpoint, and ValueError for a corrupt, incomplete
    or mismatching one; then no rank changes anything.
    """
    _check_sharded(opt)
    path_error: Optional[TypeError] = None
    try:
        directory = os.fspath(directory)
    except TypeError as exc:  # raised on every rank by _agree, below
        path_error = exc
    header: Any = None
    if opt.rank == 0:  # every failure is broadcast: no rank may wait alone in bcast
        try:
            if path_error is not None:
                raise path_error
            header = _read_index(directory, opt)
        except (OSError, ValueError, TypeError) as exc:
            header = exc
        except Exception as exc:
            header = ValueError(f"{directory!r}: unreadable checkpoint index ({exc!r})")
    header = opt.comm.bcast(header, root=0)
    if isinstance(header, BaseException):  # the same error on every rank
        raise header
    state_dict: Dict[str, Any] = {}
    error: Optional[BaseException] = None
    try:
        if path_error is not None:
            raise path_error
        state_dict = _read_shard_state(directory, opt, header)
    except (OSError, ValueError, TypeError) as exc:
        error = exc
    except Exception as exc:
        error = ValueError(f"{directory!r}: unreadable checkpoint shard ({exc!r})")
    _agree(opt, error, "read its part of the checkpoint")
    opt._adam.load_state_dict(state_dict)
    opt.skipped_steps = header["skipped_steps"]


def _read_index(directory: str, opt: ShardedAdam) -> Dict[str, Any]:
    path = os.path.join(directory, INDEX)
    header, _ = read_npz(path)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastadam sharded checkpoint index")
    if header.get("version") != VERSION:
        raise ValueError(f"{path} has version {header.get('version')!r}; this fastadam reads "
                         f"version {VERSION}")
    total, dtype = int(opt.params.size), opt.params.dtype.name
    if header.get("total") != total or header.get("dtype") != dtype:
        raise ValueError(f"{path} holds state for {header.get('total')} x {header.get('dtype')} "
                         f"parameters, the optimizer has {total} x {dtype}")
    bounds, world_size = header.get("bounds"), header.get("world_size")
    if (not _is_count(world_size) or not isinstance(bounds, list) or len(bounds) != world_size
            or not all(isinstance(b, list) and len(b) == 2 and all(_is_count(x) for x in b)
                       and b[0] <= b[1] for b in bounds)
            or [b[0] for b in bounds[1:]] != [b[1] for b in bounds[:-1]]
            or not bounds or bounds[0][0] != 0 or bounds[-1][1] != total):
        raise ValueError(f"{path} has malformed shard bounds")
    checkpoint_id = header.get("id")
    if not isinstance(checkpoint_id, str) or not re.fullmatch(r"[0-9a-f]{16}", checkpoint_id):
        raise ValueError(f"{path} has a malformed checkpoint id")
    keys = header.get("state_keys")
    if (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)
            or not {"exp_avg", "exp_avg_sq"} <= set(keys) <= {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}):
        raise ValueError(f"{path} has malformed state keys")
    header.setdefault("skipped_steps", 0)
    if not _is_count(header["skipped_steps"]):
        raise ValueError(f"{path} has a malformed skipped_steps")
    return header


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _read_shard_state(directory: str, opt: ShardedAdam, header: Dict[str, Any]) -> Dict[str, Any]:
    """This rank's state dict (for the inner Adam), assembled from the saved shards that
    overlap its shard, fully checked."""
    start, stop = opt.shard
    names = [f"state/0/{key}" for key in header["state_keys"]]
    pieces: Dict[str, List[np.ndarray]] = {name: [] for name in names}
    for rank, (a, b) in enumerate(header["bounds"]):
        low, high = max(a, start), min(b, stop)
        if low >= high:
            continue
        path = os.path.join(directory, _shard_name(header["id"], rank))
        shard_header, arrays = read_npz(path)
        if (not isinstance(shard_header, dict) or shard_header.get("format") != SHARD_FORMAT
                or shard_header.get("id") != header["id"]
                or [shard_header.get("start"), shard_header.get("stop")] != [a, b]):
            raise ValueError(f"{path} does not belong to this checkpoint (an interrupted save?)")
        if sorted(arrays) != sorted(names):
            raise ValueError(f"{path} holds {sorted(arrays)}, the index names {sorted(names)}")
        for name, array in arrays.items():
            if array.dtype != opt.params.dtype or array.shape != (b - a,):
                raise ValueError(f"{path}: {name} is {array.shape} {array.dtype}, expected "
                                 f"({b - a},) {opt.params.dtype}")
            pieces[name].append(array[low - a:high - a])
    arrays = {name: np.concatenate(parts) if parts else np.zeros(0, opt.params.dtype)
              for name, parts in pieces.items()}
    state_dict = _state_dict(opt._adam, header, arrays, os.path.join(directory, INDEX))
    try:
        opt._adam.check_state_dict(state_dict)
    except TypeError as exc:  # a header field of the wrong type: a damaged file
        raise ValueError(f"{os.path.join(directory, INDEX)} has a malformed fastadam header ({exc})") from None
    return state_dict

