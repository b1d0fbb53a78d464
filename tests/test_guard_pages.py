"""Every kernel input placed against unreadable memory: a read one element past either end
of x, the mask, values, offsets, h or grad_y faults (the test process dies) instead of passing
unnoticed. ASAN cannot stand in for this: it does not see the masked vector loads of the
decode kernels (AVX2 maskload, AVX-512 masked and expand loads), whose masked-off lanes may
lie past the end as long as the CPU suppresses their faults, which this test relies on and
checks. Results must match the same call on ordinary memory, on every ISA this CPU has."""
import ctypes
import mmap

import pytest
import torch

from lori_kernels.testing import random_packed

PAGE = mmap.PAGESIZE
PROT_NONE = 0
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_keep = []  # mappings stay alive (and guarded) until the process ends

ISAS = ["avx512", "avx2", "generic"]


def guarded(t, side="end"):
    """A copy of t whose bytes end (side='end') or start (side='start') at a PROT_NONE page."""
    t = t.contiguous()
    nbytes = t.numel() * t.element_size()
    data_pages = (nbytes + PAGE - 1) // PAGE
    mm = mmap.mmap(-1, (data_pages + 1) * PAGE)
    anchor = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(anchor)
    guard = addr + data_pages * PAGE if side == "end" else addr
    if _libc.mprotect(guard, PAGE, PROT_NONE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")
    offset = data_pages * PAGE - nbytes if side == "end" else PAGE
    out = torch.frombuffer(mm, dtype=t.dtype, count=t.numel(), offset=offset).view(t.shape)
    out.copy_(t)
    _keep.append((mm, anchor, out))
    return out


def isa_available(level):
    torch.ops.lori._set_cpu_isa(level)
    return torch.ops.lori._set_cpu_isa("auto") == level


@pytest.fixture(params=ISAS)
def level(request):
    if not isa_available(request.param):
        pytest.skip(f"this CPU has no {request.param} (its path cannot run here)")
    torch.ops.lori._set_cpu_isa(request.param)
    yield request.param
    torch.ops.lori._set_cpu_isa("auto")


def _same(got, want):
    """Equal up to summation order: MKL's GEMMs (prefill and generic paths) pick their code
    path by the operands' alignment, which the guard placement changes."""
    for g, w in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        eps = torch.finfo(w.dtype).eps
        torch.testing.assert_close(g, w, rtol=4 * eps, atol=4 * eps * max(1.0, w.abs().max().item()))


@pytest.mark.parametrize("side", ["end", "start"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [8, 32, 40])
@pytest.mark.parametrize("T", [1, 2, 4, 5, 16, 40])
def test_sparse_delta_reads_only_its_inputs(level, side, dtype, rank, T):
    g = torch.Generator().manual_seed(T * 100 + rank)
    b = random_packed(130, rank, density=0.4, generator=g, dtype=dtype)
    x = torch.randn(T, 77, generator=g).to(dtype)
    args = [x, b.mask, b.values, b.offsets]
    rest = (rank, 5, "rademacher", 0.5)
    want = torch.ops.lori.sparse_delta_fwd(*args, *rest)
    got = torch.ops.lori.sparse_delta_fwd(*[guarded(a, side) for a in args], *rest)
    _same(got, want)
    gy = torch.randn(T, 130, generator=g).to(dtype)
    h = want[1]
    bwd = lambda gy_, args_, h_: torch.ops.lori.sparse_delta_backward(gy_, *args_, *rest, True, True, h_)
    _same(bwd(guarded(gy, side), [guarded(a, side) for a in args], guarded(h, side)),
          bwd(gy, args, h))
    _same(bwd(guarded(gy, side), [guarded(a, side) for a in args], None), bwd(gy, args, None))


@pytest.mark.parametrize("side", ["end", "start"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3, 8, 24])
def test_batched_sparse_delta_reads_only_its_inputs(level, side, dtype, T):
    g = torch.Generator().manual_seed(T)
    rank, n, out, inp = 24, 3, 100, 65
    bs = [random_packed(out, rank, density=0.3 + 0.2 * i, generator=g, dtype=dtype) for i in range(n)]
    starts = torch.tensor([0] + [b.values.numel() for b in bs][:-1]).cumsum(0).long()
    x = torch.randn(T, inp, generator=g).to(dtype)
    ids = torch.arange(T) % (n + 1) - 1  # -1, 0, 1, 2, ...: the last adapter ends the buffer
    pool = [torch.stack([b.mask for b in bs]), torch.cat([b.values for b in bs]), starts,
            torch.stack([b.offsets for b in bs]), torch.arange(n).long() + 3,
            torch.full((n,), 0.75), torch.tensor([1, 2, 1], dtype=torch.int32)]
    base = torch.randn(T, out, generator=g).to(dtype)
    call = lambda x_, ids_, pool_, base_: torch.ops.lori.batched_sparse_delta(x_, ids_, *pool_, rank, base_)
    gp = [guarded(t, side) for t in pool]
    _same(call(guarded(x, side), guarded(ids, side), gp, guarded(base, side)),
          call(x, ids, pool, base))
    _same(call(guarded(x, side), guarded(ids, side), gp, None), call(x, ids, pool, None))
    gy = torch.randn(T, out, generator=g).to(dtype)
    bwd = lambda gy_, x_, ids_, pool_: torch.ops.lori.batched_sparse_delta_backward(
        gy_, x_, ids_, *pool_, rank, True, True)
    _same(bwd(guarded(gy, side), guarded(x, side), guarded(ids, side), gp), bwd(gy, x, ids, pool))


@pytest.mark.parametrize("side", ["end", "start"])
def test_merge_delta_reads_and_writes_only_its_inputs(level, side):
    g = torch.Generator().manual_seed(0)
    b = random_packed(70, 33, generator=g)
    w = torch.randn(70, 129, generator=g)
    want = w.clone()
    torch.ops.lori.merge_delta_(want, b.mask, b.values, b.offsets, 33, 2, "uniform", 1.5)
    gw = guarded(w, side)
    torch.ops.lori.merge_delta_(gw, guarded(b.mask, side), guarded(b.values, side),
                                guarded(b.offsets, side), 33, 2, "uniform", 1.5)
    _same(gw, want)
