/* Run-time CPU feature detection for the SIMD dispatch (fastadam._simd).
 *
 * A level counts as supported only if the CPU has every instruction set the level's
 * module was compiled for (-march=x86-64-v3 / x86-64-v4) AND the OS saves the vector
 * registers on context switch (XGETBV): cpuid alone is not enough (c-blosc2's
 * shuffle.c makes the same check). No __builtin_cpu_supports: it needs libgcc's
 * __cpu_model, which some toolchains fail to link.
 */
#ifndef FASTADAM_CPU_FEATURES_H
#define FASTADAM_CPU_FEATURES_H

#if defined(__x86_64__) || defined(_M_X64)
#define FA_X86_64 1
#if defined(_MSC_VER)
#include <intrin.h>
static void fa_cpuid(int leaf, int subleaf, unsigned int r[4]) {
    int regs[4];
    __cpuidex(regs, leaf, subleaf);
    r[0] = (unsigned int)regs[0]; r[1] = (unsigned int)regs[1];
    r[2] = (unsigned int)regs[2]; r[3] = (unsigned int)regs[3];
}
static unsigned long long fa_xgetbv0(void) { return _xgetbv(0); }
#else
#include <cpuid.h>
static void fa_cpuid(int leaf, int subleaf, unsigned int r[4]) {
    r[0] = r[1] = r[2] = r[3] = 0;
    __cpuid_count((unsigned int)leaf, (unsigned int)subleaf, r[0], r[1], r[2], r[3]);
}
static unsigned long long fa_xgetbv0(void) {
    unsigned int eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));  /* no -mxsave needed */
    return ((unsigned long long)edx << 32) | eax;
}
#endif
#define FA_BIT(reg, n) (((reg) >> (n)) & 1u)

/* x86-64-v3: the v2 set (SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT, CX16) plus AVX, AVX2, BMI1,
 * BMI2, F16C, FMA, LZCNT, MOVBE, XSAVE; and the OS saves XMM+YMM. */
static int fa_cpu_has_x86_64_v3(void) {
    unsigned int r1[4], r7[4], rx[4], max_leaf[4], max_ext[4];
    fa_cpuid(0, 0, max_leaf);
    fa_cpuid((int)0x80000000u, 0, max_ext);
    if (max_leaf[0] < 7 || max_ext[0] < 0x80000001u) return 0;
    fa_cpuid(1, 0, r1);
    fa_cpuid(7, 0, r7);
    fa_cpuid((int)0x80000001u, 0, rx);
    if (!(FA_BIT(r1[2], 0) && FA_BIT(r1[2], 9) && FA_BIT(r1[2], 13) && FA_BIT(r1[2], 19) &&
          FA_BIT(r1[2], 20)))                         /* SSE3 SSSE3 CX16 SSE4.1 SSE4.2 */
        return 0;
    if (!(FA_BIT(r1[2], 12) && FA_BIT(r1[2], 22) && FA_BIT(r1[2], 23) && FA_BIT(r1[2], 27) &&
          FA_BIT(r1[2], 28) && FA_BIT(r1[2], 29)))   /* FMA MOVBE POPCNT OSXSAVE AVX F16C */
        return 0;
    if (!(FA_BIT(r7[1], 3) && FA_BIT(r7[1], 5) && FA_BIT(r7[1], 8)))  /* BMI1 AVX2 BMI2 */
        return 0;
    if (!FA_BIT(rx[2], 5)) return 0;                                  /* LZCNT */
    return (fa_xgetbv0() & 0x6) == 0x6;                               /* XMM and YMM state */
}

/* x86-64-v4: v3 plus AVX512F, BW, CD, DQ, VL; OS saves opmask and ZMM state too. */
static int fa_cpu_has_x86_64_v4(void) {
    unsigned int r7[4];
    if (!fa_cpu_has_x86_64_v3()) return 0;
    fa_cpuid(7, 0, r7);
    if (!(FA_BIT(r7[1], 16) && FA_BIT(r7[1], 17) && FA_BIT(r7[1], 28) && FA_BIT(r7[1], 30) &&
          FA_BIT(r7[1], 31)))
        return 0;
    return (fa_xgetbv0() & 0xE6) == 0xE6;
}
#else
static int fa_cpu_has_x86_64_v3(void) { return 0; }
static int fa_cpu_has_x86_64_v4(void) { return 0; }
#endif

#endif /* FASTADAM_CPU_FEATURES_H */
