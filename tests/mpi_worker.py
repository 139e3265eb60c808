"""MPI side of tests/test_distributed.py: run under ``mpiexec -n P python mpi_worker.py SCENARIO``.

Every rank checks its results against a single-process fastadam.Adam stepped on the
averaged gradients (the rank-order sum divided by the number of ranks, in the parameters'
dtype). The ranks then agree on the failures (so no rank leaves a collective early), rank 0
prints one JSON line ``{"failures": [...], ...}`` and every rank exits 1 if anything failed.
"""

import json
import os
import sys

import numpy as np
from mpi4py import MPI

import fastadam
from fastadam import _npz, distributed
from fastadam._validation import check_element_dtype
from fastadam.distributed import ShardedAdam, _checkpoint, _collectives

WORLD = MPI.COMM_WORLD
failures = []
facts = {}


def check(condition, message):
    if not condition:
        failures.append(f"rank {WORLD.rank}: {message}")


def bits_equal(a, b):
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def rank_grads(step, world_size, size, dtype):
    """Every rank's gradient of this step: magnitudes spread over six decades, so that a
    different summation order would change the low bits."""
    grads = []
    for rank in range(world_size):
        rng = np.random.default_rng([step, rank, size])
        g = rng.standard_normal(size) * 10.0 ** rng.uniform(-3, 3, size)
        grads.append(g.astype(dtype))
    return grads


def averaged(grads, scale=1.0):
    """The reference average: rank-order sum in the dtype, then one correctly rounded
    division by world_size * scale."""
    total = grads[0].copy()
    for g in grads[1:]:
        total += g
    return total / total.dtype.type(len(grads) * scale)


VARIANTS = {
    "plain": {},
    "amsgrad-l2": {"amsgrad": True, "weight_decay": 0.05},
    "adamw-maximize": {"weight_decay": 0.05, "decoupled_weight_decay": True, "maximize": True},
    "eps-hat": {"eps_hat": True, "eps": 1e-7},
    "schedule": {"lr": fastadam.schedules.inverse_sqrt(1e-2)},
}


def run_parity(comm, size, dtype, variant, collectives, steps=4, grad_scale=None, use_flat=True):
    """ShardedAdam for ``steps`` steps vs fastadam.Adam on the averaged gradients."""
    p = comm.Get_size()
    kwargs = {"lr": 1e-2, **VARIANTS[variant]}
    rng = np.random.default_rng(size)
    initial = rng.standard_normal(size).astype(dtype)
    if use_flat:
        shapes = [(size // 3,), (size - size // 3,)]
        flat = fastadam.FlatParams(shapes, dtype)
        flat.data[...] = initial
        if comm.Get_rank() != 0:
            flat.data[...] = 0  # rank 0's parameters are broadcast at construction
        opt = ShardedAdam(flat, comm, collectives=collectives, num_threads=1, **kwargs)
    else:
        params = memoryview(initial.copy())  # a bare buffer-protocol object, updated in place
        opt = ShardedAdam(params, comm, collectives=collectives, num_threads=1, **kwargs)
    reference = initial.copy()
    ref_opt = fastadam.Adam([reference], num_threads=1, **kwargs)
    for step in range(1, steps + 1):
        grads = rank_grads(step, p, size, dtype)
        mine = grads[comm.Get_rank()]
        if use_flat:
            flat.grad_data[...] = mine
            opt.step(grad_scale=grad_scale)
        else:
            opt.step(mine, grad_scale=grad_scale)
        ref_opt.step([averaged(grads, grad_scale or 1.0)])
    label = f"p={p} n={size} {np.dtype(dtype).name} {variant} {collectives}"
    start, stop = opt.shard
    exact = bits_equal(opt.params, reference)
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in ref_opt.state[0]:
            exact &= bits_equal(opt.state[key], ref_opt.state[0][key][start:stop])
    check(opt.state["step"] == steps, f"{label}: step count {opt.state['step']}")
    # Every rank holds the same model (whatever the collectives).
    check(bits_equal(opt.params, comm.bcast(opt.params.copy(), root=0)), f"{label}: ranks differ")
    # Memory: this rank's state is its shard's; all ranks' together are one process's.
    keys = 3 if kwargs.get("amsgrad") else 2
    itemsize = np.dtype(dtype).itemsize
    check(opt.state_nbytes == (stop - start) * itemsize * keys, f"{label}: state_nbytes {opt.state_nbytes}")
    if p > 1:  # the summed-gradient shard, and fastadam's bounded receive buffer
        limit = (stop - start) * itemsize + max(_collectives.ORDERED_SCRATCH_BYTES, p * 1024 * itemsize)
        check(opt.scratch_nbytes <= limit, f"{label}: scratch_nbytes {opt.scratch_nbytes} > {limit}")
    total_state = comm.allreduce(opt.state_nbytes)
    check(total_state == size * itemsize * keys, f"{label}: total state {total_state}")
    return exact, opt


def scenario_parity():
    """Bit-for-bit parity over dtypes, variants, sizes (uneven and with empty shards) and
    both kinds of collectives; memory per rank."""
    p = WORLD.Get_size()
    mpi_exact = []
    for dtype in (np.float32, np.float64):
        for size in (1037, 20, 5):  # uneven; a short last shard; ranks with empty shards
            for variant in VARIANTS:
                exact, _ = run_parity(WORLD, size, dtype, variant, "fastadam")
                check(exact, f"fastadam n={size} {np.dtype(dtype).name} {variant} not bit-exact")
            exact, _ = run_parity(WORLD, size, dtype, "plain", "mpi", use_flat=False)
            mpi_exact.append(exact)
            if p <= 2:  # one addition per element: any order gives the same bits
                check(exact, f"mpi n={size} {np.dtype(dtype).name} not bit-exact at p={p}")
        exact, _ = run_parity(WORLD, 1037, dtype, "plain", "fastadam", grad_scale=4.0, use_flat=False)
        check(exact, f"grad_scale=4 {np.dtype(dtype).name} not bit-exact")
    # Large enough for several rounds of fastadam's reduce-scatter (the scratch holds 2**24 bytes).
    old = _collectives.ORDERED_SCRATCH_BYTES
    _collectives.ORDERED_SCRATCH_BYTES = 4096
    try:
        exact, opt = run_parity(WORLD, 100_003, np.float32, "plain", "fastadam", steps=2)
    finally:
        _collectives.ORDERED_SCRATCH_BYTES = old
    check(exact, "reduce-scatter in many rounds not bit-exact")
    facts["bounds"] = opt.bounds
    facts["mpi_collectives_bit_exact"] = all(WORLD.allgather(all(mpi_exact)))
    check_order_sensitive_sum()
    scenario_skip_nonfinite()


BF16 = check_element_dtype("bfloat16")


def summed32(grads):
    """The reference of a 16-bit model's reduce-scatter: each gradient widened to float32
    (exactly) and added in rank order, in float32."""
    total = grads[0].astype(np.float32)
    for g in grads[1:]:
        total += g.astype(np.float32)
    return total


def run_half_parity(comm, size, dtype, variant, collectives, steps=3, grad_scale=None):
    """A 16-bit model with float32 master shards vs one process's fastadam.Adam with
    master weights stepped on the float32 rank-order sum (divided by ranks * grad_scale)."""
    p = comm.Get_size()
    kwargs = {"lr": 1e-2, **VARIANTS[variant]}
    initial = np.random.default_rng(size).standard_normal(size).astype(dtype)
    flat = fastadam.FlatParams([(size // 3,), (size - size // 3,)], dtype)
    flat.data[...] = initial if comm.Get_rank() == 0 else np.zeros(size, dtype)  # (broadcast)
    opt = ShardedAdam(flat, comm, collectives=collectives, num_threads=1, master_weights=True, **kwargs)
    reference = initial.copy()
    ref_opt = fastadam.Adam([reference], num_threads=1, master_weights=True, **kwargs)
    for step in range(1, steps + 1):
        grads = rank_grads(step, p, size, dtype)
        flat.grad_data[...] = grads[comm.Get_rank()]
        opt.step(grad_scale=grad_scale)
        ref_opt.step([summed32(grads)], grad_scale=p * (grad_scale or 1.0))
    start, stop = opt.shard
    exact = bits_equal(opt.params, reference)
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param"):
        if key in ref_opt.state[0]:
            exact &= bits_equal(opt.state[key], ref_opt.state[0][key][start:stop])
    label = f"p={p} n={size} {fastadam._validation.type_name(np.dtype(dtype))} {variant} {collectives}"
    check(bits_equal(opt.params, comm.bcast(opt.params.copy(), root=0)), f"{label}: ranks differ")
    keys = 4 if kwargs.get("amsgrad") else 3  # float32 moments and master copy
    check(opt.state_nbytes == (stop - start) * 4 * keys, f"{label}: state_nbytes {opt.state_nbytes}")
    return exact, opt


def scenario_half():
    """bfloat16 and float16 models with float32 master shards: bit-for-bit parity with one
    process, both kinds of collectives, skipping a non-finite step, and (on 3 ranks)
    checkpoints re-sharded 3 -> 2."""
    p, rank = WORLD.Get_size(), WORLD.Get_rank()
    mpi_exact = []
    for dtype in (BF16, np.float16):
        name = fastadam._validation.type_name(np.dtype(dtype))
        for size in (1037, 5):
            for variant in ("plain", "amsgrad-l2", "schedule"):
                exact, _ = run_half_parity(WORLD, size, dtype, variant, "fastadam")
                check(exact, f"fastadam n={size} {name} {variant} not bit-exact")
            exact, _ = run_half_parity(WORLD, size, dtype, "plain", "mpi")
            mpi_exact.append(exact)
            if p <= 2:
                check(exact, f"mpi n={size} {name} not bit-exact at p={p}")
        exact, _ = run_half_parity(WORLD, 1037, dtype, "plain", "fastadam", grad_scale=8.0)
        check(exact, f"grad_scale=8 {name} not bit-exact")
    old = _collectives.ORDERED_SCRATCH_BYTES
    _collectives.ORDERED_SCRATCH_BYTES = 4096  # several rounds of the reduce-scatter
    try:
        exact, opt = run_half_parity(WORLD, 100_003, BF16, "plain", "fastadam", steps=2)
    finally:
        _collectives.ORDERED_SCRATCH_BYTES = old
    check(exact, "bfloat16 reduce-scatter in many rounds not bit-exact")
    facts["half_bounds"] = opt.bounds
    facts["half_mpi_collectives_bit_exact"] = all(WORLD.allgather(all(mpi_exact)))

    # A NaN on the last rank's gradient (in rank 0's shard): every rank skips.
    flat = fastadam.FlatParams([64], BF16)
    flat.data[...] = 1.0
    opt = ShardedAdam(flat, WORLD, lr=0.1, master_weights=True)
    flat.grad_data[...] = 1.0
    opt.step()
    before = flat.data.copy(), {k: np.copy(v) for k, v in opt.state.items()}
    if rank == p - 1:
        flat.grad_data[3] = np.nan
    check(opt.step(skip_if_nonfinite=True) is False, "a bfloat16 NaN step was applied")
    check(bits_equal(flat.data, before[0]) and all(bits_equal(np.asarray(v), np.asarray(before[1][k]))
                                                   for k, v in opt.state.items()),
          "a skipped bfloat16 step changed something")

    if p == 3:  # checkpoint on 3 ranks, continue on 2: the master shards travel with it
        directory = sys.argv[2]
        size = 1037
        kwargs = {"lr": 1e-2, "amsgrad": True}
        initial = np.random.default_rng(0).standard_normal(size).astype(BF16)
        reference = initial.copy()
        ref_opt = fastadam.Adam([reference], num_threads=1, master_weights=True, **kwargs)
        opt3 = ShardedAdam(initial.copy(), WORLD, num_threads=1, master_weights=True, **kwargs)
        for step, ranks in [(1, 3), (2, 3), (3, 2), (4, 2)]:
            grads = rank_grads(step, ranks, size, BF16)
            ref_opt.step([summed32(grads)], grad_scale=float(ranks))
            if ranks == 3:
                opt3.step(grads[rank])
        distributed.save(opt3, directory)
        pair = WORLD.Split(0 if rank < 2 else MPI.UNDEFINED, rank)
        if pair != MPI.COMM_NULL:
            opt2 = ShardedAdam(opt3.params.copy(), pair, num_threads=1, master_weights=True, **kwargs)
            distributed.load(opt2, directory)
            for step in (3, 4):
                opt2.step(rank_grads(step, 2, size, BF16)[rank])
            start, stop = opt2.shard
            check(bits_equal(opt2.params, reference), "bfloat16 3 -> 2 re-sharded run differs")
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param"):
                check(bits_equal(opt2.state[key], ref_opt.state[0][key][start:stop]),
                      f"bfloat16 re-sharded {key} differs")


def check_order_sensitive_sum(size=3 * 2**18):
    """Gradients 1e8, -1e8, 1, 1, ... (float32) on ranks 0, 1, 2, ...: in rank order the sum
    is p - 2, in others it loses the ones. At this size (3 MiB) MPICH's reduce-scatter adds
    in a rank-dependent order; fastadam's must not."""
    p = WORLD.Get_size()
    values = [1e8, -1e8] + [1.0] * (p - 2)
    results = {}
    for collectives in ("fastadam", "mpi"):
        params = np.zeros(size, np.float32)
        opt = ShardedAdam(params, WORLD, lr=0.5, collectives=collectives)
        reference = np.zeros(size, np.float32)
        ref_opt = fastadam.Adam([reference], lr=0.5)
        for _ in range(2):
            grads = [np.full(size, values[r] if r < len(values) else 1.0, np.float32) for r in range(p)]
            opt.step(grads[WORLD.rank])
            ref_opt.step([averaged(grads)])
        results[collectives] = all(WORLD.allgather(bits_equal(params, reference)))
    check(results["fastadam"], "fastadam's reduce-scatter did not add in rank order")
    facts["order_sensitive_sum_bit_exact"] = results


def scenario_skip_nonfinite():
    """A NaN on one rank's gradient: every rank skips, nothing changes anywhere."""
    flat = fastadam.FlatParams([64], np.float32)
    flat.data[...] = 1.0
    opt = ShardedAdam(flat, WORLD, lr=0.1)
    flat.grad_data[...] = 1.0
    opt.step()
    before = flat.data.copy(), {k: np.copy(v) for k, v in opt.state.items()}
    if WORLD.rank == WORLD.size - 1:
        flat.grad_data[3] = np.nan  # lands in rank 0's shard: the others must skip as well
    applied = opt.step(skip_if_nonfinite=True)
    check(applied is False and opt.skipped_steps == 1, f"nonfinite step applied={applied}")
    check(bits_equal(flat.data, before[0]), "a skipped step changed the parameters")
    check(all(bits_equal(np.asarray(v), np.asarray(before[1][k])) for k, v in opt.state.items()),
          "a skipped step changed the state")
    flat.grad_data[...] = 1.0
    check(opt.step(skip_if_nonfinite=True) is True, "a finite step was skipped")


def scenario_checkpoint():
    """Save/load: same rank count exactly; re-shard 2 -> 3 and 3 -> 2; crash safety of the
    index; errors raised on every rank."""
    directory = sys.argv[2]
    p, rank = WORLD.Get_size(), WORLD.Get_rank()
    assert p == 3, "the checkpoint scenario runs on 3 ranks"
    pair = WORLD.Split(0 if rank < 2 else MPI.UNDEFINED, rank)
    size, dtype = 1037, np.float32
    kwargs = {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.01, "decoupled_weight_decay": True}
    initial = np.random.default_rng(0).standard_normal(size).astype(dtype)

    def make(comm):
        return ShardedAdam(initial.copy(), comm, num_threads=1, **kwargs)

    def train(opt, first, last):
        comm_size = opt.world_size
        for step in range(first, last + 1):
            grads = rank_grads(step, comm_size, size, dtype)
            opt.step(grads[opt.rank])

    # The uninterrupted single-process run: steps 1-3 on 2 ranks' gradients, 4-6 on 3
    # ranks', 7-8 on 2 ranks'.
    reference = initial.copy()
    ref_opt = fastadam.Adam([reference], num_threads=1, **kwargs)
    for step, ranks in [(1, 2), (2, 2), (3, 2), (4, 3), (5, 3), (6, 3), (7, 2), (8, 2)]:
        ref_opt.step([averaged(rank_grads(step, ranks, size, dtype))])

    two_to_three = os.path.join(directory, "two")
    if pair != MPI.COMM_NULL:
        opt = make(pair)
        train(opt, 1, 3)
        distributed.save(opt, two_to_three)
        facts["files_saved_by_two"] = sorted(os.listdir(two_to_three)) if rank == 0 else None
        params_after_3 = opt.params.copy()
    params_after_3 = WORLD.bcast(params_after_3 if rank == 0 else None, root=0)

    opt3 = make(WORLD)
    opt3.params[...] = params_after_3  # the model is saved by the user, from any rank
    distributed.load(opt3, two_to_three)
    check(opt3.state["step"] == 3, f"re-sharded step {opt3.state['step']}")
    train(opt3, 4, 6)
    three_to_two = os.path.join(directory, "three")
    distributed.save(opt3, three_to_two)
    distributed.save(opt3, three_to_two)  # a second save replaces the first's files
    if rank == 0:
        names = sorted(os.listdir(three_to_two))
        check(len(names) == 4 and "index.npz" in names, f"files after two saves: {names}")

    # Same rank count: a fresh optimizer continues exactly as the original would.
    same = make(WORLD)
    same.params[...] = opt3.params
    distributed.load(same, three_to_two)
    for key, value in opt3.state.items():
        check(bits_equal(np.asarray(value), np.asarray(same.state[key])), f"same-size load: {key} differs")
    params_after_6 = opt3.params.copy()

    if pair != MPI.COMM_NULL:
        opt2 = make(pair)
        opt2.params[...] = params_after_6
        distributed.load(opt2, three_to_two)
        train(opt2, 7, 8)
        check(bits_equal(opt2.params, reference), "2 -> 3 -> 2 re-sharded run differs from one process")
        start, stop = opt2.shard
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            check(bits_equal(opt2.state[key], ref_opt.state[0][key][start:stop]), f"re-sharded {key} differs")

    # Errors: raised on every rank, nothing changed.
    before = {k: np.copy(v) for k, v in same.state.items()}
    for make_bad, expected in [(lambda: os.path.join(directory, "missing"), FileNotFoundError),
                               (lambda: _corrupt_shard(three_to_two, rank), ValueError)]:
        path = make_bad()
        WORLD.Barrier()
        try:
            distributed.load(same, path)
            check(False, f"loading {path} did not raise")
        except expected as exc:
            facts.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}"[:200])
        check(all(bits_equal(np.asarray(v), before[k]) for k, v in same.state.items()),
              "a failed load changed the state")
    # A save that fails on one rank (disk full, say) fails on every rank, removes its new
    # shard files and leaves the previous checkpoint loadable.
    fresh = os.path.join(directory, "four")
    distributed.save(same, fresh)
    files_before = sorted(os.listdir(fresh))
    same.step(np.ones(size, dtype))
    real_write = _checkpoint.write_npz_atomically
    if rank == 2:
        def full_disk(*args):
            raise OSError("No space left on device")

        _checkpoint.write_npz_atomically = full_disk
    try:
        distributed.save(same, fresh)
        check(False, "a save that failed on rank 2 succeeded")
    except OSError as exc:
        check(rank == 2 or "rank 2 could not write its shard" in str(exc), f"save error: {exc}")
    finally:
        _checkpoint.write_npz_atomically = real_write
    WORLD.Barrier()
    check(sorted(os.listdir(fresh)) == files_before, "a failed save left files behind")
    after_failed_save = make(WORLD)
    distributed.load(after_failed_save, fresh)
    check(after_failed_save.state["step"] == 6, "the previous checkpoint was damaged")

    bigger = ShardedAdam(np.zeros(size + 1, dtype), WORLD)
    try:
        distributed.load(bigger, os.path.join(directory, "two"))
        check(False, "a checkpoint of another model size loaded")
    except ValueError as exc:
        check("1037" in str(exc), f"size mismatch message: {exc}")


def _corrupt_shard(directory, rank):
    if rank == 0:
        names = sorted(n for n in os.listdir(directory) if n.startswith("shard-"))
        with open(os.path.join(directory, names[1]), "r+b") as f:
            f.seek(100)
            f.write(b"garbage" * 10)
    return directory


def scenario_torch():
    """The tensors of a torch model: params become views of the flat block; .grad is read
    (in place, replaced, or None); result bit-exact vs one process."""
    import torch

    torch.manual_seed(0)  # (every rank builds the same model; rank 0's is broadcast anyway)
    model = torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.ReLU(), torch.nn.Linear(17, 3))
    unused = torch.nn.Parameter(torch.ones(5))  # never gets a gradient: counts as zero
    params = list(model.parameters()) + [unused]
    opt = ShardedAdam(params, WORLD, lr=1e-2, num_threads=1)
    flat = opt.flat
    check(all(p.data_ptr() == v.ctypes.data for p, v in zip(params, flat.params)),
          "params are not views of the flat block")
    reference = flat.data.copy()
    ref_opt = fastadam.Adam([reference], lr=1e-2, num_threads=1)
    rng = np.random.default_rng(WORLD.rank)
    for step in range(4):
        if step == 2:
            model.zero_grad(set_to_none=True)  # backward then makes new .grad tensors
        else:
            model.zero_grad(set_to_none=False)
        x = torch.from_numpy(rng.standard_normal((8, 13)).astype(np.float32))
        model(x).square().mean().backward()
        opt.step()
        grads = WORLD.allgather(flat.grad_data.copy())
        ref_opt.step([averaged(grads)])
    check(bits_equal(flat.data, reference), "torch parameters differ from one process")
    check(bits_equal(model[0].weight.detach().numpy().reshape(-1), flat.params[0].reshape(-1)),
          "model weights are not the flat block")
    check(float(np.abs(flat.grads[-1]).max()) == 0.0, "the unused parameter got a gradient")
    try:
        model[0].weight.data = model[0].weight.data.clone()
        opt.step()
        check(False, "a parameter moved out of the flat block was accepted")
    except ValueError as exc:
        check("params[0]" in str(exc), f"message: {exc}")


def scenario_torch_half():
    """A bfloat16 torch model: its params become bfloat16 views of the flat block, its
    bfloat16 .grad is read, and the result is bit-exact vs one process with master weights."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.ReLU(),
                                torch.nn.Linear(17, 3)).to(torch.bfloat16)
    params = list(model.parameters())
    opt = ShardedAdam(params, WORLD, lr=1e-2, num_threads=1, master_weights=True)
    flat = opt.flat
    check(flat.dtype == BF16 and all(p.dtype == torch.bfloat16 for p in params),
          f"flat block {flat.dtype}, params {[p.dtype for p in params]}")
    check(all(p.data_ptr() == v.ctypes.data for p, v in zip(params, flat.params)),
          "bfloat16 params are not views of the flat block")
    reference = flat.data.copy()
    ref_opt = fastadam.Adam([reference], lr=1e-2, num_threads=1, master_weights=True)
    rng = np.random.default_rng(WORLD.rank)
    for step in range(3):
        model.zero_grad(set_to_none=step == 1)
        x = torch.from_numpy(rng.standard_normal((8, 13)).astype(np.float32)).to(torch.bfloat16)
        model(x).float().square().mean().backward()
        opt.step()
        grads = WORLD.allgather(flat.grad_data.copy())
        ref_opt.step([summed32(grads)], grad_scale=float(WORLD.size))
    check(bits_equal(flat.data, reference), "bfloat16 torch parameters differ from one process")
    weight = model[0].weight.detach().view(torch.int16).numpy().reshape(-1)
    check(bits_equal(weight, flat.params[0].reshape(-1).view(np.int16)),
          "the model's bfloat16 weights are not the flat block")


def scenario_disagree():
    """One rank's bad argument, or a setting that differs between ranks, raises on EVERY
    rank (naming the rank) instead of leaving the others in a collective forever; then
    the ranks are still in step: nothing changed, and a good step works (issue 19, item 3).
    The test runs this under a timeout: a hang fails it."""
    p, rank = WORLD.Get_size(), WORLD.Get_rank()
    bad = 1  # the rank that differs
    messages = {}

    def expect(label, action, kind, *mentions, everywhere=()):
        """``action`` must raise ``kind`` on this rank; the message must name ``mentions``
        (and, on the other ranks, ``everywhere``: the failing rank)."""
        try:
            action()
            check(False, f"{label}: nothing raised")
        except kind as exc:
            text = str(exc)
            messages[label] = text[:400]
            for word in mentions + (everywhere if rank != bad else ()):
                check(word in text, f"{label}: {word!r} not in {text!r}")
        except Exception as exc:  # the wrong kind
            check(False, f"{label}: {type(exc).__name__}: {exc}")

    size = 1037
    expect("lr=-1 on one rank", lambda: ShardedAdam(np.zeros(size, np.float32), WORLD,
                                                     lr=-1.0 if rank == bad else 0.1),
           ValueError, "lr", everywhere=(f"rank {bad}",))
    expect("lr differs", lambda: ShardedAdam(np.zeros(size, np.float32), WORLD,
                                              lr=9.99 if rank == bad else 0.1),
           ValueError, "lr", f"rank {bad}: ", "9.99")
    expect("model size differs", lambda: ShardedAdam(np.zeros(size + (rank == bad), np.float32), WORLD),
           ValueError, "params", f"rank {bad}: ")
    expect("collectives differ", lambda: ShardedAdam(
        np.zeros(size, np.float32), WORLD, collectives="mpi" if rank == bad else "fastadam"),
        ValueError, "collectives")
    expect("lr beyond float32 on one rank", lambda: ShardedAdam(
        np.zeros(size, np.float32), WORLD, lr=1e39 if rank == bad else 0.1),
        ValueError, "lr", everywhere=(f"rank {bad}",))

    params = np.zeros(size, np.float32)
    opt = ShardedAdam(params, WORLD, lr=0.1, num_threads=1)
    reference = np.zeros(size, np.float32)
    ref_opt = fastadam.Adam([reference], lr=0.1, num_threads=1)
    grads = rank_grads(1, p, size, np.float32)
    opt.step(grads[rank])
    ref_opt.step([averaged(grads)])
    before = params.copy(), {k: np.copy(v) for k, v in opt.state.items()}
    good = rank_grads(2, p, size, np.float32)
    mine = good[rank]
    expect("bad grads on one rank", lambda: opt.step(mine.astype(np.float64) if rank == bad else mine),
           TypeError, "grads", everywhere=(f"rank {bad}",))
    expect("short grads on one rank", lambda: opt.step(mine[:-1] if rank == bad else mine),
           ValueError, "grads", everywhere=(f"rank {bad}",))
    expect("skip_if_nonfinite differs", lambda: opt.step(mine, skip_if_nonfinite=rank == bad),
           ValueError, "skip_if_nonfinite")
    expect("grad_scale differs", lambda: opt.step(mine, grad_scale=2.0 if rank == bad else None),
           ValueError, "grad_scale")
    opt.param_groups[0]["lr"] = 9.99 if rank == bad else 0.1
    expect("lr edited on one rank", lambda: opt.step(mine), ValueError, "lr", "9.99")
    opt.param_groups[0]["lr"] = -1.0 if rank == bad else 0.1
    expect("lr=-1 edited on one rank", lambda: opt.step(mine), ValueError, "lr",
           everywhere=(f"rank {bad}",))
    opt.param_groups[0]["lr"] = 0.1
    check(bits_equal(params, before[0]), "a refused step changed the parameters")
    check(all(bits_equal(np.asarray(v), np.asarray(before[1][k])) for k, v in opt.state.items()),
          "a refused step changed the state")
    opt.step(mine)  # the ranks are still in step
    ref_opt.step([averaged(good)])
    check(bits_equal(params, reference), "the step after the refused ones differs from one process")

    # A malformed checkpoint index (rank 0 alone reads it): every rank raises ValueError.
    directory = sys.argv[2]
    distributed.save(opt, directory)
    if rank == 0:
        header, _ = _npz.read_npz(os.path.join(directory, _checkpoint.INDEX))
        header["bounds"] = list(range(p))  # ints, not [start, stop] pairs
        _npz.write_npz_atomically(os.path.join(directory, _checkpoint.INDEX), header, {})
    WORLD.Barrier()
    expect("malformed index", lambda: distributed.load(opt, directory), ValueError, "bounds")
    distributed.save(opt, directory)  # a good checkpoint again
    expect("bad directory on one rank", lambda: distributed.load(opt, 5 if rank == bad else directory),
           (TypeError, ValueError), everywhere=(f"rank {bad}",))
    facts["messages"] = WORLD.gather(messages, root=0)


if __name__ == "__main__":
    scenario = sys.argv[1]
    try:
        globals()[f"scenario_{scenario}"]()
    except Exception as exc:  # report it with the others (and leave the collectives together)
        import traceback

        failures.append(f"rank {WORLD.rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    everything = [f for per_rank in WORLD.allgather(failures) for f in per_rank]
    if WORLD.rank == 0:
        print(json.dumps({"failures": everything, "world_size": WORLD.size, **facts}))
    sys.stdout.flush()
    sys.exit(1 if everything else 0)
