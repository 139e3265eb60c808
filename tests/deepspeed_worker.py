"""DeepSpeed ZeRO-Offload with fastadam.torch.AdamW as its CPU optimizer, in a process of
its own (DeepSpeed sets up torch.distributed and picks its accelerator at import), one
rank on DeepSpeed's CPU accelerator. tests/test_deepspeed.py runs

    python tests/deepspeed_worker.py

which trains the same model a few steps under each ZeRO configuration of ``CASES``
(``offload_optimizer: cpu``), once with fastadam's AdamW and once with
``torch.optim.AdamW(fused=True)`` as the client optimizer, and prints one JSON line:
``{"cases": [...], "failures": [...]}``. The two runs must end bit-identical: the same
flat fp32 partitions through the same update. ZeRO-3 with a small ``sub_group_size``
steps its sub-groups one by one, each put into the param group in turn.
"""

import json
import os
import sys
import warnings

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT="0")  # one process; port 0: any free port
warnings.filterwarnings("ignore", category=FutureWarning)

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

import fastadam.torch as fat  # noqa: E402

CASES = [  # (ZeRO stage, extra zero_optimization settings, bf16)
    (1, {}, False),
    (2, {}, False),
    (2, {}, True),
    (3, {}, False),
    (3, {"sub_group_size": 40}, False),  # the model's 83 elements in several sub-groups
]


def config(stage, zero, bf16):
    """The documented configuration (docs/guide/deepspeed.md) for one case."""
    return {
        "train_micro_batch_size_per_gpu": 5,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}, **zero},
        "zero_allow_untested_optimizer": True,  # a client optimizer, not DeepSpeed's own
        "zero_force_ds_cpu_optimizer": False,   # ... under offload: not DeepSpeedCPUAdam
        "bf16": {"enabled": bf16},
    }


def train(case, make_optimizer, steps=4):
    stage, zero, bf16 = case
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2))
    opt = make_optimizer(model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config(*case))
    for step in range(steps):
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(step))
        loss = engine(x.to(torch.bfloat16) if bf16 else x).float().square().mean()
        engine.backward(loss)
        engine.step()
    # the fp32 master weights (ZeRO-3 partitions the module's own parameters)
    params = [safe_get_full_fp32_param(p).clone() for p in model.parameters()]
    return params, opt


def main():
    failures, cases = [], []
    for case in CASES:
        ours, opt = train(case, lambda params: fat.AdamW(params, lr=1e-2))
        theirs, _ = train(case, lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True))
        label = f"stage {case[0]} {case[1]}{' bf16' if case[2] else ''}"
        cases.append(f"{label}: {len(opt.state)} flat partitions")
        if case[1].get("sub_group_size") and len(opt.state) < 2:
            failures.append(f"{label}: one flat partition, not several sub-groups")
        if not opt.state or any(len(s) != 3 for s in opt.state.values()):
            failures.append(f"{label}: fastadam's optimizer holds no state: it did not step")
        for k, (a, b) in enumerate(zip(ours, theirs)):
            if not (a.dtype == b.dtype == torch.float32 and torch.equal(a, b)):
                failures.append(f"{label}: parameter {k} differs from torch's fused AdamW "
                                f"(max {(a - b).abs().max().item():.3g})")
    print(json.dumps({"cases": cases, "failures": failures}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
