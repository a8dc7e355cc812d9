"""The K2 / DeepSeek-V3 transformer: RMSNorm, YaRN rope, Multi-head Latent Attention, the sigmoid `noaux_tc`
router, stacked routed experts with grouped compute, shared experts, dense first layers.

One implementation serves training, inference, the HF parity tests and the 1T preset (built on the meta
device). Module names follow the HF checkpoint names (`self_attn.q_a_proj`, `mlp.gate`, ...) so that
checkpoint.py only has to add the `model.` prefix and split the stacked experts.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from moonlet.config import ModelConfig
from moonlet.kernels import autocast_dtype
from moonlet.kernels.max_logits import causal_max_logits


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalize in fp32, scale in the input dtype (as HF does, so bf16 results match too)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ------------------------------------------------------------------------------------------------------
# rotary embedding (YaRN)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim / 2] in fp32 and the cos/sin multiplier, exactly as HF computes them.

    With K2's numbers (theta 50000, factor 64, beta_fast = beta_slow = 1) pairs 0-19 keep their frequency and
    pairs 20-31 are divided by 64; the multiplier is 1.0 because mscale == mscale_all_dim."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    rs = cfg.rope_scaling
    if not rs or rs.get("type", rs.get("rope_type")) in (None, "default"):
        return inv_freq, 1.0
    factor = cfg.yarn_factor
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    original = cfg.yarn_original_max_position

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original frequency (extrapolate), 0: divide by factor (interpolate)
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention_factor)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [..., rope_dim] by cos/sin [..., rope_dim/2] (broadcast).

    Checkpoints store the rope dims as adjacent pairs (interleaved). We rotate the (even, odd) pairs and
    write the result in half-split layout: q and k get the same permutation, so q.k is unchanged and no
    separate permute is needed (HF does the same)."""
    half = x.shape[-1] // 2
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :half], x[..., half:])
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ------------------------------------------------------------------------------------------------------
# attention


# PyTorch's flash SDPA kernels need equal q/k/v head dims; MLA's value dim is smaller (96/96/64 in moe-2b). On CUDA
# that leaves the slower memory-efficient kernel; on the CPU it leaves the unfused math path, 2-11x slower than
# CPU flash (measured, fp32 and bf16, tiny to K2 head dims). MOONLET_SDPA_PAD_V=0 turns the padding off.
PAD_V_FOR_FLASH = os.environ.get("MOONLET_SDPA_PAD_V", "1") != "0"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     pad_v: bool | None = None) -> torch.Tensor:
    """Causal SDPA over [B,H,T,d] heads. On the CPU, and on CUDA in half precision, v is zero-padded to the q/k
    head dim so a flash kernel is eligible (as HF does for flash-attention-2) and the output is sliced back: the
    zero columns give zero outputs and zero gradients, so the result is the same attention."""
    dv, dqk = v.shape[-1], q.shape[-1]
    if pad_v is None:
        pad_v = PAD_V_FOR_FLASH and dv < dqk and (q.device.type == "cpu" or q.is_cuda and dqk <= 256 and
                                                  q.dtype in (torch.float16, torch.bfloat16))
    if not pad_v or dv == dqk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, dqk - dv)), is_causal=True, scale=scale)
    return out[..., :dv]


class MLA(nn.Module):
    """Multi-head Latent Attention. Keys and values come from a per-token latent c (kv_lora_rank) plus one
    rope key shared by all heads; the latent cache of the engine stores exactly (c, k_pe)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, D = cfg.num_attention_heads, cfg.hidden_size
        self.n_heads = H
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)  # inner norms use 1e-6 regardless of config
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=cfg.attention_bias)
        # QK-Clip bookkeeping (moonlet.optim): per-head max pre-softmax logit over the step, when enabled
        self.track_max_logits = False
        self.max_logits: torch.Tensor | None = None

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,D] -> q_nope [B,T,H,nope], rotated q_pe [B,T,H,rope]."""
        cfg = self.cfg
        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(*x.shape[:-1], self.n_heads, cfg.qk_head_dim)
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2), cfg.rope_interleave)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,D] -> normalized latent c [B,T,kv_lora_rank] and rotated rope key k_pe [B,T,rope]."""
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c), apply_rope(k_pe, cos, sin, self.cfg.rope_interleave)

    def expand(self, c: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent -> per-head keys [B,S,H,nope+rope] and values [B,S,H,v] (the prefill / training form)."""
        cfg = self.cfg
        kv = self.kv_b_proj(c).view(*c.shape[:-1], self.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(-2).expand(*k_nope.shape[:-1], cfg.qk_rope_head_dim)], dim=-1)
        return k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q_nope, q_pe = self.query(x, cos, sin)
        k, v = self.expand(*self.latent(x, cos, sin))
        dtype = autocast_dtype(x)  # cast once here, not inside SDPA and again for the max-logit kernel
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2).to(dtype)  # [B,H,T,qk]
        k, v = k.transpose(1, 2).to(dtype), v.transpose(1, 2).to(dtype)
        if self.track_max_logits:
            self._record_max_logits(q, k)
        out = causal_attention(q, k, v, self.cfg.softmax_scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    @torch.no_grad()
    def _record_max_logits(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Per-head max of the causal pre-softmax logits, accumulated (max) until the optimizer resets it."""
        best = causal_max_logits(q, k, self.cfg.softmax_scale)
        self.max_logits = best if self.max_logits is None else torch.maximum(self.max_logits, best)


# ------------------------------------------------------------------------------------------------------
# feed-forward: dense SwiGLU, router, routed experts, MoE


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid scores; the correction bias only *selects* experts (aux-loss-free balancing moves it), the
    unbiased scores of the chosen experts weight them. Group-limited top-k when n_group > 1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N,D] -> (weights [N,k] fp32, expert ids [N,k], sigmoid scores [N,E] fp32)."""
        cfg = self.cfg
        with torch.autocast("cuda", enabled=False) if x.is_cuda else contextlib.nullcontext():  # fp32 under autocast
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
            groups = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
            group_scores = groups.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices, True)
            choice = groups.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
        ids = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, ids, scores


def grouped_mm_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the experts run in with torch._grouped_mm (CUDA sm90+, bf16 only), or None: loop over the
    experts that got tokens. The op has no autocast rule, so under bf16 autocast (training: fp32 master
    weights, fp32 residual stream) we cast inputs and expert weights to bf16 ourselves."""
    if not (x.is_cuda and hasattr(torch, "_grouped_mm")):
        return None
    dtype = autocast_dtype(x)
    return dtype if dtype == torch.bfloat16 else None


def expert_counts(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert [E] (int64). Unlike torch.bincount on CUDA, which reads the max id back to
    size its output, this never waits for the GPU: one host sync per MoE layer would stall every step."""
    flat = ids.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))


class Experts(nn.Module):
    """Routed experts stored stacked: gate_proj/up_proj [E, I, D], down_proj [E, D, I] (`w_EFD` style).
    Tokens are sorted by expert and each weight is applied to its contiguous slice of tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.n_experts = E
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def chosen(self, proj: str, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weights of experts `ids` (a copy): [len(ids), out, in]. INT4 experts dequantize them."""
        return getattr(self, proj)[ids].to(dtype)

    def expert_numel(self) -> int:
        """Elements of one expert's weight (what `chosen` copies per id and projection)."""
        return self.gate_proj[0].numel()

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                counts: torch.Tensor | None = None) -> torch.Tensor:
        """x [N,D], ids/weights [N,k] -> sum_k weights * expert_k(x) [N,D]. counts: expert_counts(ids), if known."""
        k = ids.shape[1]
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        counts = expert_counts(ids, self.n_experts) if counts is None else counts
        token = order // k
        h = self.grouped_swiglu(x[token], counts)
        h = h * weights.flatten()[order].unsqueeze(-1).to(h.dtype)
        return torch.zeros_like(x).index_add_(0, token, h.to(x.dtype))

    def grouped_swiglu(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [M,D] sorted by expert with counts [E] -> expert MLP outputs [M,D]. Overridden by INT4 experts."""
        dtype = grouped_mm_dtype(xs)
        if dtype is not None:
            offs = counts.cumsum(0).to(torch.int32)
            xs = xs.to(dtype)
            g = torch._grouped_mm(xs, self.gate_proj.to(dtype).transpose(-2, -1), offs=offs)
            u = torch._grouped_mm(xs, self.up_proj.to(dtype).transpose(-2, -1), offs=offs)
            return torch._grouped_mm(F.silu(g) * u, self.down_proj.to(dtype).transpose(-2, -1), offs=offs)
        # unbind, not self.gate_proj[e]: the backward of each indexing writes a zero gradient of the whole
        # stacked tensor and adds it up, E times per weight (64 experts of 704 x 1024: 11 s per layer's
        # backward on the CPU instead of 0.4 s); unbind's backward stacks the E slices once
        gates, ups, downs = self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0)
        outs = []
        for e, xe in enumerate(xs.split(counts.tolist())):
            if xe.shape[0]:
                outs.append(F.linear(F.silu(F.linear(xe, gates[e])) * F.linear(xe, ups[e]), downs[e]))
        return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[-1])


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        # tokens routed to each expert in the last forward: read by aux-loss-free balancing and metrics
        self.last_expert_counts: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids, scores = self.gate(flat)
        counts = expert_counts(ids, self.experts.n_experts)
        self.last_expert_counts = counts
        if self.training:
            self.last_scores, self.last_ids = scores, ids  # for the optional sequence-wise aux loss
        out = self.experts(flat, ids, weights, counts).view(shape)
        return out + self.shared_experts(x) if self.shared_experts is not None else out


# ------------------------------------------------------------------------------------------------------
# the transformer


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Build on the meta device for free (`with torch.device("meta"): Transformer(cfg)`), then
    `to_empty(device=...)` and `init_weights()` (or load a checkpoint)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._rope: dict[torch.device, tuple[torch.Tensor, float]] = {}

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Every tensor's init: linear, expert, embedding and router weights ~ N(0, initializer_range);
        linear biases 0; norm weights 1; expert-correction biases 0."""
        gen = torch.Generator(device=self.embed_tokens.weight.device)
        if seed is not None:
            gen.manual_seed(seed)
        std = self.cfg.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=gen)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        self._rope.clear()

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., rope/2] for integer positions, computed in fp32 and cast (as HF does)."""
        dev = positions.device
        if dev not in self._rope:
            inv_freq, factor = rope_frequencies(self.cfg)
            self._rope[dev] = (inv_freq.to(dev), factor)
        inv_freq, factor = self._rope[dev]
        freqs = positions.float().unsqueeze(-1) * inv_freq
        return (freqs.cos() * factor).to(dtype), (freqs.sin() * factor).to(dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, head: bool = True) -> torch.Tensor:
        """input_ids [B,T] -> logits [B,T,vocab] (training / prefill from position 0 or `positions`); with
        head=False the final norm's output [B,T,D], for the loss to run the head chunk by chunk (moonlet.loss)."""
        x = self.embed_tokens(input_ids)
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        return self.lm_head(x) if head else x

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]

    def attention_layers(self) -> list[MLA]:
        return [layer.self_attn for layer in self.layers]
