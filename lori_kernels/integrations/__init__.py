"""Integrations with training frameworks. Each submodule imports its framework lazily (on
import of the submodule), so `import lori_kernels` never needs them:
  transformers   LoRITrainer: LoRI-D -> calibrate -> LoRI-S in one Trainer.train(),
                 adapter-only checkpoints, bit-exact resume in either phase
"""
