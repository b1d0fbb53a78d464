"""The adapter file loader under corruption: every variant (bit flips in each region,
truncations, header and metadata edits, invalid fields re-digested or as version 1) is
rejected with a ValueError or loads exactly what was saved. Bounded here (a few seconds);
`make fuzz` runs every bit of every byte of several files."""
import collections
import random

import pytest

import file_variants as V
from lori_kernels.workflow import format as F


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzzfiles")
    path = d / "a.safetensors"
    meta, tensors = V.sample_file(path)
    return path, d / "variant.safetensors", meta, tensors, V.snapshot(F.read_adapter(path))


def _run(variants, work, ref):
    counts, bad = collections.Counter(), []
    for label, data in variants:
        work.write_bytes(data)
        o, detail = V.outcome(work, ref)
        counts[o] += 1
        if o in ("wrong", "bad_exception"):
            bad.append((label, o, detail))
    return counts, bad


def _report(what, counts, bad):
    print(f"\n{what}: tried {sum(counts.values())}, rejected {counts['rejected']}, loaded "
          f"identical {counts['identical']}, loaded wrong {counts['wrong']}, other exception "
          f"types {counts['bad_exception']}")
    assert not bad, f"{len(bad)} variants loaded wrong or raised a non-ValueError: {bad[:10]}"


def test_bit_flips_every_region(saved):
    path, work, _, _, ref = saved
    data = path.read_bytes()
    # every byte, one seeded bit each; all 8 bits of the length prefix
    rng = random.Random(1)
    variants = list(V.byte_variants(data, rng=rng))
    counts, bad = _run(variants, work, ref)
    _report("bit flips", counts, bad)
    regions = collections.Counter(lb.split()[1] for lb, _ in variants)
    assert set(regions) == {"length", "header", "data"}
    assert counts["rejected"] + counts["identical"] == len(variants)


def test_truncations_and_header_edits(saved):
    path, work, _, _, ref = saved
    data = path.read_bytes()
    counts, bad = _run([*V.truncations(data, every=97), *V.header_edits(data)], work, ref)
    _report("truncations + header edits", counts, bad)
    assert counts["identical"] == 0  # every one of these changes what the file says


def test_invalid_fields_rejected_three_ways(saved):
    """Each invalid field with the old digests, re-digested (v2) and as a v1 file: all three
    must be rejected, by the digest or by the structure and type checks."""
    path, work, meta, tensors, ref = saved
    counts, bad = collections.Counter(), []
    for label, p in V.invalid_edits(path, work, meta, tensors):
        o, detail = V.outcome(p, ref)
        counts[o] += 1
        if o != "rejected":
            bad.append((label, o, detail))
    _report("invalid metadata/tensor edits", counts, bad)
    assert not bad


def test_bit_moved_within_chunk_needs_the_digest(saved):
    """Two mask bits moved within a 64-row chunk pass validate_packed (same chunk totals): the
    digest rejects it; a version-1 file (no digests) cannot, which is why version 2 has them."""
    path, work, meta, tensors, ref = saved
    (l1, p1, _), = [next(V.within_chunk_swap(path, work, meta, tensors))]
    o, detail = V.outcome(p1, ref)
    assert o == "rejected" and "m.q.mask" in detail and "digest" in detail, (l1, o, detail)
    gen = V.within_chunk_swap(path, work, meta, tensors)
    next(gen)
    _, p2, _ = next(gen)
    assert V.outcome(p2, ref)[0] == "wrong"  # the documented limit of version 1
