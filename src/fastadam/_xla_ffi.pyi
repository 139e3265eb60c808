# Stubs of the compiled module fastadam._xla_ffi (private: fastadam.jax's XLA FFI handler).
from typing import Any

import numpy as np

from fastadam._validation import Hyperparameters

TARGET_NAME: str

def handler() -> Any: ...
def api_version() -> tuple[int, int]: ...
def hyper_attributes(
    record: Hyperparameters,
    num_threads: int,
    traced_lr: bool,
    decayed_leaves: int,
    increment_count: bool,
) -> dict[str, np.generic]: ...
