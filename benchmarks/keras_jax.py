#!/usr/bin/env python3
"""fastadam.keras.Adam against keras.optimizers.Adam on Keras's JAX backend.

The optimizer's update alone, as Keras's JAX trainer runs it: ``stateless_apply`` of
fixed gradients inside ``jax.jit``, the variables and the optimizer's state donated.
fastadam.keras.Adam's update there is one XLA custom call over all variables
(fastadam.jax's); keras.optimizers.Adam is XLA's fusion of Keras's per-variable ops.
float32; implementations interleaved, medians of repeats. From 2^20 elements, the
7-stream memory bound of benchmarks/peers.py in the same run, and each row's share of it.

XLA's CPU thread pool is sized when jax starts, so one process measures one thread
count: ``--threads T`` gives XLA T threads (fastadam.app.timing.set_xla_cpu_threads,
before jax is imported) and fastadam T.

    python benchmarks/keras_jax.py --threads 1 [--workloads resnet18 2000x512]
"""

import os
import sys

import numpy as np
from peers import SEVEN_STREAM, gpt2_small_shapes, resnet18_shapes, seven_stream_runner

from fastadam.app.timing import parse_workload_arguments, print_workload_table, set_xla_cpu_threads

WORKLOADS = {
    "resnet18": resnet18_shapes,
    "gpt2": gpt2_small_shapes,
    "2000x512": lambda: [(512,)] * 2000,
}
KERAS = "keras.optimizers.Adam (jax.jit)"


def runners(shapes, threads):
    import jax
    import keras

    import fastadam.keras

    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [jax.numpy.asarray(1e-2 * rng.standard_normal(s).astype(np.float32)) for s in shapes]
    result = {}
    for label, make in [("fastadam.keras.Adam (jax.jit)", lambda: fastadam.keras.Adam(num_threads=threads)),
                        (KERAS, keras.optimizers.Adam)]:
        optimizer, variables = make(), [keras.Variable(p) for p in params]
        optimizer.build(variables)
        result[label] = donated_apply(optimizer, grads, variables)
        result[label]()  # trace and compile outside the timing
    bound = seven_stream_runner(sum(p.size for p in params), threads)
    if bound:
        result[SEVEN_STREAM] = bound
    return result


def donated_apply(optimizer, grads, variables):
    """One jitted, donated update, as Keras's JAX trainer makes it: the state goes in and
    comes out in the same order (jax pairs donated inputs with outputs in order; given
    stateless_apply's own order, (optimizer variables, ..., params) in and (params,
    optimizer variables) out, XLA copies every buffer around the in-place call). Each
    call takes the previous call's outputs (the donated inputs are gone)."""
    import jax

    def update(params, optimizer_variables):
        return optimizer.stateless_apply(optimizer_variables, grads, params)

    apply = jax.jit(update, donate_argnums=(0, 1))
    state = [[v.value for v in variables], [v.value for v in optimizer.variables]]

    def step():
        state[0], state[1] = apply(*state)
        jax.block_until_ready(state[0])
    return step


def main():
    args = parse_workload_arguments(__doc__.splitlines()[0], WORKLOADS, ["resnet18"])
    if os.environ.get("KERAS_BACKEND", "jax") != "jax" or "jax" in sys.modules:
        raise SystemExit("run with KERAS_BACKEND=jax (or unset), before jax is imported")
    os.environ["KERAS_BACKEND"] = "jax"
    print(f"threads: {args.threads} ({set_xla_cpu_threads(args.threads)})")
    print_workload_table(WORKLOADS, args.workloads, lambda shapes: runners(shapes, args.threads),
                         args.repeats, KERAS, bound=SEVEN_STREAM)

if __name__ == "__main__":
    main()
