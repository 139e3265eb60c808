"""``fastadam.__version__``, read once from the installed package's metadata (pyproject.toml
is its one source). A leaf: the package's ``__init__`` and ``show_config`` both read it
from here, so no module below the package has to import the package itself."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fastadam")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
