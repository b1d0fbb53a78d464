"""The LoRI workflow on whole models: inject -> LoRI-D -> calibrate_masks -> LoRI-S -> save/load
-> merge/unmerge, combining adapters, continual learning, PEFT interop (docs/workflow.md)."""
from .calibrate import calibrate_masks, to_sparse
from .inject import (adapter_stats, add_adapters, add_task_adapter, freeze_adapter, inject,
                     lori_layers, set_active, target_layer_names, unwrap)
from .io import FORMAT_VERSION, load_adapter, read_adapter, save_adapter
from .merge import combine_adapters, merge, merge_and_unload, unmerge
from .peft_interop import export_peft, import_peft, load_official_masks

__all__ = [
    "FORMAT_VERSION", "adapter_stats", "add_adapters", "add_task_adapter", "calibrate_masks",
    "combine_adapters", "export_peft", "freeze_adapter", "import_peft", "inject", "load_adapter",
    "load_official_masks", "lori_layers", "merge", "merge_and_unload", "read_adapter",
    "save_adapter", "set_active", "target_layer_names", "to_sparse", "unmerge", "unwrap",
]
