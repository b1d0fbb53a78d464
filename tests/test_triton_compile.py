"""The Triton kernels as the compiler sees them: the sm_90 compile of every kernel (no GPU
needed) and the JIT variants a run creates (counted under the interpreter as on a GPU)."""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import lori_kernels.triton as LT  # noqa: E402

if LT.import_error is not None and not isinstance(LT.import_error, ImportError):
    raise LT.import_error
if not LT.available():
    pytest.skip("Triton kernels cannot run here", allow_module_level=True)

from lori_kernels import spec  # noqa: E402
from lori_kernels.triton import common, variants  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels anyway")
def test_kernels_compile_for_sm90_without_gpu():
    # The interpreter accepts code the compiler rejects: compile every kernel for sm_90 in a
    # process without the interpreter (`make gpu-precheck` repeats this under Triton 3.6).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_compile_check.py")],
                       env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "0 failed" in r.stdout


def test_kernels_do_not_specialize_counts_and_seeds():
    ks = variants.kernels()
    assert len(ks) == 12, sorted(ks)
    for name, k in ks.items():
        for pname, is_const, spec_on, _ in variants._params(k):
            if pname in common.NO_SPECIALIZE:
                assert not spec_on, (name, pname)
            elif not is_const and not pname.endswith("_ptr"):
                assert pname not in ("k0", "k1", "T", "nnz", "n_split"), (name, pname)


def _fill(out, seed, in_features, col_start):
    torch.ops.lori.triton_random_a_fill(out, spec.check_seed(seed), in_features, col_start,
                                        "uniform")


def test_recorder_counts_variants_like_the_jit():
    buf = torch.zeros(64, 400, device=DEVICE)
    with variants.Recorder() as rec:
        # Seeds (any key word, 1 and multiples of 16 included), column starts and counts, and
        # ranks (within one BLOCK_R) vary: one variant.
        for seed, c0, n, r in ((0, 0, 1, 1), (1, 16, 32, 16), (2**32 + 1, 5, 7, 3),
                               (2**64 - 1, 33, 160, 9), (17 << 32, 1, 48, 5)):
            _fill(buf[:r, :n], seed, 400, c0)
        assert rec.counts() == {"random_a._random_a_fill_kernel": 1}, rec.counts()
        # A column stride of 1 vs. 400 (a transposed view) is a real specialization: two.
        _fill(buf.t()[:3, :5], 7, 400, 0)
        assert rec.counts() == {"random_a._random_a_fill_kernel": 2}, rec.counts()
    # Removed: later launches are not recorded.
    _fill(buf[:2, :3].t(), 9, 400, 0)
    assert rec.total() == 2


def test_recorder_key_matches_triton_specialization():
    k = variants.kernels()["sparse_delta_fwd.expand_kernel"]
    names = [p[0] for p in variants._params(k)]
    args = {n: 0 for n in names}
    consts = dict(WORDS=1, BLOCK_T=16, BLOCK_O=64, BLOCK_R=32)
    t = torch.zeros(8)
    for n in names:
        if n.endswith("_ptr"):
            args[n] = t
    base = dict(args, T=1, n_out=64, rank=32, nnz=16, scale=1.0, n_split=1)
    key = variants.spec_key(k, tuple(base[n] for n in names if n not in consts), consts)
    # T, nnz and n_split are not specialized, n_out (a row length) is.
    for n, v in (("T", 16), ("nnz", 1), ("n_split", 32)):
        other = dict(base, **{n: v})
        assert variants.spec_key(k, tuple(other[m] for m in names if m not in consts),
                                 consts) == key, n
    other = dict(base, n_out=65)
    assert variants.spec_key(k, tuple(other[m] for m in names if m not in consts), consts) != key
