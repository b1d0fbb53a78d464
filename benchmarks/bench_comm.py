"""Bytes communicated per training step, data parallel (DDP) and 2-way tensor parallel, for
dense LoRA vs LoRI-D vs LoRI-S: computed analytically at Llama-3-8B shapes, and measured on a
tiny Llama (2 gloo ranks on 127.0.0.1) by counting the collectives' payloads:
  DP: a DDP comm hook adds up every gradient bucket it all-reduces; DDP's buffer broadcast
      (broadcast_buffers=True) is counted by wrapping the wrapper's broadcast call;
  TP: torch.distributed.all_reduce is wrapped while one forward+backward runs.
The measured figures are checked against the same formulas at the tiny shapes (a mismatch is
reported, not hidden). A is never sent: it is regenerated from its seed on every rank.
`run(quick)` returns a dict; `report(data)` renders markdown; `python -m benchmarks.bench_comm`.
In the suite (`benchmarks.run`), test_comm stores that dict as the JSON's lori.comm and
report.md carries its report (quick mode is the same run: the tiny model is the small size).
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile

import torch

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROWWISE = ("o_proj", "down_proj")


def llama_shapes(hidden, inter, heads, kv_heads):
    hd = hidden // heads
    return {"q_proj": (hidden, hidden), "k_proj": (hidden, kv_heads * hd),
            "v_proj": (hidden, kv_heads * hd), "o_proj": (hidden, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}  # (in, out)


LLAMA3_8B = {"shapes": llama_shapes(4096, 14336, 32, 8), "layers": 32, "rank": 32,
             "tokens": 4096}


def analytic(shapes, layers, rank, tokens, density=0.1, tp=2):
    """Bytes per step (fp32 gradients and h)."""
    ins = sum(i for i, _ in shapes.values())
    outs = sum(o for _, o in shapes.values())
    rows = sum(o for _, o in shapes.values())
    chunks = sum(-(-o // 64) + 1 for _, o in shapes.values())
    words = -(-rank // 32)
    nnz = sum(int(density * o * rank) for _, o in shapes.values())  # per block, as calibrated
    dp = {"lora": 4 * layers * rank * (ins + outs), "lori_d": 4 * layers * rank * outs,
          "lori_s": 4 * layers * nnz}
    buffers = 4 * layers * (rows * words + chunks)  # masks + offsets, per forward
    n_row = sum(1 for p in shapes if p in ROWWISE)
    n_col_in = sum(shapes[p][0] for p in shapes if p not in ROWWISE)
    h = 4 * layers * n_row * tokens * rank  # the h all-reduce of every row-parallel layer
    # dense LoRA: a column-parallel layer's A is replicated and trained, so its gradient
    # (rank x in) is all-reduced over the TP group every step; LoRI's A is frozen and seeded.
    tp_extra = {"lora": h + 4 * layers * rank * n_col_in, "lori_d": h, "lori_s": h}
    return {"dp": dp, "dp_buffers_per_forward": buffers, "tp_adapter": tp_extra}


# ---- measured --------------------------------------------------------------------------------

TINY = {"hidden": 32, "inter": 48, "heads": 4, "kv": 2, "layers": 2, "rank": 4, "vocab": 64}


def _tiny(kind):
    import transformers

    import lori_kernels as L

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=TINY["vocab"], hidden_size=TINY["hidden"],
                                   intermediate_size=TINY["inter"],
                                   num_hidden_layers=TINY["layers"],
                                   num_attention_heads=TINY["heads"],
                                   num_key_value_heads=TINY["kv"], max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    if kind == "lora":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(r=TINY["rank"], lora_alpha=8,
                                                          target_modules=list(PROJ)))
    L.inject(model, list(PROJ), rank=TINY["rank"], alpha=8.0, seed=3)
    for layer in L.workflow.lori_layers(model).values():
        layer.adapters["default"].values.data.normal_()
    if kind == "lori_s":
        L.calibrate_masks(model, 0.9, scope="matrix")
    return model


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from lori_kernels import distributed as D

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    ids = torch.randint(0, TINY["vocab"], (2, 8), generator=torch.Generator().manual_seed(1))
    res = {}
    for kind in ("lora", "lori_d", "lori_s"):
        model = _tiny(kind)
        counted = {"grad": 0, "buffers": 0}

        def hook(state, bucket):
            counted["grad"] += bucket.buffer().numel() * bucket.buffer().element_size()
            return default_hooks.allreduce_hook(state, bucket)

        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=True)
        ddp.register_comm_hook(dist.group.WORLD, hook)
        inner = ddp._distributed_broadcast_coalesced

        def counting_broadcast(bufs, *a, **k):
            counted["buffers"] += sum(b.numel() * b.element_size() for b in bufs)
            return inner(bufs, *a, **k)

        ddp._distributed_broadcast_coalesced = counting_broadcast
        ddp(input_ids=ids, labels=ids).loss.backward()
        res[kind] = dict(counted)
        if kind != "lora":  # TP: the adapters' extra all-reduces (h), one forward+backward
            model = _tiny(kind)
            mesh = init_device_mesh("cpu", (world,))
            plan = {f"model.layers.*.{'mlp' if p.endswith('_proj') and p[0] in 'gud' else 'self_attn'}.{p}":
                    (D.LoRIRowwiseParallel() if p in ROWWISE else D.LoRIColwiseParallel())
                    for p in PROJ}
            parallelize_module(model, mesh, plan)
            sent = {"h": 0, "all": 0}
            real = dist.all_reduce

            def counting(t, *a, **k):
                nbytes = t.numel() * t.element_size()
                sent["all"] += nbytes
                if t.dtype == torch.float32 and t.shape[-1] == TINY["rank"]:
                    sent["h"] += nbytes
                return real(t, *a, **k)

            dist.all_reduce = counting
            try:
                model(input_ids=ids, labels=ids).loss.backward()
            finally:
                dist.all_reduce = real
            res[kind]["tp_h"] = sent["h"]
            res[kind]["tp_all"] = sent["all"]
    if rank == 0:
        torch.save(res, os.path.join(out_dir, "comm.pt"))
    dist.destroy_process_group()


def measure() -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(2, port, d), nprocs=2, start_method="spawn")
        return torch.load(os.path.join(d, "comm.pt"), weights_only=False)


def run(quick: bool = False, log=print) -> dict:
    big = analytic(**LLAMA3_8B)
    shapes = llama_shapes(TINY["hidden"], TINY["inter"], TINY["heads"], TINY["kv"])
    tiny_tokens = 2 * 8
    tiny = analytic(shapes, TINY["layers"], TINY["rank"], tiny_tokens)
    log("measuring on a tiny Llama, 2 gloo ranks ...")
    measured = measure()
    # LoRI-S: the tiny model's nnz as calibrated (scope=matrix keeps >= 10%, ties included)
    return {"llama3_8b": big, "tiny_analytic": tiny, "measured": measured,
            "tiny_tokens": tiny_tokens, "tiny": TINY}


def report(data: dict) -> str:
    mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
    big, tiny, m = data["llama3_8b"], data["tiny_analytic"], data["measured"]
    lines = ["### Bytes communicated per step (fp32)", "",
             "Llama-3-8B, rank 32, 7 projections x 32 layers, TP over 4096 tokens per step "
             "(analytic):", "",
             "| | dense LoRA | LoRI-D | LoRI-S (90% sparse) |", "|---|---|---|---|",
             "| DP gradient all-reduce | " + " | ".join(mb(big["dp"][k]) for k in
                                                       ("lora", "lori_d", "lori_s")) + " |",
             "| TP (2-way) adapter all-reduces | " + " | ".join(
                 mb(big["tp_adapter"][k]) for k in ("lora", "lori_d", "lori_s")) + " |",
             "", f"DDP broadcast_buffers=True re-sends the masks and offsets every forward: "
             f"{mb(big['dp_buffers_per_forward'])} (LoRI; broadcast_buffers=False saves it).",
             "", f"Tiny Llama (hidden {data['tiny']['hidden']}, rank {data['tiny']['rank']}, "
             f"{data['tiny_tokens']} tokens), 2 gloo ranks, measured (analytic):", "",
             "| | DP grad bytes | DP buffer bytes/forward | TP h bytes | TP all bytes |",
             "|---|---|---|---|---|"]
    for k in ("lora", "lori_d", "lori_s"):
        r = m[k]
        lines.append(f"| {k} | {r['grad']} ({tiny['dp'][k]}) | {r['buffers']} | "
                     f"{r.get('tp_h', '-')} ({tiny['tp_adapter'][k] if k != 'lora' else '-'}) | "
                     f"{r.get('tp_all', '-')} |")
    lines += ["", "DP buffer bytes include the model's other buffers (rotary inv_freq). "
              "LoRI-S's analytic DP figure assumes exactly 10% kept; calibrate keeps ties, "
              "so the measured count can be a little higher."]
    return "\n".join(lines)


def test_comm(quick):
    """The suite's hook (benchmarks/run.py); the JSON round trip fails here if the dict ever
    holds something JSON cannot store."""
    import json

    from .harness import EXTRAS

    EXTRAS["comm"] = json.loads(json.dumps(run(quick)))


if __name__ == "__main__":
    print(report(run()))
