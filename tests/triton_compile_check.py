"""Compile every lori Triton kernel for sm_90 offline (no GPU needed) with the Triton that is
first on the path, and fail naming each kernel that does not compile.

    python tests/triton_compile_check.py [--full] [-j N] [-k NAME]

The interpreter accepts code the compiler rejects (names a Triton release lacks, non-constexpr
globals, list comprehensions, ...), and the GPU machine runs another Triton (3.6) than the
pinned one: tests/test_triton_compile.py runs this under the pinned Triton, `make gpu-precheck`
under triton==3.6.0 installed into a temporary folder. Each kernel is compiled for each I/O dtype in two forms: the generic one (no
argument specialized) and the one a GPU launch on contiguous, aligned tensors of
4096-multiple shapes builds (pointers and row strides divisible by 16, inner strides equal to
1), whose vectorized code paths differ (see `forms`; --full compiles all of them).

Runs without lori_kernels._C: the kernel modules need only lori_kernels.spec, so the package
is entered without running lori_kernels/__init__.py (which loads the C++ ops).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bare_package(name: str, path: str) -> None:
    """Register package `name` at `path` without executing its __init__.py."""
    mod = types.ModuleType(name)
    mod.__path__ = [path]
    mod.__package__ = name
    sys.modules[name] = mod


_bare_package("lori_kernels", os.path.join(ROOT, "lori_kernels"))
_bare_package("lori_kernels.triton", os.path.join(ROOT, "lori_kernels", "triton"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lori_kernels.triton import variants  # noqa: E402

# Pointer element type by argument name: "io" = the op's input/output dtype, "acc" = its
# accumulation dtype (fp32, fp64 for fp64 inputs).
POINTERS = {
    "x_ptr": "io", "y_ptr": "io", "gy_ptr": "io", "gx_ptr": "io", "w_ptr": "io", "out_ptr": "io",
    "values_ptr": "io", "base_ptr": "io",
    "h_ptr": "acc", "gh_ptr": "acc", "gv_ptr": "acc", "scale_ptr": "acc",
    "mask_ptr": "i32", "masks_ptr": "i32", "offsets_ptr": "i32", "perm_ptr": "i32",
    "work_ptr": "i32", "segs_ptr": "i32", "dists_ptr": "i32",
    "seeds_ptr": "i64", "vstarts_ptr": "i64", "scales_ptr": "fp32",
}
FLOATS = {"mag", "mag_r", "mag_u", "scale"}
INNER_STRIDES = {"stride_xk", "stride_go", "stride_c", "stride_wk", "stride_bo"}

# Constexprs per kernel: the shapes the GPU benchmark launches (rank 32: BLOCK_R 32, WORDS 1)
# and, where a kernel has it, a multi-word mask (WORDS 2, 3) and a smaller BLOCK_O.
CONSTEXPRS = {
    "random_a._random_a_fill_kernel": dict(DIST=1, BLOCK_R=32, BLOCK_K=128, E=128),
    "sparse_delta_fwd.shrink_kernel": dict(DIST=2, BLOCK_T=16, BLOCK_R=32, BLOCK_K=128,
                                           ALIGNED=True),
    "sparse_delta_fwd.expand_kernel": dict(WORDS=2, BLOCK_T=64, BLOCK_O=32, BLOCK_R=32),
    "sparse_delta_bwd.gy_b_kernel": dict(WORDS=1, BLOCK_T=16, BLOCK_O=64, BLOCK_R=32),
    "sparse_delta_bwd.gh_a_kernel": dict(DIST=1, BLOCK_T=64, BLOCK_R=32, BLOCK_K=128,
                                         ALIGNED=False),
    "sparse_delta_bwd.gv_kernel": dict(WORDS=3, BLOCK_T=64, BLOCK_O=16, BLOCK_R=64),
    "merge_delta.merge_kernel": dict(DIST=2, WORDS=2, BLOCK_O=64, BLOCK_R=32, BLOCK_K=128,
                                     ALIGNED=False),
    "batched_delta.shrink_kernel": dict(BLOCK_T=16, BLOCK_R=32, BLOCK_K=128),
    "batched_delta.expand_kernel": dict(HAS_BASE=True, WORDS=2, BLOCK_T=64, BLOCK_O=64,
                                        BLOCK_R=32),
    "batched_delta.gy_b_kernel": dict(WORDS=1, BLOCK_T=16, BLOCK_O=64, BLOCK_R=32),
    "batched_delta.gh_a_kernel": dict(BLOCK_T=64, BLOCK_R=32, BLOCK_K=128),
    "batched_delta.gv_kernel": dict(WORDS=3, BLOCK_T=64, BLOCK_O=16, BLOCK_R=64),
}

DTYPES = [("bf16", "fp32"), ("fp16", "fp32"), ("fp32", "fp32"), ("fp64", "fp64")]
TARGET = GPUTarget("cuda", 90, 32)


def signature(name: str, fn, io: str, acc: str, gpu_like: bool):
    """(signature, constexprs, attrs) for ASTSource."""
    consts = dict(CONSTEXPRS[name])
    sig, attrs = {}, {}
    for i, (pname, is_const, spec, align) in enumerate(variants._params(fn)):
        if is_const:
            if pname not in consts:
                raise KeyError(f"{name}: no value for constexpr {pname} in CONSTEXPRS")
            sig[pname] = "constexpr"
        elif pname.endswith("_ptr"):
            if pname not in POINTERS:
                raise KeyError(f"{name}: pointer {pname} has no element type in POINTERS")
            t = POINTERS[pname]
            sig[pname] = "*" + {"io": io, "acc": acc}.get(t, t)
            if gpu_like and align:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif pname in FLOATS:
            sig[pname] = "fp32"
        elif gpu_like and spec and pname in INNER_STRIDES:
            sig[pname] = "constexpr"
            consts[pname] = 1
        else:
            sig[pname] = "i32"
            if gpu_like and spec:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_one(name, fn, io, acc, gpu_like):
    sig, consts, attrs = signature(name, fn, io, acc, gpu_like)
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    k = triton.compile(src, target=TARGET)
    if "ptx" not in k.asm:
        raise RuntimeError(f"{name}: no PTX produced")


def forms(full: bool) -> list[tuple[str, str, bool]]:
    """(io dtype, acc dtype, aligned) forms to compile per kernel. Default: the GPU's bf16
    fast path (aligned) and the fp32 and fp64 (verification) generic forms; --full adds fp16
    and the generic half-precision forms."""
    if full:
        return [(io, acc, al) for io, acc in DTYPES
                for al in ((False, True) if io in ("bf16", "fp16") else (False,))]
    return [("bf16", "fp32", True), ("fp32", "fp32", False), ("fp64", "fp64", False)]


def _job(job):
    name, io, acc, gpu_like = job
    what = f"{name} [{io}{', aligned' if gpu_like else ''}]"
    t = time.time()
    try:
        compile_one(name, variants.kernels()[name], io, acc, gpu_like)
    except Exception as e:  # report all of them, then fail
        # A CompilationError's message ends with the source line; its cause names the problem.
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        cause = e.__cause__ or e.__context__
        why = f" <- {type(cause).__name__}: {cause}" if cause is not None else ""
        return what, (" | ".join(ln.strip() for ln in msg[-3:]) + why)[:1500], time.time() - t
    return what, None, time.time() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="every dtype, both forms")
    p.add_argument("-k", default=None, help="only kernels whose name contains this")
    p.add_argument("-j", type=int, default=min(4, os.cpu_count() or 1),
                   help="compile processes (default: min(4, cores))")
    args = p.parse_args(argv)
    t0 = time.time()
    kernels = variants.kernels()
    missing = sorted(set(kernels) - set(CONSTEXPRS))
    stale = sorted(set(CONSTEXPRS) - set(kernels))
    if missing or stale:
        print(f"compile check out of date: kernels without an entry {missing}, entries without "
              f"a kernel {stale}", file=sys.stderr)
        return 2
    jobs = [(name, io, acc, al) for name in sorted(kernels) if not args.k or args.k in name
            for io, acc, al in forms(args.full)]
    failures, n = [], 0
    if args.j > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with ProcessPoolExecutor(args.j, mp_context=ctx) as ex:
            results = ex.map(_job, jobs)
            results = list(results)
    else:
        results = map(_job, jobs)
    for what, err, sec in results:
        if err:
            failures.append(f"{what}: {err}")
            print(f"FAIL {what}", flush=True)
        else:
            n += 1
            print(f"ok   {what} ({sec:.1f}s)", flush=True)
    print(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)}): {n} compiled for "
          f"sm_90, {len(failures)} failed, {time.time() - t0:.0f}s", flush=True)
    for f in failures:
        print("  " + f, file=sys.stderr)
    return 1 if failures or not n else 0


if __name__ == "__main__":
    sys.exit(main())
