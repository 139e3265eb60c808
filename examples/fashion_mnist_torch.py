#!/usr/bin/env python3
"""Train a small CNN on Fashion-MNIST with fastadam.torch.Adam (and compare optimizers).

    pip install ".[torch,examples]"                # fastadam, torch, tqdm
    python examples/fashion_mnist_torch.py         # fastadam.torch.Adam, 5 epochs, ~91% test accuracy
    python examples/fashion_mnist_torch.py --optimizer all   # also torch.optim.Adam (foreach, fused)
    python examples/fashion_mnist_torch.py --precision all --optimizer fastadam torch-fused

Data: Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), --data-dir,
or --download (needs the network). The optimizer swap is one line: ``fastadam.torch.Adam``
for ``torch.optim.Adam``; the script times every ``optimizer.step()`` call.

--precision trains the same CNN, from the same initial weights and batches, in float32
("fp32") or as a bfloat16 model (inputs in bfloat16 too): "bf16-master" keeps float32
master weights and moments in the optimizer (fastadam.torch.Adam(master_weights=True)),
"bf16" keeps everything in bfloat16 rounded to nearest even, as torch's fused Adam does,
and "bf16-sr" rounds the bfloat16 params stochastically (seeded with --seed).
"fp32-bf16-moments" keeps bfloat16 moments beside the float32 model (DeepSpeed's
fp32_optimizer_states=False): fastadam.torch.Adam(state_dtype=torch.bfloat16); torch's
optimizers emulate it, their exp_avg and exp_avg_sq rounded to bfloat16 after every step
(each step then reads bfloat16 moments and computes in float32, as fastadam's does).
torch.optim.Adam runs fp32, bf16 and fp32-bf16-moments only. When fastadam and torch-fused both train one precision, the
script says whether their final weights are bit-identical (bf16: they are; fp32: only
under ATEN_CPU_CAPABILITY=default, whose kernel has no FMA).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Tuple

import numpy as np

from _requirements import require

torch = require("torch")
from torch import nn  # noqa: E402

import fastadam.torch  # noqa: E402
from fastadam.datasets import load_fashion_mnist  # noqa: E402

OPTIMIZERS = {
    "fastadam": lambda params, lr, **options: fastadam.torch.Adam(params, lr=lr, **options),
    "torch": lambda params, lr: torch.optim.Adam(params, lr=lr),  # foreach
    "torch-fused": lambda params, lr: torch.optim.Adam(params, lr=lr, fused=True),
}


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype                 # of the model, its inputs and (without master) its state
    master_weights: bool = False       # float32 master and moments in the optimizer
    stochastic_rounding: bool = False  # of the bfloat16 params
    bf16_moments: bool = False         # bfloat16 moments (torch's optimizers: emulated)

    def options(self, seed: int) -> Dict[str, object]:
        """fastadam.torch.Adam's keyword arguments for this precision."""
        if self.stochastic_rounding:
            return {"stochastic_rounding": True, "seed": seed}
        if self.bf16_moments:
            return {"state_dtype": torch.bfloat16}
        return {"master_weights": True} if self.master_weights else {}


PRECISIONS = {
    "fp32": Precision(torch.float32),
    "bf16-master": Precision(torch.bfloat16, master_weights=True),
    "bf16": Precision(torch.bfloat16),
    "bf16-sr": Precision(torch.bfloat16, stochastic_rounding=True),
    "fp32-bf16-moments": Precision(torch.float32, bf16_moments=True),
}


def round_moments_to_bfloat16(optimizer) -> None:
    """torch's emulation of "fp32-bf16-moments": every moment rounded to bfloat16 (to
    nearest even) in place, in the optimizer's own state, after the step that wrote it."""
    with torch.no_grad():
        for state in optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                state[key].copy_(state[key].to(torch.bfloat16))


def make_optimizer(name: str, precision: str, params, lr: float, seed: int):
    options = PRECISIONS[precision].options(seed) if name == "fastadam" else {}
    return OPTIMIZERS[name](params, lr, **options) if options else OPTIMIZERS[name](params, lr)


def runs(optimizers: List[str], precisions: List[str]) -> Tuple[List[Tuple[str, str]], List[str]]:
    """The (optimizer, precision) pairs to train, and notes on the pairs left out:
    torch.optim.Adam has neither master weights nor stochastic rounding."""
    pairs, notes = [], []
    for precision in precisions:
        for name in optimizers:
            if (name == "fastadam" or not PRECISIONS[precision].options(0)
                    or PRECISIONS[precision].bf16_moments):  # (emulated by torch's)
                pairs.append((name, precision))
            else:
                notes.append(f"{name} does not run {precision} (fastadam only)")
    return pairs, notes


def progress(iterable: Iterable, **kwargs) -> Iterable:
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is optional
        return iterable
    return tqdm(iterable, **kwargs)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),     # 32 x 14 x 14
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 64 x 7 x 7
        nn.Flatten(), nn.Dropout(0.25),
        nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.25),
        nn.Linear(128, 10),
    )


def as_tensors(images: np.ndarray, labels: np.ndarray):
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - 0.2860) / 0.3530  # Fashion-MNIST's mean and standard deviation
    return x, torch.from_numpy(labels.astype(np.int64))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
                      for i in range(0, len(x), batch))
    model.train()
    return correct / len(x)


def train(name: str, precision: str, data, epochs: int, batch_size: int, lr: float,
          seed: int) -> Dict[str, object]:
    dtype = PRECISIONS[precision].dtype
    (x_train, y_train), (x_test, y_test) = data
    x_train, x_test = x_train.to(dtype), x_test.to(dtype)
    torch.manual_seed(seed)
    model = make_model().to(dtype)  # initialised in float32: the same start at every precision
    optimizer = make_optimizer(name, precision, model.parameters(), lr, seed)
    if precision != "fp32":
        name = f"{name} {precision}"
    step_seconds, steps = 0.0, 0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x_train))
        batches = range(0, len(x_train), batch_size)
        for i in progress(batches, desc=f"{name} epoch {epoch}/{epochs}", unit="batch", leave=False):
            idx = order[i:i + batch_size]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            t0 = time.perf_counter()
            optimizer.step()
            step_seconds += time.perf_counter() - t0
            steps += 1
            if PRECISIONS[precision].bf16_moments and name.split()[0] != "fastadam":
                round_moments_to_bfloat16(optimizer)  # (not timed: an emulation)
        print(f"{name}: epoch {epoch}: test accuracy {accuracy(model, x_test, y_test):.4f}")
    return {"accuracy": accuracy(model, x_test, y_test), "step_ms": 1e3 * step_seconds / steps,
            "total_s": time.perf_counter() - start,
            "weights": [p.detach().clone() for p in model.parameters()]}


def compare_weights(results: Dict[Tuple[str, str], Dict[str, object]]) -> None:
    """Say, per precision trained by both, whether fastadam's final weights are torch
    fused's bit for bit."""
    for (name, precision), result in results.items():
        control = results.get(("torch-fused", precision))
        if name != "fastadam" or control is None:
            continue
        ours, theirs = result["weights"], control["weights"]
        if all(torch.equal(a, b) for a, b in zip(ours, theirs)):
            print(f"{precision}: fastadam's final weights are torch-fused's, bit for bit")
        else:
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(ours, theirs))
            print(f"{precision}: fastadam's final weights differ from torch-fused's "
                  f"(max |difference| {diff:.3g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", nargs="+", choices=[*OPTIMIZERS, "all"], default=["fastadam"])
    parser.add_argument("--precision", nargs="+", choices=[*PRECISIONS, "all"], default=["fp32"],
                        help="fp32, or a bfloat16 model with float32 master weights, in pure "
                             "bfloat16, or in pure bfloat16 with stochastic rounding; or fp32 "
                             "with bfloat16 moments (emulated, to measure its accuracy)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files")
    parser.add_argument("--download", action="store_true", help="fetch missing files into --data-dir")
    parser.add_argument("--limit", type=int, help="use only the first N training images (quick runs)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    train_images, train_labels = load_fashion_mnist("train", args.data_dir, args.download)
    test_images, test_labels = load_fashion_mnist("test", args.data_dir)
    if args.limit:
        train_images, train_labels = train_images[:args.limit], train_labels[:args.limit]
    data = (as_tensors(train_images, train_labels), as_tensors(test_images, test_labels))
    print(f"{len(train_images)} training and {len(test_images)} test images; "
          f"{sum(p.numel() for p in make_model().parameters())} parameters")

    names = list(OPTIMIZERS) if "all" in args.optimizer else list(dict.fromkeys(args.optimizer))
    precisions = (list(PRECISIONS) if "all" in args.precision
                  else list(dict.fromkeys(args.precision)))
    pairs, notes = runs(names, precisions)
    for note in notes:
        print(note)
    results = {(name, precision): train(name, precision, data, args.epochs, args.batch_size,
                                        args.lr, args.seed)
               for name, precision in pairs}
    print("\n| optimizer | precision | test accuracy | optimizer.step() ms | training s |")
    print("|---|---|---:|---:|---:|")
    for (name, precision), r in results.items():
        print(f"| {name} | {precision} | {r['accuracy']:.4f} | {r['step_ms']:.3f} | "
              f"{r['total_s']:.1f} |")
    compare_weights(results)


if __name__ == "__main__":
    main()
