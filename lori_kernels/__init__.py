"""lori_kernels: LoRI adapters with A regenerated from a seed and B stored as a bitmask.

Ops are registered under torch.ops.lori (see README's op table); this package adds typed
wrappers, the B packing helpers and the specs' constants.
"""
from . import spec
from .ops import merge_delta_, random_a, sparse_delta
from .packing import PackedB, pack_bitmask, unpack_bitmask
from .spec import DEFAULT_DISTRIBUTION, DISTRIBUTIONS, layer_seed

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_DISTRIBUTION", "DISTRIBUTIONS", "PackedB", "layer_seed", "merge_delta_", "pack_bitmask",
    "random_a", "sparse_delta", "spec", "unpack_bitmask",
]

# Module layer and the LoRI workflow (docs/workflow.md).
from .modules import LoRILinear  # noqa: E402
from .workflow import (calibrate_masks, combine_adapters, export_peft, import_peft,  # noqa: E402
                       inject, load_adapter, merge, save_adapter, to_sparse, unmerge)

__all__ += ["LoRILinear", "calibrate_masks", "combine_adapters", "export_peft", "import_peft",
            "inject", "load_adapter", "merge", "save_adapter", "to_sparse", "unmerge"]

# Batched multi-adapter serving (issue 4): a pool of adapters, one adapter per token.
from .modules import LoRIPoolLinear  # noqa: E402
from .ops import batched_sparse_delta  # noqa: E402
from .pool import AdapterPool  # noqa: E402

__all__ += ["AdapterPool", "LoRIPoolLinear", "batched_sparse_delta"]
