"""LoRI with the Hugging Face transformers Trainer.

LoRITrainer is a Trainer for a LoRIModel (get_lori_model) that runs both LoRI phases inside one
`train()`: LoRI-D for `dense_steps` optimizer steps (or `dense_fraction` of them), then the
mask from |B| (LoRIModel.calibrate: sparsity, scope and init from the adapter's LoRIConfig),
then LoRI-S on that mask for the remaining steps. The switch replaces B's values Parameters,
so the optimizer and LR scheduler are built again over the new ones; each phase has its own
schedule (args.lr_scheduler_type and warmup over that phase's steps), as the two runs of the
LoRI recipe, and LoRI-S may have its own peak learning rate (sparse_learning_rate): it restarts
from B = 0 with a tenth of the entries, so the LoRI-D rate can leave it far from converged.

Mixed precision is Trainer's (bf16 / fp16). With fp16 the GradScaler is accelerate's, one per
run: the switch keeps it (its scale carries over into LoRI-S) and hands it to the LoRI-S
optimizer; an overflow step is skipped in either phase, packed values and AdamW state untouched.
On the CPU accelerate turns fp16=True into plain fp32 (no autocast, no scaler): LoRITrainer
warns rather than let that pass for fp16 training.

A TrainerCallback alone cannot do this: the training loop holds `trainer.optimizer` and
`trainer.lr_scheduler`, which a callback may read but not replace.

Checkpoints (checkpoint-<step>/) and save_model() hold the adapter only, as
LoRIModel.save_pretrained writes it (adapter_config.json + adapter_model.safetensors [+
modules_to_save.safetensors]), plus lori_trainer.json (phase and switch step) and, in
checkpoints, Trainer's optimizer / scheduler / RNG state for the current phase. Resuming
(`train(resume_from_checkpoint=...)`) into a freshly built get_lori_model puts the adapter,
in whichever phase it was saved, back into the model before the optimizer is built, so the
loss curve continues exactly as an uninterrupted run's.
"""
from __future__ import annotations

import json
import math
import os
import warnings

import torch
from transformers import Trainer

from ..model import LoRIModel

TRAINER_STATE_NAME = "lori_trainer.json"
_RESUME_NAME = "lori_resume_tmp"


def adapter_phase(model: LoRIModel, adapter_name: str) -> str:
    """"dense" (LoRI-D) or "sparse" (LoRI-S): the phase every layer of the adapter is in."""
    from ..workflow.inject import lori_layers

    phases = {layer.adapters[adapter_name].phase
              for layer in lori_layers(model.base_model).values()
              if adapter_name in layer.adapters}
    if len(phases) != 1:
        raise ValueError(f"adapter {adapter_name!r}: its layers are in phases {sorted(phases)} "
                         "(expected one)")
    return phases.pop()


def _holds_retired(optimizer) -> bool:
    from ..nn.linear import is_retired

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    return any(is_retired(p) for g in inner.param_groups for p in g["params"])


class LoRITrainer(Trainer):
    """transformers.Trainer for a LoRIModel, both LoRI phases in one train().

    dense_steps: optimizer steps of LoRI-D before the switch to LoRI-S (an int >= 1, fewer
      than the run's max_steps), or dense_fraction: that share of max_steps (0 < f < 1).
      Neither: no switch, the adapter trains in the phase it is in (e.g. LoRI-S on masks set
      with LoRIModel.to_sparse), still with adapter-only checkpoints.
    adapter_name: the adapter to train (default: the model's only active one).
    sparse_learning_rate: peak learning rate of LoRI-S (default: args.learning_rate, as LoRI-D),
      whether LoRI-S follows a switch or is the phase the adapter is in.
    Every other argument is Trainer's; `optimizers=(optimizer, scheduler)` is refused when a
    switch is planned (they could not be rebuilt over the LoRI-S Parameters): use
    `optimizer_cls_and_kwargs` or TrainingArguments.optim instead.
    """

    def __init__(self, model=None, args=None, *pos, dense_steps: int | None = None,
                 dense_fraction: float | None = None, adapter_name: str | None = None,
                 sparse_learning_rate: float | None = None, **kwargs):
        if not isinstance(model, LoRIModel):
            raise ValueError(f"LoRITrainer: model must be a LoRIModel (get_lori_model), got "
                             f"{type(model).__name__}")
        if dense_steps is not None and dense_fraction is not None:
            raise ValueError("LoRITrainer: give dense_steps or dense_fraction, not both")
        if dense_steps is not None and (isinstance(dense_steps, bool) or
                                        not isinstance(dense_steps, int) or dense_steps < 1):
            raise ValueError(f"LoRITrainer: dense_steps must be an int >= 1, got "
                             f"{dense_steps!r}")
        if dense_fraction is not None and (isinstance(dense_fraction, bool) or
                                           not isinstance(dense_fraction, (int, float)) or
                                           not 0.0 < dense_fraction < 1.0):
            raise ValueError(f"LoRITrainer: dense_fraction must be in (0, 1), got "
                             f"{dense_fraction!r}")
        if sparse_learning_rate is not None and (
                isinstance(sparse_learning_rate, bool) or
                not isinstance(sparse_learning_rate, (int, float)) or
                not math.isfinite(sparse_learning_rate) or sparse_learning_rate <= 0):
            raise ValueError(f"LoRITrainer: sparse_learning_rate must be a finite float > 0, got "
                             f"{sparse_learning_rate!r}")
        self.sparse_learning_rate = sparse_learning_rate
        name = adapter_name or model._phase_adapter(None)
        if name not in model.peft_config:
            raise ValueError(f"LoRITrainer: no adapter {name!r} (adapters: "
                             f"{list(model.peft_config)})")
        self.lori_adapter = name
        self.dense_steps, self.dense_fraction = dense_steps, dense_fraction
        self._switch_planned = dense_steps is not None or dense_fraction is not None
        opts = kwargs.get("optimizers", (None, None))
        if self._switch_planned and opts is not None and any(o is not None for o in opts):
            raise ValueError("LoRITrainer: optimizers=(optimizer, scheduler) cannot be rebuilt "
                             "over the LoRI-S Parameters at the switch; pass "
                             "optimizer_cls_and_kwargs or set TrainingArguments.optim")
        if self._switch_planned and adapter_phase(model, name) != "dense":
            raise ValueError(f"LoRITrainer: adapter {name!r} is already LoRI-S; a switch "
                             "(dense_steps / dense_fraction) needs a LoRI-D adapter")
        super().__init__(model, args, *pos, **kwargs)
        if self.args.fp16 and getattr(self.accelerator, "scaler", None) is None and \
                not getattr(self.accelerator, "native_amp", False):
            warnings.warn("LoRITrainer: fp16=True, but accelerate runs neither autocast nor a "
                          f"GradScaler on {self.accelerator.device.type!r}: this run trains in "
                          "fp32 (bf16=True is the mixed precision accelerate runs on the CPU)",
                          stacklevel=2)
        self.switch_step: int | None = None
        self._checkpoint_switch_step: int | None = None

    # ---- the phases ----
    @property
    def lori_phase(self) -> str:
        return adapter_phase(self.model, self.lori_adapter)

    def _resolve_switch_step(self, max_steps: int) -> int | None:
        if not self._switch_planned:
            return None
        step = self.dense_steps if self.dense_steps is not None else \
            round(self.dense_fraction * max_steps)
        if not 1 <= step < max_steps:
            raise ValueError(f"LoRITrainer: the switch to LoRI-S would come at step {step} of "
                             f"{max_steps} (dense_steps={self.dense_steps}, dense_fraction="
                             f"{self.dense_fraction}); LoRI-S would never train")
        if self._checkpoint_switch_step is not None and self._checkpoint_switch_step != step:
            raise ValueError(f"LoRITrainer: the checkpoint switched to LoRI-S at step "
                             f"{self._checkpoint_switch_step}, this run would at step {step}")
        return step

    def create_optimizer(self, model=None):
        fresh = self.optimizer is None
        opt = super().create_optimizer(model)
        if fresh and self.sparse_learning_rate is not None and self.lori_phase == "sparse":
            # before the scheduler is built: it takes each group's lr as its peak
            for g in getattr(opt, "optimizer", opt).param_groups:
                g["lr"] = self.sparse_learning_rate
        return opt

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # Trainer asks for the whole run's schedule; each LoRI phase gets its own.
        if self.lr_scheduler is None:
            self.switch_step = self._resolve_switch_step(num_training_steps)
            if self.switch_step is not None:
                num_training_steps = self.switch_step if self.lori_phase == "dense" else \
                    num_training_steps - self.switch_step
        return super().create_scheduler(num_training_steps, optimizer)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None,
              **kwargs):
        if self.optimizer is not None and _holds_retired(self.optimizer):
            raise RuntimeError(
                "LoRITrainer.train: the trainer's optimizer holds LoRI values Parameters that "
                "were replaced (a calibrate / to_sparse / adapter load after the last train()); "
                "it would train nothing. Set trainer.optimizer = trainer.lr_scheduler = None "
                "to start the new phase with fresh ones, or build a new LoRITrainer")
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The switch happens before the first micro-batch of step `switch_step` (0-based), so
        # that a checkpoint saved at that step is still LoRI-D and resumes through the switch.
        if self.switch_step is not None and self.state.global_step >= self.switch_step and \
                self.lori_phase == "dense":
            self._switch_to_sparse()
        return super().training_step(model, inputs, num_items_in_batch)

    def _switch_to_sparse(self) -> None:
        if self.state.global_step != self.switch_step:
            raise RuntimeError(f"LoRITrainer: LoRI-D still at step {self.state.global_step}, "
                               f"the switch was due at step {self.switch_step}")
        self.model.calibrate(adapter_name=self.lori_adapter)
        self._rebuild_optimizer_and_scheduler()

    def _rebuild_optimizer_and_scheduler(self) -> None:
        old = self.optimizer
        self.optimizer = None
        self.lr_scheduler = None
        self.create_optimizer()
        # accelerate keeps every prepared optimizer (gradient unscaling and clipping walk
        # them): drop the spent one so only the LoRI-S optimizer is stepped.
        prepared = getattr(self.accelerator, "_optimizers", None)
        if prepared is not None and old is not None:
            prepared[:] = [o for o in prepared if o is not old]
        self.optimizer = self.accelerator.prepare(self.optimizer)
        self.create_scheduler(num_training_steps=self.state.max_steps, optimizer=self.optimizer)
        self.callback_handler.optimizer = self.optimizer
        self.callback_handler.lr_scheduler = self.lr_scheduler

    # ---- adapter-only checkpoints ----
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.model.save_pretrained(output_dir, selected_adapters=[self.lori_adapter])
        with open(os.path.join(output_dir, TRAINER_STATE_NAME), "w") as f:
            json.dump({"adapter_name": self.lori_adapter, "phase": self.lori_phase,
                       "switch_step": self.switch_step}, f, indent=2)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.load_lori_checkpoint(resume_from_checkpoint)
        # optimizer and scheduler are built for the checkpoint's phase, then Trainer loads
        # their states from it
        self.optimizer = None
        self.lr_scheduler = None

    def _load_best_model(self) -> None:
        if self.state.best_model_checkpoint is not None:
            self.load_lori_checkpoint(self.state.best_model_checkpoint)

    def load_lori_checkpoint(self, directory: str | os.PathLike) -> None:
        """Put the adapter saved in `directory` (a checkpoint or save_model folder) into the
        trained adapter, in the phase it was saved in. All or nothing: the files are checked
        against the model before it changes."""
        d = os.fspath(directory)
        if self.lori_adapter != "default":
            d = os.path.join(d, self.lori_adapter)
        state_path = os.path.join(os.fspath(directory), TRAINER_STATE_NAME)
        saved = None
        if os.path.isfile(state_path):
            with open(state_path) as f:
                saved = json.load(f)
            self._checkpoint_switch_step = saved.get("switch_step")
            if saved.get("adapter_name") != self.lori_adapter:
                raise ValueError(f"{state_path}: adapter {saved.get('adapter_name')!r}, the "
                                 f"trainer trains {self.lori_adapter!r}")
        lori = self.model
        lori.load_adapter(d, _RESUME_NAME, is_trainable=False)
        try:
            tmp = lori.get_adapter_state_dict(_RESUME_NAME)
            state = {k.replace(f".adapters.{_RESUME_NAME}.", f".adapters.{self.lori_adapter}.")
                     .replace(f".modules_to_save.{_RESUME_NAME}.",
                              f".modules_to_save.{self.lori_adapter}."): v.clone()
                     for k, v in tmp.items()}
        finally:
            lori.delete_adapter(_RESUME_NAME)
        lori.set_adapter_state_dict(state, self.lori_adapter)
        if saved is not None and saved.get("phase") != self.lori_phase:
            raise ValueError(f"{state_path}: phase {saved.get('phase')!r}, the loaded adapter "
                             f"is {self.lori_phase!r}")
