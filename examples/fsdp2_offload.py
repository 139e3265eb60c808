#!/usr/bin/env python3
"""Train a GPT-2-shaped model under FSDP2 with fastadam.torch.AdamW as its optimizer.

    pip install ".[torch]"
    torchrun --nproc-per-node 2 examples/fsdp2_offload.py --quick   # a tiny model, seconds
    torchrun --nproc-per-node 2 examples/fsdp2_offload.py           # GPT-2 small's shapes
    python examples/fsdp2_offload.py --quick                        # one process

With a GPU, the model runs on it and FSDP2's ``CPUOffloadPolicy`` keeps the sharded
parameters, their gradients and the optimizer state in CPU memory, so the optimizer step
is the CPU's (this path is written as docs/guide/fsdp2.md describes, and untested: the
tests run without an accelerator). Without one, the device mesh is a CPU one with gloo,
and the optimizer sees the same thing: CPU shards. Each rank prints its median optimizer
step time and the step's memory traffic in GB/s (it reads the parameter, gradient and two
moments, and writes the parameter and the moments: 28 bytes per float32 element).
``--optimizer torch-fused`` or ``torch`` run torch's AdamW on the same shards instead.

Threads: ranks on one host share its cores, and torchrun sets OMP_NUM_THREADS=1. The
script gives each rank its share of the CPUs it may run on (``--threads``, by default
``fastadam.threads_per_rank()``: the host's CPUs divided among its ranks).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from _requirements import require

torch = require("torch")
import torch.distributed as dist  # noqa: E402
from _gpt import GPT, SHAPES, batch, next_token_loss  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard  # noqa: E402

import fastadam.torch  # noqa: E402

OPTIMIZERS = {
    "fastadam": lambda params, lr, threads: fastadam.torch.AdamW(params, lr=lr, num_threads=threads),
    "torch-fused": lambda params, lr, threads: torch.optim.AdamW(params, lr=lr, fused=True),
    "torch": lambda params, lr, threads: torch.optim.AdamW(params, lr=lr),  # foreach
}


def setup() -> tuple:
    """The process group and the device mesh: the GPU's, with CPU offload, or the CPU's."""
    if "RANK" not in os.environ:  # not started by torchrun: one process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("cpu:gloo,cuda:nccl")
        return init_device_mesh("cuda", (dist.get_world_size(),)), "cuda", CPUOffloadPolicy()
    dist.init_process_group("gloo")
    return init_device_mesh("cpu", (dist.get_world_size(),)), "cpu", None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and 8 steps (for CI)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 8, 20)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank and step")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="fastadam")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per rank (default: fastadam.threads_per_rank())")
    args = parser.parse_args()
    steps = args.steps or (8 if args.quick else 20)
    threads = args.threads or fastadam.threads_per_rank()
    torch.set_num_threads(threads)

    mesh, device, offload = setup()
    rank = dist.get_rank()
    layers, width, heads, vocabulary, sequence = SHAPES["quick" if args.quick else "gpt2"]
    torch.manual_seed(0)  # the same initial model on every rank
    model = GPT(layers, width, heads, vocabulary, sequence).to(device)
    shard = {"mesh": mesh} if offload is None else {"mesh": mesh, "offload_policy": offload}
    for block in model.blocks:
        fully_shard(block, **shard)
    fully_shard(model, **shard)
    params = list(model.parameters())
    opt = OPTIMIZERS[args.optimizer](params, args.lr, threads)

    generator = torch.Generator().manual_seed(rank)  # each rank its own data
    losses, seconds = [], []
    for _ in range(steps):
        tokens = batch(generator, args.batch, vocabulary, sequence).to(device)
        loss = next_token_loss(model(tokens[:, :-1]), tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        began = time.perf_counter()
        opt.step()
        seconds.append(time.perf_counter() - began)
        opt.zero_grad()
        losses.append(loss.item())

    elements = sum(p.to_local().numel() for p in params)  # this rank's shards
    step = statistics.median(seconds[1:] or seconds)  # the first step allocates the state
    sys.stdout.write(  # one write per rank: the ranks' lines never interleave
        f"rank {rank}: {args.optimizer}, {threads} thread(s), {elements:,} elements of "
        f"{sum(p.numel() for p in params):,}; loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
        f"optimizer step {step * 1e3:.2f} ms median, {28 * elements / step / 1e9:.1f} GB/s\n")
    sys.stdout.flush()
    dist.destroy_process_group()
    # Done: leave without the interpreter's finalization, in which gloo's threads sometimes
    # abort ("terminate called without an active exception", SIGABRT after the report).
    os._exit(0)


if __name__ == "__main__":
    main()
