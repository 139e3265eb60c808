"""Timing Adam implementations on this machine: the helpers ``fastadam bench`` and the
scripts in benchmarks/ share.

:func:`measure` runs several implementations interleaved, repeat by repeat, and reports
medians, so a noisy shared machine disturbs them alike. :class:`NumpyAdam` is the in-place
NumPy baseline; :func:`fastadam_runner` and :func:`torch_runner` wrap one tensor's step of
fastadam and of torch.optim.Adam as calls without arguments.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

import fastadam

LR, BETA1, BETA2, EPS = 1e-3, 0.9, 0.999, 1e-8
STREAMS = 7  # 4 read + 3 written per element


class NumpyAdam:
    """A careful in-place NumPy Adam of one tensor: no allocation per step (one scratch
    buffer). Each call is one step with the current contents of ``grad``."""

    def __init__(self, param, grad, m, v, lr=LR):
        self.p, self.g, self.m, self.v = param, grad, m, v
        self.tmp = np.empty_like(param)
        self.step = 0
        self.lr = lr

    def __call__(self):
        self.step += 1
        bc1, bc2 = 1 - BETA1**self.step, 1 - BETA2**self.step
        p, g, m, v, tmp = self.p, self.g, self.m, self.v, self.tmp
        m *= BETA1
        np.multiply(g, 1 - BETA1, out=tmp)
        m += tmp
        v *= BETA2
        np.multiply(g, g, out=tmp)
        tmp *= 1 - BETA2
        v += tmp
        np.sqrt(v, out=tmp)
        tmp /= math.sqrt(bc2)
        tmp += EPS
        np.divide(m, tmp, out=tmp)
        tmp *= -self.lr / bc1
        p += tmp


def fastadam_runner(param, grad, m, v, threads):
    state = {"step": 0}

    def run():
        state["step"] += 1
        fastadam.adam_step(param, grad, m, v, step=state["step"], lr=LR, num_threads=threads)

    return run


def torch_runner(param, grad, threads, fused=True):
    import torch

    tensor = torch.nn.Parameter(torch.from_numpy(param))
    tensor.grad = torch.from_numpy(grad)
    opt = torch.optim.Adam([tensor], lr=LR, fused=fused)

    def run():
        torch.set_num_threads(threads)
        opt.step()

    return run


def make_buffers(size, dtype, seed=0) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(param, grad, exp_avg, exp_avg_sq) of one tensor."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(size).astype(dtype), rng.standard_normal(size).astype(dtype),
            np.zeros(size, dtype), np.zeros(size, dtype))


def calibrate(run: Callable[[], None], target_s: float) -> int:
    """Calls per timed sample so that one sample lasts about target_s."""
    run()
    start = time.perf_counter()
    run()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(target_s / once))


def measure(runners: Dict[str, Callable[[], None]], repeats: int, target_s: float,
            setups: Optional[Dict[str, Callable[[], None]]] = None) -> Dict[str, float]:
    """Median seconds per call of each runner, interleaved repeat by repeat.

    ``setups[name]``, if given, runs (untimed) before each of that runner's samples."""
    setups = setups or {}
    loops = {}
    for name, run in runners.items():
        setups.get(name, lambda: None)()
        loops[name] = calibrate(run, target_s)
    samples: Dict[str, List[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            setups.get(name, lambda: None)()
            start = time.perf_counter()
            for _ in range(loops[name]):
                run()
            samples[name].append((time.perf_counter() - start) / loops[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def set_xla_cpu_threads(threads: int) -> str:
    """Give XLA's CPU backend ``threads`` threads; call it before jax is imported (its
    pool is sized when jax starts). XLA has no flag for the pool's size, which it takes
    from the CPUs the process may run on: with fewer threads than those, the process is
    pinned to the first ``threads`` of them (Linux; elsewhere XLA keeps them all), and
    one thread also turns Eigen's multithreading off. Returns what was set, to print."""
    if threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false").strip()
    pinned = ""
    if hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if threads < len(cpus):
            os.sched_setaffinity(0, cpus[:threads])
            pinned = f"; process pinned to CPUs {cpus[:threads]}"
    return f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}{pinned}"


def parse_workload_arguments(description: str, workloads: Dict[str, Callable[[], list]],
                             default: List[str]) -> argparse.Namespace:
    """The command line of a benchmark that prints :func:`print_workload_table`:
    ``--workloads`` (names of ``workloads``; ``default``), ``--threads`` and ``--repeats``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workloads", nargs="+", choices=list(workloads), default=default)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    return parser.parse_args()


def print_workload_table(workloads: Dict[str, Callable[[], list]], names: List[str],
                         runners: Callable[[list], Dict[str, Callable[[], None]]],
                         repeats: int, baseline: str, bound: Optional[str] = None) -> None:
    """Time ``runners(shapes)`` (interleaved, :func:`measure`) for each named workload of
    ``workloads`` (a function giving its tensor shapes) and print a markdown table of ms
    per step and speed-up over ``baseline``, one of the runners. ``bound``: the label of
    a runner that moves the same bytes as an Adam step and nothing else (a memory bound),
    where a workload has one: each row then also gives its time as a share of the bound's."""
    print(f"| workload | implementation | ms/step | vs {baseline} |"
          + (" % of bound |" if bound else ""))
    print("|---|---|---:|---:|" + ("---:|" if bound else ""))
    for name in names:
        shapes = workloads[name]()
        elements = sum(int(np.prod(s)) for s in shapes)
        times = measure(runners(shapes), repeats, 0.2)
        for label, seconds in times.items():
            share = "" if not bound else (
                f" {100 * times[bound] / seconds:.0f}% |" if bound in times else " |")
            print(f"| {name} ({len(shapes)} tensors, {elements / 1e6:.2f}M) | {label} | "
                  f"{seconds * 1e3:.3f} | {times[baseline] / seconds:.2f}x |{share}")
