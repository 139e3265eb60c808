"""The fastadam command: demo (on small data, synthetic fallback) and config."""

import io
import os
import shutil
import subprocess
import sys

import pytest

import fastadam
from fastadam.app import cli, datasets, demo

from test_datasets import write_split


def run_module(*args):
    result = subprocess.run([sys.executable, "-m", "fastadam", *args], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_help_documents_every_demo_option():
    out = run_module("demo", "--help")
    for option in ("--data-dir", "--download", "--epochs", "--batch-size", "--hidden", "--lr",
                   "--threads", "--blas-threads", "--synthetic", "--seed", "--no-progress"):
        assert option in out
    assert "demo" in run_module("--help")


def test_help_texts_are_plain_words():
    # issue 23: the top-level help listed only subcommand names, demo's help showed raw
    # reST (``python -m fastadam demo``) and --threads pointed at a comment in demo.py.
    top = run_module("--help")
    for text in ("commands:", "examples:", "fastadam demo --help", "Fashion-MNIST", "speed table"):
        assert text in top
    for command in ("demo", "bench", "config"):
        out = run_module(command, "--help")
        assert "``" not in out and ":class:" not in out and "demo.py" not in out, command
    assert "Train a small NumPy-only MLP" in run_module("demo", "--help")


def test_demo_says_epoch_not_epochs_for_one(capsys):
    cli.main(["demo", "--synthetic", "--epochs", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert "after 1 epoch " in out and "1 epochs" not in out
    assert "training for 1 epoch of 47 batches" in out


def test_demo_limits_blas_threads_while_it_runs(monkeypatch, capsys):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    seen = []
    real_run = demo._run

    def spy(args):
        seen.extend(info["num_threads"] for info in threadpoolctl.threadpool_info()
                    if info["user_api"] == "blas")
        return real_run(args)

    monkeypatch.setattr(demo, "_run", spy)
    cli.main(["demo", "--synthetic", "--epochs", "1", "--no-progress"])
    if not seen:
        pytest.skip("NumPy's BLAS exposes no thread pool to threadpoolctl here")
    assert set(seen) == {1}
    assert "NumPy's BLAS on 1 thread" in capsys.readouterr().out


def test_progress_lines_within_an_epoch():
    # In a pipe: a line every `every` seconds; on a terminal: one line rewritten in place.
    out = io.StringIO()
    bar = demo.Progress("epoch 1/5", 10, True, out=out, every=0.0)
    for done in range(3):
        bar.update(done)
    bar.close()
    assert out.getvalue().splitlines()[-1] == "epoch 1/5: 2/10 batches (20%), " + \
        out.getvalue().splitlines()[-1].split(", ")[-1]
    assert len(out.getvalue().splitlines()) == 3 and "\r" not in out.getvalue()

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    bar = demo.Progress("epoch 2/5", 10, True, out=tty)
    bar.last -= 1.0  # as if a while had passed
    bar.update(4)
    bar.close()
    assert tty.getvalue().startswith("\repoch 2/5: 4/10 batches (40%)") and tty.getvalue().endswith("\r\033[K")
    quiet = io.StringIO()
    bar = demo.Progress("epoch 1/1", 10, False, out=quiet, every=0.0)
    bar.update(5)
    assert quiet.getvalue() == ""


def test_demo_output_reaches_a_pipe_as_it_happens(tmp_path):
    # Run in a pipe (not a terminal), the first lines are flushed before training ends.
    process = subprocess.Popen([sys.executable, "-m", "fastadam", "demo", "--synthetic",
                                "--epochs", "3"], stdout=subprocess.PIPE, text=True)
    try:
        first = process.stdout.readline()
        assert first.startswith("fastadam demo: loading the data")
        assert process.poll() is None or "epoch" not in first
    finally:
        process.stdout.read()
        assert process.wait(timeout=300) == 0


def test_config_piped_into_a_closed_reader_ends_quietly():
    # `fastadam config | head -1`: no BrokenPipeError traceback.
    result = subprocess.run(f"{sys.executable} -m fastadam config | head -1", shell=True,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("fastadam")
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr
    read_end, write_end = os.pipe()
    os.close(read_end)  # deterministic: the reader is gone before the first write
    result = subprocess.run([sys.executable, "-m", "fastadam", "config"], stdout=write_end,
                            stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert result.returncode == 141 and result.stderr == ""


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
    # In the CLI's words (issue 23: it said data_dir= and download=True)
    assert "--download" in out and "--data-dir" in out
    assert "data_dir" not in out and "download=True" not in out


def test_demo_download_uses_data_already_found(tmp_path, monkeypatch, capsys):
    # issue 23: with the data in Debian's directory, --download failed with
    # "ValueError: download=True needs a data_dir".
    write_split(tmp_path, "train", n=200)
    write_split(tmp_path, "test", n=40)
    monkeypatch.setattr(datasets, "DEBIAN_DIR", tmp_path)
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(datasets, "download_fashion_mnist", lambda *a, **k: pytest.fail("fetched"))
    assert cli.main(["demo", "--download", "--epochs", "1", "--no-progress"]) == 0
    assert "Fashion-MNIST: 200 training and 40 test examples" in capsys.readouterr().out


def test_demo_download_without_network_says_so_and_runs_the_synthetic_task(tmp_path, monkeypatch,
                                                                            capsys):
    # issue 23: without network, --download ended in a raw URLError traceback.
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert cli.main(["demo", "--download", "--data-dir", str(tmp_path / "d"), "--epochs", "1",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "could not be downloaded: could not download http" in out
    assert "Temporary failure in name resolution" in out
    assert "synthetic classification task instead" in out


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
