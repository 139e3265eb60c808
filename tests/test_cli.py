"""The fastadam command: demo (on small data, synthetic fallback) and config."""

import shutil
import subprocess
import sys

import pytest

import fastadam
from fastadam import cli

from test_datasets import write_split


def run_module(*args):
    result = subprocess.run([sys.executable, "-m", "fastadam", *args], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_help_documents_every_demo_option():
    out = run_module("demo", "--help")
    for option in ("--data-dir", "--download", "--epochs", "--batch-size", "--hidden", "--lr",
                   "--threads", "--synthetic", "--seed", "--no-progress"):
        assert option in out
    assert "demo" in run_module("--help")


def test_demo_on_a_synthetic_task(capsys):
    assert cli.main(["demo", "--synthetic", "--epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("test accuracy ")[-1].split()[0])
    assert accuracy > 0.5  # ten clusters, learnable
    assert "time in the optimizer: fastadam.Adam" in out and "NumPy Adam" in out


def test_demo_on_small_fashion_mnist_files(tmp_path, capsys):
    write_split(tmp_path, "train", n=300)
    write_split(tmp_path, "test", n=50)
    cli.main(["demo", "--data-dir", str(tmp_path), "--epochs", "1", "--no-progress"])
    assert "Fashion-MNIST: 300 training and 50 test examples" in capsys.readouterr().out


def test_demo_without_data_says_so_and_runs_the_synthetic_task(tmp_path, capsys):
    cli.main(["demo", "--data-dir", str(tmp_path), "--epochs", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert "Fashion-MNIST not found" in out and "synthetic classification task instead" in out
    assert "test accuracy" in out


def test_config_and_version():
    assert "openmp" in run_module("config")
    assert run_module("--version").strip() == f"fastadam {fastadam.__version__}"


@pytest.mark.skipif(shutil.which("fastadam") is None, reason="console script not on PATH")
def test_console_script():
    out = subprocess.run(["fastadam", "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"fastadam {fastadam.__version__}"


def test_bench_prints_a_table(capsys, tmp_path):
    args = ["bench", "--sizes", "10", "14", "--threads", "1", "--repeats", "1", "--target-ms", "1",
            "--no-torch"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "| 2^10 | 1 | fastadam |" in out and "| 2^14 | 1 | numpy in place |" in out
    pytest.importorskip("matplotlib")
    cli.main(args + ["--plot", str(tmp_path / "bench.png")])
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_bench_help_documents_every_option():
    out = run_module("bench", "--help")
    for option in ("--dtype", "--sizes", "--threads", "--repeats", "--target-ms", "--no-torch", "--plot"):
        assert option in out


@pytest.mark.parametrize("args, message", [
    (["demo", "--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
    (["demo", "--lr", "-1"], "argument --lr: must be a finite number > 0, got -1"),
    (["demo", "--epochs", "many"], "argument --epochs: invalid positive_int value: 'many'"),
    (["bench", "--sizes", "40"], "argument --sizes: must be a log2 size in [0, 30], got 40"),
    (["bench", "--threads", "0"], "argument --threads: must be a positive integer, got 0"),
    (["train"], "invalid choice: 'train'"),
    ([], "the following arguments are required: command"),
])
def test_bad_options_exit_2_with_a_clear_message(args, message):
    result = subprocess.run([sys.executable, "-m", "fastadam", *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr
