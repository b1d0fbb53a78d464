"""lori_kernels: LoRI adapters with A regenerated from a seed and B stored as a bitmask.

Layers, each importing only those above it in this list (docs/architecture.md):
  spec, packing         the formats of A (docs/spec_a.md) and B (docs/spec_b.md)
  rules, _library       argument rules written once; lori_kernels._C loaded, every fake kernel
  validation, triton    the validation switch; the Triton backend (registered on first use)
  backends              the one router (argument, then set_backend / LORI_BACKEND, then device)
  ops                   typed wrappers, the only Python caller of torch.ops.lori.*
  pool                  AdapterPool: many adapters of one layer shape, as plain tensors
  nn                    LoRILinear, LoRIPoolLinear
  workflow              inject, calibrate, save/load, merge, PEFT interop
  config                LoRIConfig (the adapter recipe, JSON round trip)
  model                 get_lori_model / LoRIModel (PEFT's habits: save_pretrained, ...)
  serving               ServingModel: many adapters in one model, per-sequence adapter_names
"""
from . import spec
from .backends import get_backend, set_backend, set_validation, use_backend
from .config import LoRIConfig
from .model import LoRIModel, PhaseSwitch, get_lori_model
from .nn import LoRIAdapter, LoRILinear, LoRIPoolLinear
from .ops import batched_sparse_delta, expand, merge_delta_, random_a, shrink, sparse_delta
from .packing import PackedB, pack_bitmask, unpack_bitmask
from .pool import AdapterPool, PoolPlan, PoolSnapshot, SlotId
from .serving import ServingModel
from .spec import DEFAULT_DISTRIBUTION, DISTRIBUTIONS, layer_seed
from .workflow import (calibrate_masks, combine_adapters, export_peft, import_peft, inject,
                       load_adapter, load_official_masks, merge, merge_and_unload, save_adapter,
                       to_sparse, unmerge)

__version__ = "0.1.0"

__all__ = [
    "AdapterPool", "DEFAULT_DISTRIBUTION", "DISTRIBUTIONS", "LoRIAdapter", "LoRIConfig",
    "LoRILinear", "LoRIModel", "LoRIPoolLinear", "PackedB", "PhaseSwitch", "PoolPlan",
    "PoolSnapshot", "ServingModel", "SlotId", "batched_sparse_delta", "calibrate_masks",
    "combine_adapters", "expand", "export_peft", "get_backend", "get_lori_model", "import_peft", "inject",
    "layer_seed", "load_adapter", "load_official_masks", "merge", "merge_and_unload",
    "merge_delta_", "pack_bitmask", "random_a", "save_adapter", "set_backend", "set_validation",
    "shrink", "sparse_delta", "spec", "to_sparse", "unmerge", "unpack_bitmask", "use_backend",
]
