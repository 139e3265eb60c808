/* Conversions between fastadam's 16-bit storage types and float32 (their math type).
 *
 * Included by every kernel module (_adam_loops.pxi), so each SIMD level compiles them with
 * its own flags; they are written as branch-free scalar code that GCC vectorizes inside the
 * staging loops (.github/scripts/check_vectorization.py checks those loops).
 *
 * Every level gives the same bits:
 *  - bfloat16 -> float32 is exact (the 16 bits are the float's high half).
 *  - float32 -> bfloat16 rounds to nearest even, as c10::BFloat16 and ATen's vector
 *    conversion do; a NaN becomes the NaN the caller names (ATen's scalar code writes
 *    0x7FC0, its AVX2/AVX-512 vector code 0xFFFF).
 *  - float16 <-> float32: IEEE conversions, round to nearest even, by c10's own integer
 *    and float sequence (below); a float32 NaN becomes 0x7E00 with its sign, as in c10's
 *    scalar code (ATen's vector code keeps the top of the payload: the _keeping_ variant).
 *  - stochastic rounding to bfloat16 adds 16 random bits below the kept ones and
 *    truncates: rounds away from zero with probability equal to the dropped fraction.
 *    The random bits come from a counter-based hash of (key, element index), so they do
 *    not depend on threads, chunking or vector width.
 */
#ifndef FASTADAM_CONVERT_H
#define FASTADAM_CONVERT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline float fa_float_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t fa_bits_of_float(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float fa_bf16_to_f32(uint16_t b) {
    return fa_float_from_bits((uint32_t)b << 16);
}

static inline uint16_t fa_f32_to_bf16(float f, uint16_t nan_bits) {
    uint32_t u = fa_bits_of_float(f);
    return f != f ? nan_bits : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* A 32-bit avalanche hash (Chris Wellons' "lowbias32"): full 32-bit multiplies only, so it
 * vectorizes at every level (_vectors16.h's fa16_random16 is the same, sixteen lanes). */
#define FA_MIX32_FIRST 0x7feb352du
#define FA_MIX32_SECOND 0x846ca68bu
#define FA_INDEX_SPREAD 0x9E3779B9u   /* spreads consecutive indices before the hash */
static inline uint32_t fa_mix32(uint32_t x) {
    x ^= x >> 16; x *= FA_MIX32_FIRST; x ^= x >> 15; x *= FA_MIX32_SECOND; x ^= x >> 16;
    return x;
}

/* 16 random bits for element ``index`` (the low 32 bits of its index in the tensor; the
 * high bits are folded into ``key`` per block, which never straddles 2**32). */
static inline uint32_t fa_random16(uint32_t key, uint32_t index) {
    return fa_mix32((index * FA_INDEX_SPREAD) ^ key) & 0xffffu;
}

static inline uint16_t fa_f32_to_bf16_stochastic(float f, uint32_t random16) {
    uint32_t u = fa_bits_of_float(f);
    return f != f ? (uint16_t)0x7fc0u : (uint16_t)((u + random16) >> 16);
}

/* float16 <-> float32: c10's fp16_ieee_to_fp32_value / fp16_ieee_from_fp32_value (the
 * FP16 library), with their two branches written as masks so that GCC vectorizes them at
 * every level (GCC 12 does not vectorize _Float16 conversions without AVX512-FP16, so
 * F16C's vcvtph2ps/vcvtps2ph would only be reached one element at a time). */
static inline float fa_f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const uint32_t normalized =
        fa_bits_of_float(fa_float_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f);
    const uint32_t denormalized =
        fa_bits_of_float(fa_float_from_bits((two_w >> 17) | (126u << 23)) - 0.5f);
    const uint32_t is_denormal = 0u - (uint32_t)(two_w < (1u << 27));
    return fa_float_from_bits(sign | (denormalized & is_denormal) | (normalized & ~is_denormal));
}

static inline uint16_t fa_f32_to_f16(float f) {
    const uint32_t w = fa_bits_of_float(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    float base = fa_float_from_bits(w & 0x7fffffffu) * 0x1.0p+112f * 0x1.0p-110f;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias > 0x71000000u ? bias : 0x71000000u;
    base = fa_float_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = fa_bits_of_float(base);
    const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    const uint32_t is_nan = 0u - (uint32_t)(shl1_w > 0xFF000000u);
    return (uint16_t)((sign >> 16) | (0x7E00u & is_nan) | (nonsign & ~is_nan));
}

/* As fa_f32_to_f16, but a NaN keeps its sign and the top of its payload, quieted (what
 * F16C's vcvtps2ph writes, and so ATen's vector conversion). */
static inline uint16_t fa_f32_to_f16_keeping_nan_payload(float f) {
    const uint32_t w = fa_bits_of_float(f);
    const uint16_t payload = (uint16_t)(f != f ? (w >> 13) & 0x3FFu : 0u);
    return (uint16_t)(fa_f32_to_f16(f) | payload);
}

/* Whole blocks of float16: sixteen elements per vcvtph2ps/vcvtps2ph at the avx512 level
 * (AVX-512F; float16 at 2^24 elements, one thread: 29.3 -> 24.7 ms against eight), then
 * eight with F16C (the avx2 and avx512 levels), NaNs given the bits of the scalar
 * functions above (a NaN's float is rebuilt as sign | 0x7FC00000 | the kept payload
 * before vcvtps2ph, so the vector and scalar paths agree bit for bit); elsewhere the
 * scalar functions, which GCC vectorizes. The remainder of a block takes the scalar
 * functions at every level. */
/* F16C where the build says so, or the level requires it: MSVC's /arch:AVX2 defines no
 * __F16C__, yet needs no flag for its intrinsics, and its avx2 level runs only on
 * x86-64-v3 CPUs, which have F16C. */
#if defined(__F16C__) || (defined(_MSC_VER) && defined(__AVX2__))
#define FA_HAS_F16C 1
#else
#define FA_HAS_F16C 0
#endif
#if FA_HAS_F16C || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
static inline __m512 fa_f16_widen16(const uint16_t* bits) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)bits));
}

/* Sixteen floats rounded to float16; NaN lanes first rebuilt as the scalar functions
 * write them (only when there is one). */
static inline __m256i fa_f16_narrow16(__m512 x, int keep_nan_payload) {
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    if (nan != 0) {
        __m512i raw = _mm512_castps_si512(x);
        __m512i canonical = _mm512_or_si512(
            _mm512_or_si512(_mm512_and_si512(raw, _mm512_set1_epi32((int)0x80000000u)),
                            _mm512_set1_epi32(0x7FC00000)),
            _mm512_and_si512(raw, _mm512_set1_epi32(keep_nan_payload ? 0x003FE000 : 0)));
        x = _mm512_castsi512_ps(_mm512_mask_blend_epi32(nan, raw, canonical));
    }
    return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
}
#endif

#if FA_HAS_F16C
static inline __m256 fa_f16_widen8(const uint16_t* bits) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)bits));
}

/* As fa_f16_narrow16, eight lanes (the 9 payload bits below the quiet bit kept on ask). */
static inline __m128i fa_f16_narrow8(__m256 x, int keep_nan_payload) {
    __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    if (_mm256_movemask_ps(nan) != 0) {
        const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
        const __m256 quiet = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000));
        const __m256 payload = _mm256_castsi256_ps(_mm256_set1_epi32(
            keep_nan_payload ? 0x003FE000 : 0));
        __m256 canonical = _mm256_or_ps(_mm256_or_ps(_mm256_and_ps(x, sign), quiet),
                                        _mm256_and_ps(x, payload));
        x = _mm256_blendv_ps(x, canonical, nan);
    }
    return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
}
#endif

static inline void fa_widen_f16(const uint16_t* bits, float* out, ptrdiff_t n) {
    ptrdiff_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, fa_f16_widen16(bits + i));
#endif
#if FA_HAS_F16C
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, fa_f16_widen8(bits + i));
#endif
    for (; i < n; i++)
        out[i] = fa_f16_to_f32(bits[i]);
}

static inline void fa_narrow_f16(const float* values, uint16_t* bits, ptrdiff_t n,
                                 int keep_nan_payload) {
    ptrdiff_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i*)(bits + i),
                            fa_f16_narrow16(_mm512_loadu_ps(values + i), keep_nan_payload));
#endif
#if FA_HAS_F16C
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i*)(bits + i),
                         fa_f16_narrow8(_mm256_loadu_ps(values + i), keep_nan_payload));
#endif
    for (; i < n; i++)
        bits[i] = keep_nan_payload ? fa_f32_to_f16_keeping_nan_payload(values[i])
                                   : fa_f32_to_f16(values[i]);
}

#endif
