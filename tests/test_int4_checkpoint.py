"""INT4 checkpoints in K2 Thinking's on-disk format (compressed-tensors pack-quantized), both directions
checked against the compressed-tensors library: it decompresses moonlet's files to the same weights, and
moonlet loads files it compressed with the same logits as the dequantized model."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moonlet import quant
from moonlet.checkpoint import CheckpointError, build, load, save
from moonlet.cli import main as cli_main
from moonlet.config import ModelConfig
from moonlet.data import write_dataset

pytest.importorskip("compressed_tensors")


def tiny_model(dtype=torch.bfloat16, seed=0):
    model = build(ModelConfig.from_preset("tiny"), dtype=dtype)
    model.init_weights(seed=seed)
    return model.eval()


IDS = torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory):
    model = quant.quantize_model(tiny_model())
    out = save(model, tmp_path_factory.mktemp("int4"))
    with torch.no_grad():
        logits = model(IDS)
    return out, model, logits


def test_saved_files_have_k2s_names_dtypes_and_shapes(int4_dir):
    out, model, _ = int4_dir
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == quant.quantization_config()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        p = "model.layers.1.mlp.experts.5.down_proj."
        packed, scale, shape = (f.get_tensor(p + s) for s in ("weight_packed", "weight_scale", "weight_shape"))
        attn = f.get_tensor("model.layers.1.self_attn.kv_b_proj.weight")
    D, I = model.cfg.hidden_size, model.cfg.moe_intermediate_size
    assert packed.dtype == torch.int32 and packed.shape == (D, I // 8)
    assert scale.dtype == torch.bfloat16 and scale.shape == (D, I // 32)
    assert shape.dtype == torch.int64 and shape.tolist() == [D, I]
    assert attn.dtype == torch.bfloat16  # everything but the routed experts stays bf16
    assert not any(".experts." in n and n.endswith(".weight") for n in names)
    assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in names and "lm_head.weight" in names


def test_load_keeps_experts_packed_and_reproduces_logits(int4_dir):
    out, _, logits = int4_dir
    model = load(out, dtype=torch.bfloat16)
    for moe in model.moe_layers():
        assert isinstance(moe.experts, quant.Int4Experts)
        assert {t.dtype for t in moe.experts.state_dict().values()} == {torch.int32, torch.bfloat16}
        assert not list(moe.experts.parameters())  # no bf16 copy of the experts
    with torch.no_grad():
        assert torch.equal(model(IDS), logits)


def test_compressed_tensors_decompresses_moonlet_files_to_the_same_weights(int4_dir):
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    out, model, _ = int4_dir
    dequantizer = CompressedTensorsDequantizer(out, dtype=torch.bfloat16)  # parses our quantization_config
    weights = dequantizer.process(load_file(str(out / "model.safetensors")))
    n = 0
    for L, moe in zip(range(1, 99), model.moe_layers()):
        for proj in quant.PROJS:
            ours = moe.experts.dequantized(proj, torch.bfloat16)
            for e in range(ours.shape[0]):
                assert torch.equal(weights[f"model.layers.{L}.mlp.experts.{e}.{proj}.weight"], ours[e])
                n += 1
    assert n == 3 * model.cfg.n_routed_experts * len(model.moe_layers())
    assert not any(k.endswith(("weight_packed", "weight_scale", "weight_shape")) for k in weights)


def _compress_with_library(dense_dir, out_dir):
    """The library's own path: minmax observer -> calculate_qparams -> PackedQuantizationCompressor."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=32))
    qcfg = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized", ignore=quant.K2_IGNORE,
                              quantization_status="compressed")
    tensors, dequantized = {}, {}
    for name, w in load_file(str(dense_dir / "model.safetensors")).items():
        if ".mlp.experts." not in name:
            tensors[name] = w
            continue
        g = w.unflatten(-1, (-1, 32))
        scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), scheme.weights)
        comp = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                                     scheme)
        module = name.removesuffix(".weight")
        tensors.update({f"{module}.{k}": v.contiguous() for k, v in comp.items()})
        dequantized[name] = PackedQuantizationCompressor.decompress(comp, scheme)["weight"]
    out_dir.mkdir()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dense_dir / "config.json").read_text())
    cfg["quantization_config"] = qcfg.model_dump(mode="json")
    (out_dir / "config.json").write_text(json.dumps(cfg))
    return dequantized


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moonlet_loads_library_compressed_files_with_the_logits_of_the_dequantized_model(tmp_path, dtype):
    """fp32: the same logits bit for bit. bf16 on the CPU runs torch's int4 kernel: equal up to bf16 rounding."""
    dense = tiny_model(seed=3).to(dtype)
    save(dense, tmp_path / "dense")
    dequantized = _compress_with_library(tmp_path / "dense", tmp_path / "ct")
    int4 = load(tmp_path / "ct", dtype=dtype)
    assert all(isinstance(m.experts, quant.Int4Experts) for m in int4.moe_layers())
    with torch.no_grad():  # the reference: the dense model with the library's dequantized expert weights
        for name, w in dequantized.items():
            _, _, L, _, _, e, proj, _ = name.split(".")
            getattr(dense.layers[int(L)].mlp.experts, proj)[int(e)] = w
        if dtype == torch.float32:
            assert torch.equal(int4(IDS), dense(IDS))
        else:
            torch.testing.assert_close(int4(IDS), dense(IDS), atol=2e-2, rtol=2e-2)


def test_weight_shape_that_disagrees_with_the_model_is_an_error(int4_dir, tmp_path):
    out, _, _ = int4_dir
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.layers.1.mlp.experts.2.up_proj.weight_shape"] = torch.tensor([32, 128])
    (tmp_path / "bad").mkdir()
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"))
    (tmp_path / "bad" / "config.json").write_text((out / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"experts\.2\.up_proj\.weight_shape"):
        load(tmp_path / "bad")


def test_cli_quantize_writes_a_k2_format_checkpoint(tmp_path, capsys):
    model = tiny_model(dtype=torch.float32, seed=4)
    save(model, tmp_path / "src")
    (tmp_path / "src" / "tokenizer.model").write_text("copied along")
    tokens = torch.randint(0, 32000, (4000,), generator=torch.Generator().manual_seed(5)).tolist()
    write_dataset(tmp_path / "data", {"train": [(tokens, None)], "val": [(tokens, None)]}, 32768, False, {})
    assert cli_main(["quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--json", "--eval-data",
                     str(tmp_path / "data"), "--eval-seq-len", "32", "--eval-batches", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["quantized_tensors"] == 3 * 8 and summary["out_bytes"] < summary["in_bytes"]
    ref = quant.eval_loss(model, tmp_path / "data", seq_len=32, batches=2)
    assert summary["eval_loss_in"] == pytest.approx(ref, rel=1e-6)
    assert abs(summary["eval_loss_out"] - ref) < 0.05 * ref
    assert (tmp_path / "dst" / "tokenizer.model").read_text() == "copied along"
    quant.quantize_model(model)  # the same RTN in memory
    loaded = load(tmp_path / "dst", dtype=torch.float32)
    for a, b in zip(model.moe_layers(), loaded.moe_layers()):
        assert torch.equal(a.experts.gate_proj_packed, b.experts.gate_proj_packed)
        assert torch.equal(a.experts.down_proj_scale, b.experts.down_proj_scale)
    assert cli_main(["quantize", str(tmp_path / "dst"), str(tmp_path / "again")]) == 2  # already int4


def test_cli_quantize_of_a_training_run_takes_its_newest_complete_checkpoint(tmp_path, capsys):
    run = tmp_path / "run" / "checkpoints"
    for step, seed in ((5, 1), (9, 2)):
        save(tiny_model(seed=seed), run / f"step_{step:07d}")
        (run / f"step_{step:07d}" / "train_state.pt").write_bytes(b"")
    assert cli_main(["quantize", str(tmp_path / "run"), str(tmp_path / "q")]) == 0
    assert f"newest checkpoint {run / 'step_0000009'}" in capsys.readouterr().err
    newest = tiny_model(seed=2)
    quant.quantize_model(newest)
    loaded = load(tmp_path / "q", dtype=torch.float32)
    assert torch.equal(newest.moe_layers()[0].experts.up_proj_packed, loaded.moe_layers()[0].experts.up_proj_packed)


def read_checkpoint(path) -> dict:
    return {name: t for file in sorted(path.glob("*.safetensors")) for name, t in load_file(str(file)).items()}


@pytest.mark.parametrize("source", ["bf16, sharded", "fp8 blocks (DeepSeek-V3 / K2 base release format)"])
def test_quantize_streams_from_disk_the_files_that_quantize_model_and_save_write(tmp_path, monkeypatch, source,
                                                                               fp8_release):
    """The CLI's path (quantize_checkpoint: one tensor at a time, never a model) and the in-memory path give
    the same config.json and the same tensors, bit for bit."""
    if source.startswith("bf16"):
        save(tiny_model(dtype=torch.bfloat16, seed=6), tmp_path / "src", max_shard_size="200KB")
        assert len(list((tmp_path / "src").glob("*.safetensors"))) > 3
    else:
        save(tiny_model(dtype=torch.bfloat16, seed=6), tmp_path / "bf16")
        fp8_release(tmp_path / "bf16", tmp_path / "src", scales_apart=True)
    in_memory = quant.quantize_model(load(tmp_path / "src", dtype=torch.float32))
    save(in_memory, tmp_path / "in_memory", dtype=torch.bfloat16)
    import moonlet.checkpoint as ck

    monkeypatch.setattr(ck, "load_weights", lambda *a, **k: pytest.fail("the streaming path loaded weights"))
    summary = quant.quantize_checkpoint(tmp_path / "src", tmp_path / "streamed", max_shard_size="300KB")
    assert summary == {"moe_layers": 1, "quantized_tensors": 3 * 8}
    assert json.loads((tmp_path / "streamed" / "config.json").read_text()) == \
        json.loads((tmp_path / "in_memory" / "config.json").read_text())
    streamed, ref = read_checkpoint(tmp_path / "streamed"), read_checkpoint(tmp_path / "in_memory")
    assert len(list((tmp_path / "streamed").glob("*.safetensors"))) > 1 and streamed.keys() == ref.keys()
    for name, t in ref.items():
        assert streamed[name].dtype == t.dtype and torch.equal(streamed[name], t), name


def test_quantize_refuses_a_tensor_that_a_model_of_the_config_does_not_have(tmp_path):
    save(tiny_model(dtype=torch.bfloat16), tmp_path / "src")
    tensors = load_file(str(tmp_path / "src" / "model.safetensors"))
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    tensors[name] = tensors[name][:, :32].contiguous()
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    with pytest.raises(quant.QuantError, match=r"experts\.3\.up_proj\.weight.*shape"):
        quant.quantize_checkpoint(tmp_path / "src", tmp_path / "out")
    tensors[name] = tensors.pop("model.layers.1.mlp.experts.4.up_proj.weight")
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    with pytest.raises(quant.QuantError, match=r"missing.*experts\.4\.up_proj"):
        quant.quantize_checkpoint(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_quantize_refuses_a_truncated_source_and_an_output_holding_other_weights(tmp_path):
    from moonlet.checkpoint import CheckpointError

    save(tiny_model(dtype=torch.bfloat16), tmp_path / "src")
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "other.safetensors").write_bytes((tmp_path / "src" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"other\.safetensors.*empty directory"):
        quant.quantize_checkpoint(tmp_path / "src", tmp_path / "occupied")
    file = tmp_path / "src" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        quant.quantize_checkpoint(tmp_path / "src", tmp_path / "out")


def test_int4_checkpoint_bytes_agree_with_costs(int4_dir):
    from moonlet.costs import checkpoint_bytes

    out, model, _ = int4_dir
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        on_disk = sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in f.keys())
    # the router is kept fp32 (as HF keeps it); the costs count it as K2's files hold it: bf16, bias fp32
    router_extra = sum(2 * m.gate.weight.numel() + 4 * m.gate.e_score_correction_bias.numel() for m in model.moe_layers())
    assert on_disk - router_extra == checkpoint_bytes(model.cfg)["int4_experts"]
    k2 = checkpoint_bytes(ModelConfig.from_preset("kimi-k2"))["int4_experts"]
    assert 585e9 < k2 < 600e9  # the spec's ~594 GB


def test_quantized_layers_are_recognized_by_weight_packed_on_disk(tmp_path):
    """A checkpoint may pack some layers' experts and keep others dense: each layer is built as on disk."""
    cfg = ModelConfig.from_preset("tiny").with_(num_hidden_layers=3)  # MoE layers 1 and 2
    model = build(cfg, dtype=torch.bfloat16)
    model.init_weights(seed=1)
    moe1 = model.layers[1].mlp
    moe1.experts = quant.Int4Experts.from_experts(moe1.experts, cfg, 32)
    model.cfg.extra["quantization_config"] = quant.quantization_config(32)
    save(model, tmp_path / "mixed")
    again = load(tmp_path / "mixed", dtype=torch.bfloat16)
    assert isinstance(again.layers[1].mlp.experts, quant.Int4Experts)
    assert not isinstance(again.layers[2].mlp.experts, quant.Int4Experts)
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_quantizing_another_model_into_the_same_out_replaces_its_tokenizer_files(tmp_path):
    for name, text in (("a", "tokenizer of A"), ("b", "tokenizer of B")):
        save(tiny_model(dtype=torch.float32, seed=len(name)), tmp_path / name)
        (tmp_path / name / "tiktoken.model").write_text(text)
        assert cli_main(["quantize", str(tmp_path / name), str(tmp_path / "q"), "--json"]) == 0
    assert (tmp_path / "q" / "tiktoken.model").read_text() == "tokenizer of B"
    assert not list((tmp_path / "q").glob("*.tmp"))


@pytest.mark.parametrize("option,value,message", [
    ("--max-shard-size", "5XB", "max_shard_size='5XB'"), ("--max-shard-size", "-1", "positive"),
    ("--max-shard-size", "0", "positive"), ("--eval-seq-len", "0", "must be >= 1"),
    ("--eval-batches", "0", "must be >= 1"),
])
def test_bad_quantize_options_are_usage_errors_that_create_nothing(tmp_path, capsys, option, value, message):
    save(tiny_model(dtype=torch.float32), tmp_path / "src")
    with pytest.raises(SystemExit) as e:
        cli_main(["quantize", str(tmp_path / "src"), str(tmp_path / "out"), "--eval-data", str(tmp_path), option,
                  value])
    assert e.value.code == 2 and f"argument {option}: " in (err := capsys.readouterr().err) and message in err
    assert not (tmp_path / "out").exists()


def test_a_quantization_config_that_is_not_an_object_is_reported(tmp_path, capsys):
    save(tiny_model(dtype=torch.float32), tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "quantization_config": "x"}))
    assert cli_main(["quantize", str(tmp_path / "src"), str(tmp_path / "out")]) == 1
    assert "quantization_config = 'x': must be an object or null" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
