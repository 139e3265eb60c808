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
 * vectorizes at every level. */
static inline uint32_t fa_mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    return x;
}

/* 16 random bits for element ``index`` (the low 32 bits of its index in the tensor; the
 * high bits are folded into ``key`` per block, which never straddles 2**32). */
static inline uint32_t fa_random16(uint32_t key, uint32_t index) {
    return fa_mix32((index * 0x9E3779B9u) ^ key) & 0xffffu;
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

/* As fa_f32_to_f16, but a NaN keeps its sign and the top of its payload, quieted (what
 * F16C's vcvtps2ph writes, and so ATen's vector conversion). */
static inline uint16_t fa_f32_to_f16_keeping_nan_payload(float f);

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

static inline uint16_t fa_f32_to_f16_keeping_nan_payload(float f) {
    const uint32_t w = fa_bits_of_float(f);
    const uint16_t payload = (uint16_t)(f != f ? (w >> 13) & 0x3FFu : 0u);
    return (uint16_t)(fa_f32_to_f16(f) | payload);
}

#endif
