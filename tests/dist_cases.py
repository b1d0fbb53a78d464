"""Worker bodies for tests/test_distributed.py: each runs on every rank of a 2-process gloo
group on 127.0.0.1 and saves what the test compares to r{rank}.pt."""
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

import lori_kernels as L
from lori_kernels import distributed as D
from lori_kernels.workflow import lori_layers

TIMEOUT = datetime.timedelta(seconds=40)


def run(rank, world, port, out_dir, case):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=TIMEOUT)
    try:
        res = CASES[case](rank, world)
        torch.save(res, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def mlp(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    L.inject(m, ["0", "2"], rank=4, alpha=8.0, seed=7)
    return m


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)


def values(model):
    return {n: l.adapters["default"].values.detach().clone()
            for n, l in lori_layers(model).items()}


def _catch(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test compares type and message per rank
        return type(e).__name__, str(e)
    return None


def ddp_phases(rank, world):
    model = mlp()
    x, y = data()
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    ddp = D.lori_ddp(model)
    losses = []

    def train(ddp, steps):
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.2)
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(ddp(xs), ys)
            loss.backward()
            opt.step()
            t = loss.detach().clone()
            dist.all_reduce(t)
            losses.append(float(t) / world)

    train(ddp, 3)
    old = ddp
    ddp, masks = D.switch_phase(ddp, lambda m: L.calibrate_masks(m, 0.5, init="keep"))
    stale_after_rebuild = _catch(lambda: old(xs))
    train(ddp, 3)
    a = {n: l.adapters["default"].materialize_a() for n, l in lori_layers(model).items()}
    a_all = [None] * world
    dist.all_gather_object(a_all, a)

    # A plain DDP wrapper kept across the switch: its next forward raises.
    m2 = mlp()
    plain = nn.parallel.DistributedDataParallel(m2)
    L.calibrate_masks(m2, 0.5)
    stale_plain = _catch(lambda: plain(xs))
    return {"losses": losses, "values": values(model), "masks": masks,
            "stale_after_rebuild": stale_after_rebuild, "stale_plain": stale_plain,
            "a_identical": all(torch.equal(a_all[0][n], a_all[r][n]) for r in range(world)
                               for n in a)}


def verify_cases(rank, world):
    out = {}
    # 1. one rank with another seed
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    L.inject(m, ["0", "2"], rank=4, alpha=8.0, seed=7 + rank)
    out["seed"] = _catch(lambda: D.verify(m))
    # 2. masks differing with the same nnz (DDP would broadcast rank 0's buffers silently)
    m = mlp()
    g = torch.Generator().manual_seed(100 + rank)
    masks = {n: torch.rand(l.out_features, 4, generator=g) < 0.5
             for n, l in lori_layers(m).items()}
    masks = {n: torch.zeros_like(v).index_fill_(1, torch.tensor([rank]), True)
             for n, v in masks.items()}
    L.to_sparse(m, masks)
    out["mask"] = _catch(lambda: D.lori_ddp(m))
    # 3. different nnz: before the fix one rank raised and the other hung
    m = mlp()
    masks = {n: torch.ones(l.out_features, 4, dtype=torch.bool).tril(-rank)
             for n, l in lori_layers(m).items()}
    L.to_sparse(m, masks)
    out["nnz"] = _catch(lambda: D.verify(m))
    # 4. agreeing models pass
    out["ok"] = _catch(lambda: D.verify(mlp()))
    # 5. inject after DDP wrapping: the seeds of the plain model, and the stale check
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    ddp = nn.parallel.DistributedDataParallel(base)
    L.inject(ddp, ["0", "2"], rank=4, alpha=8.0, seed=7)
    out["wrapped_seeds"] = {D.canonical_name(ddp, n): l.adapters["default"].seed
                            for n, l in lori_layers(ddp).items()}
    out["inject_after_wrap"] = _catch(lambda: ddp(torch.randn(2, 16)))
    # 6. the exact global threshold of sharded magnitudes
    g = torch.Generator().manual_seed(5)
    full = [torch.randn(37, generator=g).abs(), torch.randn(50, generator=g).abs()]
    mine = [t.chunk(world)[rank] for t in full]
    flat = torch.cat([t.flatten() for t in full])
    out["threshold"] = [(D.global_threshold(mine, k),
                         float(torch.kthvalue(flat, flat.numel() - k + 1).values))
                        for k in (1, 9, 40, flat.numel())]
    return out


def llama_with_adapter():
    from hf_models import LLAMA_TARGETS, tiny_llama

    model = tiny_llama(0)
    L.inject(model, LLAMA_TARGETS, rank=4, alpha=8.0, seed=3)
    g = torch.Generator().manual_seed(11)
    for l in lori_layers(model).values():
        l.adapters["default"].values.data.normal_(generator=g).mul_(0.1)
    return model


def llama_batch():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 64, (2, 12), generator=g)


def llama_train(model, steps, lr=0.5):
    ids = llama_batch()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def tp_llama(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    model = llama_with_adapter()
    mesh = init_device_mesh("cpu", (world,))
    col, row = D.LoRIColwiseParallel(), D.LoRIRowwiseParallel()
    plan = {f"model.layers.*.{p}": col for p in ("self_attn.q_proj", "self_attn.k_proj",
                                                 "self_attn.v_proj", "mlp.gate_proj",
                                                 "mlp.up_proj")}
    plan.update({"model.layers.*.self_attn.o_proj": row, "model.layers.*.mlp.down_proj": row})
    parallelize_module(model, mesh, plan)
    with torch.no_grad():
        logits = model(input_ids=llama_batch()).logits
    losses = llama_train(model, 2)
    # every rank's B rows (colwise: its shard; rowwise: the whole B)
    shards = {n: (l._lori_tp[0], l.adapters["default"].dense_b()) for n, l in
              lori_layers(model).items()}
    return {"logits": logits, "losses": losses, "shards": shards}


CASES = {"ddp_phases": ddp_phases, "verify_cases": verify_cases, "tp_llama": tp_llama}
