"""torch's fused CPU Adam at the CPU capability torch picks, in a process of its own.

tests/conftest.py sets ATEN_CPU_CAPABILITY=default before torch is imported, so the test
process cannot run torch's AVX2/AVX-512 kernels. tests/test_numerics_torch.py runs this
file as a script, with ATEN_CPU_CAPABILITY removed from the environment (torch's own
choice) or set to "avx2"/"avx512", and compares fastadam's ``numerics="torch"`` with what
it writes:

    python tests/torch_native_worker.py CASES.json OUT.npz

CASES.json is a list of cases (see ``CASES`` in the test module); OUT.npz holds, per case
k, the final ``{k}_param``, ``{k}_exp_avg``, ``{k}_exp_avg_sq`` (and ``{k}_max_exp_avg_sq``),
as arrays, or as SHA-256 digests of their bytes (``{k}_digest_*``) for cases marked
"digest" (a million elements would make the file large), plus ``capability``.

The inputs are made by ``make_inputs``, which the test imports too: this module imports
neither torch nor conftest at import time (conftest would set ATEN_CPU_CAPABILITY).
"""

import hashlib
import json
import sys

import numpy as np


def make_inputs(case):
    """(param, exp_avg, exp_avg_sq, max_exp_avg_sq or None, [grad per step]) of a case:
    random non-zero state, so the first step already exercises every operation."""
    rng = np.random.default_rng(case["seed"])
    size, dtype = case["size"], np.dtype(case["dtype"])
    param = rng.standard_normal(size).astype(dtype)
    exp_avg = (0.1 * rng.standard_normal(size)).astype(dtype)
    exp_avg_sq = (0.01 * rng.random(size)).astype(dtype)
    vmax = (exp_avg_sq * rng.uniform(0.5, 1.5, size)).astype(dtype) if case["amsgrad"] else None
    # the gradients as the caller hands them over: scaled by grad_scale (loss scaling)
    grads = [(rng.standard_normal(size) * case["grad_scale"]).astype(dtype)
             for _ in range(case["steps"])]
    if case.get("nonfinite"):  # NaN and +-Inf gradients, NaN already in max_exp_avg_sq
        for t, grad in enumerate(grads):
            grad[t::5] = np.nan
            grad[t + 1::7] = np.inf
            grad[t + 2::11] = -np.inf
        if vmax is not None:
            vmax[::13] = np.nan
    return param, exp_avg, exp_avg_sq, vmax, grads


def digest(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def run_torch(torch, case):
    """The case's steps through torch._fused_adam_/_fused_adamw_, the kernel of
    torch.optim.Adam/AdamW(fused=True) on the CPU."""
    param, exp_avg, exp_avg_sq, vmax, grads = make_inputs(case)
    state = [torch.from_numpy(x) for x in (param, exp_avg, exp_avg_sq)]
    vmax_t = [torch.from_numpy(vmax)] if vmax is not None else []
    step_t = torch.full((), case.get("step_offset", 0), dtype=torch.float32)
    kernel = torch._fused_adamw_ if case["decoupled_weight_decay"] else torch._fused_adam_
    grad_scale = None
    if case["grad_scale"] != 1.0:
        grad_scale = torch.tensor(case["grad_scale"], dtype=torch.float32)
    for grad in grads:
        step_t += 1
        kernel([state[0]], [torch.from_numpy(grad.copy())], [state[1]], [state[2]], vmax_t,
               [step_t], lr=case["lr"], beta1=case["beta1"], beta2=case["beta2"],
               weight_decay=case["weight_decay"], eps=case["eps"], amsgrad=case["amsgrad"],
               maximize=case["maximize"], grad_scale=grad_scale, found_inf=None)
    return [param, exp_avg, exp_avg_sq] + ([vmax] if vmax is not None else [])


def run_optimizer(torch, case):
    """torch.optim.Adam/AdamW(fused=True) itself, from zero state, on several tensors of
    different sizes (each its own tail)."""
    rng = np.random.default_rng(case["seed"])
    dtype = np.dtype(case["dtype"])
    params = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(n).astype(dtype)))
              for n in case["sizes"]]
    cls = torch.optim.AdamW if case["decoupled_weight_decay"] else torch.optim.Adam
    opt = cls(params, lr=case["lr"], betas=(case["beta1"], case["beta2"]), eps=case["eps"],
              weight_decay=case["weight_decay"], amsgrad=case["amsgrad"],
              maximize=case["maximize"], fused=True)
    for _ in range(case["steps"]):
        for p in params:
            p.grad = torch.from_numpy(rng.standard_normal(p.numel()).astype(dtype))
        opt.step()
    out = []
    for p in params:
        state = opt.state[p]
        out += [p.detach().numpy(), state["exp_avg"].numpy(), state["exp_avg_sq"].numpy()]
        if case["amsgrad"]:
            out.append(state["max_exp_avg_sq"].numpy())
    return out


def run_training(torch, case):
    """A small MLP trained in this process (so the gradients come from torch's kernels at
    this capability) twice from the same start: with torch.optim.Adam/AdamW(fused=True),
    and with fastadam.adam_step(numerics="torch") on each parameter tensor. Returns the
    parameters of both runs, torch's first."""
    import fastadam

    torch.manual_seed(case["seed"])
    dtype = getattr(torch, case["dtype"])
    model = torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(),
                                torch.nn.Linear(37, 5)).to(dtype)
    twin = torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(),
                               torch.nn.Linear(37, 5)).to(dtype)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(64, 13, dtype=dtype), torch.randn(64, 5, dtype=dtype)
    cls = torch.optim.AdamW if case["decoupled_weight_decay"] else torch.optim.Adam
    opt = cls(model.parameters(), lr=case["lr"], betas=(case["beta1"], case["beta2"]),
              eps=case["eps"], weight_decay=case["weight_decay"], amsgrad=case["amsgrad"],
              maximize=case["maximize"], fused=True)
    state = {p: [torch.zeros_like(p) for _ in range(3 if case["amsgrad"] else 2)]
             for p in twin.parameters()}
    for step in range(1, case["steps"] + 1):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        twin.zero_grad()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        for p in twin.parameters():
            moments = [t.numpy() for t in state[p]]
            fastadam.adam_step(p.detach().numpy(), p.grad.numpy(), moments[0], moments[1],
                               max_exp_avg_sq=moments[2] if case["amsgrad"] else None,
                               step=step, lr=case["lr"], beta1=case["beta1"],
                               beta2=case["beta2"], eps=case["eps"],
                               weight_decay=case["weight_decay"],
                               decoupled_weight_decay=case["decoupled_weight_decay"],
                               maximize=case["maximize"], numerics="torch")
    return ([p.detach().numpy() for p in model.parameters()]
            + [p.detach().numpy() for p in twin.parameters()])


def main(argv):
    import torch  # here, after the caller chose ATEN_CPU_CAPABILITY

    with open(argv[1]) as f:
        cases = json.load(f)
    out = {"capability": np.array(torch.backends.cpu.get_cpu_capability())}
    threads = torch.get_num_threads()
    for k, case in enumerate(cases):
        # all threads for the large cases (torch splits a tensor among them); one for the
        # small ones, where forking an OpenMP team per call on a busy machine costs ~10 ms
        torch.set_num_threads(threads if case["size"] >= 65536 else 1)
        if case.get("train"):
            results = run_training(torch, case)
        elif "sizes" in case:
            results = run_optimizer(torch, case)
        else:
            results = run_torch(torch, case)
        for j, array in enumerate(results):
            if case.get("digest"):
                out[f"{k}_digest_{j}"] = np.array(digest(array))
            else:
                out[f"{k}_{j}"] = array
    np.savez(argv[2], **out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
