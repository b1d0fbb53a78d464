"""The GPU check's machinery, on a machine without a GPU: the report is written whatever
fails, stages respect the global deadline, and the dry run rehearses every stage.

The full dry run (`LORI_GPU_CHECK_DRY_RUN=1 make gpu-check`, every stage within the default
8-minute deadline) is a CI step (.ci/run); here a short deadline proves that stages that no
longer fit are skipped and recorded, and that the JSON and the summary are still written.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def _run(args, timeout=300, env=None):
    e = dict(os.environ if env is None else env)
    e.pop("TRITON_INTERPRET", None)
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)


def test_report_update_needs_no_torch(tmp_path):
    # The shell refreshes the JSON after every stage, also when torch itself is broken.
    stages = tmp_path / "s.tsv"
    stages.write_text("probe\tok\t3\tx\nbuild\tfailed\t120\trc=1; ninja\n")
    log = tmp_path / "t.log"
    log.write_text("FAILED tests/test_op_sparse_delta.py::test_x[cuda] - boom\n"
                   "+++++++++++++++++++ Timeout +++++++++++++++++++\n"
                   "1 failed, 7 passed, 2 skipped in 3.21s\n")
    out = tmp_path / "r.json"
    code = ("import sys, runpy; sys.modules['torch'] = None; "
            f"sys.argv = ['gpu_check.py', '--out', {str(out)!r}, '--update', '--stages', "
            f"{str(stages)!r}, '--tests-log', 'tests_cuda={log}']; "
            f"runpy.run_path({SCRIPT!r}, run_name='__main__')")
    r = _run([sys.executable, "-c", code], timeout=60)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert [s["name"] for s in rep["stages"]] == ["probe", "build"]
    assert rep["stages"][1]["status"] == "failed"
    t = rep["tests"]["tests_cuda"]
    assert t["counts"] == {"failed": 1, "passed": 7, "skipped": 2}
    assert len(t["failed"]) == 1 and len(t["timeouts"]) == 1
    assert "stages 1/2 ok (build=failed)" in rep["summary"]
    assert "tests_cuda: 7 passed, 1 failed, 1 timed out" in rep["summary"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU failure path")
def test_benchmark_without_gpu_still_writes_json(tmp_path):
    out = tmp_path / "r.json"
    r = _run([sys.executable, SCRIPT, "--out", str(out), "--providers", "cuda,dense"])
    assert r.returncode == 1
    rep = json.loads(out.read_text())
    assert any("no CUDA device" in e for e in rep["errors"]), rep["errors"]
    assert rep["summary"].startswith("gpu-check:")


def test_shell_respects_a_short_deadline(tmp_path):
    # 20 s: less than the stages' interpreter starts alone (~45 s on an idle 2-core machine),
    # so some stage is cut off or skipped; that is recorded, every later stage is accounted
    # for, the JSON and the summary line are written, and the run exits 1 in time.
    if not any(f.startswith("_C") for f in os.listdir(os.path.join(ROOT, "lori_kernels"))):
        pytest.skip("lori_kernels._C is not built")
    env = dict(os.environ, LORI_GPU_CHECK_DRY_RUN="1", LORI_GPU_CHECK_DEADLINE="20",
               LORI_GPU_CHECK_RESERVE="5", OUT=str(tmp_path))
    out = tmp_path / "run" / "gpu_check.json"
    t0 = time.time()
    r = _run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(out)], timeout=240,
             env=env)
    # The deadline, plus the final summary's own interpreter start (outside every stage).
    assert time.time() - t0 < 20 + 60, r.stdout[-3000:]
    assert r.returncode == 1, r.stdout[-3000:]
    rep = json.loads(out.read_text())
    names = [s["name"] for s in rep["stages"]]
    # Every stage of the check is accounted for, run or skipped.
    assert names == ["probe", "build", "import", "tests_cuda", "tests_batched", "bench_cuda",
                     "tests_triton", "bench_triton"], names
    assert any(s["status"] in ("skipped", "timeout") for s in rep["stages"]), rep["stages"]
    assert r.stdout.strip().splitlines()[-1].startswith("gpu-check: DRY RUN")
    # Copied to $OUT as the run went.
    assert (tmp_path / "gpu_check.json").exists() and (tmp_path / "gpu_check_stages.tsv").exists()
