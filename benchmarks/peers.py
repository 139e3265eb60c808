#!/usr/bin/env python3
"""fastadam against every CPU Adam we can install, on single tensors and real models' shapes.

Workloads: single tensors of 2^10 .. 2^26 elements, the parameter shapes of ResNet-18 (62
tensors, 11.7M elements) and GPT-2 small (148 tensors, 124M elements), and 2000 tensors of
512 elements. Implementations: fastadam.Adam.step (one call for all tensors; the reference
of every ratio), fastadam.torch.Adam (on torch-allocated tensors, as a model has them),
fastadam.adam_step (single tensors), an in-place NumPy Adam (fastadam.app.timing's
NumpyAdam, one per tensor), torch.optim.Adam (default, foreach=True, fused=True), thinc's
NumpyOps.adam, optax.adam under jax.jit and DeepSpeedCPUAdam. A peer that is not
installed, or does not support the dtype, is skipped with a printed note.

Methodology: every implementation of a workload is timed in one run, interleaved repeat by
repeat, and the tables show medians (fastadam.app.timing.measure). Each implementation owns its buffers,
copies of the same random values. Buffers are built per workload and thread count and
freed before the next; when a workload's buffers would not fit in --memory-gb the
implementations are split into passes, each containing fastadam.Adam, so that every ratio
still compares two implementations timed in the same run. The machine is shared: each table
says how much CPU other processes took meanwhile and is measured again (--retries) when that
exceeds 5%. Interleaving has one known cost: after a call, one runtime's worker threads spin
or sleep, so the next implementation pays for waking or sharing a CPU; at small sizes this
slows optax's dispatch thread (2^10, 2 threads: 0.013 ms alone, 0.03-0.05 ms interleaved).

Bandwidth bounds, measured in the same run for workloads of 2^20 elements or more (needs
numba, skipped otherwise): a "7-stream" kernel that reads 4 arrays and writes 3 in one
pass with almost no arithmetic (p, m, v = p/2 + g, m/2 + g, v/2 + g), i.e. exactly an Adam
step's memory traffic, and a STREAM triad a = b + s*c. Both run over one flat buffer of
the workload's total size, compiled by numba (prange, numba.set_num_threads), on arrays
staggered within their 4 KiB pages so that 4K aliasing (docs/guide/performance.md) does not slow them: a
bound should be the best this memory does. GB/s counts 28 bytes per float32 element for
Adam and the 7-stream kernel, 12 for the triad (STREAM's convention, no write-allocate).

    python benchmarks/peers.py                      # all workloads, float32, 1 and 2 threads
    python benchmarks/peers.py --quick              # a small subset, about a minute
    python benchmarks/peers.py --workloads resnet18 gpt2 --threads 1 --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import fastadam
from fastadam.app.timing import BETA1, BETA2, EPS, LR, STREAMS, NumpyAdam, fastadam_runner, measure

Shape = Tuple[int, ...]
Runner = Callable[[], None]
REFERENCE = "fastadam.Adam"
FUSED = "torch fused=True"  # the plot's baseline
LARGE = 1 << 20           # workloads from this many elements get the bandwidth bounds
BIG = 1 << 26             # workloads from this many elements use --big-repeats
TEMPLATE_COPIES = 2       # the random params and grads every implementation copies
BOUND_COPIES = 4          # the bounds' p, g, m, v (the triad reuses three of them)
THINC_REFRESH = 64        # thinc zeroes the gradient; refill it every this many steps
QUIET = 0.05              # a table is trusted if other processes used at most this CPU share


# --- workloads ------------------------------------------------------------------------

def resnet18_shapes() -> List[Shape]:
    """torchvision's resnet18() parameters in order: 62 tensors, 11,689,512 elements."""
    shapes: List[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for stage, channels in enumerate([64, 128, 256, 512]):
        for block in range(2):
            first_in = in_channels if block == 0 else channels
            shapes += [(channels, first_in, 3, 3), (channels,), (channels,),      # conv1, bn1
                       (channels, channels, 3, 3), (channels,), (channels,)]     # conv2, bn2
            if block == 0 and stage > 0:  # downsample: 1x1 conv with stride 2, then batch norm
                shapes += [(channels, in_channels, 1, 1), (channels,), (channels,)]
        in_channels = channels
    return shapes + [(1000, 512), (1000,)]


def gpt2_small_shapes() -> List[Shape]:
    """Hugging Face GPT2Model (small) parameters in order: 148 tensors, 124,439,808 elements
    (Conv1D weights are stored (in, out); the LM head is tied to wte and not separate)."""
    d = 768
    shapes: List[Shape] = [(50257, d), (1024, d)]
    for _ in range(12):
        shapes += [(d,), (d,),                      # ln_1
                   (d, 3 * d), (3 * d,),            # attn.c_attn
                   (d, d), (d,),                    # attn.c_proj
                   (d,), (d,),                      # ln_2
                   (d, 4 * d), (4 * d,),            # mlp.c_fc
                   (4 * d, d), (d,)]                # mlp.c_proj
    return shapes + [(d,), (d,)]                    # ln_f


WORKLOADS: Dict[str, Tuple[str, List[Shape]]] = {
    "2^10": ("1 tensor of 2^10", [(1 << 10,)]),
    "2^14": ("1 tensor of 2^14", [(1 << 14,)]),
    "2^17": ("1 tensor of 2^17", [(1 << 17,)]),
    "2^20": ("1 tensor of 2^20", [(1 << 20,)]),
    "2^24": ("1 tensor of 2^24", [(1 << 24,)]),
    "2^26": ("1 tensor of 2^26", [(1 << 26,)]),
    "resnet18": ("ResNet-18 shapes", resnet18_shapes()),
    "gpt2": ("GPT-2 small shapes", gpt2_small_shapes()),
    "2000x512": ("2000 tensors x 512", [(512,)] * 2000),
}
QUICK_WORKLOADS = ["2^10", "2^20", "resnet18", "2000x512"]


def make_templates(shapes: Sequence[Shape], dtype: np.dtype) -> Tuple[list, list]:
    """Random params and grads that every implementation copies (so all see the same values)."""
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s, dtype=dtype) for s in shapes]
    grads = [rng.standard_normal(s, dtype=dtype) for s in shapes]
    return params, grads


def copies(arrays: Sequence[np.ndarray]) -> List[np.ndarray]:
    return [a.copy() for a in arrays]


# --- implementations --------------------------------------------------------------------
# Each builder takes the template params and grads and the thread count and returns a
# runner doing one optimizer step of all tensors on buffers of its own.


def build_fastadam_optimizer(params, grads, threads: int) -> Runner:
    params, grads = copies(params), copies(grads)
    opt = fastadam.Adam(params, lr=LR, betas=(BETA1, BETA2), eps=EPS, num_threads=threads)
    return lambda: opt.step(grads)


def build_fastadam_fast(params, grads, threads: int) -> Runner:
    """fastadam.Adam with numerics="fast": one division per element (the paper's form)."""
    params, grads = copies(params), copies(grads)
    opt = fastadam.Adam(params, lr=LR, betas=(BETA1, BETA2), eps=EPS, num_threads=threads,
                        numerics="fast")
    return lambda: opt.step(grads)


def build_fastadam_torch(params, grads, threads: int) -> Runner:
    """fastadam.torch.Adam on torch-allocated params and grads, as a model has them."""
    import fastadam.torch

    opt = fastadam.torch.Adam(torch_parameters(params, grads), lr=LR, betas=(BETA1, BETA2),
                              eps=EPS, num_threads=threads)
    return opt.step


def build_fastadam_function(params, grads, threads: int) -> Runner:
    param, grad = params[0].copy(), grads[0].copy()
    return fastadam_runner(param, grad, np.zeros_like(param), np.zeros_like(param), threads)


def build_numpy(params, grads, threads: int) -> Runner:
    adams = [NumpyAdam(p.copy(), g.copy(), np.zeros_like(p), np.zeros_like(p))
             for p, g in zip(params, grads)]

    def run():
        for adam in adams:
            adam()

    return run


def torch_parameters(params, grads) -> list:
    """torch-allocated params with .grad set (torch places its own buffers, as in training)."""
    import torch

    tensors = []
    for p, g in zip(params, grads):
        tensor = torch.nn.Parameter(torch.from_numpy(p).clone())
        tensor.grad = torch.from_numpy(g).clone()
        tensors.append(tensor)
    return tensors


def torch_builder(**options) -> Callable[..., Runner]:
    def build(params, grads, threads: int) -> Runner:
        import torch

        opt = torch.optim.Adam(torch_parameters(params, grads), lr=LR, betas=(BETA1, BETA2),
                               eps=EPS, **options)
        return opt.step

    return build


def build_thinc(params, grads, threads: int) -> Runner:
    """thinc's Optimizer flattens each tensor and folds both bias corrections into the rate
    (thinc/optimizers.py _adam); ops.adam then overwrites and zeroes the gradient. The
    gradient is refilled every THINC_REFRESH steps (timed, +0.3% traffic): with zero
    gradients the first moment would decay into subnormals, whose arithmetic is slow."""
    from thinc.api import NumpyOps

    ops = NumpyOps()
    tensors = [(p.reshape(-1).copy(), g.reshape(-1).copy(), np.zeros(p.size, np.float32),
                np.zeros(p.size, np.float32)) for p, g in zip(params, grads)]
    sources = [g.reshape(-1) for g in grads]  # the templates, only read
    state = {"step": 0}

    def run():
        state["step"] += 1
        step = state["step"]
        if step % THINC_REFRESH == 0:
            for (_, grad, _, _), source in zip(tensors, sources):
                np.copyto(grad, source)
        learn_rate = LR * math.sqrt(1 - BETA2**step) / (1 - BETA1**step)
        for weights, grad, mom1, mom2 in tensors:
            ops.adam(weights, grad, mom1, mom2, BETA1, BETA2, EPS, learn_rate)

    return run


@functools.cache
def optax_update():
    """One jitted update of the whole pytree, params and optimizer state donated (updated
    in place). Built once per process so that jax reuses compilations across builds."""
    import jax
    import optax

    tx = optax.adam(LR, b1=BETA1, b2=BETA2, eps=EPS)

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return tx, jax.jit(update, donate_argnums=(0, 1))


def build_optax(params, grads, threads: int) -> Runner:
    import jax
    import jax.numpy as jnp

    if params[0].dtype == np.float64:
        jax.config.update("jax_enable_x64", True)
    tx, update = optax_update()
    box = {"params": [jnp.array(p) for p in params]}
    box["state"] = tx.init(box["params"])
    grads = [jnp.array(g) for g in grads]

    def run():
        box["params"], box["state"] = update(box["params"], box["state"], grads)
        jax.block_until_ready(box["params"])  # the state comes from the same executable

    return run


def build_deepspeed(params, grads, threads: int) -> Runner:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    opt = DeepSpeedCPUAdam(torch_parameters(params, grads), lr=LR, betas=(BETA1, BETA2), eps=EPS,
                           weight_decay=0.0, adamw_mode=False)
    return opt.step


@dataclass
class Implementation:
    name: str
    build: Callable[..., Runner]
    module: str        # what must be importable
    copies: int        # workload-sized buffers it holds at peak (for planning passes)
    threads: str       # how its thread count is set
    single_tensor_only: bool = False
    float32_only: str = ""  # why, if so

    def skip_reason(self, tensors: int, dtype: np.dtype) -> str:
        """Why this implementation does not run a workload, or "" if it does."""
        if self.single_tensor_only and tensors > 1:
            return "single tensors only (fastadam.Adam covers lists)"
        if self.float32_only and dtype != np.float32:
            return self.float32_only
        return ""


TORCH_THREADS = "torch.set_num_threads(T)"
IMPLEMENTATIONS = [
    Implementation(REFERENCE, build_fastadam_optimizer, "fastadam", 4, "num_threads=T"),
    Implementation("fastadam.Adam numerics='fast'", build_fastadam_fast, "fastadam", 4,
                   "num_threads=T"),
    Implementation("fastadam.torch.Adam", build_fastadam_torch, "torch", 4, "num_threads=T"),
    Implementation("fastadam.adam_step", build_fastadam_function, "fastadam", 4, "num_threads=T",
                   single_tensor_only=True),
    Implementation("numpy in place", build_numpy, "numpy", 5, "single-threaded"),
    # On CPU torch's default is the for-loop implementation, i.e. foreach=False
    # (torch/optim/optimizer.py _default_to_fused_or_foreach: foreach only on cuda/xpu/mtia).
    # Its per-tensor temporaries can briefly need two more copies of a single tensor.
    Implementation("torch default (=foreach=False)", torch_builder(), "torch", 6, TORCH_THREADS),
    Implementation("torch foreach=True", torch_builder(foreach=True), "torch", 5, TORCH_THREADS),
    Implementation(FUSED, torch_builder(fused=True), "torch", 4, TORCH_THREADS),
    Implementation("thinc NumpyOps.adam", build_thinc, "thinc", 4, "single-threaded (holds the GIL)",
                   float32_only="NumpyOps.adam takes float32 arrays only"),
    Implementation("optax.adam (jax.jit)", build_optax, "optax", 5,
                   "XLA's own CPU thread pool: not controlled, the same in every table"),
    Implementation("DeepSpeedCPUAdam", build_deepspeed, "deepspeed", 4,
                   "OpenMP loops, limited with torch.set_num_threads + threadpoolctl",
                   float32_only="no float64 kernel on CPU (RuntimeError: 'param type Double and "
                                "state type Float is not supported')"),
]


# --- bandwidth bounds ---------------------------------------------------------------------


@functools.cache
def numba_kernels():
    """The two bound kernels, compiled once. Arithmetic is kept trivial and in the element
    type (no float64 promotion) so that only memory traffic limits them."""
    import numba

    @numba.njit(parallel=True)
    def seven_stream(p, g, m, v, half):
        for i in numba.prange(p.size):
            grad = g[i]
            p[i] = half * p[i] + grad
            m[i] = half * m[i] + grad
            v[i] = half * v[i] + grad

    @numba.njit(parallel=True)
    def triad(a, b, c, scale):
        for i in numba.prange(a.size):
            a[i] = b[i] + scale * c[i]

    return seven_stream, triad


def staggered_arrays(count: int, elements: int, dtype: np.dtype) -> List[np.ndarray]:
    """count arrays starting 1 KiB + 64 B apart modulo 4 KiB, so that loads never wait on
    stores to another array at the same page offset (4K aliasing, docs/guide/performance.md)."""
    arrays = []
    page = 4096 // dtype.itemsize
    for k in range(count):
        raw = np.empty(elements + 2 * page, dtype)
        start = (-raw.ctypes.data % 4096) // dtype.itemsize + (k * 1088 // dtype.itemsize) % page
        array = raw[start:start + elements]
        array.fill(1)
        arrays.append(array)
    return arrays


def build_bounds(elements: int, dtype: np.dtype) -> Dict[str, Runner]:
    seven_stream, triad = numba_kernels()
    p, g, m, v = staggered_arrays(BOUND_COPIES, elements, dtype)
    half, scale = dtype.type(0.5), dtype.type(3.0)
    return {SEVEN_STREAM: lambda: seven_stream(p, g, m, v, half),
            "bound: triad (numba)": lambda: triad(m, p, g, scale)}


SEVEN_STREAM = "bound: 7-stream (numba)"


def seven_stream_runner(elements: int, threads: int) -> Optional[Runner]:
    """The 7-stream bound over ``elements`` float32 elements on ``threads`` numba threads,
    for another script's table; None below LARGE (in cache no bound applies) or without
    numba."""
    if elements < LARGE or importlib.util.find_spec("numba") is None:
        return None
    import numba

    numba.set_num_threads(threads)
    return build_bounds(elements, np.dtype(np.float32))[SEVEN_STREAM]


def bound_bytes(name: str, elements: int, dtype: np.dtype) -> int:
    return elements * dtype.itemsize * (3 if "triad" in name else STREAMS)


# --- threads -------------------------------------------------------------------------------


def process_threads(threads: int, stack: ExitStack) -> None:
    """Set the process-wide thread counts once per table, outside the timed calls: torch's
    intra-op threads, every loaded OpenMP runtime (DeepSpeed's loops) and numba's pool.
    fastadam gets num_threads per call; numpy, thinc and jax are not affected."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    if "numba" in sys.modules:
        sys.modules["numba"].set_num_threads(threads)
    if importlib.util.find_spec("threadpoolctl"):
        from threadpoolctl import threadpool_limits

        stack.enter_context(threadpool_limits(limits=threads, user_api="openmp"))


def cpu_seconds() -> Tuple[float, float]:
    """(CPU seconds used by every process so far, by this one): the machine is shared, and a
    busy neighbour slows two-thread teams by whole scheduler slices, so each table says how
    much CPU other processes took while it was measured. Linux only (NaN elsewhere)."""
    own = os.times()
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return math.nan, own.user + own.system
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return busy, own.user + own.system


def others_share(before: Tuple[float, float], after: Tuple[float, float], wall: float) -> float:
    """Share (0..1) of all CPUs that other processes (and the hypervisor's steal) used."""
    busy, own = after[0] - before[0], after[1] - before[1]
    share = (busy - own) / (wall * (os.cpu_count() or 1))
    return share if math.isnan(share) else max(0.0, share)


def wait_for_quiet(limit_s: float) -> None:
    """Wait, at most limit_s, for a second in which other processes leave the CPUs alone."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        before, start = cpu_seconds(), time.perf_counter()
        time.sleep(1.0)
        if others_share(before, cpu_seconds(), time.perf_counter() - start) <= QUIET:
            return


def measure_quietly(runners: Dict[str, Runner], threads: int, repeats: int,
                    args) -> Tuple[dict, float, int]:
    """fastadam.app.timing.measure, repeated (--retries) while other processes disturbed it: on this
    shared 2-CPU machine one busy neighbour makes a two-thread team wait whole scheduler
    slices (milliseconds). Returns the least disturbed attempt: (times, share, attempts)."""
    best: Optional[Tuple[dict, float]] = None
    attempts = 0
    while attempts <= args.retries:
        attempts += 1
        wait_for_quiet(args.quiet_wait)
        with ExitStack() as stack:
            process_threads(threads, stack)
            before, start = cpu_seconds(), time.perf_counter()
            times = measure(runners, repeats, args.target_ms / 1000)
            others = others_share(before, cpu_seconds(), time.perf_counter() - start)
        if best is None or others < best[1]:
            best = (times, others)
        if others <= QUIET:
            break
    return best[0], best[1], attempts


# --- planning and measuring ---------------------------------------------------------------


def plan_passes(impls: List[Implementation], copy_bytes: int, budget: float,
                with_bounds: bool) -> List[List[Implementation]]:
    """Group implementations into passes whose buffers fit the memory budget. Every pass
    holds the templates and fastadam.Adam (the reference of its ratios); the first pass
    also holds the bounds' buffers."""
    reference, others = impls[0], impls[1:]
    base = (TEMPLATE_COPIES + reference.copies) * copy_bytes
    passes, current = [], [reference]
    used = base + (BOUND_COPIES * copy_bytes if with_bounds else 0)
    for impl in others:
        need = impl.copies * copy_bytes
        if used + need > budget and len(current) > 1:
            passes.append(current)
            current, used = [reference], base
        current.append(impl)
        used += need
    passes.append(current)
    return passes


def run_workload(key: str, args, dtype: np.dtype, impls: List[Implementation],
                 broken: Dict[str, str]) -> List[dict]:
    """All thread counts and passes of one workload; returns one record per timing."""
    label, shapes = WORKLOADS[key]
    elements = sum(math.prod(s) for s in shapes)
    notes = {i.name: i.skip_reason(len(shapes), dtype) for i in impls}
    notes = {name: why for name, why in notes.items() if why}
    impls = [i for i in impls if i.name not in notes and i.name not in broken]
    with_bounds = elements >= LARGE and importlib.util.find_spec("numba") is not None
    passes = plan_passes(impls, elements * dtype.itemsize, args.memory_gb * 1e9, with_bounds)
    repeats = args.big_repeats if elements >= BIG else args.repeats
    params, grads = make_templates(shapes, dtype)
    records = []
    for threads in args.threads:
        for index, members in enumerate(passes):
            runners: Dict[str, Runner] = {}
            for impl in members:
                if impl.name in broken:
                    continue
                try:
                    runners[impl.name] = impl.build(params, grads, threads)
                except Exception as exc:  # a peer that fails to build is skipped from now on
                    broken[impl.name] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    notes[impl.name] = broken[impl.name]
            if with_bounds and index == 0:
                runners.update(build_bounds(elements, dtype))
            times, others, attempts = measure_quietly(runners, threads, repeats, args)
            for name, seconds in times.items():
                step_bytes = (bound_bytes(name, elements, dtype) if name.startswith("bound")
                              else elements * STREAMS * dtype.itemsize)
                records.append(dict(workload=key, label=label, tensors=len(shapes),
                                    elements=elements, threads=threads, memory_pass=index + 1,
                                    implementation=name,
                                    seconds=seconds, gbps=step_bytes / seconds / 1e9,
                                    vs_fastadam=seconds / times[REFERENCE], repeats=repeats,
                                    others_cpu=others, attempts=attempts))
            del runners
            gc.collect()
    del params, grads
    gc.collect()
    print_workload(key, records, notes, len(passes), dtype)
    return records


# --- output ----------------------------------------------------------------------------


def print_workload(key: str, records: List[dict], notes: Dict[str, str], passes: int,
                   dtype: np.dtype) -> None:
    first = records[0]
    bound_name = "bound: 7-stream (numba)"
    for threads in sorted({r["threads"] for r in records}):
        rows = [r for r in records if r["threads"] == threads]
        bound = next((r["gbps"] for r in rows if r["implementation"] == bound_name), None)
        print(f"\n### {first['label']} ({first['tensors']} tensors, {first['elements']:,} elements), "
              f"{dtype.name}, {threads} thread{'s' if threads > 1 else ''}, "
              f"medians of {first['repeats']} repeats\n")
        print("| implementation | ms/step | GB/s | % of 7-stream bound | time vs fastadam.Adam |"
              + (" pass |" if passes > 1 else ""))
        print("|---|---:|---:|---:|---:|" + ("---:|" if passes > 1 else ""))
        for r in rows:
            if r["implementation"] == REFERENCE and r["memory_pass"] > 1:
                continue  # reported below the table
            name = r["implementation"]
            pct = f"{100 * r['gbps'] / bound:.0f}%" if bound and "triad" not in name else ""
            ratio = "" if name.startswith("bound") else f"{r['vs_fastadam']:.2f}x"
            print(f"| {name} | {r['seconds'] * 1e3:.4g} | {r['gbps']:.1f} | {pct} | {ratio} |"
                  + (f" {r['memory_pass']} |" if passes > 1 else ""))
        busy = max(r["others_cpu"] for r in rows)
        attempts = max(r["attempts"] for r in rows)
        print(f"\n(other processes used {100 * busy:.0f}% of the CPUs while this was measured"
              + (f", least disturbed of {attempts} attempts" if attempts > 1 else "")
              + ("; DISTURBED, rerun on a quiet machine)" if busy > QUIET else ")"))
        if passes > 1:
            again = ", ".join(f"pass {r['memory_pass']}: {r['seconds'] * 1e3:.4g} ms" for r in rows
                              if r["implementation"] == REFERENCE and r["memory_pass"] > 1)
            print(f"(memory: {passes} passes, each with fastadam.Adam; its time in {again}. "
                  "Ratios use fastadam.Adam from the same pass.)")
    for name, why in notes.items():
        print(f"- {name} skipped: {why}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"- peak memory of this process so far: {peak:.1f} GB")
    sys.stdout.flush()


def versions() -> Dict[str, str]:
    found = {"python": sys.version.split()[0], "numpy": np.__version__,
             "fastadam": fastadam.__version__}
    for module in ["torch", "thinc", "jax", "jaxlib", "optax", "deepspeed", "numba",
                   "threadpoolctl"]:
        try:
            found[module] = importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def print_header(args, dtype: np.dtype, impls: List[Implementation],
                 missing: List[Implementation]) -> None:
    config = fastadam.show_config("dicts")
    print(f"# fastadam vs peer CPU Adams ({dtype.name})\n")
    simd = config["simd"]
    print(f"{cpu_model()}, {os.cpu_count()} CPUs; fastadam kernels {simd['small_tensors']} for tensors "
          f"<= {simd['small_tensor_elements']} elements, else {simd['large_tensors']}; "
          + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"Interleaved medians ({args.repeats} repeats, {args.big_repeats} for >= 2^26 elements; "
          f"samples of >= {args.target_ms:g} ms). GB/s: {STREAMS * dtype.itemsize} bytes per element "
          "(Adam reads p, g, m, v and writes p, m, v). 'time vs fastadam.Adam' > 1 means fastadam "
          "is faster. Bounds (workloads >= 2^20): numba kernels in the same run, 7-stream = one "
          f"pass reading 4 and writing 3 arrays, triad = a = b + s*c ({3 * dtype.itemsize} "
          "bytes/element). Tables measured while other processes used > 5% of the CPUs are "
          f"measured again (up to {args.retries} times).\n")
    print("Threads (T = the table's thread count):")
    for impl in impls:
        print(f"- {impl.name}: {impl.threads}")
    if importlib.util.find_spec("numba"):
        print("- bounds: numba.set_num_threads(T)")
    else:
        print("- bounds: skipped (numba not installed)")
    for impl in missing:
        print(f"- {impl.name}: skipped, {impl.module} not installed")
    sys.stdout.flush()


def speedup_vs_fused(rows: List[dict], workload: str, name: str) -> float:
    """time(torch fused=True) / time(name) for one workload and thread count, 0 if either is
    missing. The two may come from different passes; each is timed against fastadam.Adam
    of its own pass, so the ratio of those two ratios compares them."""
    def vs_fastadam(impl: str) -> Optional[float]:
        return next((r["vs_fastadam"] for r in rows
                     if r["workload"] == workload and r["implementation"] == impl), None)

    fused, mine = vs_fastadam(FUSED), vs_fastadam(name)
    return fused / mine if fused and mine else 0.0


def save_plot(records: List[dict], path: str) -> None:
    """Grouped bars: each implementation's speed-up over torch fused=True per workload (log
    scale), one panel per thread count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    thread_counts = sorted({r["threads"] for r in records})
    names = [n for n in dict.fromkeys(r["implementation"] for r in records)
             if not n.startswith("bound") and n != FUSED]
    fig, axes = plt.subplots(len(thread_counts), 1, figsize=(13, 4.5 * len(thread_counts)),
                             squeeze=False)
    width = 0.8 / max(1, len(names))
    for ax, threads in zip(axes[:, 0], thread_counts):
        rows = [r for r in records if r["threads"] == threads]
        workloads = [w for w in dict.fromkeys(r["workload"] for r in rows)
                     if any(r["workload"] == w and r["implementation"] == FUSED for r in rows)]
        for i, name in enumerate(names):
            offsets = [x + (i - (len(names) - 1) / 2) * width for x in range(len(workloads))]
            ax.bar(offsets, [speedup_vs_fused(rows, w, name) for w in workloads], width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if str(y)[0] in "25"
                                                   else ""))
        ax.set_xticks(range(len(workloads)), [WORKLOADS[w][0] for w in workloads], fontsize=8)
        ax.set_ylabel("speed-up vs torch fused=True")
        ax.set_title(f"{threads} thread{'s' if threads > 1 else ''}: higher is faster, 1 = torch fused")
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot saved to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=None)
    parser.add_argument("--quick", action="store_true",
                        help=f"only {', '.join(QUICK_WORKLOADS)}, 5 repeats")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--big-repeats", type=int, default=5,
                        help="repeats for workloads >= 2^26 elements")
    parser.add_argument("--target-ms", type=float, default=20.0, help="shortest length of one sample")
    parser.add_argument("--memory-gb", type=float, default=14.0,
                        help="buffers of one pass (estimated) stay under this; more passes otherwise")
    parser.add_argument("--retries", type=int, default=2,
                        help=f"measure a table again while other processes used > {QUIET * 100:.0f}%% of the CPUs")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="seconds to wait for quiet CPUs before each attempt")
    parser.add_argument("--json", help="save every timing here")
    parser.add_argument("--plot", help="save a bar chart of speed-ups vs torch fused here (matplotlib)")
    args = parser.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 5)
    keys = args.workloads or (QUICK_WORKLOADS if args.quick else list(WORKLOADS))
    dtype = np.dtype(args.dtype)

    impls = [i for i in IMPLEMENTATIONS if importlib.util.find_spec(i.module) is not None]
    missing = [i for i in IMPLEMENTATIONS if i not in impls]
    print_header(args, dtype, impls, missing)
    broken: Dict[str, str] = {}
    records: List[dict] = []
    for key in keys:
        records += run_workload(key, args, dtype, impls, broken)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": dtype.name, "args": vars(args), "versions": versions(),
                       "cpu": cpu_model(), "fastadam_config": fastadam.show_config("dicts"),
                       "skipped": broken, "not_installed": [i.name for i in missing], "records": records}, f, indent=1)
        print(f"\nraw numbers saved to {args.json}")
    if args.plot:
        save_plot(records, args.plot)


if __name__ == "__main__":
    main()
