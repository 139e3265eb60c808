"""fastadam.adam_step against torch.optim on the same gradient sequences.

docs/design.md: the default form is the operation order of PyTorch's fused CPU Adam without
FMA, so it is bit-identical to ``torch.optim.Adam(fused=True)`` on ATen's "default"
(no-FMA) CPU capability, set in conftest.py, and within a few ulps of torch's other paths.
"""

import itertools

import numpy as np
import pytest

import fastadam

from conftest import default_capability_mark, make_grads, make_state

torch = pytest.importorskip("torch")

STEPS = 5
SIZE = 1037  # a vector body and a scalar tail in both libraries

needs_default_capability = default_capability_mark(torch)

FLAGS = [
    dict(zip(("amsgrad", "weight_decay", "decoupled", "maximize"), values))
    for values in itertools.product([False, True], [0.0, 0.1], [False, True], [False, True])
    if not (values[2] and values[1] == 0.0)  # AdamW without decay is Adam
]


def flags_id(flags):
    return "-".join(f"{k}={v}" for k, v in flags.items())


def torch_run(dtype, flags, **optimizer_kwargs):
    param, _, _, _ = make_state(SIZE, dtype)
    tensor = torch.nn.Parameter(torch.from_numpy(param.copy()))
    cls = torch.optim.AdamW if flags["decoupled"] else torch.optim.Adam
    opt = cls([tensor], lr=0.01, betas=(0.9, 0.999), eps=1e-8,
              weight_decay=flags["weight_decay"], amsgrad=flags["amsgrad"],
              maximize=flags["maximize"], **optimizer_kwargs)
    for grad in make_grads(SIZE, dtype, STEPS):
        tensor.grad = torch.from_numpy(grad)
        opt.step()
    state = opt.state[tensor]
    return (tensor.detach().numpy(), state["exp_avg"].numpy(), state["exp_avg_sq"].numpy(),
            state["max_exp_avg_sq"].numpy() if flags["amsgrad"] else None)


def fastadam_run(dtype, flags):
    param, _, _, _ = make_state(SIZE, dtype)
    m, v = np.zeros_like(param), np.zeros_like(param)
    vmax = np.zeros_like(param) if flags["amsgrad"] else None
    for step, grad in enumerate(make_grads(SIZE, dtype, STEPS), start=1):
        fastadam.adam_step(param, grad, m, v, max_exp_avg_sq=vmax, step=step, lr=0.01,
                           weight_decay=flags["weight_decay"],
                           decoupled_weight_decay=flags["decoupled"],
                           maximize=flags["maximize"])
    return param, m, v, vmax


@needs_default_capability
@pytest.mark.parametrize("flags", FLAGS, ids=flags_id)
def test_bit_identical_to_torch_fused_adam(dtype, flags):
    expected = torch_run(dtype, flags, fused=True)
    for got, want in zip(fastadam_run(dtype, flags), expected):
        if want is None:
            continue
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("implementation", ["foreach", "for-loop"])
@pytest.mark.parametrize("flags", FLAGS, ids=flags_id)
def test_within_a_few_ulps_of_torch_adam(dtype, flags, implementation):
    expected = torch_run(dtype, flags, foreach=implementation == "foreach")
    for got, want in zip(fastadam_run(dtype, flags), expected):
        if want is None:
            continue
        eps = np.finfo(dtype).eps
        np.testing.assert_allclose(got, want, rtol=8 * eps, atol=8 * eps * np.abs(want).max())


@needs_default_capability
@pytest.mark.parametrize("grad_scale", [1024.0, 3.0])
def test_grad_scale_bit_identical_to_torch_fused_kernel(dtype, grad_scale):
    # torch's fused kernel divides by grad_scale (and writes the unscaled grad back).
    param, _, _, _ = make_state(SIZE, dtype)
    grads = make_grads(SIZE, dtype, STEPS)
    p_t = torch.from_numpy(param.copy())
    m_t, v_t = torch.zeros_like(p_t), torch.zeros_like(p_t)
    step_t = torch.zeros((), dtype=torch.float32)
    m, v = np.zeros_like(param), np.zeros_like(param)
    for step, grad in enumerate(grads, start=1):
        step_t += 1
        torch._fused_adam_([p_t], [torch.from_numpy(grad * np.asarray(grad_scale, dtype))],
                           [m_t], [v_t], [], [step_t], lr=0.01, beta1=0.9, beta2=0.999,
                           weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=True,
                           grad_scale=torch.tensor(grad_scale, dtype=torch.float32))
        fastadam.adam_step(param, grad * np.asarray(grad_scale, dtype), m, v, step=step,
                           lr=0.01, maximize=True, grad_scale=grad_scale)
    for got, want in ((param, p_t), (m, m_t), (v, v_t)):
        np.testing.assert_array_equal(got.view(np.uint8), want.numpy().view(np.uint8))
