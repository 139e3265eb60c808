"""Every kernel loop compiles to SIMD code (runs from a source checkout with GCC)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".github" / "scripts" / "check_vectorization.py"


def have_gcc():
    if shutil.which("gcc") is None:
        return False
    version = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout
    return "Free Software Foundation" in version  # not Apple's clang under the name gcc


@pytest.mark.skipif(not SCRIPT.exists(), reason="not a source checkout")
@pytest.mark.skipif(not have_gcc(), reason="the check reads GCC's vectorizer report")
def test_every_kernel_loop_is_vectorized():
    pytest.importorskip("Cython")
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: every kernel loop is vectorized" in result.stdout
