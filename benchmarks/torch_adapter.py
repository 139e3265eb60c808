#!/usr/bin/env python3
"""fastadam.torch.Adam vs torch.optim.Adam (for-loop, foreach, fused) on real model shapes.

The parameters of ResNet-18 (62 tensors, 11.7M elements) and GPT-2 small (148 tensors,
124M), float32, with gradients set; one optimizer.step() timed, implementations
interleaved, medians of repeats, at 1 and 2 threads (torch.set_num_threads and
fastadam's num_threads alike).

    python benchmarks/torch_adapter.py [--workloads resnet18 gpt2] [--threads 1 2]
"""

import argparse
import gc

import numpy as np
import torch
from peers import gpt2_small_shapes, resnet18_shapes

import fastadam.torch

from quick import measure

WORKLOADS = {"resnet18": resnet18_shapes, "gpt2": gpt2_small_shapes}
IMPLEMENTATIONS = {
    "fastadam.torch.Adam": lambda params, threads: fastadam.torch.Adam(params, num_threads=threads),
    "torch for-loop": lambda params, threads: torch.optim.Adam(params, foreach=False),
    "torch foreach": lambda params, threads: torch.optim.Adam(params, foreach=True),
    "torch fused": lambda params, threads: torch.optim.Adam(params, fused=True),
}


def parameters(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    return params


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("| workload | threads | implementation | ms/step | vs torch fused |")
    print("|---|---:|---|---:|---:|")
    for name in args.workloads:
        shapes = WORKLOADS[name]()
        elements = sum(int(np.prod(s)) for s in shapes)
        for threads in args.threads:
            runners = {}
            for label, make in IMPLEMENTATIONS.items():
                opt = make(parameters(shapes), threads)
                runners[label] = opt.step
            setups = {label: (lambda t=threads: torch.set_num_threads(t)) for label in runners}
            times = measure(runners, args.repeats, 0.2, setups)
            for label, seconds in times.items():
                print(f"| {name} ({len(shapes)} tensors, {elements / 1e6:.1f}M) | {threads} | {label} | "
                      f"{seconds * 1e3:.2f} | {times['torch fused'] / seconds:.2f}x |")
            del runners
            gc.collect()


if __name__ == "__main__":
    main()
