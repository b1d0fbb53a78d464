"""The benchmark suite runs end to end (quick mode) and writes a JSON the report generator
accepts, with every suite, provider and the machine line: benchmarks must not rot unnoticed.
No timing is asserted (speed is only reported, never tested)."""
import copy
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import report  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    readme = os.path.join(ROOT, "README.md")
    before = open(readme).read() if os.path.exists(readme) else None
    # --smoke: --quick with the serving bench at its smallest size. ~70-90 s on a loaded
    # 2-core machine (about 30 s of it the 2-process comm measurement); the timeout only
    # stops a hung run.
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if before is not None:
        assert open(readme).read() == before, "a quick run must not rewrite README.md"
    return out


def test_quick_run_writes_a_complete_report(quick_run):
    data = report.load(str(quick_run / "latest.json"))  # raises on a missing suite/provider
    assert data["lori"]["quick"] is True and data["lori"]["smoke"] is True
    suites = {b["extra_info"]["suite"] for b in data["benchmarks"]}
    assert suites == set(report.SUITES)
    md = (quick_run / "report.md").read_text()
    m = data["lori"]["machine"]
    assert set(m["isa_flags"]) >= set(report.FLAG_NAMES) or m["isa_flags"] == {}
    assert "QUICK mode" in md and f"torch {m['torch']}" in md and "lori CPU path" in md
    for flag in report.FLAG_NAMES:
        assert flag in md
    # The self-contained benches ran as suite cases and their reports are in report.md.
    serving, comm = data["lori"]["serving"], data["lori"]["comm"]
    assert {r["provider"] for r in serving["rows"]} == {"base", "lori_serving", "peft_mixed",
                                                        "lori_single"}
    assert all(r["median_us"] > 0 for r in serving["rows"])
    assert {"adapters_per_gib", "plan_cost", "add_while_serving"} <= set(serving)
    assert set(comm["measured"]) == {"lora", "lori_d", "lori_s"}
    assert "### Model-level multi-adapter serving" in md and "| lori_serving |" in md
    assert "### Bytes communicated per step" in md and "| DP gradient all-reduce |" in md
    for name in report.PLOTS:
        assert (quick_run / name).stat().st_size > 1000
    rows = (quick_run / "latest.csv").read_text().splitlines()
    assert len(rows) > len(data["benchmarks"])  # one line per provider, header included
    # Every row names the lori path it ran (one dispatch level per process today).
    assert {b["extra_info"]["lori_isa"] for b in data["benchmarks"]} == {m["lori_cpu_isa"]}
    # Every row of the headline table has numbers ("-": a T that quick mode does not run).
    for line in report.headline(data)[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")[3:]]
        assert any(c != "-" for c in cells), line
        for c in cells:
            assert c == "-" or float(c) > 0, line


def test_report_rejects_incomplete_json(quick_run):
    data = json.loads((quick_run / "latest.json").read_text())
    no_model = copy.deepcopy(data)
    no_model["benchmarks"] = [b for b in data["benchmarks"] if b["extra_info"]["suite"] != "model"]
    with pytest.raises(report.ReportError, match="suites missing"):
        report.check(no_model)
    report.check(no_model, partial=True)
    no_prov = copy.deepcopy(data)
    no_prov["benchmarks"][0]["extra_info"]["providers"] = {}
    with pytest.raises(report.ReportError, match="no providers"):
        report.check(no_prov)
    no_isa = copy.deepcopy(data)
    del no_isa["benchmarks"][0]["extra_info"]["lori_isa"]
    with pytest.raises(report.ReportError, match="lori_isa"):
        report.check(no_isa)
    headings = {"serving": "### Model-level multi-adapter serving",
                "comm": "### Bytes communicated per step"}
    assert set(headings) == set(report.SECTIONS)
    for sec in report.SECTIONS:
        assert headings[sec] in report.render(data)
        no_sec = copy.deepcopy(data)
        del no_sec["lori"][sec]
        with pytest.raises(report.ReportError, match="sections missing"):
            report.check(no_sec)
        report.check(no_sec, partial=True)
        assert headings[sec] not in report.render(no_sec)
        no_sec["lori"][sec] = {}
        with pytest.raises(report.ReportError, match=f"lori.{sec} is empty"):
            report.check(no_sec, partial=True)
    no_machine = copy.deepcopy(data)
    del no_machine["lori"]
    with pytest.raises(report.ReportError, match="machine"):
        report.check(no_machine)
