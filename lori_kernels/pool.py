"""AdapterPool: many LoRI adapters of one layer shape, in the form batched_sparse_delta reads.

Layout (what torch.ops.lori.batched_sparse_delta takes), for `capacity` slots:
  masks (capacity, out, ceil(rank/32)) int32    one slot per adapter
  offsets (capacity, ceil(out/64)+1) int32      chunk offsets, relative to the adapter's start
  value_starts / seeds (capacity,) int64, scales (capacity,) fp32, distributions (capacity,) int32
  values (arena,) in the pool's dtype           adapters' packed B values, one extent each

Adding an adapter fills a free slot and appends its values at the arena's end; removing one
frees its slot (zeroed: a stale id reads an empty adapter, delta 0) and leaves a hole in the
arena. Nothing is repacked on add/remove except when the slot table or the arena is full:
then slots double, and the arena is compacted (live extents moved together, in slot order)
and grown if still short. Ids are slot indices: they stay valid until the adapter is removed.

All adapters share rank, in_features and out_features (checked on add); they may differ in
sparsity, seed, distribution and scale. For multi-task training, `pool.values.requires_grad_()`
and give `pool.values` to the optimizer (rebuild it after add/remove: they may reallocate).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from . import spec
from .packing import PackedB, validate_packed

_META_BYTES = 8 + 8 + 4 + 4  # value_start, seed, scale, distribution per slot


@dataclass(frozen=True)
class PoolEntry:
    """One adapter of a pool: its slot, B (views into the pool's buffers) and A's recipe."""
    name: str
    slot: int
    packed: PackedB
    seed: int            # unsigned 64-bit
    distribution: str
    scale: float


class AdapterPool:
    """Adapters of one layer shape (in_features -> out_features, rank) for batched serving.

    pool = AdapterPool(4096, 4096, rank=32, dtype=torch.bfloat16)
    pool.add("math", packed_b, seed=..., scale=2.0)       # or pool.add("math", lori_adapter)
    y = lori_kernels.batched_sparse_delta(x, pool.ids(["math", None, ...]), pool)
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 capacity: int = 4, arena: int = 0):
        for nm, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm} must be a positive int, got {v!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= spec.MAX_RANK:
            raise ValueError(f"rank must be an int in [1, {spec.MAX_RANK}], got {rank!r}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"dtype must be float32/bfloat16/float16/float64, got {dtype}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.dtype = dtype
        dev = torch.device(device)
        cap = max(1, int(capacity))
        w, c = spec.mask_words(rank), spec.num_chunks(out_features)
        self.masks = torch.zeros(cap, out_features, w, dtype=torch.int32, device=dev)
        self.offsets = torch.zeros(cap, c + 1, dtype=torch.int32, device=dev)
        self.value_starts = torch.zeros(cap, dtype=torch.int64, device=dev)
        self.seeds = torch.zeros(cap, dtype=torch.int64, device=dev)
        self.scales = torch.zeros(cap, dtype=torch.float32, device=dev)
        self.distributions = torch.ones(cap, dtype=torch.int32, device=dev)
        self.values = torch.zeros(max(0, int(arena)), dtype=dtype, device=dev)
        self._slot_of: dict[str, int] = {}
        self._names: list[str | None] = [None] * cap
        self._extent: list[tuple[int, int]] = [(0, 0)] * cap  # (start, nnz) per slot
        self._dist: list[str] = ["rademacher"] * cap
        self._end = 0    # arena high-water mark
        self._live = 0   # values held by live adapters

    # ---- lookup ----
    @property
    def capacity(self) -> int:
        return self.masks.shape[0]

    @property
    def device(self) -> torch.device:
        return self.masks.device

    @property
    def names(self) -> list[str]:
        """Live adapter names, in slot order."""
        return [n for n in self._names if n is not None]

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, name: str) -> bool:
        return name in self._slot_of

    def index(self, name: str) -> int:
        """The slot (the id batched_sparse_delta takes) of adapter `name`."""
        try:
            return self._slot_of[name]
        except KeyError:
            raise KeyError(f"no adapter {name!r} in this pool ({self.names})") from None

    def ids(self, adapters: Iterable[str | int | None]) -> torch.Tensor:
        """Per-token ids (int32, on the pool's device) from names, slot indices or None (-1)."""
        out = []
        for a in adapters:
            if a is None:
                out.append(-1)
            elif isinstance(a, str):
                out.append(self.index(a))
            elif isinstance(a, int) and not isinstance(a, bool):
                if not (a == -1 or (0 <= a < self.capacity and self._names[a] is not None)):
                    raise ValueError(f"adapter id {a} is not a live slot of this pool "
                                     f"(capacity {self.capacity})")
                out.append(a)
            else:
                raise TypeError(f"adapter ids must be names, ints or None, got {a!r}")
        return torch.tensor(out, dtype=torch.int32, device=self.device)

    def get(self, name: str) -> PoolEntry:
        slot = self.index(name)
        start, nnz = self._extent[slot]
        packed = PackedB(self.masks[slot], self.values[start:start + nnz], self.offsets[slot],
                         self.rank)
        return PoolEntry(name, slot, packed, spec.seed_from_op(int(self.seeds[slot])),
                         self._dist[slot], float(self.scales[slot]))

    def op_args(self) -> tuple:
        """(masks, values, value_starts, offsets, seeds, scales, distributions, rank): the
        pool's part of torch.ops.lori.batched_sparse_delta's arguments."""
        return (self.masks, self.values, self.value_starts, self.offsets, self.seeds,
                self.scales, self.distributions, self.rank)

    # ---- sizes ----
    def nbytes(self, name: str) -> int:
        """Bytes adapter `name` occupies: mask + values + offsets + per-slot metadata."""
        slot = self.index(name)
        return (self.masks[slot].numel() * 4 + self._extent[slot][1] * self.values.element_size()
                + self.offsets[slot].numel() * 4 + _META_BYTES)

    @property
    def used_nbytes(self) -> int:
        """Sum of nbytes over live adapters."""
        return sum(self.nbytes(n) for n in self._slot_of)

    @property
    def total_nbytes(self) -> int:
        """Bytes allocated (free slots and arena holes included)."""
        ts = (self.masks, self.offsets, self.value_starts, self.seeds, self.scales,
              self.distributions, self.values)
        return sum(t.numel() * t.element_size() for t in ts)

    # ---- add / remove ----
    @torch.no_grad()
    def add(self, name: str, adapter, *, seed: int | None = None,
            distribution: str | None = None, scale: float | None = None) -> int:
        """Add adapter `name` and return its slot. `adapter` is a PackedB (then seed is
        required; distribution defaults to rademacher, scale to 1.0), or an adapter that hands
        its plain arguments through `pool_args()` (lori_kernels.nn.LoRIAdapter: its seed,
        distribution, alpha/rank and in_features; explicit arguments here override them).
        Validated (packing.validate_packed); rank and out_features (and in_features when the
        adapter states it) must match the pool."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty str, got {name!r}")
        if name in self._slot_of:
            raise ValueError(f"adapter {name!r} is already in this pool (remove it first)")
        pool_args = getattr(adapter, "pool_args", None)
        if pool_args is not None:
            args = pool_args()
            if args["in_features"] != self.in_features:
                raise ValueError(f"adapter {name!r} takes in_features={args['in_features']}, "
                                 f"the pool {self.in_features}")
            seed = args["seed"] if seed is None else seed
            distribution = distribution or args["distribution"]
            scale = args["scale"] if scale is None else scale
            adapter = args["b"]
        if not isinstance(adapter, PackedB):
            raise TypeError(f"adapter must be a PackedB or LoRIAdapter, got "
                            f"{type(adapter).__name__}")
        if seed is None:
            raise ValueError("seed is required for a PackedB adapter")
        seed_op = spec.check_seed(seed)
        distribution = distribution or spec.DEFAULT_DISTRIBUTION
        dist_id = spec.check_distribution(distribution)
        scale = 1.0 if scale is None else float(scale)
        if adapter.rank != self.rank:
            raise ValueError(f"adapter {name!r} has rank {adapter.rank}, the pool {self.rank}: "
                             "all adapters of a pool share one rank")
        if adapter.out_features != self.out_features:
            raise ValueError(f"adapter {name!r} has out_features={adapter.out_features}, the "
                             f"pool {self.out_features}")
        mask, offsets = adapter.mask.detach().cpu(), adapter.offsets.detach().cpu()
        values = adapter.values.detach()
        validate_packed(mask, values.cpu(), offsets, adapter.rank)
        nnz = values.numel()
        slot = self._free_slot()
        start = self._reserve(nnz)
        dev = self.device
        self.values[start:start + nnz] = values.to(device=dev, dtype=self.dtype)
        self.masks[slot] = mask.to(dev)
        self.offsets[slot] = offsets.to(dev)
        self.value_starts[slot] = start
        self.seeds[slot] = seed_op
        self.scales[slot] = scale
        self.distributions[slot] = dist_id
        self._names[slot], self._slot_of[name] = name, slot
        self._extent[slot], self._dist[slot] = (start, nnz), distribution
        self._end = max(self._end, start + nnz)
        self._live += nnz
        return slot

    @torch.no_grad()
    def remove(self, name: str) -> None:
        """Remove adapter `name`: its slot becomes free (an empty adapter), its values a hole."""
        slot = self.index(name)
        start, nnz = self._extent[slot]
        self._clear_slot(slot)
        del self._slot_of[name]
        self._live -= nnz
        if start + nnz == self._end:  # the last extent: reclaim at once
            self._end = max((s + n for s, n in self._extent if n), default=0)

    @torch.no_grad()
    def compact(self, arena: int | None = None) -> None:
        """Move live extents together (slot order) into an arena of `arena` values (default:
        the current size). Ids do not change."""
        cap = self.values.numel() if arena is None else int(arena)
        if cap < self._live:
            raise ValueError(f"arena of {cap} values cannot hold {self._live} live values")
        new = torch.zeros(cap, dtype=self.dtype, device=self.device)
        pos = 0
        for slot, (start, nnz) in enumerate(self._extent):
            if self._names[slot] is None:
                continue
            new[pos:pos + nnz] = self.values[start:start + nnz]
            self._extent[slot] = (pos, nnz)
            self.value_starts[slot] = pos
            pos += nnz
        self.values = new.requires_grad_(self.values.requires_grad)
        self._end = pos

    def to(self, device: torch.device | str) -> "AdapterPool":
        """Move every buffer to `device` (in place; returns self)."""
        for attr in ("masks", "offsets", "value_starts", "seeds", "scales", "distributions"):
            setattr(self, attr, getattr(self, attr).to(device))
        self.values = self.values.detach().to(device).requires_grad_(self.values.requires_grad)
        return self

    def _free_slot(self) -> int:
        for slot, n in enumerate(self._names):
            if n is None:
                return slot
        old = self.capacity  # full: double the slot table (the only repack of slot data)
        grow = lambda t, fill: torch.cat([t, torch.full((old, *t.shape[1:]), fill, dtype=t.dtype,
                                                         device=t.device)])
        self.masks, self.offsets = grow(self.masks, 0), grow(self.offsets, 0)
        self.value_starts, self.seeds = grow(self.value_starts, 0), grow(self.seeds, 0)
        self.scales, self.distributions = grow(self.scales, 0), grow(self.distributions, 1)
        self._names += [None] * old
        self._extent += [(0, 0)] * old
        self._dist += ["rademacher"] * old
        return old

    def _reserve(self, nnz: int) -> int:
        """Start of a free extent of nnz values at the arena's end; compacts (and grows) the
        arena only when the end has no room."""
        cap = self.values.numel()
        if self._end + nnz <= cap:
            return self._end
        need = self._live + nnz
        self.compact(cap if need <= cap * 3 // 4 else max(2 * cap, need + need // 2))
        return self._end

    def _clear_slot(self, slot: int) -> None:
        self.masks[slot] = 0
        self.offsets[slot] = 0
        self.value_starts[slot] = 0
        self.seeds[slot] = 0
        self.scales[slot] = 0.0
        self.distributions[slot] = 1
        self._names[slot] = None
        self._extent[slot] = (0, 0)

    def __repr__(self) -> str:
        return (f"AdapterPool(in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"dtype={self.dtype}, adapters={len(self)}/{self.capacity}, "
                f"values={self._live}/{self.values.numel()}, device={self.device})")

