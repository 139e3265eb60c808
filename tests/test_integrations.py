"""fastadam.torch inside training frameworks, each through its public hook (issue 18):
Hugging Face ``transformers.Trainer`` (``optimizer_cls_and_kwargs`` and ``optimizers``),
PyTorch Lightning (``configure_optimizers``) and timm (an ``OptimizerRegistry`` of its
own). Each framework is optional: its tests skip when it is not installed
(``pip install ".[integrations]" -c constraints/torch-cpu.txt``). Tiny models built here,
a few steps each; nothing is downloaded.

Bit parity is checked against ``torch.optim.Adam``/``AdamW(fused=True)`` in the same
framework, on the same model and data: fastadam.torch's default numerics reproduce torch's
fused kernel at the capability ATen runs (conftest.py pins the default one)."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastadam.torch")

STEPS = 4


def assert_same_bits(got, want):
    """Two {name: tensor} dicts hold the same names and the same bits."""
    assert list(got) == list(want)
    for name, a in got.items():
        assert torch.equal(a.reshape(-1).view(torch.uint8),
                           want[name].reshape(-1).view(torch.uint8)), name


def optimizer_under(wrapper):
    """The optimizer a framework wraps (accelerate's AcceleratedOptimizer, Lightning's
    LightningOptimizer) or the optimizer itself."""
    return getattr(wrapper, "optimizer", wrapper)


class StepCounter:
    """Counts the steps an optimizer takes, through torch's public step post-hook."""

    def __init__(self, optimizer):
        self.count = 0
        optimizer.register_step_post_hook(self)

    def __call__(self, optimizer, args, kwargs):
        self.count += 1


# Entries other code keeps in opt.state[p] (timm's Lookahead keeps its slow weights there)

def test_entries_other_code_adds_to_a_parameters_state_stay_as_in_torch(tmp_path):
    def run(cls, **kwargs):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        opt = cls(model.parameters(), lr=1e-2, **kwargs)
        gen = torch.Generator().manual_seed(1)
        slow = {}
        for step in range(6):
            if step == 3:  # a resume half way, from a saved state dict
                torch.save(opt.state_dict(), tmp_path / f"{cls.__module__}.pt")
                opt = cls(model.parameters(), lr=1e-2, **kwargs)
                opt.load_state_dict(torch.load(tmp_path / f"{cls.__module__}.pt"))
            opt.zero_grad()
            model(torch.randn(4, 6, generator=gen)).square().mean().backward()
            opt.step()
            for p in model.parameters():  # what Lookahead does: a buffer in the entry
                entry = opt.state[p]
                if "slow" not in entry:
                    entry["slow"] = p.detach().clone()
                entry["slow"].add_(p.detach() - entry["slow"], alpha=0.5)
                slow[p] = entry["slow"]
        return model, opt, slow

    model, opt, slow = run(ft.Adam)
    reference, reference_opt, reference_slow = run(torch.optim.Adam, fused=True)
    assert list(opt.state[next(model.parameters())]) == \
        list(reference_opt.state[next(reference.parameters())])
    assert_same_bits({n: slow[p] for n, p in model.named_parameters()},
                     {n: reference_slow[p] for n, p in reference.named_parameters()})
    assert_same_bits(dict(model.named_parameters()), dict(reference.named_parameters()))


def test_entries_other_code_adds_keep_the_compiled_step(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = ft.Adam(model.parameters())
    x = torch.randn(4, 8)
    model(x).sum().backward()
    opt.step()
    for p in model.parameters():
        opt.state[p]["slow"] = p.detach().clone()
    front = opt._front
    with monkeypatch.context() as patch:
        patch.setattr(type(front), "_general_step", lambda *a: pytest.fail("general path"))
        for _ in range(2):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
    assert all("slow" in opt.state[p] for p in model.parameters())
    # one of fastadam's own keys that it did not publish is state to adopt: general path
    weight = model[1].weight
    opt.state[weight]["max_exp_avg_sq"] = torch.zeros_like(weight)
    general = []
    original = type(front)._general_step
    with monkeypatch.context() as patch:
        patch.setattr(type(front), "_general_step",
                      lambda *a: general.append(1) or original(*a))
        opt.step()
    assert general and opt._front is front and "slow" in opt.state[weight]


# Hugging Face transformers.Trainer

def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # no dropout: the runs compared draw no random numbers after the model is built
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16,
                                     vocab_size=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def token_dataset(n=32, length=16):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (n, length), generator=gen)
    return [{"input_ids": row, "labels": row} for row in ids]


def hf_trainer(model, tmp_path, name, save_steps=None, **trainer_kwargs):
    transformers = pytest.importorskip("transformers")
    saving = {"save_strategy": "no"} if save_steps is None else \
        {"save_strategy": "steps", "save_steps": save_steps}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), max_steps=STEPS, per_device_train_batch_size=4,
        optim="adamw_torch_fused",  # TrainingArguments' default with torch >= 2.8
        learning_rate=3e-3, weight_decay=0.1, lr_scheduler_type="linear", warmup_steps=1,
        seed=0, use_cpu=True, report_to=[], logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, **saving)
    return transformers.Trainer(model=model, args=args, train_dataset=token_dataset(),
                                **trainer_kwargs)


def trained_parameters(trainer, **train_kwargs):
    trainer.train(**train_kwargs)
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_hf_trainer_optimizer_cls_and_kwargs_is_bit_identical_to_its_fused_adamw(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_gpt2()
    reference = hf_trainer(copy.deepcopy(model), tmp_path, "torch")
    want = trained_parameters(reference)
    assert type(optimizer_under(reference.optimizer)) is torch.optim.AdamW

    # the recipe of docs/guide/pytorch.md: Trainer's own kwargs for its AdamW, fastadam's class
    _, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(reference.args)
    assert kwargs["fused"] is True  # accepted by fastadam.torch, which changes nothing
    trainer = hf_trainer(copy.deepcopy(model), tmp_path, "fastadam",
                         optimizer_cls_and_kwargs=(ft.AdamW, kwargs))
    trainer.create_optimizer()
    optimizer = optimizer_under(trainer.optimizer)
    assert type(optimizer) is ft.AdamW
    steps = StepCounter(optimizer)
    got = trained_parameters(trainer)
    assert steps.count == STEPS
    assert optimizer_under(trainer.optimizer) is optimizer
    # Trainer's decay/no-decay grouping reached fastadam as it reaches torch's AdamW
    names = {id(p): n for n, p in trainer.model.named_parameters()}  # tied weights once
    decay = set(trainer.get_decay_parameter_names(trainer.model)) & set(names.values())
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert {names[id(p)] for p in optimizer.param_groups[0]["params"]} == decay
    assert not decay & {names[id(p)] for p in optimizer.param_groups[1]["params"]}
    assert all(len(g["params"]) for g in optimizer.param_groups)
    assert_same_bits(got, want)
    assert any(not torch.equal(got[n], p) for n, p in model.named_parameters())


def test_hf_trainer_optimizers_tuple_with_its_decay_groups_is_bit_identical(tmp_path):
    model = tiny_gpt2()
    want = trained_parameters(hf_trainer(copy.deepcopy(model), tmp_path, "torch"))

    mine = copy.deepcopy(model)
    trainer = hf_trainer(mine, tmp_path, "fastadam")
    decay = set(trainer.get_decay_parameter_names(mine))
    groups = [{"params": [p for n, p in mine.named_parameters() if n in decay],
               "weight_decay": 0.1},
              {"params": [p for n, p in mine.named_parameters() if n not in decay],
               "weight_decay": 0.0}]
    optimizer = ft.AdamW(groups, lr=3e-3)
    trainer = hf_trainer(mine, tmp_path, "fastadam", optimizers=(optimizer, None))
    steps = StepCounter(optimizer)
    assert_same_bits(trained_parameters(trainer), want)
    assert steps.count == STEPS and optimizer_under(trainer.optimizer) is optimizer


def test_hf_trainer_resumes_fastadam_from_its_checkpoint_bit_identically(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_gpt2()
    _, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(
        hf_trainer(copy.deepcopy(model), tmp_path, "args").args)
    recipe = {"optimizer_cls_and_kwargs": (ft.AdamW, kwargs)}
    straight = trained_parameters(hf_trainer(copy.deepcopy(model), tmp_path, "straight",
                                             **recipe))
    hf_trainer(copy.deepcopy(model), tmp_path, "saved", save_steps=STEPS // 2, **recipe).train()
    checkpoint = tmp_path / "saved" / f"checkpoint-{STEPS // 2}"
    assert (checkpoint / "optimizer.pt").exists()  # fastadam's state_dict(), torch.save'd
    trainer = hf_trainer(copy.deepcopy(model), tmp_path, "resumed", **recipe)
    resumed = trained_parameters(trainer, resume_from_checkpoint=str(checkpoint))
    optimizer = optimizer_under(trainer.optimizer)
    assert type(optimizer) is ft.AdamW
    assert {int(s["step"]) for s in optimizer.state.values()} == {STEPS}
    assert_same_bits(resumed, straight)


# PyTorch Lightning

def lightning_module(optimizer_cls, **optimizer_kwargs):
    """A small classifier whose configure_optimizers returns ``optimizer_cls``."""
    pl = pytest.importorskip("lightning.pytorch")

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(),
                                           torch.nn.Linear(32, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return optimizer_cls(self.parameters(), **optimizer_kwargs)

    return Classifier()


def lightning_data():
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 10, generator=gen),
                                          torch.randint(0, 3, (64,), generator=gen))
    return torch.utils.data.DataLoader(data, batch_size=32)  # 2 steps an epoch, in order


def lightning_fit(module, tmp_path, epochs, ckpt_path=None):
    pl = pytest.importorskip("lightning.pytorch")
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, lightning_data(), ckpt_path=ckpt_path)
    return trainer


def module_parameters(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1, "amsgrad": True}],
                         ids=["plain", "l2-amsgrad"])
def test_lightning_configure_optimizers_is_bit_identical_to_torch_fused_adam(tmp_path, kwargs):
    reference = lightning_module(torch.optim.Adam, lr=1e-2, fused=True, **kwargs)
    lightning_fit(reference, tmp_path, epochs=2)

    module = lightning_module(ft.Adam, lr=1e-2, **kwargs)
    trainer = lightning_fit(module, tmp_path, epochs=2)
    optimizer = optimizer_under(trainer.optimizers[0])
    assert type(optimizer) is ft.Adam
    assert trainer.global_step == 4 and int(optimizer.state[module.net[0].weight]["step"]) == 4
    assert_same_bits(module_parameters(module), module_parameters(reference))


def test_lightning_checkpoint_resume_continues_bit_identically(tmp_path):
    straight = lightning_module(ft.Adam, lr=1e-2)
    lightning_fit(straight, tmp_path, epochs=2)

    first = lightning_module(ft.Adam, lr=1e-2)
    trainer = lightning_fit(first, tmp_path, epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = lightning_module(ft.Adam, lr=1e-2)  # a fresh model and optimizer
    trainer = lightning_fit(resumed, tmp_path, epochs=2, ckpt_path=tmp_path / "epoch1.ckpt")
    optimizer = optimizer_under(trainer.optimizers[0])
    assert type(optimizer) is ft.Adam
    assert int(optimizer.state[resumed.net[0].weight]["step"]) == 4  # the moments went on too
    assert_same_bits(module_parameters(resumed), module_parameters(straight))


# timm

def timm_or_skip():
    try:
        import timm
        import timm.optim
    except ImportError as exc:
        pytest.skip(f"timm is not installed or lacks a dependency: {exc}")
    except RuntimeError as exc:  # torchvision 0.28 fails so when its compiled ops don't load
        pytest.skip("timm needs torchvision, which does not import beside this torch (PyPI's "
                    f"torchvision is a CUDA build; docs/guide/pytorch.md): {exc}")
    return timm


def fastadam_registry(timm):
    """The recipe of docs/guide/pytorch.md: a timm OptimizerRegistry of fastadam's classes
    under timm's names, so `registry.create_optimizer` takes what `create_optimizer_v2` does."""
    registry = timm.optim.OptimizerRegistry()
    registry.register(timm.optim.OptimInfo("adam", ft.Adam, "fastadam.torch.Adam",
                                           has_betas=True))
    registry.register(timm.optim.OptimInfo("adamw", ft.AdamW, "fastadam.torch.AdamW",
                                           has_betas=True))
    return registry


def train_on_images(model, optimizer, steps=3):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 3, (4,), generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_groups(optimizer, model, reference, reference_model):
    """The same parameters (by name) in the same groups, with the same hyperparameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    reference_names = {id(p): n for n, p in reference_model.named_parameters()}
    assert len(optimizer.param_groups) == len(reference.param_groups) > 1
    for group, want in zip(optimizer.param_groups, reference.param_groups):
        assert [names[id(p)] for p in group["params"]] == \
            [reference_names[id(p)] for p in want["params"]]
        assert {k: v for k, v in group.items() if k != "params"} == \
            {k: v for k, v in want.items() if k != "params"}


@pytest.mark.parametrize("opt, cls", [("adamw", "AdamW"), ("adam", "Adam")])
@pytest.mark.parametrize("grouping", [{}, {"layer_decay": 0.75}], ids=["decay", "layer-decay"])
def test_timm_registry_of_fastadam_is_create_optimizer_v2_bit_for_bit(opt, cls, grouping):
    timm = timm_or_skip()
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, num_classes=3)  # no_weight_decay()
    reference_model = copy.deepcopy(model)
    kwargs = dict(lr=1e-3, weight_decay=0.05, fused=True, **grouping)
    reference = timm.optim.create_optimizer_v2(reference_model, opt, **kwargs)
    assert type(reference) is getattr(torch.optim, cls)

    optimizer = fastadam_registry(timm).create_optimizer(model, opt, **kwargs)
    assert type(optimizer) is getattr(ft, cls)
    assert_same_groups(optimizer, model, reference, reference_model)
    steps = StepCounter(optimizer)
    assert_same_bits(train_on_images(model, optimizer),
                     train_on_images(reference_model, reference))
    assert steps.count == 3


def test_timm_lookahead_over_fastadam_is_bit_identical(tmp_path):
    # timm's Lookahead keeps its slow weights in the base optimizer's state entries
    timm = timm_or_skip()
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, num_classes=3)
    reference_model = copy.deepcopy(model)
    kwargs = dict(lr=1e-3, weight_decay=0.05, fused=True)
    reference = timm.optim.create_optimizer_v2(reference_model, "lookahead_adamw", **kwargs)
    optimizer = fastadam_registry(timm).create_optimizer(model, "lookahead_adamw", **kwargs)
    assert type(optimizer._base_optimizer) is ft.AdamW
    assert type(reference._base_optimizer) is torch.optim.AdamW
    steps = StepCounter(optimizer._base_optimizer)
    # the slow weights are made at step 6 (k=6) and used at step 12
    got = train_on_images(model, optimizer, steps=13)
    assert_same_bits(got, train_on_images(reference_model, reference, steps=13))
    assert steps.count == 13
    torch.save(optimizer.state_dict(), tmp_path / "lookahead.pt")  # slow weights included
    assert all("lookahead_slow_buff" in s
               for s in torch.load(tmp_path / "lookahead.pt")["state"].values())



# At the capability torch picks

@pytest.mark.slow
def test_every_framework_run_is_bit_identical_at_the_capability_torch_picks_itself(tmp_path):
    # conftest.py pins ATen's default capability in this process; users train at the one
    # torch picks (its AVX2/AVX-512 kernels on x86-64), where fastadam.torch's default
    # numerics are "torch". This module's other tests, run there, in a process of their own.
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    native = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env, capture_output=True, text=True, check=True).stdout.strip()
    if native == "DEFAULT":
        pytest.skip("torch picks its default capability on this CPU: the other tests cover it")
    import fastadam  # the same fastadam as this session (installed, or built under src/)

    env["ATEN_CPU_CAPABILITY"] = native.lower()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(fastadam.__file__).parents[1]),
                                         env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
         "-k", "not capability_torch_picks_itself"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:]
    assert " passed" in result.stdout.splitlines()[-1]
