# Stubs of the compiled module fastadam._kernels (private: fastadam._functional,
# fastadam._validation and fastadam._threads call it with validated arguments).
from typing import Any, Optional, Sequence, Union

import numpy as np
from typing_extensions import disjoint_base

def adam_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: Optional[np.ndarray],
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    eps_hat: bool,
    eps_root: float,
    grad_scale: float,
    num_threads: int,
) -> None: ...
def adam_step_rows(
    param: np.ndarray,
    grad_rows: np.ndarray,
    rows: np.ndarray,
    row_size: int,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: Optional[np.ndarray],
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    eps_hat: bool,
    eps_root: float,
    grad_scale: float,
    num_threads: int,
) -> None: ...
def sum_sorted_rows(out: np.ndarray, values: np.ndarray, order: np.ndarray, first: np.ndarray) -> None: ...
def chunk_table(sizes: Sequence[int]) -> np.ndarray: ...
def run_chunks_from(
    first_element: int,
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: Optional[np.ndarray],
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    eps_hat: bool,
    eps_root: float,
    grad_scale: float,
    num_threads: int,
) -> tuple[int, list[tuple[int, int]]]: ...
def first_overlap(arrays: list[np.ndarray]) -> Optional[tuple[int, int]]: ...
def max_int64(values: np.ndarray) -> int: ...
def set_kernels(small: tuple[Any, Any], large: tuple[Any, Any], small_limit: int) -> None: ...
def cpu_levels() -> list[str]: ...

run_chunk_capsule: Any
count_nonfinite_capsule: Any
def openmp_enabled() -> bool: ...
def openmp_version() -> int: ...
def max_threads() -> int: ...
def team_size(num_threads: int) -> int: ...
def build_info() -> dict[str, Any]: ...

@disjoint_base
class AdamTable:
    # A cdef class: its arguments go to __cinit__, which Cython runs from __new__.
    def __new__(
        cls,
        params: list[np.ndarray],
        exp_avgs: list[np.ndarray],
        exp_avg_sqs: list[np.ndarray],
        max_exp_avg_sqs: list[Optional[np.ndarray]],
        steps: np.ndarray,
        group_of: list[int],
    ) -> AdamTable: ...
    def overlaps_written(self, array: np.ndarray) -> bool: ...
    def runs(self) -> list[tuple[int, int]]: ...
    @property
    def records_in_last_pass(self) -> int: ...
    def first_nonconforming(self, grads: list[Any]) -> int: ...
    def count_nonfinite(
        self, grads: list[Union[np.ndarray, tuple[np.ndarray, np.ndarray]]], num_threads: int
    ) -> int: ...
    def step(
        self,
        grads: Sequence[Union[np.ndarray, tuple[np.ndarray, np.ndarray]]],
        groups: Sequence[tuple[float, float, float, float, float, float, bool, bool, bool, bool]],
        grad_scale: float,
        num_threads: int,
    ) -> None: ...
