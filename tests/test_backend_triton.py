"""What only the Triton backend has: its own Philox kernel against the Random123 answers,
forced tile configurations (split-K, split reductions, output blocks smaller than a mask
chunk), the batched op's token grouping, the interpreter requirement on CPU tensors, and the
pool and module layer routed to Triton. The op tests that every backend shares are
tests/test_op_*.py (backend "triton").

Without a GPU the kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1,
set by tests/conftest.py before triton is imported).
"""
import os
import subprocess
import sys

import pytest
import torch

import lori_kernels as L
from op_backends import TRITON_SKIP, Backend, check_backward, check_forward

if TRITON_SKIP:
    pytest.skip(TRITON_SKIP, allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lori_kernels.testing import random_packed  # noqa: E402
from lori_kernels.triton.batched_delta import group_tokens  # noqa: E402
from lori_kernels.triton.common import key_args, key_u32, philox4x32_10  # noqa: E402
from lori_kernels.triton.sparse_delta_fwd import Config, force_config  # noqa: E402

from batched_cases import make_pool, mix_ids  # noqa: E402

TRITON = Backend("triton")
DEVICE = TRITON.device
_ops = torch.ops.lori
IN, OUT, RANK = 40, 70, 16   # the batched pools: out spans two 64-row chunks


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _dev(b):
    return b.to(DEVICE) if DEVICE != "cpu" else b


@triton.jit
def _kat_kernel(c_ptr, o_ptr, k0, k1):
    one = tl.arange(0, 1)
    c0 = tl.load(c_ptr + one).to(tl.uint32, bitcast=True)
    c1 = tl.load(c_ptr + 1 + one).to(tl.uint32, bitcast=True)
    c2 = tl.load(c_ptr + 2 + one).to(tl.uint32, bitcast=True)
    c3 = tl.load(c_ptr + 3 + one).to(tl.uint32, bitcast=True)
    o0, o1, o2, o3 = philox4x32_10(c0, c1, c2, c3, key_u32(k0), key_u32(k1))
    tl.store(o_ptr + one, o0.to(tl.int32, bitcast=True))
    tl.store(o_ptr + 1 + one, o1.to(tl.int32, bitcast=True))
    tl.store(o_ptr + 2 + one, o2.to(tl.int32, bitcast=True))
    tl.store(o_ptr + 3 + one, o3.to(tl.int32, bitcast=True))


def test_philox_known_answers():
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF),
              (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, want in cases:
        c = torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in counter],
                         dtype=torch.int32, device=DEVICE)
        o = torch.empty(4, dtype=torch.int32, device=DEVICE)
        _kat_kernel[(1,)](c, o, *key_args(key[0] | key[1] << 32))
        assert [v & 0xFFFFFFFF for v in o.tolist()] == list(want)


def test_deterministic_with_split_reductions():
    # Split reductions write partials that are summed in a fixed order: no atomics.
    g = _gen(11)
    x = torch.randn(20, 300, generator=g).to(DEVICE).requires_grad_()
    b = _dev(random_packed(130, 40, density=0.4, generator=g))
    v = b.values.clone().requires_grad_()
    gy = torch.randn(20, 130, generator=g).to(DEVICE)
    runs = []
    with force_config(Config(block_k=128, block_t=16, split=3)):
        for _ in range(2):
            y = _ops.triton_sparse_delta(x, b.mask, v, b.offsets, 40, 5, "uniform", 0.7)
            runs.append((y, *torch.autograd.grad(y, (x, v), gy)))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("cfg", [Config(block_o=16, block_r=16, block_k=128, split=2),
                                 Config(block_o=32, block_t=16, split=3)],
                         ids=["o16-split2", "o32-split3"])
def test_forward_split_and_small_tiles(cfg):
    # split-K (fp32 atomics into h) and output blocks smaller than the 64-row chunk.
    g = _gen(6)
    x = torch.randn(20, 300, generator=g)
    b = random_packed(130, 40, density=0.4, generator=g)
    with force_config(cfg):
        check_forward(TRITON, x, b, 5, "uniform", 0.7, str(cfg))


def test_backward_split_and_small_tiles():
    g = _gen(7)
    x = torch.randn(40, 130, generator=g)
    b = random_packed(130, 40, density=0.4, generator=g)
    with force_config(Config(block_o=16, block_t=16, block_k=128, split=2)):
        check_backward(TRITON, x, b, 3, "rademacher", 0.5, "split")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter error")
def test_cpu_without_interpreter_raises_clear_error():
    code = ("import torch, lori_kernels.triton as lt\n"
            "assert not lt.available()\n"
            "try:\n"
            "    torch.ops.lori.triton_random_a_fill(torch.empty(2, 3), 1, 10, 0, 'uniform')\n"
            "except RuntimeError as e:\n"
            "    assert 'TRITON_INTERPRET=1' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('no error')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]



# ---- batched: token grouping; the pool and module layer on Triton ----------------------------------

@pytest.mark.parametrize("block_t", [16, 64])
def test_group_tokens_tables(block_t):
    """Every token with an id lands in exactly one work row of its adapter, rows <= block_t,
    segments sorted and stable; tables sized by host bounds, unused rows marked -2."""
    g = _gen(1)
    ids = mix_ids("zipf64", 300, 10, True, g)
    gr = group_tokens(ids, 10, block_t)
    perm, segs, work = gr.perm.long(), gr.segs.long(), gr.work.long()
    assert segs.shape == (min(300, 11), 3) and work.shape == (-(-300 // block_t) + 11, 3)
    seen = torch.zeros(300, dtype=torch.long)
    for a, p0, n in work.tolist():
        if a == -2:
            continue
        assert 1 <= n <= block_t
        toks = perm[p0:p0 + n]
        assert torch.all(ids[toks] == a)
        assert torch.all(toks[1:] > toks[:-1])  # stable: original order within an adapter
        seen[toks] += 1
    assert torch.equal(seen, torch.ones(300, dtype=torch.long))
    used = [s for s in segs.tolist() if s[0] != -2]
    assert [s[0] for s in used] == sorted(set(ids.tolist()))
    assert sum(s[2] for s in used) == 300
    # ids outside [-1, N) are grouped as -1 (the op rejects them first; never an OOB read)
    bad = group_tokens(torch.tensor([0, 7, -5, 1]), 2, 16)
    assert bad.segs[:, 0].tolist() == [-1, 0, 1] and bad.segs[0, 2] == 2


def test_pool_and_pool_linear_with_triton_backend(monkeypatch):
    g = _gen(13)
    pool = make_pool(4, inp=IN, out=OUT, rank=RANK, seed=45).to(DEVICE)
    x = torch.randn(2, 5, IN, generator=g).to(DEVICE)
    names = ["a0", None, "a3", "a3", "a1", "a2", "a2", None, "a0", "a1"]
    y = L.batched_sparse_delta(x, names, pool, backend="triton")
    torch.testing.assert_close(y, L.batched_sparse_delta(x, names, pool, backend="cpp"),
                               rtol=1e-5, atol=1e-5)
    lin = torch.nn.Linear(IN, OUT).to(DEVICE)
    layer = L.LoRIPoolLinear(lin, pool, backend="triton")
    layer.set_adapter_ids(names)
    torch.testing.assert_close(layer(x), lin(x) + y)
    # The process-wide backend picks the Triton op too; a training step reaches every used
    # adapter
    L.set_backend("triton")
    pool.values.requires_grad_()
    layer = L.LoRIPoolLinear(lin, pool)
    layer.set_adapter_ids(["a2", "a0"])  # one per sequence
    layer(x).square().sum().backward()
    for a in (0, 2):
        s, n = int(pool.value_starts[a]), pool.get(f"a{a}").packed.nnz
        assert torch.count_nonzero(pool.values.grad[s:s + n]) > 0
    for a in (1, 3):
        s, n = int(pool.value_starts[a]), pool.get(f"a{a}").packed.nnz
        assert torch.count_nonzero(pool.values.grad[s:s + n]) == 0

