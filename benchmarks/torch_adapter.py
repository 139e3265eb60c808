#!/usr/bin/env python3
"""fastadam.torch.Adam vs torch.optim.Adam (for-loop, foreach, fused) as models have them.

Workloads: many small tensors (2000 x 512, 200 x 4096), the 28 tensors of a 2-layer GPT-2
(n_embd=128, 0.48M elements), single tensors of 2^20 and 2^24, and the parameters of
ResNet-18 (62 tensors, 11.7M elements) and GPT-2 small (148 tensors, 124M); float32,
torch-allocated params and gradients, as a model has them. One optimizer.step()
timed, implementations interleaved, medians of repeats, at 1 and 2 threads
(torch.set_num_threads and fastadam's num_threads alike). The last line estimates
fastadam.torch's cost per extra tensor: (t(2000 x 512) - t(1 x 1,024,000)) / 1999.

    python benchmarks/torch_adapter.py [--workloads 2000x512 resnet18] [--threads 1 2]
        [--implementations fastadam.torch.Adam]
"""

import argparse
import gc

import numpy as np
import torch
from peers import gpt2_small_shapes, resnet18_shapes

import fastadam.torch
from fastadam.app.timing import measure


def gpt2_tiny_shapes(layers=2, d=128, vocab=512, positions=128):
    """A 2-layer GPT-2 (n_embd=128): 28 tensors, 478,720 elements."""
    shapes = [(vocab, d), (positions, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,),
                   (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


WORKLOADS = {
    "2000x512": lambda: [(512,)] * 2000,
    "200x4096": lambda: [(4096,)] * 200,
    "gpt2-tiny": gpt2_tiny_shapes,
    "2^20": lambda: [(1 << 20,)],
    "2^24": lambda: [(1 << 24,)],
    "resnet18": resnet18_shapes,
    "gpt2": gpt2_small_shapes,
    "1x1024000": lambda: [(2000 * 512,)],
}
IMPLEMENTATIONS = {
    "fastadam.torch.Adam": lambda params, threads: fastadam.torch.Adam(params, num_threads=threads),
    "torch for-loop": lambda params, threads: torch.optim.Adam(params, foreach=False),
    "torch foreach": lambda params, threads: torch.optim.Adam(params, foreach=True),
    "torch fused": lambda params, threads: torch.optim.Adam(params, fused=True),
}


def parameters(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def with_grads(params, seed=1):
    """torch-allocated gradients, set once: only opt.step() is timed (a backward pass
    would give fresh tensors each step, which costs fastadam.torch the same)."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    return params


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--implementations", nargs="+", choices=list(IMPLEMENTATIONS),
                        default=list(IMPLEMENTATIONS), help="torch fused always runs (the ratios' base)")
    args = parser.parse_args()
    chosen = {label: make for label, make in IMPLEMENTATIONS.items()
              if label in args.implementations or label == "torch fused"}
    print("| workload | threads | implementation | ms/step | vs torch fused |")
    print("|---|---:|---|---:|---:|")
    ours: dict = {}
    for name in args.workloads:
        shapes = WORKLOADS[name]()
        elements = sum(int(np.prod(s)) for s in shapes)
        for threads in args.threads:
            runners = {}
            for label, make in chosen.items():
                runners[label] = make(with_grads(parameters(shapes)), threads).step
            setups = {label: (lambda t=threads: torch.set_num_threads(t)) for label in runners}
            times = measure(runners, args.repeats, 0.2, setups)
            for label, seconds in times.items():
                print(f"| {name} ({len(shapes)} tensors, {elements / 1e6:.1f}M) | {threads} | {label} | "
                      f"{seconds * 1e3:.2f} | {times['torch fused'] / seconds:.2f}x |")
            if "fastadam.torch.Adam" in times:
                ours[name, threads] = times["fastadam.torch.Adam"]
            del runners
            gc.collect()
    for threads in args.threads:
        if ("2000x512", threads) in ours and ("1x1024000", threads) in ours:
            extra = (ours["2000x512", threads] - ours["1x1024000", threads]) / 1999
            print(f"\nfastadam.torch, {threads} thread(s): {extra * 1e6:.3f} us per extra tensor "
                  "(2000 x 512 against one tensor of the same 1,024,000 elements)")


if __name__ == "__main__":
    main()
