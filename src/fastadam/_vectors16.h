/* The Adam update of float16 and bfloat16 tensors in registers, sixteen elements per
 * AVX-512 vector.
 *
 * Included by every kernel module (_adam_loops.pxi); only the avx512 level compiles the
 * loop (elsewhere fa16_vectors does nothing and returns ``start``).
 *  - float16: GCC does not vectorize float16 conversions (GCC 12, not even with
 *    -mavx512fp16), so the float16 tensors of the other levels go through float32
 *    blocks (_run_staged): every element is widened into a block on the stack, updated
 *    there, and rounded back. Here vcvtph2ps/vcvtps2ph convert in registers instead
 *    (2^24 elements, one thread, benchmarks/low_precision.py: 1.06x torch's fused
 *    float16, against 0.75x through the blocks).
 *  - bfloat16: GCC vectorizes _update's loads and stores of bfloat16 (_convert.h), but
 *    its rounding is an integer sequence of six operations per vector. Where the CPU
 *    has AVX-512 BF16, one vcvtneps2bf16 rounds sixteen floats to nearest even instead.
 *    It treats subnormal inputs as zero, and writes its own NaN: a vector holding either
 *    (fpclass, rare) takes the integer sequence. Checked against it for every float
 *    there is. The instruction is written in assembly, so that the rest of this level
 *    is built for x86-64-v4 alone; GCC and Clang only (MSVC keeps _update's loop).
 *
 * Every operation is _update's (_adam_loops.pxi), in its order and with its FMAs, for
 * the forms and flags it takes; so are the conversions (those of _convert.h, NaNs
 * included): the bits are those of the other paths at every level (tests compare
 * them). AMSGrad, the eps_root form, mixed element types, master weights and stochastic
 * rounding are left to those paths, as is the scalar tail of torch's loop.
 */
#ifndef FASTADAM_VECTORS16_H
#define FASTADAM_VECTORS16_H

#include <stddef.h>
#include <stdint.h>

/* The step's constants, already in float (cast from the double Coefficients as _update
 * casts them). */
typedef struct {
    float grad_factor, l2, param_scale, w, one_minus_w, beta2, one_minus_beta2,
          step_coef, denom_div, inv_denom_div, eps;
} fa16_coefficients;

enum { FA16_PAPER = 0, FA16_FAST = 1, FA16_TORCH = 2 };   /* the forms */
enum { FA16_FLOAT16 = 0, FA16_BFLOAT16 = 1 };             /* the storage types */

#if defined(__AVX512F__)
#include <immintrin.h>

#define FA16_IN_REGISTERS 1

/* Inlined into each specialization, whatever the compiler's own judgment (MSVC builds
 * this level with /arch:AVX512). */
#if defined(_MSC_VER)
#define FA_INLINE static __forceinline
#define FA_RARELY(condition) (condition)
#define FA16_BF16_ROUNDING 0
#else
#define FA_INLINE static inline __attribute__((always_inline))
#define FA_RARELY(condition) __builtin_expect(!!(condition), 0)
#define FA16_BF16_ROUNDING 1
#include <cpuid.h>
#endif

/* Does the CPU have AVX-512 BF16 (CPUID leaf 7, subleaf 1, EAX bit 5)? The OS's support
 * for AVX-512 state is the avx512 level's own condition. */
static int fa16_cpu_has_bf16_rounding(void) {
#if FA16_BF16_ROUNDING
    unsigned int a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || a < 1)
        return 0;
    __get_cpuid_count(7, 1, &a, &b, &c, &d);
    return (int)((a >> 5) & 1u);
#else
    return 0;
#endif
}

FA_INLINE __m512 fa16_load(const uint16_t* bits, const int storage) {
    __m256i raw = _mm256_loadu_si256((const __m256i*)bits);
    if (storage == FA16_BFLOAT16)  /* the 16 bits are the float's high half */
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    return _mm512_cvtph_ps(raw);
}

/* fa_f32_to_bf16's integer sequence, sixteen lanes at once (NaNs become nan_bits). */
FA_INLINE __m256i fa16_bf16_by_integers(__m512 x, int nan_bits) {
    __m512i u = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                                   odd), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                              _mm512_set1_epi32(nan_bits));
    return _mm512_cvtepi32_epi16(r);
}

/* Round to nearest even into the storage type. A NaN as _convert.h writes it: float16
 * its sign and 0x7E00, and with ``torch_nans`` (ATen's vector conversion) the top of its
 * payload; bfloat16 0x7FC0, or 0xFFFF with ``torch_nans``. */
FA_INLINE void fa16_store(uint16_t* bits, __m512 x, const int storage, const int torch_nans) {
    if (storage == FA16_BFLOAT16) {
        __m256i rounded;
#if FA16_BF16_ROUNDING
        /* NaN (quiet 0x01, signalling 0x80) or subnormal (0x20) lanes */
        if (FA_RARELY(_mm512_fpclass_ps_mask(x, 0xA1) != 0))
            rounded = fa16_bf16_by_integers(x, torch_nans ? 0xFFFF : 0x7FC0);
        else
            __asm__("vcvtneps2bf16 %1, %0" : "=v"(rounded) : "v"(x));
#else
        rounded = fa16_bf16_by_integers(x, torch_nans ? 0xFFFF : 0x7FC0);
#endif
        _mm256_storeu_si256((__m256i*)bits, rounded);
        return;
    }
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    if (FA_RARELY(nan != 0)) {
        __m512i raw = _mm512_castps_si512(x);
        __m512i canonical = _mm512_or_si512(
            _mm512_or_si512(_mm512_and_si512(raw, _mm512_set1_epi32((int)0x80000000u)),
                            _mm512_set1_epi32(0x7FC00000)),
            _mm512_and_si512(raw, _mm512_set1_epi32(torch_nans ? 0x003FE000 : 0)));
        x = _mm512_castsi512_ps(_mm512_mask_blend_epi32(nan, raw, canonical));
    }
    _mm256_storeu_si256((__m256i*)bits, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}

/* Elements [0, n) (n a multiple of 16) with the storage, flags and form as constants:
 * each call below is inlined and specialized. */
FA_INLINE void fa16_body(uint16_t* p, const uint16_t* g, uint16_t* m, uint16_t* v,
                         ptrdiff_t n, const fa16_coefficients* c, const int storage,
                         const int scaled, const int l2, const int large_w, const int form) {
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
    const int torch = form == FA16_TORCH;
    for (ptrdiff_t i = 0; i < n; i += 16) {
        __m512 gi = fa16_load(g + i, storage);
        gi = scaled ? _mm512_div_ps(gi, grad_factor) : _mm512_mul_ps(gi, grad_factor);
        __m512 pi = fa16_load(p + i, storage);
        if (l2)
            gi = torch ? _mm512_fmadd_ps(pi, l2_factor, gi)
                       : _mm512_add_ps(gi, _mm512_mul_ps(l2_factor, pi));
        else
            pi = _mm512_mul_ps(pi, param_scale);
        __m512 mi = fa16_load(m + i, storage);
        __m512 d = _mm512_sub_ps(gi, mi);
        if (torch)
            mi = large_w ? _mm512_fmadd_ps(minus_one_minus_w, d, gi) : _mm512_fmadd_ps(w, d, mi);
        else
            mi = large_w ? _mm512_sub_ps(gi, _mm512_mul_ps(d, one_minus_w))
                         : _mm512_add_ps(mi, _mm512_mul_ps(w, d));
        __m512 vi = fa16_load(v + i, storage);
        __m512 g2 = _mm512_mul_ps(one_minus_beta2, gi);
        vi = torch ? _mm512_fmadd_ps(g2, gi, _mm512_mul_ps(vi, beta2))
                   : _mm512_add_ps(_mm512_mul_ps(vi, beta2), _mm512_mul_ps(g2, gi));
        fa16_store(m + i, mi, storage, torch);
        fa16_store(v + i, vi, storage, torch);
        __m512 root = _mm512_sqrt_ps(vi);
        __m512 denom = form == FA16_FAST ? _mm512_mul_ps(root, inv_denom_div)
                                         : _mm512_div_ps(root, denom_div);
        pi = _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(step_coef, mi),
                                             _mm512_add_ps(denom, eps)));
        fa16_store(p + i, pi, storage, torch);
    }
}

#define FA16_FORMS(storage, scaled, l2, large_w)                                         \
    switch (form) {                                                                       \
    case FA16_PAPER:                                                                      \
        fa16_body(p, g, m, v, n, c, storage, scaled, l2, large_w, FA16_PAPER); break;     \
    case FA16_FAST:                                                                       \
        fa16_body(p, g, m, v, n, c, storage, scaled, l2, large_w, FA16_FAST); break;      \
    default:                                                                              \
        fa16_body(p, g, m, v, n, c, storage, scaled, l2, large_w, FA16_TORCH); break;     \
    }

#define FA16_FLAGS(storage)                                                               \
    switch ((scaled ? 4 : 0) | (l2 ? 2 : 0) | (large_w ? 1 : 0)) {                        \
    case 0: FA16_FORMS(storage, 0, 0, 0) break;                                           \
    case 1: FA16_FORMS(storage, 0, 0, 1) break;                                           \
    case 2: FA16_FORMS(storage, 0, 1, 0) break;                                           \
    case 3: FA16_FORMS(storage, 0, 1, 1) break;                                           \
    case 4: FA16_FORMS(storage, 1, 0, 0) break;                                           \
    case 5: FA16_FORMS(storage, 1, 0, 1) break;                                           \
    case 6: FA16_FORMS(storage, 1, 1, 0) break;                                           \
    default: FA16_FORMS(storage, 1, 1, 1) break;                                          \
    }

/* Elements [start, stop) of a float16 or bfloat16 tensor's param, grad and moments, as
 * far as whole vectors go: returns where the caller takes over (``stop`` less the last
 * (stop - start) % 16 elements). */
static ptrdiff_t fa16_vectors(int storage, char* param, const char* grad, char* exp_avg,
                              char* exp_avg_sq, ptrdiff_t start, ptrdiff_t stop,
                              const fa16_coefficients* c, int scaled, int l2, int large_w,
                              int form) {
    ptrdiff_t n = (stop - start) / 16 * 16;
    uint16_t* p = (uint16_t*)param + start;
    const uint16_t* g = (const uint16_t*)grad + start;
    uint16_t* m = (uint16_t*)exp_avg + start;
    uint16_t* v = (uint16_t*)exp_avg_sq + start;
    if (n <= 0)
        return start;
    if (storage == FA16_BFLOAT16) {
        FA16_FLAGS(FA16_BFLOAT16)
    } else {
        FA16_FLAGS(FA16_FLOAT16)
    }
    return start + n;
}

#undef FA16_FLAGS
#undef FA16_FORMS
#undef FA_INLINE
#undef FA_RARELY

#else  /* no AVX-512 at this level: the other paths do it all */

#define FA16_IN_REGISTERS 0

static int fa16_cpu_has_bf16_rounding(void) { return 0; }

static ptrdiff_t fa16_vectors(int storage, char* param, const char* grad, char* exp_avg,
                              char* exp_avg_sq, ptrdiff_t start, ptrdiff_t stop,
                              const fa16_coefficients* c, int scaled, int l2, int large_w,
                              int form) {
    (void)storage; (void)param; (void)grad; (void)exp_avg; (void)exp_avg_sq; (void)stop;
    (void)c; (void)scaled; (void)l2; (void)large_w; (void)form;
    return start;
}

#endif
#endif
