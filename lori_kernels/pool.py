"""AdapterPool: many LoRI adapters of one layer shape, in the form batched_sparse_delta reads,
safe to change while it serves.

Layout (what torch.ops.lori.batched_sparse_delta takes), for `capacity` slots:
  masks (capacity, out, ceil(rank/32)) int32    one slot per adapter
  offsets (capacity, ceil(out/64)+1) int32      chunk offsets, relative to the adapter's start
  value_starts / seeds (capacity,) int64, scales (capacity,) fp32, distributions (capacity,) int32
  values (arena,) in the pool's dtype           adapters' packed B values, one extent each

Concurrency (what a server can rely on)
---------------------------------------
Readers read a *snapshot*: an immutable PoolSnapshot holding the op's tensors and the slot
table (names, generations, extents) of one moment. `pool.snapshot()`, `pool.op_args()` and
`pool.plan(ids)` take the current one with a single attribute read (no lock); writers (add,
remove, compact, to, reclaim) are serialized by one lock and publish a new snapshot with one
attribute store. A reader therefore sees either the pool before a write or after it, never a
mix, and keeps seeing the state it took for as long as it holds the snapshot:
- the small per-slot tables (offsets, value_starts, seeds, scales, distributions) are copied
  for every new snapshot, never written in place once published;
- the masks table and the values arena are shared between snapshots and written in place only
  where no snapshot still held can read a live adapter: new values go past the arena's
  high-water mark (never handed out since the last compaction), a new mask goes into a slot
  whose previous adapter no held snapshot has live;
- compact() (also run by add() when the arena is full) and slot growth build new buffers
  completely and publish them with the new snapshot; older snapshots keep the old buffers.

remove(name) publishes a snapshot without the adapter: a plan made after it refuses the name
(KeyError). A plan (or op_args tuple) taken before it keeps reading the removed adapter,
unchanged, until released. The removed slot is *retired*: its mask row is cleared and the slot
reused only once no snapshot older than the removal is held (grace period, tracked with weak
references to each snapshot's own offsets tensor, so a held plan, snapshot or op_args() tuple
all count). With no reader holding an old snapshot (e.g. a pool that is not serving) this
happens inside remove() itself.

A plan also carries the tokens' grouping by adapter in the batched op's plan form
(PoolPlan.op_inputs; docs/architecture.md, "The batched plan"): built once per step from the
ids the plan validated, it lets every layer's op call skip grouping and id checks.

Ids and stale ids
-----------------
Ids are slot indices. `add()` returns a SlotId: an int (the slot) carrying the slot's
generation, which counts the adapters the slot has held. plan() / ids() take names, None
(no adapter), plain ints (the slot's *current* adapter, like a list index) or SlotIds: a SlotId
whose adapter was removed is refused (ValueError "stale"), also after its slot was reused, so a
held SlotId never silently reads a newer adapter. Names and SlotIds are the stable references;
plain ints are positions.
A raw tensor of slot indices (batched_sparse_delta(x, tensor, pool)) is not bound to adapters:
it reads the slots of the current snapshot, unvalidated. A removed, reclaimed slot reads as an
empty adapter (delta exactly 0); a retired slot not yet reclaimed holds its old mask with zero
offsets, which the CPU op rejects (mask/offsets mismatch error) rather than reading; a reused
slot reads its new adapter. With writers running, use plans.

add() is all-or-nothing: name, adapter type, seed, distribution, scale (finite and
representable in the fp32 accumulation), rank, shapes, B's packing and its values' finiteness
in the pool's dtype are all checked before any buffer, slot or counter is touched.

All adapters share rank, in_features and out_features; they may differ in sparsity, seed,
distribution and scale. For multi-task training, `pool.values.requires_grad_()` and give
`pool.values` to the optimizer (rebuild it after add/remove: they may reallocate). Concurrent
writers and training do not mix (a backward pass reads buffers the forward's snapshot held).
"""
from __future__ import annotations

import contextvars
import itertools
import threading
import types
import weakref
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from . import reference, rules, spec
from .packing import PackedB, validate_packed

_META_BYTES = 8 + 8 + 4 + 4  # value_start, seed, scale, distribution per slot
_POOL_KEYS = itertools.count()
BASE_NAMES = (None, "__base__")  # PEFT spells "no adapter" "__base__"


class SlotId(int):
    """A slot index (an int) that remembers which adapter it named: its slot's generation."""

    generation: int

    def __new__(cls, slot: int, generation: int):
        obj = super().__new__(cls, slot)
        obj.generation = generation
        return obj

    def __repr__(self) -> str:
        return f"SlotId({int(self)}, generation={self.generation})"


@dataclass(frozen=True)
class PoolEntry:
    """One adapter of a pool: its slot, B (a copy) and A's recipe."""
    name: str
    slot: int
    packed: PackedB
    seed: int            # unsigned 64-bit
    distribution: str
    scale: float


@dataclass(frozen=True, eq=False)
class PoolSnapshot:
    """The pool at one moment: the op's tensors and the slot table. Never changed after it is
    published (module docstring)."""
    epoch: int
    masks: torch.Tensor
    values: torch.Tensor
    value_starts: torch.Tensor
    offsets: torch.Tensor
    seeds: torch.Tensor
    scales: torch.Tensor
    distributions: torch.Tensor
    rank: int
    in_features: int
    names: tuple            # per slot: adapter name or None
    generations: tuple      # per slot: adapters the slot has held
    extents: tuple          # per slot: (start, nnz) in values
    dists: tuple            # per slot: distribution name
    slot_of: Mapping[str, int]
    pool_key: int

    @property
    def capacity(self) -> int:
        return len(self.names)

    def plan(self, adapters: Iterable[str | int | None] | torch.Tensor) -> "PoolPlan":
        """A plan of this snapshot (AdapterPool.plan takes the current one)."""
        if isinstance(adapters, torch.Tensor):
            if adapters.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"adapter ids must be an int32/int64 tensor, got {adapters.dtype}")
            slots = self.resolve(adapters.reshape(-1).tolist())  # every id live (or -1) here
        else:
            slots = self.resolve(adapters)
        return PoolPlan(None, {self.pool_key: self}, single=self,
                        host_ids=torch.tensor(slots, dtype=torch.int32), device=self.masks.device)

    def op_args(self) -> tuple:
        return (self.masks, self.values, self.value_starts, self.offsets, self.seeds,
                self.scales, self.distributions, self.rank)

    def resolve(self, adapters: Iterable) -> list[int]:
        """Slot (or -1) per entry: names, None/"__base__", live slot ints, current SlotIds."""
        out = []
        for a in adapters:
            if a is None or a == "__base__":
                out.append(-1)
            elif isinstance(a, str):
                s = self.slot_of.get(a)
                if s is None:
                    raise KeyError(f"no adapter {a!r} in this pool ({list(self.slot_of)})")
                out.append(s)
            elif isinstance(a, int) and not isinstance(a, bool):
                if a == -1:
                    out.append(-1)
                    continue
                if not (0 <= a < self.capacity and self.names[a] is not None):
                    raise ValueError(f"adapter id {int(a)} is not a live slot of this pool "
                                     f"(capacity {self.capacity})")
                if isinstance(a, SlotId) and a.generation != self.generations[a]:
                    raise ValueError(f"adapter id {a!r} is stale: its adapter was removed and "
                                     f"slot {int(a)} now holds {self.names[a]!r}")
                out.append(int(a))
            else:
                raise TypeError(f"adapter ids must be names, ints or None, got {a!r}")
        return out


class PoolPlan:
    """Adapter ids resolved and validated once against one snapshot of each pool involved, for
    every layer of one step (model-level plans cover many pools with one id table).

    ids: int32, one per token or one per sequence (expanded per call shape, cached).
    A PoolPlan also serves as the `pool` argument of batched_sparse_delta:
        batched_sparse_delta(x, plan.ids, plan)    # reads the plan's snapshot

    op_inputs(x) gives the batched op's ids and its plan tensors (plan_order, plan_starts,
    plan_adapters: the tokens grouped by adapter, reference.batched_plan's form) for x's token
    count, built once per step on the host from the ids this plan holds and moved to the
    pools' device in one copy, then handed to every layer: the op neither groups nor checks
    the ids per layer. The plan owns these tensors (nothing else can hand them in), which is
    why validation "on" may trust them; an op called with plan tensors made elsewhere trusts
    them too, and only validation "full" checks them against the ids.
    """
    __slots__ = ("_ids", "_host", "_device", "_snaps", "_expanded", "_single", "_inputs")

    def __init__(self, ids: torch.Tensor | None, snapshots: Mapping[int, PoolSnapshot],
                 single: PoolSnapshot | None = None, *, host_ids: torch.Tensor | None = None,
                 device: torch.device | str | None = None):
        """ids: on the pools' device; or host_ids (a CPU int32 tensor) and that device, then
        ids is made on first use and op_inputs costs one host-to-device copy per step."""
        if host_ids is not None:
            host_ids = host_ids.reshape(-1).to(torch.int32)
        self._ids = ids
        self._host = host_ids
        self._device = torch.device(device) if device is not None else (
            ids.device if ids is not None else torch.device("cpu"))
        self._snaps = snapshots
        self._expanded: dict = {}
        self._single = single
        self._inputs: dict = {}

    @property
    def ids(self) -> torch.Tensor | None:
        if self._ids is None and self._host is not None:
            self._ids = self._host.to(self._device)
        return self._ids

    @property
    def is_base(self) -> bool:
        """True for the plan "no adapter anywhere" (ids None): layers compute base(x) only."""
        return self._ids is None and self._host is None

    def snapshot_for(self, pool: "AdapterPool") -> PoolSnapshot:
        try:
            return self._snaps[pool.key]
        except KeyError:
            raise ValueError(f"this plan was not made for {pool!r}") from None

    # the single-pool form, so a plan can stand where a pool is taken
    @property
    def snapshot(self) -> PoolSnapshot:
        if self._single is None:
            raise ValueError("a model-level plan covers many pools: use snapshot_for(pool)")
        return self._single

    @property
    def in_features(self) -> int:
        return self.snapshot.in_features

    def op_args(self) -> tuple:
        return self.snapshot.op_args()

    def _per_token(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """ids expanded to x's tokens (one per token, or one per sequence repeated)."""
        tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if ids.numel() == tokens:
            return ids
        if x.dim() >= 3 and ids.numel() == x.shape[0]:
            return ids.repeat_interleave(tokens // x.shape[0])
        raise ValueError(f"{ids.numel()} adapter ids for x of shape {tuple(x.shape)}: give one "
                         f"per token ({tokens}) or one per sequence")

    def token_ids(self, x: torch.Tensor) -> torch.Tensor:
        """Ids per token of x (x.shape[:-1]): the plan's ids, or one per sequence repeated."""
        tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        ids = self.ids
        if ids.numel() == tokens:
            return ids
        got = self._expanded.get(tokens)
        if got is None:
            got = self._per_token(ids, x)
            self._expanded[tokens] = got
        return got

    def op_inputs(self, x: torch.Tensor, snapshot: PoolSnapshot | None = None) -> tuple:
        """(ids, (plan_order, plan_starts, plan_adapters)) per token of x, on the pools'
        device, cached per token count. `snapshot`: the pool snapshot the op will read; its
        slot count bounds the ids (a check on host numbers, no device read)."""
        tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        got = self._inputs.get(tokens)
        if got is None:
            host = self._host
            if host is None:  # made from device ids: read back once
                host = self._ids.reshape(-1).to("cpu", torch.int32)
            host = self._per_token(host, x)
            order, starts, adapters = reference.batched_plan(host)
            n, g = host.numel(), adapters.numel()
            # one copy to the device for the whole step (ids and plan in one buffer)
            buf = torch.cat([host, order, starts, adapters]).to(self._device)
            span = (int(adapters[0]), int(adapters[-1])) if g else (-1, -1)
            got = (buf[:n], (buf[n:2 * n], buf[2 * n:2 * n + g + 1], buf[2 * n + g + 1:]), span)
            self._inputs[tokens] = got
        ids, plan, (lo, hi) = got
        # the op trusts the plan, so ids a hand-made PoolPlan got wrong are refused here
        if lo < -1 or (snapshot is not None and hi >= snapshot.capacity):
            bad = lo if lo < -1 else hi
            cap = snapshot.capacity if snapshot is not None else "?"
            raise ValueError(f"adapter id {bad} is not a slot of this pool (capacity {cap}; "
                             "-1 for none)")
        return ids, plan


# The plan a serving forward hands to every pool layer below it (lori_kernels.serving).
current_plan: contextvars.ContextVar[PoolPlan | None] = contextvars.ContextVar(
    "lori_current_plan", default=None)


class _Draft:
    """A snapshot being built by a writer (tensors may be new or shared with the current one)."""

    def __init__(self, s: PoolSnapshot):
        self.masks, self.values = s.masks, s.values
        # the small tables are private to every snapshot: copied here, written freely
        self.value_starts, self.offsets = s.value_starts.clone(), s.offsets.clone()
        self.seeds, self.scales = s.seeds.clone(), s.scales.clone()
        self.distributions = s.distributions.clone()
        self.names, self.generations = list(s.names), list(s.generations)
        self.extents, self.dists = list(s.extents), list(s.dists)
        self.slot_of = dict(s.slot_of)
        self.new_masks = False  # masks replaced (not shared with readers)
        self.end = None         # arena high-water mark after this write (None: unchanged)
        self.drop_retired = False  # the new masks table has the retired rows cleared


class AdapterPool:
    """Adapters of one layer shape (in_features -> out_features, rank) for batched serving.

    pool = AdapterPool(4096, 4096, rank=32, dtype=torch.bfloat16)
    pool.add("math", packed_b, seed=..., scale=2.0)       # or pool.add("math", lori_adapter)
    plan = pool.plan(["math", None, ...])                 # one per step, for every layer
    y = lori_kernels.batched_sparse_delta(x, plan.ids, plan)

    Safe to change from other threads while it serves (module docstring).
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
        self.key = next(_POOL_KEYS)  # plans find their snapshot of this pool by it
        dev = torch.device(device)
        cap = max(1, int(capacity))
        w, c = spec.mask_words(rank), spec.num_chunks(out_features)
        self._lock = threading.RLock()
        self._epoch = 0
        self._held: list[tuple[int, weakref.ref]] = []  # (epoch, ref to its offsets)
        self._retired: dict[int, int] = {}  # slot -> epoch of the first snapshot without it
        self._end = 0    # arena high-water mark (values past it were never handed out)
        self._live = 0   # values held by live adapters
        self._publish(PoolSnapshot(
            epoch=0,
            masks=torch.zeros(cap, out_features, w, dtype=torch.int32, device=dev),
            values=torch.zeros(max(0, int(arena)), dtype=dtype, device=dev),
            value_starts=torch.zeros(cap, dtype=torch.int64, device=dev),
            offsets=torch.zeros(cap, c + 1, dtype=torch.int32, device=dev),
            seeds=torch.zeros(cap, dtype=torch.int64, device=dev),
            scales=torch.zeros(cap, dtype=torch.float32, device=dev),
            distributions=torch.ones(cap, dtype=torch.int32, device=dev),
            rank=rank, in_features=in_features, names=(None,) * cap, generations=(0,) * cap,
            extents=((0, 0),) * cap, dists=("rademacher",) * cap,
            slot_of=types.MappingProxyType({}), pool_key=self.key))

    # ---- reading (no lock: one attribute read gives a consistent snapshot) ----
    def snapshot(self) -> PoolSnapshot:
        return self._snap

    def plan(self, adapters: Iterable[str | int | None] | torch.Tensor) -> PoolPlan:
        """Resolve and validate ids once (module docstring, "Ids") against the current
        snapshot; the plan reads that snapshot for as long as it is held."""
        return self._snap.plan(adapters)

    @property
    def capacity(self) -> int:
        return self._snap.capacity

    @property
    def device(self) -> torch.device:
        return self._snap.masks.device

    # the current snapshot's tensors (read-only views of the pool for inspection and training)
    masks = property(lambda self: self._snap.masks)
    values = property(lambda self: self._snap.values)
    value_starts = property(lambda self: self._snap.value_starts)
    offsets = property(lambda self: self._snap.offsets)
    seeds = property(lambda self: self._snap.seeds)
    scales = property(lambda self: self._snap.scales)
    distributions = property(lambda self: self._snap.distributions)

    @property
    def names(self) -> list[str]:
        """Live adapter names, in slot order."""
        return [n for n in self._snap.names if n is not None]

    @property
    def _names(self) -> tuple:
        """Per slot: the adapter's name or None (the current snapshot's slot table)."""
        return self._snap.names

    def __len__(self) -> int:
        return len(self._snap.slot_of)

    def __contains__(self, name: str) -> bool:
        return name in self._snap.slot_of

    def index(self, name: str) -> SlotId:
        """The slot (the id batched_sparse_delta takes) of adapter `name`, as a SlotId."""
        snap = self._snap
        try:
            slot = snap.slot_of[name]
        except KeyError:
            raise KeyError(f"no adapter {name!r} in this pool ({self.names})") from None
        return SlotId(slot, snap.generations[slot])

    def ids(self, adapters: Iterable[str | int | None]) -> torch.Tensor:
        """Per-token ids (int32, on the pool's device) from names, slot ids or None (-1),
        validated against the current snapshot (a plan also keeps that snapshot)."""
        snap = self._snap
        return torch.tensor(snap.resolve(adapters), dtype=torch.int32, device=snap.masks.device)

    def get(self, name: str) -> PoolEntry:
        """Adapter `name` as it is now (B copied out of the pool's buffers)."""
        snap = self._snap
        slot = self.index(name)
        start, nnz = snap.extents[slot]
        packed = PackedB(snap.masks[slot].clone(), snap.values[start:start + nnz].detach().clone(),
                         snap.offsets[slot].clone(), self.rank)
        return PoolEntry(name, int(slot), packed, spec.seed_from_op(int(snap.seeds[slot])),
                         snap.dists[slot], float(snap.scales[slot]))

    def op_args(self) -> tuple:
        """(masks, values, value_starts, offsets, seeds, scales, distributions, rank) of the
        current snapshot: the pool's part of torch.ops.lori.batched_sparse_delta's arguments.
        Holding the tuple holds the snapshot's data (module docstring)."""
        return self._snap.op_args()

    # ---- sizes ----
    def nbytes(self, name: str) -> int:
        """Bytes adapter `name` occupies: mask + values + offsets + per-slot metadata."""
        snap = self._snap
        slot = self.index(name)
        return (snap.masks[slot].numel() * 4 + snap.extents[slot][1] * snap.values.element_size()
                + snap.offsets[slot].numel() * 4 + _META_BYTES)

    @property
    def used_nbytes(self) -> int:
        """Sum of nbytes over live adapters."""
        return sum(self.nbytes(n) for n in self._snap.slot_of)

    @property
    def total_nbytes(self) -> int:
        """Bytes allocated (free slots and arena holes included)."""
        return sum(t.numel() * t.element_size() for t in self._snap.op_args()[:7])

    def free_slots(self) -> set[int]:
        """Slots add() may fill now without growing (free and reclaimed)."""
        with self._lock:
            self._reclaim()
            snap = self._snap
            return {s for s, n in enumerate(snap.names) if n is None and s not in self._retired}

    # ---- writing (serialized; each publishes one new snapshot) ----
    def check_adapter(self, name: str, adapter, *, seed: int | None = None,
                      distribution: str | None = None, scale: float | None = None) -> tuple:
        """Everything add() checks, without adding: returns (packed, seed_op, distribution,
        dist_id, scale, values in the pool's dtype and device). Raises ValueError/TypeError."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty str, got {name!r}")
        if name == "__base__":
            raise ValueError("'__base__' means no adapter (PEFT's spelling) and cannot be a name")
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
        scale = 1.0 if scale is None else scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float, got {type(scale).__name__}")
        scale = float(scale)
        # the op keeps scales in fp32 (the accumulation dtype but for fp64 pools)
        rules.scale(f"AdapterPool.add({name!r})", scale, torch.float32)
        if adapter.rank != self.rank:
            raise ValueError(f"adapter {name!r} has rank {adapter.rank}, the pool {self.rank}: "
                             "all adapters of a pool share one rank")
        if adapter.out_features != self.out_features:
            raise ValueError(f"adapter {name!r} has out_features={adapter.out_features}, the "
                             f"pool {self.out_features}")
        mask, offsets = adapter.mask.detach().cpu(), adapter.offsets.detach().cpu()
        validate_packed(mask, adapter.values.detach().cpu(), offsets, adapter.rank)
        values = adapter.values.detach().to(device=self.device, dtype=self.dtype)
        if values.numel() and not bool(torch.isfinite(values).all()):
            raise ValueError(f"adapter {name!r} has values that are not finite in the pool's "
                             f"dtype {self.dtype}")
        return adapter, seed_op, distribution, dist_id, scale, values

    @torch.no_grad()
    def add(self, name: str, adapter, *, seed: int | None = None,
            distribution: str | None = None, scale: float | None = None,
            slot: int | None = None) -> SlotId:
        """Add adapter `name` and return its SlotId. `adapter` is a PackedB (then seed is
        required; distribution defaults to rademacher, scale to 1.0), or an adapter that hands
        its plain arguments through `pool_args()` (lori_kernels.nn.LoRIAdapter: its seed,
        distribution, alpha/rank and in_features; explicit arguments here override them).
        `slot`: put it in this free slot (one of free_slots(), or a slot past the capacity,
        which grows the table); default the lowest free one. All-or-nothing (module doc)."""
        with self._lock:
            if name in self._snap.slot_of:
                raise ValueError(f"adapter {name!r} is already in this pool (remove it first)")
            packed, seed_op, distribution, dist_id, scale, values = self.check_adapter(
                name, adapter, seed=seed, distribution=distribution, scale=scale)
            if slot is not None and (isinstance(slot, bool) or not isinstance(slot, int)
                                     or slot < 0):
                raise ValueError(f"slot must be a non-negative int, got {slot!r}")
            # nothing has been touched so far; from here only new or unread memory is written
            # until the new snapshot is published
            self._reclaim()
            d = _Draft(self._snap)
            if slot is None:
                slot = next((s for s, n in enumerate(d.names)
                             if n is None and s not in self._retired), len(d.names))
            elif slot < len(d.names) and (d.names[slot] is not None or slot in self._retired):
                raise ValueError(f"slot {slot} is not free (free: {sorted(self.free_slots())})")
            if slot >= len(d.names):
                self._grow(d, slot + 1)
            nnz = values.numel()
            start = self._reserve(d, nnz)
            mask_row = packed.mask.detach().to(self.device)
            try:
                d.values[start:start + nnz] = values
                d.masks[slot] = mask_row
                d.offsets[slot] = packed.offsets.detach().to(self.device)
                d.value_starts[slot] = start
                d.seeds[slot] = seed_op
                d.scales[slot] = scale
                d.distributions[slot] = dist_id
            except BaseException:
                if not d.new_masks:  # a shared row: back to the empty adapter it was
                    d.masks[slot] = 0
                raise
            d.names[slot], d.slot_of[name] = name, slot
            d.generations[slot] += 1
            d.extents[slot], d.dists[slot] = (start, nnz), distribution
            d.end = start + nnz
            self._commit(d)
            self._live += nnz
            return SlotId(slot, d.generations[slot])

    @torch.no_grad()
    def remove(self, name: str) -> None:
        """Remove adapter `name`: plans made from now refuse it; plans held keep reading it
        until released; its slot is reclaimed after that (module docstring)."""
        with self._lock:
            snap = self._snap
            if name not in snap.slot_of:
                raise KeyError(f"no adapter {name!r} in this pool ({self.names})")
            slot = snap.slot_of[name]
            d = _Draft(snap)
            del snap  # a local reference would hold the old snapshot through _reclaim below
            nnz = d.extents[slot][1]
            d.offsets[slot] = 0
            d.value_starts[slot] = 0
            d.seeds[slot] = 0
            d.scales[slot] = 0.0
            d.distributions[slot] = 1
            d.names[slot] = None
            del d.slot_of[name]
            d.extents[slot] = (0, 0)
            epoch = self._commit(d)
            self._retired[slot] = epoch
            self._live -= nnz
            self._reclaim()

    @torch.no_grad()
    def compact(self, arena: int | None = None) -> None:
        """Move live extents together (slot order) into a new arena of `arena` values (default:
        the current size), published with a new snapshot. Ids do not change."""
        with self._lock:
            d = _Draft(self._snap)
            self._compact(d, d.values.numel() if arena is None else int(arena))
            self._commit(d)

    def ensure_capacity(self, slots: int) -> None:
        """Grow the slot table to at least `slots` slots (new free slots read as empty)."""
        with self._lock:
            if slots > self.capacity:
                d = _Draft(self._snap)
                self._grow(d, slots)
                self._commit(d)

    def reclaim(self) -> list[int]:
        """Clear the retired slots no held snapshot can read any more; returns those slots.
        (add() and remove() do this themselves; for callers that want memory back early.)"""
        with self._lock:
            return self._reclaim()

    def to(self, device: torch.device | str) -> "AdapterPool":
        """Move every buffer to `device` (a new snapshot; returns self)."""
        with self._lock:
            d = _Draft(self._snap)
            for attr in ("masks", "offsets", "value_starts", "seeds", "scales", "distributions"):
                setattr(d, attr, getattr(d, attr).to(device))
            d.values = d.values.detach().to(device).requires_grad_(d.values.requires_grad)
            self._commit(d)
        return self

    # ---- internals (called with the lock held) ----
    def _publish(self, snap: PoolSnapshot) -> None:
        self._snap = snap
        if len(self._held) > 64:
            self._held = [(e, r) for e, r in self._held if r() is not None]
        self._held.append((snap.epoch, weakref.ref(snap.offsets)))

    def _commit(self, d: _Draft) -> int:
        # bookkeeping changes only with the snapshot that makes them true
        if d.end is not None:
            self._end = d.end
        if d.drop_retired:
            self._retired.clear()
        self._epoch += 1
        self._publish(PoolSnapshot(
            epoch=self._epoch, masks=d.masks, values=d.values, value_starts=d.value_starts,
            offsets=d.offsets, seeds=d.seeds, scales=d.scales, distributions=d.distributions,
            rank=self.rank, in_features=self.in_features, names=tuple(d.names),
            generations=tuple(d.generations), extents=tuple(d.extents), dists=tuple(d.dists),
            slot_of=types.MappingProxyType(d.slot_of), pool_key=self.key))
        return self._epoch

    def _oldest_held(self) -> int:
        self._held = [(e, r) for e, r in self._held if r() is not None]
        return min(e for e, _ in self._held)  # the current snapshot is always held

    def _reclaim(self) -> list[int]:
        if not self._retired:
            return []
        oldest = self._oldest_held()
        done = [s for s, e in self._retired.items() if e <= oldest]
        masks = self._snap.masks
        for s in done:
            # no held snapshot has this slot live: its (shared) mask row is read by no plan
            masks[s] = 0
            del self._retired[s]
        return done

    def _grow(self, d: _Draft, need: int) -> None:
        """New slot tables of at least `need` slots (doubling), not shared with readers."""
        old = len(d.names)
        cap = max(need, 2 * old)

        def grow(t, fill):
            return torch.cat([t, torch.full((cap - old, *t.shape[1:]), fill, dtype=t.dtype,
                                            device=t.device)])
        d.masks = grow(d.masks, 0)
        # retired rows: the new table is read only by snapshots where they are free
        for s in self._retired:
            d.masks[s] = 0
        d.drop_retired = True
        d.new_masks = True
        d.offsets, d.value_starts = grow(d.offsets, 0), grow(d.value_starts, 0)
        d.seeds, d.scales = grow(d.seeds, 0), grow(d.scales, 0)
        d.distributions = grow(d.distributions, 1)
        d.names += [None] * (cap - old)
        d.generations += [0] * (cap - old)
        d.extents += [(0, 0)] * (cap - old)
        d.dists += ["rademacher"] * (cap - old)

    def _reserve(self, d: _Draft, nnz: int) -> int:
        """Start of nnz values no snapshot reads: past the high-water mark, else in a new,
        compacted (and grown if still short) arena."""
        cap = d.values.numel()
        if self._end + nnz <= cap:
            return self._end
        need = self._live + nnz
        self._compact(d, cap if need <= cap * 3 // 4 else max(2 * cap, need + need // 2))
        return d.end

    def _compact(self, d: _Draft, cap: int) -> None:
        if cap < self._live:
            raise ValueError(f"arena of {cap} values cannot hold {self._live} live values")
        old = d.values
        new = torch.zeros(cap, dtype=self.dtype, device=old.device)
        pos = 0
        for slot, (start, nnz) in enumerate(d.extents):
            if d.names[slot] is None:
                continue
            new[pos:pos + nnz] = old[start:start + nnz]
            d.extents[slot] = (pos, nnz)
            d.value_starts[slot] = pos
            pos += nnz
        d.values = new.requires_grad_(old.requires_grad)
        d.end = pos

    def __repr__(self) -> str:
        snap = self._snap
        return (f"AdapterPool(in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"dtype={self.dtype}, adapters={len(snap.slot_of)}/{snap.capacity}, "
                f"values={self._live}/{snap.values.numel()}, device={snap.masks.device})")

