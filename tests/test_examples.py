"""The example scripts run end to end (on small data the tests write)."""

import os
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


def test_fashion_mnist_torch_trains_every_precision_on_a_tiny_dataset(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("ml_dtypes")
    write_split(tmp_path, "train", n=128)
    write_split(tmp_path, "test", n=32)
    out = run("fashion_mnist_torch.py", "--data-dir", str(tmp_path), "--epochs", "1",
              "--batch-size", "64", "--precision", "all", "--optimizer", "fastadam", "torch-fused")
    for precision in ("fp32", "bf16-master", "bf16", "bf16-sr", "fp32-bf16-moments"):
        assert f"| fastadam | {precision} |" in out
    assert "| torch-fused | fp32 |" in out and "| torch-fused | bf16 |" in out
    assert "| torch-fused | fp32-bf16-moments |" in out  # (emulated: moments rounded after each step)
    # torch has neither master weights nor stochastic rounding: said, not run
    assert "torch-fused does not run bf16-master (fastadam only)" in out
    assert "| torch-fused | bf16-sr |" not in out
    # pure bfloat16 is torch's fused Adam bit for bit, over a whole training run
    assert "bf16: fastadam's final weights are torch-fused's, bit for bit" in out
    # fastadam's bfloat16 moments are torch-fused's emulation of them, bit for bit (ATen's
    # default capability, which conftest.py sets for the example's process too)
    assert "fp32-bf16-moments: fastadam's final weights are torch-fused's, bit for bit" in out


def test_fashion_mnist_keras_functions_on_a_subset(tmp_path, monkeypatch):
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("the example runs on Keras's torch backend")
    write_split(tmp_path, "train", n=512)
    write_split(tmp_path, "test", n=128)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import fashion_mnist_keras as task

    train, test = task.load_train(str(tmp_path)), task.load_test(str(tmp_path))
    assert train[0].shape == (512, 28, 28, 1) and train[0].max() <= 1.0
    model = task.create_model(train[0].shape[1:])
    before = model.evaluate(*train, verbose=0)[0]
    model = task.train_model(model, train, test, batch_size=64, epochs=3)
    assert model.evaluate(*train, verbose=0)[0] < before  # the loss falls (random labels: memorised)
    assert model.optimizer.kernel_steps > 0


@pytest.mark.parametrize("backend", ["torch", "jax", "tensorflow"])
def test_fashion_mnist_keras_quick_on_every_installed_backend(tmp_path, backend):
    # issue 22 item 4: the task runs on each backend with fastadam's kernels and reports
    # accuracy, training time and the optimizer's share (Keras reads KERAS_BACKEND once
    # per process: one subprocess per backend)
    pytest.importorskip("keras")
    pytest.importorskip(backend)
    write_split(tmp_path, "train", n=300)
    write_split(tmp_path, "test", n=100)
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, str(EXAMPLES / "fashion_mnist_keras.py"), "--quick",
                             "--data-dir", str(tmp_path), "--batch-size", "64", "--repeats", "3"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"backend {backend}: 300 training and 100 test images, 1 epoch(s)" in out
    accuracy = float(out.split("test accuracy ")[1].split()[0])
    assert 0.0 <= accuracy <= 1.0
    assert "training " in out and "for 5 steps" in out  # ceil(300 / 64)
    # the update went through fastadam's kernels, and both optimizers were timed
    assert f"backend {backend}: fastadam.keras.Adam " in out and "(fastadam kernels)" in out
    share = float(out.split("optimizer share of training ")[1].split("%")[0])
    assert 0.0 < share < 100.0


def test_trajectories_draws_and_adam_reaches_the_minima(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    out = run("trajectories.py", "--steps", "60", "--out", str(tmp_path / "t.png"),
              "--gif", str(tmp_path / "t.gif"))
    assert (tmp_path / "t.png").stat().st_size > 10_000 and (tmp_path / "t.gif").exists()
    assert "Rosenbrock: f at the end" in out
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import trajectories

    for problem in trajectories.PROBLEMS[:2]:  # Rosenbrock and Beale: Adam gets to the minimum
        path = trajectories.run_optimizer("Adam", problem, 1000)
        assert problem.f(path[-1]) < 1e-4, problem.name
    saddle = trajectories.PROBLEMS[2]  # Adam leaves the saddle point
    assert saddle.f(trajectories.run_optimizer("Adam", saddle, 300)[-1]) < -1


def test_paper_experiments_on_a_tiny_dataset(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    write_split(tmp_path, "train", n=256)
    write_split(tmp_path, "test", n=32)
    out = run("paper_experiments.py", "--data-dir", str(tmp_path), "--logreg-epochs", "2",
              "--mlp-epochs", "1", "--out-dir", str(tmp_path))
    for name in ("Adam (fastadam)", "AdaGrad", "SGD Nesterov", "RMSProp"):
        assert f"Logistic regression (alpha/sqrt(t)): {name}: training cost" in out
    assert (tmp_path / "paper_logreg.png").exists() and (tmp_path / "paper_mlp.png").exists()


def test_trajectories_writes_where_it_is_run_and_never_over_the_docs_image(tmp_path):
    # issue 23: the default was a relative docs/images/... path: FileNotFoundError from
    # elsewhere, and from the root it overwrote the committed picture.
    pytest.importorskip("matplotlib")
    docs_image = EXAMPLES.parent / "docs" / "images" / "trajectories.png"
    before = docs_image.read_bytes() if docs_image.exists() else None
    import fastadam  # where it was imported from: the same for the script run elsewhere

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(fastadam.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(EXAMPLES / "trajectories.py"), "--steps", "30"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "trajectories.png").stat().st_size > 10_000
    assert (docs_image.read_bytes() if docs_image.exists() else None) == before
    run("trajectories.py", "--steps", "30", "--out", str(tmp_path / "new" / "dir" / "t.png"))
    assert (tmp_path / "new" / "dir" / "t.png").exists()  # missing directories are made


@pytest.mark.parametrize("script, missing, install", [
    ("trajectories.py", "matplotlib", 'pip install "fastadam[examples]'),
    ("paper_experiments.py", "torch", 'pip install "fastadam[torch]'),
    ("fashion_mnist_torch.py", "torch", 'pip install "fastadam[torch]'),
    ("fashion_mnist_keras.py", "keras", 'pip install "fastadam[keras]'),
    ("distributed_mpi.py", "mpi4py", 'pip install "fastadam[mpi]'),
    ("fsdp2_offload.py", "torch", 'pip install "fastadam[torch]'),
    ("deepspeed_offload.py", "torch", 'pip install "fastadam[torch]'),
    ("deepspeed_offload.py", "deepspeed", "pip install deepspeed (without CUDA: DS_ACCELERATOR=cpu"),
])
def test_an_example_without_its_extra_names_what_to_install(script, missing, install):
    # issue 23: examples failed with a bare ModuleNotFoundError
    code = (f"import runpy, sys; sys.modules[{missing!r}] = None; "
            f"sys.path.insert(0, {str(EXAMPLES)!r}); sys.argv = [{script!r}]; "
            f"runpy.run_path({str(EXAMPLES / script)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert f"{script} needs {missing}, which is not installed: {install}" in result.stderr
    assert "Traceback" not in result.stderr
