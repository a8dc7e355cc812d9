"""Parity with the peer: HF transformers' DeepseekV3ForCausalLM, both directions, on tiny random checkpoints
in the configurations K2, DeepSeek-V3 and Moonlight use."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moonlet
from moonlet.checkpoint import CheckpointError

# (id, config overrides): each exercises a different branch of the model
CONFIGS = [
    ("k2-like: q_lora, yarn, groups, dense layer 0", {}),
    ("moonlight: no q_lora, no rope scaling, dense 0", dict(q_lora_rank=None, first_k_dense_replace=0,
                                                           rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 50000.0})),
    ("two dense layers, tied head, one group", dict(first_k_dense_replace=2, tie_word_embeddings=True, n_group=1,
                                                    topk_group=1, num_hidden_layers=4)),
    ("deepseek-v3-like: 8 groups keep 4, two shared experts", dict(n_routed_experts=16, n_group=8, topk_group=4,
                                                                   num_experts_per_tok=4, n_shared_experts=2)),
    ("no interleave, no norm_topk_prob", dict(rope_interleave=False, norm_topk_prob=False)),
    ("attention bias", dict(attention_bias=True)),
    ("no shared expert (HF saves zero-width tensors)", dict(n_shared_experts=0)),
    ("moe_layer_freq ignored, as in HF", dict(moe_layer_freq=2)),
]


def logits_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> float:
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"max |logits difference| = {diff:.3g} > {tol}"
    return diff


@pytest.mark.parametrize("overrides", [c[1] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_moonlet_loads_hf_checkpoints_with_identical_logits(tiny_hf_checkpoint, overrides):
    path, hf = tiny_hf_checkpoint(**overrides)
    model = moonlet.load(path)
    ids = torch.randint(0, 320, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits_close(model(ids), hf(ids).logits)


def test_transformers_loads_moonlet_checkpoints_with_identical_logits(tiny_hf_checkpoint, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    path, hf = tiny_hf_checkpoint()
    model = moonlet.load(path)
    out = moonlet.save(model, tmp_path / "moonlet", max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").exists(), "small shard size must produce a sharded checkpoint"
    hf2 = DeepseekV3ForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 320, (2, 29), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits_close(hf2(ids).logits, model(ids))
        logits_close(hf2(ids).logits, hf(ids).logits)


def test_preset_model_saved_by_moonlet_runs_in_transformers_with_same_logits(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    model = moonlet.load("tiny", seed=3)
    moonlet.save(model, tmp_path / "tiny")
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "tiny").eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits_close(hf(ids).logits, model(ids))


def test_bf16_logits_track_the_fp32_peer(tiny_hf_checkpoint):
    path, hf = tiny_hf_checkpoint()
    model = moonlet.load(path, dtype=torch.bfloat16)
    gate = model.layers[1].mlp.gate  # the router stays fp32, as in HF (_keep_in_fp32_modules_strict)
    assert gate.e_score_correction_bias.dtype == gate.weight.dtype == torch.float32
    assert torch.equal(gate.weight, load_file(path / "model.safetensors")["model.layers.1.mlp.gate.weight"])
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(ids).logits
        got = model(ids).float()
    assert (got - ref).norm() / ref.norm() < 2e-2


def test_save_load_roundtrip_is_exact_and_sharded(tmp_path):
    model = moonlet.load("tiny", seed=5)
    out = moonlet.save(model, tmp_path / "ck", max_shard_size=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert len(set(index["weight_map"].values())) > 1
    again = moonlet.load(out)
    for (n1, a), (n2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1


def test_mtp_layers_and_rotary_buffers_are_ignored(tiny_hf_checkpoint):
    path, hf = tiny_hf_checkpoint()
    file = path / "model.safetensors"
    tensors = load_file(file)
    # a DeepSeek-V3 checkpoint carries an MTP layer after the last layer and sometimes inv_freq buffers
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    tensors["model.layers.3.mlp.experts.0.gate_proj.weight"] = torch.zeros(32, 64)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    save_file(tensors, file)
    config = json.loads((path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(config))
    model = moonlet.load(path)
    ids = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        logits_close(model(ids), hf(ids).logits)


def test_k2_style_config_json_loads(tiny_hf_checkpoint):
    """K2 Thinking writes transformers-4 style: model_type kimi_k2, rope_theta + rope_scaling with `type`."""
    path, hf = tiny_hf_checkpoint()
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    config.update(model_type="kimi_k2", topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1)
    (path / "config.json").write_text(json.dumps(config))
    model = moonlet.load(path)
    assert model.cfg.model_type == "kimi_k2"
    ids = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        logits_close(model(ids), hf(ids).logits)


# ------------------------------------------------------------------------------------------------------
# errors name the tensor and the file


def test_missing_tensor_is_named(tiny_hf_checkpoint):
    path, _ = tiny_hf_checkpoint()
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.up_proj.*experts \[5\]"):
        moonlet.load(path)


def test_unexpected_tensor_is_named_with_its_file(tiny_hf_checkpoint):
    path, _ = tiny_hf_checkpoint()
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*model\.layers\.0\.self_attn\.mystery\.weight"):
        moonlet.load(path)


def test_a_config_smaller_than_its_checkpoint_is_an_error_not_a_truncated_model(tiny_hf_checkpoint):
    """Layers past num_hidden_layers are skipped only as MTP layers (num_nextn_predict_layers); experts past
    n_routed_experts are never dropped."""
    path, _ = tiny_hf_checkpoint()
    config = json.loads((path / "config.json").read_text())
    for change, error in (({"num_hidden_layers": 2, "num_nextn_predict_layers": 0}, r"unexpected tensor 'model\.layers\.2\."),
                          ({"n_routed_experts": 4, "n_group": 2, "topk_group": 1}, r"expert 4.*n_routed_experts = 4")):
        (path / "config.json").write_text(json.dumps(config | change))
        with pytest.raises(CheckpointError, match=error):
            moonlet.load(path)
    mtp = config | {"num_hidden_layers": 2, "num_nextn_predict_layers": 1}  # layer 2 as DeepSeek-V3's MTP layer
    (path / "config.json").write_text(json.dumps(mtp))
    assert moonlet.load(path).cfg.num_hidden_layers == 2


def test_misshaped_tensor_is_named_with_both_shapes(tiny_hf_checkpoint):
    path, _ = tiny_hf_checkpoint()
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(5, 16)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"kv_b_proj\.weight.*\(5, 16\).*\(80, 16\)"):
        moonlet.load(path)


def test_truncated_file_is_reported(tiny_hf_checkpoint):
    path, _ = tiny_hf_checkpoint()
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated") as e:
        moonlet.load(path)
    assert str(e.value).count("cannot read safetensors file") == 1 and str(e.value).count("is it truncated?") == 1


def test_missing_shard_named_in_index_is_reported(tmp_path):
    model = moonlet.load("tiny")
    out = moonlet.save(model, tmp_path / "ck", max_shard_size=200_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        moonlet.load(out)


def test_unknown_preset_or_missing_directory_is_a_clear_error():
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a preset"):
        moonlet.load("kimi-k3")


def test_sharded_hf_checkpoints_load(tiny_hf_checkpoint, tmp_path):
    _, hf = tiny_hf_checkpoint()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model = moonlet.load(tmp_path / "sharded")
    ids = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        logits_close(model(ids), hf(ids).logits)


# ------------------------------------------------------------------------------------------------------
# FP8 block storage (DeepSeek-V3, Kimi K2 base / instruct): read into a dense model


@pytest.mark.parametrize("scales_apart", [False, True])
def test_fp8_block_checkpoints_load_dense_with_the_logits_of_their_dequantized_weights(tiny_hf_checkpoint, tmp_path,
                                                                                       fp8_release, scales_apart):
    from transformers import DeepseekV3ForCausalLM

    path, _ = tiny_hf_checkpoint()
    dense = fp8_release(path, tmp_path / "fp8", scales_apart=scales_apart)
    model = moonlet.load(tmp_path / "fp8")
    assert model.cfg.quantization_config is None  # held dense: a save writes plain weights
    # the peer: transformers loading the same checkpoint with the dequantized weights written in
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text((path / "config.json").read_text())
    save_file({**load_file(str(path / "model.safetensors")), **dense}, str(tmp_path / "dense" / "model.safetensors"),
              metadata={"format": "pt"})
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "dense").eval()
    ids = torch.randint(0, 320, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits_close(model(ids), hf(ids).logits)


def test_fp8_weights_without_their_config_or_scale_are_named(tiny_hf_checkpoint, tmp_path, fp8_release):
    path, _ = tiny_hf_checkpoint()
    fp8_release(path, tmp_path / "fp8")
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    (tmp_path / "fp8" / "config.json").write_text(json.dumps({k: v for k, v in cfg.items()
                                                              if k != "quantization_config"}))
    with pytest.raises(CheckpointError, match=r"float8 but config.json has no FP8 quantization_config"):
        moonlet.load(tmp_path / "fp8")
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    del tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight.*has no .*weight_scale_inv"):
        moonlet.load(tmp_path / "fp8")


def test_two_unindexed_files_holding_the_same_tensors_are_refused_naming_both(tmp_path):
    out = moonlet.save(moonlet.load("tiny"), tmp_path / "ck")
    (out / "model.safetensors").rename(out / "a.safetensors")
    save_file(load_file(out / "a.safetensors"), out / "b.safetensors")  # a second copy beside the first
    with pytest.raises(CheckpointError, match=r"in both a\.safetensors and b\.safetensors"):
        moonlet.load(out)


@pytest.mark.parametrize("index", [{"weight_map": [1, 2]}, [1, 2], {"weight_map": {"lm_head.weight": 3}}])
def test_a_malformed_index_is_a_checkpoint_error(tmp_path, index):
    out = moonlet.save(moonlet.load("tiny"), tmp_path / "ck")
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: .*(weight_map|index)"):
        moonlet.load(out)
