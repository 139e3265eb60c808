#!/usr/bin/env python3
"""The Fashion-MNIST task in Keras 3, compiled with fastadam.keras.Adam.

    pip install ".[keras,torch,examples]"
    KERAS_BACKEND=torch python examples/fashion_mnist_keras.py     # ~0.91 test accuracy

Three functions make the task: load_train(path) (and load_test, the same way),
create_model(input_shape) and train_model(model, train_data, test_data, ...).
Data: Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or --data-dir.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Optional, Tuple

os.environ.setdefault("KERAS_BACKEND", "torch")  # fastadam's kernels run on Keras's torch backend

import numpy as np  # noqa: E402

from _requirements import require  # noqa: E402

if os.environ["KERAS_BACKEND"] == "torch":
    require("torch")  # the backend
keras = require("keras")

import fastadam.keras  # noqa: E402
from fastadam.datasets import DEBIAN_DIR, load_fashion_mnist  # noqa: E402

Data = Tuple[np.ndarray, np.ndarray]


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


def create_model(input_shape: Tuple[int, ...]) -> keras.Model:
    """A small convolutional network compiled with fastadam.keras.Adam."""
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
    model.compile(optimizer=fastadam.keras.Adam(), loss="sparse_categorical_crossentropy",
                  metrics=["acc"])
    return model


def train_model(model: keras.Model, train_data: Data, test_data: Data, batch_size: Optional[int] = None,
                epochs: int = 5, steps_per_epoch: Optional[int] = None,
                validation_steps: Optional[int] = None) -> keras.Model:
    """Fit ``model`` on ``train_data``, validating on ``test_data``; returns the model."""
    x, y = train_data
    model.fit(x, y, batch_size=batch_size or 128, epochs=epochs, steps_per_epoch=steps_per_epoch,
              validation_data=test_data, validation_steps=validation_steps, verbose=2)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help=f"IDX files (default {DEBIAN_DIR})")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    train_data, test_data = load_train(args.data_dir), load_test(args.data_dir)
    start = time.perf_counter()
    model = train_model(create_model(train_data[0].shape[1:]), train_data, test_data,
                        batch_size=args.batch_size, epochs=args.epochs)
    seconds = time.perf_counter() - start
    loss, accuracy = model.evaluate(*test_data, verbose=0)
    print(f"test accuracy {accuracy:.4f} (loss {loss:.4f}) after {args.epochs} epochs, "
          f"{seconds:.0f} s of training")


if __name__ == "__main__":
    main()
