"""One generation's handle: what the engine has released so far (token ids, logprobs, usage) and the ways a
caller waits for it (result, stream), driving the engine from the caller's thread when no loop thread runs."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from moonlet.sampling import LogitAdjuster, SamplingParams

if TYPE_CHECKING:
    from moonlet.engine import Engine


_ids = itertools.count()


class Request:
    """One generation. The engine appends to `output_ids` (released tokens; a tail that might start a stop
    string is held back until it cannot) and sets `finished` / `finish_reason` last. With params.logprobs,
    `output_logprobs[i]` is the TokenLogprob (logprob, alternatives, rank) of output_ids[i], appended first, or None
    for a token the engine did not sample (the text before a stop string that began inside a token, re-encoded).
    With params.prompt_logprobs, `prompt_logprobs[i]` is the same for prompt_ids[i] (None for the first), complete
    before the first output token."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams,
                 listener: Callable[[Request], None] | None = None):
        self.id = f"req-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.output_ids: list[int] = []
        self.finished = False
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.t_submit = time.perf_counter()
        self.t_first_token: float | None = None
        self._engine = engine
        self._events: queue.SimpleQueue = queue.SimpleQueue()  # one item per release and at the finish
        self._done = threading.Event()  # set at the finish: result() wakes once, not at every release
        self._listener = listener
        self._cancel = False
        self._slot = -1
        self._pos = 0  # positions of this sequence already in the cache
        self._fed: list[int] = list(prompt_ids)  # tokens whose latents are (or will be) in the cache, in order
        self._pending: list[int] = []  # generated, not yet released (stop-string holdback)
        self.output_logprobs: list | None = None if params.logprobs is None else []
        self._pending_lp: list = []  # with logprobs: one entry per id of _pending
        self.prompt_logprobs: list | None = None if params.prompt_logprobs is None else [None]
        self._cached = 0
        self._generated = 0
        self._reasoning = 0
        self._in_reasoning = engine._starts_in_reasoning(prompt_ids)
        self._force: int | None = None
        self._looked_up = False
        self._gen: torch.Generator | None = None
        self._adjuster: LogitAdjuster | None = None  # made at the first sample when params.adjusts_logits

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt_ids), "cached_tokens": self._cached,
                "completion_tokens": self._generated, "reasoning_tokens": self._reasoning}

    @property
    def ttft(self) -> float | None:
        """Seconds from submit to the first generated token."""
        return None if self.t_first_token is None else self.t_first_token - self.t_submit

    def cancel(self) -> None:
        """Stop generating; the engine frees the slot at its next step."""
        self._cancel = True
        self._engine._wake.set()

    def _wait(self, cond, timeout: float | None, block=None) -> bool:
        """Wait until cond(); drive the engine from this thread when no background loop runs. `block(seconds)`
        is what to sleep on while the loop runs (default: the next release)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not cond():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if self._engine.running:  # block in C until the engine releases tokens or finishes (a Condition's
                # wait cost ~75 us of Python per token with 64 streaming threads); a second waiter polls
                left = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
                (block or self._next_release)(left)
            else:
                self._engine.step()
        return True

    def _next_release(self, seconds: float) -> None:
        try:
            self._events.get(timeout=seconds)
        except queue.Empty:
            pass

    def result(self, timeout: float | None = None) -> Request:
        """Block until finished (TimeoutError after `timeout` seconds) and return self."""
        if not self._wait(lambda: self.finished, timeout, self._done.wait):
            raise TimeoutError(f"{self.id} not finished after {timeout} s")
        return self

    def stream(self):
        """Yield new token ids as they are released; ends when the request finishes."""
        i = 0
        while True:
            self._wait(lambda n=i: self.finished or len(self.output_ids) > n, None)
            new = self.output_ids[i:]
            i += len(new)
            yield from new
            if self.finished and i >= len(self.output_ids):
                return

    __iter__ = stream

    def __repr__(self) -> str:
        return (f"Request({self.id}, prompt={len(self.prompt_ids)}, output={len(self.output_ids)}, "
                f"finish_reason={self.finish_reason})")
