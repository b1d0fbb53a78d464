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
    os.environ["LORI_TEST_OUT"] = out_dir  # where cases write the files the test compares
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


# ---- FSDP2 (fully_shard): sizes chosen so that B's values and W's rows shard unevenly ----

def fsdp_mlp(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, 30), nn.Tanh(), nn.Linear(30, 7))
    L.inject(m, ["0", "2"], rank=3, alpha=6.0, seed=7)
    return m


def shard(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for i in ("0", "2"):
        fully_shard(model.get_submodule(i), mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full_values(model):
    """Every adapter's values gathered to a plain tensor (a collective when sharded)."""
    out = {}
    for n, l in lori_layers(model).items():
        v = l.adapters["default"].values.detach()
        out[n] = v.full_tensor() if hasattr(v, "full_tensor") else v.clone()
    return out


def full_weights(model):
    out = {}
    for n, l in lori_layers(model).items():
        w = l.base.weight.detach()
        out[n] = w.full_tensor() if hasattr(w, "full_tensor") else w.clone()
    return out


def fsdp_train(model, steps, rank=0, world=1, lr=0.3):
    """`steps` SGD steps on this rank's share of the batch; the losses averaged over ranks
    (FSDP2 averages the gradients: the same step as one process on the whole batch)."""
    x, y = data()
    x, y = x[:, :16].chunk(world)[rank], y[:, :7].chunk(world)[rank]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        t = loss.detach().clone()
        if world > 1:
            dist.all_reduce(t)
        losses.append(float(t) / world)
    return losses


def lori_mlp():
    """A LoRIModel over the same MLP, with non-zero B (set before sharding)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 30), nn.Tanh(), nn.Linear(30, 7))
    lori = L.get_lori_model(base, L.LoRIConfig(r=3, lora_alpha=6.0, target_modules=["0", "2"],
                                               seed=5))
    g = torch.Generator().manual_seed(3)
    for l in lori_layers(lori).values():
        l.adapters["default"].values.data.normal_(generator=g)
    return lori


def fsdp_workflow(rank, world):
    """LoRI-D training, calibration, save, merge and the phase switch on a sharded model."""
    import lori_kernels.workflow as W

    out_dir = os.environ["LORI_TEST_OUT"]
    x, _ = data()
    model = shard(fsdp_mlp())
    res = {"sharded": all(hasattr(l.adapters["default"].values, "to_local")
                          for l in lori_layers(model).values())}
    res["losses_d"] = fsdp_train(model, 3, rank, world)
    res["values_d"] = full_values(model)
    res["calibrate"] = _catch(lambda: res.__setitem__(
        "masks", L.calibrate_masks(model, 0.6, apply=False)))
    res["calibrate_layer"] = _catch(lambda: res.__setitem__(
        "masks_layer", L.calibrate_masks(model, 0.6, scope="matrix", apply=False)))
    # the switch in place is refused (checked before anything changes) ...
    res["calibrate_apply"] = _catch(lambda: L.calibrate_masks(model, 0.6))
    masks = res.get("masks") or {n: torch.ones(l.out_features, 3, dtype=torch.bool)
                                 for n, l in lori_layers(model).items()}
    res["to_sparse"] = _catch(lambda: L.to_sparse(model, masks))
    # ... and the model still runs, unchanged
    res["after_switch"] = _catch(lambda: res.__setitem__("y_after_switch", model(x[:, :16])
                                                         .detach()))
    res["values_after_switch"] = full_values(model)
    # save: rank 0 writes, every rank returns the same
    res["save"] = _catch(lambda: res.__setitem__(
        "save_bytes", L.save_adapter(model, os.path.join(out_dir, "d.safetensors"))))
    blocker = os.path.join(out_dir, "blocker")
    if rank == 0:
        open(blocker, "w").close()
    dist.barrier()
    # rank 0 fails (a file where its directory should be); the other rank must not hang
    res["save_fail"] = _catch(lambda: L.save_adapter(
        model, os.path.join(blocker, "x.safetensors")))
    lori = lori_mlp()
    shard(lori.base_model)
    res["save_pretrained"] = _catch(lambda: lori.save_pretrained(
        os.path.join(out_dir, "pretrained")))
    # merge into the row shards of W
    with torch.no_grad():
        y0 = model(x[:, :16]).detach()
    res["merge"] = _catch(lambda: W.merge(model))
    res["merged_w"] = full_weights(model) if res["merge"] is None else None
    with torch.no_grad():
        res["y_merged"] = (model(x[:, :16]).detach(), y0)
    res["unmerge"] = _catch(lambda: W.unmerge(model))
    res["unmerged_w"] = full_weights(model)
    # LoRI-S under FSDP2: switch on the unsharded model, then fully_shard
    s_model = fsdp_mlp()
    L.to_sparse(s_model, masks, init="zero")
    shard(s_model)
    res["losses_s"] = fsdp_train(s_model, 3, rank, world)
    res["values_s"] = full_values(s_model)
    return res


CASES["fsdp_workflow"] = fsdp_workflow


def fsdp_dcp(rank, world):
    """torch.distributed.checkpoint save and load of a sharded model in either phase."""
    import torch.distributed.checkpoint as dcp

    out_dir = os.environ["LORI_TEST_OUT"]
    x, _ = data()
    x = x[:, :16]
    res = {}
    # LoRI-D: train, save, load into a fresh sharded model
    model = shard(fsdp_mlp())
    fsdp_train(model, 2, rank, world)
    ck_d = os.path.join(out_dir, "ck_d")
    dcp.save(model.state_dict(), checkpoint_id=ck_d)
    fresh = shard(fsdp_mlp(seed=1))
    sd = fresh.state_dict()

    def load_d():
        dcp.load(sd, checkpoint_id=ck_d)
        fresh.load_state_dict(sd)
    res["load_d"] = _catch(load_d)
    res["values_d"] = (full_values(fresh), full_values(model))
    with torch.no_grad():
        res["y_d"] = (fresh(x).detach(), model(x).detach())
    # LoRI-S: switch (unsharded), shard, train, save
    masks = L.calibrate_masks(model, 0.6, apply=False)
    s_model = fsdp_mlp()
    L.to_sparse(s_model, masks)
    shard(s_model)
    fsdp_train(s_model, 2, rank, world)
    ck_s = os.path.join(out_dir, "ck_s")
    dcp.save(s_model.state_dict(), checkpoint_id=ck_s)
    # into a fresh sharded LoRI-D model: the sizes differ
    fresh = shard(fsdp_mlp(seed=1))
    sd = fresh.state_dict()
    try:  # DCP's own error; a CheckpointException is a BaseException
        dcp.load(sd, checkpoint_id=ck_s)
        res["load_s_into_d_plain"] = None
    except BaseException as e:  # noqa: BLE001
        res["load_s_into_d_plain"] = (type(e).__name__, str(e))
    match = getattr(D, "match_checkpoint", None)
    res["match_sharded"] = _catch(lambda: match(shard(fsdp_mlp(seed=1)), ck_s)) \
        if match else ("missing", "")
    # the supported order: take the checkpoint's structure before fully_shard
    fresh = fsdp_mlp(seed=1)

    def load_s():
        match(fresh, ck_s)
        shard(fresh)
        sd = fresh.state_dict()
        dcp.load(sd, checkpoint_id=ck_s)
        fresh.load_state_dict(sd)
    res["load_s"] = _catch(load_s) if match else ("missing", "")
    res["values_s"] = (full_values(fresh) if res["load_s"] is None else None,
                       full_values(s_model))
    if res["load_s"] is None:
        with torch.no_grad():
            res["y_s"] = (fresh(x).detach(), s_model(x).detach())
        res["masks_s"] = {n: (l.adapters["default"].bool_mask(), masks[n])
                          for n, l in lori_layers(fresh).items()}
    return res


CASES["fsdp_dcp"] = fsdp_dcp


def fsdp_all(rank, world):
    """Both FSDP2 cases in one spawn: starting the 2 processes (importing torch twice) is most
    of the cost on a busy machine."""
    return {"workflow": fsdp_workflow(rank, world), "dcp": fsdp_dcp(rank, world)}


CASES["fsdp_all"] = fsdp_all
