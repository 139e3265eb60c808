#!/usr/bin/env bash
# Run kernel-level tests under valgrind memcheck (Linux; apt-get install valgrind).
#
#   tools/valgrind.sh [pytest arguments]       default: the subset in DEFAULT_TESTS below
#   PYTHON=/path/to/python tools/valgrind.sh   an interpreter where fastadam is installed
#                                              (pip install -e ".[test]"), default python3
#
# What fails the run: a memcheck error (invalid read/write, use of uninitialised memory,
# bad free, overlap) with a frame in fastadam's compiled modules (fastadam/_kernels*.so),
# or a block definitely lost that was allocated under one of them, or a failing test.
# Reports in CPython, NumPy or libgomp alone are counted and listed in the summary but do
# not fail the run: CPython 3.11 alone reports "uninitialised value" in
# longobject.c:maybe_small_long on every start, and interpreter state that is never freed
# at exit (definitely lost by memcheck's definition) is not a fastadam leak. That is why
# the filter is by stack, not a suppression file: fastadam frames are what we own.
#
# PYTHONMALLOC=malloc sends Python's allocations to malloc, which memcheck tracks (with
# pymalloc, memcheck sees arenas, not objects). The compiled modules are the installed
# ones (built with -g by default). Valgrind does not emulate AVX-512: its CPUID hides it,
# so fastadam._simd runs the AVX2 loops (or the baseline ones) here.
#
# Why a subset: memcheck runs 20-50x slower. DEFAULT_TESTS run every kernel variant at
# small sizes (vector bodies and tails), both dtypes, 1 and 2 threads, the chunk engine
# past 2**32 elements, the fuzz tests of every entry point, the optimizer's steps and
# state dicts, and the lazy row path (test_rows.py: 552 tests, 2m22s under memcheck here,
# no reports).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
command -v valgrind > /dev/null || { echo "tools/valgrind.sh: valgrind not found" >&2; exit 2; }

DEFAULT_TESTS=(tests/test_kernels.py tests/test_large_buffers.py tests/test_fuzz.py
               tests/test_optim.py tests/test_validation.py tests/test_buffers.py
               tests/test_rows.py -k "not large_buffer_matches and not thread_count")
[ "$#" -eq 0 ] && set -- "${DEFAULT_TESTS[@]}"

work=$(mktemp -d "${TMPDIR:-/tmp}/fastadam-valgrind.XXXXXX")
trap 'rm -rf "$work"' EXIT
status=0
(cd "$repo" && PYTHONMALLOC=malloc valgrind --tool=memcheck --xml=yes \
    --xml-file="$work/memcheck.%p.xml" --leak-check=full --show-leak-kinds=definite \
    --num-callers=40 --child-silent-after-fork=yes \
    "$python" -m pytest -p no:cacheprovider -q "$@") || status=$?

"$python" - "$work" <<'PY'
"""Summarize memcheck's XML; exit 1 if any error or leak involves fastadam's modules."""
import glob
import sys
import xml.etree.ElementTree as ET

OURS = "/fastadam/_kernels"
ours, others = [], {}
for path in glob.glob(f"{sys.argv[1]}/memcheck.*.xml"):
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:  # a process killed mid-write
        print(f"tools/valgrind.sh: unreadable {path}: {exc}")
        ours.append(("unreadable log", str(exc)))
        continue
    for error in root.iter("error"):
        kind = error.findtext("kind")
        frames = [(f.findtext("obj") or "", f.findtext("fn") or "?", f.findtext("file") or "",
                   f.findtext("line") or "") for f in error.iter("frame")]
        what = error.findtext("what") or error.findtext("xwhat/text") or kind
        if any(OURS in obj for obj, *_ in frames):
            stack = "\n".join(f"    {fn} {file}:{line} ({obj})" for obj, fn, file, line in frames[:15])
            ours.append((what, stack))
        else:
            top = next((f"{fn} ({obj.rsplit('/', 1)[-1]})" for obj, fn, *_ in frames), "?")
            key = f"{kind} at {top}"
            others[key] = others.get(key, 0) + int(error.findtext("count") or 1)
print(f"tools/valgrind.sh: memcheck reports outside fastadam (not failing): {sum(others.values())}")
for key, count in sorted(others.items(), key=lambda kv: -kv[1])[:15]:
    print(f"  {count:6d}  {key}")
print(f"tools/valgrind.sh: memcheck reports involving fastadam/_kernels*: {len(ours)}")
for what, stack in ours:
    print(f"  {what}\n{stack}")
sys.exit(1 if ours else 0)
PY
report=$?
if [ "$status" -ne 0 ]; then
    echo "tools/valgrind.sh: FAILED: pytest exited with $status" >&2
    exit "$status"
fi
[ "$report" -eq 0 ] || { echo "tools/valgrind.sh: FAILED: memcheck reports in fastadam" >&2; exit 1; }
echo "tools/valgrind.sh: passed"
