/* The Adam update of float16 and bfloat16 tensors in registers, a whole vector at a
 * time.
 *
 * Included by every kernel module (_adam_loops.pxi). The avx512 level compiles the loop
 * for both types, sixteen lanes; the avx2 level for float16, eight lanes (F16C); the
 * baseline none (fa16_vectors does nothing and returns ``start``).
 *  - float16: GCC does not vectorize float16 conversions (GCC 12, not even with
 *    -mavx512fp16), so the baseline's float16 tensors go through float32 blocks
 *    (_run_staged): every element is widened into a block on the stack, updated there,
 *    and rounded back. Here vcvtph2ps/vcvtps2ph convert in registers instead (2^24
 *    elements, one thread, benchmarks/low_precision.py: 1.04x torch's fused float16,
 *    against 0.75x through the blocks).
 *  - bfloat16: GCC vectorizes _update's loads and stores of bfloat16 (_convert.h), but
 *    its rounding is an integer sequence of six operations per vector. Where the CPU
 *    has AVX-512 BF16, one vcvtneps2bf16 rounds sixteen floats to nearest even instead.
 *    It treats subnormal inputs as zero, and writes its own NaN: a vector holding either
 *    (fpclass, rare) takes the integer sequence: the two agree on every other float
 *    (checked for all 2^32 bit patterns). The instruction is written in assembly, so
 *    that the rest of this level is built for x86-64-v4 alone; GCC and Clang only (MSVC
 *    keeps _update's loop, and the blocks for bfloat16 masters and stochastic rounding).
 *
 * Three modes share the loop (each a specialization): param and moments of the grad's
 * 16-bit type (pure); the same with the bfloat16 param rounded stochastically, with the
 * random bits of _narrow_stochastic (2^24 elements, one thread: 14 ms, against 24
 * through the blocks); and master weights, a float32 param and moments updated with the
 * 16-bit model copy written in the same pass (19.2 ms, float32's speed, against 20.2).
 *
 * Every operation is _update's (_adam_loops.pxi), in its order and with its FMAs, for
 * the forms and flags it takes; so are the conversions (those of _convert.h, NaNs
 * included): the bits are those of the other paths at every level (tests compare
 * them). AMSGrad, the eps_root form and mixed element types are left to those paths, as
 * is the scalar tail of torch's loop.
 */
#ifndef FASTADAM_VECTORS16_H
#define FASTADAM_VECTORS16_H

#include <stddef.h>
#include <stdint.h>

#include "_convert.h"   /* the conversions (and FA_HAS_F16C), shared with the other paths */

/* The step's constants, already in float (cast from the double Coefficients as _update
 * casts them). */
typedef struct {
    float grad_factor, l2, param_scale, w, one_minus_w, beta2, one_minus_beta2,
          step_coef, denom_div, inv_denom_div, eps;
} fa16_coefficients;

enum { FA16_PAPER = 0, FA16_FAST = 1, FA16_TORCH = 2 };   /* the forms */
enum { FA16_FLOAT16 = 0, FA16_BFLOAT16 = 1 };             /* the storage types */
/* What a tensor's buffers hold, besides its 16-bit grad (the storage type). */
enum {
    FA16_PURE = 0,        /* param and moments of the storage type, rounded to nearest even */
    FA16_STOCHASTIC = 1,  /* the same, the bfloat16 param rounded stochastically */
    FA16_MASTER = 2       /* float32 param (the master copy) and moments; the 16-bit model
                           * copy written from the master, rounded to nearest even */
};

#if defined(__AVX512F__) || (FA_HAS_F16C && (defined(__FMA__) || defined(_MSC_VER)))
#include <immintrin.h>

/* Inlined into each specialization, whatever the compiler's own judgment. (MSVC builds
 * the levels with /arch:AVX2 and /arch:AVX512, which define no __F16C__ or __FMA__; its
 * intrinsics need no flags, and the avx2 level runs only where the CPU has x86-64-v3,
 * F16C and FMA included.) */
#if defined(_MSC_VER)
#define FA_INLINE static __forceinline
#define FA_RARELY(condition) (condition)
#else
#define FA_INLINE static inline __attribute__((always_inline))
#define FA_RARELY(condition) __builtin_expect(!!(condition), 0)
#endif

#define FA16_FLOAT16_IN_REGISTERS 1

#if defined(__AVX512F__)
/* --- sixteen lanes ------------------------------------------------------------------ */
#define FA16_LANES 16
typedef __m512 fa16_vector;
#define fa16_set1 _mm512_set1_ps
#define fa16_add _mm512_add_ps
#define fa16_sub _mm512_sub_ps
#define fa16_mul _mm512_mul_ps
#define fa16_div _mm512_div_ps
#define fa16_fma _mm512_fmadd_ps
#define fa16_sqrt _mm512_sqrt_ps
#define fa16_load_float32 _mm512_loadu_ps
#define fa16_store_float32 _mm512_storeu_ps
#if defined(_MSC_VER)
#define FA16_BFLOAT16_IN_REGISTERS 0
#else
#define FA16_BFLOAT16_IN_REGISTERS 1
#include <cpuid.h>
#endif

typedef __m256i fa16_bits;   /* a vector's 16-bit elements */
#define fa16_put(bits, rounded) _mm256_storeu_si256((__m256i*)(bits), rounded)

FA_INLINE __m512 fa16_load_float16(const uint16_t* bits) { return fa_f16_widen16(bits); }

/* Round to nearest even into float16; a NaN as fa_narrow_f16 writes it (_convert.h). */
FA_INLINE __m256i fa16_round_float16(__m512 x, const int torch_nans) {
    return fa_f16_narrow16(x, torch_nans);
}

#if FA16_BFLOAT16_IN_REGISTERS
FA_INLINE __m512 fa16_load_bfloat16(const uint16_t* bits) {  /* the float's high half */
    __m256i raw = _mm256_loadu_si256((const __m256i*)bits);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

/* Sixteen bfloat16 from the high halves of ``high`` (integers below 2^16), NaN lanes of
 * ``x`` as ``nan_bits``. */
FA_INLINE __m256i fa16_pack_bfloat16(__m512i high, __m512 x, int nan_bits) {
    high = _mm512_mask_mov_epi32(high, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                                 _mm512_set1_epi32(nan_bits));
    return _mm512_cvtepi32_epi16(high);
}

/* fa_f32_to_bf16's integer sequence, sixteen lanes at once (NaNs become nan_bits). */
FA_INLINE __m256i fa16_bfloat16_by_integers(__m512 x, int nan_bits) {
    __m512i u = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return fa16_pack_bfloat16(
        _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd),
                          16),
        x, nan_bits);
}

/* Round to nearest even into bfloat16; a NaN 0x7FC0, or 0xFFFF with ``torch_nans``. */
FA_INLINE __m256i fa16_round_bfloat16(__m512 x, const int torch_nans) {
    __m256i rounded;
    /* NaN (quiet 0x01, signalling 0x80) or subnormal (0x20) lanes */
    if (FA_RARELY(_mm512_fpclass_ps_mask(x, 0xA1) != 0))
        rounded = fa16_bfloat16_by_integers(x, torch_nans ? 0xFFFF : 0x7FC0);
    else
        __asm__("vcvtneps2bf16 {%1, %0|%0, %1}" : "=v"(rounded) : "v"(x));  /* AT&T | Intel */
    return rounded;
}

/* fa_random16 (_convert.h) of sixteen consecutive indices from ``index``. */
FA_INLINE __m512i fa16_random16(uint32_t key, uint32_t index) {
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512i x = _mm512_add_epi32(_mm512_set1_epi32((int)index), lanes);
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)FA_INDEX_SPREAD));
    x = _mm512_xor_si512(x, _mm512_set1_epi32((int)key));
    /* fa_mix32 */
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)FA_MIX32_FIRST));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)FA_MIX32_SECOND));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    return _mm512_and_si512(x, _mm512_set1_epi32(0xffff));
}

/* Stochastic rounding into bfloat16 of elements index.. (the low 32 bits of the first's
 * index), as fa_f32_to_bf16_stochastic with fa_random16: _narrow_stochastic's bits. */
FA_INLINE __m256i fa16_round_bfloat16_stochastically(__m512 x, uint32_t key, uint32_t index) {
    __m512i u = _mm512_add_epi32(_mm512_castps_si512(x), fa16_random16(key, index));
    return fa16_pack_bfloat16(_mm512_srli_epi32(u, 16), x, 0x7fc0);
}
#endif

#else
/* --- eight lanes (AVX2, F16C and FMA: x86-64-v3) -------------------------------------- */
#define FA16_LANES 8
typedef __m256 fa16_vector;
#define fa16_set1 _mm256_set1_ps
#define fa16_add _mm256_add_ps
#define fa16_sub _mm256_sub_ps
#define fa16_mul _mm256_mul_ps
#define fa16_div _mm256_div_ps
#define fa16_fma _mm256_fmadd_ps
#define fa16_sqrt _mm256_sqrt_ps
#define fa16_load_float32 _mm256_loadu_ps
#define fa16_store_float32 _mm256_storeu_ps
#define FA16_BFLOAT16_IN_REGISTERS 0

typedef __m128i fa16_bits;
#define fa16_put(bits, rounded) _mm_storeu_si128((__m128i*)(bits), rounded)

FA_INLINE __m256 fa16_load_float16(const uint16_t* bits) { return fa_f16_widen8(bits); }

FA_INLINE __m128i fa16_round_float16(__m256 x, const int torch_nans) {
    return fa_f16_narrow8(x, torch_nans);
}
#endif

/* Does the CPU have AVX-512 BF16 (CPUID leaf 7, subleaf 1, EAX bit 5), where this level
 * has the bfloat16 loop? The OS's support for AVX-512 state is the avx512 level's own
 * condition. */
static int fa16_bfloat16_in_registers(void) {
#if FA16_BFLOAT16_IN_REGISTERS
    unsigned int a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || a < 1)
        return 0;
    __get_cpuid_count(7, 1, &a, &b, &c, &d);
    return (int)((a >> 5) & 1u);
#else
    return 0;
#endif
}

FA_INLINE fa16_vector fa16_load(const uint16_t* bits, const int storage) {
#if FA16_BFLOAT16_IN_REGISTERS
    if (storage == FA16_BFLOAT16)
        return fa16_load_bfloat16(bits);
#endif
    (void)storage;
    return fa16_load_float16(bits);
}

FA_INLINE fa16_bits fa16_round(fa16_vector x, const int storage, const int torch_nans) {
#if FA16_BFLOAT16_IN_REGISTERS
    if (storage == FA16_BFLOAT16)
        return fa16_round_bfloat16(x, torch_nans);
#endif
    (void)storage;
    return fa16_round_float16(x, torch_nans);
}

FA_INLINE void fa16_store(uint16_t* bits, fa16_vector x, const int storage, const int torch_nans) {
    fa16_put(bits, fa16_round(x, storage, torch_nans));
}

/* Elements [0, n) (n a multiple of FA16_LANES) with the storage, mode, flags and form as
 * constants: each call below is inlined and specialized. ``p``, ``m``, ``v`` hold 16-bit
 * elements, or float32 ones in FA16_MASTER; ``model`` is FA16_MASTER's model copy.
 * FA16_STOCHASTIC draws the random bits of element i from (key, first + i). */
FA_INLINE void fa16_body(char* p, const uint16_t* g, char* m, char* v, uint16_t* model,
                         ptrdiff_t n, const fa16_coefficients* c, const int storage,
                         const int mode, const int scaled, const int l2, const int large_w,
                         const int form, uint32_t key, uint32_t first) {
    const fa16_vector grad_factor = fa16_set1(c->grad_factor);
    const fa16_vector l2_factor = fa16_set1(c->l2);
    const fa16_vector param_scale = fa16_set1(c->param_scale);
    const fa16_vector w = fa16_set1(c->w);
    const fa16_vector one_minus_w = fa16_set1(c->one_minus_w);
    const fa16_vector minus_one_minus_w = fa16_set1(-c->one_minus_w);
    const fa16_vector beta2 = fa16_set1(c->beta2);
    const fa16_vector one_minus_beta2 = fa16_set1(c->one_minus_beta2);
    const fa16_vector step_coef = fa16_set1(c->step_coef);
    const fa16_vector denom_div = fa16_set1(c->denom_div);
    const fa16_vector inv_denom_div = fa16_set1(c->inv_denom_div);
    const fa16_vector eps = fa16_set1(c->eps);
    const int torch = form == FA16_TORCH;
    const int master = mode == FA16_MASTER;
    float* p32 = (float*)p;
    float* m32 = (float*)m;
    float* v32 = (float*)v;
    uint16_t* p16 = (uint16_t*)p;
    uint16_t* m16 = (uint16_t*)m;
    uint16_t* v16 = (uint16_t*)v;
    (void)model; (void)key; (void)first;
    for (ptrdiff_t i = 0; i < n; i += FA16_LANES) {
        fa16_vector gi = fa16_load(g + i, storage);
        gi = scaled ? fa16_div(gi, grad_factor) : fa16_mul(gi, grad_factor);
        fa16_vector pi = master ? fa16_load_float32(p32 + i) : fa16_load(p16 + i, storage);
        if (l2)
            gi = torch ? fa16_fma(pi, l2_factor, gi) : fa16_add(gi, fa16_mul(l2_factor, pi));
        else
            pi = fa16_mul(pi, param_scale);
        fa16_vector mi = master ? fa16_load_float32(m32 + i) : fa16_load(m16 + i, storage);
        fa16_vector d = fa16_sub(gi, mi);
        if (torch)
            mi = large_w ? fa16_fma(minus_one_minus_w, d, gi) : fa16_fma(w, d, mi);
        else
            mi = large_w ? fa16_sub(gi, fa16_mul(d, one_minus_w)) : fa16_add(mi, fa16_mul(w, d));
        fa16_vector vi = master ? fa16_load_float32(v32 + i) : fa16_load(v16 + i, storage);
        fa16_vector g2 = fa16_mul(one_minus_beta2, gi);
        vi = torch ? fa16_fma(g2, gi, fa16_mul(vi, beta2))
                   : fa16_add(fa16_mul(vi, beta2), fa16_mul(g2, gi));
        if (master) {
            fa16_store_float32(m32 + i, mi);
            fa16_store_float32(v32 + i, vi);
        } else {
            fa16_store(m16 + i, mi, storage, torch);
            fa16_store(v16 + i, vi, storage, torch);
        }
        fa16_vector root = fa16_sqrt(vi);
        fa16_vector denom = form == FA16_FAST ? fa16_mul(root, inv_denom_div)
                                              : fa16_div(root, denom_div);
        pi = fa16_add(pi, fa16_div(fa16_mul(step_coef, mi), fa16_add(denom, eps)));
        if (master) {
            fa16_store_float32(p32 + i, pi);
            fa16_store(model + i, pi, storage, 0);   /* c10's scalar NaN, as _narrow */
        }
#if FA16_BFLOAT16_IN_REGISTERS
        else if (mode == FA16_STOCHASTIC)
            fa16_put(p16 + i, fa16_round_bfloat16_stochastically(pi, key, first + (uint32_t)i));
#endif
        else
            fa16_store(p16 + i, pi, storage, torch);
    }
}

#define FA16_FORMS(storage, mode, scaled, l2, large_w)                                    \
    switch (form) {                                                                       \
    case FA16_PAPER:                                                                      \
        fa16_body(p, g, m, v, model, n, c, storage, mode, scaled, l2, large_w, FA16_PAPER, \
                  key, first); break;                                                     \
    case FA16_FAST:                                                                       \
        fa16_body(p, g, m, v, model, n, c, storage, mode, scaled, l2, large_w, FA16_FAST,  \
                  key, first); break;                                                     \
    default:                                                                              \
        fa16_body(p, g, m, v, model, n, c, storage, mode, scaled, l2, large_w, FA16_TORCH, \
                  key, first); break;                                                     \
    }

#define FA16_FLAGS(storage, mode)                                                         \
    switch ((scaled ? 4 : 0) | (l2 ? 2 : 0) | (large_w ? 1 : 0)) {                        \
    case 0: FA16_FORMS(storage, mode, 0, 0, 0) break;                                     \
    case 1: FA16_FORMS(storage, mode, 0, 0, 1) break;                                     \
    case 2: FA16_FORMS(storage, mode, 0, 1, 0) break;                                     \
    case 3: FA16_FORMS(storage, mode, 0, 1, 1) break;                                     \
    case 4: FA16_FORMS(storage, mode, 1, 0, 0) break;                                     \
    case 5: FA16_FORMS(storage, mode, 1, 0, 1) break;                                     \
    case 6: FA16_FORMS(storage, mode, 1, 1, 0) break;                                     \
    default: FA16_FORMS(storage, mode, 1, 1, 1) break;                                    \
    }

/* Elements [start, stop) of a tensor whose grad is float16 (or, where this level has the
 * bfloat16 loop, bfloat16), with param and moments of that type (FA16_PURE,
 * FA16_STOCHASTIC: bfloat16 only) or float32 and a model copy (FA16_MASTER), as far as
 * whole vectors go: returns where the caller takes over (``stop`` less the last
 * (stop - start) % FA16_LANES elements). ``key``: FA16_STOCHASTIC's random stream, for
 * elements whose indices share their high 32 bits (the caller's to ensure). */
static ptrdiff_t fa16_vectors(int storage, int mode, char* param, const char* grad,
                              char* exp_avg, char* exp_avg_sq, char* model_param,
                              ptrdiff_t start, ptrdiff_t stop, const fa16_coefficients* c,
                              int scaled, int l2, int large_w, int form, uint32_t key) {
    ptrdiff_t n = (stop - start) / FA16_LANES * FA16_LANES;
    size_t width = mode == FA16_MASTER ? 4 : 2;   /* of param and moments */
    char* p = param + start * width;
    const uint16_t* g = (const uint16_t*)grad + start;
    char* m = exp_avg + start * width;
    char* v = exp_avg_sq + start * width;
    uint16_t* model = model_param == NULL ? NULL : (uint16_t*)model_param + start;
    uint32_t first = (uint32_t)start;
    if (n <= 0 || (storage == FA16_BFLOAT16 && !FA16_BFLOAT16_IN_REGISTERS)
            || (mode == FA16_STOCHASTIC && storage != FA16_BFLOAT16))
        return start;
#if FA16_BFLOAT16_IN_REGISTERS
    if (storage == FA16_BFLOAT16) {
        if (mode == FA16_MASTER) {
            FA16_FLAGS(FA16_BFLOAT16, FA16_MASTER)
        } else if (mode == FA16_STOCHASTIC) {
            FA16_FLAGS(FA16_BFLOAT16, FA16_STOCHASTIC)
        } else {
            FA16_FLAGS(FA16_BFLOAT16, FA16_PURE)
        }
    } else
#endif
    if (mode == FA16_MASTER) {
        FA16_FLAGS(FA16_FLOAT16, FA16_MASTER)
    } else {
        FA16_FLAGS(FA16_FLOAT16, FA16_PURE)
    }
    return start + n;
}

#undef FA16_FLAGS
#undef FA16_FORMS
#undef FA_INLINE
#undef FA_RARELY

#else  /* no AVX-512, nor AVX2 with F16C and FMA, at this level: the other paths */

#define FA16_FLOAT16_IN_REGISTERS 0
#define FA16_LANES 1

static int fa16_bfloat16_in_registers(void) { return 0; }

static ptrdiff_t fa16_vectors(int storage, int mode, char* param, const char* grad,
                              char* exp_avg, char* exp_avg_sq, char* model_param,
                              ptrdiff_t start, ptrdiff_t stop, const fa16_coefficients* c,
                              int scaled, int l2, int large_w, int form, uint32_t key) {
    (void)storage; (void)mode; (void)param; (void)grad; (void)exp_avg; (void)exp_avg_sq;
    (void)model_param; (void)stop; (void)c; (void)scaled; (void)l2; (void)large_w;
    (void)form; (void)key;
    return start;
}

#endif
#endif
