"""Hints at the point of error (issue 23, items 9 and 10): a message says what to do."""

import subprocess
import sys

import numpy as np
import pytest

import fastadam
from fastadam._hints import framework_hint, keyword_names


def test_a_torch_tensor_given_to_adam_step_points_to_fastadam_torch():
    torch = pytest.importorskip("torch")
    w = np.zeros(3, np.float32)
    with pytest.raises(TypeError, match=r"^param must be .*got Tensor; for torch tensors use "
                                        r"fastadam.torch.Adam"):
        fastadam.adam_step(torch.zeros(3), w, w.copy(), w.copy(), step=1)
    with pytest.raises(TypeError, match=r"got Parameter; for torch tensors use fastadam.torch.Adam"):
        fastadam.Adam([torch.nn.Parameter(torch.zeros(3))])


def test_framework_hint_recognises_types_by_their_module():
    fake = type("Variable", (), {"__module__": "keras.src.backend.common.variables"})()
    assert "fastadam.keras.Adam" in framework_hint(fake)
    assert "fastadam.jax.adam" in framework_hint(
        type("Array", (), {"__module__": "jaxlib.xla_extension"})())
    assert framework_hint([1.0]) == ""
    with pytest.raises(TypeError, match=r"got list$"):
        fastadam.adam_step([1.0], [1.0], [0.0], [0.0], step=1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(betas=(0.9,)), r"^betas must be a pair \(beta1, beta2\), got \(0.9,\)$"),
    (dict(betas=(0.9, 2)), r"^betas\[1\] must be in \[0, 1\), got 2.0$"),
    (dict(lr=-1.0), r"^lr must be >= 0"),
    (dict(eps_hat=True, eps_root=1.0), r"^eps_hat=True and eps_root > 0 select two"),
])
def test_constructor_errors_name_the_keyword_not_defaults(kwargs, message):
    # issue 23: Adam(betas=(0.9,)) said defaults['betas']
    w = np.zeros(3, np.float32)
    for cls in (fastadam.Adam, fastadam.AdamW):
        with pytest.raises((TypeError, ValueError), match=message):
            cls([w], **kwargs)


def test_keyword_names_leaves_other_errors_alone():
    with pytest.raises(ValueError, match=r"^params\[0\] is bad$"):
        with keyword_names():
            raise ValueError("params[0] is bad")
    with pytest.raises(KeyError):
        with keyword_names():
            raise KeyError("defaults['lr']")


@pytest.mark.parametrize("content", [b"hello, not a checkpoint" * 10, b"\x80\x04\x95pickle", b""])
def test_a_junk_checkpoint_gets_no_advice_to_load_it_unsafely(tmp_path, content):
    # issue 23: NumPy's "load it unsafely using allow_pickle" advice reached the user
    path = tmp_path / "junk.npz"
    path.write_bytes(content)
    w = np.zeros(3, np.float32)
    opt = fastadam.Adam([w])
    with pytest.raises(ValueError, match=r"is not a readable fastadam checkpoint \(not an .npz archive") as info:
        fastadam.load(opt, path)
    assert "pickle" not in str(info.value)


def test_import_fastadam_keras_without_keras_says_what_to_install():
    code = ("import sys; sys.modules['keras'] = None\n"
            "try:\n    import fastadam.keras\n"
            "except ModuleNotFoundError as e:\n    print(e.name, '|', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("keras | fastadam.keras needs keras, which is not installed: pip install keras")
