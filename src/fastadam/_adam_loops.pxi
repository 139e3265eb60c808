# The per-element loops of fastadam: included (textually) by _kernels.pyx, compiled for the
# baseline ISA, and by _kernels_avx2.pyx / _kernels_avx512.pyx, compiled with
# -march=x86-64-v3 / -march=x86-64-v4. Each of those modules exports run_chunk and
# count_nonfinite_chunk; fastadam._simd picks which module's functions the engine in
# _kernels.pyx calls (see the notes at the top of _kernels.pyx). Only C-level code here:
# no Python objects, nothing that raises.
#
# Loops marked "# vectorized: kernel loop" must vectorize at every level
# (.github/scripts/check_vectorization.py). The loops of the torch numerics profile call
# fma/fmaf: with -ffp-contract=off these are still the only FMAs, one instruction each at
# the avx2/avx512 levels (and vectorized there), and a correctly rounded libm call at the
# baseline, where they do not vectorize (the checker knows; the bits are the same).

from cpython.pycapsule cimport PyCapsule_New
from libc.math cimport fma, fmaf, sqrt, sqrtf
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memset
from cython cimport floating

from fastadam._adam_types cimport (
    ELEM_BF16,
    ELEM_F16,
    ELEM_F32,
    ELEM_F64,
    NUMERICS_EXACT,
    NUMERICS_FAST,
    NUMERICS_TORCH,
    AdamTensor,
)

cdef extern from "_convert.h" nogil:
    float fa_bf16_to_f32(uint16_t b)
    uint16_t fa_f32_to_bf16(float f, uint16_t nan_bits)
    float fa_f16_to_f32(uint16_t h)
    uint16_t fa_f32_to_f16(float f)
    uint16_t fa_f32_to_f16_keeping_nan_payload(float f)
    void fa_widen_f16(const uint16_t* bits, float* out, Py_ssize_t n)
    void fa_narrow_f16(const float* values, uint16_t* bits, Py_ssize_t n, int keep_nan_payload)
    uint32_t fa_mix32(uint32_t x)
    uint32_t fa_random16(uint32_t key, uint32_t index)
    uint16_t fa_f32_to_bf16_stochastic(float f, uint32_t random16)


# --- compile-time switches ------------------------------------------------------------
# Each pair is a fused type; Cython emits one _update per combination and drops the
# untaken side of every `if Tag is ...` test at compile time.

cdef struct Unscaled:       # g = grad * (+-1)
    char unused
cdef struct Scaled:         # g = grad / (+-grad_scale)
    char unused
ctypedef fused GradTag:
    Unscaled
    Scaled

cdef struct Decoupled:      # p = p * (1 - lr*wd), a factor of exactly 1 without decay
    char unused
cdef struct L2:             # g = g + wd * p
    char unused
ctypedef fused DecayTag:
    Decoupled
    L2

cdef struct SmallWeight:    # m = m + w * (g - m)           (w < 0.5)
    char unused
cdef struct LargeWeight:    # m = g - (g - m) * (1 - w)     (w >= 0.5)
    char unused
ctypedef fused LerpTag:
    SmallWeight
    LargeWeight

cdef struct PlainV:
    char unused
cdef struct MaxV:           # AMSGrad
    char unused
ctypedef fused MaxTag:
    PlainV
    MaxV

# How the buffers store their elements: as the math type itself (float32 or float64), or
# as bfloat16 widened on load and rounded to nearest even on store, in registers (_load,
# _store). Only tensors whose buffers are all bfloat16 take BF16Store. Float16 is not
# a StoreTag: GCC does not vectorize its conversions, and written as integer sequences
# they cost more than the rest of the update. The avx512 and avx2 levels update float16
# tensors, and avx512 bfloat16 ones where the CPU has AVX-512 BF16, in registers in a
# loop written with intrinsics (_vectors16.h, run_chunk: one conversion instruction per
# vector; master weights and stochastic rounding too); float16 at the baseline, mixed
# types and what that loop leaves go through float32 blocks (_run_staged).
cdef struct NativeStore:
    char unused
cdef struct BF16Store:
    char unused
ctypedef fused StoreTag:
    NativeStore
    BF16Store

cdef struct PaperForm:      # default and eps_hat, docs/design.md's order without FMA ("exact")
    char unused
cdef struct FastForm:       # numerics="fast": the paper form with one division, not two:
    # p + (step_coef * m) / (sqrt(v) * (1 / denom_div) + eps)
    char unused
cdef struct RootForm:       # eps_root > 0 (Optax)
    char unused
# numerics="torch": the paper (or eps_hat) form with the FMAs of torch's AVX2/AVX-512
# fused CPU Adam, found by experiment (docs/numerics-torch.md). torch's vector loops and
# its scalar tail (the last size % 8 float32 / size % 4 float64 elements of a tensor)
# fuse the second-moment update differently, so each has its own tag; the engine runs a
# tensor's tail elements through TorchTailForm (_by_form).
cdef struct TorchForm:      # g = fma(p, wd, g); m = fma(w, g - m, m) (or fma(w - 1, g - m, g));
    char unused             # v = fma((1 - beta2) * g, g, v * beta2)
cdef struct TorchTailForm:  # as TorchForm, but v = fma(v, beta2, ((1 - beta2) * g) * g),
    char unused             # and AMSGrad's max keeps vmax when v is NaN (as "exact" does)
ctypedef fused FormTag:
    PaperForm
    FastForm
    RootForm
    TorchForm
    TorchTailForm


# --- the per-element loop ---------------------------------------------------------------

cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef extern from *:
    """
    /* The NaN whose bits are all ones: what ATen's vector maximum() returns for a NaN. */
    static inline float fa_nan_all_ones_f(void) {
        union { uint32_t bits; float value; } x; x.bits = 0xffffffffu; return x.value;
    }
    static inline double fa_nan_all_ones_d(void) {
        union { uint64_t bits; double value; } x; x.bits = ~(uint64_t)0; return x.value;
    }
    """
    float fa_nan_all_ones_f() noexcept nogil
    double fa_nan_all_ones_d() noexcept nogil


cdef inline floating _nan_all_ones(floating like) noexcept nogil:
    if floating is float:
        return fa_nan_all_ones_f()
    else:
        return fa_nan_all_ones_d()


cdef inline floating _fma(floating a, floating b, floating c) noexcept nogil:
    """a * b + c, rounded once (an explicit FMA: the build forbids implicit ones)."""
    if floating is float:
        return fmaf(a, b, c)
    else:
        return fma(a, b, c)


cdef inline floating _load(const char* buffer, Py_ssize_t i, floating* math,
                           StoreTag* store) noexcept nogil:
    """Element i of a buffer, in the math type."""
    if StoreTag is NativeStore:
        return (<const floating*>buffer)[i]
    else:
        return fa_bf16_to_f32((<const uint16_t*>buffer)[i])


cdef inline void _store(char* buffer, Py_ssize_t i, floating value, StoreTag* store,
                        bint vector_nans) noexcept nogil:
    """Element i of a buffer from a math-type value, rounded to nearest even; a NaN as
    torch's vector code (``vector_nans``) or its scalar code writes it (see _narrow)."""
    if StoreTag is NativeStore:
        (<floating*>buffer)[i] = value
    else:
        (<uint16_t*>buffer)[i] = fa_f32_to_bf16(<float>value, _bf16_nan(vector_nans))


cdef void _update(const AdamTensor* t, Py_ssize_t start, Py_ssize_t stop,
                  floating* dtype, StoreTag* store, GradTag* grad_tag, DecayTag* decay_tag,
                  LerpTag* lerp_tag, MaxTag* max_tag, FormTag* form_tag) noexcept nogil:
    """Elements [start, stop) of one tensor: docs/design.md's update, in its order."""
    cdef char* p = t.param
    cdef const char* grad = t.grad
    cdef char* m = t.exp_avg
    cdef char* v = t.exp_avg_sq
    cdef char* vmax = t.max_exp_avg_sq   # AMSGrad only (NULL otherwise, never read)
    cdef bint vector_nans = FormTag is TorchForm   # torch's vector loop, not its tail
    cdef Py_ssize_t j
    cdef Py_ssize_t n = stop - start
    cdef Py_ssize_t i
    # The step's constants, cast to the element type once (never mixed into the loop
    # as doubles: that would add conversions to every element).
    cdef floating grad_factor = <floating>t.coef.grad_factor
    cdef floating l2 = <floating>t.coef.l2
    cdef floating param_scale = <floating>t.coef.param_scale
    cdef floating w = <floating>t.coef.w
    cdef floating one_minus_w = 1 - w      # in the element type, as PyTorch's lerp does
    cdef floating beta2 = <floating>t.coef.beta2
    cdef floating one_minus_beta2 = <floating>t.coef.one_minus_beta2
    cdef floating step_coef = <floating>t.coef.step_coef
    cdef floating denom_div = <floating>t.coef.denom_div
    cdef floating inv_denom_div = <floating>t.coef.inv_denom_div
    cdef floating eps = <floating>t.coef.eps
    cdef floating bc1 = <floating>t.coef.bc1
    cdef floating bc2 = <floating>t.coef.bc2
    cdef floating eps_root = <floating>t.coef.eps_root
    cdef floating g, pi, mi, vi, vmi, larger
    cdef floating nan_all_ones = _nan_all_ones(<floating>0)

    for i in range(n):  # vectorized: kernel loop
        j = start + i
        g = _load(grad, j, dtype, store)
        if GradTag is Scaled:
            g = g / grad_factor
        else:
            g = g * grad_factor
        pi = _load(p, j, dtype, store)
        if DecayTag is L2:
            if FormTag is TorchForm or FormTag is TorchTailForm:
                g = _fma(pi, l2, g)
            else:
                g = g + l2 * pi
        else:
            pi = pi * param_scale
        mi = _load(m, j, dtype, store)
        if FormTag is TorchForm or FormTag is TorchTailForm:
            if LerpTag is SmallWeight:
                mi = _fma(w, g - mi, mi)
            else:
                mi = _fma(-one_minus_w, g - mi, g)   # w - 1 == -(1 - w) exactly
        elif LerpTag is SmallWeight:
            mi = mi + w * (g - mi)
        else:
            mi = g - (g - mi) * one_minus_w
        vi = _load(v, j, dtype, store)
        if FormTag is TorchForm:
            vi = _fma(one_minus_beta2 * g, g, vi * beta2)
        elif FormTag is TorchTailForm:
            vi = _fma(vi, beta2, (one_minus_beta2 * g) * g)
        else:
            vi = vi * beta2 + (one_minus_beta2 * g) * g
        _store(m, j, mi, store, vector_nans)
        _store(v, j, vi, store, vector_nans)
        if MaxTag is MaxV:
            vmi = _load(vmax, j, dtype, store)
            if FormTag is TorchForm:
                # ATen's vector maximum(): a NaN in either operand gives the NaN whose
                # bits are all ones (its scalar tail, std::max, is the order below).
                # Both tests run unconditionally: GCC does not if-convert a comparison
                # that only one branch makes (it may trap), and would not vectorize.
                larger = vi if vmi < vi else vmi
                vi = nan_all_ones if (vi != vi) | (vmi != vmi) else larger
            else:
                vi = vi if vmi < vi else vmi
            _store(vmax, j, vi, store, vector_nans)
        if FormTag is RootForm:
            pi = pi - step_coef * (mi / bc1) / (_sqrt(vi / bc2 + eps_root) + eps)
        elif FormTag is FastForm:
            pi = pi + (step_coef * mi) / (_sqrt(vi) * inv_denom_div + eps)
        else:
            pi = pi + (step_coef * mi) / (_sqrt(vi) / denom_div + eps)
        _store(p, j, pi, store, vector_nans)


# --- run-time flags -> compile-time specialization, once per chunk ------------------------

cdef inline Py_ssize_t _torch_lanes(const AdamTensor* t) noexcept nogil:
    """Elements per vector of torch's fused loop for this tensor's storage (its AVX2
    build: 256 bits of the param's element type)."""
    if t.param_type == ELEM_BF16 or t.param_type == ELEM_F16:
        return 16
    return 4 if t.param_type == ELEM_F64 else 8


cdef inline Py_ssize_t _torch_tail_start(const AdamTensor* t) noexcept nogil:
    """Where torch's scalar tail of this tensor begins (its vector loop covers the rest)."""
    return t.size - t.size % _torch_lanes(t)


cdef inline uint16_t _bf16_nan(bint vector_nans) noexcept nogil:
    """The bfloat16 NaN torch writes: 0xFFFF from its vector code, 0x7FC0 from its scalar
    code (c10::BFloat16)."""
    return 0xffff if vector_nans else 0x7fc0


cdef void _by_form(const AdamTensor* t, Py_ssize_t start, Py_ssize_t stop, floating* dtype,
                   StoreTag* s, GradTag* a, DecayTag* b, LerpTag* c, MaxTag* d) noexcept nogil:
    cdef Py_ssize_t tail
    if t.coef.numerics == NUMERICS_TORCH:
        # torch's vector loop (its AVX2 build, 8 floats / 4 doubles / 16 bfloat16 or
        # float16 per vector, which it runs at its AVX512 capability too) covers all of a
        # tensor but its last size % lanes elements, which its scalar tail computes. Its
        # threads split tensors at multiples of 64 bytes: no other element is a tail.
        tail = _torch_tail_start(t)
        if start < tail:
            _update(t, start, min(stop, tail), dtype, s, a, b, c, d, <TorchForm*>NULL)
        if stop > tail:
            _update(t, max(start, tail), stop, dtype, s, a, b, c, d, <TorchTailForm*>NULL)
    elif t.coef.root_form:
        _update(t, start, stop, dtype, s, a, b, c, d, <RootForm*>NULL)
    elif t.coef.numerics == NUMERICS_FAST:
        _update(t, start, stop, dtype, s, a, b, c, d, <FastForm*>NULL)
    else:
        _update(t, start, stop, dtype, s, a, b, c, d, <PaperForm*>NULL)


cdef void _by_max(const AdamTensor* t, Py_ssize_t start, Py_ssize_t stop, floating* dtype,
                  StoreTag* s, GradTag* a, DecayTag* b, LerpTag* c) noexcept nogil:
    if t.coef.amsgrad:
        _by_form(t, start, stop, dtype, s, a, b, c, <MaxV*>NULL)
    else:
        _by_form(t, start, stop, dtype, s, a, b, c, <PlainV*>NULL)


cdef void _by_lerp(const AdamTensor* t, Py_ssize_t start, Py_ssize_t stop, floating* dtype,
                   StoreTag* s, GradTag* a, DecayTag* b) noexcept nogil:
    # PyTorch picks the lerp branch by the weight *in the element type*.
    if <floating>t.coef.w < 0.5:
        _by_max(t, start, stop, dtype, s, a, b, <SmallWeight*>NULL)
    else:
        _by_max(t, start, stop, dtype, s, a, b, <LargeWeight*>NULL)


cdef void _by_decay(const AdamTensor* t, Py_ssize_t start, Py_ssize_t stop, floating* dtype,
                    StoreTag* s, GradTag* a) noexcept nogil:
    if t.coef.l2_decay:
        _by_lerp(t, start, stop, dtype, s, a, <L2*>NULL)
    else:
        _by_lerp(t, start, stop, dtype, s, a, <Decoupled*>NULL)


cdef void _by_grad(const AdamTensor* t, Py_ssize_t start, Py_ssize_t stop,
                   floating* dtype, StoreTag* s) noexcept nogil:
    if t.coef.grad_scaled:
        _by_decay(t, start, stop, dtype, s, <Scaled*>NULL)
    else:
        _by_decay(t, start, stop, dtype, s, <Unscaled*>NULL)


# --- 16-bit storage through float32 blocks ------------------------------------------------
# A tensor whose buffers are not all of one type the loops read in registers (float16
# at the baseline; what _vectors16.h leaves of a float16 tensor, a master copy or
# stochastic rounding: AMSGrad, eps_root, torch's scalar tail; mixed types; a master
# copy or stochastic rounding where that loop is absent: the baseline, bfloat16 without
# AVX-512 BF16 or with MSVC) runs block by block: its 16-bit buffers are widened into
# float32 scratch arrays on the stack, the float32 loops above update the block there
# (float32 buffers in place), and the results are rounded back. The scratch stays in L1,
# so memory sees only the 16-bit traffic; no further set of
# specializations is compiled for these combinations.

# Small, so that the core overlaps one block's loads and conversions with the previous
# block's divisions: float16 at 2^24 elements, one thread, went from 0.56x to
# 0.74x torch's fused float16 going from 512 to 128 (64 and 256 were no better; in cache
# the same).
cdef enum:
    STAGE_ELEMENTS = 128


cdef void _widen(const char* source, int element_type, Py_ssize_t start, Py_ssize_t n,
                 float* out) noexcept nogil:
    cdef const uint16_t* bits = (<const uint16_t*>source) + start
    cdef Py_ssize_t i
    if element_type == ELEM_BF16:
        for i in range(n):  # vectorized: kernel loop
            out[i] = fa_bf16_to_f32(bits[i])
    else:   # F16C where the level has it (_convert.h)
        fa_widen_f16(bits, out, n)


cdef void _narrow(const float* values, char* target, int element_type, Py_ssize_t start,
                  Py_ssize_t n, bint vector_nans) noexcept nogil:
    """Round values[0:n] to nearest even into target[start:start + n]. A NaN becomes c10's
    scalar NaN (bfloat16 0x7FC0; float16 0x7E00 with its sign), or with ``vector_nans``
    the NaN of ATen's vector conversion (bfloat16 0xFFFF; float16 keeping the top of its
    payload)."""
    cdef uint16_t* bits = (<uint16_t*>target) + start
    cdef Py_ssize_t i
    cdef uint16_t nan_bits = _bf16_nan(vector_nans)
    if element_type == ELEM_BF16:
        for i in range(n):  # vectorized: kernel loop
            bits[i] = fa_f32_to_bf16(values[i], nan_bits)
    else:   # F16C where the level has it (_convert.h)
        fa_narrow_f16(values, bits, n, vector_nans)


cdef inline uint32_t _stochastic_key(uint64_t key, Py_ssize_t start) noexcept nogil:
    """The random stream of elements from ``start`` whose indices share its high 32 bits
    (the blocks' and the loop in registers')."""
    cdef uint32_t high = fa_mix32(<uint32_t>(key >> 32) + <uint32_t>(<uint64_t>start >> 32))
    return fa_mix32(<uint32_t>key ^ high)


cdef void _narrow_stochastic(const float* values, char* target, Py_ssize_t start,
                             Py_ssize_t n, uint64_t key) noexcept nogil:
    """Round values[0:n] stochastically into bfloat16 target[start:start + n]; the random
    bits depend on (key, element index) only."""
    cdef uint16_t* bits = (<uint16_t*>target) + start
    # the index's high half folded into the key once (a block never straddles 2**32)
    cdef uint32_t block_key = _stochastic_key(key, start)
    cdef uint32_t first = <uint32_t>start
    cdef Py_ssize_t i
    for i in range(n):  # vectorized: kernel loop
        bits[i] = fa_f32_to_bf16_stochastic(values[i], fa_random16(block_key, first + <uint32_t>i))


cdef inline char* _staged(const char* buffer, int element_type, Py_ssize_t start,
                          Py_ssize_t n, float* scratch) noexcept nogil:
    """Elements [start, start + n) as float32: the buffer itself, or widened into scratch."""
    if element_type == ELEM_F32:
        return <char*>((<const float*>buffer) + start)
    _widen(buffer, element_type, start, n, scratch)
    return <char*>scratch


cdef inline void _unstage(const AdamTensor* t, const float* values, char* target,
                          int element_type, Py_ssize_t start, Py_ssize_t n) noexcept nogil:
    """Write a staged block back: nothing for float32 (updated in place), else rounded."""
    cdef Py_ssize_t vector_end
    if element_type == ELEM_F32:
        return
    if t.coef.numerics == NUMERICS_TORCH:
        # torch's vector loop converts a NaN otherwise than its scalar tail (_narrow)
        vector_end = min(n, max(<Py_ssize_t>0, _torch_tail_start(t) - start))
        _narrow(values, target, element_type, start, vector_end, True)
        _narrow(values + vector_end, target, element_type, start + vector_end,
                n - vector_end, False)
    else:
        _narrow(values, target, element_type, start, n, False)


cdef void _run_staged(const AdamTensor* t, Py_ssize_t start, Py_ssize_t stop) noexcept nogil:
    """Elements [start, stop) of a tensor with 16-bit buffers or a master copy."""
    cdef float param[STAGE_ELEMENTS]
    cdef float grad[STAGE_ELEMENTS]
    cdef float exp_avg[STAGE_ELEMENTS]
    cdef float exp_avg_sq[STAGE_ELEMENTS]
    cdef float max_exp_avg_sq[STAGE_ELEMENTS]
    cdef AdamTensor block = t[0]
    cdef Py_ssize_t first = start, n
    # torch's scalar tail (only its numerics have one): no block straddles it
    cdef Py_ssize_t tail = (_torch_tail_start(t) if t.coef.numerics == NUMERICS_TORCH
                            else t.size)
    cdef Py_ssize_t lanes = _torch_lanes(t)
    while first < stop:
        n = min(<Py_ssize_t>STAGE_ELEMENTS, stop - first)
        if first < tail:
            n = min(n, tail - first)
        block.param = _staged(t.param, t.param_type, first, n, param)
        block.grad = _staged(t.grad, t.grad_type, first, n, grad)
        block.exp_avg = _staged(t.exp_avg, t.state_type, first, n, exp_avg)
        block.exp_avg_sq = _staged(t.exp_avg_sq, t.state_type, first, n, exp_avg_sq)
        if t.max_exp_avg_sq != NULL:
            block.max_exp_avg_sq = _staged(t.max_exp_avg_sq, t.state_type, first, n,
                                           max_exp_avg_sq)
        # The block's elements are 0..n, wherever it starts (a chunk's start, or where
        # the loop in registers stopped). Its size puts them all
        # in torch's vector loop (a whole number of its vectors), or all in its scalar
        # tail (fewer elements than a vector), as they are in the tensor.
        block.size = (n + lanes - 1) // lanes * lanes if first < tail else t.size - first
        _by_grad(&block, 0, n, <float*>NULL, <NativeStore*>NULL)
        if t.stochastic and t.param_type == ELEM_BF16:
            _narrow_stochastic(<const float*>block.param, t.param, first, n, t.rounding_key)
        else:
            _unstage(t, <const float*>block.param, t.param, t.param_type, first, n)
        _unstage(t, <const float*>block.exp_avg, t.exp_avg, t.state_type, first, n)
        _unstage(t, <const float*>block.exp_avg_sq, t.exp_avg_sq, t.state_type, first, n)
        if t.max_exp_avg_sq != NULL:
            _unstage(t, <const float*>block.max_exp_avg_sq, t.max_exp_avg_sq, t.state_type,
                     first, n)
        if t.model_param != NULL:   # master weights: the model's copy, rounded to nearest
            _narrow(<const float*>block.param, t.model_param, t.model_type, first, n, False)
        first += n


cdef extern from "_vectors16.h" nogil:
    ctypedef struct fa16_coefficients:
        float grad_factor, l2, param_scale, w, one_minus_w, beta2, one_minus_beta2
        float step_coef, denom_div, inv_denom_div, eps
    enum:
        FA16_FLOAT16_IN_REGISTERS   # 1 where this level has the loop (avx512, avx2), else 0
        FA16_LANES                  # its vector's elements
        FA16_PAPER
        FA16_FAST
        FA16_TORCH
        FA16_FLOAT16
        FA16_BFLOAT16
        FA16_PURE
        FA16_STOCHASTIC
        FA16_MASTER
    int fa16_bfloat16_in_registers()
    Py_ssize_t fa16_vectors(int storage, int mode, char* param, const char* grad,
                            char* exp_avg, char* exp_avg_sq, char* model_param,
                            Py_ssize_t start, Py_ssize_t stop, const fa16_coefficients* c,
                            int scaled, int l2, int large_w, int form, uint32_t key)


# bfloat16 takes the loop of _vectors16.h only at the avx512 level and where the CPU
# rounds to bfloat16 in one instruction (AVX-512 BF16); without it, _update's loop is as
# fast (asked once, at import).
cdef bint _bfloat16_in_registers = fa16_bfloat16_in_registers()


cdef int _register_mode(const AdamTensor* t) noexcept nogil:
    """Which of _vectors16.h's modes a tensor's buffers fit (-1: none): a 16-bit grad with
    param and moments of its type (bfloat16 rounded stochastically, or not), or with a
    float32 master param and moments and a model copy of the grad's type."""
    cdef int sixteen = t.grad_type
    if sixteen != ELEM_F16 and (sixteen != ELEM_BF16 or not _bfloat16_in_registers):
        return -1
    if t.model_param == NULL and t.param_type == sixteen and t.state_type == sixteen:
        if not t.stochastic:
            return FA16_PURE
        return FA16_STOCHASTIC if sixteen == ELEM_BF16 else -1   # (bfloat16's alone)
    if (t.model_param != NULL and t.model_type == sixteen and t.param_type == ELEM_F32
            and t.state_type == ELEM_F32 and not t.stochastic):
        return FA16_MASTER
    return -1


cdef Py_ssize_t _vector_end(const AdamTensor* t, Py_ssize_t start, Py_ssize_t stop,
                            int* form, int* mode) noexcept nogil:
    """Where the whole vectors of elements [start, stop) that _vectors16.h updates in
    registers end (``start``: none), with their ``form`` and ``mode``: float16 grads at
    the avx512 and avx2 levels, bfloat16 at avx512 with AVX-512 BF16 (_register_mode);
    no AMSGrad, no eps_root, not torch's scalar tail, and for stochastic rounding not
    past the next multiple of 2**32 (the random stream's key changes there)."""
    if not FA16_FLOAT16_IN_REGISTERS or t.coef.amsgrad or t.coef.root_form:
        return start
    mode[0] = _register_mode(t)
    if mode[0] < 0:
        return start
    if mode[0] == FA16_STOCHASTIC:
        stop = min(stop, ((start >> 32) + 1) << 32)
    if t.coef.numerics == NUMERICS_TORCH:
        form[0] = FA16_TORCH
        stop = min(stop, _torch_tail_start(t))
    else:
        form[0] = FA16_FAST if t.coef.numerics == NUMERICS_FAST else FA16_PAPER
    if stop - start < FA16_LANES:  # not one whole vector
        return start
    return start + (stop - start) // FA16_LANES * FA16_LANES


cdef Py_ssize_t _in_registers(const AdamTensor* t, Py_ssize_t start,
                              Py_ssize_t stop) noexcept nogil:
    """Update the elements of [start, stop) that _vector_end gives to _vectors16.h:
    returns where the other paths take over."""
    cdef fa16_coefficients c
    cdef int form = FA16_PAPER
    cdef int mode = FA16_PURE
    cdef Py_ssize_t end = _vector_end(t, start, stop, &form, &mode)
    if end == start:
        return start
    # cast from double as _update casts them (one_minus_w in float, as PyTorch's lerp)
    c.grad_factor = <float>t.coef.grad_factor
    c.l2 = <float>t.coef.l2
    c.param_scale = <float>t.coef.param_scale
    c.w = <float>t.coef.w
    c.one_minus_w = 1 - c.w
    c.beta2 = <float>t.coef.beta2
    c.one_minus_beta2 = <float>t.coef.one_minus_beta2
    c.step_coef = <float>t.coef.step_coef
    c.denom_div = <float>t.coef.denom_div
    c.inv_denom_div = <float>t.coef.inv_denom_div
    c.eps = <float>t.coef.eps
    return fa16_vectors(FA16_BFLOAT16 if t.grad_type == ELEM_BF16 else FA16_FLOAT16, mode,
                        t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.model_param, start, end,
                        &c, t.coef.grad_scaled, t.coef.l2_decay, c.w >= 0.5, form,
                        _stochastic_key(t.rounding_key, start))


def vector_end(str dtype, Py_ssize_t size, Py_ssize_t start, Py_ssize_t stop,
               str numerics="exact", bint amsgrad=False, bint eps_root=False,
               bint stochastic=False, bint master_weights=False):
    """(tests) Where this level's loop in registers would stop in elements [start, stop)
    of a tensor of ``size`` elements with a ``dtype`` ("float16" or "bfloat16") grad, and
    param and moments of that type (rounded stochastically), or float32 ones and a model
    copy (``master_weights``). ``start`` if it takes none. Nothing is read or written."""
    cdef AdamTensor t
    cdef int form = FA16_PAPER
    cdef int mode = FA16_PURE
    memset(&t, 0, sizeof(t))
    t.size = size
    t.grad_type = ELEM_F16 if dtype == "float16" else ELEM_BF16
    t.param_type = t.state_type = ELEM_F32 if master_weights else t.grad_type
    if master_weights:
        t.model_param = <char*>&t   # never read: a non-NULL address says there is one
        t.model_type = t.grad_type
    t.stochastic = stochastic
    t.coef.numerics = {"exact": NUMERICS_EXACT, "torch": NUMERICS_TORCH,
                       "fast": NUMERICS_FAST}[numerics]
    t.coef.amsgrad = amsgrad
    t.coef.root_form = eps_root
    return _vector_end(&t, start, stop, &form, &mode)


cdef void run_chunk(const AdamTensor* t, Py_ssize_t start, Py_ssize_t stop) noexcept nogil:
    """Elements [start, stop) of one tensor, through its specialization."""
    cdef bint one_type = (t.grad_type == t.param_type and t.state_type == t.param_type
                          and t.model_param == NULL)
    if t.param_type == ELEM_F64:
        _by_grad(t, start, stop, <double*>NULL, <NativeStore*>NULL)
    elif one_type and t.param_type == ELEM_F32:
        _by_grad(t, start, stop, <float*>NULL, <NativeStore*>NULL)
    elif one_type and t.param_type == ELEM_BF16 and not t.stochastic:
        _by_grad(t, _in_registers(t, start, stop), stop, <float*>NULL, <BF16Store*>NULL)
    else:   # float16, mixed types, master weights, stochastic rounding
        _run_staged(t, _in_registers(t, start, stop), stop)


# --- scanning gradients for NaN/Inf ----------------------------------------------------------

cdef Py_ssize_t _count_nonfinite_f32(const uint32_t* bits, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, bad = 0
    for i in range(n):  # vectorized: kernel loop
        bad += (bits[i] & 0x7f800000u) == 0x7f800000u   # exponent all ones: Inf or NaN
    return bad


cdef Py_ssize_t _count_nonfinite_f64(const uint64_t* bits, Py_ssize_t n) noexcept nogil:
    # The exponent is tested in the high 32-bit word: SSE2 has no 64-bit integer compare,
    # so a 64-bit mask test would not vectorize on the baseline.
    cdef Py_ssize_t i, bad = 0
    for i in range(n):  # vectorized: kernel loop
        bad += (<uint32_t>(bits[i] >> 32) & 0x7ff00000u) == 0x7ff00000u
    return bad


cdef Py_ssize_t _count_nonfinite_16(const uint16_t* bits, Py_ssize_t n,
                                    uint16_t exponent) noexcept nogil:
    cdef Py_ssize_t i, bad = 0
    for i in range(n):  # vectorized: kernel loop
        bad += (bits[i] & exponent) == exponent
    return bad


cdef Py_ssize_t count_nonfinite_chunk(const AdamTensor* t, Py_ssize_t start,
                                      Py_ssize_t stop) noexcept nogil:
    """How many gradient elements in [start, stop) of one tensor are NaN or Inf."""
    if t.grad_type == ELEM_F64:
        return _count_nonfinite_f64((<const uint64_t*>t.grad) + start, stop - start)
    if t.grad_type == ELEM_BF16:
        return _count_nonfinite_16((<const uint16_t*>t.grad) + start, stop - start, 0x7f80)
    if t.grad_type == ELEM_F16:
        return _count_nonfinite_16((<const uint16_t*>t.grad) + start, stop - start, 0x7c00)
    return _count_nonfinite_f32((<const uint32_t*>t.grad) + start, stop - start)


# The two entry points, as capsules: fastadam._simd hands the chosen module's to
# fastadam._kernels.set_kernels, which calls them through function pointers.
# Does this level update float16, and on this CPU bfloat16, tensors in registers
# (_vectors16.h)? (tests)
FLOAT16_IN_REGISTERS = bool(FA16_FLOAT16_IN_REGISTERS)
BFLOAT16_IN_REGISTERS = bool(_bfloat16_in_registers)

run_chunk_capsule = PyCapsule_New(<void*>run_chunk, b"fastadam.run_chunk", NULL)
count_nonfinite_capsule = PyCapsule_New(<void*>count_nonfinite_chunk,
                                        b"fastadam.count_nonfinite_chunk", NULL)
