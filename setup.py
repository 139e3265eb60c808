"""Build of fastadam's compiled extension.

Only the extension list and the compiler flags live here; metadata is in pyproject.toml.

Flags, per compiler (chosen in BuildExt.build_extensions, where the compiler is known):
  GCC/Clang  -O3 -fno-math-errno -ffp-contract=off -g0, OpenMP with -fopenmp
             (-fno-math-errno lets sqrt vectorize and changes no IEEE result;
              -ffp-contract=off forbids silent FMA so results are bit-identical for every
              thread count and vector width; never -ffast-math, never -march=native)
  Apple      -Xpreprocessor -fopenmp with libomp (Homebrew's, or CPPFLAGS/LDFLAGS)
  MSVC       /O2 /fp:precise /openmp

Runtime SIMD dispatch (x86-64 only): the Adam loops are also compiled into
fastadam._kernels_avx2 (-march=x86-64-v3, /arch:AVX2) and fastadam._kernels_avx512
(-march=x86-64-v4, /arch:AVX512); fastadam._simd picks among the levels the running CPU
supports. A level the compiler cannot target is skipped with a warning.

FASTADAM_OPENMP=auto (default) | 1 | 0:
  auto  try-compile an OpenMP program; if that fails, warn loudly and build serial
  1     OpenMP is required: fail the build without it
  0     build a serial extension (warns loudly)

FASTADAM_SANITIZE=1 (GCC/Clang; tools/sanitize.sh sets it, never set it for a release):
  add -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
  -g to every module, compile and link (the optimization flags stay: the checked code is
  the shipped code). Unset or 0: no effect.
"""

import os
import platform
import runpy
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# -g0: no debug information (Python's own CFLAGS add -g, which made each module about six
# times larger than its code; tools/sanitize.sh's build adds -g back after these).
# -Wno-unused-function: Cython emits every combination of a function's fused types, and
# the kernels call only some (float64 math never meets bfloat16 storage); GCC drops the rest.
UNIX_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-g0", "-Wno-unused-function"]
MSVC_FLAGS = ["/O2", "/fp:precise"]
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                  "-fno-omit-frame-pointer", "-g"]

# The SIMD twins of the kernel module and their flags: src/fastadam/_simd_levels.py, the
# one table the build, the run-time dispatch and the vectorization check all read.
LEVELS = runpy.run_path(os.path.join("src", "fastadam", "_simd_levels.py"))["LEVELS"]
SIMD_LEVELS = {level.module: level for level in LEVELS if level.cpu is not None}

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return n > 0 ? 0 : 1;
    }
    """
)


def warn(message):
    bar = "*" * 78
    print(f"\n{bar}\n* fastadam: {message}\n{bar}\n", file=sys.stderr)


def homebrew_libomp():
    """(include_dir, lib_dir) of Homebrew's libomp, or None."""
    brew = shutil.which("brew")
    if brew is None:
        return None
    try:
        prefix = subprocess.run(
            [brew, "--prefix", "libomp"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    if not os.path.isdir(os.path.join(prefix, "include")):
        return None
    return os.path.join(prefix, "include"), os.path.join(prefix, "lib")


def openmp_flags(compiler_type):
    """(compile_args, link_args) that enable OpenMP for this compiler."""
    if compiler_type == "msvc":
        return ["/openmp"], []
    if sys.platform == "darwin":
        compile_args, link_args = ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
        dirs = homebrew_libomp()
        if dirs is not None:
            compile_args.append(f"-I{dirs[0]}")
            link_args[:0] = [f"-L{dirs[1]}", f"-Wl,-rpath,{dirs[1]}"]
        return compile_args, link_args
    return ["-fopenmp"], ["-fopenmp"]


def compiles_and_links(compiler, compile_args, link_args, program=OPENMP_PROBE):
    """Does a tiny program (by default an OpenMP one) compile and link with these flags?"""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write(program)
        try:
            objects = compiler.compile([source], output_dir=tmp, extra_postargs=compile_args)
            compiler.link_executable(
                objects, "probe", output_dir=tmp, extra_postargs=link_args
            )
        except Exception:  # distutils raises CompileError/LinkError, or OSError
            return False
    return True


class BuildExt(build_ext):
    def finalize_options(self):
        super().finalize_options()
        # The compiled modules build in parallel, one compiler per core (pip passes no -j):
        # `pip install .` took about 90 s with no output otherwise (issue 23).
        if not self.parallel:
            self.parallel = os.cpu_count() or 1

    def build_extensions(self):
        compiler_type = self.compiler.compiler_type
        opt_flags = MSVC_FLAGS if compiler_type == "msvc" else UNIX_FLAGS
        omp_compile, omp_link = self._openmp(compiler_type)
        sanitize = self._sanitize(compiler_type)
        flavour = "msvc" if compiler_type == "msvc" else "unix"
        for ext in list(self.extensions):
            simd = SIMD_LEVELS.get(ext.name)
            simd_flags = list(getattr(simd, f"{flavour}_flags")) if simd else []
            if simd and not compiles_and_links(self.compiler, simd_flags, [], "int main(void){return 0;}"):
                warn(f"the compiler cannot target {simd.name} ({' '.join(simd_flags)}): "
                     f"skipping {ext.name}; that SIMD level will not be used")
                self.extensions.remove(ext)
                continue
            cflags = " ".join(opt_flags + simd_flags + omp_compile + sanitize)
            print(f"fastadam: {ext.name}: {compiler_type} {cflags}", file=sys.stderr)
            ext.extra_compile_args = (opt_flags + simd_flags + omp_compile + sanitize
                                      + ext.extra_compile_args)
            ext.extra_link_args = omp_link + sanitize + ext.extra_link_args
            ext.define_macros.append(("FASTADAM_CFLAGS", f'"{cflags}"'))
        super().build_extensions()

    def _sanitize(self, compiler_type):
        mode = os.environ.get("FASTADAM_SANITIZE", "0").strip()
        if mode not in ("0", "1"):
            raise SystemExit(f"FASTADAM_SANITIZE must be 0 or 1, got {mode!r}")
        if mode == "0":
            return []
        if compiler_type == "msvc":
            raise SystemExit("FASTADAM_SANITIZE=1 needs GCC or Clang (tools/sanitize.sh)")
        warn("FASTADAM_SANITIZE=1: AddressSanitizer + UBSan build, for tools/sanitize.sh only; "
             "it imports only with libasan preloaded (LD_PRELOAD).")
        return list(SANITIZE_FLAGS)

    def _openmp(self, compiler_type):
        mode = os.environ.get("FASTADAM_OPENMP", "auto").strip().lower()
        if mode not in ("auto", "0", "1"):
            raise SystemExit(f"FASTADAM_OPENMP must be auto, 0 or 1, got {mode!r}")
        if mode == "0":
            warn("FASTADAM_OPENMP=0: building WITHOUT OpenMP; every update runs on one thread.")
            return [], []
        compile_args, link_args = openmp_flags(compiler_type)
        if compiles_and_links(self.compiler, compile_args, link_args):
            return compile_args, link_args
        if mode == "1":
            raise SystemExit(
                f"FASTADAM_OPENMP=1 but OpenMP does not work with {compiler_type} "
                f"(tried {compile_args} / {link_args})"
            )
        warn(
            "OpenMP was not found: building a SERIAL extension. Install an OpenMP runtime "
            "(libgomp, or libomp on macOS) and rebuild for multithreaded updates."
        )
        return [], []


def kernel_extension(name):
    return Extension(
        name,
        [f"src/{name.replace('.', '/')}.pyx"],
        include_dirs=[numpy.get_include(), "src/fastadam"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )


def targets_x86_64():
    """Building for x86-64 (the SIMD twins are x86-only)? cibuildwheel cross builds set
    the target through the usual variables; the host machine decides otherwise."""
    archflags = os.environ.get("ARCHFLAGS", "")
    if sys.platform == "darwin" and archflags:
        return "x86_64" in archflags and "arm64" not in archflags
    return platform.machine().lower() in ("x86_64", "amd64", "x64")


# The kernels (and their SIMD twins below), the engine's compiled core, the compiled
# checks of the validation layer, fastadam.torch's compiled gather (no torch needed
# to build it: it calls tensors' Python methods) and fastadam.jax's XLA FFI handler (no
# JAX needed either: it declares the part of XLA's C ABI it uses).
extensions = [kernel_extension(name) for name in
              ("fastadam._kernels", "fastadam._table", "fastadam._checks", "fastadam._torch_gather",
               "fastadam._xla_ffi")]
extensions += [kernel_extension(name) for name, level in SIMD_LEVELS.items()
               if not level.x86_64_only or targets_x86_64()]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": 3, "freethreading_compatible": True},
    ),
    cmdclass={"build_ext": BuildExt},
)
