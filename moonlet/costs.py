"""What a model costs: parameters (total / active per token), checkpoint bytes (bf16 and INT4 experts),
latent KV-cache bytes per token, forward FLOPs per token, and how much context fits in memory.

Counts come from the real module built on the meta device (so they cannot drift from model.py), not from a
formula kept in parallel.
"""

from __future__ import annotations

import argparse
import json

import torch

from moonlet.checkpoint import model_config
from moonlet.cli import at_least, user_errors
from moonlet.config import PRESETS, ModelConfig

INT4_GROUP = 32  # K2: symmetric int4, one bf16 scale per 32 inputs



def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by kind, from a meta-device model (no memory allocated)."""
    from moonlet.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    counts = {"total": 0, "embedding": 0, "lm_head": 0, "attention": 0, "dense_mlp": 0, "routed_experts": 0,
              "shared_experts": 0, "router": 0, "norms": 0}
    for name, p in model.named_parameters():  # tied weights are yielded once
        n = p.numel()
        counts["total"] += n
        if name.startswith("embed_tokens"):
            counts["embedding"] += n
        elif name.startswith("lm_head"):
            counts["lm_head"] += n
        elif ".self_attn." in name and "norm" not in name:
            counts["attention"] += n
        elif ".mlp.experts." in name:
            counts["routed_experts"] += n
        elif ".mlp.shared_experts." in name:
            counts["shared_experts"] += n
        elif ".mlp.gate." in name:
            counts["router"] += n
        elif ".mlp." in name:
            counts["dense_mlp"] += n
        else:
            counts["norms"] += n
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    inactive = cfg.n_moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    counts["active"] = counts["total"] - inactive
    counts["per_expert"] = per_expert
    return counts


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """Latent cache: normalized latent + rotated rope key per layer (K2: 61 x 576 x 2 = 70,272 bytes)."""
    return cfg.num_hidden_layers * cfg.kv_latent_dim * bytes_per_value


def expanded_kv_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """What a per-head K/V cache (HF's DynamicCache before latent caching) would hold, for comparison."""
    per_layer = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return cfg.num_hidden_layers * per_layer * bytes_per_value


def checkpoint_bytes(cfg: ModelConfig, counts: dict[str, int] | None = None) -> dict[str, int]:
    """bf16 everywhere vs K2's format: routed experts int4 (0.5 byte) + a bf16 scale per 32 weights."""
    counts = counts or param_counts(cfg)
    routed = counts["routed_experts"]
    rest = counts["total"] - routed
    n_matrices = cfg.n_moe_layers * cfg.n_routed_experts * 3
    int4 = routed // 2 + routed // INT4_GROUP * 2 + n_matrices * 16  # packed + scales + weight_shape (int64[2])
    return {"bf16": counts["total"] * 2, "int4_experts": int4 + rest * 2}


def flops_per_token(cfg: ModelConfig, context: int, counts: dict[str, int] | None = None) -> dict[str, int]:
    """Forward FLOPs for one token attending to `context` earlier tokens: 2 per active matmul weight (the
    embedding lookup is free) plus the attention score and value products (expanded form)."""
    counts = counts or param_counts(cfg)
    matmul = 2 * (counts["active"] - counts["embedding"] - counts["norms"])
    attention = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * context
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def tokens_that_fit(cfg: ModelConfig, memory_bytes: int, weight_bytes: int = 0, bytes_per_value: int = 2) -> int:
    """How many tokens of latent KV cache fit in `memory_bytes` after `weight_bytes` of weights."""
    return max(0, (memory_bytes - weight_bytes) // kv_bytes_per_token(cfg, bytes_per_value))


def parse_bytes(text: str) -> int:
    """'80GB' / '80GiB' / '512MB' / '1000000' -> bytes."""
    t = text.strip().upper().removesuffix("B")
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    try:
        suffix = next((u for u in sorted(units, key=len, reverse=True) if t.endswith(u)), "")
        number = float(t[: len(t) - len(suffix)])
        if not 0 <= number < float("inf"):
            raise ValueError
        return int(number * units.get(suffix, 1))
    except ValueError:
        raise ValueError(f"{text!r} is not a size: give e.g. 80GB, 141GiB or 512MB") from None


def info(name_or_dir: str, context: int = 4096, memory: int | None = None) -> dict:
    cfg = model_config(name_or_dir)
    counts = param_counts(cfg)
    sizes = checkpoint_bytes(cfg, counts)
    out = {
        "model": name_or_dir,
        "params_total": counts["total"],
        "params_active": counts["active"],
        "params_by_kind": {k: v for k, v in counts.items() if k not in ("total", "active")},
        "checkpoint_bytes_bf16": sizes["bf16"],
        "checkpoint_bytes_int4_experts": sizes["int4_experts"],
        "kv_bytes_per_token_bf16": kv_bytes_per_token(cfg),
        "kv_bytes_per_token_expanded_bf16": expanded_kv_bytes_per_token(cfg),
        "flops_per_token_fwd": flops_per_token(cfg, context, counts),
        "flops_context": context,
        "softmax_scale": cfg.softmax_scale,
        "layers": {"total": cfg.num_hidden_layers, "moe": cfg.n_moe_layers},
        "max_position_embeddings": cfg.max_position_embeddings,  # with any YaRN extension (K2: 4096 x 64)
    }
    if memory is not None:
        out["memory_bytes"] = memory
        out["context_tokens_that_fit"] = {
            "bf16_weights": tokens_that_fit(cfg, memory, sizes["bf16"]),
            "int4_expert_weights": tokens_that_fit(cfg, memory, sizes["int4_experts"]),
            "cache_only": tokens_that_fit(cfg, memory),
            "one_sequence_at_most": cfg.max_position_embeddings,  # the rest serves other sequences at once
        }
    return out


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def cli_info(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="moonlet info",
        description="Print what a model costs: total and active parameters, checkpoint size in bf16 and with "
                    "INT4 routed experts, latent KV-cache bytes per token, forward FLOPs per token. Works on the "
                    "real 1T config instantly (the model is built on the meta device).")
    parser.add_argument("model", help=f"a preset ({', '.join(PRESETS)}), an HF checkpoint directory or config.json, "
                        "or a training run (its newest checkpoint)")
    parser.add_argument("--context", type=at_least(1), default=4096, help="context length for attention FLOPs (4096)")
    parser.add_argument("--memory", default=None,
                        help="a memory budget such as 80GB or 141GiB: also report how many tokens of context fit")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        report = info(args.model, args.context, parse_bytes(args.memory) if args.memory else None)
    except (*user_errors(), ValueError) as e:  # ValueError: a --memory that is not a size
        parser.error(str(e))
    if args.json:
        print(json.dumps(report))
        return 0
    fl = report["flops_per_token_fwd"]
    beyond = ", beyond the model's context" if report["flops_context"] > report["max_position_embeddings"] else ""
    lines = [
        f"model                      {report['model']}",
        f"parameters total           {_human(report['params_total'])}  ({report['params_total']:,})",
        f"parameters active/token    {_human(report['params_active'])}  ({report['params_active']:,})",
        f"layers (MoE)               {report['layers']['total']} ({report['layers']['moe']})",
        f"context (max positions)    {report['max_position_embeddings']:,} tokens",
        f"checkpoint bf16            {_human(report['checkpoint_bytes_bf16'], 'B')}",
        f"checkpoint INT4 experts    {_human(report['checkpoint_bytes_int4_experts'], 'B')}",
        f"latent KV bytes/token      {report['kv_bytes_per_token_bf16']:,} (bf16; per-head K/V would be "
        f"{report['kv_bytes_per_token_expanded_bf16']:,})",
        f"forward FLOPs/token        {_human(fl['total'])} (matmul {_human(fl['matmul'])} + attention "
        f"{_human(fl['attention'])} at context {report['flops_context']:,}{beyond})",
        f"softmax scale              {report['softmax_scale']:.6f}",
    ]
    if "context_tokens_that_fit" in report:
        fit = report["context_tokens_that_fit"]
        lines.append(f"context that fits in {args.memory}: {fit['bf16_weights']:,} tokens with bf16 weights, "
                     f"{fit['int4_expert_weights']:,} with INT4 experts, {fit['cache_only']:,} for the cache alone "
                     f"(summed over sequences: one holds at most {fit['one_sequence_at_most']:,})")
    print("\n".join(lines))
    return 0
