"""The archive format under fastadam's checkpoints: ``.npz`` files with a JSON header,
written atomically and read without pickle.

An archive is a zip of ``.npy`` members (NumPy's ``savez``): one per array, plus the
header, a JSON string stored under :data:`HEADER`. :func:`write_npz_atomically` writes it
to a temporary file in the target's directory, flushed and fsync'ed, then renamed over
the target, so a crash mid-write leaves the previous file intact. :func:`read_npz` reads
it back without ever unpickling, allocating no more than the file holds; every member
carries zip's CRC-32, which the reader checks, so a damaged file is a ValueError.

What the header and the arrays mean is the callers' business: the optimizer checkpoint
(:mod:`fastadam.checkpoint`) and the sharded one (:mod:`fastadam.distributed`) each define
their own format on top of this one.
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

# The member that holds the JSON header (never a name a format gives an array).
HEADER = "__fastadam__"
PathLike = Union[str, "os.PathLike[str]"]


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


# The first four bytes of a zip archive (np.savez's format): a local file header, or the
# end-of-directory record of an empty archive.
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
# One read of a member's data at most this many bytes at a time: a member that claims more
# than it holds fails at its end without ever being allocated whole.
READ_CHUNK_BYTES = 1 << 22


class NotAnArchive(ValueError):
    pass


def read_npz(path: str, *, header_only: bool = False) -> Tuple[Any, Dict[str, np.ndarray]]:
    """The JSON header and the arrays of an archive written by :func:`write_npz_atomically`
    (with ``header_only=True``, only the header: ``(header, {})``).

    Raises FileNotFoundError for a missing file and ValueError for a truncated, corrupt or
    foreign one. Nothing is allocated beyond what the file holds, whatever its zip and .npy
    headers claim, and each size is read once, from the bytes that are then used
    (:func:`_read_member`); object arrays (pickles) are refused, never loaded.
    """
    try:
        with open(path, "rb") as f:
            # Not a zip archive: say so here, before any reader advises loading it
            # "unsafely" (issue 23).
            magic = f.read(4)
            if magic not in ZIP_MAGIC:
                raise NotAnArchive(f"{path} is not a readable fastadam checkpoint (not an .npz archive: "
                                   f"it starts with {magic!r})")
            f.seek(0)
            file_size = os.fstat(f.fileno()).st_size
            with zipfile.ZipFile(f) as archive:
                members: Dict[str, zipfile.ZipInfo] = {}
                for info in archive.infolist():
                    name = info.filename[:-4] if info.filename.endswith(".npy") else None
                    if name is None or name in members:
                        raise ValueError(f"member {info.filename!r} is not one .npy array")
                    members[name] = info
                if HEADER not in members:
                    raise ValueError("no fastadam header")
                header = json.loads(str(_read_member(archive, members[HEADER], file_size)[()]))
                arrays = {} if header_only else {
                    name: _read_member(archive, info, file_size)
                    for name, info in members.items() if name != HEADER}
    except (FileNotFoundError, NotAnArchive):
        raise
    # What a corrupt zip can raise besides BadZipFile (found by tests/test_fuzz.py): zlib's
    # error for a damaged compressed member, NotImplementedError for a compression method,
    # zip version or flag it does not read, RuntimeError for a member marked as encrypted.
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError,
            UnicodeDecodeError, zlib.error, NotImplementedError, RuntimeError, TypeError,
            IndexError, OverflowError) as exc:
        raise ValueError(f"{path} is not a readable fastadam checkpoint ({exc})") from None
    return header, arrays


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, file_size: int) -> np.ndarray:
    """One .npy member, read once: its header, then exactly the data it declares.

    The declared size is trusted for an allocation only when the bytes are known to be in
    the file: a stored (uncompressed) member whose claimed extent lies inside the file.
    A compressed member is read in chunks and allocated as it really decompresses. Either
    way a member that holds less than it declares, or more, is a ValueError (a corrupt
    header would otherwise be a MemoryError, or a huge allocation: issue 19, item 6)."""
    name = info.filename[:-4]
    if info.header_offset + info.compress_size > file_size:
        raise ValueError(f"{name} claims {info.compress_size} bytes at offset {info.header_offset}, "
                         f"beyond the end of the {file_size}-byte file")
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        if dtype.hasobject:
            raise ValueError(f"{name} is an object array; checkpoints hold numbers (pickles "
                             "are never loaded)")
        count = math.prod(shape)
        declared = count * dtype.itemsize
        if info.compress_type == zipfile.ZIP_STORED and declared > info.compress_size:
            raise ValueError(f"{name} declares {declared} bytes of data, its member holds "
                             f"{info.compress_size}")
        if info.compress_type == zipfile.ZIP_STORED:
            data = np.empty(declared, np.uint8)  # within the file: checked above
            filled = 0
            while filled < declared:
                chunk = f.read(min(declared - filled, READ_CHUNK_BYTES))
                if not chunk:
                    break
                data[filled:filled + len(chunk)] = np.frombuffer(chunk, np.uint8)
                filled += len(chunk)
        else:
            pieces = bytearray()  # grows only as the member really decompresses
            while len(pieces) < declared:
                chunk = f.read(min(declared - len(pieces), READ_CHUNK_BYTES))
                if not chunk:
                    break
                pieces += chunk
            filled = len(pieces)
            data = np.frombuffer(pieces, np.uint8).copy()  # (aligned, and owned by NumPy)
        if filled < declared:
            raise ValueError(f"{name} declares {declared} bytes of data, its member holds {filled}")
        if f.read(1):  # (reaching the end also checks the member's CRC-32)
            raise ValueError(f"{name} holds more data than the {declared} bytes it declares")
    array = data.view(dtype) if declared else np.empty(0, dtype)
    if fortran_order:
        return array.reshape(shape[::-1]).transpose()
    return array.reshape(shape)


def check_format(header: Any, path: str, fmt: str, version: int, what: str) -> None:
    """ValueError unless ``header`` (of the file at ``path``) names format ``fmt`` and
    ``version``: the check every fastadam file format opens with."""
    if not isinstance(header, dict) or header.get("format") != fmt:
        raise ValueError(f"{path} is not a {what}")
    if header.get("version") != version:
        raise ValueError(f"{path} has {what} version {header.get('version')!r}; this fastadam "
                         f"reads version {version}")
