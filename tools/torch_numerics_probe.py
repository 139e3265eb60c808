#!/usr/bin/env python3
"""Which operations does torch's fused CPU Adam fuse into FMAs? Find out by experiment.

Runs torch._fused_adam_/_fused_adamw_ (the kernel of torch.optim.Adam/AdamW(fused=True))
in a subprocess at a chosen ATen CPU capability, on random float32 and float64 states,
for every flag (L2 and decoupled decay, AMSGrad, maximize, grad_scale, both lerp branches)
and every tail length, then replays each element with candidate models compiled from C
with -ffp-contract=off, where every FMA is an explicit fma()/fmaf(): which candidates
give torch's bits in each region of the tensor? The finding is in docs/numerics-torch.md
and in fastadam's numerics="torch" profile; rerun this after a torch upgrade.

    python tools/torch_numerics_probe.py                  # torch's own capability
    python tools/torch_numerics_probe.py --capability avx2

Needs torch, NumPy and a C compiler (cc). Regions of a tensor of n elements (torch's
threads split tensors at multiples of 64 bytes, so only the end of a tensor has a tail):
"vector": [0, n - n % W), W = the vector width of the capability (AVX-512: 16 float32 /
8 float64, AVX2: 8 / 4); "remainder 32 B": [n - n % W, n - n % V), V = 32 bytes of
elements (empty at AVX2); "scalar tail": [n - n % V, n). With torch 2.13 the remainder
behaves like the vector loop: the wheel has no AVX-512 build of this kernel and runs its
AVX2 build at the AVX512 capability (docs/numerics-torch.md).
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HARNESS = r"""
#include <math.h>
#include <stdint.h>
enum { F_L2 = 1, F_LERP = 2, F_VA = 4, F_VB = 8, DECOUPLED = 16, AMS = 32, MAXIMIZE = 64,
       SCALED = 128, L2 = 256 };
/* One Adam step, element by element, in torch's order; FMAs only where flags say. */
#define MODEL(NAME, T, FMA, SQRT)                                                        \
void NAME(int64_t n, T* p, T* g_, T* m, T* v, T* vmax, double lr, double beta1,         \
          double beta2, double wd, double eps, double step, float gs, int flags) {       \
  double bc1 = 1 - pow(beta1, step), bc2 = 1 - pow(beta2, step);                         \
  T w = (T)(1 - beta1), b2 = (T)beta2, c2 = (T)(1 - beta2), r2 = (T)sqrt(bc2);           \
  T teps = (T)eps, s = (T)(-(lr / bc1)), twd = (T)wd, scale = (T)(1 - lr * wd);          \
  for (int64_t i = 0; i < n; i++) {                                                      \
    T g = g_[i], pi = p[i], mi = m[i], vi = v[i];                                        \
    if (flags & SCALED) g = g / (T)gs;                                                   \
    if (flags & MAXIMIZE) g = -g;                                                        \
    if (flags & L2) g = (flags & F_L2) ? FMA(pi, twd, g) : g + pi * twd;                 \
    if (flags & DECOUPLED) pi = pi * scale;                                              \
    if (w < (T)0.5) mi = (flags & F_LERP) ? FMA(w, g - mi, mi) : mi + w * (g - mi);      \
    else mi = (flags & F_LERP) ? FMA(w - (T)1, g - mi, g) : g - (g - mi) * ((T)1 - w);   \
    if (flags & F_VA) vi = FMA(vi, b2, (c2 * g) * g);                                    \
    else if (flags & F_VB) vi = FMA(c2 * g, g, vi * b2);                                 \
    else vi = vi * b2 + (c2 * g) * g;                                                    \
    m[i] = mi; v[i] = vi;                                                                \
    if (flags & AMS) { T x = vmax[i]; vi = x < vi ? vi : x; vmax[i] = vi; }              \
    p[i] = pi + s * mi / (SQRT(vi) / r2 + teps);                                         \
  }                                                                                      \
}
MODEL(model_f32, float, fmaf, sqrtf)
MODEL(model_f64, double, fma, sqrt)
"""
F_L2, F_LERP, F_VA, F_VB, DECOUPLED, AMS, MAXIMIZE, SCALED, L2 = (1 << i for i in range(9))
CANDIDATES = {}
for _l2, _lerp, _v in itertools.product([0, F_L2], [0, F_LERP], [0, F_VA, F_VB]):
    CANDIDATES[" ".join(filter(None, [
        "g=fma(p,wd,g)" if _l2 else "", "m=fma(lerp)" if _lerp else "",
        {0: "v unfused", F_VA: "v=fma(v,b2,c2*g*g)", F_VB: "v=fma(c2*g,g,v*b2)"}[_v]]))] = \
        _l2 | _lerp | _v
WIDTH = {"AVX512": 64, "AVX2": 32, "DEFAULT": 32}  # bytes per torch vector


def cases():
    out = []
    for dtype, ams, decay, maximize, gs, beta1 in itertools.product(
            ["float32", "float64"], [False, True], ["none", "l2", "decoupled"], [False, True],
            [1.0, 3.0], [0.9, 0.3]):
        for r in range(16):  # every tail length
            out.append(dict(dtype=dtype, n=2048 + r, seed=len(out), ams=ams,
                            decoupled=decay == "decoupled", wd=0.0 if decay == "none" else 0.05,
                            maximize=maximize, gs=gs, beta1=beta1, beta2=0.999, lr=1e-2,
                            step=3))
    return out


def inputs(case):
    rng = np.random.default_rng(case["seed"])
    n, dtype = case["n"], np.dtype(case["dtype"])
    p, g = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    m = (0.1 * rng.standard_normal(n)).astype(dtype)
    v = (0.01 * rng.random(n)).astype(dtype)
    return p, g, m, v, (v * rng.uniform(0.5, 1.5, n)).astype(dtype)


def worker(cases_file, out_file):
    import torch

    out = {"capability": np.array(torch.backends.cpu.get_cpu_capability())}
    torch.set_num_threads(1)
    for k, c in enumerate(json.loads(Path(cases_file).read_text())):
        p, g, m, v, vmax = (torch.from_numpy(x) for x in inputs(c))
        kernel = torch._fused_adamw_ if c["decoupled"] else torch._fused_adam_
        kernel([p], [g], [m], [v], [vmax] if c["ams"] else [], [torch.tensor(float(c["step"]))],
               lr=c["lr"], beta1=c["beta1"], beta2=c["beta2"], weight_decay=c["wd"], eps=1e-8,
               amsgrad=c["ams"], maximize=c["maximize"], found_inf=None,
               grad_scale=torch.tensor(c["gs"]) if c["gs"] != 1.0 else None)
        for name, x in zip(("p", "m", "v", "vmax"), (p, m, v, vmax)):
            out[f"{k}_{name}"] = x.numpy()
    np.savez(out_file, **out)


def build_harness(directory):
    source, library = Path(directory) / "harness.c", Path(directory) / "harness.so"
    source.write_text(HARNESS)
    subprocess.run([os.environ.get("CC", "cc"), "-O2", "-ffp-contract=off", "-fPIC", "-shared",
                    str(source), "-o", str(library), "-lm"], check=True)
    return ctypes.CDLL(str(library))


def replay(lib, case, flags, region):
    arrays = [np.ascontiguousarray(x[region]) for x in inputs(case)]
    flags |= ((AMS if case["ams"] else 0) | (MAXIMIZE if case["maximize"] else 0)
              | (SCALED if case["gs"] != 1.0 else 0))
    if case["wd"]:
        flags |= DECOUPLED if case["decoupled"] else L2
    model = lib.model_f32 if case["dtype"] == "float32" else lib.model_f64
    model(ctypes.c_int64(arrays[0].size), *[a.ctypes.data_as(ctypes.c_void_p) for a in arrays],
          *[ctypes.c_double(x) for x in (case["lr"], case["beta1"], case["beta2"], case["wd"],
                                         1e-8, case["step"])],
          ctypes.c_float(case["gs"]), ctypes.c_int(flags))
    p, _, m, v, vmax = arrays
    return {"p": p, "m": m, "v": v, "vmax": vmax}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capability", default=None,
                        help="ATEN_CPU_CAPABILITY for torch (default: torch's own choice)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    all_cases = cases()
    with tempfile.TemporaryDirectory() as tmp:
        cases_file, out_file = Path(tmp) / "cases.json", Path(tmp) / "out.npz"
        cases_file.write_text(json.dumps(all_cases))
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        if args.capability:
            env["ATEN_CPU_CAPABILITY"] = args.capability
        subprocess.run([sys.executable, __file__, "--worker", str(cases_file), str(out_file)],
                       env=env, check=True)
        torch_out = dict(np.load(out_file))
        lib = build_harness(tmp)
    capability = str(torch_out["capability"])
    print(f"torch capability: {capability}")
    matches = {}
    for k, case in enumerate(all_cases):
        n, itemsize = case["n"], np.dtype(case["dtype"]).itemsize
        wide, narrow = WIDTH[capability] // itemsize, 32 // itemsize
        regions = {"vector": slice(0, n - n % wide), "remainder 32 B": slice(n - n % wide, n - n % narrow),
                   "scalar tail": slice(n - n % narrow, n)}
        for name, region in regions.items():
            if region.stop <= region.start:
                continue
            fits = set()
            for candidate, flags in CANDIDATES.items():
                got = replay(lib, case, flags, region)
                keys = ["p", "m", "v"] + (["vmax"] if case["ams"] else [])
                if all(np.array_equal(got[x].view(np.uint8), torch_out[f"{k}_{x}"][region].view(np.uint8))
                       for x in keys):
                    fits.add(candidate)
            l2 = "L2 decay" if case["wd"] and not case["decoupled"] else "no L2 decay"
            key = (case["dtype"], name, l2)
            matches[key] = matches.get(key, set(CANDIDATES)) & fits
    for key in sorted(matches):
        print(" / ".join(key) + ": " + ("; ".join(sorted(matches[key])) or "NO candidate fits"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
