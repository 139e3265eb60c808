"""Every check fastadam makes, in one place, before any byte is written.

Buffers are coerced to zero-copy 1-D NumPy views (``np.asarray`` of the object or of its
``memoryview``: never a copy that an in-place update would silently miss), then checked
for dtype, element count, C-contiguity, writability and overlap. Hyperparameters are
checked for type, finiteness and range. Every rejection is a TypeError (wrong kind or
dtype) or ValueError (wrong size, layout, overlap, read-only, out of range) whose message
names the argument, what was expected and what was given.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from fastadam._checks import (
    GroupMemo,
    edited_counts,
    first_nonconforming,
    first_overlap,
    overlaps,
    plain_buffers,
    sorted_ranges,
)
from fastadam._hints import framework_hint

# Re-exported: the ranges the engine's checks take, the compiled test of adam_step's
# common case (plain arrays that pass every check of check_buffers), and the scan for
# step counts a front end's user edited.
__all__ = ["GroupMemo", "edited_counts", "plain_buffers", "sorted_ranges"]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
FLOAT16 = np.dtype(np.float16)
# bfloat16 storage where ml_dtypes (NumPy's bfloat16, as JAX and TensorFlow use it) is not
# installed: fastadam.torch views a torch.bfloat16 tensor's memory with it. The engine
# only moves such arrays (copies, zeros); the kernels read them as bfloat16.
BFLOAT16_BITS = np.dtype([("bfloat16", "<u2")])
ELEMENT_TYPES = "float32, float64, bfloat16 or float16"


def is_bfloat16(dtype: np.dtype) -> bool:
    """ml_dtypes' bfloat16 in native byte order (the kernels read native words), or
    fastadam's stand-in for its bits."""
    return dtype == BFLOAT16_BITS or (dtype.kind == "V" and dtype.itemsize == 2
                                      and dtype.name == "bfloat16" and dtype.isnative)


def is_element_type(dtype: np.dtype) -> bool:
    """Can the kernels store elements of this dtype?"""
    return dtype in FLOAT_DTYPES or dtype == FLOAT16 or is_bfloat16(dtype)


def type_name(dtype: np.dtype) -> str:
    return "bfloat16" if is_bfloat16(dtype) else dtype.name


def math_type(dtype: np.dtype) -> np.dtype:
    """The type the kernels compute in for elements of ``dtype``: float64 for float64,
    float32 for the rest (torch's opmath)."""
    return FLOAT_DTYPES[1] if dtype == FLOAT_DTYPES[1] else FLOAT_DTYPES[0]
MAX_STEP = 2**63 - 1  # step counts are int64 in optimizer state and in PyTorch
MAX_THREADS = 2**31 - 1  # a C int


class AdamBuffers(NamedTuple):
    """Validated 1-D views of one tensor's buffers, all of one size: all of one dtype, or
    (with ``master_param``) a 16-bit param and grad beside float32 master and state."""

    param: np.ndarray
    grad: np.ndarray
    exp_avg: np.ndarray
    exp_avg_sq: np.ndarray
    max_exp_avg_sq: Optional[np.ndarray]
    master_param: Optional[np.ndarray] = None


class Hyperparameters(NamedTuple):
    """One update's validated hyperparameters, as Python floats and bools: the one record
    every front end builds (through :func:`check_hyperparameters` or
    :func:`check_group_hyperparameters`) and the kernels read by field name
    (fastadam._kernels.hyper_from_record). The step number and ``grad_scale`` belong to
    a call, not to a group, and travel beside it."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled_weight_decay: bool
    amsgrad: bool
    maximize: bool
    eps_hat: bool
    eps_root: float
    numerics: str = "exact"  # a profile of NUMERICS: the operation order of the update


def _describe_dtype(dtype: np.dtype) -> str:
    if dtype.byteorder not in ("=", "|") and is_element_type(dtype.newbyteorder("=")):
        return f"{dtype.newbyteorder('=').name} in non-native byte order ({dtype.str})"
    return type_name(dtype)


def check_element_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """An element type named by the caller: "float32", "float64", "float16", "bfloat16"
    (ml_dtypes' when it is installed, else fastadam's stand-in for its bits), or a NumPy
    dtype of one of them."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            return BFLOAT16_BITS
        return np.dtype(ml_dtypes.bfloat16)
    try:
        result = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must name an element type ({ELEMENT_TYPES}), got "
                        f"{dtype!r:.80}") from None
    if not is_element_type(result):
        raise TypeError(f"{name} must be one of {ELEMENT_TYPES}, got {_describe_dtype(result)}")
    return result


def as_array(obj: Any, name: str, *, writable: bool, flatten: bool = True,
             dtype: Optional[np.dtype] = None) -> np.ndarray:
    """A zero-copy, C-contiguous view of ``obj``'s memory, of an element type the kernels
    store (float32, float64, float16; bfloat16 from ml_dtypes), 1-D unless
    ``flatten=False``. With ``dtype`` (checked by :func:`check_element_dtype`), memory
    whose own type is not one of those (raw bytes, uint16 bits) is read as ``dtype``."""
    if isinstance(obj, np.ndarray):
        array = obj if type(obj) is np.ndarray else np.asarray(obj)
    else:
        try:
            view = memoryview(obj)
        except TypeError:
            raise TypeError(
                f"{name} must be a NumPy array or an object supporting the buffer protocol "
                f"({ELEMENT_TYPES}), got {type(obj).__name__}{framework_hint(obj)}"
            ) from None
        try:
            array = np.asarray(view)
        except (TypeError, ValueError, NotImplementedError):
            raise TypeError(
                f"{name} must hold {ELEMENT_TYPES} elements, got a buffer of format "
                f"{view.format!r}"
            ) from None
    if dtype is not None and not is_element_type(array.dtype):
        array = _reinterpreted(array, dtype, name)
    if not is_element_type(array.dtype):
        raise TypeError(
            f"{name} must have dtype {ELEMENT_TYPES}, got {_describe_dtype(array.dtype)}"
        )
    flags = array.flags
    if not flags.c_contiguous:
        raise ValueError(
            f"{name} must be C-contiguous, got a non-contiguous buffer "
            f"(shape {array.shape}, strides {array.strides})"
        )
    if writable and not flags.writeable:
        raise ValueError(f"{name} is updated in place and must be writable, got a read-only buffer")
    return array if array.ndim == 1 or not flatten else array.reshape(-1)


def _reinterpreted(array: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    """The bytes of a C-contiguous array read as elements of ``dtype`` (1-D)."""
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous, got a non-contiguous buffer "
                         f"(shape {array.shape}, strides {array.strides})")
    raw = array.reshape(-1).view(np.uint8)
    if raw.size % dtype.itemsize:
        raise ValueError(f"{name} holds {raw.size} bytes, not a whole number of "
                         f"{type_name(dtype)} elements ({dtype.itemsize} bytes each)")
    return raw.view(dtype)


def check_buffers(
    param: Any, grad: Any, exp_avg: Any, exp_avg_sq: Any, max_exp_avg_sq: Any = None,
    master_param: Any = None, dtype: Optional[np.dtype] = None
) -> AdamBuffers:
    """Coerce and cross-check one tensor's buffers (see module docstring); ``dtype``: the
    element type of buffers that hold raw bytes or bits (:func:`as_array`)."""
    p = as_array(param, "param", writable=True, dtype=dtype)
    present: list = [
        p,
        as_array(grad, "grad", writable=False, dtype=dtype),
        as_array(exp_avg, "exp_avg", writable=True, dtype=dtype),
        as_array(exp_avg_sq, "exp_avg_sq", writable=True, dtype=dtype),
        None if max_exp_avg_sq is None else as_array(max_exp_avg_sq, "max_exp_avg_sq",
                                                     writable=True, dtype=dtype),
        None if master_param is None else as_array(master_param, "master_param", writable=True),
    ]
    check_element_types(*present)
    size = p.size
    for name, array in zip(AdamBuffers._fields[1:], present[1:]):
        if array is not None and array.size != size:
            raise ValueError(f"{name} must have {size} elements like param, got {array.size}")
    # The kernel reads grad and writes the others through restrict pointers: no two
    # buffers may share memory. For contiguous buffers the bounds test is exact.
    given = [(name, a) for name, a in zip(AdamBuffers._fields, present) if a is not None]
    overlap = first_overlap([a for _, a in given])
    if overlap is not None:
        first, second = given[overlap[0]][0], given[overlap[1]][0]
        raise ValueError(f"{second} overlaps {first} in memory; every buffer must be separate memory")
    return AdamBuffers(*present)


def check_element_types(param: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray,
                        exp_avg_sq: np.ndarray, max_exp_avg_sq: Optional[np.ndarray] = None,
                        master_param: Optional[np.ndarray] = None) -> None:
    """The combinations of element types the kernels update (TypeError otherwise):
    every buffer of one type (float32, float64, bfloat16 or float16); bfloat16 state
    beside a float32 param and grad (DeepSpeed's ``fp32_optimizer_states=False``); or
    master weights, a bfloat16/float16 ``param`` with a float32 ``master_param`` and
    float32 state, the gradient of the param's type or float32."""
    state = [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("max_exp_avg_sq", max_exp_avg_sq)]
    if (master_param is None and param.dtype == FLOAT_DTYPES[0] and grad.dtype == param.dtype
            and all(a is None or is_bfloat16(a.dtype) for _, a in state)):
        return  # bfloat16 moments of a float32 param
    if master_param is None:
        for name, array in [("grad", grad)] + state:
            if array is not None and array.dtype != param.dtype:
                raise TypeError(f"{name} must have param's dtype {type_name(param.dtype)}, got "
                                f"{type_name(array.dtype)}")
        return
    if param.itemsize != 2:
        raise TypeError(f"master_param is for a bfloat16 or float16 param (the model's copy), "
                        f"got a {type_name(param.dtype)} param: a float32 or float64 param is "
                        "its own master")
    for name, array in [("master_param", master_param)] + state:
        if array is not None and array.dtype != FLOAT_DTYPES[0]:
            raise TypeError(f"{name} must be float32 with master_param (the master copy and "
                            f"its state), got {type_name(array.dtype)}")
    if grad.dtype != param.dtype and grad.dtype != FLOAT_DTYPES[0]:
        raise TypeError(f"grad must have param's dtype {type_name(param.dtype)} or be float32, "
                        f"got {type_name(grad.dtype)}")


def check_rows(rows: Any, n_rows: int, name: str = "rows") -> np.ndarray:
    """Row indices: a 1-D integer array-like (any integer dtype; bools and floats are
    refused), every entry in [0, n_rows) (negative indices are refused, not wrapped).
    Returns a new int64 array that fastadam owns: the kernels read it, and only it.

    The indices are copied FIRST, then the copy is checked, then the copy is used: the
    caller's memory is read exactly once. Checking the caller's array and copying it
    afterwards let another thread (or process, through shared memory) change an index in
    between, past the range check, and the kernel wrote wherever it pointed (a segfault
    or heap corruption; issue 19, tests/test_fuzz.py::test_indices_mutated_by_another_thread_during_steps).

    An ndarray subclass is copied as the plain array of its memory, which is what the
    kernels read: a masked array's argmin/argmax skip masked entries, so an out-of-range
    index under the mask passed the range check and the kernel wrote far out of bounds
    (a segfault; found by review while extending tests/test_fuzz.py)."""
    if isinstance(rows, np.ndarray):
        array = rows if type(rows) is np.ndarray else np.asarray(rows)
    else:
        try:
            array = np.asarray(rows)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a 1-D sequence of integer row indices, got "
                            f"{type(rows).__name__}") from None
        if array.size == 0 and array.ndim == 1:  # [] or () is float64 to NumPy
            array = array.astype(np.int64)
    # (dtype and shape belong to the array object, not to the memory another thread or
    # process can write: they cannot change under us)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer row indices, got dtype {array.dtype.name}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one index per gradient row), got shape {array.shape}")
    # The one read of the caller's memory: into a new array. Every integer type except
    # uint64 converts to int64 without changing a value; uint64 is copied as it is and
    # converted after the check (a value >= 2**63 would wrap to a negative one); either
    # byte order.
    wide_unsigned = array.dtype.kind == "u" and array.dtype.itemsize == 8
    owned = np.array(array, dtype=np.uint64 if wide_unsigned else np.int64, order="C", copy=True)
    if owned.size:
        for position in (int(np.argmin(owned)), int(np.argmax(owned))):
            value = int(owned[position])
            if not 0 <= value < n_rows:
                raise ValueError(f"{name} must be in [0, {n_rows}) (the param's rows), got "
                                 f"{value} at position {position}")
    return owned if owned.dtype == np.int64 else owned.astype(np.int64)


def check_row_grad(param: np.ndarray, rows: Any, values: Any, name: str, rows_name: str,
                   values_name: str) -> tuple:
    """A row-sparse gradient of ``param`` (N-d, its first axis the rows): (int64 rows,
    values of param's dtype, shaped (len(rows), *param.shape[1:]) or flat)."""
    if param.ndim == 0:
        raise ValueError(f"{name} is row-sparse, which needs a param with rows (its first "
                         "axis), got a 0-d param")
    if param.itemsize == 2:
        raise TypeError(f"{name} is row-sparse, which fastadam updates for float32 and float64 "
                        f"params, got a {type_name(param.dtype)} param")
    indices = check_rows(rows, param.shape[0], rows_name)
    array = as_array(values, values_name, writable=False, flatten=False)
    if array.dtype != param.dtype:
        raise TypeError(f"{values_name} must have the param's dtype {type_name(param.dtype)}, "
                        f"got {type_name(array.dtype)}")
    expected = (indices.size,) + param.shape[1:]
    count = indices.size * (param.size // param.shape[0] if param.shape[0] else 0)
    # a flat buffer (array.array, a 1-D memoryview) of exactly the rows' elements is fine too
    if array.shape != expected and not (array.ndim == 1 and array.size == count):
        raise ValueError(f"{values_name} must have shape {expected} (one row of the param's "
                         f"row shape {param.shape[1:]} per index in {rows_name}), or be 1-D with "
                         f"{count} elements, got shape {array.shape}")
    return indices, array


def check_row_buffers(
    param: Any, grad_rows: Any, rows: Any, exp_avg: Any, exp_avg_sq: Any, max_exp_avg_sq: Any = None
) -> tuple:
    """Coerce and cross-check the buffers of a lazy row update (adam_step_rows):
    (AdamBuffers of 1-D views, grad = grad_rows; int64 rows; elements per row)."""
    p = as_array(param, "param", writable=True, flatten=False)
    indices, g = check_row_grad(p, rows, grad_rows, "grad_rows", "rows", "grad_rows")
    present: list = [
        p.reshape(-1),
        g.reshape(-1),
        as_array(exp_avg, "exp_avg", writable=True),
        as_array(exp_avg_sq, "exp_avg_sq", writable=True),
    ]
    if max_exp_avg_sq is not None:
        present.append(as_array(max_exp_avg_sq, "max_exp_avg_sq", writable=True))
    names = ["param", "grad_rows", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    for name, array in zip(names[2:], present[2:]):
        if array.dtype != p.dtype:
            raise TypeError(f"{name} must have param's dtype {type_name(p.dtype)}, got "
                            f"{type_name(array.dtype)}")
        if array.size != p.size:
            raise ValueError(f"{name} must have {p.size} elements like param (laid out like "
                             f"its rows), got {array.size}")
    overlap = first_overlap(present)
    if overlap is not None:
        raise ValueError(f"{names[overlap[1]]} overlaps {names[overlap[0]]} in memory; every "
                         "buffer must be separate memory")
    if max_exp_avg_sq is None:
        present.append(None)
    row_size = p.size // p.shape[0] if p.shape[0] else 0
    return AdamBuffers(*present), indices, row_size


def check_real(value: Any, name: str) -> float:
    """A finite real number (bools are refused: ``lr=True`` is a bug, not 1.0)."""
    if type(value) is float:  # the common case, without the slower ABC check
        result = value
    elif isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    else:
        try:
            result = float(value)
        except OverflowError:  # an int or Fraction beyond the double range
            raise ValueError(f"{name} must be finite, got a value beyond the float range") from None
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {result!r}")
    return result


def check_at_least(value: Any, name: str, low: float, *, strict: bool = False) -> float:
    result = check_real(value, name)
    if result < low or (strict and result == low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {result!r}")
    return result


def check_beta(value: Any, name: str) -> float:
    result = check_real(value, name)
    if not 0.0 <= result < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {result!r}")
    return result


def check_flag(value: Any, name: str) -> bool:
    if value is True or value is False:
        return value
    if not isinstance(value, np.bool_):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_step(step: Any) -> int:
    if type(step) is int and 1 <= step <= MAX_STEP:  # the common case, fast
        return step
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an integer (the 1-based step number), got {type(step).__name__}")
    result = int(step)
    if not 1 <= result <= MAX_STEP:
        raise ValueError(f"step must be an integer in [1, 2**63 - 1], got {result}")
    return result


def check_num_threads(value: Any, name: str = "num_threads") -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be None or a positive integer, got {type(value).__name__}")
    count = int(value)
    if not 1 <= count <= MAX_THREADS:
        raise ValueError(f"{name} must be None or a positive integer up to {MAX_THREADS}, got {count}")
    return count


def check_hyperparameters(
    *,
    lr: Any,
    beta1: Any,
    beta2: Any,
    eps: Any,
    weight_decay: Any,
    decoupled_weight_decay: Any,
    amsgrad: Any,
    maximize: Any,
    eps_hat: Any,
    eps_root: Any,
    numerics: Any = "exact",
    where: str = "",
) -> Hyperparameters:
    """The record of one update's hyperparameters, each checked and named in messages
    as ``{where}{name}`` (``where`` is e.g. ``"param_groups[0]"`` with dict-style names)."""
    def name(key: str) -> str:
        return f"{where}[{key!r}]" if where else key

    eps_hat = check_flag(eps_hat, name("eps_hat"))
    eps_root = check_at_least(eps_root, name("eps_root"), 0.0)
    check_epsilon_forms(eps_hat, eps_root, f"{where}: " if where else "")
    # positional: this runs on every adam_step call, and keyword construction costs more
    return Hyperparameters(
        check_at_least(lr, name("lr"), 0.0),
        check_beta(beta1, name("beta1") if not where else f"{where}['betas'][0]"),
        check_beta(beta2, name("beta2") if not where else f"{where}['betas'][1]"),
        check_at_least(eps, name("eps"), 0.0),
        check_at_least(weight_decay, name("weight_decay"), 0.0),
        check_flag(decoupled_weight_decay, name("decoupled_weight_decay")),
        check_flag(amsgrad, name("amsgrad")),
        check_flag(maximize, name("maximize")),
        eps_hat,
        eps_root,
        check_numerics(numerics, eps_root, name("numerics")),
    )


def check_call_hyperparameters(lr: Any, beta1: Any, beta2: Any, eps: Any, weight_decay: Any,
                               decoupled_weight_decay: Any, amsgrad: Any, maximize: Any,
                               eps_hat: Any, eps_root: Any, numerics: Any) -> Hyperparameters:
    """:func:`check_hyperparameters` for a function call's arguments (adam_step), with a
    memory: values that are exact floats and bools and were found valid before are not
    checked again (a training loop passes the same ones every step). Only validity is
    remembered; the record always holds the values given."""
    args = (lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
            eps_hat, eps_root, numerics)
    if _plain(*args):
        _remembered_valid(*args, ())  # raises as check_hyperparameters does
        return Hyperparameters(*args)
    return _check_positional(*args)


def _plain(lr: Any, beta1: Any, beta2: Any, eps: Any, weight_decay: Any,
           decoupled_weight_decay: Any, amsgrad: Any, maximize: Any, eps_hat: Any,
           eps_root: Any, numerics: Any) -> bool:
    """Are these exact floats, bools and a str: values a memory of valid ones can hold
    (not a tensor or a schedule, whose value may change while the object stays)?"""
    return (type(lr) is float and type(beta1) is float and type(beta2) is float
            and type(eps) is float and type(weight_decay) is float and type(eps_root) is float
            and type(decoupled_weight_decay) is bool and type(amsgrad) is bool
            and type(maximize) is bool and type(eps_hat) is bool and type(numerics) is str)


def _check_positional(lr: Any, beta1: Any, beta2: Any, eps: Any, weight_decay: Any,
                      decoupled_weight_decay: Any, amsgrad: Any, maximize: Any, eps_hat: Any,
                      eps_root: Any, numerics: Any) -> Hyperparameters:
    return check_hyperparameters(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad, maximize=maximize,
        eps_hat=eps_hat, eps_root=eps_root, numerics=numerics)



class _ElementRange(NamedTuple):
    name: str
    max: float          # the largest finite value
    tiny: float         # the smallest positive normal value
    rounds_to_zero: float  # positive doubles up to this round to 0 in the type


_RANGES = {
    np.dtype(np.float32): _ElementRange("float32", float(np.finfo(np.float32).max),
                                        float(np.finfo(np.float32).tiny),
                                        float(np.finfo(np.float32).smallest_subnormal) / 2),
    np.dtype(np.float64): _ElementRange("float64", float(np.finfo(np.float64).max),
                                        float(np.finfo(np.float64).tiny), 0.0),
}


def check_element_type_range(hp: Any, dtypes: Any, name: str = "", step: int = 1) -> None:
    """Hyperparameters that are finite as doubles, checked against the element types
    that the kernels cast them to (issue 19, item 5). Per argument:

    * ``lr``: the kernels multiply by the step coefficient ``lr / (1 - beta1**step)``
      (the eps_hat form's ``lr * sqrt(bc2) / bc1`` is no larger; the eps_root form's is
      ``lr``) in the element type. Beyond the type's largest value it is Inf, and a zero
      moment then gives Inf * 0 = NaN: refused. A tiny lr is kept (the update rounds
      away, as it would in exact arithmetic).
    * ``weight_decay``: in the L2 form the factor itself, in the decoupled form
      ``lr * weight_decay``, must be finite in the type (Inf * 0 = NaN otherwise).
    * ``eps`` and ``eps_root``: nonzero values that round to 0 in the type would turn
      the guard against 0/0 off (a zero gradient gives NaN): refused, as are values
      beyond the largest finite one. Subnormal values are kept (they still guard).
    * ``grad_scale`` (:func:`check_grad_scale_range`): gradients are divided by it in the
      element type, so it must be a normal number of the type: 0 or Inf would give
      Inf/NaN or a zero gradient, and a subnormal one loses precision.

    ``hp`` has the attributes lr, beta1, eps, weight_decay, decoupled_weight_decay,
    eps_root (a Hyperparameters record); ``dtypes``: the element types
    of the buffers it will update; ``name``: e.g. "param_groups[0]", for messages."""
    lr, eps, eps_root = hp.lr, hp.eps, hp.eps_root
    coefficient = lr if eps_root > 0.0 else lr / (1.0 - hp.beta1 ** step)
    decay = lr * hp.weight_decay if hp.decoupled_weight_decay else hp.weight_decay
    largest_input = max(coefficient, decay, eps, eps_root)
    for dtype in dtypes:
        r = _RANGES[math_type(dtype)]
        if (largest_input <= r.max and not 0.0 < eps <= r.rounds_to_zero
                and not 0.0 < eps_root <= r.rounds_to_zero):
            continue  # the common case, without building any message

        def label(key: str) -> str:
            return f"{name}[{key!r}]" if name else key

        if coefficient > r.max:
            raise ValueError(
                f"{label('lr')} must keep the step coefficient lr / (1 - beta1**step) finite in "
                f"{r.name}, the parameters' element type (at most {r.max:.7g}), got lr={lr!r}: "
                f"{coefficient:.7g} at step {step}")
        if decay > r.max:
            what = "lr * weight_decay" if hp.decoupled_weight_decay else "weight_decay"
            raise ValueError(f"{label('weight_decay')} must keep {what} finite in {r.name}, the "
                             f"parameters' element type (at most {r.max:.7g}), got {decay:.7g}")
        for key, value in (("eps", hp.eps), ("eps_root", hp.eps_root)):
            if 0.0 < value <= r.rounds_to_zero or value > r.max:
                raise ValueError(
                    f"{label(key)} must be 0 or a positive number that {r.name}, the parameters' "
                    f"element type, can hold (between {r.rounds_to_zero * 2:.7g} and {r.max:.7g}): "
                    f"{value!r} {'rounds to 0' if value <= r.max else 'overflows'} in {r.name}")


def check_grad_scale_range(scale: float, dtypes: Any, name: str = "grad_scale") -> None:
    """``grad_scale`` must be a normal number of every element type it divides (see
    :func:`check_element_type_range`)."""
    for dtype in dtypes:
        r = _RANGES[math_type(dtype)]
        if not r.tiny <= scale <= r.max:
            raise ValueError(f"{name} must be a normal number of {r.name}, the gradients' element "
                             f"type (between {r.tiny:.7g} and {r.max:.7g}), got {scale!r}")




def check_epsilon_forms(eps_hat: bool, eps_root: float, where: str = "") -> None:
    if eps_hat and eps_root > 0.0:
        raise ValueError(
            f"{where}eps_hat=True and eps_root > 0 select two different epsilon forms "
            f"(Keras's and Optax's); pass one of them, got eps_root={eps_root!r}"
        )


NUMERICS = ("exact", "torch", "fast")


def check_numerics(value: Any, eps_root: float, name: str = "numerics") -> str:
    """A numerics profile: the operation order of the update.

    "exact": docs/design.md's order without FMA (torch's fused Adam at ATen's default
    capability). "torch": the FMAs of torch's AVX2/AVX-512 fused CPU Adam
    (docs/numerics-torch.md). "fast": the paper form with one division per element
    instead of two (``sqrt(v) * (1/sqrt(bc2))`` for ``sqrt(v) / sqrt(bc2)``): at most a
    few units in the last place from "exact" (docs/guide/numerics.md). Neither of the last two
    has an eps_root form.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {NUMERICS}, got {type(value).__name__}")
    if value not in NUMERICS:
        raise ValueError(f"{name} must be one of {NUMERICS}, got {value!r}")
    if value != "exact" and eps_root > 0.0:
        raise ValueError(
            f"{name}={value!r} has no eps_root form (Optax's); use numerics='exact' with "
            f"eps_root > 0, got eps_root={eps_root!r}"
        )
    return value


# --- optimizer objects ------------------------------------------------------------------

HYPERPARAMETER_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "eps_hat",
                       "eps_root", "decoupled_weight_decay", "numerics")
# Keys a saved param group may lack (it was saved before they existed): their defaults.
OPTIONAL_KEYS = {"decoupled_weight_decay": False, "numerics": "exact"}
NOT_A_SEQUENCE = (np.ndarray, memoryview, bytes, bytearray, str, Mapping)


def check_sequence(value: Any, name: str, what: str) -> list:
    """``value`` as a list, if it is a sequence (not a buffer, string or mapping)."""
    if type(value) is list or type(value) is tuple:  # the common case, before the ABC checks
        return list(value)
    if isinstance(value, NOT_A_SEQUENCE) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of {what}, got {type(value).__name__}")
    return list(value)


def check_params(params: list, name: str) -> list:
    """A non-empty list of in-place-updatable parameter buffers (N-d views kept)."""
    arrays = [as_array(p, f"{name}[{i}]", writable=True, flatten=False) for i, p in enumerate(params)]
    if not arrays:
        raise ValueError(f"{name} must contain at least one parameter, got an empty sequence")
    for i, array in enumerate(arrays):
        if not array.flags.aligned:
            raise ValueError(
                f"{name}[{i}] must be aligned to its {array.itemsize}-byte elements to be "
                "updated in place, got an unaligned buffer"
            )
    return arrays


def check_state_dtype(value: Any, master_weights: bool, name: str = "state_dtype") -> Optional[np.dtype]:
    """The element type of an optimizer's moments: None (the param's, or float32 with
    master weights), or bfloat16 (for float32 params only: see :func:`check_bfloat16_state`;
    not with master weights, whose moments are float32)."""
    if value is None:
        return None
    dtype = check_element_dtype(value, name)
    if not is_bfloat16(dtype):
        raise ValueError(f"{name} must be None (the params' type) or 'bfloat16', got "
                         f"{type_name(dtype)}")
    if master_weights:
        raise ValueError(f"{name} must be None with master_weights=True (the master copy "
                         "keeps float32 moments)")
    return dtype


def check_bfloat16_state(arrays: Any, names: Any) -> None:
    """bfloat16 moments are for float32 params (TypeError otherwise)."""
    for array, name in zip(arrays, names):
        if array.dtype != FLOAT_DTYPES[0]:
            raise TypeError(f"state_dtype='bfloat16' is for float32 params, but {name} is "
                            f"{type_name(array.dtype)}")


def check_master_weights(arrays: Any, names: Any) -> None:
    """Master weights are for bfloat16 and float16 params (TypeError otherwise)."""
    for array, name in zip(arrays, names):
        if array.itemsize != 2:
            raise TypeError(f"master_weights is for bfloat16 and float16 params, but {name} is "
                            f"{type_name(array.dtype)}: a float32 or float64 param is its own master")


def check_no_overlap(arrays: list, names: list) -> None:
    overlap = first_overlap(arrays)
    if overlap is not None:
        raise ValueError(
            f"{names[overlap[1]]} overlaps {names[overlap[0]]} in memory; every parameter must "
            "be separate memory (the same parameter given twice?)"
        )


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed of stochastic rounding: an int in the int64 range."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    seed = operator.index(value)
    if not -2**63 <= seed < 2**63:
        raise ValueError(f"{name} must fit in an int64, got {seed}")
    return seed


def check_step_count(value: Any, name: str) -> int:
    """A saved step count: a whole number in [0, 2**63 - 2] (an int, an integral float as
    PyTorch stores it, or a 0-d array of either)."""
    item = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
    if isinstance(item, (bool, np.bool_)) or not isinstance(item, numbers.Real):
        raise TypeError(f"{name} must be a whole number, got {type(value).__name__}")
    if isinstance(item, numbers.Integral):
        count = operator.index(item)
    elif _is_whole(item):
        count = int(float(item))
    else:
        raise ValueError(f"{name} must be a whole number >= 0, got {value!r:.80}")
    if not 0 <= count <= MAX_STEP - 1:
        raise ValueError(f"{name} must be a whole number in [0, 2**63 - 2], got {count}")
    return count


def _is_whole(value: Any) -> bool:
    """Is this real number finite and whole? (False beyond the float range, where a
    Fraction's conversion overflows: found by tests/test_fuzz.py.)"""
    try:
        return math.isfinite(value) and float(value).is_integer()
    except OverflowError:
        return False


def check_group_hyperparameters(group: Mapping, name: str, step: int,
                                dtypes: Any = ()) -> Hyperparameters:
    """A param group's hyperparameters for step ``step`` (lr schedules are called with it),
    also checked against the element types ``dtypes`` of its buffers
    (:func:`check_element_type_range`): :func:`remembered_group`, else
    :func:`check_group_in_full`. (A front end that steps every call may take the two
    apart, to build ``name`` and ``step`` only when the memory misses.)"""
    record = remembered_group(group, dtypes)
    return record if record is not None else check_group_in_full(group, name, step, dtypes)


def check_group_in_full(group: Mapping, name: str, step: int,
                        dtypes: Any = ()) -> Hyperparameters:
    """:func:`check_group_hyperparameters` without the memory: every value checked, and
    errors name ``name``'s keys."""
    lr = group["lr"]
    if callable(lr):
        lr = check_at_least(lr(step), f"{name}['lr'] (the schedule's value at step {step})", 0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{name}['betas'] must be a pair (beta1, beta2), got {betas!r}")
    result = check_hyperparameters(
        lr=lr, beta1=betas[0], beta2=betas[1], eps=group["eps"],
        weight_decay=group["weight_decay"], decoupled_weight_decay=group["decoupled_weight_decay"],
        amsgrad=group["amsgrad"], maximize=group["maximize"], eps_hat=group["eps_hat"],
        eps_root=group["eps_root"], numerics=group.get("numerics", "exact"), where=name)
    if dtypes:
        check_element_type_range(result, dtypes, name, step)
    return result


def remembered_group(group: Mapping, dtypes: Any,
                     memo: Optional[GroupMemo] = None) -> Optional[Hyperparameters]:
    """A group of plain numbers through :func:`remembered_group_record` (a training
    loop's groups are the same every step; this needs neither the group's name nor its
    step); None for anything else. A front end that keeps a :class:`GroupMemo` per group
    passes it: while the group holds the objects it held at the last step, their
    record is returned without reading them one by one (about 0.3 us instead of 1.5)."""
    if memo is not None:
        record = memo.lookup(group, dtypes)
        if record is not None:
            return record
    betas = group["betas"]
    if type(betas) not in (tuple, list) or len(betas) != 2:
        return None
    record = remembered_group_record(
        group["lr"], betas[0], betas[1], group["eps"], group["weight_decay"],
        group["decoupled_weight_decay"], group["amsgrad"], group["maximize"], group["eps_hat"],
        group["eps_root"], group.get("numerics", "exact"), dtypes)
    if memo is not None and record is not None:
        memo.keep(group, dtypes, record)
    return record


def remembered_group_record(lr: Any, beta1: Any, beta2: Any, eps: Any, weight_decay: Any,
                            decoupled_weight_decay: Any, amsgrad: Any, maximize: Any,
                            eps_hat: Any, eps_root: Any, numerics: Any,
                            dtypes: Any) -> Optional[Hyperparameters]:
    """The record of a group's values, checked as :func:`check_group_hyperparameters`
    checks them, with a memory: exact floats (ints taken as the floats they stand for),
    bools and a str found valid before for these element types are not checked again (a
    training loop's groups are the same every step: one lookup instead of about 5 us of
    checks per group). Only validity is remembered; the record holds the values given
    (-0.0 stays -0.0). None for anything else, or anything invalid: the full check then
    names it."""
    args = (lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
            eps_hat, eps_root, numerics)
    try:
        if not _plain(*args):  # (checked first as given: the usual case, and the cheaper)
            args = (_int_as_float(lr), _int_as_float(beta1), _int_as_float(beta2),
                    _int_as_float(eps), _int_as_float(weight_decay), decoupled_weight_decay,
                    amsgrad, maximize, eps_hat, _int_as_float(eps_root), numerics)
            if not _plain(*args):
                return None
        _remembered_valid(*args, tuple(dtypes))
        return Hyperparameters(*args)
    except (TypeError, ValueError, OverflowError):  # (an int beyond any float)
        return None


def _int_as_float(value: Any) -> Any:
    """An int (torch's default weight_decay is 0) as the float it stands for; anything
    else as it is (a bool stays a bool, to be refused)."""
    return float(value) if type(value) is int else value


def _check_group_values(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                        decoupled_weight_decay: bool, amsgrad: bool, maximize: bool,
                        eps_hat: bool, eps_root: float, numerics: str,
                        dtypes: Tuple[np.dtype, ...]) -> None:
    record = _check_positional(lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                               amsgrad, maximize, eps_hat, eps_root, numerics)
    # At step 1, where lr / (1 - beta1**step) is largest: valid then, valid at every step.
    check_element_type_range(record, dtypes, "", 1)


# The one memory of valid values (adam_step's call arguments take no element types: ()).
# typed: 1 and 1.0 and True are different keys (only exact floats and bools come here);
# an invalid set raises and is never remembered.
_remembered_valid = functools.lru_cache(maxsize=256, typed=True)(_check_group_values)


def check_grads(grads: Any, params: list, written: np.ndarray, names: Optional[Sequence[str]] = None,
                allow_none: bool = False, master: Optional[list] = None) -> Tuple[list, int, bool]:
    """The gradients of one optimizer step, checked against the params (count, dtype,
    shape, layout, overlap with any ``written`` range: sorted_ranges of the params and
    state) before anything is written. A dense gradient has its param's dtype, or is
    float32 where ``master[i]`` (a 16-bit param with a float32 master copy: a gradient
    summed or accumulated in float32, as fastadam.distributed's is).

    A gradient may be row-sparse: a tuple ``(rows, values)`` for a param with rows (see
    :func:`check_row_grad`); it is returned as (int64 rows in fastadam's own copy, flat
    aligned values). With ``allow_none``, None stands for "no gradient this step".

    Returns (the checked gradients, how many param elements the step leaves untouched:
    those outside the rows of row-sparse gradients and of params without a gradient,
    whether any gradient is row-sparse); the count is for the team size.

    The common case (plain conforming ndarrays) is decided by one C scan; anything else
    goes through the full per-gradient checks, which name the offending gradient
    (``names[i]``, by default ``grads[i]``; the params are ``params[i]`` in messages).
    """
    if type(grads) is not list:  # (a list is only read: no copy needed)
        grads = check_sequence(grads, "grads", "buffers, one per param")
    if len(grads) != len(params):
        raise ValueError(f"grads must have one gradient per param ({len(params)}), got {len(grads)}")
    if first_nonconforming(grads, params, written, allow_none) < 0:
        return grads, sum(p.size for p, g in zip(params, grads) if g is None) if allow_none else 0, False
    checked: list = []
    untouched, rows_given = 0, False
    for i, (grad, param) in enumerate(zip(grads, params)):
        name = f"grads[{i}]" if names is None else names[i]
        if grad is None and allow_none:
            checked.append(None)
            untouched += param.size
            continue
        if isinstance(grad, tuple):
            rows, values = _check_row_grad_entry(written, grad, param, name)
            checked.append((rows, values))
            rows_given = True
            continue
        array = as_array(grad, name, writable=False, flatten=False)
        float32_ok = master is not None and master[i]
        if array.dtype != param.dtype and not (float32_ok and array.dtype == FLOAT_DTYPES[0]):
            raise TypeError(f"{name} must have the dtype of params[{i}] "
                            f"({type_name(param.dtype)}{') or be float32' if float32_ok else ')'}, "
                            f"got {type_name(array.dtype)}")
        if array.shape != param.shape:
            raise ValueError(f"{name} must have the shape of params[{i}] {param.shape}, got {array.shape}")
        if overlaps(written, array):
            raise ValueError(f"{name} overlaps a parameter or optimizer-state buffer in memory")
        # Gradients are only read, so an aligned copy of an unaligned one is harmless.
        checked.append(array if array.flags.aligned else array.copy())
    return checked, untouched, rows_given


def _check_row_grad_entry(written: np.ndarray, grad: tuple, param: np.ndarray, name: str) -> tuple:
    """One ``(rows, values)`` gradient of an optimizer step: (rows, flat aligned values)."""
    if len(grad) != 2:
        raise TypeError(f"{name} is a tuple, so it must be a row-sparse gradient (rows, values), "
                        f"got a tuple of {len(grad)} items")
    rows, values = check_row_grad(param, grad[0], grad[1], name, f"{name}[0] (rows)",
                                  f"{name}[1] (values)")
    if overlaps(written, values):
        raise ValueError(f"{name}[1] (values) overlaps a parameter or optimizer-state buffer in memory")
    # Only read, so an aligned copy of an unaligned array is harmless.
    return rows, values.reshape(-1) if values.flags.aligned else values.reshape(-1).copy()
