"""Sampling parameters and the on-device sampler of the engine: temperature, top-k, top-p, then one uniform per
row from the request's generator inverting the CDF (seeded requests repeat; no host sync)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["SamplingParams", "LogitAdjuster", "sample", "inverse_cdf", "token_logprobs", "TokenLogprob"]

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> off
    seed: int | None = None
    max_tokens: int = 256  # completion tokens, reasoning included; 0: prefill only (prompt_logprobs, prefix cache)
    stop_token_ids: tuple[int, ...] = ()  # the tokenizer's stop ids (<|im_end|>, [EOS]) are added unless ignore_eos
    stop: tuple[str, ...] = ()  # stop strings, matched on the visible text (not special tokens); cut from the output
    max_thinking_tokens: int | None = None  # when reasoning reaches it, the engine forces </think>
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens
    logprobs: int | None = None  # None: off; k: each emitted token's log-probability and the k most likely ids
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (such a prompt skips the
    # prefix cache: a cached position's logits were never computed)
    # logit adjustments, applied in vLLM's order before temperature (logprobs stay the model's raw ones):
    min_tokens: int = 0  # stop tokens cannot end the request before this many completion tokens (vLLM's)
    logit_bias: dict[int, float] | None = None  # added to those ids' logits, each in [-100, 100] (OpenAI's)
    repetition_penalty: float = 1.0  # ids seen in prompt or output: logit / it if > 0, else * it (HF, vLLM)
    frequency_penalty: float = 0.0  # minus it x how often the id was generated (OpenAI's; output only)
    presence_penalty: float = 0.0  # minus it once the id was generated (OpenAI's; output only)
    min_p: float = 0.0  # after temperature, drop ids less likely than min_p x the most likely one (vLLM's)

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.min_tokens or self.logit_bias or self.repetition_penalty != 1 or self.frequency_penalty
                    or self.presence_penalty)

    def validate(self) -> None:
        """Raise ValueError naming the bad field; None for top_p / top_k / stop means "off" (HTTP bodies)."""
        self.top_p = 1.0 if self.top_p is None else self.top_p
        self.top_k = 0 if self.top_k is None else self.top_k
        self.stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        self.stop_token_ids = tuple(self.stop_token_ids or ())

        def need(cond: bool, name: str, why: str) -> None:
            if not cond:
                raise ValueError(f"SamplingParams.{name} = {getattr(self, name)!r}: {why}")

        need(self.temperature >= 0, "temperature", "must be >= 0 (0 is greedy)")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.top_k >= 0, "top_k", "must be >= 0 (0 is off)")
        need(self.max_tokens >= 0, "max_tokens", "must be >= 0 (0: prefill only)")
        need(self.max_thinking_tokens is None or self.max_thinking_tokens >= 0, "max_thinking_tokens",
             "must be >= 0 or None")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            need(k is None or (type(k) is int and 0 <= k <= MAX_LOGPROBS), name,
                 f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        need(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 1 << 64), "seed",
             "must be None or an integer in [0, 2**64) (torch.Generator's range)")
        need(type(self.min_tokens) is int and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
             f"must be an integer in [0, max_tokens = {self.max_tokens}]")
        self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()} if self.logit_bias else None
        need(all(k >= 0 and -100 <= v <= 100 for k, v in (self.logit_bias or {}).items()), "logit_bias",
             "maps token ids >= 0 to biases in [-100, 100]")
        need(0 < self.repetition_penalty <= 10, "repetition_penalty", "must be in (0, 10] (1 is off)")
        for name in ("frequency_penalty", "presence_penalty"):
            need(-2 <= getattr(self, name) <= 2, name, "must be in [-2, 2] (0 is off), as OpenAI allows")
        need(0 <= self.min_p <= 1, "min_p", "must be in [0, 1] (0 is off)")


class LogitAdjuster:
    """One request's logit adjustments and the history they need, kept on the logits' device: the seen-ids mask
    and output counts grow by one scatter per emitted token, and applying them never syncs with the host."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], stop_ids: list[int], vocab: int,
                 device: torch.device):
        self.p = params
        ids = lambda xs: torch.tensor(list(xs), device=device, dtype=torch.long)
        self.stop = ids(stop_ids) if params.min_tokens and stop_ids else None
        bias = params.logit_bias or {}
        self.bias_ids, self.bias = ids(bias), torch.tensor(list(bias.values()), device=device)
        self.seen = None
        if params.repetition_penalty != 1:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[ids(prompt_ids)] = True
        self.counts = torch.zeros(vocab, device=device) if params.frequency_penalty or params.presence_penalty \
            else None

    def add(self, token: int) -> None:
        """An emitted token joins the history."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1

    def apply(self, row: torch.Tensor, generated: int) -> None:
        """Adjust one row of logits [V] in place, `generated` completion tokens into the request."""
        p = self.p
        if self.stop is not None and generated < p.min_tokens:
            row[self.stop] = float("-inf")
        if len(self.bias):
            row.index_add_(0, self.bias_ids, self.bias)
        if self.seen is not None:
            rp = p.repetition_penalty
            row.copy_(torch.where(self.seen, torch.where(row > 0, row / rp, row * rp), row))
        if self.counts is not None:
            row -= p.frequency_penalty * self.counts + p.presence_penalty * (self.counts > 0)


def stop_split(tokenizer, pending: list[int], stops: tuple[str, ...]) -> tuple[list[int], list[int], bool]:
    """Check generated ids not yet released against stop strings -> (ids to release, ids to hold, stopped).

    Stop strings match the text a user sees: special tokens (</think>, tool-call markers) are structure, not
    text. On a match the released ids decode to exactly the text before it (as OpenAI and vLLM cut): a token the
    stop string starts inside is replaced by the tokens of its part before it. Otherwise the longest tail that
    may still begin a stop string is held."""
    def visible(ids: list[int]) -> str:
        return tokenizer.decode([i for i in ids if not tokenizer.is_special(i)])

    text, n = visible(pending), len(pending)
    hit = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if hit >= 0:
        keep = 0  # whole tokens before the stop string: their text is a prefix of text[:hit]
        while keep < n and len(visible(pending[: keep + 1])) <= hit:
            keep += 1
        while keep and not text.startswith(visible(pending[:keep])):
            keep -= 1  # the last one ends inside a multi-byte character
        return pending[:keep] + tokenizer.encode(text[len(visible(pending[:keep])):hit]), [], True
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    while hold and n > 0 and len(visible(pending[n:])) < hold:
        n -= 1
    return pending[:n], pending[n:], False


def sample(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]) -> torch.Tensor:
    """Temperature, min-p, top-k, top-p, then one draw per row by inverting the CDF with a uniform from the row's
    request generator (seeded requests repeat): no multinomial host sync, and one random number per row where
    Exp(1) noise over the vocabulary cost more than the decode step of a small model on CPU (0.7 ms for 32K
    ids). Rows with temperature 0 are greedy."""
    B, V = logits.shape
    dev = logits.device
    temps = [p.temperature for p in params]
    temp = torch.tensor(temps, device=dev, dtype=torch.float32)
    x = logits if all(t == 1 for t in temps) else logits / temp.clamp_min(1e-6)[:, None]
    if any(p.min_p > 0 for p in params):  # before top-k / top-p, as vLLM: relative to the most likely id
        min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=torch.float32)
        probs = x.softmax(-1)
        x = x.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        top_k = torch.tensor([p.top_k if p.top_k > 0 else V for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=torch.float32)
        sorted_x, idx = x.sort(-1, descending=True)
        probs = sorted_x.softmax(-1)
        drop = torch.arange(V, device=dev)[None] >= top_k[:, None]
        drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]  # keep the smallest set reaching top_p
        x = torch.full_like(x, float("-inf")).scatter(-1, idx, sorted_x.masked_fill(drop, float("-inf")))
    u = torch.cat([torch.rand(1, device=dev, generator=g) if g is not None else torch.zeros(1, device=dev)
                   for g in gens])
    drawn = inverse_cdf(x.softmax(-1), u)
    return torch.where(temp == 0, logits.argmax(-1), drawn) if 0 in temps else drawn


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """For each row of probs [B,V] (unnormalized is fine) and u [B] in [0,1): the first id whose running sum
    reaches (1-u) of the row's total, a point in (0, total], so an id of probability 0 is never drawn. In two
    levels, blocks then ids within the chosen block, because a full cumsum over the vocabulary is a sequential
    pass per row (3 ms for 64 x 32K on CPU, more than the softmax)."""
    B, V = probs.shape
    blk = min(block, V)
    nb = -(-V // blk)
    blocks = F.pad(probs, (0, nb * blk - V)).view(B, nb, blk) if nb * blk != V else probs.view(B, nb, blk)
    block_cdf = blocks.sum(-1).cumsum(-1)  # [B, nb]
    target = ((1 - u) * block_cdf[:, -1])[:, None]
    b = torch.searchsorted(block_cdf, target).clamp_max_(nb - 1)  # [B,1]: first block reaching the target
    before = F.pad(block_cdf, (1, 0)).gather(1, b)  # the sum of the blocks before b (0 before the first)
    inner = blocks.gather(1, b[:, :, None].expand(B, 1, blk))[:, 0].cumsum(-1)  # [B, blk]
    rest = torch.minimum(target - before, inner[:, -1:])  # > 0; the clamp absorbs the two sums' rounding
    return (b * blk + torch.searchsorted(inner, rest)).clamp_max_(V - 1)[:, 0]


class TokenLogprob(NamedTuple):
    """One token's log-probability, its rank in the model's distribution (1 = the most likely; vLLM reports it)
    and the k most likely (id, logprob) alternatives, best first."""
    logprob: float
    top: list[tuple[int, float]]
    rank: int


def token_logprobs(logits: torch.Tensor, tokens: list[int], ks: list[int | None]) -> list[TokenLogprob | None]:
    """Per row of logits [B,V]: the emitted token's TokenLogprob with ks[row] alternatives, or None where
    ks[row] is None. From the raw logits, before temperature, top-k and top-p (vLLM's default): the model's own
    distribution, which is what RL and evaluation code wants. A token the engine forced (the thinking budget's
    </think>) gets the model's probability of it too. One device->host transfer."""
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])
    rank = (lp > chosen).sum(1, keepdim=True).to(lp.dtype) + 1
    k = max(k or 0 for k in ks)
    vals, ids = lp.topk(k, -1) if k else (lp[:, :0], lp[:, :0].long())
    chosen, rank, vals, ids = torch.cat([chosen, rank, vals, ids.to(lp.dtype)], 1).cpu().split([1, 1, k, k], 1)
    return [None if kk is None else TokenLogprob(c[0], list(zip(map(int, i[:kk]), v[:kk])), int(r[0]))
            for kk, c, r, v, i in zip(ks, chosen.tolist(), rank.tolist(), vals.tolist(), ids.tolist())]
