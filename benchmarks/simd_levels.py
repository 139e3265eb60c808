#!/usr/bin/env python3
"""Which SIMD level is fastest for which tensor size? All available levels in one process,
interleaved, medians of repeats; float32 Adam moves 28 bytes per element.

    python benchmarks/simd_levels.py [--dtype float64] [--threads 1]
"""

import argparse

import numpy as np

import fastadam
from fastadam import _simd
from fastadam.app.timing import make_buffers, measure


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[9, 10, 12, 14, 16, 18, 20, 22, 24])
    args = parser.parse_args()
    dtype = np.dtype(args.dtype)
    levels = _simd.available_levels()
    default = _simd.default_levels()
    print(f"{dtype.name}, {args.threads} thread(s); levels {levels}; default small={default[0]}, "
          f"large={default[1]} (tensors <= {_simd.SMALL_TENSOR_ELEMENTS} elements are small)")
    print("| workload | " + " | ".join(f"{lv} (ms)" for lv in levels) + " | " +
          " | ".join(f"{lv} GB/s" for lv in levels) + " |")
    print("|---|" + "---:|" * (2 * len(levels)))
    workloads = {f"1 x 2^{k}": [1 << k] for k in args.sizes}
    workloads["2000 x 512 (Adam.step)"] = [512] * 2000
    for name, shapes in workloads.items():
        runners = {}
        for level in levels:
            if len(shapes) == 1:
                bufs = make_buffers(shapes[0], dtype)
                state = {"t": 0}

                def run(bufs=bufs, state=state):
                    state["t"] += 1
                    fastadam.adam_step(*bufs, step=state["t"], num_threads=args.threads)
            else:
                rng = np.random.default_rng(0)
                params = [rng.standard_normal(s).astype(dtype) for s in shapes]
                grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
                opt = fastadam.Adam(params, num_threads=args.threads)

                def run(opt=opt, grads=grads):
                    opt.step(grads)
            runners[level] = run
        setups = {level: (lambda level=level: _simd.use(level)) for level in levels}
        times = measure(runners, args.repeats, 0.02, setups)
        elements = sum(shapes)
        gbs = [elements * 7 * dtype.itemsize / times[lv] / 1e9 for lv in levels]
        print(f"| {name} | " + " | ".join(f"{times[lv] * 1e3:.4f}" for lv in levels) + " | " +
              " | ".join(f"{g:.1f}" for g in gbs) + " |")
    _simd.use(*default)


if __name__ == "__main__":
    main()
