/* The Adam update of float16 tensors in registers, sixteen elements per AVX-512 vector.
 *
 * Included by every kernel module (_adam_loops.pxi); only the avx512 level compiles a
 * loop (elsewhere fa_f16_vectors does nothing and returns ``start``). GCC does not
 * vectorize float16 conversions (GCC 12, not even with -mavx512fp16), so the
 * float16 tensors of the other levels go through float32 blocks (_run_staged): every
 * element is widened into a block on the stack, updated there, and rounded back. Here
 * vcvtph2ps/vcvtps2ph convert in registers instead, and the update costs about what the
 * float32 one does (2^24 elements, one thread, benchmarks/low_precision.py: 1.06x
 * torch's fused float16, against 0.75x through the blocks).
 *
 * Every operation is _update's (_adam_loops.pxi), in its order and with its FMAs, for
 * the forms and flags it takes; so are the conversions (those of _convert.h's vector
 * loops, NaNs included): the bits are those of the staged path at every level (tests
 * compare them). AMSGrad, the eps_root form, mixed element types and stochastic
 * rounding are left to the staged path, as is the scalar tail of torch's loop.
 */
#ifndef FASTADAM_F16_VECTORS_H
#define FASTADAM_F16_VECTORS_H

#include <stddef.h>
#include <stdint.h>

/* The step's constants, already in float (cast from the double Coefficients as _update
 * casts them). */
typedef struct {
    float grad_factor, l2, param_scale, w, one_minus_w, beta2, one_minus_beta2,
          step_coef, denom_div, inv_denom_div, eps;
} fa_f16_coefficients;

enum { FA_F16_PAPER = 0, FA_F16_FAST = 1, FA_F16_TORCH = 2 };

#if defined(__AVX512F__)
#include <immintrin.h>

#define FA_F16_IN_REGISTERS 1

/* Inlined into each specialization, whatever the compiler's own judgment (MSVC builds
 * this level with /arch:AVX512). */
#if defined(_MSC_VER)
#define FA_INLINE static __forceinline
#define FA_RARELY(condition) (condition)
#else
#define FA_INLINE static inline __attribute__((always_inline))
#define FA_RARELY(condition) __builtin_expect(!!(condition), 0)
#endif

FA_INLINE __m512 fa_f16_load(const uint16_t* bits) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)bits));
}

/* Round to nearest even into float16; a NaN as fa_narrow_f16 writes it (its sign and
 * 0x7E00, and with ``keep_payload`` the top of its payload: ATen's vector conversion). */
FA_INLINE void fa_f16_store(uint16_t* bits, __m512 x, int keep_payload) {
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    if (FA_RARELY(nan != 0)) {
        __m512i raw = _mm512_castps_si512(x);
        __m512i canonical = _mm512_or_si512(
            _mm512_or_si512(_mm512_and_si512(raw, _mm512_set1_epi32((int)0x80000000u)),
                            _mm512_set1_epi32(0x7FC00000)),
            _mm512_and_si512(raw, _mm512_set1_epi32(keep_payload ? 0x003FE000 : 0)));
        x = _mm512_castsi512_ps(_mm512_mask_blend_epi32(nan, raw, canonical));
    }
    _mm256_storeu_si256((__m256i*)bits, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}

/* Elements [0, n) (n a multiple of 16) with the flags as constants: each call below is
 * inlined and specialized. */
FA_INLINE void fa_f16_body(uint16_t* p, const uint16_t* g, uint16_t* m, uint16_t* v,
                           ptrdiff_t n, const fa_f16_coefficients* c, const int scaled,
                           const int l2, const int large_w, const int form) {
    const __m512 grad_factor = _mm512_set1_ps(c->grad_factor);
    const __m512 l2_factor = _mm512_set1_ps(c->l2);
    const __m512 param_scale = _mm512_set1_ps(c->param_scale);
    const __m512 w = _mm512_set1_ps(c->w);
    const __m512 one_minus_w = _mm512_set1_ps(c->one_minus_w);
    const __m512 minus_one_minus_w = _mm512_set1_ps(-c->one_minus_w);
    const __m512 beta2 = _mm512_set1_ps(c->beta2);
    const __m512 one_minus_beta2 = _mm512_set1_ps(c->one_minus_beta2);
    const __m512 step_coef = _mm512_set1_ps(c->step_coef);
    const __m512 denom_div = _mm512_set1_ps(c->denom_div);
    const __m512 inv_denom_div = _mm512_set1_ps(c->inv_denom_div);
    const __m512 eps = _mm512_set1_ps(c->eps);
    const int torch = form == FA_F16_TORCH;
    for (ptrdiff_t i = 0; i < n; i += 16) {
        __m512 gi = fa_f16_load(g + i);
        gi = scaled ? _mm512_div_ps(gi, grad_factor) : _mm512_mul_ps(gi, grad_factor);
        __m512 pi = fa_f16_load(p + i);
        if (l2)
            gi = torch ? _mm512_fmadd_ps(pi, l2_factor, gi)
                       : _mm512_add_ps(gi, _mm512_mul_ps(l2_factor, pi));
        else
            pi = _mm512_mul_ps(pi, param_scale);
        __m512 mi = fa_f16_load(m + i);
        __m512 d = _mm512_sub_ps(gi, mi);
        if (torch)
            mi = large_w ? _mm512_fmadd_ps(minus_one_minus_w, d, gi) : _mm512_fmadd_ps(w, d, mi);
        else
            mi = large_w ? _mm512_sub_ps(gi, _mm512_mul_ps(d, one_minus_w))
                         : _mm512_add_ps(mi, _mm512_mul_ps(w, d));
        __m512 vi = fa_f16_load(v + i);
        __m512 g2 = _mm512_mul_ps(one_minus_beta2, gi);
        vi = torch ? _mm512_fmadd_ps(g2, gi, _mm512_mul_ps(vi, beta2))
                   : _mm512_add_ps(_mm512_mul_ps(vi, beta2), _mm512_mul_ps(g2, gi));
        fa_f16_store(m + i, mi, torch);
        fa_f16_store(v + i, vi, torch);
        __m512 root = _mm512_sqrt_ps(vi);
        __m512 denom = form == FA_F16_FAST ? _mm512_mul_ps(root, inv_denom_div)
                                           : _mm512_div_ps(root, denom_div);
        pi = _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(step_coef, mi),
                                             _mm512_add_ps(denom, eps)));
        fa_f16_store(p + i, pi, torch);
    }
}

#define FA_F16_FORMS(scaled, l2, large_w)                                                 \
    switch (form) {                                                                       \
    case FA_F16_PAPER: fa_f16_body(p, g, m, v, n, c, scaled, l2, large_w, FA_F16_PAPER); break; \
    case FA_F16_FAST: fa_f16_body(p, g, m, v, n, c, scaled, l2, large_w, FA_F16_FAST); break;   \
    default: fa_f16_body(p, g, m, v, n, c, scaled, l2, large_w, FA_F16_TORCH); break;           \
    }

/* Elements [start, stop) of a float16 tensor's param, grad and moments, as far as whole
 * vectors go: returns where the caller takes over (``stop`` less the last stop - start
 * modulo 16 elements). */
static ptrdiff_t fa_f16_vectors(char* param, const char* grad, char* exp_avg, char* exp_avg_sq,
                                ptrdiff_t start, ptrdiff_t stop, const fa_f16_coefficients* c,
                                int scaled, int l2, int large_w, int form) {
    ptrdiff_t n = (stop - start) / 16 * 16;
    uint16_t* p = (uint16_t*)param + start;
    const uint16_t* g = (const uint16_t*)grad + start;
    uint16_t* m = (uint16_t*)exp_avg + start;
    uint16_t* v = (uint16_t*)exp_avg_sq + start;
    if (n <= 0)
        return start;
    switch ((scaled ? 4 : 0) | (l2 ? 2 : 0) | (large_w ? 1 : 0)) {
    case 0: FA_F16_FORMS(0, 0, 0) break;
    case 1: FA_F16_FORMS(0, 0, 1) break;
    case 2: FA_F16_FORMS(0, 1, 0) break;
    case 3: FA_F16_FORMS(0, 1, 1) break;
    case 4: FA_F16_FORMS(1, 0, 0) break;
    case 5: FA_F16_FORMS(1, 0, 1) break;
    case 6: FA_F16_FORMS(1, 1, 0) break;
    default: FA_F16_FORMS(1, 1, 1) break;
    }
    return start + n;
}

#undef FA_F16_FORMS
#undef FA_INLINE
#undef FA_RARELY

#else  /* no AVX-512 at this level: the staged path does it all */

#define FA_F16_IN_REGISTERS 0

static ptrdiff_t fa_f16_vectors(char* param, const char* grad, char* exp_avg, char* exp_avg_sq,
                                ptrdiff_t start, ptrdiff_t stop, const fa_f16_coefficients* c,
                                int scaled, int l2, int large_w, int form) {
    (void)param; (void)grad; (void)exp_avg; (void)exp_avg_sq; (void)stop; (void)c;
    (void)scaled; (void)l2; (void)large_w; (void)form;
    return start;
}

#endif
#endif
