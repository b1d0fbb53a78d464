"""LoRIConfig: JSON round trip, every field validated with its name in the error, PEFT's
per-layer pattern rules."""
import json

import pytest

from lori_kernels import LoRIConfig


def test_json_round_trip(tmp_path):
    cfg = LoRIConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], seed=2**64 - 1,
                     distribution="uniform", sparsity=0.8, mask_scope="layer",
                     sparse_init="keep", modules_to_save=["classifier"],
                     layers_to_transform=[0, 2], layers_pattern="layers",
                     rank_pattern={"v_proj": 8}, alpha_pattern={r"layers\.0\.q_proj": 4.0},
                     base_model_name_or_path="org/model", revision="abc")
    assert LoRIConfig.from_dict(json.loads(cfg.to_json_string())) == cfg
    cfg.save_pretrained(tmp_path)
    back = LoRIConfig.from_pretrained(tmp_path)
    assert back == cfg and back.seed == 2**64 - 1  # 64-bit seeds exact through JSON
    regex = LoRIConfig(target_modules=r".*\.(q|v)_proj")
    assert LoRIConfig.from_dict(regex.to_dict()).target_modules == r".*\.(q|v)_proj"


@pytest.mark.parametrize("field,value", [
    ("r", 0), ("r", 1.5), ("r", True), ("r", 257),
    ("lora_alpha", 0), ("lora_alpha", -1.0), ("lora_alpha", float("nan")),
    ("lora_alpha", float("inf")), ("lora_alpha", True), ("lora_alpha", "8"),
    ("target_modules", None), ("target_modules", []), ("target_modules", [""]),
    ("target_modules", "("), ("target_modules", [3]),
    ("seed", 1.5), ("seed", -1), ("seed", 2**64), ("seed", True), ("seed", "7"),
    ("distribution", "gaussian"), ("sparsity", 1.0), ("sparsity", -0.1),
    ("sparsity", float("nan")), ("mask_scope", "row"), ("sparse_init", "random"),
    ("modules_to_save", "classifier"), ("modules_to_save", []),
    ("layers_to_transform", -1), ("layers_to_transform", [1.0]), ("layers_to_transform", []),
    ("rank_pattern", {"q": 0}), ("rank_pattern", {"(": 4}), ("rank_pattern", []),
    ("alpha_pattern", {"q": float("nan")}), ("alpha_pattern", {"q": 0}),
    ("base_model_name_or_path", 5), ("inference_mode", 1), ("peft_type", "LORA"),
])
def test_invalid_field_is_a_value_error_naming_it(field, value):
    kwargs = {"target_modules": ["q_proj"], field: value}
    with pytest.raises(ValueError, match=rf"LoRIConfig\.{field}"):
        LoRIConfig(**kwargs)


def test_layers_pattern_needs_layers_to_transform():
    with pytest.raises(ValueError, match="layers_pattern"):
        LoRIConfig(target_modules=["q"], layers_pattern="layers")


def test_from_dict_refuses_unknown_fields(tmp_path):
    d = LoRIConfig(target_modules=["q"]).to_dict()
    d["lora_dropout"] = 0.1
    with pytest.raises(ValueError, match="unknown fields.*lora_dropout"):
        LoRIConfig.from_dict(d)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(ValueError, match="import_peft"):
        LoRIConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no such file"):
        LoRIConfig.from_pretrained(tmp_path / "nope")


def test_per_layer_patterns_follow_peft():
    cfg = LoRIConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                     rank_pattern={"v_proj": 4, r"layers\.1\.q_proj": 2},
                     alpha_pattern={"q_proj": 3.0})
    assert cfg.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert cfg.rank_for("model.layers.1.q_proj") == 2
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 8
    assert cfg.alpha_for("model.layers.0.self_attn.q_proj") == 3.0
    assert cfg.alpha_for("model.layers.0.self_attn.v_proj") == 16.0
    ltt = LoRIConfig(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
    assert ltt.transforms_layer_index("model.layers.1.self_attn.q_proj")
    assert not ltt.transforms_layer_index("model.layers.0.self_attn.q_proj")
    assert not ltt.transforms_layer_index("lm_head")
