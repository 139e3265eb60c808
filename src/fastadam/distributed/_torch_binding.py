"""A PyTorch model's parameters as :mod:`fastadam.distributed`'s flat block.

torch is never imported here until a tensor is given: tensors are recognised through
``sys.modules``, so ``import fastadam.distributed`` imports no framework.
"""

from __future__ import annotations

import sys
from typing import Any, List, Optional, Tuple

import numpy as np

from fastadam._validation import check_element_dtype, check_no_overlap
from fastadam.flat import FlatParams

__all__ = ["TorchBinding", "is_torch_tensor", "torch_tensors"]


def is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # never import torch here: only recognise its tensors
    return torch is not None and isinstance(obj, torch.Tensor)


def _numpy(t: Any) -> np.ndarray:
    """A CPU tensor's memory as a NumPy array (a bfloat16 one with the dtype of
    ``FlatParams(..., "bfloat16")``: NumPy has no bfloat16 of its own)."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.detach().view(torch.int16).numpy().view(check_element_dtype("bfloat16"))
    return t.detach().numpy()


def _tensor(array: np.ndarray, dtype: Any) -> Any:
    """A torch tensor of ``dtype`` sharing ``array``'s memory."""
    import torch

    if dtype == torch.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _is_buffer(obj: Any) -> bool:
    if isinstance(obj, np.ndarray):
        return True
    try:
        memoryview(obj)
    except TypeError:
        return False
    return True


class TorchBinding:
    """A PyTorch model's parameters moved into a FlatParams: each ``p.data`` becomes a view
    of the flat block (zero-copy from then on); each step copies ``p.grad`` into the flat
    gradient block unless it already is a view of it."""

    @staticmethod
    def check(tensors: List[Any]) -> Tuple[int, np.dtype]:
        """The element count and dtype of these tensors, after checking they can be bound."""
        import torch

        for i, p in enumerate(tensors):
            name = f"params[{i}]"
            if p.device.type != "cpu" or p.layout != torch.strided:
                raise TypeError(f"{name} must be a dense CPU tensor, got {p.layout} on {p.device}")
            if p.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
                raise TypeError(f"{name} must have dtype float32, float64, bfloat16 or float16, "
                                f"got {p.dtype}")
            if p.dtype != tensors[0].dtype:
                raise TypeError(f"{name} has dtype {p.dtype}, params[0] has {tensors[0].dtype}: "
                                "one ShardedAdam takes parameters of one dtype")
        arrays = [_numpy(p) for p in tensors]
        check_no_overlap([a.reshape(-1) for a in arrays], [f"params[{i}]" for i in range(len(arrays))])
        return sum(a.size for a in arrays), arrays[0].dtype

    def __init__(self, tensors: List[Any]):
        self.tensors = tensors
        self.flat = FlatParams.from_arrays([_numpy(p) for p in tensors])
        for p, view, grad_view in zip(tensors, self.flat.params, self.flat.grads):
            p.data = _tensor(view, p.dtype)
            if p.grad is not None and not p.grad.is_sparse:
                grad_view[...] = _numpy(p.grad)
                p.grad = _tensor(grad_view, p.dtype)

    def collect_grads(self) -> None:
        """Bring every ``.grad`` into the flat gradient block (a missing grad counts as
        zero); refuse parameters that no longer live in the flat block."""
        for i, (p, view, grad_view) in enumerate(zip(self.tensors, self.flat.params, self.flat.grads)):
            if p.data_ptr() != view.ctypes.data or tuple(p.shape) != view.shape:
                raise ValueError(f"params[{i}] no longer lives in ShardedAdam's flat block (was it "
                                 "moved, resized or assigned a new .data?)")
            grad = p.grad
            # (torch itself keeps .grad's shape, dtype and device those of the param)
            if grad is None:
                grad_view.fill(0)
            elif grad.is_sparse:
                raise TypeError(f"params[{i}].grad is sparse; ShardedAdam takes dense gradients")
            elif grad.data_ptr() != grad_view.ctypes.data:
                grad_view[...] = _numpy(grad)


def torch_tensors(params: Any) -> Optional[List[Any]]:
    """``params`` as a list of torch tensors, or None for a FlatParams or a buffer."""
    if is_torch_tensor(params):  # one tensor, as torch.optim allows
        return [params]
    if isinstance(params, FlatParams) or _is_buffer(params) or not hasattr(params, "__iter__"):
        return None
    tensors = list(params)
    if not tensors or not all(is_torch_tensor(p) for p in tensors):
        raise TypeError("params must be a FlatParams, a flat buffer or a sequence of torch "
                        "tensors; for NumPy arrays, use FlatParams.from_arrays(arrays)")
    return tensors
