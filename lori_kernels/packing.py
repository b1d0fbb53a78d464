"""Sparse B in the bitmask form of docs/spec_b.md: pack, unpack, validate.

PackedB holds three tensors (mask, values, offsets) plus the rank; the ops take those
tensors directly, so `values` can be an nn.Parameter trained in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import spec

VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # float64: verification


@dataclass(frozen=True)
class PackedB:
    """B (out_features x rank) as mask bits + packed values + chunk offsets.

    mask:    int32 (out_features, ceil(rank/32)); bit k%32 of word k//32 in row o is set
             iff B[o, k] is in the pattern (bits >= rank are zero).
    values:  (nnz,) fp32/bf16/fp16, the pattern's entries row-major (o, then k ascending).
    offsets: int32 (ceil(out_features/64) + 1,); offsets[c] = pattern entries in rows < 64 c.
    """

    mask: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    rank: int

    @property
    def out_features(self) -> int:
        return self.mask.shape[0]

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes held: mask + values + offsets (what a stored adapter layer costs)."""
        return sum(t.numel() * t.element_size() for t in (self.mask, self.values, self.offsets))

    def to(self, device=None, dtype=None) -> "PackedB":
        return PackedB(self.mask.to(device), self.values.to(device=device, dtype=dtype),
                       self.offsets.to(device), self.rank)

    def with_values(self, values: torch.Tensor) -> "PackedB":
        """The same pattern with new values (e.g. an nn.Parameter)."""
        return PackedB(self.mask, values, self.offsets, self.rank)

    def bool_mask(self) -> torch.Tensor:
        return unpack_mask(self.mask, self.rank)

    def to_dense(self) -> torch.Tensor:
        return unpack_bitmask(self)

    def validate(self) -> "PackedB":
        validate_packed(self.mask, self.values, self.offsets, self.rank)
        return self

    def row_slice(self, o0: int, o1: int) -> "PackedB":
        """B[o0:o1] as its own PackedB (a tensor-parallel shard of B's rows): the mask rows,
        the values of those rows, and offsets re-based so that offsets[0] == 0.

        When o0 is a multiple of 64 the slice's chunks are the original chunks (a plain
        re-based slice of the offsets); otherwise chunk boundaries move and the offsets are
        recomputed from the mask rows. The values are a view when they can be (contiguous
        range), so a slice of a Parameter's data shares its storage."""
        out = self.out_features
        for name, v in (("o0", o0), ("o1", o1)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if not 0 <= o0 <= o1 <= out:
            raise ValueError(f"row_slice needs 0 <= o0 <= o1 <= out_features={out}, got "
                             f"o0={o0}, o1={o1}")
        if o1 == o0:
            raise ValueError("row_slice: empty slice (o0 == o1); a PackedB has >= 1 row")
        mask = self.mask[o0:o1]
        chunk = spec.ROW_CHUNK
        if o0 % chunk == 0:
            # The first value of row o0 is offsets[o0 // 64]; the slice's chunk c is the
            # original chunk o0//64 + c, except the last one when o1 cuts it.
            off = self.offsets.to(torch.int64)
            c0 = o0 // chunk
            n = spec.num_chunks(o1 - o0)
            start = int(off[c0])
            if o1 % chunk == 0 or o1 == out:
                new_off = off[c0:c0 + n + 1] - start
                end = int(off[c0 + n])
            else:
                counts = unpack_mask(mask[(n - 1) * chunk:], self.rank).sum(dtype=torch.int64)
                new_off = torch.cat([off[c0:c0 + n] - start,
                                     (off[c0 + n - 1] - start + counts).reshape(1)])
                end = start + int(new_off[-1])
            new_off = new_off.to(torch.int32)
        else:
            # Rows before o0 in its chunk: their popcount says where row o0's values start.
            c = o0 // chunk
            before = unpack_mask(self.mask[c * chunk:o0], self.rank).sum(dtype=torch.int64)
            start = int(self.offsets[c]) + int(before)
            new_off = chunk_offsets(unpack_mask(mask, self.rank))
            end = start + int(new_off[-1])
        return PackedB(mask, self.values[start:end], new_off.to(self.offsets.device), self.rank)


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= spec.MAX_RANK:
        raise ValueError(f"rank must be an int in [1, {spec.MAX_RANK}], got {rank!r}")


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool (out, rank) -> int32 mask words (out, ceil(rank/32)), LSB first."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D (out_features, rank), got shape {tuple(mask.shape)}")
    out, rank = mask.shape
    _check_rank(rank)
    words = spec.mask_words(rank)
    bits = torch.zeros(out, words * 32, dtype=torch.int64, device=mask.device)
    bits[:, :rank] = mask.to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=mask.device) << torch.arange(
        32, device=mask.device)
    w = (bits.view(out, words, 32) * weights).sum(-1)
    return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)


def unpack_mask(mask_words: torch.Tensor, rank: int) -> torch.Tensor:
    """int32 mask words (out, W) -> bool (out, rank)."""
    shifts = torch.arange(32, device=mask_words.device)
    bits = (mask_words.to(torch.int64)[..., None] >> shifts) & 1
    return bits.flatten(-2)[..., :rank].bool()


def chunk_offsets(mask: torch.Tensor) -> torch.Tensor:
    """bool (out, rank) -> int32 offsets (ceil(out/64)+1,)."""
    out = mask.shape[0]
    counts = mask.sum(1, dtype=torch.int64)
    padded = torch.zeros(spec.num_chunks(out) * spec.ROW_CHUNK, dtype=torch.int64,
                         device=mask.device)
    padded[:out] = counts
    per_chunk = padded.view(-1, spec.ROW_CHUNK).sum(1)
    offsets = torch.zeros(per_chunk.numel() + 1, dtype=torch.int64, device=mask.device)
    offsets[1:] = per_chunk.cumsum(0)
    if offsets[-1] >= 1 << 31:
        raise ValueError("B has more than 2**31 - 1 pattern entries")
    return offsets.to(torch.int32)


def pack_bitmask(b: torch.Tensor, mask: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None) -> PackedB:
    """Pack dense B (out_features, rank) under a bool mask (default: b != 0).

    The mask, not the values, defines the pattern: an entry on the mask whose value is 0.0
    stays in the pattern (and trains). Entries off the mask are dropped whatever their value.
    """
    if not isinstance(b, torch.Tensor) or b.dim() != 2:
        raise ValueError("b must be a 2-D tensor (out_features, rank)")
    dtype = dtype or b.dtype
    if dtype not in VALUE_DTYPES:
        raise TypeError(f"b: dtype must be one of float32/bfloat16/float16/float64, got {dtype}")
    if mask is None:
        mask = b != 0
    if mask.shape != b.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != b shape {tuple(b.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    mask = mask.to(b.device)
    _check_rank(b.shape[1])
    values = b.detach()[mask].to(dtype).contiguous()
    return PackedB(pack_mask(mask), values, chunk_offsets(mask), b.shape[1])


def unpack_bitmask(packed: PackedB) -> torch.Tensor:
    """PackedB -> dense B (out_features, rank) in the values' dtype (zeros off the mask)."""
    m = packed.bool_mask()
    dense = torch.zeros(m.shape, dtype=packed.values.dtype, device=packed.values.device)
    dense[m] = packed.values
    return dense


def validate_packed(mask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                    rank: int) -> None:
    """Every consistency check of B that is cheap (one pass over the mask; what a loaded file
    must pass). Raises ValueError/TypeError naming the first bad part.

    Checked: dtypes and shapes for `rank`; mask, values and offsets on one device; no mask bit
    at a position >= rank; offsets[0] == 0, offsets non-decreasing, offsets[-1] == values'
    length; and each 64-row chunk's mask popcount (its rows' counts summed) equal to its
    offsets step, so every row's values start where the kernels look for them.

    Not checkable here: a mask bit moved to another position of the same 64-row chunk (two
    flipped bits, one set and one cleared) keeps every chunk total and is another valid
    pattern; so is a flipped value byte. The adapter file's digests (workflow/format.py)
    catch those on load.
    """
    _check_rank(rank)
    for name, t in (("mask", mask), ("values", values), ("offsets", offsets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not mask.device == values.device == offsets.device:
        raise ValueError(f"mask, values and offsets must be on one device, got {mask.device}, "
                         f"{values.device}, {offsets.device}")
    if mask.dtype != torch.int32 or mask.dim() != 2 or mask.shape[1] != spec.mask_words(rank):
        raise ValueError(f"mask must be int32 of shape (out_features, {spec.mask_words(rank)}) "
                         f"for rank {rank}, got {mask.dtype} {tuple(mask.shape)}")
    if values.dtype not in VALUE_DTYPES or values.dim() != 1:
        raise ValueError(f"values must be 1-D float32/bfloat16/float16/float64, got {values.dtype} "
                         f"{tuple(values.shape)}")
    n_off = spec.num_chunks(mask.shape[0]) + 1
    if offsets.dtype != torch.int32 or offsets.shape != (n_off,):
        raise ValueError(f"offsets must be int32 of shape ({n_off},), got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")
    if mask.device.type == "meta":
        raise ValueError("mask, values and offsets are meta tensors: there is no data to check")
    off = offsets.cpu().to(torch.int64)
    if int(off[0]) != 0:
        raise ValueError(f"offsets[0] must be 0, got {int(off[0])}")
    steps = off[1:] - off[:-1]
    if (steps < 0).any():
        c = int((steps < 0).nonzero()[0])
        raise ValueError(f"offsets must be non-decreasing: offsets[{c + 1}] = {int(off[c + 1])} "
                         f"< offsets[{c}] = {int(off[c])}")
    if int(off[-1]) != values.numel():
        raise ValueError(f"offsets[-1] = {int(off[-1])} mask entries but values has "
                         f"{values.numel()}")
    full = unpack_mask(mask.cpu(), spec.mask_words(rank) * 32)
    if full[:, rank:].any():
        row = int(full[:, rank:].any(1).nonzero()[0])
        raise ValueError(f"mask has bits set at positions >= rank ({rank}), first in row {row}")
    expect = chunk_offsets(full[:, :rank])
    if not torch.equal(expect, offsets.cpu()):
        c = int((expect != offsets.cpu()).nonzero()[0]) - 1
        rows = (c * spec.ROW_CHUNK, min((c + 1) * spec.ROW_CHUNK, mask.shape[0]))
        raise ValueError(f"offsets do not match the mask's chunk popcounts: chunk {c} (rows "
                         f"{rows[0]}..{rows[1] - 1}) has {int(expect[c + 1] - expect[c])} mask "
                         f"bits but offsets give it {int(steps[c])}")
