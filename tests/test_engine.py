"""The engine, specified: latent-cache decode equals the full forward and HF's greedy generate; continuous
batching; sampling; stop ids/strings; thinking budgets; usage; prefix cache; chunked long prefill."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

import moonlet
from moonlet.engine import Engine, SamplingParams
from moonlet.kvcache import Decoder, PrefixCache
from moonlet.sampling import inverse_cdf, sample

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return moonlet.load("tiny", seed=0)


@pytest.fixture(scope="module")
def tok():
    from moonlet.tokenizer import load_tokenizer

    return load_tokenizer(None)


def full_forward_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The reference: run the plain training forward over the whole sequence for every new token."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([ids], device=model.embed_tokens.weight.device))[0, -1].argmax()))
            ids.append(out[-1])
    return out


def prompts(n: int, lengths, seed: int = 0, vocab: int = 32000) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


# --------------------------------------------------------------------------------------------- correctness


def rank_bounds(ref_row: torch.Tensor, lp: float, tol: float = 1e-4) -> tuple[int, int]:
    """The ranks a token of logprob lp can have in the peer's row, allowing for float differences in near-ties."""
    return 1 + int((ref_row > lp + tol).sum()), 1 + int((ref_row > lp - tol).sum())


def test_cache_holds_only_the_normalized_latent_and_rotated_rope_key(tiny):
    cfg = tiny.cfg
    eng = Engine(tiny, max_batch_size=2, max_seq_len=64)
    assert eng.cache.shape == (cfg.num_hidden_layers, 2, 65, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    [p] = prompts(1, [20])
    req = eng.submit(p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    eng.step()  # prefill + first decode step: the request now sits in slot 0
    layer = tiny.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(tiny.embed_tokens(torch.tensor([p])))
        c, k_pe = layer.self_attn.latent(x, *tiny.rope(torch.arange(len(p)), x.dtype))
    torch.testing.assert_close(eng.cache[0, 0, : len(p)], torch.cat([c, k_pe], -1)[0], rtol=1e-5, atol=1e-5)
    req.cancel()
    eng.step()
    assert req.finish_reason == "cancelled" and eng._n_dec == 0


def test_greedy_equals_full_forward_for_a_batch_of_different_lengths(tiny):
    ps = prompts(5, [3, 37, 18, 70, 9])
    # 2 slots for 5 requests: requests join and leave between decode steps; chunks of 16 split the prompts,
    # so later chunks attend to the cached prefix in the absorbed form
    eng = Engine(tiny, max_batch_size=2, max_seq_len=128, prefill_chunk=16)
    reqs = [eng.submit(p, SamplingParams(temperature=0, max_tokens=6 + 3 * i, ignore_eos=True))
            for i, p in enumerate(ps)]
    for r in reqs:
        r.result(timeout=60)
    for i, (p, r) in enumerate(zip(ps, reqs)):
        assert r.output_ids == full_forward_greedy(tiny, p, 6 + 3 * i)
        assert r.finish_reason == "length"
        assert r.usage == {"prompt_tokens": len(p), "cached_tokens": 0, "completion_tokens": 6 + 3 * i,
                           "reasoning_tokens": 0}


def test_a_burst_of_short_prompts_prefills_in_one_forward_with_the_solo_tokens(tiny, monkeypatch):
    """Prompts whose remaining tokens fit the prefill budget together run as one right-padded batch, each after
    its own cached prefix (a server's burst of requests behind one system prompt costs one forward, not one
    each); every request keeps the full forward's tokens. A prompt whose next block another member computes
    waits until that member is done, so it hits the cache."""
    from moonlet import engine as engine_module

    shapes = []
    batched = engine_module.prefill
    monkeypatch.setattr(engine_module, "prefill",
                        lambda model, toks, starts, *a: shapes.append((len(toks), max(map(len, toks)), starts))
                        or batched(model, toks, starts, *a))
    eng = Engine(tiny, max_batch_size=4, max_seq_len=96, prefill_chunk=128)
    ps = prompts(6, [3, 20, 9, 17, 1, 12], seed=3)
    reqs = [eng.submit(p, GREEDY) for p in ps]
    for r in reqs:
        r.result(timeout=60)
    assert shapes == [(4, 20, [0, 0, 0, 0]), (2, 12, [0, 0])]  # the 4 admitted at once, then the other 2
    for p, r in zip(ps, reqs):
        assert r.output_ids == full_forward_greedy(tiny, p, GREEDY.max_tokens)
        assert r.usage["cached_tokens"] == 0

    [system] = prompts(1, [35], seed=4)  # a shared prefix of two whole blocks, cached by a first request
    eng.submit(system + [7], GREEDY).result(timeout=60)
    shapes.clear()
    ps = [system + p for p in prompts(4, [5, 11, 2, 8], seed=5)]
    reqs = [eng.submit(p, GREEDY) for p in ps]
    for p, r in zip(ps, reqs):
        assert r.result(timeout=60).output_ids == full_forward_greedy(tiny, p, GREEDY.max_tokens)
        assert r.usage["cached_tokens"] == 32
    assert shapes == [(4, 14, [32, 32, 32, 32])]

    shapes.clear()
    [p] = prompts(1, [20], seed=6)
    reqs = [eng.submit(p, GREEDY) for _ in range(3)]
    assert [r.result(timeout=60).usage["cached_tokens"] for r in reqs] == [0, 16, 16]
    assert shapes == [(1, 20, [0]), (2, 4, [16, 16])]  # the first alone; the two that waited for its block, together
    assert all(r.output_ids == reqs[0].output_ids for r in reqs)


@pytest.mark.parametrize("overrides", [dict(attention_bias=True), dict(q_lora_rank=None), dict(n_shared_experts=0),
                                       dict(n_shared_experts=2, tie_word_embeddings=True), dict(rope_interleave=False)],
                         ids=["attention bias", "no q_lora", "no shared expert", "2 shared, tied", "no interleave"])
def test_every_decode_plan_branch_keeps_greedy_equal_to_the_full_forward(tiny_hf_checkpoint, overrides):
    path, _ = tiny_hf_checkpoint(**overrides)
    model = moonlet.load(path)
    ps = prompts(3, [9, 20, 4], seed=5, vocab=320)
    out = Engine(model, max_batch_size=2, max_seq_len=64).generate(
        ps, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for p, r in zip(ps, out):
        assert r.output_ids == full_forward_greedy(model, p, 10)


def test_int4_experts_decode_through_the_engine_like_their_full_forward():
    from moonlet import quant

    model = quant.quantize_model(moonlet.load("tiny", seed=2))
    ps = prompts(2, [11, 5], seed=3)
    out = Engine(model, max_batch_size=2, max_seq_len=64).generate(
        ps, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for p, r in zip(ps, out):
        assert r.output_ids == full_forward_greedy(model, p, 8)


def test_greedy_equals_hf_transformers_generate_in_fp32(tiny_hf_checkpoint):
    path, hf = tiny_hf_checkpoint()  # YaRN, q_lora, group-limited routing, shared expert, a dense layer
    model = moonlet.load(path)
    ps = prompts(2, [12], seed=1, vocab=hf.config.vocab_size)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ps), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          pad_token_id=0)[:, 12:].tolist()
    out = Engine(model, max_batch_size=2, max_seq_len=64).generate(
        ps, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert [r.output_ids for r in out] == ref


def test_logprobs_are_hf_transformers_log_softmax_of_every_emitted_token(tiny_hf_checkpoint):
    """Greedy and sampled requests batched with one that asks for none: each emitted token's logprob and its top
    alternatives are the peer's own distribution at that position (raw logits, before temperature / top-k)."""
    path, hf = tiny_hf_checkpoint()
    model = moonlet.load(path)
    ps = prompts(3, [12, 7, 9], seed=2, vocab=hf.config.vocab_size)
    eng = Engine(model, max_batch_size=3, max_seq_len=64)
    kws = [dict(temperature=0, logprobs=3), dict(temperature=0.9, top_k=20, seed=1, logprobs=0), {}]
    reqs = [eng.submit(p, SamplingParams(max_tokens=16, ignore_eos=True, **kw)) for p, kw in zip(ps, kws)]
    for r in reqs:
        r.result()
    assert reqs[2].output_logprobs is None
    for p, r, k in zip(ps, reqs[:2], (3, 0)):
        assert len(r.output_logprobs) == len(r.output_ids) == 16
        with torch.no_grad():
            ref = hf(torch.tensor([p + r.output_ids])).logits[0, len(p) - 1 : -1].log_softmax(-1)
        for i, (tok, (lp, top, rank)) in enumerate(zip(r.output_ids, r.output_logprobs)):
            assert lp == pytest.approx(float(ref[i, tok]), abs=1e-4)
            assert rank_bounds(ref[i], lp)[0] <= rank <= rank_bounds(ref[i], lp)[1]
            vals, ids = ref[i].topk(k) if k else (ref[i, :0], ref[i, :0].long())
            assert [t for t, _ in top] == ids.tolist()
            assert [v for _, v in top] == pytest.approx(vals.tolist(), abs=1e-4)
        if k:  # greedy: the emitted token is the most likely one
            assert all(top[0] == (tok, lp) and rank == 1 for tok, (lp, top, rank) in zip(r.output_ids, r.output_logprobs))


def test_prompt_logprobs_are_hf_transformers_log_softmax_of_every_prompt_token(tiny_hf_checkpoint):
    """Each prompt token after the first gets the peer's logprob of it and its top alternatives, whether the
    prompt is prefilled in chunks, batched with others, or already in the prefix cache (which such a request
    skips: a cached position's logits were never computed)."""
    path, hf = tiny_hf_checkpoint()
    model = moonlet.load(path)
    ps = prompts(2, [21, 9], seed=3, vocab=hf.config.vocab_size)
    eng = Engine(model, max_batch_size=4, max_seq_len=64, prefill_chunk=8, block_size=4)
    eng.submit(ps[0], SamplingParams(max_tokens=1)).result()  # puts ps[0]'s blocks in the prefix cache
    params = [SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=k) for k in (2, 0)]
    reqs = [eng.submit(p, sp) for p, sp in zip(ps, params)] + [eng.submit(ps[0], SamplingParams(max_tokens=1))]
    for r in reqs:
        r.result()
    assert reqs[0].usage["cached_tokens"] == 0 and reqs[2].usage["cached_tokens"] > 0
    assert reqs[2].prompt_logprobs is None and reqs[0].output_logprobs is None
    for p, r, k in zip(ps, reqs, (2, 0)):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0, :-1].log_softmax(-1)
        assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(p)
        for i, (tok, (lp, top, rank)) in enumerate(zip(p[1:], r.prompt_logprobs[1:])):
            assert lp == pytest.approx(float(ref[i, tok]), abs=1e-4)
            assert rank_bounds(ref[i], lp)[0] <= rank <= rank_bounds(ref[i], lp)[1]
            vals, ids = ref[i].topk(k) if k else (ref[i, :0], ref[i, :0].long())
            assert [t for t, _ in top] == ids.tolist()
            assert [v for _, v in top] == pytest.approx(vals.tolist(), abs=1e-4)
    only = eng.submit(ps[1], SamplingParams(max_tokens=0, prompt_logprobs=0)).result()  # prefill only: scoring
    assert only.output_ids == [] and only.finish_reason == "length" and only.usage["completion_tokens"] == 0
    assert [x.logprob for x in only.prompt_logprobs[1:]] == pytest.approx([x.logprob for x in reqs[1].prompt_logprobs[1:]])


def test_penalties_bias_and_min_tokens_give_hf_transformers_greedy_tokens(tiny_hf_checkpoint):
    """Batched together, each request's logit adjustments act on its own row only, and each gives the greedy tokens
    of HF transformers' generate with the same setting: repetition_penalty, logit_bias (HF's sequence_bias of
    single ids) and min_tokens (HF's min_new_tokens, which keeps the stop token away)."""
    path, hf = tiny_hf_checkpoint()
    model = moonlet.load(path)
    ps = prompts(4, [12, 9, 10, 7], seed=4, vocab=hf.config.vocab_size)
    eng = Engine(model, max_batch_size=4, max_seq_len=64)
    free = [r.output_ids for r in eng.generate(ps, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))]
    eos = free[2][2]  # the model's third token: as a stop token it ends request 2 after two tokens, unless min_tokens
    bias = {free[1][0]: -100.0, free[1][5]: 4.0}
    cases = [(dict(repetition_penalty=1.5), dict(repetition_penalty=1.5)),
             (dict(logit_bias=bias), dict(sequence_bias={(k,): v for k, v in bias.items()})),
             (dict(min_tokens=6, stop_token_ids=(eos,)), dict(min_new_tokens=6, eos_token_id=eos)),
             ({}, {})]
    reqs = [eng.submit(p, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **ours))
            for p, (ours, _) in zip(ps, cases)]
    for p, r, (_, theirs) in zip(ps, reqs, cases):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0,
                              **({"min_new_tokens": 16} | theirs))[0, len(p):].tolist()
        if "eos_token_id" in theirs and ref[-1] == eos:
            ref = ref[:-1]  # HF keeps the stop token; moonlet (like vLLM) does not
        assert r.result().output_ids == ref
    assert reqs[3].output_ids == free[3] and all(r.output_ids != f for r, f in zip(reqs[:3], free))
    stopped = eng.submit(ps[2], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=(eos,))).result()
    assert stopped.output_ids == free[2][:2]


def test_frequency_and_presence_penalties_follow_openais_formula(tiny_hf_checkpoint):
    """OpenAI's definition: logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty, counts over
    the generated tokens only; checked greedy against that formula on HF transformers' logits, step by step."""
    path, hf = tiny_hf_checkpoint()
    eng = Engine(moonlet.load(path), max_batch_size=2, max_seq_len=64)
    p = prompts(1, [10], seed=5, vocab=hf.config.vocab_size)[0]
    for freq, pres in ((0.8, 0.0), (0.3, 1.5)):
        r = eng.submit(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, frequency_penalty=freq,
                                         presence_penalty=pres)).result()
        out: list[int] = []
        for _ in range(12):
            with torch.no_grad():
                logits = hf(torch.tensor([p + out])).logits[0, -1]
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
            out.append(int((logits - freq * counts - pres * (counts > 0)).argmax()))
        assert r.output_ids == out
    free = eng.submit(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)).result().output_ids
    assert free != out and len(set(free)) < len(set(out))  # the penalty spread the tokens out


def test_a_forced_think_end_gets_the_models_logprob_of_it(tiny, tok):
    from moonlet.chat import render_ids

    prompt, _ = render_ids([{"role": "user", "content": "What is 2+2?"}], tok, add_generation_prompt=True)
    r = Engine(tiny, tok, max_seq_len=128).submit(
        prompt, SamplingParams(temperature=0, max_tokens=6, max_thinking_tokens=3, logprobs=1)).result()
    assert r.output_ids[3] == tok.think_end_id and len(r.output_logprobs) == 6
    with torch.no_grad():
        ref = tiny(torch.tensor([prompt + r.output_ids]))[0, len(prompt) - 1 : -1].log_softmax(-1)
    lp, top, rank = r.output_logprobs[3]
    assert lp == pytest.approx(float(ref[3, tok.think_end_id]), abs=1e-4) and top[0][0] == int(ref[3].argmax())
    assert rank_bounds(ref[3], lp)[0] <= rank <= rank_bounds(ref[3], lp)[1] and rank > 1
    assert top[0][0] != tok.think_end_id  # the budget forced it; the model would have said something else


def test_requests_joining_mid_generation_get_the_same_tokens(tiny):
    a, b = prompts(2, [30, 11], seed=3)
    eng = Engine(tiny, max_batch_size=4, max_seq_len=128)
    ra = eng.submit(a, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for _ in range(5):
        eng.step()
    rb = eng.submit(b, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    ra.result(), rb.result()
    assert ra.output_ids == full_forward_greedy(tiny, a, 20)
    assert rb.output_ids == full_forward_greedy(tiny, b, 5)


# all experts / gathered / sorted (many rows) / sorted (experts too big to copy); INT4 and QAT: gathered / sorted
@pytest.mark.parametrize("experts,rows,width,kind,sorted_path", [
    (8, 1, 32, "plain", False), (16, 3, 32, "plain", False), (16, 40, 32, "plain", True),
    (16, 2, 4096, "plain", True), (8, 3, 32, "int4", False), (8, 2, 4096, "int4", True), (16, 3, 32, "qat", False),
    (16, 40, 32, "qat", True)])
def test_moe_decode_equals_the_moe_forward_on_every_cpu_path(experts, rows, width, kind, sorted_path, monkeypatch):
    import dataclasses

    from moonlet.kvcache import moe_decode
    from moonlet.model import Experts, MoE

    calls = []
    forward = Experts.forward
    monkeypatch.setattr(Experts, "forward", lambda self, *a, **kw: calls.append(1) or forward(self, *a, **kw))
    cfg = dataclasses.replace(moonlet.ModelConfig.from_preset("tiny"), n_routed_experts=experts,
                              moe_intermediate_size=width)
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe.gate.e_score_correction_bias.normal_(0, 0.3)
    if kind == "int4":
        from moonlet.quant import Int4Experts

        moe.experts = Int4Experts.from_experts(moe.experts, cfg)
    elif kind == "qat":  # the forward runs on fake-quantized weights: so must the gathered ones
        from moonlet.quant import enable_qat

        assert enable_qat(moe, targets=[r"^experts$"]) == ["experts"]
    x = torch.randn(rows, cfg.hidden_size)
    with torch.no_grad():
        out = moe_decode(moe, x)
        assert bool(calls) == sorted_path
        torch.testing.assert_close(out, moe(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens(tiny):
    """Opt-in torch.compile (MOONLET_COMPILE=1) with bucketed static shapes: batch 3 runs padded to 4."""
    ps = prompts(3, [9, 30, 17], seed=12)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    eng = Engine(tiny, max_batch_size=4, max_seq_len=64)
    eng.decoder = Decoder(tiny, eng.cache, compile=True)
    out = eng.generate(ps, params)
    assert eng.decoder.compiled is not None, "compile fell back to eager"
    assert [r.output_ids for r in out] == [full_forward_greedy(tiny, p, 10) for p in ps]


# --------------------------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(tiny):
    [p] = prompts(1, [10], seed=4)
    eng = Engine(tiny, max_batch_size=4, max_seq_len=64)
    hot = dict(temperature=1.5, max_tokens=12, ignore_eos=True)
    r1, r2, r3 = [eng.submit(p, SamplingParams(seed=s, **hot)) for s in (7, 7, 8)]
    for r in (r1, r2, r3):
        r.result()
    assert r1.output_ids == r2.output_ids != r3.output_ids
    k1 = eng.submit(p, SamplingParams(top_k=1, seed=5, **hot)).result()
    assert k1.output_ids == full_forward_greedy(tiny, p, 12)


def test_sample_follows_the_distribution_and_top_p_cuts_the_tail():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    freq = torch.bincount(sample(logits, [SamplingParams()] * 4000, gens), minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    nucleus = sample(logits, [SamplingParams(top_p=0.7)] * 4000, gens)  # keeps {0.5, 0.3}
    assert set(nucleus.tolist()) == {0, 1}
    cold = sample(logits[:5], [SamplingParams(temperature=0)] * 5, gens[:5])
    assert cold.tolist() == [0] * 5
    holes = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")]]).repeat(4000, 1)  # ids 1, 3: probability 0
    assert set(sample(holes, [SamplingParams()] * 4000, gens).tolist()) == {0, 2}
    floor = sample(logits, [SamplingParams(min_p=0.5)] * 4000, gens)  # keeps p >= 0.25: {0.5, 0.3}
    freq = torch.bincount(floor, minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0, 0]), atol=0.03, rtol=0)
    hot = sample(logits, [SamplingParams(temperature=2.0, min_p=0.5)] * 4000, gens)  # after temperature: 0.15 stays
    assert set(hot.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("vocab", [5, 256, 1000, 4099])  # under, at, and off a whole number of blocks
def test_two_level_inverse_cdf_draws_what_the_full_cumsum_draws(vocab):
    gen = torch.Generator().manual_seed(vocab)
    probs = torch.rand(3000, vocab, generator=gen) * (torch.rand(3000, vocab, generator=gen) > 0.6)
    probs[:, 0] += 1e-3  # every row is a distribution; about 60% of the ids have probability 0
    u = torch.rand(3000, generator=gen)
    cdf = probs.cumsum(-1)
    full = torch.searchsorted(cdf, ((1 - u) * cdf[:, -1])[:, None])[:, 0]
    drawn = inverse_cdf(probs, u)
    assert torch.equal(drawn, full)
    assert bool((probs.gather(1, drawn[:, None]) > 0).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling_is_seeded_and_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], device="cuda")).repeat(4000, 1)
    params = [SamplingParams()] * 4000
    draws = [sample(logits, params, [torch.Generator(device="cuda").manual_seed(i) for i in range(4000)])
             for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    freq = torch.bincount(draws[0], minlength=4).float().cpu() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)


def test_stop_token_ids_end_the_request_without_the_stop_token(tiny):
    [p] = prompts(1, [16], seed=5)
    ref = full_forward_greedy(tiny, p, 10)
    stop = next(t for t in ref[3:] if t not in ref[:3])
    cut = ref.index(stop)
    r = Engine(tiny, max_seq_len=64).submit(p, SamplingParams(temperature=0, max_tokens=10,
                                                              stop_token_ids=(stop,))).result()
    assert r.output_ids == ref[:cut] and r.finish_reason == "stop"
    assert r.usage["completion_tokens"] == cut + 1  # the stop token was generated, not returned


def test_stop_strings_are_cut_from_the_output_and_the_stream(tiny, tok):
    [p] = prompts(1, [16], seed=6)
    ref = full_forward_greedy(tiny, p, 12)
    text = tok.decode(ref)
    start = len(tok.decode(ref[:6]))
    stop = text[start : start + 3]
    assert stop and text.find(stop) == start, "pick a prompt whose greedy text has a fresh 3-char span"
    eng = Engine(tiny, tok, max_seq_len=64).start()
    try:
        req = eng.submit(p, SamplingParams(temperature=0, max_tokens=12, stop=(stop,)))
        streamed = list(req.stream())
    finally:
        eng.stop()
    assert req.finish_reason == "stop"
    assert streamed == req.output_ids == ref[:6]


def test_a_stop_string_starting_inside_a_token_keeps_the_text_before_it(tiny, tok):
    """As OpenAI and vLLM do, the text ends exactly where the stop string starts: the token it starts in is
    replaced by the tokens of its part before the stop string."""
    [p] = prompts(1, [16], seed=6)
    ref = full_forward_greedy(tiny, p, 12)
    text = tok.decode(ref)
    spans = [(len(tok.decode(ref[:k])) + 1, k) for k in range(1, 12) if len(tok.decode(ref[k:k + 1])) >= 2]
    start, k = next((s, k) for s, k in spans if text.find(text[s:s + 2]) == s and "\ufffd" not in text[:s + 2])
    eng = Engine(tiny, tok, max_seq_len=64).start()
    try:
        req = eng.submit(p, SamplingParams(temperature=0, max_tokens=12, stop=(text[start:start + 2],), logprobs=0))
        streamed = list(req.stream())
    finally:
        eng.stop()
    assert req.finish_reason == "stop" and streamed == req.output_ids
    assert req.output_ids[:k] == ref[:k] and tok.decode(req.output_ids) == text[:start]
    assert req.usage["completion_tokens"] == k + 1
    lps = req.output_logprobs  # aligned with the output; the re-encoded part was never sampled: no logprob
    assert len(lps) == len(req.output_ids) > k and None not in lps[:k] and set(lps[k:]) == {None}


def test_stop_strings_never_match_special_tokens(tiny, tok):
    """The forced </think> is structure, not text: a stop string spelling it does not end the request."""
    from moonlet.chat import render_ids

    prompt, _ = render_ids([{"role": "user", "content": "What is 2+2?"}], tok, add_generation_prompt=True)
    eng = Engine(tiny, tok, max_seq_len=128)
    params = SamplingParams(temperature=0, max_tokens=8, max_thinking_tokens=2, stop=("</think>", "think"))
    r = eng.submit(prompt, params).result()
    plain = eng.submit(prompt, SamplingParams(temperature=0, max_tokens=8, max_thinking_tokens=2)).result()
    assert tok.think_end_id in r.output_ids and "think" not in tok.decode(plain.output_ids[3:])
    assert r.finish_reason == "length" and r.output_ids == plain.output_ids


def test_max_thinking_tokens_forces_think_end_and_the_answer_continues(tiny, tok):
    from moonlet.chat import render_ids

    prompt, _ = render_ids([{"role": "user", "content": "What is 2+2?"}], tok, add_generation_prompt=True)
    eng = Engine(tiny, tok, max_seq_len=128)
    r = eng.submit(prompt, SamplingParams(temperature=0, max_tokens=12, max_thinking_tokens=5)).result()
    assert r.output_ids[5] == tok.think_end_id and tok.think_end_id not in r.output_ids[:5]
    assert len(r.output_ids) == 12 and r.finish_reason == "length"
    assert r.usage["reasoning_tokens"] == 5 and r.usage["completion_tokens"] == 12
    free = eng.submit(prompt, SamplingParams(temperature=0, max_tokens=12)).result()
    assert free.usage["reasoning_tokens"] == 12 and free.output_ids[:5] == r.output_ids[:5]


# --------------------------------------------------------------------------------------------- prefix cache


def test_an_agent_step_extending_the_previous_prompt_hits_the_prefix_cache(tiny):
    p1, extra = prompts(2, [40, 7], seed=7)
    eng = Engine(tiny, max_seq_len=256, block_size=16)
    r1 = eng.submit(p1, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)).result()
    p2 = p1 + r1.output_ids + extra  # the next step re-sends the conversation plus a tool result
    r2 = eng.submit(p2, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)).result()
    assert r1.usage["cached_tokens"] == 0
    assert r2.usage["cached_tokens"] == 48  # prompt + generated latents, in whole 16-token blocks
    assert r2.output_ids == full_forward_greedy(tiny, p2, 6)


def test_heavy_mode_branches_share_the_prompt_through_the_prefix_cache(tiny):
    [p] = prompts(1, [70], seed=8)
    eng = Engine(tiny, max_batch_size=4, max_seq_len=128, prefill_chunk=32)
    reqs = [eng.submit(p, SamplingParams(temperature=1.0, seed=i, max_tokens=5, ignore_eos=True)) for i in range(4)]
    for r in reqs:
        r.result()
    assert [r.usage["cached_tokens"] for r in reqs] == [0, 64, 64, 64]
    solo = Engine(tiny, max_seq_len=128).submit(p, SamplingParams(temperature=1.0, seed=2, max_tokens=5,
                                                                   ignore_eos=True)).result()
    assert solo.output_ids == reqs[2].output_ids  # a hit changes nothing but the time


def test_prefix_cache_evicts_least_recently_used_blocks_under_its_memory_cap():
    kv = torch.randn(2, 64, 8)  # [L, S, K]: one block of 16 tokens is 2*16*8*4 = 1024 bytes
    cache = PrefixCache(max_bytes=3 * 1024, block_size=16)
    a, b = list(range(32)), list(range(100, 132))
    cache.insert(a, kv)
    cache.insert(b, kv)
    assert cache.bytes <= 3 * 1024 and len(cache.blocks) == 3
    assert len(cache.lookup(b)) == 2  # the newest survive
    assert len(cache.lookup(a)) == 0  # a's first block was evicted, so a's chain is gone
    torch.testing.assert_close(cache.lookup(b + [1])[1], kv[:, 16:32])


def test_a_prompt_longer_than_the_cap_keeps_its_head_not_an_unreachable_tail():
    cache = PrefixCache(max_bytes=4 * 16, block_size=4)  # four blocks of 4 fp32 values
    cache.insert(list(range(32)), torch.arange(32.0).view(1, 32, 1))
    hit = cache.lookup(list(range(32)))
    assert len(hit) == 4 and torch.cat(hit, dim=1).flatten().tolist() == list(range(16))


# --------------------------------------------------------------------------------------------- threads, limits


def test_threads_submit_and_stream_concurrently_and_cancel_frees_the_slot(tiny):
    eng = Engine(tiny, max_batch_size=2, max_seq_len=256).start()
    try:
        ps = prompts(4, [5, 9], seed=9)
        results: dict[int, list[int]] = {}

        def worker(i: int) -> None:
            req = eng.submit(ps[i], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
            results[i] = list(req)

        long = eng.submit(ps[0], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        long.cancel()
        for t in threads:
            t.join(timeout=60)
        assert long.result(timeout=30).finish_reason == "cancelled"
        for i in range(4):
            assert results[i] == full_forward_greedy(tiny, ps[i], 6)
    finally:
        eng.stop()
    assert eng._n_dec == 0 and not eng._prefilling


def test_a_listener_is_told_of_each_release_and_the_finish_on_the_engine_thread(tiny):
    """What the server's single SSE writer relies on: no waiting thread per request."""
    eng = Engine(tiny, max_batch_size=2, max_seq_len=64).start()
    heard = []
    try:
        req = eng.submit([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                         listener=lambda r: heard.append((threading.current_thread().name, len(r.output_ids),
                                                          r.finished)))
        req.result(timeout=60)
    finally:
        eng.stop()
    assert {name for name, _, _ in heard} == {"moonlet-engine"}
    assert [(n, done) for _, n, done in heard] == [(1, False), (2, False), (3, False), (4, False), (5, False),
                                                    (6, False), (6, True)]


LOOP_THREADS_SCRIPT = """
import torch, moonlet
from moonlet.engine import Engine, SamplingParams
model = moonlet.load("tiny")  # the process never asks for or sets its thread count (OMP_NUM_THREADS=2)
eng = Engine(model, max_batch_size=2, max_seq_len=64).start()
prompt = [5, 6, 7, 8, 9, 10, 11, 12]
out = eng.submit(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)).result(timeout=120)
eng.stop()
ref = Engine(model, max_batch_size=1, max_seq_len=64).generate([prompt], SamplingParams(
    temperature=0, max_tokens=8, ignore_eos=True))[0]
print(torch.get_num_threads(), eng.loop_threads, out.output_ids == ref.output_ids)
"""


def test_the_cpu_loop_thread_picks_its_own_thread_count_and_leaves_the_callers():
    """A background loop times scratch decode steps with the caller's intra-op threads and with one and keeps
    the faster for itself only (a fresh process: the caller never set a count, the case where OpenMP would
    otherwise hand the loop's choice to it too); the scratch steps do not touch any sequence's tokens."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    run = subprocess.run([sys.executable, "-c", LOOP_THREADS_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    caller, loop, same = run.stdout.split()
    assert (caller, same) == ("2", "True") and loop in ("1", "2")


def test_bad_requests_are_refused_with_a_clear_error(tiny):
    eng = Engine(tiny, max_seq_len=32)
    with pytest.raises(ValueError, match="empty"):
        eng.submit([], GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        eng.submit([1, 10**6], GREEDY)
    with pytest.raises(ValueError, match="max_seq_len"):
        eng.submit(list(range(40)), GREEDY)
    with pytest.raises(ValueError, match="top_p"):
        eng.submit([1, 2], SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="tokenizer"):  # this engine has none to match text with
        eng.submit([1, 2], SamplingParams(stop=("\n",)))
    with pytest.raises(ValueError, match="integer token ids"):
        eng.submit([1, 2.5], GREEDY)
    for seed in (-1, 2**64, 1.5):  # torch.Generator refuses these: caught here, not in the loop that serves all
        with pytest.raises(ValueError, match="seed"):
            eng.submit([1, 2], SamplingParams(seed=seed))
    for k in (-1, 21, True):
        with pytest.raises(ValueError, match=r"logprobs .*must be None or an integer in \[0, 20\]"):
            eng.submit([1, 2], SamplingParams(logprobs=k))
    edge = eng.submit([1, 2], SamplingParams(seed=2**64 - 1, max_tokens=2)).result()
    assert edge.finish_reason in ("length", "stop")


@pytest.mark.parametrize("kw", [{"max_batch_size": 0}, {"prefill_chunk": -1}, {"block_size": 0},
                                {"max_seq_len": 10**9}])
def test_an_engine_with_impossible_sizes_is_refused_when_built(tiny, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        Engine(tiny, **kw)


def test_a_listener_that_raises_fails_its_own_request_only(tiny):
    eng = Engine(tiny, max_batch_size=4, max_seq_len=128).start()
    try:
        def buggy(req):
            if len(req.output_ids) >= 3:
                raise RuntimeError("listener bug")

        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        ok = [eng.submit(p, params, listener=lambda r: None) for p in prompts(2, [6, 9], seed=4)]
        bad = eng.submit(list(range(1, 8)), params, listener=buggy)
        assert bad.result(timeout=60).finish_reason == "error" and "listener bug" in bad.error
        assert [r.result(timeout=60).finish_reason for r in ok] == ["length", "length"]
        assert eng.running and eng.submit([1, 2], params).result(timeout=60).finish_reason == "length"
    finally:
        eng.stop()


def test_stop_finishes_the_requests_in_flight_and_refuses_new_ones(tiny):
    eng = Engine(tiny, max_batch_size=2, max_seq_len=512).start()
    finished = []
    reqs = [eng.submit(p, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True),
                       listener=lambda r: r.finished and finished.append(r)) for p in prompts(5, [5, 9], seed=2)]
    eng.stop()  # two decoding, three queued
    assert all(r.finished and r.finish_reason in ("cancelled", "length") for r in reqs)
    assert sorted(map(id, finished)) == sorted(map(id, reqs))  # each listener heard its finish
    with pytest.raises(RuntimeError, match="stopped"):
        eng.submit([1, 2], GREEDY)
    assert eng.start().submit([1, 2], SamplingParams(temperature=0, max_tokens=2)).result(timeout=60).finished
    eng.stop()


def test_a_full_cache_slot_ends_generation_with_length(tiny):
    r = Engine(tiny, max_seq_len=20).submit(list(range(1, 15)), SamplingParams(temperature=0, max_tokens=50,
                                                                               ignore_eos=True)).result()
    assert r.finish_reason == "length" and len(r.prompt_ids) + len(r.output_ids) == 21


def test_the_engine_sizes_its_context_from_the_memory_budget(tiny):
    from moonlet.costs import kv_bytes_per_token

    per_token = kv_bytes_per_token(tiny.cfg, bytes_per_value=4)
    eng = Engine(tiny, max_batch_size=4, kv_cache_bytes=4 * 1000 * per_token)
    assert eng.max_seq_len == 1000 and eng.tokens_that_fit(per_token * 123) == 123


@pytest.mark.slow
def test_a_16k_token_prompt_prefills_in_chunks_on_cpu(tiny):
    """Chunks of 2048 attend to the cached latent prefix; memory stays O(cache + chunk)."""
    [p] = prompts(1, [16384], seed=10)
    eng = Engine(tiny, max_batch_size=1, max_seq_len=16400, prefill_chunk=2048)
    assert eng.cache.numel() * 4 < 6 * 2**20  # the whole 16K context: 2 layers x 40 values x 4 bytes
    r = eng.submit(p, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)).result(timeout=120)
    assert r.finish_reason == "length" and len(r.output_ids) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager_decode():
    model = moonlet.load("tiny", device="cuda", dtype=torch.bfloat16)
    ps = prompts(3, [9, 30, 17], seed=11)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    graphs = Engine(model, max_batch_size=4, max_seq_len=128, cuda_graphs=True).generate(ps, params)
    eager = Engine(model, max_batch_size=4, max_seq_len=128, cuda_graphs=False).generate(ps, params)
    assert [r.output_ids for r in graphs] == [r.output_ids for r in eager]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_of_the_compiled_step_give_the_eager_steps_logits():
    """compile=True on CUDA: each graph captures the torch.compile'd step (fused kernels, fewer of them). bf16,
    where the experts run on torch._grouped_mm: fp32 experts loop over a host-side split, which neither
    compiles whole nor captures (such a decoder warns and runs eagerly). Fusion rounds differently, so the
    logits are compared within bf16's resolution, not the greedy tokens of a random model."""
    model = moonlet.load("tiny", device="cuda", dtype=torch.bfloat16)
    cfg = model.cfg
    gen = torch.Generator("cuda").manual_seed(0)
    cache = torch.randn(cfg.num_hidden_layers, 4, 65, cfg.kv_latent_dim, device="cuda", generator=gen) * 0.5
    tokens = torch.tensor([3, 141, 59], device="cuda")
    positions = torch.tensor([5, 20, 33], device="cuda")
    ref = Decoder(model, cache.bfloat16(), use_graphs=False, compile=False)(tokens, positions, 34).float()
    decoder = Decoder(model, cache.bfloat16(), use_graphs=True, compile=True)
    out = decoder(tokens, positions, 34).float()
    assert decoder.mode == "cuda_graphs+compiled", "compile fell back to eager"
    assert (out - ref).abs().max() <= 3e-2 * ref.abs().max()
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999


# --------------------------------------------------------------------------------------------- command line


def test_generate_cli_streams_chat_reasoning_apart_from_the_answer(capsys):
    import json

    from moonlet.generate import cli_generate

    assert cli_generate(["--model", "tiny", "--prompt", "Hi", "--chat", "--max-tokens", "6",
                         "--max-thinking-tokens", "3", "--temperature", "0", "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["usage"]["reasoning_tokens"] == 3 and result["usage"]["completion_tokens"] == 6
    assert "[reasoning]" in err and "[answer]" in err  # the forced </think> switches the stream to the answer
    assert set(result) >= {"reasoning_content", "content", "tool_calls", "finish_reason", "output_ids"}


@pytest.mark.slow
def test_generate_cli_compile_flag_compiles_the_decode_step_and_keeps_the_tokens(capsys):
    import json

    from moonlet.generate import cli_generate

    results = []
    for extra in ([], ["--compile"]):
        assert cli_generate(["--model", "tiny", "--prompt", "The capital of France is", "--max-tokens", "8",
                             "--temperature", "0", "--json", *extra]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    eager, compiled = results
    assert (eager["decode"], compiled["decode"]) == ("eager", "compiled")
    assert compiled["output_ids"] == eager["output_ids"]


def test_prefix_cache_bench_reports_the_hit_as_cached_tokens(capsys):
    import json

    from moonlet.generate import cli_bench_prefix_cache

    assert cli_bench_prefix_cache(["--model", "tiny", "--prefix-len", "128", "--suffix-len", "8", "--repeats", "1",
                                   "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["cached_tokens"] == 128 and result["ttft_hit_ms"] > 0 and result["ttft_miss_ms"] > 0
    with pytest.raises(SystemExit):  # tiny's context is 32768
        cli_bench_prefix_cache(["--model", "tiny", "--prefix-len", "40000"])
    assert "over the model's context" in capsys.readouterr().err


def test_decode_bench_runs_hf_on_the_same_weights_and_int4_against_bf16_in_one_process(capsys):
    import json

    from moonlet.generate import cli_bench_decode

    assert cli_bench_decode(["--model", "tiny", "--batch", "1,2", "--prompt-len", "16", "--new-tokens", "8",
                             "--compare", "hf", "--quant", "none,int4", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {(r["quant"], r["batch"]): r for r in result["results"]}
    assert set(rows) == {("none", 1), ("none", 2), ("int4", 1), ("int4", 2)}
    for batch in (1, 2):
        bf16, int4 = rows["none", batch], rows["int4", batch]
        # fp32 on CPU: every greedy token is the argmax of HF's own full forward over the same prefix
        assert bf16["greedy_tokens_match_hf_forward"] == 1.0
        assert bf16["hf_tokens_per_s"] > 0 and bf16["speedup_vs_hf"] > 0 and bf16["moonlet_decode"] == "eager"
        assert "hf_tokens_per_s" not in int4  # HF runs the unquantized weights only
        assert int4["speedup_vs_unquantized"] > 0 and 0 <= int4["greedy_tokens_identical_to_unquantized"] <= 1


def test_decode_bench_refuses_an_unknown_quant_before_loading_anything(capsys):
    from moonlet.generate import cli_bench_decode

    with pytest.raises(SystemExit):
        cli_bench_decode(["--model", "tiny", "--quant", "int8"])
    assert "--quant 'int8'" in capsys.readouterr().err


def test_decode_bench_still_times_moonlet_when_the_hf_peer_fails(capsys, monkeypatch):
    import json

    from moonlet import generate

    def broken_twin(model):
        raise RuntimeError("transformers has no such layout")

    monkeypatch.setattr(generate, "hf_twin", broken_twin)
    assert generate.cli_bench_decode(["--model", "tiny", "--prompt-len", "8", "--new-tokens", "4", "--compare", "hf",
                                      "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "no such layout" in result["hf_error"] and result["results"][0]["moonlet_tokens_per_s"] > 0


def test_the_readmes_engine_example_runs(capsys):
    """The README's Engine snippet, run as written (so the README stays true)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "Engine(" in b]
    exec(compile("import moonlet\n" + block, "README.md", "exec"), {})
    reason, usage = capsys.readouterr().out.strip().splitlines()[-1].split(" ", 1)
    assert reason == "length" and "'completion_tokens': 32" in usage and "'reasoning_tokens': 16" in usage
