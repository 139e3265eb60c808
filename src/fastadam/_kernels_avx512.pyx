# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, nonecheck=False
"""fastadam's Adam loops compiled for x86-64-v4 (AVX-512; 512-bit zmm vectors).

Built by setup.py with that level's -march flag. Import it only where the CPU and OS
support the level (fastadam._simd checks, with fastadam._simd.cpu_levels()): the
compiler may use the level's instructions anywhere in this module, even while it loads.
The engine in fastadam._kernels calls its two loops through the capsules it exports.
"""

include "_adam_loops.pxi"
