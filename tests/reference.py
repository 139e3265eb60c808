"""NumPy reference of docs/design.md's update, written exactly as docs/design.md states it.

``adam_reference(..., dtype=np.float64)`` is the semantic reference: every operation in
double precision. ``dtype=np.float32`` (or the buffers' own dtype) performs the same
operations in that dtype, with the per-step constants computed in double and cast once,
so it must match the kernels bit for bit: NumPy's float32/float64 ufuncs are correctly
rounded and never fuse a multiply and an add.
"""

import math

import numpy as np


def adam_reference(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq=None,
    *,
    step,
    lr=1e-3,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    decoupled_weight_decay=False,
    maximize=False,
    eps_hat=False,
    eps_root=0.0,
    grad_scale=1.0,
    dtype=np.float64,
):
    """Returns new (param, exp_avg, exp_avg_sq, max_exp_avg_sq or None) in ``dtype``."""
    T = np.dtype(dtype).type
    p, g, m, v = (np.array(x, dtype=dtype).reshape(-1) for x in (param, grad, exp_avg, exp_avg_sq))
    vmax = None if max_exp_avg_sq is None else np.array(max_exp_avg_sq, dtype=dtype).reshape(-1)

    # Per step, in double, outside the loop; then cast to the element type.
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    s = lr / bc1
    r2 = math.sqrt(bc2)
    w = T(1.0 - beta1)

    if grad_scale != 1.0:
        g = g / T(grad_scale)
    if maximize:
        g = -g
    if weight_decay != 0.0 and not decoupled_weight_decay:
        g = g + T(weight_decay) * p
    if decoupled_weight_decay:
        p = p * T(1.0 - lr * weight_decay)
    if w < 0.5:
        m = m + w * (g - m)
    else:
        m = g - (g - m) * (T(1.0) - w)
    v = v * T(beta2) + (T(1.0 - beta2) * g) * g
    vv = v
    if vmax is not None:
        vmax = np.where(vmax < v, v, vmax)
        vv = vmax
    if eps_root > 0.0:
        p = p - T(lr) * (m / T(bc1)) / (np.sqrt(vv / T(bc2) + T(eps_root)) + T(eps))
    elif eps_hat:
        a = lr * r2 / bc1
        p = p - (m * T(a)) / (np.sqrt(vv) + T(eps))
    else:
        p = p + (T(-s) * m) / (np.sqrt(vv) / T(r2) + T(eps))
    return p, m, v, vmax
