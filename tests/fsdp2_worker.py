"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with fastadam.torch, on a CPU device mesh
with the gloo backend, in processes of their own. tests/test_torch_fsdp2.py runs

    python tests/fsdp2_worker.py RANKS SCENARIO DIR

which starts RANKS processes (torch.multiprocessing, rendezvous through a file in DIR),
runs SCENARIO on each, and prints one JSON line: ``{"world_size": RANKS, "failures": [...]}``
(each failure names its rank). A rank that raises makes the whole run exit non-zero.

Scenarios:

* ``parity``: fastadam.torch.Adam/AdamW against torch.optim.Adam/AdamW(fused=True) in the
  same FSDP2 run, float32 and float64, with ``clip_grad_norm_``, under
  ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``, with bfloat16 and float16 sharded
  parameters (and float32 master copies, ``master_weights=True``), and as HSDP (a 2-D mesh, replicated
  along one dimension, sharded along the other): every rank's shards of the
  parameters and of the state, bit for bit, after every step; the state's types and
  placements; the shards updated in place, one kernel call per step.
* ``checkpoint`` (2 ranks): ``torch.distributed.checkpoint`` save and load of fastadam's
  state; continuing equals an uninterrupted run bit for bit; a fastadam checkpoint
  continued by torch's AdamW, and torch's continued by fastadam. Leaves DIR/fastadam (a
  checkpoint) and DIR/saved_state.pt (its full optimizer state) for ``reshard``.
* ``reshard`` (3 ranks): the 2-rank checkpoint loaded onto 3 ranks holds the saved state,
  and fastadam and torch's AdamW, both loaded from it, continue bit-identically.
* ``refusals``: bad input raises the same clear error on every rank (no rank is left
  waiting in a collective) and changes nothing.

The model has uneven shards on 2 ranks, and on 3 ranks one rank's shards of its last
layer are empty. tests/conftest.py's ATEN_CPU_CAPABILITY=default reaches the ranks
through the environment (fastadam's default numerics are then "exact").
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

import fastadam.torch as fat

FAILURES = []


def check(condition, message):
    if not condition:
        FAILURES.append(f"rank {dist.get_rank()}: {message}")


def same_bits(a, b):
    a = a._local_tensor if isinstance(a, DTensor) else a
    b = b._local_tensor if isinstance(b, DTensor) else b
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.detach().reshape(-1).view(torch.uint8),
                            b.detach().reshape(-1).view(torch.uint8)))


# --- the model and its training ---------------------------------------------------------


def build(mesh, dtype=torch.float32, seed=0, mp_policy=None):
    """The same model on every rank (seeded), each Linear and the root fully sharded."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.LayerNorm(9),
                                torch.nn.Linear(9, 2)).to(dtype)
    kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    for layer in (model[0], model[3]):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def batch(step, dtype):
    """This rank's data for a step (each rank its own)."""
    generator = torch.Generator().manual_seed(1000 * dist.get_rank() + step)
    return torch.randn(5, 6, generator=generator).to(dtype)


def train(model, opt, steps, dtype=torch.float32, after_each=None):
    for step in steps:
        loss = model(batch(step, dtype)).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # on DTensor gradients
        opt.step()
        opt.zero_grad()
        if after_each is not None:
            after_each(step)


def compare(label, model_a, opt_a, model_b, opt_b):
    """This rank's shards of the parameters and of the state, bit for bit."""
    for k, (pa, pb) in enumerate(zip(model_a.parameters(), model_b.parameters())):
        check(same_bits(pa, pb), f"{label}: parameter {k} differs")
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        check(set(sa) == set(sb), f"{label}: parameter {k} has state {sorted(sa)}, torch {sorted(sb)}")
        for key in set(sa) & set(sb):
            check(same_bits(sa[key], sb[key]), f"{label}: {key} of parameter {k} differs")


def save(path, model, opt):
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(path))


def load(path, model, opt):
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def full_state(model, opt):
    """The whole optimizer state (every rank's shards gathered) on the CPU."""
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))


def count_engine_calls(engine):
    """Wrap an engine's step entry points to count calls (the kernels run once per call)."""
    calls = {"step": 0, "step_pointers": 0}
    for name in calls:
        method = getattr(engine, name)

        def counted(*args, _name=name, _method=method, **kwargs):
            calls[_name] += 1
            return _method(*args, **kwargs)
        setattr(engine, name, counted)
    return calls


# --- scenarios ---------------------------------------------------------------------------

CASES = [  # (fastadam class, torch class, hyperparameters)
    (fat.AdamW, torch.optim.AdamW, dict(lr=1e-2)),
    (fat.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True)),
]


def scenario_parity(mesh, directory):
    steps = range(5)
    for dtype in (torch.float32, torch.float64):
        for fast_class, torch_class, hyper in CASES:
            label = f"{fast_class.__name__} {dtype}"
            ours, theirs = build(mesh, dtype), build(mesh, dtype)
            opt = fast_class(ours.parameters(), **hyper)
            reference = torch_class(theirs.parameters(), fused=True, **hyper)
            shards = [p._local_tensor.data_ptr() for p in ours.parameters()]
            calls = {}

            def after(step, ours=ours, opt=opt, theirs=theirs, reference=reference, calls=calls,
                      label=label):
                compare(f"{label}, step {step}", ours, opt, theirs, reference)
                if step == 0:  # the first step registers; count the kernel calls after it
                    calls.update(engine=count_engine_calls(opt._front.engine))

            for step in steps:  # the two runs interleaved: the same collectives in order
                train(theirs, reference, [step], dtype)
                train(ours, opt, [step], dtype, after)
            check(calls["engine"] == {"step": 0, "step_pointers": len(steps) - 1},
                  f"{label}: engine calls after the first step {calls['engine']}, expected one "
                  "compiled-gather call per step")
            check(shards == [p._local_tensor.data_ptr() for p in ours.parameters()],
                  f"{label}: a parameter's local shard moved (not updated in place)")
            engine = opt._front.engine
            for i, p in enumerate(ours.parameters()):
                state = opt.state[p]
                check(type(state["step"]) is torch.Tensor, f"{label}: step is {type(state['step'])}")
                for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hyper.get("amsgrad") else ()):
                    value = state[key]
                    check(isinstance(value, DTensor) and value.placements == p.placements
                          and value.device_mesh is p.device_mesh and value.shape == p.shape,
                          f"{label}: {key} of parameter {i} is not a DTensor sharded like it")
                    check(value._local_tensor.numel() == 0 or value._local_tensor.data_ptr()
                          == engine.state[i][key].ctypes.data,
                          f"{label}: {key} of parameter {i} is not a view of the engine's state")
    for policy in (MixedPrecisionPolicy(param_dtype=torch.bfloat16),
                   MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)):
        ours = twin_runs(str(policy), lambda policy=policy: build(mesh, mp_policy=policy), steps)
        check(all(p.dtype == torch.float32 for p in ours.parameters()),
              f"{policy}: the sharded parameters are not float32")
    # 16-bit sharded parameters (the model converted before fully_shard), as torch's fused
    # AdamW updates them; and with float32 master copies, which the parameters follow
    for dtype in (torch.bfloat16, torch.float16):
        twin_runs(f"{dtype} parameters", lambda dtype=dtype: build(mesh, dtype), steps, dtype)
    ours = build(mesh, torch.bfloat16)
    opt = fat.AdamW(ours.parameters(), lr=1e-2, master_weights=True)
    train(ours, opt, steps, torch.bfloat16)
    for i, p in enumerate(ours.parameters()):
        master = opt.state[p]["master_param"]
        check(isinstance(master, DTensor) and master.dtype == torch.float32
              and master.placements == p.placements and master.shape == p.shape,
              f"master_weights: master_param of parameter {i} is not a float32 DTensor like it")
        check(same_bits(p._local_tensor, master._local_tensor.to(torch.bfloat16)),
              f"master_weights: parameter {i} is not its master rounded")
    # HSDP: a 2-D mesh, parameters replicated along one dimension and sharded along the other
    hsdp = init_device_mesh("cpu", (dist.get_world_size(), 1), mesh_dim_names=("replicate", "shard"))
    ours = twin_runs("HSDP", lambda: build(hsdp), steps)
    check(all(p.placements == (Replicate(), Shard(0)) for p in ours.parameters()),
          f"HSDP: placements {[p.placements for p in ours.parameters()]}")


def twin_runs(label, make, steps, dtype=torch.float32):
    """fastadam.torch.AdamW and torch's fused AdamW on two models from ``make``, compared
    after every step; returns fastadam's model."""
    ours, theirs = make(), make()
    opt = fat.AdamW(ours.parameters(), lr=1e-2)
    reference = torch.optim.AdamW(theirs.parameters(), lr=1e-2, fused=True)
    for step in steps:
        train(theirs, reference, [step], dtype)
        train(ours, opt, [step], dtype)
        compare(f"{label}, step {step}", ours, opt, theirs, reference)
    return ours


K, M = 3, 3  # steps before the checkpoint, steps after it


def scenario_checkpoint(mesh, directory):
    # fastadam: save after K steps, continue M; a fresh model and optimizer (other
    # initial values, which the load replaces) resume from the checkpoint
    model = build(mesh)
    opt = fat.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, opt, range(K))
    save(directory / "fastadam", model, opt)
    saved = full_state(model, opt)
    if dist.get_rank() == 0:
        torch.save(saved, directory / "saved_state.pt")
    train(model, opt, range(K, K + M))
    for label, opt_class, kwargs in (("fastadam -> fastadam", fat.AdamW, {}),
                                     ("fastadam -> torch", torch.optim.AdamW, {"fused": True})):
        resumed = build(mesh, seed=1)
        resumed_opt = opt_class(resumed.parameters(), lr=1e-2, weight_decay=0.1, **kwargs)
        load(directory / "fastadam", resumed, resumed_opt)
        train(resumed, resumed_opt, range(K, K + M))
        compare(label, model, opt, resumed, resumed_opt)
    # torch's checkpoint, resumed by fastadam
    theirs = build(mesh)
    reference = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    train(theirs, reference, range(K))
    save(directory / "torch", theirs, reference)
    train(theirs, reference, range(K, K + M))
    ours = build(mesh, seed=1)
    opt = fat.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1)
    load(directory / "torch", ours, opt)
    train(ours, opt, range(K, K + M))
    compare("torch -> fastadam", ours, opt, theirs, reference)


def scenario_reshard(mesh, directory):
    """Run on another number of ranks than ``checkpoint``, from its files."""
    ours = build(mesh, seed=1)
    opt = fat.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1)
    load(directory / "fastadam", ours, opt)
    loaded = full_state(ours, opt)  # (collective; rank 0 gets it)
    saved = torch.load(directory / "saved_state.pt") if dist.get_rank() == 0 else {"state": {}}
    check(dist.get_rank() != 0 or len(saved["state"]) == 6, "the saved state is not the model's")
    for name, state in saved["state"].items():
        for key, value in state.items():
            check(same_bits(loaded["state"][name][key], value),
                  f"re-sharded load: {key} of {name} differs from the saved state")
    theirs = build(mesh, seed=1)
    reference = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    load(directory / "fastadam", theirs, reference)
    train(ours, opt, range(K, K + M))
    train(theirs, reference, range(K, K + M))
    compare("re-sharded, fastadam against torch", ours, opt, theirs, reference)


def refused(label, action, error, text, model=None, opt=None):
    """``action`` raises ``error`` mentioning ``text`` on this rank, the same message on
    every rank (gathered: every rank got here), and the model and state are unchanged."""
    before = [t.clone() for t in _tensors(model, opt)]
    message = None
    try:
        action()
    except error as exc:
        message = str(exc)
    check(message is not None and text in message, f"{label}: raised {message!r}")
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    check(len(set(messages)) == 1, f"{label}: the ranks raised different errors {messages}")
    check(all(same_bits(a, b) for a, b in zip(before, _tensors(model, opt))),
          f"{label}: a refused call changed the model or the state")


def _tensors(model, opt):
    if model is None:
        return []
    out = [p._local_tensor for p in model.parameters()]
    for p in model.parameters():
        out += [getattr(v, "_local_tensor", v) for v in opt.state.get(p, {}).values()]
    return out


def scenario_refusals(mesh, directory):
    model = build(mesh)
    params = list(model.parameters())
    refused("plain and DTensor parameters",
            lambda: fat.AdamW(params + [torch.nn.Parameter(torch.zeros(3))]), TypeError,
            "is a DTensor and param_groups[0]['params'][6] a plain tensor")
    opt = fat.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, range(1))
    model(batch(1, torch.float32)).sum().backward()
    grad = params[0].grad
    params[0].grad = grad.redistribute(grad.device_mesh, [Replicate()])  # collective, every rank
    refused("a gradient sharded unlike its parameter", opt.step, ValueError,
            "the gradient of param_groups[0]['params'][0] has placements (Replicate(),)",
            model, opt)
    params[0].grad = grad
    exp_avg = opt.state[params[1]]["exp_avg"]
    opt.state[params[1]]["exp_avg"] = exp_avg.to_local().clone()
    refused("state that is not a DTensor", opt.step, TypeError,
            "opt.state[param_groups[0]['params'][1]]['exp_avg'] is a Tensor, not a DTensor",
            model, opt)
    opt.state[params[1]]["exp_avg"] = exp_avg
    opt.step()  # the same gradient, accepted once the state is right again
    partial = torch.nn.Parameter(DTensor.from_local(torch.ones(4), mesh, [Partial()]))
    partial.grad = DTensor.from_local(torch.ones(4), mesh, [Partial()])
    refused("a Partial parameter", fat.Adam([partial]).step, TypeError,
            "is a DTensor with placements (Partial(sum),)")
    meta = torch.nn.Parameter(DTensor.from_local(torch.zeros(4, device="meta"), mesh, [Shard(0)],
                                                 shape=(8,), stride=(1,)))
    meta.grad = torch.zeros_like(meta)
    refused("a shard not in CPU memory", fat.Adam([meta]).step, TypeError,
            "is a DTensor whose local shard is on meta (device mesh of type 'cpu')")


SCENARIOS = {"parity": scenario_parity, "checkpoint": scenario_checkpoint,
             "reshard": scenario_reshard, "refusals": scenario_refusals}


def run(rank, world_size, scenario, directory, rendezvous):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        SCENARIOS[scenario](mesh, Path(directory))
        reports = [None] * world_size
        dist.all_gather_object(reports, FAILURES)
        if rank == 0:
            failures = [f for report in reports for f in report]
            print(json.dumps({"world_size": world_size, "failures": failures}), flush=True)
    finally:
        dist.destroy_process_group()
    # Every check has been reported: leave without the interpreter's finalization, which
    # gloo's threads have aborted on a loaded machine ("terminate called without an active
    # exception", SIGABRT), failing a run whose report was clean.
    sys.stdout.flush()
    os._exit(0)


def main():
    world_size, scenario, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    with tempfile.TemporaryDirectory() as scratch:
        mp.spawn(run, args=(world_size, scenario, directory, f"{scratch}/rendezvous"),
                 nprocs=world_size)


if __name__ == "__main__":
    main()
