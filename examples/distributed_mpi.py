#!/usr/bin/env python3
"""Data-parallel training across MPI ranks with fastadam.distributed.ShardedAdam.

The NumPy MLP of ``python -m fastadam demo`` (784 -> hidden -> 10, parameters in one
FlatParams) trained on Fashion-MNIST by every rank at once: each rank computes gradients on
its own part of every global minibatch; ShardedAdam averages them across ranks, updates
the rank's shard of the parameters with the rank's shard of the Adam state, and gathers the
shards so every rank holds the whole model. The result is the same as one process training
on the global minibatch (bit for bit up to the order of the matmuls' sums).

    pip install mpi4py mpich                       # MPI from PyPI, or mpi4py for your MPI
    mpiexec -n 2 python examples/distributed_mpi.py            # 5 epochs, ~87% test accuracy
    mpiexec -n 4 python examples/distributed_mpi.py --quick    # a subset, under a minute

Data: Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), --data-dir, or
a synthetic task when the files are absent. Each rank runs one BLAS and one OpenMP thread
unless OMP_NUM_THREADS / OPENBLAS_NUM_THREADS say otherwise: ranks are the parallelism.
"""

from __future__ import annotations

import os

# Before NumPy loads its BLAS: one thread per rank (ranks are the parallelism; and idle BLAS
# threads spin between the matmuls and take the cores from the other ranks, as the demo's
# --blas-threads help says).
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from _requirements import require  # noqa: E402

MPI = require("mpi4py.MPI")

from fastadam.app import demo  # noqa: E402
from fastadam.distributed import ShardedAdam  # noqa: E402

QUICK_TRAIN, QUICK_TEST = 12_000, 2_000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    demo.add_arguments(parser)
    parser.add_argument("--quick", action="store_true",
                        help=f"2 epochs on {QUICK_TRAIN} training and {QUICK_TEST} test examples")
    parser.add_argument("--collectives", choices=("fastadam", "mpi"), default="fastadam",
                        help="fastadam's collectives (rank-order sums, bit-exact; default) or MPI's")
    parser.set_defaults(batch_size=64)  # per rank: the global minibatch is ranks x this
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = min(args.epochs, 2)
    return args


def load(args: argparse.Namespace, comm) -> tuple:
    """Every rank loads the same data (the files, or the seeded synthetic task)."""
    if args.download and comm.rank == 0:  # one rank fetches, the others then read the files
        demo.load_data(args.data_dir, True)
    comm.Barrier()
    with contextlib.redirect_stdout(sys.stdout if comm.rank == 0 else io.StringIO()):
        data = None if args.synthetic else demo.load_data(args.data_dir, False)
    task = "Fashion-MNIST"
    if data is None:
        data, task = demo.synthetic_data(args.seed), "synthetic 10-class task"
    if len(set(comm.allgather(task))) > 1:  # e.g. the files exist on some nodes only
        raise SystemExit(f"rank {comm.rank}: the ranks found different data; give every rank "
                         "the same --data-dir")
    x_train, y_train, x_test, y_test = data
    if args.quick:
        x_train, y_train = x_train[:QUICK_TRAIN], y_train[:QUICK_TRAIN]
        x_test, y_test = x_test[:QUICK_TEST], y_test[:QUICK_TEST]
    return (x_train, y_train, x_test, y_test), task


def accuracy(model: demo.MLP, x: np.ndarray, y: np.ndarray, comm) -> float:
    """Test accuracy, each rank scoring every ranks-th example."""
    mine = slice(comm.rank, None, comm.size)
    correct = int((model.logits(x[mine]).argmax(axis=1) == y[mine]).sum())
    return comm.allreduce(correct) / len(y)


def main(argv=None) -> float:
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    (x_train, y_train, x_test, y_test), task = load(args, comm)
    model = demo.MLP(x_train.shape[1], args.hidden, args.seed)
    optimizer = ShardedAdam(model.flat, comm, lr=args.lr, num_threads=args.threads,
                            collectives=args.collectives)
    per_rank, global_batch = args.batch_size, args.batch_size * size
    start, stop = optimizer.shard
    say(f"{task}: {len(x_train)} training and {len(x_test)} test examples; MLP "
        f"{x_train.shape[1]}-{args.hidden}-10 ({model.flat.data.size:,} parameters) on {size} "
        f"rank(s), global minibatch {global_batch} ({per_rank} per rank)")
    say(f"optimizer state per rank: {optimizer.state_nbytes:,} bytes (rank 0's shard: "
        f"[{start}, {stop}); one process would hold {2 * model.flat.data.nbytes:,})")
    rng = np.random.default_rng(args.seed)  # the same shuffles on every rank
    compute = 0.0
    began = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x_train))
        steps = len(x_train) // global_batch  # every rank takes the same number of steps
        losses = []
        bar = demo.Progress(f"epoch {epoch}/{args.epochs}", steps, not args.no_progress and rank == 0)
        for i in range(steps):
            bar.update(i)
            idx = order[i * global_batch + rank * per_rank:][:per_rank]
            t0 = time.perf_counter()
            losses.append(model.loss_and_grads(x_train[idx], y_train[idx]))
            compute += time.perf_counter() - t0
            optimizer.step()  # averages model.flat.grad_data across ranks
        bar.close()
        loss = comm.allreduce(float(np.sum(losses))) / (size * max(len(losses), 1))
        say(f"epoch {epoch}: training loss {loss:.4f}, test accuracy "
            f"{accuracy(model, x_test, y_test, comm):.4f}")
    elapsed = time.perf_counter() - began
    final = accuracy(model, x_test, y_test, comm)
    same = len(set(comm.allgather(hashlib.sha256(model.flat.data.tobytes()).hexdigest()))) == 1
    ranks = f"{size} rank{'s' if size > 1 else ''}"
    say(f"\ntest accuracy {final:.4f} after {args.epochs} epochs on {ranks} ({elapsed:.1f} s)")
    say(f"parameters identical on every rank: {'yes' if same else 'NO'}")
    seconds = {k: comm.allreduce(v, op=MPI.MAX) for k, v in optimizer.seconds.items()}
    say("time per rank (slowest): forward/backward {:.2f} s, reduce {:.2f} s, update {:.2f} s, "
        "gather {:.2f} s".format(comm.allreduce(compute, op=MPI.MAX), seconds["reduce"],
                                 seconds["update"], seconds["gather"]))
    return final


if __name__ == "__main__":
    main()
