"""The latent KV cache and the forward passes that use it: chunked and batched prefill, absorbed-MLA decode,
the prefix cache, and a CUDA-graph runner for the one-token decode step.

MLA's keys and values are functions of a per-token latent: the normalized `c` (kv_lora_rank) and the rotated
rope key `k_pe` (rope dims, shared by all heads). We cache exactly that, `[c | k_pe]` = cfg.kv_latent_dim
values per token per layer (576 for K2), and never the per-head K/V that HF caches (~35x more for K2).

Decode is "absorbed": with W_kvb viewed as [H, nope+v, R], the key half is folded into the query
(q_lat = W_UK^T q_nope) and the value half is applied after attention (o_h = W_UV o_lat). Each query head
then scores the *same* 576-dim cached vectors, i.e. attention is multi-query with 576-dim keys and 512-dim
values (the first R dims of the same vectors). The first prefill chunk of a prompt uses the expanded form
(cheaper when everything is new); later chunks attend to the cached prefix in the absorbed form, so memory is
bounded by the latent cache, never by per-head K/V of the whole context. Short prompts queued together
prefill as one padded batch, each after its own cached prefix.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from moonlet.model import (
    MLA,
    MLP,
    Experts,
    MoE,
    RMSNorm,
    Router,
    Transformer,
    causal_attention,
)

# ------------------------------------------------------------------------------------------------------
# attention over the latent cache


def absorbed_attention(mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, keys: torch.Tensor,
                       positions: torch.Tensor) -> torch.Tensor:
    """Prefill queries in the absorbed form: q_nope [B,T,H,nope] and rotated q_pe [B,T,H,rope] at positions
    [B,T], over cached keys [B,S,R+rope] (key j at position j); query (b, t) sees keys 0..positions[b, t].
    -> output [B,T,H*v]. (decode_step inlines the same math for one token per row.)"""
    cfg = mla.cfg
    B, T, H, n = q_nope.shape
    R = cfg.kv_lora_rank
    w = mla.kv_b_proj.weight.view(H, n + cfg.v_head_dim, R)
    q = torch.cat([torch.einsum("bthn,hnr->bthr", q_nope, w[:, :n]), q_pe], dim=-1)  # [B,T,H,R+rope]
    S = keys.shape[1]
    # heads share one key vector (MQA), so keys are broadcast views; query sub-blocks keep any materialized
    # scores under ~2^26 entries at any context length
    step = max(1, (1 << 26) // (B * H * S))
    k = keys[:, None].expand(B, H, S, keys.shape[-1])
    # the values are the latent part of the keys; on the CPU the whole keys serve as values (the rope columns
    # of the output are dropped) so that q, k, v have one head dim and SDPA takes its flash kernel: ~4x faster
    # than the math path a smaller v leaves (16K-token prefill of the tiny model)
    v = k if keys.device.type == "cpu" else k[..., :R]
    key_positions = torch.arange(S, device=keys.device)
    outs = []
    for t in range(0, T, step):
        qb = q[:, t : t + step].transpose(1, 2)  # [B,H,tb,K]
        visible = key_positions <= positions[:, t : t + step, None]  # [B,tb,S]
        outs.append(F.scaled_dot_product_attention(qb, k, v, attn_mask=visible[:, None], scale=cfg.softmax_scale))
    o_lat = torch.cat(outs, dim=2)[..., :R].transpose(1, 2)  # [B,T,H,R]
    return torch.einsum("bthr,hvr->bthv", o_lat, w[:, n:]).reshape(B, T, H * cfg.v_head_dim)


def _expanded_attention(mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, c: torch.Tensor,
                        k_pe: torch.Tensor) -> torch.Tensor:
    """Causal attention of [B,T] tokens with nothing before them, in the expanded form (exactly the training
    forward): cheaper than the absorbed one when every key is new. -> [B,T,H*v]"""
    k, v = mla.expand(c, k_pe)
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
    out = causal_attention(q, k.transpose(1, 2), v.transpose(1, 2), mla.cfg.softmax_scale)
    return out.transpose(1, 2).flatten(2)


@torch.no_grad()
def prefill(model: Transformer, tokens: list[list[int]], starts: list[int], cache: torch.Tensor,
            slots: list[int], every_position: bool = False) -> torch.Tensor:
    """The next prompt tokens of B sequences in one forward: row b's tokens[b] at positions starts[b].. of
    cache slot slots[b] (cache [L, slots, S_cap, K]). Returns the fp32 logits [B,V] of each row's last token,
    or [B,T,V] of every position with every_position (prompt logprobs; padded positions are junk).
    When every row starts at 0, attention takes the expanded form (exactly the training forward, cheaper when
    every key is new); otherwise the absorbed form over what each slot holds before its tokens, so memory is
    bounded by the latent cache. Rows are right-padded to the longest: a query never sees a position after its
    own, so each row gets what it would alone (the padding's latents land past the row's end, where decode
    masks them until it overwrites them; the caller keeps them inside the cache). One forward for B rows: a
    small model's prefill costs its op count, so a burst of short requests prefills up to B times faster."""
    dev = cache.device
    B, T = len(tokens), max(map(len, tokens))
    ids = torch.tensor([t + [0] * (T - len(t)) for t in tokens], device=dev)
    positions = torch.tensor(starts, device=dev)[:, None] + torch.arange(T, device=dev)  # [B,T]
    rows = torch.tensor(slots, device=dev)
    S = max(s + len(t) for s, t in zip(starts, tokens))  # keys up to the last real token of any row
    fresh = not any(starts)
    x = model.embed_tokens(ids)
    cos, sin = model.rope(positions, x.dtype)
    for i, layer in enumerate(model.layers):
        mla = layer.self_attn
        h = layer.input_layernorm(x)
        q_nope, q_pe = mla.query(h, cos, sin)
        c, k_pe = mla.latent(h, cos, sin)
        cache[i, rows[:, None], positions] = torch.cat([c, k_pe], dim=-1)
        if fresh:
            out = _expanded_attention(mla, q_nope, q_pe, c, k_pe)
        else:  # one row reads its slot as a view; several gather theirs
            keys = cache[i, slots[0], None, :S] if B == 1 else cache[i, rows, :S]
            out = absorbed_attention(mla, q_nope, q_pe, keys, positions)
        x = x + mla.o_proj(out)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    if every_position:
        return model.lm_head(model.norm(x)).float()
    last = x[torch.arange(B, device=dev), torch.tensor([len(t) - 1 for t in tokens], device=dev)]  # [B,D]
    return model.lm_head(model.norm(last)).float()


def _lin(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mod(x) without nn.Module call overhead for plain Linear layers."""
    return F.linear(x, mod.weight, mod.bias) if type(mod) is nn.Linear else mod(x)


def _mlp(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    return _lin(mlp.down_proj, F.silu(_lin(mlp.gate_proj, x)) * _lin(mlp.up_proj, x))


GATHER_MAX = 1 << 18  # weight elements per projection that moe_decode may copy to batch a step's chosen experts


def moe_decode(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """MoE.forward for decode: no host syncs (it lives inside a CUDA graph) and no routing metrics. In general
    the experts' own forward runs (tokens sorted by expert into `grouped_swiglu`, bf16 weights or moonlet.quant's
    INT4): on CUDA the grouped GEMM skips empty groups, so a small batch reads only the experts it routed to.
    On CPU, where a small decode step costs its op count, the sort is skipped where it can be: with few plain
    experts (at most 4x the routed ones) all of them run, the unchosen weighted by 0 (DecodePlan fuses that
    path further); otherwise, while the chosen experts' weights are small enough to copy (GATHER_MAX), they
    are gathered (INT4 ones dequantized, one op per weight) for three batched matmuls. Bigger experts take the
    sorted path, which reads each chosen expert in place: gathering 16 of the `small` preset's 704 x 1024
    experts cost 13 ms per weight, 80% of a batch-4 step."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    weights, ids, _ = moe.gate(flat)
    experts = moe.experts
    N, k = ids.shape
    E = experts.n_experts
    plain_cpu = not x.is_cuda and type(experts) is Experts
    gather = not x.is_cuda and N * k <= 64 and N * k * experts.expert_numel() <= GATHER_MAX
    if plain_cpu and E <= 4 * k:
        dense = torch.zeros(N, E, dtype=x.dtype, device=x.device).scatter_(1, ids, weights.to(x.dtype))
        g = F.linear(flat, experts.gate_proj.flatten(0, 1)).view(N, E, -1)
        u = F.linear(flat, experts.up_proj.flatten(0, 1)).view(N, E, -1)
        h = F.silu(g) * u * dense.unsqueeze(-1)  # [N,E,I]
        out = torch.bmm(h.transpose(0, 1), experts.down_proj.mT).sum(0).view(shape)  # [E,N,D] -> [N,D]
    elif gather:
        e = ids.flatten()
        xs = flat.repeat_interleave(k, 0)[:, None]  # [N*k,1,D]
        h = F.silu(xs @ experts.chosen("gate_proj", e, x.dtype).mT) * (xs @ experts.chosen("up_proj", e, x.dtype).mT)
        h = (h @ experts.chosen("down_proj", e, x.dtype).mT).view(N, k, -1) * weights.unsqueeze(-1).to(x.dtype)
        out = h.sum(1).view(shape)
    else:
        out = experts(flat, ids, weights).view(shape)
    return out + _mlp(moe.shared_experts, x) if moe.shared_experts is not None else out


# ------------------------------------------------------------------------------------------------------
# the decode step


class _Ns:
    """A plain attribute bag (a plan's layer): reading it costs ~30 ns, an nn.Module attribute ~300 ns."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class DecodePlan:
    """Everything a decode step reads from the model, looked up once: at small sizes a step costs its op count
    and Python overhead (it made ~140 nn.Module attribute lookups). Norms take ~3 ops (see _norm);
    linears that read the same input become one GEMM, and a residual branch's last GEMM adds into the residual
    stream (addmm); W_UK / W_UV are views made once; on CPU a MoE layer with
    few plain experts becomes two GEMMs over all routed *and* shared experts (a shared expert of s*I units is s
    experts of weight 1). Fused weights are copies, so only small ones are made (big models are bound by memory
    traffic, not op count, and must not hold weights twice): `fresh()` says whether the model changed since
    (an optimizer step or load_state_dict bumps a tensor's version), and the Decoder then rebuilds the plan.
    Fusing changes only float rounding (tests hold greedy decode to the full forward's tokens)."""

    max_copy = 1 << 22  # elements per fused weight

    def __init__(self, model: Transformer, capacity: int):
        cfg = model.cfg
        self.model, self.cfg = model, cfg
        self._copies: list[tuple[torch.Tensor, int]] = []
        w = model.embed_tokens.weight
        self.dtype, self.cpu = w.dtype, not w.is_cuda
        H, R, n = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim
        self.layers = []
        for layer in model.layers:
            mla = layer.self_attn
            lora = cfg.q_lora_rank is not None
            wkv = mla.kv_b_proj.weight.view(H, n + cfg.v_head_dim, R)  # per head: W_UK [nope,R], W_UV [v,R]
            self.layers.append(_Ns(
                in_norm=self._norm(layer.input_layernorm),
                qkv_a=self._linear(mla.q_a_proj if lora else mla.q_proj, mla.kv_a_proj_with_mqa),
                q_split=[cfg.q_lora_rank if lora else H * cfg.qk_head_dim, R, cfg.qk_rope_head_dim],
                q_norm=self._norm(mla.q_a_layernorm) if lora else None,
                q_b=self._linear(mla.q_b_proj) if lora else None,
                kv_norm=self._norm(mla.kv_a_layernorm), w_uk=wkv[:, :n], w_uv=wkv[:, n:].mT,
                o_proj_add=self._linear_add(mla.o_proj), post_norm=self._norm(layer.post_attention_layernorm),
                ffn_add=self._moe(layer.mlp) if isinstance(layer.mlp, MoE) else self._swiglu(layer.mlp)))
        self.norm, self.lm_head = self._norm(model.norm), self._linear(model.lm_head)
        # rope as x @ M with M [rope, rope] per row: where apply_rope reads its (x1, x2) pairs and writes
        # [x1 cos - x2 sin | x2 cos + x1 sin]; M's entries at these flat indices are [cos, -sin, cos, sin]
        r = cfg.qk_rope_head_dim
        j = torch.arange(r // 2)
        x1, x2 = (2 * j, 2 * j + 1) if cfg.rope_interleave else (j, j + r // 2)
        self.rope_at = torch.cat([x1 * r + j, x2 * r + j, x2 * r + j + r // 2, x1 * r + j + r // 2]).to(w.device)
        # every cache position's arange entry and [cos, -sin, cos, sin] row (model.rope's exact values), so a
        # step slices and gathers them instead of running ~12 small ops (K2 at 256K positions: 64 MB in bf16)
        self.arange = torch.arange(max(capacity, cfg.num_hidden_layers), device=w.device)
        cos, sin = model.rope(self.arange, self.dtype)
        self.rope_rows = torch.cat([cos, -sin, cos, sin], dim=-1)

    def rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, rope, rope] matrices that apply rope at positions [B]: built once per step, then rope is one
        small batched matmul per layer instead of ~9 elementwise ops."""
        B, r = positions.shape[0], self.cfg.qk_rope_head_dim
        vals = self.rope_rows[positions]
        return vals.new_zeros(B, r * r).index_copy_(1, self.rope_at, vals).view(B, r, r)

    def fresh(self) -> bool:
        return all(t._version == v for t, v in self._copies)

    def _copy(self, t: torch.Tensor, *sources: torch.Tensor) -> torch.Tensor:
        self._copies += [(s, s._version) for s in sources]
        return t

    def _norm(self, norm: RMSNorm):
        """RMSNorm in few ops where that is exact up to rounding (fp32). On CPU both torch._fused_rms_norm and
        F.rms_norm run as ~6 dispatched ops (20 us on a 64-wide row) but LayerNorm has a fused kernel, and
        LayerNorm of [x, -x] (mean 0, variance mean(x^2)) with weight [w, 0] is RMSNorm of x in its first
        half: 3 ops, 13 us. On CUDA and when compiling, F.rms_norm (one kernel; traceable)."""
        if self.dtype != torch.float32:
            return norm
        shape, w, eps = list(norm.weight.shape), norm.weight, norm.eps
        if not self.cpu:
            return partial(F.rms_norm, normalized_shape=shape, weight=w, eps=eps)
        D = w.shape[0]
        w2 = self._copy(torch.cat([w, torch.zeros_like(w)]), w)

        def rms_norm(x: torch.Tensor) -> torch.Tensor:
            if torch.compiler.is_compiling():
                return F.rms_norm(x, shape, w, eps)
            return F.layer_norm(torch.cat([x, -x], dim=-1), [2 * D], w2, None, eps)[..., :D]
        return rms_norm

    def _linear(self, *mods: nn.Module):
        """x -> the outputs of mods concatenated: one GEMM when all are plain Linears (torch.mm on the
        transposed weight view: F.linear's dispatch costs ~2 us more per call)."""
        if not all(type(m) is nn.Linear for m in mods) or (
                len(mods) > 1 and sum(m.weight.numel() for m in mods) > self.max_copy):
            return mods[0] if len(mods) == 1 else lambda x: torch.cat([m(x) for m in mods], dim=-1)
        ws, bs = [m.weight for m in mods], [m.bias for m in mods]
        if len(mods) == 1:
            w, b = ws[0], bs[0]
        else:
            if any(b is None for b in bs):  # a bias-free layer in the group gets zeros
                bs = None if all(b is None for b in bs) else [
                    torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b for b, w in zip(bs, ws)]
            b = None if bs is None else self._copy(torch.cat(bs), *bs)
            w = self._copy(torch.cat(ws), *ws)
        wt = w.t()
        return partial(torch.mm, mat2=wt) if b is None else lambda x: torch.addmm(b, x, wt)

    def _linear_add(self, mod: nn.Module):
        """(residual, x) -> residual + mod(x): one torch.addmm for a plain bias-free Linear."""
        if type(mod) is not nn.Linear or mod.bias is not None:
            return lambda res, x: res + mod(x)
        wt = mod.weight.t()
        return lambda res, x: torch.addmm(res, x, wt)

    def _swiglu(self, mlp: MLP):
        gate_up, down_add = self._linear(mlp.gate_proj, mlp.up_proj), self._linear_add(mlp.down_proj)

        def swiglu_add(res: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            g, u = gate_up(x).chunk(2, dim=-1)
            return down_add(res, F.silu(g) * u)
        return swiglu_add

    def _moe(self, moe: MoE):
        cfg, ex, shared = self.cfg, moe.experts, moe.shared_experts
        E, k = ex.n_experts, cfg.num_experts_per_tok
        I = cfg.moe_intermediate_size
        if not (self.cpu and type(ex) is Experts and E <= 4 * k and type(moe.gate) is Router and
                3 * ex.gate_proj.numel() <= self.max_copy and
                (shared is None or (all(type(m) is nn.Linear and m.bias is None for m in
                                        (shared.gate_proj, shared.up_proj, shared.down_proj))
                                    and shared.gate_proj.weight.shape[0] % I == 0))):
            return lambda res, x: res + moe_decode(moe, x)
        gates, ups, downs, sources = [ex.gate_proj], [ex.up_proj], [ex.down_proj], [ex.gate_proj, ex.up_proj,
                                                                                   ex.down_proj]
        S = 0
        if shared is not None:
            S = shared.gate_proj.weight.shape[0] // I
            gates.append(shared.gate_proj.weight.view(S, I, -1))
            ups.append(shared.up_proj.weight.view(S, I, -1))
            downs.append(shared.down_proj.weight.view(-1, S, I).transpose(0, 1))
            sources += [shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight]
        w_gu_t = self._copy(torch.cat(gates + ups).flatten(0, 1), *sources).t()  # [D, 2*(E+S)*I]
        w_down_t = torch.cat(downs).transpose(0, 1).flatten(1).t()  # [(E+S)*I, D]
        base = torch.cat([torch.zeros(E), torch.ones(S)]).to(self.dtype)  # unrouted experts weigh 0, shared 1
        route = self._router(moe.gate)

        def moe_all_experts_add(res: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            weights, ids = route(x)
            N = x.shape[0]
            coef = base.expand(N, -1).scatter(1, ids, weights.to(x.dtype))  # (repeat costs ~8 us more)
            gu = torch.mm(x, w_gu_t).view(N, 2, E + S, I)
            return torch.addmm(res, (F.silu(gu[:, 0]) * gu[:, 1] * coef.unsqueeze(-1)).flatten(1), w_down_t)
        return moe_all_experts_add

    def _router(self, gate: Router):
        """Router.forward in fewer ops, same choices: the excluded groups get -inf *added* (kept ones +0.0),
        which is exactly the masked_fill of the module."""
        cfg = self.cfg
        w, bias = self._copy(gate.weight.float(), gate.weight), gate.e_score_correction_bias
        G, tg, k, scale = cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok, cfg.routed_scaling_factor
        grouped = G > 1 and tg < G

        def route(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            scores = F.linear(x.float(), w).sigmoid()
            choice = scores + bias.float()  # the live buffer: balancing moves it between steps
            if grouped:
                groups = choice.view(x.shape[0], G, -1)
                top = groups.topk(2, dim=-1)[0].sum(-1).topk(tg, dim=-1, sorted=False)[1]
                off = torch.full((x.shape[0], G, 1), float("-inf"), device=x.device).scatter_(1, top[..., None], 0.0)
                choice = (groups + off).flatten(1)
            ids = choice.topk(k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, ids)
            if cfg.norm_topk_prob:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
            return weights * scale, ids
        return route


@torch.no_grad()
def decode_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor,
                n_keys: int, plan: DecodePlan | None = None) -> torch.Tensor:
    """One token for each of B sequences living in cache slots 0..B-1: tokens/positions [B], cache
    [L, slots, S_cap, K] (written at each row's position), attending to the first n_keys cache positions.
    Returns fp32 logits [B, V]. The math of MLA.query/latent plus absorbed attention, written for few ops
    (at small sizes a step costs its op count): activations stay 2-D/3-D so linears are single GEMMs,
    q_pe and k_pe rotate in one matmul, and the causal mask is an additive bias fused into the score GEMM.
    Pass the Decoder's `plan` (built once); without one, a step builds its own."""
    p = plan if plan is not None else DecodePlan(model, cache.shape[2])
    cfg = p.cfg
    B, H, R = tokens.shape[0], cfg.num_attention_heads, cfg.kv_lora_rank
    n, r, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    scale = cfg.softmax_scale
    x = p.model.embed_tokens(tokens)  # [B,D]
    rot = p.rotation(positions)  # [B,rope,rope]
    rows = p.arange[:B]
    layer_rows = p.arange[: len(p.layers), None].expand(-1, B)  # [L,B]: one view per layer
    hidden = p.arange[:n_keys] > positions[:, None, None]  # [B,1,S]: keys after the row
    bias = torch.zeros(hidden.shape, dtype=x.dtype, device=x.device).masked_fill_(hidden, float("-inf"))
    for i, lp in enumerate(p.layers):
        h = lp.in_norm(x)
        q, c, k_pe = lp.qkv_a(h).split(lp.q_split, dim=-1)
        q = (q if lp.q_b is None else lp.q_b(lp.q_norm(q))).view(B, H, n + r)
        pe = torch.bmm(torch.cat([q[..., n:], k_pe[:, None]], dim=1), rot)  # [B,H+1,r], rotated
        # written through the base tensor: torch.compile then updates the cache in place, where a write through
        # the view cache[i] made it copy the whole cache every step
        cache.index_put_((layer_rows[i], rows, positions), torch.cat([lp.kv_norm(c), pe[:, H]], dim=-1))
        keys = cache[i, :B, :n_keys]  # [B,S,R+r]: every head scores the same latent keys (MQA)
        q_lat = torch.bmm(q[..., :n].transpose(0, 1), lp.w_uk).transpose(0, 1)  # [B,H,R]
        scores = torch.baddbmm(bias, torch.cat([q_lat, pe[:, :H]], dim=-1), keys.mT, alpha=scale)  # [B,H,S]
        probs = scores.softmax(-1, dtype=torch.float32).to(x.dtype)
        o = torch.bmm(torch.bmm(probs, keys[..., :R]).transpose(0, 1), lp.w_uv)  # [H,B,v]
        x = lp.o_proj_add(x, o.transpose(0, 1).reshape(B, H * v))
        x = lp.ffn_add(x, lp.post_norm(x))
    return p.lm_head(p.norm(x)).float()


# ------------------------------------------------------------------------------------------------------
# decode runners: eager (CPU, fallback) and CUDA graphs


def _bucket(n: int, lo: int, hi: int) -> int:
    b = lo
    while b < n:
        b *= 2
    return min(b, hi)


class Decoder:
    """Runs decode_step. On CUDA it captures one CUDA graph per (batch bucket, key-length bucket) with
    static token/position buffers, so a decode step is one graph replay (no Python, no launch overhead).
    Elsewhere it runs eagerly, or, opted in with compile=True (default: environment MOONLET_COMPILE=1),
    through torch.compile with the same bucketed static shapes: a small model's step then runs a few fused
    C++ kernels instead of ~280 dispatched ops (2-3x faster on CPU), after a compile of 10-60 s for each
    bucket it meets. On CUDA compile=True compiles the step that each graph captures: fused kernels, fewer
    of them (a graph removes launch overhead, not the many small kernels of an eager step; 1.3-1.4x on an
    H200). The whole step must be one graph (fullgraph): a step with graph breaks was slower than eager, so
    a break falls back to eager with a warning. Padding rows write to the cache's scratch position
    (the last one, never a real token's)."""

    def __init__(self, model: Transformer, cache: torch.Tensor, use_graphs: bool | None = None,
                 compile: bool | None = None):
        self.model, self.cache = model, cache
        self.scratch = cache.shape[2] - 1
        self.use_graphs = cache.is_cuda if use_graphs is None else use_graphs
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = None
        if compile is None:
            compile = os.environ.get("MOONLET_COMPILE") == "1"
        self.compiled = torch.compile(decode_step, dynamic=False, fullgraph=True) if compile else None
        self.plan = DecodePlan(model, cache.shape[2])

    @property
    def mode(self) -> str:
        """How steps run now: "cuda_graphs" (of the compiled step: "cuda_graphs+compiled"), "compiled" or "eager"
        (each falls back to eager on failure)."""
        if self.use_graphs:
            return "cuda_graphs+compiled" if self.compiled is not None else "cuda_graphs"
        return "compiled" if self.compiled is not None else "eager"

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, n_keys: int) -> torch.Tensor:
        if not self.plan.fresh():  # the weights changed: re-fuse them (and recapture graphs)
            self.plan = DecodePlan(self.model, self.cache.shape[2])
            self.graphs.clear()
        if not self.use_graphs and self.compiled is None:
            return decode_step(self.model, tokens, positions, self.cache, n_keys, self.plan)
        B = tokens.shape[0]
        key = (_bucket(B, 1, self.cache.shape[1]), _bucket(n_keys, 256, self.cache.shape[2]))
        if self.compiled is not None and not self.use_graphs:
            pad = key[0] - B
            tok = torch.cat([tokens, tokens.new_zeros(pad)]) if pad else tokens
            pos = torch.cat([positions, positions.new_full((pad,), self.scratch)]) if pad else positions
            try:
                return self.compiled(self.model, tok, pos, self.cache, key[1], self.plan)[:B]
            except Exception as e:  # e.g. no C++ compiler: stay correct, run eager
                warnings.warn(f"moonlet engine: torch.compile failed ({e}); decoding eagerly", stacklevel=2)
                self.compiled = None
                return decode_step(self.model, tokens, positions, self.cache, n_keys, self.plan)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(*key)
            except Exception as e:  # e.g. experts whose kernel syncs with the host: stay correct
                torch.cuda.synchronize()
                if self.compiled is not None:  # first without the compile (its failure, or its kernels')
                    warnings.warn(f"moonlet engine: torch.compile under CUDA graphs failed ({e}); capturing the "
                                  "eager step", stacklevel=2)
                    self.compiled = None
                    return self(tokens, positions, n_keys)
                warnings.warn(f"moonlet engine: CUDA graph capture failed ({e}); decoding eagerly", stacklevel=2)
                self.use_graphs = False
                return decode_step(self.model, tokens, positions, self.cache, n_keys, self.plan)
        graph, tok, pos, out = self.graphs[key]
        tok.zero_()
        tok[:B].copy_(tokens)
        pos.fill_(self.scratch)
        pos[:B].copy_(positions)
        graph.replay()
        return out[:B]

    def _capture(self, B: int, S: int) -> tuple:
        step = self.compiled if self.compiled is not None else decode_step
        dev = self.cache.device
        tok = torch.zeros(B, dtype=torch.long, device=dev)
        pos = torch.full((B,), self.scratch, dtype=torch.long, device=dev)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up kernels, cuBLAS handles and the model's rope table
            for _ in range(2):
                step(self.model, tok, pos, self.cache, S, self.plan)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = step(self.model, tok, pos, self.cache, S, self.plan)
        return graph, tok, pos, out


# ------------------------------------------------------------------------------------------------------
# prefix cache


class PrefixCache:
    """Latent KV of token blocks seen before, keyed by (parent block key, block tokens): a block matches only
    when the whole prefix before it matches too, and the key holds the tokens themselves, so there are no hash
    collisions. Least-recently-used blocks are evicted past `max_bytes`. Blocks are copied into a request's
    cache slot on a hit, so eviction never touches a running sequence."""

    def __init__(self, max_bytes: int, block_size: int = 16):
        self.max_bytes, self.block_size = int(max_bytes), block_size
        self.blocks: OrderedDict[tuple, tuple[int, torch.Tensor]] = OrderedDict()  # key -> (id, kv [L,bs,K])
        self.bytes = 0
        self._next_id = 1
        self.hits = self.lookups = 0

    def _keys(self, tokens: list[int]):
        parent = 0
        bs = self.block_size
        for b in range(len(tokens) // bs):
            key = (parent, tuple(tokens[b * bs : (b + 1) * bs]))
            yield b, key
            entry = self.blocks.get(key)
            if entry is None:
                return
            parent = entry[0]

    def lookup(self, tokens: list[int]) -> list[torch.Tensor]:
        """The cached blocks [L,bs,K] that cover the longest block-aligned prefix of tokens."""
        self.lookups += 1
        found = []
        for _, key in self._keys(tokens):
            entry = self.blocks.get(key)
            if entry is None:
                break
            self.blocks.move_to_end(key)
            found.append(entry[1])
        self.hits += bool(found)
        return found

    def insert(self, tokens: list[int], kv: torch.Tensor) -> None:
        """Store the blocks of tokens whose latents are kv [L, >=len(tokens), K] (a sequence's cache slot)."""
        if self.max_bytes <= 0:
            return
        bs = self.block_size
        chain = set()  # this prompt's blocks so far: evicting one of them would orphan the blocks after it
        for b, key in self._keys(tokens):
            chain.add(key)
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            block = kv[:, b * bs : (b + 1) * bs].clone()
            nbytes = block.numel() * block.element_size()
            while self.bytes + nbytes > self.max_bytes:
                if not self.blocks or next(iter(self.blocks)) in chain:
                    return  # the cap holds only a head of this prompt: keep it, store no more
                _, (_, old) = self.blocks.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
            self.blocks[key] = (self._next_id, block)
            self._next_id += 1
            self.bytes += nbytes

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes = 0
