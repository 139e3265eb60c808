# The C structs shared by the kernel modules (_kernels and its per-ISA twins
# _kernels_avx2/_kernels_avx512, which include _adam_loops.pxi). Types only: cimporting
# this file creates no run-time dependency, and every module lays the structs out alike.

# The numerics profiles (fastadam._validation.NUMERICS, in this order).
cdef enum:
    NUMERICS_EXACT = 0
    NUMERICS_TORCH = 1
    NUMERICS_FAST = 2

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
    # One contiguous, aligned, validated set of buffers and its coefficients.
    char* param             # OUT
    const char* grad        # IN
    char* exp_avg           # OUT
    char* exp_avg_sq        # OUT
    char* max_exp_avg_sq    # OUT, NULL unless coef.amsgrad
    Py_ssize_t size         # elements
    bint is_double          # float64 elements, else float32
    Coefficients coef
