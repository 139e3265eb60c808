"""DeepSpeed ZeRO-Offload (stages 1, 2 and 3, ``offload_optimizer: cpu``) with
fastadam.torch.AdamW as its CPU optimizer: bit-identical to torch's fused AdamW as the
client optimizer under the same configuration (tests/deepspeed_worker.py, one process on
DeepSpeed's CPU accelerator, bounded by a timeout); examples/deepspeed_offload.py --quick
trains on 2 ranks under torchrun, ZeRO stages 2 and 3.

DeepSpeed installs without CUDA as
``DS_ACCELERATOR=cpu DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed`` (torch
and ninja installed first); without it these tests are skipped."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("deepspeed") is None:  # (not imported here: it sets up torch.distributed)
    pytest.skip("deepspeed is not installed (DS_ACCELERATOR=cpu DS_BUILD_OPS=0 pip install "
                "--no-build-isolation deepspeed)", allow_module_level=True)
pytest.importorskip("fastadam.torch")

WORKER = Path(__file__).with_name("deepspeed_worker.py")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "deepspeed_offload.py"
pytestmark = pytest.mark.slow  # a process that imports DeepSpeed and trains 10 engines


def environment():
    """This session's fastadam for the subprocesses, on DeepSpeed's CPU accelerator, one
    thread each."""
    import fastadam

    path = os.pathsep.join([str(Path(fastadam.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def test_zero_offload_stages_1_2_3_step_with_fastadam_as_torch_fused_adamw():
    env = environment()
    result = subprocess.run([sys.executable, "-W", "ignore", str(WORKER)], capture_output=True,
                            text=True, timeout=900, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    report = json.loads(lines[-1])
    assert report["failures"] == [], "\n".join(report["failures"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(report["cases"]) == 5


@pytest.mark.skipif(not EXAMPLE.exists(), reason="not a source checkout")
@pytest.mark.parametrize("stage", [2, 3])
def test_the_gpt2_shaped_example_learns_on_2_ranks_quick(stage, tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", str(EXAMPLE), "--quick", "--stage", str(stage)],
                            cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        line = next(line for line in result.stdout.splitlines()
                    if line.startswith(f"rank {rank}: fastadam, ZeRO stage {stage}"))
        first, last = (float(x) for x in line.split("loss ")[1].split(";")[0].split(" -> "))
        assert last < first, line
        # each rank stepped its half of the model's elements (ZeRO partitions them)
        mine, total = (int(x.replace(",", "")) for x in re.search(r"([\d,]+) elements of ([\d,]+);", line).groups())
        assert 0 < mine < total, line
        assert "GB/s" in line


def test_the_offload_benchmark_runs_quick_under_deepspeed(tmp_path):
    from test_torch_fsdp2 import BENCHMARK, run_benchmark

    if not BENCHMARK.exists():
        pytest.skip("not a source checkout")
    assert run_benchmark("deepspeed", tmp_path) == [
        "fastadam.torch.AdamW", "DeepSpeedCPUAdam", "torch AdamW fused"]
