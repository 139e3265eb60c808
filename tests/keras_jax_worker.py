"""fastadam.keras.Adam on Keras's JAX backend, in a process of its own.

tests/conftest.py sets KERAS_BACKEND=torch before Keras is imported, and Keras reads it
once per process, so tests/test_jax.py runs this file as a script with
KERAS_BACKEND=jax:

    python tests/keras_jax_worker.py

It trains one small model per case with fastadam.keras.Adam and with
keras.optimizers.Adam, and prints one JSON line per case: the largest weight
difference, how often fastadam's XLA call was traced, Keras's iteration count, whether
the variables' buffers stayed in place across train_on_batch calls, and whether a
saved model loads back with its optimizer.
"""

import json
import os
import sys

import numpy as np

os.environ["KERAS_BACKEND"] = "jax"

import keras  # noqa: E402
from keras_worker_common import fit_both, saved_and_loaded  # noqa: E402

import fastadam.keras as fk  # noqa: E402

CASES = {
    "plain": {},
    "amsgrad": {"amsgrad": True},
    "weight_decay": {"weight_decay": 0.05},
    "clipnorm": {"clipnorm": 0.5},
    "ema": {"use_ema": True},
    "accumulation": {"gradient_accumulation_steps": 2},
    "loss_scale": {"loss_scale_factor": 128.0},
    "schedule": {"learning_rate": keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.5)},
}


def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((256, 20)).astype("float32"), rng.integers(0, 3, 256)


def model(optimizer):
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((20,)), keras.layers.Dense(32, activation="relu"),
                          keras.layers.Dense(3)])
    m.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


def in_place(m, x, y):
    """Do the variables keep their buffers across jitted train steps?"""
    m.train_on_batch(x[:64], y[:64])
    pointers = []
    for _ in range(3):
        m.train_on_batch(x[:64], y[:64])
        pointers.append([v.value.unsafe_buffer_pointer()
                         for v in m.trainable_variables + m.optimizer.variables[2:]])
    return all(p == pointers[0] for p in pointers)


def main():
    x, y = data()
    for name, kwargs in CASES.items():
        ours, theirs = model(fk.Adam(**kwargs)), model(keras.optimizers.Adam(**kwargs))
        diff = fit_both(ours, theirs, x, y)
        result = {"case": name, "diff": diff, "traces": ours.optimizer.kernel_traces,
                  "iterations": int(ours.optimizer.iterations)}
        if name == "plain":
            result["in_place"] = in_place(ours, x, y)
            loaded, result["loaded"], _ = saved_and_loaded(ours, x, y)
            result["loaded_traces"] = loaded.optimizer.kernel_traces
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
