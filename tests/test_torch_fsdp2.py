"""fastadam.torch as FSDP2's optimizer: ``fully_shard`` on a CPU device mesh with gloo, on
2 and 3 processes (tests/fsdp2_worker.py, each run bounded by a timeout, so a hang fails
here). Each rank checks its shards bit for bit against torch.optim.Adam/AdamW(fused=True)
in the same run; see the worker's docstring for the scenarios."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fastadam.torch")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("this torch has no torch.distributed with gloo", allow_module_level=True)

WORKER = Path(__file__).with_name("fsdp2_worker.py")
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide" / "fsdp2.md"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fsdp2_offload.py"
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "distributed_offload.py"
pytestmark = pytest.mark.slow  # each run starts 2 or 3 processes that import torch


def environment():
    """This session's fastadam (installed, or built under src/) for the ranks, each on one
    thread (2 or 3 ranks share this machine's cores)."""
    import fastadam

    path = os.pathsep.join([str(Path(fastadam.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def run_worker(ranks, scenario, directory, timeout=600, **env_changes):
    env = {**environment(), **env_changes}
    env = {k: v for k, v in env.items() if v is not None}
    result = subprocess.run([sys.executable, str(WORKER), str(ranks), scenario, str(directory)],
                            capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    report = json.loads(lines[-1])
    assert report["failures"] == [], "\n".join(report["failures"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert report["world_size"] == ranks


@pytest.mark.parametrize("ranks", [2, 3])
def test_fsdp2_steps_are_torch_fused_adams_bit_for_bit(ranks, tmp_path):
    run_worker(ranks, "parity", tmp_path)


def test_fsdp2_steps_are_torch_fused_adams_bit_for_bit_at_the_native_capability(tmp_path):
    # without conftest's ATEN_CPU_CAPABILITY=default: torch runs its AVX2/AVX-512 kernel
    # and fastadam's default numerics follow it (fastadam.torch.default_numerics)
    run_worker(2, "parity", tmp_path, ATEN_CPU_CAPABILITY=None)


def test_distributed_checkpoints_resume_bit_identically_on_2_and_then_3_ranks(tmp_path):
    run_worker(2, "checkpoint", tmp_path)
    run_worker(3, "reshard", tmp_path)  # the 2-rank checkpoint, re-sharded


def test_bad_input_raises_the_same_error_on_every_rank(tmp_path):
    run_worker(2, "refusals", tmp_path)


def torchrun(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", *map(str, args)], cwd=cwd, env=environment(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.skipif(not GUIDE.exists(), reason="not a source checkout")
def test_the_guides_example_runs_under_torchrun_as_pasted(tmp_path):
    text = GUIDE.read_text()
    script = text.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "train.py").write_text(script)
    result = torchrun("train.py", cwd=tmp_path)
    for rank in (0, 1):
        assert f"rank {rank}: loss" in result.stdout
    assert (tmp_path / "checkpoint" / ".metadata").exists()


@pytest.mark.skipif(not EXAMPLE.exists(), reason="not a source checkout")
def test_the_gpt2_shaped_example_learns_under_torchrun_quick(tmp_path):
    out = torchrun(EXAMPLE, "--quick", cwd=tmp_path).stdout
    for rank in (0, 1):
        line = next(line for line in out.splitlines() if line.startswith(f"rank {rank}: fastadam"))
        first, last = (float(x) for x in line.split("loss ")[1].split(";")[0].split(" -> "))
        assert last < first, line
        assert "GB/s" in line


def run_benchmark(engine, tmp_path):
    """benchmarks/distributed_offload.py --quick, one repeat, for ``engine``: the optimizers
    it timed."""
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, str(BENCHMARK), "--quick", "--engines", engine,
                             "--repeats", "1", "--warmup", "0", "--json", str(out)],
                            env=environment(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    [report] = json.loads(out.read_text())
    assert report["engine"] == engine and len(report["ranks"]) == 2
    # each rank stepped its own part of the model, and every optimizer was timed there
    assert sum(rank["elements"] for rank in report["ranks"]) == report["total"]
    assert all(0 < t < 60 for rank in report["ranks"] for t in rank["medians"].values())
    assert "| fastadam.torch.AdamW |" in result.stdout
    names = list(report["ranks"][0]["medians"])
    bound = "bound: 7-stream (numba)"  # timed beside the optimizers where numba is installed
    assert (bound in names) == (importlib.util.find_spec("numba") is not None)
    return [name for name in names if name != bound]


@pytest.mark.skipif(not BENCHMARK.exists(), reason="not a source checkout")
def test_the_offload_benchmark_runs_quick(tmp_path):
    assert run_benchmark("fsdp2", tmp_path) == [
        "fastadam.torch.AdamW", "torch AdamW (default: for-loop)", "torch AdamW foreach",
        "torch AdamW fused"]
