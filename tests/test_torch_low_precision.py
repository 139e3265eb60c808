"""fastadam.torch on bfloat16 and float16 models (issue 20): bit parity with
torch.optim.Adam/AdamW(fused=True), master weights, stochastic rounding, state dicts."""

import copy
import itertools
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
import fastadam.torch as ft  # noqa: E402

from conftest import default_capability_mark  # noqa: E402

LOW = [torch.bfloat16, torch.float16]
FLAGS = list(itertools.product([ft.Adam, ft.AdamW], [False, True], [False, True], [0.0, 0.1]))


def model(dtype, seed=0):
    torch.manual_seed(seed)
    # 8*3*3*3 + 8 + 10*8*6*6 + 10 elements: tensors with and without torch's scalar tail
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 6 * 6, 10))
    return net.to(dtype)


def train(net, opt, steps=5, dtype=None, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, dtype=dtype or next(net.parameters()).dtype)
    for _ in range(steps):
        opt.zero_grad()
        net(x).float().pow(2).mean().backward()
        opt.step()


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16) if a.element_size() == 2 else a,
                                              b.view(torch.int16) if b.element_size() == 2 else b)


def torch_twin(cls):
    return torch.optim.AdamW if cls is ft.AdamW else torch.optim.Adam


@default_capability_mark(torch)
@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("cls, amsgrad, maximize, weight_decay", FLAGS,
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_16bit_models_train_bit_identical_to_torch_fused(dtype, cls, amsgrad, maximize,
                                                         weight_decay):
    ours, theirs = model(dtype), model(dtype)
    kwargs = dict(lr=1e-2, amsgrad=amsgrad, maximize=maximize, weight_decay=weight_decay)
    opt = cls(ours.parameters(), **kwargs)
    reference = torch_twin(cls)(theirs.parameters(), fused=True, **kwargs)
    train(ours, opt)
    train(theirs, reference)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert same_bits(p, q)
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            assert same_bits(opt.state[p][key], reference.state[q][key])
        assert float(opt.state[p]["step"]) == float(reference.state[q]["step"])


def test_16bit_models_are_bit_identical_at_the_capability_torch_picks():
    """In a process of its own, without conftest's ATEN_CPU_CAPABILITY=default: the
    "torch" numerics profile against torch's AVX2/AVX-512 fused kernel."""
    code = textwrap.dedent("""
        import itertools, sys, torch
        sys.path.insert(0, sys.argv[1])
        import fastadam.torch as ft
        from test_torch_low_precision import FLAGS, LOW, model, train, same_bits, torch_twin
        bad = []
        for dtype, (cls, amsgrad, maximize, wd) in itertools.product(LOW, FLAGS):
            kwargs = dict(lr=1e-2, amsgrad=amsgrad, maximize=maximize, weight_decay=wd)
            ours, theirs = model(dtype), model(dtype)
            opt = cls(ours.parameters(), **kwargs)
            ref = torch_twin(cls)(theirs.parameters(), fused=True, **kwargs)
            train(ours, opt); train(theirs, ref)
            if not all(same_bits(p, q) and same_bits(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])
                       for p, q in zip(ours.parameters(), theirs.parameters())):
                bad.append((str(dtype), cls.__name__, amsgrad, maximize, wd))
        print(torch.backends.cpu.get_cpu_capability(), ft.default_numerics(), bad)
    """)
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    tests = os.path.dirname(__file__)
    env["PYTHONPATH"] = os.pathsep.join([tests] + [p for p in (env.get("PYTHONPATH"),) if p])
    out = subprocess.run([sys.executable, "-c", code, tests], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    capability, numerics, bad = out.stdout.split(maxsplit=2)
    assert bad.strip() == "[]", out.stdout


@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("cls", [ft.Adam, ft.AdamW])
def test_master_weights_equal_float32_fused_adam_on_upcast_grads(dtype, cls):
    ours = model(dtype)
    master = copy.deepcopy(ours).float()
    opt = cls(ours.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True, master_weights=True)
    reference = torch_twin(cls)(master.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True,
                                fused=True)
    torch.manual_seed(3)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(4):
        opt.zero_grad()
        ours(x.to(dtype)).float().pow(2).mean().backward()
        for p, q in zip(ours.parameters(), master.parameters()):
            q.grad = p.grad.float()
        opt.step()
        reference.step()
        for p, q in zip(ours.parameters(), master.parameters()):
            assert same_bits(opt.state[p]["master_param"], q.detach())
            assert same_bits(p.detach(), q.detach().to(dtype))   # param.copy_(master)
            assert same_bits(opt.state[p]["exp_avg"], reference.state[q]["exp_avg"])


def test_master_weights_state_dict_resumes_bit_identically(tmp_path):
    net = model(torch.bfloat16)
    opt = ft.AdamW(net.parameters(), lr=1e-2, master_weights=True)
    train(net, opt, steps=2)
    path = tmp_path / "opt.pt"
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, path)
    saved = torch.load(path)
    assert saved["opt"]["state"][0]["master_param"].dtype == torch.float32
    again = model(torch.bfloat16, seed=9)
    again.load_state_dict(saved["model"])
    resumed = ft.AdamW(again.parameters(), lr=1e-2, master_weights=True)
    resumed.load_state_dict(saved["opt"])
    train(net, opt, steps=3, seed=4)
    train(again, resumed, steps=3, seed=4)
    for p, q in zip(net.parameters(), again.parameters()):
        assert same_bits(p, q)
        assert same_bits(opt.state[p]["master_param"], resumed.state[q]["master_param"])


def test_a_torch_state_dict_without_masters_starts_them_from_the_params():
    net = model(torch.bfloat16)
    source = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True)
    train(net, source, steps=1)
    saved = source.state_dict()
    for entry in saved["state"].values():  # master weights keep float32 moments
        for key in ("exp_avg", "exp_avg_sq"):
            entry[key] = entry[key].float()
    opt = ft.AdamW(net.parameters(), lr=1e-2, master_weights=True)
    opt.load_state_dict(saved)
    train(net, opt, steps=1)
    for p in net.parameters():
        master = opt.state[p]["master_param"]
        assert master.dtype == torch.float32 and same_bits(p.detach(), master.to(torch.bfloat16))


def test_master_weights_refuse_float32_parameters_by_name():
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] has dtype "
                                        r"torch.float32 .*master_weights=True keeps float32 masters"):
        ft.Adam(torch.nn.Linear(3, 2).parameters(), master_weights=True)


def test_stochastic_rounding_is_reproducible_and_moves_small_updates():
    def run(seed):
        net = model(torch.bfloat16)
        opt = ft.Adam(net.parameters(), lr=1e-5, stochastic_rounding=True, seed=seed)
        before = [p.detach().clone() for p in net.parameters()]
        train(net, opt, steps=2)
        return before, [p.detach().clone() for p in net.parameters()]
    before, a = run(3)
    _, b = run(3)
    _, c = run(4)
    assert all(same_bits(x, y) for x, y in zip(a, b))
    assert not all(same_bits(x, y) for x, y in zip(a, c))
    nearest = model(torch.bfloat16)
    train(nearest, ft.Adam(nearest.parameters(), lr=1e-5), steps=2)
    changed = sum(int((x != y).sum()) for x, y in zip(before, a))
    changed_nearest = sum(int((x != y).sum()) for x, y in zip(before, nearest.parameters()))
    assert changed > changed_nearest  # updates below half a bfloat16 spacing still count


@default_capability_mark(torch)
@pytest.mark.parametrize("dtype", LOW, ids=["bfloat16", "float16"])
def test_nan_and_inf_gradients_land_where_torch_puts_them(dtype):
    # (the NaN bits of param are not promised, their places are; max_exp_avg_sq keeps its
    # old value where v is NaN in the exact profile: RELIABILITY.md "NaN and AMSGrad")
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(37, dtype=dtype))
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt = ft.Adam([ours], lr=1e-2, amsgrad=True)
    reference = torch.optim.Adam([theirs], lr=1e-2, amsgrad=True, fused=True)
    for step in range(3):
        grad = torch.randn(37, dtype=dtype)
        grad[step::5] = float("nan")
        grad[step + 1::7] = float("inf")
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        reference.step()
    assert torch.equal(ours.detach().isnan(), theirs.detach().isnan())
    assert torch.equal(ours.detach().nan_to_num(), theirs.detach().nan_to_num())
    for key in ("exp_avg", "exp_avg_sq"):
        assert same_bits(opt.state[ours][key], reference.state[theirs][key])


# --- bfloat16 moments of float32 parameters (DeepSpeed's fp32_optimizer_states=False) -----------


def round_moments(opt):
    with torch.no_grad():
        for state in opt.state.values():
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state:
                    state[key].copy_(state[key].to(torch.bfloat16))


@default_capability_mark(torch)
@pytest.mark.parametrize("cls", [ft.Adam, ft.AdamW])
def test_bfloat16_moments_equal_fused_float32_adam_with_the_moments_rounded(cls):
    ours, theirs = model(torch.float32), model(torch.float32)
    kwargs = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    opt = cls(ours.parameters(), state_dtype=torch.bfloat16, **kwargs)
    reference = torch_twin(cls)(theirs.parameters(), fused=True, **kwargs)
    torch.manual_seed(3)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(4):
        for net, optimizer in ((ours, opt), (theirs, reference)):
            optimizer.zero_grad()
            net(x).pow(2).mean().backward()
            optimizer.step()
        round_moments(reference)  # what bfloat16 moments mean: read as bfloat16, math in float32
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert p.dtype == torch.float32 and same_bits(p.detach(), q.detach())
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert opt.state[p][key].dtype == torch.bfloat16
            assert same_bits(opt.state[p][key], reference.state[q][key].to(torch.bfloat16))


def test_bfloat16_moments_state_dict_resumes_bit_identically_and_bad_uses_are_refused():
    net = model(torch.float32)
    opt = ft.AdamW(net.parameters(), lr=1e-2, state_dtype=torch.bfloat16)
    train(net, opt, steps=2)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["state"][0]["exp_avg"].dtype == torch.bfloat16
    again = copy.deepcopy(net)
    resumed = ft.AdamW(again.parameters(), lr=1e-2, state_dtype="bfloat16")
    resumed.load_state_dict(saved)  # (torch casts the moments to float32 on the way: exact)
    train(net, opt, steps=3, seed=4)
    train(again, resumed, steps=3, seed=4)
    for p, q in zip(net.parameters(), again.parameters()):
        assert same_bits(p, q) and same_bits(opt.state[p]["exp_avg_sq"], resumed.state[q]["exp_avg_sq"])
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] has dtype "
                                        r"torch.bfloat16 .*state_dtype=torch.bfloat16 keeps bfloat16 "
                                        r"moments of float32 parameters"):
        ft.Adam(model(torch.bfloat16).parameters(), state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="state_dtype must be None with master_weights=True"):
        ft.Adam(model(torch.bfloat16).parameters(), master_weights=True, state_dtype="bfloat16")
    with pytest.raises(ValueError, match="state_dtype must be None .* or 'bfloat16', got float16"):
        ft.Adam(net.parameters(), state_dtype="float16")
