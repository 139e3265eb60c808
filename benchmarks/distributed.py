#!/usr/bin/env python3
"""ShardedAdam step time split into reduce / update / gather, for 1, 2, ... MPI ranks.

Launches ``mpiexec -n R`` of itself for every rank count R (one OpenMP thread per rank)
and prints one table: per model size and rank count, the median milliseconds of each phase
of ``fastadam.distributed.ShardedAdam.step``, run one at a time after a barrier (the
slowest rank's time counted), then of whole ``step()`` calls (where a phase may also wait
for a slower rank), the optimizer state each rank holds, and the communication rate: the
bytes each rank sends per step ((R-1)/R x N x itemsize for the reduce-scatter, as much
for the all-gather) over the reduce + gather time. One rank is plain fastadam.Adam on one
thread: no communication. The machine is shared: medians of --steps repeats, still noisy.

    pip install mpi4py mpich
    python benchmarks/distributed.py [--ranks 1 2] [--log2-sizes 20 22 24] [--steps 30]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time


def measure(comm, log2, args):
    """Median ms of each phase and of whole steps (slowest rank), for a model of 2^log2."""
    import numpy as np
    from mpi4py import MPI

    from fastadam.distributed import ShardedAdam

    size = 1 << log2
    rng = np.random.default_rng(comm.rank)
    params = rng.standard_normal(size).astype(args.dtype)
    grads = rng.standard_normal(size).astype(args.dtype)
    opt = ShardedAdam(params, comm, lr=1e-4, num_threads=1, collectives=args.collectives)
    reduced = opt._exchange.reduce(grads)
    phases = {  # step()'s three phases one by one (private parts: this is a benchmark)
        "reduce": lambda: opt._exchange.reduce(grads),
        "update": lambda: opt._adam.step([reduced], grad_scale=comm.size),
        "gather": lambda: opt._exchange.gather(opt.params),
        "step": lambda: opt.step(grads),
    }
    samples = {phase: [] for phase in phases}
    for repeat in range(args.warmup + args.steps):
        for phase, run in phases.items():
            comm.Barrier()  # every phase starts together: no rank's wait is counted
            t0 = time.perf_counter()
            run()
            if repeat >= args.warmup:
                samples[phase].append(time.perf_counter() - t0)
    gathered = {phase: comm.gather(np.array(values), root=0) for phase, values in samples.items()}
    state_bytes = comm.allreduce(opt.state_nbytes, op=MPI.MAX)
    if comm.rank == 0:
        return {"log2": log2, "ranks": comm.size, "state_bytes": state_bytes,
                "itemsize": params.itemsize,
                "median_ms": {k: float(np.median(np.max(v, axis=0))) * 1e3 for k, v in gathered.items()}}
    return None


def worker(args):
    from mpi4py import MPI

    results = [measure(MPI.COMM_WORLD, log2, args) for log2 in args.log2_sizes]
    if MPI.COMM_WORLD.rank == 0:
        print(json.dumps(results))


def find_mpiexec():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


def launch(ranks, args):
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise SystemExit("no mpiexec found: pip install mpi4py mpich")
    command = [mpiexec, "-n", str(ranks), sys.executable, os.path.abspath(__file__), "--worker",
               "--log2-sizes", *map(str, args.log2_sizes), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--dtype", args.dtype, "--collectives", args.collectives]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(rows):
    lines = ["| params | ranks | reduce ms | update ms | gather ms | step ms | state per rank | comm. rate |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["median_ms"]
        n = 1 << r["log2"]
        sent = 2 * (r["ranks"] - 1) / r["ranks"] * n * r["itemsize"]
        comm_ms = ms["reduce"] + ms["gather"]
        rate = f"{sent / comm_ms / 1e6:.1f} GB/s" if r["ranks"] > 1 and comm_ms > 0 else "-"
        lines.append(f"| 2^{r['log2']} | {r['ranks']} | {ms['reduce']:.3f} | {ms['update']:.3f} | "
                     f"{ms['gather']:.3f} | {ms['step']:.3f} | {r['state_bytes'] / 2**20:.1f} MiB | {rate} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--log2-sizes", type=int, nargs="+", default=[20, 22, 24])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--collectives", choices=["fastadam", "mpi"], default="fastadam")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    for ranks in args.ranks:
        rows += launch(ranks, args)
    rows.sort(key=lambda r: (r["log2"], r["ranks"]))
    print(f"ShardedAdam, {args.dtype}, collectives={args.collectives}, one OpenMP thread per rank, "
          f"medians of {args.steps} steps (slowest rank per step)\n")
    print(table(rows))


if __name__ == "__main__":
    main()
