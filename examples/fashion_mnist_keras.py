#!/usr/bin/env python3
"""The Fashion-MNIST task in Keras 3, compiled with fastadam.keras.Adam, on any backend.

    pip install ".[keras,torch,examples]"
    KERAS_BACKEND=torch python examples/fashion_mnist_keras.py         # ~0.91 test accuracy
    KERAS_BACKEND=jax python examples/fashion_mnist_keras.py           # pip install ".[jax]"
    KERAS_BACKEND=tensorflow python examples/fashion_mnist_keras.py    # pip install tensorflow-cpu
    python examples/fashion_mnist_keras.py --quick                     # a subset, one epoch

Three functions make the task: load_train(path) (and load_test, the same way),
create_model(input_shape) and train_model(model, train_data, test_data, ...).
Data: Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or --data-dir.

The script reports the test accuracy, the training time (model.fit's wall time, first
step's compilation included, the test accuracy it prints after each epoch left out) and the optimizer's share of it. The update runs inside
Keras's compiled train step on JAX and TensorFlow, where no Python timer can see it, so
the share is measured the same way on every backend: after training, the optimizer's
update alone (optimizer.apply for the model's variables, compiled as the backend's train
step compiles it: jax.jit with the state donated, tf.function, eager on torch) is timed
over --repeats calls, and its time per step times the number of training steps is
divided by the training time. keras.optimizers.Adam is timed the same way, on the same
variables, for comparison. Both run after the accuracy is measured (they move the weights).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable, List, Optional, Tuple

os.environ.setdefault("KERAS_BACKEND", "torch")  # fastadam's kernels run on Keras's torch backend

import numpy as np  # noqa: E402

from _requirements import require  # noqa: E402

require(os.environ["KERAS_BACKEND"])  # the backend: torch, jax or tensorflow
keras = require("keras")

import fastadam.keras  # noqa: E402
from fastadam.datasets import DEBIAN_DIR, load_fashion_mnist  # noqa: E402

Data = Tuple[np.ndarray, np.ndarray]
QUICK_TRAIN, QUICK_TEST = 2048, 512  # --quick: images of each split


def _load(split: str, path: Optional[str]) -> Data:
    images, labels = load_fashion_mnist(split, data_dir=path)
    return (images.astype("float32") / 255.0)[..., None], labels.astype("int64")


def load_train(path: Optional[str] = None) -> Data:
    """Training images (n, 28, 28, 1) scaled to [0, 1] and their labels, from ``path`` (a
    directory with the IDX files; default: Debian's dataset-fashion-mnist)."""
    return _load("train", path)


def load_test(path: Optional[str] = None) -> Data:
    """The test set, loaded like :func:`load_train`."""
    return _load("test", path)


def create_model(input_shape: Tuple[int, ...], optimizer: Optional[Any] = None) -> keras.Model:
    """A small convolutional network compiled with ``optimizer`` (fastadam.keras.Adam by
    default). On TensorFlow the train step is a tf.function without XLA: fastadam's
    update there is a Python callback, which XLA cannot compile (under XLA, which Keras's
    ``jit_compile="auto"`` picks where TensorFlow sees a GPU, fastadam.keras.Adam is
    Keras's own)."""
    model = keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.25),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dropout(0.25),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=optimizer if optimizer is not None else fastadam.keras.Adam(),
                  loss="sparse_categorical_crossentropy", metrics=["acc"],
                  jit_compile=False if keras.backend.backend() == "tensorflow" else "auto")
    return model


class EvaluationTime(keras.callbacks.Callback):
    """The seconds model.fit spends validating (to leave out of the training time)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0

    def on_test_begin(self, logs: Any = None) -> None:
        self._start = time.perf_counter()

    def on_test_end(self, logs: Any = None) -> None:
        self.seconds += time.perf_counter() - self._start


def train_model(model: keras.Model, train_data: Data, test_data: Optional[Data] = None,
                batch_size: Optional[int] = None, epochs: int = 5,
                steps_per_epoch: Optional[int] = None,
                validation_steps: Optional[int] = None, verbose: int = 2,
                callbacks: Optional[List[Any]] = None) -> keras.Model:
    """Fit ``model`` on ``train_data`` (validating on ``test_data`` after each epoch when
    given); returns the model."""
    x, y = train_data
    model.fit(x, y, batch_size=batch_size or 128, epochs=epochs, steps_per_epoch=steps_per_epoch,
              validation_data=test_data, validation_steps=validation_steps, verbose=verbose,
              callbacks=callbacks)
    return model


def _random_gradients(variables: List[Any], seed: int = 0) -> List[Any]:
    """Gradient-shaped tensors (the update's time does not depend on their values)."""
    rng = np.random.default_rng(seed)
    return [keras.ops.convert_to_tensor((1e-3 * rng.standard_normal(v.shape)).astype(v.dtype))
            for v in variables]


def _compiled_apply(optimizer: Any, model: keras.Model) -> Tuple[Callable[[], None], Callable[[], None]]:
    """(step, finish): one call of the optimizer's update of the model's trainable
    variables, compiled as the backend's train step compiles it, and what writes the
    results back when the timing is over."""
    variables = model.trainable_variables
    if not optimizer.built:
        optimizer.build(variables)
    grads = _random_gradients(variables)
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        # Keras's JAX trainer: stateless_apply inside jax.jit, the state donated and
        # returned in the same order (else XLA copies it around the in-place update)
        def update(params: Any, optimizer_variables: Any) -> Any:
            return optimizer.stateless_apply(optimizer_variables, grads, params)

        apply = jax.jit(update, donate_argnums=(0, 1))
        state = {"params": [v.value for v in variables],
                 "opt": [v.value for v in optimizer.variables]}

        def step() -> None:
            state["params"], state["opt"] = apply(state["params"], state["opt"])
            jax.block_until_ready(state["params"])

        def finish() -> None:
            for variable, value in zip([*variables, *optimizer.variables],
                                       [*state["params"], *state["opt"]]):
                variable.assign(value)
        return step, finish
    if backend == "tensorflow":
        import tensorflow as tf

        # Keras's TensorFlow trainer: a tf.function, XLA-compiled when the model is
        apply = tf.function(lambda: optimizer.apply(grads, variables),
                            jit_compile=bool(model.jit_compile))
        return apply, lambda: None
    return lambda: optimizer.apply(grads, variables), lambda: None  # torch: eager


def optimizer_ms_per_step(optimizer: Any, model: keras.Model, repeats: int = 20) -> float:
    """The optimizer's update of ``model``'s variables, ms per step (median of
    ``repeats`` after a warm-up call that compiles it)."""
    step, finish = _compiled_apply(optimizer, model)
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    finish()
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help=f"IDX files (default {DEBIAN_DIR})")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--quick", action="store_true",
                        help=f"the first {QUICK_TRAIN} training and {QUICK_TEST} test images, "
                             "one epoch (a smoke test, not the 0.87 task)")
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed calls of the optimizer's update alone")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    keras.utils.set_random_seed(args.seed)
    (x, y), (x_test, y_test) = load_train(args.data_dir), load_test(args.data_dir)
    epochs = args.epochs
    if args.quick:
        (x, y), (x_test, y_test), epochs = (x[:QUICK_TRAIN], y[:QUICK_TRAIN]), \
            (x_test[:QUICK_TEST], y_test[:QUICK_TEST]), 1
    backend = keras.backend.backend()
    print(f"backend {backend}: {len(x)} training and {len(x_test)} test images, {epochs} epoch(s)")

    model, evaluation = create_model(x.shape[1:]), EvaluationTime()
    start = time.perf_counter()  # the test accuracy after every epoch, its time left out
    train_model(model, (x, y), (x_test, y_test), batch_size=args.batch_size, epochs=epochs,
                callbacks=[evaluation])
    seconds = time.perf_counter() - start - evaluation.seconds
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    steps = epochs * -(-len(x) // args.batch_size)
    ours = optimizer_ms_per_step(model.optimizer, model, args.repeats)
    theirs = optimizer_ms_per_step(keras.optimizers.Adam(), model, args.repeats)
    # three significant figures: a --quick run's share (5 steps against the compilation
    # time) is a few thousandths of a percent and would print as 0.0 with one decimal
    share = ours * steps / (1e3 * seconds)
    print(f"backend {backend}: test accuracy {accuracy:.4f} (loss {loss:.4f}); training "
          f"{seconds:.1f} s for {steps} steps")
    used = model.optimizer.kernel_steps or model.optimizer.kernel_traces
    print(f"backend {backend}: fastadam.keras.Adam {ours:.3f} ms/step "
          f"({'fastadam kernels' if used else 'Keras update'}), keras.optimizers.Adam "
          f"{theirs:.3f} ms/step; optimizer share of training {100 * share:.3g}%")


if __name__ == "__main__":
    main()
