"""The example scripts run end to end (on small data the tests write)."""

import subprocess
import sys
from pathlib import Path

import pytest

from test_datasets import write_split

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.skipif(not EXAMPLES.exists(), reason="not a source checkout")


def run(script, *args):
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_quickstart():
    out = run("quickstart.py")
    accuracy = float(out.split("accuracy ")[1].split()[0])
    assert accuracy > 0.95


def test_fashion_mnist_torch_on_a_tiny_dataset(tmp_path):
    pytest.importorskip("torch")
    write_split(tmp_path, "train", n=256)
    write_split(tmp_path, "test", n=64)
    out = run("fashion_mnist_torch.py", "--data-dir", str(tmp_path), "--epochs", "1",
              "--batch-size", "64", "--optimizer", "all")
    assert "256 training and 64 test images" in out
    for name in ("fastadam", "torch", "torch-fused"):
        assert f"| {name} |" in out
