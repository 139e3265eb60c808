# Stubs of the compiled module fastadam._kernels (private: fastadam._functional,
# fastadam._rows, fastadam._simd and fastadam._threads call it with validated arguments;
# fastadam._table cimports its C functions).
from typing import Any, Optional, Sequence

import numpy as np

from fastadam._validation import Hyperparameters

def adam_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: Optional[np.ndarray],
    hyper: Hyperparameters,
    step: float,
    grad_scale: float,
    num_threads: int,
    model_param: Optional[np.ndarray] = None,
    rounding_seed: Optional[int] = None,
) -> None: ...
def adam_step_rows(
    param: np.ndarray,
    grad_rows: np.ndarray,
    rows: np.ndarray,
    row_size: int,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: Optional[np.ndarray],
    hyper: Hyperparameters,
    step: float,
    grad_scale: float,
    num_threads: int,
) -> None: ...
def sum_sorted_rows(out: np.ndarray, values: np.ndarray, order: np.ndarray, first: np.ndarray) -> None: ...
def takes_small_loops(param: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray,
                      model_param: Optional[np.ndarray] = ...) -> bool: ...
def chunk_table(sizes: Sequence[int]) -> np.ndarray: ...
def run_chunks_from(
    first_element: int,
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: Optional[np.ndarray],
    hyper: Hyperparameters,
    step: float,
    grad_scale: float,
    num_threads: int,
) -> tuple[int, list[tuple[int, int]]]: ...
def set_kernels(small: tuple[Any, Any], large: tuple[Any, Any], small_limit: int) -> None: ...
def cpu_supports(feature: str) -> bool: ...

FLOAT16_IN_REGISTERS: bool
BFLOAT16_IN_REGISTERS: bool
run_chunk_capsule: Any

def vector_end(dtype: str, size: int, start: int, stop: int, numerics: str = ..., amsgrad: bool = ...,
               eps_root: bool = ..., stochastic: bool = ..., master_weights: bool = ...) -> int: ...
count_nonfinite_capsule: Any
def openmp_enabled() -> bool: ...
def openmp_version() -> int: ...
def max_threads() -> int: ...
def team_size(num_threads: int) -> int: ...
def build_info() -> dict[str, Any]: ...
