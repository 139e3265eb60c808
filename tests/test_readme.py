"""README's example runs, and its install-and-test line is the one .ci/run executes."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.skipif(not README.exists(), reason="not a source checkout")


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace = {}
    exec(compile(blocks[0], "README example", "exec"), namespace)
    assert (namespace["param"] ** 2).mean() < 0.05  # it did minimise sum(param**2)
    assert "openmp" in capsys.readouterr().out


def test_readme_starts_with_install_and_run_then_install_and_test():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    lines = first_block.strip().splitlines()
    assert lines[0].startswith("pip install . && python examples/")
    assert lines[1].startswith("pip install ") and "pytest" in lines[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "grep -m1 -E '^pip install .*pytest' README.md" in ci
