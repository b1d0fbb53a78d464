"""Builds lori_kernels._C: C++ CPU kernels always, CUDA kernels when torch is a CUDA build
and nvcc is found (no GPU needed to build).

Environment switches:
  LORI_BUILD_CUDA=auto|0|1   auto (default): build CUDA sources when possible; 1: require it
  LORI_SKIP_NATIVE=1         pure-Python install (ops unavailable; for docs/tooling only)
  LORI_SANITIZE=1            CPU-only build with ASAN + UBSAN (`make sanitize` builds it into
                             build/sanitize, never over lori_kernels/_C*.so)
  TORCH_CUDA_ARCH_LIST       honoured; default "9.0+PTX" (H100/H200, PTX for newer)
  MAX_JOBS                   honoured by ninja
"""
import glob
import os
import platform
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """torch guesses CUDA_HOME from nvcc's path, which is wrong when nvcc is a wrapper
    script (as on the project's machines): prefer a toolkit that has cuda_runtime.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")) and \
                os.path.exists(os.path.join(c, "bin", "nvcc")):
            return c
    return None


def _ext_modules():
    if os.environ.get("LORI_SKIP_NATIVE") == "1":
        return [], {}
    sanitize = os.environ.get("LORI_SANITIZE") == "1"
    mode = os.environ.get("LORI_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"LORI_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    import torch

    if sanitize:
        if mode == "1":
            raise RuntimeError("LORI_SANITIZE=1 builds the CPU kernels only; unset LORI_BUILD_CUDA")
        mode = "0"
    cuda_home = _find_cuda_home() if mode != "0" else None
    build_cuda = mode != "0" and torch.version.cuda is not None and cuda_home is not None
    if mode == "1" and not build_cuda:
        raise RuntimeError("LORI_BUILD_CUDA=1 but torch is not a CUDA build or no CUDA "
                           "toolkit (include/cuda_runtime.h) was found; set CUDA_HOME")
    if build_cuda:
        # Must be set before importing cpp_extension, which reads it at import time.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
    from torch.utils import cpp_extension as ce

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -mpopcnt: x86-64-v2 baseline; the bitmask walks are popcount-bound. AVX2 code paths
    # carry their own target attributes and are chosen at runtime.
    # -fopenmp: at::parallel_for is an inline template over `#pragma omp parallel`; without
    # the flag it silently runs on one thread.
    cxx = ["-O3", "-std=c++20", "-Wall", "-Wno-unused-function", "-fopenmp"]
    link = ["-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        cxx.append("-mpopcnt")
    if sanitize:
        # -O1 keeps reports readable; vptr checks need RTTI of libtorch's (uninstrumented)
        # classes and are off; any UBSAN report aborts the process (it fails the test run).
        san = ["-fsanitize=address,undefined", "-fno-sanitize=vptr",
               "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
        cxx = [f for f in cxx if f != "-O3"] + ["-O1"] + san
        link = link + san
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if build_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
                "-Xcompiler", "-Wall", "-Xcompiler", "-Wno-unused-function"]
        ext = ce.CUDAExtension("lori_kernels._C", sources, include_dirs=include_dirs,
                               define_macros=define_macros + [("LORI_WITH_CUDA", "1")],
                               extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                               extra_link_args=link)
    else:
        ext = ce.CppExtension("lori_kernels._C", sources, include_dirs=include_dirs,
                              define_macros=define_macros, extra_compile_args={"cxx": cxx},
                              extra_link_args=link)
    print(f"lori_kernels: building {'C++ + CUDA' if build_cuda else 'C++ only'}"
          f"{' with ASAN + UBSAN' if sanitize else ''} "
          f"(CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})")
    cmdclass = {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
