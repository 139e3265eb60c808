# Stubs of the compiled module fastadam._table (private: the compiled core of
# fastadam._engine, which calls it with validated arguments).
from typing import Optional, Union

import numpy as np
from typing_extensions import disjoint_base

from fastadam._validation import Hyperparameters

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
        float_steps: Optional[np.ndarray] = None,
        masters: Optional[list[Optional[np.ndarray]]] = None,
        rounding_seed: Optional[int] = None,
    ) -> AdamTable: ...
    def runs(self) -> list[tuple[int, int]]: ...
    @property
    def records_in_last_pass(self) -> int: ...
    def count_nonfinite(self, grads: list[Union[None, np.ndarray, tuple[np.ndarray, np.ndarray]]], num_threads: int) -> int: ...
    def count_nonfinite_pointers(self, addresses: np.ndarray, num_threads: int) -> int: ...
    def active_elements(self) -> int: ...
    def step(
        self,
        grads: list[Union[None, np.ndarray, tuple[np.ndarray, np.ndarray]]],
        hypers: list[Hyperparameters],
        grad_scale: float,
        num_threads: int,
    ) -> None: ...
    def step_pointers(
        self,
        addresses: np.ndarray,
        hypers: list[Hyperparameters],
        grad_scale: float,
        num_threads: int,
    ) -> None: ...
