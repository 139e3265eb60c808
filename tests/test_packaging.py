"""The installed distribution: version, metadata, typing files, stubs, SIMD modules, and
living in one process with PyTorch's OpenMP runtime.

These run against whatever ``import fastadam`` finds: the installed package (src layout:
the source tree is never on sys.path), a wheel in tools/check_wheel.sh and cibuildwheel.
"""

import importlib.metadata
import importlib.util
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fastadam
from fastadam import _kernels, _simd

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(fastadam.__file__).parent
COMPILED = ["fastadam._kernels", "fastadam._kernels_avx2", "fastadam._kernels_avx512",
            "fastadam._table", "fastadam._checks", "fastadam._torch_gather", "fastadam._xla_ffi"]
X86_64 = platform.machine().lower() in ("x86_64", "amd64")

requires_openmp = pytest.mark.skipif(not _kernels.openmp_enabled(),
                                     reason="serial build (FASTADAM_OPENMP=0)")


def run_python(code, timeout=300):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_version_is_single_sourced_from_the_package_metadata():
    assert fastadam.__version__ == importlib.metadata.version("fastadam")
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", fastadam.__version__)


def test_source_tree_declares_the_installed_version_and_logs_it():
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("tests run without the source tree")
    declared = re.search(r'^version = "([^"]+)"$', pyproject.read_text(), re.M).group(1)
    assert declared == fastadam.__version__
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[?{re.escape(declared)}\]?", changelog, re.M), \
        f"CHANGELOG.md has no section for {declared}"


def test_metadata_is_complete():
    meta = importlib.metadata.metadata("fastadam")
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert meta["Requires-Python"] == ">=3.9"
    assert {"torch", "keras", "plot", "test"} <= set(meta.get_all("Provides-Extra"))
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert {"Homepage", "Source", "Issues", "Changelog"} <= set(urls)
    classifiers = set(meta.get_all("Classifier"))
    for minor in range(9, 14):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    assert "Typing :: Typed" in classifiers
    # NumPy is the core's only runtime requirement; everything else (threadpoolctl for
    # the demo included) is an extra.
    core = [r for r in importlib.metadata.requires("fastadam") if "extra ==" not in r]
    assert [re.split(r"[<>=!~ ;\[]", r)[0] for r in core] == ["numpy"]


def test_typing_files_are_installed():
    assert (PACKAGE_DIR / "py.typed").is_file()
    for module in COMPILED:
        if importlib.util.find_spec(module) is not None:
            assert (PACKAGE_DIR / (module.split(".")[-1] + ".pyi")).is_file()


def test_stubs_match_the_compiled_modules():
    pytest.importorskip("mypy")
    built = [m for m in COMPILED if importlib.util.find_spec(m) is not None]
    allowlist = Path(__file__).with_name("stubtest_allowlist.txt")
    out = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", *built, "--allowlist", str(allowlist),
         "--ignore-unused-allowlist"],  # which names Cython adds depends on its version
        capture_output=True, text=True, cwd=Path(__file__).parent, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(not X86_64, reason="SIMD twin modules are built for x86-64 only")
def test_x86_64_builds_carry_every_simd_level():
    # A wheel runs on CPUs it was not built on: it must carry the AVX2 and AVX-512 loops
    # and choose at run time, never rely on -march=native.
    for module in COMPILED:
        assert importlib.util.find_spec(module) is not None, f"{module} was not built"
    assert "-march=native" not in " ".join(map(str, _kernels.build_info().values()))


@pytest.mark.skipif("FASTADAM_SIMD" in os.environ, reason="FASTADAM_SIMD forces a level")
def test_small_tensors_use_the_widest_level_this_cpu_runs():
    assert _simd.chosen()["small_tensors"] == _simd.cpu_levels()[-1]


# Both runtimes busy at once: torch's intra-op pool (OpenMP) in one Python thread and
# fastadam's team in another, then alternating in one thread; fastadam's results must
# equal its single-threaded results bit for bit, torch's must equal its own first result.
TORCH_AND_FASTADAM = """
import threading
{imports}
import numpy as np

torch.set_num_threads(2)
fastadam.set_num_threads(2)
rng = np.random.default_rng(0)
n = 1 << 18  # above fastadam's serial cutoff: a 2-thread team
param, grad = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
def fresh():
    return [param.copy(), grad, np.zeros(n, np.float32), np.zeros(n, np.float32)]
def run(threads, steps=20):
    state = fresh()
    for t in range(1, steps + 1):
        fastadam.adam_step(*state, step=t, lr=1e-3, num_threads=threads)
    return state[0]
expected = run(1)
a = torch.randn(384, 384, generator=torch.Generator().manual_seed(0))
product = a @ a
results, errors = {{}}, []
def torch_work():
    try:
        results["torch"] = all(torch.equal(a @ a, product) for _ in range(50))
    except Exception as e:
        errors.append(e)
def fastadam_work():
    try:
        results["fastadam"] = all(np.array_equal(run(2), expected) for _ in range(5))
    except Exception as e:
        errors.append(e)
workers = [threading.Thread(target=torch_work), threading.Thread(target=fastadam_work)]
for w in workers: w.start()
for w in workers: w.join()
assert not errors, errors
assert results == {{"torch": True, "fastadam": True}}, results
for _ in range(5):
    assert torch.equal(a @ a, product)
    assert np.array_equal(run(2), expected)
print("ok")
"""


@requires_openmp
@pytest.mark.slow
@pytest.mark.parametrize("order", ["torch first", "fastadam first"])
def test_fastadam_and_torch_run_multithreaded_in_one_process(order):
    pytest.importorskip("torch")
    imports = "import torch\nimport fastadam" if order == "torch first" else \
        "import fastadam\nimport torch"
    # A timeout, not a hang, if the two runtimes ever deadlock.
    assert run_python(TORCH_AND_FASTADAM.format(imports=imports), timeout=300).strip() == "ok"


# Every OpenMP runtime mapped into the process (one shared libgomp, or fastadam's vendored
# copy next to torch's) is reported by threadpoolctl, and its limits reach both libraries.
THREADPOOLCTL_BOTH = """
import sys
import torch, fastadam
from fastadam import _kernels
from threadpoolctl import threadpool_info, threadpool_limits

torch.set_num_threads(2)
fastadam.set_num_threads(None)
reported = {i["filepath"] for i in threadpool_info() if i["user_api"] == "openmp"}
assert reported, threadpool_info()
if sys.platform.startswith("linux"):
    import os
    mapped = set()
    for line in open("/proc/self/maps"):
        path = line.split()[-1]
        name = os.path.basename(path)
        if path.startswith("/") and (name.startswith(("libgomp", "libomp", "libiomp"))):
            mapped.add(os.path.realpath(path))
    assert mapped == {os.path.realpath(p) for p in reported}, (mapped, reported)
before = (_kernels.max_threads(), torch.get_num_threads())
with threadpool_limits(limits=1, user_api="openmp"):
    assert _kernels.max_threads() == 1 and fastadam.get_num_threads() == 1
    assert torch.get_num_threads() == 1
after = (_kernels.max_threads(), torch.get_num_threads())
assert after == before, (before, after)
print(len(reported))
"""


@requires_openmp
def test_threadpoolctl_reports_and_limits_fastadams_and_torchs_openmp():
    pytest.importorskip("torch")
    pytest.importorskip("threadpoolctl")
    assert int(run_python(THREADPOOLCTL_BOTH)) >= 1
