"""`moonlet serve --script FILE`, a TESTING AID: a stand-in for the Engine that replays given K2-format
completions token by token through the real tokenizer, parser and SSE code, so that the server's tool-call
and reasoning protocol paths run end to end without a trained model. It proves the protocol, never a model
capability."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

from moonlet.sampling import stop_split


class ScriptedRequest:
    """The surface of request.Request the server uses. Its tokens come from a thread of its own, one every
    `delay` seconds, the way the engine's come from the engine thread: output_ids grows, `listener` is told."""

    def __init__(self, ids: list[int], prompt_ids: list[int], params, stop_ids: set[int], think_end: int,
                 delay: float, listener=None, tokenizer=None):
        self.id = uuid.uuid4().hex
        self.prompt_ids, self.output_ids, self.output_logprobs, self.prompt_logprobs = prompt_ids, [], None, None
        self.finished, self.finish_reason, self.ttft = False, None, None  # ttft: seconds to the first token
        self._t0 = time.perf_counter()
        self._ids, self._params, self._stop, self._think_end, self._delay = ids, params, stop_ids, think_end, delay
        self._listener, self._cancelled, self._changed = listener, threading.Event(), threading.Condition()
        self._tokenizer, self._pending = tokenizer, []  # ids held back while they may begin a stop string
        threading.Thread(target=self._produce, daemon=True, name=f"scripted-{self.id[:8]}").start()

    def cancel(self) -> None:
        self._cancelled.set()

    def _produce(self) -> None:
        reason = None
        for t in self._ids:
            if self._cancelled.wait(self._delay) if self._delay else self._cancelled.is_set():
                reason = "cancelled"
                break
            if len(self.output_ids) + len(self._pending) >= self._params.max_tokens:
                reason = "length"
                break
            if self.ttft is None:
                self.ttft = time.perf_counter() - self._t0
            if t in self._stop:  # as in the engine: a stop token ends the request and is not returned
                reason = "stop"
                break
            self._pending.append(t)
            if self._params.stop and self._tokenizer is not None:  # stop strings cut as the engine cuts them
                release, self._pending, stopped = stop_split(self._tokenizer, self._pending, self._params.stop)
            else:
                release, self._pending, stopped = self._pending, [], False
            if release:
                self._publish(lambda r=release: self.output_ids.extend(r))
            if stopped:
                reason = "stop"
                break

        def finish() -> None:
            self.output_ids.extend(self._pending)  # held back for a stop string that never came
            self.finish_reason = reason or "stop"
            self.finished = True

        self._publish(finish)

    def _publish(self, change) -> None:
        with self._changed:
            change()
            self._changed.notify_all()
        if self._listener is not None:
            self._listener(self)

    def result(self, timeout: float | None = None) -> ScriptedRequest:
        with self._changed:
            if not self._changed.wait_for(lambda: self.finished, timeout):
                raise TimeoutError(f"{self.id} not finished after {timeout} s")
        return self

    @property
    def usage(self) -> dict:
        out = self.output_ids
        reasoning = out.index(self._think_end) if self._think_end in out else len(out)
        return {"prompt_tokens": len(self.prompt_ids), "cached_tokens": 0, "completion_tokens": len(out),
                "reasoning_tokens": reasoning}


class ScriptedEngine:
    """TESTING AID (`moonlet serve --script FILE`): replays K2-format completions instead of running a model.

    FILE is a JSON list of {"when": "text", "completion": "<think>...</think>answer<|im_end|>"}; a request
    gets the first entry whose `when` occurs in the conversation's last message (no `when` matches all).
    The completion is encoded with the real tokenizer (special-token text becomes special ids) and streamed
    one token every `delay` seconds, honouring max_tokens, stop tokens, stop strings and cancellation."""

    def __init__(self, tokenizer, script: list[dict], delay: float = 0.0):
        if not isinstance(script, list) or not all(isinstance(e, dict) and isinstance(e.get("completion"), str)
                                                   for e in script):
            raise ValueError("--script: expected a JSON list of {'when': str, 'completion': str} objects")
        self.tokenizer, self.script, self.delay = tokenizer, script, delay

    def submit(self, prompt_ids: list[int], params, listener: Callable[[ScriptedRequest], None] | None = None
               ) -> ScriptedRequest:
        if params.logprobs is not None or params.prompt_logprobs is not None:
            raise ValueError("--script replays text without a model: there are no logprobs to report")
        if params.adjusts_logits or params.min_p:
            raise ValueError("--script replays text without a model: there are no logits to penalize or bias")
        tok = self.tokenizer
        text = tok.decode(prompt_ids)
        last = text.rsplit("<|im_end|>", 1)[0].rsplit("<|im_middle|>", 1)[-1]
        entry = next((e for e in self.script if e.get("when", "") in last), None)
        if entry is None:
            raise RuntimeError(f"--script: no entry matches the last message {last[:80]!r}")
        ids = tok.encode(entry["completion"], allow_special=True)
        stop = set(params.stop_token_ids) | set(tok.stop_ids)
        return ScriptedRequest(ids, list(prompt_ids), params, stop, tok.think_end_id, self.delay, listener, tok)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass
