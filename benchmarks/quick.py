#!/usr/bin/env python3
"""Quick speed table: fastadam.adam_step vs an in-place NumPy Adam (and torch, if installed).

For each size and thread count it reports ms per step, elements/s and effective memory
bandwidth (an Adam step reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg,
exp_avg_sq: 7 streams, 28 bytes per float32 element). Implementations are interleaved
within every repeat and the table shows medians, so a noisy shared machine affects them
alike; compare the ratios, not the absolute numbers across runs.

    python benchmarks/quick.py                      # float32, 2^10..2^24, 1 and 2 threads
    python benchmarks/quick.py --dtype float64 --sizes 16 20 --repeats 11
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable, Dict, List, Optional

import numpy as np

import fastadam

LR, BETA1, BETA2, EPS = 1e-3, 0.9, 0.999, 1e-8
STREAMS = 7  # 4 read + 3 written per element


class NumpyAdam:
    """A careful in-place NumPy Adam: no allocation per step (one scratch buffer)."""

    def __init__(self, param, grad, m, v):
        self.p, self.g, self.m, self.v = param, grad, m, v
        self.tmp = np.empty_like(param)
        self.step = 0

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
        tmp *= -LR / bc1
        p += tmp


def fastadam_runner(param, grad, m, v, threads):
    state = {"step": 0}

    def run():
        state["step"] += 1
        fastadam.adam_step(param, grad, m, v, step=state["step"], lr=LR, num_threads=threads)

    return run


def torch_runner(param, grad, threads):
    import torch

    tensor = torch.nn.Parameter(torch.from_numpy(param))
    tensor.grad = torch.from_numpy(grad)
    opt = torch.optim.Adam([tensor], lr=LR, fused=True)

    def run():
        torch.set_num_threads(threads)
        opt.step()

    return run


def make_buffers(size, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size).astype(dtype), rng.standard_normal(size).astype(dtype),
            np.zeros(size, dtype), np.zeros(size, dtype)]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 12, 14, 16, 18, 20, 22, 24],
                        metavar="LOG2", help="log2 of the element counts")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--target-ms", type=float, default=20.0, help="length of one sample")
    parser.add_argument("--no-torch", action="store_true", help="skip torch even if installed")
    args = parser.parse_args()

    try:
        if args.no_torch:
            raise ImportError
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
        print("torch not installed (or --no-torch): torch.optim.Adam(fused=True) column skipped\n")

    dtype = np.dtype(args.dtype)
    bytes_per_element = STREAMS * dtype.itemsize
    print(f"fastadam {fastadam.__version__}, {dtype.name}, vector ISA "
          f"{fastadam.show_config('dicts')['vector_isa']}, medians of {args.repeats} interleaved repeats")
    print("| elements | threads | implementation | ms/step | Melem/s | GB/s | vs NumPy |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for log2 in args.sizes:
        size = 1 << log2
        runners: Dict[str, Callable[[], None]] = {"numpy in place": NumpyAdam(*make_buffers(size, dtype))}
        for threads in args.threads:
            runners[f"fastadam|{threads}"] = fastadam_runner(*make_buffers(size, dtype), threads)
            if have_torch:
                p, g, _, _ = make_buffers(size, dtype)
                runners[f"torch fused|{threads}"] = torch_runner(p, g, threads)
        times = measure(runners, args.repeats, args.target_ms / 1000)
        base = times["numpy in place"]
        for name, seconds in times.items():
            label, _, threads = name.partition("|")
            print(f"| 2^{log2} | {threads or 1} | {label} | {seconds * 1e3:.4f} | "
                  f"{size / seconds / 1e6:.0f} | {size * bytes_per_element / seconds / 1e9:.1f} | "
                  f"{base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
