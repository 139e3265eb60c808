# The C structs shared by the kernel modules (_kernels and its per-ISA twins
# _kernels_avx2/_kernels_avx512, which include _adam_loops.pxi). Types only: cimporting
# this file creates no run-time dependency, and every module lays the structs out alike.

from libc.stdint cimport uint64_t

# The numerics profiles (fastadam._validation.NUMERICS, in this order).
cdef enum:
    NUMERICS_EXACT = 0
    NUMERICS_TORCH = 1
    NUMERICS_FAST = 2

# Element (storage) types of a tensor's buffers. Math runs in float64 for ELEM_F64 and in
# float32 for the others (torch's opmath): 16-bit buffers are widened on load and rounded
# on store (_convert.h).
cdef enum:
    ELEM_F32 = 0
    ELEM_F64 = 1
    ELEM_BF16 = 2
    ELEM_F16 = 3

cdef struct Coefficients:
    # Per-tensor, per-step constants, computed once in double precision by
    # fill_coefficients() and cast to the element type once per chunk.
    double grad_factor      # g = grad * grad_factor (+-1), or grad / grad_factor when scaled
    double l2               # L2 form: g = g + l2 * p
    double param_scale      # decoupled form: p = p * param_scale (exactly 1.0 without decay)
    double w                # 1 - beta1: the weight of the moment lerp
    double beta2
    double one_minus_beta2
    double step_coef        # paper form: -lr/bc1 (eps_hat: -lr*sqrt(bc2)/bc1); eps_root form: lr
    double denom_div        # paper form: sqrt(bc2) (eps_hat: 1)
    double inv_denom_div    # fast profile: 1 / denom_div, rounded once (in double)
    double eps
    double bc1              # eps_root form only
    double bc2              # eps_root form only
    double eps_root         # eps_root form only
    bint grad_scaled        # grad_scale != 1: divide instead of multiply
    bint l2_decay           # weight decay in the L2 form (else the decoupled form)
    bint amsgrad
    bint root_form          # eps_root > 0: the Optax form
    # numerics="torch": the FMAs of torch's AVX2/AVX-512 fused Adam (paper and eps_hat
    # forms only; docs/numerics-torch.md), else docs/design.md's order without FMA
    int numerics            # NUMERICS_EXACT, _TORCH (its FMAs) or _FAST (one division)

cdef struct AdamTensor:
    # One contiguous, aligned, validated set of buffers and its coefficients. Each buffer
    # has its element type: float64 everywhere, or any mix of float32, bfloat16 and
    # float16 (float32 math), as validated by fastadam._validation.check_element_types.
    char* param             # OUT (the float32 master copy when model_param is set)
    const char* grad        # IN
    char* exp_avg           # OUT
    char* exp_avg_sq        # OUT
    char* max_exp_avg_sq    # OUT, NULL unless coef.amsgrad
    # OUT, NULL unless master weights: the 16-bit model copy of param, written (rounded
    # to nearest even) in the same pass
    char* model_param
    Py_ssize_t size         # elements
    int param_type          # ELEM_*
    int grad_type
    int state_type          # exp_avg, exp_avg_sq and max_exp_avg_sq
    int model_type          # model_param's, when set
    bint stochastic         # round a 16-bit param stochastically (bfloat16 only)
    uint64_t rounding_key   # the stream of random bits of this tensor and step
    Coefficients coef
