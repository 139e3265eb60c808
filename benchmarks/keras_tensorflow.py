#!/usr/bin/env python3
"""fastadam.keras.Adam against keras.optimizers.Adam on Keras's TensorFlow backend.

The optimizer's update alone, as Keras's TensorFlow trainer runs it: ``optimizer.apply``
of fixed gradients inside a ``tf.function``. fastadam.keras.Adam's update there is one
host callback (tf.py_function) over the variables' memory; keras.optimizers.Adam runs
TensorFlow's ops per variable, without XLA and with it (``jit_compile=True``, where
fastadam.keras.Adam is Keras's own update too). float32; implementations interleaved,
medians of repeats.

TensorFlow's thread pools are sized when it starts, so one process measures one thread
count: ``--threads T`` sets TensorFlow's intra-op threads and fastadam's num_threads.

    KERAS_BACKEND=tensorflow python benchmarks/keras_tensorflow.py --threads 1
"""

import os

import numpy as np
from peers import gpt2_small_shapes, resnet18_shapes

from fastadam.app.timing import parse_workload_arguments, print_workload_table

WORKLOADS = {
    "resnet18": resnet18_shapes,
    "gpt2": gpt2_small_shapes,
    "2000x512": lambda: [(512,)] * 2000,
}


def runners(shapes, threads):
    import keras
    import tensorflow as tf

    import fastadam.keras

    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [tf.constant(1e-2 * rng.standard_normal(s).astype(np.float32)) for s in shapes]
    result = {}
    for label, make, jit in [
        ("fastadam.keras.Adam (tf.function)", lambda: fastadam.keras.Adam(num_threads=threads), False),
        ("keras.optimizers.Adam (tf.function)", keras.optimizers.Adam, False),
        ("keras.optimizers.Adam (tf.function, XLA)", keras.optimizers.Adam, True),
    ]:
        optimizer, variables = make(), [keras.Variable(p) for p in params]
        optimizer.build(variables)
        result[label] = compiled_apply(optimizer, grads, variables, jit)
        result[label]()  # trace and compile outside the timing
    return result


def compiled_apply(optimizer, grads, variables, jit):
    import tensorflow as tf

    return tf.function(lambda: optimizer.apply(grads, variables), jit_compile=jit)


def main():
    args = parse_workload_arguments(__doc__.splitlines()[0], WORKLOADS, ["resnet18"])
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        raise SystemExit("run with KERAS_BACKEND=tensorflow (or unset)")
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    print(f"threads: {args.threads}")
    print_workload_table(WORKLOADS, args.workloads, lambda shapes: runners(shapes, args.threads),
                         args.repeats, "keras.optimizers.Adam (tf.function)")

if __name__ == "__main__":
    main()
