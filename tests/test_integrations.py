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

import pytest

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastadam.torch")

STEPS = 4


def assert_same_bits(got, want):
    assert len(got) == len(want)
    for (name, a), b in zip(got.items(), want.values()):
        assert torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim()
                           else b), name


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


def hf_trainer(model, tmp_path, name, **trainer_kwargs):
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), max_steps=STEPS, per_device_train_batch_size=4,
        learning_rate=3e-3, weight_decay=0.1, lr_scheduler_type="linear", warmup_steps=1,
        seed=0, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=token_dataset(),
                                **trainer_kwargs)


def trained_parameters(trainer):
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_hf_trainer_optimizer_cls_and_kwargs_is_bit_identical_to_its_fused_adamw(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_gpt2()
    reference = hf_trainer(copy.deepcopy(model), tmp_path, "torch")
    assert reference.args.optim == "adamw_torch_fused"  # Trainer's own default
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
