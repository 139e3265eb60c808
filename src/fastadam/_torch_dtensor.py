"""fastadam.torch on ``DTensor`` parameters: FSDP2's (``torch.distributed.fsdp.fully_shard``),
and any other DTensor whose shards are in this process's CPU memory.

Adam's update is elementwise, so a rank updates its own elements (the DTensor's local
shard) with its own shard of the gradient and of the state, and nothing else: a step
needs no communication. fastadam.torch therefore hands the engine each DTensor's local
tensor, as it hands it a plain tensor, and takes each gradient's local shard where it
would take the gradient; its state is shown in ``opt.state`` as DTensors sharded like the
parameter (views of the engine's memory, as for plain tensors), which is what torch's
optimizers keep for DTensor parameters and what ``torch.distributed.checkpoint`` saves,
loads and re-shards. ``state["step"]`` stays a plain tensor, as torch's.

Nothing here communicates, so a refusal never leaves other ranks waiting in a
collective of fastadam's; and everything refused is decided from what every rank
shares (placements, device mesh, global shape, where shards live), so every rank of an
SPMD program refuses the same step with the same error.

CPU offload: FSDP2's ``CPUOffloadPolicy`` keeps sharded parameters and their gradients
as DTensors on the accelerator's device mesh whose local tensors are in CPU memory. The
checks here look at where the local tensors are, not at the mesh's device type, and the
state's DTensors are built on the parameter's own spec (as FSDP2 builds its own), never
moved to the mesh's device: the same code path serves that case.

Imported by fastadam.torch only once it meets a DTensor (this imports
``torch.distributed``).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta


def refusal(p: DTensor, name: str, unsupported: type) -> Optional[Exception]:
    """Why fastadam.torch cannot update this DTensor in place (an ``unsupported``
    exception to raise), or None when its local shard is for the checks every tensor
    takes (dtype, layout)."""
    placements = p.placements
    if any(placement.is_partial() for placement in placements):
        return unsupported(
            f"{name} is a DTensor with placements {placements}: a Partial placement holds "
            "summands of each element, and Adam's update is not linear; redistribute it "
            "to Shard or Replicate placements first")
    local = p._local_tensor
    if local.device.type != "cpu":
        return unsupported(
            f"{name} is a DTensor whose local shard is on {local.device} (device mesh of "
            f"type {p.device_mesh.device_type!r}); fastadam.torch updates shards in CPU memory: "
            "a CPU device mesh, or FSDP2's CPUOffloadPolicy on an accelerator's mesh")
    return None


def local_grads(owners: Sequence[Any], shards: Sequence[torch.Tensor]) -> List[Any]:
    """The gradients of DTensor parameters as the compiled gather takes them, per step:
    the local shard of a gradient sharded like its parameter, None without a gradient.
    Anything else goes to the gather as it is (not a plain tensor, it sends the step down
    fastadam.torch's general path, which refuses it by name with :func:`local_grad`), and
    so does the gradient of a parameter whose local tensor was replaced (the general path
    follows the new one)."""
    grads: List[Any] = []
    for p, shard in zip(owners, shards):
        g = p.grad
        if g is None:
            grads.append(None)
        elif type(g) is DTensor and p._local_tensor is shard and _sharded_alike(g, p):
            grads.append(g._local_tensor)
        else:
            grads.append(g)
    return grads


def local_grad(p: DTensor, name: str) -> Optional[torch.Tensor]:
    """The local shard of the gradient of DTensor parameter ``p`` (None without one);
    refuses, naming the parameter, a gradient that is not a DTensor sharded like it."""
    g = p.grad
    if g is None:
        return None
    return _local_like(g, p, f"the gradient of {name}")


def local_state(value: torch.Tensor, p: DTensor, name: str) -> torch.Tensor:
    """The local shard of a state tensor (``exp_avg`` and the like) of DTensor parameter
    ``p``, as a loaded or user-written ``opt.state`` holds it; refuses anything not
    sharded like the parameter (as torch's own optimizers do, whose DTensor operations
    take no plain tensors)."""
    return _local_like(value, p, name)


def as_state(shard: torch.Tensor, p: DTensor) -> DTensor:
    """The DTensor of ``p``'s sharding whose local tensor is ``shard`` (a view of the
    engine's state for ``p``'s local shard, of p's dtype, or float32 for the master copy
    of a 16-bit parameter and its moments), without copying or moving it: built on p's
    spec as FSDP2 builds its parameters (``DTensor.from_local`` would move a CPU shard
    onto an accelerator mesh's device; under CPUOffloadPolicy it must stay)."""
    spec = p._spec
    meta = spec.tensor_meta
    if meta is not None and meta.dtype != shard.dtype:
        spec = DTensorSpec(spec.mesh, spec.placements,
                           tensor_meta=TensorMeta(meta.shape, meta.stride, shard.dtype))
    return DTensor(shard, spec, requires_grad=False)


def _sharded_alike(t: DTensor, p: DTensor) -> bool:
    spec, like = t._spec, p._spec
    return ((spec.mesh is like.mesh or spec.mesh == like.mesh)
            and spec.placements == like.placements and t.shape == p.shape)


def _local_like(t: Any, p: DTensor, name: str) -> torch.Tensor:
    if not isinstance(t, DTensor):
        raise TypeError(f"{name} is a {type(t).__name__}, not a DTensor sharded like its "
                        f"parameter ({p.placements} on {p.device_mesh}): fastadam.torch "
                        "updates each rank's shard with its shard of the gradient and state")
    if not (t.device_mesh is p.device_mesh or t.device_mesh == p.device_mesh):
        raise ValueError(f"{name} is on device mesh {t.device_mesh}, its parameter on "
                         f"{p.device_mesh}")
    if t.placements != p.placements:
        raise ValueError(f"{name} has placements {t.placements}, its parameter "
                         f"{p.placements}: redistribute it to the parameter's "
                         "(t.redistribute(p.device_mesh, p.placements))")
    if t.shape != p.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, its parameter "
                         f"{tuple(p.shape)}")
    return t._local_tensor
