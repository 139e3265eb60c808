#!/usr/bin/env python3
"""Train a GPT-2-shaped model under DeepSpeed ZeRO-Offload with fastadam.torch.AdamW as its
CPU optimizer.

    DS_ACCELERATOR=cpu DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed   # no CUDA
    python examples/deepspeed_offload.py --quick                        # one process, seconds
    torchrun --nproc-per-node 2 examples/deepspeed_offload.py --quick   # two ranks
    deepspeed examples/deepspeed_offload.py --stage 3                   # GPT-2 small's shapes

ZeRO (stage 1, 2 or 3, ``--stage``) partitions the optimizer state among the ranks, and
``"offload_optimizer": {"device": "cpu"}`` keeps each rank's partition, its fp32 master
weights and their gradients in CPU memory, where the client optimizer steps them: here
fastadam, allowed by the two keys of docs/guide/deepspeed.md's configuration. Without a
GPU, DeepSpeed runs on its CPU accelerator (gloo), and the optimizer sees what it sees
under offload: CPU partitions. Each rank prints its median optimizer step time and the
step's memory traffic in GB/s (28 bytes per fp32 element: it reads the parameter,
gradient and two moments, and writes the parameter and the moments).
``--optimizer deepspeed-cpu-adam`` runs DeepSpeed's own DeepSpeedCPUAdam instead (it
compiles its C++ op on first use), ``torch-fused`` torch's fused AdamW.

Threads: each rank's step runs on ``--threads`` threads, by default
``fastadam.threads_per_rank()``, its share of the host's CPUs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

from _requirements import require

torch = require("torch")
if not torch.cuda.is_available():  # DeepSpeed picks its accelerator when it is imported
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's use of torch's APIs
deepspeed = require("deepspeed")
from _gpt import GPT, SHAPES, batch, next_token_loss  # noqa: E402

import fastadam.torch  # noqa: E402


def deepspeed_cpu_adam(params, lr, threads):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=lr, weight_decay=0.01, adamw_mode=True)  # AdamW's


OPTIMIZERS = {
    "fastadam": lambda params, lr, threads: fastadam.torch.AdamW(params, lr=lr, num_threads=threads),
    "deepspeed-cpu-adam": deepspeed_cpu_adam,
    "torch-fused": lambda params, lr, threads: torch.optim.AdamW(params, lr=lr, fused=True),
}


def config(args: argparse.Namespace) -> dict:
    """docs/guide/deepspeed.md's configuration."""
    return {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": args.bf16},
        "zero_optimization": {"stage": args.stage, "offload_optimizer": {"device": "cpu"}},
        "zero_allow_untested_optimizer": True,  # a client optimizer, not one DeepSpeed knows
        "zero_force_ds_cpu_optimizer": False,   # ... under offload: not only DeepSpeedCPUAdam
    }


class StepTimer:
    """Wraps the client optimizer's ``step`` (DeepSpeed calls it once per engine step, or
    once per sub-group under ZeRO-3), adding up the seconds and the elements it steps."""

    def __init__(self, optimizer):
        self.optimizer, self.step_of = optimizer, optimizer.step
        self.seconds = self.elements = 0
        optimizer.step = self

    def __call__(self, *args, **kwargs):
        elements = sum(p.numel() for group in self.optimizer.param_groups for p in group["params"])
        began = time.perf_counter()
        result = self.step_of(*args, **kwargs)
        self.seconds += time.perf_counter() - began
        self.elements += elements
        return result

    def take(self) -> tuple:
        """(seconds, elements) since the last call."""
        taken, self.seconds, self.elements = (self.seconds, self.elements), 0, 0
        return taken


def model_elements(model: torch.nn.Module) -> int:
    """The model's elements (ZeRO-3 partitions the parameters: ``ds_numel`` is the whole's)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and 8 steps (for CI)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 8, 20)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank and step")
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), default=2, help="ZeRO stage")
    parser.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 master weights")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="fastadam")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per rank (default: fastadam.threads_per_rank())")
    args = parser.parse_args()
    steps = args.steps or (8 if args.quick else 20)
    if "RANK" not in os.environ:  # not started by a launcher: one process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    threads = args.threads or fastadam.threads_per_rank()
    torch.set_num_threads(threads)

    layers, width, heads, vocabulary, sequence = SHAPES["quick" if args.quick else "gpt2"]
    torch.manual_seed(0)  # the same initial model on every rank
    model = GPT(layers, width, heads, vocabulary, sequence)
    optimizer = OPTIMIZERS[args.optimizer](model.parameters(), args.lr, threads)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config(args))
    timer = StepTimer(optimizer)  # the client optimizer, now over DeepSpeed's fp32 partitions
    rank = torch.distributed.get_rank()

    generator = torch.Generator().manual_seed(rank)  # each rank its own data
    losses, seconds, elements = [], [], 0
    for _ in range(steps):
        tokens = batch(generator, args.batch, vocabulary, sequence).to(engine.device)
        loss = next_token_loss(engine(tokens[:, :-1]), tokens)
        engine.backward(loss)
        engine.step()  # clips the gradients, then the client optimizer steps
        step_seconds, elements = timer.take()
        seconds.append(step_seconds)
        losses.append(loss.item())

    step = statistics.median(seconds[1:] or seconds)  # the first step allocates the state
    sys.stdout.write(  # one write per rank: the ranks' lines never interleave
        f"rank {rank}: {args.optimizer}, ZeRO stage {args.stage}{' bf16' if args.bf16 else ''}, "
        f"{threads} thread(s), {elements:,} elements of {model_elements(model):,}; "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
        f"optimizer step {step * 1e3:.2f} ms median, {28 * elements / step / 1e9:.1f} GB/s\n")
    sys.stdout.flush()
    torch.distributed.destroy_process_group()
    # Done: leave without the interpreter's finalization, in which gloo's threads sometimes
    # abort ("terminate called without an active exception", SIGABRT, exit -6 after the
    # report; benchmarks/distributed_offload.py and tests/fsdp2_worker.py do the same).
    os._exit(0)


if __name__ == "__main__":
    main()
