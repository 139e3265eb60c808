/* The one place fastadam touches the OpenMP runtime API.
 *
 * With OpenMP (compiled with -fopenmp, /openmp, or -Xpreprocessor -fopenmp) this is
 * omp.h; without it, serial stand-ins with the same names, so _kernels.pyx compiles
 * either way (scikit-learn's _openmp_helpers.pxd pattern). Cython's prange emits its
 * own `#ifdef _OPENMP` guards, so the loops themselves need nothing from here.
 */
#ifndef FASTADAM_OMP_SHIM_H
#define FASTADAM_OMP_SHIM_H

#ifdef _OPENMP
#include <omp.h>
#define FA_OPENMP_ENABLED 1
#define FA_OPENMP_VERSION _OPENMP
#else
#define FA_OPENMP_ENABLED 0
#define FA_OPENMP_VERSION 0
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
#endif

/* The size of the team a parallel region asking for n threads really gets. */
static inline int fa_team_size(int n) {
    int size = 1;
#ifdef _OPENMP
    #pragma omp parallel num_threads(n)
    {
        #pragma omp single
        size = omp_get_num_threads();
    }
#else
    (void)n;
#endif
    return size;
}

/* What the compiler was asked to target: the widest vector ISA enabled at compile time
 * (not what the running CPU has). Reported by fastadam.show_config(). */
#if defined(__AVX512F__)
#define FA_VECTOR_ISA "avx512f (512-bit zmm)"
#elif defined(__AVX2__)
#define FA_VECTOR_ISA "avx2 (256-bit ymm)"
#elif defined(__AVX__)
#define FA_VECTOR_ISA "avx (256-bit ymm)"
#elif defined(__SSE2__) || defined(_M_X64) || (defined(_M_IX86_FP) && _M_IX86_FP >= 2)
#define FA_VECTOR_ISA "sse2 (128-bit xmm)"
#elif defined(__ARM_NEON) || defined(__aarch64__)
#define FA_VECTOR_ISA "neon (128-bit)"
#else
#define FA_VECTOR_ISA "unknown"
#endif

#if defined(__clang__)
#define FA_COMPILER "clang " __clang_version__
#elif defined(__GNUC__)
#define FA_COMPILER "gcc " __VERSION__
#elif defined(_MSC_VER)
#define FA_STR2(x) #x
#define FA_STR(x) FA_STR2(x)
#define FA_COMPILER "msvc " FA_STR(_MSC_VER)
#else
#define FA_COMPILER "unknown"
#endif

/* Set by setup.py (-DFASTADAM_CFLAGS="..."); absent in hand builds. */
#ifndef FASTADAM_CFLAGS
#define FASTADAM_CFLAGS ""
#endif

#endif /* FASTADAM_OMP_SHIM_H */
