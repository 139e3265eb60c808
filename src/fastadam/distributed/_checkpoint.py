"""The sharded checkpoint format of :mod:`fastadam.distributed` (:func:`save`, :func:`load`).

A checkpoint is a directory: one archive per rank (``shard-<id>-<rank>.npz``) with that
rank's shard of the state, and ``index.npz``, written last (the commit), naming the
checkpoint id, the shard bounds, the model's size and dtype, the hyperparameters and the
step count. A 16-bit model's shards hold its float32 ``master_param`` beside the moments. The archives are fastadam's (:mod:`fastadam._npz`: atomic, no pickle), and the
hyperparameters and step counts are encoded as in the optimizer checkpoint
(:mod:`fastadam.checkpoint`). Every part is collective: when one rank fails, every rank
raises (:func:`fastadam.distributed._collectives.agree`).
"""

from __future__ import annotations

import os
import re
import secrets
from typing import Any, Dict, List, Optional

import numpy as np

from fastadam._engine import STATE_KEYS
from fastadam._npz import check_format, read_npz, write_npz_atomically
from fastadam._validation import type_name
from fastadam.checkpoint import hyperparameters_to_json, state_dict_from_archive
from fastadam.distributed._collectives import agree
from fastadam.distributed._sharded_adam import ShardedAdam

__all__ = ["load", "save"]

FORMAT = "fastadam-sharded-checkpoint"
SHARD_FORMAT = "fastadam-sharded-checkpoint-shard"
VERSION = 1
INDEX = "index.npz"


def _shard_name(checkpoint_id: str, rank: int) -> str:
    return f"shard-{checkpoint_id}-{rank:05d}.npz"


def _check_sharded(opt: Any) -> None:
    if not isinstance(opt, ShardedAdam):
        raise TypeError(f"opt must be a fastadam.distributed.ShardedAdam, got {type(opt).__name__}")


def save(opt: ShardedAdam, directory: Any) -> None:
    """Write ``opt``'s sharded state into ``directory`` (collective; see :mod:`fastadam.distributed`).

    Each rank writes its shard atomically (``shard-<id>-<rank>.npz``); then rank 0 writes
    ``index.npz``, the commit, and removes the files of the checkpoint it replaces: the
    shards its index named, and shard files of interrupted saves (names fastadam makes,
    whose header says they are fastadam shards). Nothing else in ``directory`` is ever
    removed. If any rank fails, every rank raises (OSError; TypeError for a ``directory``
    that is not a path) and the previous checkpoint stays as it was. ``directory`` must be
    the same path on a file system every rank can reach.
    """
    _check_sharded(opt)
    checkpoint_id = opt.comm.bcast(secrets.token_hex(8), root=0)
    state = opt.state
    start, stop = opt.shard
    mine = None
    error: Optional[BaseException] = None
    try:
        directory = os.fspath(directory)
        mine = os.path.join(directory, _shard_name(checkpoint_id, opt.rank))
        os.makedirs(directory, exist_ok=True)
        write_npz_atomically(mine, {"format": SHARD_FORMAT, "version": VERSION, "id": checkpoint_id,
                                    "rank": opt.rank, "start": start, "stop": stop},
                             {f"state/0/{key}": value for key, value in state.items() if key != "step"})
    except Exception as exc:  # raised on every rank by agree
        error = exc
    try:
        agree(opt.comm, error, "write its shard", OSError)
        if opt.rank == 0:
            try:
                error = _commit(opt, directory, checkpoint_id)
            except Exception as exc:  # (rank 0 alone: the others wait in agree for it)
                error = exc
        agree(opt.comm, error, "commit the checkpoint index", OSError)
    except OSError:
        if mine is not None and os.path.exists(mine):  # uncommitted: the old checkpoint stays valid
            os.unlink(mine)
        raise


def _commit(opt: ShardedAdam, directory: str, checkpoint_id: str) -> Optional[OSError]:
    """Rank 0: write the index naming this checkpoint's shards, then remove the shards of
    the checkpoint it replaces (and of any interrupted save): only files fastadam wrote."""
    try:
        replaced = _our_old_shards(directory, checkpoint_id)  # (read before the index changes)
    except OSError:  # (an unlistable directory: nothing is removed)
        replaced = []
    state = opt.state
    header = {
        "format": FORMAT, "version": VERSION, "id": checkpoint_id,
        "world_size": opt.world_size, "total": int(opt.params.size),
        "dtype": type_name(opt.params.dtype), "bounds": [list(b) for b in opt.bounds],
        "param_groups": [{**hyperparameters_to_json(opt.param_groups[0]), "params": [0]}],
        "steps": {"0": state["step"]}, "skipped_steps": opt.skipped_steps,
        "state_keys": [key for key in state if key != "step"],
    }
    try:
        write_npz_atomically(os.path.join(directory, INDEX), header, {})
    except OSError as exc:
        return exc
    for name in replaced:
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:  # already gone, or not ours to remove: the checkpoint is valid
            pass
    return None


_SHARD_NAME = re.compile(r"shard-([0-9a-f]{16})-([0-9]{5})\.npz")


def _our_old_shards(directory: str, checkpoint_id: str) -> List[str]:
    """The shard files in ``directory`` that fastadam wrote for another checkpoint: those
    the current index names, and those of interrupted saves (a name :func:`_shard_name`
    makes and a header that says so). Any other file is the user's, whatever its name
    (a ``shard-*`` glob once deleted a user's ``shard-00000-of-00002.tar``: issue 19)."""
    old: List[str] = []
    try:
        header, _ = read_npz(os.path.join(directory, INDEX), header_only=True)
        if isinstance(header, dict) and header.get("format") == FORMAT:
            old_id, count = header.get("id"), header.get("world_size")
            if isinstance(old_id, str) and isinstance(count, int) and 0 < count < 100_000:
                old = [_shard_name(old_id, rank) for rank in range(count)]
    except (OSError, ValueError):  # no index yet, or not readable: nothing of it to remove
        pass
    for name in os.listdir(directory):
        match = _SHARD_NAME.fullmatch(name)
        if match and match.group(1) != checkpoint_id and name not in old:
            try:
                shard, _ = read_npz(os.path.join(directory, name), header_only=True)
            except (OSError, ValueError):
                continue
            if isinstance(shard, dict) and shard.get("format") == SHARD_FORMAT and shard.get("id") == match.group(1):
                old.append(name)
    # (never the new checkpoint's, nor a name fastadam does not make)
    return [name for name in old if (m := _SHARD_NAME.fullmatch(name)) and m.group(1) != checkpoint_id]


def load(opt: ShardedAdam, directory: Any) -> None:
    """Restore a checkpoint written by :func:`save` (collective).

    With the rank count it was saved with, each rank reads its own shard file; with another,
    each rank reads the files covering its new shard (re-sharding). Raises
    FileNotFoundError if there is no checkpoint, and ValueError for a corrupt, incomplete
    or mismatching one; then no rank changes anything.
    """
    _check_sharded(opt)
    path_error: Optional[TypeError] = None
    try:
        directory = os.fspath(directory)
    except TypeError as exc:  # raised on every rank by agree, below
        path_error = exc
    header: Any = None
    if opt.rank == 0:  # every failure is broadcast: no rank may wait alone in bcast
        try:
            if path_error is not None:
                raise path_error
            header = _read_index(directory, opt)
        except (OSError, ValueError, TypeError) as exc:
            header = exc
        except Exception as exc:
            header = ValueError(f"{directory!r}: unreadable checkpoint index ({exc!r})")
    header = opt.comm.bcast(header, root=0)
    if isinstance(header, BaseException):  # the same error on every rank
        raise header
    state_dict: Dict[str, Any] = {}
    error: Optional[BaseException] = None
    try:
        if path_error is not None:
            raise path_error
        state_dict = _read_shard_state(directory, opt, header)
    except (OSError, ValueError, TypeError) as exc:
        error = exc
    except Exception as exc:
        error = ValueError(f"{directory!r}: unreadable checkpoint shard ({exc!r})")
    agree(opt.comm, error, "read its part of the checkpoint")
    opt._adam.load_state_dict(state_dict)
    opt.skipped_steps = header["skipped_steps"]


def _read_index(directory: str, opt: ShardedAdam) -> Dict[str, Any]:
    path = os.path.join(directory, INDEX)
    header, _ = read_npz(path)
    check_format(header, path, FORMAT, VERSION, "fastadam sharded checkpoint index")
    total, dtype = int(opt.params.size), type_name(opt.params.dtype)
    if header.get("total") != total or header.get("dtype") != dtype:
        raise ValueError(f"{path} holds state for {header.get('total')} x {header.get('dtype')} "
                         f"parameters, the optimizer has {total} x {dtype}")
    bounds, world_size = header.get("bounds"), header.get("world_size")
    if (not _is_count(world_size) or not isinstance(bounds, list) or len(bounds) != world_size
            or not all(isinstance(b, list) and len(b) == 2 and all(_is_count(x) for x in b)
                       and b[0] <= b[1] for b in bounds)
            or [b[0] for b in bounds[1:]] != [b[1] for b in bounds[:-1]]
            or not bounds or bounds[0][0] != 0 or bounds[-1][1] != total):
        raise ValueError(f"{path} has malformed shard bounds")
    checkpoint_id = header.get("id")
    if not isinstance(checkpoint_id, str) or not re.fullmatch(r"[0-9a-f]{16}", checkpoint_id):
        raise ValueError(f"{path} has a malformed checkpoint id")
    keys = header.get("state_keys")
    if (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)
            or not {"exp_avg", "exp_avg_sq"} <= set(keys) <= set(STATE_KEYS)):
        raise ValueError(f"{path} has malformed state keys")
    header.setdefault("skipped_steps", 0)
    if not _is_count(header["skipped_steps"]):
        raise ValueError(f"{path} has a malformed skipped_steps")
    return header


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _read_shard_state(directory: str, opt: ShardedAdam, header: Dict[str, Any]) -> Dict[str, Any]:
    """This rank's state dict (for the inner Adam), assembled from the saved shards that
    overlap its shard, fully checked."""
    start, stop = opt.shard
    dtype = opt._adam.engine.state_dtype(0)  # float32 for a 16-bit model's master and moments
    names = [f"state/0/{key}" for key in header["state_keys"]]
    pieces: Dict[str, List[np.ndarray]] = {name: [] for name in names}
    for rank, (a, b) in enumerate(header["bounds"]):
        low, high = max(a, start), min(b, stop)
        if low >= high:
            continue
        path = os.path.join(directory, _shard_name(header["id"], rank))
        shard_header, arrays = read_npz(path)
        if (not isinstance(shard_header, dict) or shard_header.get("format") != SHARD_FORMAT
                or shard_header.get("id") != header["id"]
                or [shard_header.get("start"), shard_header.get("stop")] != [a, b]):
            raise ValueError(f"{path} does not belong to this checkpoint (an interrupted save?)")
        if sorted(arrays) != sorted(names):
            raise ValueError(f"{path} holds {sorted(arrays)}, the index names {sorted(names)}")
        for name, array in arrays.items():
            if array.dtype != dtype or array.shape != (b - a,):
                raise ValueError(f"{path}: {name} is {array.shape} {type_name(array.dtype)}, "
                                 f"expected ({b - a},) {type_name(dtype)}")
            pieces[name].append(array[low - a:high - a])
    arrays = {name: np.concatenate(parts) if parts else np.zeros(0, dtype)
              for name, parts in pieces.items()}
    state_dict = state_dict_from_archive(opt._adam, header, arrays, os.path.join(directory, INDEX))
    try:
        opt._adam.check_state_dict(state_dict)
    except TypeError as exc:  # a header field of the wrong type: a damaged file
        raise ValueError(f"{os.path.join(directory, INDEX)} has a malformed fastadam header ({exc})") from None
    return state_dict

