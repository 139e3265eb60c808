"""The Fashion-MNIST loader of the app and the examples. Its public path is
:mod:`fastadam.datasets`, whose docstring says where the files are looked for."""

from __future__ import annotations

import gzip
import os
import shutil
import urllib.request
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

__all__ = ["CLASSES", "DownloadError", "cache_dir", "download_fashion_mnist",
           "load_fashion_mnist", "read_idx", "search_dirs"]

PathLike = Union[str, "os.PathLike[str]"]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: The ten class names, indexed by label.
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot")
# IDX type codes (the third byte of the magic number) and their big-endian dtypes
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """An IDX file (optionally gzipped) as a NumPy array in native byte order.

    Raises ValueError for a file that is not IDX or is truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path} is not a readable IDX file ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated (incomplete header)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    dtype = np.dtype(IDX_TYPES[data[2]])
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) != header + count * dtype.itemsize:
        raise ValueError(f"{path} has {len(data) - header} data bytes, its header promises "
                         f"{count * dtype.itemsize} (truncated or corrupt)")
    array = np.frombuffer(data, dtype, count, header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


class DownloadError(OSError):
    """The files could not be fetched (no network, a refused connection, an HTTP error)."""


def cache_dir() -> Path:
    """Where ``download=True`` puts the files when no ``data_dir`` is given."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastadam" / "fashion-mnist"


def search_dirs(data_dir: Optional[PathLike] = None) -> List[Path]:
    """The directories searched for the files, in order: ``data_dir`` alone if given,
    else ``$FASHION_MNIST_DIR``, Debian's directory and the download cache."""
    if data_dir is not None:
        return [Path(data_dir)]
    dirs = []
    if os.environ.get("FASHION_MNIST_DIR"):
        dirs.append(Path(os.environ["FASHION_MNIST_DIR"]))
    return dirs + [DEBIAN_DIR, cache_dir()]



def _find(name: str, data_dir: Optional[PathLike]) -> Optional[Path]:
    for directory in search_dirs(data_dir):
        for candidate in (directory / f"{name}.gz", directory / name):
            if candidate.is_file():
                return candidate
    return None


def download_fashion_mnist(data_dir: PathLike, base_url: str = OFFICIAL_URL) -> None:
    """Fetch the four gzipped files into ``data_dir`` (skipping those already there).

    Raises DownloadError (an OSError) naming the URL when a file cannot be fetched; a
    partial file is never left under the final name.
    """
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for names in FILES.values():
        for name in names:
            target = directory / f"{name}.gz"
            if target.exists():
                continue
            tmp = target.with_suffix(".gz.part")
            url = f"{base_url}{name}.gz"
            try:
                with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                    shutil.copyfileobj(response, f)
            except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
                tmp.unlink(missing_ok=True)
                reason = getattr(exc, "reason", None) or exc
                raise DownloadError(f"could not download {url} ({reason})") from None
            os.replace(tmp, target)


def load_fashion_mnist(
    split: str = "train", data_dir: Optional[PathLike] = None, download: bool = False,
) -> Tuple[np.ndarray, np.ndarray]:
    """(images, labels) of Fashion-MNIST's ``"train"`` (60000) or ``"test"`` (10000) split.

    Images are uint8 of shape (n, 28, 28), labels uint8 class indices (see CLASSES).
    Raises FileNotFoundError, saying where it looked and how to get the files. With
    ``download=True``, files found anyway are used as they are; missing ones are fetched
    into ``data_dir``, or into :func:`cache_dir` (DownloadError when that fails).
    """
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    paths = [_find(name, data_dir) for name in FILES[split]]
    if download and None in paths:
        download_fashion_mnist(cache_dir() if data_dir is None else data_dir)
        paths = [_find(name, data_dir) for name in FILES[split]]
    if None in paths:
        looked = ", ".join(str(d) for d in search_dirs(data_dir))
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files not found (looked in {looked}). Install Debian's "
            "package (apt-get install dataset-fashion-mnist), pass data_dir, set "
            "FASHION_MNIST_DIR, or use download=True."
        )
    images, labels = (read_idx(p) for p in paths if p is not None)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{paths[0]} and {paths[1]} do not hold matching images and labels "
                         f"(shapes {images.shape} and {labels.shape})")
    return images, labels

