"""fastadam.keras.Adam on Keras's TensorFlow backend (issue 22, item 3): the update is one
host callback (tf.py_function) running fastadam's kernels in place on the variables'
memory, within 2e-6 of keras.optimizers.Adam; under XLA it is Keras's own update.

Keras reads KERAS_BACKEND once per process (tests/conftest.py sets torch), so the cases
run in tests/keras_tf_worker.py, in a process of its own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("keras")
pytest.importorskip("tensorflow")

WORKER = Path(__file__).with_name("keras_tf_worker.py")
pytestmark = pytest.mark.slow  # one subprocess training 26 small models


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    out = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True,
                         env=env, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return {r["case"]: r for r in map(json.loads, out.stdout.splitlines())}


def test_every_case_ran(results):
    assert set(results) == {"plain", "amsgrad", "weight_decay", "amsgrad-weight_decay",
                            "clipnorm", "ema", "accumulation", "loss_scale", "schedule",
                            "mixed_float16", "float16", "run_eagerly", "xla", "auto", "embedding",
                            "copy_on_read"}


@pytest.mark.parametrize("case", ["plain", "amsgrad", "weight_decay", "amsgrad-weight_decay",
                                  "clipnorm", "ema", "accumulation", "loss_scale", "schedule",
                                  "mixed_float16", "run_eagerly", "auto", "embedding"])
def test_every_step_runs_the_kernels_within_2e_6_of_keras(results, case):
    r = results[case]
    # Keras computes its step coefficient in float32, fastadam in double: the tolerance
    # of tests/test_keras_adapter.py on the torch backend
    assert r["diff"] <= 2e-6
    expected = 4 if case == "accumulation" else 8
    assert r["iterations"] == expected
    assert r["kernel_steps"] == expected  # every step went through the callback


@pytest.mark.parametrize("case", ["xla", "float16"])
def test_where_the_kernels_cannot_run_it_is_keras_adam_exactly(results, case):
    # jit_compile=True cannot compile a Python callback; float16 variables Keras updates
    # in 16 bits: Keras's update, bit for bit, and nothing of fastadam's ran
    assert results[case]["diff"] == 0.0 and results[case]["kernel_steps"] == 0
    assert results[case]["iterations"] == 8


def test_a_variable_read_by_copy_is_updated_through_its_copy(results):
    r = results["copy_on_read"]
    assert r["copied"] == [0]  # the gathered param; its moments are read in place
    assert r["diff"] <= 2e-6 and r["kernel_steps"] == 3 and r["iterations"] == 3


def test_buffers_stay_and_save_load_round_trips(results):
    r = results["plain"]
    assert r["in_place"]  # no copy per step: the kernels wrote into the variables' memory
    assert r["loaded"] == "fastadam.keras.Adam" and r["loaded_same"]
    assert r["loaded_kernel_steps"] == 4
