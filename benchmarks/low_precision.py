#!/usr/bin/env python3
"""16-bit Adam: fastadam's bfloat16/float16 modes against torch's fused Adam and the
master-weights sequences of torch and DeepSpeed (issue 20's targets), in one run.

Implementations, each on buffers of its own (copies of the same random values):
- fastadam.adam_step in float32, in pure bfloat16 (ml_dtypes), in pure float16, and in
  pure bfloat16 with stochastic rounding (seed 0), with state from fastadam.adam_state;
- torch.optim.Adam(fused=True) on torch-allocated float32, bfloat16 and float16 tensors;
- master weights: fastadam.adam_step(master_param=...) with a bfloat16 param and grad
  (one pass: reads the bf16 grad, updates the float32 master and moments, writes the bf16
  param), and the sequence a training loop runs with torch's fused Adam on preallocated
  buffers: ``g32.copy_(bf16_grad)``, a float32 fused step of the master,
  ``bf16_param.copy_(master)``; and the same sequence with DeepSpeedCPUAdam (what
  ZeRO-Offload runs), skipped with a message if deepspeed is not installed or its op does
  not build.

Bytes per element per step (reads + writes, STREAM's convention: no write-allocate):
float32 Adam 28; pure 16-bit 14; fastadam master weights 2 (grad) + 8 (master) + 8 (m)
+ 8 (v) + 2 (param) = 28; the master sequence 6 (grad copy) + 28 + 6 (param copy) = 40.
"% of bound" divides each implementation's bytes per second by the 7-stream bound's,
measured in the same run (benchmarks/peers.py's numba kernel over float32 arrays: one
pass reading 4 and writing 3 arrays, 28 B/element, the best this memory does for an Adam
step's traffic; for sizes of 2^20 elements or more, and skipped without numba).

Methodology as in benchmarks/peers.py: all implementations of a size and thread count
interleaved, repeat by repeat, medians (fastadam.app.timing.measure), measured again while
other processes used more than 5% of the CPUs.

    python benchmarks/low_precision.py                     # 2^24, 1 and 2 threads
    python benchmarks/low_precision.py --sizes 2^20 2^26 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
from peers import LARGE, QUIET, build_bounds, cpu_model, measure_quietly, versions

import fastadam
from fastadam.app.timing import BETA1, BETA2, EPS, LR

Runner = Callable[[], None]
BOUND = "bound: 7-stream (numba)"
BOUND_BYTES = 28  # per element: the bound runs over float32 arrays


# --- the buffers -----------------------------------------------------------------------


@dataclass
class Templates:
    """float32 params and grads every implementation converts and copies."""
    param: np.ndarray
    grad: np.ndarray

    @classmethod
    def random(cls, elements: int) -> "Templates":
        rng = np.random.default_rng(0)
        return cls(rng.standard_normal(elements, dtype=np.float32),
                   rng.standard_normal(elements, dtype=np.float32))


def bfloat16() -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def torch_tensor(array: np.ndarray, dtype):
    """A torch-allocated copy (torch places its own buffers, as in training)."""
    import torch

    return torch.from_numpy(array).to(dtype, copy=True)


# --- implementations ---------------------------------------------------------------------
# Each builder takes the templates and the thread count and returns one optimizer step.


def fastadam_pure(dtype: Callable[[], np.dtype], **options) -> Callable[..., Runner]:
    def build(t: Templates, threads: int) -> Runner:
        element = np.dtype(dtype())
        param, grad = t.param.astype(element), t.grad.astype(element)
        state = fastadam.adam_state(param)  # moments staggered against 4K aliasing
        m, v = state["exp_avg"], state["exp_avg_sq"]
        steps = iter(range(1, 1 << 62))
        return lambda: fastadam.adam_step(param, grad, m, v, step=next(steps), lr=LR, beta1=BETA1,
                                          beta2=BETA2, eps=EPS, num_threads=threads, **options)

    return build


def build_fastadam_master(t: Templates, threads: int) -> Runner:
    param, grad = t.param.astype(bfloat16()), t.grad.astype(bfloat16())
    state = fastadam.adam_state(param, master_weights=True)  # float32 master and moments
    master, m, v = state["master_param"], state["exp_avg"], state["exp_avg_sq"]
    steps = iter(range(1, 1 << 62))
    return lambda: fastadam.adam_step(param, grad, m, v, step=next(steps), lr=LR, beta1=BETA1,
                                      beta2=BETA2, eps=EPS, num_threads=threads,
                                      master_param=master)


def build_fastadam_bf16_moments(t: Templates, threads: int) -> Runner:
    param, grad = t.param.copy(), t.grad.copy()
    state = fastadam.adam_state(param, state_dtype="bfloat16")  # float32 param, bf16 moments
    m, v = state["exp_avg"], state["exp_avg_sq"]
    steps = iter(range(1, 1 << 62))
    return lambda: fastadam.adam_step(param, grad, m, v, step=next(steps), lr=LR, beta1=BETA1,
                                      beta2=BETA2, eps=EPS, num_threads=threads)


def torch_fused(dtype_name: str) -> Callable[..., Runner]:
    def build(t: Templates, threads: int) -> Runner:
        import torch

        dtype = getattr(torch, dtype_name)
        param = torch.nn.Parameter(torch_tensor(t.param, dtype))
        param.grad = torch_tensor(t.grad, dtype)
        return torch.optim.Adam([param], lr=LR, betas=(BETA1, BETA2), eps=EPS, fused=True).step

    return build


def master_sequence(make_optimizer: Callable[[list], object]) -> Callable[..., Runner]:
    """A bf16 model's step with an fp32 master, as training loops write it on preallocated
    buffers: upcast the grad into the master's grad, an fp32 step, copy the master out."""
    def build(t: Templates, threads: int) -> Runner:
        import torch

        bf16_param = torch_tensor(t.param, torch.bfloat16)
        bf16_grad = torch_tensor(t.grad, torch.bfloat16)
        master = torch.nn.Parameter(bf16_param.float())
        master.grad = torch.empty_like(master)
        optimizer = make_optimizer([master])

        def run() -> None:
            master.grad.copy_(bf16_grad)
            optimizer.step()
            with torch.no_grad():
                bf16_param.copy_(master)

        return run

    return build


def torch_fused_optimizer(params: list):
    import torch

    return torch.optim.Adam(params, lr=LR, betas=(BETA1, BETA2), eps=EPS, fused=True)


def deepspeed_optimizer(params: list):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=0.0,
                            adamw_mode=False)


@dataclass
class Implementation:
    name: str
    build: Callable[..., Runner]
    bytes_per_element: int
    module: str                          # what must be importable
    baselines: tuple = ()                # the names its speed-up is quoted against


F32, BF16, F16, SR = "fastadam f32", "fastadam bf16", "fastadam f16", "fastadam bf16 stochastic"
MASTER = "fastadam master weights (bf16 param+grad)"
BF16_MOMENTS = "fastadam f32 param, bf16 moments"
TORCH_F32, TORCH_BF16, TORCH_F16 = "torch fused f32", "torch fused bf16", "torch fused f16"
TORCH_SEQUENCE = "torch fused master sequence"
DS_SEQUENCE = "DeepSpeedCPUAdam master sequence"
IMPLEMENTATIONS = [
    Implementation(F32, fastadam_pure(lambda: np.float32), 28, "numpy", (TORCH_F32,)),
    Implementation(BF16, fastadam_pure(bfloat16), 14, "ml_dtypes", (F32, TORCH_BF16)),
    Implementation(F16, fastadam_pure(lambda: np.float16), 14, "numpy", (F32, TORCH_F16)),
    Implementation(SR, fastadam_pure(bfloat16, stochastic_rounding=True, seed=0), 14,
                   "ml_dtypes", (BF16, TORCH_BF16)),
    Implementation(TORCH_F32, torch_fused("float32"), 28, "torch"),
    Implementation(TORCH_BF16, torch_fused("bfloat16"), 14, "torch"),
    Implementation(TORCH_F16, torch_fused("float16"), 14, "torch"),
    Implementation(MASTER, build_fastadam_master, 28, "ml_dtypes", (TORCH_SEQUENCE, DS_SEQUENCE)),
    Implementation(BF16_MOMENTS, build_fastadam_bf16_moments, 20, "ml_dtypes", (F32,)),
    Implementation(TORCH_SEQUENCE, master_sequence(torch_fused_optimizer), 40, "torch"),
    Implementation(DS_SEQUENCE, master_sequence(deepspeed_optimizer), 40, "deepspeed"),
]
# Issue 20's targets at 2^24 on one thread: (implementation, baseline, least speed-up).
TARGETS = [(BF16, F32, 1.7), (BF16, TORCH_BF16, 2.5), (MASTER, TORCH_SEQUENCE, 2.5),
           (MASTER, DS_SEQUENCE, 2.0)]


# --- measuring --------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """An element count, as 2^k or an integer."""
    base, _, exponent = text.partition("^")
    value = int(base) ** int(exponent) if exponent else int(base)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a size must be positive: {text}")
    return value


def size_label(elements: int) -> str:
    k = elements.bit_length() - 1
    return f"2^{k}" if elements == 1 << k else f"{elements:,}"


def measure_size(elements: int, args, impls: List[Implementation],
                 broken: Dict[str, str]) -> List[dict]:
    """Every thread count of one size; one record per implementation and thread count."""
    templates = Templates.random(elements)
    # As in peers.py: below 2^20 elements the buffers stay in cache and no bound applies.
    with_bounds = elements >= LARGE and importlib.util.find_spec("numba") is not None
    per_byte = {impl.name: impl.bytes_per_element for impl in impls}
    per_byte[BOUND] = BOUND_BYTES
    records = []
    for threads in args.threads:
        runners: Dict[str, Runner] = {}
        for impl in impls:
            if impl.name in broken:
                continue
            try:
                runners[impl.name] = impl.build(templates, threads)
            except Exception as exc:  # a peer that fails to build is skipped from now on
                broken[impl.name] = f"{type(exc).__name__}: {str(exc)[:200]}"
        if with_bounds:
            runners[BOUND] = build_bounds(elements, np.dtype(np.float32))[
                "bound: 7-stream (numba)"]
        times, others, attempts = measure_quietly(runners, threads, args.repeats, args)
        for name, seconds in times.items():
            records.append(dict(elements=elements, threads=threads, implementation=name,
                                seconds=seconds, bytes_per_element=per_byte[name],
                                gbps=elements * per_byte[name] / seconds / 1e9,
                                others_cpu=others, attempts=attempts, repeats=args.repeats))
        del runners
        gc.collect()
    return records


# --- output -----------------------------------------------------------------------------


def speed_ups(rows: Dict[str, dict], impl: Implementation) -> str:
    """'1.85x vs fastadam f32' for each baseline measured in the same table (> 1: faster)."""
    found = [f"{rows[b]['seconds'] / rows[impl.name]['seconds']:.2f}x vs {b}"
             for b in impl.baselines if b in rows and impl.name in rows]
    return "; ".join(found)


def print_table(records: List[dict], impls: List[Implementation], elements: int,
                threads: int) -> None:
    rows = {r["implementation"]: r for r in records
            if r["elements"] == elements and r["threads"] == threads}
    if not rows:
        return
    bound = rows.get(BOUND, {}).get("gbps")
    first = next(iter(rows.values()))
    print(f"\n### 1 tensor of {size_label(elements)} elements, {threads} thread"
          f"{'s' if threads > 1 else ''}, medians of {first['repeats']} repeats\n")
    print("| implementation | ms/step | B/element | GB/s | % of 7-stream bound | speed-up |")
    print("|---|---:|---:|---:|---:|---|")
    for impl in impls:
        if impl.name in rows:
            r = rows[impl.name]
            pct = f"{100 * r['gbps'] / bound:.0f}%" if bound else ""
            print(f"| {impl.name} | {r['seconds'] * 1e3:.4g} | {r['bytes_per_element']} | "
                  f"{r['gbps']:.1f} | {pct} | {speed_ups(rows, impl)} |")
    if BOUND in rows:
        r = rows[BOUND]
        print(f"| {BOUND} | {r['seconds'] * 1e3:.4g} | {BOUND_BYTES} | {r['gbps']:.1f} | 100% | |")
    print(f"\n(other processes used {100 * first['others_cpu']:.0f}% of the CPUs while this was "
          "measured" + (f", least disturbed of {first['attempts']} attempts" if first["attempts"] > 1
                        else "")
          + ("; DISTURBED, rerun on a quiet machine)" if first["others_cpu"] > QUIET else ")"))


def print_targets(records: List[dict]) -> None:
    """Issue 20's speed targets, where this run measured both sides (2^24, one thread)."""
    rows = {r["implementation"]: r for r in records
            if r["elements"] == 1 << 24 and r["threads"] == 1}
    lines = []
    for name, baseline, least in TARGETS:
        if name in rows and baseline in rows:
            ratio = rows[baseline]["seconds"] / rows[name]["seconds"]
            lines.append(f"- {name} vs {baseline}: {ratio:.2f}x (target >= {least}x: "
                         f"{'met' if ratio >= least else 'NOT met'})")
    if lines:
        print("\nIssue 20's targets (2^24, 1 thread):")
        print("\n".join(lines))


def print_header(args, impls: List[Implementation], missing: List[Implementation]) -> None:
    config = fastadam.show_config("dicts")
    simd = config["simd"]
    print("# 16-bit Adam: fastadam vs torch fused and master-weights sequences\n")
    print(f"{cpu_model()}, {os.cpu_count()} CPUs; fastadam kernels {simd['large_tensors']} for "
          f"large float32 tensors, {simd['small_tensors']} for 16-bit buffers; " + ", ".join(f"{k} {v}" for k, v in versions().items())
          + (f", ml_dtypes {importlib.metadata.version('ml_dtypes')}"
             if importlib.util.find_spec("ml_dtypes") else ""))
    print(f"Interleaved medians of {args.repeats} repeats (samples of >= {args.target_ms:g} ms). "
          "B/element: bytes read + written per element per step. 'speed-up' > 1: the row is "
          "faster than the named baseline, timed in the same table.")
    if importlib.util.find_spec("numba") is None:
        print("- bound: skipped (numba not installed)")
    for impl in missing:
        print(f"- {impl.name}: skipped, {impl.module} not installed")
    sys.stdout.flush()


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[1 << 24],
                        help="elements per tensor, as 2^k or an integer (default 2^24)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--target-ms", type=float, default=20.0, help="shortest length of one sample")
    parser.add_argument("--retries", type=int, default=2,
                        help=f"measure again while other processes used > {QUIET * 100:.0f}%% of the CPUs")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="seconds to wait for quiet CPUs before each attempt")
    parser.add_argument("--json", help="save every timing here")
    args = parser.parse_args(argv)

    impls = [i for i in IMPLEMENTATIONS if importlib.util.find_spec(i.module) is not None]
    missing = [i for i in IMPLEMENTATIONS if i not in impls]
    print_header(args, impls, missing)
    broken: Dict[str, str] = {}
    records: List[dict] = []
    for elements in args.sizes:
        size_records = measure_size(elements, args, impls, broken)
        for threads in args.threads:
            print_table(size_records, impls, elements, threads)
        records += size_records
        sys.stdout.flush()
    for name, why in broken.items():
        print(f"- {name} skipped: {why}")
    print_targets(records)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "versions": versions(), "cpu": cpu_model(),
                       "skipped": broken, "not_installed": [i.name for i in missing],
                       "records": records}, f, indent=1)
        print(f"\nraw numbers saved to {args.json}")


if __name__ == "__main__":
    main()
