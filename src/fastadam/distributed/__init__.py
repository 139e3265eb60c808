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

16-bit models. A bfloat16 or float16 model needs ``master_weights=True``: each rank keeps a
float32 master copy of its shard and float32 moments. The gradients travel as 16-bit words
and are summed in float32, ``((float(g_0) + float(g_1)) + ...)`` in rank order; the update
writes the shard's 16-bit params (rounded to nearest even) in the same pass, and the
all-gather sends those. Every rank then equals one process running
:class:`fastadam.Adam` with ``master_weights=True`` on that float32 sum, ``grad_scale`` the
number of ranks, bit for bit.

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
the ranks agree before any collective that can block (``_collectives.agree_on``: one
all-reduce of a status and a fingerprint of the settings that must match: model size and
dtype, collectives, hyperparameters, step count, ``grad_scale``, ``skip_if_nonfinite``). A bad
argument on one rank, or a setting that differs between ranks, raises on every rank,
naming the rank (or each rank's values); no rank is left waiting in a collective.
:func:`save` and :func:`load` likewise raise on every rank when one rank fails.

Layout. The package's modules, one job each: ``_sharding`` (how the block is cut),
``_collectives`` (the only one that imports mpi4py: the ranks' agreement, the
reduce-scatter and the all-gather), ``_torch_binding`` (a PyTorch model's parameters as
the flat block), ``_sharded_adam`` (:class:`ShardedAdam`, the front end) and
``_checkpoint`` (the sharded checkpoint format of :func:`save` and :func:`load`).
"""

from fastadam.distributed._checkpoint import load, save
from fastadam.distributed._sharded_adam import ShardedAdam
from fastadam.distributed._sharding import shard_bounds

__all__ = ["ShardedAdam", "load", "save", "shard_bounds"]
