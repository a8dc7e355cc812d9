"""Model backends for the agent loop: one interface, three implementations.

The loop only ever calls `backend.complete(messages, tools, ...) -> Turn`, so the same agent code drives a
local moonlet engine, any OpenAI-compatible endpoint (vLLM/SGLang serving real K2 Thinking, `moonlet serve`),
and a scripted backend that replays trajectories (tests and `--scripted`; it proves the loop, not a model).
Messages are OpenAI-shaped dicts; assistant messages carry `reasoning_content` (K2's convention), which
every backend sends back verbatim, empty strings included.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

USAGE_KEYS = ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens")
# on_delta receives {"reasoning_content": text} / {"content": text} pieces as they are generated (live view)
OnDelta = Callable[[dict], None]


def empty_usage() -> dict:
    return dict.fromkeys(USAGE_KEYS, 0)


@dataclass
class Turn:
    """One assistant message, OpenAI-shaped, plus accounting."""

    reasoning_content: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: dict = field(default_factory=empty_usage)

    def to_message(self) -> dict:
        """The assistant message to append to the conversation. reasoning_content is always present (an
        empty string too): K2 must see its own live-episode reasoning exactly as it produced it."""
        msg = {"role": "assistant", "content": self.content, "reasoning_content": self.reasoning_content}
        if self.tool_calls:
            msg["tool_calls"] = [dict(c) for c in self.tool_calls]
        return msg

    @classmethod
    def from_dict(cls, d: dict) -> Turn:
        """Accepts a Turn dict or an assistant message; tool calls may be given loosely as
        {"name", "arguments"} with arguments a dict or a JSON string (scripts are written by hand)."""
        calls = []
        for c in d.get("tool_calls") or []:
            fn = c.get("function", c)
            args = fn.get("arguments", "{}")
            calls.append({"id": c.get("id", ""), "type": "function",
                          "function": {"name": fn.get("name", ""),
                                       "arguments": args if isinstance(args, str) else json.dumps(args)}})
        usage = empty_usage() | dict(d.get("usage") or {})
        return cls(d.get("reasoning_content") or "", d.get("content") or "", calls,
                   d.get("finish_reason", "stop"), usage)

    def to_dict(self) -> dict:
        return asdict(self)


class Backend(Protocol):
    def complete(self, messages: list[dict], tools: list[dict] | None, *, max_tokens: int,
                 max_thinking_tokens: int | None = None, temperature: float = 1.0,
                 seed: int | None = None, on_delta: OnDelta | None = None) -> Turn: ...


# --------------------------------------------------------------------------------------------- local engine

class LocalBackend:
    """A moonlet Engine: render with moonlet.chat, submit token ids, parse the output. Many threads (heavy
    mode, eval) may share one backend; the engine batches them and its prefix cache serves shared prefixes."""

    def __init__(self, engine: Any, tokenizer: Any):
        self.engine, self.tokenizer = engine, tokenizer

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        from moonlet import chat

        return chat.render_ids(messages, self.tokenizer, tools=tools, add_generation_prompt=True)[0]

    def count_tokens(self, messages: list[dict], tools: list[dict] | None) -> int:
        return len(self.prompt_ids(messages, tools))

    def complete(self, messages: list[dict], tools: list[dict] | None, *, max_tokens: int,
                 max_thinking_tokens: int | None = None, temperature: float = 1.0,
                 seed: int | None = None, on_delta: OnDelta | None = None) -> Turn:
        from moonlet import chat
        from moonlet.engine import SamplingParams

        params = SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens,
                                max_thinking_tokens=max_thinking_tokens)
        req = self.engine.submit(self.prompt_ids(messages, tools), params)
        parser = chat.StreamParser(self.tokenizer)  # on ids: only real special tokens act as markers
        try:
            if on_delta is None:
                parser.feed_ids(list(req.result().output_ids))
            else:
                for t in req.stream():
                    _emit_text(parser.feed_ids([t]), on_delta)
        except BaseException:
            req.cancel()  # Ctrl-C or a failing consumer: free the engine slot
            raise
        _emit_text(parser.finish(), on_delta)
        parsed = parser.result()
        if req.finish_reason == "error":
            raise RuntimeError(f"the engine failed on this request: {req.error}")
        calls = [{"id": c["id"], "type": "function", "function": dict(c["function"])}
                 for c in parsed.get("tool_calls") or []]
        usage = empty_usage() | {k: int(v) for k, v in req.usage.items() if k in USAGE_KEYS}
        return Turn(parsed.get("reasoning_content") or "", parsed.get("content") or "", calls,
                    req.finish_reason, usage)


# --------------------------------------------------------------------------------------- OpenAI-compatible

def to_openai_messages(messages: list[dict]) -> list[dict]:
    """Our conversation -> the request body's `messages`. Assistant messages keep `reasoning_content`
    (even "") because K2 needs its interleaved reasoning back; keys the API does not know are dropped."""
    out = []
    for m in messages:
        role = m["role"]
        if role == "assistant":
            msg = {"role": "assistant", "content": m.get("content") or "",
                   "reasoning_content": m.get("reasoning_content") or ""}
            if m.get("tool_calls"):
                msg["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["function"]["name"],
                                                   "arguments": c["function"]["arguments"]}}
                                     for c in m["tool_calls"]]
        elif role == "tool":
            msg = {"role": "tool", "tool_call_id": m["tool_call_id"], "content": m.get("content") or ""}
        else:
            msg = {"role": role, "content": m.get("content") or ""}
            if m.get("name"):
                msg["name"] = m["name"]
        out.append(msg)
    return out


def _emit_text(deltas: list[dict], on_delta: OnDelta | None) -> None:
    if on_delta is not None:
        for d in deltas:
            if d.get("reasoning_content") or d.get("content"):
                on_delta(d)


def _reasoning_of(obj: Any) -> str:
    """Reasoning from a message or a delta: `reasoning_content` (Moonshot, older vLLM) or `reasoning` (vLLM)."""
    extra = getattr(obj, "model_extra", None) or {}
    return getattr(obj, "reasoning_content", None) or extra.get("reasoning_content") \
        or getattr(obj, "reasoning", None) or extra.get("reasoning") or ""


def _usage_of(u: Any) -> dict:
    usage = empty_usage()
    if u is not None:
        usage["prompt_tokens"] = u.prompt_tokens or 0
        usage["completion_tokens"] = u.completion_tokens or 0
        if u.prompt_tokens_details is not None:
            usage["cached_tokens"] = u.prompt_tokens_details.cached_tokens or 0
        if u.completion_tokens_details is not None:
            usage["reasoning_tokens"] = u.completion_tokens_details.reasoning_tokens or 0
    return usage


def turn_from_openai(completion: Any) -> Turn:
    """A `ChatCompletion` (openai package types) -> Turn."""
    choice = completion.choices[0]
    msg = choice.message
    calls = [{"id": c.id, "type": "function",
              "function": {"name": c.function.name, "arguments": c.function.arguments or ""}}
             for c in (msg.tool_calls or [])]
    return Turn(_reasoning_of(msg), msg.content or "", calls, choice.finish_reason or "stop",
                _usage_of(completion.usage))


def turn_from_stream(chunks: Any, on_delta: OnDelta | None = None) -> Turn:
    """`ChatCompletionChunk`s -> Turn, passing text pieces to on_delta as they arrive. Tool calls arrive
    as fragments keyed by index: the first carries id and name, later ones append to the arguments."""
    reasoning, content, calls, finish, usage = [], [], {}, "stop", empty_usage()
    for chunk in chunks:
        if chunk.usage is not None:
            usage = _usage_of(chunk.usage)
        for ch in chunk.choices:
            d = ch.delta
            if r := _reasoning_of(d):
                reasoning.append(r)
                _emit_text([{"reasoning_content": r}], on_delta)
            if d.content:
                content.append(d.content)
                _emit_text([{"content": d.content}], on_delta)
            for tc in d.tool_calls or []:
                c = calls.setdefault(tc.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                c["id"] = tc.id or c["id"]
                if tc.function is not None:
                    c["function"]["name"] += tc.function.name or ""
                    c["function"]["arguments"] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    return Turn("".join(reasoning), "".join(content), [calls[i] for i in sorted(calls)], finish, usage)


class OpenAIBackend:
    """Any OpenAI-compatible chat-completions endpoint, through the official `openai` client.

    The per-step reasoning budget has no standard field; it is sent as `extra_body[thinking_param]`
    (`max_thinking_tokens`, which `moonlet serve` reads and vLLM ignores with a warning); set
    thinking_param=None to never send it."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, *,
                 timeout: float = 600.0, thinking_param: str | None = "max_thinking_tokens",
                 extra_body: dict | None = None):
        import openai  # optional dependency: only needed for this backend

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout)
        self.thinking_param, self.extra_body = thinking_param, dict(extra_body or {})
        try:
            cards = self.client.models.list().data
        except openai.APIError as e:  # unreachable now: fine when the model is named (the run can resume later)
            if model is None:
                raise ConnectionError(f"{base_url}: cannot list the served models to pick one ({e}); "
                                      "is the server up? (or name the model)") from e
            cards = []
        self.model = model or cards[0].id
        card = next((c for c in cards if c.id == self.model), None)
        n = getattr(card, "max_model_len", None)  # vLLM and moonlet serve put the served context on the card
        self.context_length: int | None = n if isinstance(n, int) and n > 0 else None

    def complete(self, messages: list[dict], tools: list[dict] | None, *, max_tokens: int,
                 max_thinking_tokens: int | None = None, temperature: float = 1.0,
                 seed: int | None = None, on_delta: OnDelta | None = None) -> Turn:
        extra = dict(self.extra_body)
        if max_thinking_tokens is not None and self.thinking_param:
            extra[self.thinking_param] = max_thinking_tokens
        kw: dict[str, Any] = {"model": self.model, "messages": to_openai_messages(messages),
                              "max_tokens": max_tokens, "temperature": temperature}
        if tools:
            kw["tools"] = tools
        if seed is not None:
            kw["seed"] = seed
        if extra:
            kw["extra_body"] = extra
        if on_delta is None:
            return turn_from_openai(self.client.chat.completions.create(**kw))
        stream = self.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        try:
            return turn_from_stream(stream, on_delta)
        finally:
            stream.close()  # Ctrl-C: drop the connection so the server stops generating


# ------------------------------------------------------------------------------------------------ scripted

class ScriptedBackend:
    """Replays a trajectory: a testing aid that proves loop logic, never a model capability.

    `script` is a list of turns (Turn, or dicts accepted by Turn.from_dict; an optional "sleep" key delays
    the reply, standing in for model latency) or a callable (messages, tools, **kw) -> Turn | dict. With a
    list, the reply is chosen by the number of assistant messages already in the conversation, so it is
    stateless: a resumed or parallel conversation gets the same turn at the same point. Every call is
    recorded in `self.calls` so tests can check what the model was sent."""

    def __init__(self, script: list | Callable, *, prompt_tokens: Callable[[list[dict]], int] | None = None):
        self.script = script
        self.prompt_tokens = prompt_tokens or (lambda msgs: len(json.dumps(msgs)) // 4)
        self.calls: list[dict] = []
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path) -> ScriptedBackend:
        """A JSON list of turns, or JSONL with one turn per line."""
        text = Path(path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not isinstance(data, list):
            raise ValueError(f"{path}: a scripted trajectory is a JSON list of turns, got {type(data).__name__}")
        return cls(data)

    def complete(self, messages: list[dict], tools: list[dict] | None, *, max_tokens: int,
                 max_thinking_tokens: int | None = None, temperature: float = 1.0,
                 seed: int | None = None, on_delta: OnDelta | None = None) -> Turn:
        kw = {"max_tokens": max_tokens, "max_thinking_tokens": max_thinking_tokens,
              "temperature": temperature, "seed": seed}
        with self._lock:
            self.calls.append({"messages": [dict(m) for m in messages], "tools": tools, **kw})
        if callable(self.script):
            turn = self.script(messages, tools, **kw)
        else:
            i = sum(m["role"] == "assistant" for m in messages)
            if i >= len(self.script):
                raise RuntimeError(f"scripted backend: the script has {len(self.script)} turns, asked for "
                                   f"turn {i + 1}")
            turn = self.script[i]
        if isinstance(turn, dict):
            if turn.get("sleep"):
                time.sleep(float(turn["sleep"]))
            turn = Turn.from_dict(turn)
        turn = replace(turn, tool_calls=[dict(c) for c in turn.tool_calls], usage=dict(turn.usage))
        _emit_text([{"reasoning_content": turn.reasoning_content}, {"content": turn.content}], on_delta)
        if not any(turn.usage.values()):  # scripts rarely state usage: count something plausible
            n_out = (len(turn.reasoning_content) + len(turn.content) + len(json.dumps(turn.tool_calls))) // 4
            turn.usage = empty_usage() | {"prompt_tokens": self.prompt_tokens(messages),
                                          "completion_tokens": n_out,
                                          "reasoning_tokens": len(turn.reasoning_content) // 4}
        return turn
