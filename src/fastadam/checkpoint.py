"""``fastadam.save`` / ``fastadam.load``: the optimizer checkpoint format.

A checkpoint is one of fastadam's ``.npz`` archives (:mod:`fastadam._npz`: written
atomically, read without pickle): one array per state buffer, named
``state/<index>/<key>``, and a JSON header with the format name and version, the groups'
hyperparameters and the step counts. A crash mid-save leaves the previous checkpoint
intact. Integrity needs no checksum of its own: every member of the archive (header and
arrays) carries zip's CRC-32, which the reader checks, so a damaged file is a ValueError
or, for damage to fields zip ignores (timestamps), loads exactly as saved.
Learning-rate schedules are code, not data: a group whose ``lr`` is a callable is saved
as such and keeps the optimizer's own callable on load (its position comes back with the
step counts).

The sharded checkpoints of :mod:`fastadam.distributed` encode hyperparameters and step
counts the same way (:func:`hyperparameters_to_json`, :func:`state_dict_from_archive`).
"""

from __future__ import annotations

import os
from typing import Any, Dict

import numpy as np

from fastadam._npz import PathLike, check_format, read_npz, write_npz_atomically
from fastadam._validation import BFLOAT16_BITS, is_bfloat16
from fastadam.optim import Adam

__all__ = ["load", "save"]

FORMAT = "fastadam-optimizer-checkpoint"
VERSION = 1


def hyperparameters_to_json(group: Dict[str, Any]) -> Dict[str, Any]:
    """A group's hyperparameters as JSON values (a schedule as its repr: code is not saved)."""
    values: Dict[str, Any] = {}
    for key, value in group.items():
        if key == "params":
            continue
        if key == "lr" and callable(value):
            values[key] = {"schedule": repr(value)}
        elif isinstance(value, (tuple, list)):
            values[key] = [float(v) for v in value]
        elif isinstance(value, (bool, np.bool_)):
            values[key] = bool(value)
        elif isinstance(value, str):  # numerics
            values[key] = value
        else:
            values[key] = float(value)
    return values


def save(opt: Adam, path: PathLike) -> None:
    """Write ``opt``'s state to ``path`` atomically (see the module docstring)."""
    if not isinstance(opt, Adam):
        raise TypeError(f"opt must be a fastadam.Adam or AdamW, got {type(opt).__name__}")
    state_dict = opt.state_dict()
    arrays: Dict[str, np.ndarray] = {}
    steps = {}
    bfloat16 = []  # NumPy's format has no bfloat16: such arrays are stored as their bits
    for i, entry in state_dict["state"].items():
        steps[str(i)] = entry["step"]
        for key, value in entry.items():
            if key != "step":
                name = f"state/{i}/{key}"
                if is_bfloat16(value.dtype):
                    value = value.view(np.uint16)
                    bfloat16.append(name)
                arrays[name] = value
    header = {
        "format": FORMAT,
        "version": VERSION,
        "param_groups": [
            {**hyperparameters_to_json(g), "params": g["params"]} for g in state_dict["param_groups"]
        ],
        "steps": steps,
        "bfloat16": bfloat16,
    }
    write_npz_atomically(path, header, arrays)


def load(opt: Adam, path: PathLike) -> None:
    """Restore ``opt``'s state from a checkpoint written by :func:`save`.

    Raises FileNotFoundError for a missing file and ValueError for a truncated, corrupt
    or foreign file or one that does not match ``opt`` (nothing is changed then); a header
    field of the wrong type (``"lr": "0.1"``, ``"params": 5``) is a damaged file too:
    ValueError, never TypeError.
    """
    if not isinstance(opt, Adam):
        raise TypeError(f"opt must be a fastadam.Adam or AdamW, got {type(opt).__name__}")
    path = os.fspath(path)
    header, arrays = read_npz(path)
    check_format(header, path, FORMAT, VERSION, "fastadam optimizer checkpoint")
    state_dict = state_dict_from_archive(opt, header, arrays, path)
    try:  # (load_state_dict checks everything before it changes anything)
        opt.load_state_dict(state_dict)
    except TypeError as exc:
        raise ValueError(f"{path} has a malformed fastadam header ({exc})") from None


def _bfloat16_dtype() -> np.dtype:
    """NumPy's bfloat16 (ml_dtypes, which bfloat16 arrays given to fastadam.Adam come
    from), else fastadam's stand-in for its bits."""
    try:
        import ml_dtypes
    except ImportError:
        return BFLOAT16_BITS
    return np.dtype(ml_dtypes.bfloat16)


def state_dict_from_archive(opt: Adam, header: Dict[str, Any], arrays: Dict[str, np.ndarray],
                            path: str) -> Dict[str, Any]:
    """The state dict for ``opt.load_state_dict`` that a checkpoint's header and arrays
    describe (not yet checked against ``opt``); a malformed header is a ValueError."""
    try:
        groups = []
        for saved, current in zip(header["param_groups"], opt.param_groups):
            group = dict(saved)
            if isinstance(group.get("lr"), dict):  # a schedule is code: keep the optimizer's
                group["lr"] = current["lr"]
            group["betas"] = tuple(group["betas"])
            groups.append(group)
        groups += header["param_groups"][len(groups):]  # a count mismatch is reported on load
        state: Dict[int, Dict[str, Any]] = {}
        for index, step in header["steps"].items():
            state[int(index)] = {"step": step}
        bfloat16 = set(header.get("bfloat16", ()))
        for name, array in arrays.items():
            _, index, key = name.split("/")
            state[int(index)][key] = (array.view(_bfloat16_dtype())
                                      if name in bfloat16 and array.dtype == np.uint16 else array)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ValueError(f"{path} has a malformed fastadam header ({exc!r})") from None
    return {"state": state, "param_groups": groups}
