# The C-level interface of fastadam._kernels, cimported by the engine's compiled core
# (fastadam._table): the hyperparameter struct, the row-update record and the functions
# that run a table of tensor records on one OpenMP team. Pointers and sizes only: the
# callers hand in validated memory.

from libc.stdint cimport int64_t, uint64_t

from fastadam._adam_types cimport ELEM_F32, ELEM_F64, AdamTensor, Coefficients


cdef struct Hyper:
    # One update's hyperparameters: the validated fastadam._validation.Hyperparameters
    # record, read into C once by hyper_from_record (the only place that knows its fields).
    double lr, beta1, beta2, eps, weight_decay, eps_root
    bint decoupled_weight_decay, amsgrad, maximize, eps_hat
    int numerics            # NUMERICS_* (_adam_types.pxd)


cdef struct RowUpdate:
    # One tensor's lazy row update. ``tensor`` has the whole tensor's param and state
    # pointers and the step's coefficients; its grad points at n_rows gradient rows of
    # row_size elements, row i of them for tensor row rows[i] (unique and in range:
    # checked in fastadam's own copy, duplicates already summed).
    AdamTensor tensor
    const int64_t* rows     # IN
    Py_ssize_t n_rows
    Py_ssize_t row_size


cdef int hyper_from_record(Hyper* h, object record) except -1
cdef void fill_coefficients(Coefficients* c, const Hyper* h, double step,
                            double grad_scale) noexcept nogil
cdef int run_tensors(const AdamTensor* tensors, Py_ssize_t n_tensors,
                     int num_threads) noexcept nogil
cdef Py_ssize_t count_nonfinite_grads(const AdamTensor* tensors, Py_ssize_t n_tensors,
                                      int num_threads) noexcept nogil
cdef void run_rows(const RowUpdate* u, int num_threads) noexcept nogil
cdef Py_ssize_t count_nonfinite_rows(const RowUpdate* u, int num_threads) noexcept nogil
cdef int element_type(object array) except -1
cdef int fill_buffers(AdamTensor* t, object param, object grad, object exp_avg,
                      object exp_avg_sq, object max_exp_avg_sq, object model_param) except -1
cdef uint64_t rounding_key(int64_t seed, int64_t step, Py_ssize_t tensor) noexcept nogil


cdef inline size_t element_size(int element_type) noexcept nogil:
    """Bytes per element of an ELEM_* type."""
    if element_type == ELEM_F64:
        return 8
    return 4 if element_type == ELEM_F32 else 2
