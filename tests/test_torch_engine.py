"""fastadam.torch on the engine: parameters whose storage changes between steps, layouts
other than contiguous, state edited in place, and the state dicts torch loads back."""

import collections
import copy
import io

import numpy as np
import pytest

from conftest import default_capability_mark

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastadam.torch")

needs_default_capability = default_capability_mark(torch)


def assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


def twin_optimizers(make_params, lr=0.01, ours=ft.Adam, theirs=torch.optim.Adam, **kw):
    a, b = make_params(), make_params()
    return (a, ours(a, lr=lr, **kw)), (b, theirs(b, lr=lr, fused=True, **kw))


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


# --- storage that changes between steps: a correct step or a clear error, never a crash ---

def stepped(params, steps=2):
    opt = ft.Adam(params, lr=0.1)
    for k in range(steps):
        set_grads(params, k)
        opt.step()
    return opt


@pytest.mark.parametrize("convert", ["double", "half"])
def test_a_model_converted_after_steps_is_refused_by_name(convert):
    model = torch.nn.Linear(4, 3)
    opt = stepped(list(model.parameters()))
    before = {k: v.clone() for k, v in opt.state[model.weight].items()}
    getattr(model, convert)()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    # (a float16 model is supported, but not state kept for float32 values)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] changed from float32"):
        opt.step()
    for key, value in opt.state[model.weight].items():  # nothing changed
        assert torch.equal(value, before[key])


def test_a_model_converted_before_the_first_step_just_works():
    model = torch.nn.Linear(4, 3)
    opt = ft.Adam(model.parameters(), lr=0.1)
    model.double()
    twin = torch.nn.Linear(4, 3).double()
    twin.load_state_dict(model.state_dict())
    ref = torch.optim.Adam(twin.parameters(), lr=0.1)
    for params in (list(model.parameters()), list(twin.parameters())):
        set_grads(params, 0)
    opt.step()
    ref.step()
    torch.testing.assert_close(model.weight, twin.weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [5, 40])
def test_data_replaced_by_another_size_is_refused(size):
    p = torch.nn.Parameter(torch.randn(20))
    opt = stepped([p])
    p.data = torch.randn(size)
    p.grad = torch.ones(size)
    with pytest.raises(ValueError, match=rf"changed from float32 \(20,\) to float32 \({size},\)"):
        opt.step()


def test_data_replaced_by_the_same_shape_is_followed():
    p = torch.nn.Parameter(torch.randn(20))
    twin = torch.nn.Parameter(p.detach().clone())
    ours, ref = ft.Adam([p], lr=0.1), torch.optim.Adam([twin], lr=0.1)
    for k in range(2):
        set_grads([p], k)
        set_grads([twin], k)
        ours.step()
        ref.step()
    fresh = torch.randn(20)
    p.data = fresh.clone()
    twin.data = fresh.clone()
    set_grads([p], 5)
    set_grads([twin], 5)
    ours.step()
    ref.step()
    torch.testing.assert_close(p, twin, rtol=1e-6, atol=1e-7)
    assert p.data_ptr() != 0 and ours.state[p]["step"].item() == 3


def test_a_parameter_resized_in_place_is_refused():
    p = torch.nn.Parameter(torch.randn(64))
    opt = stepped([p])
    p.data = p.data[:8]  # the same address, fewer elements
    p.grad = torch.ones(8)
    with pytest.raises(ValueError, match=r"changed from float32 \(64,\) to float32 \(8,\)"):
        opt.step()


# --- layouts --------------------------------------------------------------------------

@needs_default_capability
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided_slice"])
def test_non_contiguous_params_match_torch(layout):
    def make():
        torch.manual_seed(3)
        if layout == "channels_last":
            w = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
        elif layout == "transposed":
            w = torch.randn(6, 9).t()
        else:  # gaps in its memory: updated through a dense copy
            w = torch.randn(6, 9)[:, ::2]
        return [torch.nn.Parameter(w)]
    # torch's fused kernel pairs a strided slice's elements by memory position, which
    # is not the update (0.066 off here): its for-loop Adam is the reference there.
    reference = {"foreach": False} if layout == "strided_slice" else {"fused": True}
    a, b = make(), make()
    ours = ft.Adam(a, lr=0.01, amsgrad=True, weight_decay=0.1)
    theirs = torch.optim.Adam(b, lr=0.01, amsgrad=True, weight_decay=0.1, **reference)
    assert not a[0].is_contiguous()
    for k in range(4):
        for params, opt in ((a, ours), (b, theirs)):
            torch.manual_seed(k)
            params[0].grad = torch.randn_like(params[0])  # keeps the param's layout
            opt.step()
    assert_same(a, b)
    state = ours.state[a[0]]
    assert state["exp_avg"].stride() == theirs.state[b[0]]["exp_avg"].stride()
    torch.testing.assert_close(state["exp_avg"], theirs.state[b[0]]["exp_avg"], rtol=0, atol=0)


def test_a_gradient_in_another_layout_than_its_param():
    # torch's fused kernel pairs elements by memory position here (a different result);
    # fastadam pairs them by index, as torch's single-tensor Adam does.
    w = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    p, same, twin = (torch.nn.Parameter(w.clone(memory_format=torch.preserve_format))
                     for _ in range(3))
    grad = torch.randn(4, 3, 5, 5)  # contiguous
    p.grad = grad.clone()
    same.grad = grad.clone(memory_format=torch.channels_last)  # the param's layout
    twin.grad = grad.clone()
    for opt in (ft.Adam([p], lr=0.1), ft.Adam([same], lr=0.1),
                torch.optim.Adam([twin], lr=0.1, foreach=False)):
        opt.step()
    assert_same([p], [same])
    torch.testing.assert_close(p, twin)


# --- state, as torch users edit and load it ----------------------------------------------

@needs_default_capability
def test_an_in_place_edit_of_step_restarts_the_schedule_like_torch():
    def make():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(10))]
    (a, ours), (b, theirs) = twin_optimizers(make, lr=0.1)
    for k in range(3):
        for params, opt in ((a, ours), (b, theirs)):
            set_grads(params, k)
            opt.step()
    for params, opt in ((a, ours), (b, theirs)):
        state = opt.state[params[0]]
        state["step"].zero_()
        state["exp_avg"].zero_()
        state["exp_avg_sq"].zero_()
        set_grads(params, 9)
        opt.step()
    assert_same(a, b)
    assert ours.state[a[0]]["step"].item() == 1 == theirs.state[b[0]]["step"].item()


def test_adamw_loading_a_torch_adam_state_dict_stays_decoupled():
    p = torch.nn.Parameter(torch.ones(3))
    source = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], weight_decay=0.1)
    opt = ft.AdamW([p], weight_decay=0.1)
    opt.load_state_dict(source.state_dict())
    assert opt.param_groups[0]["decoupled_weight_decay"] is True


def test_a_state_dict_saved_before_a_key_existed_loads_with_torchs_defaults():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ft.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    old = opt.state_dict()
    for key in ("maximize", "foreach", "fused", "decoupled_weight_decay", "differentiable"):
        del old["param_groups"][0][key]
    fresh = ft.Adam([p])
    fresh.load_state_dict(old)
    fresh.step()
    assert fresh.param_groups[0]["maximize"] is False
    assert fresh.state[p]["step"].item() == 2


def test_torch_fused_resumes_from_our_state_dict_on_its_fused_path():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ft.AdamW([p])
    p.grad = torch.ones(3)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], fused=True)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.param_groups[0]["fused"] is True


def test_state_of_the_wrong_shape_is_refused_like_torch():
    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = ft.Adam([p])
    p.grad = torch.ones(4, 3)
    opt.step()
    state = opt.state_dict()
    state["state"][0]["exp_avg"] = torch.ones(3)  # would broadcast
    fresh = ft.Adam([p])
    fresh.load_state_dict(state)
    with pytest.raises(ValueError, match=r"\['exp_avg'\] has shape \(3,\), the parameter has \(4, 3\)"):
        fresh.step()


def test_state_tensors_do_not_alias_torch_allocated_params_within_a_page():
    # torch's CPU allocator puts large tensors at the start of a page (offset 0, or
    # wherever its malloc puts them: ASan's differs); the engine's state starts at its own
    # offsets, 1 KiB apart (fastadam._memory), never where torch put the params.
    from fastadam._memory import STATE_PAGE_OFFSETS

    params = [torch.nn.Parameter(torch.randn(1 << 20)) for _ in range(2)]
    opt = ft.Adam(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    torchs = {p.data_ptr() % 4096 for p in params} | {p.grad.data_ptr() % 4096 for p in params}
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].data_ptr() % 4096 == STATE_PAGE_OFFSETS[key]
    if torchs <= {0}:  # torch's own placement (not a sanitizer's allocator)
        assert not torchs & {STATE_PAGE_OFFSETS[k] for k in ("exp_avg", "exp_avg_sq")}


def test_the_compiled_gather_takes_the_common_step(monkeypatch):
    # After the first step (which creates state), steps with fresh autograd gradients
    # go through the compiled loop: nothing is re-registered or re-published.
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = ft.Adam(model.parameters())
    x = torch.randn(4, 8)
    model(x).sum().backward()
    opt.step()
    front = opt._front
    entries = {id(p): opt.state[p] for p in model.parameters()}
    monkeypatch.setattr(type(front), "_general_step", lambda *a: pytest.fail("general path"))
    for _ in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    assert opt._front is front
    assert all(opt.state[p] is entries[id(p)] for p in model.parameters())
    first, active = front.gather.run(np.zeros(4, np.int64))
    assert first == -1 and active == sum(p.numel() for p in model.parameters())


@needs_default_capability
def test_params_without_elements_count_their_steps_like_torch():
    # An empty tensor's data_ptr() is 0, the engine's "no gradient": the compiled gather
    # hands over another address, so the step count advances as torch's does (FSDP2 gives
    # the ranks past a small parameter's last row empty shards). The same with elements
    # beside it, and with only empty ones.
    for shapes in ([(0, 7), (3,)], [(0, 7)]):
        make = lambda shapes=shapes: [torch.nn.Parameter(torch.ones(s)) for s in shapes]  # noqa: E731
        (a, ours), (b, theirs) = twin_optimizers(make)
        for k in range(3):
            for params, opt in ((a, ours), (b, theirs)):
                set_grads(params, k)
                opt.step()
            for p, q in zip(a, b):
                assert float(ours.state[p]["step"]) == float(theirs.state[q]["step"]) == k + 1
            assert_same(a, b)


@needs_default_capability
def test_parameters_put_into_a_group_in_turn_are_stepped_like_torch():
    # DeepSpeed's ZeRO-3 steps its sub-groups so: group["params"] = [its flat partition],
    # step(), group["params"] = []. torch's Adam reads the list at each step; so must we,
    # and each set keeps its registry (state in place, the compiled gather after the first
    # turn).
    make = lambda: [torch.nn.Parameter(torch.ones(s)) for s in (5, 9)]  # noqa: E731
    (a, ours), (b, theirs) = twin_optimizers(make, ours=ft.AdamW, theirs=torch.optim.AdamW)
    for k in range(4):
        for turn in range(2):
            for params, opt in ((a, ours), (b, theirs)):
                set_grads(params, 10 * k + turn)
                opt.param_groups[0]["params"] = [params[turn]]
                opt.step()
                opt.param_groups[0]["params"] = []
            assert_same(a, b)
            assert [float(ours.state[p]["step"]) for p in a if p in ours.state] == [
                float(theirs.state[q]["step"]) for q in b if q in theirs.state]
        if k == 1:
            registries = {id(r) for r in ours._recent}
    assert len(ours._recent) == 2 and {id(r) for r in ours._recent} == registries


@pytest.mark.parametrize("edit", ["replace_entry", "delete_entry", "new_dict", "new_table",
                                  "plain_table", "update", "ior", "setdefault", "clear",
                                  "pop_each", "popitem_each", "del_each"])
def test_every_edit_of_opt_state_is_seen_by_the_next_step(edit):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ft.Adam([p], lr=0.1)
    for _ in range(2):
        p.grad = torch.ones(3)
        opt.step()
    if edit == "replace_entry":
        opt.state[p]["step"] = torch.tensor(0.0)
    elif edit == "delete_entry":
        del opt.state[p]
    elif edit == "new_dict":
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros(3),
                        "exp_avg_sq": torch.zeros(3)}
    elif edit == "new_table":
        opt.state = type(opt.state)()
    elif edit == "plain_table":  # torch's own type: watched again from the next step
        opt.state = collections.defaultdict(dict)
    elif edit == "update":  # every way a dict changes, inside the entry fastadam published
        opt.state[p].update(step=torch.tensor(0.0))
    elif edit == "ior":
        entry = opt.state[p]
        entry |= {"step": torch.tensor(0.0)}
    elif edit == "setdefault":  # (the key removed unseen: only setdefault is counted)
        dict.__delitem__(opt.state[p], "step")
        opt.state[p].setdefault("step", torch.tensor(0.0))
    elif edit == "clear":
        opt.state[p].clear()
    else:
        entry = opt.state[p]
        for _ in range(len(entry)):
            if edit == "pop_each":
                entry.pop(next(iter(entry)))
            elif edit == "popitem_each":
                entry.popitem()
            else:
                del entry[next(iter(entry))]
    p.grad = torch.ones(3)
    opt.step()
    assert opt.state[p]["step"].item() == 1  # each edit restarts the count, as in torch


def test_other_codes_keys_in_an_entry_keep_the_compiled_step(monkeypatch):
    # Wrappers (timm's Lookahead) keep their own tensors in opt.state[p] and may write
    # them every step: that is not an edit of fastadam's state, so the step stays on the
    # compiled path (and the keys stay, as in torch).
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    monkeypatch.setattr(type(opt._front), "_general_step", lambda *a: pytest.fail("general path"))
    for k in range(3):
        opt.state[p]["slow_buffer"] = torch.full((3,), float(k))
        opt.state[p].setdefault("other", k)
        opt.step()
    assert opt.state[p]["step"].item() == 4 and opt.state[p]["slow_buffer"][0] == 2.0


def test_state_dict_and_copies_hold_plain_dicts_as_torchs_do():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ft.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    entries = list(opt.state_dict()["state"].values())
    assert entries and all(type(e) is dict for e in entries)
    assert entries[0]["exp_avg"] is opt.state[p]["exp_avg"]  # the state itself, as torch's
    copied = copy.copy(opt.state)
    assert type(copied) is collections.defaultdict and copied[p] is opt.state[p]
    deep = copy.deepcopy(opt.state)
    assert type(deep[next(iter(deep))]) is dict
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["state"][0]["step"].item() == 1


@pytest.mark.parametrize("grad_kind", ["expanded", "transposed_copy", "strided"])
def test_gradients_laid_out_unlike_the_parameter_step_like_torch(grad_kind):
    # torch's grad setter checks dtype, device and shape, not strides: a gradient that
    # is an expanded scalar (stride 0) or another layout is read element by element.
    # (torch's fused Adam 2.13 reads an expanded gradient wrongly: it gets the same
    # gradient, contiguous.)
    def grad_for(p, k):
        if grad_kind == "expanded":
            return torch.full((1, 1), 0.5 + k).expand(p.shape)
        if grad_kind == "transposed_copy":
            return torch.randn(p.shape[1], p.shape[0], generator=torch.Generator().manual_seed(k)).t()
        return torch.randn(p.shape[0], 2 * p.shape[1], generator=torch.Generator().manual_seed(k))[:, ::2]

    make = lambda: [torch.nn.Parameter(torch.ones(6, 5))]  # noqa: E731
    (a, ours), (b, theirs) = twin_optimizers(make)
    for k in range(3):
        a[0].grad = grad_for(a[0], k)
        b[0].grad = a[0].grad.contiguous()
        ours.step()
        theirs.step()
        assert_same(a, b)


@needs_default_capability
@pytest.mark.parametrize("pattern", ["varying_gradients", "shared_gradient"])
def test_the_one_call_check_gives_up_where_it_keeps_missing(pattern, monkeypatch):
    # A different set of parameters with gradients at every step (or one gradient
    # tensor shared by two parameters, which torch's check refuses) misses every time:
    # after a few builds in a row that missed, no more are built. Steps stay torch's.
    counts = counted_layout_checks(monkeypatch)
    make = lambda: [torch.nn.Parameter(torch.ones(4, 3)) for _ in range(4)]  # noqa: E731
    (a, ours), (b, theirs) = twin_optimizers(make)
    for k in range(12):
        for params in (a, b):
            gen = torch.Generator().manual_seed(k)
            for i, p in enumerate(params):
                p.grad = (None if pattern == "varying_gradients" and i == k % 4 else
                          torch.randn(p.shape, generator=gen))
            if pattern == "shared_gradient":
                params[3].grad = params[2].grad if params is a else params[2].grad.clone()
        ours.step()
        theirs.step()
        assert_same(a, b)
    assert counts["made"] <= 4


@needs_default_capability
@pytest.mark.parametrize("failing", ["build", "check"])
def test_an_error_inside_the_one_call_check_turns_it_off(failing, monkeypatch):
    # torch's check is private: if building or calling it raises, the gather falls back
    # to the per-tensor checks for good (no error reaches the user, no step is lost).
    import fastadam._torch_gather as gather_module
    counts = collections.Counter()

    def failing_make(tensors):
        counts["made"] += 1
        if failing == "build":
            raise RuntimeError("torch changed")

        def check(*grads):
            counts["checked"] += 1
            raise RuntimeError("torch changed")
        return check

    monkeypatch.setattr(gather_module, "_torch_layout_guards", failing_make)
    make = lambda: [torch.nn.Parameter(torch.ones(4, 3)) for _ in range(3)]  # noqa: E731
    (a, ours), (b, theirs) = twin_optimizers(make)
    for k in range(6):
        for params in (a, b):
            set_grads(params, k)
        ours.step()
        theirs.step()
        assert_same(a, b)
    assert counts == ({"made": 1} if failing == "build" else {"made": 1, "checked": 1})


GRADIENT_CHANGES = ["negative_view", "conjugate_view", "strided", "transposed_copy", "expanded",
                    "one_without_gradient", "sparse"]


def changed_gradient(change, p, k):
    """Step k's gradient of p after a change of its kind (None: no gradient)."""
    gen = torch.Generator().manual_seed(k)
    if change == "negative_view":
        return torch.randn(p.shape, generator=gen)._neg_view()
    if change == "conjugate_view":
        return torch.randn(p.shape, generator=gen, dtype=p.dtype).conj()
    if change == "strided":
        return torch.randn(p.shape[0], 2 * p.shape[1], generator=gen)[:, ::2]
    if change == "transposed_copy":
        return torch.randn(p.shape[1], p.shape[0], generator=gen).t()
    if change == "expanded":
        return torch.full((1, 1), 0.5 + k).expand(p.shape)
    if change == "sparse":
        return torch.randn(p.shape, generator=gen).to_sparse(1)
    return None


@needs_default_capability
@pytest.mark.parametrize("one_call_check", [True, False], ids=["one_call_check", "per_tensor"])
@pytest.mark.parametrize("change", GRADIENT_CHANGES)
def test_gradients_that_change_layout_after_steps_step_like_torch(change, one_call_check,
                                                                   monkeypatch):
    # Steps after the first check the gradients' layouts in one call of torch's compiled
    # guards, built from the last step whose gradients passed the per-tensor checks. A
    # gradient unlike those (a negative or conjugate view, other strides, a sparse one,
    # one missing) must be seen, in both ways of checking, and stepped as torch does.
    import fastadam._torch_gather as gather_module
    if not one_call_check:
        monkeypatch.setattr(gather_module, "_torch_layout_guards", None)
    elif gather_module.torch_layout_guards() is None:
        pytest.skip("this torch has no one-call layout check that fastadam uses")
    dtype = torch.complex64 if change == "conjugate_view" else torch.float32
    make = lambda: [torch.nn.Parameter(torch.ones(6, 5, dtype=dtype)) for _ in range(3)]  # noqa: E731
    # (torch's fused Adam refuses complex parameters: complex ones are compared with
    # fastadam given the conjugate's values in memory.)
    twin = (lambda params, lr, fused: ft.Adam(params, lr=lr)) if dtype.is_complex else torch.optim.Adam
    (a, ours), (b, theirs) = twin_optimizers(make, theirs=twin)
    for k in range(5):
        for i, (p, q) in enumerate(zip(a, b)):
            p.grad = (changed_gradient(change, p, 10 * k + i) if k >= 3 and i == 1 else
                      torch.randn(p.shape, generator=torch.Generator().manual_seed(k), dtype=dtype))
            # the twin reads the same values from contiguous memory (torch's fused Adam
            # reads gradients laid out unlike their parameter wrongly: see above)
            q.grad = (None if p.grad is None else
                      p.grad.to_dense().resolve_neg().resolve_conj().contiguous())
        ours.step()
        theirs.step()
        assert_same(a, b)


def counted_layout_checks(monkeypatch):
    """Count the one-call layout checks fastadam.torch's gather builds and calls."""
    import fastadam._torch_gather as gather_module
    make = gather_module.torch_layout_guards()
    if make is None and torch.__version__.startswith("2.13."):
        pytest.fail("torch 2.13's Dynamo guards no longer pass fastadam's probe")
    if make is None:
        pytest.skip("this torch has no one-call layout check that fastadam uses")
    counts = collections.Counter()

    def counting_make(tensors):
        counts["made"] += 1
        check = make(tensors)

        def counting_check(*grads):
            counts["checked"] += 1
            return check(*grads)
        return counting_check

    monkeypatch.setattr(gather_module, "_torch_layout_guards", counting_make)
    return counts


def test_the_one_call_check_serves_every_step_after_the_first_checked_one(monkeypatch):
    counts = counted_layout_checks(monkeypatch)
    params = [torch.nn.Parameter(torch.ones(s)) for s in ((4, 3), (7,), (2, 2, 2))]
    opt = ft.Adam(params)
    for k in range(6):
        set_grads(params, k)
        opt.step()
    # Step 0 creates state (the general path); step 1 checks each gradient and builds
    # the guard; steps 2 to 5 take the one call.
    assert counts == {"made": 1, "checked": 4}


def test_a_parameter_whose_class_changed_steps_like_torch():
    class Tagged(torch.nn.Parameter):
        pass

    make = lambda: [torch.nn.Parameter(torch.ones(4))]  # noqa: E731
    (a, ours), (b, theirs) = twin_optimizers(make)
    for k in range(3):
        for params, opt in ((a, ours), (b, theirs)):
            if k == 1:
                params[0].__class__ = Tagged
            set_grads(params, k)
            opt.step()
        assert_same(a, b)


def test_torch_compile_sees_one_opaque_step():
    # Dynamo calls the step as one eager function: it traces nothing inside fastadam
    # (tracing into it made 12 graphs and 20 graph breaks for this one call).
    from torch._dynamo.utils import counters

    model = torch.nn.Linear(8, 2)
    opt = ft.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)

    def only_step():
        opt.step()

    torch._dynamo.reset()
    counters.clear()
    torch.compile(only_step)()
    assert counters["stats"]["unique_graphs"] == 0
    assert sum(counters["graph_break"].values()) <= 2  # at the call, in torch's step wrapper
    assert opt.state[model.weight]["step"].item() == 1


def test_a_load_state_dict_post_hook_may_add_any_entry():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ft.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    saved = opt.state_dict()
    fresh = ft.Adam([p])
    fresh.register_load_state_dict_post_hook(
        lambda optimizer: optimizer.state.__setitem__("ran_post_hook", True))
    fresh.load_state_dict(saved)
    assert fresh.state["ran_post_hook"] is True
    fresh.step()
    assert fresh.state[p]["step"].item() == 2


def test_an_interrupted_step_leaves_step_and_state_in_agreement(monkeypatch):
    # A KeyboardInterrupt that lands right after the kernels ran: the counts and the
    # state["step"] tensors changed together (in C), so the next step is the next one.
    p, twin = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    opt, ref = ft.Adam([p], lr=0.1), ft.Adam([twin], lr=0.1)
    for params, o in (([p], opt), ([twin], ref)):
        params[0].grad = torch.ones(4)
        o.step()
    engine = opt._front.engine
    table = engine.table

    class Interrupting:
        def step_pointers(self, *args):
            table.step_pointers(*args)
            raise KeyboardInterrupt  # the first Python bytecode after the kernels

    monkeypatch.setattr(engine, "_table_as_is", lambda: Interrupting())
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    monkeypatch.undo()
    ref.step()
    assert opt.state[p]["step"].item() == 2 == ref.state[twin]["step"].item()
    opt.step()
    ref.step()
    assert_same([p], [twin])
    assert opt.state[p]["step"].item() == 3


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_complex_params_are_updated_as_pairs_of_reals_like_torch(dtype):
    torch.manual_seed(0)
    w = torch.randn(6, 5, dtype=dtype)
    ours = torch.nn.Parameter(w.clone())
    pairs = torch.nn.Parameter(torch.view_as_real(w.clone()).clone())
    theirs = torch.nn.Parameter(w.clone())
    optimizers = [ft.Adam([ours], lr=0.01, amsgrad=True, weight_decay=0.1),
                  ft.Adam([pairs], lr=0.01, amsgrad=True, weight_decay=0.1),
                  torch.optim.Adam([theirs], lr=0.01, amsgrad=True, weight_decay=0.1,
                                   foreach=False)]
    for _ in range(3):
        grad = torch.randn(6, 5, dtype=dtype)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        pairs.grad = torch.view_as_real(grad).clone()
        for opt in optimizers:
            opt.step()
    assert torch.equal(torch.view_as_real(ours.detach()), pairs.detach())  # the same bits
    torch.testing.assert_close(ours, theirs)
    state = optimizers[0].state[ours]
    assert state["exp_avg"].dtype == dtype and state["exp_avg"].shape == (6, 5)
    torch.testing.assert_close(state["exp_avg_sq"], optimizers[2].state[theirs]["exp_avg_sq"])
    # and the state dict moves to torch and back
    resumed = ft.Adam([torch.nn.Parameter(w.clone())])
    resumed.load_state_dict(optimizers[0].state_dict())
    resumed.param_groups[0]["params"][0].grad = torch.ones(6, 5, dtype=dtype)
    resumed.step()
    assert resumed.state[resumed.param_groups[0]["params"][0]]["step"].item() == 4


NATIVE_TRAINING = r"""
import itertools, sys
import torch
import fastadam.torch as ft

assert "ATEN_CPU_CAPABILITY" not in __import__("os").environ
capability = torch.backends.cpu.get_cpu_capability()


def models():
    torch.manual_seed(0)
    conv = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(32, 10)).to(memory_format=torch.channels_last)
    torch.manual_seed(1)
    transformer = torch.nn.Sequential(
        torch.nn.Embedding(50, 32),
        torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
        torch.nn.Flatten(), torch.nn.Linear(32 * 7, 10))
    return {"conv": conv, "transformer": transformer}


def batches(name):
    gen = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        if name == "conv":
            yield torch.randn(8, 3, 12, 12, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        else:
            yield torch.randint(0, 50, (8, 7), generator=gen), torch.randint(0, 10, (8,), generator=gen)


def train(name, make_opt):
    model = models()[name]
    opt = make_opt(model.parameters())
    for x, y in batches(name):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


STEPS = int(sys.argv[1])
bad = []
for name, (ours, theirs), (amsgrad, wd, maximize) in itertools.product(
        ("conv", "transformer"), ((ft.Adam, torch.optim.Adam), (ft.AdamW, torch.optim.AdamW)),
        itertools.product((False, True), (0.0, 0.1), (False, True))):
    kw = dict(lr=1e-2, amsgrad=amsgrad, weight_decay=wd, maximize=maximize)
    got = train(name, lambda ps: ours(ps, **kw))
    want = train(name, lambda ps: theirs(ps, fused=True, **kw))
    if not all(torch.equal(a, b) for a, b in zip(got, want)):
        bad.append((name, ours.__name__, kw))
print(capability, ft.default_numerics(), "mismatches:", bad)
"""


@pytest.mark.slow
def test_default_numerics_give_torch_fused_bits_at_the_native_capability():
    # A CNN (channels_last) and a transformer layer, 50 steps, every flag, Adam and AdamW.
    # conftest pins ATen's default capability for the other tests: run torch as users do.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    out = subprocess.run([sys.executable, "-c", NATIVE_TRAINING, "50"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    capability, numerics, _, mismatches = out.stdout.split(" ", 3)
    assert numerics == ("torch" if capability in ("AVX2", "AVX512") else "exact")
    assert mismatches.strip() == "[]", out.stdout


def test_unsupported_params_raise_what_torch_code_catches():
    # A TypeError as every fastadam refusal of a kind, and the RuntimeError torch's fused
    # Adam raises for the same parameters, with its words.
    p = torch.nn.Parameter(torch.ones(3, device="meta"))
    opt = ft.Adam([p], fused=True)
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point"):
        opt.step()
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] is on meta"):
        opt.step()


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": torch.tensor([0.1, 0.2])}, "Tensor lr must be 1-element"),
    ({"lr": torch.tensor(0.1), "foreach": True}, "lr as a Tensor is not supported"),
    ({"weight_decay": -1.0}, "Invalid weight_decay value: -1.0"),
    ({"eps": -1.0}, "Invalid epsilon value: -1.0"),
])
def test_constructor_errors_are_torchs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ft.Adam([torch.nn.Parameter(torch.ones(2))], **kwargs)
    with pytest.raises(ValueError, match=match):
        torch.optim.Adam([torch.nn.Parameter(torch.ones(2))], **kwargs)
