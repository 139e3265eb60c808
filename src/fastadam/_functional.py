"""``adam_step``: one in-place Adam update of one set of buffers; ``adam_step_rows``: a
lazy update of some rows of one."""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from fastadam import _kernels
from fastadam._memory import STATE_PAGE_OFFSETS, zeros_at
from fastadam._rows import sum_duplicate_rows
from fastadam._threads import threads_for
from fastadam._validation import (
    AdamBuffers,
    as_array,
    check_at_least,
    check_bfloat16_state,
    check_buffers,
    check_call_hyperparameters,
    check_element_dtype,
    check_element_type_range,
    check_flag,
    check_grad_scale_range,
    check_hyperparameters,
    check_num_threads,
    check_row_buffers,
    check_seed,
    check_state_dtype,
    check_step,
    is_bfloat16,
    plain_buffers,
    type_name,
)


def adam_step(
    param: Any,
    grad: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    *,
    step: int,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    max_exp_avg_sq: Any = None,
    maximize: bool = False,
    eps_hat: bool = False,
    eps_root: float = 0.0,
    grad_scale: float = 1.0,
    num_threads: Optional[int] = None,
    numerics: str = "exact",
    master_param: Any = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
    dtype: Any = None,
) -> None:
    """One in-place Adam step (Kingma & Ba, Algorithm 1) on one set of buffers.

    Parameters
    ----------
    param, grad, exp_avg, exp_avg_sq : buffer
        NumPy arrays or any object exporting the buffer protocol (memoryview,
        array.array, bytearray- or mmap-backed memory, ...), all of one element type
        (float32, float64, float16, or bfloat16 as ``ml_dtypes.bfloat16`` arrays),
        C-contiguous, with the same number of elements (shapes may differ). ``param``,
        ``exp_avg`` and ``exp_avg_sq`` are updated in place and must be writable; no two
        buffers may overlap. ``grad`` is only read (read-only buffers are fine). For
        bfloat16 and float16 the update is computed in float32 (as torch's fused Adam
        does) and rounded to nearest even on store. One mix is allowed: a float32
        ``param`` and ``grad`` with bfloat16 ``exp_avg``/``exp_avg_sq`` (and
        ``max_exp_avg_sq``): bfloat16 moments, computed in float32 (``adam_state(param,
        state_dtype="bfloat16")``).
    step : int
        The 1-based number of this update (bias corrections use ``beta ** step``).
    lr, beta1, beta2, eps : float
        The paper's alpha, beta1, beta2 and epsilon.
    weight_decay : float
        L2 penalty added to the gradient, or with ``decoupled_weight_decay=True`` the
        AdamW decay ``p *= 1 - lr * weight_decay`` applied before the update.
    max_exp_avg_sq : buffer, optional
        Given, the update is AMSGrad: the running maximum of ``exp_avg_sq`` is kept here
        and used in the denominator.
    maximize : bool
        Ascend instead of descend (the gradient's sign is flipped).
    eps_hat : bool
        Keras/TensorFlow's epsilon convention ("epsilon hat", the paper's section 2).
    eps_root : float
        Optax's ``eps_root``, added under the square root; > 0 selects Optax's form.
    grad_scale : float
        The gradient is divided by this first (loss scaling); must be > 0.
    num_threads : int, optional
        OpenMP threads for this call; None uses :func:`fastadam.get_num_threads`.
        Buffers below a size threshold always use one thread.
    numerics : {"exact", "torch"}
        The rounding profile. "exact" (the default): docs/design.md's operation order with no
        FMA, bit-identical to ``torch.optim.Adam(fused=True)`` under
        ``ATEN_CPU_CAPABILITY=default``. "torch": the same update with the FMAs of
        torch's AVX2/AVX-512 fused CPU kernel, the code torch runs on any x86-64 CPU with
        AVX2 (torch 2.13), so bit-identical to ``torch.optim.Adam(fused=True)`` there;
        ``param`` is treated as one torch tensor (its last ``size % 8`` float32 or
        ``size % 4`` float64 elements get torch's scalar-tail rounding). Not with
        ``eps_root > 0``. See docs/numerics-torch.md.
    master_param : buffer, optional
        Master weights: a float32 copy of a bfloat16 or float16 ``param``. The update is
        made in ``master_param`` (with float32 ``exp_avg``/``exp_avg_sq``, and a grad of
        the param's type or float32), and ``param`` receives the master rounded to
        nearest even, in the same pass: bit-identical to a float32 step on
        ``grad.astype(float32)`` followed by ``param[...] = master_param``.
    stochastic_rounding : bool
        Round a bfloat16 ``param`` stochastically instead of to nearest even (only for
        bfloat16 params without ``master_param``); reproducible: the random bits depend
        on ``seed``, ``step`` and the element's index only, not on threads or vector width.
    seed : int
        The seed of stochastic rounding (an int64).
    dtype : {"bfloat16", "float16", "float32", "float64"} or NumPy dtype, optional
        The element type of buffers that carry none of their own: raw bytes
        (``bytearray``, ``mmap``, a ``memoryview`` of format ``"B"``) or bits (``uint16``
        arrays holding bfloat16 values, without ml_dtypes) are read as ``dtype``.
        Buffers of a float type keep theirs (a float32 ``master_param`` beside raw
        bfloat16 ``param`` and ``grad``, say).

    Raises
    ------
    TypeError, ValueError
        For any bad argument, naming it; nothing is written then. Hyperparameters are
        also checked against the buffers' element type, into which the kernel casts them
        (fastadam._validation.check_element_type_range): in float32, ``eps=1e-50`` (0 in
        float32), ``grad_scale=1e-300`` (not a normal float32) or ``lr=1e39`` (an
        infinite step) is a ValueError naming the argument and the type.

    Notes
    -----
    The GIL is released while the kernel runs. Results are bit-identical for every
    thread count. Unaligned buffers (possible with buffer-protocol objects) are updated
    through aligned temporary copies.
    """
    hp = check_call_hyperparameters(lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                                    max_exp_avg_sq is not None, maximize, eps_hat, eps_root,
                                    numerics)
    step_number = float(check_step(step))
    scale = 1.0 if grad_scale == 1.0 and type(grad_scale) is float else check_at_least(
        grad_scale, "grad_scale", 0.0, strict=True)
    threads = check_num_threads(num_threads)
    rounding_seed = _check_rounding(stochastic_rounding, seed)
    element_type = None if dtype is None else check_element_dtype(dtype)
    if (master_param is None and rounding_seed is None
            and plain_buffers(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq)):  # the common case
        _check_range(hp, param.dtype, step_number, scale)
        if param.size:
            _kernels.adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, hp, step_number,
                               scale, threads_for(threads, param.size))
        return
    buffers = check_buffers(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master_param,
                            element_type)
    if rounding_seed is not None and not (is_bfloat16(buffers.param.dtype)
                                          and master_param is None):
        raise ValueError("stochastic_rounding is for a bfloat16 param without master_param, got "
                         f"a {type_name(buffers.param.dtype)} param"
                         + (" with master_param" if master_param is not None else ""))
    _check_range(hp, buffers.param.dtype, step_number, scale)
    size = buffers.param.size
    if size == 0:
        return
    aligned = _aligned(buffers)
    if aligned.master_param is None:
        _kernels.adam_step(*aligned[:5], hp, step_number, scale, threads_for(threads, size),
                           None, rounding_seed)
    else:  # the kernels update the master; the param is the model's copy they write
        _kernels.adam_step(aligned.master_param, *aligned[1:5], hp, step_number, scale,
                           threads_for(threads, size), aligned.param)
    _copy_back(aligned, buffers)


def _check_rounding(stochastic_rounding: Any, seed: Any) -> Optional[int]:
    """The int64 seed of stochastic rounding, or None for round to nearest even."""
    if not check_flag(stochastic_rounding, "stochastic_rounding"):
        return None
    return check_seed(seed)


def adam_step_rows(
    param: Any,
    grad_rows: Any,
    rows: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    *,
    step: int,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    max_exp_avg_sq: Any = None,
    maximize: bool = False,
    eps_hat: bool = False,
    eps_root: float = 0.0,
    grad_scale: float = 1.0,
    num_threads: Optional[int] = None,
) -> None:
    """One lazy ("sparse") Adam step: only the given rows of ``param`` and of its moments
    change (TensorFlow's LazyAdam, PyTorch's SparseAdam), e.g. for embeddings.

    Each selected row gets exactly :func:`adam_step`'s update (every option, same
    keywords), bit for bit as if ``adam_step`` were called on that row alone with its
    gradient row; rows not in ``rows`` are not touched at all (their moments do not
    decay).

    Parameters
    ----------
    param : buffer
        The whole table: a C-contiguous float32/float64 buffer with at least one axis;
        its first axis is the rows (an (n_rows, dim) embedding; an N-d buffer's rows are
        its sub-arrays along the first axis, a 1-D buffer's rows single elements).
        Updated in place.
    grad_rows : buffer
        The gradient rows, shape ``(len(rows),) + param.shape[1:]`` (or a 1-D buffer of
        as many elements), param's dtype, C-contiguous; only read.
    rows : 1-D array-like of int
        The row of ``param`` each gradient row belongs to: any integer dtype (bools and
        floats are refused), every index in [0, n_rows) (negative indices are refused,
        not wrapped). A row given more than once is updated once, with the sum of its
        gradient rows (added in the element dtype, in the order they appear in
        ``rows``). Empty: nothing changes.
    exp_avg, exp_avg_sq, max_exp_avg_sq : buffer
        The whole tensor's state, as for :func:`adam_step`: param's dtype and element
        count, laid out like param's rows; writable, no two buffers overlapping
        (``grad_rows`` included).
    step : int
        The tensor's (global) 1-based step number, as in LazyAdam and SparseAdam: the
        bias corrections use it for every row, however rarely the row was updated.
    lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize, eps_hat, eps_root, grad_scale, num_threads
        As in :func:`adam_step`. ``weight_decay`` reaches only the selected rows.

    Notes
    -----
    Epsilon: the default is the paper's Algorithm 1 form, as everywhere in fastadam
    (``p - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)``); ``eps_hat=True`` gives the form of
    PyTorch's SparseAdam and TensorFlow's LazyAdam, ``p - lr*sqrt(bc2)/bc1 * m /
    (sqrt(v) + eps)``. With ``eps=0`` the two are the same update.

    Rows are split among the OpenMP threads (long rows in pieces); small updates run on
    one thread. Results are identical for every thread count. The GIL is released while
    the kernel runs.

    Raises
    ------
    TypeError, ValueError
        For any bad argument (out-of-range or negative indices included), naming it;
        nothing is written then.
    """
    hp = check_hyperparameters(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        amsgrad=max_exp_avg_sq is not None,
        maximize=maximize,
        eps_hat=eps_hat,
        eps_root=eps_root,
    )
    step_number = float(check_step(step))
    scale = check_at_least(grad_scale, "grad_scale", 0.0, strict=True)
    threads = check_num_threads(num_threads)
    buffers, indices, row_size = check_row_buffers(param, grad_rows, rows, exp_avg, exp_avg_sq,
                                                   max_exp_avg_sq)
    _check_range(hp, buffers.param.dtype, step_number, scale)
    if indices.size == 0 or row_size == 0:
        return
    aligned = _aligned(buffers)
    indices, summed = sum_duplicate_rows(indices, aligned.grad, row_size)
    aligned = aligned._replace(grad=summed)
    _kernels.adam_step_rows(aligned.param, aligned.grad, indices, row_size, aligned.exp_avg,
                            aligned.exp_avg_sq, aligned.max_exp_avg_sq, hp, step_number, scale,
                            threads_for(threads, indices.size * row_size))
    _copy_back(aligned, buffers)


def _check_range(hp: Any, dtype: np.dtype, step: float, grad_scale: float) -> None:
    """The hyperparameters against the element type they are cast to (finite as doubles
    is not enough: fastadam._validation.check_element_type_range)."""
    check_element_type_range(hp, (dtype,), step=int(step))
    if grad_scale != 1.0:
        check_grad_scale_range(grad_scale, (dtype,))


def _aligned(buffers: AdamBuffers) -> AdamBuffers:
    """The buffers themselves, or aligned copies of those that are not element-aligned.

    C compilers may assume a float* is 4-byte aligned (and vectorize accordingly), so a
    buffer at an odd address is never handed to the kernel directly.
    """
    if all([a is None or a.flags.aligned for a in buffers]):
        return buffers
    return AdamBuffers(*[a if a is None or a.flags.aligned else a.copy() for a in buffers])  # type: ignore[arg-type]


def _copy_back(aligned: AdamBuffers, buffers: AdamBuffers) -> None:
    """Write the results of aligned copies back into the caller's unaligned buffers."""
    if aligned is buffers:
        return
    for target, source in zip(buffers, aligned):
        if target is not None and source is not target and target is not buffers.grad:
            target[...] = source


def adam_state(param: Any, *, amsgrad: bool = False, master_weights: bool = False,
               state_dtype: Any = None) -> Dict[str, np.ndarray]:
    """Zeroed state buffers for :func:`adam_step` on ``param``: ``exp_avg``, ``exp_avg_sq``
    (and ``max_exp_avg_sq`` with ``amsgrad=True``), shaped like ``param``, of its dtype.
    With ``master_weights=True`` (a bfloat16 or float16 param), the state is float32 and
    holds ``master_param``, a float32 copy of ``param``. With ``state_dtype="bfloat16"``
    (a float32 param), the moments are bfloat16.

    Use these rather than ``np.zeros_like``: they start at different offsets within a
    4 KiB page from each other and from where NumPy places arrays, which avoids the
    CPU's false load/store dependencies between the streams (4K aliasing; up to 1.8x
    slower at 2^24 elements otherwise).

    >>> state = fastadam.adam_state(param)                      # doctest: +SKIP
    >>> fastadam.adam_step(param, grad, state["exp_avg"], state["exp_avg_sq"], step=1)  # doctest: +SKIP
    """
    array = as_array(param, "param", writable=False, flatten=False)
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if check_flag(amsgrad, "amsgrad") else ())
    master = check_flag(master_weights, "master_weights")
    if master and array.itemsize != 2:
        raise TypeError("master_weights is for a bfloat16 or float16 param, got "
                        f"{type_name(array.dtype)}")
    moments = check_state_dtype(state_dtype, master)
    if moments is not None:
        check_bfloat16_state([array], ["param"])
    dtype = np.dtype(np.float32) if master else array.dtype if moments is None else moments
    state = {key: zeros_at(array.size, dtype, STATE_PAGE_OFFSETS[key]).reshape(array.shape)
             for key in keys}
    if master:  # the float32 copy of the param's values, at its own page offset
        copy = zeros_at(array.size, dtype, STATE_PAGE_OFFSETS["master_param"]).reshape(array.shape)
        np.copyto(copy, array, casting="unsafe")
        state["master_param"] = copy
    return state
