"""``ShardedAdam``: the front end of :mod:`fastadam.distributed` (see there for the whole
story). It checks its arguments, has the ranks agree, and runs a step's three phases:
the reduce-scatter and the all-gather are ``_collectives.ShardExchange``'s, the update is
a :class:`fastadam.Adam` over this rank's shard."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from fastadam._hints import keyword_names
from fastadam._memory import ALIGNMENT
from fastadam._validation import (
    MAX_STEP,
    as_array,
    check_at_least,
    check_flag,
    check_grad_scale_range,
    check_group_hyperparameters,
    check_no_overlap,
    check_num_threads,
    type_name,
)
from fastadam.distributed._collectives import (
    COLLECTIVES,
    MPI,
    ShardExchange,
    agree_on,
    any_rank,
)
from fastadam.distributed._sharding import shard_bounds
from fastadam.distributed._torch_binding import TorchBinding, torch_tensors
from fastadam.flat import FlatParams
from fastadam.optim import Adam, LearningRate

__all__ = ["ShardedAdam"]


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
        parameters of a PyTorch model (dense CPU tensors of one dtype) are copied once
        into a FlatParams and each ``p.data`` becomes a view of it; ``step`` reads their
        ``.grad``. bfloat16 and float16 models need ``master_weights=True``. A parameter whose ``.grad`` is None counts as having a zero
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
        all-gather, or MPI's ``Reduce_scatter`` and ``Allgatherv`` (see
        :mod:`fastadam.distributed`).
    master_weights : bool
        For a bfloat16 or float16 model (required there, refused for float32/float64):
        each rank keeps a float32 master copy of its shard (``master_param``, taken from
        the broadcast model) and float32 moments. The 16-bit gradients travel as 16-bit
        words and are summed in float32 in rank order; the update writes the shard's
        16-bit params, rounded to nearest even, in the same pass, and the all-gather
        sends those.

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
        ``step`` and this rank's shard of ``exp_avg``, ``exp_avg_sq`` (``max_exp_avg_sq``,
        ``master_param``).
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
        master_weights: bool = False,
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
        self._torch: Optional[TorchBinding] = None
        self.flat: Optional[FlatParams] = None
        self.grads: Optional[np.ndarray] = None
        # Everything is checked, and the ranks agree that it passed everywhere and on the
        # model and hyperparameters, before a tensor is moved or a collective can block.
        error, settings, tensors, total, dtype = None, None, None, 0, np.dtype(np.float64)
        try:
            tensors, total, dtype, settings = self._check_construction(
                params, hyperparameters, num_threads, collectives, master_weights)
        except Exception as exc:  # raised on every rank by agree_on, after it
            error = exc
        agree_on(comm, error, settings, "construct ShardedAdam")
        if tensors is not None:
            self._torch = TorchBinding(tensors)
            self.flat = self._torch.flat
            self.params, self.grads = self.flat.data, self.flat.grad_data

        self.bounds = shard_bounds(total, self.world_size, ALIGNMENT // dtype.itemsize)
        self.shard = self.bounds[self.rank]
        start, stop = self.shard
        self._exchange = ShardExchange(comm, self.bounds, dtype, collectives)
        self._exchange.broadcast(self.params)  # (first: master copies start from rank 0's model)
        self._adam = Adam([self.params[start:stop]], num_threads=num_threads,
                          master_weights=bool(master_weights), **hyperparameters)
        self.skipped_steps = 0
        self.seconds = {"reduce": 0.0, "update": 0.0, "gather": 0.0}

    def _check_construction(self, params: Any, hyperparameters: Dict[str, Any],
                            num_threads: Optional[int], collectives: Any, master_weights: Any) -> tuple:
        """This rank's checks of the constructor's arguments (no communication): (torch
        tensors or None, total elements, dtype, the settings every rank must share). Sets
        ``params``, ``grads`` and ``flat`` for a buffer or a FlatParams."""
        if collectives not in COLLECTIVES:
            raise ValueError(f"collectives must be one of {COLLECTIVES}, got {collectives!r}")
        master_weights = check_flag(master_weights, "master_weights")
        with keyword_names():  # named as the constructor's arguments
            check_group_hyperparameters(hyperparameters, "defaults", 1)
        check_num_threads(num_threads)
        tensors = torch_tensors(params)
        if tensors is not None:
            total, dtype = TorchBinding.check(tensors)
        elif isinstance(params, FlatParams):
            self.flat = params
            self.params, self.grads = params.data, params.grad_data
        else:
            self.params = as_array(params, "params", writable=True, flatten=False)
            if self.params.ndim != 1:
                raise ValueError(f"params must be a 1-D (flat) buffer, got shape {self.params.shape}")
        if tensors is None:
            total, dtype = self.params.size, self.params.dtype
        _check_master_weights(dtype, master_weights)
        hyper = check_group_hyperparameters(hyperparameters, "defaults", 1, (dtype,))
        settings = {"params": f"{total} x {type_name(dtype)}", "collectives": collectives,
                    "master_weights": master_weights,
                    **hyper._asdict()}  # (lr: a schedule's value at step 1)
        return tensors, total, dtype, settings

    def __repr__(self) -> str:
        start, stop = self.shard
        return (f"ShardedAdam(rank {self.rank} of {self.world_size}, shard [{start}, {stop}) of "
                f"{self.params.size} {type_name(self.params.dtype)}, collectives={self.collectives!r}"
                + (", master_weights=True)" if self.master_weights else ")"))

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
        except Exception as exc:  # raised on every rank by agree_on, after it
            error = exc
        # Before any collective that can block: every rank passed its checks, with the
        # same step count, hyperparameters, grad_scale and skip_if_nonfinite.
        agree_on(self.comm, error, settings, "step")
        assert settings is not None
        scale, skip_if_nonfinite = settings["grad_scale"], settings["skip_if_nonfinite"]

        t0 = time.perf_counter()
        reduced = self._exchange.reduce(grad)
        t1 = time.perf_counter()
        self.seconds["reduce"] += t1 - t0
        if skip_if_nonfinite and self._any_nonfinite(reduced):
            self.skipped_steps += 1
            return False
        self._adam.step([reduced], grad_scale=self.world_size * scale)
        t2 = time.perf_counter()
        self.seconds["update"] += t2 - t1
        self._exchange.gather(self.params)
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
            raise TypeError(f"grads must have the dtype of params ({type_name(self.params.dtype)}), "
                            f"got {type_name(grad.dtype)}")
        if grad.ndim != 1 or grad.size != self.params.size:
            raise ValueError(f"grads must be a flat buffer of {self.params.size} elements like "
                             f"params, got shape {grad.shape}")
        check_no_overlap([self.params, grad], ["params", "grads"])
        return grad if grad.flags.aligned else grad.copy()

    def _any_nonfinite(self, reduced: np.ndarray) -> bool:
        local = self._adam.engine.count_nonfinite([reduced], self._adam.num_threads)
        return any_rank(self.comm, local > 0)

    # --- state -------------------------------------------------------------------------

    @property
    def master_weights(self) -> bool:
        """Whether this rank keeps a float32 master copy of its shard of a 16-bit model."""
        return self._adam.master_weights

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
        return self._exchange.nbytes

    def zero_state(self) -> None:
        """Forget the moments and the step count (on this rank; call it on every rank)."""
        self._adam.zero_state()
        self.skipped_steps = 0


def _check_master_weights(dtype: np.dtype, master_weights: bool) -> None:
    """A 16-bit model needs float32 master shards; a float32/float64 one is its own master."""
    if dtype.itemsize == 2 and not master_weights:
        raise TypeError(f"params are {type_name(dtype)}: ShardedAdam updates a 16-bit model "
                        "through float32 master shards, pass master_weights=True")
    if dtype.itemsize != 2 and master_weights:
        raise TypeError(f"master_weights is for bfloat16 and float16 params, but params are "
                        f"{type_name(dtype)}: a float32 or float64 model is its own master")
