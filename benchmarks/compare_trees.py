"""Times a fixed set of public-API cases in whichever lori_kernels it imports; prints JSON
{case: median_us}. For comparing two commits on one machine: build each in its own worktree,
then alternate runs so load hits both alike, e.g.

    for i in 1 2 3 4 5; do for t in old new; do
      (cd ../wt-$t && PYTHONPATH=$PWD python $NEW/benchmarks/compare_trees.py > /tmp/$t-$i.json)
    done; done

and compare per-case medians (and ratios to the dense baseline timed in the same process).
Uses only API that predates the layered package (4f0e918), so older trees run this file
as it is. Timings are medians of 7 repeats, 1 torch thread."""
import json
import statistics as st
import time

import torch

import lori_kernels as L
from lori_kernels import reference
from lori_kernels.testing import random_packed

torch.set_num_threads(1)
SEED, R, S = 1234, 32, 2.0


def tm(f, n, reps=7):
    f()
    v = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n): f()
        v.append((time.perf_counter() - t) / n * 1e6)
    return st.median(v)


out = {}
g = torch.Generator().manual_seed(0)
for dn, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    b = random_packed(4096, R, density=0.1, dtype=dt, generator=g)
    a = L.random_a(SEED, R, 4096, dtype=dt); bd = b.to_dense()
    for T, n in ((1, 50), (16, 20), (256, 3)):
        x = torch.randn(T, 4096, generator=g).to(dt)
        with torch.no_grad():
            out[f"fwd {dn} T{T} lori"] = tm(lambda: L.sparse_delta(x, b, seed=SEED, scale=S), n)
            out[f"fwd {dn} T{T} dense"] = tm(lambda: reference.dense_lora(x, a, bd, S), n)
    for T, n in ((16, 10), (256, 2)):
        x = torch.randn(T, 4096, generator=g).to(dt).requires_grad_()
        vals = b.values.clone().requires_grad_(); bb = b.with_values(vals)
        gy = torch.randn(T, 4096, generator=g).to(dt)
        out[f"fwdbwd {dn} T{T} lori"] = tm(lambda: L.sparse_delta(x, bb, seed=SEED, scale=S).backward(gy), n)
        bdp = bd.clone().requires_grad_()
        out[f"fwdbwd {dn} T{T} dense"] = tm(lambda: reference.dense_lora(x, a, bdp, S).backward(gy), n)
lin = torch.nn.Linear(4096, 4096, bias=False)
layer = L.LoRILinear.from_linear(lin, rank=R, alpha=64.0, seed=SEED)
x1 = torch.randn(1, 4096)
with torch.no_grad():
    out["LoRILinear T1 fp32"] = tm(lambda: layer(x1), 50)
    out["nn.Linear T1 fp32"] = tm(lambda: lin(x1), 50)
pool = L.AdapterPool(1024, 1024, 16, capacity=16)
for i in range(16):
    pool.add(f"a{i}", random_packed(1024, 16, density=0.1, generator=g), seed=i, scale=2.0)
xb = torch.randn(64, 1024, generator=g)
ids = torch.arange(64) % 16
with torch.no_grad():
    out["batched 16 adapters T64"] = tm(lambda: L.batched_sparse_delta(xb, ids, pool), 20)
w = torch.zeros(4096, 4096)
bm = random_packed(4096, R, density=0.1, generator=g)
out["merge_delta_ 4096x4096"] = tm(lambda: L.merge_delta_(w, bm, seed=SEED, scale=S), 5)
print(json.dumps(out))
