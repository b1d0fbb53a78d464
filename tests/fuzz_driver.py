"""The deep fuzz run (`make fuzz`): op cases and corrupt adapter files in child processes, so
a crash or a hang is counted and reported with its case instead of ending the run.

  python tests/fuzz_driver.py                  run for LORI_FUZZ_SECONDS (default 900)
  python tests/fuzz_driver.py --replay N       rerun op case N in this process (prints it)

Environment: LORI_FUZZ_SECONDS, LORI_FUZZ_SEED (0), LORI_FUZZ_BATCH (cases per child, 200),
LORI_FUZZ_CASE_TIMEOUT (seconds before a case counts as a hang, 120), LORI_FUZZ_TRITON (1:
some cases on the Triton backend, 0: none), LORI_FUZZ_FILES (share of the time for files,
0.25; 0: ops only), LORI_FUZZ_INJECT_CRASH / LORI_FUZZ_INJECT_HANG=N (make case N abort /
sleep: checks the driver itself). Case N of seed S is the same case on every machine (tests/fuzz_cases.py). Exit status
1 when anything but known-pending failures was found.
"""
from __future__ import annotations

import collections
import json
import os
import random
import selectors
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ENV = os.environ


def _case(seed: int, i: int) -> dict:
    import fuzz_cases as C
    case = C.build_case(C.RandomDraw(random.Random(f"{seed}:{i}")))
    if ENV.get("LORI_FUZZ_TRITON", "1") == "0" and case["backend"] == "triton":
        case = C.build_case(C.RandomDraw(random.Random(f"{seed}:{i}")), backend="cpp")
    return case


def _emit(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def child_ops(seed: int, start: int, count: int) -> None:
    import fuzz_cases as C
    for i in range(start, start + count):
        case = _case(seed, i)
        _emit(kind="start", i=i)
        # the driver's own check that a crash and a hang are caught and named
        if ENV.get("LORI_FUZZ_INJECT_CRASH") == str(i):
            os.abort()
        if ENV.get("LORI_FUZZ_INJECT_HANG") == str(i):
            time.sleep(3600)
        outcome, detail = C.run_case(case)
        _emit(kind="done", i=i, outcome=outcome, detail=detail,
              pending=C.pending_reason(case))


def child_files(seed: int, file_seed: int) -> None:
    """Every bit of every byte, truncations at every byte, header and field edits, of one
    sample file; one line per variant group."""
    import file_variants as V
    from lori_kernels.workflow import format as F
    with tempfile.TemporaryDirectory() as d:
        path, work = os.path.join(d, "a.safetensors"), os.path.join(d, "v.safetensors")
        meta, tensors = V.sample_file(path, seed=file_seed)
        ref = V.snapshot(F.read_adapter(path))
        data = open(path, "rb").read()

        def run(group, variants, is_path=False):
            counts, bad = collections.Counter(), []
            for label, v in variants:
                if not is_path:
                    with open(work, "wb") as f:
                        f.write(v)
                o, detail = V.outcome(work, ref)
                if group == "invalid edits" and o == "identical":
                    o = "wrong"  # an invalid field must never load
                counts[o] += 1
                if o in ("wrong", "bad_exception"):
                    bad.append(f"{label}: {o}: {detail}")
            _emit(kind="files", group=group, counts=counts, bad=bad[:20], file_seed=file_seed)

        run("bit flips", V.byte_variants(data))
        run("truncations", V.truncations(data, every=1))
        run("header edits", V.header_edits(data))
        run("invalid edits", ((lb, None) for lb, _ in V.invalid_edits(path, work, meta, tensors)),
            is_path=True)


def _spawn(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(HERE))


def _lines(p: subprocess.Popen, timeout: float):
    """Lines of a child's stdout; None when it stays silent for `timeout` seconds."""
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    while True:
        if not sel.select(timeout):
            yield None
            return
        line = p.stdout.readline()
        if not line:
            return
        yield line


def _death(p: subprocess.Popen) -> str:
    rc = p.wait()
    err = p.stderr.read()[-600:]
    return f"{'signal ' + str(-rc) if rc < 0 else 'exit ' + str(rc)}; stderr tail: {err!r}"


def run(seconds: float) -> int:
    seed = int(ENV.get("LORI_FUZZ_SEED", "0"))
    batch = int(ENV.get("LORI_FUZZ_BATCH", "200"))
    case_timeout = float(ENV.get("LORI_FUZZ_CASE_TIMEOUT", "120"))
    file_share = float(ENV.get("LORI_FUZZ_FILES", "0.25"))
    t0 = time.time()
    ops = collections.Counter()
    files = collections.Counter()
    findings, pending = [], collections.Counter()
    nxt = 0
    # corrupt files first (their share of the time), one child per sample file
    file_seed = 0
    while file_share > 0 and (time.time() - t0 < seconds * file_share or file_seed == 0):
        p = _spawn(["--child-files", seed, file_seed])
        for line in _lines(p, case_timeout * 10):
            if line is None:
                p.kill()
                files["hang"] += 1
                findings.append(f"files seed {file_seed}: hang")
                break
            rec = json.loads(line)
            for k, v in rec["counts"].items():
                files[k] += v
            files["tried"] += sum(rec["counts"].values())
            findings += [f"files seed {file_seed} {rec['group']}: {b}" for b in rec["bad"]]
        if p.wait() != 0 and files["hang"] == 0:
            files["crash"] += 1
            findings.append(f"files seed {file_seed}: child died ({_death(p)})")
        file_seed += 1
    print(f"[fuzz] files done after {time.time() - t0:.0f}s", flush=True)
    while time.time() - t0 < seconds:
        p = _spawn(["--child-ops", seed, nxt, batch])
        in_flight, last = None, nxt - 1
        for line in _lines(p, case_timeout):
            if line is None:  # the case in flight hangs
                p.kill()
                p.wait()
                ops["tried"] += 1
                ops["hang"] += 1
                findings.append(f"hang: case {in_flight}: {_case(seed, in_flight)}")
                last = in_flight
                in_flight = None
                break
            rec = json.loads(line)
            if rec["kind"] == "start":
                in_flight = rec["i"]
                continue
            in_flight, last = None, rec["i"]
            ops["tried"] += 1
            o = rec["outcome"]
            ops[o] += 1
            if o not in ("ok", "clean_error"):
                if rec["pending"]:
                    pending[rec["pending"]] += 1
                    ops[f"{o} (known pending)"] += 1
                else:
                    findings.append(f"{o}: case {rec['i']}: {rec['detail']} :: "
                                    f"{_case(seed, rec['i'])}")
        else:
            if in_flight is not None:  # died inside a case: replay it alone to confirm
                why = _death(p)
                ops["tried"] += 1
                ops["crash"] += 1
                r = _spawn(["--child-ops", seed, in_flight, 1])
                r.communicate(timeout=case_timeout)
                again = "reproduces" if r.returncode != 0 else "does not reproduce alone"
                findings.append(f"crash ({why}) in case {in_flight} ({again}): "
                                f"{_case(seed, in_flight)}")
                last = in_flight
            else:
                p.wait()
        nxt = last + 1
        print(f"[fuzz] {time.time() - t0:.0f}s: {ops['tried']} calls", flush=True)
    known = sum(pending.values())
    print("\n==== lori_kernels fuzz summary ====")
    print(f"seed {seed}, {time.time() - t0:.0f} s, op cases 0..{nxt - 1}")
    print(f"op calls tried {ops['tried']}: ok {ops['ok']}, clean errors {ops['clean_error']}, "
          f"crashes {ops['crash']}, hangs {ops['hang']}, silent wrong answers "
          f"{ops['silent_wrong']} (known pending: {ops['silent_wrong (known pending)']}), "
          f"unclear errors {ops['unclear_error']} (known pending: "
          f"{ops['unclear_error (known pending)']}), false rejections {ops['false_reject']}")
    print(f"corrupt file variants tried {files['tried']} ({file_seed} sample files): rejected "
          f"{files['rejected']}, loaded identical {files['identical']}, loaded wrong "
          f"{files['wrong']}, other exception types {files['bad_exception']}, crashes "
          f"{files['crash']}, hangs {files['hang']}")
    if pending:
        print(f"known pending ({known}, xfail(strict) in the suite):")
        for why, n in pending.most_common():
            print(f"  {n:6d}  {why}")
    print(f"findings: {len(findings)}")
    for f in findings[:50]:
        print("  " + f[:700])
    return 1 if findings else 0


def main(argv) -> int:
    if argv[:1] == ["--child-ops"]:
        child_ops(int(argv[1]), int(argv[2]), int(argv[3]))
        return 0
    if argv[:1] == ["--child-files"]:
        child_files(int(argv[1]), int(argv[2]))
        return 0
    if argv[:1] == ["--replay"]:
        import fuzz_cases as C
        case = _case(int(ENV.get("LORI_FUZZ_SEED", "0")), int(argv[1]))
        print(case)
        print(C.run_case(case), "pending:", C.pending_reason(case))
        return 0
    return run(float(ENV.get("LORI_FUZZ_SECONDS", "900")))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
