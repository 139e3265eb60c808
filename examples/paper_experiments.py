#!/usr/bin/env python3
"""The Adam paper's section 6 experiments, on Fashion-MNIST instead of MNIST.

Kingma & Ba (ICLR 2015), section 6.1 (figure 1): multinomial logistic regression,
minibatch 128, step size decayed as alpha/sqrt(t); section 6.2 (figure 2): a multilayer
network with two hidden layers of 1000 ReLUs and dropout. Adam is fastadam
(``fastadam.torch.Adam``); AdaGrad, SGD with Nesterov momentum and RMSProp are torch.optim's.
Training cost (the mean minibatch loss of each epoch) is drawn against epochs.

    pip install ".[torch,examples]"
    python examples/paper_experiments.py     # ./paper_logreg.png, ./paper_mlp.png
    python examples/paper_experiments.py --out-dir docs/images    # the docs' pictures
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

from _requirements import require

torch = require("torch")
from torch import nn  # noqa: E402

import fastadam.torch  # noqa: E402
from fastadam.app.demo import load_data, synthetic_data  # noqa: E402

# Step sizes, picked the way the paper did (a small search per method); alpha for the
# logistic regression is the initial value of alpha/sqrt(t).
OPTIMIZERS: Dict[str, Dict[str, Callable]] = {
    "logreg": {
        "Adam (fastadam)": lambda p: fastadam.torch.Adam(p, lr=1e-2),
        "AdaGrad": lambda p: torch.optim.Adagrad(p, lr=1e-1),
        "SGD Nesterov": lambda p: torch.optim.SGD(p, lr=1e-1, momentum=0.9, nesterov=True),
        "RMSProp": lambda p: torch.optim.RMSprop(p, lr=1e-2),
    },
    "mlp": {
        "Adam (fastadam)": lambda p: fastadam.torch.Adam(p, lr=1e-3),
        "AdaGrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
        "SGD Nesterov": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
        "RMSProp": lambda p: torch.optim.RMSprop(p, lr=1e-3),
    },
}


def make_model(kind: str, inputs: int) -> nn.Module:
    if kind == "logreg":
        return nn.Linear(inputs, 10)
    return nn.Sequential(nn.Dropout(0.2), nn.Linear(inputs, 1000), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(1000, 1000), nn.ReLU(), nn.Dropout(0.5), nn.Linear(1000, 10))


def train(kind: str, name: str, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> List[float]:
    """Training cost (mean minibatch loss) of each epoch."""
    torch.manual_seed(seed)
    model = make_model(kind, x.shape[1])
    optimizer = OPTIMIZERS[kind][name](model.parameters())
    scheduler = None
    if kind == "logreg":  # the paper's alpha / sqrt(t), t the iteration
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 / np.sqrt(t + 1))
    costs = []
    for _ in range(epochs):
        order = torch.randperm(len(x))
        total, batches = 0.0, 0
        for i in range(0, len(x), 128):
            idx = order[i:i + 128]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total, batches = total + loss.item(), batches + 1
        costs.append(total / batches)
    return costs


def draw(results: Dict[str, List[float]], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, costs in results.items():
        ax.plot(range(1, len(costs) + 1), costs, marker="o", markersize=3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("epochs")
    ax.set_ylabel("training cost")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files")
    parser.add_argument("--logreg-epochs", type=int, default=15)
    parser.add_argument("--mlp-epochs", type=int, default=5)
    parser.add_argument("--limit", type=int, help="use only the first N training images")
    parser.add_argument("--out-dir", default=".", help="where the two PNGs go (default: here)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    require("matplotlib")  # before the work, with the install line if it is missing
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)

    data = load_data(args.data_dir, download=False)
    if data is None:
        print("Running on a synthetic task instead.")
        data = synthetic_data(args.seed)
    x, y = torch.from_numpy(data[0][: args.limit]), torch.from_numpy(data[1][: args.limit])
    experiments = (("logreg", args.logreg_epochs, "Logistic regression (alpha/sqrt(t))"),
                   ("mlp", args.mlp_epochs, "MLP 2x1000 ReLU, dropout"))
    for kind, epochs, title in experiments:
        results = {}
        for name in OPTIMIZERS[kind]:
            start = time.perf_counter()
            results[name] = train(kind, name, x, y, epochs, args.seed)
            print(f"{title}: {name}: training cost {results[name][-1]:.4f} after {epochs} epochs "
                  f"({time.perf_counter() - start:.0f} s)")
        draw(results, f"Fashion-MNIST: {title}", f"{args.out_dir}/paper_{kind}.png")


if __name__ == "__main__":
    main()
