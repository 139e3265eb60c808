#!/usr/bin/env python3
"""fastadam.jax.adam against optax.adam, both under jax.jit with params and state donated.

Workloads (issue 22's targets): the parameters of ResNet-18 (62 tensors, 11.7M elements)
and GPT-2 small (148 tensors, 124M), 2000 tensors of 512 elements, and single tensors of
2^24 and 2^10 elements (at 2^10, fastadam.adam_step on NumPy arrays too: the per-call
overhead of the XLA call against a plain call). float32; one jitted step timed
(``jax.block_until_ready``), implementations interleaved, medians of repeats.

More rows say where the time goes:
- "..., params raveled" (models of several tensors): fastadam.jax.adam and optax.adam on
  the same parameters as one flat array (``jax.flatten_util.ravel_pytree``), so a step
  passes four arrays whatever the model. JAX's runtime takes a few microseconds per array
  passed into and out of a jitted call; with thousands of leaves that is most of a step,
  for either optimizer (docs/guide/jax.md).
- "JAX floor: a jitted identity" (single tensors): a jitted call that takes the same
  arrays and returns them untouched, what dispatch alone costs.
- "bound: 7-stream (numba)" (from 2^20 elements): benchmarks/peers.py's kernel that
  moves an Adam step's 28 bytes per element and computes nothing; "% of bound" is its
  time over each row's.

XLA's CPU thread pool is sized when jax starts, so one process measures one thread count:
``--threads T`` gives XLA T threads (fastadam.app.timing.set_xla_cpu_threads, before jax
is imported) and fastadam T. Run it once per thread count.

    python benchmarks/jax_adapter.py --threads 1 [--workloads resnet18 2000x512]
    python benchmarks/jax_adapter.py --threads 2
"""

import sys

import numpy as np
from peers import SEVEN_STREAM, gpt2_small_shapes, resnet18_shapes, seven_stream_runner

from fastadam.app.timing import parse_workload_arguments, print_workload_table, set_xla_cpu_threads

WORKLOADS = {
    "resnet18": resnet18_shapes,
    "gpt2": gpt2_small_shapes,
    "2000x512": lambda: [(512,)] * 2000,
    "2^24": lambda: [(1 << 24,)],
    "2^10": lambda: [(1 << 10,)],
}
LR, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-8


def arrays(shapes, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def runners(shapes, threads):
    import jax
    import optax

    import fastadam
    import fastadam.jax

    params, grads = arrays(shapes, 0), [g * 1e-2 for g in arrays(shapes, 1)]
    ours = fastadam.jax.adam(LR, B1, B2, EPS, num_threads=threads)
    box = {"params": [jax.numpy.array(p) for p in params]}
    box["state"] = ours.init(box["params"])
    jax_grads = [jax.numpy.array(g) for g in grads]

    def run_ours():
        box["params"], box["state"] = ours.step(jax_grads, box["state"], box["params"])
        jax.block_until_ready(box["params"])

    tx = optax.adam(LR, B1, B2, EPS)

    def update(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    theirs = jax.jit(update, donate_argnums=(0, 1))
    other = {"params": [jax.numpy.array(p) for p in params]}
    other["state"] = tx.init(other["params"])

    def run_optax():
        other["params"], other["state"] = theirs(other["params"], other["state"], jax_grads)
        jax.block_until_ready(other["params"])

    result = {"fastadam.jax.adam": run_ours, "optax.adam (jax.jit)": run_optax}
    if len(shapes) > 1:
        result["fastadam.jax.adam, params raveled"] = raveled(
            lambda p, s, g: ours.step(g, s, p), ours.init, params, grads)
        result["optax.adam (jax.jit), params raveled"] = raveled(theirs, tx.init, params, grads)
    bound = seven_stream_runner(sum(p.size for p in params), threads)
    if bound:
        result[SEVEN_STREAM] = bound
    if len(shapes) == 1:
        result["JAX floor: a jitted identity"] = jitted_identity(ours, params, jax_grads)
        p, g = params[0].copy(), grads[0]
        state = fastadam.adam_state(p)
        steps = iter(range(1, 10**9))
        result["fastadam.adam_step (NumPy)"] = lambda: fastadam.adam_step(
            p, g, state["exp_avg"], state["exp_avg_sq"], step=next(steps), lr=LR,
            num_threads=threads)
    return result


def jitted_identity(ours, params, jax_grads):
    """A jitted call that takes the step's arrays (params and state donated) and returns
    them untouched: what JAX's dispatch costs before any update runs."""
    import jax

    identity = jax.jit(lambda params, state, grads: (params, state), donate_argnums=(0, 1))
    box = {"params": [jax.numpy.array(p) for p in params]}
    box["state"] = ours.init(box["params"])

    def run():
        box["params"], box["state"] = identity(box["params"], box["state"], jax_grads)
        jax.block_until_ready(box["params"])
    return run


def raveled(step, init, params, grads):
    """A runner of ``step(params, state, grads)`` on the parameters as one flat array (and
    the gradients as one)."""
    import jax
    from jax.flatten_util import ravel_pytree

    flat, _ = ravel_pytree([jax.numpy.array(p) for p in params])
    flat_grads, _ = ravel_pytree([jax.numpy.array(g) for g in grads])
    box = {"params": [flat]}
    box["state"] = init(box["params"])

    def run():
        box["params"], box["state"] = step(box["params"], box["state"], [flat_grads])
        jax.block_until_ready(box["params"])
    return run


def main():
    args = parse_workload_arguments(__doc__.splitlines()[0], WORKLOADS, list(WORKLOADS))
    if "jax" in sys.modules:
        raise SystemExit("jax was imported before XLA_FLAGS could be set")
    print(f"threads: {args.threads} ({set_xla_cpu_threads(args.threads)})")
    print_workload_table(WORKLOADS, args.workloads, lambda shapes: runners(shapes, args.threads),
                         args.repeats, "optax.adam (jax.jit)", bound=SEVEN_STREAM)

if __name__ == "__main__":
    main()
