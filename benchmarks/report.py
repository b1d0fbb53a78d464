"""The benchmark report, generated from pytest-benchmark's JSON (what `make bench` writes):

    python -m benchmarks.report benchmarks/results/latest.json [--out DIR] [--partial]

Writes report.md, latest.csv (one line per case and provider) and the plots ratio_vs_T.png and
batched_vs_adapters.png into DIR (default: the JSON's folder). A JSON that lacks a suite, a
provider, the machine section or a self-contained bench's section (lori.serving, lori.comm:
rendered by bench_serving.report / bench_comm.report) is an error (--partial accepts missing
suites and sections, for runs of part of the suite with pytest -k).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

SUITES = ("op", "layer", "model", "batched", "a_generation")
# Whole results of the self-contained benches, stored in the JSON's lori section by their
# suite cases (bench_serving.test_serving, bench_comm.test_comm); each renders with its report().
SECTIONS = ("serving", "comm")
FLAG_NAMES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")


class ReportError(ValueError):
    pass


# ---- loading -------------------------------------------------------------------------------------

def load(path: str, partial: bool = False) -> dict:
    with open(path) as f:
        data = json.load(f)
    return check(data, partial, where=path)


def check(data: dict, partial: bool = False, where: str = "the JSON") -> dict:
    """Raise ReportError naming what is missing; returns data."""
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ReportError(f"{where}: no 'benchmarks' list (not pytest-benchmark JSON?)")
    lori = data.get("lori")
    if not isinstance(lori, dict) or "machine" not in lori:
        raise ReportError(f"{where}: no 'lori.machine' section (written by benchmarks/conftest.py)")
    if not data["benchmarks"]:
        raise ReportError(f"{where}: no benchmark rows")
    seen = set()
    for b in data["benchmarks"]:
        name = b.get("fullname") or b.get("name")
        ei = b.get("extra_info") or {}
        suite = ei.get("suite")
        if suite not in SUITES:
            raise ReportError(f"{where}: benchmark {name}: extra_info.suite {suite!r} not one of "
                              f"{SUITES}")
        provs = ei.get("providers")
        if not isinstance(provs, dict) or not provs:
            raise ReportError(f"{where}: benchmark {name}: no providers")
        for p, r in provs.items():
            if not (isinstance(r, dict) and r.get("median_us", 0) > 0 and r.get("reps", 0) >= 1):
                raise ReportError(f"{where}: benchmark {name}: provider {p}: no timing ({r!r})")
        if ei.get("baseline") is not None and ei["baseline"] not in provs:
            raise ReportError(f"{where}: benchmark {name}: baseline {ei['baseline']!r} not timed")
        if "lori_isa" not in ei:
            raise ReportError(f"{where}: benchmark {name}: no lori_isa (the CPU path it ran)")
        seen.add(suite)
    missing = [s for s in SUITES if s not in seen]
    if missing and not partial:
        raise ReportError(f"{where}: suites missing: {missing} (a partial run? use --partial)")
    for sec in SECTIONS:
        if sec in lori and not (isinstance(lori[sec], dict) and lori[sec]):
            raise ReportError(f"{where}: lori.{sec} is empty or not a dict")
    gone = [sec for sec in SECTIONS if sec not in lori]
    if gone and not partial:
        raise ReportError(f"{where}: sections missing: {gone} (a partial run? use --partial)")
    return data


def section(data: dict, name: str) -> list[str]:
    """A self-contained bench's section, rendered by its own report() (its tables and figures
    live next to its measurement code); nothing when a partial run left it out."""
    d = data["lori"].get(name)
    if d is None:
        return []
    if name == "serving":
        from . import bench_serving as mod

        title = ["### Model-level multi-adapter serving (benchmarks/bench_serving.py)", ""]
    else:
        from . import bench_comm as mod

        title = []  # its report() starts with its own heading
    return title + mod.report(d).rstrip("\n").splitlines()


def rows(data: dict, suite: str) -> list[dict]:
    return [b["extra_info"] for b in data["benchmarks"] if b["extra_info"]["suite"] == suite]


def med(r: dict, prov: str) -> float | None:
    p = r["providers"].get(prov)
    return None if p is None else p["median_us"]


def ratio(r: dict, prov: str, base: str | None = None) -> float | None:
    a, b = med(r, prov), med(r, base or r["baseline"])
    return None if a is None or b is None else a / b


# ---- text ----------------------------------------------------------------------------------------

def machine_line(data: dict) -> str:
    lori = data["lori"]
    m = lori["machine"]
    flags = m.get("isa_flags") or {}
    if flags:
        fl = ", ".join(f"{k} {'yes' if flags.get(k) else 'no'}" for k in FLAG_NAMES)
    else:
        fl = "flags unknown (no /proc/cpuinfo)"
    paths = sorted({b["extra_info"]["lori_isa"] for b in data["benchmarks"]})
    path = (f"`{paths[0]}` on every row" if len(paths) == 1 else
            "per row (see the tables): " + ", ".join(f"`{p}`" for p in paths))
    cap = lori.get("isa_cap", "auto")
    load = lori.get("loadavg_start"), m.get("loadavg")
    load_s = ""
    if all(load):
        load_s = (f" Load average (1 min) at start {load[0][0]:.2f}, at end {load[1][0]:.2f} "
                  f"on {m['cores']} cores.")
        if max(load[0][0], load[1][0]) > m["cores"]:
            load_s += (" **Measured on a loaded machine**: other jobs shared the cores, absolute "
                       "times are inflated and ratios noisier than on a quiet one.")
    return (f"Machine: {m['cpu']}, {m['cores']} cores; ISA: {fl}. torch {m['torch']} "
            f"({threads(m['threads'])}), python {m['python']}. lori CPU path: {path}"
            f"{'' if cap == 'auto' else f' (capped with --isa {cap})'}. git {m['git']}, "
            f"{m['date']}{', QUICK mode (smoke sizes and rounds: not for quoting)' if lori.get('quick') else ''}."
            f"{load_s}")


def threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _f(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _r(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def headline(data: dict) -> list[str]:
    """The issue's table: ours / dense LoRA at in = out = 4096 by pass, dtype and T."""
    rs = [r for r in rows(data, "op") if r["in"] == 4096 and r["out"] == 4096]
    Ts = sorted({r["T"] for r in rs})
    lines = ["| pass | dtype | lori path | " + " | ".join(f"T={T}" for T in Ts) + " |",
             "|---|---|---|" + "---:|" * len(Ts)]
    keys = list(dict.fromkeys((r["pass"], r["dtype"]) for r in rs))
    for p, dt in keys:
        by = {r["T"]: r for r in rs if r["pass"] == p and r["dtype"] == dt}
        paths = ",".join(sorted({r["lori_isa"] for r in by.values()}))
        lines.append(f"| {p} | {dt} | {paths} | " + " | ".join(
            _r(ratio(by[T], "lori_rademacher")) if T in by else "-" for T in Ts) + " |")
    return lines


def op_table(data: dict) -> list[str]:
    lines = ["| pass | dtype | T | in x out | lori path | dense LoRA (us) | LoRI rademacher (us) | "
             "ratio | LoRI uniform (us) | ratio | torch CSR B (us) | ratio |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    notes = {}
    for r in rows(data, "op"):
        cells = []
        for prov in ("lori_rademacher", "lori_uniform", "torch_csr"):
            if prov in r["providers"]:
                cells.append(f"{_f(med(r, prov))} | {_r(ratio(r, prov))}")
            elif prov in (r.get("unsupported") or {}):
                notes[(r["pass"], r["dtype"])] = r["unsupported"][prov]
                cells.append("n/a | n/a")
            else:
                cells.append("- | -")
        lines.append(f"| {r['pass']} | {r['dtype']} | {r['T']} | {r['in']}x{r['out']} | "
                     f"{r['lori_isa']} | {_f(med(r, 'dense_lora'))} | " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        for (p, dt), why in notes.items():
            lines.append(f"- torch CSR n/a, {p} {dt}: {why}")
    return lines


def layer_table(data: dict) -> list[str]:
    lines = ["| pass | dtype | T | lori path | nn.Linear (us) | LoRILinear (us) | / nn.Linear | "
             "PEFT LoRA (us) | / nn.Linear | LoRILinear / PEFT |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows(data, "layer"):
        lines.append(f"| {r['pass']} | {r['dtype']} | {r['T']} | {r['lori_isa']} | "
                     f"{_f(med(r, 'nn_linear'))} | {_f(med(r, 'lori_linear'))} | "
                     f"{_r(ratio(r, 'lori_linear'))} | {_f(med(r, 'peft_lora'))} | "
                     f"{_r(ratio(r, 'peft_lora'))} | {_r(ratio(r, 'lori_linear', 'peft_lora'))} |")
    return lines


def model_table(data: dict) -> list[str]:
    rs = rows(data, "model")
    if not rs:
        return []
    r0 = rs[0]
    lines = [f"{r0['model']}, {r0['hidden_layers']} layers, {r0['adapted_layers']} adapted Linear "
             f"layers (query/key/value/dense), rank {r0['rank']}, fp32, {r0['pairs']} sentence "
             f"pairs ({r0['tokens']} padded tokens per side). Trainable parameters: "
             + ", ".join(f"{k} {v:,}" for k, v in r0["trainable"].items()) + ".", "",
             "| pass | lori path | PEFT LoRA (ms) | LoRI-D (ms) | / PEFT | LoRI-S (ms) | / PEFT | "
             "no adapter (ms) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rs:
        ms = {p: (None if med(r, p) is None else med(r, p) / 1e3)
              for p in ("peft_lora", "lori_d", "lori_s", "base")}
        lines.append(f"| {r['pass']} | {r['lori_isa']} | {_f(ms['peft_lora'], 1)} | "
                     f"{_f(ms['lori_d'], 1)} | {_r(ratio(r, 'lori_d'))} | {_f(ms['lori_s'], 1)} | "
                     f"{_r(ratio(r, 'lori_s'))} | {_f(ms['base'], 1)} |")
    return lines


def agen_table(data: dict) -> list[str]:
    lines = ["| A generation (32 x 4096, fp32) | lori path | elements/s | median (us) |",
             "|---|---|---:|---:|"]
    for r in rows(data, "a_generation"):
        n = r["rank"] * r["in"]
        for d, p in r["providers"].items():
            lines.append(f"| {d} | {r['lori_isa']} | {n / (p['median_us'] * 1e-6) / 1e9:.2f} G | "
                         f"{p['median_us']:.0f} |")
    return lines


def bytes_table(data: dict) -> list[str]:
    sizes = data["lori"].get("adapter_bytes")
    if not sizes:
        return []
    lines = ["| adapter layer 4096x4096, rank 32, 90% sparse | bytes | vs dense bf16 LoRA A+B |",
             "|---|---:|---:|"]
    for s in sizes:
        lines.append(f"| LoRI, {s['values_dtype']} values (mask {s['mask_bytes']} + values "
                     f"{s['values_bytes']} + offsets {s['offsets_bytes']}) | {s['ours_bytes']} | "
                     f"{s['ratio']:.3f} |")
    lines.append(f"| dense bf16 LoRA (A + B) | {sizes[0]['dense_bf16_lora_bytes']} | 1 |")
    return lines


def batched_table(data: dict) -> list[str]:
    lines = ["| case | dtype | T | adapters | lori path | lori_batched (us) | dense loop | ratio | "
             "stacked bmm | ratio | sparse_delta (1 adapter) | ratio |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows(data, "batched"):
        ours = r["providers"]["lori_batched"]
        cells = []
        for prov in ("dense_loop", "stacked_bmm", "sparse_delta"):
            cells.append(f"{_f(med(r, prov))} | {_r(ratio(r, 'lori_batched', prov))}"
                         if prov in r["providers"] else "- | -")
        lines.append(f"| {r['case']} | {r['dtype']} | {r['T']} | {r['adapters']} | {r['lori_isa']} | "
                     f"{ours['median_us']:.0f} (p20 {ours['p20_us']:.0f}, p80 {ours['p80_us']:.0f}) | "
                     + " | ".join(cells) + " |")
    per = data["lori"].get("adapters_per_gib")
    if per:
        lines += ["", "| adapter layer 4096x4096, rank 32 | bytes | adapters per GiB | vs dense bf16 LoRA |",
                  "|---|---:|---:|---:|"]
        for s in per:
            lines.append(f"| LoRI pool slot, {s['values_dtype']} values | {s['ours_bytes']} | "
                         f"{s['ours_per_gib']} | {s['ratio']:.1f}x |")
        lines.append(f"| dense bf16 LoRA (A + B) | {per[0]['dense_bf16_bytes']} | "
                     f"{per[0]['dense_bf16_per_gib']} | 1x |")
    return lines


PLOTS = ("ratio_vs_T.png", "batched_vs_adapters.png")


def render(data: dict, link_prefix: str = "") -> str:
    """The report body (markdown). `link_prefix`: where the PNGs are, relative to the page."""
    out = [machine_line(data), "",
           "Every ratio is ours / a baseline timed in the same process, interleaved round by "
           "round (benchmarks/harness.py), medians; glibc's mmap threshold is pinned "
           "(`GLIBC_TUNABLES`, benchmarks/run.py) so large outputs come from reused heap memory "
           "for every provider. in = out = 4096, rank 32, B 90% sparse unless stated.", "",
           "Ours / dense LoRA (two F.linear calls, same dtype), the delta only:", ""]
    out += headline(data)
    out += ["", f"![ratio vs T]({link_prefix}ratio_vs_T.png) "
            f"![batched time vs adapters]({link_prefix}batched_vs_adapters.png)", "",
            "### Op level: the delta (x @ A^T) @ B^T * scale", "",
            "Baselines: dense LoRA (A and B dense, two F.linear calls); torch CSR B "
            "(x @ A^T by F.linear, then B as a torch sparse CSR matrix).", ""]
    out += op_table(data)
    out += ["", "### Layer level: base matmul included", "",
            "LoRILinear (LoRI-S adapter) vs the bare nn.Linear it wraps vs PEFT's lora.Linear on "
            "the same base.", ""]
    out += layer_table(data)
    out += ["", "### Model level: all-MiniLM-L6-v2", ""]
    out += model_table(data) or ["(no model rows)"]
    out += ["", "### Batched multi-adapter (`batched_sparse_delta`)", ""]
    out += batched_table(data)
    out += [""] + agen_table(data) + [""] + bytes_table(data)
    for name in SECTIONS:
        sec = section(data, name)
        if sec:
            out += [""] + sec
    return "\n".join(out) + "\n"


# ---- plots ---------------------------------------------------------------------------------------

def plot(data: dict, out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = data["lori"]["machine"]
    paths = ",".join(sorted({b["extra_info"]["lori_isa"] for b in data["benchmarks"]}))
    sub = f"{m['cpu']}, lori path {paths}, torch {m['torch']}, {threads(m['threads'])}"
    written = []

    ops = rows(data, "op")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, p in zip(axes, ("forward", "fwd+bwd")):
        for dt, color in (("fp32", "tab:blue"), ("bf16", "tab:orange")):
            for shape, style in (((4096, 4096), "-o"), ((4096, 14336), ":s")):
                rs = sorted((r for r in ops if r["pass"] == p and r["dtype"] == dt
                             and (r["in"], r["out"]) == shape), key=lambda r: r["T"])
                for prov, st, lab in (("lori_rademacher", style, "LoRI"),
                                      ("torch_csr", "--x", "torch CSR B")):
                    pts = [(r["T"], ratio(r, prov)) for r in rs if prov in r["providers"]]
                    if not pts or (prov == "torch_csr" and shape != (4096, 4096)):
                        continue
                    ax.plot(*zip(*pts), st, color=color,
                            label=f"{lab} {dt} {shape[0]}x{shape[1]}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        Ts = sorted({r["T"] for r in ops if r["pass"] == p})
        ax.set_xticks(Ts, [str(T) for T in Ts])
        ax.minorticks_off()
        ax.set_xlabel("tokens T")
        ax.set_title(p)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("time / dense LoRA (same dtype, same run)")
    fig.suptitle(f"ours / dense LoRA, rank 32, 90% sparse B\n{sub}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "ratio_vs_T.png"), dpi=110)
    plt.close(fig)
    written.append("ratio_vs_T.png")

    bs = [r for r in rows(data, "batched") if r["case"] == "decode"]
    dts = list(dict.fromkeys(r["dtype"] for r in bs)) or ["fp32"]
    fig, axes = plt.subplots(1, len(dts), figsize=(5.5 * len(dts), 4.2), squeeze=False)
    for ax, dt in zip(axes[0], dts):
        rs = sorted((r for r in bs if r["dtype"] == dt), key=lambda r: r["adapters"])
        Ts = sorted({r["T"] for r in rs})
        for prov, st in (("lori_batched", "-o"), ("dense_loop", "--s"), ("stacked_bmm", ":^")):
            pts = [(r["adapters"], med(r, prov) / 1e3) for r in rs if prov in r["providers"]]
            if pts:
                ax.plot(*zip(*pts), st, label=prov)
        ax.set_xscale("log", base=2)
        ks = sorted({r["adapters"] for r in rs})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_yscale("log")
        ax.set_xlabel("distinct adapters in the batch")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{dt}, T={','.join(map(str, Ts))} decode tokens")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"batched multi-adapter, 4096x4096 rank 32\n{sub}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "batched_vs_adapters.png"), dpi=110)
    plt.close(fig)
    written.append("batched_vs_adapters.png")
    return written


def write_csv(data: dict, path: str) -> None:
    flat = []
    for b in data["benchmarks"]:
        ei = b["extra_info"]
        keys = {k: v for k, v in ei.items() if k not in ("providers", "unsupported", "trainable")}
        for p, r in ei["providers"].items():
            flat.append({"name": b["name"], **keys, "provider": p, **r})
    fields = list(dict.fromkeys(k for r in flat for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(flat)


def write(data: dict, out_dir: str) -> str:
    """report.md, latest.csv and the plots into out_dir; returns the markdown body."""
    os.makedirs(out_dir, exist_ok=True)
    plot(data, out_dir)
    write_csv(data, os.path.join(out_dir, "latest.csv"))
    md = render(data)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("# Benchmark report (CPU)\n\nWritten by `make bench` (python -m benchmarks.run) "
                "from latest.json (pytest-benchmark JSON).\n\n" + md)
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json")
    ap.add_argument("--out", default=None, help="output folder (default: the JSON's folder)")
    ap.add_argument("--partial", action="store_true", help="accept missing suites")
    args = ap.parse_args(argv)
    data = load(args.json, partial=args.partial)
    print(write(data, args.out or os.path.dirname(os.path.abspath(args.json))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
