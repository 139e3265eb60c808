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

The timing helpers (measure, NumpyAdam, ...) are fastadam.app.timing's, shared with the
scripts in benchmarks/.
"""

from __future__ import annotations

import argparse
from typing import Callable, Dict, List

import numpy as np

import fastadam
from fastadam.app.cli import positive_int
from fastadam.app.timing import (
    STREAMS,
    NumpyAdam,
    fastadam_runner,
    make_buffers,
    measure,
    torch_runner,
)


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
