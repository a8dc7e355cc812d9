"""The fused, chunked head + cross-entropy (moonlet.loss): the same loss and gradients as HF transformers' own
loss, and as the unfused head in half precision, with several chunks and a ragged last one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moonlet
from moonlet import loss
from moonlet.quant import enable_qat


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 tokens at the tiny vocab of 320: a batch of 2 x 36 targets runs in 11 chunks, the last of 2."""
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 7 * 320)


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 320, (2, 37), generator=g)
    mask = torch.rand(2, 36, generator=g) > 0.25  # an SFT-style loss mask over the targets
    return ids, mask


def unfused(model, x, y, coef):
    return (F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="none") * coef.flatten()).sum()


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("tied", [False, True], ids=["separate head", "tied head"])
def test_loss_and_head_gradients_equal_hf_transformers(tiny_hf_checkpoint, small_chunks, tied):
    path, hf = tiny_hf_checkpoint(tie_word_embeddings=tied)
    model = moonlet.load(path)
    ids, mask = batch()
    labels = ids.clone()
    labels[:, 1:][~mask] = -100  # HF shifts labels inside; -100 drops a target from its mean
    hf_loss = hf(ids, labels=labels).loss
    hf_loss.backward()
    ours, ce = loss.head_cross_entropy(model, model(ids[:, :-1], head=False), ids[:, 1:], mask / mask.sum())
    ours.backward()
    assert abs(float(ours.detach()) - float(hf_loss.detach())) < 1e-5
    assert float((ce * mask.flatten()).sum() / mask.sum()) == pytest.approx(float(hf_loss.detach()), abs=1e-5)
    peers = {"lm_head.weight": hf.lm_head.weight, "embed_tokens.weight": hf.model.embed_tokens.weight,
             "norm.weight": hf.model.norm.weight,
             "layers.1.self_attn.o_proj.weight": hf.model.layers[1].self_attn.o_proj.weight}
    for name, peer in peers.items():  # a tied head's weight is the embedding's, under both names
        torch.testing.assert_close(model.get_parameter(name).grad, peer.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_every_gradient_equals_the_unfused_head_in_fp32(tiny_hf_checkpoint, small_chunks):
    model = moonlet.load(tiny_hf_checkpoint()[0])
    ids, mask = batch(2)
    x, y, coef = ids[:, :-1], ids[:, 1:], mask / mask.sum()
    unfused(model, x, y, coef).backward()
    want = grads(model)
    loss.head_cross_entropy(model, model(x, head=False), y, coef)[0].backward()
    got = grads(model)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-7, rtol=1e-5, msg=name)


def test_bf16_weights_match_the_unfused_bf16_head(tiny_hf_checkpoint, small_chunks):
    """bf16: logits rounded to bf16 before the fp32 softmax, the logit gradient rounded to bf16 for the matmuls,
    as in the unfused path; only the head weight's sum over chunks differs (fp32 here, one bf16 GEMM there)."""
    model = moonlet.load(tiny_hf_checkpoint()[0]).to(torch.bfloat16)
    ids, mask = batch(3)
    x, y, coef = ids[:, :-1], ids[:, 1:], mask / mask.sum()
    ref = unfused(model, x, y, coef)
    ref.backward()
    want = grads(model)
    ours = loss.head_cross_entropy(model, model(x, head=False), y, coef)[0]
    ours.backward()
    got = grads(model)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    for name in ("lm_head.weight", "norm.weight", "embed_tokens.weight"):
        assert got[name].dtype == torch.bfloat16
        torch.testing.assert_close(got[name].float(), want[name].float(), atol=2e-3, rtol=2e-2, msg=name)


def test_without_gradients_it_returns_each_tokens_loss(tiny_hf_checkpoint, small_chunks):
    model = moonlet.load(tiny_hf_checkpoint()[0])
    ids, mask = batch(4)
    with torch.no_grad():
        total, ce = loss.head_cross_entropy(model, model(ids[:, :-1], head=False), ids[:, 1:], mask)
        want = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    torch.testing.assert_close(ce, want, atol=1e-5, rtol=1e-5)
    assert float(total) == pytest.approx(float((want * mask.flatten()).sum()), rel=1e-5)


def test_a_fake_quantized_head_takes_the_unfused_path(tiny_hf_checkpoint, small_chunks):
    model = moonlet.load(tiny_hf_checkpoint()[0])
    enable_qat(model, targets=[r"^lm_head$"])
    assert type(model.lm_head) is not torch.nn.Linear
    ids, mask = batch(5)
    x, y, coef = ids[:, :-1], ids[:, 1:], mask / mask.sum()
    ref = unfused(model, x, y, coef)  # model(x) runs the fake-quantized head
    ours = loss.head_cross_entropy(model, model(x, head=False), y, coef)[0]
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
