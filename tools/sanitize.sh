#!/usr/bin/env bash
# Run the test suite against an AddressSanitizer + UndefinedBehaviorSanitizer build of
# fastadam's compiled modules (GCC or Clang, Linux).
#
#   tools/sanitize.sh [pytest arguments]      default: the whole test suite (tests/)
#   PYTHON=/path/to/python tools/sanitize.sh  an interpreter with the test dependencies
#                                             (pip install ".[test]"), default python3
#
# How: the tracked and untracked (not ignored) files of this checkout are copied to a
# throwaway directory, built there in place with FASTADAM_SANITIZE=1 (setup.py adds
# -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g
# to the usual -O3 flags), and pytest runs there with that src/ first on PYTHONPATH (it
# shadows any installed fastadam; checked before the run). This checkout's own build is
# never touched.
#
# CPython is not instrumented, so libasan is preloaded (LD_PRELOAD) to come first in the
# process (with libstdc++, for the C++ extensions of test dependencies).
# PYTHONMALLOC=malloc sends Python's allocations through ASan's malloc too, so a kernel
# write past the end of a bytearray, array.array or NumPy buffer is caught. Leak
# detection is off (ASAN_OPTIONS=detect_leaks=0): CPython deliberately does not free its
# interned objects and module state at exit, which LeakSanitizer reports by the thousand
# (none of it ours), and a suppression file cannot say "everything but fastadam". Leaks
# are checked by tools/valgrind.sh instead, which fails on blocks definitely lost that
# were allocated under fastadam's compiled modules.
#
# Every process (pytest and the Python subprocesses some tests start) logs its reports to
# its own file; the script exits non-zero if pytest fails OR any report was written.
#
# Meaningful, not just green: before the suite, a deliberate out-of-bounds read (a
# 10-element gradient handed to the private kernel entry for 1000 parameters, which
# trusts its caller) must produce an ASan heap-buffer-overflow report, in its own log
# directory; if it does not, the instrumentation is not live and the script fails. The
# suite skips nothing because of the sanitizers: the memory tests measure ASan's own
# count of allocated bytes instead of the resident set, which ASan's quarantine inflates
# (tests/test_memory.py); pytest's summary (-ra) lists every skip with its reason (only
# environment ones: a console script not on PATH, a data set not installed, Python 3.12+).
#
# PyTorch, Keras and the MPI tests (mpiexec and its ranks inherit the environment) run
# under it too: they were checked to work (no reports from torch's own libraries), so the
# default is the whole suite (11 minutes on 2 shared cores here, 4591 tests; the build is
# about a minute of it).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
cc=${CC:-gcc}

work=$(mktemp -d "${TMPDIR:-/tmp}/fastadam-sanitize.XXXXXX")
trap 'rm -rf "$work"' EXIT
reports="$work/reports"
mkdir -p "$reports"

echo "tools/sanitize.sh: copying the checkout to $work"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard) |
    while IFS= read -r -d '' file; do
        if [ -e "$repo/$file" ]; then  # (a tracked file deleted in the worktree is skipped)
            (cd "$repo" && cp --parents "$file" "$work/")
        fi
    done

echo "tools/sanitize.sh: building with FASTADAM_SANITIZE=1"
(cd "$work" && FASTADAM_SANITIZE=1 FASTADAM_OPENMP=1 "$python" setup.py -q build_ext --inplace)

libasan=$("$cc" -print-file-name=libasan.so)
[ -e "$libasan" ] || { echo "tools/sanitize.sh: $cc has no libasan.so" >&2; exit 2; }
libasan=$(readlink -f "$libasan")
# C++ extensions (matplotlib's ft2font, via pybind11) throw C++ exceptions; ASan intercepts
# __cxa_throw and finds no real one unless libstdc++ is loaded when it starts ("CHECK failed:
# asan_interceptors.cpp ... real___cxa_throw").
libstdcxx=$(readlink -f "$("$cc" -print-file-name=libstdc++.so)")

export PYTHONPATH="$work/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONMALLOC=malloc
export LD_PRELOAD="$libasan $libstdcxx${LD_PRELOAD:+ $LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:log_path=$reports/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$reports/ubsan"

# The sanitized build must be the one imported, with the sanitizer flags.
"$python" - "$work" <<'PY'
import sys
import fastadam._kernels as k
from fastadam import _simd
assert k.__file__.startswith(sys.argv[1]), f"imported {k.__file__}, not the sanitized build"
assert "-fsanitize=address,undefined" in k.build_info()["cflags"], k.build_info()
print(f"tools/sanitize.sh: {k.__file__}\n  {k.build_info()['cflags']}\n"
      f"  SIMD levels: {_simd.available_levels()}")
PY

# The instrumentation is live: a deliberate overflow must be reported (not counted below).
canary="$work/canary"
mkdir -p "$canary"
if ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$canary/asan" "$python" - <<'PY' 2>/dev/null
import numpy as np
from fastadam import _kernels
from fastadam._validation import check_call_hyperparameters
param, m, v = (np.zeros(1000, np.float32) for _ in range(3))
grad = np.zeros(10, np.float32)  # 990 elements short: the kernel reads past its end
hyper = check_call_hyperparameters(1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False, False,
                                   0.0, "exact")
_kernels.adam_step(param, grad, m, v, None, hyper, 1.0, 1.0, 1)
PY
then
    echo "tools/sanitize.sh: FAILED: a deliberate heap overflow went unreported" >&2
    exit 1
fi
if ! grep -qs "heap-buffer-overflow" "$canary"/asan.*; then
    echo "tools/sanitize.sh: FAILED: the deliberate overflow gave no heap-buffer-overflow report" >&2
    cat "$canary"/asan.* >&2 || true
    exit 1
fi
echo "tools/sanitize.sh: instrumentation live (a deliberate overflow was reported)"

[ "$#" -eq 0 ] && set -- tests
status=0
(cd "$work" && "$python" -m pytest -p no:cacheprovider -q "$@") || status=$?

if compgen -G "$reports/*" > /dev/null; then
    for report in "$reports"/*; do
        echo "=== $report"
        cat "$report"
    done
    echo "tools/sanitize.sh: FAILED: sanitizer reports above" >&2
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "tools/sanitize.sh: FAILED: pytest exited with $status" >&2
    exit "$status"
fi
echo "tools/sanitize.sh: passed, no sanitizer reports"
