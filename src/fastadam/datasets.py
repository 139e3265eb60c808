"""Fashion-MNIST in its IDX files: the one loader the examples and the demo share.

Where the files are looked for, in order: ``data_dir`` if given, ``$FASHION_MNIST_DIR``,
then Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``).
Files may be gzipped (``*.gz``) or not, and are then looked for in fastadam's download
cache (``$XDG_CACHE_HOME/fastadam/fashion-mnist``, by default
``~/.cache/fastadam/fashion-mnist``). ``download=True`` fetches the files that are not
found from the official mirror, into ``data_dir`` if given, else into the cache (needs
the network; a failed download is a :class:`DownloadError`).
"""

# The code is the app's (fastadam.app.datasets); this module is its public path.
from fastadam.app.datasets import (
    CLASSES,
    DEBIAN_DIR,  # noqa: F401  (where Debian's package puts the files; the examples read it)
    DownloadError,
    cache_dir,
    download_fashion_mnist,
    load_fashion_mnist,
    read_idx,
    search_dirs,
)

__all__ = ["CLASSES", "DownloadError", "cache_dir", "download_fashion_mnist",
           "load_fashion_mnist", "read_idx", "search_dirs"]
