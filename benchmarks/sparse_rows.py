#!/usr/bin/env python3
"""Lazy sparse-row Adam on an embedding: adam_step_rows vs a dense step vs SparseAdam.

A 1M x 64 float32 table (256 MB per buffer), 1% of its rows updated per step: 10,000
token ids drawn like a real batch (90% uniform over the vocabulary, 10% from its 100 most
frequent tokens, so some ids repeat). Successive steps cycle through 8 such batches, so a
step does not find its rows in cache from the step before (their rows and moments, 8 x 7
MB, exceed the 32 MB L3). Timed, interleaved, medians of repeats, at 1 and 2 threads
(torch.set_num_threads and fastadam's num_threads alike):

* fastadam.adam_step_rows   the lazy update of the batch's rows (duplicates summed)
* fastadam.adam_step        a dense step of the whole table (zero gradient elsewhere)
* fastadam.torch.Adam       the same lazy update from a sparse COO .grad (torch tensors)
* torch.optim.SparseAdam    on the same .grad (skipped, and said so, without torch)

    python benchmarks/sparse_rows.py [--rows 1000000] [--dim 64] [--batch 10000] [--threads 1 2]
                                     [--no-torch]

(--no-torch keeps torch out of the process: its idle OpenMP threads compete with
fastadam's for the cores, see README "Threads".)

Memory: fastadam's table and state share one set of buffers (param, exp_avg, exp_avg_sq,
dense grad: 1 GB at the default size); each torch optimizer keeps its own moments
(512 MB each) on a param that shares fastadam's memory.
"""

import argparse
import gc

import numpy as np

import fastadam
from fastadam.app.timing import measure


def token_rows(n_rows, batch, rng):
    """A batch of token ids: mostly uniform, a tenth from the 100 most frequent ids."""
    frequent = batch // 10
    rows = np.concatenate([rng.integers(0, n_rows, batch - frequent),
                           rng.integers(0, min(100, n_rows), frequent)])
    rng.shuffle(rows)
    return rows


BATCHES = 8


def fastadam_runners(param, batches, threads):
    state = fastadam.adam_state(param)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    rows, values = batches[0]
    dense_grad = np.zeros_like(param)
    np.add.at(dense_grad, rows, values)  # a dense gradient (its values do not change the time)
    steps = iter(range(1, 10**9))

    def lazy():
        step = next(steps)
        rows, values = batches[step % len(batches)]
        fastadam.adam_step_rows(param, values, rows, m, v, step=step, num_threads=threads)

    return {
        "fastadam.adam_step_rows (lazy)": lazy,
        "fastadam.adam_step (dense)": lambda: fastadam.adam_step(
            param, dense_grad, m, v, step=next(steps), num_threads=threads),
    }


def torch_runners(param, batches, threads, wanted):
    if not wanted:
        return {}, None
    try:
        import torch

        import fastadam.torch
    except ImportError as error:
        print(f"(torch not installed, SparseAdam and fastadam.torch skipped: {error})")
        return {}, None
    # as nn.Embedding(sparse=True) leaves them: uncoalesced, one row per token
    grads = [torch.sparse_coo_tensor(torch.from_numpy(rows)[None], torch.from_numpy(values),
                                     param.shape, check_invariants=False) for rows, values in batches]
    runners = {}
    for label, make in [
        ("fastadam.torch.Adam (sparse grad)", lambda p: fastadam.torch.Adam([p], num_threads=threads)),
        ("torch.optim.SparseAdam", lambda p: torch.optim.SparseAdam([p])),
    ]:
        weight = torch.nn.Parameter(torch.from_numpy(param))
        runners[label] = _stepper(make(weight), weight, grads)
    return runners, lambda: torch.set_num_threads(threads)


def _stepper(opt, weight, grads):
    calls = iter(range(10**9))

    def step():
        weight.grad = grads[next(calls) % len(grads)]
        opt.step()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-torch", action="store_true", help="time fastadam's NumPy API only")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    param = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    batches = [(token_rows(args.rows, args.batch, rng),
                rng.standard_normal((args.batch, args.dim), dtype=np.float32)) for _ in range(BATCHES)]
    distinct = np.mean([np.unique(rows).size for rows, _ in batches])
    print(f"{args.rows} x {args.dim} float32 table, {args.batch} gradient rows per step "
          f"({distinct:.0f} distinct rows on average, {100 * distinct / args.rows:.2f}% of the table), "
          f"{BATCHES} batches in turn\n")
    print("| threads | implementation | ms/step | lazy fastadam is x faster |")
    print("|---:|---|---:|---:|")
    for threads in args.threads:
        runners = fastadam_runners(param, batches, threads)
        extra, setup = torch_runners(param, batches, threads, not args.no_torch)
        runners.update(extra)
        setups = {label: setup for label in extra} if setup else None
        times = measure(runners, args.repeats, 0.2, setups)
        lazy = times["fastadam.adam_step_rows (lazy)"]
        for label, seconds in times.items():
            print(f"| {threads} | {label} | {seconds * 1e3:.3f} | {seconds / lazy:.1f} |")
        del runners, extra
        gc.collect()


if __name__ == "__main__":
    main()
