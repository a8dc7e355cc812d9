"""The model: meta-device builds of the real shapes, YaRN with K2's numbers, the router's selection rules,
grouped expert compute, and training in fp32 / bf16."""

from __future__ import annotations

import math

import pytest
import torch

import moonlet
from moonlet import model as M
from moonlet.config import PRESETS, ModelConfig
from moonlet.costs import checkpoint_bytes, kv_bytes_per_token, param_counts


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_on_the_meta_device_without_memory(name):
    with torch.device("meta"):
        model = M.Transformer(ModelConfig.from_preset(name))
    assert all(p.is_meta for p in model.parameters())


def test_kimi_k2_costs_match_the_spec():
    cfg = ModelConfig.from_preset("kimi-k2")
    counts = param_counts(cfg)
    assert 1.02e12 <= counts["total"] <= 1.04e12
    assert 32e9 <= counts["active"] <= 33e9
    assert counts["per_expert"] == 44_040_192
    assert kv_bytes_per_token(cfg) == 70_272
    assert checkpoint_bytes(cfg)["int4_experts"] / 1e9 == pytest.approx(594, abs=1.0)


def test_k2_yarn_keeps_pairs_0_to_19_and_divides_20_to_31_by_64():
    cfg = ModelConfig.from_preset("kimi-k2")
    inv_freq, factor = M.rope_frequencies(cfg)
    base = 50000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    assert factor == 1.0
    torch.testing.assert_close(inv_freq[:20], base[:20])
    torch.testing.assert_close(inv_freq[20:], base[20:] / 64)


def test_interleaved_rope_equals_complex_rotation_of_adjacent_pairs():
    """DeepSeek's reference rotates (x0,x1),(x2,x3)... as complex numbers; we write the result half-split."""
    x = torch.randn(5, 8)
    angles = torch.rand(5, 4) * 6
    ref = torch.view_as_real(torch.view_as_complex(x.view(5, 4, 2)) * torch.polar(torch.ones_like(angles), angles))
    got = M.apply_rope(x, angles.cos(), angles.sin(), interleaved=True)
    torch.testing.assert_close(got, torch.cat([ref[..., 0], ref[..., 1]], dim=-1))


def reference_route(cfg: ModelConfig, x: torch.Tensor, router: M.Router):
    """Brute force, one token at a time, straight from the spec's words."""
    out = []
    for row in x:
        s = torch.sigmoid(router.weight.float() @ row.float())
        biased = s + router.e_score_correction_bias
        size = cfg.n_routed_experts // cfg.n_group
        allowed = list(range(cfg.n_routed_experts))
        if cfg.n_group > 1:
            group_score = [biased[g * size:(g + 1) * size].topk(2).values.sum() for g in range(cfg.n_group)]
            keep = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
            allowed = [e for e in allowed if e // size in keep]
        chosen = sorted(allowed, key=lambda e: -biased[e])[: cfg.num_experts_per_tok]
        w = s[chosen] / s[chosen].sum() * cfg.routed_scaling_factor
        out.append(dict(zip(chosen, w.tolist())))
    return out


@pytest.mark.parametrize("groups", [(1, 1), (4, 2), (8, 4)])
def test_router_selects_with_the_bias_and_weights_with_unbiased_scores(groups):
    cfg = ModelConfig.from_preset("tiny").with_(n_routed_experts=16, num_experts_per_tok=3, n_group=groups[0],
                                               topk_group=groups[1])
    router = M.Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    router.e_score_correction_bias.normal_(0, 0.5)
    x = torch.randn(12, cfg.hidden_size)
    weights, ids, _ = router(x)
    for got_w, got_ids, ref in zip(weights, ids, reference_route(cfg, x, router)):
        assert set(got_ids.tolist()) == set(ref)
        for e, w in zip(got_ids.tolist(), got_w.tolist()):
            assert w == pytest.approx(ref[e], rel=1e-5)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=["bf16-model", "fp32-master-autocast"])
def test_grouped_mm_path_equals_the_per_expert_loop_forward_and_backward(monkeypatch, weight_dtype):
    """The CUDA path (torch._grouped_mm, which also runs on CPU) against the loop: a bf16 model, and training
    with fp32 master weights under bf16 autocast, where the op (no autocast rule) must cast for itself."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    cfg = ModelConfig.from_preset("tiny").with_(n_routed_experts=8, num_experts_per_tok=3)
    experts = M.Experts(cfg).to(weight_dtype)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(40, cfg.hidden_size, dtype=weight_dtype)
    ids = torch.randint(0, 7, (40, 3))  # expert 7 gets no tokens: empty groups must work
    weights = torch.rand(40, 3)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        experts.zero_grad()
        out = experts(x, ids, weights)
        out.float().square().sum().backward()
        return out, [p.grad.clone() for p in experts.parameters()]

    loop, loop_grads = run()
    monkeypatch.setattr(M, "grouped_mm_dtype", lambda t: torch.bfloat16)
    grouped, grouped_grads = run()
    assert grouped.dtype == weight_dtype and all(g.dtype == weight_dtype for g in grouped_grads)
    torch.testing.assert_close(grouped.float(), loop.float(), rtol=2e-2, atol=2e-2)
    for got, ref in zip(grouped_grads, loop_grads):  # bf16 compute: compare whole tensors, not elements
        assert (got.float() - ref.float()).norm() < 2e-2 * ref.float().norm()
    assert grouped_grads[0][7].abs().sum() == 0  # the expert without tokens gets no gradient


def test_experts_match_a_dense_reference_including_repeated_tokens():
    cfg = ModelConfig.from_preset("tiny")
    experts = M.Experts(cfg)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(9, cfg.hidden_size)
    ids = torch.randint(0, cfg.n_routed_experts, (9, 2))
    weights = torch.rand(9, 2)
    ref = torch.zeros_like(x)
    for t in range(9):
        for j in range(2):
            e = ids[t, j]
            h = torch.nn.functional.silu(experts.gate_proj[e] @ x[t]) * (experts.up_proj[e] @ x[t])
            ref[t] += weights[t, j] * (experts.down_proj[e] @ h)
    torch.testing.assert_close(experts(x, ids, weights), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_training_step_reaches_every_parameter_that_was_used(dtype):
    model = moonlet.load("tiny", dtype=dtype).train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24))
    logits = model(ids)
    assert logits.dtype == dtype and logits.shape == (2, 24, model.cfg.vocab_size)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(math.log(model.cfg.vocab_size), rel=0.1)
    loss.backward()
    used = set(model.layers[1].mlp.last_expert_counts.nonzero().flatten().tolist())
    grad = model.layers[1].mlp.experts.gate_proj.grad
    assert {e for e in range(grad.shape[0]) if grad[e].abs().sum() > 0} == used
    assert model.layers[0].self_attn.q_b_proj.weight.grad.abs().sum() > 0


def test_causality_future_tokens_do_not_change_past_logits():
    model = moonlet.load("tiny")
    ids = torch.randint(0, model.cfg.vocab_size, (1, 20))
    other = ids.clone()
    other[0, 15:] = (other[0, 15:] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0, :15], model(other)[0, :15])


def test_max_logit_tracking_matches_explicit_attention_scores():
    model = moonlet.load("tiny")
    attn = model.layers[0].self_attn
    attn.track_max_logits = True
    x = torch.randn(2, 10, model.cfg.hidden_size)
    cos, sin = model.rope(torch.arange(10), x.dtype)
    with torch.no_grad():
        attn(x, cos, sin)
        q_nope, q_pe = attn.query(x, cos, sin)
        k, _ = attn.expand(*attn.latent(x, cos, sin))
        q = torch.cat([q_nope, q_pe], -1)
        scores = torch.einsum("bthd,bshd->bhts", q, k) * model.cfg.softmax_scale
        scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(attn.max_logits, scores.amax(dim=(0, 2, 3)))


def test_padding_v_to_the_qk_head_dim_gives_the_same_attention_and_gradients():
    """MLA's value head is narrower than its query/key head; zero-padding v (to make flash SDPA eligible) must
    not change the output or any gradient."""
    q, k = torch.randn(2, 3, 12, 24, requires_grad=True), torch.randn(2, 3, 12, 24, requires_grad=True)
    v = torch.randn(2, 3, 12, 16, requires_grad=True)
    grads = []
    for pad in (False, True):
        out = M.causal_attention(q, k, v, scale=0.2, pad_v=pad)
        assert out.shape == (2, 3, 12, 16)
        grads.append((out, *torch.autograd.grad((out * torch.arange(16.0)).sum(), (q, k, v))))
    for plain, padded in zip(*grads):
        torch.testing.assert_close(padded, plain)


def test_the_expert_loop_backward_never_zero_fills_a_whole_stacked_weight():
    """Where torch._grouped_mm does not run (CPU, fp32), experts loop over their slices of the stacked
    weights. Indexing a slice makes its backward write a zero gradient of the whole stack, once per expert:
    E times the work (64 experts of 704 x 1024: 11 s instead of 0.4 s per layer). The loop must not."""
    import dataclasses

    from torch.profiler import ProfilerActivity, profile

    cfg = dataclasses.replace(moonlet.ModelConfig.from_preset("tiny"), n_routed_experts=8)
    experts = M.Experts(cfg)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    out = experts.grouped_swiglu(torch.randn(12, cfg.hidden_size), torch.tensor([3, 0, 2, 2, 0, 1, 4, 0]))
    stacked = [list(experts.gate_proj.shape), list(experts.down_proj.shape)]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out.square().sum().backward()
    fills = sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                if e.key in ("aten::fill_", "aten::zero_") and e.input_shapes and e.input_shapes[0] in stacked)
    assert fills == 0 and experts.up_proj.grad is not None and experts.up_proj.grad[1].abs().sum() == 0


def test_cpu_mla_attention_and_absorbed_prefill_run_on_the_flash_sdpa_kernel():
    """On the CPU a narrower v leaves SDPA's unfused math path (2-11x slower than CPU flash). The training
    forward pads v; the absorbed prefill uses the whole keys as values. Both must run with only flash allowed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from moonlet.kvcache import absorbed_attention

    q, k = torch.randn(2, 4, 32, 24, requires_grad=True), torch.randn(2, 4, 32, 24, requires_grad=True)
    v = torch.randn(2, 4, 32, 16, requires_grad=True)
    model = moonlet.load("tiny")
    mla, cfg = model.layers[0].self_attn, model.cfg
    H, n, r, R = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with pytest.raises(RuntimeError):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        M.causal_attention(q, k, v, scale=0.2).sum().backward()
        with torch.no_grad():
            out = absorbed_attention(mla, torch.randn(1, 5, H, n), torch.randn(1, 5, H, r), torch.randn(1, 9, R + r),
                                     torch.arange(4, 9)[None])
    assert v.grad is not None and out.shape == (1, 5, H * cfg.v_head_dim)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mla_attention_is_eligible_for_flash_sdpa():
    """With moe-2b's head dims (96/96/64) in bf16, plain SDPA has no flash kernel; causal_attention must run on
    it (forward and backward) and agree with the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k = (torch.randn(2, 16, 256, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 16, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with pytest.raises(RuntimeError):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = M.causal_attention(q, k, v, scale=96 ** -0.5)
        out.float().square().sum().backward()
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    assert v.grad is not None and v.grad.shape == v.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_training_runs_experts_on_grouped_mm_and_tracks_the_fp32_loss(monkeypatch):
    """Training on GPU: fp32 master weights under bf16 autocast. The experts must take torch._grouped_mm (no
    per-expert loop, no host sync) and the loss must match the fp32 model's."""
    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or grouped_mm(*a, **kw))
    model = moonlet.load("tiny", device="cuda").train()
    ids = torch.randint(0, model.cfg.vocab_size, (4, 64), device="cuda")

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    ref = loss_of(model(ids))
    assert not calls  # fp32 without autocast: the loop
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_of(model(ids))
    assert len(calls) == 3 * len(model.moe_layers())
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)
    loss.backward()
    grad = model.moe_layers()[0].experts.down_proj.grad
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0
