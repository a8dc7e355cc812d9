"""ModelConfig: presets with the spec's shapes, validation that names the bad field, HF config round-trips."""

from __future__ import annotations

import copy
import json

import pytest

from moonlet.config import HF_DEFAULTS, PRESETS, ConfigError, ModelConfig

K2_CONFIG = {  # the shape of Kimi K2 Thinking's config.json (transformers-4 style, quantization kept)
    "architectures": ["DeepseekV3ForCausalLM"], "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "model_type": "kimi_k2", "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 64, "num_key_value_heads": 64,
    "n_shared_experts": 1, "n_routed_experts": 384, "routed_scaling_factor": 2.827, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 8, "moe_layer_freq": 1,
    "first_k_dense_replace": 1, "norm_topk_prob": True, "scoring_func": "sigmoid", "aux_loss_alpha": 0.001,
    "seq_aux": True, "hidden_act": "silu", "max_position_embeddings": 262144, "initializer_range": 0.02,
    "rms_norm_eps": 1e-05, "use_cache": True, "bos_token_id": 163584, "eos_token_id": 163586,
    "tie_word_embeddings": False, "rope_theta": 50000.0,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 64.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "attention_bias": False, "attention_dropout": 0.0, "num_nextn_predict_layers": 0, "torch_dtype": "bfloat16",
    "quantization_config": {"config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32, "dynamic": False}}},
        "format": "pack-quantized", "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                                               "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
        "quant_method": "compressed-tensors", "quantization_status": "compressed"},
}

DEEPSEEK_V3_CONFIG = {
    **{k: v for k, v in K2_CONFIG.items() if k != "quantization_config"},
    "model_type": "deepseek_v3", "vocab_size": 129280, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4,
    "first_k_dense_replace": 3, "num_nextn_predict_layers": 1, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}

MOONLIGHT_CONFIG = {
    **{k: v for k, v in DEEPSEEK_V3_CONFIG.items() if k != "rope_scaling"},
    "vocab_size": 163840, "hidden_size": 2048, "intermediate_size": 11264, "moe_intermediate_size": 1408,
    "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None,
    "n_routed_experts": 64, "num_experts_per_tok": 6, "n_shared_experts": 2, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "routed_scaling_factor": 2.446, "rope_theta": 50000.0, "rope_scaling": None,
    "max_position_embeddings": 8192, "num_nextn_predict_layers": 0,
}


def transformers5_config() -> dict:
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        num_attention_heads=8, num_key_value_heads=8, hidden_size=256, num_hidden_layers=4,
        rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 64.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 1.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0}).to_dict()


@pytest.mark.parametrize("name", ["k2", "deepseek-v3", "moonlight", "transformers-5"])
def test_real_config_files_round_trip_exactly(name):
    source = {"k2": K2_CONFIG, "deepseek-v3": DEEPSEEK_V3_CONFIG, "moonlight": MOONLIGHT_CONFIG}.get(name)
    source = copy.deepcopy(source) if source else transformers5_config()
    cfg = ModelConfig.from_hf(copy.deepcopy(source))
    assert cfg.to_hf() == source
    assert list(cfg.to_hf()) == list(source), "key order is kept too"
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_k2_config_file_equals_the_kimi_k2_preset_and_keeps_quantization():
    cfg = ModelConfig.from_hf(copy.deepcopy(K2_CONFIG))
    preset = ModelConfig.from_preset("kimi-k2")
    for field in ("hidden_size", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "q_lora_rank",
                  "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "routed_scaling_factor",
                  "rope_theta", "rope_scaling", "vocab_size", "first_k_dense_replace"):
        assert getattr(cfg, field) == getattr(preset, field), field
    assert cfg.quantization_config["config_groups"]["group_0"]["weights"]["group_size"] == 32


def test_transformers5_rope_parameters_are_read_as_yarn():
    cfg = ModelConfig.from_hf(transformers5_config())
    assert cfg.rope_theta == 50000.0
    assert cfg.rope_scaling["factor"] == 64.0
    assert cfg.softmax_scale == pytest.approx(ModelConfig.from_preset("kimi-k2").softmax_scale)


def test_k2_softmax_scale_includes_yarn_mscale_squared():
    cfg = ModelConfig.from_preset("kimi-k2")
    assert cfg.yarn_mscale == pytest.approx(1.41589, abs=1e-5)
    assert cfg.softmax_scale == pytest.approx(0.144680, abs=1e-6)
    assert cfg.kv_latent_dim == 576


def test_deepseek_v3_config_keeps_mtp_layer_count_and_groups():
    cfg = ModelConfig.from_hf(copy.deepcopy(DEEPSEEK_V3_CONFIG))
    assert (cfg.n_group, cfg.topk_group, cfg.first_k_dense_replace, cfg.num_nextn_predict_layers) == (8, 4, 3, 1)
    assert cfg.n_moe_layers == 58


def test_keys_a_config_leaves_out_mean_what_transformers_reads_for_them():
    """Not K2's values: DeepseekV3Config's. These keys change the routing and rope, never a tensor shape."""
    from transformers import DeepseekV3Config

    src = {k: v for k, v in DEEPSEEK_V3_CONFIG.items() if k not in HF_DEFAULTS}
    cfg, hf = ModelConfig.from_hf(copy.deepcopy(src)), DeepseekV3Config(**src)
    for key in HF_DEFAULTS:
        assert getattr(cfg, key) == getattr(hf, key), key


def test_first_k_dense_replace_past_the_last_layer_means_all_dense_as_in_transformers():
    cfg = ModelConfig.from_preset("tiny").with_(first_k_dense_replace=99)
    assert cfg.n_moe_layers == 0


def test_config_reads_from_a_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MOONLIGHT_CONFIG))
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.q_lora_rank is None and cfg.n_shared_experts == 2


def test_save_creates_the_directory_and_reads_back(tmp_path):
    cfg = ModelConfig.from_preset("nano").with_(hidden_size=128, n_routed_experts=8)
    cfg.save(tmp_path / "new" / "model")
    assert ModelConfig.from_hf(tmp_path / "new" / "model") == cfg


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_valid_and_serializable(name):
    cfg = ModelConfig.from_preset(name)
    assert ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg


@pytest.mark.parametrize("field,value,why", [
    ("num_experts_per_tok", 9, "between 1 and n_routed_experts"),
    ("n_group", 3, "must divide n_routed_experts"),
    ("topk_group", 5, "between 1 and n_group"),
    ("qk_rope_head_dim", 7, "even"),
    ("hidden_size", 0, "positive int"),
    ("first_k_dense_replace", -1, ">= 0"),
    ("hidden_act", "gelu", "SwiGLU"),
    ("scoring_func", "softmax", "sigmoid"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "YaRN"),
    ("rope_scaling", {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}, "factor must be >= 1"),
])
def test_validation_names_the_field_and_the_reason(field, value, why):
    base = ModelConfig.from_preset("tiny")
    with pytest.raises(ConfigError, match=rf"ModelConfig\.{field} = .*{why}"):
        base.with_(**{field: value})


def test_group_limited_routing_must_keep_enough_experts():
    with pytest.raises(ConfigError, match="topk_group"):
        ModelConfig.from_preset("tiny").with_(n_group=4, topk_group=1, num_experts_per_tok=4)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="kimi-k2"):
        ModelConfig.from_preset("gpt-5")


def test_broken_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_hf(tmp_path)


@pytest.mark.parametrize("field,value,why", [
    ("rms_norm_eps", "1e-6", "must be a number"),
    ("num_hidden_layers", "2", "must be an int"),
    ("n_routed_experts", "8", "must be an int"),
    ("norm_topk_prob", "yes", "must be true/false"),
    ("hidden_act", 1, "must be a string"),
    ("q_lora_rank", 1.5, "must be an int or null"),
])
def test_field_types_are_checked_before_any_comparison(field, value, why):
    with pytest.raises(ConfigError, match=rf"ModelConfig\.{field} = .*{why}"):
        ModelConfig.from_preset("tiny").with_(**{field: value})


def test_a_config_file_with_a_wrong_type_names_the_file_and_the_field(tmp_path):
    bad = {**ModelConfig.from_preset("tiny").to_hf(), "rms_norm_eps": "1e-6"}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"config\.json: ModelConfig\.rms_norm_eps = '1e-6': must be a number"):
        ModelConfig.from_hf(tmp_path)


def test_missing_shape_keys_are_an_error_naming_them_and_the_likely_typo():
    tiny = ModelConfig.from_preset("tiny").to_hf()
    tiny["hidden_sise"] = tiny.pop("hidden_size")
    del tiny["num_hidden_layers"]
    with pytest.raises(ConfigError, match=r"missing hidden_size, num_hidden_layers .*'hidden_sise' looks like a "
                                          r"typo of 'hidden_size'"):
        ModelConfig.from_hf(tiny)


def test_a_typo_of_an_optional_key_warns_and_real_configs_load_silently(recwarn):
    for real in (K2_CONFIG, DEEPSEEK_V3_CONFIG, MOONLIGHT_CONFIG, transformers5_config()):
        ModelConfig.from_hf(copy.deepcopy(real))  # architectures, auto_map, torch_dtype, quantization_config, ...
    assert not recwarn.list
    tiny = ModelConfig.from_preset("tiny").to_hf()
    tiny["rope_interleaves"] = tiny.pop("rope_interleave")
    with pytest.warns(UserWarning, match="'rope_interleaves' looks like a typo of 'rope_interleave'"):
        ModelConfig.from_hf(tiny)


@pytest.mark.parametrize("field,value,why", [
    ("routed_scaling_factor", float("nan"), "finite number > 0"),
    ("routed_scaling_factor", float("inf"), "finite number > 0"),
    ("rms_norm_eps", float("inf"), "finite number > 0"),
    ("n_routed_experts", -8, "must be >= 0"),
    ("num_nextn_predict_layers", -1, "must be >= 0"),
    ("eos_token_id", ["a"], "an int or a list of ints or null"),
    ("eos_token_id", [1, True], "a list of ints"),
    ("rope_scaling", {"type": "yarn", "factor": "4"}, "factor must be a finite number"),
    ("rope_scaling", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": -128},
     "original_max_position_embeddings must be a"),
    ("rope_scaling", {"type": "yarn", "factor": 4.0, "mscale_all_dim": float("nan")}, "mscale_all_dim must be a finite"),
])
def test_impossible_values_are_refused_with_the_field_named(field, value, why):
    with pytest.raises(ConfigError, match=rf"ModelConfig\.{field} = .*{why}"):
        ModelConfig.from_preset("tiny").with_(**{field: value})


@pytest.mark.parametrize("text,why", [
    ("[1, 2]", "expected a JSON object of config fields, got a list"),
    ('"tiny"', "expected a JSON object of config fields, got a str"),
])
def test_a_config_json_that_is_not_an_object_names_the_file(tmp_path, text, why):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=rf"config\.json: {why}"):
        ModelConfig.from_hf(tmp_path)


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling", "quantization_config"])
def test_a_section_that_is_not_an_object_is_a_config_error(tmp_path, key):
    (tmp_path / "config.json").write_text(json.dumps({**ModelConfig.from_preset("tiny").to_hf(), key: "yarn"}))
    with pytest.raises(ConfigError, match=rf"config\.json: {key} = 'yarn': must be an object or null"):
        ModelConfig.from_hf(tmp_path)
