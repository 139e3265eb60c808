# Stubs of the compiled module fastadam._torch_gather (private: fastadam.torch's
# per-step loop over its parameters).
from typing import Any, Callable

import numpy as np
from typing_extensions import disjoint_base

@disjoint_base
class Gather:
    def __init__(
        self,
        params: list[Any],
        dtypes: list[Any],
        shapes: list[Any],
        strides: list[tuple[int, ...]],
        addresses: np.ndarray,
        sizes: np.ndarray,
        tensor_type: type,
        make_layout_check: Callable[[list[Any]], Callable[..., bool]] | None = None,
    ) -> None: ...
    def run(self, out: np.ndarray, grads: list[Any] | None = None) -> tuple[int, int]: ...

def torch_layout_guards() -> Callable[[list[Any]], Callable[..., bool]] | None: ...
