#!/usr/bin/env python3
"""Train a small CNN on Fashion-MNIST with fastadam.torch.Adam (and compare optimizers).

    pip install ".[torch,examples]"                # fastadam, torch, tqdm
    python examples/fashion_mnist_torch.py         # fastadam.torch.Adam, 5 epochs, ~91% test accuracy
    python examples/fashion_mnist_torch.py --optimizer all   # also torch.optim.Adam (foreach, fused)

Data: Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), --data-dir,
or --download (needs the network). The optimizer swap is one line: ``fastadam.torch.Adam``
for ``torch.optim.Adam``; the script times every ``optimizer.step()`` call.
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, Iterable

import numpy as np

from _requirements import require

torch = require("torch")
from torch import nn  # noqa: E402

import fastadam.torch  # noqa: E402
from fastadam.datasets import load_fashion_mnist  # noqa: E402

OPTIMIZERS = {
    "fastadam": lambda params, lr: fastadam.torch.Adam(params, lr=lr),
    "torch": lambda params, lr: torch.optim.Adam(params, lr=lr),  # foreach
    "torch-fused": lambda params, lr: torch.optim.Adam(params, lr=lr, fused=True),
}


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


def train(name: str, data, epochs: int, batch_size: int, lr: float, seed: int) -> Dict[str, float]:
    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(seed)
    model = make_model()
    optimizer = OPTIMIZERS[name](model.parameters(), lr)
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
        print(f"{name}: epoch {epoch}: test accuracy {accuracy(model, x_test, y_test):.4f}")
    return {"accuracy": accuracy(model, x_test, y_test), "step_ms": 1e3 * step_seconds / steps,
            "total_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=[*OPTIMIZERS, "all"], default="fastadam")
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

    names = list(OPTIMIZERS) if args.optimizer == "all" else [args.optimizer]
    results = {name: train(name, data, args.epochs, args.batch_size, args.lr, args.seed) for name in names}
    print("\n| optimizer | test accuracy | optimizer.step() ms | training s |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['accuracy']:.4f} | {r['step_ms']:.3f} | {r['total_s']:.1f} |")


if __name__ == "__main__":
    main()
