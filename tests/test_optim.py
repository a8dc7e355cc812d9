"""MuonClip optimizer, QK-Clip and aux-loss-free balancing (K2_SPEC.md sections 1 and 3)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from moonlet import checkpoint, optim
from moonlet.config import ModelConfig


def tiny_model(**overrides):
    cfg = ModelConfig.from_preset("tiny").with_(**overrides)
    model = checkpoint.build(cfg)
    model.init_weights(seed=0)
    return model


def test_newton_schulz_is_batched_over_stacked_experts_and_orthogonalizes():
    G = torch.randn(4, 24, 40)
    batched = optim.newton_schulz(G, dtype=torch.float32)
    for e in range(4):
        assert torch.allclose(batched[e], optim.newton_schulz(G[e], dtype=torch.float32), atol=1e-5)
    s = torch.linalg.svdvals(batched)
    assert s.min() > 0.5 and s.max() < 1.3  # quintic NS lands singular values in ~[0.7, 1.2]
    tall = optim.newton_schulz(G.mT, dtype=torch.float32)  # tall matrices are transposed internally
    assert torch.allclose(tall, batched.mT, atol=1e-5)


def test_one_batched_newton_schulz_over_same_shape_matrices_equals_one_call_each():
    mats = [torch.randn(24, 40), torch.randn(3, 24, 40), torch.randn(5, 40, 24).mT]  # a tall one, transposed
    together = optim.newton_schulz_many(mats, dtype=torch.float32)
    for m, o in zip(mats, together):
        assert o.shape == m.shape
        torch.testing.assert_close(o, optim.newton_schulz(m, dtype=torch.float32), rtol=1e-5, atol=1e-5)


def test_muon_batches_same_shape_parameters_within_the_memory_cap(monkeypatch):
    ps = [torch.zeros(8, 4), torch.zeros(3, 4, 8), torch.zeros(8, 16), torch.zeros(4, 8), torch.zeros(2, 8, 4)]
    batches = optim._same_shape_batches(ps)
    assert sorted(batches) == sorted([[(0, True), (1, False), (3, False), (4, True)], [(2, False)]])
    monkeypatch.setattr(optim, "MUON_BATCH_BYTES", 2 * 4 * 32)  # room for 4 matrices of 4 x 8 per batch
    capped = optim._same_shape_batches(ps)
    assert sorted(capped) == sorted([[(0, True), (1, False)], [(3, False), (4, True)], [(2, False)]])


def test_muon_over_many_parameters_matches_torch_optim_muon_on_each():
    """The foreach momentum and the shape-batched Newton-Schulz are the per-matrix rule, for every matrix."""
    torch.manual_seed(0)
    shapes = [(48, 32), (32, 48), (48, 32), (16, 8)]
    w0 = [torch.randn(s) for s in shapes]
    ours = [torch.nn.Parameter(w.clone()) for w in w0]
    refs = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = optim.MuonAdamW([dict(params=ours, kind="muon")], lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)
    peers = [torch.optim.Muon([r], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                              adjust_lr_fn="match_rms_adamw") for r in refs]
    for _ in range(3):
        for p, r in zip(ours, refs):
            p.grad = torch.randn(p.shape)
            r.grad = p.grad.clone()
        opt.step()
        for peer in peers:
            peer.step()
    for p, r, w in zip(ours, refs, w0):
        assert (p - r).abs().max() < 0.02 * (r - w).abs().max()  # torch's Muon iterates in bf16, ours in fp32


@pytest.mark.parametrize("shape", [(4, 24, 40), (40, 24), (3, 2, 24, 40)], ids=["stacked", "tall", "4-d"])
def test_newton_schulz_flops_match_torchs_flop_counter(shape):
    from torch.utils.flop_counter import FlopCounterMode

    G = torch.randn(shape)
    with FlopCounterMode(display=False) as counter:
        optim.newton_schulz(G, dtype=torch.float32)
    assert counter.get_total_flops() == optim.newton_schulz_flops(G.shape)


def test_muon_matches_torch_optim_muon_with_match_rms_adamw_on_a_matrix():
    torch.manual_seed(0)
    w0 = torch.randn(48, 32)
    grads = [torch.randn(48, 32) for _ in range(3)]
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = optim.MuonAdamW([dict(params=[ours], kind="muon")], lr=0.02, weight_decay=0.1)
    peer = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                            adjust_lr_fn="match_rms_adamw")
    for g in grads:
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        peer.step()
    moved = (ref - w0).abs().max()
    assert (ours - ref).abs().max() < 0.02 * moved  # both bf16 Newton-Schulz, so agree to bf16 rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_groups_match_torch_optim_adamw(dtype):
    torch.manual_seed(0)
    shapes = [(48, 32), (32,), (8, 16, 12)]
    ours = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in ours]
    opt = optim.MuonAdamW([dict(params=ours, kind="adamw")], lr=0.01, weight_decay=0.1)
    peer = torch.optim.AdamW(ref, lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for step in range(4):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.to(dtype) if step != 2 or p.ndim != 1 else None, g.clone()
            if p.grad is None:
                q.grad = None  # a parameter without a gradient this step is skipped by both
        opt.step()
        peer.step()
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.float(), q.detach(), rtol=tol, atol=tol)
        assert p.dtype == dtype


@pytest.mark.parametrize("kind", ["muon", "adamw"])
def test_bf16_parameters_are_updated_through_fp32_masters_that_survive_a_state_dict_round_trip(kind):
    torch.manual_seed(0)
    w0 = torch.randn(48, 32)
    low, full = torch.nn.Parameter(w0.bfloat16()), torch.nn.Parameter(w0.bfloat16().float())
    opt = optim.MuonAdamW([dict(params=[low], kind=kind)], lr=1e-4, weight_decay=0.1)
    ref = optim.MuonAdamW([dict(params=[full], kind=kind)], lr=1e-4, weight_decay=0.1)
    for step in range(6):
        g = torch.randn(48, 32)
        low.grad, full.grad = g.bfloat16(), g.bfloat16().float()
        opt.step()
        ref.step()
        if step == 2:  # a checkpoint round trip: torch alone would cast the fp32 state to bf16
            saved = copy.deepcopy(opt.state_dict())
            opt = optim.MuonAdamW([dict(params=[low], kind=kind)], lr=1e-4, weight_decay=0.1)
            opt.load_state_dict(saved)
    master = opt.master(low)
    assert master.dtype == torch.float32 and all(v.dtype == torch.float32 for k, v in opt.state[low].items())
    assert torch.equal(low.detach(), master.bfloat16())  # the bf16 weights are the rounded masters
    torch.testing.assert_close(master, full.detach(), rtol=0, atol=1e-6)  # the fp32 run's update, exactly
    start = w0.bfloat16().float()  # steps below bf16's resolution move the master, not (yet) the bf16 weights
    assert (low.detach().float() != start).sum() < (master != start).sum() == master.numel()


def test_muon_update_rms_matches_adamw_scale_for_stacked_experts():
    p = torch.nn.Parameter(torch.zeros(8, 64, 32))
    p.grad = torch.randn(8, 64, 32)
    optim.MuonAdamW([dict(params=[p], kind="muon")], lr=1.0, weight_decay=0.0).step()
    rms = p.detach().pow(2).mean(dim=(1, 2)).sqrt()
    # Moonlight: 0.2 * sqrt(max(A, B)) * O with ||O||_rms ~ 1/sqrt(max(A, B)) -> update RMS ~ 0.2 per expert
    assert torch.all((rms > 0.12) & (rms < 0.28))
    assert optim.muon_scale(p.shape) == pytest.approx(0.2 * math.sqrt(64))


def test_param_groups_put_hidden_matrices_on_muon_and_the_rest_on_adamw():
    model = tiny_model()
    opt = optim.build_optimizer(model)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert {"embed_tokens.weight", "lm_head.weight"} == by_group["adamw"]
    assert all("norm" in n for n in by_group["adamw_no_decay"])
    muon = by_group["muon"]
    assert "layers.1.mlp.experts.gate_proj" in muon and "layers.1.mlp.gate.weight" in muon
    assert "layers.0.self_attn.q_b_proj.weight" in muon and "layers.0.mlp.down_proj.weight" in muon
    assert sum(len(v) for v in by_group.values()) == len(list(model.parameters()))
    assert [g for g in opt.param_groups if g["name"] == "adamw_no_decay"][0]["weight_decay"] == 0.0
    baseline = optim.build_optimizer(model, "adamw")
    assert all(g["kind"] == "adamw" for g in baseline.param_groups)


def _max_logits_per_head(model, x):
    optim.track_max_logits(model)
    with torch.no_grad():
        model(x)
    out = [a.max_logits.clone() for a in model.attention_layers()]
    optim.track_max_logits(model, False)
    return out


@pytest.mark.parametrize("q_lora", [32, None])
def test_qk_clip_caps_each_over_threshold_head_at_exactly_tau_and_leaves_shared_rope_key_and_values(q_lora):
    model = tiny_model(q_lora_rank=q_lora, num_hidden_layers=1)  # one layer: clipping it cannot change its input
    cfg = model.cfg
    with torch.no_grad():  # blow up two heads' queries so their logits exceed tau
        for attn in model.attention_layers():
            wq = (attn.q_proj if q_lora is None else attn.q_b_proj).weight.view(4, cfg.qk_head_dim, -1)
            wq[:2] *= 300.0
            attn.kv_b_proj.weight.mul_(30.0)
            attn.kv_a_proj_with_mqa.weight.mul_(30.0)
    x = torch.randint(0, 1000, (2, 16))
    before = _max_logits_per_head(model, x)
    tau = 5.0
    assert all(float(b[:2].min()) > tau for b in before)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    optim.track_max_logits(model)
    with torch.no_grad():
        model(x)
    stats = optim.qk_clip(model, tau)
    after = _max_logits_per_head(model, x)
    n_over = sum(int((b > tau).sum()) for b in before)
    assert stats["heads_clipped"] == n_over
    assert stats["max_logit"] == pytest.approx(max(float(b.max()) for b in before), rel=1e-5)
    for b, a in zip(before, after):
        over = b > tau
        assert torch.allclose(a[over], torch.full_like(a[over], tau), rtol=1e-4)
        assert torch.allclose(a[~over], b[~over], rtol=1e-5)
    nope, v = cfg.qk_nope_head_dim, cfg.v_head_dim
    for i, attn in enumerate(model.attention_layers()):
        p = f"layers.{i}.self_attn."
        assert torch.equal(attn.kv_a_proj_with_mqa.weight, frozen[p + "kv_a_proj_with_mqa.weight"])  # shared k_pe
        kv, kv0 = attn.kv_b_proj.weight.view(4, nope + v, -1), frozen[p + "kv_b_proj.weight"].view(4, nope + v, -1)
        assert torch.equal(kv[:, nope:], kv0[:, nope:])  # value rows untouched
        assert torch.equal(attn.o_proj.weight, frozen[p + "o_proj.weight"])


def test_qk_clip_of_bf16_weights_scales_their_fp32_masters_too():
    """Else the next step's copy from the masters would undo the clip (moonlet train --precision bf16)."""
    from moonlet.checkpoint import cast_weights

    model = cast_weights(tiny_model(num_hidden_layers=1), torch.bfloat16)
    opt = optim.build_optimizer(model, "muon", lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # makes the masters
    attn = model.attention_layers()[0]
    optim.track_max_logits(model)
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 8)))
    tau = float(attn.max_logits.float().min()) / 2  # every head over tau
    stats = optim.qk_clip(model, tau, opt)
    assert stats["heads_clipped"] == attn.n_heads
    for w in (attn.q_b_proj.weight, attn.kv_b_proj.weight):
        assert torch.equal(w.detach(), opt.master(w).bfloat16())  # clipped alike, so no step can undo it


def test_qk_clip_without_tau_only_measures():
    model = tiny_model()
    frozen = [p.detach().clone() for p in model.parameters()]
    optim.track_max_logits(model)
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 8)))
    stats = optim.qk_clip(model, None)
    assert stats["heads_clipped"] == 0 and len(stats["max_logit_per_layer"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters()))
    assert all(a.max_logits is None for a in model.attention_layers())  # reset for the next step


def test_max_logits_accumulate_over_micro_batches():
    model = tiny_model()
    xs = [torch.randint(0, 1000, (1, 8)) for _ in range(2)]
    each = [_max_logits_per_head(model, x) for x in xs]
    optim.track_max_logits(model)
    with torch.no_grad():
        for x in xs:
            model(x)
    for layer, attn in enumerate(model.attention_layers()):
        assert torch.equal(attn.max_logits, torch.maximum(each[0][layer], each[1][layer]))


def test_router_bias_moves_toward_underloaded_experts_by_u_times_sign():
    model = tiny_model()
    moe = model.moe_layers()[0]
    balancer = optim.RouterBalancer(model, u=1e-3)
    model(torch.randint(0, 1000, (2, 16)))
    balancer.accumulate()
    load = moe.last_expert_counts.float()
    model(torch.randint(0, 1000, (2, 16)))
    balancer.accumulate()
    load = load + moe.last_expert_counts.float()
    stats = balancer.step()
    expected = 1e-3 * torch.sign(load.mean() - load)
    assert torch.equal(moe.gate.e_score_correction_bias, expected)
    assert stats["expert_load_max_over_mean"][0] == pytest.approx(float(load.max() / load.mean()), rel=1e-3)
    assert stats["experts_without_tokens"][0] == int((load == 0).sum())


def test_sequence_aux_loss_matches_deepseek_v3_formula_and_trains_the_router():
    model = tiny_model()
    model.train()
    x = torch.randint(0, 1000, (2, 8))
    model(x)
    loss = optim.seq_aux_loss(model, batch_size=2, alpha=1e-3)
    moe = model.moe_layers()[0]
    E, K = moe.last_scores.shape[-1], moe.last_ids.shape[-1]
    ref = 0.0
    for b in range(2):
        s, ids = moe.last_scores.detach().view(2, 8, E)[b], moe.last_ids.view(2, 8, K)[b]
        f = F.one_hot(ids, E).sum((0, 1)).float() * E / (K * 8)
        P = (s / s.sum(-1, keepdim=True)).mean(0)
        ref += float((f * P).sum().detach()) / 2
    assert float(loss.detach()) == pytest.approx(1e-3 * ref, rel=1e-5)
    loss.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
