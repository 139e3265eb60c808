"""``python -m fastadam demo``: a NumPy-only MLP trained on Fashion-MNIST with fastadam.

The model (784 -> hidden -> 10, ReLU, softmax cross-entropy) lives in a
:class:`fastadam.FlatParams`, its gradients are written into the matching views, and
:class:`fastadam.Adam` updates the whole model as one stream. Alongside, every step's
gradients are also given to a plain NumPy Adam on a copy of the weights, only to time it:
the summary compares the two optimizers on exactly the same updates.

Thread pools: the demo runs NumPy's BLAS on one thread (``--blas-threads``, through
threadpoolctl) and fastadam on one (``--threads``). On a machine with few cores, idle
threads of the two pools otherwise spin against each other and against other work: on a
loaded 2-core machine the default BLAS pool made the demo 5-20 times slower.
Progress: a line per epoch, and within an epoch a progress line that updates in place on
a terminal (a new line every 10 s otherwise), so a slow machine never looks hung.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any, ContextManager, Optional, TextIO, Tuple

import numpy as np

import fastadam
from fastadam.app.cli import positive_int
from fastadam.app.datasets import DownloadError, load_fashion_mnist, search_dirs
from fastadam.app.timing import NumpyAdam

Data = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

# What `fastadam demo --help` shows (plain text: the module docstring is reST).
DESCRIPTION = ("Train a small NumPy-only MLP (784-256-10) on Fashion-MNIST with fastadam.Adam, "
               "printing progress as it goes, and compare the time spent in the optimizer with "
               "a NumPy Adam fed the same gradients. Without the data it says so and trains on "
               "a small synthetic task instead.")


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default_dirs = ", then ".join(["$FASHION_MNIST_DIR"] + [str(d) for d in search_dirs()[-2:]])
    parser.add_argument("--data-dir", help=f"directory with the Fashion-MNIST IDX files "
                        f"(default: {default_dirs})")
    parser.add_argument("--download", action="store_true",
                        help="fetch the files that are not found (into --data-dir, else into "
                             "the cache directory above; needs the network)")
    parser.add_argument("--epochs", type=positive_int, default=5, help="passes over the training set (default 5)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="minibatch size (default 128)")
    parser.add_argument("--hidden", type=positive_int, default=256, help="hidden units (default 256)")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="Adam's learning rate (default 1e-3)")
    # One thread by default: NumPy's BLAS threads keep spinning between the matmuls of
    # this loop, and a second OpenMP thread of fastadam's then waits for a core (measured
    # here: 4.9 ms per step on two threads against 0.12 ms on one for these 203,530
    # parameters; 0.1 ms on two with OPENBLAS_NUM_THREADS=1).
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="fastadam's OpenMP threads (default 1: for a model this small a "
                             "second thread gains little, and on a busy machine it waits for "
                             "a core)")
    parser.add_argument("--blas-threads", type=positive_int, default=1,
                        help="threads of NumPy's BLAS for the matrix products (default 1: idle "
                             "BLAS threads spin and slow fastadam's down on few cores)")
    parser.add_argument("--synthetic", action="store_true",
                        help="train on a small synthetic task instead of Fashion-MNIST")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-progress", action="store_true",
                        help="print only a line per epoch, no progress within an epoch")


def plural(count: int, noun: str, nouns: str = "") -> str:
    """``1 epoch``, ``5 epochs``; ``nouns`` for an irregular plural (``batches``)."""
    return f"{count} {noun}" if count == 1 else f"{count} {nouns or noun + 's'}"


def load_data(data_dir: Optional[str], download: bool) -> Optional[Data]:
    """The data, or None after saying (in the CLI's words) why it is not there."""
    try:
        x_train, y_train = load_fashion_mnist("train", data_dir, download)
        x_test, y_test = load_fashion_mnist("test", data_dir)
    except FileNotFoundError:
        looked = ", ".join(str(d) for d in search_dirs(data_dir))
        print(f"Fashion-MNIST not found (looked in {looked}). To get it: apt-get install "
              "dataset-fashion-mnist, or run again with --download (needs the network), or "
              "point --data-dir (or $FASHION_MNIST_DIR) at a directory with the four IDX files.",
              flush=True)
        return None
    except DownloadError as exc:
        print(f"Fashion-MNIST could not be downloaded: {exc}. Without the network: apt-get "
              "install dataset-fashion-mnist, or --data-dir with the four IDX files.", flush=True)
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


class Progress:
    """Progress within an epoch, without any dependency: on a terminal one line rewritten
    in place (at most 5 times a second); elsewhere (a pipe, a CI log) a new line every
    ``every`` seconds. ``update`` is called once per batch."""

    def __init__(self, label: str, total: int, enabled: bool, out: Optional[TextIO] = None,
                 every: float = 10.0):
        self.label, self.total, self.enabled = label, total, enabled
        self.out = sys.stdout if out is None else out
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.interval = 0.2 if self.tty else every
        self.start = self.last = time.perf_counter()
        self.drawn = False

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.last < self.interval:
            return
        self.last = now
        text = (f"{self.label}: {done}/{self.total} batches ({100 * done // self.total}%), "
                f"{now - self.start:.1f} s")
        if self.tty:
            self.out.write(f"\r{text}\033[K")
            self.drawn = True
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def close(self) -> None:
        """Clear an in-place line, so the epoch's summary line replaces it."""
        if self.drawn:
            self.out.write("\r\033[K")
            self.out.flush()


def limit_blas_threads(threads: int) -> ContextManager[Any]:
    """Limit NumPy's BLAS to ``threads`` threads while the block runs (threadpoolctl, the
    ``demo`` extra: ``pip install "fastadam[demo]"``; without it, nothing is limited, and
    the demo says so)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print("fastadam demo: threadpoolctl is not installed, so NumPy's BLAS threads are not "
              'limited (slower on a busy machine): pip install "fastadam[demo]"', flush=True)
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def run(args: argparse.Namespace) -> float:
    """Train and report; returns the test accuracy."""
    with limit_blas_threads(getattr(args, "blas_threads", 1)):
        return _run(args)


def _run(args: argparse.Namespace) -> float:
    print("fastadam demo: loading the data...", flush=True)
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
    n_batches = len(range(0, len(x_train), args.batch_size))
    print(f"{task}: {len(x_train)} training and {len(x_test)} test examples; MLP "
          f"{x_train.shape[1]}-{args.hidden}-10 ({model.flat.data.size:,} parameters in one FlatParams)")
    print(f"training for {plural(args.epochs, 'epoch')} of {plural(n_batches, 'batch', 'batches')} "
          f"(fastadam on {plural(args.threads, 'thread')}, NumPy's BLAS on "
          f"{plural(getattr(args, 'blas_threads', 1), 'thread')})", flush=True)
    rng = np.random.default_rng(args.seed)
    fast_seconds = numpy_seconds = 0.0
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x_train))
        batches = range(0, len(x_train), args.batch_size)
        losses = []
        bar = Progress(f"epoch {epoch}/{args.epochs}", len(batches), not args.no_progress)
        for done, i in enumerate(batches, 1):
            bar.update(done - 1)
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
        bar.close()
        print(f"epoch {epoch}/{args.epochs}: training loss {np.mean(losses):.4f}, "
              f"test accuracy {model.accuracy(x_test, y_test):.4f} "
              f"({time.perf_counter() - start:.1f} s so far)", flush=True)
    accuracy = model.accuracy(x_test, y_test)
    print(f"\ntest accuracy {accuracy:.4f} after {plural(args.epochs, 'epoch')} "
          f"({time.perf_counter() - start:.1f} s)")
    print(f"time in the optimizer: fastadam.Adam {fast_seconds:.3f} s, NumPy Adam "
          f"{numpy_seconds:.3f} s on the same gradients ({numpy_seconds / fast_seconds:.1f}x)")
    return accuracy
