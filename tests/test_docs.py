"""The documentation site (docs/) builds with Sphinx, warnings as errors, and its API
reference covers every public name. Needs the docs tools (in the test extra)."""

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
pytestmark = [
    pytest.mark.skipif(not (DOCS / "conf.py").exists(), reason="not a source checkout"),
    pytest.mark.skipif(importlib.util.find_spec("sphinx") is None
                       or importlib.util.find_spec("myst_parser") is None,
                       reason="the docs tools are not installed (pip install '.[docs]')"),
]

# The public modules and, for each, the names the API page must document: the module's
# __all__ (fastadam.schedules is a module of its own below; __version__ is documented as data).
PUBLIC_MODULES = ["fastadam", "fastadam.schedules", "fastadam.torch", "fastadam.keras",
                  "fastadam.jax", "fastadam.distributed", "fastadam.datasets"]
FRAMEWORK = {"fastadam.torch": "torch", "fastadam.keras": "keras", "fastadam.jax": "jax",
             "fastadam.distributed": "mpi4py"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("html")
    import fastadam  # the same fastadam as this session (installed, or built under src/)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(fastadam.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)],
        capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, f"the docs build warned or failed:\n{result.stderr[-5000:]}"
    return out


def test_docs_build_with_warnings_as_errors(site):
    for page in ("index", "install", "api", "design", "cli", "guide/numpy", "guide/pytorch",
                 "guide/keras", "guide/jax", "guide/embeddings", "guide/distributed",
                 "guide/mixed-precision", "guide/numerics", "guide/threads", "guide/performance",
                 "guide/pictures", "reliability",
                 "building", "changelog"):
        assert (site / f"{page}.html").exists(), page
    assert (site / "_images" / "trajectories.png").exists()  # the pictures are copied in


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_the_api_reference_covers_every_public_name(site, module_name):
    if module_name in FRAMEWORK and importlib.util.find_spec(FRAMEWORK[module_name]) is None:
        pytest.skip(f"{FRAMEWORK[module_name]} is not installed: the build mocks it")
    module = importlib.import_module(module_name)
    api = (site / "api.html").read_text()
    assert f'id="module-{module_name}"' in api
    names = [n for n in module.__all__ if n != "schedules"]
    assert names
    missing = [n for n in names if f'id="{module_name}.{n}"' not in api]
    assert missing == [], f"not in docs/api.rst: {missing}"
