"""fastadam.keras.Adam on Keras's TensorFlow backend, in a process of its own.

tests/conftest.py sets KERAS_BACKEND=torch before Keras is imported, and Keras reads it
once per process, so tests/test_keras_tensorflow.py runs this file as a script:

    python tests/keras_tf_worker.py

It trains one small model per case with fastadam.keras.Adam and with
keras.optimizers.Adam, and prints one JSON line per case: the largest weight
difference, how many steps ran through fastadam's kernels, Keras's iteration count, and
for "plain" whether the variables kept their buffers across train_on_batch calls, and
whether a saved model loads back with its optimizer and trains through the kernels.
"""

import json
import os
import sys

import numpy as np

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from keras_worker_common import fit_both, saved_and_loaded  # noqa: E402

import fastadam.keras as fk  # noqa: E402

CASES = {
    "plain": {},
    "amsgrad": {"amsgrad": True},
    "weight_decay": {"weight_decay": 0.05},
    "amsgrad-weight_decay": {"amsgrad": True, "weight_decay": 0.05},
    "clipnorm": {"clipnorm": 0.5},
    "ema": {"use_ema": True},
    "accumulation": {"gradient_accumulation_steps": 2},
    "loss_scale": {"loss_scale_factor": 128.0},
    "schedule": {"learning_rate": keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.5)},
    "mixed_float16": {},  # float32 variables in Keras's LossScaleOptimizer (a tf.cond)
    "float16": {},  # float16 variables: not the kernels' (Keras computes in 16 bits)
    "run_eagerly": {},  # model.compile(run_eagerly=True): the callback runs eagerly
    "xla": {},  # model.compile(jit_compile=True): Keras's own update, inside XLA
    "auto": {},  # model.compile() as tutorials write it: "auto" is no XLA on a CPU-only machine
    "embedding": {},  # an IndexedSlices gradient: Keras's update for it, the kernels for the rest
}


def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((256, 20)).astype("float32"), rng.integers(0, 3, 256)


def model(optimizer, case):
    keras.utils.set_random_seed(0)
    if case == "embedding":
        layers = [keras.Input((20,)), keras.layers.Lambda(lambda x: keras.ops.cast(
            keras.ops.abs(x) * 10, "int32") % 50), keras.layers.Embedding(50, 8),
            keras.layers.Flatten(), keras.layers.Dense(3)]
    else:
        layers = [keras.Input((20,)), keras.layers.Dense(32, activation="relu"),
                  keras.layers.Dense(3)]
    m = keras.Sequential(layers)
    modes = {} if case == "auto" else {"jit_compile": case == "xla",
                                       "run_eagerly": case == "run_eagerly"}
    m.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              **modes)
    return m


def addresses(m):
    return [int(v.value.value()._numpy().__array_interface__["data"][0])
            for v in m.trainable_variables + m.optimizer.variables[2:]]


def in_place(m, x, y):
    """Do the variables keep their buffers across train steps?"""
    m.train_on_batch(x[:64], y[:64])
    seen = []
    for _ in range(3):
        m.train_on_batch(x[:64], y[:64])
        seen.append(addresses(m))
    return all(p == seen[0] for p in seen)


def copy_on_read():
    """A variable TensorFlow reads by copy (after tf.gather) with a dense gradient: the
    kernels update a copy, assigned back. Three steps in a tf.function against Keras."""
    import tensorflow as tf

    rng = np.random.default_rng(1)
    init = [rng.standard_normal(s).astype("float32") for s in [(6, 4), (4,)]]
    grads = [tf.constant(rng.standard_normal(a.shape).astype("float32")) for a in init]
    finals, optimizers = [], (fk.Adam(learning_rate=0.01), keras.optimizers.Adam(learning_rate=0.01))
    for optimizer in optimizers:
        variables = [keras.Variable(a) for a in init]
        tf.gather(variables[0].value, [0, 1])  # copy-on-read mode from now on
        step = tf.function(lambda: optimizer.apply(grads, variables))  # noqa: B023
        for _ in range(3):
            step()
        finals.append([v.numpy() for v in variables])
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(*finals))
    return {"case": "copy_on_read", "diff": diff, "kernel_steps": optimizers[0].kernel_steps,
            "iterations": int(optimizers[0].iterations),
            "copied": optimizers[0]._fastadam[1][2]}


def main():
    x, y = data()
    if len(sys.argv) == 1 or "copy_on_read" in sys.argv[1:]:
        print(json.dumps(copy_on_read()), flush=True)
    for name, kwargs in CASES.items():
        if len(sys.argv) > 1 and name not in sys.argv[1:]:
            continue
        keras.mixed_precision.set_global_policy(name if "float16" in name else "float32")
        ours, theirs = model(fk.Adam(**kwargs), name), model(keras.optimizers.Adam(**kwargs), name)
        diff = fit_both(ours, theirs, x, y)
        keras.mixed_precision.set_global_policy("float32")
        optimizer = getattr(ours.optimizer, "inner_optimizer", ours.optimizer)
        result = {"case": name, "diff": diff, "kernel_steps": optimizer.kernel_steps,
                  "iterations": int(optimizer.iterations)}
        if name == "plain":
            result["in_place"] = in_place(ours, x, y)
            loaded, result["loaded"], result["loaded_same"] = saved_and_loaded(ours, x, y)
            result["loaded_kernel_steps"] = loaded.optimizer.kernel_steps
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
