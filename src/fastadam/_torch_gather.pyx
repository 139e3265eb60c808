# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, nonecheck=False, embedsignature=True
"""fastadam.torch's per-step work over its parameters, in one compiled loop.

A step of ``fastadam.torch.Adam`` must find every parameter's gradient, check it (a
dense CPU tensor of the parameter's dtype, shape and strides), check that the parameter
still lives where the engine holds it, and take the gradient's address. In Python that
is about a microsecond per tensor; here it is a handful of reads through torch's own
getters and methods, looked up once per type, with the comparisons in C. Built without
torch: tensors are reached through their Python types, so any torch version works.
(``opt.state``'s entries are not read here: fastadam.torch counts their edits.)

The gradients' layouts are checked in one further call where torch offers one
(:func:`torch_layout_guards`: Dynamo's compiled tensor guards, built from the gradients of
the last step that passed the per-tensor checks): about 50 ns a tensor, where reading
dtype, device, shape and contiguity through torch's getters costs about 300.

Anything this loop does not recognise (a sparse or foreign gradient, a parameter whose
storage moved) stops it; ``fastadam.torch`` then takes its
general path for that step, which handles or refuses every case with a clear error.
"""

from inspect import getattr_static

from libc.stdint cimport int64_t, uint8_t
from libc.string cimport memcmp

cimport numpy as cnp

cnp.import_array()

# The address handed over for a gradient without elements: its data_ptr() is 0, which
# the engine reads as "no gradient", yet its step counts (as torch's does; FSDP2 gives
# the ranks past a small parameter's last row empty shards). Nothing is read from it.
cdef double _empty_grad[8]

cdef extern from *:
    """
    /* An attribute read through the descriptor found once for the object's type (what
       obj.name does after its lookup through the type's MRO and the instance dict, which
       a data descriptor such as torch's getsets takes precedence over), and a method
       called with only self (obj.name() without the bound method). */
    static PyObject* fa_descriptor_get(PyObject* descriptor, PyObject* obj) {
        return Py_TYPE(descriptor)->tp_descr_get(descriptor, obj, (PyObject*)Py_TYPE(obj));
    }
    static PyObject* fa_call_method(PyObject* method, PyObject* self) {
        return PyObject_Vectorcall(method, &self, 1, NULL);
    }
    """
    object fa_descriptor_get(object descriptor, object obj)
    object fa_call_method(object method, object self)


cdef class _Reader:
    """A tensor type's ``grad``, ``dtype``, ``is_cpu`` and ``shape`` getters and its
    ``data_ptr``, ``stride``, ``is_contiguous``, ``is_neg`` and ``is_conj`` methods,
    looked up once: a step reads them for every tensor, and the lookups cost more than
    the reads. Only data descriptors are taken (they win over an instance's own
    attributes); a type that defines any of these otherwise is read by plain attribute
    access."""
    cdef readonly object type
    cdef object grad, dtype, is_cpu, shape, data_ptr, stride, is_contiguous, is_neg, is_conj
    cdef bint direct

    def __init__(self, tensor_type):
        self.type = tensor_type
        found = [getattr_static(tensor_type, name, None) for name in
                 ("grad", "dtype", "is_cpu", "shape", "data_ptr", "stride", "is_contiguous",
                  "is_neg", "is_conj")]
        self.direct = (all(hasattr(type(d), "__set__") for d in found[:4])
                       and all(type(d).__name__ == "method_descriptor" for d in found[4:]))
        (self.grad, self.dtype, self.is_cpu, self.shape,
         self.data_ptr, self.stride, self.is_contiguous, self.is_neg, self.is_conj) = found

    cdef inline object get_grad(self, p):
        return fa_descriptor_get(self.grad, p) if self.direct else p.grad

    cdef inline int64_t address(self, t) except? -1:
        return fa_call_method(self.data_ptr, t) if self.direct else t.data_ptr()

    cdef inline bint same_layout(self, g, dtype, shape, strides, bint contiguous) except -1:
        """Is g a CPU tensor of this dtype and shape, laid out with these strides
        (``contiguous``: the strides are the shape's contiguous ones), whose memory holds
        its values (no negative or conjugate view: those are resolved by a copy)?"""
        if not self.direct:
            return (g.dtype is dtype and g.is_cpu and g.shape == shape
                    and (g.is_contiguous() if contiguous else g.stride() == strides)
                    and not g.is_neg() and not g.is_conj())
        if fa_descriptor_get(self.dtype, g) is not dtype or not fa_descriptor_get(self.is_cpu, g):
            return False
        if fa_descriptor_get(self.shape, g) != shape:
            return False
        if not (fa_call_method(self.is_contiguous, g) if contiguous
                else fa_call_method(self.stride, g) == strides):
            return False
        return not fa_call_method(self.is_neg, g) and not fa_call_method(self.is_conj, g)


cdef class Gather:
    """The cached facts of the engine's tensors, in engine order: each parameter, its
    address, dtype, shape and strides (and whether they are contiguous ones), and its
    element count; and a check of a whole step's gradient layouts in one call, once a
    step's gradients have passed the per-tensor checks."""
    cdef list params
    cdef list param_readers
    cdef list dtypes
    cdef list shapes
    cdef list strides
    cdef list contiguous
    cdef int64_t[::1] addresses
    cdef int64_t[::1] sizes
    cdef _Reader grad_reader
    cdef object make_layout_check  # gradients -> check(*gradients) -> bool, or None
    cdef object layout_check  # built from the gradients of a step that passed
    cdef uint8_t[::1] checked_present  # which tensors had a gradient in that step
    cdef uint8_t[::1] present
    cdef int wasted_builds  # one-call checks built and missed at the next step, in a row

    def __init__(self, list params, list dtypes, list shapes, list strides, addresses, sizes,
                 tensor_type, make_layout_check=None):
        self.params = params
        readers = {kind: _Reader(kind) for kind in {type(p) for p in params}}  # (nn.Parameter...)
        self.param_readers = [readers[type(p)] for p in params]
        self.dtypes = dtypes
        self.shapes = shapes
        self.strides = strides
        self.contiguous = [_is_contiguous(tuple(shape), tuple(stride))
                           for shape, stride in zip(shapes, strides)]
        self.addresses = addresses
        self.sizes = sizes
        self.grad_reader = _Reader(tensor_type)
        self.make_layout_check = make_layout_check
        self.layout_check = None
        self.checked_present = bytearray(len(params))
        self.present = bytearray(len(params))
        self.wasted_builds = 0

    def run(self, int64_t[::1] out, list grads=None):
        """Fill ``out[i]`` with tensor i's gradient address (0 without a gradient): its
        ``.grad``, or ``grads[i]`` when a list is given (Keras hands gradients over).

        Returns (the index of a tensor this loop cannot take, or -1 when it takes them
        all; the elements of the tensors with a gradient, when it does)."""
        cdef Py_ssize_t i, n = len(self.params)
        cdef Py_ssize_t active = 0
        cdef _Reader reader, grad_reader = self.grad_reader
        if grads is not None and len(grads) != n:
            return 0, 0
        cdef list found = []
        for i in range(n):
            p = self.params[i]
            reader = self.param_readers[i]
            if type(p) is not reader.type:  # its class was swapped: the general path
                return i, active
            g = reader.get_grad(p) if grads is None else grads[i]
            self.present[i] = g is not None
            if g is None:
                out[i] = 0
                continue
            if type(g) is not grad_reader.type:
                return i, active
            try:
                if reader.address(p) != self.addresses[i]:
                    return i, active
                out[i] = grad_reader.address(g)  # used only once its layout is checked
            except Exception:  # a sparse gradient has no data pointer: the general path
                return i, active
            if out[i] == 0:
                out[i] = <int64_t><size_t>&_empty_grad[0]
            found.append(g)
            active += self.sizes[i]
        if not self._layouts_as_checked(found):
            i = self._check_layouts(found)
            if i >= 0:
                return i, active
        return -1, active

    cdef bint _layouts_as_checked(self, list found) except -1:
        """Do the gradients have the layouts of those of the last step that passed, with
        the same tensors having one? (one call of torch's compiled check)"""
        cdef Py_ssize_t n = self.present.shape[0]
        if self.layout_check is None or (n and memcmp(
                &self.present[0], &self.checked_present[0], n) != 0):
            return False
        try:
            if self.layout_check(*found):
                self.wasted_builds = 0
                return True
            return False
        except Exception:  # torch's private check failed on something: not used again
            self._stop_checking_in_one_call()
            return False

    cdef Py_ssize_t _check_layouts(self, list found) except -2:
        """Check each gradient against its tensor's layout through torch's getters: the
        index of the first that differs, or -1 (and the gradients become the model of
        the one-call check)."""
        cdef Py_ssize_t i, k = 0, n = len(self.params)
        for i in range(n):
            if not self.present[i]:
                continue
            try:
                if not self.grad_reader.same_layout(found[k], self.dtypes[i], self.shapes[i],
                                                    self.strides[i], self.contiguous[i]):
                    return i
            except Exception:
                return i
            k += 1
        self._build_layout_check(found)
        return -1

    cdef int _build_layout_check(self, list found) except -1:
        """The one-call check of gradients laid out as these, for the next steps. Where
        it keeps missing (a different set of tensors has gradients at every step, or one
        gradient is shared by two parameters, which torch's check refuses), building it
        costs more than it saves: after a few misses in a row it is no longer built."""
        if self.layout_check is not None:
            self.wasted_builds += 1
        self.layout_check = None
        if self.make_layout_check is None or self.wasted_builds >= _MOST_WASTED_BUILDS:
            return 0
        try:
            self.layout_check = self.make_layout_check(found)
        except Exception:
            self._stop_checking_in_one_call()
            return 0
        self.checked_present[:] = self.present
        return 0

    cdef void _stop_checking_in_one_call(self):
        self.make_layout_check = None
        self.layout_check = None


cdef enum:
    _MOST_WASTED_BUILDS = 3


cdef bint _is_contiguous(tuple shape, tuple strides):
    """Are these the strides of a contiguous tensor of this shape (those of dimensions
    of size 1 aside, as torch's is_contiguous() has it)? Then a gradient's own
    is_contiguous() stands for comparing its strides."""
    cdef Py_ssize_t expected = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def torch_layout_guards():
    """torch's compiled check of many tensors' layouts in one call, as a maker for
    :class:`Gather` (tensors -> check(*tensors) -> bool), or None where this torch has
    none that checks what the gather needs.

    Dynamo's ``TensorGuards`` compares each tensor's exact type, dispatch keys (device
    type, layout, conj/neg bits), dtype, device index, requires_grad, sizes and strides
    with those of the tensors it was built from. It is private to torch, so it is used
    only after it is seen to accept and refuse as expected here."""
    global _torch_layout_guards
    if _torch_layout_guards is _UNPROBED:
        _torch_layout_guards = _probe_torch_layout_guards()
    return _torch_layout_guards


_UNPROBED = object()
_torch_layout_guards = _UNPROBED


def _probe_torch_layout_guards():
    try:
        import torch
        from torch._C._dynamo.guards import TensorGuards
    except Exception:  # no torch, or a torch without Dynamo's guards
        return None

    def make(tensors):
        return TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                            dynamic_dims_strides=[list(t.stride()) for t in tensors]).check

    try:
        with torch.no_grad():
            check = make([torch.zeros(2, 3), torch.zeros(4)])
            same = check(torch.ones(2, 3), torch.ones(4))
            others = [(torch.ones(3, 2), torch.ones(4)), (torch.ones(2, 3), torch.ones(5)),
                      (torch.ones(2, 3, dtype=torch.float64), torch.ones(4)),
                      (torch.ones(3, 2).t(), torch.ones(4)),
                      (torch.ones(2, 3), torch.ones(8)[::2]),
                      (torch.ones(2, 3).to_sparse(), torch.ones(4)),
                      (torch.nn.Parameter(torch.ones(2, 3)), torch.ones(4)),
                      (torch.ones(2, 3), torch.ones(4, device="meta")),
                      (torch.ones(2, 3), torch.ones(4)._neg_view())]
            complex_check = make([torch.zeros(2, dtype=torch.complex64)])
            same = same and complex_check(torch.ones(2, dtype=torch.complex64))
            conjugate = complex_check(torch.ones(2, dtype=torch.complex64).conj())
            if same and not conjugate and not any(check(*tensors) for tensors in others):
                return make
    except Exception:
        pass
    return None
