# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, nonecheck=False, embedsignature=True
"""The compiled core of fastadam._engine: an optimizer's tensors as one C table.

fastadam._engine keeps the bookkeeping (tensors, state blocks, step counts) in Python
objects and builds an ``AdamTable`` over them whenever they change; a step then costs one
call into this module, which sets the gradients' pointers, fills each record's
coefficients and runs every tensor through fastadam._kernels on one OpenMP team.
"""

from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, free, malloc

cimport numpy as cnp

from fastadam._adam_types cimport ELEM_BF16, ELEM_F32, NUMERICS_TORCH, AdamTensor
from fastadam._kernels cimport (
    Hyper,
    RowUpdate,
    count_nonfinite_grads,
    count_nonfinite_rows,
    element_size,
    element_type,
    fill_coefficients,
    hyper_from_record,
    rounding_key,
    run_rows,
    run_tensors,
)

cnp.import_array()


# What a tensor is in the current pass.
cdef enum:
    INACTIVE = 0
    DENSE = 1
    SPARSE = 2

# The largest step count: int64, as in optimizer state and in PyTorch.
cdef int64_t MAX_STEP = 0x7fffffffffffffff


cdef inline size_t _nbytes(const AdamTensor* t, int of_type) noexcept nogil:
    return <size_t>t.size * element_size(of_type)


cdef inline bint _follows(const AdamTensor* t, const AdamTensor* previous) noexcept nogil:
    """Are t's buffers of the same types as previous's, and do they start exactly where
    previous's end?"""
    cdef size_t param_gap = _nbytes(previous, previous.param_type)
    cdef size_t state_gap = _nbytes(previous, previous.state_type)
    cdef size_t model_gap = _nbytes(previous, previous.model_type)
    if (t.param_type != previous.param_type or t.grad_type != previous.grad_type
            or t.state_type != previous.state_type or t.model_type != previous.model_type
            or (previous.max_exp_avg_sq == NULL) != (t.max_exp_avg_sq == NULL)
            or (previous.model_param == NULL) != (t.model_param == NULL)):
        return False
    return (t.param == previous.param + param_gap and t.exp_avg == previous.exp_avg + state_gap
            and t.exp_avg_sq == previous.exp_avg_sq + state_gap
            and (t.max_exp_avg_sq == NULL
                 or t.max_exp_avg_sq == previous.max_exp_avg_sq + state_gap)
            and (t.model_param == NULL
                 or t.model_param == previous.model_param + model_gap))


cdef inline char* _data(object array) except? NULL:
    return <char*>cnp.PyArray_DATA(<cnp.ndarray?>array)


cdef class AdamTable:
    """Tensors as one C table, stepped in one pass: the compiled core of fastadam._engine.

    Holds, per tensor, the pointers of param and state, its group and (in the int64
    array ``steps``, owned by the engine) its step count. A step sets the gradients'
    pointers (``step`` from validated arrays, ``step_pointers`` from addresses a front
    end's compiled gather checked), builds the pass's records, fills per-record
    coefficients from each group's Hyperparameters record, releases the GIL once and
    runs every active tensor of every group through one OpenMP team. A tensor whose
    gradient is None (or address 0) is inactive this pass: untouched, its step count
    unchanged (torch skips parameters without a gradient).

    Element types: each tensor's param, gradient and state have their own (validated)
    types. A tensor with a float32 master copy (``masters[i]``) is updated in the
    master, and its registered param (16-bit: the model's copy) is written in the same
    pass. With ``rounding_seed`` (an int), bfloat16 params are rounded stochastically,
    each tensor with its own stream per step (rounding_key: seed, step, tensor index).

    Runs: consecutive tensors of one group and dtype whose params lie back to back in
    memory, and whose states do too (the engine allocates a group's state as one block),
    form a run. When a step's gradients for a run also lie back to back (as
    fastadam.FlatParams lays them out) and the run's step counts agree, the run is
    updated as ONE tensor: one long stream instead of many short loops. Only memory
    that belongs to the tensors is touched either way (runs have no gaps).

    Row-sparse gradients: a gradient given as a tuple ``(rows, values)`` (int64 rows
    owned by fastadam, unique and in range; values of those rows, contiguous: validated)
    makes its tensor a ``RowUpdate`` of this pass instead of a record: only those rows
    and their moments change, with the tensor's step count and group coefficients. Its
    step count still advances by one (TensorFlow's LazyAdam and PyTorch's SparseAdam).
    """
    cdef AdamTensor* tensors      # one record per tensor (grad pointers set per step)
    cdef AdamTensor* records      # what a step runs: whole runs, or single tensors
    cdef Py_ssize_t* record_first  # the tensor each record starts with
    cdef Py_ssize_t n_records
    cdef Py_ssize_t n
    cdef Py_ssize_t* run_stop     # at a run's first tensor: one past its last tensor
    cdef Py_ssize_t* group_of
    cdef Py_ssize_t n_groups
    cdef int64_t* steps
    cdef float* float_steps       # NULL, or a float32 mirror of steps (torch's state["step"])
    cdef RowUpdate* row_updates   # this pass's row-sparse tensors
    cdef Py_ssize_t* row_update_of  # the tensor of each row update
    cdef Py_ssize_t n_row_updates
    cdef unsigned char* kind      # per tensor, this pass: INACTIVE, DENSE or SPARSE
    cdef list params              # the params as given (N-d), for shape checks
    cdef object keep_alive
    cdef bint stochastic          # bfloat16 params are rounded stochastically
    cdef int64_t rounding_seed

    def __cinit__(self, list params, list exp_avgs, list exp_avg_sqs, list max_exp_avg_sqs,
                  cnp.ndarray steps, list group_of, float_steps=None, list masters=None,
                  rounding_seed=None):
        cdef Py_ssize_t i, n = len(params)
        cdef AdamTensor* t
        if masters is None:
            masters = [None] * n
        if not (len(exp_avgs) == len(exp_avg_sqs) == len(max_exp_avg_sqs) == len(group_of) == n
                and len(masters) == n
                and cnp.PyArray_TYPE(steps) == cnp.NPY_INT64 and cnp.PyArray_SIZE(steps) == n
                and cnp.PyArray_IS_C_CONTIGUOUS(steps)):
            raise ValueError("AdamTable: one state, step count and group per param")
        if float_steps is not None and not (
                cnp.PyArray_TYPE(<cnp.ndarray?>float_steps) == cnp.NPY_FLOAT
                and cnp.PyArray_SIZE(float_steps) == n
                and cnp.PyArray_IS_C_CONTIGUOUS(float_steps)):
            raise ValueError("AdamTable: float_steps must be a float32 array of one per param")
        self.n = n
        self.tensors = <AdamTensor*>calloc(max(n, 1), sizeof(AdamTensor))
        self.records = <AdamTensor*>calloc(max(n, 1), sizeof(AdamTensor))
        self.record_first = <Py_ssize_t*>malloc(max(n, 1) * sizeof(Py_ssize_t))
        self.run_stop = <Py_ssize_t*>malloc(max(n, 1) * sizeof(Py_ssize_t))
        self.group_of = <Py_ssize_t*>malloc(max(n, 1) * sizeof(Py_ssize_t))
        self.row_updates = <RowUpdate*>calloc(max(n, 1), sizeof(RowUpdate))
        self.row_update_of = <Py_ssize_t*>malloc(max(n, 1) * sizeof(Py_ssize_t))
        self.kind = <unsigned char*>calloc(max(n, 1), sizeof(unsigned char))
        if (self.tensors == NULL or self.records == NULL or self.record_first == NULL
                or self.run_stop == NULL or self.group_of == NULL or self.row_updates == NULL
                or self.row_update_of == NULL or self.kind == NULL):
            raise MemoryError()
        self.n_row_updates = 0
        self.n_groups = 0
        for i in range(n):
            t = &self.tensors[i]
            t.size = cnp.PyArray_SIZE(<cnp.ndarray?>params[i])
            if masters[i] is None:
                t.param = _data(params[i])
                t.param_type = element_type(params[i])
                t.model_param = NULL
                t.model_type = ELEM_F32
            else:  # the engine's master copy is what Adam updates; the param is the model's
                t.param = _data(masters[i])
                t.param_type = element_type(masters[i])
                t.model_param = _data(params[i])
                t.model_type = element_type(params[i])
            t.grad_type = element_type(params[i])  # gradients come in the model's type
            t.state_type = element_type(exp_avgs[i])
            t.exp_avg = _data(exp_avgs[i])
            t.exp_avg_sq = _data(exp_avg_sqs[i])
            t.max_exp_avg_sq = NULL if max_exp_avg_sqs[i] is None else _data(max_exp_avg_sqs[i])
            self.group_of[i] = group_of[i]
            self.n_groups = max(self.n_groups, self.group_of[i] + 1)
        self._find_runs()
        self.steps = <int64_t*>cnp.PyArray_DATA(steps)
        self.float_steps = NULL if float_steps is None else <float*>cnp.PyArray_DATA(float_steps)
        self.params = params
        self.keep_alive = (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, float_steps, masters)
        self.stochastic = rounding_seed is not None
        self.rounding_seed = 0 if rounding_seed is None else rounding_seed

    def __dealloc__(self):
        free(self.tensors)
        free(self.records)
        free(self.record_first)
        free(self.run_stop)
        free(self.group_of)
        free(self.row_updates)
        free(self.row_update_of)
        free(self.kind)

    cdef void _find_runs(self):
        cdef Py_ssize_t i = 0, j
        while i < self.n:
            j = i + 1
            while (j < self.n and self.group_of[j] == self.group_of[i]
                   and _follows(&self.tensors[j], &self.tensors[j - 1])):
                j += 1
            self.run_stop[i] = j
            i = j

    def runs(self):
        """[(first, stop), ...]: the runs of tensors (see the class docstring)."""
        result, i = [], 0
        while i < self.n:
            result.append((i, self.run_stop[i]))
            i = self.run_stop[i]
        return result

    @property
    def records_in_last_pass(self):
        """How many records (whole runs or single tensors) the last pass ran."""
        return self.n_records

    cdef int _set_grads(self, list grads) except -1:
        """This pass's gradients from validated objects: None, arrays, (rows, values)."""
        cdef Py_ssize_t i
        if len(grads) != self.n:
            raise ValueError(f"expected {self.n} gradients, got {len(grads)}")
        self.n_row_updates = 0
        for i in range(self.n):
            grad = grads[i]
            if grad is None:
                self.kind[i] = INACTIVE
            elif type(grad) is tuple:
                self.kind[i] = SPARSE
                self._add_row_update(i, grad[0], grad[1])
            else:
                self.kind[i] = DENSE
                self.tensors[i].grad = _data(grad)
                self.tensors[i].grad_type = element_type(grad)
        return 0

    cdef int _set_grad_pointers(self, const int64_t[::1] addresses) except -1:
        """This pass's gradients from addresses (0: none) that a front end's compiled
        gather took from gradients it checked against each param's dtype and size."""
        cdef Py_ssize_t i
        if addresses.shape[0] != self.n:
            raise ValueError(f"expected {self.n} gradient addresses, got {addresses.shape[0]}")
        self.n_row_updates = 0
        for i in range(self.n):
            self.kind[i] = DENSE if addresses[i] != 0 else INACTIVE
            self.tensors[i].grad = <const char*><size_t>addresses[i]
            # of the model param's type (the gather checked)
            self.tensors[i].grad_type = (self.tensors[i].param_type
                                         if self.tensors[i].model_param == NULL
                                         else self.tensors[i].model_type)
        return 0

    cdef void _build_records(self, const Hyper* hyper) noexcept:
        """Each run as one record if all its gradients are dense and lie back to back and
        its step counts agree, else its dense tensors one by one. Never merged under the
        torch numerics profile (``hyper`` given): torch treats each tensor's last
        elements apart (its scalar tail), so a tensor's end must stay a record's end; nor
        with stochastic rounding of bfloat16 params, whose random bits are per tensor."""
        cdef Py_ssize_t i = 0, k, stop
        cdef bint merge
        self.n_records = 0
        while i < self.n:
            stop = self.run_stop[i]
            merge = (stop - i > 1 and self.kind[i] == DENSE
                     and (hyper == NULL or hyper[self.group_of[i]].numerics != NUMERICS_TORCH)
                     and not (self.stochastic and self.tensors[i].param_type == ELEM_BF16))
            k = i + 1
            while merge and k < stop:
                merge = (self.kind[k] == DENSE and self.steps[k] == self.steps[i] and
                         self.tensors[k].grad == self.tensors[k - 1].grad
                         + _nbytes(&self.tensors[k - 1], self.tensors[k - 1].grad_type))
                k += 1
            if merge:
                self.records[self.n_records] = self.tensors[i]
                self.record_first[self.n_records] = i
                for k in range(i + 1, stop):
                    self.records[self.n_records].size += self.tensors[k].size
                self.n_records += 1
            else:
                for k in range(i, stop):
                    if self.kind[k] != DENSE:
                        continue
                    self.records[self.n_records] = self.tensors[k]
                    self.record_first[self.n_records] = k
                    self.n_records += 1
            i = stop

    cdef int _add_row_update(self, Py_ssize_t i, object rows, object values) except -1:
        cdef RowUpdate* u = &self.row_updates[self.n_row_updates]
        cdef cnp.ndarray param = <cnp.ndarray>self.params[i]
        u.tensor = self.tensors[i]
        u.tensor.grad = _data(values)
        u.tensor.grad_type = element_type(values)
        u.rows = <const int64_t*>_data(rows)
        u.n_rows = cnp.PyArray_SIZE(<cnp.ndarray?>rows)
        # (row-sparse gradients are validated to have a param of at least one axis)
        u.row_size = u.tensor.size // param.shape[0] if param.shape[0] else 0
        self.row_update_of[self.n_row_updates] = i
        self.n_row_updates += 1
        return 0

    cdef Py_ssize_t _count_nonfinite(self, int num_threads) except -2:
        cdef Py_ssize_t bad, more, k = 0
        self._build_records(NULL)
        with nogil:
            bad = count_nonfinite_grads(self.records, self.n_records, num_threads)
            while bad >= 0 and k < self.n_row_updates:
                more = count_nonfinite_rows(&self.row_updates[k], num_threads)
                bad = -1 if more < 0 else bad + more
                k += 1
        if bad < 0:
            raise MemoryError("fastadam: could not allocate the chunk table")
        return bad

    def count_nonfinite(self, list grads, int num_threads):
        """How many elements of the (validated) gradients are NaN or Inf."""
        self._set_grads(grads)
        return self._count_nonfinite(num_threads)

    def count_nonfinite_pointers(self, const int64_t[::1] addresses, int num_threads):
        """count_nonfinite for gradients given by checked addresses (0: none)."""
        self._set_grad_pointers(addresses)
        return self._count_nonfinite(num_threads)

    def active_elements(self):
        """Param elements the last gradients set reach (dense tensors whole, row-sparse
        ones their rows): the work that decides the team size."""
        cdef Py_ssize_t i, total = 0
        for i in range(self.n):
            if self.kind[i] == DENSE:
                total += self.tensors[i].size
        for i in range(self.n_row_updates):
            total += self.row_updates[i].n_rows * self.row_updates[i].row_size
        return total

    def step(self, list grads, list hypers, double grad_scale, int num_threads):
        """One Adam step of every tensor with a gradient. ``hypers``: one validated
        Hyperparameters record per group; ``grads``: validated and conforming (None,
        dense arrays, or (rows, values) tuples: see the class docstring)."""
        self._set_grads(grads)
        self._step(hypers, grad_scale, num_threads)

    def step_pointers(self, const int64_t[::1] addresses, list hypers, double grad_scale,
                      int num_threads):
        """``step`` with dense gradients given by checked addresses (0: no gradient)."""
        self._set_grad_pointers(addresses)
        self._step(hypers, grad_scale, num_threads)

    cdef int _step(self, list hypers, double grad_scale, int num_threads) except -1:
        cdef Py_ssize_t i, k, first, previous = -1
        cdef int status
        cdef AdamTensor* r
        cdef Hyper* hyper
        if len(hypers) < self.n_groups:  # never index past the groups given
            raise ValueError(f"expected hyperparameters for {self.n_groups} groups, "
                             f"got {len(hypers)}")
        hyper = <Hyper*>malloc(max(self.n_groups, 1) * sizeof(Hyper))
        if hyper == NULL:
            raise MemoryError()
        try:
            for k in range(self.n_groups):
                hyper_from_record(&hyper[k], hypers[k])
            for i in range(self.n):  # the engine's duty, kept as a guard: never a NULL buffer
                if self.kind[i] != INACTIVE and hyper[self.group_of[i]].amsgrad and (
                        self.tensors[i].max_exp_avg_sq == NULL):
                    raise ValueError(f"tensor {i} uses amsgrad but has no max_exp_avg_sq")
                if self.kind[i] != INACTIVE and self.steps[i] >= MAX_STEP:
                    raise ValueError(f"the step count of tensor {i} is {self.steps[i]}, the "
                                     "largest an int64 holds: it cannot advance")
            self._build_records(hyper)
            for k in range(self.n_records):
                r = &self.records[k]
                first = self.record_first[k]  # its group and step count are the record's
                if (previous >= 0 and self.group_of[first] == self.group_of[previous]
                        and self.steps[first] == self.steps[previous]):
                    r.coef = self.records[k - 1].coef  # the usual case: once per group
                else:
                    fill_coefficients(&r.coef, &hyper[self.group_of[first]],
                                      <double>(self.steps[first] + 1), grad_scale)
                previous = first
                r.stochastic = self.stochastic and r.param_type == ELEM_BF16
                r.rounding_key = (rounding_key(self.rounding_seed, self.steps[first] + 1, first)
                                  if r.stochastic else 0)
            for k in range(self.n_row_updates):
                first = self.row_update_of[k]
                fill_coefficients(&self.row_updates[k].tensor.coef, &hyper[self.group_of[first]],
                                  <double>(self.steps[first] + 1), grad_scale)
                self.row_updates[k].tensor.stochastic = (
                    self.stochastic and self.row_updates[k].tensor.param_type == ELEM_BF16)
                self.row_updates[k].tensor.rounding_key = rounding_key(
                    self.rounding_seed, self.steps[first] + 1, first)
            with nogil:
                status = run_tensors(self.records, self.n_records, num_threads)
                if status == 0:
                    for k in range(self.n_row_updates):
                        run_rows(&self.row_updates[k], num_threads)
            if status != 0:
                raise MemoryError("fastadam: could not allocate the chunk table")
            for i in range(self.n):  # no Python code runs between the update and here
                if self.kind[i] != INACTIVE:
                    self.steps[i] += 1
                    if self.float_steps != NULL:
                        self.float_steps[i] = <float>self.steps[i]
        finally:
            free(hyper)
        return 0
