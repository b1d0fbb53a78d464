"""The module layer: LoRILinear (one or more adapters per layer) and LoRIPoolLinear (a pool of
adapters, one per token). Both call lori_kernels.ops, which routes every call."""
from .linear import DEFAULT_ADAPTER, PHASES, LoRIAdapter, LoRILinear, Term, lori_delta, lori_linear
from .pool_linear import LoRIPoolLinear, use_plan

__all__ = ["DEFAULT_ADAPTER", "LoRIAdapter", "LoRILinear", "LoRIPoolLinear", "PHASES", "Term",
           "lori_delta", "lori_linear", "use_plan"]
