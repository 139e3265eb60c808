"""README's example runs, and its install-and-test line is the one .ci/run executes."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.skipif(not README.exists(), reason="not a source checkout")


def readme_examples():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README lost its python examples"
    return blocks


def test_readme_adam_step_example_runs(capsys):
    namespace = {}
    exec(compile(readme_examples()[0], "README example 1", "exec"), namespace)
    assert (namespace["param"] ** 2).mean() < 0.05  # it did minimise sum(param**2)
    assert "openmp" in capsys.readouterr().out


def test_readme_training_loop_learns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(readme_examples()[1], "README example 2", "exec"), namespace)
    assert namespace["accuracy"] > 0.95
    assert (tmp_path / "adam.npz").exists()


def test_readme_starts_with_install_and_run_then_install_and_test():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    lines = first_block.strip().splitlines()
    assert lines[0] == "pip install . && python -m fastadam demo"
    assert lines[1].startswith("pip install ") and "pytest" in lines[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "grep -m1 -E '^pip install .*pytest' README.md" in ci


def test_reliability_md_names_tests_that_exist():
    # RELIABILITY.md maps each guarantee to the test that proves it: a renamed or deleted
    # test must not leave a guarantee pointing at nothing.
    text = (README.parent / "RELIABILITY.md").read_text()
    references = re.findall(r"`(tests/\w+\.py)(?:::(\w+))?`", text)
    assert len(references) > 30
    for path, name in references:
        source = README.parent / path
        assert source.exists(), path
        if name:
            assert re.search(rf"^def {name}\(", source.read_text(), flags=re.M), f"{path}::{name}"
    assert "(RELIABILITY.md)" in README.read_text()
