# Stubs of the compiled module fastadam._kernels_avx2 (private: the same loops as
# fastadam._kernels, compiled for one SIMD level; fastadam._simd hands its capsules to
# fastadam._kernels.set_kernels).
from typing import Any

FLOAT16_IN_REGISTERS: bool
BFLOAT16_IN_REGISTERS: bool
run_chunk_capsule: Any

def vector_end(dtype: str, size: int, start: int, stop: int, numerics: str = ..., amsgrad: bool = ...,
               eps_root: bool = ..., stochastic: bool = ..., master_weights: bool = ...) -> int: ...
count_nonfinite_capsule: Any
