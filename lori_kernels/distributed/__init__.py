"""LoRI under torch.distributed (docs/distributed.md).

A is never communicated: every rank regenerates it (or its column window) from the seed, so
what must agree across ranks is the recipe. `verify` checks that it does (the same error on
every rank, never a hang); `rebuild_ddp` / `switch_phase` re-wrap DDP after the LoRI-D ->
LoRI-S switch, and a stale DDP wrapper raises at its next forward instead of silently not
all-reducing the new values. `global_threshold` is calibrate's exact top-k threshold over
values sharded across ranks (FSDP2), without gathering them; calibrate_masks, save_adapter,
save_pretrained and merge use it (and the rest of fsdp.py) on FSDP2-sharded models; the phase
switch on a sharded model raises ShardedSwitchError; `match_checkpoint` gives a fresh model a
DCP checkpoint's B structure before fully_shard. `rowwise_delta` is the row-parallel
(input-column shard) delta.
"""
from .ddp import (StaleDDPError, check_ddp, install_stale_ddp_check, lori_ddp, rebuild_ddp,
                  switch_phase)
from .fsdp import ShardedSwitchError, global_threshold, match_checkpoint
from .tp import LoRIColwiseParallel, LoRIRowwiseParallel, rowwise_delta
from .verify import VerifyError, fingerprint, verify
from ..workflow.inject import canonical_name

__all__ = ["LoRIColwiseParallel", "LoRIRowwiseParallel", "StaleDDPError", "VerifyError",
           "ShardedSwitchError", "canonical_name", "check_ddp", "fingerprint",
           "global_threshold", "install_stale_ddp_check", "lori_ddp", "match_checkpoint",
           "rebuild_ddp", "rowwise_delta", "switch_phase", "verify"]
