"""``python -m fastadam bench``: a quick speed table of fastadam on this machine.

fastadam.adam_step vs an in-place NumPy Adam and, if installed, torch.optim.Adam (default
and fused=True).

For each size and thread count it reports ms per step, elements/s and effective memory
bandwidth (an Adam step reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg,
exp_avg_sq: 7 streams, 28 bytes per float32 element). Implementations are interleaved
within every repeat and the table shows medians, so a noisy shared machine affects them
alike; compare the ratios, not the absolute numbers across runs.

    fastadam bench                                   # float32, 2^10..2^22, 1 and all threads
    fastadam bench --dtype float64 --sizes 16 20 --repeats 11 --plot bench.png

The timing helpers (measure, NumpyAdam, ...) are shared with the scripts in benchmarks/.
"""

from __future__ import annotations

import argparse
import math
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


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def log2_size(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 30:
        raise argparse.ArgumentTypeError(f"must be a log2 size in [0, 30], got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--sizes", type=log2_size, nargs="+", default=[10, 12, 14, 16, 18, 20, 22],
                        metavar="LOG2", help="log2 of the element counts (default 10 12 ... 22)")
    parser.add_argument("--threads", type=positive_int, nargs="+", default=None,
                        help="thread counts (default: 1 and fastadam.get_num_threads())")
    parser.add_argument("--repeats", type=positive_int, default=5, help="interleaved repeats (default 5)")
    parser.add_argument("--target-ms", type=float, default=10.0, help="length of one sample (default 10)")
    parser.add_argument("--no-torch", action="store_true", help="skip torch even if installed")
    parser.add_argument("--plot", metavar="PNG", help="also draw GB/s per size to this PNG (matplotlib)")


def run(args: argparse.Namespace) -> List[dict]:
    """Print the table (markdown); returns its rows."""
    try:
        if args.no_torch:
            raise ImportError
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
        print("torch not installed (or --no-torch): torch.optim.Adam columns skipped\n")

    threads = args.threads or sorted({1, fastadam.get_num_threads()})
    dtype = np.dtype(args.dtype)
    bytes_per_element = STREAMS * dtype.itemsize
    simd = fastadam.show_config("dicts")["simd"]
    print(f"fastadam {fastadam.__version__}, {dtype.name}, SIMD {simd['small_tensors']} (small "
          f"tensors) / {simd['large_tensors']} (large), medians of {args.repeats} interleaved repeats")
    print("| elements | threads | implementation | ms/step | Melem/s | GB/s | vs NumPy |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    rows = []
    for log2 in args.sizes:
        size = 1 << log2
        runners: Dict[str, Callable[[], None]] = {"numpy in place|1": NumpyAdam(*make_buffers(size, dtype))}
        for t in threads:
            runners[f"fastadam|{t}"] = fastadam_runner(*make_buffers(size, dtype), t)
            if have_torch:
                p, g, _, _ = make_buffers(size, dtype)
                runners[f"torch default|{t}"] = torch_runner(p, g, t, fused=False)
                p, g, _, _ = make_buffers(size, dtype)
                runners[f"torch fused|{t}"] = torch_runner(p, g, t, fused=True)
        times = measure(runners, args.repeats, args.target_ms / 1000)
        base = times["numpy in place|1"]
        for name, seconds in times.items():
            label, _, t = name.partition("|")
            row = {"log2": log2, "threads": int(t), "implementation": label, "seconds": seconds,
                   "gbps": size * bytes_per_element / seconds / 1e9}
            rows.append(row)
            print(f"| 2^{log2} | {t} | {label} | {seconds * 1e3:.4f} | {size / seconds / 1e6:.0f} | "
                  f"{row['gbps']:.1f} | {base / seconds:.2f}x |")
    if args.plot:
        plot(rows, args.plot, dtype)
    return rows


def plot(rows: List[dict], path: str, dtype: np.dtype) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in sorted({(r["implementation"], r["threads"]) for r in rows}):
        points = [(r["log2"], r["gbps"]) for r in rows if (r["implementation"], r["threads"]) == key]
        ax.plot(*zip(*points), marker="o", label=f"{key[0]} ({key[1]} thread{'s' if key[1] > 1 else ''})")
    ax.set_xlabel("log2(elements)")
    ax.set_ylabel(f"GB/s ({STREAMS} streams of {dtype.itemsize} bytes per element)")
    ax.set_title(f"Adam step, {dtype.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")
