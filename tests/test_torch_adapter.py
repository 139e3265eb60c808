"""fastadam.torch.Adam / AdamW against torch.optim on the same model and data."""

import io
import itertools
import subprocess
import sys

import pytest

from conftest import default_capability_mark

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastadam.torch")

needs_default_capability = default_capability_mark(torch)
TORCH_DTYPES = [torch.float32, torch.float64]


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 3)).to(dtype)


def batches(dtype, n=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(64, 10, generator=gen, dtype=dtype), torch.randint(0, 3, (64,), generator=gen))
            for _ in range(n)]


def train(model, opt, data, scheduler=None):
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


FLAGS = [dict(zip(("amsgrad", "weight_decay", "maximize"), v))
         for v in itertools.product([False, True], [0.0, 0.1], [False, True])]


@needs_default_capability
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("classes", [(ft.Adam, torch.optim.Adam), (ft.AdamW, torch.optim.AdamW)],
                         ids=["Adam", "AdamW"])
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_bit_identical_to_torch_fused(dtype, classes, flags):
    ours, theirs = classes
    data = batches(dtype)
    m1, m2 = make_model(dtype), make_model(dtype)
    got = train(m1, ours(m1.parameters(), lr=0.01, **flags), data)
    want = train(m2, theirs(m2.parameters(), lr=0.01, fused=True, **flags), data)
    assert_same(got, want)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_within_a_few_ulps_of_torch_foreach(dtype):
    data = batches(dtype)
    m1, m2 = make_model(dtype), make_model(dtype)
    got = train(m1, ft.Adam(m1.parameters(), lr=0.01, weight_decay=0.1), data)
    want = train(m2, torch.optim.Adam(m2.parameters(), lr=0.01, weight_decay=0.1, foreach=True), data)
    eps = torch.finfo(dtype).eps
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=64 * eps, atol=64 * eps)


@needs_default_capability
@pytest.mark.parametrize("direction", ["fastadam->torch", "torch->fastadam"])
def test_state_dict_moves_both_ways_mid_training(direction):
    data = batches(torch.float32, n=8)
    first, second = (ft.AdamW, torch.optim.AdamW) if direction == "fastadam->torch" else (torch.optim.AdamW, ft.AdamW)
    kwargs = lambda cls: {"fused": True} if cls is torch.optim.AdamW else {}  # noqa: E731
    model = make_model()
    opt = first(model.parameters(), lr=0.01, amsgrad=True, **kwargs(first))
    train(model, opt, data[:4])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_model = make_model(seed=99)
    resumed_model.load_state_dict(saved["model"])
    resumed = second(resumed_model.parameters(), lr=0.5, **kwargs(second))
    resumed.load_state_dict(saved["opt"])
    assert resumed.param_groups[0]["lr"] == 0.01 and resumed.param_groups[0]["amsgrad"]
    if second is torch.optim.AdamW:  # loaded groups carry our fused=None: ask for torch's fused path
        resumed.param_groups[0]["fused"] = True
    assert_same(train(resumed_model, resumed, data[4:]), train(model, opt, data[4:]))


def test_state_is_torch_tensors_in_torchs_layout():
    model = make_model()
    opt = ft.Adam(model.parameters(), amsgrad=True)
    train(model, opt, batches(torch.float32, n=2))
    state = opt.state_dict()["state"]
    assert set(state) == {0, 1, 2, 3}
    entry = state[0]
    assert set(entry) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert entry["step"].dtype == torch.float32 and entry["step"].shape == () and entry["step"].item() == 2
    assert entry["exp_avg"].shape == model[0].weight.shape and entry["exp_avg"].dtype == torch.float32
    keys = set(opt.state_dict()["param_groups"][0]) - {"params"}
    assert keys == set(torch.optim.Adam(model.parameters()).state_dict()["param_groups"][0]) - {"params"}


@needs_default_capability
def test_lr_scheduler_drives_it_like_torch():
    data = batches(torch.float32, n=6)
    m1, m2 = make_model(), make_model()
    o1 = ft.Adam(m1.parameters(), lr=0.05)
    o2 = torch.optim.Adam(m2.parameters(), lr=0.05, fused=True)
    s1 = torch.optim.lr_scheduler.StepLR(o1, step_size=2, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=2, gamma=0.5)
    assert_same(train(m1, o1, data, s1), train(m2, o2, data, s2))
    assert o1.param_groups[0]["lr"] == o2.param_groups[0]["lr"] == 0.05 / 8


@needs_default_capability
def test_grad_scaler_drives_it_like_torchs_fused_adam():
    data = batches(torch.float32, n=5)
    results = []
    for cls, kw in ((ft.Adam, {}), (torch.optim.Adam, {"fused": True})):
        model = make_model()
        opt = cls(model.parameters(), lr=0.01, **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for k, (x, y) in enumerate(data):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if k == 2:
                loss = loss * float("inf")  # an overflow step: skipped, scale backs off
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        results.append(([p.detach().clone() for p in model.parameters()], scaler.get_scale(),
                         opt.state_dict()["state"][0]["step"].item()))
    assert_same(results[0][0], results[1][0])
    assert results[0][1:] == results[1][1:] == (2.0**9, 4.0)


def test_closure_params_without_grads_and_add_param_group():
    model = make_model()
    frozen = torch.nn.Parameter(torch.ones(5))
    opt = ft.Adam([{"params": model.parameters()}, {"params": [frozen], "lr": 0.1}])
    x, y = batches(torch.float32, n=1)[0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert frozen not in opt.state and torch.equal(frozen, torch.ones(5))
    extra = torch.nn.Parameter(torch.zeros(4))
    opt.add_param_group({"params": [extra], "lr": 0.2})
    extra.grad = torch.ones(4)
    opt.step()
    assert opt.state[extra]["step"].item() == 1
    assert torch.allclose(extra, torch.full((4,), -0.2))


def test_amsgrad_switched_on_later_and_tensor_lr():
    model = make_model()
    opt = ft.Adam(model.parameters(), lr=torch.tensor(0.01))
    data = batches(torch.float32, n=3)
    train(model, opt, data[:1])
    opt.param_groups[0]["amsgrad"] = True
    train(model, opt, data[1:])
    assert "max_exp_avg_sq" in opt.state[model[0].weight]
    assert opt.state[model[0].weight]["step"].item() == 3


def test_edits_of_a_group_or_of_numerics_between_steps_apply_at_the_next_step():
    # A group's record is kept while torch's group dict holds the same objects: a new
    # value, betas replaced, or the optimizer's numerics changed must each be seen.
    import numpy as np

    import fastadam

    values = torch.linspace(-1, 1, 37)
    param = torch.nn.Parameter(values.clone())
    opt = ft.Adam([param], lr=0.1, numerics="exact")
    reference = [values.numpy().copy(), np.zeros(37, np.float32), np.zeros(37, np.float32)]
    edits = [{}, {"lr": 0.05}, {"betas": (0.5, 0.9)}, {"numerics": "fast"}, {"weight_decay": 0.5},
             {}]
    settings = {"lr": 0.1, "betas": (0.9, 0.999), "weight_decay": 0.0, "numerics": "exact"}
    for step, edit in enumerate(edits, start=1):
        settings.update(edit)
        for key, value in edit.items():
            if key == "numerics":
                opt.numerics = value
            else:
                opt.param_groups[0][key] = value
        grad = torch.sin(values * step)
        param.grad = grad.clone()
        opt.step()
        fastadam.adam_step(*reference[:1], grad.numpy(), *reference[1:], step=step,
                           lr=settings["lr"], beta1=settings["betas"][0],
                           beta2=settings["betas"][1], weight_decay=settings["weight_decay"],
                           numerics=settings["numerics"])
        assert np.array_equal(param.detach().numpy(), reference[0]), (step, edit)


def test_a_tensor_lr_edited_in_place_steps_like_torch():
    # A tensor lr is the same object after lr.fill_(...): its value is read every step,
    # never remembered (torch's fused Adam takes tensor lrs the same way).
    make = lambda: [torch.nn.Parameter(torch.ones(5))]  # noqa: E731
    ours, theirs = make(), make()
    lrs = torch.tensor(0.1), torch.tensor(0.1)
    optimizers = ft.Adam(ours, lr=lrs[0]), torch.optim.Adam(theirs, lr=lrs[1], fused=True)
    for k, lr in enumerate([0.1, 0.01, 0.5]):
        for params, opt, tensor in zip((ours, theirs), optimizers, lrs):
            tensor.fill_(lr)
            params[0].grad = torch.full((5,), k + 1.0)
            opt.step()
        assert torch.equal(ours[0], theirs[0]), k


def test_results_do_not_depend_on_thread_count():
    big = [torch.nn.Parameter(torch.randn(70000)) for _ in range(3)]
    clones = [torch.nn.Parameter(p.detach().clone()) for p in big]
    grads = [torch.randn(70000) for _ in range(3)]
    for params, threads in ((big, 1), (clones, 2)):
        opt = ft.Adam(params, num_threads=threads)
        for _ in range(2):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    assert_same(big, clones)


@pytest.mark.parametrize("make, exc, match", [
    (lambda: torch.nn.Parameter(torch.ones(3, device="meta")), TypeError, r"is on meta"),
])
def test_unsupported_parameters_are_named(make, exc, match):
    p = make()
    p.grad = torch.ones_like(p)
    opt = ft.Adam([torch.nn.Parameter(torch.ones(2)), p])
    with pytest.raises(exc, match=r"param_groups\[0\]\['params'\]\[1\] " + match):
        opt.step()


@pytest.mark.parametrize("make, match", [
    (lambda: torch.nn.Parameter(torch.ones(3).to(torch.float8_e4m3fn), requires_grad=False),
     r"has dtype torch.float8_e4m3fn \(shape \(3,\)\); .*model.float\(\)"),
    (lambda: torch.nn.Parameter(torch.ones(3, dtype=torch.int32), requires_grad=False),
     r"has dtype torch.int32"),
])
def test_unsupported_parameters_are_refused_by_the_constructor(make, match):
    # (the device is checked at the step: a model built on meta is moved with to_empty)
    # issue 23: a model of a dtype fastadam cannot update was accepted and failed only at
    # the first step()
    with pytest.raises(TypeError, match=r"^param_groups\[0\]\['params'\]\[1\] " + match):
        ft.Adam([torch.nn.Parameter(torch.ones(2)), make()])
    opt = ft.Adam([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(TypeError, match=r"^param_groups\[1\]\['params'\]\[0\] " + match):
        opt.add_param_group({"params": [make()]})
    assert len(opt.param_groups) == 1  # the rejected group was not added


def test_a_float8_model_is_refused_by_its_parameter_names():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] \('0.weight'\) has "
                                        r"dtype torch.float8_e4m3fn \(shape \(2, 3\)\)"):
        ft.Adam(model.named_parameters())
    model = torch.nn.Linear(3, 2)
    opt = ft.Adam(model.parameters())
    model.to(torch.float8_e4m3fn)  # after the constructor: still refused, at the step, by its place
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] has dtype "
                                        r"torch.float8_e4m3fn"):
        opt.step()


def test_import_without_torch_says_what_to_install():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import fastadam.torch\n"
            "except ModuleNotFoundError as e:\n    print(e.name, '|', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("torch | fastadam.torch needs torch, which is not installed: pip install torch")


def test_sparse_gradients_take_the_lazy_row_path():
    # (more in test_torch_sparse.py: parity with torch.optim.SparseAdam, refusals)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    before = emb.weight.detach().clone()
    opt = ft.Adam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()
    changed = (emb.weight.detach() != before).any(dim=1)
    assert changed.tolist() == [i in (1, 2) for i in range(10)]


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"capturable": True}, ValueError, "capturable=True is for CUDA graph capture"),
    ({"differentiable": True}, ValueError, "differentiable=True needs autograd"),
    ({"lr": -1.0}, ValueError, r"Invalid learning rate: -1.0"),  # torch's own checks and words
    ({"betas": (0.9, 1.5)}, ValueError, r"Invalid beta parameter at index 1: 1.5"),
    ({"betas": (0.9, torch.tensor(0.5))}, ValueError, "betas must be either both floats or both Tensors"),
    ({"num_threads": 0}, ValueError, "num_threads must be None or a positive integer"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ft.Adam(make_model().parameters(), **kwargs)


def test_foreach_and_fused_are_accepted():
    for kwargs in ({"foreach": True}, {"fused": True}, {"foreach": False, "fused": False}):
        model = make_model()
        train(model, ft.Adam(model.parameters(), **kwargs), batches(torch.float32, n=1))
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        ft.Adam(make_model().parameters(), foreach=True, fused=True)  # as torch says


def test_importing_fastadam_does_not_import_torch():
    code = "import sys, fastadam; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- found in review: copies, replaced state, sparse participation, aliasing, atomicity ----

def test_deepcopy_and_pickle_give_working_optimizers():
    import copy
    import pickle
    model = make_model()
    opt = ft.Adam(model.parameters(), num_threads=1)
    train(model, opt, batches(torch.float32, n=1))
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.num_threads == 1
        for p in clone.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        clone.step()
        assert clone.state[clone.param_groups[0]["params"][0]]["step"].item() == 2


@needs_default_capability
@pytest.mark.parametrize("edit", ["clear", "replace_exp_avg", "reset_step"])
def test_state_edited_by_the_user_is_honoured_like_torch(edit):
    data = batches(torch.float32, n=5)
    results = []
    for cls, kw in ((ft.Adam, {}), (torch.optim.Adam, {"fused": True})):
        model = make_model()
        opt = cls(model.parameters(), lr=0.01, **kw)
        train(model, opt, data[:3])
        first = model[0].weight
        if edit == "clear":
            opt.state.clear()
        elif edit == "replace_exp_avg":
            opt.state[first]["exp_avg"] = torch.full_like(first, 0.5)
        else:
            opt.state[first]["step"] = torch.tensor(0.0)
        results.append(train(model, opt, data[3:]))
        results.append(opt.state_dict()["state"][0]["step"].item())
    assert_same(results[0], results[2])
    assert results[1] == results[3]


@needs_default_capability
def test_a_param_with_a_gradient_on_some_steps_only():
    big, small = torch.nn.Parameter(torch.randn(1000)), torch.nn.Parameter(torch.randn(16))
    twins = [torch.nn.Parameter(t.detach().clone()) for t in (big, small)]
    ours, theirs = ft.Adam([big, small], lr=0.01), torch.optim.Adam(twins, lr=0.01, fused=True)
    kept = None
    for k in range(6):
        for params, opt in (([big, small], ours), (twins, theirs)):
            opt.zero_grad()
            params[0].grad = torch.full((1000,), 0.1 * (k + 1))
            if k % 2 == 0:
                params[1].grad = torch.ones(16)
            opt.step()
        if kept is None:
            kept = ours.state[big]["exp_avg"]
        assert ours.state[big]["exp_avg"] is kept  # moments stay put across table rebuilds
    assert_same([big, small], twins)
    assert ours.state[small]["step"].item() == theirs.state[twins[1]]["step"].item() == 3


def test_overlapping_params_are_refused():
    flat = torch.zeros(100)
    a, b = torch.nn.Parameter(flat[:50]), torch.nn.Parameter(flat[40:])
    opt = ft.Adam([a, b])
    a.grad, b.grad = torch.ones(50), torch.ones(60)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] overlaps param_groups\[0\]\['params'\]\[0\]"):
        opt.step()


@pytest.mark.parametrize("spoil", ["lr", "grad_aliases_param"])
def test_a_rejected_step_changes_no_state(spoil):
    model = make_model()
    opt = ft.Adam(model.parameters(), lr=0.01)
    train(model, opt, batches(torch.float32, n=1))
    extra = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [extra]})
    before = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state_dict()["state"].items()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    extra.grad = torch.ones(3)
    if spoil == "lr":
        opt.param_groups[0]["lr"] = -1.0
        match = r"param_groups\[0\]\['lr'\] must be >= 0.0"
    else:
        model[0].bias.grad = model[0].bias.detach()
        match = r"the gradient of param_groups\[0\]\['params'\]\[1\] overlaps"
    with pytest.raises(ValueError, match=match):
        opt.step()
    after = opt.state_dict()["state"]
    assert set(after) == set(before) and extra not in opt.state
    for k in before:
        for n in before[k]:
            assert torch.equal(before[k][n], after[k][n])


def test_loading_from_a_live_optimizer_takes_a_snapshot():
    m1, m2 = make_model(), make_model()
    source = ft.Adam(m1.parameters())
    train(m1, source, batches(torch.float32, n=2))
    target = ft.Adam(m2.parameters())
    target.load_state_dict(source.state_dict())
    train(m1, source, batches(torch.float32, n=3))  # the source moves on
    train(m2, target, batches(torch.float32, n=1))
    assert target.state[m2[0].weight]["step"].item() == 3


def test_a_step_after_a_rejected_one_works():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError):
        opt.step()
    opt.param_groups[0]["lr"] = 0.1
    opt.step()
    assert opt.state[p]["step"].item() == 1
    assert torch.allclose(p, torch.full((4,), -0.1))


def test_a_step_count_that_cannot_advance_is_refused():
    # Issue 19, item 4: a step count of 2**63 - 2 was accepted; two steps later it wrapped
    # to a negative number and the parameter moved by NaN.
    p = torch.nn.Parameter(torch.ones(3))
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    state = opt.state_dict()
    state["state"][0]["step"] = torch.tensor(2**63 - 2)  # (int64: float32 cannot hold it)
    state["param_groups"][0]["fused"] = None  # (torch casts steps to float32 for fused groups)
    opt.load_state_dict(state)
    opt.step()  # to 2**63 - 1
    assert torch.isfinite(p).all()
    before = p.detach().clone(), opt.state[p]["exp_avg"].clone()
    with pytest.raises(ValueError, match=r"^the step count of param_groups\[0\]\['params'\]\[0\] "
                                         r"is 9223372036854775807 \(2\*\*63 - 1\).*cannot advance"):
        opt.step()
    assert torch.equal(p.detach(), before[0]) and torch.equal(opt.state[p]["exp_avg"], before[1])


@pytest.mark.parametrize("kwargs, step_kwargs, name", [
    ({"eps": 1e-50}, {}, "eps"), ({"lr": 1e39}, {}, "lr"),
    ({}, {"grad_scale": torch.tensor(1e-300, dtype=torch.float64)}, "grad_scale"),
])
def test_hyperparameters_beyond_float32_are_value_errors(kwargs, step_kwargs, name):
    # Issue 19, item 5: finite as doubles, but 0 or Inf in float32: NaN or Inf parameters.
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ft.Adam([p], **kwargs)
    p.grad = torch.zeros(3)
    with pytest.raises(ValueError, match=rf"^(param_groups\[0\]\['{name}'\]|{name}) .*float32"):
        opt.step(**step_kwargs)
    assert not p.detach().any() and p not in opt.state
    double = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = ft.Adam([double], **kwargs)
    double.grad = torch.zeros(3, dtype=torch.float64)
    opt.step(**step_kwargs)  # fine in float64
    assert torch.isfinite(double).all()
