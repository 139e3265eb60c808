"""Fuzzing every public entry point with malformed input (hypothesis).

Entry points: ``fastadam.adam_step``, ``fastadam.adam_step_rows``, ``Adam``/``AdamW``
construction, ``step`` (dense and row-sparse ``(rows, values)`` gradients),
``load_state_dict`` and ``fastadam.load``. Every generated call is built so that the test
knows whether it is valid, and the oracle is:

* valid: the call succeeds and every buffer holds what the NumPy reference
  (tests/reference.py) computes, in the buffers' dtype, from the values before the call;
* invalid: it raises TypeError or ValueError (never SystemError, MemoryError,
  BufferError, OverflowError, ...) and every byte of every buffer the test allocated,
  and the optimizer's state and step counts, are as before.

A crash (a segfault in the kernels) kills the pytest process, so it fails the run too.

Malformed input: wrong types; NumPy arrays and buffer exporters of other formats
(int16 'h', int32 'i', big-endian '>f', complex64 'Zf', bytearray 'B', array.array('i'));
strided, negative-stride and Fortran-order views; read-only and unaligned buffers; the
same buffer twice and overlapping views of one block; element counts and shapes that
differ; row indices that are floats, bools, negative, out of range, near 2**63, uint64
beyond int64, 2-D, object arrays, strings, masked out of range (and valid ones of every integer dtype, lists,
tuples, strided, read-only, empty, with duplicates, whose gradient rows are summed left
to right in the element dtype before the update); params of 0 rows or 0 columns, 1-D and
N-d; huge, negative, bool and float step counts; non-finite, out-of-range and
wrongly-typed hyperparameters, and ones finite as doubles but not in float32 (1e-50 as
eps: refused for float32 buffers only); damaged state dicts and checkpoint files. And
inputs changed while a step runs: row indices rewritten by another thread or process
(test_indices_mutated_by_another_thread_during_steps, bounded in time).

Depth: the default profile runs FUZZ_EXAMPLES examples per entry point (a few seconds in
all). ``FASTADAM_FUZZ=deep python -m pytest tests/test_fuzz.py`` runs 25 times more.
"""

import array
import ctypes
import json
import math
import os
import sys
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

import fastadam
from fastadam import _npz

from reference import adam_reference as _adam_reference

FUZZ_EXAMPLES = 150
PROFILES = {"default": FUZZ_EXAMPLES, "deep": 25 * FUZZ_EXAMPLES}
fuzz = settings(
    max_examples=PROFILES[os.environ.get("FASTADAM_FUZZ", "default")],
    deadline=None,  # sanitizer and valgrind runs are 10-50x slower
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
REJECTIONS = (TypeError, ValueError)


def adam_reference(*args, **kwargs):
    with np.errstate(all="ignore"):  # NaN and Inf inputs are part of the fuzz
        return _adam_reference(*args, **kwargs)


# --- memory the test owns, to prove that a rejected call wrote nothing -------------------

class Memory:
    """Every block a test case allocates; ``snapshot()`` is all of their bytes."""

    def __init__(self):
        self.blocks = []

    def keep(self, block):
        self.blocks.append(block)
        return block

    def snapshot(self):
        return [b.tobytes(order="A") if isinstance(b, np.ndarray)  # also Fortran order
                else bytes(memoryview(b).cast("B")) for b in self.blocks]


class Buffer:
    """One generated buffer argument: the object passed, a NumPy view of the same memory
    in logical order (None if its elements are not float32/float64), and what it may be
    used as."""

    def __init__(self, obj, view, *, readable=True, writable=True, aligned=True):
        self.obj, self.view = obj, view
        self.readable, self.writable, self.aligned = readable, writable, aligned

    def __repr__(self):
        view = None if self.view is None else (self.view.dtype.str, self.view.shape)
        return (f"Buffer({type(self.obj).__name__}, {view}, readable={self.readable}, "
                f"writable={self.writable}, aligned={self.aligned})")

    @property
    def dtype(self):
        return None if self.view is None else self.view.dtype


def invalid(obj):
    return Buffer(obj, None, readable=False, writable=False)


FORMAT = {np.dtype(np.float32): "f", np.dtype(np.float64): "d"}
CTYPE = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


def fresh(values, mem):
    return mem.keep(values.copy())


# Each kind turns float values (1-D, float32 or float64) into a buffer argument.
def k_ndarray(values, mem):
    a = fresh(values, mem)
    return Buffer(a, a)


def k_ndarray_2d(values, mem):
    a = fresh(values, mem)
    rows = 2 if values.size % 2 == 0 else 1
    return Buffer(a.reshape(rows, -1), a)


def k_memoryview(values, mem):
    a = fresh(values, mem)
    return Buffer(memoryview(a), a)


def k_memoryview_cast(values, mem):
    a = fresh(values, mem)
    return Buffer(memoryview(a).cast("B").cast(FORMAT[a.dtype]), a)


def k_array_array(values, mem):
    block = mem.keep(array.array(FORMAT[values.dtype], values.tobytes()))
    return Buffer(block, np.frombuffer(block, values.dtype))


def k_bytearray_view(values, mem):
    block = mem.keep(bytearray(values.tobytes()))
    return Buffer(memoryview(block).cast(FORMAT[values.dtype]), np.frombuffer(block, values.dtype))


def k_ctypes(values, mem):
    block = mem.keep((CTYPE[values.dtype] * values.size).from_buffer_copy(values.tobytes()))
    return Buffer(block, np.frombuffer(block, values.dtype))


def k_unaligned(values, mem):
    raw = mem.keep(bytearray(values.nbytes + 1))
    view = np.frombuffer(raw, values.dtype, count=values.size, offset=1)
    view[...] = values
    return Buffer(view, view, aligned=bool(view.flags.aligned))


def k_read_only(values, mem):
    a = fresh(values, mem)
    a.flags.writeable = False
    return Buffer(a, a, writable=False)


def k_bytes_view(values, mem):
    block = mem.keep(values.tobytes())
    return Buffer(memoryview(block).cast(FORMAT[values.dtype]), np.frombuffer(block, values.dtype),
                  writable=False)


def converted(values, dtype):
    with np.errstate(invalid="ignore", over="ignore"):  # NaN or Inf to int32
        return values.astype(dtype)


def wrong_dtype(dtype):
    def kind(values, mem):
        return invalid(mem.keep(converted(values, dtype)))
    kind.__name__ = f"k_{np.dtype(dtype).str}"
    return kind


def wrong_format_view(dtype):
    def kind(values, mem):  # formats 'e', 'i', '>f', 'Zf'
        return invalid(memoryview(mem.keep(converted(values, dtype))))
    kind.__name__ = f"k_view_{np.dtype(dtype).str}"
    return kind


def k_array_array_int(values, mem):
    return invalid(mem.keep(array.array("i", range(values.size))))


def k_bytearray(values, mem):
    return invalid(mem.keep(bytearray(values.tobytes())))


def k_strided(values, mem):
    base = mem.keep(np.zeros(2 * values.size, values.dtype))
    view = base[::2]
    view[...] = values
    return Buffer(view, view) if values.size <= 1 else invalid(view)


def k_reversed(values, mem):
    view = fresh(values[::-1], mem)[::-1]
    return Buffer(view, view) if values.size <= 1 else invalid(view)


def k_fortran(values, mem):
    if values.size < 4 or values.size % 2:
        return k_strided(values, mem)
    block = mem.keep(np.asfortranarray(values.reshape(2, -1)))
    return invalid(block)


def non_buffer(obj):
    def kind(values, mem):
        return invalid(obj(values) if callable(obj) else obj)
    kind.__name__ = f"k_{type(obj).__name__}"
    return kind


VALID_KINDS = [k_ndarray, k_ndarray_2d, k_memoryview, k_memoryview_cast, k_array_array,
               k_bytearray_view, k_ctypes, k_unaligned]
READ_ONLY_KINDS = [k_read_only, k_bytes_view]
INVALID_KINDS = ([wrong_dtype(d) for d in (np.int16, np.int32, ">f4", np.complex64)]
                 + [wrong_format_view(d) for d in (np.int16, np.int32, ">f4", np.complex64)]
                 + [k_array_array_int, k_bytearray, k_strided, k_reversed, k_fortran,
                    non_buffer(None), non_buffer(1.5), non_buffer("param"),
                    non_buffer(lambda v: list(v)), non_buffer({})])
ALL_KINDS = VALID_KINDS + READ_ONLY_KINDS + INVALID_KINDS


def kinds(broken, aligned=False):
    if broken:
        return st.sampled_from(ALL_KINDS)
    return st.sampled_from([k for k in VALID_KINDS if not aligned or k is not k_unaligned])


# --- hyperparameters: (value, valid?) ---------------------------------------------------

NON_REALS = st.sampled_from([None, "0.1", b"1", 1j, [0.1], True, False, np.bool_(True),
                             Decimal("0.1"), object()])
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf, np.float32("nan"),
                              np.float64("-inf"), 10**400, -(10**400), Fraction(10**400, 3)])


def real_types(floats):
    """The same value as a float, NumPy scalar, int (when whole) or Fraction."""
    return floats.flatmap(lambda x: st.sampled_from(
        [x, np.float64(x), Fraction(x)] + ([int(x)] if float(x).is_integer() else [])))


def hyper(valid, out_of_range):
    return {"valid": real_types(valid),
            "invalid": st.one_of(NON_REALS, NON_FINITE, real_types(out_of_range))}


def negative():  # strictly: -0.0 is a valid 0
    return st.floats(max_value=-5e-324, allow_nan=False, allow_infinity=False)


# Valid as doubles, but not in float32 (issue 19, item 5): refused for float32 buffers only.
FLOAT32_MISFITS = {"lr": [1e39, 1e38], "eps": [1e-50, 7e-46, 1e39], "grad_scale": [1e-300, 1e-40, 1e39]}


def or_misfits(name, floats):
    return st.one_of(floats, st.sampled_from(FLOAT32_MISFITS[name]))


HYPER = {
    "lr": hyper(or_misfits("lr", st.floats(0.0, 10.0)), negative()),
    "beta1": hyper(st.floats(0.0, 1.0, exclude_max=True),
                   st.one_of(negative(), st.floats(1.0, 1e300))),
    "beta2": hyper(st.floats(0.0, 1.0, exclude_max=True),
                   st.one_of(negative(), st.floats(1.0, 1e300))),
    "eps": hyper(or_misfits("eps", st.floats(0.0, 1.0)), negative()),
    "weight_decay": hyper(st.floats(0.0, 1.0), negative()),
    "eps_root": hyper(st.sampled_from([0.0, 1e-12, 1e-8]), negative()),
    "grad_scale": hyper(or_misfits("grad_scale", st.floats(1e-3, 1e3)), st.floats(max_value=0.0, allow_nan=False,
                                                         allow_infinity=False)),
    "step": {"valid": st.one_of(st.integers(1, 2**63 - 1), st.integers(1, 10).map(np.int64),
                                st.just(np.uint64(2**63 - 1))),
             "invalid": st.one_of(st.integers(max_value=0), st.integers(min_value=2**63),
                                  st.sampled_from([True, False, 1.0, 2.5, np.float64(2.0), "1",
                                                   None, np.uint64(2**64 - 1), 1 + 0j]))},
}
FLAG = {"valid": st.sampled_from([True, False, np.bool_(True), np.bool_(False)]),
        "invalid": st.sampled_from([0, 1, None, "True", 1.0, np.int64(1)])}
for _flag in ("decoupled_weight_decay", "maximize", "eps_hat"):
    HYPER[_flag] = FLAG
NUM_THREADS = {"valid": st.sampled_from([None, 1, 2, 3, np.int32(2)]),
               "invalid": st.sampled_from([0, -1, 2**31, 2**64, True, 1.5, "2", np.float64(2)])}


@st.composite
def hyperparameters(draw, names, broken):
    """{name: value}, and whether every value is valid. ``broken``: at least one is not."""
    bad = set(draw(st.sets(st.sampled_from(names), min_size=1))) if broken else set()
    values = {name: draw(HYPER[name]["invalid" if name in bad else "valid"]) for name in names}
    if {"eps_hat", "eps_root"} <= set(values) and not bad & {"eps_hat", "eps_root"}:
        # both epsilon forms at once is invalid: rarely on purpose, else eps_root = 0
        if values["eps_hat"] and not draw(st.integers(0, 9)) == 0:
            values["eps_root"] = 0.0
        elif values["eps_hat"] and values["eps_root"] > 0:
            bad.add("eps_root")
    return values, not bad


def as_float(values):
    return {k: (bool(v) if isinstance(v, (bool, np.bool_)) else float(v)) for k, v in values.items()}


def fits_element_types(values, dtypes, step=1):
    """Issue 19, item 5, written here independently of fastadam: valid hyperparameters
    (as doubles) are still refused when an element type they are cast to cannot hold them:
    a nonzero eps or eps_root that rounds to 0 or is beyond the largest value; a
    grad_scale (other than 1) that is not a normal number; a step coefficient
    lr / (1 - beta1**step) (eps_root form: lr) beyond the largest value; an L2
    weight_decay, or a decoupled lr * weight_decay, beyond it."""
    f = as_float({k: v for k, v in values.items() if k != "step" and not callable(v)})
    lr, beta1, decay = f.get("lr", 1e-3), f.get("beta1", 0.9), f.get("weight_decay", 0.0)
    for dtype in map(np.dtype, dtypes):
        largest, tiny = float(np.finfo(dtype).max), float(np.finfo(dtype).tiny)  # (as doubles)
        for key in ("eps", "eps_root"):
            x = f.get(key, 0.0)
            with np.errstate(under="ignore", over="ignore"):
                if x > largest or (x > 0.0 and dtype.type(x) == 0.0):
                    return False
        scale = f.get("grad_scale", 1.0)
        if scale != 1.0 and not tiny <= scale <= largest:
            return False
        if (lr if f.get("eps_root", 0.0) > 0.0 else lr / (1.0 - beta1 ** step)) > largest:
            return False
        if (lr * decay if f.get("decoupled_weight_decay") else decay) > largest:
            return False
    return True


def values_for(draw, dtype, size):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    specials = draw(st.sampled_from([None, None, None, np.nan, np.inf, 0.0]))
    values = rng.standard_normal(size)
    if specials is not None and size:
        values[rng.integers(size)] = specials
    return values.astype(dtype)


def no_amsgrad(name, buf):
    """A max_exp_avg_sq drawn as the non-buffer None is no buffer at all: a valid call
    without AMSGrad (found by a FASTADAM_FUZZ=deep run, which expected a rejection)."""
    return name == "max_exp_avg_sq" and buf.obj is None


def assert_unchanged(mem, before, what="a rejected call"):
    after = mem.snapshot()
    for i, (a, b) in enumerate(zip(after, before)):
        assert a == b, f"{what} changed block {i} ({type(mem.blocks[i]).__name__})"


def call_checked(function, mem):
    """Run ``function``; return (accepted, exception). Anything but TypeError/ValueError
    propagates (and fails the test); a rejection must leave every block unchanged."""
    before = mem.snapshot()
    try:
        function()
    except REJECTIONS as exc:
        event(f"rejected: {type(exc).__name__}")
        assert_unchanged(mem, before)
        return False, exc
    event("accepted")
    return True, None


# --- adam_step ------------------------------------------------------------------------------

SLOTS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
STEP_HYPER = ("step", "lr", "beta1", "beta2", "eps", "weight_decay", "decoupled_weight_decay",
              "maximize", "eps_hat", "eps_root", "grad_scale")


@st.composite
def adam_step_calls(draw):
    mem = Memory()
    broken = draw(st.sampled_from(["nothing", "buffers", "hyperparameters", "both"]))
    buffers_broken = broken in ("buffers", "both")
    size = draw(st.integers(0, 40))
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    amsgrad = draw(st.booleans())
    slots = SLOTS if amsgrad else SLOTS[:4]
    bufs = {}
    for name in slots:
        slot_dtype, slot_size = dtype, size
        if buffers_broken and draw(st.integers(0, 4)) == 0:
            slot_dtype = np.dtype(np.float64 if dtype == np.float32 else np.float32)
        if buffers_broken and draw(st.integers(0, 5)) == 0:
            slot_size = size + draw(st.sampled_from([-1, 1, 5]))
            assume(slot_size >= 0)
        values = values_for(draw, slot_dtype, slot_size)
        if name in ("exp_avg_sq", "max_exp_avg_sq"):
            values = np.abs(values)
        bufs[name] = draw(kinds(buffers_broken))(values, mem)
    overlap = False
    if buffers_broken and size and draw(st.booleans()):
        # two slots share memory: the same object, or views of one block `shift` apart
        first, second = draw(st.lists(st.sampled_from(slots), min_size=2, max_size=2,
                                      unique=True))
        shift = draw(st.integers(0, size + 1))
        block = mem.keep(np.zeros(2 * size + 1, dtype))
        if shift == 0 and draw(st.booleans()):
            bufs[second] = bufs[first]
            overlap = bufs[first].view is None or bufs[first].view.size > 0
        else:
            for name, offset in ((first, 0), (second, shift)):
                view = block[offset:offset + size]
                view[...] = np.abs(values_for(draw, dtype, size))
                bufs[name] = Buffer(view, view)
            overlap = shift < size
    param = bufs["param"]
    valid = not overlap and param.view is not None and all(
        no_amsgrad(name, b) or (b.readable if name == "grad" else b.writable)
        and b.dtype == param.dtype and b.view.size == param.view.size
        for name, b in bufs.items())
    hyper, hyper_valid = draw(hyperparameters(STEP_HYPER, broken in ("hyperparameters", "both")))
    threads_key = "invalid" if broken == "hyperparameters" and draw(st.integers(0, 5)) == 0 \
        else "valid"
    num_threads = draw(NUM_THREADS[threads_key])
    fits = hyper_valid and fits_element_types(hyper, [dtype], int(hyper["step"]))
    note(f"buffers valid: {valid}, hyperparameters valid: {hyper_valid} (fit {dtype}: {fits}), "
         f"threads: {threads_key}")
    return mem, bufs, hyper, num_threads, valid and fits and threads_key == "valid"


@fuzz
@given(adam_step_calls())
def test_adam_step(case):
    mem, bufs, hyper, num_threads, valid = case
    before = {name: None if b.view is None else b.view.copy() for name, b in bufs.items()}

    def call():
        fastadam.adam_step(bufs["param"].obj, bufs["grad"].obj, bufs["exp_avg"].obj,
                           bufs["exp_avg_sq"].obj,
                           max_exp_avg_sq=bufs["max_exp_avg_sq"].obj if "max_exp_avg_sq" in bufs
                           else None, num_threads=num_threads, **hyper)

    accepted, exc = call_checked(call, mem)
    assert accepted == valid, f"valid={valid} but the call raised {exc!r}"
    if not accepted:
        return
    floats = as_float(hyper)
    floats["step"] = int(hyper["step"])
    expected = adam_reference(before["param"], before["grad"], before["exp_avg"],
                              before["exp_avg_sq"], before.get("max_exp_avg_sq"),
                              dtype=before["param"].dtype, **floats)
    for name, want in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), expected):
        if want is not None:
            np.testing.assert_array_equal(bufs[name].view, want, err_msg=name)
    np.testing.assert_array_equal(bufs["grad"].view, before["grad"])


# --- Adam / AdamW construction --------------------------------------------------------------

GROUP_HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay", "eps_hat", "eps_root")
HYPER["amsgrad"] = FLAG


def group_kwargs(values):
    """Adam's keyword arguments from drawn values (beta1/beta2 become betas)."""
    kwargs = {k: v for k, v in values.items() if k not in ("beta1", "beta2")}
    if "beta1" in values:
        kwargs["betas"] = (values["beta1"], values["beta2"])
    return kwargs


@st.composite
def param_lists(draw, mem, broken, count=None):
    """(objects, views, valid) for a list of parameters."""
    n = count if count is not None else draw(st.integers(1, 3))
    bufs = []
    for _ in range(n):
        dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
        values = values_for(draw, dtype, draw(st.integers(0, 12)))
        bufs.append(draw(kinds(broken, aligned=True))(values, mem))
    overlap = False
    if broken and len(bufs) > 1 and draw(st.booleans()):
        bufs[-1] = bufs[0]  # the same parameter twice
        overlap = bufs[0].view is None or bufs[0].view.size > 0
    valid = not overlap and all(b.writable and b.aligned for b in bufs)
    objs, views = [b.obj for b in bufs], [b.view for b in bufs]
    return objs, views, valid


@st.composite
def constructions(draw):
    mem = Memory()
    broken = draw(st.sampled_from(["nothing", "params", "hyperparameters", "container"]))
    objs, views, params_valid = draw(param_lists(mem, broken == "params"))
    values, hyper_valid = draw(hyperparameters(GROUP_HYPER + ("amsgrad", "maximize"),
                                               broken == "hyperparameters"))
    kwargs = group_kwargs(values)
    if draw(st.booleans()):
        kwargs["lr"] = (lambda lr: (lambda step: lr))(kwargs["lr"])  # a schedule
    cls = draw(st.sampled_from([fastadam.Adam, fastadam.AdamW]))
    hyper_valid = hyper_valid and fits_element_types(  # (AdamW: decoupled weight decay)
        {**values, "decoupled_weight_decay": cls is fastadam.AdamW},
        {v.dtype for v in views if v is not None})
    params, valid = objs, params_valid and hyper_valid
    if broken == "container":
        params, what = draw(st.sampled_from([
            (views[0], "a bare array"), (None, "None"), (3, "an int"), ([], "empty"),
            ([{"lr": 0.1}], "a group without params"), ([{"params": objs, "foo": 1}], "unknown key"),
            ([{"params": objs}, objs[0]], "a group and a tensor mixed"),
            ({"params": objs}, "a bare group dict"),
            ([{"params": objs}, {"params": objs}], "the same params in two groups"),
        ]))
        # the same params twice do not overlap if they are all empty
        valid = what == "the same params in two groups" and all(v.size == 0 for v in views) \
            and hyper_valid
        if valid:
            views = views + views
    elif draw(st.booleans()):
        params = [{"params": objs, **kwargs}]
        kwargs = {}
    return mem, cls, params, kwargs, views, valid


@fuzz
@given(constructions())
def test_optimizer_construction(case):
    mem, cls, params, kwargs, views, valid = case
    made = []
    accepted, exc = call_checked(lambda: made.append(cls(params, **kwargs)), mem)
    assert accepted == valid, f"valid={valid} but construction raised {exc!r}"
    if not accepted:
        return
    opt = made[0]
    group = opt.param_groups[0]
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(s["exp_avg"].shape).astype(v.dtype)
             for s, v in zip(opt.state, views)]
    before = [v.copy() for v in views]
    assert opt.step(grads)
    lr = group["lr"](1) if callable(group["lr"]) else group["lr"]
    floats = as_float({"lr": lr, "beta1": group["betas"][0], "beta2": group["betas"][1],
                       "eps": group["eps"], "weight_decay": group["weight_decay"],
                       "eps_hat": group["eps_hat"], "eps_root": group["eps_root"],
                       "maximize": group["maximize"],
                       "decoupled_weight_decay": group["decoupled_weight_decay"]})
    for view, old, grad in zip(views, before, grads):
        zeros = np.zeros_like(old)
        want = adam_reference(old, grad, zeros, zeros, zeros if group["amsgrad"] else None,
                              step=1, dtype=old.dtype, **floats)
        np.testing.assert_array_equal(view.reshape(-1), want[0])


# --- step -----------------------------------------------------------------------------------

def make_optimizer(draw, mem):
    """A valid optimizer over 1-3 parameters (maybe two groups), stepped 0-2 times."""
    objs, views, _ = draw(param_lists(mem, False))
    for k, view in enumerate(views):
        if view.size % 2 == 0 and view.size and draw(st.booleans()):
            objs[k] = view.reshape(2, -1)  # shaped parameters, whose grads must match
    amsgrad = draw(st.booleans())
    if len(objs) > 1 and draw(st.booleans()):
        opt = fastadam.Adam([{"params": objs[:1]}, {"params": objs[1:], "amsgrad": amsgrad,
                                                    "lr": 0.05}], lr=0.01)
    else:
        opt = fastadam.AdamW(objs, lr=0.01, amsgrad=amsgrad)
    shapes = [np.shape(np.asarray(o)) for o in objs]
    for t in range(draw(st.integers(0, 2))):
        rng = np.random.default_rng(t)
        opt.step([rng.standard_normal(s).astype(v.dtype) for s, v in zip(shapes, views)])
    return opt, views, shapes


def optimizer_state(opt):
    return [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
            for s in opt.state]


def assert_same_state(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            if key == "step":
                assert a[key] == b[key]
            else:
                assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key


@st.composite
def step_calls(draw):
    mem = Memory()
    opt, views, shapes = make_optimizer(draw, mem)
    broken = draw(st.sampled_from(["nothing", "grads", "container", "arguments", "groups"]))
    grads, valid = [], True
    for i, (view, shape) in enumerate(zip(views, shapes)):
        buf = draw(kinds(broken == "grads"))(values_for(draw, view.dtype, view.size), mem)
        obj = buf.obj
        if isinstance(obj, np.ndarray) and len(shape) == 2 and buf.view is not None \
                and buf.view.size == view.size and obj.flags.c_contiguous:
            obj = obj.reshape(shape)  # a shaped param's grad must have its shape
        seen_shape = obj.shape if isinstance(obj, np.ndarray) else (
            memoryview(obj).shape if buf.view is not None else None)
        ok = buf.readable and buf.dtype == view.dtype and seen_shape == shape
        if broken == "grads" and draw(st.integers(0, 5)) == 0:
            state = opt.state[i]
            obj = draw(st.sampled_from([views[i].reshape(shape), state["exp_avg"],
                                        state["exp_avg_sq"]]))  # memory the step writes
            ok = view.size == 0
        grads.append(obj)
        valid &= ok
    objs = grads
    container = objs
    if broken == "container":
        container = draw(st.sampled_from([objs[:-1], objs + objs[:1], None, 7,
                                          np.zeros(len(objs)), {"0": objs[0]}]))
        valid = False
    elif draw(st.booleans()):
        container = tuple(objs)
    kwargs = {}
    if broken == "arguments":
        kwargs = draw(st.sampled_from([{"grad_scale": 0.0}, {"grad_scale": -1.0},
                                       {"grad_scale": math.nan}, {"grad_scale": "2"},
                                       {"skip_if_nonfinite": 1}, {"skip_if_nonfinite": None},
                                       {"grad_scale": True}]))
        valid = False
    elif draw(st.booleans()):
        kwargs["grad_scale"] = draw(st.sampled_from([None, 1.0, 2.0, 1024]))
        kwargs["skip_if_nonfinite"] = draw(st.booleans())
    if broken == "groups":
        group = opt.param_groups[-1]
        edit = draw(st.sampled_from(["lr", "betas", "eps", "amsgrad", "params", "schedule",
                                     "remove"]))
        if edit == "remove":
            opt.param_groups.pop()
        elif edit == "params":
            group["params"] = list(group["params"])
        elif edit == "schedule":
            group["lr"] = lambda step: math.nan
        else:
            group[edit] = {"lr": -1.0, "betas": (0.9, 1.0), "eps": math.inf, "amsgrad": 1}[edit]
        valid = False
    return mem, opt, views, container, kwargs, valid


@fuzz
@given(step_calls())
def test_step(case):
    mem, opt, views, grads, kwargs, valid = case
    state_before, skipped = optimizer_state(opt), opt.skipped_steps
    params_before = [v.copy() for v in views]
    grad_copies = [np.array(g, copy=True) for g in grads] if valid else None
    result = []
    accepted, exc = call_checked(lambda: result.append(opt.step(grads, **kwargs)), mem)
    assert accepted == valid, f"valid={valid} but step raised {exc!r}"
    if not accepted:
        assert_same_state(optimizer_state(opt), state_before)
        assert opt.skipped_steps == skipped
        return
    scale = kwargs.get("grad_scale") or 1.0
    nonfinite = any(not np.isfinite(g).all() for g in grad_copies)
    if kwargs.get("skip_if_nonfinite") and nonfinite:
        assert result == [False] and opt.skipped_steps == skipped + 1
        assert_same_state(optimizer_state(opt), state_before)
        return
    assert result == [True]
    for i, (view, old, grad, state) in enumerate(zip(views, params_before, grad_copies,
                                                     state_before)):
        group = opt.param_groups[opt.engine.group_of[i]]
        floats = as_float({"lr": group["lr"], "beta1": group["betas"][0],
                           "beta2": group["betas"][1], "eps": group["eps"],
                           "weight_decay": group["weight_decay"], "maximize": group["maximize"],
                           "decoupled_weight_decay": group["decoupled_weight_decay"],
                           "grad_scale": scale})
        vmax = state.get("max_exp_avg_sq", np.zeros_like(old)) if group["amsgrad"] else None
        want = adam_reference(old, grad, state["exp_avg"], state["exp_avg_sq"], vmax,
                              step=state["step"] + 1, dtype=old.dtype, **floats)
        np.testing.assert_array_equal(view.reshape(-1), want[0])
        assert opt.state[i]["step"] == state["step"] + 1


# --- adam_step_rows and row-sparse gradients in step --------------------------------------

ROW_INT_DTYPES = [np.int8, np.uint8, np.int16, np.int32, np.uint32, np.int64, np.uint64, ">i8",
                  "<u2"]


def row_table_shape(draw):
    """A param with rows: 1-D, 2-D or 3-D, any axis 0 (0 rows, 0 columns) allowed."""
    if draw(st.integers(0, 9)) == 0:  # rows of no elements: indices up to 2**59 are valid
        return (2**59, 0)  # (NumPy refuses shapes of 2**63 bytes or more)
    n = draw(st.integers(0, 8))
    return draw(st.sampled_from([(n,), (n, draw(st.integers(0, 4))),
                                 (n, draw(st.integers(0, 3)), draw(st.integers(0, 2)))]))


@st.composite
def row_indices(draw, n_rows, broken):
    """(the object passed as rows, the indices as ints or None if the object is invalid).
    Valid: any integer dtype, list, tuple, strided or read-only array, duplicates."""
    k = draw(st.integers(0, 6)) if n_rows else 0
    values = draw(st.lists(st.integers(0, n_rows - 1), min_size=k, max_size=k)) if k else []
    if broken:
        bad = draw(st.sampled_from([
            "negative", "too large", "near 2**63", "uint64 beyond int64", "python int 2**64",
            "mixed sign huge", "floats", "integral floats", "bools", "2-D", "object array",
            "None", "string", "ragged", "0-d", "float empty", "complex", "masked"]))
        note(f"rows broken: {bad}")
        wrong = {
            "negative": lambda: values + [-draw(st.integers(1, 2**63))],
            "too large": lambda: values + [n_rows + draw(st.integers(0, 3))],
            "near 2**63": lambda: np.array(values + [2**63 - draw(st.integers(1, 3))], np.int64),
            "uint64 beyond int64": lambda: np.array(values + [2**63 + draw(st.integers(0, 9))],
                                                    np.uint64),
            "python int 2**64": lambda: values + [2**64],
            "mixed sign huge": lambda: [-1, 2**63] + values,
            "floats": lambda: np.array(values + [0.5]),
            "integral floats": lambda: [float(v) for v in values] or [0.0],
            "bools": lambda: np.array([True] + [bool(v % 2) for v in values]),
            "2-D": lambda: np.array(values + [0, 0]).reshape(1, -1),
            "object array": lambda: np.array(values + [0], dtype=object),
            "None": lambda: None,
            "string": lambda: "0",
            "ragged": lambda: [[0], [0, 0]],
            "0-d": lambda: np.int64(0),
            "float empty": lambda: np.zeros(0),
            "complex": lambda: np.array(values + [0], np.complex64),
            # out of range under the mask: argmin/argmax skip it, the kernel would not
            "masked": lambda: np.ma.array(values + [n_rows + 10**6],
                                          mask=[False] * len(values) + [True]),
        }[bad]()
        return wrong, None
    form = draw(st.sampled_from(["list", "tuple", "dtype", "strided", "read-only", "int64",
                                 "masked"]))
    if form == "list":
        rows = list(values)
    elif form == "tuple":
        rows = tuple(values)
    elif form == "dtype":
        dtype = np.dtype(draw(st.sampled_from(ROW_INT_DTYPES)))
        assume(not values or max(values) <= np.iinfo(dtype).max)
        rows = np.array(values, dtype)
    elif form == "masked":  # its memory counts, as for every buffer argument
        rows = np.ma.array(np.array(values, np.int64),
                           mask=draw(st.lists(st.booleans(), min_size=k, max_size=k)))
    elif form == "strided":
        rows = np.repeat(np.array(values, np.int64), 2)[::2]
    else:
        rows = np.array(values, np.int64)
        rows.flags.writeable = form != "read-only"
    return rows, values


def summed_rows(grad, rows, dtype):
    """The reference's duplicate summing: each distinct row (in first-seen order) gets the
    sum of its gradient rows, added left to right in the element dtype."""
    sums = {}
    for k, r in enumerate(rows):
        sums[r] = grad[k].copy() if r not in sums else (sums[r] + grad[k]).astype(dtype)
    return list(sums), np.array(list(sums.values()), dtype).reshape(len(sums), grad.shape[1])


def rows_reference(before, rows, grad, hyper, row_size):
    """Every buffer after a lazy step: the reference on the given rows, the rest as before."""
    expected = {name: None if b is None else b.copy() for name, b in before.items()}
    if not row_size:
        return expected
    dtype = before["param"].dtype
    unique, summed = summed_rows(grad.reshape(len(rows), row_size), rows, dtype)
    if not unique:
        return expected
    table = {name: None if b is None else b.reshape(-1, row_size) for name, b in before.items()}
    expected = {name: None if b is None else b.copy() for name, b in table.items()}
    picked = [None if table[name] is None else table[name][unique]
              for name in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")]
    new = adam_reference(*picked[:1], summed, *picked[1:], dtype=dtype, **hyper)
    for name, values in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), new):
        if values is not None:
            expected[name][unique] = values.reshape(len(unique), row_size)
    return expected


@st.composite
def grad_row_buffers(draw, mem, dtype, k, row_shape, broken):
    """(the grad_rows object, a Buffer of it, valid?): shaped (k, *row_shape) or flat."""
    row_size = math.prod(row_shape)
    count = k * row_size
    expected = (k,) + tuple(row_shape)
    wrong_size = broken and draw(st.integers(0, 3)) == 0
    if wrong_size:
        count = max(0, count + draw(st.sampled_from([-row_size, -1, 1, row_size])))
    kind = draw(kinds(broken))
    buf = kind(values_for(draw, dtype, count), mem)
    obj = buf.obj
    if isinstance(obj, np.ndarray) and obj.flags.c_contiguous and buf.view is not None \
            and obj.size == k * row_size and draw(st.booleans()):
        obj = obj.reshape(expected)  # the documented shape
    if broken and isinstance(obj, np.ndarray) and obj.ndim and obj.flags.c_contiguous \
            and draw(st.integers(0, 3)) == 0:
        obj = obj.reshape(obj.shape + (1,))  # one axis too many
    shape = obj.shape if isinstance(obj, np.ndarray) else (
        memoryview(obj).shape if buf.view is not None else None)
    valid = buf.readable and buf.dtype == dtype and (
        shape == expected or (len(shape) == 1 and buf.view.size == k * row_size))
    return obj, buf, valid


@st.composite
def adam_step_rows_calls(draw):
    mem = Memory()
    broken = draw(st.sampled_from(["nothing", "nothing", "rows", "grad_rows", "state",
                                   "overlap", "hyperparameters"]))
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    shape = row_table_shape(draw)
    size, row_shape = math.prod(shape), shape[1:]
    row_size = math.prod(row_shape)
    amsgrad = draw(st.booleans())
    param = mem.keep(values_for(draw, dtype, size)).reshape(shape)
    param_obj = memoryview(param) if draw(st.booleans()) else param
    bufs = {"param": Buffer(param_obj, param.reshape(-1))}
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")[:3 if amsgrad else 2]:
        slot_dtype, slot_size = dtype, size
        if broken == "state" and draw(st.integers(0, 2)) == 0:
            slot_dtype = np.dtype(np.float64 if dtype == np.float32 else np.float32)
        if broken == "state" and draw(st.integers(0, 2)) == 0:
            slot_size = size + draw(st.sampled_from([-1, 1, 3]))
            assume(slot_size >= 0)
        bufs[name] = draw(kinds(broken == "state"))(
            np.abs(values_for(draw, slot_dtype, slot_size)), mem)
    rows, indices = draw(row_indices(shape[0], broken == "rows"))
    k = len(indices) if indices is not None else draw(st.integers(0, 3))
    grad_obj, grad_buf, grad_valid = draw(grad_row_buffers(mem, dtype, k, row_shape,
                                                           broken == "grad_rows"))
    overlap = False
    if broken == "overlap":
        what = draw(st.sampled_from(["grad_rows in param", "grad_rows in exp_avg",
                                     "exp_avg is exp_avg_sq"]))
        if what == "exp_avg is exp_avg_sq":
            bufs["exp_avg_sq"] = bufs["exp_avg"]
            overlap = size > 0
        elif k <= shape[0]:  # a view of k rows of the param or of exp_avg
            target = param if what == "grad_rows in param" else bufs["exp_avg"].view
            if target is not None and target.flags.c_contiguous and target.flags.writeable:
                grad_obj = target.reshape(shape)[:k]
                grad_buf, grad_valid = Buffer(grad_obj, grad_obj.reshape(-1)), True
                overlap = k * row_size > 0
    state_valid = all(no_amsgrad(name, b) or b.writable and b.dtype == dtype
                      and b.view.size == size for name, b in bufs.items() if name != "param")
    hyper, hyper_valid = draw(hyperparameters(STEP_HYPER, broken == "hyperparameters"))
    num_threads = draw(NUM_THREADS["valid"])
    hyper_valid = hyper_valid and fits_element_types(hyper, [dtype], int(hyper["step"]))
    valid = indices is not None and grad_valid and state_valid and not overlap and hyper_valid
    note(f"shape {shape}, rows {rows!r}, grad_rows {grad_buf}, valid {valid}")
    return mem, bufs, rows, indices, grad_obj, grad_buf, row_size, hyper, num_threads, valid


@fuzz
@given(adam_step_rows_calls())
def test_adam_step_rows(case):
    mem, bufs, rows, indices, grad_obj, grad_buf, row_size, hyper, num_threads, valid = case
    before = {name: None if b.view is None else b.view.copy() for name, b in bufs.items()}
    before.setdefault("max_exp_avg_sq", None)
    grad_before = None if grad_buf.view is None else grad_buf.view.copy()

    def call():
        fastadam.adam_step_rows(bufs["param"].obj, grad_obj, rows, bufs["exp_avg"].obj,
                                bufs["exp_avg_sq"].obj,
                                max_exp_avg_sq=bufs["max_exp_avg_sq"].obj
                                if "max_exp_avg_sq" in bufs else None,
                                num_threads=num_threads, **hyper)

    accepted, exc = call_checked(call, mem)
    assert accepted == valid, f"valid={valid} but the call raised {exc!r}"
    if not accepted:
        return
    floats = as_float(hyper)
    floats["step"] = int(hyper["step"])
    event("accepted with duplicate rows" if len(set(indices)) < len(indices) else
          "accepted, rows unique")
    expected = rows_reference(before, indices, grad_before, floats, row_size)
    for name, want in expected.items():
        if want is not None:
            np.testing.assert_array_equal(bufs[name].view, want.reshape(-1), err_msg=name)
    np.testing.assert_array_equal(grad_buf.view, grad_before)


@st.composite
def row_step_calls(draw):
    """An optimizer over params with rows, and a step's gradients: each dense or
    row-sparse ``(rows, values)``, possibly malformed."""
    mem = Memory()
    shapes = [row_table_shape(draw) for _ in range(draw(st.integers(1, 3)))]
    dtypes = [np.dtype(draw(st.sampled_from([np.float32, np.float64]))) for _ in shapes]
    params = [mem.keep(values_for(draw, d, math.prod(s))).reshape(s)
              for s, d in zip(shapes, dtypes)]
    amsgrad = draw(st.booleans())
    opt = draw(st.sampled_from([fastadam.Adam, fastadam.AdamW]))(params, lr=0.01,
                                                                  amsgrad=amsgrad)
    for t in range(draw(st.integers(0, 2))):
        rng = np.random.default_rng(t)
        opt.step([rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)])
    broken = draw(st.sampled_from(["nothing", "nothing", "rows", "values", "tuple",
                                   "overlap"]))
    grads, sparse, valid = [], [], True
    for i, (param, shape) in enumerate(zip(params, shapes)):
        if not draw(st.booleans()):
            grads.append(fresh(values_for(draw, param.dtype, param.size), mem).reshape(shape))
            sparse.append(None)
            continue
        rows, indices = draw(row_indices(shape[0], broken == "rows"))
        k = len(indices) if indices is not None else draw(st.integers(0, 3))
        values, values_buf, values_valid = draw(grad_row_buffers(
            mem, param.dtype, k, shape[1:], broken == "values"))
        entry = (rows, values)
        if broken == "tuple" and draw(st.booleans()):
            entry = [(rows,), (rows, values, values), [rows, values]][draw(st.integers(0, 2))]
            values_valid = False
        if broken == "overlap" and k <= shape[0] and draw(st.booleans()):
            target = [param, opt.state[i]["exp_avg"],
                      opt.state[i]["exp_avg_sq"]][draw(st.integers(0, 2))]
            values = target.reshape(shape)[:k]
            entry, values_buf = (rows, values), Buffer(values, values.reshape(-1))
            values_valid = values.size == 0  # memory the step writes
        grads.append(entry)
        sparse.append((indices, values_buf))
        valid &= indices is not None and values_valid
    kwargs = {}
    if draw(st.booleans()):
        kwargs["grad_scale"] = draw(st.sampled_from([None, 1.0, 2.0, 1024]))
        kwargs["skip_if_nonfinite"] = draw(st.booleans())
    return mem, opt, params, grads, sparse, kwargs, valid


@fuzz
@given(row_step_calls())
def test_step_with_row_sparse_grads(case):
    mem, opt, params, grads, sparse, kwargs, valid = case
    state_before, skipped = optimizer_state(opt), opt.skipped_steps
    params_before = [p.copy() for p in params]
    values_before = [None if s is None or s[1].view is None else s[1].view.copy()
                     for s in sparse]
    result = []
    accepted, exc = call_checked(lambda: result.append(opt.step(grads, **kwargs)), mem)
    assert accepted == valid, f"valid={valid} but step raised {exc!r}"
    if not accepted:
        assert_same_state(optimizer_state(opt), state_before)
        assert opt.skipped_steps == skipped
        return
    read = [np.asarray(g) if s is None else v for g, s, v in zip(grads, sparse, values_before)]
    if kwargs.get("skip_if_nonfinite") and any(not np.isfinite(g).all() for g in read):
        assert result == [False] and opt.skipped_steps == skipped + 1
        assert_same_state(optimizer_state(opt), state_before)
        return
    assert result == [True]
    group = opt.param_groups[0]
    floats = as_float({"lr": group["lr"], "beta1": group["betas"][0],
                       "beta2": group["betas"][1], "eps": group["eps"],
                       "weight_decay": group["weight_decay"], "maximize": group["maximize"],
                       "decoupled_weight_decay": group["decoupled_weight_decay"],
                       "grad_scale": kwargs.get("grad_scale") or 1.0})
    for i, (param, old, grad, rows, state) in enumerate(zip(params, params_before, read,
                                                            sparse, state_before)):
        floats["step"] = state["step"] + 1
        before = {"param": old.reshape(-1), "exp_avg": state["exp_avg"].reshape(-1),
                  "exp_avg_sq": state["exp_avg_sq"].reshape(-1),
                  "max_exp_avg_sq": state.get("max_exp_avg_sq", np.zeros_like(old)).reshape(-1)
                  if group["amsgrad"] else None}
        row_size = math.prod(param.shape[1:])
        indices = range(param.shape[0]) if rows is None else rows[0]
        expected = rows_reference(before, indices, grad, floats, row_size)
        np.testing.assert_array_equal(param.reshape(-1), expected["param"].reshape(-1))
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if expected[key] is not None:
                np.testing.assert_array_equal(opt.state[i][key].reshape(-1),
                                              expected[key].reshape(-1), err_msg=key)
        assert opt.state[i]["step"] == state["step"] + 1


# --- load_state_dict --------------------------------------------------------------------------

INVALID_EDITS = [
    "not a mapping", "no state", "no param_groups", "groups not a sequence",
    "state not a mapping", "extra group", "group not a dict", "ids too few", "duplicate id",
    "unhashable id", "missing key", "bad lr", "bad betas", "bad amsgrad", "unknown state id",
    "entry not a mapping", "entry without exp_avg", "bad step", "bad array",
]
VALID_EDITS = ["drop an entry", "another step", "renamed ids", "new hyperparameters",
               "new values", "nothing"]
BAD_STEPS = [-1, 1.5, math.nan, math.inf, True, "3", 2**63, None, np.array([1, 2]), 1j,
             Fraction(10**400, 3), Decimal(2)]


def bad_array(draw, array):
    return draw(st.sampled_from([
        array.astype(np.float64 if array.dtype == np.float32 else np.float32),
        array.astype(np.int32), array.reshape(-1)[:-1] if array.size else np.zeros(1, array.dtype),
        np.zeros(array.shape + (1,), array.dtype), None, "array", np.zeros((), array.dtype),
    ]))


@st.composite
def state_dicts(draw, edit):
    mem = Memory()
    opt, views, _ = make_optimizer(draw, mem)
    sd = opt.state_dict()
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    entry = sd["state"][draw(st.sampled_from(ids))]
    group = sd["param_groups"][draw(st.integers(0, len(sd["param_groups"]) - 1))]
    if edit == "not a mapping":
        sd = draw(st.sampled_from([None, [], "state", list(sd.items())]))
    elif edit in ("no state", "no param_groups"):
        del sd[edit[3:]]
    elif edit == "groups not a sequence":
        sd["param_groups"] = draw(st.sampled_from([5, {"0": group}, None, "groups"]))
    elif edit == "state not a mapping":
        sd["state"] = draw(st.sampled_from([list(sd["state"].values()), None, 3]))
    elif edit == "extra group":
        sd["param_groups"].append(dict(group))
    elif edit == "group not a dict":
        sd["param_groups"][0] = draw(st.sampled_from([None, [0], "group", 1.0]))
    elif edit == "ids too few":
        group["params"] = group["params"][:-1]
    elif edit == "duplicate id":
        if len(ids) < 2:
            group["params"] = group["params"] + group["params"]  # also too many
        else:
            sd["param_groups"][-1]["params"][-1] = ids[0]
    elif edit == "unhashable id":
        group["params"] = [[i] for i in group["params"]]
    elif edit == "missing key":
        del group[draw(st.sampled_from(["lr", "betas", "eps", "weight_decay", "amsgrad",
                                        "maximize", "eps_hat", "eps_root"]))]
    elif edit == "bad lr":
        group["lr"] = draw(st.one_of(NON_REALS, NON_FINITE, negative()))
    elif edit == "bad betas":
        group["betas"] = draw(st.sampled_from([(0.9,), (0.9, 1.0), (math.nan, 0.9), 0.9,
                                               np.array([0.9, 0.99]), (0.9, 0.99, 0.999)]))
    elif edit == "bad amsgrad":
        group["amsgrad"] = draw(FLAG["invalid"])
    elif edit == "unknown state id":
        sd["state"]["no such id"] = dict(entry)
    elif edit == "entry not a mapping":
        sd["state"][ids[0]] = draw(st.sampled_from([None, [], "entry"]))
    elif edit == "entry without exp_avg":
        del entry[draw(st.sampled_from(["exp_avg", "exp_avg_sq", "step"]))]
    elif edit == "bad step":
        entry["step"] = draw(st.sampled_from(BAD_STEPS))
    elif edit == "bad array":
        key = draw(st.sampled_from([k for k in entry if k != "step"]))
        entry[key] = bad_array(draw, entry[key])
    elif edit == "drop an entry":
        del sd["state"][ids[0]]
    elif edit == "another step":
        entry["step"] = draw(st.sampled_from([0, 7, 7.0, np.int64(9), np.array(3),
                                              np.float32(4.0), 2**63 - 2]))
        if entry["step"] > 0 and "max_exp_avg_sq" not in entry and any(
                g["amsgrad"] for g in sd["param_groups"]):
            entry["step"] = 0  # (an amsgrad group's entry needs max_exp_avg_sq)
    elif edit == "renamed ids":
        names = {i: f"p{i}" for i in ids}
        for g in sd["param_groups"]:
            g["params"] = [names[i] for i in g["params"]]
        sd["state"] = {names[i]: e for i, e in sd["state"].items()}
    elif edit == "new hyperparameters":
        group.update(lr=0.5, betas=[0.5, 0.25], eps=0.0, amsgrad=False, weight_decay=1.0)
    elif edit == "new values":
        for key in ("exp_avg", "exp_avg_sq"):
            entry[key] = np.full_like(entry[key], 0.125)
    return mem, opt, views, sd


@pytest.mark.parametrize("edit", INVALID_EDITS + VALID_EDITS)
@settings(fuzz, max_examples=max(10, fuzz.max_examples // 8))
@given(data=st.data())
def test_load_state_dict(edit, data):
    mem, opt, views, sd = data.draw(state_dicts(edit))
    valid = edit in VALID_EDITS
    before, groups_before = optimizer_state(opt), [dict(g) for g in opt.param_groups]
    accepted, exc = call_checked(lambda: opt.load_state_dict(sd), mem)
    assert accepted == valid, f"valid={valid} but load_state_dict raised {exc!r}"
    if not accepted:
        assert_same_state(optimizer_state(opt), before)
        assert opt.param_groups == groups_before
        return
    loaded = opt.state_dict()
    by_position = list(sd["state"].get(i) for g in sd["param_groups"] for i in g["params"])
    for i, (got, want) in enumerate(zip(loaded["state"].values(), by_position)):
        if want is None:  # no saved state: starts fresh
            assert got["step"] == 0 and not got["exp_avg"].any(), i
            continue
        assert got["step"] == int(np.asarray(want["step"]))
        for key in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(got[key], want[key])
    for got, want in zip(loaded["param_groups"], sd["param_groups"]):
        assert got["lr"] == want["lr"] and tuple(got["betas"]) == tuple(want["betas"])


# --- fastadam.load -------------------------------------------------------------------------

@st.composite
def damaged_files(draw):
    mem = Memory()
    opt, views, shapes = make_optimizer(draw, mem)
    return mem, opt, views, shapes, draw(st.sampled_from(["stored", "deflated"])), \
        draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                      min_size=1, max_size=4)), \
        draw(st.one_of(st.none(), st.floats(0, 1))), draw(st.binary(max_size=8))


@fuzz
@given(damaged_files())
def test_load_damaged_checkpoints(tmp_path_factory, case):
    mem, opt, views, shapes, compression, flips, truncate, tail = case
    directory = tmp_path_factory.mktemp("fuzz")
    path = directory / "opt.npz"
    fastadam.save(opt, path)
    saved = optimizer_state(opt)
    if compression == "deflated":
        header, arrays = _npz.read_npz(str(path))
        np.savez_compressed(path, **arrays, **{_npz.HEADER: np.array(json.dumps(header))})
    data = bytearray(path.read_bytes())
    for position, value in flips:
        data[int(position * len(data))] = value
    if truncate is not None:
        data = data[:int(truncate * len(data))]
    data += tail
    path.write_bytes(bytes(data))
    rng = np.random.default_rng(5)  # move the state away from the checkpoint first
    opt.step([rng.standard_normal(s).astype(v.dtype) for v, s in zip(views, shapes)])
    moved = optimizer_state(opt)
    accepted, exc = call_checked(lambda: fastadam.load(opt, path), mem)
    if accepted:  # the damage missed everything that is read (a CRC protects the data)
        loaded = optimizer_state(opt)
        for got, want in zip(loaded, saved):
            for key in set(got) - set(want):  # allocated since the save: zeroed by the load
                assert not got.pop(key).any(), key
        assert_same_state(loaded, saved)
    else:
        assert_same_state(optimizer_state(opt), moved)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="__buffer__ (PEP 688) is Python 3.12+")
def test_an_exporter_whose_buffer_changes_between_calls():
    class Shifty:
        """Exports a different, differently sized buffer on every request."""

        def __init__(self):
            self.blocks = [np.zeros(8, np.float32), np.zeros(3, np.float32)]
            self.calls = 0

        def __buffer__(self, flags):
            self.calls += 1
            return memoryview(self.blocks[(self.calls + 1) % 2])  # 8, 3, 8, 3, ...

    shifty = Shifty()
    opt = fastadam.Adam([shifty])  # keeps a view of the buffer it got (8 elements)
    assert opt.state[0]["exp_avg"].size == 8
    with pytest.raises(ValueError, match=r"grads\[0\] must have the shape of params\[0\] \(8,\), got \(3,\)"):
        opt.step([shifty])  # the grad request gets the other buffer: 3 elements
    assert opt.step([np.ones(8, np.float32)])
    assert (shifty.blocks[0] != 0).all() and not shifty.blocks[1].any()
    state = fastadam.adam_state(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="grad must have 8 elements like param, got 3"):
        fastadam.adam_step(shifty, shifty, state["exp_avg"], state["exp_avg_sq"], step=1)
    assert (shifty.blocks[0] != 0).all() and not shifty.blocks[1].any()


def test_a_bytearray_cannot_be_resized_under_an_optimizer():
    block = bytearray(np.ones(6, np.float32).tobytes())
    opt = fastadam.Adam([memoryview(block).cast("f")])
    with pytest.raises(BufferError):  # Python refuses: the optimizer holds a view
        block.extend(b"\0" * 4)
    with pytest.raises(BufferError):
        del block[:4]
    assert len(block) == 24
    assert opt.step([np.ones(6, np.float32)])
    assert (np.frombuffer(block, np.float32) != 1).all()
    # adam_step holds nothing between calls: the resized buffer is simply a new size
    del opt
    block.extend(np.ones(2, np.float32).tobytes())
    state = fastadam.adam_state(np.zeros(8, np.float32))
    fastadam.adam_step(memoryview(block).cast("f"), np.ones(8, np.float32), state["exp_avg"],
                       state["exp_avg_sq"], step=1)
    with pytest.raises(ValueError, match="grad must have 8 elements like param, got 6"):
        fastadam.adam_step(memoryview(block).cast("f"), np.ones(6, np.float32),
                           state["exp_avg"], state["exp_avg_sq"], step=2)


# --- inputs mutated while a step runs (issue 19, item 1) ----------------------------------------
#
# Every value the kernels trust (row indices, counts, sizes) must be copied into memory
# fastadam owns, then checked, then used. The worker below steps while a Python thread or
# a second process (through shared memory) flips one row index between a valid row and an
# invalid one (one past the end, 2**40, -1), for a bounded time. Checking the caller's
# array and copying it afterwards let the flip land in between: the kernel wrote through
# the unchecked index (a segfault every run, heap corruption, an ASan heap-buffer-overflow).
# The oracle: no crash; every step either applied or raised ValueError naming the rows,
# both happened; rows that were never valid indices, and canaries around the table and
# its state, are untouched. It runs in a subprocess, so a crash fails only this test, and
# under tools/sanitize.sh (the environment is inherited) ASan checks every access.

MUTATION_WORKER = r'''
import json, os, subprocess, sys, threading, time
import numpy as np
import fastadam

entry, mutator, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
N, D, K, PAD = 64, 8, 16, 256
BAD = [N, 1 << 40, -1, N + 7]            # one past the end, far away, negative, further

def canaried(shape):
    """A float32 array inside a block with canaries (7.0) on both sides."""
    n = int(np.prod(shape))
    block = np.full(n + 2 * PAD, 7.0, np.float32)
    view = block[PAD:PAD + n].reshape(shape)
    view[...] = 0.0
    return block, view

blocks = []
if mutator == "process":
    from multiprocessing import shared_memory
    shm = shared_memory.SharedMemory(create=True, size=(K + 1) * 8)
    shared = np.ndarray(K + 1, np.int64, buffer=shm.buf)  # K rows, then the writer's flag
    shared[K] = 0
    rows = shared[:K]
else:
    rows = np.empty(K, np.int64)
rows[:] = np.arange(1, K + 1)             # rows 1..K-1, and the flipped one (K or bad)
rows[-1] = K
values = np.ones((K, D), np.float32)

if entry == "adam_step_rows":
    block, table = canaried((N, D)); blocks.append(block)
    state = []
    for _ in range(2):
        b, s = canaried((N, D)); blocks.append(b); state.append(s)
    step_count = [0]
    def step():
        step_count[0] += 1
        fastadam.adam_step_rows(table, values, rows, state[0], state[1], step=step_count[0],
                                num_threads=2)
elif entry == "Adam.step":
    block, table = canaried((N, D)); blocks.append(block)
    opt = fastadam.Adam([table], num_threads=2)
    def step():
        opt.step([(rows, values)])
elif entry == "torch":
    import torch
    import fastadam.torch
    big = torch.full((N + 2 * PAD // D, D), 7.0)
    p = torch.nn.Parameter(big[PAD // D:PAD // D + N])
    p.data.zero_()
    blocks.append(big.numpy().reshape(-1))
    p.grad = torch.sparse_coo_tensor(torch.from_numpy(rows).view(1, K), torch.from_numpy(values),
                                     (N, D))
    assert p.grad._indices().data_ptr() == rows.ctypes.data, "torch copied the indices"
    table = p.detach().numpy()
    opt = fastadam.torch.Adam([p], num_threads=2)
    def step():
        opt.step()

stop = threading.Event()
if mutator == "thread":
    sys.setswitchinterval(1e-6)           # hand the GIL over as often as CPython can
    def flip():  # one store per iteration: CPython switches threads at the loop's end
        i = 0
        while not stop.is_set():
            rows[-1] = BAD[(i // 2) % len(BAD)] if i % 2 else K
            i += 1
    flipper = threading.Thread(target=flip)
    flipper.start()
else:
    writer = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, numpy as np\n"
        "from multiprocessing import resource_tracker, shared_memory\n"
        "shm = shared_memory.SharedMemory(name=sys.argv[1])\n"
        "resource_tracker.unregister(shm._name, 'shared_memory')  # (the creator unlinks it)\n"
        "shared = np.ndarray(%d + 1, np.int64, buffer=shm.buf)\n"
        "shared[-1] = 1  # running\n"
        "bad = %r\n"
        "while shared[-1] == 1 and os.getppid() == %d:  # (ends if the worker dies)\n"
        "    for b in bad:\n"
        "        shared[%d - 1] = b\n"
        "        shared[%d - 1] = %d\n"
        "del shared\n"
        "shm.close()\n") % (K, BAD, os.getpid(), K, K, K), shm.name])
    started = time.monotonic()
    while shared[K] != 1 and time.monotonic() < started + 60:
        time.sleep(0.01)

applied = rejected = 0
messages = set()
deadline = time.monotonic() + seconds
try:
    while time.monotonic() < deadline:
        try:
            step()
            applied += 1
        except ValueError as exc:
            rejected += 1
            messages.add(str(exc).split(" got ")[0])
finally:
    if mutator == "thread":
        stop.set()
        flipper.join()
    else:
        shared[K] = 2
        writer.wait(timeout=30)

canaries = all(bool((b[:PAD] == 7.0).all() and (b[-PAD:] == 7.0).all()) for b in blocks)
untouched = bool((table[K + 1:] == 0.0).all()) and bool((table[0] == 0.0).all())
print(json.dumps({"applied": applied, "rejected": rejected, "messages": sorted(messages),
                  "canaries": canaries, "untouched": untouched}))
if mutator == "process":
    del rows, shared
    shm.close()
    shm.unlink()
'''


@pytest.mark.parametrize("entry, mutator", [
    ("adam_step_rows", "thread"), ("adam_step_rows", "process"),
    ("Adam.step", "thread"), ("Adam.step", "process"), ("torch", "thread"),
])
def test_indices_mutated_by_another_thread_during_steps(entry, mutator):
    if entry == "torch":
        pytest.importorskip("torch")
    import subprocess

    seconds = 2.0
    worker = subprocess.Popen([sys.executable, "-c", MUTATION_WORKER, entry, mutator, str(seconds)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = worker.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        worker.kill()
        stdout, stderr = worker.communicate()
        pytest.fail(f"the worker hung (heap corruption?) for 120 s: {stderr[-3000:]}")
    assert worker.returncode == 0, (f"the worker died (exit {worker.returncode}): a step used an "
                                    f"index it had not checked\n{stderr[-3000:]}")
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["canaries"], report       # nothing written around the table or its state
    assert report["untouched"], report      # only the valid rows 1..K moved
    # both outcomes happened: the index really changed while steps ran
    assert report["applied"] > 0 and report["rejected"] > 0, report
    assert all("rows" in m and "must be in [0, 64)" in m for m in report["messages"]), report
