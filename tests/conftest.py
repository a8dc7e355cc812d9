"""Shared fixtures. `tiny_hf_checkpoint` builds a random transformers DeepseekV3ForCausalLM (the peer
implementation), saves it with save_pretrained and returns (directory, hf_model): the loading code under test
is the real one."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # no GPU: Triton kernels still run, in Triton's CPU interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")
# tiny-model ops are latency bound: on a small shared machine, OpenMP barriers cost more than a second thread
# saves (measured ~5x slower training steps with 2 threads under load)
torch.set_num_threads(1)



def triton_skip_reason() -> str | None:
    """Why tests marked `triton` cannot run the kernels here, or None. They run on CUDA, or without a GPU in
    Triton's CPU interpreter, which before Triton 3.7 crashes with NumPy >= 2.4 ('only 0-dimensional arrays can
    be converted to Python scalars', triton-lang/triton#9171): torch 2.11's CUDA wheel pins Triton 3.6."""
    from moonlet.kernels import HAS_TRITON

    if not HAS_TRITON:
        return "needs Triton"
    if torch.cuda.is_available():
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "needs CUDA, or TRITON_INTERPRET=1"
    import numpy
    import triton

    def version(v: str) -> tuple[int, int]:
        return tuple(int(x) for x in v.split(".")[:2])

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return f"Triton {triton.__version__}'s interpreter fails with NumPy {numpy.__version__} (fixed in Triton 3.7)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = triton_skip_reason()
    for item in items:
        if reason and item.get_closest_marker("triton"):
            item.add_marker(pytest.mark.skip(reason=reason))


# a small config that still exercises every K2 feature: q_lora, YaRN, group-limited routing, shared expert
TINY_HF = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
    first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5, max_position_embeddings=512,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0,
                     "mscale": 1.0, "mscale_all_dim": 1.0},
    bos_token_id=0, eos_token_id=1, pad_token_id=None,
)


def make_hf_model(seed: int = 0, bias_std: float = 0.3, **overrides):
    """A random HF DeepseekV3ForCausalLM with a non-zero router correction bias and experts that matter."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(**{**TINY_HF, **overrides})
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, bias_std)
    return model


@pytest.fixture
def tiny_hf_checkpoint(tmp_path):
    """Factory: tiny_hf_checkpoint(**config_overrides) -> (checkpoint_dir, hf_model)."""
    def make(name: str = "hf", seed: int = 0, **overrides):
        model = make_hf_model(seed=seed, **overrides)
        path = tmp_path / name
        model.save_pretrained(path)
        return path, model

    return make


def to_fp8_release(src, out, block=(32, 32), scales_apart: bool = False) -> dict:
    """Rewrite an HF checkpoint the way DeepSeek released V3: every projection weight as float8_e4m3fn with a
    float32 `weight_scale_inv` per block (amax / 448, edge blocks partial), the rest as it was, and the
    quantization_config of their config.json. Returns the dequantized weights (what a reader must get)."""
    tensors = load_file(str(src / "model.safetensors"))
    scales, dense = {}, {}
    for name, w in list(tensors.items()):
        if not (name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight")):
            continue
        N, K = w.shape
        rows, cols = -(-N // block[0]), -(-K // block[1])
        padded = torch.zeros(rows * block[0], cols * block[1])
        padded[:N, :K] = w.float()
        blocks = padded.view(rows, block[0], cols, block[1])
        scale = blocks.abs().amax((1, 3)).clamp_min(1e-12) / 448.0
        q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
        tensors[name] = q.view(rows * block[0], cols * block[1])[:N, :K].contiguous()
        scales[name + "_scale_inv"] = scale
        dense[name] = (q.float() * scale[:, None, :, None]).view(rows * block[0], cols * block[1])[:N, :K].contiguous()
    out.mkdir()
    if scales_apart:  # the scales in a shard of their own, found through the index
        save_file(tensors, str(out / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
        save_file(scales, str(out / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
        weight_map = {**dict.fromkeys(tensors, "model-00001-of-00002.safetensors"),
                      **dict.fromkeys(scales, "model-00002-of-00002.safetensors")}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file({**tensors, **scales}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": list(block)}
    (out / "config.json").write_text(json.dumps(cfg))
    return dense


@pytest.fixture
def fp8_release():
    """to_fp8_release, for tests: fp8_release(src_dir, out_dir, block=(32, 32), scales_apart=False) -> dense."""
    return to_fp8_release
