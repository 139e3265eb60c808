"""README and the documentation pages: every code block runs as pasted, README's first
commands are the ones .ci/run executes, and no file refers to a document that is not in
the repository."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
pytestmark = pytest.mark.skipif(not README.exists(), reason="not a source checkout")


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def run_block(code, cwd, name):
    """Run a code block as a user would paste it: a fresh interpreter, in an empty
    directory, without this test session's KERAS_BACKEND; skip it when it imports an
    optional package that is not installed."""
    for module in ("torch", "keras", "mpi4py", "transformers", "lightning", "timm"):
        if re.search(rf"^\s*(import|from) {module}\b", code, flags=re.M) and \
                importlib.util.find_spec(module) is None:
            pytest.skip(f"{name} needs {module}, which is not installed")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    import fastadam  # the same fastadam as this session (installed, or built under src/)

    env["PYTHONPATH"] = os.pathsep.join([str(Path(fastadam.__file__).parents[1]),
                                         env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{name} failed as pasted:\n{result.stderr[-3000:]}"
    return result.stdout


def test_readme_has_numpy_pytorch_keras_and_mixed_precision_examples():
    blocks = python_blocks(README)
    assert len(blocks) == 4
    assert "import fastadam\n" in blocks[0] and "import fastadam.torch" in blocks[1]
    assert "import fastadam.keras" in blocks[2]
    assert "master_weights=True" in blocks[3]


def test_readme_mixed_precision_example_learns(tmp_path):
    out = run_block(python_blocks(README)[3], tmp_path, "README's mixed-precision example")
    assert float(out.split("loss ")[1].split()[0]) < 0.1
    assert out.strip().endswith("torch.float32")


def test_readme_numpy_example_learns(tmp_path):
    out = run_block(python_blocks(README)[0], tmp_path, "README's NumPy example")
    assert float(out.split("accuracy ")[1]) > 0.95
    assert (tmp_path / "adam.npz").exists()


def test_readme_pytorch_example_learns(tmp_path):
    out = run_block(python_blocks(README)[1], tmp_path, "README's PyTorch example")
    assert float(out.split("loss ")[1]) < 0.05


def test_readme_keras_example_learns_without_keras_backend_set(tmp_path):
    # issue 23: the block failed as pasted (Keras defaults to TensorFlow)
    out = run_block(python_blocks(README)[2], tmp_path, "README's Keras example")
    assert float(out.split("accuracy ")[1]) > 0.9


def docs_blocks():
    return [pytest.param(page, i, code, id=f"{page.relative_to(DOCS)}-{i}")
            for page in sorted(DOCS.rglob("*.md")) for i, code in enumerate(python_blocks(page))]


@pytest.mark.parametrize("page, index, code", docs_blocks())
def test_documentation_code_blocks_run_as_pasted(page, index, code, tmp_path):
    run_block(code, tmp_path, f"{page.relative_to(ROOT)} block {index}")


def test_readme_first_screen_answers_install_run_test_and_how_long():
    text = README.read_text()
    assert len(text) < 8000, "README is the short front door; the rest goes in docs/"
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    lines = first_block.strip().splitlines()
    assert lines[0] == 'pip install ".[demo]" && python -m fastadam demo'
    assert lines[1].startswith("pip install ") and lines[1].endswith("python -m pytest")
    assert lines[2].startswith("pip install ") and lines[2].endswith("python -m pytest -m quick")
    first_screen = text[:text.index("## NumPy")]
    for words in ("how long", "`pip install .`", "`python -m fastadam demo`",
                  "`python -m pytest`", "`python -m pytest -m quick`", '".[examples]"'):
        assert words in first_screen, words


def test_ci_runs_the_full_suite_line_of_readme():
    # .ci/run takes the first install-and-test line: the full suite, not the quick one.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -m1 -E '^pip install .*pytest' README.md" in ci
    first = next(line for line in README.read_text().splitlines()
                 if re.match(r"^pip install .*pytest", line))
    assert first.endswith("python -m pytest") and "mpi4py" in first
    assert "-m quick" in ci  # and it refuses a quick line, should the order change


def test_the_full_test_line_installs_the_frameworks_beside_the_torch_it_names():
    # issue 18: transformers' accelerate and lightning require torch; unconstrained, pip
    # would replace the torch the line names by its newest release, a CUDA build with
    # gigabytes of nvidia-* wheels. The constraints file pins the same torch.
    first = next(line for line in README.read_text().splitlines()
                 if re.match(r"^pip install .*pytest", line))
    assert re.search(r'"\.\[[\w,]*integrations[\w,]*\]"', first)
    assert " -c constraints/torch-cpu.txt " in first
    named = re.search(r"\btorch==(\S+)", first).group(1)
    pins = [line for line in (ROOT / "constraints" / "torch-cpu.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert pins == [f"torch=={named}"]


def test_reliability_md_names_tests_that_exist():
    # RELIABILITY.md maps each guarantee to the test that proves it: a renamed or deleted
    # test must not leave a guarantee pointing at nothing.
    text = (ROOT / "RELIABILITY.md").read_text()
    references = re.findall(r"`(tests/\w+\.py)(?:::(\w+))?`", text)
    assert len(references) > 30
    for path, name in references:
        source = ROOT / path
        assert source.exists(), path
        if name:
            assert re.search(rf"^def {name}\(", source.read_text(), flags=re.M), f"{path}::{name}"
    assert "(RELIABILITY.md)" in README.read_text()


TEXT_SUFFIXES = {".md", ".rst", ".py", ".pyx", ".pxi", ".pxd", ".pyi", ".h", ".toml", ".txt",
                 ".yml", ".sh", ".in", ".cfg"}


def repository_text_files():
    for path in ROOT.rglob("*"):
        parts = set(path.relative_to(ROOT).parts)
        if parts & {".git", "_build", "build", "dist", ".venv", "__pycache__"} or \
                any(p.endswith(".egg-info") for p in parts):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name == "run"):
            if path.suffix == ".c" or path.stat().st_size > 1_000_000:
                continue
            yield path


def test_no_file_refers_to_a_document_that_is_not_in_the_repository():
    # issue 23: the design contract and the performance notes were cited by README,
    # RELIABILITY.md and the sources under the names of files outside the repository.
    present = {p.name for p in ROOT.rglob("*.md") if ".git" not in p.parts}
    missing = []
    for path in repository_text_files():
        for name in re.findall(r"\b([A-Za-z][\w-]*\.md)\b", path.read_text(errors="replace")):
            if name not in present:
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert missing == []


def test_relative_links_of_readme_and_docs_resolve():
    pages = [README, ROOT / "RELIABILITY.md", *DOCS.rglob("*.md")]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"^(https?:|mailto:|#)", target):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []
