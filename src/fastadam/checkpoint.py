"""``fastadam.save`` / ``fastadam.load``: optimizer checkpoints without pickle.

A checkpoint is an ``.npz`` archive (read with ``allow_pickle=False``): one array per
state buffer and a JSON header with the format version, the groups' hyperparameters and
the step counts. It is written to a temporary file in the target's directory, flushed
and fsync'ed, then renamed over the target, so a crash mid-save leaves the previous
checkpoint intact. Integrity needs no checksum of its own: every member of the archive
(header and arrays) carries zip's CRC-32, which the reader checks, so a damaged file is a
ValueError or, for damage to fields zip ignores (timestamps), loads exactly as saved. Learning-rate schedules are code, not data: a group whose ``lr`` is a
callable is saved as such and keeps the optimizer's own callable on load (its position
comes back with the step counts).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import zipfile
import zlib
from typing import Any, Dict, Tuple, Union

import numpy as np

from fastadam.optim import Adam

FORMAT = "fastadam-optimizer-checkpoint"
VERSION = 1
HEADER = "__fastadam__"
PathLike = Union[str, "os.PathLike[str]"]


def _json_hyperparameters(group: Dict[str, Any]) -> Dict[str, Any]:
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
    for i, entry in state_dict["state"].items():
        steps[str(i)] = entry["step"]
        for key, value in entry.items():
            if key != "step":
                arrays[f"state/{i}/{key}"] = value
    header = {
        "format": FORMAT,
        "version": VERSION,
        "param_groups": [
            {**_json_hyperparameters(g), "params": g["params"]} for g in state_dict["param_groups"]
        ],
        "steps": steps,
    }
    write_npz_atomically(path, header, arrays)


def write_npz_atomically(path: PathLike, header: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> None:
    """Write ``arrays`` and the JSON ``header`` as an .npz archive at ``path``, atomically:
    into a temporary file in the same directory, flushed and fsync'ed, then renamed."""
    arrays = {**arrays, HEADER: np.array(json.dumps(header))}
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    # Mode 0666 filtered by the umask, as open() would give (mkstemp would make 0600).
    tmp = os.path.join(directory, f".fastadam-{os.getpid()}-{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # keys are never 'allow_pickle'
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(opt: Adam, path: PathLike) -> None:
    """Restore ``opt``'s state from a checkpoint written by :func:`save`.

    Raises FileNotFoundError for a missing file and ValueError for a truncated, corrupt
    or foreign file or one that does not match ``opt`` (nothing is changed then).
    """
    if not isinstance(opt, Adam):
        raise TypeError(f"opt must be a fastadam.Adam or AdamW, got {type(opt).__name__}")
    path = os.fspath(path)
    header, arrays = read_npz(path)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastadam optimizer checkpoint")
    if header.get("version") != VERSION:
        raise ValueError(f"{path} has checkpoint version {header.get('version')!r}; "
                         f"this fastadam reads version {VERSION}")
    opt.load_state_dict(_state_dict(opt, header, arrays, path))


# The first four bytes of a zip archive (np.savez's format): a local file header, or the
# end-of-directory record of an empty archive.
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


class NotAnArchive(ValueError):
    pass


def read_npz(path: str) -> Tuple[Any, Dict[str, np.ndarray]]:
    """The JSON header and the arrays of an archive written by :func:`write_npz_atomically`.

    Raises FileNotFoundError for a missing file and ValueError for a truncated, corrupt or
    foreign one.
    """
    try:
        with open(path, "rb") as f:
            # Not a zip archive: say so here. np.load would try the other formats and, for
            # anything it takes for a pickle, advise loading it "unsafely" (issue 23).
            magic = f.read(4)
            if magic not in ZIP_MAGIC:
                raise NotAnArchive(f"{path} is not a readable fastadam checkpoint (not an .npz archive: "
                                   f"it starts with {magic!r})")
            f.seek(0)
            archive = np.load(f, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            with archive:
                if HEADER not in archive.files:
                    raise ValueError("no fastadam header")
                for name in archive.files:
                    _check_declared_size(archive, name)
                header = json.loads(str(archive[HEADER]))
                arrays = {name: archive[name] for name in archive.files if name != HEADER}
    except (FileNotFoundError, NotAnArchive):
        raise
    # What a corrupt zip can raise besides BadZipFile (found by tests/test_fuzz.py): zlib's
    # error for a damaged compressed member, NotImplementedError for a compression method,
    # zip version or flag it does not read, RuntimeError for a member marked as encrypted.
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError,
            UnicodeDecodeError, zlib.error, NotImplementedError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a readable fastadam checkpoint ({exc})") from None
    return header, arrays


def _check_declared_size(archive: Any, name: str) -> None:
    """Refuse a member whose .npy header declares more data than the member holds, before
    NumPy allocates the declared size (a corrupt header would otherwise be a MemoryError,
    or a huge allocation, instead of a ValueError)."""
    member = f"{name}.npy"
    size = archive.zip.getinfo(member).file_size
    with archive.zip.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    declared = math.prod(shape) * dtype.itemsize
    if declared > size:
        raise ValueError(f"{name} declares {declared} bytes of data, its member holds {size}")


def _state_dict(opt: Adam, header: Dict[str, Any], arrays: Dict[str, np.ndarray],
                path: str) -> Dict[str, Any]:
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
        for name, array in arrays.items():
            _, index, key = name.split("/")
            state[int(index)][key] = array
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path} has a malformed fastadam header ({exc!r})") from None
    return {"state": state, "param_groups": groups}
