"""What the examples need beyond fastadam, with the install line to say when it is missing.

    pip install ".[examples]"          matplotlib and tqdm: the pictures, the progress bars
    pip install ".[examples,torch]"    and torch, for the PyTorch examples
"""

import importlib
import sys

INSTALL = {
    "matplotlib": 'pip install "fastadam[examples]" (or pip install matplotlib)',
    "tqdm": 'pip install "fastadam[examples]" (or pip install tqdm)',
    "torch": 'pip install "fastadam[torch]" (or pip install torch)',
    "keras": 'pip install "fastadam[keras]" (or pip install keras)',
    "jax": 'pip install "fastadam[jax]" (or pip install jax)',
    "tensorflow": 'pip install tensorflow-cpu (Keras\'s TensorFlow backend)',
    "mpi4py": 'pip install "fastadam[mpi]" mpich (or mpi4py built against your MPI)',
    "deepspeed": "pip install deepspeed (without CUDA: DS_ACCELERATOR=cpu DS_BUILD_OPS=0 "
                 "pip install --no-build-isolation deepspeed)",
}


def require(module: str):
    """Import ``module``, or exit with a message that names the script and what to
    install (instead of a bare ModuleNotFoundError)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        script = sys.argv[0] or "this example"
        raise SystemExit(f"{script} needs {module.split('.')[0]}, which is not installed: "
                         f"{INSTALL.get(module.split('.')[0], f'pip install {module}')} ({exc})") from None
