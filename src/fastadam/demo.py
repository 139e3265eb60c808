"""``python -m fastadam demo``: a NumPy-only MLP trained on Fashion-MNIST with fastadam.

The model (784 -> hidden -> 10, ReLU, softmax cross-entropy) lives in a
:class:`fastadam.FlatParams`, its gradients are written into the matching views, and
:class:`fastadam.Adam` updates the whole model as one stream. Alongside, every step's
gradients are also given to a plain NumPy Adam on a copy of the weights, only to time it:
the summary compares the two optimizers on exactly the same updates.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional, Tuple

import numpy as np

import fastadam
from fastadam.bench import NumpyAdam, positive_int
from fastadam.datasets import DEBIAN_DIR, load_fashion_mnist

Data = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help=f"directory with the Fashion-MNIST IDX files "
                        f"(default: $FASHION_MNIST_DIR, then {DEBIAN_DIR})")
    parser.add_argument("--download", action="store_true",
                        help="fetch missing files into --data-dir (needs the network)")
    parser.add_argument("--epochs", type=positive_int, default=5, help="passes over the training set (default 5)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="minibatch size (default 128)")
    parser.add_argument("--hidden", type=positive_int, default=256, help="hidden units (default 256)")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="Adam's learning rate (default 1e-3)")
    # One thread by default: NumPy's BLAS threads keep spinning between the matmuls of
    # this loop, and a second OpenMP thread of fastadam's then waits for a core (measured
    # here: 4.9 ms per step on two threads against 0.12 ms on one for these 203,530
    # parameters; 0.1 ms on two with OPENBLAS_NUM_THREADS=1).
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="fastadam's OpenMP threads (default 1: see the comment in demo.py)")
    parser.add_argument("--synthetic", action="store_true",
                        help="train on a small synthetic task instead of Fashion-MNIST")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_data(data_dir: Optional[str], download: bool) -> Optional[Data]:
    try:
        x_train, y_train = load_fashion_mnist("train", data_dir, download)
        x_test, y_test = load_fashion_mnist("test", data_dir)
    except FileNotFoundError as exc:
        print(f"Fashion-MNIST not found: {exc}")
        return None
    scale = np.float32(1 / 255)
    return (x_train.reshape(len(x_train), -1) * scale, y_train.astype(np.int64),
            x_test.reshape(len(x_test), -1) * scale, y_test.astype(np.int64))


def synthetic_data(seed: int, n_train: int = 6000, n_test: int = 1000) -> Data:
    """Ten noisy Gaussian clusters in 784 dimensions: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((10, 784)).astype(np.float32) * 0.35
    def draw(n):
        y = rng.integers(0, 10, n)
        return (centers[y] + rng.standard_normal((n, 784)).astype(np.float32)), y
    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return x_train, y_train, x_test, y_test


class MLP:
    """784 -> hidden (ReLU) -> 10, parameters and gradients in one FlatParams."""

    def __init__(self, inputs: int, hidden: int, seed: int):
        self.flat = fastadam.FlatParams([(inputs, hidden), hidden, (hidden, 10), 10], np.float32)
        self.w1, self.b1, self.w2, self.b2 = self.flat.params
        self.gw1, self.gb1, self.gw2, self.gb2 = self.flat.grads
        rng = np.random.default_rng(seed)
        self.w1[...] = rng.standard_normal(self.w1.shape) * np.sqrt(2 / inputs)   # He
        self.w2[...] = rng.standard_normal(self.w2.shape) * np.sqrt(1 / hidden)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ self.w1 + self.b1, 0) @ self.w2 + self.b2

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> float:
        """Mean cross-entropy; its gradients are written into the flat gradient block."""
        h = np.maximum(x @ self.w1 + self.b1, 0)
        z = h @ self.w2 + self.b2
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        loss = -np.log(p[np.arange(len(y)), y] + 1e-12).mean()
        p[np.arange(len(y)), y] -= 1
        p /= len(y)
        np.matmul(h.T, p, out=self.gw2)
        self.gb2[...] = p.sum(axis=0)
        dh = p @ self.w2.T
        dh *= h > 0
        np.matmul(x.T, dh, out=self.gw1)
        self.gb1[...] = dh.sum(axis=0)
        return float(loss)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.logits(x).argmax(axis=1) == y).mean())


def progress(iterable, enabled: bool, **kwargs):
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(iterable, **kwargs)
        except ImportError:
            pass
    return iterable


def run(args: argparse.Namespace) -> float:
    """Train and report; returns the test accuracy."""
    data = None if args.synthetic else load_data(args.data_dir, args.download)
    if data is None:
        print("Running a small synthetic classification task instead (pass --data-dir, or "
              "apt-get install dataset-fashion-mnist, for the real one).")
        data = synthetic_data(args.seed)
        task = "synthetic 10-class task"
    else:
        task = "Fashion-MNIST"
    x_train, y_train, x_test, y_test = data
    model = MLP(x_train.shape[1], args.hidden, args.seed)
    optimizer = fastadam.Adam(model.flat.params, lr=args.lr, num_threads=args.threads)
    # A NumPy Adam per tensor, on copies of the weights, fed the same gradients: timed only.
    reference = [NumpyAdam(p.copy(), g, np.zeros_like(p), np.zeros_like(p), lr=args.lr)
                 for p, g in zip(model.flat.params, model.flat.grads)]
    print(f"{task}: {len(x_train)} training and {len(x_test)} test examples; MLP "
          f"{x_train.shape[1]}-{args.hidden}-10 ({model.flat.data.size:,} parameters in one FlatParams)")
    rng = np.random.default_rng(args.seed)
    fast_seconds = numpy_seconds = 0.0
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x_train))
        batches = range(0, len(x_train), args.batch_size)
        losses = []
        for i in progress(batches, not args.no_progress, desc=f"epoch {epoch}/{args.epochs}",
                          unit="batch", leave=False):
            idx = order[i:i + args.batch_size]
            losses.append(model.loss_and_grads(x_train[idx], y_train[idx]))
            t0 = time.perf_counter()
            optimizer.step(model.flat.grads)
            t1 = time.perf_counter()
            for numpy_step in reference:
                numpy_step()
            t2 = time.perf_counter()
            fast_seconds += t1 - t0
            numpy_seconds += t2 - t1
        print(f"epoch {epoch}: training loss {np.mean(losses):.4f}, "
              f"test accuracy {model.accuracy(x_test, y_test):.4f}")
    accuracy = model.accuracy(x_test, y_test)
    print(f"\ntest accuracy {accuracy:.4f} after {args.epochs} epochs "
          f"({time.perf_counter() - start:.1f} s)")
    print(f"time in the optimizer: fastadam.Adam {fast_seconds:.3f} s, NumPy Adam "
          f"{numpy_seconds:.3f} s on the same gradients ({numpy_seconds / fast_seconds:.1f}x)")
    return accuracy
