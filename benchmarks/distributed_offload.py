#!/usr/bin/env python3
"""The optimizer step of a GPT-2-small-shaped model on 2 ranks, under FSDP2 and under
DeepSpeed ZeRO-Offload: fastadam against torch's AdamW and DeepSpeedCPUAdam (issue 21).

FSDP2: ``fully_shard`` on a CPU device mesh with gloo (what a rank's optimizer sees under
``CPUOffloadPolicy`` too: CPU shards of ``DTensor``s). fastadam.torch.AdamW, and
torch.optim.AdamW's default path (on CPU tensors: its for-loop), ``foreach=True`` and
``fused=True``, each with its own state, step the same parameters with the same gradients.

DeepSpeed: ZeRO stage 2 with ``offload_optimizer: cpu`` (docs/guide/deepspeed.md's
configuration), fastadam.torch.AdamW as the client optimizer; inside the engine's step,
fastadam, DeepSpeedCPUAdam and torch's fused AdamW, each with its own state, step the
rank's flat fp32 partition with its gradient (DeepSpeed's own, in DeepSpeed's own buffers).

The model is GPT-2 small's 148 tensors (124,439,808 elements; benchmarks/peers.py),
fp32, with a sum-of-squares loss: one forward and backward give every rank its shards'
gradients; only optimizer steps are timed. Each repeat steps every optimizer once, in an
order rotated per repeat (interleaved), every rank starting each step together after a
barrier. Reported per rank: the median step time and the rate at 28 bytes per fp32
element (parameter, gradient and two moments read, three written), and, with numba
installed, the share of the memory bound: benchmarks/peers.py's 7-stream kernel over as
many elements, timed in the same interleaved loop on every rank at once.
The ranks are started by torchrun with ``--threads`` OpenMP and torch threads each
(default ``fastadam.threads_per_rank(ranks)``).

    python benchmarks/distributed_offload.py                 # GPT-2 small, 2 ranks
    python benchmarks/distributed_offload.py --quick         # GPT-2 tiny (0.48M elements), seconds
    python benchmarks/distributed_offload.py --engines fsdp2 --ranks 2 --repeats 20 --json out.json

DeepSpeed: ``DS_ACCELERATOR=cpu DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed``
(without it, the DeepSpeed part is skipped); DeepSpeedCPUAdam compiles its op on first use.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

BYTES_PER_ELEMENT = 28  # fp32 Adam: 4 streams read (p, g, m, v), 3 written (p, m, v)
ENGINES = ("fsdp2", "deepspeed")
BOUND = "bound: 7-stream (numba)"


def shapes(quick):
    from peers import gpt2_small_shapes
    from torch_adapter import gpt2_tiny_shapes

    return gpt2_tiny_shapes() if quick else gpt2_small_shapes()


def model(quick):
    """GPT-2's parameter shapes in blocks (the embeddings, each layer, the final norm) whose
    forward is half the sum of their squares: the gradient of a parameter is itself."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self, block_shapes):
            super().__init__()
            self.params = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s) * 0.02)
                                                 for s in block_shapes)

        def forward(self):
            return sum(0.5 * p.square().sum() for p in self.params)

    class Shapes(torch.nn.Module):
        def __init__(self, all_shapes):
            super().__init__()
            cuts = [0, 2] + list(range(14, len(all_shapes) - 1, 12)) + [len(all_shapes)]
            self.blocks = torch.nn.ModuleList(Block(all_shapes[a:b]) for a, b in zip(cuts, cuts[1:]))

        def forward(self, x=None):  # DeepSpeed's engine passes its inputs on
            return sum(block() for block in self.blocks)

    torch.manual_seed(0)  # the same model on every rank
    return Shapes(shapes(quick))


def memory_bound(elements, threads):
    """benchmarks/peers.py's 7-stream kernel (numba: one pass reading 4 arrays and writing
    3, as Adam's) over the rank's element count, run beside the optimizers: the memory
    bound as both ranks' traffic meets it. Nothing without numba."""
    if importlib.util.find_spec("numba") is None:
        return {}
    import numba
    import numpy as np
    from peers import build_bounds

    numba.set_num_threads(threads)
    return {BOUND: build_bounds(elements, np.dtype(np.float32))[BOUND]}


def rotated(names, repeat):
    k = repeat % len(names)
    return names[k:] + names[:k]


def time_steps(steps, repeats, warmup):
    """Each rank's seconds of every step of each optimizer, interleaved, after a barrier."""
    import torch.distributed as dist

    names = list(steps)
    samples = {name: [] for name in names}
    for repeat in range(warmup + repeats):
        for name in rotated(names, repeat):
            dist.barrier()  # every rank starts together: no rank's wait is counted
            began = time.perf_counter()
            steps[name]()
            seconds = time.perf_counter() - began
            if repeat >= warmup:
                samples[name].append(seconds)
    return samples


def fsdp2(args):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import fastadam.torch

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    net = model(args.quick)
    for block in net.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)
    net().backward()  # each rank its gradient shards, kept for every step
    params = list(net.parameters())
    optimizers = {
        "fastadam.torch.AdamW": fastadam.torch.AdamW(params, num_threads=args.threads),
        "torch AdamW (default: for-loop)": torch.optim.AdamW(params),
        "torch AdamW foreach": torch.optim.AdamW(params, foreach=True),
        "torch AdamW fused": torch.optim.AdamW(params, fused=True),
    }
    elements = sum(p.to_local().numel() for p in params)
    runners = {**{name: opt.step for name, opt in optimizers.items()}, **memory_bound(elements, args.threads)}
    samples = time_steps(runners, args.repeats, args.warmup)
    return samples, elements, sum(p.numel() for p in params)


def deepspeed(args):
    import deepspeed as ds
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    import fastadam.torch

    net = model(args.quick)
    total = sum(p.numel() for p in net.parameters())
    client = fastadam.torch.AdamW(net.parameters(), num_threads=args.threads)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    engine, _, _, _ = ds.initialize(model=net, optimizer=client, config=config)
    client_step, measured = client.step, {}

    def step(*a, **kw):  # the engine's call of the client optimizer: time all three there
        if not measured:
            partition = [p for group in client.param_groups for p in group["params"]]
            others = {"DeepSpeedCPUAdam": DeepSpeedCPUAdam(partition, weight_decay=0.01, adamw_mode=True),
                      "torch AdamW fused": torch.optim.AdamW(partition, fused=True)}
            measured["elements"] = sum(p.numel() for p in partition)
            runners = {"fastadam.torch.AdamW": lambda: client_step(*a, **kw),
                       **{name: opt.step for name, opt in others.items()},
                       **memory_bound(measured["elements"], args.threads)}
            measured["samples"] = time_steps(runners, args.repeats, args.warmup)
        return client_step(*a, **kw)

    client.step = step
    loss = engine(torch.zeros(1))
    engine.backward(loss)
    engine.step()  # DeepSpeed reduces the gradients into its partitions, then steps
    return measured["samples"], measured["elements"], total


def worker(args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    samples, elements, total = {"fsdp2": fsdp2, "deepspeed": deepspeed}[args.worker](args)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"medians": medians, "elements": elements})
    if dist.get_rank() == 0:
        print(json.dumps({"engine": args.worker, "total": total, "ranks": gathered}), flush=True)
    dist.destroy_process_group()
    # The report is out: leave without the interpreter's finalization, in which gloo's
    # threads sometimes abort ("terminate called without an active exception", SIGABRT;
    # tests/fsdp2_worker.py does the same).
    sys.stdout.flush()
    os._exit(0)


def launch(engine, args):
    """Runs ``engine``'s worker on ``args.ranks`` ranks under torchrun; its JSON report."""
    import fastadam

    source = os.path.dirname(os.path.dirname(os.path.abspath(fastadam.__file__)))
    here = os.path.dirname(os.path.abspath(__file__))
    # numba's pool has as many threads as NUMBA_NUM_THREADS says, whatever set_num_threads
    # uses: its idle threads, one per core and rank, stalled torch's steps up to 300x here.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "NUMBA_NUM_THREADS": str(args.threads),
           "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([source, here, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(args.ranks), os.path.abspath(__file__), "--worker", engine,
               "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--warmup", str(args.warmup)] + (["--quick"] if args.quick else [])
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    reports = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not reports:
        raise SystemExit(f"{engine} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(reports[-1])


def table(report):
    ranks = report["ranks"]
    names = list(ranks[0]["medians"])
    ours = max(rank["medians"][names[0]] for rank in ranks)
    head = " | ".join(f"rank {r} ms" for r in range(len(ranks)))
    bound = max(rank["medians"][BOUND] for rank in ranks) if BOUND in names else None
    lines = [f"| optimizer | {head} | GB/s (slowest rank) | % of the bound | "
             "slowest rank's time / fastadam's |", "|---" * (len(ranks) + 4) + "|"]
    for name in names:
        times = [rank["medians"][name] for rank in ranks]
        slowest = max(range(len(ranks)), key=lambda r: times[r])
        rate = BYTES_PER_ELEMENT * ranks[slowest]["elements"] / times[slowest] / 1e9
        cells = " | ".join(f"{t * 1e3:.2f}" for t in times)
        share = f"{100 * bound / times[slowest]:.0f}%" if bound else "-"
        lines.append(f"| {name} | {cells} | {rate:.2f} | {share} | {times[slowest] / ours:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPT-2 tiny (0.48M elements), 5 repeats")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 15, --quick 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the state is allocated)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per rank (default: fastadam.threads_per_rank(ranks))")
    parser.add_argument("--json", help="write the reports to this file")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 5 if args.quick else 15
    if args.worker:
        return worker(args)
    import fastadam

    args.threads = args.threads or fastadam.threads_per_rank(args.ranks)
    reports = []
    for engine in args.engines:
        if engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            print("DeepSpeed: skipped, not installed (DS_ACCELERATOR=cpu DS_BUILD_OPS=0 pip install "
                  "--no-build-isolation deepspeed)\n")
            continue
        report = launch(engine, args)
        reports.append(report)
        mine = report["ranks"][0]["elements"]
        title = {"fsdp2": "FSDP2, CPU device mesh, gloo",
                 "deepspeed": "DeepSpeed ZeRO-Offload stage 2 (offload_optimizer: cpu), CPU accelerator"}
        print(f"{title[engine]}: {args.ranks} ranks, {args.threads} thread(s) each, "
              f"{'GPT-2 tiny' if args.quick else 'GPT-2 small'} ({report['total']:,} fp32 elements, "
              f"{mine:,} on rank 0); median of {args.repeats} interleaved steps per rank, "
              f"GB/s at {BYTES_PER_ELEMENT} B/element\n")
        print(table(report) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)


if __name__ == "__main__":
    main()
