"""The inference engine: requests in, streamed tokens out.

One scheduler step admits waiting requests into free cache slots, prefills prompts in chunks (reusing cached
prefix blocks; short ones queued together run as one batch), then runs one batched decode step for every
sequence that is generating: requests of any length join and leave between steps (continuous batching). The
per-sequence state lives in a static latent cache [layers, slots, max_seq_len + 1, kv_latent_dim] (see
moonlet.kvcache); generating sequences always occupy slots 0..n-1 (a finished one is replaced by the last), so
a decode step is a plain slice, which is what a CUDA graph wants.

Sampling (moonlet.sampling) runs on the device: temperature, top-k, top-p, then one uniform per row from the
request's generator inverting the CDF. So a step costs one host sync: reading the B new token ids. Budgets
(max_tokens, stop ids and strings, max_thinking_tokens forcing `</think>`) are applied on the host from those
ids. Requests that ask for logprobs cost a second transfer, of their (logprob, top-k) rows.
"""

from __future__ import annotations

import atexit
import itertools
import operator
import random
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moonlet.costs import tokens_that_fit
from moonlet.kvcache import Decoder, PrefixCache, prefill
from moonlet.model import Transformer
from moonlet.request import Request
from moonlet.sampling import LogitAdjuster, SamplingParams, sample, stop_split, token_logprobs

__all__ = ["Engine", "Request", "SamplingParams", "sample"]


@dataclass
class _Specials:
    stop: tuple[int, ...] = ()
    think: int | None = None
    think_end: int | None = None
    tool_section: int | None = None
    assistant: int | None = None
    extra: dict = field(default_factory=dict)


# Engines whose loop thread runs. A process that exits with one running (an error after start(), a
# SystemExit) would tear torch down under the daemon thread mid-kernel and abort ("terminate called without
# an active exception", exit 134) instead of exiting with its own status: stop them first.
_RUNNING: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _stop_running_engines() -> None:
    for engine in list(_RUNNING):
        engine.stop()


class Engine:
    """Continuous-batching generation over one model. Thread-safe `submit`; drive it with `start()` (a
    background thread) or by hand with `step()`; `Request.result()` drives it itself when nothing else does."""

    def __init__(self, model: Transformer, tokenizer=None, max_batch_size: int = 16, max_seq_len: int | None = None,
                 prefix_cache_bytes: int = 512 << 20, device: str | torch.device | None = None, *,
                 kv_cache_bytes: int | None = None, prefill_chunk: int | None = None, block_size: int = 16,
                 cuda_graphs: bool | None = None, compile: bool | None = None):
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.cfg = cfg = model.cfg
        self.tokenizer = tokenizer
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        for name, value in (("max_batch_size", max_batch_size), ("prefill_chunk", prefill_chunk or 1),
                            ("block_size", block_size)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"Engine({name}={value!r}): must be an integer >= 1")
        if max_seq_len is not None and max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"Engine(max_seq_len={max_seq_len}): the model's context (max_position_embeddings) "
                             f"is {cfg.max_position_embeddings}")
        self.max_batch_size = max_batch_size
        if max_seq_len is None:  # as much context per slot as the cache budget allows
            if kv_cache_bytes is None:
                kv_cache_bytes = (int(torch.cuda.mem_get_info(self.device)[0] * 0.5) if self.device.type == "cuda"
                                  else 1 << 30)
            max_seq_len = min(cfg.max_position_embeddings,
                              tokens_that_fit(cfg, kv_cache_bytes, bytes_per_value=p.element_size()) // max_batch_size)
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len}: the KV cache budget leaves no room for a sequence")
        self.max_seq_len = max_seq_len
        # one extra position per slot: the scratch row that padding rows of a CUDA graph write to
        self.cache = torch.zeros(cfg.num_hidden_layers, max_batch_size, max_seq_len + 1, cfg.kv_latent_dim,
                                 device=self.device, dtype=self.dtype)
        self.prefill_chunk = prefill_chunk or (2048 if self.device.type == "cuda" else 512)
        self.prefix_cache = PrefixCache(prefix_cache_bytes, block_size)
        self.decoder = Decoder(model, self.cache, cuda_graphs, compile)
        self.specials = self._read_specials(tokenizer)
        self._slots: list[Request | None] = [None] * max_batch_size
        self._n_dec = 0  # generating sequences occupy slots 0.._n_dec-1
        self._prefilling: list[Request] = []
        self._waiting: deque[Request] = deque()
        self._inbox: deque[Request] = deque()
        self._lock = threading.Lock()
        self._step_lock = threading.RLock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.loop_threads: int | None = None  # CPU: the loop thread's intra-op threads (_pick_loop_threads)
        self._stop_flag = self._stopped = False
        self._rng = random.Random()

    # --------------------------------------------------------------------------------------------------
    # public API

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None,
               listener: Callable[[Request], None] | None = None) -> Request:
        """Queue a request and return it at once (thread-safe). `listener(request)`, if given, is called on the
        engine thread after each release of tokens and at the finish: it must only hand off (e.g. put to a
        queue), so that one thread can serve many streams (the server's SSE writer)."""
        if self._stopped:
            raise RuntimeError("the engine is stopped: start() it again to submit")
        params = params or SamplingParams()
        params.validate()
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer to match text (Engine(model, tokenizer)); "
                             "use stop_token_ids with raw ids")
        try:  # index(): ints, numpy ints and integer tensors pass; 1.5 is not a token id
            prompt_ids = [operator.index(t) for t in prompt_ids]
        except TypeError:
            raise ValueError(f"prompt_ids must be integer token ids, got {list(prompt_ids)[:5]!r}") from None
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: the engine needs at least one prompt token")
        bad = [t for t in [*prompt_ids, *(params.logit_bias or ())] if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt_ids (or logit_bias) holds ids outside the model's vocabulary "
                             f"[0, {self.cfg.vocab_size}): {bad[:5]}")
        if len(prompt_ids) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit: this engine's max_seq_len is "
                             f"{self.max_seq_len} (raise max_seq_len or kv_cache_bytes)")
        req = Request(self, prompt_ids, params, listener)
        with self._lock:
            self._inbox.append(req)
        self._wake.set()
        return req

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[Request]:
        """Submit all prompts and wait for all of them."""
        reqs = [self.submit(p, params) for p in prompts]
        for r in reqs:
            r.result()
        return reqs

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Engine:
        """Step in a background thread until stop()."""
        if not self.running:
            if self.device.type == "cpu":  # a thread that never read or set its count would take the loop's
                torch.set_num_threads(torch.get_num_threads())
            self._stop_flag = self._stopped = False
            self._thread = threading.Thread(target=self._loop, name="moonlet-engine", daemon=True)
            self._thread.start()
            _RUNNING.add(self)
        return self

    def stop(self) -> None:
        """End the background loop; requests still in flight finish as "cancelled" (waking their waiters and
        listeners), and submit() refuses new ones until start()."""
        self._stop_flag = self._stopped = True
        self._wake.set()
        _RUNNING.discard(self)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._step_lock:
            with self._lock:
                queued, self._inbox = list(self._inbox), deque()
            for req in queued + list(self._waiting) + [r for r in self._slots if r is not None]:
                self._finish(req, "cancelled")
            self._waiting.clear()

    def has_work(self) -> bool:
        return bool(self._inbox or self._waiting or self._prefilling or self._n_dec)

    def tokens_that_fit(self, memory_bytes: int) -> int:
        """Tokens of context (over all sequences) a latent cache of memory_bytes holds for this model."""
        return tokens_that_fit(self.cfg, memory_bytes, bytes_per_value=self.cache.element_size())

    def step(self) -> int:
        """One scheduler step: admit, prefill (up to prefill_chunk tokens), one decode step. Returns the number
        of requests still in flight."""
        with self._step_lock:
            try:
                self._intake()
                self._admit()
                self._prefill()
                self._decode()
            except Exception as e:  # fail the requests in flight, keep the engine usable
                msg = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                for req in [r for r in self._slots if r is not None]:
                    req.error = msg
                    self._finish(req, "error")
            return len(self._waiting) + len(self._prefilling) + self._n_dec

    def _loop(self) -> None:
        if self.device.type == "cpu":
            self.loop_threads = self._pick_loop_threads()
        while not self._stop_flag:
            if not self.has_work():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            self.step()

    def _pick_loop_threads(self, steps: int = 5, short_s: float = 0.05) -> int:
        """CPU intra-op threads for the loop thread. OpenMP regions entered from a thread other than the main
        one cost ~100 us each (a tiny batched matmul: 8 us on the main thread, 110 us here, 5 us on one
        thread), which doubled a small model's decode step on 2 cores. So time a few scratch decode steps
        (one row at the scratch position, which no real token uses) with the current count and with one
        thread, and keep the faster; a step longer than short_s is bound by memory bandwidth and keeps all."""
        n = torch.get_num_threads()
        if n == 1:
            return 1
        tokens = torch.zeros(1, dtype=torch.long, device=self.device)
        positions = torch.full((1,), self.decoder.scratch, dtype=torch.long, device=self.device)

        def best_step() -> float:
            self.decoder(tokens, positions, 1)  # warm-up (and compile, once)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                self.decoder(tokens, positions, 1)
                times.append(time.perf_counter() - t0)
            return min(times)

        with self._step_lock:
            many = best_step()
            if many < short_s:
                torch.set_num_threads(1)
                if best_step() >= many:
                    torch.set_num_threads(n)
        return torch.get_num_threads()

    # --------------------------------------------------------------------------------------------------
    # tokenizer facts the engine needs (token-level engine: all optional)

    @staticmethod
    def _read_specials(tok) -> _Specials:
        if tok is None:
            return _Specials()
        sp = getattr(tok, "special", {})
        stop = tuple(getattr(tok, "stop_ids", None) or [sp[n] for n in ("<|im_end|>", "[EOS]") if n in sp])
        return _Specials(stop=stop, think=sp.get("<think>"), think_end=sp.get("</think>"),
                         tool_section=sp.get("<|tool_calls_section_begin|>"), assistant=sp.get("<|im_assistant|>"))

    def _starts_in_reasoning(self, prompt: list[int]) -> bool:
        """K2 Thinking reasons first after a chat generation prompt, unless the prompt already closed it."""
        sp = self.specials
        if sp.assistant is None or sp.think_end is None or sp.assistant not in prompt:
            return False
        last = len(prompt) - 1 - prompt[::-1].index(sp.assistant)
        return sp.think_end not in prompt[last:]

    # --------------------------------------------------------------------------------------------------
    # scheduling

    def _intake(self) -> None:
        with self._lock:
            while self._inbox:
                self._waiting.append(self._inbox.popleft())
        for req in [r for r in self._waiting if r._cancel]:
            self._waiting.remove(req)
            self._finish(req, "error" if req.error else "cancelled")
        for req in [r for r in self._slots if r is not None and r._cancel]:
            self._finish(req, "error" if req.error else "cancelled")

    def _admit(self) -> None:
        while self._waiting:
            free = next((s for s in range(self._n_dec, self.max_batch_size) if self._slots[s] is None), None)
            if free is None:
                return
            req = self._waiting.popleft()
            req._slot = free
            self._slots[free] = req
            self._prefilling.append(req)

    def _look_up(self, req: Request) -> None:
        """Copy the cached blocks of the prompt's prefix into its slot (never the last token: we need its
        logits). Done once, when the request is next to prefill, so that it sees what the requests ahead of
        it just cached (heavy mode's branches share one prompt)."""
        if req._looked_up:
            return
        req._looked_up = True
        if req.prompt_logprobs is not None:  # every position's logits are needed: compute them all
            return
        blocks = self.prefix_cache.lookup(req.prompt_ids[:-1])
        n = sum(b.shape[1] for b in blocks)
        if n:  # one copy, not one per block (128 for a 2K prefix: ~0.5 ms of a 7 ms hit on the tiny model)
            self.cache[:, req._slot, :n] = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]
        req._pos = req._cached = n

    def _batch(self, budget: int) -> list[Request]:
        """The requests at the front of the queue whose remaining prompts fit in `budget` tokens together (each
        padded to the longest), with the batch's scores and gathered keys bounded (2^26 score entries); [] when
        fewer than two qualify. A prompt whose next uncached block a member computes waits for its turn, so
        that it hits the cache (heavy mode's branches)."""
        group: list[Request] = []
        width = longest = last_start = 0
        H, cap = self.cfg.num_attention_heads, self.cache.shape[2]
        for req in self._prefilling:
            first_look = not req._looked_up
            self._look_up(req)
            w, S = max(width, len(req.prompt_ids) - req._pos), max(longest, len(req.prompt_ids))
            n = len(group) + 1
            fits = n * w <= budget and max(last_start, req._pos) + w <= cap and n * H * w * S <= 1 << 26
            if not fits or self._extends_a_member(req, group):
                if first_look:  # look it up again at its turn: it may hit what this group caches
                    req._looked_up, req._pos, req._cached = False, 0, 0
                break
            group.append(req)
            width, longest, last_start = w, S, max(last_start, req._pos)
        return group if len(group) > 1 else []

    def _extends_a_member(self, req: Request, group: list[Request]) -> bool:
        """Whether a group member's prompt holds req's next uncached block (with the same prefix before it)."""
        need = req._pos + self.prefix_cache.block_size
        if self.prefix_cache.max_bytes <= 0 or len(req.prompt_ids) - 1 < need:
            return False
        head = req.prompt_ids[:need]
        return any(len(m.prompt_ids) >= need and m.prompt_ids[:need] == head for m in group)

    def _prefill(self) -> None:
        """Spend up to prefill_chunk prompt tokens, in forwards of kvcache.prefill: the requests in front when
        two or more fit together (_batch), else the next chunk of the first one (after which the ones that
        waited for its blocks may batch). A request whose prompt is done samples its first token."""
        budget = self.prefill_chunk
        while self._prefilling and budget > 0:
            group = self._batch(budget)
            if group:
                chunks = [r.prompt_ids[r._pos :] for r in group]
            else:
                group = [self._prefilling[0]]
                self._look_up(group[0])
                chunks = [group[0].prompt_ids[group[0]._pos : group[0]._pos + budget]]
            every = any(r.prompt_logprobs is not None for r in group)
            logits = prefill(self.model, chunks, [r._pos for r in group], self.cache, [r._slot for r in group], every)
            if every:
                self._score_prompts(group, chunks, logits)
                logits = logits[torch.arange(len(group)), torch.tensor([len(c) - 1 for c in chunks])]  # each row's last
            budget -= len(group) * max(map(len, chunks))
            for req, chunk in zip(group, chunks):  # every position first: moving one into a decode slot may
                req._pos += len(chunk)              # swap another's cache rows
            done = [i for i, r in enumerate(group) if r._pos == len(r.prompt_ids)]
            for req in [group[i] for i in done if group[i].params.max_tokens == 0]:  # prefill only
                self._finish(req, "length")
            done = [i for i in done if not group[i].finished]
            for req in (group[i] for i in done):
                self._prefilling.remove(req)
                self.prefix_cache.insert(req.prompt_ids, self.cache[:, req._slot])
                self._to_decoding(req)
                self._check_thinking_budget(req)
            if done:
                finished = [group[i] for i in done]
                self._emit(finished, *self._sample(logits[done], finished))

    @staticmethod
    def _score_prompts(group: list[Request], chunks: list[list[int]], logits: torch.Tensor) -> None:
        """Append the prompt logprobs of this chunk (logits [B,T,V]: each position predicts the next prompt id;
        the last of the prompt predicts none)."""
        for b, (req, chunk) in enumerate(zip(group, chunks)):
            targets = req.prompt_ids[req._pos + 1 : req._pos + len(chunk) + 1]
            if req.prompt_logprobs is not None and targets:
                k = req.params.prompt_logprobs
                req.prompt_logprobs += token_logprobs(logits[b, : len(targets)], targets, [k] * len(targets))

    def _to_decoding(self, req: Request) -> None:
        """Move a prefilled sequence into slot _n_dec (swapping with a prefilling one if needed)."""
        dst, src = self._n_dec, req._slot
        if src != dst:
            other = self._slots[dst]
            if other is not None:  # a prefilling sequence sits there: swap the two
                tmp = self.cache[:, dst, : other._pos].clone()
                self.cache[:, dst, : req._pos] = self.cache[:, src, : req._pos]
                self.cache[:, src, : other._pos] = tmp
                other._slot = src
            else:
                self.cache[:, dst, : req._pos] = self.cache[:, src, : req._pos]
            self._slots[src], self._slots[dst] = other, req
            req._slot = dst
        self._n_dec += 1

    def _decode(self) -> None:
        for req in [r for r in self._slots[: self._n_dec] if r._pos >= self.max_seq_len]:
            self._finish(req, "length")  # the cache slot is full
        B = self._n_dec
        if B == 0:
            return
        reqs = self._slots[:B]
        tokens = torch.tensor([r._fed[-1] for r in reqs], device=self.device)
        positions = torch.tensor([r._pos for r in reqs], device=self.device)
        logits = self.decoder(tokens, positions, max(r._pos for r in reqs) + 1)
        for r in reqs:
            r._pos += 1
        self._emit(reqs, *self._sample(logits, reqs))

    def _finish(self, req: Request, reason: str) -> None:
        """Retire a request: keep its latents in the prefix cache (an agent's next prompt extends this one),
        free its slot (the last generating sequence moves into a freed generating slot), wake waiters."""
        if req.finished:
            return
        slot = req._slot
        if slot >= 0:
            if req._pos > 0 and reason != "error":
                self.prefix_cache.insert(req._fed[: req._pos], self.cache[:, slot])
            if req in self._prefilling:
                self._prefilling.remove(req)
                self._slots[slot] = None
            else:
                last = self._n_dec - 1
                if slot != last:
                    moved = self._slots[last]
                    self.cache[:, slot, : moved._pos] = self.cache[:, last, : moved._pos]
                    moved._slot = slot
                    self._slots[slot] = moved
                self._slots[last] = None
                self._n_dec -= 1
            req._slot = -1
        if req.output_logprobs is not None:  # first: a reader of output_ids finds their logprobs
            req.output_logprobs.extend(req._pending_lp)
        req.output_ids.extend(req._pending)  # a stop string was already cut off by _release
        req._pending, req._pending_lp = [], []
        req.finish_reason = reason
        req.finished = True
        req._done.set()
        req._events.put(None)
        self._notify(req)

    def _notify(self, req: Request) -> None:
        """Call the request's listener. One that raises fails its own request (at the next step), never the
        others in the batch or the engine thread: a listener must only hand off, and a bug there is the caller's."""
        if req._listener is None:
            return
        try:
            req._listener(req)
        except Exception as e:
            traceback.print_exc()
            req._listener = None
            if not req.finished:
                req.error = f"the request's listener failed: {type(e).__name__}: {e}"
                req._cancel = True

    # --------------------------------------------------------------------------------------------------
    # sampling and budgets

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list | None]:
        """logits [B,V] fp32 -> one token id per row (one device->host transfer), and the rows' logprobs where
        a request asks for them (a second one)."""
        ps = [r.params for r in reqs]
        raw = logits  # logprobs report the model's own distribution
        if any(p.adjusts_logits for p in ps):
            logits = logits.clone()
            for row, r in zip(logits, reqs):
                if r.params.adjusts_logits:
                    self._adjuster(r).apply(row, r._generated)
        if all(p.temperature == 0 for p in ps):
            out = logits.argmax(-1).tolist()
        else:
            out = sample(logits, ps, [self._generator(r) for r in reqs]).tolist()
        out = [r._force if r._force is not None else t for r, t in zip(reqs, out)]
        want = [p.logprobs for p in ps]
        return out, (token_logprobs(raw, out, want) if any(k is not None for k in want) else None)

    def _adjuster(self, req: Request) -> LogitAdjuster:
        if req._adjuster is None:
            p = req.params
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.specials.stop))
            req._adjuster = LogitAdjuster(p, req.prompt_ids, sorted(stops), self.cfg.vocab_size, self.device)
        return req._adjuster

    def _generator(self, req: Request) -> torch.Generator | None:
        if req.params.temperature == 0:
            return None
        if req._gen is None:
            seed = req.params.seed if req.params.seed is not None else self._rng.getrandbits(63)
            req._gen = torch.Generator(device=self.device).manual_seed(seed)
        return req._gen

    def _check_thinking_budget(self, req: Request) -> None:
        budget = req.params.max_thinking_tokens
        if req._in_reasoning and budget is not None and req._reasoning >= budget:
            req._force = self.specials.think_end
        else:
            req._force = None

    def _emit(self, reqs: list[Request], tokens: list[int], logprobs: list | None = None) -> None:
        sp = self.specials
        now = time.perf_counter()
        for req, tok, lp in zip(reqs, tokens, logprobs or itertools.repeat(None)):
            if req.t_first_token is None:
                req.t_first_token = now
            req._generated += 1
            p = req.params
            if tok in p.stop_token_ids or (not p.ignore_eos and tok in sp.stop):
                self._finish(req, "stop")
                continue
            if req._adjuster is not None:
                req._adjuster.add(tok)
            req._fed.append(tok)
            req._pending.append(tok)
            if req.output_logprobs is not None:
                req._pending_lp.append(lp)
            if req._in_reasoning:
                if tok in (sp.think_end, sp.tool_section):
                    req._in_reasoning = False
                else:
                    req._reasoning += 1
            elif tok == sp.think and sp.think is not None and req._reasoning == 0:
                req._in_reasoning = True
                req._reasoning += 1
            self._check_thinking_budget(req)
            if self._release(req):
                self._finish(req, "stop")
            elif req._generated >= p.max_tokens:
                self._finish(req, "length")

    def _release(self, req: Request) -> bool:
        """Move pending tokens to output_ids, holding back a tail that may begin a stop string. Returns True
        when a stop string appeared: the pending ids then end exactly before it (see stop_split)."""
        if req.params.stop:
            release, _, stopped = stop_split(self.tokenizer, req._pending, req.params.stop)
            if stopped:  # _finish releases them; re-encoded ids past the sampled ones have no logprob
                same = next((i for i, (a, b) in enumerate(zip(release, req._pending)) if a != b),
                            min(len(release), len(req._pending)))
                req._pending, req._pending_lp = release, req._pending_lp[:same] + [None] * (len(release) - same)
                return True
            n = len(release)  # the rest may still begin a stop string
        else:
            n = len(req._pending)
        if n:
            if req.output_logprobs is not None:
                req.output_logprobs.extend(req._pending_lp[:n])
                req._pending_lp = req._pending_lp[n:]
            req.output_ids.extend(req._pending[:n])
            req._pending = req._pending[n:]
            req._events.put(None)
            self._notify(req)
        return False
