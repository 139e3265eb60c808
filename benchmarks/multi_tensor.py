#!/usr/bin/env python3
"""One optimizer step over many small tensors vs one large tensor of the same total size.

fastadam.Adam.step makes one kernel call for all tensors, so 2000 tensors x 512 elements
should cost about as much as one tensor of 2^20; torch.optim.Adam(fused=True), if
installed, is measured on the same workloads. Medians of interleaved repeats.

    python benchmarks/multi_tensor.py [--threads 1 2] [--dtype float64]
"""

import argparse

import numpy as np

import fastadam
from fastadam.app.timing import measure

WORKLOADS = {"2000 x 512": [512] * 2000, "1 x 2^20": [1 << 20]}


def buffers(shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def fastadam_runner(shapes, dtype, threads):
    params, grads = buffers(shapes, dtype, 0), buffers(shapes, dtype, 1)
    opt = fastadam.Adam(params, num_threads=threads)
    return lambda: opt.step(grads)


def torch_runner(shapes, dtype, threads):
    import torch

    params = [torch.nn.Parameter(torch.from_numpy(p)) for p in buffers(shapes, dtype, 0)]
    for p, g in zip(params, buffers(shapes, dtype, 1)):
        p.grad = torch.from_numpy(g)
    opt = torch.optim.Adam(params, fused=True)

    def run():
        torch.set_num_threads(threads)
        opt.step()

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    try:
        import torch  # noqa: F401

        impls = {"fastadam.Adam": fastadam_runner, "torch fused": torch_runner}
    except ImportError:
        print("torch not installed: torch column skipped")
        impls = {"fastadam.Adam": fastadam_runner}
    dtype = np.dtype(args.dtype)
    print("| implementation | threads | 2000 x 512 (ms) | 1 x 2^20 (ms) | ratio | per-tensor overhead (us) |")
    print("|---|---:|---:|---:|---:|---:|")
    for threads in args.threads:
        runners = {(name, w): make(shapes, dtype, threads)
                   for name, make in impls.items() for w, shapes in WORKLOADS.items()}
        times = measure(runners, args.repeats, 0.05)
        for name in impls:
            many, one = times[(name, "2000 x 512")], times[(name, "1 x 2^20")]
            print(f"| {name} | {threads} | {many * 1e3:.3f} | {one * 1e3:.3f} | {many / one:.2f}x | "
                  f"{(many - one) / 2000 * 1e6:.2f} |")


if __name__ == "__main__":
    main()
