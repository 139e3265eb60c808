"""DeepSpeed ZeRO-Offload (stages 1, 2 and 3, ``offload_optimizer: cpu``) with
fastadam.torch.AdamW as its CPU optimizer: bit-identical to torch's fused AdamW as the
client optimizer under the same configuration (tests/deepspeed_worker.py, one process on
DeepSpeed's CPU accelerator, bounded by a timeout).

DeepSpeed installs without CUDA as
``DS_ACCELERATOR=cpu DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed`` (torch
and ninja installed first); without it these tests are skipped."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("deepspeed") is None:  # (not imported here: it sets up torch.distributed)
    pytest.skip("deepspeed is not installed (DS_ACCELERATOR=cpu DS_BUILD_OPS=0 pip install "
                "--no-build-isolation deepspeed)", allow_module_level=True)
pytest.importorskip("fastadam.torch")

WORKER = Path(__file__).with_name("deepspeed_worker.py")
pytestmark = pytest.mark.slow  # a process that imports DeepSpeed and trains 10 engines


def test_zero_offload_stages_1_2_3_step_with_fastadam_as_torch_fused_adamw():
    import fastadam

    path = os.pathsep.join([str(Path(fastadam.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-W", "ignore", str(WORKER)], capture_output=True,
                            text=True, timeout=900, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    report = json.loads(lines[-1])
    assert report["failures"] == [], "\n".join(report["failures"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(report["cases"]) == 5
