"""Hints at the point of error: messages that tell a user what to do instead.

Helpers for the front ends and the validation module, kept here so those files only
call them. Nothing here imports a framework: objects are recognised by their type's
module, and torch tensors by duck typing.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator, Mapping, Sequence

# The optional frameworks, their front ends and the extra that installs them
FRONT_ENDS = {
    "torch": ("fastadam.torch", 'pip install torch (or "fastadam[torch]")'),
    "keras": ("fastadam.keras", 'pip install keras (or "fastadam[keras]"); fastadam.keras '
                                "runs its kernels on Keras's torch backend"),
}


def missing_framework(framework: str, exc: ImportError) -> ModuleNotFoundError:
    """The error for ``import fastadam.torch``/``fastadam.keras`` without the framework:
    names what to install, as ``fastadam.distributed`` does for mpi4py."""
    module, install = FRONT_ENDS[framework]
    error = ModuleNotFoundError(f"{module} needs {framework}, which is not installed: {install}. "
                                f"(import {framework} failed: {exc})", name=framework)
    return error


def framework_hint(obj: Any) -> str:
    """A sentence to append to a "got <type>" message when ``obj`` is a framework's
    tensor or variable (which fastadam's NumPy-level API cannot update in place)."""
    module = type(obj).__module__.split(".")[0]
    if module == "torch":
        return ("; for torch tensors use fastadam.torch.Adam (a torch.optim.Optimizer), or "
                "pass tensor.numpy() of a CPU tensor (a view of its memory)")
    if module in ("keras", "tensorflow"):
        return "; for Keras variables use fastadam.keras.Adam (a keras.optimizers.Optimizer)"
    if module in ("jax", "jaxlib"):
        return ("; JAX arrays are immutable, and fastadam updates buffers in place: keep the "
                "parameters in NumPy arrays")
    return ""


@contextlib.contextmanager
def keyword_names(prefix: str = "defaults") -> Iterator[None]:
    """Re-raise a hyperparameter error of a constructor in the words of its keyword
    arguments: ``betas`` rather than ``defaults['betas']`` (the dict they are kept in)."""
    try:
        yield
    except (TypeError, ValueError) as exc:
        message = str(exc)
        renamed = re.sub(rf"\b{prefix}\['(\w+)'\]", r"\1", message)
        renamed = re.sub(rf"^{prefix}: ", "", renamed)
        if renamed == message:
            raise
        raise type(exc)(renamed) from None


def check_torch_params(group: Mapping[str, Any], index: int, dtypes: Sequence[Any],
                       why: str = "") -> None:
    """Refuse, when a param group is added, the parameters fastadam.torch can never update
    (of a dtype not in ``dtypes``, or not strided), naming each by its place, its name
    when the group has ``param_names``, and its shape; so a float16 model fails at
    ``Adam(model.parameters())``, not at the first ``step()``. The device is checked at
    each step instead: a model built on the meta device and moved to the CPU
    (``to_empty``) after the optimizer was made is a common pattern."""
    names = group.get("param_names")
    for i, p in enumerate(group["params"]):
        where = f"param_groups[{index}]['params'][{i}]"
        if names is not None and i < len(names):
            where += f" ({names[i]!r})"
        shape = f"shape {tuple(p.shape)}"
        if p.dtype not in dtypes:
            names = [str(d).replace("torch.", "") for d in dtypes]
            allowed = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
            raise TypeError(f"{where} has dtype {p.dtype} ({shape}); fastadam.torch updates "
                            f"{allowed} parameters"
                            + (f" ({why})" if why else ": convert the model first (model.float()) "
                               "or use torch.optim.Adam for it"))
        if str(p.layout) != "torch.strided":
            raise TypeError(f"{where} has layout {p.layout}; fastadam.torch updates dense "
                            f"(strided) parameters ({shape})")
