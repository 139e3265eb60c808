"""The package's layout keeps its layers apart (docs/design.md, Layout): read from the
imports of every Python module of the package, wherever it is installed.

Imports inside functions count too: a lazy ``from fastadam import __version__`` in
``_config.py`` was once a hidden cycle through the package's ``__init__``.
"""

import ast
from pathlib import Path

import pytest

import fastadam

PACKAGE_DIR = Path(fastadam.__file__).parent
# The app and the files that exist to reach it: the entry point of ``python -m fastadam``,
# and fastadam.datasets, the public path of the app's loader.
APP = {"__main__.py", "datasets.py"}
# The validation layer is a leaf below the engine: it never reaches up into the engine,
# the front ends or the kernels.
VALIDATION = ["_validation.py", "_hints.py"]
ABOVE_VALIDATION = ("fastadam._engine", "fastadam._table", "fastadam._kernels", "fastadam._simd",
                    "fastadam._functional", "fastadam._torch_gather", "fastadam.optim",
                    "fastadam.torch", "fastadam.keras", "fastadam.jax", "fastadam.distributed",
                    "fastadam.checkpoint", "fastadam.app")


def modules():
    return sorted(p.relative_to(PACKAGE_DIR).as_posix() for p in PACKAGE_DIR.rglob("*.py"))


def is_module(name):
    """Whether ``fastadam.x.y`` is a module or package of this installation (read from the
    files: importing would run the module)."""
    *parents, last = name.split(".")[1:]
    folder = PACKAGE_DIR.joinpath(*parents)
    return ((folder / last / "__init__.py").is_file() or (folder / f"{last}.py").is_file()
            or any(p.suffix in (".so", ".pyd", ".pyi") for p in folder.glob(f"{last}.*")))


def imported(path):
    """The modules ``path`` imports, lazy imports in functions included: ``from a import
    b`` gives ``a.b`` if that is a module, else ``a`` (b is a name of module a)."""
    names = set()
    for node in ast.walk(ast.parse((PACKAGE_DIR / path).read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                is_sub = full.startswith("fastadam.") and is_module(full)
                names.add(full if is_sub else node.module)
    return names


def is_library(path):
    return not path.startswith("app/") and path not in APP


def test_the_layout_has_the_app_and_the_distributed_package_apart():
    found = set(modules())
    assert {"app/cli.py", "app/demo.py", "app/bench.py", "app/timing.py", "app/datasets.py",
            "distributed/_sharding.py", "distributed/_collectives.py",
            "distributed/_torch_binding.py", "distributed/_sharded_adam.py",
            "distributed/_checkpoint.py", "_npz.py", "checkpoint.py"} <= found
    # nothing of the app beside the library
    assert not {"cli.py", "demo.py", "bench.py", "distributed.py"} & found


@pytest.mark.parametrize("path", [p for p in modules() if is_library(p)])
def test_the_library_never_imports_the_app_nor_the_package_itself(path):
    names = imported(path)
    assert not [n for n in names if n == "fastadam.app" or n.startswith("fastadam.app.")]
    if path != "__init__.py":
        # "import fastadam" or "from fastadam import __version__" would run the package's
        # __init__ from inside it: a cycle. Submodules are imported by their own names.
        assert "fastadam" not in names, f"{path} imports the package fastadam itself"


@pytest.mark.parametrize("path", modules())
def test_only_the_collectives_module_imports_mpi4py(path):
    if any(n.split(".")[0] == "mpi4py" for n in imported(path)):
        assert path == "distributed/_collectives.py"


@pytest.mark.parametrize("path", VALIDATION)
def test_validation_reaches_nothing_above_it(path):
    above = [n for n in imported(path) if n.startswith(ABOVE_VALIDATION)]
    assert above == [], f"{path} imports {above}"


def test_the_public_datasets_path_is_the_apps_loader():
    from fastadam import datasets
    from fastadam.app import datasets as app_datasets

    assert datasets.__all__ == app_datasets.__all__
    for name in datasets.__all__:
        assert getattr(datasets, name) is getattr(app_datasets, name), name
