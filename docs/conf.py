"""Sphinx configuration of fastadam's documentation (docs/).

Build: pip install ".[docs]" (or ".[test]"), then
    python -m sphinx -W --keep-going -b html docs docs/_build/html
-W turns every warning into an error; tests/test_docs.py runs the same build.
The API reference imports fastadam (installed, or built in place under src/) and its
front ends: torch, keras, mpi4py and jax are imported when installed and mocked otherwise.
"""

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("KERAS_BACKEND", "torch")  # fastadam.keras runs on Keras's torch backend
if importlib.util.find_spec("fastadam") is None:
    sys.path.insert(0, str(ROOT / "src"))  # a build in place (setup.py build_ext --inplace)

import fastadam  # noqa: E402

project = "fastadam"
author = "The fastadam developers"
copyright = "the fastadam developers"
release = version = fastadam.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
napoleon_numpy_docstring = True
napoleon_google_docstring = False
# "Attributes" sections as fields of the class, not separate entries: a property that is
# both listed there and documented by :members: would otherwise be described twice.
napoleon_use_ivar = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_mock_imports = [name for name in ("torch", "keras", "mpi4py", "jax")
                        if importlib.util.find_spec(name) is None]
html_theme = "alabaster"
html_title = f"fastadam {release}"
html_theme_options = {"description": "The fast, exact Adam optimizer for the CPU",
                      "fixed_sidebar": True}
