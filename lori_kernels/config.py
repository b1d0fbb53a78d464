"""LoRIConfig: what get_lori_model needs to put a LoRI adapter into a model, as a dataclass that
round-trips through JSON (adapter_config.json). Field names follow PEFT's LoraConfig wherever
LoRI has the same concept (r, lora_alpha, target_modules, modules_to_save,
layers_to_transform, layers_pattern, rank_pattern, alpha_pattern); the LoRI-specific fields are
A's recipe (seed, distribution) and the mask calibration (sparsity, mask_scope, sparse_init).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from . import spec
from .workflow.calibrate import INITS, SCOPES

CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "LORI"


def _fail(field_name: str, msg: str):
    raise ValueError(f"LoRIConfig.{field_name}: {msg}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _str_list(name: str, value, allow_str: bool) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_str:
            _fail(name, f"must be a list of names, got the str {value!r}")
        if not value:
            _fail(name, "must not be empty")
        return value
    if not isinstance(value, (list, tuple, set)) or not value or \
            not all(isinstance(v, str) and v for v in value):
        _fail(name, f"must be {'a regex str or ' if allow_str else ''}a non-empty list of "
                    f"non-empty names, got {value!r}")
    return sorted(value) if isinstance(value, set) else list(value)


@dataclass
class LoRIConfig:
    """The recipe of one LoRI adapter.

    r, lora_alpha: rank and alpha of every adapted layer (scale alpha / r, as PEFT; LoRI's
      papers use r=32, alpha=64). rank_pattern / alpha_pattern: {regex: value} per layer, as
      PEFT (a key matches a layer name that equals it or ends with "." + a match of it).
    target_modules: module names (a list: a layer whose name equals an entry or ends with
      "." + entry) or one regex matching the whole name, as PEFT; "all-linear": every
      nn.Linear / Conv1D except the output layer.
    layers_to_transform / layers_pattern: only these block indices (PEFT's rule).
    modules_to_save: modules (e.g. a classifier head) trained in full and saved with the
      adapter, one copy per adapter (PEFT's ModulesToSaveWrapper).
    seed, distribution: A's recipe; layer `name` gets spec.layer_seed(seed, name).
    sparsity, mask_scope, sparse_init: the LoRI-D -> LoRI-S switch (LoRIModel.calibrate).
    base_model_name_or_path, revision: the base the adapter belongs to (filled in by
      get_lori_model from the model's config when left None; checked by from_pretrained).
    """
    r: int = 32
    lora_alpha: float = 64.0
    target_modules: list[str] | str | None = None
    seed: int = 0
    distribution: str = spec.DEFAULT_DISTRIBUTION
    sparsity: float = 0.9
    mask_scope: str = "global"
    sparse_init: str = "zero"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    task_type: str | None = None
    peft_type: str = PEFT_TYPE

    def __post_init__(self):
        if not _is_int(self.r) or not 1 <= self.r <= spec.MAX_RANK:
            _fail("r", f"must be an int in [1, {spec.MAX_RANK}], got {self.r!r}")
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            _fail("lora_alpha", f"must be a finite number > 0, got {self.lora_alpha!r}")
        self.lora_alpha = float(self.lora_alpha)
        if self.target_modules is None:
            _fail("target_modules", "is required (e.g. ['q_proj', 'v_proj'] or a regex)")
        self.target_modules = _str_list("target_modules", self.target_modules, True)
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as e:
                _fail("target_modules", f"is not a valid regex ({e})")
        if not _is_int(self.seed) or not 0 <= self.seed < 1 << 64:
            _fail("seed", f"must be an int in [0, 2**64), got {self.seed!r}")
        if self.distribution not in spec.DISTRIBUTIONS:
            _fail("distribution", f"must be one of {sorted(spec.DISTRIBUTIONS)}, got "
                                  f"{self.distribution!r}")
        if not _is_number(self.sparsity) or not 0.0 <= self.sparsity < 1.0:
            _fail("sparsity", f"must be a number in [0, 1), got {self.sparsity!r}")
        if self.mask_scope not in SCOPES:
            _fail("mask_scope", f"must be one of {SCOPES}, got {self.mask_scope!r}")
        if self.sparse_init not in INITS:
            _fail("sparse_init", f"must be one of {INITS}, got {self.sparse_init!r}")
        self.modules_to_save = _str_list("modules_to_save", self.modules_to_save, False)
        ltt = self.layers_to_transform
        if ltt is not None:
            ltt = [ltt] if _is_int(ltt) else ltt
            if not isinstance(ltt, (list, tuple)) or not ltt or \
                    not all(_is_int(i) and i >= 0 for i in ltt):
                _fail("layers_to_transform", f"must be an int >= 0 or a non-empty list of "
                                             f"them, got {self.layers_to_transform!r}")
            self.layers_to_transform = list(ltt)
        self.layers_pattern = _str_list("layers_pattern", self.layers_pattern, True)
        if self.layers_pattern is not None and self.layers_to_transform is None:
            _fail("layers_pattern", "only applies with layers_to_transform")
        for name, pat, check, what in (
                ("rank_pattern", self.rank_pattern,
                 lambda v: _is_int(v) and 1 <= v <= spec.MAX_RANK,
                 f"an int in [1, {spec.MAX_RANK}]"),
                ("alpha_pattern", self.alpha_pattern, lambda v: _is_number(v) and v > 0,
                 "a finite number > 0")):
            if not isinstance(pat, dict):
                _fail(name, f"must be a dict {{regex: value}}, got {type(pat).__name__}")
            for k, v in pat.items():
                if not isinstance(k, str) or not k:
                    _fail(name, f"keys must be non-empty regex strs, got {k!r}")
                try:
                    re.compile(k)
                except re.error as e:
                    _fail(name, f"key {k!r} is not a valid regex ({e})")
                if not check(v):
                    _fail(name, f"{k!r}: value must be {what}, got {v!r}")
        for name in ("base_model_name_or_path", "revision", "task_type"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                _fail(name, f"must be a str or None, got {v!r}")
        if not isinstance(self.inference_mode, bool):
            _fail("inference_mode", f"must be a bool, got {self.inference_mode!r}")
        if self.peft_type != PEFT_TYPE:
            _fail("peft_type", f"must be {PEFT_TYPE!r}, got {self.peft_type!r}")

    # ---- per layer ----
    def rank_for(self, name: str) -> int:
        return _pattern_value(name, self.rank_pattern, self.r)

    def alpha_for(self, name: str) -> float:
        return float(_pattern_value(name, self.alpha_pattern, self.lora_alpha))

    def transforms_layer_index(self, name: str) -> bool:
        """PEFT's layers_to_transform rule: the block index after a layers_pattern (any
        '<name>.<index>.' part when no pattern is given) must be listed."""
        if self.layers_to_transform is None:
            return True
        patterns = self.layers_pattern
        if patterns is None:
            m = re.match(r".*\.[^.]*\.(\d+)\.", name)
        else:
            patterns = [patterns] if isinstance(patterns, str) else patterns
            m = None
            for p in patterns:
                m = re.match(rf".*\.{p}\.(\d+)\.", name) or re.match(rf"^{p}\.(\d+)\.", name)
                if m:
                    break
        return m is not None and int(m.group(1)) in self.layers_to_transform

    # ---- JSON ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoRIConfig":
        if not isinstance(d, dict):
            raise ValueError(f"LoRIConfig.from_dict: expected a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LoRIConfig: unknown fields {unknown} (a config of another "
                             "tool or version?)")
        return cls(**d)

    def save_pretrained(self, save_directory: str | os.PathLike,
                        extra: dict[str, Any] | None = None) -> str:
        """Write adapter_config.json (plus `extra` keys, e.g. the model layer's record of the
        base) into `save_directory`; returns its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        d = self.to_dict()
        if extra:
            d.update(extra)
        with open(path, "w") as f:
            json.dump(d, f, indent=2, sort_keys=True)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "LoRIConfig":
        return cls.from_dict(read_config_json(directory)[0])


def read_config_json(directory: str | os.PathLike) -> tuple[dict, dict]:
    """(LoRIConfig fields, the rest) of `directory`/adapter_config.json, plain JSON only."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (not a LoRI adapter directory)")
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if d.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"{path}: peft_type is {d.get('peft_type')!r}, not {PEFT_TYPE!r} "
                         "(a PEFT LoRA adapter? use lori_kernels.import_peft)")
    known = {f.name for f in dataclasses.fields(LoRIConfig)}
    return {k: v for k, v in d.items() if k in known or not k.startswith("lori_")}, \
        {k: v for k, v in d.items() if k not in known and k.startswith("lori_")}


def _pattern_value(name: str, patterns: dict, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first key equal to the name, or matching
    its end after a '.' (regex)."""
    for key, val in patterns.items():
        if name == key or re.match(rf"(.*\.)?(?:{key})$", name):
            return val
    return default
