"""The A and B specs in Python: constants, seeds, magnitudes (docs/spec_a.md, docs/spec_b.md).

Everything here must agree with csrc/include/lori/philox.h and bitmask.h; tests check both
against each other and against Random123's known-answer vectors.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

A_SPEC_VERSION = 1
B_SPEC_VERSION = 1

# Distribution name -> id. The id is also Philox counter word 2, so it is part of the spec.
DISTRIBUTIONS = {"rademacher": 1, "uniform": 2}
DEFAULT_DISTRIBUTION = "rademacher"
# Elements of A per Philox4x32-10 block (128 random bits).
ELEMS_PER_BLOCK = {"rademacher": 128, "uniform": 4}

MAX_RANK = 256
ROW_CHUNK = 64  # rows of B per offsets entry

_U64 = 1 << 64


def check_distribution(distribution: str) -> int:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"distribution must be one of {sorted(DISTRIBUTIONS)}, got {distribution!r}"
        )
    return DISTRIBUTIONS[distribution]


def check_seed(seed: int, name: str = "seed") -> int:
    """Validate a 64-bit unsigned seed and return it as the int64 bit pattern the ops take."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < _U64:
        raise ValueError(f"{name} must be in [0, 2**64), got {seed}")
    return seed - _U64 if seed >= 1 << 63 else seed


def seed_from_op(seed_i64: int) -> int:
    """Inverse of check_seed: the unsigned seed behind an op's int64 seed argument."""
    return seed_i64 % _U64


def magnitude(distribution: str, in_features: int) -> float:
    """fp32 magnitude of A's entries: 1/sqrt(in) (uniform) or 1/sqrt(3 in) (rademacher),
    computed in float64 and rounded once to float32 (returned as the exact Python float)."""
    n = in_features * (3.0 if distribution == "rademacher" else 1.0)
    return float(np.float32(1.0 / math.sqrt(n)))


def layer_seed(adapter_seed: int, name: str) -> int:
    """Per-layer seed: first 8 bytes (little-endian) of
    SHA-256(b"lori-layer-seed\\x00" + adapter_seed as 8 bytes little-endian + name in UTF-8).

    Stable across machines and Python versions (no use of hash()).
    """
    check_seed(adapter_seed, "adapter_seed")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    h = hashlib.sha256(b"lori-layer-seed\x00" + int(adapter_seed).to_bytes(8, "little")
                       + name.encode("utf-8"))
    return int.from_bytes(h.digest()[:8], "little")


def mask_words(rank: int) -> int:
    return (rank + 31) // 32


def num_chunks(out_features: int) -> int:
    return (out_features + ROW_CHUNK - 1) // ROW_CHUNK
